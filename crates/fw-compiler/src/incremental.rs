//! Encoding and digesting a state that differs little from the one before it, as a daemon
//! does on every commit: what depends only on parts of the state that are equal to the last
//! state's is taken from the last result instead of being computed again.
//!
//! Why it is built this way:
//! - Each map of [`encode`] is a function of a known part of the state: an LPM map of its
//!   direction's prefix table alone; an L4 map of its direction's L4 table and, for the ranks
//!   and log flags of the decisions, the rules' ids, ranks and log flags; the config of the
//!   defaults and the IPv4 tables' prefix lengths (encoded again every time: it is small); the
//!   workload table of the workloads; the ingress IPv4 chunks of the ingress
//!   IPv4 table and the ingress exact L4 hash of the ingress L4 table, so they go with those
//!   maps (`companions`). [`encode_reusing`] takes a map from the
//!   last encoding only when those parts are equal (compared in full), and encodes the
//!   others with [`encode`] itself, so the result is [`encode`]'s by construction.
//! - [`MapState::digest`] is FNV-1a over the state's canonical JSON, a stream hash: its state
//!   after a prefix of the stream is all that the rest needs. The stream is cut into segments
//!   that each come from one part of the state (host and defaults, each table, workloads,
//!   rules), and [`digest_reusing`] restarts from the hash after the last segment whose part,
//!   and every part before it, equals the last state's. A one-rule change next to a large
//!   prefix table hashes the rules again, not the prefixes.
//! - The tests check both against [`encode`] and [`MapState::digest`] on compiled states and
//!   on changes of every part.

use std::collections::BTreeMap;

use fw_common::maps;

use crate::diff::Fnv128;
use crate::encode::{Encoded, encode};
use crate::mapstate::{DirectionMaps, MapState};

/// The digest's hash state after each segment of the canonical JSON (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DigestMarks(Vec<u128>);

/// How many segments the canonical JSON is cut into.
const SEGMENTS: usize = 10;

/// Whether segment `i` of `a` and of `b` come from equal parts.
fn same_segment(i: usize, a: &MapState, b: &MapState) -> bool {
    match i {
        0 => a.host == b.host && a.ingress.defaults == b.ingress.defaults,
        1 => a.ingress.v4 == b.ingress.v4,
        2 => a.ingress.v6 == b.ingress.v6,
        3 => a.ingress.l4 == b.ingress.l4,
        4 => a.egress.defaults == b.egress.defaults,
        5 => a.egress.v4 == b.egress.v4,
        6 => a.egress.v6 == b.egress.v6,
        7 => a.egress.l4 == b.egress.l4,
        8 => a.workloads == b.workloads,
        _ => a.rules == b.rules,
    }
}

fn json<T: serde::Serialize>(h: &mut Fnv128, value: &T) {
    if let Err(e) = serde_json::to_writer(&mut *h, value) {
        // As in `MapState::digest`: cannot happen, and if it did the digest would differ
        // from any state written without error.
        h.update(b"\0error\0");
        h.update(e.to_string().as_bytes());
    }
}

/// Writes segment `i` of `state`'s canonical JSON (the bytes `MapState::digest` hashes).
fn write_segment(i: usize, state: &MapState, h: &mut Fnv128) {
    let dir = |i: usize| if i < 4 { &state.ingress } else { &state.egress };
    let d: &DirectionMaps = dir(i);
    match i {
        0 | 4 => {
            h.update(if i == 0 { b"{\"host\":" } else { b",\"egress\":" });
            if i == 0 {
                json(h, &state.host);
                h.update(b",\"ingress\":");
            }
            h.update(b"{\"defaults\":");
            json(h, &d.defaults);
            h.update(b",\"v4\":");
        }
        1 | 5 => json(h, &d.v4.iter().collect::<Vec<_>>()),
        2 | 6 => {
            h.update(b",\"v6\":");
            json(h, &d.v6.iter().collect::<Vec<_>>());
        }
        3 | 7 => {
            h.update(b",\"l4\":");
            json(h, &d.l4.iter().collect::<Vec<_>>());
            h.update(b"}");
        }
        8 => {
            h.update(b",\"workloads\":");
            json(h, &state.workloads.iter().collect::<Vec<_>>());
        }
        _ => {
            h.update(b",\"rules\":");
            json(h, &state.rules.iter().collect::<Vec<_>>());
            h.update(b"}");
        }
    }
}

