//! [`Cgroup`]: a child cgroup in the cgroup v2 hierarchy, for the egress (cgroup hook) tests;
//! its processes are killed and the directory removed on drop.
//!
//! The v2 mount is found in /proc/self/mountinfo rather than assumed at /sys/fs/cgroup, because
//! hybrid systems mount it at /sys/fs/cgroup/unified. In the default (domain) mode cgroup v2
//! moves whole processes, not threads, so test code cannot simply "enter" a cgroup the way
//! [`crate::Netns::run`] enters a namespace. Two ways in, both moving the new process before it
//! does anything else (a socket belongs to the cgroup of the process that created it):
//! - [`Cgroup::spawn`] / [`Cgroup::command`]: a `pre_exec` hook writes "0" to the cgroup's
//!   cgroup.procs (which moves the writer) between fork and exec;
//! - the probes ([`Cgroup::tcp_connect`], [`Cgroup::tcp_echo`], [`Cgroup::udp_echo`]): a forked
//!   child moves itself the same way and runs a raw-syscall probe (see `sys.rs`), reporting the
//!   errno over a pipe. The child inherits the calling thread's network namespace, so
//!   `ns.run(|| cg.tcp_connect(..))` probes from inside both.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::{self, Probe, RawAddr, fork_probe, owner_pid, pid_alive, unique_name};
use crate::traffic::{Outcome, PING_TIMEOUT, ping_command, ping_outcome};

const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Mount point of the cgroup v2 hierarchy and the hierarchy path mounted there ("/" unless the
/// mount is a bind mount of a subtree or made inside a cgroup namespace).
pub fn cgroup2_mount() -> Result<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
    parse_mountinfo(&text).ok_or(Error::NoCgroup2)
}

/// A cgroup owned by the test. Dropping it kills every process left in it (and in cgroups
/// below it) and removes the directories.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    rel: String,
    id: u64,
    /// Open cgroup.procs, written by children to move themselves in.
    procs: Arc<OwnedFd>,
}

impl Cgroup {
    /// Makes `fwtest-<pid>-<n>` directly under the cgroup v2 root.
    pub fn new() -> Result<Self> {
        let (mount, root) = cgroup2_mount()?;
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| sweep_stale(&mount));
        let name = unique_name();
        let rel = join_rel(root.trim_start_matches('/'), &name);
        Cgroup::create(mount.join(&name), rel)
    }

    /// Makes a cgroup `name` nested in this one (e.g. to test that a rule for a cgroup path
    /// covers its descendants). `name` is one path component.
    pub fn child(&self, name: &str) -> Result<Cgroup> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(Error::Invalid(format!("bad cgroup name {name:?}")));
        }
        Cgroup::create(self.dir.join(name), join_rel(&self.rel, name))
    }

    fn create(dir: PathBuf, rel: String) -> Result<Self> {
        std::fs::create_dir(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let opened = (|| {
            let id = std::fs::metadata(&dir)
                .map_err(|e| Error::io(format!("stat {}", dir.display()), e))?
                .ino();
            let procs_path = dir.join("cgroup.procs");
            let procs = File::options()
                .write(true)
                .open(&procs_path)
                .map_err(|e| Error::io(format!("open {}", procs_path.display()), e))?;
            Ok((id, Arc::new(OwnedFd::from(procs))))
        })();
        match opened {
            Ok((id, procs)) => Ok(Cgroup { dir, rel, id, procs }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Path relative to the hierarchy root, without a leading slash, e.g.
    /// `fwtest-123-4/app.service`: the form policies use in `workloads`.
    pub fn path(&self) -> &str {
        &self.rel
    }

    /// Absolute directory of the cgroup.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup id: the inode number of its directory, which is what
    /// `bpf_get_current_cgroup_id()` and `bpf_skb_cgroup_id()` return for it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Pids listed in cgroup.procs (this cgroup only, not its children).
    pub fn procs(&self) -> Result<Vec<u32>> {
        let path = self.dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Moves an existing process (all its threads) into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let path = self.dir.join("cgroup.procs");
        std::fs::write(&path, pid.to_string())
            .map_err(|e| Error::io(format!("write {pid} to {}", path.display()), e))
    }

    /// Makes `cmd` start inside this cgroup: the child writes itself into cgroup.procs after
    /// fork and before exec. Returns `cmd` for chaining.
    pub fn prepare<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let procs = Arc::clone(&self.procs);
        // SAFETY: the hook runs between fork and exec and only calls write(2) on a descriptor
        // the Arc keeps open as long as the Command lives.
        unsafe {
            cmd.pre_exec(move || {
                let n = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
            })
        }
    }

    /// A `Command` for `program` that starts inside this cgroup.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        self.prepare(&mut cmd);
        cmd
    }

    /// Spawns `cmd` inside this cgroup (see [`Cgroup::prepare`]). The child is in the cgroup
    /// before it runs any of its own code. A child still running when the guard drops is
    /// killed; reap it with `wait` as usual.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let what = sys::describe(cmd);
        self.prepare(cmd).spawn().map_err(|e| Error::io(format!("spawn `{what}` in cgroup"), e))
    }

    /// `ping -c 1` from a process in this cgroup (in the calling thread's network namespace).
    pub fn ping(&self, addr: IpAddr) -> Result<Outcome> {
        let mut cmd = ping_command(addr);
        self.prepare(&mut cmd);
        ping_outcome(sys::output_with_timeout(cmd, PING_TIMEOUT)?)
    }

    /// [`crate::tcp_connect`] from a process in this cgroup.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<Outcome> {
        self.probe(&Probe::TcpConnect(RawAddr::new(addr)), timeout)
    }

    /// [`crate::tcp_echo`] from a process in this cgroup.
    pub fn tcp_echo(&self, addr: SocketAddr, payload: &[u8], timeout: Duration) -> Result<Outcome> {
        self.probe(&Probe::TcpEcho(RawAddr::new(addr), payload), timeout)
    }

    /// [`crate::udp_echo`] from a process in this cgroup.
    pub fn udp_echo(&self, addr: SocketAddr, payload: &[u8], timeout: Duration) -> Result<Outcome> {
        self.probe(&Probe::UdpEcho(RawAddr::new(addr), payload), timeout)
    }

    fn probe(&self, probe: &Probe<'_>, timeout: Duration) -> Result<Outcome> {
        fork_probe(self.procs.as_raw_fd(), probe, timeout).map(Outcome::from_errno)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_tree(&self.dir);
    }
}

