//! Differences between two map states, and a digest of one.
//!
//! An update should touch only what changed: stable rule, class and workload ids make most
//! entries of an edited policy identical, and this diff lists what remains, per map, as typed
//! entries (prefixes, L4 keys, decisions) rather than bytes, so `fwctl diff` can print it and
//! the loader can apply it map by map. Both states are `BTreeMap`s, so one merge walk per map
//! gives the diff in linear time and in key order.
//!
//! The digest names a state in logs and status output ("running 3f2a..."): a 128-bit FNV-1a of
//! a canonical JSON serialization. FNV is fixed forever (unlike `std`'s hasher) and needs no
//! dependency; it is an identifier, not a defence against someone crafting collisions.

use std::collections::BTreeMap;
use std::io;

use crate::mapstate::{Defaults, DirectionMaps, L4Key, L4Value, MapState, RuleInfo, WorkloadId};
use crate::model::{HostIdentity, RuleId};

/// Entries of one map that differ between two states.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EntryDiff<K, V> {
    /// In the new state only.
    pub added: Vec<(K, V)>,
    /// In the old state only.
    pub removed: Vec<(K, V)>,
    /// In both, with different values: (key, old, new).
    pub changed: Vec<(K, V, V)>,
}

impl<K, V> Default for EntryDiff<K, V> {
    fn default() -> Self {
        Self { added: Vec::new(), removed: Vec::new(), changed: Vec::new() }
    }
}

impl<K, V> EntryDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// Number of entries to write or delete.
    pub fn len(&self) -> usize {
        self.added.len() + self.removed.len() + self.changed.len()
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> EntryDiff<K, V> {
    /// One merge walk over both maps, in key order.
    pub fn of(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Self {
        let mut d = Self::default();
        let mut a = old.iter().peekable();
        let mut b = new.iter().peekable();
        loop {
            match (a.peek(), b.peek()) {
                (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                    std::cmp::Ordering::Less => {
                        d.removed.push(((*ka).clone(), (*va).clone()));
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        d.added.push(((*kb).clone(), (*vb).clone()));
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if va != vb {
                            d.changed.push(((*ka).clone(), (*va).clone(), (*vb).clone()));
                        }
                        a.next();
                        b.next();
                    }
                },
                (Some((ka, va)), None) => {
                    d.removed.push(((*ka).clone(), (*va).clone()));
                    a.next();
                }
                (None, Some((kb, vb))) => {
                    d.added.push(((*kb).clone(), (*vb).clone()));
                    b.next();
                }
                (None, None) => break,
            }
        }
        d
    }
}

/// The differences of one direction's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DirectionDiff {
    /// `Some((old, new))` when the defaults changed.
    pub defaults: Option<(Defaults, Defaults)>,
    pub v4: EntryDiff<ipnet::Ipv4Net, crate::mapstate::Classes>,
    pub v6: EntryDiff<ipnet::Ipv6Net, crate::mapstate::Classes>,
    pub l4: EntryDiff<L4Key, L4Value>,
}

impl DirectionDiff {
    fn of(old: &DirectionMaps, new: &DirectionMaps) -> Self {
        Self {
            defaults: (old.defaults != new.defaults).then_some((old.defaults, new.defaults)),
            v4: EntryDiff::of(&old.v4, &new.v4),
            v6: EntryDiff::of(&old.v6, &new.v6),
            l4: EntryDiff::of(&old.l4, &new.l4),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.defaults.is_none() && self.v4.is_empty() && self.v6.is_empty() && self.l4.is_empty()
    }
}

/// Everything that differs between two map states.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapDiff {
    /// `Some((old, new))` when the states were compiled for different host identities.
    pub host: Option<(HostIdentity, HostIdentity)>,
    pub ingress: DirectionDiff,
    pub egress: DirectionDiff,
    pub workloads: EntryDiff<String, WorkloadId>,
    /// Rule metadata (names, locations, summaries, log flags): not a kernel map, but what
    /// counters and events are labelled with.
    pub rules: EntryDiff<RuleId, RuleInfo>,
}

impl MapDiff {
    pub fn is_empty(&self) -> bool {
        self.host.is_none()
            && self.ingress.is_empty()
            && self.egress.is_empty()
            && self.workloads.is_empty()
            && self.rules.is_empty()
    }
}

impl MapState {
    /// What changes when going from `self` to `new`.
    pub fn diff(&self, new: &MapState) -> MapDiff {
        MapDiff {
            host: (self.host != new.host).then(|| (self.host.clone(), new.host.clone())),
            ingress: DirectionDiff::of(&self.ingress, &new.ingress),
            egress: DirectionDiff::of(&self.egress, &new.egress),
            workloads: EntryDiff::of(&self.workloads, &new.workloads),
            rules: EntryDiff::of(&self.rules, &new.rules),
        }
    }

    /// A stable hex digest (128-bit FNV-1a) of the whole state: equal states have equal
    /// digests, on every machine and in every version that keeps the types' serialization.
    pub fn digest(&self) -> String {
        let mut h = Fnv128::new();
        // JSON objects need string keys and L4Key is a struct, so maps are written as sorted
        // lists of pairs: canonical, since BTreeMaps iterate in key order.
        let canonical = Canonical {
            host: &self.host,
            ingress: CanonicalDirection::of(&self.ingress),
            egress: CanonicalDirection::of(&self.egress),
            workloads: self.workloads.iter().collect(),
            rules: self.rules.iter().collect(),
        };
        if let Err(e) = serde_json::to_writer(&mut h, &canonical) {
            // Cannot happen (every key is written as a list element and the writer never
            // fails); if it ever did, the error text still makes the digest differ from any
            // successfully written state.
            h.update(b"\0error\0");
            h.update(e.to_string().as_bytes());
        }
        format!("{:032x}", h.0)
    }
}

#[derive(serde::Serialize)]
struct Canonical<'a> {
    host: &'a HostIdentity,
    ingress: CanonicalDirection<'a>,
    egress: CanonicalDirection<'a>,
    workloads: Vec<(&'a String, &'a WorkloadId)>,
    rules: Vec<(&'a RuleId, &'a RuleInfo)>,
}

