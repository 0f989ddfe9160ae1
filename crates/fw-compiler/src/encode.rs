//! Map state -> the exact bytes of the kernel maps, and back.
//!
//! The logical `MapState` is typed and host-order; the kernel wants `fw-common`'s `#[repr(C)]`
//! keys and values. Encoding is the only place that crosses that line, so byte order lives
//! here and in `fw-common` and nowhere else: numeric fields are little-endian (the programs
//! are built for `bpfel`), LPM data is big-endian (the trie compares bits from the most
//! significant one). Every map's entries come out sorted by key bytes, so two encodings of one
//! state are identical.
//!
//! `decode` reads the bytes back into typed tables, checking everything the kernel relies on
//! (lengths, prefix lengths, zero host bits, action bytes, zero padding), so a round-trip test
//! can hold `decode(encode(s))` against `s` and catch a byte-order or layout slip.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use fw_common::{
    ACTION_ALLOW, ACTION_DENY, ACTION_NONE, Bytes, CONFIG_EGRESS, CONFIG_INGRESS, ClassValue,
    DirectionConfig, FLAG_LOG_AUDIT, FLAG_LOG_VERDICT, Ipv4LpmKey, Ipv6LpmKey, L4_KEY_FIXED_BITS,
    L4F_ALL, L4F_EXACT_SHARED_PORTS, L4F_TRIE_CLASSES, L4F_TRIE_SHARED, L4LpmKey, SHARED_CLASS,
    V4_DIR_L2_BASE, V4_DIR_MAX_CHUNKS, V4_DIR_SLOTS, V4_LENGTH_SLOTS, V4DirChunk, V4DirSlot,
    WorkloadValue, l4_port_mirror, maps,
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::ast::{Action, Direction};
use crate::mapstate::{
    ClassId, Classes, Decision, Defaults, DirectionMaps, L4Key, L4Value, MapState, WorkloadId,
};
use crate::model::RuleId;

/// Key/value byte pairs of one map, sorted by key: packed and shared ([`crate::entries`]).
pub use crate::entries::Entries;

/// The encoded maps, by name (`fw_common::maps`):
/// - `FW_IN_V4`, `FW_EG_V4`: `Ipv4LpmKey` -> `ClassValue` (the kernel holds `FW_IN_V4` in a
///   hash of the same keys, probed per prefix length; `FW_EG_V4` in an LPM trie);
/// - `FW_IN_V4_DIR`: `u32` chunk key -> `V4DirChunk`, the direct-indexed levels in front of
///   `FW_IN_V4`, derived from it ([`v4_dir_chunks`], laid out as [`EncodeOptions`] say);
/// - `FW_IN_V6`, `FW_EG_V6`: `Ipv6LpmKey` -> `ClassValue`;
/// - `FW_IN_L4`, `FW_EG_L4`: `L4LpmKey` -> `fw_common::L4Value`;
/// - `FW_CONFIG`: `u32` index (`CONFIG_INGRESS`, `CONFIG_EGRESS`) -> `DirectionConfig`: the
///   defaults and the direction's IPv4 prefix lengths, longest first (what the ingress
///   program probes);
/// - `FW_WORKLOADS`: cgroup path (UTF-8) -> `WorkloadValue`, until the daemon resolves paths
///   to cgroup ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub maps: BTreeMap<&'static str, Entries>,
}

impl Encoded {
    pub fn get(&self, map: &str) -> Option<&Entries> {
        self.maps.get(map)
    }
}

fn direction_names(direction: Direction) -> (&'static str, &'static str, &'static str) {
    match direction {
        Direction::Ingress => (maps::INGRESS_V4, maps::INGRESS_V6, maps::INGRESS_L4),
        Direction::Egress => (maps::EGRESS_V4, maps::EGRESS_V6, maps::EGRESS_L4),
    }
}

fn action_byte(a: Action) -> u8 {
    match a {
        Action::Allow => ACTION_ALLOW,
        Action::Deny => ACTION_DENY,
    }
}

fn decision_bytes(d: Decision) -> (u8, u32) {
    match d {
        Decision::None => (ACTION_NONE, 0),
        Decision::Allow(r) => (ACTION_ALLOW, r.0),
        Decision::Deny(r) => (ACTION_DENY, r.0),
    }
}

fn decision_rule(d: Decision) -> Option<RuleId> {
    match d {
        Decision::None => None,
        Decision::Allow(r) | Decision::Deny(r) => Some(r),
    }
}

/// A decision's precedence rank (`RuleInfo::rank`); 0 for none, or for a rule the state does
/// not describe.
fn decision_rank(state: &MapState, d: Decision) -> u64 {
    decision_rule(d).and_then(|r| state.rules.get(&r)).map_or(0, |i| i.rank)
}

/// The `L4Value::flags` of an entry: which of its deciding rules log.
fn log_flags(state: &MapState, value: &L4Value) -> u8 {
    let logs =
        |d: Decision| decision_rule(d).and_then(|r| state.rules.get(&r)).is_some_and(|i| i.log);
    let mut flags = 0;
    if logs(value.verdict) {
        flags |= FLAG_LOG_VERDICT;
    }
    if logs(value.audit) {
        flags |= FLAG_LOG_AUDIT;
    }
    flags
}

fn class_value(c: &Classes) -> ClassValue {
    ClassValue { wide_class: c.wide.0, narrow_class: c.narrow.0 }
}

fn sorted(mut entries: Entries) -> Entries {
    entries.sort();
    entries
}

/// `DirectionConfig::v4_lengths` of an IPv4 table: its distinct prefix lengths, longest
/// first (the order the ingress program probes its IPv4 hash in), and how many there are.
fn v4_length_list(nets: impl Iterator<Item = Ipv4Net>) -> (u8, [u8; V4_LENGTH_SLOTS]) {
    let mut present = [false; 33];
    for net in nets {
        present[usize::from(net.prefix_len())] = true;
    }
    let mut list = [0u8; V4_LENGTH_SLOTS];
    let mut count = 0u8;
    for len in (0..=32u8).rev().filter(|&l| present[usize::from(l)]) {
        list[usize::from(count)] = len;
        count += 1;
    }
    (count, list)
}

/// How `encode` lays the ingress IPv4 table out for the kernel; the table's content (and so
/// every verdict) is the same whatever the options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// The most second-level chunks of `FW_IN_V4_DIR` (2 KiB of value each; the kernel's
    /// allocator rounds an element to 4 KiB). A /16 holding longer prefixes gets one, so its
    /// packets find the /17-/24 prefixes with one more chunk read instead of hash probes;
    /// when more /16s hold longer prefixes than the budget allows, the /16s with the most
    /// prefixes under them get chunks (ties: the lower /16) and the others are probed at the
    /// lengths /17-/32. 0 is the "hash probed per length under every /16" representation.
    pub v4_dir_l2_budget: u32,
}

/// The default [`EncodeOptions::v4_dir_l2_budget`]: 8192 chunks, at most 32 MiB per
/// generation in the kernel.
pub const DEFAULT_V4_DIR_L2_BUDGET: u32 = 8192;

impl Default for EncodeOptions {
    fn default() -> Self {
        Self { v4_dir_l2_budget: DEFAULT_V4_DIR_L2_BUDGET }
    }
}

