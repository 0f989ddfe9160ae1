//! The differential check shared by the benchmark, the fuzz target and the no-panic test:
//! compile a host's policy, then hold the compiled lookup (`MapState::lookup`) against the
//! reference evaluator (`eval::evaluate`) on probe flows.
//!
//! Probe flows are derived from the policy itself, because that is where the two can disagree:
//! the first and last address of every prefix and the addresses just outside it, the ends of
//! every port range and the ports just outside, listed ICMP types and their neighbours, every
//! workload path with a child, a parent and a name-prefix sibling (`app` vs `app2`), plus the
//! cases of the input's PolicyTests and the always-allowed special flows. When the cross
//! product is larger than the budget, a fixed-seed sample is taken, so a run is reproducible.
//!
//! It lives under `benches/` next to the generator because the benchmark uses it to verify
//! every size it measures; the fuzz target and `tests/no_panic.rs` include it by path.

// Each user of this module (bench, fuzz target, tests) uses a different part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fw_compiler::ast::{Direction, Document};
use fw_compiler::diag::Code;
use fw_compiler::load::{self, Input, Loaded};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::{AddrTerm, Flow, FlowState, HostIdentity, HostPolicy, ResolvedRule};
use fw_compiler::yaml::ParseLimits;
use fw_compiler::{compile, eval, resolve};

/// What one check looked at, so callers can tell a vacuous run from a real one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// A policy set came out of loading (no errors).
    pub loaded: bool,
    /// Hosts compiled successfully.
    pub compiled: usize,
    /// Hosts whose compile stopped with a capacity error (allowed: not a bug).
    pub over_capacity: usize,
    /// Flows decided by both sides.
    pub flows: usize,
}

impl Stats {
    fn add(&mut self, other: Stats) {
        self.loaded |= other.loaded;
        self.compiled += other.compiled;
        self.over_capacity += other.over_capacity;
        self.flows += other.flows;
    }
}

/// How much work one check may do.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Probe flows per host.
    pub flows_per_host: usize,
    /// Hosts per policy set (the fixed hosts come first, then PolicyTest hosts, then hosts
    /// made up from selectors).
    pub hosts: usize,
    /// Also compile each host a second time and require the same state.
    pub determinism: bool,
}

impl Default for Budget {
    fn default() -> Self {
        Self { flows_per_host: 400, hosts: 8, determinism: true }
    }
}

/// Loads `bytes` as one policy file and, when it is a valid policy set, runs the differential
/// check. `Err` is a finding: a mismatch, a non-deterministic compile or an unexpected compile
/// error. Panics inside the compiler are the caller's to catch (the fuzzer reports them).
pub fn check_bytes(bytes: &[u8], budget: &Budget) -> Result<Stats, String> {
    let loaded = load::load([Input::new("input.yaml", bytes.to_vec())], &ParseLimits::default());
    check_loaded(&loaded, &Capacities::default(), budget)
}

/// The differential check over an already loaded policy set.
pub fn check_loaded(loaded: &Loaded, caps: &Capacities, budget: &Budget) -> Result<Stats, String> {
    let mut stats = Stats::default();
    // A policy set exactly when there is no error: a run with no error and no set would tell
    // the user "valid" and then compile nothing.
    if loaded.has_errors() != loaded.policy_set.is_none() {
        return Err(format!(
            "load: has_errors() is {} but policy_set is {}",
            loaded.has_errors(),
            if loaded.policy_set.is_some() { "Some" } else { "None" }
        ));
    }
    let Some(set) = &loaded.policy_set else {
        return Ok(stats);
    };
    stats.loaded = true;
    for host in hosts_of(loaded, budget.hosts) {
        let policy = set.for_host(&host);
        let extra: Vec<Flow> = set
            .tests
            .iter()
            .filter(|t| resolve::host_of_test(t) == host)
            .flat_map(|t| t.cases.iter().map(resolve::flow_of_case))
            .collect();
        let flows = probe_flows(&policy, &extra, budget.flows_per_host);
        stats.add(check_host(&policy, caps, &flows, budget.determinism)?);
    }
    Ok(stats)
}

/// Compiles one host and compares lookup with evaluation on `flows`.
pub fn check_host(
    policy: &HostPolicy,
    caps: &Capacities,
    flows: &[Flow],
    determinism: bool,
) -> Result<Stats, String> {
    let mut stats = Stats { loaded: true, ..Stats::default() };
    let state = match compile::compile(policy, caps) {
        Ok(state) => state,
        Err(diags)
            if !diags.is_empty() && diags.iter().all(|d| d.code == Code::CapacityExceeded) =>
        {
            stats.over_capacity += 1;
            return Ok(stats);
        }
        Err(diags) => {
            return Err(format!(
                "host {:?}: compile failed on a valid policy set: {diags:#?}",
                policy.host
            ));
        }
    };
    if determinism {
        match compile::compile(policy, caps) {
            Ok(again) if again == state => {}
            Ok(_) => {
                return Err(format!("host {:?}: two compiles gave different states", policy.host));
            }
            Err(d) => {
                return Err(format!("host {:?}: second compile failed: {d:#?}", policy.host));
            }
        }
    }
    stats.compiled += 1;
    stats.flows += compare(policy, &state, flows)?;
    Ok(stats)
}

