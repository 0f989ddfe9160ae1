//! Privileged tests of `fwctl apply | diff | status | unload` against the real kernel: the
//! data plane is pinned under a bpffs root of the test's own (`/sys/fs/bpf/fwtest-<pid>-<n>`,
//! unloaded and removed on drop), attached to the host end of a veth pair whose other end is in
//! a namespace of the test's own, and judged by real ping and TCP from that namespace.
//!
//! They live in fwctl's package (not under tests/) because the fail-static test must run the
//! real `fwctl apply` as a child process and SIGKILL it mid-apply, and only a package's own
//! integration tests get its binary's path (`CARGO_BIN_EXE_fwctl`).
//!
//! Every apply attaches the egress programs too, at a cgroup of the test's own (`--cgroup`),
//! so no test touches processes outside it.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fw_loader::{Dataplane, Opened};
use fw_netkit::policies::{only_tcp, ping_and_tcp};
use fw_netkit::{Cgroup, Netns, Outcome, TcpEchoServer, VethPair};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A bpffs root and a policy folder of the test's own; unloads and removes both on drop.
struct Scratch {
    root: PathBuf,
    dir: PathBuf,
    /// Where the egress programs attach; dropped (removed) after the unload in `drop`.
    cg: Cgroup,
}

impl Scratch {
    fn new() -> Scratch {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("fwtest-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("policy folder");
        let cg = Cgroup::new().expect("test cgroup");
        Scratch { root: PathBuf::from("/sys/fs/bpf").join(id), dir, cg }
    }

    fn policy(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, yaml).expect("write policy");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fw_loader::unload_pinned(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fwctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fwctl"))
}

fn run(args: &[&str]) -> Output {
    fwctl().args(args).output().expect("run fwctl")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn apply_args<'a>(s: &'a Scratch, policy: &'a Path, veth: &'a VethPair) -> Vec<&'a str> {
    vec![
        "apply",
        policy.to_str().expect("utf-8 path"),
        "--host",
        "h1",
        "--interface",
        veth.host_name(),
        "--bpffs",
        s.root.to_str().expect("utf-8 root"),
        "--cgroup",
        s.cg.dir().to_str().expect("utf-8 cgroup"),
    ]
}

fn apply(s: &Scratch, policy: &Path, veth: &VethPair) {
    let out = run(&apply_args(s, policy, veth));
    assert!(out.status.success(), "fwctl apply failed: {}", text(&out));
}

/// `fwctl apply` with the loader's test hook aborting right after the standby's write: it
/// fails, saying where.
fn apply_aborting_after_standby_write(s: &Scratch, policy: &Path, veth: &VethPair) {
    let out = fwctl()
        .args(apply_args(s, policy, veth))
        .env(fw_loader::HOOK_ENV, "after-standby-write:abort")
        .output()
        .expect("fwctl");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("after-standby-write"), "{}", text(&out));
}

struct Net {
    ns: Netns,
    veth: VethPair,
    a: TcpEchoServer,
    b: TcpEchoServer,
}

impl Net {
    fn new() -> Net {
        let ns = Netns::new().expect("netns");
        let veth = VethPair::new(&ns).expect("veth");
        let host = IpAddr::V4(veth.host_v4());
        let a = TcpEchoServer::start(SocketAddr::new(host, 0)).expect("server a");
        let b = TcpEchoServer::start(SocketAddr::new(host, 0)).expect("server b");
        Net { ns, veth, a, b }
    }

    fn ping(&self) -> Outcome {
        let host = IpAddr::V4(self.veth.host_v4());
        self.ns.run(move || fw_netkit::ping(host)).expect("ns").expect("ping")
    }

    fn tcp(&self, server: &TcpEchoServer) -> Outcome {
        let addr = server.addr();
        self.ns.run(move || fw_netkit::tcp_connect(addr, Duration::from_millis(700))).expect("ns")
    }

    /// (ping, tcp to a, tcp to b), each as allowed or not.
    fn observe(&self) -> (bool, bool, bool) {
        (
            self.ping() == Outcome::Ok,
            self.tcp(&self.a) == Outcome::Ok,
            self.tcp(&self.b) == Outcome::Ok,
        )
    }
}

/// Waits (up to 5 s) for `done`. Removing a link's last pin does not detach it at once: the
/// kernel releases the link from a work queue after the pin's inode is freed (itself after an
/// RCU grace period), which under load takes long enough for an immediate probe to still see
/// the program. The first check that holds ends the wait; never holding fails the test.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: still not so after 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn root_ok() -> bool {
    fw_netkit::require_root()
}

