//! The compiled lookup, modelled in user space: what the kernel programs will do with the maps.
//!
//! This is deliberately written the way the data plane works, not the way the evaluator
//! thinks: longest-prefix match is a probe of every prefix length from the longest down (as an
//! LPM trie answers it), the workload is found by walking the process's cgroup path from the
//! deepest ancestor up, and the decision comes from three L4 entries (the shared table's, and
//! those of the address's wide and narrow classes), combined by action and rank as the kernel
//! combines them. It shares nothing with
//! `eval` except `model::always_allowed`, which is protocol necessity rather than policy, so a
//! differential test between the two checks the compiler and this precedence, not a common
//! helper. The precedence is the one documented at the top of `mapstate`.

use std::net::IpAddr;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::ast::{Action, Direction};
use crate::mapstate::{ClassId, Decision, L4Key, L4Value, MapState, WorkloadId, l4_word};
use crate::model::{Decider, Flow, Outcome, Verdict, always_allowed};

impl MapState {
    /// Decides one flow from the map state alone.
    pub fn lookup(&self, flow: &Flow) -> Outcome {
        // 1. Always-allowed traffic never reaches the tables.
        if let Some(reason) = always_allowed(flow) {
            return Outcome { verdict: Verdict::Allow, decided_by: Decider::Always(reason) };
        }
        let maps = self.direction(flow.direction);

        // 2. Address classes, one per layer. The /0 entry is always compiled in; a hand-made
        // state without one behaves like the kernel on a miss: no entries, so the defaults
        // decide.
        let classes = match flow.peer {
            IpAddr::V4(a) => (0..=32u8).rev().find_map(|len| {
                Ipv4Net::new(a, len).ok().and_then(|n| maps.v4.get(&n.trunc()).copied())
            }),
            IpAddr::V6(a) => (0..=128u8).rev().find_map(|len| {
                Ipv6Net::new(a, len).ok().and_then(|n| maps.v6.get(&n.trunc()).copied())
            }),
        };

        // 3. Workload class (egress only): the deepest path of the cgroup or its ancestors that
        // is in the table.
        let workload = match (flow.direction, &flow.workload) {
            (Direction::Egress, Some(path)) => {
                let mut candidate = Some(path.as_str());
                let mut found = WorkloadId::NONE;
                while let Some(p) = candidate {
                    if let Some(&id) = self.workloads.get(p) {
                        found = id;
                        break;
                    }
                    candidate = p.rfind('/').and_then(|i| p.get(..i));
                }
                found
            }
            _ => WorkloadId::NONE,
        };

        // 4. Three L4 entries, each (table, workload) first, then (table, 0): the shared table
        // (rules without an address restriction, consulted even when the address has no
        // class) and the address's class in each layer.
        let word = match flow.proto {
            1 | 58 => l4_word(flow.proto, flow.icmp_type.map(u16::from)),
            _ => l4_word(flow.proto, flow.port),
        };
        let none = L4Value { verdict: Decision::None, audit: Decision::None };
        let entry_of = |table: ClassId| {
            let probe = |workload: WorkloadId| l4_longest(maps, table, workload, word);
            probe(workload)
                .or_else(
                    || if workload == WorkloadId::NONE { None } else { probe(WorkloadId::NONE) },
                )
                .unwrap_or(none)
        };
        let shared = entry_of(ClassId::SHARED);
        let (wide, narrow) = match classes {
            Some(c) => (entry_of(c.wide), entry_of(c.narrow)),
            None => (none, none),
        };

        // 5. Combine, verdict and audit separately: deny beats allow, then the lower rank;
        // none loses to anything.
        let better = |a: Decision, b: Decision| {
            let key = |d: Decision| match d {
                Decision::Deny(r) => (0u8, self.rules.get(&r).map_or(0, |i| i.rank)),
                Decision::Allow(r) => (1, self.rules.get(&r).map_or(0, |i| i.rank)),
                Decision::None => (2, 0),
            };
            // Ties (the same rule in two tables cannot happen) keep the first decision.
            if key(b) < key(a) { b } else { a }
        };
        let value = L4Value {
            verdict: better(better(shared.verdict, wide.verdict), narrow.verdict),
            audit: better(better(shared.audit, wide.audit), narrow.audit),
        };

        // 6. Verdict, then audit.
        let (verdict, decided_by) = match value.verdict {
            Decision::Deny(rule) => (Action::Deny, Decider::Rule(rule)),
            Decision::Allow(rule) => (Action::Allow, Decider::Rule(rule)),
            Decision::None => (maps.defaults.verdict, Decider::Default),
        };
        if verdict == Action::Deny {
            return Outcome { verdict: Verdict::Deny, decided_by };
        }
        let audit_deny = match value.audit {
            Decision::Deny(rule) => Some(Decider::Rule(rule)),
            Decision::Allow(_) => None,
            Decision::None => (maps.defaults.audit == Action::Deny).then_some(Decider::Default),
        };
        match audit_deny {
            Some(by) => Outcome { verdict: Verdict::AuditDeny, decided_by: by },
            None => Outcome { verdict: Verdict::Allow, decided_by },
        }
    }
}

