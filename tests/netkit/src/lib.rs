//! Building blocks for the privileged tests: real network namespaces, veth pairs, cgroup v2
//! groups and bounded traffic probes, each behind an RAII guard, and the small policies the
//! traffic tests enforce ([`policies`]).
//!
//! Why it is built this way:
//! - No mocks. The data-plane tests must show that the kernel programs act on real traffic, so
//!   every guard makes the real kernel object (`ip netns add`, `ip link add type veth`, `mkdir`
//!   in the cgroup v2 mount) and removes it in `Drop`, which also runs while a failing test
//!   unwinds. Objects leaked by a test process that was killed outright (no `Drop`) are swept by
//!   the next process that makes the same kind of object (names carry the owner's pid).
//! - Tests run in parallel threads of one process and in parallel processes, so every name and
//!   every subnet is unique machine-wide: namespaces and cgroups are named
//!   `fwtest-<pid>-<counter>`, and a veth pair claims a numbered slot with an `flock` on a file
//!   under `/run/fw-netkit/` (released by the kernel when the process dies, so a crashed test
//!   cannot pin a slot); the slot gives the interface names and the /24 and /64 the pair uses.
//! - iproute2 does the netlink work (`ip` is on every machine the tests run on and its
//!   behaviour is what an operator sees); Rust socket code runs inside a namespace on a
//!   dedicated thread that has called `setns` ([`Netns::run`]).
//! - Every probe has a deadline: a test that checks "this is dropped" must end with
//!   [`Outcome::TimedOut`], never hang.
//!
//! Only addresses in 10.200.0.0/16 and fd00:fa11::/32 inside namespaces the test made (or
//! loopback) are ever used as traffic targets.

mod cgroup;
mod error;
mod flood;
mod netns;
pub mod policies;
mod sys;
mod traffic;
mod veth;

pub use cgroup::{Cgroup, cgroup2_mount};
pub use error::{Error, Result};
pub use flood::{FloodCount, UdpFlood};
pub use netns::Netns;
pub use traffic::{
    Outcome, TcpEchoServer, UdpEchoServer, ping, ping_command, tcp_connect, tcp_echo, udp_echo,
};
pub use veth::{Family, VethPair};

/// Returns true when the process runs as root. Otherwise prints a "skipping: needs root" line
/// naming the test (the libtest thread name) and returns false, so a test can
/// `if !fw_netkit::require_root() { return; }`.
///
/// Under CI (`CI` set to anything but "" or "false") a missing root is a failure, not a skip:
/// CI runs as root, and a privileged suite that silently skipped would pass without testing
/// anything.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("<unnamed>").to_string();
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    assert!(!ci, "{test}: needs root, and CI is set (CI runs as root, privileged tests must run)");
    println!("skipping {test}: needs root");
    false
}
