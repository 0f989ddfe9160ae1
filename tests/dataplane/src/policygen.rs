//! Random host policies and the flows to probe them with, for the differential tests.
//!
//! The policy generator is the one of fw-compiler's `tests/differential.rs` (a test file, so it
//! cannot be imported): `HostPolicy` values built directly, small address universes
//! (10.0.0.0/20 and 2001:db8::/116 with long prefixes) so rules overlap and nest, sets nested
//! in sets with excepts, every protocol with port ranges and ICMP types drawn from a few
//! values so ranges touch, enforce and audit policies, logging, rules in both directions and
//! random defaults. Flows differ: only ingress (the program under test), drawn near what the
//! policy mentions, over more protocols (the kernel parses real headers), and only in shapes a
//! packet can have (IPv6 cannot carry protocol 0 or an extension-header number as its upper
//! layer; those are parsed as extension headers).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use fw_compiler::ast::{Action, Direction, Mode, PortRange, Proto};
use fw_compiler::ids;
use fw_compiler::model::{
    AddrTerm, DirectionDefault, Flow, HostIdentity, HostPolicy, ResolvedRule, ResolvedSet, RuleId,
};
use fw_compiler::source::{Location, Span};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::select;

const V4_BASE: u32 = 0x0a00_0000; // 10.0.0.0
const V6_BASE: u128 = 0x2001_0db8_0000_0000_0000_0000_0000_0000; // 2001:db8::

const POLICIES: [&str; 3] = ["alpha", "beta", "gamma"];
const RULE_PATHS: [&str; 3] = ["a", "a/b", "x/y"];
pub const PORTS: [u16; 15] =
    [0, 1, 22, 53, 79, 80, 81, 443, 1023, 1024, 8000, 8080, 8100, 65534, 65535];
/// ICMP types, including the ND types that are always allowed (133-137) and their neighbours.
pub const ICMP_TYPES: [u8; 11] = [0, 1, 3, 8, 11, 128, 129, 132, 133, 137, 138];
/// Protocols of generated flows: the four the policy language names, and others.
pub const FLOW_PROTOS: [u8; 9] = [6, 17, 1, 58, 47, 0, 132, 59, 255];

#[derive(Clone, Debug)]
enum TermSpec {
    Any,
    Net(IpNet),
    /// An index into the sets generated so far (taken modulo their number).
    Set(usize),
}

#[derive(Clone, Debug)]
enum L4Spec {
    Any,
    Proto(Proto),
    Ports(Proto, Vec<(u16, u16)>),
    Icmp(Proto, Vec<u8>),
}

#[derive(Clone, Debug)]
struct RuleSpec {
    policy: usize,
    direction: Direction,
    action: Action,
    peers: Vec<TermSpec>,
    l4: L4Spec,
    log: bool,
    workloads: Vec<&'static str>,
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        6 => (0u32..4096, 20u8..=32)
            .prop_map(|(low, len)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(V4_BASE | low), len).unwrap().trunc())),
        4 => (0u128..4096, 116u8..=128)
            .prop_map(|(low, len)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(V6_BASE | low), len).unwrap().trunc())),
        1 => select(vec!["0.0.0.0/0", "10.0.0.0/8", "::/0", "2001:db8::/32", "192.0.2.0/24", "10.0.0.0/20", "127.0.0.0/8", "::1/128"])
            .prop_map(|s| s.parse().unwrap()),
    ]
}

fn term() -> impl Strategy<Value = TermSpec> {
    prop_oneof![
        1 => Just(TermSpec::Any),
        10 => net().prop_map(TermSpec::Net),
        4 => (0usize..16).prop_map(TermSpec::Set),
    ]
}

