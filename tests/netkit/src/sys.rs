//! Low-level helpers: running commands with a deadline, unique names, and socket probes written
//! against raw system calls.
//!
//! The probes use raw `libc` calls rather than `std::net` because [`crate::Cgroup`] runs them in
//! a child made by `fork()` of a multi-threaded test process: such a child may only make
//! async-signal-safe calls (no allocation, no locks) until it exits. Everything a probe needs
//! (the `sockaddr`, the payload, a scratch buffer) is prepared before the fork, and the probe
//! itself only calls `socket`, `connect`, `poll`, `send`, `recv`, `getsockopt`, `close` and
//! `clock_gettime`. The same functions serve the in-process probes, so both paths report
//! identical outcomes.

use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Prefix of every namespace and cgroup the kit makes; the sweepers only touch names with it.
pub(crate) const NAME_PREFIX: &str = "fwtest";

/// Result of a raw probe step: Err carries the errno.
type Errno<T> = std::result::Result<T, i32>;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `fwtest-<pid>-<n>`: unique among live processes (pid) and within this process (counter).
pub(crate) fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}-{}-{n}", std::process::id())
}

/// The owner pid of a name made by [`unique_name`], if it is one.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?.strip_prefix('-')?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Whether a process with this pid exists (in our pid namespace).
pub(crate) fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

pub(crate) fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid. Reading it
    // is async-signal-safe (used in the forked child).
    unsafe { *libc::__errno_location() }
}

/// Renders a command for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdout/stderr captured, killing it at `timeout`.
pub(crate) fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let what = describe(&cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::io(format!("spawn `{what}`"), e))?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::CommandTimeout { command: what, timeout });
            }
            Err(e) => return Err(Error::io(format!("wait for `{what}`"), e)),
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Runs `cmd` and fails unless it exits 0; returns its stdout.
pub(crate) fn run_checked(cmd: Command, timeout: Duration) -> Result<String> {
    let what = describe(&cmd);
    let out = output_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        return Err(Error::Command {
            command: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deadline for one `ip` invocation: generous, it normally takes milliseconds.
pub(crate) const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// `ip <args>` in the caller's network namespace.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_checked(cmd, IP_TIMEOUT)
}

/// Opens a file read-only with O_CLOEXEC (used for namespace files).
pub(crate) fn open_ro(path: &str) -> Result<OwnedFd> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(format!("open {path}"), e))?;
    Ok(OwnedFd::from(file))
}

/// Moves the calling thread into the network namespace `fd` refers to.
pub(crate) fn setns_net(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns only reads the descriptor; an invalid one gives EBADF/EINVAL.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A socket address in kernel form, built before any fork.
pub(crate) struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
    family: libc::c_int,
}

impl RawAddr {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let (len, family) = match addr {
            SocketAddr::V4(a) => {
                // SAFETY: as above, sockaddr_in is plain old data.
                let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
                (std::mem::size_of::<libc::sockaddr_in>(), libc::AF_INET)
            }
            SocketAddr::V6(a) => {
                // SAFETY: as above, sockaddr_in6 is plain old data.
                let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_scope_id = a.scope_id();
                // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
                unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
                (std::mem::size_of::<libc::sockaddr_in6>(), libc::AF_INET6)
            }
        };
        RawAddr { storage, len: len as libc::socklen_t, family }
    }

    fn as_ptr(&self) -> *const libc::sockaddr {
        (&raw const self.storage).cast()
    }
}

/// What a probe does; built before the fork.
pub(crate) enum Probe<'a> {
    /// Connect only.
    TcpConnect(RawAddr),
    /// Connect, send the payload, expect it echoed back.
    TcpEcho(RawAddr, &'a [u8]),
    /// Unconnected sendto of the payload, expect it echoed back.
    UdpEcho(RawAddr, &'a [u8]),
}

impl Probe<'_> {
    /// Scratch space the probe needs for the echo.
    pub(crate) fn scratch(&self) -> Vec<u8> {
        match self {
            Probe::TcpConnect(_) => Vec::new(),
            Probe::TcpEcho(_, p) | Probe::UdpEcho(_, p) => vec![0; p.len()],
        }
    }
}