/// Both generations hold the same maps and the same record.
fn assert_consistent(root: &Path) {
    let dp = Dataplane::adopt(root).expect("adopt");
    assert_eq!(dp.read_generation(0).expect("g0"), dp.read_generation(1).expect("g1"));
    let (a, b) = (dp.applied(0).expect("rec 0"), dp.applied(1).expect("rec 1"));
    assert!(a.is_some(), "generation 0 has no record");
    assert_eq!(a, b);
}

fn digest(root: &Path) -> (u32, Option<String>) {
    let dp = Dataplane::adopt(root).expect("adopt");
    let g = dp.active_generation().expect("active");
    (g, dp.applied(g).expect("record").map(|a| a.digest))
}

#[test]
fn apply_enforces_and_a_changed_policy_changes_enforcement_with_the_same_program() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let net = Net::new();
    assert_eq!(net.observe(), (true, true, true), "before any policy");
    let p1 = s.policy("p1.yaml", &ping_and_tcp(net.a.addr().port()));
    let t = Instant::now();
    let out = run(&apply_args(&s, &p1, &net.veth));
    let first = t.elapsed();
    assert!(out.status.success(), "fwctl apply failed: {}", text(&out));
    assert!(text(&out).contains("first load: both generations written at once"), "{}", text(&out));
    assert_eq!(net.observe(), (true, true, false), "ping and a allowed, b denied");
    let (prog, link) = {
        let dp = Dataplane::adopt(&s.root).expect("adopt");
        let st = dp.status().expect("status");
        assert_eq!(st.attachments.len(), 1);
        assert_eq!(st.attachments[0].program_id, st.program_id);
        (st.program_id, st.attachments[0].link_id)
    };
    assert_consistent(&s.root);

    let p2 = s.policy("p1.yaml", &only_tcp(net.b.addr().port()));
    let t = Instant::now();
    let out = run(&apply_args(&s, &p2, &net.veth));
    let second = t.elapsed();
    assert!(out.status.success(), "fwctl apply failed: {}", text(&out));
    assert!(!text(&out).contains("both generations written at once"), "{}", text(&out));
    assert_eq!(net.observe(), (false, false, true), "only b allowed");
    let dp = Dataplane::adopt(&s.root).expect("adopt");
    let st = dp.status().expect("status");
    assert_eq!(st.program_id, prog, "the program was not reloaded");
    assert_eq!(st.attachments[0].link_id, link, "the link was not replaced");
    drop(dp);
    assert_consistent(&s.root);
    eprintln!("apply timings: first {first:?}, second {second:?}");

    // diff: no change against itself, changes (as rules) against the first policy.
    let root = s.root.to_str().expect("utf-8");
    let same = run(&["diff", p2.to_str().expect("utf-8"), "--host", "h1", "--bpffs", root]);
    assert_eq!(same.status.code(), Some(0), "{}", text(&same));
    let p3 = s.policy("p3.yaml", &ping_and_tcp(net.a.addr().port()));
    let d = run(&["diff", p3.to_str().expect("utf-8"), "--host", "h1", "--bpffs", root]);
    assert_eq!(d.status.code(), Some(1), "{}", text(&d));
    let out = text(&d);
    assert!(out.contains("+ ingress allow icmp"), "{out}");
    assert!(out.contains("p3.yaml:"), "{out}");
    let status = run(&["status", "--bpffs", root]);
    assert!(status.status.success(), "{}", text(&status));
    let out = text(&status);
    assert!(out.contains(&format!("program fw_ingress id {prog}")), "{out}");
    assert!(out.contains("generations consistent"), "{out}");
    assert!(out.contains("base/svc"), "counters are named by the saved rule table: {out}");
}

#[test]
fn status_of_a_data_plane_nothing_was_applied_to_says_so() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let dp = Dataplane::load_pinned(&s.root, &fw_compiler::mapstate::Capacities::default())
        .expect("load");
    let st = dp.status().expect("status");
    assert_eq!(st.empty, [true, true], "{st:?}");
    assert_eq!(st.generations, [None, None], "{st:?}");
    drop(dp);
    let status = run(&["status", "--bpffs", s.root.to_str().expect("utf-8")]);
    assert!(status.status.success(), "{}", text(&status));
    let out = text(&status);
    assert!(out.contains("generation 0 active : empty (nothing applied yet)"), "{out}");
    assert!(out.contains("generation 1 standby: empty (nothing applied yet)"), "{out}");
    assert!(out.contains("generations consistent"), "{out}");
    // A write that was interrupted clears the record: unknown, not empty.
    let mut dp = Dataplane::adopt(&s.root).expect("adopt");
    fw_loader::testing::clear_record(&mut dp, 1).expect("clear the record");
    let st = dp.status().expect("status");
    assert_eq!(st.empty, [true, false], "{st:?}");
    let out = text(&run(&["status", "--bpffs", s.root.to_str().expect("utf-8")]));
    assert!(out.contains("generation 1 standby: unknown (no record)"), "{out}");
    assert!(out.contains("generations differ"), "{out}");
}

