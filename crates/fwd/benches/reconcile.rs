//! fwd's figures: commit-to-enforced latency (a local repository, and a remote polled every
//! 5 s), the reconcile time of a one-rule change against a 100k-prefix policy, and fwd's
//! resident memory and idle CPU with a 100k-rule policy.
//!
//! Why it is built this way:
//! - Real fwd processes (the binary cargo builds with the bench), real git repositories in a
//!   temporary folder, a bpffs root of the bench's own (`/sys/fs/bpf/fwdbench-<pid>-<n>`, one
//!   per series, unloaded after it), XDP on the host end of a veth pair whose peer is in a
//!   namespace of the bench's own, and the egress programs on a cgroup of the bench's own
//!   (fw-netkit): what is measured is what a host runs, nothing is attached to the host's own
//!   interfaces or root cgroup. It needs root and prints `SKIPPED` without it.
//! - Latency is measured from outside, the way a person would see it: the clock starts just
//!   before `git commit` (local) or `git push` (remote) and stops when fwd's status socket
//!   reports the new commit as applied, polled every 2 ms. fwd's own "seen to enforced" time
//!   and its step times are read from the same status document and printed next to it.
//! - The remote series serves a bare repository with `git daemon` (git://), which fwd cannot
//!   watch, so it finds commits by polling alone; the bench waits a pseudo-random 0-5 s before
//!   each push so that the pushes fall at every phase of the poll interval.
//! - Memory is the kernel's count for the process (`VmRSS`, `VmHWM` in /proc/PID/status);
//!   idle CPU is utime+stime from /proc/PID/stat over a window in which nothing talks to fwd
//!   (the status socket is not read during it, since every read makes fwd read the counters).
//!
//! `cargo bench -p fwd --bench reconcile [-- --only local|remote|prefixes|prefixes-onefile|rules]
//! [--commits N] [--remote-commits N] [--idle-secs N]`

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use fw_netkit::{Cgroup, Netns, VethPair};
use fwd::status::Status;

struct Options {
    only: Option<String>,
    commits: usize,
    remote_commits: usize,
    idle_secs: u64,
}

fn options() -> Options {
    let mut o = Options { only: None, commits: 40, remote_commits: 12, idle_secs: 30 };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} takes a number"))
        };
        match a.as_str() {
            "--only" => o.only = args.next(),
            "--commits" => o.commits = num("--commits") as usize,
            "--remote-commits" => o.remote_commits = num("--remote-commits") as usize,
            "--idle-secs" => o.idle_secs = num("--idle-secs"),
            // cargo passes --bench; anything else is for other harnesses.
            _ => {}
        }
    }
    o
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.invalid")
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The bench's interface and cgroup, shared by the series.
struct Lab {
    dir: tempfile::TempDir,
    _ns: Netns,
    veth: VethPair,
    cg: Cgroup,
    series: usize,
}

/// One fwd process with its own bpffs root; killed and unloaded on drop. Its log lines arrive
/// on `log` with the instant they were read.
struct Fwd {
    child: Child,
    root: PathBuf,
    sock: PathBuf,
    log: Receiver<(Instant, String)>,
    log_file: PathBuf,
}