/// A descriptor closed on drop; async-signal-safe (just `close`).
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn now_ms() -> i64 {
    // SAFETY: clock_gettime writes into the given timespec; CLOCK_MONOTONIC always exists.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// Polls `fd` for `events` until the deadline; Err(errno) on timeout (ETIMEDOUT) or error.
fn wait_fd(fd: libc::c_int, events: libc::c_short, deadline_ms: i64) -> Errno<()> {
    loop {
        let left = deadline_ms - now_ms();
        if left <= 0 {
            return Err(libc::ETIMEDOUT);
        }
        let mut pfd = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.min(i64::from(i32::MAX)) as libc::c_int) };
        match n {
            0 => return Err(libc::ETIMEDOUT),
            n if n > 0 => return Ok(()),
            _ if errno() == libc::EINTR => continue,
            _ => return Err(errno()),
        }
    }
}

/// Runs a probe; returns 0 for success or the errno that ended it (ETIMEDOUT for the deadline,
/// EBADMSG for a wrong echo, ECONNRESET for a peer that closed before echoing).
/// Async-signal-safe: callable in a forked child.
pub(crate) fn run_probe(probe: &Probe<'_>, scratch: &mut [u8], timeout: Duration) -> i32 {
    let deadline = now_ms().saturating_add(timeout.as_millis().min(i64::MAX as u128 / 2) as i64);
    let result = match probe {
        Probe::TcpConnect(addr) => tcp(addr, &[], scratch, deadline),
        Probe::TcpEcho(addr, payload) => tcp(addr, payload, scratch, deadline),
        Probe::UdpEcho(addr, payload) => udp(addr, payload, scratch, deadline),
    };
    match result {
        Ok(()) => 0,
        Err(e) => e,
    }
}

fn socket(family: libc::c_int, kind: libc::c_int) -> Errno<Fd> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 { Err(errno()) } else { Ok(Fd(fd)) }
}