/// `state.digest()`, hashing only the segments from the first part that differs from
/// `prev`'s state on (all of them without `prev`); and the marks to pass with `state` next
/// time.
pub fn digest_reusing(
    state: &MapState,
    prev: Option<(&MapState, &DigestMarks)>,
) -> (String, DigestMarks) {
    let mut marks = Vec::with_capacity(SEGMENTS);
    let mut h = Fnv128::new();
    if let Some((old, old_marks)) = prev.filter(|(_, m)| m.0.len() == SEGMENTS) {
        for (i, mark) in old_marks.0.iter().enumerate() {
            if !same_segment(i, state, old) {
                break;
            }
            marks.push(*mark);
            h = Fnv128(*mark);
        }
    }
    for i in marks.len()..SEGMENTS {
        write_segment(i, state, &mut h);
        marks.push(h.0);
    }
    (format!("{:032x}", h.0), DigestMarks(marks))
}

/// Which maps of `encode`'s output depend on equal parts of `state` and `prev`.
fn reusable(state: &MapState, prev: &MapState) -> Vec<&'static str> {
    let mut out = Vec::new();
    // The L4 values read the rules' ranks and log flags (and whether the rule exists).
    let rule_bits = |s: &MapState| -> Vec<(u32, u64, bool)> {
        s.rules.iter().map(|(id, r)| (id.0, r.rank, r.log)).collect()
    };
    let same_rule_bits = state.rules.len() == prev.rules.len() && {
        let (a, b) = (rule_bits(state), rule_bits(prev));
        a == b
    };
    for (m, p, names) in [
        (&state.ingress, &prev.ingress, (maps::INGRESS_V4, maps::INGRESS_V6, maps::INGRESS_L4)),
        (&state.egress, &prev.egress, (maps::EGRESS_V4, maps::EGRESS_V6, maps::EGRESS_L4)),
    ] {
        if m.v4 == p.v4 {
            out.push(names.0);
        }
        if m.v6 == p.v6 {
            out.push(names.1);
        }
        if same_rule_bits && m.l4 == p.l4 {
            out.push(names.2);
        }
    }
    out
}

/// `encode(state)`, taking from `prev_encoded` (the encoding of `prev`) the maps whose parts
/// of the state are equal to `prev`'s; the names of the maps taken. They are shared, not
/// copied (`Entries` clones are reference counts): both encodings stay whole and hold the
/// same buffers for those maps, which also lets the loader's cache and a later diff tell
/// them equal without reading them.
pub fn encode_reusing(
    state: &mut MapState,
    prev: Option<(&MapState, &Encoded)>,
) -> (Encoded, Vec<&'static str>) {
    let Some((prev, prev_encoded)) = prev else { return (encode(state), Vec::new()) };
    let reuse: Vec<&'static str> = reusable(state, prev)
        .into_iter()
        .filter(|name| companions(name).iter().all(|c| prev_encoded.maps.contains_key(c)))
        .collect();
    // The tables of the reused maps are set aside while the rest is encoded, then put back.
    let mut aside = Vec::new();
    for &name in &reuse {
        let d = if is_ingress(name) { &mut state.ingress } else { &mut state.egress };
        match name {
            maps::INGRESS_V4 | maps::EGRESS_V4 => {
                aside.push((name, Aside::V4(std::mem::take(&mut d.v4))));
            }
            maps::INGRESS_V6 | maps::EGRESS_V6 => {
                aside.push((name, Aside::V6(std::mem::take(&mut d.v6))));
            }
            _ => aside.push((name, Aside::L4(std::mem::take(&mut d.l4)))),
        }
    }
    let mut out = encode(state);
    for (name, table) in aside {
        let d = if is_ingress(name) { &mut state.ingress } else { &mut state.egress };
        match table {
            Aside::V4(t) => d.v4 = t,
            Aside::V6(t) => d.v6 = t,
            Aside::L4(t) => d.l4 = t,
        }
        for &c in companions(name) {
            if let Some(entries) = prev_encoded.maps.get(c) {
                out.maps.insert(c, entries.clone());
            }
        }
    }
    // The config lists the IPv4 tables' prefix lengths: encoded again with the tables back.
    out.maps.insert(maps::CONFIG, crate::encode::config_entries(state));
    let shared = reuse.iter().flat_map(|name| companions(name).iter().copied()).collect();
    (out, shared)
}

