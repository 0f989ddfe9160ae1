//! The policies every part of the suite loads, and the frames it sends.
//!
//! One prefix list for every engine (ours, nftables, iptables), generated, so that the
//! comparison is between engines and not between inputs: prefix `i` of a list of n belongs to
//! pair `k = i / 2`, a wide prefix and a host inside it, with every other wide block left out
//! so that no two prefixes merge into a shorter one:
//! - IPv4: the /24 `10.0.0.0 + k * 512` and the /32 `.7` inside it;
//! - IPv6: the /64 `2001:db8:0:0 + 2k` (the second 32-bit word) and the /128 `::7` in it.
//!
//! The policy allows TCP 443 from the wide prefixes and TCP 8443 from the hosts (different
//! rules, 100 prefixes each, so every prefix stays a trie entry of its own), plus 1,000 port
//! rules without an address restriction (TCP 20000-20999); the default denies. The same shape
//! as the data-plane bench of fw-loader, so figures compare with docs/benchmarks.md.
//!
//! Traffic is described by a [`Draw`]: which 32-bit word of the source address is random and
//! how (see fw-ebpf's `bench` module, which draws it in the kernel). *Hit-heavy* draws land
//! in a loaded wide prefix (and now and then on its host), *miss-heavy* ones in the gaps
//! between them, so the lookup walks as deep but finds only the compiler's `/0`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use fw_compiler::ast::{Action, Direction, Mode, PortRange, Proto};
use fw_compiler::compile::compile;
use fw_compiler::ids;
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::{
    AddrTerm, DirectionDefault, HostIdentity, HostPolicy, ResolvedRule, RuleId,
};
use fw_compiler::source::{Location, Span};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub const PREFIXES_PER_RULE: usize = 100;
pub const PORT_RULES: usize = 1000;
pub const WIDE_PORT: u16 = 443;
pub const HOST_PORT: u16 = 8443;
/// The first port rule's port; the one-rule change moves it by one.
pub const PORT_BASE: u16 = 20000;
/// Where the descriptor of a test-run frame starts (fw-ebpf `bench::DESC_OFF`).
pub const DESC_OFF: usize = 80;
/// Where the generator's descriptor starts (fw-ebpf `bench::GEN_DESC_OFF`).
pub const GEN_DESC_OFF: usize = 44;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Prefix `i` of a list (see the module docs).
pub fn prefix(family: Family, i: usize) -> IpNet {
    let k = u32::try_from(i / 2).expect("fewer than 2^32 pairs");
    let host = i % 2 == 1;
    match family {
        Family::V4 => {
            let base = 0x0a00_0000 + (k << 9);
            if host {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base + 7), 32).expect("valid /32"))
            } else {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 24).expect("valid /24"))
            }
        }
        Family::V6 => {
            let word = u128::from(2 * k) << 64;
            let base = (0x2001_0db8u128 << 96) | word;
            if host {
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(base | 7), 128).expect("valid /128"))
            } else {
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(base), 64).expect("valid /64"))
            }
        }
    }
}

/// How the kernel draws the random part of a source address.
#[derive(Clone, Copy, Debug)]
pub struct Draw {
    /// Byte offset of the random 32-bit word in the address.
    pub off: u8,
    pub shift: u8,
    pub count: u32,
    pub base: u32,
    pub mask: u32,
}

impl Draw {
    /// Sources in the loaded wide prefixes of a list of `n` (hit) or in the gaps between them
    /// (miss).
    pub fn new(family: Family, n: usize, hit: bool) -> Draw {
        let count = u32::try_from((n / 2).max(1)).expect("small");
        match family {
            // 10.0.0.0 + k * 512 (+ 256 for the gap) + a random host byte.
            Family::V4 => Draw {
                off: 0,
                shift: 9,
                count,
                base: 0x0a00_0000 + if hit { 0 } else { 256 },
                mask: 0xff,
            },
            // The second word is 2k (+ 1 for the gap); the rest of the address stays.
            Family::V6 => Draw { off: 4, shift: 1, count, base: u32::from(!hit), mask: 0 },
        }
    }

    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.off;
        b[1] = self.shift;
        b[2..4].copy_from_slice(b"FB");
        b[4..8].copy_from_slice(&self.count.to_be_bytes());
        b[8..12].copy_from_slice(&self.base.to_be_bytes());
        b[12..16].copy_from_slice(&self.mask.to_be_bytes());
        b
    }
}

fn rule(
    key: &str,
    ids: &BTreeMap<String, u32>,
    direction: Direction,
    index: u32,
    peers: Vec<AddrTerm>,
    port: u16,
) -> ResolvedRule {
    ResolvedRule {
        id: RuleId(ids[key]),
        direction,
        policy: "bench".into(),
        index,
        name: None,
        action: Action::Allow,
        mode: Mode::Enforce,
        log: false,
        peers,
        proto: Proto::Tcp,
        ports: vec![PortRange { start: port, end: port }],
        icmp: Vec::new(),
        workloads: Vec::new(),
        span: Span::default(),
        location: Location { file: "bench.yaml".into(), line: index + 1, column: 5 },
    }
}

