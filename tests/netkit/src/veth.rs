//! [`VethPair`]: a veth pair with one end in the host (root) namespace and its peer in a test
//! [`Netns`], both addressed for IPv4 and IPv6; deleted on drop.
//!
//! Each pair claims a slot `s` in 0..256 by taking an exclusive `flock` on
//! /run/fw-netkit/slot-`s`.lock. flock conflicts between separate opens even inside one
//! process, and the kernel drops the lock when the holder dies, so slots are unique across
//! parallel threads and processes and never leak. The slot gives everything that must be unique
//! in the root namespace:
//! - interface names `fwk<s>h` (host end) and `fwk<s>p` (peer end), well under the 15-byte limit;
//! - the subnets 10.200.`s`.0/24 and fd00:fa11:`s`::/64, host .1 / ::1, peer .2 / ::2.
//!
//! A /24 rather than a /30 leaves room for extra peer addresses ([`VethPair::add_peer_address`])
//! so ingress tests can send from many sources. IPv6 addresses are added with `nodad` so they
//! are usable at once, and `new` waits until both ends report operstate "up".

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::error::{Error, Result};
use crate::netns::Netns;
use crate::sys::ip;

const SLOT_DIR: &str = "/run/fw-netkit";
const SLOTS: u16 = 256;
const UP_TIMEOUT: Duration = Duration::from_secs(10);

/// An address family, for tests that loop over both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];
}

/// A veth pair between the root namespace and a test namespace; deleted on drop.
#[derive(Debug)]
pub struct VethPair {
    slot: u16,
    host_name: String,
    peer_name: String,
    netns: String,
    host_ifindex: u32,
    peer_ifindex: u32,
    host_mac: [u8; 6],
    peer_mac: [u8; 6],
    /// Holds the slot; declared last so it is released after Drop deleted the link.
    _slot_lock: File,
}

impl VethPair {
    /// Makes a pair with the host end in the root namespace and the peer end in `ns`,
    /// addresses assigned on both ends for both families, links up.
    pub fn new(ns: &Netns) -> Result<Self> {
        let (slot, lock) = claim_slot()?;
        let host_name = format!("fwk{slot}h");
        let peer_name = format!("fwk{slot}p");
        // A link left by a test process that was killed holding this slot: the slot is ours
        // now, so the name is free to reuse.
        if Path::new(&format!("/sys/class/net/{host_name}")).exists() {
            let _ = ip(&["link", "del", &host_name]);
        }
        ip(&[
            "link",
            "add",
            &host_name,
            "type",
            "veth",
            "peer",
            "name",
            &peer_name,
            "netns",
            ns.name(),
        ])?;
        // From here on Drop removes the link if anything fails.
        let mut pair = VethPair {
            slot,
            host_name,
            peer_name,
            netns: ns.name().to_string(),
            host_ifindex: 0,
            peer_ifindex: 0,
            host_mac: [0; 6],
            peer_mac: [0; 6],
            _slot_lock: lock,
        };
        let (h4, p4) = (pair.host_v4(), pair.peer_v4());
        let (h6, p6) = (pair.host_v6(), pair.peer_v6());
        let h = pair.host_name.clone();
        let p = pair.peer_name.clone();
        ip(&["addr", "add", &format!("{h4}/24"), "dev", &h])?;
        ip(&["-6", "addr", "add", &format!("{h6}/64"), "dev", &h, "nodad"])?;
        ns.ip(&["addr", "add", &format!("{p4}/24"), "dev", &p])?;
        ns.ip(&["-6", "addr", "add", &format!("{p6}/64"), "dev", &p, "nodad"])?;
        ip(&["link", "set", &h, "up"])?;
        ns.ip(&["link", "set", &p, "up"])?;
        wait_up(None, &h)?;
        wait_up(Some(ns.name()), &p)?;
        (pair.host_ifindex, pair.host_mac) = link_info(None, &h)?;
        (pair.peer_ifindex, pair.peer_mac) = link_info(Some(ns.name()), &p)?;
        Ok(pair)
    }

    /// The slot number (0..256) this pair holds; it is the third octet of its IPv4 subnet.
    pub fn slot(&self) -> u16 {
        self.slot
    }
    /// Name of the end in the root namespace (attach XDP here to see traffic from the peer).
    pub fn host_name(&self) -> &str {
        &self.host_name
    }
    /// Name of the end inside the test namespace.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }
    /// Name of the namespace the peer end is in.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }
    /// Interface index of the host end (in the root namespace).
    pub fn host_ifindex(&self) -> u32 {
        self.host_ifindex
    }
    /// Interface index of the peer end (inside the test namespace).
    pub fn peer_ifindex(&self) -> u32 {
        self.peer_ifindex
    }
    /// MAC address of the host end.
    pub fn host_mac(&self) -> [u8; 6] {
        self.host_mac
    }
    /// MAC address of the peer end.
    pub fn peer_mac(&self) -> [u8; 6] {
        self.peer_mac
    }

