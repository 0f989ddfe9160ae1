//! The same policy as nftables and iptables rule sets, for the packet-rate and load
//! comparisons.
//!
//! Each engine gets the prefix list of `states` and the same decisions: TCP 443 from the wide
//! prefixes, TCP 8443 from the hosts, TCP 20000-20999 from anywhere, then a drop. nftables
//! holds the prefixes in sets, in the two layouts people use: *interval* sets (`flags
//! interval`, one per prefix length, since the hosts sit inside the wide prefixes and the
//! elements of one interval set may not overlap) and *hash* sets (plain sets of addresses,
//! one per prefix length, looked up with the address masked to that length). iptables has no
//! sets without ipset, so it gets one rule per prefix, which is what "the same rules" means
//! there. Everything is loaded inside the bench's network namespace, at the earliest hook
//! each engine has: nftables `netdev` ingress on the receiving device, iptables `raw`
//! PREROUTING.

use std::fmt::Write as _;

use crate::states::{self, Family};

pub const TABLE: &str = "fwbench";
pub const CHAIN: &str = "FWBENCH";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Interval,
    Hash,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Interval => "interval",
            Layout::Hash => "hash",
        }
    }
}

fn elements(n: usize, wide: bool, hash: bool) -> String {
    let mut s = String::with_capacity(n * 16);
    for i in (usize::from(!wide)..n).step_by(2) {
        let p = states::prefix(Family::V4, i);
        if !s.is_empty() {
            s.push_str(", ");
        }
        if hash {
            let _ = write!(s, "{}", p.addr());
        } else {
            let _ = write!(s, "{p}");
        }
    }
    s
}

/// The sets of `layout` for `n` prefixes (without a chain).
pub fn nft_sets(n: usize, layout: Layout) -> String {
    let (hash, flags) = match layout {
        Layout::Interval => (false, " flags interval;"),
        Layout::Hash => (true, ""),
    };
    let p = &layout.name()[..1];
    format!(
        "table netdev {TABLE} {{\n  set {p}wide {{ type ipv4_addr;{flags} elements = {{ {} }} }}\n  \
         set {p}host {{ type ipv4_addr;{flags} elements = {{ {} }} }}\n}}\n",
        elements(n, true, hash),
        elements(n, false, hash)
    )
}

/// The base chain of `layout` on `device`, named after the layout.
pub fn nft_chain(layout: Layout, device: &str) -> String {
    let (p, wide) = match layout {
        Layout::Interval => ("i", "ip saddr"),
        Layout::Hash => ("h", "ip saddr & 255.255.255.0"),
    };
    format!(
        "table netdev {TABLE} {{\n  chain rx_{} {{\n    type filter hook ingress device \"{device}\" \
         priority 0; policy accept;\n    {wide} @{p}wide tcp dport {} accept\n    ip saddr \
         @{p}host tcp dport {} accept\n    tcp dport {}-{} accept\n    drop\n  }}\n}}\n",
        layout.name(),
        states::WIDE_PORT,
        states::HOST_PORT,
        states::PORT_BASE,
        states::PORT_BASE + states::PORT_RULES as u16 - 1
    )
}

/// An `iptables-restore` file: the policy as the user chain [`CHAIN`] of the raw table,
/// with a jump from PREROUTING for `device` when `jump`.
pub fn iptables_rules(n: usize, device: &str, jump: bool) -> String {
    let mut s = String::with_capacity(n * 64);
    s.push_str("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    let _ = writeln!(s, ":{CHAIN} - [0:0]");
    if jump {
        let _ = writeln!(s, "-A PREROUTING -i {device} -j {CHAIN}");
    }
    for wide in [true, false] {
        let port = if wide { states::WIDE_PORT } else { states::HOST_PORT };
        for i in (usize::from(!wide)..n).step_by(2) {
            let p = states::prefix(Family::V4, i);
            let _ = writeln!(s, "-A {CHAIN} -s {p} -p tcp -m tcp --dport {port} -j ACCEPT");
        }
    }
    let _ = writeln!(
        s,
        "-A {CHAIN} -p tcp -m tcp --dport {}:{} -j ACCEPT",
        states::PORT_BASE,
        states::PORT_BASE + states::PORT_RULES as u16 - 1
    );
    let _ = writeln!(s, "-A {CHAIN} -j DROP\nCOMMIT");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_sets_hold_every_prefix_once() {
        let sets = nft_sets(6, Layout::Interval);
        assert!(sets.contains("10.0.0.0/24, 10.0.2.0/24, 10.0.4.0/24"), "{sets}");
        assert!(sets.contains("10.0.0.7/32, 10.0.2.7/32, 10.0.4.7/32"), "{sets}");
        let hash = nft_sets(2, Layout::Hash);
        assert!(hash.contains("elements = { 10.0.0.0 }") && !hash.contains("interval"));
        let ipt = iptables_rules(4, "veth0", true);
        assert_eq!(ipt.lines().filter(|l| l.starts_with("-A FWBENCH -s")).count(), 4);
        assert!(ipt.contains("-A FWBENCH -j DROP\nCOMMIT"));
        assert!(nft_chain(Layout::Hash, "veth0").contains("ip saddr & 255.255.255.0 @hwide"));
    }
}
