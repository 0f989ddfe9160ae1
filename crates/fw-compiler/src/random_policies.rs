//! Random host policies for property tests (feature `random-policies`): the compiler's
//! differential test and the data plane's draw from the same generator.
//!
//! Policies are built directly as `HostPolicy` values (not YAML), so every shape the compiler
//! can meet is reachable: small address universes (10.0.0.0/20 and 2001:db8::/116 with long
//! prefixes) so rules overlap and nest, address sets nested in sets with excepts, mixed
//! families, every protocol with port ranges and ICMP types drawn from a few values so ranges
//! touch, enforce and audit policies, logging, egress workloads, and random defaults. Rule ids
//! are assigned as `resolve` assigns them (hashes), so id order is unrelated to rule order.
//! What differs between the tests (which wide prefixes, ICMP types and cgroup paths rules
//! name, how often a rule is ingress) is a [`Universe`]; flows are each test's own.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::select;

use crate::ast::{Action, Direction, Mode, PortRange, Proto};
use crate::ids;
use crate::model::{
    AddrTerm, DirectionDefault, HostIdentity, HostPolicy, ResolvedRule, ResolvedSet, RuleId,
};
use crate::source::{Location, Span};

/// The IPv4 universe's base: 10.0.0.0/20.
pub const V4_BASE: u32 = 0x0a00_0000;
/// The IPv6 universe's base: 2001:db8::/116.
pub const V6_BASE: u128 = 0x2001_0db8_0000_0000_0000_0000_0000_0000;
/// The policies rules belong to.
pub const POLICIES: [&str; 3] = ["alpha", "beta", "gamma"];
/// Ports that port ranges start and end at (and flows probe).
pub const PORTS: [u16; 15] =
    [0, 1, 22, 53, 79, 80, 81, 443, 1023, 1024, 8000, 8080, 8100, 65534, 65535];

/// Wide prefixes drawn now and then beside the small universes' long ones.
pub const WIDE: [&str; 6] =
    ["0.0.0.0/0", "10.0.0.0/8", "::/0", "2001:db8::/32", "192.0.2.0/24", "10.0.0.0/20"];

/// What a generated policy draws from, where the tests differ.
#[derive(Clone, Copy, Debug)]
pub struct Universe {
    /// Wide prefixes drawn beside [`WIDE`].
    pub more_wide: &'static [&'static str],
    /// The ICMP types rules name.
    pub icmp_types: &'static [u8],
    /// The cgroup paths egress rules name as workloads.
    pub rule_paths: &'static [&'static str],
    /// Ingress rules drawn per egress rule.
    pub ingress_per_egress: u32,
}

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

/// A prefix of the small universes, or one of [`WIDE`] and `more_wide`.
fn net(more_wide: &'static [&'static str]) -> impl Strategy<Value = IpNet> {
    let wide: Vec<IpNet> = WIDE.iter().chain(more_wide).filter_map(|s| s.parse().ok()).collect();
    let v4 = |low: u32, len: u8| {
        Ipv4Net::new(Ipv4Addr::from(V4_BASE | low), len)
            .map_or(IpNet::V4(Ipv4Net::default()), |n| IpNet::V4(n.trunc()))
    };
    let v6 = |low: u128, len: u8| {
        Ipv6Net::new(Ipv6Addr::from(V6_BASE | low), len)
            .map_or(IpNet::V6(Ipv6Net::default()), |n| IpNet::V6(n.trunc()))
    };
    prop_oneof![
        6 => (0u32..4096, 20u8..=32).prop_map(move |(low, len)| v4(low, len)),
        4 => (0u128..4096, 116u8..=128).prop_map(move |(low, len)| v6(low, len)),
        1 => select(wide),
    ]
}

fn term(more_wide: &'static [&'static str]) -> impl Strategy<Value = TermSpec> {
    prop_oneof![
        1 => Just(TermSpec::Any),
        10 => net(more_wide).prop_map(TermSpec::Net),
        4 => (0usize..16).prop_map(TermSpec::Set),
    ]
}

