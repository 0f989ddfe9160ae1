//! [`UdpFlood`]: a thread that sends UDP datagrams as fast as it can until stopped, for tests
//! that must show what a data plane does to packets arriving *while* it changes (an apply, a
//! program swap), which single probes cannot catch.
//!
//! The sender runs inside a test [`Netns`] (a thread that has called `setns`) and only ever
//! sends to the one destination it is given, which must be an address of the test's own veth
//! pair. Send errors (`ENOBUFS`, `EAGAIN` when the queue is full, `ECONNREFUSED` reported for an
//! earlier ICMP error) are expected under a flood and only counted: the test judges by what the
//! receiving side and the data plane's counters saw, not by the sender.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::netns::Netns;

/// Datagrams sent so far and send calls that failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodCount {
    pub sent: u64,
    pub failed: u64,
}

/// A UDP flood from a socket bound in a namespace to one destination; stops (and joins its
/// thread) on [`UdpFlood::stop`] or drop.
#[derive(Debug)]
pub struct UdpFlood {
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl UdpFlood {
    /// Binds `bind` inside `ns` and sends `payload_len`-byte datagrams to `dst` until stopped.
    /// Returns once the socket is bound (or binding failed).
    /// `dst` must be a kit address (10.200.0.0/16 or fd00:fa11::/32): a flood never leaves
    /// the test's own links.
    pub fn start_in(
        ns: &Netns,
        bind: SocketAddr,
        dst: SocketAddr,
        payload_len: usize,
    ) -> Result<Self> {
        if !kit_address(dst.ip()) {
            return Err(Error::Invalid(format!("{dst} is not an address of a test veth pair")));
        }
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, flag) = (Arc::clone(&sent), Arc::clone(&failed), Arc::clone(&stop));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || -> Result<()> {
            let socket = match UdpSocket::bind(bind) {
                Ok(socket) => socket,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                    return Err(Error::io("bind the flood socket", e));
                }
            };
            let _ = tx.send(Ok(()));
            let payload = vec![0x5a_u8; payload_len];
            while !flag.load(Ordering::Relaxed) {
                match socket.send_to(&payload, dst) {
                    Ok(_) => s.fetch_add(1, Ordering::Relaxed),
                    Err(_) => f.fetch_add(1, Ordering::Relaxed),
                };
            }
            Ok(())
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(UdpFlood { sent, failed, stop, thread: Some(thread) }),
            Ok(Err(e)) => Err(Error::io("bind the flood socket", e)),
            Err(_) => Err(Error::io(
                "start the flood thread",
                std::io::Error::other("the flood thread ended before binding (setns failed?)"),
            )),
        }
    }

    /// What was sent so far.
    pub fn count(&self) -> FloodCount {
        FloodCount {
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops the sender, waits for it and returns the final count.
    pub fn stop(mut self) -> Result<FloodCount> {
        self.halt()?;
        Ok(self.count())
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r.and_then(|inner| inner),
            Some(Err(_)) => Err(Error::io(
                "join the flood thread",
                std::io::Error::other("the flood thread panicked"),
            )),
            None => Ok(()),
        }
    }
}

/// Whether `ip` is one of the addresses the kit hands out (10.200.0.0/16, fd00:fa11::/32).
fn kit_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..2] == [10, 200],
        IpAddr::V6(v6) => v6.segments()[..2] == [0xfd00, 0xfa11],
    }
}

impl Drop for UdpFlood {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
