//! The compiler: one host's resolved rules -> the logical map state.
//!
//! The data plane answers "which rules match this packet" with two longest-prefix lookups
//! instead of a scan, so the compiler has to precompute the answers. It is built to scale
//! (100k rules, a million prefixes) with nothing worse than sorting:
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
//!    thousand rules on a thousand-prefix set make a thousand pairs, not ten million. Rule
//!    sets are interned, with a memo of "parent set + own groups", so a million prefixes under
//!    one parent do not rebuild the parent's set a million times. A class id is a hash of the
//!    sorted rule ids (`ids::assign`), so a class keeps its id while its rule set is unchanged.
//! 3. L4 decisions. A set's decisions over the 32-bit L4 word space (`mapstate::l4_word`) are
//!    "pieces": disjoint word ranges with a constant (verdict, audit) decision. Own rules are
//!    swept (range starts and ends as events) into pieces. "First deny, else first allow" is a
//!    minimum over (deny before allow, rule position), so the pieces of `parent ∪ own` are the
//!    pointwise minimum of the parent's and the own rules' pieces, one linear merge: the rules
//!    a class shares with its enclosing prefixes (typically the `any` rules) are swept once,
//!    not once per class. On egress the same is done per workload class whose rules add to a
//!    class. Finally each piece is cut into aligned prefixes (O(log range) entries); entries of
//!    one (class, workload) never overlap.
//!
//! Cost: sorting the pairs and the events, plus work linear in the output and in the total
//! size of the class rule sets (needed for their ids). 100k rules compile in about half a
//! second in release builds; see the ignored `scale_*` tests.
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
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::ast::{Action, Direction, Proto};
use crate::diag::{Code, Diagnostic};
use crate::ids;
use crate::mapstate::{
    Capacities, ClassId, Decision, Defaults, DirectionMaps, L4Key, L4Value, MapState, RuleInfo,
    WorkloadId,
};
use crate::model::{AddrTerm, HostPolicy, ResolvedRule, ResolvedSet};

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
type Prefixes = Arc<Vec<(u128, u8)>>;

/// Flattens address terms, memoising every set by identity, so a set shared by thousands of
/// rules (or nested in many sets) is computed once per family.
#[derive(Default)]
struct Flattener {
    sets: FastMap<SetKey, Arc<RangeSet>>,
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