/// `lookup == evaluate` for every flow; returns how many were compared.
pub fn compare(policy: &HostPolicy, state: &MapState, flows: &[Flow]) -> Result<usize, String> {
    for flow in flows {
        let want = eval::evaluate(policy, flow).outcome;
        let got = state.lookup(flow);
        if got != want {
            return Err(format!(
                "host {:?}: {flow:?}\n  compiled lookup: {got:?}\n  reference eval:  {want:?}",
                policy.host
            ));
        }
    }
    Ok(flows.len())
}

/// The hosts to compile a loaded set for: two fixed ones (no labels; a labelled web host),
/// the hosts of its PolicyTests, then hosts made up to match each policy's selector.
pub fn hosts_of(loaded: &Loaded, max: usize) -> Vec<HostIdentity> {
    let mut hosts = vec![
        HostIdentity::default(),
        HostIdentity {
            name: "web-1".into(),
            labels: [("role".to_string(), "web".to_string())].into_iter().collect(),
        },
    ];
    if let Some(set) = &loaded.policy_set {
        hosts.extend(set.tests.iter().map(resolve::host_of_test));
    }
    for doc in &loaded.documents {
        if let Document::Policy(p) = doc
            && let Some(sel) = &p.hosts
        {
            hosts.push(HostIdentity {
                name: sel.names.first().map_or_else(|| "host-1".to_string(), |g| name_matching(g)),
                labels: sel.labels.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect(),
            });
        }
    }
    let mut seen = BTreeSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    hosts.truncate(max);
    hosts
}

/// A name that a simple glob likely matches: `*` dropped, `?` and `[...]` replaced by one
/// plausible character. Only a heuristic for picking extra hosts; nothing depends on it.
fn name_matching(glob: &str) -> String {
    let mut out = String::new();
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {}
            '?' => out.push('x'),
            '[' => {
                let mut first = None;
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    if first.is_none() && c != '!' && c != '^' {
                        first = Some(c);
                    }
                }
                out.push(first.unwrap_or('x'));
            }
            c => out.push(c),
        }
    }
    out
}

/// SplitMix64, for sampling; kept local so this module stands alone.
struct Mix(u64);

impl Mix {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((u128::from(z) * n.max(1) as u128) >> 64) as usize
    }
}

/// Layer-4 part of a probe: protocol, port, ICMP type.
type L4 = (u8, Option<u16>, Option<u8>);

/// Probe flows for one host: boundary points of its rules, `extra` (PolicyTest cases), and the
/// always-allowed special cases. At most about `max` flows plus the extras.
pub fn probe_flows(policy: &HostPolicy, extra: &[Flow], max: usize) -> Vec<Flow> {
    let mut flows: Vec<Flow> = extra.to_vec();
    flows.extend(special_flows());
    let per_direction = max / 2;
    for direction in Direction::ALL {
        let rules: Vec<&ResolvedRule> = policy.rules(direction).collect();
        // Spread over the whole rule list (sorted by policy name) rather than its head.
        let sampled: Vec<&ResolvedRule> = if rules.len() <= 256 {
            rules
        } else {
            (0..256).filter_map(|i| rules.get(i * rules.len() / 256).copied()).collect()
        };

        let mut addrs: BTreeSet<IpAddr> = [
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
        ]
        .into_iter()
        .collect();
        let mut l4: BTreeSet<L4> = [
            (6, Some(443), None),
            (6, None, None),
            (17, Some(53), None),
            (17, Some(0), None),
            (6, Some(65535), None),
            (1, None, Some(8)),
            (58, None, Some(128)),
            (132, None, None),
        ]
        .into_iter()
        .collect();
        let mut workloads: BTreeSet<Option<String>> = [None].into_iter().collect();

        for rule in &sampled {
            let mut budget = 64;
            for term in &rule.peers {
                term_points(term, &mut addrs, &mut budget);
            }
            rule_l4(rule, &mut l4);
            for w in rule.workloads.iter().take(4) {
                workloads.insert(Some(w.clone()));
                workloads.insert(Some(format!("{w}/child")));
                workloads.insert(Some(format!("{w}x")));
                if let Some((parent, _)) = w.rsplit_once('/') {
                    workloads.insert(Some(parent.to_string()));
                }
            }
        }
        if direction == Direction::Ingress {
            workloads = [None].into_iter().collect();
        }

        let addrs: Vec<IpAddr> = addrs.into_iter().collect();
        let l4: Vec<L4> = l4.into_iter().collect();
        let workloads: Vec<Option<String>> = workloads.into_iter().collect();
        let product = addrs.len() * l4.len() * workloads.len();
        let make = |a: usize, p: usize, w: usize| {
            let (proto, port, icmp_type) = l4[p];
            Flow {
                port,
                icmp_type,
                workload: workloads[w].clone(),
                ..Flow::new(direction, addrs[a], proto)
            }
        };
        if product <= per_direction {
            for a in 0..addrs.len() {
                for p in 0..l4.len() {
                    for w in 0..workloads.len() {
                        flows.push(make(a, p, w));
                    }
                }
            }
        } else {
            let mut mix = Mix(0x0dd5_eed5 ^ product as u64);
            // Every address and every L4 point at least once, then random combinations.
            for a in 0..addrs.len().min(per_direction / 3) {
                flows.push(make(a, mix.below(l4.len()), mix.below(workloads.len())));
            }
            for p in 0..l4.len().min(per_direction / 3) {
                flows.push(make(mix.below(addrs.len()), p, mix.below(workloads.len())));
            }
            for _ in 0..per_direction / 3 {
                flows.push(make(
                    mix.below(addrs.len()),
                    mix.below(l4.len()),
                    mix.below(workloads.len()),
                ));
            }
        }
    }
    flows
}

