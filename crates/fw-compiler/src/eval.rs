//! The reference evaluator: the semantics of fw/v1, written as plainly as possible.
//!
//! This module is the yardstick, not the fast path. It checks every rule of the host against
//! the flow one by one and applies the verdict rules literally, so a reader can hold it against
//! the semantics in the docs line by line. The compiler (`compile`, `mapstate::lookup`) and the
//! kernel programs are tested against it; for that to mean anything this code shares no
//! matching logic with them and takes no shortcuts (no indexes, no precomputed classes).
//!
//! The semantics, for one host and one direction:
//! 1. always-allowed traffic (`model::always_allowed`) passes, and the policy is not consulted;
//! 2. real verdict: the first matching enforcing deny rule, else the first matching enforcing
//!    allow rule, else the direction's default (`DirectionDefault::verdict`);
//! 3. hypothetical verdict: the same over all matching rules, enforcing and audit, with the
//!    audit default (`DirectionDefault::audit`);
//! 4. real deny -> deny; else hypothetical deny -> audit-deny, decided by the rule or default
//!    that would have denied; else allow.
//!
//! "First" is the order of `HostPolicy::rules`: (policy name, direction, index).

use crate::ast::{Action, Proto};
use crate::model::{
    Decider, Explanation, Flow, HostPolicy, Outcome, ResolvedRule, Verdict, always_allowed,
};

/// Decides one flow for one host, and lists every rule that matched it.
pub fn evaluate(policy: &HostPolicy, flow: &Flow) -> Explanation {
    // Rule 5 of the semantics: some traffic passes whatever the policy says. The policy is not
    // consulted, so nothing is listed as matched (for ARP, peer and protocol mean nothing).
    if let Some(reason) = always_allowed(flow) {
        return Explanation {
            outcome: Outcome { verdict: Verdict::Allow, decided_by: Decider::Always(reason) },
            matched: Vec::new(),
        };
    }

    let matching: Vec<&ResolvedRule> =
        policy.rules(flow.direction).filter(|r| rule_matches(r, flow)).collect();
    let default = policy.default_for(flow.direction);

    let enforcing = matching.iter().copied().filter(|r| r.enforcing());
    let (real, real_by) = decide(enforcing, default.verdict);
    let (hypothetical, hypothetical_by) = decide(matching.iter().copied(), default.audit);

    let outcome = if real == Action::Deny {
        Outcome { verdict: Verdict::Deny, decided_by: real_by }
    } else if hypothetical == Action::Deny {
        Outcome { verdict: Verdict::AuditDeny, decided_by: hypothetical_by }
    } else {
        Outcome { verdict: Verdict::Allow, decided_by: real_by }
    };
    Explanation { outcome, matched: matching.iter().map(|r| r.id).collect() }
}

/// Deny beats allow beats the default; among rules of one action the first (in the order given)
/// decides.
fn decide<'a>(
    rules: impl Iterator<Item = &'a ResolvedRule> + Clone,
    default: Action,
) -> (Action, Decider) {
    for wanted in [Action::Deny, Action::Allow] {
        if let Some(rule) = rules.clone().find(|r| r.action == wanted) {
            return (wanted, Decider::Rule(rule.id));
        }
    }
    (default, Decider::Default)
}

/// Whether a rule matches a flow: every condition of the rule holds. Conditions left empty in
/// the rule (ports, icmp types, workloads) hold for everything.
pub fn rule_matches(rule: &ResolvedRule, flow: &Flow) -> bool {
    rule.direction == flow.direction
        && peer_matches(rule, flow)
        && proto_matches(rule.proto, flow.proto)
        && port_matches(rule, flow)
        && icmp_matches(rule, flow)
        && workload_matches(rule, flow)
}

/// Any term contains the peer. An empty list has no term, so it matches nothing (an absent
/// `from`/`to` is resolved to `[Any]`, not to an empty list).
fn peer_matches(rule: &ResolvedRule, flow: &Flow) -> bool {
    rule.peers.iter().any(|t| t.contains(flow.peer))
}

fn proto_matches(rule: Proto, flow: u8) -> bool {
    match rule.number() {
        None => true, // Proto::Any
        Some(n) => n == flow,
    }
}

/// No ports: every port, and also packets that carry none. Otherwise the flow's destination
/// port must be inside one of the ranges; a flow without a port (a non-first fragment) does
/// not match.
fn port_matches(rule: &ResolvedRule, flow: &Flow) -> bool {
    if rule.ports.is_empty() {
        return true;
    }
    match flow.port {
        Some(port) => rule.ports.iter().any(|r| r.start <= port && port <= r.end),
        None => false,
    }
}

