//! The compiler: one host's resolved rules -> the logical map state.
//!
//! The data plane answers "which rules match this packet" with a fixed number of
//! longest-prefix lookups (one address lookup, three L4 lookups) instead of a scan, so the
//! compiler has to precompute the answers. It is built to scale (100k rules, a million
//! prefixes) with nothing worse than sorting:
//!
//! 1. Addresses. Each rule's address terms are flattened, per family, into sorted disjoint
//!    integer ranges (u32 for IPv4, u128 for IPv6) with union and difference, so nested sets,
//!    overlaps and `except` cost a sort and a linear merge; the ranges are then cut into the
//!    minimal list of aligned prefixes. A set used by many rules is flattened once (memoised by
//!    its `Arc`).
//! 2. Address classes. All (prefix, rule) pairs of a direction and family are sorted in trie
//!    preorder (network address, then length) and walked with a stack of enclosing prefixes. A
//!    prefix's rule set is its enclosing prefix's set plus its own rules; because each rule's
//!    prefixes are disjoint, the longest marked prefix on an address's path carries exactly the
//!    rules that match that address, which is what the kernel's LPM lookup returns. A prefix
//!    whose set equals its parent's is dropped; the `/0` root is always there. Rules whose
//!    prefix list is the same (rules on one shared set) enter the walk as one group, so ten
//!    thousand rules on a thousand-prefix set make a thousand pairs, not ten million. A rule
//!    set is never materialised: it is known by its derivation (parent set + own rules) and an
//!    order-independent 128-bit fingerprint of its rule ids, `fp(parent) + fp(own)`, which
//!    interns it and keys its class id (`ids::assign` over the fingerprint), so a class keeps
//!    its id while its rule set is unchanged. That keeps a class's cost at O(own rules), where
//!    listing, sorting and hashing every class's full set was quadratic.
//!    Rules without an address restriction (peers flattening to `0.0.0.0/0` and `::/0`, e.g.
//!    `any`) do not enter the walk: they would be in every class and multiply its L4 entries
//!    by the number of classes. They form one more rule set whose entries go to the shared L4
//!    table (`ClassId::SHARED`, 0), which the data plane consults for every address next to
//!    the class's table and combines with it by action and rank (`mapstate`, "Lookup").
//!    Layers. The walk above is done twice per family, once over the wide prefixes (length
//!    at most `Split::DEFAULT`: /24 for IPv4, /64 for IPv6) and once over the narrow ones,
//!    and `merge_layers` joins the two results into one LPM table whose entries carry a
//!    class of each layer (`mapstate`, "Layers"). A class then repeats only the rules of the
//!    enclosing prefixes of its own layer: a host inside a much-used `/16` no longer carries
//!    the `/16`'s rules in its class, which was most of the L4 entries of large policy sets
//!    (on the benchmark fleet, 4.4M entries at 100k rules became 2.2M). A rule's prefixes
//!    may fall in both layers; it is then in one group per layer, and still in at most one
//!    class of an address. The same rule set in both layers is one class.
//! 3. L4 decisions. The L4 table is an LPM trie over the 32-bit L4 word
//!    (`mapstate::l4_word`), so a set's workload-0 table is *nested* (see `Entry`): the
//!    prefixes of the minimal covers of its rules' L4 ranges, each with the decision of the
//!    rules covering all of it, minus those that repeat the prefix around them. A port rule
//!    inside a wide rule (`proto: any`, or tcp without ports) is then one entry on top of the
//!    wide one, not a hole cut into it (up to 2 × 32 disjoint prefixes around each port), which
//!    was most of the entries. "First deny, else first allow" is a minimum over (deny before
//!    allow, rule position), so the table of `parent ∪ own` is the parent's table with the own
//!    rules' prefixes merged in, one linear pass in trie preorder: the rules a class shares
//!    with its enclosing prefixes are processed once, not once per class.
//! 4. Workloads (egress). A (class, workload) table holds entries only where its decision
//!    differs from the class's workload-0 decision: the lookup falls back to workload 0 on a
//!    miss, and a workload's rules are a superset of workload 0's, so it can only differ where
//!    its workload rules rank better. The workload rules' decisions are built from those
//!    rules alone, as "pieces" (disjoint word ranges with a constant decision; see
//!    `L4Builder`), and each class's table is nested like the workload-0 one
//!    (`workload_table`); the full per-workload decisions are never built.
//! 5. Output. Classes are emitted in class-id order, each (class, workload) sorted, so the L4
//!    vector is sorted and `BTreeMap`'s bulk build does no real sorting. Entries are counted
//!    while they are emitted and the compile stops with FW019 ("at least N") once a direction
//!    passes its L4 capacity, which bounds memory on oversized or hostile input. The two
//!    directions share nothing but read-only inputs; large inputs compile them (and the rules
//!    table) on threads of their own (`compile_with`), with the same result.
//!
//! Cost: sorting the pairs, plus work linear in the output. The rules without an address
//! restriction are written once (the shared table), not once per class, and a class holds
//! the rules of the enclosing prefixes of its layer only, so the L4 table grows with the
//! classes times the distinct L4 prefixes of the address-scoped rules that overlap in them
//! within one layer (see `docs/benchmarks.md`).
//!
//! Ranks. Every rule gets `RuleInfo::rank` (see `ranks` and `mapstate`, "Ranks"), which the
//! kernel uses to compare the decisions of the shared table and the two classes. Inside the
//! compiler the order is a rule's position in `HostPolicy::rules`; `ranks` orders exactly
//! like it.
//!
//! Everything that reaches the output goes through `BTreeMap`s and deterministic sorts; hash
//! maps are only used as memo tables, never iterated, so the same input gives the same
//! `MapState` byte for byte.
//!
//! The compiler trusts `resolve`'s validation for what cannot be expressed: rule ids are
//! distinct, ports appear only with tcp/udp, ICMP types only with icmp/icmpv6. Where an
//! invalid combination still arrives, it is compiled to what the reference evaluator would do
//! for well-formed flows (e.g. ports on `proto: any` cover tcp and udp), never to a panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::rc::Rc;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::ast::{Action, Direction, Proto};
use crate::diag::{Code, Diagnostic};
use crate::ids;
use crate::mapstate::{
    Capacities, ClassId, Classes, Decision, Defaults, DirectionMaps, L4Key, L4Value, MapState,
    RuleInfo, WorkloadId,
};
use crate::model::{AddrTerm, HostPolicy, ResolvedRule, ResolvedSet, RuleId};

/// A fast unkeyed hasher (FxHash's rotate-xor-multiply) for the memo tables. Their keys are
/// the compiler's own indices, pointers and rule lists, hashed millions of times on large
/// policies, and a slow hash only matters as compile time: SipHash's flood resistance buys
/// nothing here. No output depends on hash order (memo tables are never iterated).
#[derive(Clone, Copy, Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            if let Some(dst) = word.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the low bits of aligned pointers zero; hashbrown picks buckets
        // from the low bits, so bring well-mixed high bits down.
        self.0.rotate_left(26)
    }
}

/// A `HashMap` with [`FxHasher`], for memo tables.
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

// ---------------------------------------------------------------------------------------------
// Integer range sets
// ---------------------------------------------------------------------------------------------

/// An inclusive range of integers (`lo <= hi`). u128 holds both address families and the L4
/// word; the width in use is passed where it matters (prefix decomposition).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub lo: u128,
    pub hi: u128,
}

impl Range {
    pub fn new(lo: u128, hi: u128) -> Self {
        Self { lo: lo.min(hi), hi: hi.max(lo) }
    }
}

/// A set of integers as sorted, disjoint, non-adjacent inclusive ranges (the canonical form:
/// two equal sets have equal range lists).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeSet {
    ranges: Vec<Range>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Canonicalises any list of ranges: sort, then merge overlapping and adjacent ones.
    pub fn from_ranges(mut ranges: Vec<Range>) -> Self {
        ranges.sort_unstable();
        let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                // `saturating_add`: a range ending at u128::MAX absorbs everything after it.
                Some(last) if r.lo <= last.hi.saturating_add(1) => last.hi = last.hi.max(r.hi),
                _ => out.push(r),
            }
        }
        Self { ranges: out }
    }

    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let mut all = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        all.extend_from_slice(&self.ranges);
        all.extend_from_slice(&other.ranges);
        RangeSet::from_ranges(all)
    }

    /// `self \ other`, by one linear pass over both lists.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::with_capacity(self.ranges.len());
        let mut j = 0;
        for a in &self.ranges {
            // Ranges of `other` wholly before `a` cannot touch any later range of `self` either.
            while other.ranges.get(j).is_some_and(|b| b.hi < a.lo) {
                j += 1;
            }
            let mut cur = Some(a.lo);
            let mut k = j;
            while let (Some(lo), Some(b)) = (cur, other.ranges.get(k)) {
                if b.lo > a.hi {
                    break;
                }
                if b.lo > lo {
                    out.push(Range { lo, hi: b.lo - 1 });
                }
                // b.hi >= a.hi also covers b.hi == u128::MAX, so `b.hi + 1` cannot overflow.
                cur = if b.hi >= a.hi { None } else { Some(b.hi + 1) };
                k += 1;
            }
            if let Some(lo) = cur {
                out.push(Range { lo, hi: a.hi });
            }
        }
        RangeSet { ranges: out }
    }

    /// The minimal list of aligned prefixes `(network, length)` covering exactly this set, in a
    /// `bits`-wide space.
    pub fn to_prefixes(&self, bits: u32) -> Vec<(u128, u8)> {
        let mut out = Vec::new();
        for r in &self.ranges {
            range_to_prefixes(r.lo, r.hi, bits, &mut out);
        }
        out
    }
}

/// The `k` low bits set.
fn low_mask(k: u32) -> u128 {
    if k == 0 { 0 } else { u128::MAX >> (128 - k.min(128)) }
}