fn tcp(addr: &RawAddr, payload: &[u8], scratch: &mut [u8], deadline: i64) -> Errno<()> {
    let s = socket(addr.family, libc::SOCK_STREAM)?;
    // SAFETY: addr points to a sockaddr of length addr.len.
    if unsafe { libc::connect(s.0, addr.as_ptr(), addr.len) } != 0 {
        let e = errno();
        if e != libc::EINPROGRESS {
            return Err(e);
        }
        wait_fd(s.0, libc::POLLOUT, deadline)?;
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: err/len describe a c_int-sized buffer.
        let r = unsafe {
            libc::getsockopt(s.0, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &mut len)
        };
        if r != 0 {
            return Err(errno());
        }
        if err != 0 {
            return Err(err);
        }
    }
    let mut sent = 0;
    while sent < payload.len() {
        wait_fd(s.0, libc::POLLOUT, deadline)?;
        let rest = &payload[sent..];
        // SAFETY: rest is a valid buffer of rest.len() bytes.
        let n = unsafe { libc::send(s.0, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            match errno() {
                libc::EAGAIN | libc::EINTR => continue,
                e => return Err(e),
            }
        }
        sent += n as usize;
    }
    let want = payload.len();
    if scratch.len() < want {
        return Err(libc::EMSGSIZE);
    }
    let mut got = 0;
    while got < want {
        wait_fd(s.0, libc::POLLIN, deadline)?;
        let buf = &mut scratch[got..want];
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(s.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            match errno() {
                libc::EAGAIN | libc::EINTR => continue,
                e => return Err(e),
            }
        }
        if n == 0 {
            return Err(libc::ECONNRESET);
        }
        got += n as usize;
    }
    if scratch[..want] != *payload { Err(libc::EBADMSG) } else { Ok(()) }
}

fn udp(addr: &RawAddr, payload: &[u8], scratch: &mut [u8], deadline: i64) -> Errno<()> {
    let s = socket(addr.family, libc::SOCK_DGRAM)?;
    // SAFETY: payload is a valid buffer; addr points to a sockaddr of length addr.len.
    let n = unsafe {
        libc::sendto(s.0, payload.as_ptr().cast(), payload.len(), 0, addr.as_ptr(), addr.len)
    };
    if n < 0 {
        return Err(errno());
    }
    // One byte more than expected, so a longer reply is seen as a mismatch, not truncated.
    let cap = scratch.len();
    loop {
        wait_fd(s.0, libc::POLLIN, deadline)?;
        let mut one = [0u8; 1];
        // SAFETY: scratch and `one` are valid writable buffers; the iovec array has 2 entries.
        let mut iov = [
            libc::iovec { iov_base: scratch.as_mut_ptr().cast(), iov_len: cap },
            libc::iovec { iov_base: one.as_mut_ptr().cast(), iov_len: 1 },
        ];
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        // SAFETY: msg describes the iovecs above.
        let n = unsafe { libc::recvmsg(s.0, &mut msg, 0) };
        if n < 0 {
            match errno() {
                libc::EAGAIN | libc::EINTR => continue,
                e => return Err(e),
            }
        }
        let n = n as usize;
        return if n == payload.len() && scratch[..n] == *payload {
            Ok(())
        } else {
            Err(libc::EBADMSG)
        };
    }
}

/// Runs `probe` in a child process that first writes "0" to `procs_fd` (a cgroup's open
/// cgroup.procs), which moves the writer into that cgroup, so the probe's socket belongs to
/// the cgroup. The child inherits the calling thread's network namespace. Returns the probe's
/// errno (0 = success).
pub(crate) fn fork_probe(procs_fd: RawFd, probe: &Probe<'_>, timeout: Duration) -> Result<i32> {
    let mut scratch = probe.scratch();
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe2", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fork in a multi-threaded process: the child below only makes async-signal-safe
    // calls (write, the raw probe, _exit) on memory prepared before the fork, never allocates,
    // never unwinds, and always ends in _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::io("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; "0" is one byte.
        let moved = unsafe { libc::write(procs_fd, b"0".as_ptr().cast(), 1) };
        let report: [i32; 2] =
            if moved < 0 { [1, errno()] } else { [2, run_probe(probe, &mut scratch, timeout)] };
        // SAFETY: report is 8 readable bytes; _exit never returns and runs no destructors.
        unsafe {
            libc::write(wr.as_raw_fd(), report.as_ptr().cast(), 8);
            libc::_exit(0);
        }
    }
    drop(wr);
    // The child is bounded by the probe deadline; the margin covers a loaded machine.
    let deadline = now_ms() + timeout.as_millis().min(3_600_000) as i64 + 5_000;
    let mut report = [0u8; 8];
    let mut got = 0;
    let mut failure = None;
    while got < 8 {
        if let Err(e) = wait_fd(rd.as_raw_fd(), libc::POLLIN, deadline) {
            failure = Some(std::io::Error::from_raw_os_error(e));
            break;
        }
        let buf = &mut report[got..];
        // SAFETY: buf is a valid writable buffer.
        let n = unsafe { libc::read(rd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            failure = Some(std::io::Error::other("probe child exited without a report"));
            break;
        }
        got += n as usize;
    }
    if failure.is_some() {
        // SAFETY: pid is our child; killing an already exited child is harmless.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if let Some(e) = failure {
        return Err(Error::io("cgroup probe child", e));
    }
    let stage = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    let code = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    if stage == 1 {
        return Err(Error::io(
            "move probe child into the cgroup",
            std::io::Error::from_raw_os_error(code),
        ));
    }
    Ok(code)
}
