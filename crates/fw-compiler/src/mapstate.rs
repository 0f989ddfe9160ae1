//! The logical map state: what the data plane's maps hold for one host, in host byte order.
//!
//! This is the compiler's output and the contract with the data plane. It is deliberately
//! close to the kernel maps (one LPM table per direction and address family, one L4 table per
//! direction, holding the shared table and the entries of every class of both layers) but typed: prefixes are `ipnet` values, decisions name their rule. `encode` turns
//! it into `fw-common` bytes; `diff` compares two states entry by entry, which is what
//! `fwctl diff` prints and what the loader writes.
//!
//! Lookup, per direction (the precedence the kernel programs follow, and `lookup` models):
//! 1. always-allowed traffic (loopback, replies, related ICMP errors, ARP, ND) passes (the
//!    XDP program asks connection tracking only when steps 2-6 would not simply allow the
//!    packet: the verdict is the same, a reply the policy allows is counted as allowed);
//! 2. the peer address is looked up in the direction's LPM table: the longest prefix gives
//!    the address's two classes, one per layer ([`Classes`]: `wide` and `narrow`; a `/0`
//!    entry is always present, so every address has both). How the kernel holds a table is
//!    the data plane's choice as long as it returns this longest match: the ingress IPv4
//!    table is a hash of the prefixes behind direct-indexed chunks (a slot per /16 and, for
//!    the /16s holding longer prefixes, per /24; `encode` derives them) that answer most
//!    addresses alone, the hash being probed at the config's longer lengths only under a
//!    slot block that longer prefixes intersect; the others are LPM tries;
//! 3. egress only: the process's cgroup and its ancestors are looked up in `workloads`,
//!    deepest first; the first hit is the workload class, none is 0;
//! 4. three L4 entries are looked up (longest prefix over the L4 bits each): the shared
//!    table's, ([`ClassId::SHARED`], workload, l4 bits), the wide class's and the narrow
//!    class's; each, on a miss with a non-zero workload, tries workload 0 instead. The shared
//!    table holds the decisions of the rules whose peers cover every address of both
//!    families (`any`, or `0.0.0.0/0` with `::/0`), which would otherwise be repeated in
//!    every class; it is consulted even when the address has no class (a miss in the LPM
//!    table). A miss is an entry with no decisions;
//! 5. the three entries are combined, for `verdict` and for `audit` separately: deny beats
//!    allow, between two decisions with the same action the lower [`RuleInfo::rank`] wins,
//!    and none loses to anything (the rules of all three tables are then ranked "first deny
//!    in (policy name, rule index) order, else first allow", as within one table);
//! 6. the combined `verdict` decision gives allow or deny; none gives the direction's default;
//!    if the result is allow and the combined `audit` decision (or, when it is none, the audit
//!    default) is deny, the outcome is audit-deny.
//!
//! Layers. The addresses of every rule with an address restriction, flattened into disjoint
//! prefixes, are split by prefix length (`compile::Split`): the short ones (up to `/24` for
//! IPv4, `/64` for IPv6) belong to the wide layer, the longer ones to the narrow layer. Each
//! layer has its own address classes, built from that layer's prefixes only: the wide class
//! of an address is the set of rules whose wide prefixes contain it, the narrow class
//! likewise, and every LPM entry carries both. A rule's prefixes are disjoint, so a rule
//! matches an address through at most one prefix and is in at most one of the two classes;
//! the shared table holds the rest. The three entries of step 4 together hold the decisions
//! of exactly the rules that match, and since the combine of step 5 is a minimum over
//! (action, rank), which is associative, splitting the rules over three tables gives the
//! answer one table over all of them would. The point of the split: an address class
//! repeats the rules of the prefixes enclosing it in its own layer only, so a host address
//! inside a `/16` does not repeat the `/16`'s rules in its class when the two are in
//! different layers.
//!
//! Ranks. A rank only has to order two rules that can decide the same packet, but it must not
//! shift when an unrelated rule is inserted, or a one-rule edit would rewrite every L4 entry
//! after it. The compiler uses `policy ordinal << 32 | rule index`, where the ordinal is the
//! policy's position among the host's policy names (sorted) and the index the rule's position
//! in its policy's direction list: editing a policy's rules changes only that policy's ranks,
//! and only adding or removing a whole policy shifts the ranks of the policies after it (the
//! loader then rewrites the entries naming their rules). Should the host's rules not be in
//! (policy, index) order (a hand-built `HostPolicy`), the rank of a direction falls back to
//! the rule's position in `HostPolicy::rules`, which is always correct but not stable.

use std::collections::BTreeMap;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::ast::{Action, Direction};
use crate::model::{HostIdentity, RuleId};
use crate::source::Location;

/// An address class: the set of rules of one layer that an address region matches. Stable
/// across compiles while that set is unchanged. Never 0. The same rule set in both layers is
/// one class (one L4 table).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct ClassId(pub u32);