/// The `deeper` bits of the 32 blocks of a slot (a range of 2^`slot_bits` addresses) that
/// `net`, a prefix longer than the slot, intersects.
fn block_bits(net: &Ipv4Net, slot_bits: u8) -> u32 {
    // Blocks are 2^(slot_bits - 5) addresses: /21s of a /16, /29s of a /24.
    let block_len = 32 - (slot_bits - 5);
    let first = (u32::from(net.network()) >> (slot_bits - 5)) & 31;
    let count =
        if net.prefix_len() >= block_len { 1 } else { 1u32 << (block_len - net.prefix_len()) };
    let ones = if count == 32 { u32::MAX } else { (1u32 << count) - 1 };
    ones << first
}

/// The chunks of `FW_IN_V4_DIR` for an IPv4 table (see `fw_common::maps::INGRESS_V4_DIR`),
/// by key: the 256 first-level chunks, then the second-level chunks of at most `l2_budget`
/// /16s that hold prefixes longer than /16.
pub fn v4_dir_chunks(v4: &BTreeMap<Ipv4Net, Classes>, l2_budget: u32) -> BTreeMap<u32, V4DirChunk> {
    const SLOTS: usize = V4_DIR_SLOTS;
    let slot =
        |c: &Classes| V4DirSlot { wide_class: c.wide.0, narrow_class: c.narrow.0, deeper: 0 };
    // Level 1: one slot per /16, the longest prefix of at most /16 covering it (shorter
    // prefixes first, so longer ones overwrite the part they cover).
    let mut l1 = vec![V4DirSlot::default(); 1 << 16];
    let mut short: Vec<(&Ipv4Net, &Classes)> =
        v4.iter().filter(|(n, _)| n.prefix_len() <= 16).collect();
    short.sort_by_key(|(n, _)| n.prefix_len());
    for (net, classes) in short {
        let first = (u32::from(net.network()) >> 16) as usize;
        let count = 1usize << (16 - net.prefix_len());
        l1[first..first + count].fill(slot(classes));
    }
    // The prefixes longer than /16, by /16.
    let mut deep: BTreeMap<u32, Vec<(&Ipv4Net, &Classes)>> = BTreeMap::new();
    for (net, classes) in v4.iter().filter(|(n, _)| n.prefix_len() > 16) {
        deep.entry(u32::from(net.network()) >> 16).or_default().push((net, classes));
    }
    let mut chunked: Vec<u32> = deep.keys().copied().collect();
    if chunked.len() > l2_budget as usize {
        chunked.sort_by_key(|k| (std::cmp::Reverse(deep[k].len()), *k));
        chunked.truncate(l2_budget as usize);
    }
    let mut out = BTreeMap::new();
    for k in chunked {
        let base = V4DirSlot { deeper: 0, ..l1[k as usize] };
        let mut chunk = V4DirChunk { slots: [base; SLOTS] };
        let mut nets = deep[&k].clone();
        nets.sort_by_key(|(n, _)| n.prefix_len());
        let mut deeper = [0u32; SLOTS];
        for (net, classes) in nets {
            let first = ((u32::from(net.network()) >> 8) & 0xff) as usize;
            if net.prefix_len() <= 24 {
                let count = 1usize << (24 - net.prefix_len());
                chunk.slots[first..first + count].fill(slot(classes));
            } else {
                deeper[first] |= block_bits(net, 8);
            }
        }
        for (s, d) in chunk.slots.iter_mut().zip(deeper) {
            s.deeper = d;
        }
        out.insert(V4_DIR_L2_BASE + k, chunk);
    }
    for (&k, nets) in &deep {
        for (net, _) in nets {
            l1[k as usize].deeper |= block_bits(net, 16);
        }
    }
    for (i, slots) in l1.chunks_exact(SLOTS).enumerate() {
        let mut chunk = V4DirChunk::default();
        chunk.slots.copy_from_slice(slots);
        out.insert(i as u32, chunk);
    }
    out
}

/// The `DirectionConfig::l4_flags` bit one ingress L4 entry needs (0: none), held in the
/// trie (`in_trie`) or the exact hash: a trie entry makes the shared table's or the classes'
/// trie fallback necessary, a shared TCP or UDP port entry of the hash that the port array
/// does not mirror (no decision in either half) makes the hash necessary behind a zero slot.
fn l4_entry_flag(in_trie: bool, key: &L4LpmKey, value: &fw_common::L4Value) -> u8 {
    let shared = u32::from_be_bytes(key.class) == SHARED_CLASS;
    if in_trie {
        return if shared { L4F_TRIE_SHARED } else { L4F_TRIE_CLASSES };
    }
    let decided = fw_common::L4Value { verdict_action: ACTION_ALLOW, ..*value };
    if l4_port_mirror(key, &decided).is_some() && l4_port_mirror(key, value).is_none() {
        L4F_EXACT_SHARED_PORTS
    } else {
        0
    }
}

/// An L4 entry's key and value as the kernel holds them.
fn l4_encoded(state: &MapState, k: &L4Key, v: &L4Value) -> (L4LpmKey, fw_common::L4Value) {
    let key = L4LpmKey {
        prefix_len: L4_KEY_FIXED_BITS + u32::from(k.prefix_len),
        class: k.class.0.to_be_bytes(),
        workload: k.workload.0.to_be_bytes(),
        l4: k.bits.to_be_bytes(),
    };
    let (verdict_action, verdict_rule) = decision_bytes(v.verdict);
    let (audit_action, audit_rule) = decision_bytes(v.audit);
    let verdict_rank = decision_rank(state, v.verdict);
    let audit_rank = decision_rank(state, v.audit);
    let value = fw_common::L4Value {
        verdict_action,
        audit_action,
        flags: log_flags(state, v),
        _pad: 0,
        verdict_rule,
        audit_rule,
        verdict_rank_hi: (verdict_rank >> 32) as u32,
        verdict_rank_lo: verdict_rank as u32,
        audit_rank_hi: (audit_rank >> 32) as u32,
        audit_rank_lo: audit_rank as u32,
    };
    (key, value)
}

/// Whether an ingress L4 entry goes to the trie (`FW_IN_L4`) rather than the exact hash
/// (`FW_IN_L4X`, whole-word prefixes only).
fn in_l4_trie(key: &L4LpmKey) -> bool {
    key.prefix_len != L4_KEY_FIXED_BITS + 32
}

/// The ingress config's `l4_flags`: the bits the ingress L4 table's entries need, as `encode`
/// lays them out (see `fw_common::L4F_TRIE_SHARED` and the others).
pub fn ingress_l4_flags(state: &MapState) -> u8 {
    state.ingress.l4.iter().fold(0, |flags, (k, v)| {
        let (key, value) = l4_encoded(state, k, v);
        flags | l4_entry_flag(in_l4_trie(&key), &key, &value)
    })
}

/// The entries of `FW_CONFIG`: per direction the defaults and the IPv4 table's prefix
/// lengths, and for ingress the L4 flags (so the config depends on the IPv4 tables and the
/// ingress L4 table as well as on the defaults).
pub(crate) fn config_entries(state: &MapState) -> Entries {
    let ingress_flags = ingress_l4_flags(state);
    let config: Entries = [(CONFIG_INGRESS, &state.ingress), (CONFIG_EGRESS, &state.egress)]
        .into_iter()
        .map(|(index, m)| {
            let (v4_length_count, v4_lengths) = v4_length_list(m.v4.keys().copied());
            let value = DirectionConfig {
                verdict_default: action_byte(m.defaults.verdict),
                audit_default: action_byte(m.defaults.audit),
                v4_length_count,
                l4_flags: if index == CONFIG_INGRESS { ingress_flags } else { 0 },
                v4_lengths,
            };
            (index.to_le_bytes(), value.to_bytes())
        })
        .collect();
    sorted(config)
}