#[derive(serde::Serialize)]
struct CanonicalDirection<'a> {
    defaults: &'a Defaults,
    v4: Vec<(&'a ipnet::Ipv4Net, &'a crate::mapstate::Classes)>,
    v6: Vec<(&'a ipnet::Ipv6Net, &'a crate::mapstate::Classes)>,
    l4: Vec<(&'a L4Key, &'a L4Value)>,
}

impl<'a> CanonicalDirection<'a> {
    fn of(m: &'a DirectionMaps) -> Self {
        Self {
            defaults: &m.defaults,
            v4: m.v4.iter().collect(),
            v6: m.v6.iter().collect(),
            l4: m.l4.iter().collect(),
        }
    }
}

/// FNV-1a, 128 bit, as an `io::Write` so serialization streams into it. Its state is the
/// hash of what was written so far, so a digest can be resumed from it (`incremental`).
pub(crate) struct Fnv128(pub(crate) u128);

impl Fnv128 {
    pub(crate) const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    pub(crate) fn new() -> Self {
        Self(Self::OFFSET)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u128::from(b)).wrapping_mul(Self::PRIME);
        }
    }
}

impl io::Write for Fnv128 {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::Action;
    use crate::mapstate::{ClassId, Classes, Decision};

    fn c(narrow: u32) -> Classes {
        Classes { wide: ClassId(100), narrow: ClassId(narrow) }
    }

