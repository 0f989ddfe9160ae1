//! Traffic probes and echo servers, all with deadlines.
//!
//! Probes act in the calling thread's network namespace: run them inside
//! [`crate::Netns::run`] to send from a test namespace, or through a [`crate::Cgroup`] to send
//! from a process in a cgroup. What happened is an [`Outcome`], because a refusal or a timeout
//! is often the expected result. The servers run on their own thread (optionally inside a
//! namespace), count what they served, and stop on drop; they poll a stop flag with short
//! timeouts, so dropping one never waits long.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::netns::Netns;
use crate::sys::{self, Probe, RawAddr, run_probe};

/// Hard bound for one `ping` run (its own deadline is 2 s).
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How often server threads look at their stop flag.
const SERVER_TICK: Duration = Duration::from_millis(20);
/// A server connection idle this long is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// What happened to a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Connected (and, for echo probes, got exactly the payload back).
    Ok,
    /// ECONNREFUSED: an RST (TCP) or nothing listening.
    Refused,
    /// No answer before the deadline (e.g. a dropped packet).
    TimedOut,
    /// EPERM: what a cgroup hook (connect4/6, sendmsg4/6, skb egress) denial gives the caller.
    PermissionDenied,
    /// EHOSTUNREACH or ENETUNREACH (also ping's "unreachable").
    Unreachable,
    /// Any other errno (EBADMSG: a wrong echo; ECONNRESET: the peer closed before echoing).
    Other(i32),
}

impl Outcome {
    /// Classifies an errno (0 = success).
    pub fn from_errno(errno: i32) -> Outcome {
        match errno {
            0 => Outcome::Ok,
            libc::ECONNREFUSED => Outcome::Refused,
            libc::ETIMEDOUT => Outcome::TimedOut,
            libc::EPERM => Outcome::PermissionDenied,
            libc::EHOSTUNREACH | libc::ENETUNREACH => Outcome::Unreachable,
            e => Outcome::Other(e),
        }
    }
}

fn probe(p: &Probe<'_>, timeout: Duration) -> Outcome {
    let mut scratch = p.scratch();
    Outcome::from_errno(run_probe(p, &mut scratch, timeout))
}

/// Opens a TCP connection to `addr` (then closes it) within `timeout`.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Outcome {
    probe(&Probe::TcpConnect(RawAddr::new(addr)), timeout)
}

/// Connects, sends `payload` and expects the same bytes back, all within `timeout`.
pub fn tcp_echo(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Outcome {
    probe(&Probe::TcpEcho(RawAddr::new(addr), payload), timeout)
}

/// Sends `payload` in one datagram from an unconnected socket (so a cgroup sendmsg hook sees
/// the destination) and expects the same bytes back within `timeout`. No reply (dropped either
/// way, or nothing listening) is [`Outcome::TimedOut`].
pub fn udp_echo(addr: SocketAddr, payload: &[u8], timeout: Duration) -> Outcome {
    probe(&Probe::UdpEcho(RawAddr::new(addr), payload), timeout)
}

/// The `ping` command the kit runs: one echo request, 1 s to answer, 2 s overall, numeric.
pub fn ping_command(addr: IpAddr) -> Command {
    let mut cmd = Command::new("ping");
    let family = if addr.is_ipv4() { "-4" } else { "-6" };
    cmd.args([family, "-n", "-q", "-c", "1", "-W", "1", "-w", "2"]).arg(addr.to_string());
    cmd
}

/// Pings `addr` once from the calling thread's network namespace (iputils-ping).
/// [`Outcome::Ok`] on a reply, [`Outcome::TimedOut`] on none, [`Outcome::PermissionDenied`]
/// when sending was refused with EPERM.
pub fn ping(addr: IpAddr) -> Result<Outcome> {
    ping_outcome(sys::output_with_timeout(ping_command(addr), PING_TIMEOUT)?)
}

/// Classifies a finished ping: exit 0 = reply, 1 = no reply, anything else = error.
pub(crate) fn ping_outcome(out: Output) -> Result<Outcome> {
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        return Ok(Outcome::Ok);
    }
    if text.contains("Operation not permitted") {
        return Ok(Outcome::PermissionDenied);
    }
    if text.contains("nreachable") {
        return Ok(Outcome::Unreachable);
    }
    if out.status.code() == Some(1) {
        return Ok(Outcome::TimedOut);
    }
    Err(Error::Command {
        command: "ping".to_string(),
        status: out.status.to_string(),
        stderr: text.trim().to_string(),
    })
}

