//! Random host policies and the flows to probe them with, for the differential tests.
//!
//! Policies come from `fw_compiler::random_policies`, the generator of fw-compiler's
//! differential test, with mostly ingress rules and loopback among the wide prefixes. Flows
//! differ: only ingress (the program under test), drawn near what the policy mentions, over
//! more protocols (the kernel parses real headers), and only in shapes a packet can have (IPv6
//! cannot carry protocol 0 or an extension-header number as its upper layer; those are parsed
//! as extension headers).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fw_compiler::ast::Direction;
use fw_compiler::model::{Flow, HostPolicy};
pub use fw_compiler::random_policies::candidate_ports;
use fw_compiler::random_policies::{self, Universe, V4_BASE, V6_BASE};
use proptest::prelude::*;
use proptest::sample::select;

/// ICMP types, including the ND types that are always allowed (133-137) and their neighbours.
pub const ICMP_TYPES: [u8; 11] = [0, 1, 3, 8, 11, 128, 129, 132, 133, 137, 138];
/// Protocols of generated flows: the four the policy language names, and others.
pub const FLOW_PROTOS: [u8; 9] = [6, 17, 1, 58, 47, 0, 132, 59, 255];

/// The policies of the data plane's tests: mostly ingress rules (that is what the program
/// decides; egress rules must not affect it), and loopback among the wide prefixes.
const UNIVERSE: Universe = Universe {
    more_wide: &["127.0.0.0/8", "::1/128"],
    icmp_types: &ICMP_TYPES,
    rule_paths: &["a", "a/b", "x/y"],
    ingress_per_egress: 4,
};

/// Peers flows use besides `random_policies::FIXED_PEERS`, near loopback (which is always
/// allowed): one deep in 127/8, and 127.0.0.1 mapped into IPv6.
const MORE_PEERS: [&str; 2] = ["127.255.0.1", "::ffff:127.0.0.1"];

/// A random host policy.
pub fn host_policy() -> impl Strategy<Value = HostPolicy> {
    random_policies::host_policy(UNIVERSE)
}

/// The policy with its audit-mode rules removed and the audit defaults equal to the real ones:
/// evaluating a flow against it gives the real verdict's deciding rule, which `eval` does not
/// report for an audit-deny (it names the audit rule there).
pub fn enforcing_only(policy: &HostPolicy) -> HostPolicy {
    let mut p = policy.clone();
    p.rules.retain(|r| r.enforcing());
    p.ingress_default.audit = p.ingress_default.verdict;
    p.egress_default.audit = p.egress_default.verdict;
    p
}

/// Addresses at and just outside the edges of every prefix the policy mentions, plus a few
/// fixed ones.
pub fn candidate_peers(policy: &HostPolicy) -> Vec<IpAddr> {
    random_policies::candidate_peers(policy, &MORE_PEERS)
}

/// An ingress flow: a new packet from `peer` (or, rarely, ARP).
pub fn ingress_flow(peers: Vec<IpAddr>, ports: Vec<u16>) -> impl Strategy<Value = Flow> {
    let peer = prop_oneof![
        6 => select(peers),
        2 => (0u32..4096).prop_map(|l| IpAddr::V4(Ipv4Addr::from(V4_BASE | l))),
        2 => (0u128..4096).prop_map(|l| IpAddr::V6(Ipv6Addr::from(V6_BASE | l))),
        1 => any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        1 => any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ];
    let port = prop_oneof![1 => Just(None), 6 => select(ports).prop_map(Some), 1 => any::<u16>().prop_map(Some)];
    let icmp = prop_oneof![1 => Just(None), 6 => select(ICMP_TYPES.to_vec()).prop_map(Some), 1 => any::<u8>().prop_map(Some)];
    let proto = prop_oneof![6 => select(FLOW_PROTOS.to_vec()), 1 => any::<u8>()];
    (peer, proto, port, icmp, prop::bool::weighted(0.03)).prop_map(
        |(peer, proto, port, icmp, arp)| {
            // IPv6 cannot carry these as its upper layer: they are extension header numbers
            // (0 is hop-by-hop). Such a flow becomes UDP.
            let proto = match (peer, proto) {
                (IpAddr::V6(_), 0 | 43 | 44 | 60) => 17,
                (_, p) => p,
            };
            let mut f = Flow::new(Direction::Ingress, peer, proto);
            match proto {
                6 | 17 => f.port = port,
                1 | 58 => f.icmp_type = icmp,
                _ => {}
            }
            if arp {
                // An ARP frame has no IP peer: the evaluator ignores the address, except that
                // a loopback one would make it "loopback" rather than "ARP".
                f = Flow::new(Direction::Ingress, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 0);
                f.arp = true;
            }
            f
        },
    )
}

/// A random policy and flows probing it.
pub fn policy_and_flows(flows: usize) -> impl Strategy<Value = (HostPolicy, Vec<Flow>)> {
    host_policy().prop_flat_map(move |p| {
        let f =
            prop::collection::vec(ingress_flow(candidate_peers(&p), candidate_ports(&p)), 1..flows);
        (Just(p), f)
    })
}