/// The kernel maps encoded from the same table as `name`: the ingress IPv4 table is also
/// the direct-indexed chunks in front of it, the ingress L4 table is also the exact hash of
/// its whole-word entries.
fn companions(name: &'static str) -> &'static [&'static str] {
    match name {
        maps::INGRESS_V4 => &[maps::INGRESS_V4, maps::INGRESS_V4_DIR],
        maps::INGRESS_L4 => &[maps::INGRESS_L4, maps::INGRESS_L4_EXACT],
        maps::INGRESS_V6 => &[maps::INGRESS_V6],
        maps::EGRESS_V4 => &[maps::EGRESS_V4],
        maps::EGRESS_V6 => &[maps::EGRESS_V6],
        _ => &[maps::EGRESS_L4],
    }
}

fn is_ingress(name: &str) -> bool {
    [maps::INGRESS_V4, maps::INGRESS_V6, maps::INGRESS_L4].contains(&name)
}

enum Aside {
    V4(BTreeMap<ipnet::Ipv4Net, crate::mapstate::Classes>),
    V6(BTreeMap<ipnet::Ipv6Net, crate::mapstate::Classes>),
    L4(BTreeMap<crate::mapstate::L4Key, crate::mapstate::L4Value>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::load::{Input, load};
    use crate::mapstate::Capacities;
    use crate::model::HostIdentity;
    use crate::yaml::ParseLimits;

    fn state(files: &[(&str, String)]) -> MapState {
        let loaded =
            load(files.iter().map(|(n, t)| Input::new(*n, t.as_bytes())), &ParseLimits::default());
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics.first());
        let host = HostIdentity { name: "h1".into(), labels: Default::default() };
        let set = loaded.policy_set.expect("set");
        compile(&set.for_host(&host), &Capacities::default()).expect("compiles")
    }

    fn block(n: u32) -> String {
        let addrs: Vec<String> = (0..n)
            .map(|k| format!("{}/32", std::net::Ipv4Addr::from((30u32 << 24) + k * 7)))
            .collect();
        format!(
            "apiVersion: fw/v1\nkind: AddressSet\nmetadata: {{name: block}}\nspec:\n  addresses: [{}, 2001:db8::/48]\n",
            addrs.join(", ")
        )
    }

    fn base(port: u16, log: bool, default: &str, egress_port: u16) -> String {
        format!(
            "apiVersion: fw/v1\nkind: Policy\nmetadata: {{name: base}}\nspec:\n  defaults: {{ingress: {default}, egress: allow}}\n  ingress:\n    - {{name: blocked, action: deny, from: [{{set: block}}]}}\n    - {{name: svc, action: allow, from: [10.20.0.0/16], proto: tcp, ports: [{port}], log: {log}}}\n    - {{name: web, action: allow, proto: tcp, ports: [443]}}\n  egress:\n    - {{name: dns, action: deny, to: [{{set: block}}], proto: udp, ports: [{egress_port}], workloads: [system.slice/a.service]}}\n"
        )
    }

    /// Every step of a sequence of states: the reused encoding and digest equal a fresh
    /// `encode` and `digest`.
    #[test]
    fn reused_encodings_and_digests_equal_fresh_ones() {
        let states = [
            state(&[("p/a.yaml", base(80, false, "deny", 53)), ("p/b.yaml", block(300))]),
            // One rule's port.
            state(&[("p/a.yaml", base(81, false, "deny", 53)), ("p/b.yaml", block(300))]),
            // Only a log flag (the L4 table is the same, its values' flags are not).
            state(&[("p/a.yaml", base(81, true, "deny", 53)), ("p/b.yaml", block(300))]),
            // The prefixes.
            state(&[("p/a.yaml", base(81, true, "deny", 53)), ("p/b.yaml", block(301))]),
            // A default.
            state(&[("p/a.yaml", base(81, true, "allow", 53)), ("p/b.yaml", block(301))]),
            // Egress only.
            state(&[("p/a.yaml", base(81, true, "allow", 54)), ("p/b.yaml", block(301))]),
            // Back to the first.
            state(&[("p/a.yaml", base(80, false, "deny", 53)), ("p/b.yaml", block(300))]),
            // The same again.
            state(&[("p/a.yaml", base(80, false, "deny", 53)), ("p/b.yaml", block(300))]),
        ];
        let mut prev: Option<(MapState, Encoded, DigestMarks)> = None;
        let mut reused_any = false;
        for (i, s) in states.iter().enumerate() {
            let mut s = s.clone();
            let (encoded, reused) = encode_reusing(&mut s, prev.as_ref().map(|(st, e, _)| (st, e)));
            assert_eq!(s, states[i], "the state is left as it was");
            assert_eq!(encoded, encode(&s), "encoding at step {i}");
            if let Some((p, e, _)) = &prev {
                for name in &reused {
                    assert!(encoded.maps[name].shares(&e.maps[name]), "{name} is shared");
                }
                assert_eq!(*e, encode(p), "the previous encoding is whole");
            }
            let (digest, marks) = digest_reusing(&s, prev.as_ref().map(|(st, _, m)| (st, m)));
            assert_eq!(digest, s.digest(), "digest at step {i}");
            reused_any |= !reused.is_empty();
            if i == 1 {
                assert!(reused.contains(&maps::INGRESS_V4), "{reused:?}");
                assert!(!reused.contains(&maps::INGRESS_L4), "{reused:?}");
            }
            prev = Some((s, encoded, marks));
        }
        assert!(reused_any);
        // Without a previous state, and with marks of the wrong shape: computed in full.
        let s = &states[0];
        assert_eq!(digest_reusing(s, None).0, s.digest());
        assert_eq!(digest_reusing(s, Some((&states[1], &DigestMarks(vec![1, 2])))).0, s.digest());
    }
}