/// Starts `serve` on a thread (inside `ns` if given), after `bind` succeeded there.
fn start_server<S, B, F>(
    ns: Option<&Netns>,
    bind: B,
    serve: F,
) -> Result<(SocketAddr, JoinHandle<()>)>
where
    S: Send + 'static,
    B: FnOnce() -> std::io::Result<(S, SocketAddr)> + Send + 'static,
    F: FnOnce(S) + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let body = move || match bind() {
        Ok((socket, addr)) => {
            let _ = tx.send(Ok(addr));
            serve(socket);
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    };
    let handle = match ns {
        Some(ns) => {
            let h = ns.spawn(body);
            std::thread::spawn(move || {
                // Setns failures surface below as a closed channel.
                let _ = h.join();
            })
        }
        None => std::thread::spawn(body),
    };
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(addr)) => Ok((addr, handle)),
        Ok(Err(e)) => Err(Error::io("bind server socket", e)),
        Err(_) => Err(Error::io(
            "start server thread",
            std::io::Error::other("server thread ended before binding (setns failed?)"),
        )),
    }
}

/// A TCP server that echoes every byte back, one thread per connection.
#[derive(Debug)]
pub struct TcpEchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    /// Listens on `bind` (port 0 = any free port) in the calling thread's namespace.
    pub fn start(bind: SocketAddr) -> Result<Self> {
        Self::start_inner(None, bind)
    }

    /// Listens on `bind` inside `ns`.
    pub fn start_in(ns: &Netns, bind: SocketAddr) -> Result<Self> {
        Self::start_inner(Some(ns), bind)
    }

    fn start_inner(ns: Option<&Netns>, bind: SocketAddr) -> Result<Self> {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, flag) = (Arc::clone(&accepted), Arc::clone(&stop));
        let (addr, thread) = start_server(
            ns,
            move || {
                let l = TcpListener::bind(bind)?;
                l.set_nonblocking(true)?;
                let addr = l.local_addr()?;
                Ok((l, addr))
            },
            move |listener: TcpListener| {
                let mut workers = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            let flag = Arc::clone(&flag);
                            workers.push(std::thread::spawn(move || echo_stream(stream, &flag)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(SERVER_TICK),
                    }
                }
                for w in workers {
                    let _ = w.join();
                }
            },
        )?;
        Ok(TcpEchoServer { addr, accepted, stop, thread: Some(thread) })
    }

    /// The bound address (with the real port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

fn echo_stream(mut s: TcpStream, stop: &AtomicBool) {
    if s.set_nonblocking(false).is_err() || s.set_read_timeout(Some(SERVER_TICK)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) && last.elapsed() < IDLE_LIMIT {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server that sends every datagram back to its sender.
#[derive(Debug)]
pub struct UdpEchoServer {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    /// Binds `bind` (port 0 = any free port) in the calling thread's namespace.
    pub fn start(bind: SocketAddr) -> Result<Self> {
        Self::start_inner(None, bind)
    }

    /// Binds `bind` inside `ns`.
    pub fn start_in(ns: &Netns, bind: SocketAddr) -> Result<Self> {
        Self::start_inner(Some(ns), bind)
    }

    fn start_inner(ns: Option<&Netns>, bind: SocketAddr) -> Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, flag) = (Arc::clone(&received), Arc::clone(&stop));
        let (addr, thread) = start_server(
            ns,
            move || {
                let s = UdpSocket::bind(bind)?;
                s.set_read_timeout(Some(SERVER_TICK))?;
                let addr = s.local_addr()?;
                Ok((s, addr))
            },
            move |socket: UdpSocket| {
                let mut buf = [0u8; 65536];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            },
        )?;
        Ok(UdpEchoServer { addr, received, stop, thread: Some(thread) })
    }

    /// The bound address (with the real port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classification() {
        assert_eq!(Outcome::from_errno(0), Outcome::Ok);
        assert_eq!(Outcome::from_errno(libc::ECONNREFUSED), Outcome::Refused);
        assert_eq!(Outcome::from_errno(libc::ETIMEDOUT), Outcome::TimedOut);
        assert_eq!(Outcome::from_errno(libc::EPERM), Outcome::PermissionDenied);
        assert_eq!(Outcome::from_errno(libc::ENETUNREACH), Outcome::Unreachable);
        assert_eq!(Outcome::from_errno(libc::EACCES), Outcome::Other(libc::EACCES));
    }

    #[test]
    fn ping_command_line() {
        let cmd = ping_command("fd00:fa11:3::2".parse().unwrap_or(IpAddr::from([0u8; 16])));
        assert_eq!(sys::describe(&cmd), "ping -6 -n -q -c 1 -W 1 -w 2 fd00:fa11:3::2");
    }
}
