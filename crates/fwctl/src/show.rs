//! Human and JSON views of map states, test reports and explanations.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use fw_compiler::ast::{Direction, Proto};
use fw_compiler::mapstate::{Classes, Decision, DirectionMaps, MapState};
use fw_compiler::model::{Decider, Explanation, Flow, HostPolicy, Outcome, RuleId};
use fw_compiler::resolve::PolicySet;
use fw_compiler::testing::{self, TestReport};

/// `--proto`: a name, or any protocol number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoArg {
    Named(Proto),
    Number(u8),
}

impl ProtoArg {
    pub fn number(self) -> u8 {
        match self {
            ProtoArg::Named(p) => p.number().unwrap_or(255),
            ProtoArg::Number(n) => n,
        }
    }
}

pub fn parse_proto(s: &str) -> Result<ProtoArg> {
    Ok(match s {
        "tcp" => ProtoArg::Named(Proto::Tcp),
        "udp" => ProtoArg::Named(Proto::Udp),
        "icmp" => ProtoArg::Named(Proto::Icmp),
        "icmpv6" => ProtoArg::Named(Proto::Icmpv6),
        other => match other.parse::<u8>() {
            Ok(6) => ProtoArg::Named(Proto::Tcp),
            Ok(17) => ProtoArg::Named(Proto::Udp),
            Ok(1) => ProtoArg::Named(Proto::Icmp),
            Ok(58) => ProtoArg::Named(Proto::Icmpv6),
            Ok(n) => ProtoArg::Number(n),
            Err(_) => {
                bail!("unknown protocol {other:?}: use tcp, udp, icmp, icmpv6 or a number 0-255")
            }
        },
    })
}

pub fn parse_icmp(proto: ProtoArg, s: &str) -> Result<u8> {
    let ProtoArg::Named(p @ (Proto::Icmp | Proto::Icmpv6)) = proto else {
        bail!("--icmp needs --proto icmp or icmpv6");
    };
    if let Ok(n) = s.parse::<u8>() {
        return Ok(n);
    }
    match fw_compiler::lower::icmp_type_by_name(p, s) {
        Some(n) => Ok(n),
        None => bail!("unknown {} type {s:?}", p.as_str()),
    }
}

pub fn state_json(state: &MapState) -> Result<String> {
    let counts = counts(state);
    let value = serde_json::json!({
        "digest": state.digest(),
        "entries": counts.iter().map(|(k, n)| (k.to_string(), serde_json::Value::from(*n))).collect::<serde_json::Map<_, _>>(),
        "state": state,
    });
    Ok(serde_json::to_string_pretty(&value)?)
}

fn counts(state: &MapState) -> Vec<(&'static str, usize)> {
    vec![
        ("ingress_v4", state.ingress.v4.len()),
        ("ingress_v6", state.ingress.v6.len()),
        ("ingress_l4", state.ingress.l4.len()),
        ("egress_v4", state.egress.v4.len()),
        ("egress_v6", state.egress.v6.len()),
        ("egress_l4", state.egress.l4.len()),
        ("workloads", state.workloads.len()),
        ("rules", state.rules.len()),
    ]
}

/// How decisions name their rules (`policy/name`, `policy/#index`, or `#id` for an id the
/// state does not know), each written once: a large state repeats the same few rules in
/// hundreds of thousands of L4 entries.
struct RuleNames<'a> {
    state: &'a MapState,
    names: std::collections::HashMap<RuleId, String>,
}

impl<'a> RuleNames<'a> {
    fn new(state: &'a MapState) -> Self {
        Self { state, names: std::collections::HashMap::new() }
    }

    /// Appends `-`, `allow (RULE)` or `deny (RULE)`.
    fn write_decision(&mut self, out: &mut String, d: Decision) {
        let (verb, id) = match d {
            Decision::None => {
                out.push('-');
                return;
            }
            Decision::Allow(id) => ("allow", id),
            Decision::Deny(id) => ("deny", id),
        };
        let state = self.state;
        let name = self.names.entry(id).or_insert_with(|| {
            state.rules.get(&id).map_or_else(
                || format!("#{}", id.0),
                |r| match &r.name {
                    Some(n) => format!("{}/{}", r.policy, n),
                    None => format!("{}/#{}", r.policy, r.index),
                },
            )
        });
        out.push_str(verb);
        out.push_str(" (");
        out.push_str(name);
        out.push(')');
    }
}