/// Kills everything in the cgroup tree at `dir` and removes it, children first. Best effort:
/// used from Drop and by the sweeper.
fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    // cgroup.kill (Linux 5.14+) SIGKILLs every process in the subtree.
    if let Ok(mut f) = File::options().write(true).open(dir.join("cgroup.kill")) {
        let _ = f.write_all(b"1");
    }
    // Killed processes leave the cgroup as they exit; "populated 0" covers the subtree.
    let deadline = Instant::now() + KILL_TIMEOUT;
    while Instant::now() < deadline {
        match std::fs::read_to_string(dir.join("cgroup.events")) {
            Ok(ev) if ev.lines().any(|l| l.trim() == "populated 1") => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => break,
        }
    }
    remove_dirs(dir);
}

fn remove_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dirs(&entry.path());
            }
        }
    }
    // rmdir can briefly see EBUSY while the last task is being released.
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Removes `fwtest-<pid>-<n>` cgroups whose owner process is gone.
fn sweep_stale(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = owner_pid(&name)
            && !pid_alive(pid)
        {
            remove_tree(&entry.path());
        }
    }
}

fn join_rel(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_string() } else { format!("{parent}/{name}") }
}

/// Finds the first cgroup2 mount: mountinfo lines are
/// `id parent major:minor root mount-point options [optional fields] - fstype source super-opts`.
fn parse_mountinfo(text: &str) -> Option<(PathBuf, String)> {
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = unescape(fields.nth(3)?);
        let mount = unescape(fields.next()?);
        Some((PathBuf::from(mount), root))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, etc.).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && let Ok(text) = std::str::from_utf8(oct)
            && let Ok(v) = u8::from_str_radix(text, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let text = "22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
                    30 25 0:26 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory\n\
                    41 31 0:38 /sub /sys/fs/cgroup/uni\\040fied rw,relatime shared:3 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(text),
            Some((PathBuf::from("/sys/fs/cgroup/uni fied"), "/sub".to_string()))
        );
        assert_eq!(parse_mountinfo("22 1 0:21 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn relative_paths() {
        assert_eq!(join_rel("", "fwtest-1-2"), "fwtest-1-2");
        assert_eq!(join_rel("fwtest-1-2", "app.service"), "fwtest-1-2/app.service");
    }
}