impl Drop for Fwd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fw_loader::unload_pinned(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Fwd {
    /// The status document. Every read makes fwd read its counters and count its map entries
    /// (at 100k entries, a noticeable amount of work), so the bench reads it only after the
    /// event it waits for, never in a loop.
    fn status(&self) -> Status {
        let read = || -> Option<Status> {
            let mut s = std::os::unix::net::UnixStream::connect(&self.sock).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            serde_json::from_str(&text).ok()
        };
        let start = Instant::now();
        loop {
            if let Some(s) = read() {
                return s;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no status from fwd");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for fwd's log line saying `commit` was applied; the instant it was read, and the
    /// status document after it.
    fn wait_applied(&mut self, commit: &str, limit: Duration) -> (Instant, Status) {
        let needle = format!("applied commit={commit}");
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok((at, line)) if line.contains(&needle) => return (at, self.status()),
                Ok(_) => {}
                Err(_) => {
                    panic!("{commit} not applied after {limit:?}; see {}", self.log_file.display())
                }
            }
        }
    }

    /// Waits for the end of the next drift check (its log line); the instant it was read.
    fn wait_drift_check(&mut self, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok((at, line)) if line.contains("no drift") || line.contains("drift corrected") => {
                    return at;
                }
                Ok(_) => {}
                Err(_) => panic!("no drift check within {limit:?}"),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Lab {
    fn new() -> Lab {
        let ns = Netns::new().expect("netns");
        let veth = VethPair::new(&ns).expect("veth");
        Lab {
            dir: tempfile::tempdir().expect("temp"),
            _ns: ns,
            veth,
            cg: Cgroup::new().expect("cgroup"),
            series: 0,
        }
    }

    /// Starts fwd on `url`; its folder is `name` under the bench's temp folder.
    fn fwd(&mut self, name: &str, url: &str, interval: &str) -> Fwd {
        self.series += 1;
        let root = PathBuf::from("/sys/fs/bpf").join(format!(
            "fwdbench-{}-{}",
            std::process::id(),
            self.series
        ));
        let dir = self.dir.path().join(format!("fwd-{name}"));
        std::fs::create_dir_all(&dir).expect("fwd dir");
        let sock = dir.join("run/status.sock");
        let config = format!(
            "source: {{url: '{url}', ref: main, path: policies, interval: {interval}}}
host: {{name: bench-1, labels: {{role: bench}}}}
interfaces: [{iface}]
cgroup: {cgroup}
bpffs: {root}
state: {state}
status: {sock}
metrics: 127.0.0.1:0
",
            iface = self.veth.host_name(),
            cgroup = self.cg.dir().display(),
            root = root.display(),
            state = dir.join("state").display(),
            sock = sock.display(),
        );
        std::fs::write(dir.join("fwd.yaml"), config).expect("config");
        let log_file = dir.join("fwd.log");
        let mut copy = std::fs::File::create(&log_file).expect("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fwd"))
            .arg("--config")
            .arg(dir.join("fwd.yaml"))
            // The engine's debug lines include "no drift" after each drift check.
            .env("FWD_LOG", "info,fwd::engine=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fwd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::{BufRead as _, Write as _};
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let at = Instant::now();
                let _ = writeln!(copy, "{line}");
                let _ = tx.send((at, line));
            }
        });
        Fwd { child, root, sock, log, log_file }
    }

    /// A work repository with `files` under policies/, committed on main.
    fn repo(&self, name: &str, files: &[(String, String)]) -> PathBuf {
        let work = self.dir.path().join(name);
        std::fs::create_dir_all(work.join("policies")).expect("work");
        git(&work, &["init", "-q", "-b", "main"]);
        for (file, text) in files {
            std::fs::write(work.join("policies").join(file), text).expect("policy");
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "seed"]);
        work
    }
}

/// Rewrites policies/`file` of `work` with `text` and commits; the commit id.
fn commit(work: &Path, file: &str, text: &str, message: &str) -> String {
    std::fs::write(work.join("policies").join(file), text).expect("policy");
    git(work, &["commit", "-q", "-am", message]);
    git(work, &["rev-parse", "HEAD"])
}

// --- policies ----------------------------------------------------------------------------------

const HEAD: &str = "apiVersion: fw/v1\n";

/// A small host policy: an address set, default-deny ingress, 20 services from their own
/// networks, ping, and `svc` on `port` (the rule the commits change).
fn small_policy(port: u16) -> String {
    let mut y = format!(
        "{HEAD}kind: AddressSet\nmetadata: {{name: clients}}\nspec:\n  addresses: [10.20.0.0/16, 192.0.2.0/24]\n---\n\
         {HEAD}kind: Policy\nmetadata: {{name: base}}\nspec:\n  defaults: {{ingress: deny}}\n  ingress:\n\
         \x20   - {{name: ping, action: allow, proto: icmp, icmp: [echo-request]}}\n\
         \x20   - {{name: svc, action: allow, from: [{{set: clients}}], proto: tcp, ports: [{port}]}}\n"
    );
    for i in 0..20 {
        y.push_str(&format!(
            "    - {{name: s{i}, action: allow, from: [10.1.{i}.0/24], proto: tcp, ports: [{}]}}\n",
            2000 + i
        ));
    }
    y
}