    fn set(&mut self, set: &Arc<ResolvedSet>, family: Family) -> Arc<RangeSet> {
        // The pointer is a sound key: the policy is borrowed for the whole compile, so every
        // set stays alive and no address is reused.
        let key = (Arc::as_ptr(set), family);
        if let Some(r) = self.sets.get(&key) {
            return r.clone();
        }
        let addresses = self.terms(&set.addresses, family);
        let except = self.terms(&set.except, family);
        let r = Arc::new(addresses.difference(&except));
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
                let p = Arc::new(self.set(s, family).to_prefixes(family.bits()));
                self.set_prefixes.insert(key, p.clone());
                p
            }
            // The common case of one address or CIDR, without building a range set.
            [AddrTerm::Net(n)] => match net_range(n, family) {
                Some(r) => {
                    let mut out = Vec::with_capacity(1);
                    range_to_prefixes(r.lo, r.hi, family.bits(), &mut out);
                    Arc::new(out)
                }
                None => self.empty.clone(),
            },
            peers => {
                let p = self.terms(peers, family).to_prefixes(family.bits());
                if p.is_empty() { self.empty.clone() } else { Arc::new(p) }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rule sets and the LPM walk
// ---------------------------------------------------------------------------------------------

/// Index of an interned rule set.
type SetIdx = usize;

/// Interned rule sets: sorted lists of rule positions (indices into `HostPolicy::rules`, so
/// ascending order is priority order).
struct RuleSets {
    list: Vec<Arc<[u32]>>,
    by_content: FastMap<Arc<[u32]>, SetIdx>,
    /// (parent set, own rules) -> the union.
    extend_memo: FastMap<(SetIdx, Vec<u32>), SetIdx>,
    /// The same for the common case of a single group, without allocating a key.
    extend_one: FastMap<(SetIdx, u32), SetIdx>,
    /// How each set was first made: (parent, own rules). `None` for the empty set. A parent
    /// always has a smaller index than its child.
    derivation: Vec<Option<(SetIdx, Arc<[u32]>)>>,
}

impl RuleSets {
    const EMPTY: SetIdx = 0;

    fn new() -> Self {
        let mut s = Self {
            list: Vec::new(),
            by_content: FastMap::default(),
            extend_memo: FastMap::default(),
            extend_one: FastMap::default(),
            derivation: Vec::new(),
        };
        s.intern(Vec::new(), None);
        s
    }

    fn intern(&mut self, rules: Vec<u32>, derivation: Option<(SetIdx, Arc<[u32]>)>) -> SetIdx {
        if let Some(&i) = self.by_content.get(rules.as_slice()) {
            return i;
        }
        let rules: Arc<[u32]> = rules.into();
        let i = self.list.len();
        self.list.push(rules.clone());
        self.derivation.push(derivation);
        self.by_content.insert(rules, i);
        i
    }

    fn derivation(&self, i: SetIdx) -> Option<&(SetIdx, Arc<[u32]>)> {
        self.derivation.get(i).and_then(Option::as_ref)
    }

    fn get(&self, i: SetIdx) -> &[u32] {
        self.list.get(i).map_or(&[], |s| s)
    }

    /// `parent ∪ own`, where `own` lists groups of rules (indices into `groups`, each a
    /// sorted list of rule positions). Memoised on (parent, group ids), which stay short even
    /// when a group is thousands of rules sharing one address set.
    fn extend(&mut self, parent: SetIdx, own: &[u32], groups: &[Arc<[u32]>]) -> SetIdx {
        let memo = match own {
            [] => return parent,
            [g] => self.extend_one.get(&(parent, *g)),
            many => self.extend_memo.get(&(parent, many.to_vec())),
        };
        if let Some(&i) = memo {
            return i;
        }
        let rules: Arc<[u32]> = match own {
            [g] => groups.get(*g as usize).cloned().unwrap_or_else(|| Arc::from([])),
            many => {
                let mut all: Vec<u32> = many
                    .iter()
                    .filter_map(|&g| groups.get(g as usize))
                    .flat_map(|g| g.iter().copied())
                    .collect();
                all.sort_unstable();
                all.dedup();
                all.into()
            }
        };
        let merged = merge_sorted(self.get(parent), &rules);
        let i = self.intern(merged, Some((parent, rules)));
        match own {
            [g] => self.extend_one.insert((parent, *g), i),
            many => self.extend_memo.insert((parent, many.to_vec()), i),
        };
        i
    }
}

fn merge_sorted(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        if x < y {
            out.push(x);
            i += 1;
        } else if y < x {
            out.push(y);
            j += 1;
        } else {
            out.push(x);
            i += 1;
            j += 1;
        }
    }
    out.extend_from_slice(a.get(i..).unwrap_or(&[]));
    out.extend_from_slice(b.get(j..).unwrap_or(&[]));
    out
}

/// Builds one LPM table from `(network, length, rule group)` triples: returns
/// `(network, length) -> rule set`, with the `/0` root always present.
fn build_lpm(
    mut pairs: Vec<(u128, u8, u32)>,
    groups: &[Arc<[u32]>],
    bits: u32,
    sets: &mut RuleSets,
) -> Vec<((u128, u8), SetIdx)> {
    // Trie preorder: an enclosing prefix comes before everything inside it.
    pairs.sort_unstable();
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
type Pieces = Arc<Vec<Piece>>;

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
    // Ranks of the rules covering the current point; the first is the decision.
    let mut verdict = BTreeSet::new();
    let mut audit = BTreeSet::new();
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
                        verdict.insert(r);
                    }
                    audit.insert(r);
                } else {
                    verdict.remove(&r);
                    audit.remove(&r);
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

/// One L4 entry: (prefix length over the L4 word, bits, value).
type L4Entry = (u8, u32, L4Value);

/// Builds the L4 decisions of the rule sets of one direction. A set made as `parent ∪ own` by
/// the LPM walk gets `combine(decisions(parent), sweep(own))`, so the rules a class shares
/// with its enclosing prefixes (typically every `any` rule) are swept once, not once per class.
struct L4Builder<'a> {
    policy: &'a HostPolicy,
    /// Per rule position: its ranges in the L4 word space.
    ranges: &'a [RangeSet],
    /// (set, workload) -> decisions of the set's rules that apply to that workload.
    pieces: FastMap<(SetIdx, WorkloadId), Pieces>,
    /// Pieces (by identity) -> entries, since many classes share their parent's pieces.
    entries: FastMap<*const Vec<Piece>, Arc<Vec<L4Entry>>>,
}

