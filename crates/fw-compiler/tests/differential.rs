//! The compiled lookup against the reference evaluator, on random host policies.
//!
//! Policies come from `fw_compiler::random_policies` (built directly as `HostPolicy` values,
//! so every shape the compiler can meet is reachable), here with egress workloads on nested
//! cgroup paths and rules in both directions alike. Flows are drawn near what the policy
//! mentions: prefix boundaries and one past them, port range bounds and their neighbours, no
//! port, workloads at, below and beside rule paths. For each policy: the lookup agrees with `eval::evaluate` on every flow, compile
//! is deterministic, the state has the structure the data plane relies on (a /0 root) and no
//! redundant L4 entries, and encode/decode round-trips.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fw_compiler::ast::{Action, Direction};
use fw_compiler::compile::{CompileMemo, compile, compile_reusing};
use fw_compiler::encode::{DecodedMaps, decode, encode, validate};
use fw_compiler::eval;
use fw_compiler::mapstate::{
    Capacities, ClassId, Decision, L4Key, L4Value, MapState, WorkloadId, l4_word,
};
use fw_compiler::model::{Flow, FlowState, HostPolicy};
use fw_compiler::random_policies::{
    self, Universe, V4_BASE, V6_BASE, candidate_peers, candidate_ports,
};
use ipnet::{Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::select;

const RULE_PATHS: [&str; 5] = ["a", "a/b", "a/b/c", "x/y", "a/bc"];
const FLOW_PATHS: [&str; 9] = ["a", "a/b", "a/b/c", "a/b/c/d", "a/bc", "a/bcd", "x", "x/y/z", "z"];
const ICMP_TYPES: [u8; 8] = [0, 1, 3, 8, 11, 128, 129, 135];

/// The policies of these properties: both directions alike, nested cgroup paths.
const UNIVERSE: Universe = Universe {
    more_wide: &[],
    icmp_types: &ICMP_TYPES,
    rule_paths: &RULE_PATHS,
    ingress_per_egress: 1,
};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(300)
}

fn host_policy() -> impl Strategy<Value = HostPolicy> {
    random_policies::host_policy(UNIVERSE)
}

// --- flow generation -------------------------------------------------------------------------

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
        let peers = candidate_peers(&p, &[]);
        let flows = prop::collection::vec(flow(peers, candidate_ports(&p)), 1..48);
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