/// A host policy with `n` prefixes of `family` in `direction`; `port_shift` moves port rule 0
/// (the one-rule change). Ingress denies by default; egress allows (so a `connect` reaches
/// the stack and is refused there).
pub fn host_policy(family: Family, n: usize, direction: Direction, port_shift: u16) -> HostPolicy {
    let groups: Vec<Vec<usize>> = [0, 1]
        .into_iter()
        .flat_map(|parity| {
            let members: Vec<usize> = (0..n).filter(|i| i % 2 == parity).collect();
            members.chunks(PREFIXES_PER_RULE).map(<[usize]>::to_vec).collect::<Vec<_>>()
        })
        .collect();
    let prefix_rules = groups.len();
    let dir = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let keys: Vec<String> =
        (0..prefix_rules + PORT_RULES).map(|i| format!("bench/{dir}/{i}")).collect();
    let ids = ids::assign(keys.iter().cloned());
    let mut rules = Vec::new();
    for (r, group) in groups.iter().enumerate() {
        let peers = group.iter().map(|&i| AddrTerm::Net(prefix(family, i))).collect();
        let port = if group[0] % 2 == 0 { WIDE_PORT } else { HOST_PORT };
        rules.push(rule(&keys[r], &ids, direction, r as u32, peers, port));
    }
    for p in 0..PORT_RULES {
        let i = prefix_rules + p;
        let port = PORT_BASE + p as u16 + if p == 0 { port_shift } else { 0 };
        rules.push(rule(&keys[i], &ids, direction, i as u32, vec![AddrTerm::Any], port));
    }
    let deny = DirectionDefault {
        verdict: Action::Deny,
        audit: Action::Deny,
        verdict_policy: Some("bench".into()),
        audit_policy: None,
    };
    let (ingress_default, egress_default) = match direction {
        Direction::Ingress => (deny, DirectionDefault::default()),
        Direction::Egress => (DirectionDefault::default(), DirectionDefault::default()),
    };
    HostPolicy {
        host: HostIdentity { name: "web-1".into(), labels: BTreeMap::new() },
        rules,
        ingress_default,
        egress_default,
        policies: vec!["bench".into()],
    }
}

/// Capacities large enough for every state the suite builds.
pub fn capacities(n: usize) -> Capacities {
    let room = u32::try_from((n + n / 4).max(1024)).expect("small").next_power_of_two();
    Capacities {
        v4_prefixes: room.max(1 << 10),
        v6_prefixes: room.max(1 << 10),
        l4_entries: 1 << 16,
        rules: 1 << 14,
        workloads: 16,
    }
}

pub fn compile_state(family: Family, n: usize, direction: Direction, shift: u16) -> MapState {
    compile(&host_policy(family, n, direction, shift), &capacities(n))
        .unwrap_or_else(|d| panic!("the bench policy does not compile: {d:?}"))
}

/// A TCP SYN to `dport` (Ethernet, IPv4 or IPv6), padded, with the draw's descriptor at
/// [`DESC_OFF`]. Its own source is the first wide prefix's address.
pub fn test_frame(family: Family, dport: u16, draw: Option<Draw>) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&40000u16.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match family {
        Family::V4 => {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&[10, 0, 0, 1]);
            ip.extend_from_slice(&[10, 255, 255, 254]);
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        Family::V6 => {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
            f.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
            f.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1).octets());
        }
    }
    f.extend_from_slice(&tcp);
    f.resize(DESC_OFF, 0);
    f.extend_from_slice(&draw.map_or([0; 16], |d| d.bytes()));
    f
}

/// The generator's frame: 60 bytes (64 on the wire with the FCS) of Ethernet, IPv4 and UDP
/// to `dst` port 9, with the draw's descriptor at [`GEN_DESC_OFF`].
pub fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], dst: Ipv4Addr, draw: Draw) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 46, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&[10, 0, 0, 1]);
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&26u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(GEN_DESC_OFF, 0);
    f.extend_from_slice(&draw.bytes());
    assert_eq!(f.len(), 60);
    f
}

fn checksum(h: &[u8]) -> u16 {
    let sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    !((sum & 0xffff) + (sum >> 16)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_pair_a_wide_block_with_a_host_inside_it() {
        assert_eq!(prefix(Family::V4, 0).to_string(), "10.0.0.0/24");
        assert_eq!(prefix(Family::V4, 1).to_string(), "10.0.0.7/32");
        assert_eq!(prefix(Family::V4, 2).to_string(), "10.0.2.0/24");
        assert_eq!(prefix(Family::V6, 2).to_string(), "2001:db8:0:2::/64");
        assert_eq!(prefix(Family::V6, 3).to_string(), "2001:db8:0:2::7/128");
    }

    #[test]
    fn frames_carry_the_descriptor_where_the_kernel_reads_it() {
        let d = Draw::new(Family::V4, 1000, true);
        let f = test_frame(Family::V4, 443, Some(d));
        assert_eq!(&f[DESC_OFF + 2..DESC_OFF + 4], b"FB");
        let g = udp_frame([2; 6], [4; 6], Ipv4Addr::new(10, 200, 0, 2), d);
        assert_eq!(&g[GEN_DESC_OFF + 2..GEN_DESC_OFF + 4], b"FB");
        assert_eq!(checksum(&g[14..34]), 0, "a valid IPv4 header sums to zero");
    }
}