/// Encodes every map of a state, with the default [`EncodeOptions`].
pub fn encode(state: &MapState) -> Encoded {
    encode_with(state, &EncodeOptions::default())
}

/// Encodes every map of a state.
pub fn encode_with(state: &MapState, options: &EncodeOptions) -> Encoded {
    let mut out = BTreeMap::new();
    let dir = v4_dir_chunks(&state.ingress.v4, options.v4_dir_l2_budget)
        .into_iter()
        .map(|(k, chunk)| (k.to_le_bytes(), chunk.to_bytes()))
        .collect();
    out.insert(maps::INGRESS_V4_DIR, sorted(dir));
    for direction in Direction::ALL {
        let m = state.direction(direction);
        let (n4, n6, nl4) = direction_names(direction);
        let v4 =
            m.v4.iter()
                .map(|(net, class)| {
                    let key = Ipv4LpmKey {
                        prefix_len: u32::from(net.prefix_len()),
                        addr: net.network().octets(),
                    };
                    (key.to_bytes(), class_value(class).to_bytes())
                })
                .collect();
        let v6 =
            m.v6.iter()
                .map(|(net, class)| {
                    let key = Ipv6LpmKey {
                        prefix_len: u32::from(net.prefix_len()),
                        addr: net.network().octets(),
                    };
                    (key.to_bytes(), class_value(class).to_bytes())
                })
                .collect();
        let l4: Entries =
            m.l4.iter()
                .map(|(k, v)| {
                    let (key, value) = l4_encoded(state, k, v);
                    (key.to_bytes(), value.to_bytes())
                })
                .collect();
        out.insert(n4, sorted(v4));
        out.insert(n6, sorted(v6));
        if direction == Direction::Ingress {
            // Whole-word entries go to the exact hash, the rest stay in the trie.
            let exact_len = (L4_KEY_FIXED_BITS + 32).to_le_bytes();
            let (mut exact, mut trie) = (Entries::new(), Entries::new());
            for (k, v) in &l4 {
                if k.get(..4) == Some(&exact_len[..]) { exact.push(k, v) } else { trie.push(k, v) }
            }
            out.insert(maps::INGRESS_L4_EXACT, sorted(exact));
            out.insert(nl4, sorted(trie));
        } else {
            out.insert(nl4, sorted(l4));
        }
    }
    out.insert(maps::CONFIG, config_entries(state));
    let workloads = state
        .workloads
        .iter()
        .map(|(path, id)| (path.as_bytes(), WorkloadValue { workload: id.0 }.to_bytes()))
        .collect();
    out.insert(maps::WORKLOADS, sorted(workloads));
    Encoded { maps: out }
}

/// An L4 entry as the kernel sees it: the decisions and the log flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedL4 {
    pub value: L4Value,
    /// `FLAG_LOG_VERDICT` | `FLAG_LOG_AUDIT`.
    pub flags: u8,
    /// The ranks of the verdict and audit decisions (0 for none).
    pub ranks: (u64, u64),
}

/// The kernel-relevant tables of one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedDirection {
    pub defaults: Defaults,
    pub v4: BTreeMap<Ipv4Net, Classes>,
    pub v6: BTreeMap<Ipv6Net, Classes>,
    pub l4: BTreeMap<L4Key, DecodedL4>,
}

/// Everything the kernel reads, back in typed form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedMaps {
    pub ingress: DecodedDirection,
    pub egress: DecodedDirection,
    pub workloads: BTreeMap<String, WorkloadId>,
}

impl DecodedMaps {
    /// The kernel-relevant part of a state: what `decode(&encode(state))` must equal.
    pub fn from_state(state: &MapState) -> Self {
        let dir = |m: &DirectionMaps| DecodedDirection {
            defaults: m.defaults,
            v4: m.v4.clone(),
            v6: m.v6.clone(),
            l4: m
                .l4
                .iter()
                .map(|(k, v)| {
                    let ranks = (decision_rank(state, v.verdict), decision_rank(state, v.audit));
                    (*k, DecodedL4 { value: *v, flags: log_flags(state, v), ranks })
                })
                .collect(),
        };
        Self {
            ingress: dir(&state.ingress),
            egress: dir(&state.egress),
            workloads: state.workloads.clone(),
        }
    }
}