/// `n` distinct IPv4 prefixes that do not merge (a tenth /24s, the rest /32s) in AddressSets of at most 50k,
/// denied on ingress, with the small policy around them. Files: the sets, and base.yaml.
fn prefix_policy(n: u32, port: u16) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut names = Vec::new();
    let mut i = 0u32;
    while i < n {
        let name = format!("block-{}", names.len());
        let mut y =
            format!("{HEAD}kind: AddressSet\nmetadata: {{name: {name}}}\nspec:\n  addresses:\n");
        let end = (i + 50_000).min(n);
        for k in i..end {
            let (addr, len) = if k % 10 == 0 {
                // Every other /24, so neighbours cannot merge into a shorter prefix.
                ((20u32 << 24) + ((k / 10) << 9), 24)
            } else {
                ((30u32 << 24) + k * 7, 32)
            };
            y.push_str(&format!("    - {}/{len}\n", std::net::Ipv4Addr::from(addr)));
        }
        files.push((format!("{name}.yaml"), y));
        names.push(name);
        i = end;
    }
    let sets: Vec<String> = names.iter().map(|n| format!("{{set: {n}}}")).collect();
    let block = format!(
        "{HEAD}kind: Policy\nmetadata: {{name: blocklist}}\nspec:\n  ingress:\n    - {{name: blocked, action: deny, from: [{}]}}\n",
        sets.join(", ")
    );
    files.push(("blocklist.yaml".into(), block));
    files.push(("base.yaml".into(), small_policy(port)));
    files
}

/// The single-file layout: `n` IPv4 prefixes written inline in allow rules of 100 (the /24s
/// and the /32 inside each on different ports, so the compiler keeps every prefix) and 1,000
/// port rules, all in one Policy (1.7 MB of YAML at 100k); `shift` moves port rule 0 (a
/// one-rule change inside the big file).
fn big_policy(n: usize, shift: u16) -> String {
    use std::fmt::Write as _;
    let prefix = |i: usize| {
        let k = u32::try_from(i / 2).expect("small");
        let base = std::net::Ipv4Addr::from(0x0a00_0000 + (k << 9));
        if i.is_multiple_of(2) {
            format!("{base}/24")
        } else {
            format!("{}/32", std::net::Ipv4Addr::from(u32::from(base) + 7))
        }
    };
    let mut out = String::from(
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: big}\nspec:\n  defaults: {ingress: deny}\n  ingress:\n",
    );
    for parity in [0, 1] {
        let members: Vec<usize> = (0..n).filter(|i| i % 2 == parity).collect();
        for (r, chunk) in members.chunks(100).enumerate() {
            let port = if parity == 0 { 443 } else { 8443 };
            let from: Vec<String> = chunk.iter().map(|&i| prefix(i)).collect();
            let _ = writeln!(
                out,
                "    - {{name: p{parity}-{r}, action: allow, proto: tcp, ports: [{port}], from: [{}]}}",
                from.join(", ")
            );
        }
    }
    for p in 0..1000u16 {
        let port = 20000 + p + if p == 0 { shift } else { 0 };
        let _ =
            writeln!(out, "    - {{name: port{p}, action: allow, proto: tcp, ports: [{port}]}}");
    }
    out
}

/// `n` rules in files of 5,000, half ingress, half egress; each rule names its own /32 and
/// one port.
fn rule_policy(n: u32) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for (f, start) in (0..n).step_by(5_000).enumerate() {
        let end = (start + 5_000).min(n);
        let mut ingress = String::new();
        let mut egress = String::new();
        for k in start..end {
            let addr = std::net::Ipv4Addr::from((10u32 << 24) + k + 1);
            let line = format!(
                "    - {{name: r{k}, action: allow, {}: [{addr}], proto: tcp, ports: [{}]}}\n",
                if k % 2 == 0 { "from" } else { "to" },
                1000 + k % 5_000
            );
            if k % 2 == 0 { ingress.push_str(&line) } else { egress.push_str(&line) }
        }
        files.push((
            format!("rules-{f:02}.yaml"),
            format!(
                "{HEAD}kind: Policy\nmetadata: {{name: rules-{f:02}}}\nspec:\n  defaults: {{ingress: deny, egress: deny}}\n  ingress:\n{ingress}  egress:\n{egress}"
            ),
        ));
    }
    files.push(("base.yaml".into(), small_policy(8080)));
    files
}

// --- figures -----------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn summary(what: &str, v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    format!(
        "{what}: n {} min {:.1} p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} mean {:.1} ms",
        s.len(),
        s[0],
        pct(&s, 50.0),
        pct(&s, 90.0),
        pct(&s, 99.0),
        s[s.len() - 1],
        mean
    )
}