#[test]
fn a_second_instance_adopts_the_pins_without_reloading() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let caps = fw_compiler::mapstate::Capacities::default();
    let (first, opened) = Dataplane::open_pinned(&s.root, &caps).expect("load");
    assert_eq!(opened, Opened::Loaded);
    let id = first.ingress_program_id().expect("id");
    let (second, opened) = Dataplane::open_pinned(&s.root, &caps).expect("adopt");
    assert_eq!(opened, Opened::Adopted);
    assert_eq!(second.ingress_program_id().expect("id"), id);
    drop(first);
    drop(second);
    // The pins keep the program loaded after every handle is gone.
    let third = Dataplane::adopt(&s.root).expect("adopt again");
    assert_eq!(third.ingress_program_id().expect("id"), id);
    for entry in std::fs::read_dir(&s.root).expect("root") {
        let meta = entry.expect("entry").metadata().expect("meta");
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        assert_eq!(mode, if meta.is_dir() { 0o700 } else { 0o600 });
    }
}

#[test]
fn an_apply_that_fails_before_the_flip_changes_nothing() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let net = Net::new();
    let p1 = s.policy("p.yaml", &ping_and_tcp(net.a.addr().port()));
    apply(&s, &p1, &net.veth);
    let before = digest(&s.root);

    // Does not compile: nothing is even opened.
    let bad = s.policy(
        "p.yaml",
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: base}\nspec: {bogus: 1}\n",
    );
    let out = run(&apply_args(&s, &bad, &net.veth));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(digest(&s.root), before);

    // Fails after writing the standby (the hook aborts there): the active generation stays.
    let p2 = s.policy("p.yaml", &only_tcp(net.b.addr().port()));
    apply_aborting_after_standby_write(&s, &p2, &net.veth);
    assert_eq!(digest(&s.root), before);
    assert_eq!(net.observe(), (true, true, false), "the old policy still enforces");
}

#[test]
fn a_first_load_that_fails_attaches_nothing_and_the_next_apply_repairs_it() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let net = Net::new();
    let p = s.policy("p.yaml", &only_tcp(net.b.addr().port()));
    // The first load writes both generations at once, then fails where the hook aborts
    // (after the writes, before the flip): nothing is attached, so traffic is as before.
    apply_aborting_after_standby_write(&s, &p, &net.veth);
    let dp = Dataplane::adopt(&s.root).expect("adopt");
    let st = dp.status().expect("status");
    assert!(st.attachments.is_empty(), "{st:?}");
    drop(dp);
    assert_eq!(net.observe(), (true, true, true), "nothing filters yet");
    // The next apply adopts what is pinned, goes through every step and attaches.
    let out = run(&apply_args(&s, &p, &net.veth));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("both generations written at once"), "{}", text(&out));
    assert_eq!(net.observe(), (false, false, true), "only b allowed");
    assert_consistent(&s.root);
}

/// Makes the record under `root` name another ABI, as a root pinned by an older build would
/// (checking that it named this build's ABI before).
fn rewrite_recorded_abi(root: &Path, abi: &str) {
    let before = fw_loader::testing::rewrite_recorded_abi(root, abi).expect("rewrite the record");
    assert_eq!(before, fw_loader::abi_version());
}

