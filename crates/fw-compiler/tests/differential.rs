//! The compiled lookup against the reference evaluator, on random host policies.
//!
//! Policies are generated directly as `HostPolicy` values (not YAML) so every shape the
//! compiler can meet is reachable: small address universes (10.0.0.0/20 and 2001:db8::/116 with
//! long prefixes) so rules overlap and nest, address sets nested in sets with excepts, mixed
//! families, every protocol with port ranges and ICMP types drawn from a few values so ranges
//! touch, enforce and audit policies, logging, egress workloads with nested cgroup paths, and
//! random defaults. Flows are drawn near what the policy mentions: prefix boundaries and one
//! past them, port range bounds and their neighbours, no port, workloads at, below and beside
//! rule paths. For each policy: the lookup agrees with `eval::evaluate` on every flow, compile
//! is deterministic, the state has the structure the data plane relies on (a /0 root) and no
//! redundant L4 entries, and encode/decode round-trips.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use fw_compiler::ast::{Action, Direction, Mode, PortRange, Proto};
use fw_compiler::compile::{CompileMemo, compile, compile_reusing};
use fw_compiler::encode::{DecodedMaps, decode, encode, validate};
use fw_compiler::eval;
use fw_compiler::ids;
use fw_compiler::mapstate::{
    Capacities, ClassId, Decision, L4Key, L4Value, MapState, WorkloadId, l4_word,
};
use fw_compiler::model::{
    AddrTerm, DirectionDefault, Flow, FlowState, HostIdentity, HostPolicy, ResolvedRule,
    ResolvedSet, RuleId,
};
use fw_compiler::source::{Location, Span};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::select;

const V4_BASE: u32 = 0x0a00_0000; // 10.0.0.0
const V6_BASE: u128 = 0x2001_0db8_0000_0000_0000_0000_0000_0000; // 2001:db8::

const POLICIES: [&str; 3] = ["alpha", "beta", "gamma"];
const RULE_PATHS: [&str; 5] = ["a", "a/b", "a/b/c", "x/y", "a/bc"];
const FLOW_PATHS: [&str; 9] = ["a", "a/b", "a/b/c", "a/b/c/d", "a/bc", "a/bcd", "x", "x/y/z", "z"];
const PORTS: [u16; 15] =
    [0, 1, 22, 53, 79, 80, 81, 443, 1023, 1024, 8000, 8080, 8100, 65534, 65535];
const ICMP_TYPES: [u8; 8] = [0, 1, 3, 8, 11, 128, 129, 135];

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(300)
}

// --- policy generation -----------------------------------------------------------------------

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
        1 => select(vec!["0.0.0.0/0", "10.0.0.0/8", "::/0", "2001:db8::/32", "192.0.2.0/24", "10.0.0.0/20"])
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
        prop_oneof![Just(Direction::Ingress), Just(Direction::Egress)],
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