    fn dir() -> DirectionMaps {
        let mut v4 = BTreeMap::new();
        v4.insert("0.0.0.0/0".parse().unwrap(), c(1));
        v4.insert("10.0.0.0/8".parse().unwrap(), c(2));
        let mut v6 = BTreeMap::new();
        v6.insert("::/0".parse().unwrap(), c(1));
        let mut l4 = BTreeMap::new();
        l4.insert(
            L4Key { class: ClassId(2), workload: WorkloadId(0), prefix_len: 8, bits: 6 << 24 },
            L4Value { verdict: Decision::Allow(RuleId(4)), audit: Decision::Allow(RuleId(4)) },
        );
        DirectionMaps {
            defaults: Defaults { verdict: Action::Allow, audit: Action::Allow },
            v4,
            v6,
            l4,
        }
    }

    fn state() -> MapState {
        MapState {
            host: HostIdentity::default(),
            ingress: dir(),
            egress: dir(),
            workloads: BTreeMap::new(),
            rules: BTreeMap::new(),
        }
    }

    #[test]
    fn equal_states_have_an_empty_diff_and_equal_digests() {
        let a = state();
        let b = state();
        assert!(a.diff(&b).is_empty());
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest().len(), 32);
    }

    #[test]
    fn diff_lists_added_removed_and_changed_entries_per_map() {
        let a = state();
        let mut b = state();
        b.ingress.v4.remove(&"10.0.0.0/8".parse().unwrap());
        b.ingress.v4.insert("192.0.2.0/24".parse().unwrap(), c(3));
        b.ingress.v6.insert("::/0".parse().unwrap(), c(9));
        b.egress.defaults.verdict = Action::Deny;
        b.workloads.insert("a/b".into(), WorkloadId(5));
        let d = a.diff(&b);
        assert!(!d.is_empty());
        assert_eq!(d.ingress.v4.removed, vec![("10.0.0.0/8".parse().unwrap(), c(2))]);
        assert_eq!(d.ingress.v4.added, vec![("192.0.2.0/24".parse().unwrap(), c(3))]);
        assert_eq!(d.ingress.v6.changed, vec![("::/0".parse().unwrap(), c(1), c(9))]);
        assert!(d.ingress.l4.is_empty());
        assert_eq!(d.egress.defaults.map(|(_, n)| n.verdict), Some(Action::Deny));
        assert!(d.egress.v4.is_empty());
        assert_eq!(d.workloads.added.len(), 1);
        assert_ne!(a.digest(), b.digest());
        // The reverse diff swaps added and removed.
        let r = b.diff(&a);
        assert_eq!(r.ingress.v4.added, d.ingress.v4.removed);
        assert_eq!(r.workloads.removed, d.workloads.added);
    }

    #[test]
    fn digest_is_fixed_for_a_fixed_state() {
        // Pinned: a change here means every deployed state's digest changes.
        let empty = MapState {
            host: HostIdentity::default(),
            ingress: DirectionMaps {
                defaults: Defaults { verdict: Action::Allow, audit: Action::Allow },
                v4: BTreeMap::new(),
                v6: BTreeMap::new(),
                l4: BTreeMap::new(),
            },
            egress: DirectionMaps {
                defaults: Defaults { verdict: Action::Allow, audit: Action::Allow },
                v4: BTreeMap::new(),
                v6: BTreeMap::new(),
                l4: BTreeMap::new(),
            },
            workloads: BTreeMap::new(),
            rules: BTreeMap::new(),
        };
        let json = r#"{"host":{"name":"","labels":{}},"ingress":{"defaults":{"verdict":"allow","audit":"allow"},"v4":[],"v6":[],"l4":[]},"egress":{"defaults":{"verdict":"allow","audit":"allow"},"v4":[],"v6":[],"l4":[]},"workloads":[],"rules":[]}"#;
        let mut h = Fnv128::new();
        h.update(json.as_bytes());
        assert_eq!(empty.digest(), format!("{:032x}", h.0));
    }

    #[test]
    fn fnv128_matches_reference_values() {
        let mut h = Fnv128::new();
        h.update(b"");
        assert_eq!(h.0, 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d);
        let mut h = Fnv128::new();
        h.update(b"a");
        assert_eq!(h.0, 0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964);
    }
}