#[test]
fn apply_on_a_root_pinned_with_another_abi_upgrades_it_in_place() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let net = Net::new();
    let p1 = s.policy("p.yaml", &ping_and_tcp(net.a.addr().port()));
    apply(&s, &p1, &net.veth);
    let (old_prog, link) = {
        let st = Dataplane::adopt(&s.root).expect("adopt").status().expect("status");
        (st.program_id, st.attachments[0].link_id)
    };
    rewrite_recorded_abi(&s.root, "00000000deadbeef");
    assert!(matches!(Dataplane::adopt(&s.root), Err(fw_loader::Error::AbiMismatch { .. })));

    let p2 = s.policy("p.yaml", &only_tcp(net.b.addr().port()));
    let out = run(&apply_args(&s, &p2, &net.veth));
    assert!(out.status.success(), "fwctl apply failed: {}", text(&out));
    let said = text(&out);
    assert!(said.contains("upgraded the data plane"), "{said}");
    assert!(said.contains("upgraded abi 00000000deadbeef -> "), "{said}");
    assert_eq!(net.observe(), (false, false, true), "the new policy enforces");

    let dp = Dataplane::adopt(&s.root).expect("the upgraded root adopts with this build's ABI");
    let st = dp.status().expect("status");
    assert_eq!(st.abi, fw_loader::abi_version());
    assert_ne!(st.program_id, old_prog, "an ABI change replaces the program");
    assert_eq!(st.attachments.len(), 1);
    assert_eq!(st.attachments[0].link_id, link, "the link is kept; its program was swapped");
    assert_eq!(st.attachments[0].program_id, st.program_id);
    drop(dp);
    assert_consistent(&s.root);

    // The next apply adopts: same program.
    let p1 = s.policy("p.yaml", &ping_and_tcp(net.a.addr().port()));
    apply(&s, &p1, &net.veth);
    let st = Dataplane::adopt(&s.root).expect("adopt").status().expect("status");
    assert_eq!(st.program_id, st.attachments[0].program_id);
    assert_eq!(net.observe(), (true, true, false));
}

#[test]
fn unload_removes_every_pin_and_detaches() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let net = Net::new();
    let p = s.policy("p.yaml", &only_tcp(net.b.addr().port()));
    apply(&s, &p, &net.veth);
    assert_eq!(net.observe(), (false, false, true));
    let out = run(&["unload", "--bpffs", s.root.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("links/"), "names the removed link: {}", text(&out));
    assert!(!s.root.exists(), "the root is gone");
    eventually("XDP is detached", || {
        let link = Command::new("ip")
            .args(["-d", "link", "show", net.veth.host_name()])
            .output()
            .expect("ip");
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp")
    });
    assert_eq!(net.observe(), (true, true, true), "traffic flows again");
    let again = run(&["unload", "--bpffs", s.root.to_str().expect("utf-8")]);
    assert_eq!(again.status.code(), Some(1), "nothing left to unload");
}