fn steps(s: &Status) -> String {
    s.last_reconcile
        .as_ref()
        .map(|r| {
            r.steps
                .iter()
                .map(|st| format!("{} {:.1}", st.step, st.ms))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// (VmRSS, VmHWM) in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let (rss, hwm, _, _) = memory_split(pid);
    (rss, hwm)
}

/// (VmRSS, VmHWM, RssAnon, RssFile) in MiB: the anonymous part is the heap (and stacks); the
/// file part is the binary's and the libraries' pages.
fn memory_split(pid: u32) -> (f64, f64, f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0, kb("RssAnon:") / 1024.0, kb("RssFile:") / 1024.0)
}

/// utime + stime in seconds, from a /proc/.../stat file (a process's: all its threads).
fn cpu_of(stat: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

fn cpu(pid: u32) -> f64 {
    cpu_of(Path::new(&format!("/proc/{pid}/stat"))).expect("stat")
}

/// CPU seconds per thread (name and id) of the process.
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<(String, String), f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for e in dir.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if let Some(c) = cpu_of(&e.path().join("stat")) {
            out.insert((comm.trim().to_string(), e.file_name().to_string_lossy().into()), c);
        }
    }
    out
}

/// CPU seconds fwd used over `secs` seconds in which nothing talks to it, the drift checks it
/// ran in that time, and the status document after it.
fn idle(fwd: &mut Fwd, secs: u64) -> (f64, u64, Status) {
    let before = fwd.status().drift.checks;
    // Let the refresh that status read asked for finish first.
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu(fwd.pid()), thread_cpu(fwd.pid()));
    std::thread::sleep(Duration::from_secs(secs));
    let (used, t1) = (cpu(fwd.pid()) - c0, thread_cpu(fwd.pid()));
    let busy: Vec<String> = t1
        .iter()
        .filter_map(|(k, v)| {
            let d = v - t0.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("{} {:.2} s", k.0, d))
        })
        .collect();
    println!(
        "  threads that ran: {}",
        if busy.is_empty() { "none".into() } else { busy.join(", ") }
    );
    let after = fwd.status();
    (used, after.drift.checks - before, after)
}

fn seen_to_enforced(s: &Status) -> f64 {
    s.applied.as_ref().and_then(|a| a.detect_to_enforced_ms).unwrap_or(f64::NAN)
}

fn map_fill(s: &Status) -> String {
    let fill: Vec<String> = s
        .maps
        .iter()
        .filter(|m| m.entries > 0)
        .map(|m| format!("{} {}", m.name, m.entries))
        .collect();
    fill.join(", ")
}

// --- series ------------------------------------------------------------------------------------

/// One-rule changes committed to a local repository fwd watches.
fn local(lab: &mut Lab, o: &Options) {
    println!("\n## local repository (watched), {} commits of a one-rule change", o.commits);
    let work = lab.repo("local", &[("base.yaml".into(), small_policy(8000))]);
    let seed = git(&work, &["rev-parse", "HEAD"]);
    let mut fwd = lab.fwd("local", work.to_str().expect("utf-8"), "30s");
    fwd.wait_applied(&seed, Duration::from_secs(120));
    let (mut outside, mut inside) = (Vec::new(), Vec::new());
    for i in 0..o.commits {
        // Let the watcher's debounce and the status read settle, as between two commits.
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        let c = commit(&work, "base.yaml", &small_policy(8001 + i as u16), &format!("svc {i}"));
        let (at, s) = fwd.wait_applied(&c, Duration::from_secs(30));
        outside.push(ms(at - t0));
        inside.push(seen_to_enforced(&s));
        if i == 0 {
            println!("first change's steps (ms): {}", steps(&s));
        }
    }
    println!("{}", summary("commit to enforced (from before `git commit`)", &outside));
    println!("{}", summary("fwd: seen to enforced", &inside));
    let (rss, hwm) = memory(fwd.pid());
    println!("small policy: VmRSS {rss:.1} MiB, VmHWM {hwm:.1} MiB");
    let (used, checks, _) = idle(&mut fwd, o.idle_secs);
    println!(
        "idle {} s (small policy): {:.3} s CPU ({:.3}%), drift checks in the window: {checks}",
        o.idle_secs,
        used,
        used * 100.0 / o.idle_secs as f64
    );
}