/// No types: every type. Otherwise the flow's ICMP type must be listed. (That an icmp rule
/// only sees protocol 1 and an icmpv6 rule only 58 is `proto_matches`'s job.)
fn icmp_matches(rule: &ResolvedRule, flow: &Flow) -> bool {
    if rule.icmp.is_empty() {
        return true;
    }
    flow.icmp_type.is_some_and(|t| rule.icmp.contains(&t))
}

/// No workloads: every process. Otherwise the flow's cgroup must be one of the paths or below
/// one; a process in the root cgroup (`None`) is below none of them.
fn workload_matches(rule: &ResolvedRule, flow: &Flow) -> bool {
    if rule.workloads.is_empty() {
        return true;
    }
    match &flow.workload {
        Some(path) => rule.workloads.iter().any(|w| is_within(path, w)),
        None => false,
    }
}

/// `path` is `ancestor` or a descendant of it, on path segment boundaries:
/// `a/b` is within `a` but `ab` is not.
fn is_within(path: &str, ancestor: &str) -> bool {
    match path.strip_prefix(ancestor) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    //! A Cilium-style truth table: small hand-written host policies and flows with the verdict
    //! and deciding rule written out, so each semantic rule has a case that fails if it breaks.

    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;
    use crate::ast::{Direction, Mode, PortRange};
    use crate::model::{
        AddrTerm, AlwaysAllowed, DirectionDefault, FlowState, HostIdentity, ResolvedSet, RuleId,
    };
    use crate::source::{Location, Span};

    const IN: Direction = Direction::Ingress;
    const OUT: Direction = Direction::Egress;
    const ENF: Mode = Mode::Enforce;
    const AUD: Mode = Mode::Audit;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> AddrTerm {
        AddrTerm::Net(s.parse().unwrap())
    }

    /// A rule that matches everything in its direction; tests narrow it.
    fn rule(
        id: u32,
        policy: &str,
        dir: Direction,
        index: u32,
        action: Action,
        mode: Mode,
    ) -> ResolvedRule {
        ResolvedRule {
            id: RuleId(id),
            direction: dir,
            policy: policy.into(),
            index,
            name: None,
            action,
            mode,
            log: false,
            peers: vec![AddrTerm::Any],
            proto: Proto::Any,
            ports: vec![],
            icmp: vec![],
            workloads: vec![],
            span: Span::default(),
            location: Location { file: "t.yaml".into(), line: 1, column: 1 },
        }
    }

    fn allow(id: u32, policy: &str, index: u32) -> ResolvedRule {
        rule(id, policy, IN, index, Action::Allow, ENF)
    }

    fn deny(id: u32, policy: &str, index: u32) -> ResolvedRule {
        rule(id, policy, IN, index, Action::Deny, ENF)
    }

    fn audit(mut r: ResolvedRule) -> ResolvedRule {
        r.mode = AUD;
        r
    }

    fn def(verdict: Action, audit: Action) -> DirectionDefault {
        DirectionDefault { verdict, audit, verdict_policy: None, audit_policy: None }
    }

    /// Rules are sorted the way `resolve` sorts them.
    fn host(
        mut rules: Vec<ResolvedRule>,
        ingress: DirectionDefault,
        egress: DirectionDefault,
    ) -> HostPolicy {
        rules.sort_by(|a, b| {
            (&a.policy, a.direction, a.index).cmp(&(&b.policy, b.direction, b.index))
        });
        HostPolicy {
            host: HostIdentity::default(),
            rules,
            ingress_default: ingress,
            egress_default: egress,
            policies: vec![],
        }
    }

    fn open(rules: Vec<ResolvedRule>) -> HostPolicy {
        host(rules, DirectionDefault::default(), DirectionDefault::default())
    }

    fn tcp_in(peer: &str, port: u16) -> Flow {
        Flow { port: Some(port), ..Flow::new(IN, ip(peer), 6) }
    }

    fn verdict(p: &HostPolicy, f: &Flow) -> (Verdict, Decider) {
        let o = evaluate(p, f).outcome;
        (o.verdict, o.decided_by)
    }

    #[test]
    fn no_rules_gives_the_default() {
        let f = tcp_in("192.0.2.1", 22);
        assert_eq!(verdict(&open(vec![]), &f), (Verdict::Allow, Decider::Default));
        let closed = host(vec![], def(Action::Deny, Action::Deny), DirectionDefault::default());
        assert_eq!(verdict(&closed, &f), (Verdict::Deny, Decider::Default));
        // The egress default does not apply to ingress.
        let egress_closed =
            host(vec![], DirectionDefault::default(), def(Action::Deny, Action::Deny));
        assert_eq!(verdict(&egress_closed, &f), (Verdict::Allow, Decider::Default));
    }

    #[test]
    fn deny_beats_allow_whatever_the_order() {
        let f = tcp_in("192.0.2.1", 22);
        // Allow first in the same policy, deny later.
        let p = open(vec![allow(1, "a", 0), deny(2, "a", 1)]);
        assert_eq!(verdict(&p, &f), (Verdict::Deny, Decider::Rule(RuleId(2))));
        // Deny in a policy sorted after the allowing one.
        let p = open(vec![allow(1, "a", 0), deny(2, "z", 0)]);
        assert_eq!(verdict(&p, &f), (Verdict::Deny, Decider::Rule(RuleId(2))));
        // And before it.
        let p = open(vec![deny(2, "a", 0), allow(1, "z", 0)]);
        assert_eq!(verdict(&p, &f), (Verdict::Deny, Decider::Rule(RuleId(2))));
    }

    #[test]
    fn allow_beats_default_deny() {
        let f = tcp_in("192.0.2.1", 22);
        let p = host(
            vec![allow(1, "a", 0)],
            def(Action::Deny, Action::Deny),
            DirectionDefault::default(),
        );
        assert_eq!(verdict(&p, &f), (Verdict::Allow, Decider::Rule(RuleId(1))));
    }

    #[test]
    fn audit_default_deny_gives_audit_deny_only_without_rules() {
        // An audit policy sets ingress deny: the real default stays allow.
        let d = def(Action::Allow, Action::Deny);
        let f = tcp_in("192.0.2.1", 22);
        assert_eq!(
            verdict(&host(vec![], d.clone(), def(Action::Allow, Action::Allow)), &f),
            (Verdict::AuditDeny, Decider::Default)
        );
        // A matching enforcing allow keeps it a plain allow (hypothetically it allows too).
        let p = host(vec![allow(1, "a", 0)], d.clone(), DirectionDefault::default());
        assert_eq!(verdict(&p, &f), (Verdict::Allow, Decider::Rule(RuleId(1))));
        // So does a matching audit allow.
        let p = host(vec![audit(allow(1, "a", 0))], d, DirectionDefault::default());
        assert_eq!(verdict(&p, &f), (Verdict::Allow, Decider::Default));
    }

    #[test]
    fn audit_deny_rule_gives_audit_deny() {
        let f = tcp_in("192.0.2.1", 22);
        let p = open(vec![allow(1, "a", 0), audit(deny(2, "b", 0))]);
        assert_eq!(verdict(&p, &f), (Verdict::AuditDeny, Decider::Rule(RuleId(2))));
        // With nothing else: real allow by default, audit deny by the rule.
        let p = open(vec![audit(deny(2, "b", 0))]);
        assert_eq!(verdict(&p, &f), (Verdict::AuditDeny, Decider::Rule(RuleId(2))));
        // An enforcing deny wins over the audit one and names itself.
        let p = open(vec![audit(deny(2, "a", 0)), deny(3, "b", 0)]);
        assert_eq!(verdict(&p, &f), (Verdict::Deny, Decider::Rule(RuleId(3))));
    }

    #[test]
    fn audit_allow_does_not_allow_under_enforcing_default_deny() {
        let f = tcp_in("192.0.2.1", 22);
        let p = host(
            vec![audit(allow(1, "a", 0))],
            def(Action::Deny, Action::Deny),
            DirectionDefault::default(),
        );
        assert_eq!(verdict(&p, &f), (Verdict::Deny, Decider::Default));
        let e = evaluate(&p, &f);
        assert_eq!(e.matched, vec![RuleId(1)]);
    }

    #[test]
    fn deciding_rule_is_first_by_policy_name_then_index() {
        let f = tcp_in("192.0.2.1", 22);
        // Given out of order; the host sorts by (policy, direction, index).
        let p = open(vec![deny(30, "b", 0), deny(20, "a", 5), deny(10, "a", 3)]);
        assert_eq!(verdict(&p, &f), (Verdict::Deny, Decider::Rule(RuleId(10))));
        assert_eq!(evaluate(&p, &f).matched, vec![RuleId(10), RuleId(20), RuleId(30)]);
        let p = open(vec![allow(30, "b", 0), allow(20, "a", 1)]);
        assert_eq!(verdict(&p, &f), (Verdict::Allow, Decider::Rule(RuleId(20))));
        // The hypothetical decider follows the same order.
        let p = open(vec![audit(deny(30, "b", 0)), audit(deny(20, "a", 1))]);
        assert_eq!(verdict(&p, &f), (Verdict::AuditDeny, Decider::Rule(RuleId(20))));
    }

    #[test]
    fn rules_of_the_other_direction_do_not_count() {
        let f = tcp_in("192.0.2.1", 22);
        let p = open(vec![rule(1, "a", OUT, 0, Action::Deny, ENF)]);
        assert_eq!(verdict(&p, &f), (Verdict::Allow, Decider::Default));
        assert!(evaluate(&p, &f).matched.is_empty());
    }

    #[test]
    fn peers() {
        let mut r = deny(1, "a", 0);
        r.peers = vec![net("192.0.2.0/24"), net("2001:db8::/32")];
        assert!(rule_matches(&r, &tcp_in("192.0.2.200", 1)));
        assert!(rule_matches(&r, &tcp_in("2001:db8::1", 1)));
        assert!(!rule_matches(&r, &tcp_in("192.0.3.1", 1)));
        // An empty list matches nothing.
        r.peers = vec![];
        assert!(!rule_matches(&r, &tcp_in("192.0.2.1", 1)));
        // A set with an except.
        let set = ResolvedSet {
            name: "s".into(),
            addresses: vec![net("10.0.0.0/8")],
            except: vec![net("10.1.0.0/16")],
        };
        r.peers = vec![AddrTerm::Set(Arc::new(set))];
        assert!(rule_matches(&r, &tcp_in("10.2.0.1", 1)));
        assert!(!rule_matches(&r, &tcp_in("10.1.0.1", 1)));
    }

    #[test]
    fn protocols_ports_and_any() {
        let mut r = deny(1, "a", 0);
        // proto any, no ports: every protocol, with or without a port.
        for proto in [0, 1, 6, 17, 47, 58, 255] {
            assert!(rule_matches(&r, &Flow::new(IN, ip("192.0.2.1"), proto)), "proto {proto}");
        }
        r.proto = Proto::Tcp;
        assert!(rule_matches(&r, &tcp_in("192.0.2.1", 22)));
        assert!(!rule_matches(&r, &Flow { port: Some(22), ..Flow::new(IN, ip("192.0.2.1"), 17) }));
        r.ports = vec![PortRange { start: 80, end: 80 }, PortRange { start: 8000, end: 8100 }];
        assert!(rule_matches(&r, &tcp_in("192.0.2.1", 80)));
        assert!(rule_matches(&r, &tcp_in("192.0.2.1", 8000)));
        assert!(rule_matches(&r, &tcp_in("192.0.2.1", 8100)));
        assert!(!rule_matches(&r, &tcp_in("192.0.2.1", 8101)));
        assert!(!rule_matches(&r, &tcp_in("192.0.2.1", 81)));
    }

    #[test]
    fn a_flow_without_a_port_matches_only_rules_without_ports() {
        let fragment = Flow::new(IN, ip("192.0.2.1"), 6);
        let mut r = deny(1, "a", 0);
        r.proto = Proto::Tcp;
        assert!(rule_matches(&r, &fragment));
        r.ports = vec![PortRange { start: 0, end: 65535 }];
        assert!(!rule_matches(&r, &fragment));
        // End to end: the port rule does not catch the fragment, the default decides.
        let p = host(vec![r], def(Action::Allow, Action::Allow), DirectionDefault::default());
        assert_eq!(verdict(&p, &fragment), (Verdict::Allow, Decider::Default));
    }

    #[test]
    fn icmp_types() {
        let echo = |proto, t| Flow { icmp_type: Some(t), ..Flow::new(IN, ip("192.0.2.1"), proto) };
        let mut r = allow(1, "a", 0);
        r.proto = Proto::Icmp;
        // No types: every type, but only ICMP.
        assert!(rule_matches(&r, &echo(1, 8)));
        assert!(rule_matches(&r, &echo(1, 0)));
        assert!(!rule_matches(&r, &echo(58, 128)));
        r.icmp = vec![8];
        assert!(rule_matches(&r, &echo(1, 8)));
        assert!(!rule_matches(&r, &echo(1, 13)));
        assert!(!rule_matches(&r, &Flow::new(IN, ip("192.0.2.1"), 1)));
        // icmpv6 rules see only protocol 58, even with the same type number.
        r.proto = Proto::Icmpv6;
        assert!(!rule_matches(&r, &echo(1, 8)));
        r.icmp = vec![128];
        assert!(rule_matches(&r, &echo(58, 128)));
    }

    #[test]
    fn nested_workloads() {
        let flow = |w: Option<&str>| Flow {
            workload: w.map(String::from),
            port: Some(5432),
            ..Flow::new(OUT, ip("10.0.5.3"), 6)
        };
        let mut r = rule(1, "a", OUT, 0, Action::Allow, ENF);
        assert!(rule_matches(&r, &flow(None)), "no workloads = every process");
        r.workloads = vec!["system.slice/app.service".into()];
        assert!(rule_matches(&r, &flow(Some("system.slice/app.service"))));
        assert!(rule_matches(&r, &flow(Some("system.slice/app.service/worker/1"))));
        assert!(!rule_matches(&r, &flow(Some("system.slice/app.service2"))));
        assert!(!rule_matches(&r, &flow(Some("system.slice"))));
        assert!(!rule_matches(&r, &flow(None)), "the root cgroup is below no path");

        // A deny for a child cgroup beats an allow for the parent.
        let mut child = rule(2, "z", OUT, 0, Action::Deny, ENF);
        child.workloads = vec!["system.slice/app.service/untrusted".into()];
        let p = host(vec![r, child], DirectionDefault::default(), def(Action::Deny, Action::Deny));
        assert_eq!(
            verdict(&p, &flow(Some("system.slice/app.service/untrusted/x"))),
            (Verdict::Deny, Decider::Rule(RuleId(2)))
        );
        assert_eq!(
            verdict(&p, &flow(Some("system.slice/app.service/ok"))),
            (Verdict::Allow, Decider::Rule(RuleId(1)))
        );
        assert_eq!(verdict(&p, &flow(Some("user.slice"))), (Verdict::Deny, Decider::Default));
    }

    #[test]
    fn always_allowed_ignores_the_policy() {
        let p = host(
            vec![deny(1, "a", 0), rule(2, "a", OUT, 0, Action::Deny, ENF)],
            def(Action::Deny, Action::Deny),
            def(Action::Deny, Action::Deny),
        );
        let cases = [
            (Flow::new(IN, ip("127.0.0.1"), 6), AlwaysAllowed::Loopback),
            (Flow::new(OUT, ip("::1"), 17), AlwaysAllowed::Loopback),
            (Flow { loopback: true, ..Flow::new(IN, ip("192.0.2.1"), 6) }, AlwaysAllowed::Loopback),
            (Flow { state: FlowState::Reply, ..tcp_in("192.0.2.1", 40000) }, AlwaysAllowed::Reply),
            (
                Flow {
                    state: FlowState::Related,
                    icmp_type: Some(3),
                    ..Flow::new(IN, ip("192.0.2.1"), 1)
                },
                AlwaysAllowed::RelatedIcmpError,
            ),
            (Flow { arp: true, ..Flow::new(IN, ip("192.0.2.1"), 0) }, AlwaysAllowed::Arp),
            (
                Flow { icmp_type: Some(135), ..Flow::new(IN, ip("fe80::1"), 58) },
                AlwaysAllowed::NeighbourDiscovery,
            ),
        ];
        for (flow, reason) in cases {
            let e = evaluate(&p, &flow);
            assert_eq!(
                e.outcome,
                Outcome { verdict: Verdict::Allow, decided_by: Decider::Always(reason) },
                "{flow:?}"
            );
            assert!(e.matched.is_empty());
        }
        // Not always allowed: a related packet that is not an ICMP error, a reply on egress.
        let not = [
            Flow {
                state: FlowState::Related,
                icmp_type: Some(8),
                ..Flow::new(IN, ip("192.0.2.1"), 1)
            },
            Flow { state: FlowState::Reply, ..Flow::new(OUT, ip("192.0.2.1"), 6) },
        ];
        for flow in not {
            assert_eq!(evaluate(&p, &flow).outcome.verdict, Verdict::Deny, "{flow:?}");
        }
    }

    #[test]
    fn matched_lists_enforcing_and_audit_rules_in_order() {
        let mut miss = allow(4, "c", 0);
        miss.proto = Proto::Udp;
        let p = open(vec![audit(allow(3, "b", 1)), miss, deny(1, "a", 0), allow(2, "b", 0)]);
        let e = evaluate(&p, &tcp_in("192.0.2.1", 22));
        assert_eq!(e.matched, vec![RuleId(1), RuleId(2), RuleId(3)]);
        assert_eq!(e.outcome.decided_by, Decider::Rule(RuleId(1)));
    }

    #[test]
    fn is_within_respects_segments() {
        assert!(is_within("a/b", "a"));
        assert!(is_within("a", "a"));
        assert!(!is_within("ab", "a"));
        assert!(!is_within("a", "a/b"));
    }
}