/// Longest-prefix match over the L4 word within one (class, workload).
fn l4_longest(
    maps: &crate::mapstate::DirectionMaps,
    class: ClassId,
    workload: WorkloadId,
    word: u32,
) -> Option<L4Value> {
    (0..=32u8).rev().find_map(|prefix_len| {
        // The top `prefix_len` bits of the word.
        let bits =
            if prefix_len == 0 { 0 } else { word & (u32::MAX << (32 - u32::from(prefix_len))) };
        maps.l4.get(&L4Key { class, workload, prefix_len, bits }).copied()
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::mapstate::{Classes, Defaults, DirectionMaps};
    use crate::model::{FlowState, HostIdentity, RuleId};

    fn maps(verdict: Action, audit: Action) -> DirectionMaps {
        let mut v4 = BTreeMap::new();
        let c = |wide, narrow| Classes { wide: ClassId(wide), narrow: ClassId(narrow) };
        v4.insert("0.0.0.0/0".parse().unwrap(), c(3, 1));
        v4.insert("10.0.0.0/8".parse().unwrap(), c(3, 2));
        let mut v6 = BTreeMap::new();
        v6.insert("::/0".parse().unwrap(), c(3, 1));
        DirectionMaps { defaults: Defaults { verdict, audit }, v4, v6, l4: BTreeMap::new() }
    }

    fn state() -> MapState {
        let mut egress = maps(Action::Deny, Action::Deny);
        let d = |v, a| L4Value { verdict: v, audit: a };
        // Class 2, every workload: tcp (any port) allowed by rule 5.
        egress.l4.insert(
            L4Key { class: ClassId(2), workload: WorkloadId(0), prefix_len: 8, bits: 6 << 24 },
            d(Decision::Allow(RuleId(5)), Decision::Allow(RuleId(5))),
        );
        // Class 2, workload 9: tcp/22 denied by rule 6 in audit only.
        egress.l4.insert(
            L4Key {
                class: ClassId(2),
                workload: WorkloadId(9),
                prefix_len: 32,
                bits: 6 << 24 | 22,
            },
            d(Decision::Allow(RuleId(5)), Decision::Deny(RuleId(6))),
        );
        let mut workloads = BTreeMap::new();
        workloads.insert("a/b".to_string(), WorkloadId(9));
        MapState {
            host: HostIdentity::default(),
            ingress: maps(Action::Allow, Action::Deny),
            egress,
            workloads,
            rules: BTreeMap::new(),
        }
    }

    fn flow(
        dir: Direction,
        peer: &str,
        proto: u8,
        port: Option<u16>,
        workload: Option<&str>,
    ) -> Flow {
        let mut f = Flow::new(dir, peer.parse().unwrap(), proto);
        f.port = port;
        f.workload = workload.map(String::from);
        f
    }

    #[test]
    fn precedence_follows_the_documented_steps() {
        let s = state();
        let out = |f: &Flow| {
            let o = s.lookup(f);
            (o.verdict, o.decided_by)
        };
        let eg = Direction::Egress;
        // Workload hit via an ancestor: the workload entry decides, and its audit says deny.
        assert_eq!(
            out(&flow(eg, "10.1.2.3", 6, Some(22), Some("a/b/c"))),
            (Verdict::AuditDeny, Decider::Rule(RuleId(6)))
        );
        // Same workload, other port: miss under workload 9, fall back to workload 0.
        assert_eq!(
            out(&flow(eg, "10.1.2.3", 6, Some(80), Some("a/b/c"))),
            (Verdict::Allow, Decider::Rule(RuleId(5)))
        );
        // "a/bc" is not below "a/b".
        assert_eq!(
            out(&flow(eg, "10.1.2.3", 6, Some(22), Some("a/bc"))),
            (Verdict::Allow, Decider::Rule(RuleId(5)))
        );
        // Outside 10/8: class 1 has no entries, the deny default decides.
        assert_eq!(
            out(&flow(eg, "192.0.2.1", 6, Some(22), None)),
            (Verdict::Deny, Decider::Default)
        );
        // Ingress: default allow, audit default deny.
        let ing = Direction::Ingress;
        assert_eq!(
            out(&flow(ing, "2001:db8::1", 17, Some(53), None)),
            (Verdict::AuditDeny, Decider::Default)
        );
        // Always allowed comes first.
        let mut reply = flow(ing, "192.0.2.1", 6, Some(1), None);
        reply.state = FlowState::Reply;
        assert!(matches!(out(&reply).1, Decider::Always(_)));
    }
}