/// First and last address of each prefix and the addresses just outside, walking into sets
/// (addresses and excepts) until `budget` prefixes have been visited.
fn term_points(term: &AddrTerm, out: &mut BTreeSet<IpAddr>, budget: &mut usize) {
    if *budget == 0 {
        return;
    }
    match term {
        AddrTerm::Any => {
            out.insert(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
            out.insert(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)));
        }
        AddrTerm::Net(net) => {
            *budget -= 1;
            let (first, last) = (net.network(), net.broadcast());
            out.insert(first);
            out.insert(last);
            match (first, last) {
                (IpAddr::V4(f), IpAddr::V4(l)) => {
                    if let Some(b) = u32::from(f).checked_sub(1) {
                        out.insert(IpAddr::V4(b.into()));
                    }
                    if let Some(a) = u32::from(l).checked_add(1) {
                        out.insert(IpAddr::V4(a.into()));
                    }
                }
                (IpAddr::V6(f), IpAddr::V6(l)) => {
                    if let Some(b) = u128::from(f).checked_sub(1) {
                        out.insert(IpAddr::V6(b.into()));
                    }
                    if let Some(a) = u128::from(l).checked_add(1) {
                        out.insert(IpAddr::V6(a.into()));
                    }
                }
                _ => {}
            }
        }
        AddrTerm::Set(set) => {
            for t in set.addresses.iter().chain(&set.except) {
                term_points(t, out, budget);
            }
        }
    }
}

/// The L4 points where a rule's match starts and stops.
fn rule_l4(rule: &ResolvedRule, out: &mut BTreeSet<L4>) {
    let protos: &[u8] = match rule.proto.number() {
        Some(n) => &[n],
        None => &[6, 17, 1, 58, 47],
    };
    for &proto in protos {
        out.insert((proto, None, None));
        match proto {
            6 | 17 => {
                for r in rule.ports.iter().take(8) {
                    out.insert((proto, Some(r.start), None));
                    out.insert((proto, Some(r.end), None));
                    if let Some(p) = r.start.checked_sub(1) {
                        out.insert((proto, Some(p), None));
                    }
                    if let Some(p) = r.end.checked_add(1) {
                        out.insert((proto, Some(p), None));
                    }
                }
                if rule.ports.is_empty() {
                    out.insert((proto, Some(1), None));
                }
            }
            1 | 58 => {
                for &t in rule.icmp.iter().take(8) {
                    out.insert((proto, None, Some(t)));
                    out.insert((proto, None, Some(t.wrapping_add(1))));
                }
                if rule.icmp.is_empty() {
                    out.insert((proto, None, Some(13)));
                }
            }
            _ => {}
        }
    }
}

/// The always-allowed cases and their near misses: loopback, replies, related ICMP errors
/// (and a related non-error), ARP, neighbour discovery, a NEW ICMP error.
fn special_flows() -> Vec<Flow> {
    let v4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xabcd, 0, 0, 0, 0, 5));
    let mut out = Vec::new();
    for direction in Direction::ALL {
        out.push(Flow {
            port: Some(22),
            ..Flow::new(direction, IpAddr::V4(Ipv4Addr::LOCALHOST), 6)
        });
        out.push(Flow {
            port: Some(22),
            ..Flow::new(direction, IpAddr::V6(Ipv6Addr::LOCALHOST), 6)
        });
        out.push(Flow { port: Some(8080), loopback: true, ..Flow::new(direction, v4, 6) });
        out.push(Flow { port: Some(5555), state: FlowState::Reply, ..Flow::new(direction, v4, 6) });
        out.push(Flow {
            icmp_type: Some(3),
            state: FlowState::Related,
            ..Flow::new(direction, v4, 1)
        });
        out.push(Flow {
            icmp_type: Some(8),
            state: FlowState::Related,
            ..Flow::new(direction, v4, 1)
        });
        out.push(Flow {
            icmp_type: Some(2),
            state: FlowState::Related,
            ..Flow::new(direction, v6, 58)
        });
        out.push(Flow { icmp_type: Some(3), ..Flow::new(direction, v4, 1) });
        out.push(Flow { arp: true, ..Flow::new(direction, v4, 0) });
        out.push(Flow { icmp_type: Some(135), ..Flow::new(direction, v6, 58) });
        out.push(Flow { icmp_type: Some(138), ..Flow::new(direction, v6, 58) });
    }
    out
}
