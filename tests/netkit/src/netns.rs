//! [`Netns`]: a named network namespace made with `ip netns add` and deleted on drop.
//!
//! `ip netns add` (a bind mount under /run/netns) is used rather than unshare + our own bind
//! mount because it is what `ip -n`, `ip netns exec` and operators understand, so a leaked
//! namespace is visible in `ip netns list` and removable by hand, and the kit can hand the name
//! to `ip -n NAME ...` for all link and address work. Code runs inside the namespace on a fresh
//! thread that has called `setns(CLONE_NEWNET)`: the network namespace is per thread, so the
//! caller's thread never changes namespace, and sockets made on that thread (and processes it
//! spawns) live in the namespace.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::sys::{self, ip, open_ro, owner_pid, pid_alive, setns_net, unique_name};

const NETNS_DIR: &str = "/run/netns";

/// A network namespace owned by the test; deleted on drop (also during a panic).
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Open handle to /run/netns/NAME, shared with commands built by [`Netns::command`].
    fd: Arc<OwnedFd>,
}

impl Netns {
    /// Makes `fwtest-<pid>-<n>` with its loopback up.
    pub fn new() -> Result<Self> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let name = unique_name();
        ip(&["netns", "add", &name])?;
        // Open a handle first so that from here on a failure deletes the namespace via Drop.
        let fd = match open_ro(&format!("{NETNS_DIR}/{name}")) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                let _ = ip(&["netns", "delete", &name]);
                return Err(e);
            }
        };
        let ns = Netns { name, fd };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace file (/run/netns/NAME), e.g. for tools that take one.
    pub fn path(&self) -> String {
        format!("{NETNS_DIR}/{}", self.name)
    }

    /// Runs `f` on a new thread inside the namespace and returns its result. A panic in `f`
    /// is resumed on the calling thread. Sockets `f` makes stay in the namespace; the calling
    /// thread's own namespace is untouched.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let fd = self.fd.as_raw_fd();
        let joined = std::thread::scope(|s| {
            s.spawn(move || -> Result<R> {
                setns_net(fd).map_err(|e| Error::io("setns into the test namespace", e))?;
                Ok(f())
            })
            .join()
        });
        match joined {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`Netns::run`] but detached: for long-running work such as servers. The thread
    /// holds its own reference to the namespace, so it keeps working if the guard is dropped
    /// first; the namespace then disappears when the thread ends.
    pub fn spawn<F, R>(&self, f: F) -> JoinHandle<Result<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let fd = Arc::clone(&self.fd);
        std::thread::spawn(move || {
            setns_net(fd.as_raw_fd()).map_err(|e| Error::io("setns into the test namespace", e))?;
            Ok(f())
        })
    }

    /// A `Command` for `program` whose process starts inside the namespace (setns before
    /// exec). Unlike `ip netns exec` it does not remount /sys, which network tools don't need.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let fd = Arc::clone(&self.fd);
        // SAFETY: the closure runs between fork and exec and only calls setns (a system call)
        // on a descriptor the Arc keeps open for as long as the Command exists.
        unsafe {
            cmd.pre_exec(move || setns_net(fd.as_raw_fd()));
        }
        cmd
    }

    /// `ip -n NAME <args>`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting unmounts the name; the kernel frees the namespace (and the veth ends in it)
        // once nothing holds it any more. Errors cannot be reported from Drop.
        let _ = sys::ip(&["netns", "delete", &self.name]);
    }
}

/// Deletes `fwtest-<pid>-<n>` namespaces whose owner process is gone (a test killed before its
/// guards could drop).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = owner_pid(&name)
            && !pid_alive(pid)
        {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}