impl<'a> L4Builder<'a> {
    fn new(policy: &'a HostPolicy, ranges: &'a [RangeSet]) -> Self {
        Self { policy, ranges, pieces: FastMap::default(), entries: FastMap::default() }
    }

    /// Whether a rule counts for workload `path` (`None`: no workload matched, so only rules
    /// without workloads).
    fn applies(&self, pos: u32, path: Option<&str>) -> bool {
        self.policy.rules.get(pos as usize).is_some_and(|r| match path {
            None => r.workloads.is_empty(),
            Some(path) => workload_applies(r, path),
        })
    }

    /// Decisions of `set`'s rules that apply to workload `w` (whose path is `path`). Recurses
    /// along the derivation chain, which is at most one step per prefix length.
    fn pieces(
        &mut self,
        sets: &RuleSets,
        set: SetIdx,
        w: WorkloadId,
        path: Option<&str>,
    ) -> Pieces {
        if let Some(p) = self.pieces.get(&(set, w)) {
            return p.clone();
        }
        let result = match sets.derivation(set) {
            None => Arc::new(Vec::new()),
            Some((parent, own)) => {
                let (parent, own) = (*parent, own.clone());
                let base = self.pieces(sets, parent, w, path);
                let own_pieces = if own.iter().all(|&p| self.applies(p, path)) {
                    sweep(&own, self.policy, self.ranges)
                } else {
                    let applicable: Vec<u32> =
                        own.iter().copied().filter(|&p| self.applies(p, path)).collect();
                    sweep(&applicable, self.policy, self.ranges)
                };
                if own_pieces.is_empty() { base } else { Arc::new(combine(&base, &own_pieces)) }
            }
        };
        self.pieces.insert((set, w), result.clone());
        result
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

    /// The table entries of `set` for workload `w`: each piece cut into aligned prefixes.
    fn entries(
        &mut self,
        sets: &RuleSets,
        set: SetIdx,
        w: WorkloadId,
        path: Option<&str>,
    ) -> Arc<Vec<L4Entry>> {
        let pieces = self.pieces(sets, set, w, path);
        // The pointer is a sound key: `self.pieces` keeps every Pieces alive.
        if let Some(e) = self.entries.get(&Arc::as_ptr(&pieces)) {
            return e.clone();
        }
        let mut out = Vec::new();
        let mut prefixes = Vec::new();
        for p in pieces.iter() {
            let value =
                L4Value { verdict: self.decision(p.verdict), audit: self.decision(p.audit) };
            prefixes.clear();
            range_to_prefixes(u128::from(p.lo), u128::from(p.hi), 32, &mut prefixes);
            out.extend(prefixes.iter().map(|&(bits, len)| (len, bits as u32, value)));
        }
        let out = Arc::new(out);
        self.entries.insert(Arc::as_ptr(&pieces), out.clone());
        out
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

fn workload_applies(rule: &ResolvedRule, path: &str) -> bool {
    rule.workloads.is_empty()
        || path_and_ancestors(path).any(|a| rule.workloads.iter().any(|w| w == a))
}

// ---------------------------------------------------------------------------------------------
// Compile
// ---------------------------------------------------------------------------------------------

/// The compiled address tables of one direction, before class ids exist.
struct DirectionLpm {
    v4: Vec<((u128, u8), SetIdx)>,
    v6: Vec<((u128, u8), SetIdx)>,
    /// Per rule position: how many prefixes it contributed (for capacity diagnostics).
    contributed: Vec<(u32, usize, usize)>,
}

fn build_direction_lpm(
    policy: &HostPolicy,
    direction: Direction,
    flattener: &mut Flattener,
    sets: &mut RuleSets,
) -> DirectionLpm {
    // Rules with the same flattened prefix list (the same set, memoised by the flattener)
    // form one group and enter the walk once, not once per rule: ten thousand rules on one
    // set of a thousand prefixes make a thousand pairs, not ten million.
    let mut group_of: FastMap<*const Vec<(u128, u8)>, u32> = FastMap::default();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    // Holds every list whose address is a key above, so no address is reused.
    let mut lists: Vec<Prefixes> = Vec::new();
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut contributed = Vec::new();
    for (pos, rule) in policy.rules.iter().enumerate() {
        if rule.direction != direction {
            continue;
        }
        let pos = pos as u32;
        let p4 = flattener.rule_prefixes(rule, Family::V4);
        let p6 = flattener.rule_prefixes(rule, Family::V6);
        contributed.push((pos, p4.len(), p6.len()));
        for (list, pairs) in [(p4, &mut v4), (p6, &mut v6)] {
            if list.is_empty() {
                continue;
            }
            let g = *group_of.entry(Arc::as_ptr(&list)).or_insert_with(|| {
                let g = groups.len() as u32;
                groups.push(Vec::new());
                pairs.extend(list.iter().map(|&(a, l)| (a, l, g)));
                lists.push(list.clone());
                g
            });
            if let Some(members) = groups.get_mut(g as usize) {
                members.push(pos);
            }
        }
    }
    let groups: Vec<Arc<[u32]>> = groups.into_iter().map(Arc::from).collect();
    DirectionLpm {
        v4: build_lpm(v4, &groups, 32, sets),
        v6: build_lpm(v6, &groups, 128, sets),
        contributed,
    }
}

/// Compiles one host's policy into map state, or explains why it does not fit.
pub fn compile(policy: &HostPolicy, caps: &Capacities) -> Result<MapState, Vec<Diagnostic>> {
    let mut flattener = Flattener::default();
    let l4_ranges: Vec<RangeSet> = policy.rules.iter().map(rule_l4_ranges).collect();

    // Workload classes: every egress workload path.
    let paths: BTreeSet<String> =
        policy.rules(Direction::Egress).flat_map(|r| r.workloads.iter().cloned()).collect();
    let workloads: BTreeMap<String, WorkloadId> =
        ids::assign(paths).into_iter().map(|(p, id)| (p, WorkloadId(id))).collect();
    // For each table path Q: the workloads whose path is Q or below Q.
    let mut below: HashMap<&str, Vec<(&str, WorkloadId)>> = HashMap::new();
    for (path, &id) in &workloads {
        for a in path_and_ancestors(path) {
            if workloads.contains_key(a) {
                below.entry(a).or_default().push((path.as_str(), id));
            }
        }
    }

    let mut diagnostics = Vec::new();
    let mut directions = Vec::new();
    for direction in Direction::ALL {
        let mut sets = RuleSets::new();
        let lpm = build_direction_lpm(policy, direction, &mut flattener, &mut sets);

        // Class ids: a hash of the sorted rule ids of each set that is used.
        let used: BTreeSet<SetIdx> = lpm.v4.iter().chain(&lpm.v6).map(|&(_, s)| s).collect();
        let key_of = |s: SetIdx| -> Vec<u8> {
            let mut ids: Vec<u32> = sets
                .get(s)
                .iter()
                .filter_map(|&p| policy.rules.get(p as usize))
                .map(|r| r.id.0)
                .collect();
            ids.sort_unstable();
            ids.iter().flat_map(|i| i.to_be_bytes()).collect()
        };
        let keyed: Vec<(SetIdx, Vec<u8>)> = used.iter().map(|&s| (s, key_of(s))).collect();
        let assigned = ids::assign(keyed.iter().map(|(_, k)| k.clone()));
        let class_of: FastMap<SetIdx, ClassId> = keyed
            .into_iter()
            .filter_map(|(s, k)| assigned.get(&k).map(|&id| (s, ClassId(id))))
            .collect();

        // Maps are collected from vectors: `BTreeMap`'s `FromIterator` sorts and bulk-builds,
        // much faster than inserting entry by entry.
        let v4: BTreeMap<Ipv4Net, ClassId> = lpm
            .v4
            .iter()
            .filter_map(|&((addr, len), s)| {
                let net = Ipv4Net::new(Ipv4Addr::from(addr as u32), len).ok()?;
                Some((net, *class_of.get(&s)?))
            })
            .collect();
        let v6: BTreeMap<Ipv6Net, ClassId> = lpm
            .v6
            .iter()
            .filter_map(|&((addr, len), s)| {
                let net = Ipv6Net::new(Ipv6Addr::from(addr), len).ok()?;
                Some((net, *class_of.get(&s)?))
            })
            .collect();

        let mut l4: Vec<(L4Key, L4Value)> = Vec::new();
        let mut builder = L4Builder::new(policy, &l4_ranges);
        for &s in &used {
            let Some(&class) = class_of.get(&s) else {
                continue;
            };
            let mut emit = |workload: WorkloadId, path: Option<&str>| {
                let entries = builder.entries(&sets, s, workload, path);
                l4.extend(entries.iter().map(|&(prefix_len, bits, value)| {
                    (L4Key { class, workload, prefix_len, bits }, value)
                }));
            };
            emit(WorkloadId::NONE, None);
            if direction != Direction::Egress {
                continue;
            }
            // Workloads for which this class has more rules than for "no workload": those at
            // or below a path of one of its workload rules.
            let affected: BTreeMap<WorkloadId, &str> = sets
                .get(s)
                .iter()
                .filter_map(|&p| policy.rules.get(p as usize))
                .flat_map(|r| r.workloads.iter())
                .flat_map(|q| below.get(q.as_str()).into_iter().flatten())
                .map(|&(path, id)| (id, path))
                .collect();
            for (id, path) in affected {
                emit(id, Some(path));
            }
        }

        let l4: BTreeMap<L4Key, L4Value> = l4.into_iter().collect();
        let maps = DirectionMaps {
            defaults: Defaults {
                verdict: policy.default_for(direction).verdict,
                audit: policy.default_for(direction).audit,
            },
            v4,
            v6,
            l4,
        };
        check_direction(policy, direction, &maps, &lpm, caps, &mut diagnostics);
        directions.push(maps);
    }

    let rules = policy
        .rules
        .iter()
        .map(|r| {
            let info = RuleInfo {
                direction: r.direction,
                policy: r.policy.clone(),
                index: r.index,
                name: r.name.clone(),
                action: r.action,
                audit: !r.enforcing(),
                log: r.log,
                location: r.location.clone(),
                summary: summary(r),
            };
            (r.id, info)
        })
        .collect::<BTreeMap<_, _>>();

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

    let mut directions = directions.into_iter();
    match (directions.next(), directions.next()) {
        (Some(ingress), Some(egress)) => {
            Ok(MapState { host: policy.host.clone(), ingress, egress, workloads, rules })
        }
        // Direction::ALL has two elements; this arm only keeps the code free of panics.
        _ => Err(Vec::new()),
    }
}

/// FW019 for the address and L4 tables of one direction. An address table overflow points at
/// the rule that contributes the most prefixes, the likeliest thing to change.
fn check_direction(
    policy: &HostPolicy,
    direction: Direction,
    maps: &DirectionMaps,
    lpm: &DirectionLpm,
    caps: &Capacities,
    out: &mut Vec<Diagnostic>,
) {
    let dir = direction.as_str();
    let tables = [
        ("IPv4 prefixes", maps.v4.len(), caps.v4_prefixes, 0),
        ("IPv6 prefixes", maps.v6.len(), caps.v6_prefixes, 1),
        ("L4 entries", maps.l4.len(), caps.l4_entries, 2),
    ];
    for (what, n, cap, family) in tables {
        if n <= cap as usize {
            continue;
        }
        let mut d = Diagnostic::error(
            Code::CapacityExceeded,
            format!("{dir} {what}: {n} entries, capacity {cap}"),
        );
        let biggest = lpm
            .contributed
            .iter()
            .map(|&(pos, n4, n6)| (if family == 0 { n4 } else { n6 }, std::cmp::Reverse(pos)))
            .max();
        if family < 2 {
            if let Some((count, std::cmp::Reverse(pos))) = biggest
                && let Some(rule) = policy.rules.get(pos as usize)
            {
                d = d.at(
                    rule.span,
                    format!("this rule contributes {count} prefixes, the most of any rule"),
                );
            }
            d = d.hint("merge addresses into larger prefixes, or raise the map capacity");
        } else {
            d = d.hint(
                "every address class gets its own L4 entries: fewer distinct address groups with port rules, \
                 or a larger capacity, helps",
            );
        }
        out.push(d);
    }
}

/// "allow tcp/80,443,8000-8100 from 0.0.0.0/0", "deny udp to set:office".
fn summary(rule: &ResolvedRule) -> String {
    let mut s = format!("{} {}", rule.action.as_str(), rule.proto.as_str());
    let mut slots: Vec<String> =
        rule.ports
            .iter()
            .map(|p| {
                if p.start == p.end {
                    p.start.to_string()
                } else {
                    format!("{}-{}", p.start, p.end)
                }
            })
            .collect();
    slots.extend(rule.icmp.iter().map(|t| t.to_string()));
    if !slots.is_empty() {
        let _ = write!(s, "/{}", slots.join(","));
    }
    s.push_str(match rule.direction {
        Direction::Ingress => " from ",
        Direction::Egress => " to ",
    });
    const SHOWN: usize = 3;
    let peers: Vec<String> = rule
        .peers
        .iter()
        .take(SHOWN)
        .map(|t| match t {
            AddrTerm::Any => "any".to_string(),
            AddrTerm::Net(n) => n.to_string(),
            AddrTerm::Set(set) => format!("set:{}", set.name),
        })
        .collect();
    if peers.is_empty() {
        s.push_str("nothing");
    } else {
        s.push_str(&peers.join(","));
    }
    if rule.peers.len() > SHOWN {
        let _ = write!(s, " (+{} more)", rule.peers.len() - SHOWN);
    }
    if !rule.workloads.is_empty() {
        let _ = write!(s, " for {}", rule.workloads.join(","));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::{Mode, PortRange};
    use crate::model::{DirectionDefault, HostIdentity, RuleId};
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
        let class = |s: &str| state.ingress.v4[&s.parse::<Ipv4Net>().unwrap()];
        let distinct: BTreeSet<ClassId> = v4.iter().map(|s| class(s)).collect();
        assert_eq!(distinct.len(), 4);
        // IPv6 has only the root, with the same (empty) class as 0.0.0.0/0.
        assert_eq!(state.ingress.v6.len(), 1);
        assert_eq!(state.ingress.v6.values().next(), Some(&class("0.0.0.0/0")));
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
    }

    /// `n` rules: every tenth uses one set of 1000 /24s, every `any_every`-th has peers `any`,
    /// the rest each have their own /32; all are tcp with a port range.
    fn big_policy(n: u32, any_every: u32) -> HostPolicy {
        let shared = set(
            "shared",
            (0..1000u32)
                .map(|i| {
                    AddrTerm::Net(IpNet::V4(
                        Ipv4Net::new(Ipv4Addr::from(0xac10_0000 + i * 512), 24).unwrap(),
                    ))
                })
                .collect(),
            vec![],
        );
        let rules = (0..n)
            .map(|i| {
                let peers = if i % 10 == 0 {
                    vec![shared.clone()]
                } else if i % any_every == 1 {
                    vec![AddrTerm::Any]
                } else {
                    vec![AddrTerm::Net(IpNet::V4(
                        Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i * 2), 32).unwrap(),
                    ))]
                };
                let action = if i % 7 == 0 { Action::Deny } else { Action::Allow };
                let mut r = rule(i + 1, i, action, peers);
                r.proto = Proto::Tcp;
                r.ports =
                    vec![PortRange { start: (i % 5000) as u16, end: (i % 5000 + i % 3) as u16 }];
                r
            })
            .collect();
        host(rules)
    }

    fn timed_compile(policy: &HostPolicy) -> (MapState, std::time::Duration) {
        let caps = Capacities { l4_entries: 1 << 22, ..Capacities::default() };
        let start = std::time::Instant::now();
        let state = compile(policy, &caps).unwrap();
        let elapsed = start.elapsed();
        eprintln!(
            "{} rules: {} v4 prefixes, {} L4 entries in {elapsed:?}",
            policy.rules.len(),
            state.ingress.v4.len(),
            state.ingress.l4.len()
        );
        (state, elapsed)
    }

    #[test]
    #[ignore = "timing; run with `cargo test --release -p fw-compiler -- --ignored scale`"]
    fn scale_100k_rules_compile_in_under_a_second() {
        // Ten rules from `any`: every address class carries them.
        let (state, elapsed) = timed_compile(&big_policy(100_000, 10_000));
        assert!(state.ingress.v4.len() > 90_000, "{}", state.ingress.v4.len());
        assert!(elapsed < std::time::Duration::from_secs(1), "{elapsed:?}");
    }

    #[test]
    #[ignore = "timing; run with `cargo test --release -p fw-compiler -- --ignored scale`"]
    fn scale_100k_rules_with_many_global_rules_stay_near_linear() {
        // A hundred rules from `any`: 90k classes of 101 rules and over a million L4 entries
        // (past the default capacity). Linear in that output, so seconds at most.
        let (state, elapsed) = timed_compile(&big_policy(100_000, 1000));
        assert!(state.ingress.l4.len() > 1_000_000, "{}", state.ingress.l4.len());
        assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    #[ignore = "timing; run with `cargo test --release -p fw-compiler -- --ignored scale`"]
    fn scale_a_million_prefixes_is_feasible() {
        // Every other address of 10.0.0.0/11, a million /32s that cannot merge, spread over ten
        // thousand rules (interleaved, so rules overlap in range), plus one rule from `any`.
        let mut rules: Vec<ResolvedRule> = (0..10_000u32)
            .map(|r| {
                let nets = (0..100u32)
                    .map(|k| {
                        let a = 0x0a00_0000 + (k * 10_000 + r) * 2;
                        AddrTerm::Net(IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), 32).unwrap()))
                    })
                    .collect();
                let mut rule = rule(r + 1, r, Action::Allow, nets);
                rule.proto = Proto::Tcp;
                rule.ports = vec![PortRange { start: 443, end: 443 }];
                rule
            })
            .collect();
        rules.push(rule(20_000, 10_000, Action::Deny, vec![AddrTerm::Any]));
        let policy = host(rules);
        let start = std::time::Instant::now();
        let caps = Capacities { v4_prefixes: 1 << 21, ..Capacities::default() };
        let state = compile(&policy, &caps).unwrap();
        let elapsed = start.elapsed();
        eprintln!("1M prefixes: {} L4 entries in {elapsed:?}", state.ingress.l4.len());
        assert_eq!(state.ingress.v4.len(), 1_000_001);
        assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
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
