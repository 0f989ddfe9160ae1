//! Privileged tests of the `fwd` daemon: real fwd processes follow a real bare git repository
//! (the remote) in a temporary folder, enforce on the host end of a veth pair whose other end
//! is in a namespace of the test's own, and are judged by real ping and TCP from that
//! namespace and real connects from a cgroup of the test's own.
//!
//! Every test has its own temporary folder (remote, work clone, state, status socket), its own
//! bpffs root (`/sys/fs/bpf/fwdtest-<pid>-<n>`) and its own netns, veth pair and cgroup. The
//! [`Lab`] guard kills the fwd child first (a child paused by the loader's test hook holds the
//! root's lock), then unloads the root; it runs while a failing test unwinds too.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fw_loader::Dataplane;
use fw_netkit::policies::{only_tcp, ping_and_tcp};
use fw_netkit::{Cgroup, Netns, Outcome, TcpEchoServer, VethPair};
use fwd::status::Status;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A policy whose rule on line 7 names a protocol that does not exist.
const BAD: &str = "apiVersion: fw/v1
kind: Policy
metadata: {name: base}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: svc, action: allow, proto: tcpp, ports: [1]}
";

/// One test's world: a remote and a work clone, a bpffs root, a netns with a veth pair and
/// two TCP servers on the host end, a cgroup, and at most one running fwd.
struct Lab {
    dir: tempfile::TempDir,
    root: PathBuf,
    ns: Netns,
    veth: VethPair,
    a: TcpEchoServer,
    b: TcpEchoServer,
    cg: Cgroup,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    metrics: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill();
        let _ = fw_loader::unload_pinned(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl Lab {
    fn new() -> Lab {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::tempdir().expect("temp dir");
        let root = PathBuf::from("/sys/fs/bpf").join(format!("fwdtest-{}-{n}", std::process::id()));
        let ns = Netns::new().expect("netns");
        let veth = VethPair::new(&ns).expect("veth");
        let host = IpAddr::V4(veth.host_v4());
        let a = TcpEchoServer::start(SocketAddr::new(host, 0)).expect("server a");
        let b = TcpEchoServer::start(SocketAddr::new(host, 0)).expect("server b");
        let cg = Cgroup::new().expect("cgroup");
        let remote = dir.path().join("remote.git");
        std::fs::create_dir_all(&remote).expect("remote");
        git(&remote, &["init", "-q", "--bare", "-b", "main"]);
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("policies")).expect("work");
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["remote", "add", "origin", remote.to_str().expect("utf-8")]);
        let lab = Lab {
            metrics: format!("127.0.0.1:{}", free_port()),
            dir,
            root,
            ns,
            veth,
            a,
            b,
            cg,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
        };
        lab.write_config("1s", "60s");
        lab
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn write_config(&self, interval: &str, drift: &str) {
        let config = format!(
            "source:
  url: file://{remote}
  ref: main
  path: policies
  interval: {interval}
host: {{name: h1}}
interfaces: [{iface}]
cgroup: {cgroup}
bpffs: {root}
state: {state}
status: {status}
metrics: {metrics}
drift_interval: {drift}
",
            remote = self.path("remote.git").display(),
            iface = self.veth.host_name(),
            cgroup = self.cg.dir().display(),
            root = self.root.display(),
            state = self.path("state").display(),
            status = self.path("run/status.sock").display(),
            metrics = self.metrics,
        );
        std::fs::write(self.path("fwd.yaml"), config).expect("config");
    }

    /// Commits `yaml` as policies/base.yaml and pushes; returns the commit id.
    fn commit(&self, yaml: &str, message: &str) -> String {
        let work = self.path("work");
        std::fs::write(work.join("policies/base.yaml"), yaml).expect("policy");
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", message]);
        git(&work, &["push", "-q", "--force", "origin", "HEAD:main"]);
        git(&work, &["rev-parse", "HEAD"])
    }

    fn start_with(&mut self, env: &[(&str, &str)]) {
        self.spawn(&[], env);
    }

    /// Runs fwd under `wrapper` (a command line that ends where fwd's begins).
    fn start_wrapped(&mut self, wrapper: &[&str]) {
        self.spawn(wrapper, &[]);
    }

    fn spawn(&mut self, wrapper: &[&str], env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "fwd already runs");
        let fwd = env!("CARGO_BIN_EXE_fwd");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(fwd);
                c
            }
            None => Command::new(fwd),
        };
        cmd.arg("--config").arg(self.path("fwd.yaml")).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(Stdio::piped()).env("FWD_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn fwd");
        let stderr = child.stderr.take().expect("stderr");
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("fwd: {line}");
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        self.child = Some(child);
    }

    fn start(&mut self) {
        self.start_with(&[]);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("fwd runs");
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "fwd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn status(&self) -> Option<Status> {
        let mut s = std::os::unix::net::UnixStream::connect(self.path("run/status.sock")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits (up to 30 s) until the status satisfies `done`; returns that status.
    fn wait_status(&self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.status()
                && done(&s)
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not so after 30 s; last status {:?}",
                self.status()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_applied(&self, commit: &str) -> Status {
        self.wait_status(&format!("commit {commit} applied"), |s| {
            s.applied.as_ref().is_some_and(|a| a.commit == commit)
        })
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log.lock().expect("log").contains(needle) {
            assert!(Instant::now() < deadline, "fwd never logged {needle:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
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

    fn program_id(&self) -> u32 {
        Dataplane::adopt(&self.root).expect("adopt").ingress_program_id().expect("id")
    }

    fn metrics_text(&self) -> String {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        text
    }
}

fn work_of(lab: &Lab) -> PathBuf {
    lab.path("work")
}

/// Both generations hold the same maps and the same record.
fn assert_consistent(root: &Path) {
    let dp = Dataplane::adopt(root).expect("adopt");
    assert_eq!(dp.read_generation(0).expect("g0"), dp.read_generation(1).expect("g1"));
    let (a, b) = (dp.applied(0).expect("rec 0"), dp.applied(1).expect("rec 1"));
    assert!(a.is_some(), "generation 0 has no record");
    assert_eq!(a, b);
}

const P1: (bool, bool, bool) = (true, true, false);
const P2: (bool, bool, bool) = (false, false, true);

#[test]
fn a_commit_changes_enforcement_and_a_bad_commit_changes_nothing_and_is_reported() {
    if !fw_netkit::require_root() {
        return;
    }
    let mut lab = Lab::new();
    assert_eq!(lab.observe(), (true, true, true), "before fwd");
    let c1 = lab.commit(&ping_and_tcp(lab.a.addr().port()), "ping and a");
    lab.start();
    let st = lab.wait_applied(&c1);
    assert_eq!(lab.observe(), P1);
    let prog = lab.program_id();
    assert_eq!(st.applied.as_ref().and_then(|a| a.program_id), Some(prog));
    assert!(st.last_error.is_none(), "{:?}", st.last_error);

    let c2 = lab.commit(&only_tcp(lab.b.addr().port()), "only b");
    let st = lab.wait_applied(&c2);
    assert_eq!(lab.observe(), P2);
    assert_eq!(lab.program_id(), prog, "the program was not reloaded");
    let r = st.last_reconcile.as_ref().expect("reconcile");
    assert_eq!(r.outcome, "applied");
    assert!(r.delta, "a warm apply goes in as entry deltas: {r:?}");
    assert!(r.steps.iter().any(|s| s.step == "loader: flip"), "{r:?}");
    // What changed, as rules: ping is gone, svc's port moved.
    assert!(
        r.changes.iter().any(
            |c| c.starts_with("- ingress ") && c.ends_with("(base/ping, policies/base.yaml:7)")
        ),
        "{:?}",
        r.changes
    );
    assert!(
        r.changes.iter().any(|c| c.starts_with("+ ingress ") && c.contains("base/svc")),
        "{:?}",
        r.changes
    );
    assert_consistent(&lab.root);

    // A bad commit: refused, reported with its file:line, nothing changes.
    let bad = lab.commit(BAD, "typo");
    let st = lab.wait_status("the bad commit is reported", |s| {
        s.last_error.as_ref().is_some_and(|e| e.commit.as_deref() == Some(bad.as_str()))
    });
    let e = st.last_error.as_ref().expect("error");
    assert_eq!(e.stage, "validate");
    let p = &e.problems[0];
    assert_eq!((p.file.as_deref(), p.line), (Some("policies/base.yaml"), Some(7)), "{e:?}");
    assert_eq!(st.applied.as_ref().map(|a| a.commit.as_str()), Some(c2.as_str()));
    assert_eq!(st.last_reconcile.as_ref().map(|r| r.outcome.as_str()), Some("rejected"));
    assert_eq!(lab.observe(), P2, "the last good policy keeps enforcing");
    lab.wait_log("policies/base.yaml:7:");
    let m = lab.metrics_text();
    assert!(m.contains("fwd_reconciles_total{outcome=\"rejected\"} 1"), "{m}");
    assert!(m.contains(&format!("fwd_applied_revision{{commit=\"{c2}\"")), "{m}");
    assert!(m.contains("fwd_rule_packets_total{rule=\"base/svc\""), "{m}");
    assert!(m.contains("fwd_commit_to_enforced_seconds_count 2"), "{m}");
    assert!(m.contains("fwd_map_entries{map=\"FW_IN_L4\"}"), "{m}");
    assert!(m.contains("fwd_drops_total{direction=\"ingress\",reason=\"default\"}"), "{m}");

    // A restart while the head commit is bad: the enforced state is adopted (from its
    // recorded commit), the bad head is refused again, nothing is reloaded.
    assert!(lab.stop().success());
    lab.start();
    let st = lab.wait_status("the bad head is refused after a restart", |s| {
        s.last_error.as_ref().is_some_and(|e| e.commit.as_deref() == Some(bad.as_str()))
    });
    let applied = st.applied.as_ref().expect("adopted");
    assert_eq!((applied.commit.as_str(), applied.adopted), (c2.as_str(), true));
    assert_eq!(lab.observe(), P2);
    assert_eq!(lab.program_id(), prog);

    // The next good commit applies and clears the error.
    let c3 = lab.commit(&ping_and_tcp(lab.a.addr().port()), "back");
    let st = lab.wait_applied(&c3);
    assert!(st.last_error.is_none());
    assert_eq!(lab.observe(), P1);
    assert!(st.rules.iter().any(|r| r.name == "base/svc" && r.line == 8), "{:?}", st.rules);

    // SIGTERM leaves enforcement in place.
    assert!(lab.stop().success());
    assert_eq!(lab.observe(), P1);
    assert_eq!(lab.program_id(), prog);
}

#[test]
fn kill_9_during_each_reconcile_step_then_restart_keeps_enforcing_and_converges() {
    if !fw_netkit::require_root() {
        return;
    }
    let mut lab = Lab::new();
    let c1 = lab.commit(&ping_and_tcp(lab.a.addr().port()), "p1");
    lab.start();
    lab.wait_applied(&c1);
    let prog = lab.program_id();
    assert!(lab.stop().success());
    let (mut want, mut other) = (P1, P2);
    for (i, step) in ["after-standby-write", "after-flip", "before-replay"].iter().enumerate() {
        let yaml = if want == P1 {
            only_tcp(lab.b.addr().port())
        } else {
            ping_and_tcp(lab.a.addr().port())
        };
        let c = lab.commit(&yaml, &format!("change {i}"));
        lab.start_with(&[(fw_loader::HOOK_ENV, &format!("{step}:pause"))]);
        lab.wait_log(&format!("fw-loader: paused at {step}"));
        lab.kill();
        let seen = lab.observe();
        assert!(seen == want || seen == other, "{step}: neither policy in full: {seen:?}");
        assert_eq!(lab.program_id(), prog, "{step}: the program was not reloaded");

        lab.start();
        lab.wait_applied(&c);
        lab.wait_status("drift checked at start-up", |s| s.drift.checks >= 1);
        assert_eq!(lab.observe(), other, "{step}: converged on the new commit");
        assert_eq!(lab.program_id(), prog, "{step}: restart reloads nothing");
        assert_consistent(&lab.root);
        assert!(lab.stop().success());
        std::mem::swap(&mut want, &mut other);
    }
}

#[test]
fn hand_made_drift_is_corrected() {
    if !fw_netkit::require_root() {
        return;
    }
    let mut lab = Lab::new();
    lab.write_config("1s", "1s");
    let c1 = lab.commit(&ping_and_tcp(lab.a.addr().port()), "p1");
    lab.start();
    lab.wait_applied(&c1);
    assert_eq!(lab.observe(), P1);
    // By hand: drop every ingress port entry from both generations (the svc rule's).
    {
        let mut dp = Dataplane::adopt(&lab.root).expect("adopt");
        for g in 0..fw_common::GENERATIONS {
            let mut e = dp.read_generation(g).expect("read");
            let l4 = e.maps.get_mut(fw_common::maps::INGRESS_L4).expect("l4");
            assert!(!l4.is_empty());
            *l4 = fw_compiler::encode::Entries::new();
            // `read_generation` leaves the workload table out; the write wants every map.
            e.maps.entry(fw_common::maps::WORKLOADS).or_default();
            dp.write_generation(g, &e).expect("write by hand");
        }
    }
    let st = lab.wait_status("drift corrected", |s| s.drift.corrected_total > 0);
    assert!(st.drift.corrected_total >= 2, "{:?}", st.drift);
    assert_eq!(lab.observe(), P1, "the correction restored the rule");
    assert_consistent(&lab.root);

    // By hand: remove the XDP link's pin, which detaches the program from the interface.
    let link = fw_loader::attachments(&lab.root).expect("links").remove(0);
    std::fs::remove_file(&link.pin).expect("unpin the link");
    lab.wait_log("detached=true");
    lab.wait_status("attached again", |_| {
        fw_loader::attachments(&lab.root).is_ok_and(|a| a.len() == 1)
    });
    assert_eq!(lab.observe(), P1, "the interface is filtered again");
    let m = lab.metrics_text();
    assert!(!m.contains("fwd_drift_corrections_total 0\n"), "{m}");
}

#[test]
fn the_remote_going_away_and_coming_back_and_a_force_push() {
    if !fw_netkit::require_root() {
        return;
    }
    let mut lab = Lab::new();
    let c1 = lab.commit(&ping_and_tcp(lab.a.addr().port()), "p1");
    lab.start();
    lab.wait_applied(&c1);

    std::fs::rename(lab.path("remote.git"), lab.path("gone.git")).expect("remote away");
    let st = lab.wait_status("the fetch error is reported", |s| s.source.error.is_some());
    assert!(st.source.failures >= 1);
    assert_eq!(lab.observe(), P1, "enforcement unchanged while the remote is away");
    std::fs::rename(lab.path("gone.git"), lab.path("remote.git")).expect("remote back");
    let c2 = lab.commit(&only_tcp(lab.b.addr().port()), "p2");
    let st = lab.wait_applied(&c2);
    assert!(st.source.error.is_none(), "{:?}", st.source);
    assert_eq!(lab.observe(), P2);

    // The branch is deleted on the remote: reported, enforcement unchanged; pushed again:
    // followed.
    git(&lab.path("remote.git"), &["update-ref", "-d", "refs/heads/main"]);
    let st = lab.wait_status("the missing branch is reported", |s| s.source.error.is_some());
    assert!(st.source.error.as_deref().is_some_and(|e| e.contains("main")), "{:?}", st.source);
    assert_eq!(lab.observe(), P2, "enforcement unchanged while the branch is gone");
    git(&work_of(&lab), &["push", "-q", "origin", "HEAD:main"]);
    lab.wait_status("the branch is back", |s| s.source.error.is_none());
    assert_eq!(lab.observe(), P2);

    // Rewrite history: c2 is dropped, c3 replaces it (not a descendant).
    let work = lab.path("work");
    git(&work, &["reset", "-q", "--hard", &c1]);
    let c3 = lab.commit(&only_tcp(lab.a.addr().port()), "rewritten");
    let st = lab.wait_applied(&c3);
    assert!(st.source.forced, "{:?}", st.source);
    assert_eq!(lab.observe(), (false, true, false));
}

#[test]
fn a_cgroup_recreated_under_a_workload_path_stays_covered() {
    if !fw_netkit::require_root() {
        return;
    }
    let mut lab = Lab::new();
    let peer = IpAddr::V4(lab.veth.peer_v4());
    let server = TcpEchoServer::start_in(&lab.ns, SocketAddr::new(peer, 0)).expect("server");
    let t = Duration::from_secs(3);
    let app = lab.cg.child("app").expect("app");
    let yaml = format!(
        "apiVersion: fw/v1
kind: Policy
metadata: {{name: eg}}
spec:
  defaults: {{ingress: allow, egress: allow}}
  egress:
    - {{name: app-deny, action: deny, to: [{peer}/32], proto: tcp, ports: [{port}], workloads: [app]}}
",
        port = server.addr().port()
    );
    let c1 = lab.commit(&yaml, "deny app");
    lab.start();
    let st = lab.wait_applied(&c1);
    assert_eq!((st.workloads.paths, st.workloads.resolved), (1, 1));
    assert_eq!(app.tcp_connect(server.addr(), t).expect("probe"), Outcome::PermissionDenied);
    let old_id = app.id();

    // The service restarts: its cgroup goes away and comes back with a new id.
    drop(app);
    lab.wait_status("the removal is seen", |s| s.workloads.resolved == 0);
    let app = lab.cg.child("app").expect("app again");
    assert_ne!(app.id(), old_id);
    lab.wait_status("the new cgroup is resolved", |s| s.workloads.resolved == 1);
    assert_eq!(app.tcp_connect(server.addr(), t).expect("probe"), Outcome::PermissionDenied);
    assert_eq!(lab.cg.tcp_connect(server.addr(), t).expect("probe"), Outcome::Ok, "parent");
    let dp = Dataplane::adopt(&lab.root).expect("adopt");
    let active = dp.active_generation().expect("active");
    let table = dp.read_workloads(active).expect("workloads");
    assert!(table.contains_key(&app.id()) && !table.contains_key(&old_id), "{table:?}");
}

/// The capabilities the systemd unit keeps, as setpriv's `--bounding-set` list.
fn unit_capabilities() -> String {
    let unit = include_str!("../../../dist/fwd.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("-all,{}", caps.join(","))
}

#[test]
fn runs_with_only_the_capabilities_of_the_unit() {
    if !fw_netkit::require_root() {
        return;
    }
    let caps = unit_capabilities();
    let mut lab = Lab::new();
    let c1 = lab.commit(&ping_and_tcp(lab.a.addr().port()), "p1");
    // First run: loads, pins and attaches with these capabilities only.
    lab.start_wrapped(&["setpriv", "--bounding-set", &caps, "--inh-caps", "-all", "--"]);
    lab.wait_applied(&c1);
    assert_eq!(lab.observe(), P1);
    let prog = lab.program_id();
    assert!(lab.stop().success());
    // A restart adopts the pins (no reload) and applies a change, still without more.
    let c2 = lab.commit(&only_tcp(lab.b.addr().port()), "p2");
    lab.start_wrapped(&["setpriv", "--bounding-set", &caps, "--inh-caps", "-all", "--"]);
    lab.wait_applied(&c2);
    assert_eq!(lab.observe(), P2);
    assert_eq!(lab.program_id(), prog);
    assert!(lab.stop().success());
}

/// Makes the record under `root` name another ABI, as a root pinned by an older build would
/// (checking that it named this build's ABI before).
fn rewrite_recorded_abi(root: &Path, abi: &str) {
    let before = fw_loader::testing::rewrite_recorded_abi(root, abi).expect("rewrite the record");
    assert_eq!(before, fw_loader::abi_version());
}

#[test]
fn a_restart_on_pins_of_another_abi_swaps_the_programs_under_their_links() {
    if !fw_netkit::require_root() {
        return;
    }
    let mut lab = Lab::new();
    let c1 = lab.commit(&ping_and_tcp(lab.a.addr().port()), "p1");
    lab.start();
    lab.wait_applied(&c1);
    assert!(lab.stop().success());
    let (old_prog, link) = {
        let st = Dataplane::adopt(&lab.root).expect("adopt").status().expect("status");
        (st.program_id, st.attachments[0].link_id)
    };
    // As if the pins were made by an older fwd.
    rewrite_recorded_abi(&lab.root, "00000000deadbeef");
    let c2 = lab.commit(&only_tcp(lab.b.addr().port()), "p2");
    // The upgrade too runs with the systemd unit's capabilities only.
    let caps = unit_capabilities();
    lab.start_wrapped(&["setpriv", "--bounding-set", &caps, "--inh-caps", "-all", "--"]);
    lab.wait_applied(&c2);
    assert_eq!(lab.observe(), P2);
    let st =
        Dataplane::adopt(&lab.root).expect("adopt with this build's ABI").status().expect("st");
    assert_eq!(st.abi, fw_loader::abi_version());
    assert_ne!(st.program_id, old_prog, "the programs were replaced");
    assert_eq!(st.attachments[0].link_id, link, "under the same link");
    assert_eq!(st.attachments[0].program_id, st.program_id);
    assert_consistent(&lab.root);
}