pub fn state_table(state: &MapState) -> String {
    // The digest (a hash over the whole state's canonical JSON) is computed on a thread of its
    // own while the rest is written: both take a while on large states.
    let (digest, body) = std::thread::scope(|scope| {
        let digest = std::thread::Builder::new().spawn_scoped(scope, || state.digest()).ok();
        let body = state_table_body(state);
        let digest = match digest {
            Some(h) => h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => state.digest(),
        };
        (digest, body)
    });
    let mut out = String::with_capacity(body.len() + 128);
    let _ = writeln!(out, "host {} {:?}", state.host.name, state.host.labels);
    let _ = writeln!(out, "digest {digest}");
    out.push_str(&body);
    out
}

/// Everything after the digest line.
fn state_table_body(state: &MapState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nentries per map:");
    for (name, n) in counts(state) {
        let _ = writeln!(out, "  {name:<12} {n:>8}");
    }
    let _ = writeln!(out, "\nrules:");
    for (id, r) in &state.rules {
        let mode = if r.audit { " [audit]" } else { "" };
        let log = if r.log { " [log]" } else { "" };
        let _ = writeln!(
            out,
            "  {:>10}  {} {}{mode}{log}  ({})",
            id.0,
            r.direction.as_str(),
            r.summary,
            r.location
        );
    }
    if !state.workloads.is_empty() {
        let _ = writeln!(out, "\nworkloads:");
        for (path, id) in &state.workloads {
            let _ = writeln!(out, "  {:>10}  {path}", id.0);
        }
    }
    let mut names = RuleNames::new(state);
    for (dir, maps) in [(Direction::Ingress, &state.ingress), (Direction::Egress, &state.egress)] {
        direction_table(&mut out, &mut names, dir, maps);
    }
    out
}

/// One direction's maps. Rows are written straight into `out` (a large state has hundreds
/// of thousands of them), with what would be the same `format!` text.
fn direction_table(out: &mut String, names: &mut RuleNames, dir: Direction, maps: &DirectionMaps) {
    let _ = writeln!(
        out,
        "\n{}: default {} (audit: {})",
        dir.as_str(),
        maps.defaults.verdict.as_str(),
        maps.defaults.audit.as_str()
    );
    // Every address has a class in each layer (wide: rules on short prefixes; narrow: on
    // long ones); the kernel consults both classes' tables and the shared one.
    let _ = writeln!(out, "  prefixes -> wide class, narrow class:");
    // The prefix's text is padded, which its `Display` does not do: it goes through `net`.
    let mut net = String::new();
    let mut row = |out: &mut String, prefix: &dyn std::fmt::Display, c: &Classes| {
        net.clear();
        let _ = write!(net, "{prefix}");
        let _ = writeln!(out, "    {:<43} {:>10} {:>10}", net, c.wide.0, c.narrow.0);
    };
    for (prefix, classes) in &maps.v4 {
        row(out, prefix, classes);
    }
    for (prefix, classes) in &maps.v6 {
        row(out, prefix, classes);
    }
    let _ = writeln!(out, "  (class, workload, l4 prefix) -> decision:");
    for (key, value) in &maps.l4 {
        // Class 0 is the shared table (rules without an address restriction), consulted for
        // every address next to the address's two classes.
        if key.class == fw_compiler::mapstate::ClassId::SHARED {
            let _ = write!(out, "    {:>10} {:>6} ", "shared", key.workload.0);
        } else {
            let _ = write!(out, "    {:>10} {:>6} ", key.class.0, key.workload.0);
        }
        write_l4_prefix(out, key.bits, key.prefix_len);
        out.push_str("  ");
        names.write_decision(out, value.verdict);
        out.push_str("  audit: ");
        names.write_decision(out, value.audit);
        out.push('\n');
    }
}