fn l4() -> impl Strategy<Value = L4Spec> {
    let port_range =
        (select(PORTS.to_vec()), select(PORTS.to_vec())).prop_map(|(a, b)| (a.min(b), a.max(b)));
    prop_oneof![
        2 => Just(L4Spec::Any),
        2 => select(vec![Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Icmpv6]).prop_map(L4Spec::Proto),
        5 => (select(vec![Proto::Tcp, Proto::Udp]), prop::collection::vec(port_range, 1..4))
            .prop_map(|(p, r)| L4Spec::Ports(p, r)),
        2 => (select(vec![Proto::Icmp, Proto::Icmpv6]), prop::collection::vec(select(ICMP_TYPES.to_vec()), 1..3))
            .prop_map(|(p, t)| L4Spec::Icmp(p, t)),
    ]
}

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        0..POLICIES.len(),
        // Mostly ingress: that is what the program decides; egress rules must not affect it.
        prop_oneof![4 => Just(Direction::Ingress), 1 => Just(Direction::Egress)],
        prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        prop_oneof![1 => Just(Vec::new()), 15 => prop::collection::vec(term(), 1..4)],
        l4(),
        any::<bool>(),
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(select(RULE_PATHS.to_vec()), 1..3)],
    )
        .prop_map(|(policy, direction, action, peers, l4, log, workloads)| RuleSpec {
            policy,
            direction,
            action,
            peers,
            l4,
            log,
            // Workloads are an egress-only condition.
            workloads: if direction == Direction::Egress { workloads } else { Vec::new() },
        })
}

type SetSpec = (Vec<TermSpec>, Vec<TermSpec>);

fn resolve_term(t: &TermSpec, sets: &[Arc<ResolvedSet>]) -> Option<AddrTerm> {
    match t {
        TermSpec::Any => Some(AddrTerm::Any),
        TermSpec::Net(n) => Some(AddrTerm::Net(*n)),
        TermSpec::Set(i) => (!sets.is_empty()).then(|| AddrTerm::Set(sets[i % sets.len()].clone())),
    }
}

fn build(
    set_specs: Vec<SetSpec>,
    rule_specs: Vec<RuleSpec>,
    modes: [Mode; 3],
    defaults: [(Action, Action); 2],
) -> HostPolicy {
    // Each set may use the sets before it, so nesting goes several levels deep.
    let mut sets: Vec<Arc<ResolvedSet>> = Vec::new();
    for (i, (addresses, except)) in set_specs.into_iter().enumerate() {
        let resolve = |ts: &[TermSpec]| ts.iter().filter_map(|t| resolve_term(t, &sets)).collect();
        let set = ResolvedSet {
            name: format!("s{i}"),
            addresses: resolve(&addresses),
            except: resolve(&except),
        };
        sets.push(Arc::new(set));
    }
    let mut specs: Vec<(usize, RuleSpec)> = rule_specs.into_iter().enumerate().collect();
    specs.sort_by_key(|(i, s)| (POLICIES[s.policy], s.direction, *i));
    let mut next_index: BTreeMap<(usize, Direction), u32> = BTreeMap::new();
    let keyed: Vec<(String, u32, RuleSpec)> = specs
        .into_iter()
        .map(|(_, s)| {
            let index = next_index.entry((s.policy, s.direction)).or_insert(0);
            let i = *index;
            *index += 1;
            (format!("{}/{}/{i}", POLICIES[s.policy], s.direction.as_str()), i, s)
        })
        .collect();
    // Ids as resolve makes them: hashes, so id order is unrelated to rule order.
    let ids = ids::assign(keyed.iter().map(|(k, _, _)| k.clone()));
    let rules = keyed
        .into_iter()
        .map(|(key, index, s)| {
            let (proto, ports, icmp) = match s.l4 {
                L4Spec::Any => (Proto::Any, Vec::new(), Vec::new()),
                L4Spec::Proto(p) => (p, Vec::new(), Vec::new()),
                L4Spec::Ports(p, r) => (
                    p,
                    r.into_iter().map(|(start, end)| PortRange { start, end }).collect(),
                    Vec::new(),
                ),
                L4Spec::Icmp(p, t) => (p, Vec::new(), t),
            };
            ResolvedRule {
                id: RuleId(ids[&key]),
                direction: s.direction,
                policy: POLICIES[s.policy].to_string(),
                index,
                name: None,
                action: s.action,
                mode: modes[s.policy],
                log: s.log,
                peers: s.peers.iter().filter_map(|t| resolve_term(t, &sets)).collect(),
                proto,
                ports,
                icmp,
                workloads: s.workloads.iter().map(|w| w.to_string()).collect(),
                span: Span::default(),
                location: Location {
                    file: format!("{}.yaml", POLICIES[s.policy]).into(),
                    line: index + 1,
                    column: 5,
                },
            }
        })
        .collect();
    let default = |(verdict, audit): (Action, Action)| DirectionDefault {
        verdict,
        // The audit evaluation counts every policy, so it denies whenever the real one does.
        audit: if verdict == Action::Deny { Action::Deny } else { audit },
        verdict_policy: (verdict == Action::Deny).then(|| "alpha".to_string()),
        audit_policy: None,
    };
    HostPolicy {
        host: HostIdentity { name: "web-1".into(), labels: BTreeMap::new() },
        rules,
        ingress_default: default(defaults[0]),
        egress_default: default(defaults[1]),
        policies: POLICIES.iter().map(|p| p.to_string()).collect(),
    }
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Allow), Just(Action::Deny)]
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![3 => Just(Mode::Enforce), 1 => Just(Mode::Audit)]
}