/// Cuts `[lo, hi]` into the minimal list of aligned prefixes of a `bits`-wide space: at each
/// step take the largest block that starts at `lo`, is aligned to its size and ends by `hi`.
/// At most 2 * bits blocks.
pub fn range_to_prefixes(lo: u128, hi: u128, bits: u32, out: &mut Vec<(u128, u8)>) {
    let bits = bits.min(128);
    if lo > hi || hi > low_mask(bits) {
        return;
    }
    let mut cur = lo;
    loop {
        let align = cur.trailing_zeros().min(bits);
        let span = hi - cur; // block size minus one must not exceed this
        let fit = if span == u128::MAX { 128 } else { 127 - (span + 1).leading_zeros() };
        let k = align.min(fit);
        out.push((cur, (bits - k) as u8));
        let last = cur | low_mask(k);
        if last >= hi {
            break;
        }
        cur = last + 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Address flattening
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn bits(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn full(self) -> Range {
        Range { lo: 0, hi: low_mask(self.bits()) }
    }
}

fn net_range(net: &IpNet, family: Family) -> Option<Range> {
    match (net, family) {
        // network()/broadcast() ignore host bits, exactly like `contains`.
        (IpNet::V4(n), Family::V4) => Some(Range {
            lo: u128::from(u32::from(n.network())),
            hi: u128::from(u32::from(n.broadcast())),
        }),
        (IpNet::V6(n), Family::V6) => {
            Some(Range { lo: u128::from(n.network()), hi: u128::from(n.broadcast()) })
        }
        _ => None,
    }
}

/// A set's identity (its `Arc`'s address) and a family: the memo key of flattening.
type SetKey = (*const ResolvedSet, Family);

/// A list of `(network, length)` prefixes.
type Prefixes = Rc<Vec<(u128, u8)>>;

/// Flattens address terms, memoising every set by identity, so a set shared by thousands of
/// rules (or nested in many sets) is computed once per family.
#[derive(Default)]
struct Flattener {
    sets: FastMap<SetKey, Rc<RangeSet>>,
    /// Prefix lists of rules whose peers are a single set: shared the same way.
    set_prefixes: FastMap<SetKey, Prefixes>,
    /// One shared empty list, for the many rules with no address of a family.
    empty: Prefixes,
}

impl Flattener {
    fn terms(&mut self, terms: &[AddrTerm], family: Family) -> RangeSet {
        let mut all = Vec::new();
        for t in terms {
            match t {
                AddrTerm::Any => all.push(family.full()),
                AddrTerm::Net(n) => all.extend(net_range(n, family)),
                AddrTerm::Set(s) => all.extend_from_slice(self.set(s, family).ranges()),
            }
        }
        RangeSet::from_ranges(all)
    }

    fn set(&mut self, set: &Arc<ResolvedSet>, family: Family) -> Rc<RangeSet> {
        // The pointer is a sound key: the policy is borrowed for the whole compile, so every
        // set stays alive and no address is reused.
        let key = (Arc::as_ptr(set), family);
        if let Some(r) = self.sets.get(&key) {
            return r.clone();
        }
        let addresses = self.terms(&set.addresses, family);
        let except = self.terms(&set.except, family);
        let r = Rc::new(addresses.difference(&except));
        self.sets.insert(key, r.clone());
        r
    }

    /// The rule's peers as disjoint minimal prefixes of one family.
    fn rule_prefixes(&mut self, rule: &ResolvedRule, family: Family) -> Prefixes {
        match rule.peers.as_slice() {
            [AddrTerm::Set(s)] => {
                let key = (Arc::as_ptr(s), family);
                if let Some(p) = self.set_prefixes.get(&key) {
                    return p.clone();
                }
                let p = Rc::new(self.set(s, family).to_prefixes(family.bits()));
                self.set_prefixes.insert(key, p.clone());
                p
            }
            // The common case of one address or CIDR, without building a range set.
            [AddrTerm::Net(n)] => match net_range(n, family) {
                Some(r) => {
                    let mut out = Vec::with_capacity(1);
                    range_to_prefixes(r.lo, r.hi, family.bits(), &mut out);
                    Rc::new(out)
                }
                None => self.empty.clone(),
            },
            peers => {
                let p = self.terms(peers, family).to_prefixes(family.bits());
                if p.is_empty() { self.empty.clone() } else { Rc::new(p) }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rule sets and the LPM walk
// ---------------------------------------------------------------------------------------------

/// Index of an interned rule set.
type SetIdx = usize;

/// An order-independent 128-bit fingerprint of a set of rules: two wrapping sums of
/// independent 64-bit mixes of the rule ids. The fingerprint of a disjoint union is the sum of
/// the parts' fingerprints, so a class's fingerprint is its parent's plus its own rules',
/// O(own rules) however many rules it inherits: the full rule list of a class never has to be
/// built, sorted or hashed (it is of the order of the number of rules without an address
/// restriction, in every class, which made that quadratic). It is over rule *ids*, not
/// positions, so it names the same set in every compile: it is the key of the class id.
/// Two different sets share a fingerprint with probability about 2^-128 per pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Fingerprint(u64, u64);

impl Fingerprint {
    fn of_rule(id: u32) -> Self {
        // One bijective mixer on two disjoint input domains gives two unrelated outputs.
        let id = u64::from(id);
        Fingerprint(splitmix64(id), splitmix64(id | 1 << 32))
    }

    fn add(self, other: Self) -> Self {
        Fingerprint(self.0.wrapping_add(other.0), self.1.wrapping_add(other.1))
    }

    /// The class-id key (`ids::assign` hashes these bytes).
    fn bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.0.to_be_bytes());
        out[8..].copy_from_slice(&self.1.to_be_bytes());
        out
    }
}

/// splitmix64's output function (Steele, Lea, Flood 2014): a fixed, strong 64-bit mix.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rules that enter the LPM walk together (those with the same prefix list), by group index:
/// their positions (sorted) and the fingerprint of their ids.
struct Groups {
    members: Vec<Arc<[u32]>>,
    fps: Vec<Fingerprint>,
}

/// Interned rule sets, each known by its fingerprint and by how it was first made (parent set
/// plus own rules, positions into `HostPolicy::rules`); the full lists are never built.
///
/// The sum of fingerprints is only right for disjoint unions, and these are: a rule's prefixes
/// of one family are disjoint (minimal cover of a range set), so a rule never marks both a
/// prefix and one inside it, and a rule is in exactly one group per family.
#[derive(Clone, Debug)]
struct RuleSets {
    fps: Vec<Fingerprint>,
    by_fp: FastMap<Fingerprint, SetIdx>,
    /// `(parent, own rules)`; `None` for the empty set. A parent always has a smaller index
    /// than its child.
    derivation: Vec<Option<(SetIdx, Arc<[u32]>)>>,
}

impl RuleSets {
    const EMPTY: SetIdx = 0;

    fn new() -> Self {
        let mut by_fp = FastMap::default();
        by_fp.insert(Fingerprint::default(), Self::EMPTY);
        Self { fps: vec![Fingerprint::default()], by_fp, derivation: vec![None] }
    }

    fn len(&self) -> usize {
        self.fps.len()
    }

    fn derivation(&self, i: SetIdx) -> Option<&(SetIdx, Arc<[u32]>)> {
        self.derivation.get(i).and_then(Option::as_ref)
    }

    fn fingerprint(&self, i: SetIdx) -> Fingerprint {
        self.fps.get(i).copied().unwrap_or_default()
    }

    /// `parent ∪ own`, where `own` lists groups of rules (indices into `groups`). O(own
    /// groups) when the set exists already; the own rule list is only built for a new set.
    fn extend(&mut self, parent: SetIdx, own: &[u32], groups: &Groups) -> SetIdx {
        if own.is_empty() {
            return parent;
        }
        let fp = own
            .iter()
            .filter_map(|&g| groups.fps.get(g as usize))
            .fold(self.fingerprint(parent), |acc, &f| acc.add(f));
        if let Some(&i) = self.by_fp.get(&fp) {
            return i;
        }
        let rules: Arc<[u32]> = match own {
            [g] => groups.members.get(*g as usize).cloned().unwrap_or_else(|| Arc::from([])),
            many => {
                let mut all: Vec<u32> = many
                    .iter()
                    .filter_map(|&g| groups.members.get(g as usize))
                    .flat_map(|g| g.iter().copied())
                    .collect();
                all.sort_unstable();
                all.dedup();
                all.into()
            }
        };
        let i = self.fps.len();
        self.fps.push(fp);
        self.derivation.push(Some((parent, rules)));
        self.by_fp.insert(fp, i);
        i
    }
}

/// Builds one LPM table from `(network, length, rule group)` triples: returns
/// `(network, length) -> rule set`, with the `/0` root always present.
fn build_lpm(
    mut pairs: Vec<(u128, u8, u32)>,
    groups: &Groups,
    bits: u32,
    sets: &mut RuleSets,
) -> Vec<((u128, u8), SetIdx)> {
    // Trie preorder: an enclosing prefix comes before everything inside it. IPv4 pairs are
    // sorted as one packed integer each (address, length, group), half the bytes to move and
    // one comparison instead of three: this sort is the largest single step of the walk.
    if bits <= 32 {
        let mut packed: Vec<u128> = pairs
            .iter()
            .map(|&(a, l, g)| (a << 40) | (u128::from(l) << 32) | u128::from(g))
            .collect();
        packed.sort_unstable();
        pairs.clear();
        pairs.extend(packed.iter().map(|&k| (k >> 40, (k >> 32) as u8, k as u32)));
    } else {
        pairs.sort_unstable();
    }
    pairs.dedup();
    // The groups marking the prefix at `*i`, into the reused `own`; advances `*i` past them.
    let mut own: Vec<u32> = Vec::new();
    let group = |i: &mut usize, own: &mut Vec<u32>| {
        own.clear();
        let (addr, len) = pairs.get(*i).map_or((0, 0), |p| (p.0, p.1));
        while let Some(&(a, l, g)) = pairs.get(*i) {
            if (a, l) != (addr, len) {
                break;
            }
            own.push(g);
            *i += 1;
        }
        (addr, len)
    };
    let mut i = 0;
    if pairs.first().is_some_and(|p| p.1 == 0) {
        group(&mut i, &mut own);
    }
    let root = sets.extend(RuleSets::EMPTY, &own, groups);
    let mut out = vec![((0, 0), root)];
    // (first address, last address, set) of the emitted prefixes enclosing the current one.
    let mut stack: Vec<(u128, u128, SetIdx)> = vec![(0, low_mask(bits), root)];
    while i < pairs.len() {
        let (addr, len) = group(&mut i, &mut own);
        let last = addr | low_mask(bits.saturating_sub(u32::from(len)));
        while stack.last().is_some_and(|&(lo, hi, _)| !(lo <= addr && last <= hi)) {
            stack.pop();
        }
        let parent = stack.last().map_or(root, |t| t.2);
        let set = sets.extend(parent, &own, groups);
        // Equal to the enclosing entry: the LPM answer is the same without it.
        if set != parent {
            out.push(((addr, len), set));
            stack.push((addr, last, set));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// L4 decisions
// ---------------------------------------------------------------------------------------------

const PORT_SLOT_MASK: u32 = 0x00ff_ffff;

/// A rule's ranges in the L4 word space (see `mapstate::l4_word`), sorted and disjoint.
fn rule_l4_ranges(rule: &ResolvedRule) -> RangeSet {
    let block = |p: u8| {
        let base = u32::from(p) << 24;
        Range::new(u128::from(base), u128::from(base | PORT_SLOT_MASK))
    };
    let slots = |p: u8, slots: &mut dyn Iterator<Item = (u16, u16)>| -> Vec<Range> {
        let base = u32::from(p) << 24;
        slots
            .map(|(a, b)| {
                Range::new(u128::from(base | u32::from(a)), u128::from(base | u32::from(b)))
            })
            .collect()
    };
    let port_ranges = |p: u8| slots(p, &mut rule.ports.iter().map(|r| (r.start, r.end)));
    let icmp_ranges =
        |p: u8| slots(p, &mut rule.icmp.iter().map(|&t| (u16::from(t), u16::from(t))));
    let mut ranges = Vec::new();
    match (rule.ports.is_empty(), rule.icmp.is_empty()) {
        (true, true) => match rule.proto.number() {
            None => ranges.push(Range::new(0, u128::from(u32::MAX))),
            Some(p) => ranges.push(block(p)),
        },
        // Ports (tcp/udp; `any` with ports can only match tcp and udp flows, which carry them).
        (false, true) => {
            let protos: &[u8] = match rule.proto {
                Proto::Tcp => &[6],
                Proto::Udp => &[17],
                Proto::Any => &[6, 17],
                Proto::Icmp | Proto::Icmpv6 => &[],
            };
            for &p in protos {
                ranges.extend(port_ranges(p));
            }
        }
        (true, false) => {
            let protos: &[u8] = match rule.proto {
                Proto::Icmp => &[1],
                Proto::Icmpv6 => &[58],
                Proto::Any => &[1, 58],
                Proto::Tcp | Proto::Udp => &[],
            };
            for &p in protos {
                ranges.extend(icmp_ranges(p));
            }
        }
        // Both a port and an ICMP type: no well-formed flow has both.
        (false, false) => {}
    }
    RangeSet::from_ranges(ranges)
}

/// The rank of a rule as a decider: lower wins. Deny sorts before allow, then the earlier rule
/// (position in `HostPolicy::rules`): "first deny, else first allow" is the minimum rank. This
/// makes a decision over a union of rule sets the minimum of the parts' decisions, which is
/// what lets a class's decisions be built from its parent's.
type Rank = u64;

/// No rule decides.
const NO_RULE: Rank = u64::MAX;

fn rank(rule: &ResolvedRule, pos: u32) -> Rank {
    let action = match rule.action {
        Action::Deny => 0u64,
        Action::Allow => 1,
    };
    (action << 32) | u64::from(pos)
}

/// L4 words `lo..=hi` (u64, so `hi + 1` cannot overflow) with a constant decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    lo: u64,
    hi: u64,
    /// Over enforcing rules.
    verdict: Rank,
    /// Over all rules.
    audit: Rank,
}

/// The decisions of a rule set over the L4 word space: sorted, disjoint pieces, none without a
/// decision, no two adjacent ones equal.
type Pieces = Rc<Vec<Piece>>;

fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if p.verdict == NO_RULE && p.audit == NO_RULE {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.hi + 1 == p.lo
        && (last.verdict, last.audit) == (p.verdict, p.audit)
    {
        last.hi = p.hi;
        return;
    }
    out.push(p);
}

/// Sweeps rules' L4 ranges into pieces: every range start and end is an event; between two
/// events the set of covering rules, and so the decision, is constant. O(k log k) for k ranges.
fn sweep(rules: &[u32], policy: &HostPolicy, ranges: &[RangeSet]) -> Vec<Piece> {
    // One rule (the common case: a prefix of its own): its ranges are already the pieces.
    if let [pos] = rules {
        let Some(rule) = policy.rules.get(*pos as usize) else {
            return Vec::new();
        };
        let r = rank(rule, *pos);
        let verdict = if rule.enforcing() { r } else { NO_RULE };
        let mut out = Vec::new();
        for range in ranges.get(*pos as usize).map_or(&[][..], |s| s.ranges()) {
            let piece = Piece { lo: range.lo as u64, hi: range.hi as u64, verdict, audit: r };
            push_piece(&mut out, piece);
        }
        return out;
    }
    // (point, is_start, rule position); an end event sits at `hi + 1`.
    let mut events: Vec<(u64, bool, u32)> = Vec::new();
    for &pos in rules {
        for r in ranges.get(pos as usize).map_or(&[][..], |s| s.ranges()) {
            events.push((r.lo as u64, true, pos));
            events.push((r.hi as u64 + 1, false, pos));
        }
    }
    events.sort_unstable();
    // Ranks of the rules covering the current point, sorted; the first is the decision.
    // Sorted vectors rather than `BTreeSet`s: a sweep covers a class's own rules, a handful
    // at a time, and the sets' node allocations were a visible part of the compile.
    let mut verdict: Vec<Rank> = Vec::new();
    let mut audit: Vec<Rank> = Vec::new();
    let insert = |v: &mut Vec<Rank>, r: Rank| {
        if let Err(i) = v.binary_search(&r) {
            v.insert(i, r);
        }
    };
    let remove = |v: &mut Vec<Rank>, r: Rank| {
        if let Ok(i) = v.binary_search(&r) {
            v.remove(i);
        }
    };
    let mut out = Vec::new();
    let mut e = 0;
    while let Some(&(point, _, _)) = events.get(e) {
        while let Some(&(p, start, pos)) = events.get(e) {
            if p != point {
                break;
            }
            if let Some(rule) = policy.rules.get(pos as usize) {
                let r = rank(rule, pos);
                if start {
                    if rule.enforcing() {
                        insert(&mut verdict, r);
                    }
                    insert(&mut audit, r);
                } else {
                    remove(&mut verdict, r);
                    remove(&mut audit, r);
                }
            }
            e += 1;
        }
        let Some(&(next, _, _)) = events.get(e) else {
            break;
        };
        let piece = Piece {
            lo: point,
            hi: next - 1,
            verdict: verdict.first().copied().unwrap_or(NO_RULE),
            audit: audit.first().copied().unwrap_or(NO_RULE),
        };
        push_piece(&mut out, piece);
    }
    out
}

/// The decisions of the union of two rule sets: the pointwise minimum, in one merge pass.
fn combine(a: &[Piece], b: &[Piece]) -> Vec<Piece> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    // Everything below `at` is done.
    let mut at: u64 = 0;
    loop {
        while a.get(i).is_some_and(|p| p.hi < at) {
            i += 1;
        }
        while b.get(j).is_some_and(|p| p.hi < at) {
            j += 1;
        }
        let (pa, pb) = (a.get(i), b.get(j));
        let start = match (pa, pb) {
            (None, None) => break,
            (Some(x), None) | (None, Some(x)) => x.lo.max(at),
            (Some(x), Some(y)) => x.lo.min(y.lo).max(at),
        };
        // The piece runs to the first boundary after `start` of either side.
        let mut piece = Piece { lo: start, hi: u64::MAX, verdict: NO_RULE, audit: NO_RULE };
        for p in [pa, pb].into_iter().flatten() {
            if p.lo <= start {
                piece.hi = piece.hi.min(p.hi);
                piece.verdict = piece.verdict.min(p.verdict);
                piece.audit = piece.audit.min(p.audit);
            } else {
                piece.hi = piece.hi.min(p.lo - 1);
            }
        }
        push_piece(&mut out, piece);
        at = piece.hi + 1;
    }
    out
}

/// One entry of a nested L4 table (a workload-0 table): the prefix `bits/len` of the L4 word
/// and the decision of the rules that cover the whole prefix.
///
/// The kernel's L4 table is an LPM trie, so a table may hold a prefix and prefixes inside it:
/// the longest one containing a word answers. Take the prefixes of the minimal covers of the
/// rules' L4 ranges and give each the decision of the rules covering all of it. For any word
/// `w`, let `P` be the longest of those prefixes containing `w`: a rule matching `w` matches it
/// through a prefix of its cover that contains `w`, no longer than `P`, so containing `P`; so
/// the rules matching `w` are exactly those covering all of `P`, and `P`'s decision is `w`'s.
/// A prefix whose decision equals that of the nearest prefix enclosing it is left out (the
/// lookup then lands on that one), so every entry differs from its parent. This writes about
/// one entry per distinct port prefix of the rules, where cutting the decisions into disjoint
/// prefixes wrote up to 2 × 32 per hole in a wide rule (a `proto: any` or port-less rule
/// around a few port rules), which was most of the L4 entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    /// The L4 word's first `len` bits, the rest zero.
    bits: u32,
    len: u8,
    /// Over enforcing rules.
    verdict: Rank,
    /// Over all rules.
    audit: Rank,
}

impl Entry {
    /// Trie preorder: an enclosing prefix sorts before everything inside it.
    fn order(&self) -> (u32, u8) {
        (self.bits, self.len)
    }

    /// The last word of the prefix.
    fn last(&self) -> u32 {
        self.bits | low_mask(32 - u32::from(self.len).min(32)) as u32
    }
}

/// A nested table, in trie preorder, every entry differing from its nearest enclosing entry.
type Entries = Rc<Vec<Entry>>;

/// Nests `items` (in trie preorder; several items may share a prefix) into a table: each
/// prefix's decision is the minimum over its items and the prefixes enclosing it. `items`
/// may be an earlier table's entries (whose decisions already include their enclosing
/// prefixes') merged with more rules' prefixes: that is how a class's table is its parent's
/// plus its own rules, in one linear pass.
fn nest(items: impl Iterator<Item = Entry>, out: &mut Vec<Entry>) {
    // The emitted entries enclosing the current prefix.
    let mut stack: Vec<Entry> = Vec::new();
    let mut items = items.peekable();
    while let Some(mut e) = items.next() {
        while let Some(next) = items.next_if(|n| n.order() == e.order()) {
            e.verdict = e.verdict.min(next.verdict);
            e.audit = e.audit.min(next.audit);
        }
        while stack.last().is_some_and(|s| s.last() < e.bits) {
            stack.pop();
        }
        let (verdict, audit) = stack.last().map_or((NO_RULE, NO_RULE), |s| (s.verdict, s.audit));
        e.verdict = e.verdict.min(verdict);
        e.audit = e.audit.min(audit);
        if (e.verdict, e.audit) != (verdict, audit) {
            out.push(e);
            stack.push(e);
        }
    }
}

/// Merges two sequences in trie preorder.
fn merge_preorder<'x>(a: &'x [Entry], b: &'x [Entry]) -> impl Iterator<Item = Entry> + 'x {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || match (a.get(i), b.get(j)) {
        (Some(x), Some(y)) if y.order() < x.order() => {
            j += 1;
            Some(*y)
        }
        (Some(x), _) => {
            i += 1;
            Some(*x)
        }
        (None, Some(y)) => {
            j += 1;
            Some(*y)
        }
        (None, None) => None,
    })
}

/// The decisions of a nested table as disjoint pieces (what the workload deltas compare
/// against): walks the table in preorder, the innermost enclosing entry deciding each gap.
fn pieces_of(entries: &[Entry]) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut stack: Vec<&Entry> = Vec::new();
    // Everything below `at` is done.
    let mut at: u64 = 0;
    // The words from `at` to `to` are decided by `s`.
    fn close(s: &Entry, to: u64, at: &mut u64, out: &mut Vec<Piece>) {
        if *at <= to {
            push_piece(out, Piece { lo: *at, hi: to, verdict: s.verdict, audit: s.audit });
            *at = to + 1;
        }
    }
    for e in entries {
        while let Some(s) = stack.last().copied().filter(|s| s.last() < e.bits) {
            close(s, u64::from(s.last()), &mut at, &mut out);
            stack.pop();
        }
        if let Some(s) = stack.last()
            && e.bits > 0
        {
            close(s, u64::from(e.bits) - 1, &mut at, &mut out);
        }
        at = u64::from(e.bits);
        stack.push(e);
    }
    while let Some(s) = stack.pop() {
        close(s, u64::from(s.last()), &mut at, &mut out);
    }
    out
}

/// Per anchor: the workloads whose workload rules beat the anchor's base decisions somewhere,
/// each with those pieces (the workload rules' decisions), by workload id.
type WorkloadList = Rc<Vec<(WorkloadId, Pieces)>>;

/// An anchor's own rules with workloads, and the workloads they apply to.
type OwnWorkloadRules = (Vec<u32>, Vec<WorkloadId>);

/// Builds the L4 tables of the rule sets of one direction.
///
/// The base table (rules without workloads: what workload 0 sees, and what every workload
/// falls back to on a miss) of a set made as `parent ∪ own` by the LPM walk is the parent's
/// nested table with the own rules' prefixes merged in (`base`, [`nest`]), so the rules a
/// class shares with its enclosing prefixes are merged once, not once per class.
///
/// Workload tables are deltas. A workload `W` sees the base rules plus the workload rules that
/// apply to it, so its decision is `min(base, extra(W))` and can only differ from the base
/// decision where `extra(W)` ranks better. Because the lookup falls back to workload 0 on a
/// miss, the (class, W) table holds entries only for those words; everywhere else the
/// (class, 0) entry, or its absence, is already W's answer. `extra(W)` involves only workload
/// rules, so it is small and is built along the derivation only through the sets whose own
/// rules include workload rules ("anchors"); the full per-(class, W) decisions never exist.
///
/// A class's base is at least as good as its anchor's (it has more rules), so where `extra(W)`
/// does not beat the anchor's base it cannot beat the class's either. Each anchor therefore
/// keeps only the workloads, and the pieces, where it does (`workload_list`), and a class
/// visits just those instead of every workload below one of its workload rules.
struct L4Builder<'a> {
    policy: &'a HostPolicy,
    /// Per rule position: its ranges in the L4 word space.
    ranges: &'a [RangeSet],
    /// Per rule position: the minimal prefix cover of its ranges, in preorder.
    prefixes: &'a [Vec<(u32, u8)>],
    /// Per set: the nested table of its rules without workloads (see [`Entry`]).
    base: Vec<Option<Entries>>,
    /// Per set: the nearest of itself and its derivation ancestors whose own rules include
    /// rules with workloads; `None` when there is none (no workload tables).
    anchor: Vec<Option<SetIdx>>,
    /// Per rule position: the workloads the rule applies to (those at or below one of its
    /// paths), sorted; empty for rules without workloads and in directions without them.
    applies: &'a [Vec<WorkloadId>],
    /// Per anchor: its own rules with workloads, and the workloads they apply to (sorted);
    /// empty for other sets.
    own_workload_rules: Vec<OwnWorkloadRules>,
    /// (anchor set, workload) -> decisions of the workload rules of the anchor and its
    /// ancestors that apply to the workload.
    extra: FastMap<(SetIdx, WorkloadId), Pieces>,
    /// Per anchor: see [`WorkloadList`].
    lists: Vec<Option<WorkloadList>>,
    empty: Pieces,
}

impl<'a> L4Builder<'a> {
    /// `applies`: see the field; `None` when the direction has no workload tables (ingress).
    fn new(
        policy: &'a HostPolicy,
        ranges: &'a [RangeSet],
        prefixes: &'a [Vec<(u32, u8)>],
        sets: &RuleSets,
        applies: Option<&'a [Vec<WorkloadId>]>,
    ) -> Self {
        let n = sets.len();
        let mut anchor: Vec<Option<SetIdx>> = Vec::with_capacity(n);
        let mut own_workload_rules = Vec::with_capacity(n);
        for i in 0..n {
            let mut own_rules: OwnWorkloadRules = (Vec::new(), Vec::new());
            let mut a = None;
            if let (Some(applies), Some((parent, own))) = (applies, sets.derivation(i)) {
                own_rules.0 = own
                    .iter()
                    .copied()
                    .filter(|&p| {
                        policy.rules.get(p as usize).is_some_and(|r| !r.workloads.is_empty())
                    })
                    .collect();
                if own_rules.0.is_empty() {
                    // Parents come first, so their entries exist.
                    a = anchor.get(*parent).copied().flatten();
                } else {
                    own_rules.1 = own_rules
                        .0
                        .iter()
                        .filter_map(|&p| applies.get(p as usize))
                        .flatten()
                        .copied()
                        .collect();
                    own_rules.1.sort_unstable();
                    own_rules.1.dedup();
                    a = Some(i);
                }
            }
            anchor.push(a);
            own_workload_rules.push(own_rules);
        }
        Self {
            policy,
            ranges,
            prefixes,
            base: vec![None; n],
            applies: applies.unwrap_or_default(),
            anchor,
            own_workload_rules,
            extra: FastMap::default(),
            lists: vec![None; n],
            empty: Rc::default(),
        }
    }

    /// The nested table of `set`'s rules without workloads: its parent's table with the own
    /// rules' prefixes merged in ([`nest`]). Recurses along the derivation chain, which is at
    /// most one step per prefix length.
    fn base(&mut self, sets: &RuleSets, set: SetIdx) -> Entries {
        if let Some(Some(p)) = self.base.get(set) {
            return p.clone();
        }
        let result = match sets.derivation(set) {
            None => Rc::new(Vec::new()),
            Some((parent, own)) => {
                let base = self.base(sets, *parent);
                let mut items: Vec<Entry> = Vec::new();
                for &pos in own.iter() {
                    let Some(rule) = self.policy.rules.get(pos as usize) else { continue };
                    if !rule.workloads.is_empty() {
                        continue;
                    }
                    let r = rank(rule, pos);
                    let verdict = if rule.enforcing() { r } else { NO_RULE };
                    let cover = self.prefixes.get(pos as usize).map_or(&[][..], Vec::as_slice);
                    items.extend(cover.iter().map(|&(bits, len)| Entry {
                        bits,
                        len,
                        verdict,
                        audit: r,
                    }));
                }
                if items.is_empty() {
                    base
                } else {
                    items.sort_unstable_by_key(Entry::order);
                    let mut out = Vec::with_capacity(base.len() + items.len());
                    nest(merge_preorder(&base, &items), &mut out);
                    Rc::new(out)
                }
            }
        };
        if let Some(slot) = self.base.get_mut(set) {
            *slot = Some(result.clone());
        }
        result
    }

    /// Decisions of `set`'s rules with workloads that apply to workload `w`. Only anchors
    /// whose own rules apply to `w` contribute, so the walk skips the others (a binary search
    /// each) and memoises per contributing anchor.
    fn extra(&mut self, sets: &RuleSets, set: SetIdx, w: WorkloadId) -> Pieces {
        let mut at = self.anchor.get(set).copied().flatten();
        while let Some(a) = at {
            let applies = self
                .own_workload_rules
                .get(a)
                .is_some_and(|(_, own)| own.binary_search(&w).is_ok());
            if applies {
                break;
            }
            at = sets
                .derivation(a)
                .and_then(|(parent, _)| self.anchor.get(*parent).copied().flatten());
        }
        let Some(anchor) = at else {
            return self.empty.clone();
        };
        if let Some(p) = self.extra.get(&(anchor, w)) {
            return p.clone();
        }
        let inherited = match sets.derivation(anchor) {
            Some((parent, _)) => self.extra(sets, *parent, w),
            None => self.empty.clone(),
        };
        let applicable: Vec<u32> = self
            .own_workload_rules
            .get(anchor)
            .map(|(rules, _)| {
                rules
                    .iter()
                    .copied()
                    .filter(|&p| {
                        self.applies.get(p as usize).is_some_and(|a| a.binary_search(&w).is_ok())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let own_pieces = sweep(&applicable, self.policy, self.ranges);
        let result = if own_pieces.is_empty() {
            inherited
        } else {
            Rc::new(combine(&inherited, &own_pieces))
        };
        self.extra.insert((anchor, w), result.clone());
        result
    }

    /// The workload list of `set`'s anchor (see [`WorkloadList`]): the parent anchor's list,
    /// with the workloads of the anchor's own rules recomputed.
    fn workload_list(&mut self, sets: &RuleSets, set: SetIdx) -> WorkloadList {
        let Some(a) = self.anchor.get(set).copied().flatten() else {
            return Rc::default();
        };
        if let Some(Some(list)) = self.lists.get(a) {
            return list.clone();
        }
        let inherited = match sets.derivation(a) {
            Some((parent, _)) => self.workload_list(sets, *parent),
            None => Rc::default(),
        };
        let own = self.own_workload_rules.get(a).map(|(_, own)| own.clone()).unwrap_or_default();
        let base = pieces_of(&self.base(sets, a));
        let mut out: Vec<(WorkloadId, Pieces)> = Vec::new();
        for &w in &own {
            let extra = self.extra(sets, a, w);
            let better = overlay(&base, &extra);
            if !better.is_empty() {
                out.push((w, Rc::new(better)));
            }
        }
        // The rest keep their parent's pieces: the parent's base is no better than this one's.
        out.extend(inherited.iter().filter(|(w, _)| own.binary_search(w).is_err()).cloned());
        out.sort_unstable_by_key(|(w, _)| *w);
        let list = Rc::new(out);
        if let Some(slot) = self.lists.get_mut(a) {
            *slot = Some(list.clone());
        }
        list
    }

    fn decision(&self, r: Rank) -> Decision {
        if r == NO_RULE {
            return Decision::None;
        }
        match self.policy.rules.get((r & u64::from(u32::MAX)) as usize) {
            Some(rule) if r >> 32 == 0 => Decision::Deny(rule.id),
            Some(rule) => Decision::Allow(rule.id),
            None => Decision::None,
        }
    }

    /// Appends the entries of a nested table (class, workload), sorted in key order, so that
    /// tables emitted in (class, workload) order make a sorted vector.
    fn emit(
        &self,
        entries: &[Entry],
        class: ClassId,
        workload: WorkloadId,
        scratch: &mut Vec<(L4Key, L4Value)>,
        out: &mut Vec<(L4Key, L4Value)>,
    ) {
        let start = out.len();
        out.extend(entries.iter().map(|e| {
            let key = L4Key { class, workload, prefix_len: e.len, bits: e.bits };
            (key, L4Value { verdict: self.decision(e.verdict), audit: self.decision(e.audit) })
        }));
        // Preorder is address order.
        if let Some(chunk) = out.get_mut(start..) {
            sort_by_length(chunk, scratch);
        }
    }
}

/// Puts one (class, workload)'s entries, given in address order, into key order: (prefix
/// length, bits). For each length the bits already increase, so a stable counting sort by
/// length (33 buckets) does it in linear time.
fn sort_by_length(chunk: &mut [(L4Key, L4Value)], scratch: &mut Vec<(L4Key, L4Value)>) {
    let mut count = [0usize; 34];
    for (k, _) in chunk.iter() {
        if let Some(c) = count.get_mut(usize::from(k.prefix_len.min(32)) + 1) {
            *c += 1;
        }
    }
    // Exclusive prefix sums: count[len] = entries shorter than `len`.
    let mut sum = 0;
    for c in count.iter_mut() {
        sum += *c;
        *c = sum;
    }
    scratch.clear();
    scratch.extend_from_slice(chunk);
    for entry in scratch.iter() {
        if let Some(at) = count.get_mut(usize::from(entry.0.prefix_len.min(32))) {
            if let Some(dst) = chunk.get_mut(*at) {
                *dst = *entry;
            }
            *at += 1;
        }
    }
}

/// The pieces of `extra` where `min(base, extra)` differs from `base`, that is where `extra`
/// ranks better in verdict or audit, with `extra`'s decisions. For each piece of `extra`, the
/// base pieces it overlaps are found by binary search, so the cost is about
/// `|extra| log |base|` plus the overlap, not `|base|` per (anchor, workload).
fn overlay(base: &[Piece], extra: &[Piece]) -> Vec<Piece> {
    let mut out = Vec::new();
    for e in extra {
        let mut k = base.partition_point(|b| b.hi < e.lo);
        let mut at = e.lo;
        while at <= e.hi {
            // The base decision on `at..=hi`: a base piece, or a gap (no rule) before the next.
            let (hi, verdict, audit) = match base.get(k) {
                Some(b) if b.lo <= at => (b.hi.min(e.hi), b.verdict, b.audit),
                // `b.lo > at >= 0`, so `b.lo - 1` cannot underflow.
                Some(b) => ((b.lo - 1).min(e.hi), NO_RULE, NO_RULE),
                None => (e.hi, NO_RULE, NO_RULE),
            };
            let min = (verdict.min(e.verdict), audit.min(e.audit));
            if min != (verdict, audit) {
                push_piece(&mut out, Piece { lo: at, hi, verdict: e.verdict, audit: e.audit });
            }
            // `hi <= e.hi <= u32::MAX` in a u64: no overflow.
            at = hi + 1;
            while base.get(k).is_some_and(|b| b.hi < at) {
                k += 1;
            }
        }
    }
    out
}

/// The table of one (class, workload): where the workload's rules (`better`: their pieces
/// where they beat the anchor's base, see [`WorkloadList`]) beat the class's workload-0
/// table `base`, the combined decision `min(base, extra)`; elsewhere nothing, so that the
/// lookup falls back to workload 0.
///
/// Nested like `base` (see [`Entry`]): each piece of `better` is cut into aligned prefixes
/// `T` with the workload's decision `e`. Where `e` beats the base decision around `T` (the
/// base's longest entry containing `T`), `T` holds `min(base, e)`, and every base entry
/// inside `T` is repeated with `min(its decision, e)`, so that the longest entry of this
/// table gives the combined decision for every word in `T`, as the base table gives the base
/// one. Where `e` does not beat the decision around `T`, it beats none inside either (those
/// are at least as good: more rules cover them), so `T` is left out and the lookup falls
/// back to workload 0. A base entry that beats `e` is one entry here, where cutting the
/// difference into disjoint prefixes wrote up to 2 × 32 around it.
fn workload_table(
    base: &[Entry],
    better: &[Piece],
    prefixes: &mut Vec<(u128, u8)>,
    scratch: &mut Vec<Entry>,
    out: &mut Vec<Entry>,
) {
    // Drops the entries that end before `at` from a stack of enclosing entries.
    fn pop_before(enclosing: &mut Vec<&Entry>, at: u32) {
        while enclosing.last().is_some_and(|e| e.last() < at) {
            enclosing.pop();
        }
    }
    // The base entries enclosing the current position, and the next base entry.
    let mut enclosing: Vec<&Entry> = Vec::new();
    let mut next = 0;
    for piece in better {
        prefixes.clear();
        range_to_prefixes(u128::from(piece.lo), u128::from(piece.hi), 32, prefixes);
        for &(bits, len) in prefixes.iter() {
            let t = Entry { bits: bits as u32, len, verdict: piece.verdict, audit: piece.audit };
            // Base entries up to `t` in preorder either enclose `t` (or are `t`) or lie
            // wholly before it.
            while let Some(b) = base.get(next).filter(|b| b.order() <= t.order()) {
                pop_before(&mut enclosing, b.bits);
                enclosing.push(b);
                next += 1;
            }
            pop_before(&mut enclosing, t.bits);
            let (verdict, audit) =
                enclosing.last().map_or((NO_RULE, NO_RULE), |e| (e.verdict, e.audit));
            if t.verdict >= verdict && t.audit >= audit {
                continue;
            }
            scratch.clear();
            scratch.push(Entry { verdict: t.verdict.min(verdict), audit: t.audit.min(audit), ..t });
            // The base entries inside `t`.
            while let Some(b) = base.get(next).filter(|b| b.bits <= t.last()) {
                scratch.push(Entry {
                    verdict: b.verdict.min(t.verdict),
                    audit: b.audit.min(t.audit),
                    ..*b
                });
                pop_before(&mut enclosing, b.bits);
                enclosing.push(b);
                next += 1;
            }
            nest(scratch.drain(..), out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// `path` itself, then each ancestor obtained by cutting at a `/` (deepest first): the paths
/// that `path` is within, on segment boundaries.
fn path_and_ancestors(path: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(path), |p| p.rfind('/').map(|i| &p[..i]))
}

/// Whether a rule applies to the process at `path`: what the per-rule workload lists of
/// `compile_with` (`applies`) precompute for every table path; kept as their reference.
#[cfg(test)]
fn workload_applies(rule: &ResolvedRule, path: &str) -> bool {
    rule.workloads.is_empty()
        || path_and_ancestors(path).any(|a| rule.workloads.iter().any(|w| w == a))
}

// ---------------------------------------------------------------------------------------------
// Compile
// ---------------------------------------------------------------------------------------------

/// The compiled address tables of one direction, before class ids exist.
struct DirectionLpm {
    /// Prefix -> (wide set, narrow set), in trie preorder.
    v4: Vec<((u128, u8), (SetIdx, SetIdx))>,
    v6: Vec<((u128, u8), (SetIdx, SetIdx))>,
    /// Per rule position: how many prefixes it contributed (for capacity diagnostics).
    contributed: Vec<(u32, usize, usize)>,
    /// Positions of the rules without an address restriction (peers covering every address of
    /// both families): they go to the shared L4 table, not into the walks.
    shared: Vec<u32>,
}

/// The layer split (`mapstate`, "Layers"): per family, a prefix of at most this length
/// belongs to the wide layer, a longer one to the narrow layer. Every split gives the same
/// verdicts; only the tables' sizes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub v4: u8,
    pub v6: u8,
}

impl Split {
    /// The split the compiler uses, chosen by measurement on the benchmark's generated fleet
    /// (`docs/benchmarks.md`): of the IPv4 splits tried (/0, /16, /20, /22, /23, /24, /25,
    /// /26, /28, /31), /24 left the fewest L4 entries (the `/24`s and the larger blocks that
    /// hold hosts and small subnets on one side, those hosts and subnets on the other); with
    /// it, IPv6 /64 and /96 gave the same count. `/0` (everything narrow) is the layout
    /// without layers.
    pub const DEFAULT: Split = Split { v4: 24, v6: 64 };

    fn of(self, family: Family) -> u8 {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// Whether a rule's prefix lists cover every IPv4 and every IPv6 address: `0.0.0.0/0` and
/// `::/0` (from `any`, or from addresses that flatten to both).
fn unrestricted(p4: &[(u128, u8)], p6: &[(u128, u8)]) -> bool {
    p4 == [(0, 0)] && p6 == [(0, 0)]
}

fn build_direction_lpm(
    policy: &HostPolicy,
    direction: Direction,
    split: Split,
    flattener: &mut Flattener,
    sets: &mut RuleSets,
) -> DirectionLpm {
    // Rules with the same flattened prefix list (the same set, memoised by the flattener)
    // form one group and enter the walks once, not once per rule: ten thousand rules on one
    // set of a thousand prefixes make a thousand pairs, not ten million. A group's prefixes
    // are split between the two layers' walks; in each walk a rule is still in one group.
    let mut group_of: FastMap<*const Vec<(u128, u8)>, u32> = FastMap::default();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    // Holds every list whose address is a key above, so no address is reused.
    let mut lists: Vec<Prefixes> = Vec::new();
    // Per family: (network, length, group) pairs.
    let (mut p4_pairs, mut p6_pairs) = (Vec::new(), Vec::new());
    let mut contributed = Vec::new();
    let mut shared = Vec::new();
    for (pos, rule) in policy.rules.iter().enumerate() {
        if rule.direction != direction {
            continue;
        }
        let pos = pos as u32;
        let p4 = flattener.rule_prefixes(rule, Family::V4);
        let p6 = flattener.rule_prefixes(rule, Family::V6);
        contributed.push((pos, p4.len(), p6.len()));
        // In every class of the wide layer: kept out of the walks, so the classes (and the
        // tries) only split on rules with an address restriction, and their decisions are
        // written once, in the shared table.
        if unrestricted(&p4, &p6) {
            shared.push(pos);
            continue;
        }
        for (list, fam) in [(p4, &mut p4_pairs), (p6, &mut p6_pairs)] {
            if list.is_empty() {
                continue;
            }
            let g = *group_of.entry(Rc::as_ptr(&list)).or_insert_with(|| {
                let g = groups.len() as u32;
                groups.push(Vec::new());
                fam.extend(list.iter().map(|&(a, l)| (a, l, g)));
                lists.push(list.clone());
                g
            });
            if let Some(members) = groups.get_mut(g as usize) {
                members.push(pos);
            }
        }
    }
    let fps = groups
        .iter()
        .map(|members| {
            members
                .iter()
                .filter_map(|&pos| policy.rules.get(pos as usize))
                .fold(Fingerprint::default(), |acc, r| acc.add(Fingerprint::of_rule(r.id.0)))
        })
        .collect();
    let groups = Groups { members: groups.into_iter().map(Arc::from).collect(), fps };
    let mut layers = |pairs: Vec<(u128, u8, u32)>, family: Family| {
        let cut = split.of(family);
        let (wide, narrow): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|p| p.1 <= cut);
        let bits = family.bits();
        let wide = build_lpm(wide, &groups, bits, sets);
        let narrow = build_lpm(narrow, &groups, bits, sets);
        merge_layers(wide, narrow, bits)
    };
    let v4 = layers(p4_pairs, Family::V4);
    let v6 = layers(p6_pairs, Family::V6);
    DirectionLpm { v4, v6, contributed, shared }
}

/// One LPM table from the two layers' tables (each in trie preorder, each with its `/0`
/// root): every prefix of either, valued with the wide and the narrow set of its region,
/// each inherited from the nearest enclosing prefix of that layer when the prefix is not
/// one of that layer's. An entry equal to its enclosing entry is dropped.
fn merge_layers(
    wide: Vec<((u128, u8), SetIdx)>,
    narrow: Vec<((u128, u8), SetIdx)>,
    bits: u32,
) -> Vec<((u128, u8), (SetIdx, SetIdx))> {
    let root_of = |l: &[((u128, u8), SetIdx)]| {
        l.first().filter(|(p, _)| *p == (0, 0)).map_or(RuleSets::EMPTY, |e| e.1)
    };
    let root = (root_of(&wide), root_of(&narrow));
    let mut out = Vec::with_capacity(wide.len() + narrow.len());
    out.push(((0u128, 0u8), root));
    // (first address, last address, sets) of the entries enclosing the current one.
    let mut stack: Vec<(u128, u128, (SetIdx, SetIdx))> = vec![(0, low_mask(bits), root)];
    let mut w = wide.iter().filter(|(p, _)| *p != (0, 0)).peekable();
    let mut n = narrow.iter().filter(|(p, _)| *p != (0, 0)).peekable();
    loop {
        // The next prefix in preorder, from whichever layer has it first.
        let (prefix, set, is_narrow) = match (w.peek(), n.peek()) {
            (None, None) => break,
            (Some(&&(p, s)), None) => (p, s, false),
            (None, Some(&&(p, s))) => (p, s, true),
            (Some(&&(pw, sw)), Some(&&(pn, sn))) => {
                if pn < pw {
                    (pn, sn, true)
                } else {
                    (pw, sw, false)
                }
            }
        };
        if is_narrow {
            n.next();
        } else {
            w.next();
        }
        let (addr, len) = prefix;
        let last = addr | low_mask(bits.saturating_sub(u32::from(len)));
        while stack.last().is_some_and(|&(lo, hi, _)| !(lo <= addr && last <= hi)) {
            stack.pop();
        }
        let parent = stack.last().map_or(root, |t| t.2);
        let sets = if is_narrow { (parent.0, set) } else { (set, parent.1) };
        if sets != parent {
            out.push((prefix, sets));
            stack.push((addr, last, sets));
        }
    }
    out
}

/// From this many rules on, `compile_with` builds the two directions and the rules table on
/// threads of their own.
const PARALLEL_MIN_RULES: usize = 4096;

/// Compiles one host's policy into map state, or explains why it does not fit.
pub fn compile(policy: &HostPolicy, caps: &Capacities) -> Result<MapState, Vec<Diagnostic>> {
    compile_with(policy, caps, Split::DEFAULT)
}

/// What [`compile_reusing`] keeps between compiles: per direction, the address half of the
/// last compile (its rule sets, classes and prefix tables) and what it depended on, for a
/// direction of at most `rule_budget` rules. Like the parse cache (`crate::cache`), it keeps
/// what is cheap to hold: the tables of a few rules over large address sets are a few bytes
/// per prefix, while those of 100k rules each with an address of its own are about 250 bytes
/// per rule (a rule set and a class each), tens of MB to save less than their build time.
#[derive(Debug)]
pub struct CompileMemo {
    rule_budget: usize,
    ingress: Option<AddressTables>,
    egress: Option<AddressTables>,
}

impl Default for CompileMemo {
    fn default() -> Self {
        Self::with_rule_budget(crate::cache::DEFAULT_RULE_BUDGET)
    }
}

impl CompileMemo {
    /// A memo that keeps a direction's tables when it has at most `rules` rules.
    pub fn with_rule_budget(rules: usize) -> Self {
        Self { rule_budget: rules, ingress: None, egress: None }
    }
}

/// [`compile`], for a caller that compiles state after state (a daemon following a
/// repository): a direction whose rules have the same positions, ids and peers as in the last
/// compile through `memo` takes its prefix tables and classes from there instead of
/// flattening and walking its prefixes again (tens of milliseconds at 100k prefixes, for a
/// change that only touches ports). The result is [`compile`]'s: the tables are a function of
/// exactly what is compared (`AddressKey`), and the tests hold the two equal over sequences of
/// changes.
pub fn compile_reusing(
    policy: &HostPolicy,
    caps: &Capacities,
    memo: &mut CompileMemo,
) -> Result<MapState, Vec<Diagnostic>> {
    let parallel = policy.rules.len() >= PARALLEL_MIN_RULES
        && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    compile_on(policy, caps, Split::DEFAULT, parallel, memo)
}

/// [`compile`] with a given layer split (benchmarks and tests compare splits; every split
/// gives the same verdicts, only the tables' sizes differ).
pub fn compile_with(
    policy: &HostPolicy,
    caps: &Capacities,
    split: Split,
) -> Result<MapState, Vec<Diagnostic>> {
    // The two directions and the rules table on threads of their own for large inputs: they
    // take comparable time and share only read-only inputs. Small ones stay on the calling
    // thread, where a thread would cost more than it saves.
    let parallel = policy.rules.len() >= PARALLEL_MIN_RULES
        && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    compile_on(policy, caps, split, parallel, &mut CompileMemo::default())
}

/// [`compile_with`] on one thread or three; the result is the same either way.
fn compile_on(
    policy: &HostPolicy,
    caps: &Capacities,
    split: Split,
    parallel: bool,
    memo: &mut CompileMemo,
) -> Result<MapState, Vec<Diagnostic>> {
    let (workloads, applies) = workload_tables(policy);
    let budget = memo.rule_budget;
    let direction = |d, flattener: &mut Flattener, memo: &mut Option<AddressTables>| {
        compile_direction(policy, d, caps, split, &applies, flattener, (memo, budget))
    };
    // Egress may run on a thread of its own or here: its memo goes to whichever does.
    let egress_memo = std::sync::Mutex::new(memo.egress.take());
    let egress_direction = |flattener: &mut Flattener| {
        let mut m = egress_memo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        direction(Direction::Egress, flattener, &mut m)
    };
    let ingress_memo = &mut memo.ingress;
    let ((ingress, mut diagnostics), (egress, egress_diagnostics), rules) =
        std::thread::scope(|scope| {
            // Egress and the rules table on threads of their own, ingress here. On the
            // benchmark fleet at 100k rules the two directions take about the same CPU time
            // and the rules table about half of one; with the rules table after ingress on
            // the calling thread, that thread had 1.5 units of work and the other 1, so on
            // two cores the system now spreads 2.5 units instead of waiting for 1.5. Without
            // threads (none wanted, or the system would not start one) each runs here in
            // turn.
            let egress = parallel
                .then(|| {
                    std::thread::Builder::new()
                        .spawn_scoped(scope, || egress_direction(&mut Flattener::default()))
                        .ok()
                })
                .flatten();
            let rules = parallel
                .then(|| {
                    std::thread::Builder::new().spawn_scoped(scope, || rules_table(policy)).ok()
                })
                .flatten();
            // Directions built on this thread share one flattener, so a set that rules of
            // both use is flattened once (the prefix benchmark's million-prefix sets, used
            // on both, were flattened twice). A thread of its own has its own.
            let mut flattener = Flattener::default();
            let ingress = direction(Direction::Ingress, &mut flattener, ingress_memo);
            let egress = join_or(egress, || egress_direction(&mut flattener));
            let rules = join_or(rules, || rules_table(policy));
            (ingress, egress, rules)
        });
    diagnostics.extend(egress_diagnostics);
    memo.egress = egress_memo.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);

    let overflow = |what: &str, n: usize, cap: u32| {
        Diagnostic::error(
            Code::CapacityExceeded,
            format!("{what}: {n} entries, capacity {cap}"),
        )
        .hint(
            "the data plane's maps are sized at load time; split the policy or raise the capacity",
        )
    };
    if rules.len() > caps.rules as usize {
        diagnostics.push(overflow("rules", rules.len(), caps.rules));
    }
    if workloads.len() > caps.workloads as usize {
        diagnostics.push(overflow("workloads", workloads.len(), caps.workloads));
    }
    if !diagnostics.is_empty() {
        return Err(diagnostics);
    }

    Ok(MapState { host: policy.host.clone(), ingress, egress, workloads, rules })
}

/// The workload table (every egress workload path, with its id) and, per rule position,
/// the workloads the rule applies to.
fn workload_tables(policy: &HostPolicy) -> (BTreeMap<String, WorkloadId>, Vec<Vec<WorkloadId>>) {
    // Workload classes: every egress workload path.
    let paths: BTreeSet<String> =
        policy.rules(Direction::Egress).flat_map(|r| r.workloads.iter().cloned()).collect();
    let workloads: BTreeMap<String, WorkloadId> =
        ids::assign(paths).into_iter().map(|(p, id)| (p, WorkloadId(id))).collect();
    // For each table path Q: the workloads whose path is Q or below Q.
    let mut below: HashMap<&str, Vec<WorkloadId>> = HashMap::new();
    for (path, &id) in &workloads {
        for a in path_and_ancestors(path) {
            if workloads.contains_key(a) {
                below.entry(a).or_default().push(id);
            }
        }
    }
    // Per rule: the workloads it applies to (`workload_applies`, for every table path).
    let applies: Vec<Vec<WorkloadId>> = policy
        .rules
        .iter()
        .map(|r| {
            let mut ids: Vec<WorkloadId> = r
                .workloads
                .iter()
                .filter_map(|q| below.get(q.as_str()))
                .flatten()
                .copied()
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        })
        .collect();
    (workloads, applies)
}

/// The result of a thread of `compile_on`, or of `otherwise` when there is none; a panic in
/// the thread goes on here.
fn join_or<T>(
    handle: Option<std::thread::ScopedJoinHandle<'_, T>>,
    otherwise: impl FnOnce() -> T,
) -> T {
    match handle {
        Some(h) => h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        None => otherwise(),
    }
}

/// What counters and events need to know about each rule, by id.
fn rules_table(policy: &HostPolicy) -> BTreeMap<RuleId, RuleInfo> {
    let ranks = ranks(policy);
    // In id order, so that `BTreeMap`'s bulk build finds its input sorted instead of
    // sorting the (large) `RuleInfo` values themselves.
    let mut by_id: Vec<(&ResolvedRule, u64)> = policy.rules.iter().zip(ranks).collect();
    by_id.sort_unstable_by_key(|(r, _)| r.id);
    // One copy of each policy's name, shared by its rules: the table is kept for as long as
    // the state is enforced.
    let mut names: HashMap<&str, Arc<str>> = HashMap::new();
    let mut scratch = String::new();
    by_id
        .into_iter()
        .map(|(r, rank)| {
            let policy = Arc::clone(
                names.entry(r.policy.as_str()).or_insert_with(|| Arc::from(r.policy.as_str())),
            );
            let info = RuleInfo {
                direction: r.direction,
                policy,
                index: r.index,
                name: r.name.clone(),
                action: r.action,
                audit: !r.enforcing(),
                log: r.log,
                location: r.location.clone(),
                summary: {
                    scratch.clear();
                    write_summary(r, &mut scratch);
                    scratch.as_str().to_owned()
                },
                rank,
            };
            (r.id, info)
        })
        .collect()
}

/// What the address half of one direction's compile depends on: the layer split and, for
/// each of the direction's rules, its position, its id and its peers (set contents compared in
/// full). Flattening, the prefix walks and the class numbering read nothing else, so equal keys
/// give equal tables. The peers of all rules are in one list (`peers`, each rule's ending at
/// its `rules` entry's offset): two allocations, not one per rule.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AddressKey {
    split: Split,
    rules: Vec<(u32, RuleId, u32)>,
    peers: Vec<AddrTerm>,
}

impl AddressKey {
    fn of(policy: &HostPolicy, direction: Direction, split: Split) -> Self {
        let mut rules = Vec::new();
        let mut peers = Vec::new();
        for (pos, rule) in policy.rules.iter().enumerate() {
            if rule.direction == direction {
                peers.extend(rule.peers.iter().cloned());
                rules.push((pos as u32, rule.id, peers.len() as u32));
            }
        }
        Self { split, rules, peers }
    }
}

/// The address half of one direction's compile (see [`AddressKey`]): the rule sets, the
/// classes in class-id order, and the prefix tables.
#[derive(Clone, Debug)]
struct AddressTables {
    key: AddressKey,
    sets: RuleSets,
    /// Per rule position: how many prefixes it contributed (for capacity diagnostics).
    contributed: Vec<(u32, usize, usize)>,
    /// Positions of the rules without an address restriction (the shared L4 table's).
    shared: Vec<u32>,
    classes: Vec<(ClassId, SetIdx)>,
    v4: BTreeMap<Ipv4Net, Classes>,
    v6: BTreeMap<Ipv6Net, Classes>,
}

impl AddressTables {
    /// The address half of a direction's compile: flatten the rules' peers, walk the prefixes
    /// into rule sets, number the classes and build the prefix tables.
    fn build(
        policy: &HostPolicy,
        direction: Direction,
        split: Split,
        flattener: &mut Flattener,
        key: AddressKey,
    ) -> Self {
        let mut sets = RuleSets::new();
        let lpm = build_direction_lpm(policy, direction, split, flattener, &mut sets);

        // Class ids: a hash of the fingerprint of each used set's rule ids, so a class keeps
        // its id while its rule set is unchanged. A set used in both layers is one class.
        let used: BTreeSet<SetIdx> =
            lpm.v4.iter().chain(&lpm.v6).flat_map(|&(_, (w, n))| [w, n]).collect();
        let keyed: Vec<(SetIdx, [u8; 16])> =
            used.iter().map(|&s| (s, sets.fingerprint(s).bytes())).collect();
        let assigned = ids::assign(keyed.iter().map(|(_, k)| *k));
        // In class-id order: the L4 entries are emitted in this order, already sorted.
        let mut classes: Vec<(ClassId, SetIdx)> = keyed
            .iter()
            .filter_map(|(s, k)| assigned.get(k).map(|&id| (ClassId(id), *s)))
            .collect();
        classes.sort_unstable();
        let class_of: FastMap<SetIdx, ClassId> = classes.iter().map(|&(c, s)| (s, c)).collect();
        let classes_of = |(w, n): (SetIdx, SetIdx)| {
            Some(Classes { wide: *class_of.get(&w)?, narrow: *class_of.get(&n)? })
        };

        // Maps are collected from vectors: `BTreeMap`'s `FromIterator` sorts and bulk-builds,
        // much faster than inserting entry by entry.
        let v4: BTreeMap<Ipv4Net, Classes> = lpm
            .v4
            .iter()
            .filter_map(|&((addr, len), s)| {
                let net = Ipv4Net::new(Ipv4Addr::from(addr as u32), len).ok()?;
                Some((net, classes_of(s)?))
            })
            .collect();
        let v6: BTreeMap<Ipv6Net, Classes> = lpm
            .v6
            .iter()
            .filter_map(|&((addr, len), s)| {
                let net = Ipv6Net::new(Ipv6Addr::from(addr), len).ok()?;
                Some((net, classes_of(s)?))
            })
            .collect();
        Self { key, sets, contributed: lpm.contributed, shared: lpm.shared, classes, v4, v6 }
    }
}

/// The maps of one direction, with the diagnostics of its capacities. Directions share
/// nothing but their read-only inputs, so `compile_with` may build the two at once.
fn compile_direction(
    policy: &HostPolicy,
    direction: Direction,
    caps: &Capacities,
    split: Split,
    applies: &[Vec<WorkloadId>],
    flattener: &mut Flattener,
    (memo, budget): (&mut Option<AddressTables>, usize),
) -> (DirectionMaps, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    // Per rule position: its L4 ranges and their prefixes (only the direction's rules).
    let l4_ranges: Vec<RangeSet> = policy
        .rules
        .iter()
        .map(|r| if r.direction == direction { rule_l4_ranges(r) } else { RangeSet::new() })
        .collect();
    let l4_prefixes: Vec<Vec<(u32, u8)>> = l4_ranges
        .iter()
        .map(|r| r.to_prefixes(32).into_iter().map(|(bits, len)| (bits as u32, len)).collect())
        .collect();
    // The address half: taken from the last compile when this direction's rules have the
    // same positions, ids and peers (`CompileMemo`), built otherwise.
    let key = AddressKey::of(policy, direction, split);
    let mut tables = match memo.take() {
        Some(t) if t.key == key => t,
        _ => AddressTables::build(policy, direction, split, flattener, key),
    };
    // Kept for the next compile: the tables are copied into the state; otherwise moved.
    let keep = tables.key.rules.len() <= budget;
    let (v4, v6) = if keep {
        (tables.v4.clone(), tables.v6.clone())
    } else {
        (std::mem::take(&mut tables.v4), std::mem::take(&mut tables.v6))
    };
    let (sets, classes) = (&tables.sets, &tables.classes);
    check_prefixes(
        policy,
        direction,
        v4.len(),
        v6.len(),
        &tables.contributed,
        caps,
        &mut diagnostics,
    );

    // L4 entries, counted while they are emitted: past the capacity the compile stops
    // (FW019 with "at least"), so an oversized or hostile policy cannot make the compiler
    // allocate without bound before the error is known.
    let cap = caps.l4_entries as usize;
    let mut l4: Vec<(L4Key, L4Value)> = Vec::new();
    let mut prefixes = Vec::new();
    let mut scratch = Vec::new();
    let (mut entries, mut table) = (Vec::new(), Vec::new());
    let egress_applies = (direction == Direction::Egress).then_some(applies);
    let mut builder = L4Builder::new(policy, &l4_ranges, &l4_prefixes, sets, egress_applies);
    // The shared table first: class 0 sorts before every address class. It is a rule set
    // of its own (one derivation step from the empty set), so the workload deltas are
    // built exactly as for a class.
    let mut overflow = {
        let mut shared_sets = RuleSets::new();
        let fp = tables
            .shared
            .iter()
            .filter_map(|&pos| policy.rules.get(pos as usize))
            .fold(Fingerprint::default(), |acc, r| acc.add(Fingerprint::of_rule(r.id.0)));
        let groups = Groups { members: vec![Arc::from(tables.shared.as_slice())], fps: vec![fp] };
        let s = shared_sets.extend(RuleSets::EMPTY, &[0], &groups);
        let mut shared_builder =
            L4Builder::new(policy, &l4_ranges, &l4_prefixes, &shared_sets, egress_applies);
        let base = shared_builder.base(&shared_sets, s);
        shared_builder.emit(&base, ClassId::SHARED, WorkloadId::NONE, &mut scratch, &mut l4);
        for (w, better) in shared_builder.workload_list(&shared_sets, s).iter() {
            table.clear();
            workload_table(&base, better, &mut prefixes, &mut entries, &mut table);
            shared_builder.emit(&table, ClassId::SHARED, *w, &mut scratch, &mut l4);
        }
        l4.len() > cap
    };
    'classes: for &(class, s) in classes {
        if overflow {
            break;
        }
        let base = builder.base(sets, s);
        builder.emit(&base, class, WorkloadId::NONE, &mut scratch, &mut l4);
        if l4.len() > cap {
            overflow = true;
            break;
        }
        // In workload-id order, which is key order.
        for (w, better) in builder.workload_list(sets, s).iter() {
            table.clear();
            workload_table(&base, better, &mut prefixes, &mut entries, &mut table);
            builder.emit(&table, class, *w, &mut scratch, &mut l4);
            if l4.len() > cap {
                overflow = true;
                break 'classes;
            }
        }
    }
    drop(builder);
    if overflow {
        diagnostics.push(l4_overflow(direction, l4.len(), cap));
    }
    // Nothing is returned once anything overflowed: skip building the map.
    let l4: BTreeMap<L4Key, L4Value> =
        if diagnostics.is_empty() { l4.into_iter().collect() } else { BTreeMap::new() };
    let maps = DirectionMaps {
        defaults: Defaults {
            verdict: policy.default_for(direction).verdict,
            audit: policy.default_for(direction).audit,
        },
        v4,
        v6,
        l4,
    };
    *memo = keep.then_some(tables);
    (maps, diagnostics)
}

/// Per rule position: its precedence rank (`mapstate`, "Ranks"): `policy ordinal << 32 |
/// index`, the ordinal being the policy's position among the host's policy names (sorted), so
/// the rank moves only when the rule's own policy changes or a policy before it is added or
/// removed, never when an unrelated rule is inserted. The kernel compares ranks across the
/// class and shared tables, so they must order exactly like the positions `HostPolicy::rules`
/// gives (what the compiler's own `Rank` and the evaluator use): a direction whose rules are
/// not in strictly increasing (policy, index) order, which `resolve` never produces, gets the
/// positions themselves instead.
fn ranks(policy: &HostPolicy) -> Vec<u64> {
    let mut names: Vec<&str> = policy.rules.iter().map(|r| r.policy.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let ordinal = |name: &str| names.binary_search(&name).unwrap_or(0) as u64;
    let mut out: Vec<u64> =
        policy.rules.iter().map(|r| (ordinal(&r.policy) << 32) | u64::from(r.index)).collect();
    for direction in Direction::ALL {
        let mut last: Option<u64> = None;
        let monotonic =
            policy.rules.iter().zip(&out).filter(|(r, _)| r.direction == direction).all(
                |(_, &rank)| {
                    let ok = last.is_none_or(|l| l < rank);
                    last = Some(rank);
                    ok
                },
            );
        if !monotonic {
            for (pos, (r, rank)) in policy.rules.iter().zip(out.iter_mut()).enumerate() {
                if r.direction == direction {
                    *rank = pos as u64;
                }
            }
        }
    }
    out
}

/// FW019 for the address tables of one direction. An overflow points at the rule that
/// contributes the most prefixes, the likeliest thing to change.
fn check_prefixes(
    policy: &HostPolicy,
    direction: Direction,
    v4: usize,
    v6: usize,
    contributed: &[(u32, usize, usize)],
    caps: &Capacities,
    out: &mut Vec<Diagnostic>,
) {
    let dir = direction.as_str();
    let tables =
        [("IPv4 prefixes", v4, caps.v4_prefixes, 0), ("IPv6 prefixes", v6, caps.v6_prefixes, 1)];
    for (what, n, cap, family) in tables {
        if n <= cap as usize {
            continue;
        }
        let mut d = Diagnostic::error(
            Code::CapacityExceeded,
            format!("{dir} {what}: {n} entries, capacity {cap}"),
        );
        let biggest = contributed
            .iter()
            .map(|&(pos, n4, n6)| (if family == 0 { n4 } else { n6 }, std::cmp::Reverse(pos)))
            .max();
        if let Some((count, std::cmp::Reverse(pos))) = biggest
            && let Some(rule) = policy.rules.get(pos as usize)
        {
            d = d.at(
                rule.span,
                format!("this rule contributes {count} prefixes, the most of any rule"),
            );
        }
        out.push(d.hint("merge addresses into larger prefixes, or raise the map capacity"));
    }
}

/// FW019 for an L4 table: emission stopped at `n` entries, past the capacity, so the full
/// count is not known.
fn l4_overflow(direction: Direction, n: usize, cap: usize) -> Diagnostic {
    Diagnostic::error(
        Code::CapacityExceeded,
        format!("{} L4 entries: at least {n} entries, capacity {cap}", direction.as_str()),
    )
    .hint(
        "every address class gets its own L4 entries for its address-scoped rules: fewer distinct \
         address groups with port rules, or a larger capacity, helps",
    )
}

/// "allow tcp/80,443,8000-8100 from 0.0.0.0/0", "deny udp to set:office".
#[cfg(test)]
fn summary(rule: &ResolvedRule) -> String {
    let mut s = String::new();
    write_summary(rule, &mut s);
    s
}

/// Appends the rule's one-line description to `s` ("allow tcp/80,443 from 0.0.0.0/0"), without intermediate lists or `write!` for the numbers
/// and IPv4 networks: it runs once per rule, and at 100k rules the formatting was a noticeable
/// part of the compile. The rule table copies it out of one reused buffer, so each kept
/// summary takes only its length (the table lives as long as the state is enforced).
fn write_summary(rule: &ResolvedRule, s: &mut String) {
    const SHOWN: usize = 3;
    s.push_str(rule.action.as_str());
    s.push(' ');
    s.push_str(rule.proto.as_str());
    let mut sep = '/';
    for p in &rule.ports {
        s.push(sep);
        sep = ',';
        ids::push_decimal(s, u64::from(p.start));
        if p.start != p.end {
            s.push('-');
            ids::push_decimal(s, u64::from(p.end));
        }
    }
    for t in &rule.icmp {
        s.push(sep);
        sep = ',';
        ids::push_decimal(s, u64::from(*t));
    }
    s.push_str(match rule.direction {
        Direction::Ingress => " from ",
        Direction::Egress => " to ",
    });
    if rule.peers.is_empty() {
        s.push_str("nothing");
    }
    for (i, t) in rule.peers.iter().take(SHOWN).enumerate() {
        if i > 0 {
            s.push(',');
        }
        match t {
            AddrTerm::Any => s.push_str("any"),
            AddrTerm::Net(IpNet::V4(n)) => {
                for (i, octet) in n.addr().octets().into_iter().enumerate() {
                    if i > 0 {
                        s.push('.');
                    }
                    ids::push_decimal(s, u64::from(octet));
                }
                s.push('/');
                ids::push_decimal(s, u64::from(n.prefix_len()));
            }
            AddrTerm::Net(n) => {
                let _ = write!(s, "{n}");
            }
            AddrTerm::Set(set) => {
                s.push_str("set:");
                s.push_str(&set.name);
            }
        }
    }
    if rule.peers.len() > SHOWN {
        let _ = write!(s, " (+{} more)", rule.peers.len() - SHOWN);
    }
    for (i, w) in rule.workloads.iter().enumerate() {
        s.push_str(if i == 0 { " for " } else { "," });
        s.push_str(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::{Mode, PortRange};
    use crate::eval;
    use crate::model::{Decider, DirectionDefault, Flow, HostIdentity, RuleId};
    use crate::source::{Location, Span};

    fn rs(v: &[(u128, u128)]) -> RangeSet {
        RangeSet::from_ranges(v.iter().map(|&(a, b)| Range::new(a, b)).collect())
    }

    fn pairs(set: &RangeSet) -> Vec<(u128, u128)> {
        set.ranges().iter().map(|r| (r.lo, r.hi)).collect()
    }

    #[test]
    fn range_sets_merge_overlapping_and_adjacent_ranges() {
        let s = rs(&[(10, 20), (5, 9), (30, 40), (15, 25), (41, 41), (100, 100)]);
        assert_eq!(pairs(&s), vec![(5, 25), (30, 41), (100, 100)]);
        let top = rs(&[(0, u128::MAX), (7, 8)]);
        assert_eq!(pairs(&top), vec![(0, u128::MAX)]);
    }

    #[test]
    fn range_set_union_and_difference() {
        let a = rs(&[(0, 10), (20, 30), (50, 60)]);
        let b = rs(&[(5, 22), (29, 52), (60, 70)]);
        assert_eq!(pairs(&a.union(&b)), vec![(0, 70)]);
        assert_eq!(pairs(&a.difference(&b)), vec![(0, 4), (23, 28), (53, 59)]);
        assert_eq!(pairs(&b.difference(&a)), vec![(11, 19), (31, 49), (61, 70)]);
        // One subtrahend range spanning several minuend ranges, and holes at both ends.
        let c = rs(&[(0, 3), (5, 8), (10, 12)]);
        assert_eq!(pairs(&c.difference(&rs(&[(2, 11)]))), vec![(0, 1), (12, 12)]);
        assert_eq!(pairs(&c.difference(&rs(&[(0, 100)]))), vec![]);
        assert_eq!(pairs(&c.difference(&RangeSet::new())), pairs(&c));
        let full = rs(&[(0, u128::MAX)]);
        assert_eq!(
            pairs(&full.difference(&rs(&[(u128::MAX, u128::MAX)]))),
            vec![(0, u128::MAX - 1)]
        );
        assert_eq!(pairs(&full.difference(&rs(&[(0, 0)]))), vec![(1, u128::MAX)]);
    }

    #[test]
    fn ranges_become_minimal_aligned_prefixes() {
        let p = |lo, hi, bits| {
            let mut v = Vec::new();
            range_to_prefixes(lo, hi, bits, &mut v);
            v
        };
        assert_eq!(p(0, u128::from(u32::MAX), 32), vec![(0, 0)]);
        assert_eq!(p(0, u128::MAX, 128), vec![(0, 0)]);
        assert_eq!(p(5, 5, 32), vec![(5, 32)]);
        // 10.0.0.0 - 10.0.1.255 is one /23.
        assert_eq!(p(0x0a00_0000, 0x0a00_01ff, 32), vec![(0x0a00_0000, 23)]);
        // 1..=6: 1/32, 2/31, 4/31, 6/32.
        assert_eq!(p(1, 6, 32), vec![(1, 32), (2, 31), (4, 31), (6, 32)]);
        // The worst case for a width is 2 * (bits - 1) blocks.
        assert_eq!(p(1, u128::from(u32::MAX) - 1, 32).len(), 62);
        // Out of the space: nothing.
        assert_eq!(p(0, 1 << 32, 32), vec![]);
    }

    #[test]
    fn port_ranges_need_few_entries() {
        let count = |a: u32, b: u32| {
            let mut v = Vec::new();
            range_to_prefixes(u128::from(6 << 24 | a), u128::from(6 << 24 | b), 32, &mut v);
            v.len()
        };
        assert_eq!(count(1, 65535), 16);
        assert_eq!(count(0, 65535), 1);
        assert_eq!(count(443, 443), 1);
        // 8000-8100: 8000/27 .. a handful.
        let n = count(8000, 8100);
        assert!((2..=8).contains(&n), "{n}");
        // Every range of 16-bit ports needs at most 2 * 15 prefixes.
        for (a, b) in [(1, 65534), (2, 65533), (1023, 1025), (3, 3)] {
            assert!(count(a, b) <= 30);
        }
    }

    fn set(name: &str, addresses: Vec<AddrTerm>, except: Vec<AddrTerm>) -> AddrTerm {
        AddrTerm::Set(Arc::new(ResolvedSet { name: name.into(), addresses, except }))
    }

    fn net(s: &str) -> AddrTerm {
        AddrTerm::Net(s.parse().unwrap())
    }

    fn prefixes(terms: &[AddrTerm], family: Family) -> Vec<String> {
        let mut f = Flattener::default();
        let bits = family.bits();
        f.terms(terms, family)
            .to_prefixes(bits)
            .into_iter()
            .map(|(a, l)| match family {
                Family::V4 => Ipv4Net::new(Ipv4Addr::from(a as u32), l).unwrap().to_string(),
                Family::V6 => Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().to_string(),
            })
            .collect()
    }

    #[test]
    fn flattening_handles_overlap_nesting_and_except() {
        // Overlapping and adjacent nets merge into the minimal cover.
        let terms =
            [net("10.0.0.0/25"), net("10.0.0.128/25"), net("10.0.0.7/32"), net("2001:db8::/32")];
        assert_eq!(prefixes(&terms, Family::V4), ["10.0.0.0/24"]);
        assert_eq!(prefixes(&terms, Family::V6), ["2001:db8::/32"]);
        // A nested set with an except, inside a set with its own except.
        let inner = set("inner", vec![net("192.168.0.0/16")], vec![net("192.168.1.0/24")]);
        let outer = set(
            "outer",
            vec![inner, net("172.16.0.0/12")],
            vec![net("192.168.0.0/24"), net("172.16.0.1/32")],
        );
        assert_eq!(
            prefixes(&[outer], Family::V4),
            [
                "172.16.0.0/32",
                "172.16.0.2/31",
                "172.16.0.4/30",
                "172.16.0.8/29",
                "172.16.0.16/28",
                "172.16.0.32/27",
                "172.16.0.64/26",
                "172.16.0.128/25",
                "172.16.1.0/24",
                "172.16.2.0/23",
                "172.16.4.0/22",
                "172.16.8.0/21",
                "172.16.16.0/20",
                "172.16.32.0/19",
                "172.16.64.0/18",
                "172.16.128.0/17",
                "172.17.0.0/16",
                "172.18.0.0/15",
                "172.20.0.0/14",
                "172.24.0.0/13",
                "192.168.2.0/23",
                "192.168.4.0/22",
                "192.168.8.0/21",
                "192.168.16.0/20",
                "192.168.32.0/19",
                "192.168.64.0/18",
                "192.168.128.0/17",
            ]
        );
        // `any` minus everything of one family leaves the other family whole; an except that
        // removes everything leaves nothing.
        let all_but_v4 = set("x", vec![AddrTerm::Any], vec![net("0.0.0.0/0")]);
        assert_eq!(prefixes(std::slice::from_ref(&all_but_v4), Family::V4), Vec::<String>::new());
        assert_eq!(prefixes(&[all_but_v4], Family::V6), ["::/0"]);
        // Host bits in a net do not matter, as in `contains`.
        assert_eq!(
            prefixes(&[AddrTerm::Net("10.1.2.3/8".parse().unwrap())], Family::V4),
            ["10.0.0.0/8"]
        );
    }

    #[test]
    fn shared_sets_are_flattened_once() {
        let shared = set("s", vec![net("10.0.0.0/8")], vec![]);
        let mut f = Flattener::default();
        let a = f.terms(&[shared.clone(), net("11.0.0.0/8")], Family::V4);
        let b = f.terms(&[shared], Family::V4);
        assert_eq!(f.sets.len(), 1);
        assert_eq!(pairs(&a), vec![(0x0a00_0000, 0x0bff_ffff)]);
        assert_eq!(pairs(&b), vec![(0x0a00_0000, 0x0aff_ffff)]);
    }

    fn rule(id: u32, index: u32, action: Action, peers: Vec<AddrTerm>) -> ResolvedRule {
        ResolvedRule {
            id: RuleId(id),
            direction: Direction::Ingress,
            policy: "p".into(),
            index,
            name: None,
            action,
            mode: Mode::Enforce,
            log: false,
            peers,
            proto: Proto::Any,
            ports: Vec::new(),
            icmp: Vec::new(),
            workloads: Vec::new(),
            span: Span::default(),
            location: Location { file: "p.yaml".into(), line: index + 1, column: 1 },
        }
    }

    fn host(rules: Vec<ResolvedRule>) -> HostPolicy {
        HostPolicy {
            host: HostIdentity::default(),
            rules,
            ingress_default: DirectionDefault::default(),
            egress_default: DirectionDefault::default(),
            policies: vec!["p".into()],
        }
    }

    #[test]
    fn classes_follow_rule_sets_and_redundant_prefixes_are_dropped() {
        let policy = host(vec![
            rule(7, 0, Action::Allow, vec![net("10.0.0.0/8")]),
            rule(3, 1, Action::Deny, vec![net("10.1.0.0/16"), net("192.0.2.0/24")]),
            // Same rule set as 10.0.0.0/8 alone would be redundant; /16 inside is not.
            rule(9, 2, Action::Allow, vec![net("10.1.0.0/16")]),
        ]);
        let state = compile(&policy, &Capacities::default()).unwrap();
        let v4: Vec<String> = state.ingress.v4.keys().map(|n| n.to_string()).collect();
        assert_eq!(v4, ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24"]);
        // All of these are wide prefixes (at most /24): the narrow class is the empty one.
        let classes = |s: &str| state.ingress.v4[&s.parse::<Ipv4Net>().unwrap()];
        let class = |s: &str| classes(s).wide;
        let distinct: BTreeSet<ClassId> = v4.iter().map(|s| class(s)).collect();
        assert_eq!(distinct.len(), 4);
        assert!(v4.iter().all(|s| classes(s).narrow == class("0.0.0.0/0")));
        // IPv6 has only the root, with the same (empty) classes as 0.0.0.0/0.
        assert_eq!(state.ingress.v6.len(), 1);
        assert_eq!(state.ingress.v6.values().next(), Some(&classes("0.0.0.0/0")));
        // The empty class has no L4 entries; 10.1/16 is denied by rule 3 (deny beats allow).
        let entries = |c: ClassId| {
            state.ingress.l4.iter().filter(move |(k, _)| k.class == c).collect::<Vec<_>>()
        };
        assert!(entries(class("0.0.0.0/0")).is_empty());
        let e = entries(class("10.1.0.0/16"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0.prefix_len, 0);
        assert_eq!(e[0].1.verdict, Decision::Deny(RuleId(3)));
        // Egress has only its root.
        assert_eq!(state.egress.v4.len(), 1);
        assert_eq!(state.egress.v6.len(), 1);
    }

    #[test]
    fn a_narrow_prefix_does_not_repeat_the_rules_of_a_wide_one_around_it() {
        let mut wide = rule(1, 0, Action::Allow, vec![net("10.1.0.0/16")]);
        wide.proto = Proto::Tcp;
        wide.ports = vec![PortRange { start: 80, end: 80 }, PortRange { start: 443, end: 443 }];
        let mut host_rule = rule(2, 1, Action::Deny, vec![net("10.1.2.3/32")]);
        host_rule.proto = Proto::Tcp;
        host_rule.ports = vec![PortRange { start: 22, end: 22 }];
        // A wide deny and a narrow allow, both on udp: the layers compete by action (deny
        // first), then rank.
        let mut wide_deny = rule(3, 2, Action::Deny, vec![net("10.1.0.0/16")]);
        wide_deny.proto = Proto::Udp;
        let mut narrow_allow = rule(4, 3, Action::Allow, vec![net("10.1.2.0/25")]);
        narrow_allow.proto = Proto::Udp;
        let policy = host(vec![wide, host_rule, wide_deny, narrow_allow]);
        let state = compile(&policy, &Capacities::default()).unwrap();
        let at = |s: &str| state.ingress.v4[&s.parse::<Ipv4Net>().unwrap()];
        // The /32 (narrow) keeps the /16's wide class, and its own narrow class holds only
        // rules 2 and 4 (the /25 it is in): no entry of a narrow class names rule 1 or 3.
        assert_eq!(at("10.1.2.3/32").wide, at("10.1.0.0/16").wide);
        assert_ne!(at("10.1.2.3/32").narrow, at("10.1.0.0/16").narrow);
        let narrow: BTreeSet<ClassId> = state.ingress.v4.values().map(|c| c.narrow).collect();
        let named = |r: u32| {
            state.ingress.l4.iter().any(|(k, v)| {
                narrow.contains(&k.class)
                    && [v.verdict, v.audit].iter().any(
                        |d| matches!(d, Decision::Allow(x) | Decision::Deny(x) if *x == RuleId(r)),
                    )
            })
        };
        assert!(!named(1) && !named(3));
        assert!(named(2) && named(4));
        // Every split decides like the evaluator; the default one and the all-narrow one
        // (the layout without layers) alike.
        let split_none =
            compile_with(&policy, &Capacities::default(), Split { v4: 0, v6: 0 }).unwrap();
        for addr in ["10.1.2.3", "10.1.2.4", "10.1.2.200", "10.1.9.9", "192.0.2.1"] {
            for (proto, port) in [(6, 22), (6, 80), (6, 443), (6, 8080), (17, 53)] {
                let mut flow = Flow::new(Direction::Ingress, addr.parse().unwrap(), proto);
                flow.port = Some(port);
                let want = eval::evaluate(&policy, &flow).outcome;
                assert_eq!(state.lookup(&flow), want, "{addr} {proto}/{port}");
                assert_eq!(split_none.lookup(&flow), want, "{addr} {proto}/{port}");
            }
        }
        // The deny from the /16 beats the allow from the /25 whatever the layers.
        let mut dns = Flow::new(Direction::Ingress, "10.1.2.3".parse().unwrap(), 17);
        dns.port = Some(53);
        assert_eq!(state.lookup(&dns).decided_by, Decider::Rule(RuleId(3)));
    }

    #[test]
    fn rules_without_an_address_restriction_go_only_to_the_shared_table() {
        let both = vec![net("0.0.0.0/0"), net("::/0")];
        let policy = host(vec![
            rule(1, 0, Action::Allow, vec![AddrTerm::Any]),
            rule(2, 1, Action::Deny, both),
            rule(3, 2, Action::Allow, vec![net("10.0.0.0/8")]),
        ]);
        let state = compile(&policy, &Capacities::default()).unwrap();
        // Only the scoped rule splits the address space.
        let v4: Vec<String> = state.ingress.v4.keys().map(|n| n.to_string()).collect();
        assert_eq!(v4, ["0.0.0.0/0", "10.0.0.0/8"]);
        let (shared, scoped): (Vec<_>, Vec<_>) =
            state.ingress.l4.iter().partition(|(k, _)| k.class == ClassId::SHARED);
        // Rules 1 and 2 cover everything: one shared entry, decided by the deny.
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].1.verdict, Decision::Deny(RuleId(2)));
        // The class of 10/8 holds rule 3 alone; no class entry names rule 1 or 2.
        assert_eq!(scoped.len(), 1);
        assert_eq!(scoped[0].1.verdict, Decision::Allow(RuleId(3)));
        assert!(state.ingress.l4.keys().all(|k| k.class == ClassId::SHARED
            || k.class == state.ingress.v4[&"10.0.0.0/8".parse::<Ipv4Net>().unwrap()].wide));
    }

    #[test]
    fn the_shared_and_class_decisions_compete_by_action_then_rank() {
        let mut p = vec![
            // Policy "a" comes first: its allow from anywhere outranks "b"'s scoped allow.
            rule(10, 0, Action::Allow, vec![AddrTerm::Any]),
            rule(11, 0, Action::Allow, vec![net("10.0.0.0/8")]),
            // Policy "b"'s scoped deny beats both allows, whatever its rank.
            rule(12, 1, Action::Deny, vec![net("10.1.0.0/16")]),
        ];
        p[0].policy = "a".into();
        p[1].policy = "b".into();
        p[2].policy = "b".into();
        let policy = host(p);
        let state = compile(&policy, &Capacities::default()).unwrap();
        let decide = |addr: &str| {
            let flow = Flow::new(Direction::Ingress, addr.parse().unwrap(), 6);
            (state.lookup(&flow).decided_by, eval::evaluate(&policy, &flow).outcome.decided_by)
        };
        assert_eq!(decide("10.2.0.1"), (Decider::Rule(RuleId(10)), Decider::Rule(RuleId(10))));
        assert_eq!(decide("10.1.0.1"), (Decider::Rule(RuleId(12)), Decider::Rule(RuleId(12))));
        assert_eq!(decide("192.0.2.1"), (Decider::Rule(RuleId(10)), Decider::Rule(RuleId(10))));
        // Ranks are (policy ordinal, index).
        assert_eq!(state.rules[&RuleId(10)].rank, 0);
        assert_eq!(state.rules[&RuleId(12)].rank, (1 << 32) | 1);
    }

    #[test]
    fn ranks_do_not_move_when_an_unrelated_rule_is_inserted() {
        let mk = |extra: bool| {
            let mut rules = vec![rule(1, 0, Action::Allow, vec![AddrTerm::Any])];
            if extra {
                rules.push(rule(5, 1, Action::Deny, vec![net("192.0.2.0/24")]));
            }
            let mut r = rule(2, 0, Action::Allow, vec![net("10.0.0.0/8")]);
            r.policy = "q".into();
            rules.push(r);
            host(rules)
        };
        let a = ranks(&mk(false));
        let b = ranks(&mk(true));
        assert_eq!((a[0], a[1]), (b[0], b[2]));
        // Out of (policy, index) order: the positions are used instead, still ordered.
        let mut odd = mk(false);
        odd.rules.swap(0, 1);
        assert_eq!(ranks(&odd), [0, 1]);
    }

    #[test]
    fn a_class_keeps_its_id_when_unrelated_rules_change() {
        let a = host(vec![rule(7, 0, Action::Allow, vec![net("10.0.0.0/8")])]);
        let mut b = a.clone();
        b.rules.push(rule(8, 1, Action::Deny, vec![net("172.16.0.0/12")]));
        let sa = compile(&a, &Capacities::default()).unwrap();
        let sb = compile(&b, &Capacities::default()).unwrap();
        let k: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        assert_eq!(sa.ingress.v4[&k], sb.ingress.v4[&k]);
    }

    #[test]
    fn l4_entries_follow_priority_by_position_not_id() {
        let mut web = rule(50, 0, Action::Allow, vec![AddrTerm::Any]);
        web.proto = Proto::Tcp;
        web.ports = vec![PortRange { start: 8000, end: 8100 }];
        let mut first_deny = rule(40, 1, Action::Deny, vec![AddrTerm::Any]);
        first_deny.proto = Proto::Tcp;
        first_deny.ports = vec![PortRange { start: 8050, end: 8050 }];
        let mut second_deny = rule(2, 2, Action::Deny, vec![AddrTerm::Any]);
        second_deny.proto = Proto::Tcp;
        let state =
            compile(&host(vec![web, first_deny, second_deny]), &Capacities::default()).unwrap();
        let l4 = &state.ingress.l4;
        // Deny 40 comes first at 8050, deny 2 elsewhere in tcp, nothing outside tcp.
        let at = |word: u32| {
            (0..=32u8).rev().find_map(|len| {
                let bits = if len == 0 { 0 } else { word & (u32::MAX << (32 - len)) };
                l4.iter()
                    .find(|(k, _)| k.prefix_len == len && k.bits == bits)
                    .map(|(_, v)| v.verdict)
            })
        };
        assert_eq!(at(6 << 24 | 8050), Some(Decision::Deny(RuleId(40))));
        assert_eq!(at(6 << 24 | 8049), Some(Decision::Deny(RuleId(2))));
        assert_eq!(at(17 << 24 | 8050), None);
        // Everything in tcp outside 8050 is one decision: 2 entries on each side of it would be
        // more than the minimal cover needs; it is the whole /8 cut around one word.
        assert!(l4.len() <= 2 * 24 + 1, "{}", l4.len());
    }

    #[test]
    fn capacity_overflow_is_reported_with_the_numbers() {
        let big = rule(
            1,
            0,
            Action::Allow,
            (0..40).map(|i| net(&format!("10.0.{}.1/32", i * 2))).collect(),
        );
        let caps = Capacities { v4_prefixes: 20, ..Capacities::default() };
        let errs = compile(&host(vec![big]), &caps).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].code, Code::CapacityExceeded);
        assert_eq!(errs[0].message, "ingress IPv4 prefixes: 41 entries, capacity 20");
        assert!(errs[0].primary.is_some());
    }

    #[test]
    fn l4_overflow_stops_emitting_and_says_at_least() {
        // Ten thousand /32s with a port each: ten thousand classes of one entry or more.
        let rules = (0..10_000u32)
            .map(|i| {
                let a = Ipv4Addr::from(0x0a00_0000 + i * 2);
                let mut r = rule(i + 1, i, Action::Allow, vec![net(&format!("{a}/32"))]);
                r.proto = Proto::Tcp;
                r.ports = vec![PortRange { start: 443, end: 443 }];
                r
            })
            .collect();
        let caps = Capacities { l4_entries: 100, ..Capacities::default() };
        let errs = compile(&host(rules), &caps).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].code, Code::CapacityExceeded);
        // Stopped at the first class past the capacity, not after all ten thousand.
        assert_eq!(errs[0].message, "ingress L4 entries: at least 101 entries, capacity 100");
    }

    #[test]
    fn workload_tables_hold_only_what_differs_from_workload_zero() {
        let egress = |mut r: ResolvedRule| {
            r.direction = Direction::Egress;
            r.proto = Proto::Tcp;
            r
        };
        // Allow tcp to 10/8 for everyone; for a/b, deny tcp/22 (first deny wins), and an allow
        // of all tcp that never changes a decision (rule 1 already allows it).
        let all = egress(rule(1, 0, Action::Allow, vec![net("10.0.0.0/8")]));
        let mut ssh = egress(rule(2, 1, Action::Deny, vec![net("10.0.0.0/8")]));
        ssh.ports = vec![PortRange { start: 22, end: 22 }];
        ssh.workloads = vec!["a/b".into()];
        let mut redundant = egress(rule(3, 2, Action::Allow, vec![net("10.0.0.0/8")]));
        redundant.workloads = vec!["a".into()];
        let state = compile(&host(vec![all, ssh, redundant]), &Capacities::default()).unwrap();
        let w = |p: &str| state.workloads[p];
        let with_workload: Vec<(&L4Key, &L4Value)> =
            state.egress.l4.iter().filter(|(k, _)| k.workload != WorkloadId::NONE).collect();
        // One entry, tcp/22 for a/b in 10/8's class; nothing for workload a at all.
        assert_eq!(with_workload.len(), 1, "{with_workload:?}");
        let (key, value) = with_workload[0];
        assert_eq!((key.workload, key.prefix_len, key.bits), (w("a/b"), 32, 6 << 24 | 22));
        assert_eq!(key.class, state.egress.v4[&"10.0.0.0/8".parse::<Ipv4Net>().unwrap()].wide);
        assert_eq!(value.verdict, Decision::Deny(RuleId(2)));
        // The lookup falls back to workload 0 everywhere else.
        let flow = |port: u16, workload: &str| {
            let mut f = crate::model::Flow::new(Direction::Egress, "10.1.2.3".parse().unwrap(), 6);
            f.port = Some(port);
            f.workload = Some(workload.into());
            state.lookup(&f).decided_by
        };
        use crate::model::Decider;
        assert_eq!(flow(22, "a/b/c"), Decider::Rule(RuleId(2)));
        assert_eq!(flow(80, "a/b/c"), Decider::Rule(RuleId(1)));
        assert_eq!(flow(22, "a"), Decider::Rule(RuleId(1)));
    }

    #[test]
    fn one_thread_and_three_give_the_same_state_and_errors() {
        let mut rules = Vec::new();
        for i in 0..300u32 {
            let a = Ipv4Addr::from(0x0a00_0000 + (i % 37) * 256 + i);
            let mut r = rule(i + 1, i, Action::Allow, vec![net(&format!("{a}/{}", 24 + i % 9))]);
            r.proto = if i % 3 == 0 { Proto::Udp } else { Proto::Tcp };
            r.ports =
                vec![PortRange { start: (i % 50) as u16 * 10, end: (i % 50) as u16 * 10 + 5 }];
            if i % 2 == 1 {
                r.direction = Direction::Egress;
                if i % 5 == 0 {
                    r.workloads = vec![format!("a/{}", i % 4)];
                }
            }
            if i % 11 == 0 {
                r.action = Action::Deny;
            }
            rules.push(r);
        }
        let policy = host(rules);
        let caps = Capacities::default();
        let one =
            compile_on(&policy, &caps, Split::DEFAULT, false, &mut CompileMemo::default()).unwrap();
        let three =
            compile_on(&policy, &caps, Split::DEFAULT, true, &mut CompileMemo::default()).unwrap();
        assert_eq!(one, three);
        assert!(!one.egress.l4.is_empty() && !one.ingress.l4.is_empty());
        let small = Capacities { l4_entries: 10, rules: 10, ..caps };
        let one = compile_on(&policy, &small, Split::DEFAULT, false, &mut CompileMemo::default())
            .unwrap_err();
        let three = compile_on(&policy, &small, Split::DEFAULT, true, &mut CompileMemo::default())
            .unwrap_err();
        let messages = |d: &[Diagnostic]| d.iter().map(|d| d.message.clone()).collect::<Vec<_>>();
        assert_eq!(messages(&one), messages(&three));
        assert_eq!(one.len(), 3);
    }

    /// The memo is used when a direction's rules keep their positions, ids and peers, and
    /// not otherwise; either way the state is `compile`'s.
    #[test]
    fn the_address_tables_are_reused_exactly_when_positions_ids_and_peers_are_unchanged() {
        let policy = |action: Action, second: &str| {
            let mut a = rule(1, 0, action, vec![net("10.0.0.0/8"), net("192.0.2.7/32")]);
            a.ports = vec![PortRange { start: 443, end: 443 }];
            let b = rule(2, 1, Action::Allow, vec![net(second)]);
            host(vec![a, b])
        };
        let caps = Capacities::default();
        let mut memo = CompileMemo::default();
        let first = policy(Action::Allow, "10.1.0.0/16");
        assert_eq!(compile_reusing(&first, &caps, &mut memo), compile(&first, &caps));
        let key = |p: &HostPolicy| AddressKey::of(p, Direction::Ingress, Split::DEFAULT);
        let kept = |m: &CompileMemo| m.ingress.as_ref().map(|t| t.key.clone());
        assert_eq!(kept(&memo), Some(key(&first)));
        // The action changes: same key, the tables are taken from the memo.
        let denied = policy(Action::Deny, "10.1.0.0/16");
        assert_eq!(key(&denied), key(&first));
        assert_eq!(compile_reusing(&denied, &caps, &mut memo), compile(&denied, &caps));
        // A peer changes: another key, the tables are built again and kept.
        let moved = policy(Action::Deny, "10.2.0.0/16");
        assert_ne!(key(&moved), key(&first));
        let state = compile_reusing(&moved, &caps, &mut memo);
        assert_eq!(state, compile(&moved, &caps));
        assert_eq!(kept(&memo), Some(key(&moved)));
        assert!(state.expect("compiles").ingress.v4.keys().any(|n| n.to_string() == "10.2.0.0/16"));
        // A rule id changes (a rename): another key as well.
        let mut renamed = moved.clone();
        renamed.rules[1].id = RuleId(9);
        assert_ne!(key(&renamed), key(&moved));
        assert_eq!(compile_reusing(&renamed, &caps, &mut memo), compile(&renamed, &caps));
        // A direction over the budget keeps nothing; the state is the same.
        let mut small = CompileMemo::with_rule_budget(1);
        assert_eq!(compile_reusing(&renamed, &caps, &mut small), compile(&renamed, &caps));
        assert!(small.ingress.is_none(), "two ingress rules, budget 1");
        let mut two = CompileMemo::with_rule_budget(2);
        assert_eq!(compile_reusing(&renamed, &caps, &mut two), compile(&renamed, &caps));
        assert_eq!(kept(&two), Some(key(&renamed)));
    }

    #[test]
    fn fingerprints_ignore_order_and_tell_sets_apart() {
        let fp = |ids: &[u32]| {
            ids.iter().fold(Fingerprint::default(), |acc, &i| acc.add(Fingerprint::of_rule(i)))
        };
        assert_eq!(fp(&[1, 2, 3]), fp(&[3, 1, 2]));
        assert_eq!(fp(&[1, 2]).add(fp(&[3])), fp(&[1, 2, 3]));
        assert_ne!(fp(&[1, 2]), fp(&[1, 3]));
        assert_ne!(fp(&[]), fp(&[0]));
        // Distinct over many small sets (ids 0..2000 and all pairs of the first 200).
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            assert!(seen.insert(fp(&[i])));
        }
        for i in 0..200 {
            for j in i + 1..200 {
                assert!(seen.insert(fp(&[i, j])));
            }
        }
    }

    #[test]
    fn summaries_read_like_the_rule() {
        let mut r = rule(1, 0, Action::Allow, vec![net("0.0.0.0/0")]);
        r.proto = Proto::Tcp;
        r.ports = vec![
            PortRange { start: 80, end: 80 },
            PortRange { start: 443, end: 443 },
            PortRange { start: 8000, end: 8100 },
        ];
        assert_eq!(summary(&r), "allow tcp/80,443,8000-8100 from 0.0.0.0/0");
        let mut d = rule(2, 0, Action::Deny, vec![set("office", vec![net("10.0.0.0/8")], vec![])]);
        d.direction = Direction::Egress;
        d.proto = Proto::Udp;
        assert_eq!(summary(&d), "deny udp to set:office");
        d.workloads = vec!["system.slice/app.service".into()];
        assert_eq!(summary(&d), "deny udp to set:office for system.slice/app.service");
        // Numbers and networks read as `Display` writes them, host bits included.
        for n in ["0.0.0.0/0", "10.1.2.3/8", "255.255.255.255/32", "192.0.2.0/24", "2001:db8::/32"]
        {
            let r = rule(3, 0, Action::Allow, vec![net(n)]);
            assert_eq!(summary(&r), format!("allow any from {n}"));
        }
        for (start, end) in [(0, 0), (1, 9), (10, 99), (65535, 65535), (1000, 65535)] {
            let mut r = rule(4, 0, Action::Allow, vec![AddrTerm::Any]);
            r.proto = Proto::Udp;
            r.ports = vec![PortRange { start, end }];
            let want = if start == end { format!("{start}") } else { format!("{start}-{end}") };
            assert_eq!(summary(&r), format!("allow udp/{want} from any"));
        }
        for v in [0, 7, 10, 99, 100, 65535, u64::from(u32::MAX), u64::MAX] {
            let mut s = String::new();
            ids::push_decimal(&mut s, v);
            assert_eq!(s, v.to_string());
        }
    }

    #[test]
    fn workload_paths_and_ancestors_cut_on_segments() {
        let v: Vec<&str> = path_and_ancestors("a/b/c").collect();
        assert_eq!(v, ["a/b/c", "a/b", "a"]);
        let mut r = rule(1, 0, Action::Allow, vec![AddrTerm::Any]);
        r.workloads = vec!["a/b".into()];
        assert!(workload_applies(&r, "a/b"));
        assert!(workload_applies(&r, "a/b/c"));
        assert!(!workload_applies(&r, "a/bc"));
        assert!(!workload_applies(&r, "a"));
    }
}