fn host_policy() -> impl Strategy<Value = HostPolicy> {
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

// --- flow generation -------------------------------------------------------------------------

fn nets_of_term(t: &AddrTerm, out: &mut Vec<IpNet>) {
    match t {
        AddrTerm::Any => {}
        AddrTerm::Net(n) => out.push(*n),
        AddrTerm::Set(s) => s.addresses.iter().chain(&s.except).for_each(|t| nets_of_term(t, out)),
    }
}

/// Addresses at and just outside the edges of every prefix the policy mentions, plus a few
/// fixed ones.
fn candidate_peers(policy: &HostPolicy) -> Vec<IpAddr> {
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
        "::1",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
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

fn candidate_ports(policy: &HostPolicy) -> Vec<u16> {
    let mut out = PORTS.to_vec();
    for r in &policy.rules {
        for p in &r.ports {
            out.extend([p.start, p.end, p.start.wrapping_sub(1), p.end.wrapping_add(1)]);
        }
    }
    out
}

fn flow(peers: Vec<IpAddr>, ports: Vec<u16>) -> impl Strategy<Value = Flow> {
    let peer = prop_oneof![
        6 => select(peers),
        2 => (0u32..4096).prop_map(|l| IpAddr::V4(Ipv4Addr::from(V4_BASE | l))),
        2 => (0u128..4096).prop_map(|l| IpAddr::V6(Ipv6Addr::from(V6_BASE | l))),
        1 => any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
    ];
    let port = prop_oneof![1 => Just(None), 6 => select(ports).prop_map(Some), 1 => any::<u16>().prop_map(Some)];
    let icmp = prop_oneof![1 => Just(None), 6 => select(ICMP_TYPES.to_vec()).prop_map(Some), 1 => any::<u8>().prop_map(Some)];
    let workload = prop_oneof![2 => Just(None), 5 => select(FLOW_PATHS.to_vec()).prop_map(Some)];
    let state = prop_oneof![
        12 => Just(FlowState::New),
        1 => Just(FlowState::Reply),
        1 => Just(FlowState::Related),
    ];
    (
        prop_oneof![Just(Direction::Ingress), Just(Direction::Egress)],
        peer,
        select(vec![6u8, 17, 1, 58, 47, 0]),
        port,
        icmp,
        workload,
        state,
        prop::bool::weighted(0.03),
        prop::bool::weighted(0.03),
    )
        .prop_map(|(direction, peer, proto, port, icmp, workload, state, loopback, arp)| {
            let mut f = Flow::new(direction, peer, proto);
            match proto {
                6 | 17 => f.port = port,
                1 | 58 => f.icmp_type = icmp,
                _ => {}
            }
            if direction == Direction::Egress {
                f.workload = workload.map(String::from);
            }
            f.state = state;
            f.loopback = loopback;
            f.arp = arp && direction == Direction::Ingress;
            f
        })
}

fn policy_and_flows() -> impl Strategy<Value = (HostPolicy, Vec<Flow>)> {
    host_policy().prop_flat_map(|p| {
        let flows = prop::collection::vec(flow(candidate_peers(&p), candidate_ports(&p)), 1..48);
        (Just(p), flows)
    })
}

// --- properties ------------------------------------------------------------------------------

/// Structure the kernel relies on, and that the tables carry nothing redundant: every address
/// has a class; L4 tables are LPM tries (the longest prefix containing a word answers), so a
/// table may nest prefixes, but no entry is empty or repeats the nearest entry enclosing it in
/// its table (which would answer for it anyway); and a workload table's outermost entries
/// each decide differently from the workload-0 table around them, since that is the only
/// reason for the workload table to hold anything there (a miss falls back to workload 0).
fn check_structure(state: &MapState) -> Result<(), TestCaseError> {
    for maps in [&state.ingress, &state.egress] {
        prop_assert!(maps.v4.contains_key(&"0.0.0.0/0".parse().unwrap()));
        prop_assert!(maps.v6.contains_key(&"::/0".parse().unwrap()));
        let mut groups: BTreeMap<_, Vec<(u64, u64, &L4Value)>> = BTreeMap::new();
        for (k, v) in &maps.l4 {
            let size = 1u64 << (32 - u32::from(k.prefix_len));
            let lo = u64::from(k.bits);
            groups.entry((k.class, k.workload)).or_default().push((lo, lo + size - 1, v));
        }
        let none = L4Value { verdict: Decision::None, audit: Decision::None };
        // The workload-0 entry of `class` answering for the prefix `bits/len`.
        let workload_zero = |class: ClassId, bits: u32, len: u8| {
            (0..=len)
                .rev()
                .find_map(|l| {
                    let masked = if l == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(l))) };
                    let key =
                        L4Key { class, workload: WorkloadId::NONE, prefix_len: l, bits: masked };
                    maps.l4.get(&key)
                })
                .unwrap_or(&none)
        };
        for (group, mut ranges) in groups {
            // Trie preorder: an enclosing prefix before the prefixes inside it.
            ranges.sort_unstable_by_key(|&(lo, hi, _)| (lo, std::cmp::Reverse(hi)));
            let mut enclosing: Vec<(u64, u64, &L4Value)> = Vec::new();
            for (lo, hi, v) in ranges {
                while enclosing.last().is_some_and(|e| e.1 < lo) {
                    enclosing.pop();
                }
                let parent = match enclosing.last() {
                    Some(e) => e.2,
                    None if group.1 == WorkloadId::NONE => &none,
                    None => {
                        let len = 32 - (hi - lo + 1).trailing_zeros() as u8;
                        workload_zero(group.0, lo as u32, len)
                    }
                };
                prop_assert!(
                    v != parent,
                    "L4 entry {lo:#x}-{hi:#x} in {group:?} repeats the entry around it: {v:?}"
                );
                enclosing.push((lo, hi, v));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn compiled_lookup_agrees_with_the_evaluator((policy, flows) in policy_and_flows()) {
        let state = compile(&policy, &Capacities::default()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        check_structure(&state)?;
        for flow in &flows {
            let expected = eval::evaluate(&policy, flow).outcome;
            let got = state.lookup(flow);
            prop_assert_eq!(&got, &expected, "flow {:?}", flow);
        }
    }

    #[test]
    fn compile_is_deterministic_and_round_trips_through_bytes(policy in host_policy()) {
        let a = compile(&policy, &Capacities::default()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let b = compile(&policy.clone(), &Capacities::default()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.digest(), b.digest());
        prop_assert!(a.diff(&b).is_empty());
        let encoded = encode(&a);
        prop_assert_eq!(&encoded, &encode(&b));
        prop_assert_eq!(decode(&encoded), Ok(DecodedMaps::from_state(&a)));
        prop_assert_eq!(validate(&encoded), Ok(()));
    }

    /// A compile that reuses the last one's address tables (`compile_reusing`) equals a fresh
    /// compile, over a sequence that keeps every peer and changes actions and logging (the
    /// tables are reused), switches to another policy (rebuilt) and comes back.
    #[test]
    fn a_compile_reusing_the_last_equals_a_fresh_one(a in host_policy(), b in host_policy(), cap in 0u32..6) {
        let mut flipped = a.clone();
        for r in &mut flipped.rules {
            r.action = if r.action == Action::Allow { Action::Deny } else { Action::Allow };
            r.log = !r.log;
        }
        let small = Capacities { v4_prefixes: cap, l4_entries: cap * 4, ..Capacities::default() };
        let mut memo = CompileMemo::default();
        for (p, caps) in [(&a, Capacities::default()), (&flipped, Capacities::default()), (&a, small), (&b, Capacities::default()), (&a, Capacities::default()), (&a, Capacities::default())] {
            let fresh = compile(p, &caps);
            let reused = compile_reusing(p, &caps, &mut memo);
            prop_assert_eq!(format!("{fresh:?}"), format!("{reused:?}"));
        }
    }

    #[test]
    fn compile_never_panics_and_reports_overflow(policy in host_policy(), cap in 0u32..6) {
        let caps = Capacities { v4_prefixes: cap, v6_prefixes: cap, l4_entries: cap * 4, rules: cap * 2, workloads: cap };
        match compile(&policy, &caps) {
            Ok(state) => {
                prop_assert!(state.ingress.v4.len() <= cap as usize);
                prop_assert!(state.egress.l4.len() <= cap as usize * 4);
            }
            Err(diags) => {
                prop_assert!(!diags.is_empty());
                prop_assert!(diags.iter().all(|d| d.code == fw_compiler::diag::Code::CapacityExceeded));
            }
        }
    }

    #[test]
    fn diff_is_empty_exactly_for_equal_states(a in host_policy(), b in host_policy()) {
        let sa = compile(&a, &Capacities::default()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let sb = compile(&b, &Capacities::default()).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(sa.diff(&sb).is_empty(), sa == sb);
        prop_assert_eq!(sa.digest() == sb.digest(), sa == sb);
    }
}

/// The decision of one table (`class`, workload 0) for a flow's L4 word, read straight from
/// the state (longest prefix over the word).
fn table_decision(
    maps: &fw_compiler::mapstate::DirectionMaps,
    class: ClassId,
    word: u32,
) -> Option<fw_compiler::mapstate::L4Value> {
    (0..=32u8).rev().find_map(|len| {
        let bits = if len == 0 { 0 } else { word & (u32::MAX << (32 - u32::from(len))) };
        let key = L4Key { class, workload: WorkloadId::NONE, prefix_len: len, bits };
        maps.l4.get(&key).copied()
    })
}

/// The generator above reaches the cases the three tables exist for: a flow that both the
/// shared table (rules from `any`) and one of its address classes' tables decide, where each
/// side wins for some flows, and a flow that both the wide and the narrow class's tables
/// decide, where each layer wins for some flows. Also checks those flows against the
/// evaluator, so the counts are of flows that are decided right, not only reached.
#[test]
fn generated_policies_make_the_shared_and_class_tables_compete() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let (mut shared_wins, mut class_wins) = (0usize, 0usize);
    let (mut wide_wins, mut narrow_wins) = (0usize, 0usize);
    for _ in 0..150 {
        let (policy, flows) = policy_and_flows().new_tree(&mut runner).unwrap().current();
        let Ok(state) = compile(&policy, &Capacities::default()) else { continue };
        for flow in flows.iter().filter(|f| f.direction == Direction::Ingress) {
            let outcome = state.lookup(flow);
            assert_eq!(outcome, eval::evaluate(&policy, flow).outcome, "flow {flow:?}");
            let maps = &state.ingress;
            let classes = match flow.peer {
                IpAddr::V4(a) => (0..=32u8)
                    .rev()
                    .find_map(|l| maps.v4.get(&Ipv4Net::new(a, l).unwrap().trunc()).copied()),
                IpAddr::V6(a) => (0..=128u8)
                    .rev()
                    .find_map(|l| maps.v6.get(&Ipv6Net::new(a, l).unwrap().trunc()).copied()),
            };
            let word = match flow.proto {
                1 | 58 => l4_word(flow.proto, flow.icmp_type.map(u16::from)),
                _ => l4_word(flow.proto, flow.port),
            };
            let Some(classes) = classes else { continue };
            let rule = |d: Option<Decision>| match d {
                Some(Decision::Allow(r) | Decision::Deny(r)) => Some(r),
                _ => None,
            };
            let verdict = |class| rule(table_decision(maps, class, word).map(|v| v.verdict));
            let decided_by = |r: Option<fw_compiler::model::RuleId>| {
                r.is_some() && outcome.decided_by == fw_compiler::model::Decider::Rule(r.unwrap())
            };
            let (s, w, n) =
                (verdict(ClassId::SHARED), verdict(classes.wide), verdict(classes.narrow));
            if s.is_some() && (w.is_some() || n.is_some()) {
                if decided_by(s) {
                    shared_wins += 1;
                } else if decided_by(w) || decided_by(n) {
                    class_wins += 1;
                }
            }
            if w.is_some() && n.is_some() {
                if decided_by(w) {
                    wide_wins += 1;
                } else if decided_by(n) {
                    narrow_wins += 1;
                }
            }
        }
    }
    assert!(wide_wins > 0 && narrow_wins > 0, "wide {wide_wins}, narrow {narrow_wins}");
    assert!(shared_wins > 0 && class_wins > 0, "shared {shared_wins}, class {class_wins}");
}