fn l4(icmp_types: &'static [u8]) -> impl Strategy<Value = L4Spec> {
    let port_range =
        (select(PORTS.to_vec()), select(PORTS.to_vec())).prop_map(|(a, b)| (a.min(b), a.max(b)));
    prop_oneof![
        2 => Just(L4Spec::Any),
        2 => select(vec![Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Icmpv6]).prop_map(L4Spec::Proto),
        5 => (select(vec![Proto::Tcp, Proto::Udp]), prop::collection::vec(port_range, 1..4))
            .prop_map(|(p, r)| L4Spec::Ports(p, r)),
        2 => (select(vec![Proto::Icmp, Proto::Icmpv6]), prop::collection::vec(select(icmp_types.to_vec()), 1..3))
            .prop_map(|(p, t)| L4Spec::Icmp(p, t)),
    ]
}

fn rule_spec(u: Universe) -> impl Strategy<Value = RuleSpec> {
    (
        0..POLICIES.len(),
        prop_oneof![u.ingress_per_egress => Just(Direction::Ingress), 1 => Just(Direction::Egress)],
        prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        prop_oneof![1 => Just(Vec::new()), 15 => prop::collection::vec(term(u.more_wide), 1..4)],
        l4(u.icmp_types),
        any::<bool>(),
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(select(u.rule_paths.to_vec()), 1..3)],
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
        TermSpec::Set(i) => sets.get(i % sets.len().max(1)).map(|s| AddrTerm::Set(s.clone())),
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

/// A random host policy over `u`.
pub fn host_policy(u: Universe) -> impl Strategy<Value = HostPolicy> {
    (
        prop::collection::vec(
            (
                prop::collection::vec(term(u.more_wide), 1..4),
                prop::collection::vec(term(u.more_wide), 0..3),
            ),
            0..5,
        ),
        prop::collection::vec(rule_spec(u), 0..14),
        [mode(), mode(), mode()],
        [(action(), action()), (action(), action())],
    )
        .prop_map(|(sets, rules, modes, defaults)| build(sets, rules, modes, defaults))
}

/// Every prefix `t` names, its sets' excepts included.
pub fn nets_of_term(t: &AddrTerm, out: &mut Vec<IpNet>) {
    match t {
        AddrTerm::Any => {}
        AddrTerm::Net(n) => out.push(*n),
        AddrTerm::Set(s) => s.addresses.iter().chain(&s.except).for_each(|t| nets_of_term(t, out)),
    }
}

/// Addresses [`candidate_peers`] always gives: in and out of both universes, loopback.
pub const FIXED_PEERS: [&str; 8] = [
    "192.0.2.1",
    "8.8.8.8",
    "10.0.0.0",
    "10.0.15.255",
    "2001:db8::",
    "2001:db8:1::1",
    "127.0.0.1",
    "::1",
];

/// Addresses at and just outside the edges of every prefix the policy mentions, and their
/// middles, plus [`FIXED_PEERS`] and `more` (those that parse).
pub fn candidate_peers(policy: &HostPolicy, more: &[&str]) -> Vec<IpAddr> {
    let mut nets = Vec::new();
    for r in &policy.rules {
        r.peers.iter().for_each(|t| nets_of_term(t, &mut nets));
    }
    let fixed = FIXED_PEERS.iter().chain(more);
    let mut out: Vec<IpAddr> = fixed.filter_map(|s| s.parse().ok()).collect();
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

/// Ports at and next to every port range bound of the policy, plus [`PORTS`].
pub fn candidate_ports(policy: &HostPolicy) -> Vec<u16> {
    let mut out = PORTS.to_vec();
    for r in &policy.rules {
        for p in &r.ports {
            out.extend([p.start, p.end, p.start.wrapping_sub(1), p.end.wrapping_add(1)]);
        }
    }
    out
}