/// Why encoded maps are not a valid state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("map {0} is missing")]
    MissingMap(&'static str),
    #[error("map {map}: a key of {got} bytes, expected {expected}")]
    KeyLength { map: &'static str, expected: usize, got: usize },
    #[error("map {map}: a value of {got} bytes, expected {expected}")]
    ValueLength { map: &'static str, expected: usize, got: usize },
    #[error("map {map}: prefix length {prefix_len} is out of range")]
    PrefixLength { map: &'static str, prefix_len: u32 },
    #[error("map {map}: key has bits set past its prefix length")]
    HostBits { map: &'static str },
    #[error("map {map}: invalid action byte {byte}")]
    Action { map: &'static str, byte: u8 },
    #[error("map {map}: a decision's action and rule id disagree (action {action}, rule {rule})")]
    DecisionRule { map: &'static str, action: u8, rule: u32 },
    #[error("map {map}: unknown flag bits {flags:#x}")]
    Flags { map: &'static str, flags: u8 },
    #[error("map {map}: a decision without a rule has rank {rank}, not 0")]
    NoneRank { map: &'static str, rank: u64 },
    #[error("map {map}: padding is not zero")]
    Padding { map: &'static str },
    #[error("map {map}: id 0 where a class or workload id is required")]
    ZeroId { map: &'static str },
    #[error("map {map}: duplicate key")]
    DuplicateKey { map: &'static str },
    #[error("map {map}: config index {index} is not a direction")]
    ConfigIndex { map: &'static str, index: u32 },
    #[error("map {map}: no config for {direction}")]
    MissingConfig { map: &'static str, direction: &'static str },
    #[error(
        "map {map}: config index {index} does not list every prefix length of the IPv4 table, longest first, each once"
    )]
    LengthList { map: &'static str, index: u32 },
    #[error(
        "map {map}: the ingress config lacks L4 flag bits {missing:#x} that the ingress L4 entries need"
    )]
    L4Flags { map: &'static str, missing: u8 },
    #[error("map {map}: chunk key {key} is out of range")]
    ChunkKey { map: &'static str, key: u32 },
    #[error("map {map}: a chunk slot has one class id without the other")]
    ChunkSlot { map: &'static str },
    #[error("map {map}: workload path is not UTF-8")]
    WorkloadPath { map: &'static str },
}

fn entries<'a>(enc: &'a Encoded, map: &'static str) -> Result<&'a Entries, DecodeError> {
    enc.maps.get(map).ok_or(DecodeError::MissingMap(map))
}

fn parse<T: Bytes>(map: &'static str, bytes: &[u8], key: bool) -> Result<T, DecodeError> {
    T::from_bytes(bytes).ok_or(if key {
        DecodeError::KeyLength { map, expected: T::SIZE, got: bytes.len() }
    } else {
        DecodeError::ValueLength { map, expected: T::SIZE, got: bytes.len() }
    })
}

fn insert<K: Ord, V>(
    map: &'static str,
    out: &mut BTreeMap<K, V>,
    k: K,
    v: V,
) -> Result<(), DecodeError> {
    match out.insert(k, v) {
        Some(_) => Err(DecodeError::DuplicateKey { map }),
        None => Ok(()),
    }
}

fn class(map: &'static str, bytes: &[u8]) -> Result<Classes, DecodeError> {
    let v: ClassValue = parse(map, bytes, false)?;
    if v.wide_class == 0 || v.narrow_class == 0 {
        return Err(DecodeError::ZeroId { map });
    }

    Ok(Classes { wide: ClassId(v.wide_class), narrow: ClassId(v.narrow_class) })
}

fn decision(map: &'static str, action: u8, rule: u32) -> Result<Decision, DecodeError> {
    match (action, rule) {
        (ACTION_NONE, 0) => Ok(Decision::None),
        (ACTION_ALLOW, r) if r != 0 => Ok(Decision::Allow(RuleId(r))),
        (ACTION_DENY, r) if r != 0 => Ok(Decision::Deny(RuleId(r))),
        (ACTION_NONE | ACTION_ALLOW | ACTION_DENY, _) => {
            Err(DecodeError::DecisionRule { map, action, rule })
        }
        (byte, _) => Err(DecodeError::Action { map, byte }),
    }
}

fn default_action(map: &'static str, byte: u8) -> Result<Action, DecodeError> {
    match byte {
        ACTION_ALLOW => Ok(Action::Allow),
        ACTION_DENY => Ok(Action::Deny),
        byte => Err(DecodeError::Action { map, byte }),
    }
}

/// One direction's tables, and the `DirectionConfig::l4_flags` bits its ingress L4 entries
/// need (0 for egress).
/// One direction's tables, checked entry by entry; with `keep` false nothing is collected into
/// the decoded maps (see [`validate`]). Also returns the ingress L4 flags its entries need and
/// the IPv4 prefix lengths present (bit `len`).
fn decode_direction(
    enc: &Encoded,
    direction: Direction,
    defaults: Defaults,
    keep: bool,
) -> Result<(DecodedDirection, u8, u64), DecodeError> {
    let (n4, n6, nl4) = direction_names(direction);
    let mut v4 = BTreeMap::new();
    let mut v4_lengths = 0u64;
    for (k, v) in entries(enc, n4)? {
        let key: Ipv4LpmKey = parse(n4, k, true)?;
        let len = u8::try_from(key.prefix_len)
            .ok()
            .filter(|&l| l <= 32)
            .ok_or(DecodeError::PrefixLength { map: n4, prefix_len: key.prefix_len })?;
        let net = Ipv4Net::new(Ipv4Addr::from(key.addr), len)
            .map_err(|_| DecodeError::PrefixLength { map: n4, prefix_len: key.prefix_len })?;
        if net.trunc().addr() != net.addr() {
            return Err(DecodeError::HostBits { map: n4 });
        }
        let classes = class(n4, v)?;
        v4_lengths |= 1 << len;
        if keep {
            insert(n4, &mut v4, net, classes)?;
        }
    }
    let mut v6 = BTreeMap::new();
    for (k, v) in entries(enc, n6)? {
        let key: Ipv6LpmKey = parse(n6, k, true)?;
        let len = u8::try_from(key.prefix_len)
            .ok()
            .filter(|&l| l <= 128)
            .ok_or(DecodeError::PrefixLength { map: n6, prefix_len: key.prefix_len })?;
        let net = Ipv6Net::new(Ipv6Addr::from(key.addr), len)
            .map_err(|_| DecodeError::PrefixLength { map: n6, prefix_len: key.prefix_len })?;
        if net.trunc().addr() != net.addr() {
            return Err(DecodeError::HostBits { map: n6 });
        }
        let classes = class(n6, v)?;
        if keep {
            insert(n6, &mut v6, net, classes)?;
        }
    }
    let mut l4 = BTreeMap::new();
    let mut needed = 0;
    // Ingress: the exact hash's entries (whole-word prefixes only) and the trie's, one table.
    let none = Entries::new();
    let exact = match direction {
        Direction::Ingress => entries(enc, maps::INGRESS_L4_EXACT)?,
        Direction::Egress => &none,
    };
    let tagged = exact.iter().map(|e| (maps::INGRESS_L4_EXACT, e));
    for (nl4, (k, v)) in tagged.chain(entries(enc, nl4)?.iter().map(|e| (nl4, e))) {
        let key: L4LpmKey = parse(nl4, k, true)?;
        let len = key
            .prefix_len
            .checked_sub(L4_KEY_FIXED_BITS)
            .filter(|&l| l <= 32 && (l == 32 || nl4 != maps::INGRESS_L4_EXACT))
            .ok_or(DecodeError::PrefixLength { map: nl4, prefix_len: key.prefix_len })?;
        let bits = u32::from_be_bytes(key.l4);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        if bits & !mask != 0 {
            return Err(DecodeError::HostBits { map: nl4 });
        }
        // Class ids are never 0 (`ids::assign`); an entry of class 0 is never read, since no
        // LPM value names it, but it is not an error either.
        let class = u32::from_be_bytes(key.class);
        let value: fw_common::L4Value = parse(nl4, v, false)?;
        if value._pad != 0 {
            return Err(DecodeError::Padding { map: nl4 });
        }
        if value.flags & !(FLAG_LOG_VERDICT | FLAG_LOG_AUDIT) != 0 {
            return Err(DecodeError::Flags { map: nl4, flags: value.flags });
        }
        let typed_key = L4Key {
            class: ClassId(class),
            workload: WorkloadId(u32::from_be_bytes(key.workload)),
            prefix_len: len as u8,
            bits,
        };
        let typed = L4Value {
            verdict: decision(nl4, value.verdict_action, value.verdict_rule)?,
            audit: decision(nl4, value.audit_action, value.audit_rule)?,
        };
        for (action, rank) in
            [(value.verdict_action, value.verdict_rank()), (value.audit_action, value.audit_rank())]
        {
            if action == ACTION_NONE && rank != 0 {
                return Err(DecodeError::NoneRank { map: nl4, rank });
            }
        }
        if direction == Direction::Ingress {
            needed |= l4_entry_flag(nl4 == maps::INGRESS_L4, &key, &value);
        }
        let ranks = (value.verdict_rank(), value.audit_rank());
        if keep {
            let decoded = DecodedL4 { value: typed, flags: value.flags, ranks };
            insert(nl4, &mut l4, typed_key, decoded)?;
        }
    }
    Ok((DecodedDirection { defaults, v4, v6, l4 }, needed, v4_lengths))
}

/// Whether every map's keys are strictly increasing (as `encode` writes them), and no ingress
/// L4 key is in both the exact hash and the trie: then no decoded map could hold a key twice,
/// which is the one check [`decode`] needs its maps for.
fn distinct_keys(enc: &Encoded) -> bool {
    let increasing = enc.maps.values().all(|entries| {
        let mut keys = entries.iter().map(|(k, _)| k);
        let Some(mut prev) = keys.next() else { return true };
        keys.all(|k| std::mem::replace(&mut prev, k) < k)
    });
    let exact = enc.maps.get(maps::INGRESS_L4_EXACT);
    let trie = enc.maps.get(maps::INGRESS_L4);
    let shared = match (exact, trie) {
        (Some(x), Some(t)) => t.iter().any(|(k, _)| x.binary_search(k).is_ok()),
        _ => false,
    };
    increasing && !shared
}

/// Checks `enc` exactly as [`decode`] does (the same errors), without building the decoded
/// maps when the keys are distinct by construction ([`distinct_keys`]): what a loader needs
/// before it writes, at a fraction of the cost for large tables (100k prefixes: about 11 ms
/// for `decode`, most of it inserting into ordered maps).
pub fn validate(enc: &Encoded) -> Result<(), DecodeError> {
    decode_checked(enc, !distinct_keys(enc)).map(|_| ())
}

/// Reads encoded maps back, validating what the kernel relies on.
pub fn decode(enc: &Encoded) -> Result<DecodedMaps, DecodeError> {
    decode_checked(enc, true)
}

/// [`decode`], collecting the decoded tables only when `keep` is set (the checks are the same;
/// without `keep` the caller has ruled out duplicate keys).
fn decode_checked(enc: &Encoded, keep: bool) -> Result<DecodedMaps, DecodeError> {
    let map = maps::CONFIG;
    let mut config: BTreeMap<u32, Defaults> = BTreeMap::new();
    let mut lengths = BTreeMap::new();
    let mut l4_flags = BTreeMap::new();
    for (k, v) in entries(enc, map)? {
        let index = match <[u8; 4]>::try_from(k) {
            Ok(b) => u32::from_le_bytes(b),
            Err(_) => {
                return Err(DecodeError::KeyLength { map, expected: 4, got: k.len() });
            }
        };
        if index != CONFIG_INGRESS && index != CONFIG_EGRESS {
            return Err(DecodeError::ConfigIndex { map, index });
        }
        let value: DirectionConfig = parse(map, v, false)?;
        let known = if index == CONFIG_INGRESS { L4F_ALL } else { 0 };
        if value.l4_flags & !known != 0 {
            return Err(DecodeError::Flags { map, flags: value.l4_flags });
        }
        let defaults = Defaults {
            verdict: default_action(map, value.verdict_default)?,
            audit: default_action(map, value.audit_default)?,
        };
        insert(map, &mut config, index, defaults)?;
        lengths.insert(index, (value.v4_length_count, value.v4_lengths));
        l4_flags.insert(index, value.l4_flags);
    }
    // The ingress IPv4 chunks: derived from the IPv4 table (by `encode`), so only their form
    // is checked here, entry by entry (the loader decodes only the entries it writes): a key
    // in range, and slots that are a class pair or none.
    let dir = maps::INGRESS_V4_DIR;
    for (k, v) in entries(enc, dir)? {
        let key = <[u8; 4]>::try_from(k)
            .map(u32::from_le_bytes)
            .map_err(|_| DecodeError::KeyLength { map: dir, expected: 4, got: k.len() })?;
        if key >= V4_DIR_MAX_CHUNKS {
            return Err(DecodeError::ChunkKey { map: dir, key });
        }
        let chunk: V4DirChunk = parse(dir, v, false)?;
        for slot in &chunk.slots {
            if (slot.wide_class == 0) != (slot.narrow_class == 0) {
                return Err(DecodeError::ChunkSlot { map: dir });
            }
        }
    }
    let defaults = |index: u32, direction: Direction| {
        config
            .get(&index)
            .copied()
            .ok_or(DecodeError::MissingConfig { map, direction: direction.as_str() })
    };
    let ingress_defaults = defaults(CONFIG_INGRESS, Direction::Ingress)?;
    let (ingress, needed, ingress_lengths) =
        decode_direction(enc, Direction::Ingress, ingress_defaults, keep)?;
    let egress_defaults = defaults(CONFIG_EGRESS, Direction::Egress)?;
    let (egress, _, egress_lengths) =
        decode_direction(enc, Direction::Egress, egress_defaults, keep)?;
    // A clear L4 flag makes the ingress program skip a lookup: no entry decoded may need it
    // (a flag set without need costs a lookup, not a verdict, and the loader decodes only the
    // entries it is about to write, so only this direction is checked).
    let missing = needed & !l4_flags.get(&CONFIG_INGRESS).copied().unwrap_or(0);
    if missing != 0 {
        return Err(DecodeError::L4Flags { map, missing });
    }
    // The ingress program finds IPv4 prefixes only at the lengths the config lists, longest
    // first: the list must be strictly decreasing (or the first hit would not be the longest
    // match), hold nothing past its count, and name the length of every IPv4 entry decoded.
    // It is not required to be exactly the table's lengths: the loader also decodes only the
    // entries it is about to write, and a listed length without entries costs a probe, not a
    // wrong verdict (`encode` always writes the exact list).
    for (index, present) in [(CONFIG_INGRESS, ingress_lengths), (CONFIG_EGRESS, egress_lengths)] {
        let Some(&(count, list)) = lengths.get(&index) else { continue };
        let count = usize::from(count);
        let listed = list.get(..count).ok_or(DecodeError::LengthList { map, index })?;
        let well_formed = listed.windows(2).all(|w| w[0] > w[1])
            && listed.first().is_none_or(|&l| l <= 32)
            && list[count..].iter().all(|&b| b == 0);
        let covered = (0..=32u8).all(|l| present & (1 << l) == 0 || listed.contains(&l));
        if !well_formed || !covered {
            return Err(DecodeError::LengthList { map, index });
        }
    }

    let map = maps::WORKLOADS;
    let mut workloads = BTreeMap::new();
    for (k, v) in entries(enc, map)? {
        let path = String::from_utf8(k.to_vec()).map_err(|_| DecodeError::WorkloadPath { map })?;
        let value: WorkloadValue = parse(map, v, false)?;
        if value.workload == 0 {
            return Err(DecodeError::ZeroId { map });
        }
        insert(map, &mut workloads, path, WorkloadId(value.workload))?;
    }
    Ok(DecodedMaps { ingress, egress, workloads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapstate::RuleInfo;
    use crate::model::HostIdentity;
    use crate::source::Location;

    fn state() -> MapState {
        let c = |wide, narrow| Classes { wide: ClassId(wide), narrow: ClassId(narrow) };
        let mut v4 = BTreeMap::new();
        v4.insert("0.0.0.0/0".parse().unwrap(), c(5, 1));
        v4.insert("10.1.0.0/16".parse().unwrap(), c(5, 0x0102_0304));
        let mut v6 = BTreeMap::new();
        v6.insert("::/0".parse().unwrap(), c(5, 1));
        v6.insert("2001:db8::/32".parse().unwrap(), c(0x0a0b_0c0d, 0x0102_0304));
        let mut l4 = BTreeMap::new();
        l4.insert(
            L4Key {
                class: ClassId(0x0102_0304),
                workload: WorkloadId(0),
                prefix_len: 32,
                bits: 6 << 24 | 443,
            },
            L4Value { verdict: Decision::Allow(RuleId(7)), audit: Decision::Deny(RuleId(8)) },
        );
        // A wide class's table.
        l4.insert(
            L4Key { class: ClassId(5), workload: WorkloadId(0), prefix_len: 8, bits: 1 << 24 },
            L4Value { verdict: Decision::None, audit: Decision::Deny(RuleId(8)) },
        );
        let dir = DirectionMaps {
            defaults: Defaults { verdict: Action::Deny, audit: Action::Deny },
            v4,
            v6,
            l4,
        };
        let mut rules = BTreeMap::new();
        rules.insert(
            RuleId(8),
            RuleInfo {
                direction: Direction::Ingress,
                policy: "p".into(),
                index: 0,
                name: None,
                action: Action::Deny,
                audit: true,
                log: true,
                location: Location { file: "p.yaml".into(), line: 1, column: 1 },
                summary: String::new(),
                rank: (1 << 32) | 2,
            },
        );
        let mut workloads = BTreeMap::new();
        workloads.insert("system.slice/app.service".to_string(), WorkloadId(3));
        MapState {
            host: HostIdentity::default(),
            ingress: dir.clone(),
            egress: DirectionMaps {
                defaults: Defaults { verdict: Action::Allow, audit: Action::Deny },
                ..dir
            },
            workloads,
            rules,
        }
    }

    #[test]
    fn encoding_uses_little_endian_numbers_and_big_endian_lpm_data() {
        let enc = encode(&state());
        let v4 = enc.get(maps::INGRESS_V4).unwrap().to_vec();
        // The value: wide class 5, then narrow class 0x01020304, each little-endian.
        assert!(v4.contains(&(vec![16, 0, 0, 0, 10, 1, 0, 0], vec![5, 0, 0, 0, 4, 3, 2, 1])));
        // Egress keeps every L4 entry in the trie; ingress puts the whole-word ones (the TCP
        // 443 entry) into the exact hash and leaves the rest (the ICMP prefix) in the trie.
        let l4 = enc.get(maps::EGRESS_L4).unwrap().to_vec();
        let (trie, exact) =
            (enc.maps[maps::INGRESS_L4].to_vec(), enc.maps[maps::INGRESS_L4_EXACT].to_vec());
        assert_eq!((trie.len(), exact.len()), (1, 1));
        assert_eq!(trie[0], l4[0]);
        assert_eq!(exact[0], l4[1]);
        assert_eq!(
            l4,
            vec![
                (
                    // Wide class 5, icmp.
                    vec![72, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 1, 0, 0, 0],
                    // no verdict, audit deny by 8 (rank 1 << 32 | 2) which logs.
                    vec![
                        ACTION_NONE,
                        ACTION_DENY,
                        FLAG_LOG_AUDIT,
                        0,
                        0,
                        0,
                        0,
                        0,
                        8,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        1,
                        0,
                        0,
                        0,
                        2,
                        0,
                        0,
                        0
                    ],
                ),
                (
                    vec![96, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 6, 0, 1, 0xbb],
                    // allow by 7 (not described: rank 0), audit deny by 8 which logs.
                    vec![
                        ACTION_ALLOW,
                        ACTION_DENY,
                        FLAG_LOG_AUDIT,
                        0,
                        7,
                        0,
                        0,
                        0,
                        8,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        1,
                        0,
                        0,
                        0,
                        2,
                        0,
                        0,
                        0
                    ],
                )
            ]
        );
        let config = enc.get(maps::CONFIG).unwrap().to_vec();
        // Defaults, then the IPv4 table's prefix lengths longest first (/16, /0), zeros after.
        // Ingress's L4 flags: the trie holds a class's entry (the ICMP prefix) and nothing of
        // the shared table; egress's are always 0.
        let value = |verdict: u8, flags: u8| {
            let mut v = vec![verdict, 2, 2, flags, 16, 0];
            v.resize(40, 0);
            v
        };
        assert_eq!(
            config,
            vec![(vec![0, 0, 0, 0], value(2, L4F_TRIE_CLASSES)), (vec![1, 0, 0, 0], value(1, 0))]
        );
        // Sorted by key bytes.
        for entries in enc.maps.values() {
            assert!(entries.to_vec().windows(2).all(|w| w[0].0 < w[1].0));
        }
    }

    #[test]
    fn decode_inverts_encode() {
        let s = state();
        assert_eq!(decode(&encode(&s)), Ok(DecodedMaps::from_state(&s)));
    }

    #[test]
    fn decode_rejects_what_the_kernel_could_not_use() {
        let good = encode(&state());
        type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
        let with = |map: &'static str, f: &dyn Fn(&mut Pairs)| {
            let mut e = good.clone();
            let entries = e.maps.get_mut(map).unwrap();
            let mut pairs = entries.to_vec();
            f(&mut pairs);
            *entries = pairs.into();
            // The loader's check finds exactly what `decode` finds.
            assert_eq!(validate(&e), decode(&e).map(|_| ()));
            decode(&e)
        };
        assert_eq!(
            with(maps::INGRESS_V4, &|e| e[0].0.push(0)),
            Err(DecodeError::KeyLength { map: maps::INGRESS_V4, expected: 8, got: 9 })
        );
        // 10.1.0.0/8 has host bits set.
        assert_eq!(
            with(maps::INGRESS_V4, &|e| e.iter_mut().for_each(|(k, _)| {
                if k[0] == 16 {
                    k[0] = 8
                }
            })),
            Err(DecodeError::HostBits { map: maps::INGRESS_V4 })
        );
        // A class id of 0 in either layer's slot.
        assert_eq!(
            with(maps::INGRESS_V4, &|e| e[0].1[0..4].fill(0)),
            Err(DecodeError::ZeroId { map: maps::INGRESS_V4 })
        );
        assert_eq!(
            with(maps::INGRESS_V6, &|e| e[0].1[4..8].fill(0)),
            Err(DecodeError::ZeroId { map: maps::INGRESS_V6 })
        );
        assert_eq!(
            with(maps::EGRESS_V6, &|e| e[0].0[0] = 129),
            Err(DecodeError::PrefixLength { map: maps::EGRESS_V6, prefix_len: 129 })
        );
        assert_eq!(
            with(maps::INGRESS_L4, &|e| e[0].1[0] = 9),
            Err(DecodeError::Action { map: maps::INGRESS_L4, byte: 9 })
        );
        assert_eq!(
            with(maps::INGRESS_L4, &|e| e[0].1[3] = 1),
            Err(DecodeError::Padding { map: maps::INGRESS_L4 })
        );
        // The wide class's entry has no verdict: its rank must be 0.
        assert_eq!(
            with(maps::INGRESS_L4, &|e| e[0].1[16] = 5),
            Err(DecodeError::NoneRank { map: maps::INGRESS_L4, rank: 5 })
        );
        assert_eq!(
            with(maps::INGRESS_L4, &|e| e[0].0[0] = 63),
            Err(DecodeError::PrefixLength { map: maps::INGRESS_L4, prefix_len: 63 })
        );
        assert_eq!(
            with(maps::WORKLOADS, &|e| e[0].0 = vec![0xff]),
            Err(DecodeError::WorkloadPath { map: maps::WORKLOADS })
        );
        assert_eq!(
            with(maps::CONFIG, &|e| e.truncate(1)),
            Err(DecodeError::MissingConfig { map: maps::CONFIG, direction: "egress" })
        );
        // The prefix length list must be exactly the table's lengths, longest first.
        assert_eq!(
            with(maps::CONFIG, &|e| e[0].1[2] = 1),
            Err(DecodeError::LengthList { map: maps::CONFIG, index: 0 })
        );
        assert_eq!(
            with(maps::CONFIG, &|e| e[1].1[4..6].copy_from_slice(&[0, 16])),
            Err(DecodeError::LengthList { map: maps::CONFIG, index: 1 })
        );
        assert_eq!(
            with(maps::CONFIG, &|e| e[0].1[6] = 8),
            Err(DecodeError::LengthList { map: maps::CONFIG, index: 0 })
        );
        // L4 flags: ingress must keep the bits its L4 entries need (the trie's class entry),
        // knows only the `L4F_*` bits, and egress has none.
        assert_eq!(
            with(maps::CONFIG, &|e| e[0].1[3] = L4F_TRIE_SHARED),
            Err(DecodeError::L4Flags { map: maps::CONFIG, missing: L4F_TRIE_CLASSES })
        );
        assert_eq!(
            with(maps::CONFIG, &|e| e[0].1[3] = 0x80 | L4F_TRIE_CLASSES),
            Err(DecodeError::Flags { map: maps::CONFIG, flags: 0x80 | L4F_TRIE_CLASSES })
        );
        assert_eq!(
            with(maps::CONFIG, &|e| e[1].1[3] = 1),
            Err(DecodeError::Flags { map: maps::CONFIG, flags: 1 })
        );
        // A bit set without need costs a lookup, not a verdict.
        assert!(with(maps::CONFIG, &|e| e[0].1[3] = L4F_ALL).is_ok());
        // A listed length without entries is allowed (a probe that finds nothing).
        assert!(
            with(maps::CONFIG, &|e| {
                e[0].1[2] = 3;
                e[0].1[4..7].copy_from_slice(&[16, 8, 0]);
            })
            .is_ok()
        );
        // A key twice, in one map or (ingress L4) in the exact hash and the trie.
        assert_eq!(
            with(maps::INGRESS_V4, &|e| e.push(e[0].clone())),
            Err(DecodeError::DuplicateKey { map: maps::INGRESS_V4 })
        );
        let mut both = good.clone();
        let exact = both.maps.get(maps::INGRESS_L4_EXACT).unwrap().to_vec();
        let mut trie = both.maps.get(maps::INGRESS_L4).unwrap().to_vec();
        trie.push(exact[0].clone());
        both.maps.insert(maps::INGRESS_L4, trie.into());
        let twice = Err(DecodeError::DuplicateKey { map: maps::INGRESS_L4 });
        assert_eq!(decode(&both).map(|_| ()), twice);
        assert_eq!(validate(&both), twice);
        assert_eq!(validate(&good), Ok(()));
        let mut missing = good.clone();
        missing.maps.remove(maps::EGRESS_L4);
        assert_eq!(decode(&missing), Err(DecodeError::MissingMap(maps::EGRESS_L4)));
        assert_eq!(validate(&missing), Err(DecodeError::MissingMap(maps::EGRESS_L4)));
    }
}

/// A state with only these IPv4 prefixes and L4 entries, the same in both directions, default
/// deny, no rules or workloads: what the encoding tests feed `encode`.
#[cfg(test)]
fn bare_state(
    v4: BTreeMap<ipnet::Ipv4Net, crate::mapstate::Classes>,
    l4: BTreeMap<L4Key, L4Value>,
) -> MapState {
    let dir = DirectionMaps {
        defaults: Defaults { verdict: Action::Deny, audit: Action::Deny },
        v4,
        v6: BTreeMap::new(),
        l4,
    };
    MapState {
        host: crate::model::HostIdentity::default(),
        ingress: dir.clone(),
        egress: dir,
        workloads: BTreeMap::new(),
        rules: BTreeMap::new(),
    }
}

#[cfg(test)]
mod dir_tests {
    use super::*;
    use proptest::prelude::*;

    /// What the ingress program does with `FW_IN_V4_DIR` and `FW_IN_V4` (main.rs,
    /// `v4_classes`), over the encoded entries.
    fn dir_lookup(enc: &Encoded, addr: u32) -> Option<(u32, u32)> {
        let chunk = |key: u32| {
            enc.get(maps::INGRESS_V4_DIR)
                .unwrap()
                .iter()
                .find(|(k, _)| *k == key.to_le_bytes())
                .map(|(_, v)| V4DirChunk::from_bytes(v).unwrap())
        };
        let probe = |above: u8| {
            let table = enc.get(maps::INGRESS_V4).unwrap();
            (above + 1..=32).rev().find_map(|len| {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                let key =
                    Ipv4LpmKey { prefix_len: u32::from(len), addr: (addr & mask).to_be_bytes() };
                table
                    .iter()
                    .find(|(k, _)| *k == key.to_bytes())
                    .map(|(_, v)| ClassValue::from_bytes(v).unwrap())
            })
        };
        let found = |c: V4DirSlot| (c.wide_class != 0).then_some((c.wide_class, c.narrow_class));
        let (k1, s1, b1) = fw_common::v4_dir_l1(addr);
        let e1 = chunk(k1).unwrap().slots[s1];
        if e1.deeper & b1 == 0 {
            return found(e1);
        }
        let (k2, s2, b2) = fw_common::v4_dir_l2(addr);
        let Some(l2) = chunk(k2) else {
            return probe(16).map_or(found(e1), |c| Some((c.wide_class, c.narrow_class)));
        };
        let e2 = l2.slots[s2];
        if e2.deeper & b2 == 0 {
            return found(e2);
        }
        probe(24).map_or(found(e2), |c| Some((c.wide_class, c.narrow_class)))
    }

    fn lpm(table: &BTreeMap<Ipv4Net, Classes>, addr: u32) -> Option<(u32, u32)> {
        table
            .iter()
            .filter(|(n, _)| n.contains(&Ipv4Addr::from(addr)))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, c)| (c.wide.0, c.narrow.0))
    }

    fn net_strategy() -> impl Strategy<Value = Ipv4Net> {
        // Addresses in a few /8s and /16s so prefixes nest and share chunks.
        (0u32..4, 0u32..4, any::<u16>(), 0u8..=32).prop_map(|(a, b, low, len)| {
            let addr = (10 + a) << 24 | b << 16 | u32::from(low);
            Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn dir_lookup_is_the_longest_prefix_match(
            nets in proptest::collection::vec((net_strategy(), 1u32..50, 1u32..50), 0..40),
            with_default in any::<bool>(),
            budget in 0u32..4,
            probes in proptest::collection::vec((0u32..4, 0u32..4, any::<u16>()), 64),
        ) {
            let mut table = BTreeMap::new();
            if with_default {
                table.insert("0.0.0.0/0".parse().unwrap(), Classes { wide: ClassId(99), narrow: ClassId(98) });
            }
            for (net, w, n) in nets {
                table.insert(net, Classes { wide: ClassId(w), narrow: ClassId(n) });
            }
            let state = bare_state(table.clone(), BTreeMap::new());
            for budget in [budget, u32::MAX] {
                let enc = encode_with(&state, &EncodeOptions { v4_dir_l2_budget: budget });
                decode(&enc).unwrap();
                let l2 = enc.get(maps::INGRESS_V4_DIR).unwrap().len() - 256;
                prop_assert!(l2 <= budget as usize);
                for &(a, b, low) in &probes {
                    let addr = (10 + a) << 24 | b << 16 | u32::from(low);
                    prop_assert_eq!(dir_lookup(&enc, addr), lpm(&table, addr), "{}", Ipv4Addr::from(addr));
                }
                // Each prefix's first and last address and their neighbours.
                for net in table.keys() {
                    let (lo, hi) = (u32::from(net.network()), u32::from(net.broadcast()));
                    for addr in [lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1), lo | 5] {
                        prop_assert_eq!(dir_lookup(&enc, addr), lpm(&table, addr), "{}", Ipv4Addr::from(addr));
                    }
                }
                // Addresses outside the populated /8s, and the ends of the space.
                for addr in [0, u32::MAX, 9 << 24, 200 << 24 | 5] {
                    prop_assert_eq!(dir_lookup(&enc, addr), lpm(&table, addr));
                }
            }
        }
    }
}

#[cfg(test)]
mod l4_tests {
    use super::*;
    use crate::model::RuleId;
    use fw_common::{L4F_EXACT_SHARED_PORTS, L4PortChunk, l4_port_index};
    use proptest::prelude::*;

    /// Looks `key` up as an LPM trie over `entries` would (the longest prefix of the word
    /// among the entries of the same class and workload).
    fn lpm(
        entries: &[(L4LpmKey, fw_common::L4Value)],
        key: &L4LpmKey,
    ) -> Option<fw_common::L4Value> {
        let word = u32::from_be_bytes(key.l4);
        entries
            .iter()
            .filter(|(k, _)| k.class == key.class && k.workload == key.workload)
            .filter(|(k, _)| {
                let len = k.prefix_len - L4_KEY_FIXED_BITS;
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                word & mask == u32::from_be_bytes(k.l4)
            })
            .max_by_key(|(k, _)| k.prefix_len)
            .map(|(_, v)| *v)
    }

    fn parse(e: &Entries) -> Vec<(L4LpmKey, fw_common::L4Value)> {
        e.iter()
            .map(|(k, v)| {
                (L4LpmKey::from_bytes(k).unwrap(), fw_common::L4Value::from_bytes(v).unwrap())
            })
            .collect()
    }

    /// The shared table's and a class's entry for a word, as the ingress program finds it
    /// (main.rs, `l4_find_ingress`): the port array the loader mirrors from the exact hash
    /// (`l4_port_mirror`) for TCP and UDP ports, then the exact hash and the trie, each only
    /// when the config's L4 flags say it may hold the answer.
    fn program_lookup(
        enc: &Encoded,
        class: u32,
        proto: u8,
        port: u16,
    ) -> Option<fw_common::L4Value> {
        let exact = parse(&enc.maps[maps::INGRESS_L4_EXACT]);
        let trie = parse(&enc.maps[maps::INGRESS_L4]);
        let config = enc.maps[maps::CONFIG].iter().find(|(k, _)| *k == [0, 0, 0, 0]).unwrap().1;
        let flags = DirectionConfig::from_bytes(config).unwrap().l4_flags;
        let mut ports = vec![L4PortChunk::default(); fw_common::L4_PORT_CHUNKS as usize];
        for (k, v) in &exact {
            if let Some((chunk, slot)) = l4_port_mirror(k, v) {
                ports[chunk as usize].slots[slot] = *v;
            }
        }
        let key = L4LpmKey {
            prefix_len: L4_KEY_FIXED_BITS + 32,
            class: class.to_be_bytes(),
            workload: [0; 4],
            l4: (u32::from(proto) << 24 | u32::from(port)).to_be_bytes(),
        };
        let hash = || exact.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let in_trie = |bit: u8| if flags & bit != 0 { lpm(&trie, &key) } else { None };
        match l4_port_index(proto, port) {
            Some((chunk, slot)) if class == SHARED_CLASS => {
                let v = ports[chunk as usize].slots[slot];
                if v.verdict_action != ACTION_NONE || v.audit_action != ACTION_NONE {
                    return Some(v);
                }
                let hashed = if flags & L4F_EXACT_SHARED_PORTS != 0 { hash() } else { None };
                hashed.or_else(|| in_trie(L4F_TRIE_SHARED))
            }
            _ => {
                let bit = if class == SHARED_CLASS { L4F_TRIE_SHARED } else { L4F_TRIE_CLASSES };
                hash().or_else(|| in_trie(bit))
            }
        }
    }

    fn decision(d: u8) -> Decision {
        match d {
            0 => Decision::None,
            1 => Decision::Allow(RuleId(11)),
            _ => Decision::Deny(RuleId(12)),
        }
    }

    const PROTOS: [u8; 3] = [6, 17, 1];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// The port array and the flags give, for every word, what a longest-prefix match
        /// over the whole ingress L4 table gives.
        #[test]
        fn port_array_and_flags_give_the_longest_match(
            entries in proptest::collection::vec(
                (0u32..2, 0usize..3, any::<bool>(), 0u16..6, prop::sample::select(vec![0u8, 8, 16, 28, 31, 32]), 0u8..3, 0u8..3),
                0..12,
            ),
        ) {
            let mut l4 = BTreeMap::new();
            for (class, proto, no_port, port, len, verdict, audit) in entries {
                let word = u32::from(PROTOS[proto]) << 24 | u32::from(no_port) << 16 | u32::from(port);
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                let key = L4Key {
                    class: ClassId(class * 5),
                    workload: WorkloadId(0),
                    prefix_len: len,
                    bits: word & mask,
                };
                l4.insert(key, L4Value { verdict: decision(verdict), audit: decision(audit) });
            }
            let state = bare_state(BTreeMap::new(), l4);
            let enc = encode(&state);
            prop_assert_eq!(decode(&enc), Ok(DecodedMaps::from_state(&state)));
            let all: Vec<_> = parse(&enc.maps[maps::INGRESS_L4_EXACT])
                .into_iter()
                .chain(parse(&enc.maps[maps::INGRESS_L4]))
                .collect();
            for class in [0u32, 5] {
                for proto in PROTOS {
                    for port in 0u16..7 {
                        let key = L4LpmKey {
                            prefix_len: L4_KEY_FIXED_BITS + 32,
                            class: class.to_be_bytes(),
                            workload: [0; 4],
                            l4: (u32::from(proto) << 24 | u32::from(port)).to_be_bytes(),
                        };
                        prop_assert_eq!(
                            program_lookup(&enc, class, proto, port),
                            lpm(&all, &key),
                            "class {} proto {} port {}", class, proto, port
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn flags_say_which_fallbacks_hold_entries() {
        let key = |class: u32, prefix_len: u8, bits: u32| L4Key {
            class: ClassId(class),
            workload: WorkloadId(0),
            prefix_len,
            bits,
        };
        let allow = L4Value { verdict: Decision::Allow(RuleId(3)), audit: Decision::None };
        let none = L4Value { verdict: Decision::None, audit: Decision::None };
        let flags = |entries: &[(L4Key, L4Value)]| {
            let state = bare_state(BTreeMap::new(), entries.iter().copied().collect());
            ingress_l4_flags(&state)
        };
        // Whole-word entries only: the port array and the exact hash answer everything.
        assert_eq!(
            flags(&[(key(0, 32, 6 << 24 | 443), allow), (key(5, 32, 6 << 24 | 22), allow)]),
            0
        );
        assert_eq!(flags(&[(key(0, 16, 17 << 24), allow)]), L4F_TRIE_SHARED);
        assert_eq!(flags(&[(key(5, 8, 6 << 24), allow)]), L4F_TRIE_CLASSES);
        // A shared TCP port entry with no decision stays out of the port array.
        assert_eq!(flags(&[(key(0, 32, 6 << 24 | 80), none)]), L4F_EXACT_SHARED_PORTS);
        // ... but an ICMP one or a class's does not concern it.
        assert_eq!(flags(&[(key(0, 32, 1 << 24 | 8), none), (key(5, 32, 6 << 24 | 80), none)]), 0);
    }
}