    /// The pair's IPv4 subnet, 10.200.`slot`.0/24.
    pub fn v4_net(&self) -> Ipv4Net {
        // 24 is a valid prefix length, so this cannot fail; fall back to a /32 all the same.
        let base = Ipv4Addr::new(10, 200, self.slot as u8, 0);
        Ipv4Net::new(base, 24).unwrap_or_else(|_| Ipv4Net::from(base))
    }
    /// The pair's IPv6 subnet, fd00:fa11:`slot`::/64.
    pub fn v6_net(&self) -> Ipv6Net {
        let base = Ipv6Addr::new(0xfd00, 0xfa11, self.slot, 0, 0, 0, 0, 0);
        Ipv6Net::new(base, 64).unwrap_or_else(|_| Ipv6Net::from(base))
    }
    /// Host end IPv4 address (.1).
    pub fn host_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.slot as u8, 1)
    }
    /// Peer end IPv4 address (.2).
    pub fn peer_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.slot as u8, 2)
    }
    /// Host end IPv6 address (::1 of the /64).
    pub fn host_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xfa11, self.slot, 0, 0, 0, 0, 1)
    }
    /// Peer end IPv6 address (::2 of the /64).
    pub fn peer_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xfa11, self.slot, 0, 0, 0, 0, 2)
    }
    /// Host end address of the given family.
    pub fn host_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.host_v4().into(),
            Family::V6 => self.host_v6().into(),
        }
    }
    /// Peer end address of the given family.
    pub fn peer_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.peer_v4().into(),
            Family::V6 => self.peer_v6().into(),
        }
    }

    /// Adds another address on the peer end (e.g. to send from several sources). It must lie
    /// in the pair's subnet so the host reaches it without extra routes.
    pub fn add_peer_address(&self, addr: IpAddr) -> Result<()> {
        let inside = match addr {
            IpAddr::V4(a) => self.v4_net().contains(&a),
            IpAddr::V6(a) => self.v6_net().contains(&a),
        };
        if !inside {
            return Err(Error::Invalid(format!(
                "{addr} is outside the pair's subnets {} and {}",
                self.v4_net(),
                self.v6_net()
            )));
        }
        let cidr = match addr {
            IpAddr::V4(_) => format!("{addr}/24"),
            IpAddr::V6(_) => format!("{addr}/64"),
        };
        let mut args =
            vec!["-n", self.netns.as_str(), "addr", "add", &cidr, "dev", &self.peer_name];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ip(&args).map(drop)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes both. If the namespace went first the pair is already gone
        // and this fails harmlessly.
        if Path::new(&format!("/sys/class/net/{}", self.host_name)).exists() {
            let _ = ip(&["link", "del", &self.host_name]);
        }
    }
}

/// Claims the lowest free slot.
fn claim_slot() -> Result<(u16, File)> {
    std::fs::create_dir_all(SLOT_DIR).map_err(|e| Error::io(format!("create {SLOT_DIR}"), e))?;
    for slot in 0..SLOTS {
        let path = format!("{SLOT_DIR}/slot-{slot}.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {path}"), e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((slot, file));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io(format!("flock {path}"), err));
        }
    }
    Err(Error::NoFreeSlot(SLOTS))
}

/// `ip` with an optional `-n NS`.
fn ip_in(ns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut all = Vec::with_capacity(args.len() + 2);
    if let Some(ns) = ns {
        all.extend_from_slice(&["-n", ns]);
    }
    all.extend_from_slice(args);
    ip(&all)
}

/// Waits until the link's operstate is UP (a veth is only up once both ends are).
fn wait_up(ns: Option<&str>, name: &str) -> Result<()> {
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        let out = ip_in(ns, &["-o", "link", "show", "dev", name])?;
        if out.contains("state UP") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::LinkNotUp { name: name.to_string(), timeout: UP_TIMEOUT });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Interface index and MAC from `ip -o link show dev NAME`, whose output looks like
/// `7: fwk0h@if6: <BROADCAST,...> mtu 1500 ... link/ether 4a:..:9e brd ff:.. ...`.
fn link_info(ns: Option<&str>, name: &str) -> Result<(u32, [u8; 6])> {
    let out = ip_in(ns, &["-o", "link", "show", "dev", name])?;
    parse_link_line(&out)
        .ok_or_else(|| Error::Invalid(format!("cannot parse `ip -o link show dev {name}`: {out}")))
}

fn parse_link_line(line: &str) -> Option<(u32, [u8; 6])> {
    let ifindex = line.split(':').next()?.trim().parse().ok()?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "link/ether")?;
    let mac_text = words.next()?;
    let mut mac = [0u8; 6];
    let mut parts = mac_text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((ifindex, mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_link_line() {
        let line = "7: fwk0h@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP \
                    mode DEFAULT group default qlen 1000\\    link/ether 4a:0b:cc:01:02:9e brd \
                    ff:ff:ff:ff:ff:ff link-netns fwtest-1-0";
        assert_eq!(parse_link_line(line), Some((7, [0x4a, 0x0b, 0xcc, 0x01, 0x02, 0x9e])));
        assert_eq!(parse_link_line("7: lo: <LOOPBACK> link/loopback 00:00:00:00:00:00"), None);
        assert_eq!(parse_link_line("x: fwk0h: link/ether 4a:0b:cc:01:02:9e"), None);
    }
}