/// One-rule changes pushed to a remote fwd polls every 5 s.
fn remote(lab: &mut Lab, o: &Options) {
    println!(
        "\n## remote (git://, polled every 5 s), {} pushes of a one-rule change",
        o.remote_commits
    );
    let served = lab.dir.path().join("served");
    let remote = served.join("remote.git");
    std::fs::create_dir_all(&remote).expect("served");
    git(&remote, &["init", "-q", "--bare", "-b", "main"]);
    let work = lab.repo("remote-work", &[("base.yaml".into(), small_policy(8000))]);
    git(&work, &["remote", "add", "origin", remote.to_str().expect("utf-8")]);
    git(&work, &["push", "-q", "origin", "main"]);
    let seed = git(&work, &["rev-parse", "HEAD"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut daemon = Command::new("git")
        .args(["daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", served.display()))
        .arg(&served)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon");
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(up.elapsed() < Duration::from_secs(10), "git daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("git://127.0.0.1:{port}/remote.git");
    {
        let mut fwd = lab.fwd("remote", &url, "5s");
        fwd.wait_applied(&seed, Duration::from_secs(120));
        let (mut outside, mut inside) = (Vec::new(), Vec::new());
        // xorshift: a fixed sequence of waits, spread over the poll interval.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..o.remote_commits {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_millis(x % 5_000));
            let c = commit(&work, "base.yaml", &small_policy(9001 + i as u16), &format!("svc {i}"));
            let t0 = Instant::now();
            git(&work, &["push", "-q", "origin", "main"]);
            let (at, s) = fwd.wait_applied(&c, Duration::from_secs(30));
            outside.push(ms(at - t0));
            inside.push(seen_to_enforced(&s));
        }
        println!("{}", summary("push to enforced (from before `git push`)", &outside));
        println!("{}", summary("fwd: seen to enforced", &inside));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// One-rule changes against a 100k-prefix policy, in one of two layouts: `sets` (the
/// prefixes in AddressSet files of their own, the changed rule in `base.yaml`: how a block
/// list is usually kept) or `onefile` (the prefixes inline in one Policy file, which is also
/// the file that changes).
fn prefixes(lab: &mut Lab, o: &Options, layout: &str) {
    let n = 100_000;
    println!("\n## {n}-prefix policy ({layout} layout): one-rule changes");
    let (files, changed): (Vec<(String, String)>, &str) = match layout {
        "sets" => (prefix_policy(n, 8000), "base.yaml"),
        _ => (vec![("big.yaml".into(), big_policy(n as usize, 0))], "big.yaml"),
    };
    let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
    println!(
        "{} files, {:.1} MB of YAML; the change is in {changed}",
        files.len(),
        bytes as f64 / 1e6
    );
    let work = lab.repo(&format!("prefixes-{layout}"), &files);
    let seed = git(&work, &["rev-parse", "HEAD"]);
    let t0 = Instant::now();
    let mut fwd = lab.fwd(&format!("prefixes-{layout}"), work.to_str().expect("utf-8"), "30s");
    let (at, s) = fwd.wait_applied(&seed, Duration::from_secs(600));
    println!(
        "first apply (fwd start to enforced): {:.0} ms; steps (ms): {}",
        ms(at - t0),
        steps(&s)
    );
    println!("maps: {}", map_fill(&s));
    let (rss, hwm) = memory(fwd.pid());
    println!("{n} prefixes, after the first apply: VmRSS {rss:.1} MiB, VmHWM {hwm:.1} MiB");
    let (mut outside, mut inside, mut flip) = (Vec::new(), Vec::new(), Vec::new());
    let mut by_step: Vec<(String, Vec<f64>)> = Vec::new();
    for i in 0..o.commits.min(20) {
        std::thread::sleep(Duration::from_millis(500));
        let text = match layout {
            "sets" => small_policy(8001 + i as u16),
            _ => big_policy(n as usize, 1 + i as u16),
        };
        let t0 = Instant::now();
        let c = commit(&work, changed, &text, &format!("one rule {i}"));
        let (at, s) = fwd.wait_applied(&c, Duration::from_secs(120));
        outside.push(ms(at - t0));
        inside.push(seen_to_enforced(&s));
        let r = s.last_reconcile.as_ref().expect("reconcile");
        flip.push(r.seen_to_flip_ms.unwrap_or(f64::NAN));
        for st in &r.steps {
            match by_step.iter_mut().find(|(name, _)| *name == st.step) {
                Some((_, v)) => v.push(st.ms),
                None => by_step.push((st.step.clone(), vec![st.ms])),
            }
        }
        if i == 0 {
            println!(
                "one-rule change: steps (ms): {}; written {} deleted {} delta {}",
                steps(&s),
                r.written,
                r.deleted,
                r.delta
            );
        }
    }
    println!("{}", summary("commit to enforced (from before `git commit`)", &outside));
    println!("{}", summary("fwd: seen to flip (the change enforced)", &flip));
    println!(
        "{}",
        summary("fwd: seen to apply done (grace period, replay, attachments included)", &inside)
    );
    let medians: Vec<String> = by_step
        .iter()
        .map(|(name, v)| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            format!("{name} {:.1}", pct(&v, 50.0))
        })
        .collect();
    println!("median steps (ms): {}", medians.join(", "));
    let (rss, hwm) = memory(fwd.pid());
    println!("{n} prefixes, after the changes: VmRSS {rss:.1} MiB, VmHWM {hwm:.1} MiB");
}

/// Memory and idle CPU with 100k rules, and one change.
fn rules(lab: &mut Lab, o: &Options) {
    let n = 100_000;
    println!("\n## {n}-rule policy: memory, idle CPU, one-rule change");
    let work = lab.repo("rules", &rule_policy(n));
    let seed = git(&work, &["rev-parse", "HEAD"]);
    let t0 = Instant::now();
    let mut fwd = lab.fwd("rules", work.to_str().expect("utf-8"), "30s");
    let (at, s) = fwd.wait_applied(&seed, Duration::from_secs(900));
    println!(
        "first apply (fwd start to enforced): {:.0} ms; steps (ms): {}",
        ms(at - t0),
        steps(&s)
    );
    let (rss, hwm, anon, file) = memory_split(fwd.pid());
    println!(
        "{n} rules, after the first apply: VmRSS {rss:.1} MiB (anonymous {anon:.1}, files {file:.1}), VmHWM {hwm:.1} MiB"
    );
    let (used, checks, after) = idle(&mut fwd, o.idle_secs);
    // Read after the idle window: the read right after the apply may come back before fwd
    // finished counting the entries (the status server waits for that only so long).
    println!("maps: {}", map_fill(&after));
    println!(
        "idle {} s ({n} rules): {:.3} s CPU ({:.3}%), drift checks in the window: {checks}",
        o.idle_secs,
        used,
        used * 100.0 / o.idle_secs as f64
    );
    // Drift checks run every minute (the default `drift_interval`); what one costs at 100k
    // rules, beyond the idle rate just measured.
    let idle_rate = used / o.idle_secs as f64;
    while fwd.log.try_recv().is_ok() {}
    let c0 = cpu(fwd.pid());
    let t0 = Instant::now();
    let at = fwd.wait_drift_check(Duration::from_secs(90));
    let window = (at - t0).as_secs_f64();
    let spent = cpu(fwd.pid()) - c0;
    println!(
        "a drift check ({n} rules): {:.2} s CPU over a {window:.0} s window ({:.2} s beyond the idle rate); \
         averaged over the 60 s interval: {:.1}% of one CPU",
        spent,
        spent - idle_rate * window,
        (spent - idle_rate * window) * 100.0 / 60.0
    );
    let t0 = Instant::now();
    let c = commit(&work, "base.yaml", &small_policy(8001), "svc");
    let (at, s) = fwd.wait_applied(&c, Duration::from_secs(300));
    println!(
        "one-rule change: {:.0} ms commit to enforced; fwd: seen to enforced {:.1} ms; steps (ms): {}",
        ms(at - t0),
        seen_to_enforced(&s),
        steps(&s)
    );
    let (rss, hwm, anon, file) = memory_split(fwd.pid());
    println!(
        "{n} rules, after the change: VmRSS {rss:.1} MiB (anonymous {anon:.1}, files {file:.1}), VmHWM {hwm:.1} MiB"
    );
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "SKIPPED: the fwd bench loads eBPF programs and makes a network namespace; run it as root"
        );
        return;
    }
    let o = options();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let mut lab = Lab::new();
    let run = |name: &str| o.only.as_deref().is_none_or(|only| only == name);
    if run("local") {
        local(&mut lab, &o);
    }
    if run("remote") {
        remote(&mut lab, &o);
    }
    if run("prefixes") {
        prefixes(&mut lab, &o, "sets");
    }
    if run("prefixes-onefile") {
        prefixes(&mut lab, &o, "onefile");
    }
    if run("rules") {
        rules(&mut lab, &o);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nload average at end: {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
}