/// A random host policy.
pub fn host_policy() -> impl Strategy<Value = HostPolicy> {
    (
        prop::collection::vec(
            (prop::collection::vec(term(), 1..4), prop::collection::vec(term(), 0..3)),
            0..5,
        ),
        prop::collection::vec(rule_spec(), 0..14),
        [mode(), mode(), mode()],
        [(action(), action()), (action(), action())],
    )
        .prop_map(|(sets, rules, modes, defaults)| build(sets, rules, modes, defaults))
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

fn nets_of_term(t: &AddrTerm, out: &mut Vec<IpNet>) {
    match t {
        AddrTerm::Any => {}
        AddrTerm::Net(n) => out.push(*n),
        AddrTerm::Set(s) => s.addresses.iter().chain(&s.except).for_each(|t| nets_of_term(t, out)),
    }
}

/// Addresses at and just outside the edges of every prefix the policy mentions, plus a few
/// fixed ones (loopback among them: always allowed).
pub fn candidate_peers(policy: &HostPolicy) -> Vec<IpAddr> {
    let mut nets = Vec::new();
    for r in &policy.rules {
        r.peers.iter().for_each(|t| nets_of_term(t, &mut nets));
    }
    let mut out: Vec<IpAddr> = [
        "192.0.2.1",
        "8.8.8.8",
        "10.0.0.0",
        "10.0.15.255",
        "2001:db8::",
        "2001:db8:1::1",
        "127.0.0.1",
        "127.255.0.1",
        "::1",
        "::ffff:127.0.0.1",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect();
    for n in nets {
        match n {
            IpNet::V4(n) => {
                let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
                for a in [lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1), lo + (hi - lo) / 2] {
                    out.push(IpAddr::V4(Ipv4Addr::from(a)));
                }
            }
            IpNet::V6(n) => {
                let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
                for a in [lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1), lo + (hi - lo) / 2] {
                    out.push(IpAddr::V6(Ipv6Addr::from(a)));
                }
            }
        }
    }
    out
}

/// Ports at and next to every port range bound of the policy, plus fixed ones.
pub fn candidate_ports(policy: &HostPolicy) -> Vec<u16> {
    let mut out = PORTS.to_vec();
    for r in &policy.rules {
        for p in &r.ports {
            out.extend([p.start, p.end, p.start.wrapping_sub(1), p.end.wrapping_add(1)]);
        }
    }
    out
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