impl ClassId {
    /// The shared L4 table: decisions of the rules without an address restriction, consulted
    /// for every address (step 4 above). Never the id of an address class (those are never
    /// 0); never a value of the LPM tables.
    pub const SHARED: ClassId = ClassId(0);
}

/// The value of an LPM entry: the address classes of its region, one per layer (see
/// "Layers" above).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Classes {
    /// The class of the rules matching through their wide (short) prefixes.
    pub wide: ClassId,
    /// The class of the rules matching through their narrow (long) prefixes.
    pub narrow: ClassId,
}

/// A workload class: one `workloads` cgroup path. 0 is "no workload path matched".
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct WorkloadId(pub u32);

impl WorkloadId {
    pub const NONE: WorkloadId = WorkloadId(0);
}

/// The 32-bit L4 word that the L4 table's prefix runs over:
/// `proto << 24 | no_port << 16 | port`. `no_port` is set when the packet carries no port
/// (a non-first fragment, or a protocol without ports) so that port rules cannot match it,
/// while rules without ports (which cover the whole `proto << 24` block) still do. For ICMP and
/// ICMPv6 the port slot holds the type.
pub fn l4_word(proto: u8, port: Option<u16>) -> u32 {
    match port {
        Some(p) => (u32::from(proto) << 24) | u32::from(p),
        None => (u32::from(proto) << 24) | (1 << 16),
    }
}

/// A key of the L4 table: exact class and workload, then the first `prefix_len` bits of the
/// L4 word.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct L4Key {
    pub class: ClassId,
    pub workload: WorkloadId,
    /// 0..=32.
    pub prefix_len: u8,
    /// The L4 word, with bits past `prefix_len` zero.
    pub bits: u32,
}

/// One half of an L4 entry's outcome.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase", tag = "action", content = "rule")]
pub enum Decision {
    /// No rule matched: the default applies.
    None,
    Allow(RuleId),
    Deny(RuleId),
}

/// The value of an L4 entry. Its decisions' ranks are their rules' [`RuleInfo::rank`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct L4Value {
    /// From enforcing rules only: first deny, else first allow, else none.
    pub verdict: Decision,
    /// As if audit policies were enforcing.
    pub audit: Decision,
}

/// Defaults of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Defaults {
    pub verdict: Action,
    pub audit: Action,
}

/// The maps of one direction.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectionMaps {
    pub defaults: Defaults,
    /// Longest prefix -> classes. Always holds `0.0.0.0/0`.
    pub v4: BTreeMap<Ipv4Net, Classes>,
    /// Longest prefix -> classes. Always holds `::/0`.
    pub v6: BTreeMap<Ipv6Net, Classes>,
    /// Longest prefix -> decisions, per (class, workload). A workload-0 table may nest
    /// prefixes (the longest one containing a word answers for it); a table of another
    /// workload never does, so that its misses are exactly where workload 0 decides (step 4).
    /// Serialized as a list of `[key, value]` pairs: its keys are structs, which JSON objects
    /// cannot have.
    #[serde(with = "entries")]
    pub l4: BTreeMap<L4Key, L4Value>,
}

/// What counters and events need to know about a rule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleInfo {
    pub direction: Direction,
    /// Shared by the rules of one policy (a large policy has thousands).
    pub policy: std::sync::Arc<str>,
    pub index: u32,
    pub name: Option<String>,
    pub action: Action,
    pub audit: bool,
    pub log: bool,
    pub location: Location,
    /// A one-line description: "allow tcp/443 from 0.0.0.0/0".
    pub summary: String,
    /// Precedence among the rules of the direction (see "Ranks" above): between two
    /// decisions with the same action, the lower rank wins. Absent in states saved before
    /// ranks existed (read as 0).
    #[serde(default)]
    pub rank: u64,
}

/// Each map's capacity in entries. The compiler rejects a policy set that does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capacities {
    /// Per direction.
    pub v4_prefixes: u32,
    /// Per direction.
    pub v6_prefixes: u32,
    /// Per direction.
    pub l4_entries: u32,
    pub rules: u32,
    pub workloads: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            v4_prefixes: 1 << 18,
            v6_prefixes: 1 << 17,
            l4_entries: 1 << 19,
            rules: 1 << 18,
            workloads: 4096,
        }
    }
}

/// The complete compiled state for one host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapState {
    pub host: HostIdentity,
    pub ingress: DirectionMaps,
    pub egress: DirectionMaps,
    /// Workload cgroup path (normalised) -> workload class. Egress only.
    pub workloads: BTreeMap<String, WorkloadId>,
    pub rules: BTreeMap<RuleId, RuleInfo>,
}

impl MapState {
    pub fn direction(&self, direction: Direction) -> &DirectionMaps {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Serializes a map as a list of `[key, value]` pairs.
mod entries {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}