/// `tcp/8000-8063`, `icmp/8`, `any`, `udp/no-port`, appended to `out`.
fn write_l4_prefix(out: &mut String, bits: u32, len: u8) {
    if len < 8 {
        if len == 0 {
            out.push_str("any");
        } else {
            let _ = write!(out, "proto {:#x}/{len}", bits >> 24);
        }
        return;
    }
    match (bits >> 24) as u8 {
        6 => out.push_str("tcp"),
        17 => out.push_str("udp"),
        1 => out.push_str("icmp"),
        58 => out.push_str("icmpv6"),
        n => {
            let _ = write!(out, "proto-{n}");
        }
    }
    let span: u64 = 1u64 << (32 - u32::from(len));
    let lo = u64::from(bits & 0x00ff_ffff);
    let hi = lo + span - 1;
    if lo == 0 && hi == 0xff_ffff {
        return;
    }
    if lo & 0x1_0000 != 0 {
        out.push_str("/no-port");
    } else if lo == hi {
        let _ = write!(out, "/{lo}");
    } else {
        let _ = write!(out, "/{lo}-{}", hi.min(0xffff));
    }
}

pub fn test_report(set: &PolicySet, report: &TestReport, verbose: bool) -> String {
    let mut out = String::new();
    let mut hosts = std::collections::BTreeMap::new();
    for case in &report.cases {
        let test = set.tests.iter().find(|t| t.metadata.name.value == case.test);
        let Some(test) = test else { continue };
        let host = fw_compiler::resolve::host_of_test(test);
        let policy = hosts.entry(host.clone()).or_insert_with(|| set.for_host(&host));
        let ok = case.passed();
        if ok && !verbose {
            continue;
        }
        let mark = if ok { "ok  " } else { "FAIL" };
        let _ = writeln!(
            out,
            "{mark} {} case {} ({}): expected {}, evaluator says {} by {}{}",
            case.test,
            case.index,
            case.location,
            case.expect.as_str(),
            case.evaluated.verdict.as_str(),
            testing::describe_decider(policy, case.direction, &case.evaluated),
            match &case.compiled {
                Some(c) if c == &case.evaluated => String::new(),
                Some(c) => format!(
                    "; compiled lookup says {} by {}",
                    c.verdict.as_str(),
                    testing::describe_decider(policy, case.direction, c)
                ),
                None => "; the host's policy did not compile".to_string(),
            }
        );
    }
    let _ = writeln!(
        out,
        "policy tests: {} passed, {} failed ({} tests)",
        report.passed(),
        report.failed(),
        set.tests.len()
    );
    out
}

pub fn explanation(
    policy: &HostPolicy,
    flow: &Flow,
    e: &Explanation,
    compiled: Option<&Outcome>,
) -> String {
    let mut out = String::new();
    let peer = match flow.direction {
        Direction::Ingress => format!("from {}", flow.peer),
        Direction::Egress => format!("to {}", flow.peer),
    };
    let _ = writeln!(out, "{} {} on host {}", flow.direction.as_str(), peer, policy.host.name);
    let _ = writeln!(out, "verdict: {}", e.outcome.verdict.as_str());
    let _ = writeln!(
        out,
        "decided by: {}",
        testing::describe_decider(policy, flow.direction, &e.outcome)
    );
    let others: Vec<_> =
        e.matched.iter().filter(|id| e.outcome.decided_by != Decider::Rule(**id)).collect();
    if others.is_empty() {
        let _ = writeln!(out, "other matching rules: none");
    } else {
        let _ = writeln!(out, "other matching rules:");
        for id in others {
            if let Some(r) = policy.rule(*id) {
                let mode = if r.enforcing() { "" } else { " [audit]" };
                let _ = writeln!(
                    out,
                    "  {} {}/{}{mode} ({})",
                    r.action.as_str(),
                    r.policy,
                    r.label(),
                    r.location
                );
            }
        }
    }
    match compiled {
        Some(c) if c == &e.outcome => {
            let _ = writeln!(out, "compiled map lookup: agrees");
        }
        Some(c) => {
            let _ = writeln!(
                out,
                "compiled map lookup: DISAGREES: {} by {}",
                c.verdict.as_str(),
                testing::describe_decider(policy, flow.direction, c)
            );
        }
        None => {
            let _ = writeln!(out, "compiled map lookup: the policy does not compile for this host");
        }
    }
    out
}