#[test]
fn a_killed_apply_leaves_one_policy_in_force_and_the_next_apply_repairs() {
    if !root_ok() {
        return;
    }
    let net = Net::new();
    // (step, whether the new policy is in force once the process is killed there)
    for (step, new_in_force) in
        [("after-standby-write", false), ("after-flip", true), ("before-replay", true)]
    {
        let s = Scratch::new();
        let old = s.policy("p.yaml", &ping_and_tcp(net.a.addr().port()));
        apply(&s, &old, &net.veth);
        let new = s.policy("p.yaml", &only_tcp(net.b.addr().port()));
        let mut child = fwctl()
            .args(apply_args(&s, &new, &net.veth))
            .env(fw_loader::HOOK_ENV, format!("{step}:pause"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fwctl");
        let stderr = child.stderr.take().expect("stderr");
        let mut paused = false;
        for line in BufReader::new(stderr).lines() {
            let line = line.expect("line");
            if line.contains(&format!("paused at {step}")) {
                paused = true;
                break;
            }
        }
        assert!(paused, "fwctl never reached {step}");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let seen = net.observe();
        let expected = if new_in_force { (false, false, true) } else { (true, true, false) };
        assert_eq!(seen, expected, "killed {step}: one policy, in full");

        apply(&s, &new, &net.veth);
        assert_eq!(net.observe(), (false, false, true), "after the repairing apply ({step})");
        assert_consistent(&s.root);
    }
}

#[test]
fn a_state_larger_than_the_standby_maps_gets_bigger_maps_in_both_generations() {
    if !root_ok() {
        return;
    }
    use fw_compiler::mapstate::Capacities;
    let s = Scratch::new();
    let small =
        Capacities { v4_prefixes: 2, v6_prefixes: 2, l4_entries: 2, ..Capacities::default() };
    let mut dp = Dataplane::load_pinned(&s.root, &small).expect("load");
    let id = dp.ingress_program_id().expect("id");
    let yaml = "apiVersion: fw/v1
kind: Policy
metadata: {name: big}
spec:
  defaults: {ingress: deny}
  ingress:
    - {action: allow, proto: tcp, ports: [22, 80, 443], from: [10.1.0.0/16, 10.2.0.0/16, 10.3.0.0/16, 10.4.0.0/16]}
    - {action: allow, proto: udp, ports: [53], from: [10.5.0.0/16]}
";
    let limits = fw_compiler::yaml::ParseLimits::default();
    let loaded =
        fw_compiler::load::load([fw_compiler::load::Input::new("big.yaml", yaml)], &limits);
    let set = loaded.policy_set.expect("valid policy");
    let host = fw_compiler::model::HostIdentity { name: "h1".into(), labels: Default::default() };
    let state = fw_compiler::compile::compile(&set.for_host(&host), &Capacities::default())
        .expect("compiles");
    let encoded = fw_compiler::encode::encode(&state);
    assert!(encoded.get("FW_IN_V4").expect("v4").len() > 2, "the state must not fit");
    let report = dp.apply(&encoded, "r1", &state.digest(), b"{}").expect("apply");
    assert_eq!(report.grown, vec![1, 0], "standby grown before the flip, the old one after");
    let mut want = encoded.clone();
    want.maps.remove("FW_WORKLOADS");
    assert_eq!(dp.read_generation(0).expect("g0"), want);
    assert_eq!(dp.read_generation(1).expect("g1"), want);
    drop(dp);
    let dp = Dataplane::adopt(&s.root).expect("adopt");
    assert_eq!(dp.ingress_program_id().expect("id"), id);
    let st = dp.status().expect("status");
    let v4 = st.maps.iter().find(|m| m.name == "FW_IN_V4").expect("FW_IN_V4");
    assert!(v4.capacity as usize >= v4.entries && v4.entries > 2, "{v4:?}");
}

/// The egress programs' (program id, link id) pairs, from the pins.
fn egress_ids(root: &Path) -> Vec<(u32, u32)> {
    let dp = Dataplane::adopt(root).expect("adopt");
    dp.cgroup_attachments()
        .expect("cgroup links")
        .iter()
        .map(|l| (l.program_id, l.link_id))
        .collect()
}

#[test]
fn apply_attaches_egress_at_the_cgroup_and_workload_rules_hold_after_it_exits() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let ns = Netns::new().expect("netns");
    let veth = VethPair::new(&ns).expect("veth");
    let peer = IpAddr::V4(veth.peer_v4());
    let server = TcpEchoServer::start_in(&ns, SocketAddr::new(peer, 0)).expect("server");
    let app = s.cg.child("app").expect("app cgroup");
    let other = s.cg.child("other").expect("other cgroup");
    let t = Duration::from_secs(3);
    assert_eq!(app.tcp_connect(server.addr(), t).expect("probe"), Outcome::Ok, "before");

    // The rule is on line 7, its mapping at column 7.
    let yaml = format!(
        "apiVersion: fw/v1
kind: Policy
metadata: {{name: eg}}
spec:
  defaults: {{ingress: allow, egress: allow}}
  egress:
    - {{name: app-deny, action: deny, to: [{peer}/32], proto: tcp, ports: [{port}], workloads: [app], log: true}}
",
        port = server.addr().port()
    );
    let p = s.policy("eg.yaml", &yaml);
    let out = run(&apply_args(&s, &p, &veth));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("workloads: 1 of 1 resolved"), "{}", text(&out));
    assert!(text(&out).contains("egress attached to"), "{}", text(&out));

    // The apply process is gone: the pinned links enforce.
    assert_eq!(app.tcp_connect(server.addr(), t).expect("probe"), Outcome::PermissionDenied);
    assert_eq!(other.tcp_connect(server.addr(), t).expect("probe"), Outcome::Ok, "other");
    assert_eq!(s.cg.tcp_connect(server.addr(), t).expect("probe"), Outcome::Ok, "parent");
    assert_eq!(fw_netkit::tcp_connect(server.addr(), t), Outcome::Ok, "outside the cgroup");
    let ids = egress_ids(&s.root);
    assert_eq!(ids.len(), 5, "connect4/6, sendmsg4/6 and conntrack are pinned");
    for name in ["FW_CONNTRACK", "FW_EVENTS", "FW_EV_LIMIT", "fw_connect4", "fw_ct_egress"] {
        let meta = std::fs::metadata(s.root.join(name)).expect(name);
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
    }
    // The pinned tracker recorded the allowed connection; an adopted data plane reads it.
    let flows = Dataplane::adopt(&s.root).expect("adopt").conntrack_entries().expect("conntrack");
    let port = server.addr().port();
    assert!(
        flows
            .iter()
            .any(|(k, _)| k.remote_port == port && k.remote[..4] == veth.peer_v4().octets()),
        "{flows:?}"
    );
    for entry in std::fs::read_dir(s.root.join("links")).expect("links") {
        let meta = entry.expect("entry").metadata().expect("meta");
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
    }

    // A second apply adopts: same programs, same links.
    let out = run(&apply_args(&s, &p, &veth));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("adopted the data plane"), "{}", text(&out));
    assert!(text(&out).contains("egress already attached to"), "{}", text(&out));
    assert_eq!(egress_ids(&s.root), ids, "programs and links unchanged");
    assert_eq!(app.tcp_connect(server.addr(), t).expect("probe"), Outcome::PermissionDenied);

    // An adopted data plane attaches from its pinned programs (dropping the links detaches).
    {
        let mut dp = Dataplane::adopt(&s.root).expect("adopt");
        let links = dp.attach_egress(other.dir()).expect("attach from pins");
        let programs: Vec<u32> =
            links.links.iter().map(|(_, l)| l.info().expect("link info").program_id()).collect();
        assert_eq!(programs, ids.iter().map(|(p, _)| *p).collect::<Vec<_>>());
    }

    // The denied connects were logged; the reader names the rule and where it is written.
    let mut child = fwctl()
        .args(["events", "--count", "1", "--bpffs", s.root.to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fwctl events");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fwctl events --count 1 did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains(" egress deny tcp "), "{line}");
    assert!(line.contains(&format!("-> {}", server.addr())), "{line}");
    assert!(line.contains("rule eg/app-deny ("), "{line}");
    assert!(line.contains("eg.yaml:7:7)"), "{line}");

    // Unload removes the cgroup links too.
    let out = run(&["unload", "--bpffs", s.root.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("links/cgroup-fw_connect4"), "{}", text(&out));
    eventually("the app cgroup connects after unload", || {
        app.tcp_connect(server.addr(), t).expect("probe") == Outcome::Ok
    });
}

fn diff_args<'a>(s: &'a Scratch, policy: &'a Path) -> Vec<&'a str> {
    vec![
        "diff",
        policy.to_str().expect("utf-8 path"),
        "--host",
        "h1",
        "--bpffs",
        s.root.to_str().expect("utf-8 root"),
        "--cgroup",
        s.cg.dir().to_str().expect("utf-8 cgroup"),
    ]
}

#[test]
fn diff_shows_workload_table_changes_by_path_and_cgroup_and_counts_them() {
    if !root_ok() {
        return;
    }
    let s = Scratch::new();
    let net = Net::new();
    let yaml = "apiVersion: fw/v1
kind: Policy
metadata: {name: eg}
spec:
  egress:
    - {name: app-deny, action: deny, to: [10.200.0.0/16], proto: tcp, ports: [5432], workloads: [app]}
";
    let p = s.policy("eg.yaml", yaml);
    // Applied before the workload's cgroup exists: the kernel's table is empty.
    let out = run(&apply_args(&s, &p, &net.veth));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("workloads: 0 of 1 resolved"), "{}", text(&out));
    let out = run(&diff_args(&s, &p));
    assert_eq!(out.status.code(), Some(0), "nothing to change: {}", text(&out));

    // The cgroup appears: the policy is the same, the table apply would write is not.
    let app = s.cg.child("app").expect("app cgroup");
    let out = run(&diff_args(&s, &p));
    assert_eq!(out.status.code(), Some(1), "a table change counts: {}", text(&out));
    let added = format!("+ workload app (cgroup {}) -> class ", app.id());
    assert!(text(&out).contains(&added), "{}", text(&out));
    let out = run(&apply_args(&s, &p, &net.veth));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&diff_args(&s, &p));
    assert_eq!(out.status.code(), Some(0), "applied: {}", text(&out));

    // Re-created (a new id): the old entry goes, the new one comes.
    let old_id = app.id();
    drop(app);
    let app = s.cg.child("app").expect("app cgroup again");
    assert_ne!(app.id(), old_id);
    let out = run(&diff_args(&s, &p));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let removed = format!("- workload (no workload path names it) (cgroup {old_id}) -> class ");
    assert!(text(&out).contains(&removed), "{}", text(&out));
    let added = format!("+ workload app (cgroup {}) -> class ", app.id());
    assert!(text(&out).contains(&added), "{}", text(&out));
}
