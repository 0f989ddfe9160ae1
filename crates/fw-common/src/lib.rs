//! The ABI between the eBPF programs and user space: map names, keys and values.
//!
//! Both sides compile this crate, so it is `#![no_std]` and every type is plain data:
//! `#[repr(C)]`, only fixed-width integers and byte arrays (no `bool`, `usize`, `Option` or
//! enums, whose layout or valid bit patterns the verifier and the loader cannot rely on), and
//! explicit `_pad` fields wherever the C layout would otherwise leave a hole, so that every byte
//! of a key is defined (the kernel hashes and compares keys byte by byte; an uninitialised hole
//! would make equal keys differ). Sizes and field offsets are checked at compile time.
//!
//! Byte order. The programs run on little-endian targets (`bpfel`), so plain numeric fields
//! (`prefix_len`, rule ids, class ids in values, ...) are host order, which is little-endian;
//! `to_bytes` writes them with explicit `to_le_bytes`, so the encoding does not depend on the
//! machine the compiler runs on. The data part of an LPM trie key is different: the kernel
//! compares it bit by bit from the most significant bit of its first byte, so every multi-byte
//! field inside LPM data (addresses, and the class, workload and L4 word of [`L4LpmKey`]) is a
//! big-endian byte array (network order for addresses). Keeping those as `[u8; N]` rather than
//! `u32` makes the byte order part of the type instead of a convention a caller could forget.
//!
//! `to_bytes`/`from_bytes` give the exact bytes the maps hold; they match the in-memory layout
//! on a little-endian machine, which is what `aya` copies into the kernel.
//!
//! Generations. Every map the compiler fills exists twice: the kernel declares each as an
//! outer array-of-maps with [`GENERATIONS`] slots whose inner maps user space creates, and
//! [`maps::GENERATION`] names the slot a packet uses ([`ActiveGeneration`]). A packet reads the
//! generation once, so an update written to the standby slot becomes visible all at once.
//! The counter maps ([`maps::RULE_COUNTERS`], [`maps::STATS`]) are not generational: rule ids
//! are stable across compiles, so a rule's counter survives an update.

#![no_std]

use core::mem::{align_of, offset_of, size_of};

pub mod conntrack;
pub mod events;

/// Names of the maps, as the eBPF programs declare them (at most 15 bytes: the kernel's
/// `BPF_OBJ_NAME_LEN` is 16 including the terminating NUL).
pub mod maps {
    /// Ingress IPv4 table: [`Ipv4LpmKey`](crate::Ipv4LpmKey) -> [`ClassValue`](crate::ClassValue),
    /// the same entries as the other address tables, held in a hash (not an LPM trie): the
    /// key is the prefix length and the address with the bits past it zero, matched exactly.
    /// The program probes the lengths [`DirectionConfig::v4_lengths`](crate::DirectionConfig)
    /// lists, longest first; the first hit is the longest prefix. The encoded table holds
    /// every prefix, the kernel's hash only those the program can probe (longer than the
    /// [`INGRESS_V4_DIR`] level that answers): the loader keeps the others in a record no
    /// program reads (an array map per generation, pinned as `FW_IN_V4R_G<n>`; see fw-loader's
    /// `v4rest`), and a generation reads back as both together.
    pub const INGRESS_V4: &str = "FW_IN_V4";
    /// Ingress IPv4 direct-indexed table (DIR-16-8), in front of [`INGRESS_V4`]: a hash of
    /// `u32` chunk keys (little-endian) -> [`V4DirChunk`](crate::V4DirChunk) (256 slots).
    /// Keys `0..=255` are the first level, one chunk per /8, one slot per /16
    /// ([`v4_dir_l1`](crate::v4_dir_l1)); keys from [`V4_DIR_L2_BASE`](crate::V4_DIR_L2_BASE)
    /// on are second-level chunks, one per /16 holding longer prefixes, one slot per /24
    /// ([`v4_dir_l2`](crate::v4_dir_l2)). A slot holds the classes of the longest prefix of
    /// at most its level's length (/16, /24) covering it, and a mask of the 32 equal blocks
    /// of its range (/21s of a /16, /29s of a /24) that longer prefixes intersect. An address
    /// whose block bit is clear has the slot's classes; else, at the first level, its /16's
    /// second-level chunk decides (or, when the compiler built none, [`INGRESS_V4`] probed at
    /// the lengths /17-/32), at the second level [`INGRESS_V4`] probed at the lengths
    /// /25-/32; no hit leaves the slot's classes. Derived by `encode` from the IPv4 table,
    /// which stays the table's content.
    pub const INGRESS_V4_DIR: &str = "FW_IN_V4_DIR";
    /// The first level of [`INGRESS_V4_DIR`] again, as an array of its 256 chunks (index =
    /// key; each a [`V4Dir1Chunk`](crate::V4Dir1Chunk), the hash's slots with a pool
    /// reference each): the program reads first-level slots here, because the verifier inlines an
    /// array lookup into a few instructions where a hash lookup is a call that hashes the
    /// key and walks a bucket (about 13 ns a packet on the benchmark machine). Not filled by
    /// `encode` and not in [`GENERATIONAL`]'s encoded state: the loader writes every chunk
    /// of keys `0..=255` it writes into [`INGRESS_V4_DIR`] here as well, checks both hold
    /// the same when it reads the generation back, and keeps [`INGRESS_V4_DIR`] as the
    /// record of the encoded chunks. Generational (an outer array-of-maps like the others).
    ///
    /// Each slot also says where its /16's second-level chunk is in [`INGRESS_V4_DIR2`]
    /// ([`V4Dir1Slot::pool`](crate::V4Dir1Slot)), so the whole DIR-16-8 walk is array reads.
    pub const INGRESS_V4_DIR1: &str = "FW_IN_V4_D1";
    /// The second-level chunks of [`INGRESS_V4_DIR`] (keys from
    /// [`V4_DIR_L2_BASE`](crate::V4_DIR_L2_BASE) on) again, in a preallocated array of
    /// [`V4_DIR_POOL_CHUNKS`](crate::V4_DIR_POOL_CHUNKS) `u32`-indexed
    /// [`V4DirChunk`](crate::V4DirChunk)s (a pool): the program finds a /16's chunk at the
    /// index its first-level slot in [`INGRESS_V4_DIR1`] gives
    /// ([`V4Dir1Slot::pool`](crate::V4Dir1Slot)) and reads it inline, where the hash lookup is
    /// a call that hashes the key and walks a bucket. A slot whose `pool` is 0 has no chunk
    /// here (none exists, or the pool was full when it was written): the program asks
    /// [`INGRESS_V4_DIR`] as before, so every state is answered correctly whatever the pool
    /// holds. Like [`INGRESS_V4_DIR1`], not filled by `encode` and not in [`GENERATIONAL`]'s
    /// encoded state: the loader allocates the pool's slots as it writes second-level chunks
    /// into [`INGRESS_V4_DIR`] (full writes and deltas; a removed chunk frees its slot), checks
    /// each slot a first-level slot points at holds the hash's chunk (and that no slot
    /// points at a chunk the hash does not hold) when it reads the generation back or
    /// verifies a delta, and keeps [`INGRESS_V4_DIR`] as the record. Pool slots no
    /// first-level slot points at are never read. Generational.
    pub const INGRESS_V4_DIR2: &str = "FW_IN_V4_D2";
    /// Ingress IPv6 LPM trie: [`Ipv6LpmKey`](crate::Ipv6LpmKey) -> [`ClassValue`](crate::ClassValue).
    pub const INGRESS_V6: &str = "FW_IN_V6";
    /// Ingress L4 LPM trie: [`L4LpmKey`](crate::L4LpmKey) -> [`L4Value`](crate::L4Value).
    pub const INGRESS_L4: &str = "FW_IN_L4";
    /// Ingress L4 exact table: the entries of the ingress L4 table whose L4 prefix is the whole
    /// word (one protocol and port or ICMP type), in a hash keyed by the same
    /// [`L4LpmKey`](crate::L4LpmKey) (prefix length always
    /// [`L4_KEY_FIXED_BITS`](crate::L4_KEY_FIXED_BITS) + 32) -> [`L4Value`](crate::L4Value).
    /// Such an entry is the longest possible match for its word, so the program asks the
    /// [`INGRESS_L4`] trie (which holds the other entries) only when this misses.
    pub const INGRESS_L4_EXACT: &str = "FW_IN_L4X";
    /// The shared table's TCP and UDP port entries of [`INGRESS_L4_EXACT`] again, as an
    /// array of [`L4_PORT_CHUNKS`](crate::L4_PORT_CHUNKS) `u32`-indexed
    /// [`L4PortChunk`](crate::L4PortChunk)s of 256 slots, one slot per protocol and port
    /// ([`l4_port_index`](crate::l4_port_index)): the program reads the shared table's entry
    /// for a TCP or UDP packet with a port here, an array lookup the verifier inlines, where
    /// the hash lookup is a call (about 13 ns a packet). A slot holds the hash's entry when
    /// [`l4_port_mirror`](crate::l4_port_mirror) places it there, else all zeros (no decision
    /// in either half: no entry); on a zero slot the program asks the hash and the trie only
    /// when the config's [`DirectionConfig::l4_flags`](crate::DirectionConfig) say they may
    /// hold the answer. Like [`INGRESS_V4_DIR1`], not filled by `encode` and not in
    /// [`GENERATIONAL`]'s encoded state: the loader writes every entry of
    /// [`INGRESS_L4_EXACT`] that has a slot here as well (full writes and deltas), checks both
    /// hold the same when it reads the generation back or verifies a delta, and keeps
    /// [`INGRESS_L4_EXACT`] as the record. Generational.
    pub const INGRESS_L4_PORTS: &str = "FW_IN_L4P";
    /// Which (address class, protocol) pairs may have an entry in [`INGRESS_L4_EXACT`]: an
    /// array of [`L4_CLASS_FILTER_CHUNKS`](crate::L4_CLASS_FILTER_CHUNKS) `u32`-indexed
    /// [`L4ClassFilterChunk`](crate::L4ClassFilterChunk)s of 32,768 bits, one bit per
    /// [`l4_class_filter_bit`](crate::l4_class_filter_bit) (placed by
    /// [`l4_class_filter_at`](crate::l4_class_filter_at)). The
    /// program asks the exact hash for a class's entry only when its bit is set, so a packet
    /// whose classes have no exact entry for its protocol (an address matching no rule with
    /// an address restriction, a UDP packet where the classes' rules are all TCP) skips those
    /// hash calls (about 13 ns each); the trie is asked as before. Several pairs share a bit
    /// (a set bit only costs the hash call). A clear bit must mean "no entry": every class
    /// entry of the hash sets its bit. Like [`INGRESS_L4_PORTS`], not filled by `encode` and
    /// not in [`GENERATIONAL`]'s encoded state: the loader derives it from
    /// [`INGRESS_L4_EXACT`], exactly on full writes; a delta sets the bits of the entries it
    /// writes and leaves those of the entries it removes (they may be shared), so after
    /// deltas the filter may hold stale bits until the next full write; reading a generation
    /// back or verifying a delta refuses a clear bit that an entry needs. Generational.
    pub const INGRESS_L4_CLASSES: &str = "FW_IN_L4C";
    /// The address classes' entries of [`INGRESS_L4_EXACT`] (class not
    /// [`SHARED_CLASS`](crate::SHARED_CLASS), workload 0) again, in a cuckoo table the
    /// program reads with array lookups: [`L4_CLASS_TABLE_CHUNKS`](crate::L4_CLASS_TABLE_CHUNKS)
    /// `u32`-indexed [`L4ClassTableChunk`](crate::L4ClassTableChunk)s of buckets, then one
    /// header chunk at index [`L4_CLASS_TABLE_HEADER`](crate::L4_CLASS_TABLE_HEADER). An entry
    /// sits in one of the two buckets [`l4_class_buckets`](crate::l4_class_buckets) gives
    /// for its (class, L4 word), so a lookup reads at most two buckets of two slots, each an
    /// array lookup the verifier inlines plus a few compares, where the hash lookup is a call
    /// that hashes a 16-byte key and walks a bucket list (about 13 ns a packet, more when the
    /// entry is not in the cache). The table holds *every* class entry or says it does not:
    /// while the header's [`L4ClassTableChunk::incomplete`](crate::L4ClassTableChunk) word is
    /// not [`L4_CLASS_TABLE_INCOMPLETE`](crate::L4_CLASS_TABLE_INCOMPLETE), each class entry
    /// of the hash is in one of its buckets, and a miss here is a miss in the hash (a fresh
    /// table, all zeros, is the complete table of a fresh, empty hash); the marker makes the
    /// program ask [`INGRESS_L4_CLASSES`] and the hash as before (set when an entry finds no
    /// place, e.g. the hash holds more class entries than the table has slots). Like the other derived arrays, not filled by `encode` and not in
    /// [`GENERATIONAL`]'s encoded state: the loader builds it from [`INGRESS_L4_EXACT`] on
    /// full writes, moves and places entries on deltas, and checks on read-back that a table
    /// marked complete holds exactly the hash's class entries. Generational.
    pub const INGRESS_L4_CLASS_TABLE: &str = "FW_IN_L4K";
    /// Egress IPv4 LPM trie: [`Ipv4LpmKey`](crate::Ipv4LpmKey) -> [`ClassValue`](crate::ClassValue).
    pub const EGRESS_V4: &str = "FW_EG_V4";
    /// Egress IPv6 LPM trie: [`Ipv6LpmKey`](crate::Ipv6LpmKey) -> [`ClassValue`](crate::ClassValue).
    pub const EGRESS_V6: &str = "FW_EG_V6";
    /// Egress L4 LPM trie: [`L4LpmKey`](crate::L4LpmKey) -> [`L4Value`](crate::L4Value).
    pub const EGRESS_L4: &str = "FW_EG_L4";
    /// Array of two [`DirectionConfig`](crate::DirectionConfig), indexed by
    /// [`CONFIG_INGRESS`](crate::CONFIG_INGRESS) and [`CONFIG_EGRESS`](crate::CONFIG_EGRESS);
    /// the key is a `u32` index (little-endian).
    pub const CONFIG: &str = "FW_CONFIG";
    /// Workload table -> [`WorkloadValue`](crate::WorkloadValue). The kernel keys it by
    /// [`WorkloadKey`](crate::WorkloadKey) (cgroup id); until the daemon resolves paths to
    /// cgroup ids, the encoded form is keyed by the normalised cgroup path's UTF-8 bytes.
    pub const WORKLOADS: &str = "FW_WORKLOADS";
    /// One-element array (key `0u32`) -> [`ActiveGeneration`](crate::ActiveGeneration):
    /// which slot of every generational map above the programs read.
    pub const GENERATION: &str = "FW_GEN";
    /// Per-CPU hash: rule id (`u32`, host order) -> [`Counters`](crate::Counters) of the
    /// packets the rule decided (see [`Counters`](crate::Counters) for what "decided" means).
    pub const RULE_COUNTERS: &str = "FW_RULE_CNT";
    /// Per-CPU array of [`RULE_COUNTER_SLOTS`](crate::RULE_COUNTER_SLOTS)
    /// [`RuleCounterSlot`](crate::RuleCounterSlot)s, indexed by
    /// [`rule_counter_slot`](crate::rule_counter_slot): a direct-mapped front of
    /// [`RULE_COUNTERS`]. A rule counts into its slot when the slot is free or already its
    /// own on that CPU, else into the hash; a rule's count is the sum of both over the CPUs.
    /// The programs add to a slot with an inlined array lookup, where the hash costs a hashed
    /// lookup call per decided packet.
    pub const RULE_COUNTER_CACHE: &str = "FW_RULE_CNT_DM";
    /// Per-CPU array of [`Counters`](crate::Counters), indexed by
    /// [`stat_index`](crate::stat_index): outcomes no rule decided (defaults, always-allowed
    /// traffic, malformed packets, ...).
    pub const STATS: &str = "FW_STATS";
    /// LRU hash: [`ConntrackKey`](crate::conntrack::ConntrackKey) ->
    /// [`ConntrackValue`](crate::conntrack::ConntrackValue), flows local processes sent on.
    /// Not generational (it is traffic state, not policy).
    pub const CONNTRACK: &str = "FW_CONNTRACK";
    /// Array of [`CT_SEEN_SLOTS`](crate::conntrack::CT_SEEN_SLOTS) `u32`: the conntrack
    /// table's seen filter (see [`crate::conntrack`]), written with every table entry. Not
    /// generational.
    pub const CONNTRACK_SEEN: &str = "FW_CT_SEEN";
    /// Ring buffer of [`Event`](crate::events::Event)s.
    pub const EVENTS: &str = "FW_EVENTS";
    /// Per-CPU array (one element) of [`EventLimiter`](crate::events::EventLimiter): the
    /// events' rate limit and the count of dropped events.
    pub const EVENT_LIMIT: &str = "FW_EV_LIMIT";

    /// The generational maps the loader derives from those [`GENERATIONAL`] lists (not in an
    /// encoded state).
    pub const DERIVED: [&str; 5] = [
        INGRESS_V4_DIR1,
        INGRESS_V4_DIR2,
        INGRESS_L4_PORTS,
        INGRESS_L4_CLASSES,
        INGRESS_L4_CLASS_TABLE,
    ];

    /// The maps the compiler's `encode` fills, each an outer array-of-maps with
    /// [`GENERATIONS`](crate::GENERATIONS) slots.
    pub const GENERATIONAL: [&str; 10] = [
        INGRESS_V4,
        INGRESS_V4_DIR,
        INGRESS_V6,
        INGRESS_L4,
        INGRESS_L4_EXACT,
        EGRESS_V4,
        EGRESS_V6,
        EGRESS_L4,
        CONFIG,
        WORKLOADS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// The XDP program that filters packets arriving at the host.
    pub const INGRESS: &str = "fw_ingress";
    /// The cgroup sock_addr programs that filter connect(2) and sendmsg(2) of local processes.
    pub const CONNECT4: &str = "fw_connect4";
    /// See [`CONNECT4`].
    pub const CONNECT6: &str = "fw_connect6";
    /// See [`CONNECT4`].
    pub const SENDMSG4: &str = "fw_sendmsg4";
    /// See [`CONNECT4`].
    pub const SENDMSG6: &str = "fw_sendmsg6";
    /// The egress sock_addr programs, in the order the loader loads and attaches them.
    pub const EGRESS: [&str; 4] = [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6];
    /// The cgroup_skb egress program that records outgoing flows for connection tracking.
    pub const CONNTRACK: &str = "fw_ct_egress";
}

/// Number of generations (slots of every generational map).
pub const GENERATIONS: u32 = 2;

/// Number of entries of the config array (one per direction).
pub const CONFIG_ENTRIES: u32 = 2;

/// Action byte: no rule decided (the default applies).
pub const ACTION_NONE: u8 = 0;
/// Action byte: allow.
pub const ACTION_ALLOW: u8 = 1;
/// Action byte: deny.
pub const ACTION_DENY: u8 = 2;

/// [`L4Value::flags`] bit: the verdict rule has `log: true`.
pub const FLAG_LOG_VERDICT: u8 = 1 << 0;
/// [`L4Value::flags`] bit: the audit rule has `log: true`.
pub const FLAG_LOG_AUDIT: u8 = 1 << 1;

/// [`DirectionConfig::l4_flags`] bit (ingress): the L4 trie ([`maps::INGRESS_L4`]) holds an
/// entry of the shared table ([`SHARED_CLASS`]), so a shared lookup that misses the exact
/// hash must ask the trie.
pub const L4F_TRIE_SHARED: u8 = 1 << 0;
/// [`DirectionConfig::l4_flags`] bit (ingress): the L4 trie holds an entry of an address
/// class, so a class lookup that misses the exact hash must ask the trie.
pub const L4F_TRIE_CLASSES: u8 = 1 << 1;
/// [`DirectionConfig::l4_flags`] bit (ingress): the exact hash ([`maps::INGRESS_L4_EXACT`])
/// holds a shared TCP or UDP port entry that the port array ([`maps::INGRESS_L4_PORTS`])
/// does not mirror (one with no decision in either half, which still hides the trie's shorter
/// entries), so a zero slot must still be looked up in the hash.
pub const L4F_EXACT_SHARED_PORTS: u8 = 1 << 2;
/// Every [`DirectionConfig::l4_flags`] bit.
pub const L4F_ALL: u8 = L4F_TRIE_SHARED | L4F_TRIE_CLASSES | L4F_EXACT_SHARED_PORTS;

/// Index of the ingress entry in the config array.
pub const CONFIG_INGRESS: u32 = 0;
/// Index of the egress entry in the config array.
pub const CONFIG_EGRESS: u32 = 1;

/// Index of a direction's block in the [`maps::STATS`] array (the same numbering as the config
/// array).
pub const DIRECTION_INGRESS: u32 = CONFIG_INGRESS;
/// See [`DIRECTION_INGRESS`].
pub const DIRECTION_EGRESS: u32 = CONFIG_EGRESS;

/// Stats slot: the verdict was allow and the direction's default decided it.
pub const STAT_DEFAULT_ALLOW: u32 = 0;
/// Stats slot: the verdict was deny and the direction's default decided it.
pub const STAT_DEFAULT_DENY: u32 = 1;
/// Stats slot: every audit-deny outcome (allowed, but audit-mode policies would have denied),
/// whether an audit rule or the audit default would have denied it.
pub const STAT_AUDIT_DENY: u32 = 2;
/// Stats slot: audit-deny outcomes that the audit default (no rule) would have denied. The
/// ones an audit rule would have denied are in that rule's [`maps::RULE_COUNTERS`] entry.
pub const STAT_AUDIT_DEFAULT_DENY: u32 = 3;
/// Stats slot: always allowed, ARP (ingress).
pub const STAT_ALWAYS_ARP: u32 = 4;
/// Stats slot: always allowed, IPv6 neighbour discovery (ICMPv6 133-137, ingress).
pub const STAT_ALWAYS_ND: u32 = 5;
/// Stats slot: always allowed, loopback peer address (127.0.0.0/8, ::1).
pub const STAT_ALWAYS_LOOPBACK: u32 = 6;
/// Stats slot: always allowed, reply to a flow the host initiated (connection tracking).
/// Ingress looks connection tracking up only for packets the policy does not simply allow
/// (denied, audit-denied, or logged), so a reply the policy allows anyway is counted under
/// the rule or default that allowed it, not here (same for [`STAT_ALWAYS_RELATED`]).
pub const STAT_ALWAYS_REPLY: u32 = 7;
/// Stats slot: always allowed, ICMP error about a flow the host initiated.
pub const STAT_ALWAYS_RELATED: u32 = 8;
/// Stats slot: passed because the frame carries neither IPv4, IPv6 nor ARP.
pub const STAT_NOT_IP: u32 = 9;
/// Stats slot: dropped as truncated or malformed (headers that do not fit, bad version or
/// length fields, too many VLAN tags or IPv6 extension headers).
pub const STAT_MALFORMED: u32 = 10;
/// Stats slot: the program's own state was missing or invalid (no inner map in the active
/// generation, no config, an unknown action byte); the program's internal-error action applied.
pub const STAT_INTERNAL_ERROR: u32 = 11;
/// Slots reserved per direction (more than are used, so new slots keep the indices stable).
pub const STATS_PER_DIRECTION: u32 = 16;
/// Entries of the [`maps::STATS`] array.
pub const STATS_ENTRIES: u32 = 2 * STATS_PER_DIRECTION;

/// Index into the [`maps::STATS`] array of a direction's ([`DIRECTION_INGRESS`],
/// [`DIRECTION_EGRESS`]) stat (`STAT_*`).
pub const fn stat_index(direction: u32, stat: u32) -> u32 {
    direction * STATS_PER_DIRECTION + stat
}

/// Bits of LPM data in an [`L4LpmKey`] before the L4 word: class and workload, always matched
/// in full.
pub const L4_KEY_FIXED_BITS: u32 = 64;

/// Key of an IPv4 LPM trie (layout of the kernel's `struct bpf_lpm_trie_key` + 4 data bytes),
/// and of the ingress IPv4 hash ([`maps::INGRESS_V4`]), which matches it exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ipv4LpmKey {
    /// Number of leading bits of `addr` that are significant, 0..=32. Host order.
    pub prefix_len: u32,
    /// The address, network order (big-endian), bits past `prefix_len` zero.
    pub addr: [u8; 4],
}

/// Key of an IPv6 LPM trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ipv6LpmKey {
    /// Number of leading bits of `addr` that are significant, 0..=128. Host order.
    pub prefix_len: u32,
    /// The address, network order (big-endian), bits past `prefix_len` zero.
    pub addr: [u8; 16],
}

/// Value of the address LPM tries: the address's class in each of the two layers. The
/// compiler splits every rule's prefixes by length into a wide and a narrow layer and builds
/// classes per layer; the programs look up the L4 entries of both classes and of
/// [`SHARED_CLASS`] and keep the best decision (see [`L4Value`]'s ranks), so a rule on a wide
/// prefix is not repeated in the classes of the narrow prefixes inside it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClassValue {
    /// The wide layer's address class id (rules matching through a short prefix), never 0. Host order (it is a value, never compared by the trie).
    pub wide_class: u32,
    /// The narrow layer's address class id (rules matching through a long prefix), never 0.
    /// Host order.
    pub narrow_class: u32,
}

/// Key of the L4 LPM trie: exact class and workload, then a prefix of the L4 word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4LpmKey {
    /// Significant bits counted from the start of `class`: always
    /// [`L4_KEY_FIXED_BITS`] (class and workload in full) plus the L4 prefix length (0..=32),
    /// so 64..=96. Host order.
    pub prefix_len: u32,
    /// Address class id, big-endian (LPM data).
    pub class: [u8; 4],
    /// Workload class id, big-endian (LPM data); 0 = no workload.
    pub workload: [u8; 4],
    /// The L4 word `proto << 24 | no_port << 16 | port` (port slot = ICMP type for ICMP),
    /// big-endian (LPM data), bits past the L4 prefix zero.
    pub l4: [u8; 4],
}

/// Value of the L4 trie: the enforcing verdict and the audit (as-if-enforcing) decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4Value {
    /// [`ACTION_NONE`], [`ACTION_ALLOW`] or [`ACTION_DENY`] from enforcing rules.
    pub verdict_action: u8,
    /// The same, as if audit-mode policies were enforcing.
    pub audit_action: u8,
    /// [`FLAG_LOG_VERDICT`] | [`FLAG_LOG_AUDIT`].
    pub flags: u8,
    /// Always 0.
    pub _pad: u8,
    /// Rule id that decided `verdict_action`; 0 with [`ACTION_NONE`]. Host order.
    pub verdict_rule: u32,
    /// Rule id that decided `audit_action`; 0 with [`ACTION_NONE`]. Host order.
    pub audit_rule: u32,
    /// High 32 bits of the 64-bit precedence rank of `verdict_rule` (lower decides first
    /// among decisions with the same action; compiler: the policy's ordinal); 0 with
    /// [`ACTION_NONE`]. The programs look up three L4 entries (those of the address's wide and
    /// narrow classes, [`ClassValue`], and the [`SHARED_CLASS`]'s) and keep, for the verdict and for the audit decision separately,
    /// the better one: deny before allow, then the lower rank; none loses to anything. The
    /// rank is split into two `u32`s because the LPM trie's values must not be aligned to
    /// more than 4 bytes (its 12-byte key data is followed directly by the value). Host order.
    pub verdict_rank_hi: u32,
    /// Low 32 bits of the rank of `verdict_rule` (compiler: the rule's index). Host order.
    pub verdict_rank_lo: u32,
    /// High 32 bits of the rank of `audit_rule`, as `verdict_rank_hi`. Host order.
    pub audit_rank_hi: u32,
    /// Low 32 bits of the rank of `audit_rule`. Host order.
    pub audit_rank_lo: u32,
}

impl L4Value {
    /// The verdict decision's rank, `hi << 32 | lo`.
    pub const fn verdict_rank(&self) -> u64 {
        ((self.verdict_rank_hi as u64) << 32) | self.verdict_rank_lo as u64
    }

    /// The audit decision's rank, `hi << 32 | lo`.
    pub const fn audit_rank(&self) -> u64 {
        ((self.audit_rank_hi as u64) << 32) | self.audit_rank_lo as u64
    }
}

/// The reserved class id of the shared L4 table: the decisions of the rules whose peers cover
/// every address of both families. Address classes are never 0, so `(SHARED_CLASS, workload,
/// L4 word)` keys cannot collide with an address class's entries.
pub const SHARED_CLASS: u32 = 0;

/// Slots of a [`V4DirChunk`].
pub const V4_DIR_SLOTS: usize = 256;
/// The first second-level key of [`maps::INGRESS_V4_DIR`] (the first level has keys 0..=255).
pub const V4_DIR_L2_BASE: u32 = 256;
/// The most chunks [`maps::INGRESS_V4_DIR`] can hold: 256 first-level chunks and one
/// second-level chunk per /16.
pub const V4_DIR_MAX_CHUNKS: u32 = V4_DIR_L2_BASE + (1 << 16);
/// First-level key, slot and block bit (of the slot's `deeper` mask: the address's /21) of
/// an IPv4 address (host-order `u32`) in [`maps::INGRESS_V4_DIR`].
#[inline(always)]
pub const fn v4_dir_l1(addr: u32) -> (u32, usize, u32) {
    (addr >> 24, ((addr >> 16) & 0xff) as usize, 1 << ((addr >> 11) & 31))
}

/// Second-level key, slot and block bit (the address's /29) of an IPv4 address (host-order
/// `u32`) in [`maps::INGRESS_V4_DIR`].
#[inline(always)]
pub const fn v4_dir_l2(addr: u32) -> (u32, usize, u32) {
    (V4_DIR_L2_BASE + (addr >> 16), ((addr >> 8) & 0xff) as usize, 1 << ((addr >> 3) & 31))
}

/// One slot of a [`V4DirChunk`]: a /16 (first level) or a /24 (second level).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4DirSlot {
    /// The classes of the longest prefix of at most the slot's length covering it (both 0:
    /// none).
    pub wide_class: u32,
    pub narrow_class: u32,
    /// Bit `b`: a longer prefix intersects block `b` of the slot's 32 equal blocks (see
    /// [`v4_dir_l1`], [`v4_dir_l2`]); 0: the slot's classes are every address's answer.
    pub deeper: u32,
}

/// Value of [`maps::INGRESS_V4_DIR`]: 256 slots (see [`V4DirSlot`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct V4DirChunk {
    pub slots: [V4DirSlot; V4_DIR_SLOTS],
}

impl Default for V4DirChunk {
    fn default() -> Self {
        Self { slots: [V4DirSlot::default(); V4_DIR_SLOTS] }
    }
}

/// Chunks of [`maps::INGRESS_V4_DIR2`], the pool of second-level chunks: 12 MiB per
/// generation (3 KiB a chunk, preallocated). A policy needs one chunk per /16 holding
/// prefixes longer than /16: about 390 for the benchmarks' 100k prefixes, 3,900 for 1M.
pub const V4_DIR_POOL_CHUNKS: u32 = 4096;

/// One slot of a [`V4Dir1Chunk`]: a first-level slot of [`maps::INGRESS_V4_DIR`] (one /16)
/// and where its second-level chunk is in the pool.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct V4Dir1Slot {
    /// As [`V4DirSlot::wide_class`].
    pub wide_class: u32,
    /// As [`V4DirSlot::narrow_class`].
    pub narrow_class: u32,
    /// As [`V4DirSlot::deeper`].
    pub deeper: u32,
    /// 1 + the index in [`maps::INGRESS_V4_DIR2`] of this /16's second-level chunk; 0: not in
    /// the pool (the program asks [`maps::INGRESS_V4_DIR`]).
    pub pool: u32,
}

impl V4Dir1Slot {
    /// The first-level slot `slot` of [`maps::INGRESS_V4_DIR`] with pool reference `pool`.
    pub const fn new(slot: V4DirSlot, pool: u32) -> Self {
        Self {
            wide_class: slot.wide_class,
            narrow_class: slot.narrow_class,
            deeper: slot.deeper,
            pool,
        }
    }

    /// The slot of [`maps::INGRESS_V4_DIR`] this mirrors (without the pool reference).
    pub const fn dir_slot(&self) -> V4DirSlot {
        V4DirSlot {
            wide_class: self.wide_class,
            narrow_class: self.narrow_class,
            deeper: self.deeper,
        }
    }
}

/// Value of [`maps::INGRESS_V4_DIR1`]: a first-level chunk of [`maps::INGRESS_V4_DIR`] with
/// each /16's pool reference (see [`V4Dir1Slot`]); 4 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct V4Dir1Chunk {
    pub slots: [V4Dir1Slot; V4_DIR_SLOTS],
}

impl Default for V4Dir1Chunk {
    fn default() -> Self {
        Self { slots: [V4Dir1Slot::default(); V4_DIR_SLOTS] }
    }
}

impl V4Dir1Chunk {
    /// The chunk of [`maps::INGRESS_V4_DIR`] this mirrors (without the pool references).
    pub fn dir_chunk(&self) -> V4DirChunk {
        let mut out = V4DirChunk::default();
        for (o, s) in out.slots.iter_mut().zip(&self.slots) {
            *o = s.dir_slot();
        }
        out
    }
}

/// Slots of an [`L4PortChunk`].
pub const L4_PORT_SLOTS: usize = 256;
/// Chunks of [`maps::INGRESS_L4_PORTS`]: 256 for the TCP ports, then 256 for the UDP ports.
pub const L4_PORT_CHUNKS: u32 = 512;

/// Value of [`maps::INGRESS_L4_PORTS`]: the shared table's entries of 256 consecutive ports of
/// one protocol; a slot of all zeros holds no entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L4PortChunk {
    pub slots: [L4Value; L4_PORT_SLOTS],
}

impl Default for L4PortChunk {
    fn default() -> Self {
        Self { slots: [L4Value::default(); L4_PORT_SLOTS] }
    }
}

/// The chunk (index of [`maps::INGRESS_L4_PORTS`]) and slot of a TCP or UDP port; `None` for
/// any other protocol.
#[inline(always)]
pub const fn l4_port_index(proto: u8, port: u16) -> Option<(u32, usize)> {
    let base = match proto {
        6 => 0,
        17 => L4_PORT_CHUNKS / 2,
        _ => return None,
    };
    Some((base + (port >> 8) as u32, (port & 0xff) as usize))
}

/// Where [`maps::INGRESS_L4_PORTS`] mirrors an entry of [`maps::INGRESS_L4_EXACT`]: the chunk
/// and slot ([`l4_port_index`]) when the entry is the shared table's ([`SHARED_CLASS`],
/// workload 0) for one TCP or UDP port (the L4 word `proto << 24 | port`, no "no port" bit)
/// and has a decision in either half (so its slot is not all zeros); `None` for every other
/// entry, which only the hash holds.
pub fn l4_port_mirror(key: &L4LpmKey, value: &L4Value) -> Option<(u32, usize)> {
    let word = u32::from_be_bytes(key.l4);
    let shared = u32::from_be_bytes(key.class) == SHARED_CLASS && key.workload == [0; 4];
    let decides = value.verdict_action != ACTION_NONE || value.audit_action != ACTION_NONE;
    if key.prefix_len != L4_KEY_FIXED_BITS + 32 || !shared || word & 0x00ff_0000 != 0 || !decides {
        return None;
    }
    l4_port_index((word >> 24) as u8, word as u16)
}

/// `u64` words of an [`L4ClassFilterChunk`].
pub const L4_CLASS_FILTER_WORDS: usize = 512;
/// Chunks of [`maps::INGRESS_L4_CLASSES`]: 32 of 4 KiB, 128 KiB per generation.
pub const L4_CLASS_FILTER_CHUNKS: u32 = 32;
/// Bits of [`maps::INGRESS_L4_CLASSES`] (2^20).
pub const L4_CLASS_FILTER_BITS: u32 = L4_CLASS_FILTER_CHUNKS * L4_CLASS_FILTER_WORDS as u32 * 64;
const _: () = assert!(L4_CLASS_FILTER_BITS == 1 << 20);

/// Value of [`maps::INGRESS_L4_CLASSES`]: 32,768 bits of the filter; bit `b` of the map is
/// bit `b % 64` of word `b / 64 % 512` of chunk `b / 32768` (see [`l4_class_filter_at`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L4ClassFilterChunk {
    pub words: [u64; L4_CLASS_FILTER_WORDS],
}
const _: () = assert!(core::mem::size_of::<L4ClassFilterChunk>() == 4096);

impl Default for L4ClassFilterChunk {
    fn default() -> Self {
        Self { words: [0; L4_CLASS_FILTER_WORDS] }
    }
}

/// Where bit `bit` of [`maps::INGRESS_L4_CLASSES`] is: (chunk, word in the chunk, mask).
#[inline(always)]
pub const fn l4_class_filter_at(bit: u32) -> (u32, usize, u64) {
    (bit >> 15, ((bit >> 6) & 511) as usize, 1 << (bit & 63))
}

/// Slots of an [`L4ClassBucket`].
pub const L4_CLASS_BUCKET_SLOTS: usize = 2;
/// `log2` of the buckets of [`maps::INGRESS_L4_CLASS_TABLE`].
pub const L4_CLASS_BUCKET_BITS: u32 = 13;
/// Buckets of [`maps::INGRESS_L4_CLASS_TABLE`] (8,192: 16,384 slots; a two-choice cuckoo
/// table with two-slot buckets places entries up to about 85% full, so about 13,000 class
/// entries before the table gives up and says so).
pub const L4_CLASS_BUCKETS: u32 = 1 << L4_CLASS_BUCKET_BITS;
/// Buckets of an [`L4ClassTableChunk`].
pub const L4_CLASS_CHUNK_BUCKETS: usize = 64;
/// Bucket chunks of [`maps::INGRESS_L4_CLASS_TABLE`] (128 of 4.5 KiB); the header chunk
/// follows them.
pub const L4_CLASS_TABLE_CHUNKS: u32 = L4_CLASS_BUCKETS / L4_CLASS_CHUNK_BUCKETS as u32;
/// Index of the header chunk of [`maps::INGRESS_L4_CLASS_TABLE`]: its `incomplete` word says
/// whether the table holds every class entry; its buckets are unused (zeros).
pub const L4_CLASS_TABLE_HEADER: u32 = L4_CLASS_TABLE_CHUNKS;
/// Elements of [`maps::INGRESS_L4_CLASS_TABLE`]: the bucket chunks and the header.
pub const L4_CLASS_TABLE_ENTRIES: u32 = L4_CLASS_TABLE_CHUNKS + 1;
/// The header's `incomplete` word when the table does not hold every class entry of the
/// exact hash, which sends the program to the hash; 0 when it does.
pub const L4_CLASS_TABLE_INCOMPLETE: u32 = 0x4c34_4b30;

/// One entry of [`maps::INGRESS_L4_CLASS_TABLE`]: an address class's exact L4 entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4ClassSlot {
    /// Address class id, host order; 0 ([`SHARED_CLASS`], never stored here) marks an empty
    /// slot.
    pub class: u32,
    /// The L4 word `proto << 24 | no_port << 16 | port`, host order.
    pub word: u32,
    /// The entry's value, as in [`maps::INGRESS_L4_EXACT`] (an entry without a decision is
    /// stored too: it hides the trie's shorter entries).
    pub value: L4Value,
}

/// A bucket of [`maps::INGRESS_L4_CLASS_TABLE`]: two slots, filled from the first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4ClassBucket {
    pub slots: [L4ClassSlot; L4_CLASS_BUCKET_SLOTS],
}

/// Value of [`maps::INGRESS_L4_CLASS_TABLE`]: 64 consecutive buckets (bucket `b` is bucket
/// `b % 64` of chunk `b / 64`), or, at [`L4_CLASS_TABLE_HEADER`], the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L4ClassTableChunk {
    /// Header chunk only: [`L4_CLASS_TABLE_INCOMPLETE`] when the table does not hold every
    /// class entry of the exact hash, else 0; 0 in bucket chunks. Host order.
    pub incomplete: u32,
    /// Always 0.
    pub _pad: u32,
    pub buckets: [L4ClassBucket; L4_CLASS_CHUNK_BUCKETS],
}

impl Default for L4ClassTableChunk {
    fn default() -> Self {
        Self { incomplete: 0, _pad: 0, buckets: [L4ClassBucket::default(); L4_CLASS_CHUNK_BUCKETS] }
    }
}

/// The two buckets of [`maps::INGRESS_L4_CLASS_TABLE`] an entry of `class` for the L4 word
/// `word` may sit in (they can be the same). Two multiplicative hashes of the pair, each
/// keeping its top [`L4_CLASS_BUCKET_BITS`] bits: a few instructions in the program.
#[inline(always)]
pub const fn l4_class_buckets(class: u32, word: u32) -> (u32, u32) {
    let a = (class ^ word.rotate_left(13)).wrapping_mul(0x9e37_79b1);
    let b = (class.wrapping_mul(0x85eb_ca6b) ^ word).wrapping_mul(0xc2b2_ae35);
    (a >> (32 - L4_CLASS_BUCKET_BITS), b >> (32 - L4_CLASS_BUCKET_BITS))
}

/// Where bucket `bucket` of [`maps::INGRESS_L4_CLASS_TABLE`] is: (chunk, bucket in the
/// chunk).
#[inline(always)]
pub const fn l4_class_bucket_at(bucket: u32) -> (u32, usize) {
    (bucket / L4_CLASS_CHUNK_BUCKETS as u32, (bucket as usize) % L4_CLASS_CHUNK_BUCKETS)
}

/// The (class, L4 word) under which [`maps::INGRESS_L4_CLASS_TABLE`] holds an entry of
/// [`maps::INGRESS_L4_EXACT`]: an address class's entry (not [`SHARED_CLASS`], workload 0,
/// the whole L4 word); `None` for every other entry, which only the hash holds.
pub fn l4_class_table_entry(key: &L4LpmKey) -> Option<(u32, u32)> {
    let class = u32::from_be_bytes(key.class);
    (key.prefix_len == L4_KEY_FIXED_BITS + 32 && class != SHARED_CLASS && key.workload == [0; 4])
        .then(|| (class, u32::from_be_bytes(key.l4)))
}

/// The bit of [`maps::INGRESS_L4_CLASSES`] for an address class and an IP protocol: 18 bits
/// of a multiplicative hash of the class id (ids are hashes already; the multiply spreads
/// ids that differ in high bits only), then two bits for the protocol (TCP, UDP, ICMP or
/// ICMPv6, any other). Word `bit / 64`, bit `bit % 64` of that word.
#[inline(always)]
pub const fn l4_class_filter_bit(class: u32, proto: u8) -> u32 {
    let h = class.wrapping_mul(0x9e37_79b1) >> 14;
    let bucket = match proto {
        6 => 0,
        17 => 1,
        1 | 58 => 2,
        _ => 3,
    };
    (h << 2) | bucket
}

/// The bit of [`maps::INGRESS_L4_CLASSES`] an entry of [`maps::INGRESS_L4_EXACT`] needs set:
/// that of its class and protocol (the L4 word's top byte) for an address class's entry
/// (whatever its value: an entry without a decision still hides the trie's shorter ones);
/// `None` for the shared table's ([`SHARED_CLASS`]), which the program looks up without
/// the filter.
pub fn l4_class_filter_entry(key: &L4LpmKey) -> Option<u32> {
    let class = u32::from_be_bytes(key.class);
    (class != SHARED_CLASS).then(|| l4_class_filter_bit(class, key.l4[0]))
}

/// Capacity of [`DirectionConfig::v4_lengths`]: every IPv4 prefix length, /0 to /32, plus
/// padding to a multiple of 4 bytes.
pub const V4_LENGTH_SLOTS: usize = 36;

/// The per-direction configuration (one element of the [`maps::CONFIG`] array).
///
/// Besides the defaults it carries the list of prefix lengths the direction's IPv4 table
/// holds, longest first: the ingress program holds IPv4 as one hash keyed by
/// [`Ipv4LpmKey`] (prefix length and masked address, see [`maps::INGRESS_V4`]) and finds the
/// longest match by probing these lengths in order, the first hit winning. The list is
/// generational with the table it describes (both are in the same generation), so a packet
/// never probes one generation's table with another's lengths. The egress program reads only
/// the defaults (its IPv4 table is an LPM trie); the list is written for both directions so
/// the two entries are built the same way.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirectionConfig {
    /// Default verdict when no enforcing rule decided: [`ACTION_ALLOW`] or [`ACTION_DENY`].
    pub verdict_default: u8,
    /// Default of the audit evaluation: [`ACTION_ALLOW`] or [`ACTION_DENY`].
    pub audit_default: u8,
    /// Number of valid entries at the start of `v4_lengths` (0..=33).
    pub v4_length_count: u8,
    /// Ingress: which L4 lookups the program may skip, as `L4F_*` bits; a bit clear promises
    /// that the table it names holds no entry of that kind, so a lookup there would miss (a
    /// bit set costs at most a lookup that misses). Written by `encode` from the L4 table,
    /// generational with it. Egress: always 0 (the egress program asks the trie).
    pub l4_flags: u8,
    /// The distinct prefix lengths (0..=32) of the direction's IPv4 table, strictly
    /// decreasing; slots from `v4_length_count` on are 0.
    pub v4_lengths: [u8; V4_LENGTH_SLOTS],
}

impl Default for DirectionConfig {
    fn default() -> Self {
        Self {
            verdict_default: 0,
            audit_default: 0,
            v4_length_count: 0,
            l4_flags: 0,
            v4_lengths: [0; V4_LENGTH_SLOTS],
        }
    }
}

/// Key of the kernel's workload table.
///
/// Placeholder: the compiler knows workloads by cgroup path; the daemon will resolve each path
/// to the cgroup's id (what `bpf_get_current_cgroup_id` and `bpf_get_current_ancestor_cgroup_id`
/// return) and key the kernel map by it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    /// cgroup v2 id (the cgroup directory's inode number). Host order.
    pub cgroup_id: u64,
}

/// Value of the workload table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadValue {
    /// Workload class id, never 0. Host order.
    pub workload: u32,
}

/// Value of the [`maps::GENERATION`] array: the generation packets use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ActiveGeneration {
    /// Slot of every generational map to read, `0..GENERATIONS`. Host order. Any other value
    /// makes the programs' outer lookups miss, which they treat as an internal error.
    pub index: u32,
}

/// A packet and byte count: the value of [`maps::RULE_COUNTERS`] and [`maps::STATS`].
///
/// Both maps are per-CPU, so the programs add without atomics and user space sums the CPUs.
/// A rule's counter counts the packets it decided: for an enforcing rule, the packets whose
/// verdict (allow or deny) it decided, including allowed packets that audit-mode policies
/// would have denied; for an audit-mode rule, the packets it would have denied while the real
/// verdict was allow (audit-deny). The two never overlap: an audit-deny needs an allow verdict,
/// so the rule that would have denied is always an audit rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Number of packets. Host order.
    pub packets: u64,
    /// Sum of their lengths in bytes as the hook saw them (XDP: the whole frame from the
    /// Ethernet header on). Host order.
    pub bytes: u64,
}

/// Slots of [`maps::RULE_COUNTER_CACHE`] (per CPU: 96 KiB each). Rule ids are hashes, so a
/// few of a policy's rules share a slot; the later of two on a CPU counts in the hash.
pub const RULE_COUNTER_SLOTS: u32 = 4096;

/// The slot of `rule` in [`maps::RULE_COUNTER_CACHE`] (below [`RULE_COUNTER_SLOTS`]): the
/// top bits of a multiplicative hash of the id.
#[inline(always)]
pub const fn rule_counter_slot(rule: u32) -> u32 {
    rule.wrapping_mul(0x9e37_79b1) >> (32 - RULE_COUNTER_SLOTS.trailing_zeros())
}

/// Value of [`maps::RULE_COUNTER_CACHE`]: whose counts a slot holds on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleCounterSlot {
    /// The rule the slot counts for; 0 (never a rule id: the defaults count in
    /// [`maps::STATS`]) while the slot is free. Taken by the first rule that counts there on
    /// this CPU and kept until the counters are reset. Host order.
    pub rule: u32,
    /// Always 0.
    pub _pad: u32,
    /// The rule's packets and bytes on this CPU, as in [`maps::RULE_COUNTERS`].
    pub counters: Counters,
}

// The layouts are ABI: pin sizes and offsets so an accidental change fails to compile.
const _: () = {
    assert!(size_of::<RuleCounterSlot>() == 24);
    assert!(offset_of!(RuleCounterSlot, counters) == 8);
    assert!(RULE_COUNTER_SLOTS.is_power_of_two());
    assert!(size_of::<Ipv4LpmKey>() == 8);
    assert!(offset_of!(Ipv4LpmKey, addr) == 4);
    assert!(size_of::<Ipv6LpmKey>() == 20);
    assert!(offset_of!(Ipv6LpmKey, addr) == 4);
    assert!(size_of::<ClassValue>() == 8);
    assert!(offset_of!(ClassValue, narrow_class) == 4);
    assert!(size_of::<L4LpmKey>() == 16);
    assert!(offset_of!(L4LpmKey, class) == 4);
    assert!(offset_of!(L4LpmKey, workload) == 8);
    assert!(offset_of!(L4LpmKey, l4) == 12);
    assert!(size_of::<L4Value>() == 28);
    assert!(align_of::<L4Value>() == 4);
    assert!(offset_of!(L4Value, verdict_rank_hi) == 12);
    assert!(offset_of!(L4Value, verdict_rank_lo) == 16);
    assert!(offset_of!(L4Value, audit_rank_hi) == 20);
    assert!(offset_of!(L4Value, audit_rank_lo) == 24);
    assert!(offset_of!(L4Value, audit_action) == 1);
    assert!(offset_of!(L4Value, flags) == 2);
    assert!(offset_of!(L4Value, _pad) == 3);
    assert!(offset_of!(L4Value, verdict_rule) == 4);
    assert!(offset_of!(L4Value, audit_rule) == 8);
    assert!(size_of::<DirectionConfig>() == 40);
    assert!(offset_of!(DirectionConfig, l4_flags) == 3);
    assert!(size_of::<L4PortChunk>() == 7168);
    assert!(size_of::<L4ClassSlot>() == 36);
    assert!(offset_of!(L4ClassSlot, word) == 4);
    assert!(offset_of!(L4ClassSlot, value) == 8);
    assert!(size_of::<L4ClassBucket>() == 72);
    assert!(size_of::<L4ClassTableChunk>() == 4616);
    assert!(offset_of!(L4ClassTableChunk, buckets) == 8);
    assert!(align_of::<L4ClassTableChunk>() == 4);
    assert!(align_of::<L4PortChunk>() == 4);
    assert!(size_of::<V4DirSlot>() == 12);
    assert!(size_of::<V4DirChunk>() == 3072);
    assert!(size_of::<V4Dir1Slot>() == 16);
    assert!(offset_of!(V4Dir1Slot, pool) == 12);
    assert!(size_of::<V4Dir1Chunk>() == 4096);
    assert!(offset_of!(DirectionConfig, v4_length_count) == 2);
    assert!(offset_of!(DirectionConfig, v4_lengths) == 4);
    assert!(size_of::<WorkloadKey>() == 8);
    assert!(size_of::<WorkloadValue>() == 4);
    assert!(size_of::<ActiveGeneration>() == 4);
    assert!(size_of::<Counters>() == 16);
    assert!(offset_of!(Counters, bytes) == 8);
    assert!(STATS_ENTRIES == stat_index(DIRECTION_EGRESS, STATS_PER_DIRECTION));
    assert!(STAT_INTERNAL_ERROR < STATS_PER_DIRECTION);
};

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn array4(b: &[u8], at: usize) -> [u8; 4] {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    w
}

/// Conversion to and from the exact bytes a map holds. `from_bytes` takes a fixed-size array,
/// so it cannot fail; the caller checks the length.
pub trait Bytes: Sized {
    /// `size_of::<Self>()`.
    const SIZE: usize;
    /// The bytes as stored in the map (little-endian host-order fields).
    type Array: AsRef<[u8]>;
    fn to_bytes(&self) -> Self::Array;
    /// Reads a value; `bytes.len()` must be `SIZE`, otherwise `None`.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

impl Bytes for Ipv4LpmKey {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 8];
    fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&self.prefix_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.addr);
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self { prefix_len: le_u32(b, 0), addr: array4(b, 4) })
    }
}

impl Bytes for Ipv6LpmKey {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 20];
    fn to_bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&self.prefix_len.to_le_bytes());
        b[4..20].copy_from_slice(&self.addr);
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&b[4..20]);
        Some(Self { prefix_len: le_u32(b, 0), addr })
    }
}

impl Bytes for V4DirChunk {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 3072];
    fn to_bytes(&self) -> [u8; 3072] {
        let mut b = [0u8; 3072];
        for (out, c) in b.chunks_exact_mut(12).zip(&self.slots) {
            out[0..4].copy_from_slice(&c.wide_class.to_le_bytes());
            out[4..8].copy_from_slice(&c.narrow_class.to_le_bytes());
            out[8..12].copy_from_slice(&c.deeper.to_le_bytes());
        }
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut out = Self::default();
        for (slot, c) in out.slots.iter_mut().zip(b.chunks_exact(12)) {
            *slot = V4DirSlot {
                wide_class: le_u32(c, 0),
                narrow_class: le_u32(c, 4),
                deeper: le_u32(c, 8),
            };
        }
        Some(out)
    }
}

impl Bytes for V4Dir1Chunk {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 4096];
    fn to_bytes(&self) -> [u8; 4096] {
        let mut b = [0u8; 4096];
        for (out, c) in b.chunks_exact_mut(16).zip(&self.slots) {
            out[0..4].copy_from_slice(&c.wide_class.to_le_bytes());
            out[4..8].copy_from_slice(&c.narrow_class.to_le_bytes());
            out[8..12].copy_from_slice(&c.deeper.to_le_bytes());
            out[12..16].copy_from_slice(&c.pool.to_le_bytes());
        }
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut out = Self::default();
        for (slot, c) in out.slots.iter_mut().zip(b.chunks_exact(16)) {
            *slot = V4Dir1Slot {
                wide_class: le_u32(c, 0),
                narrow_class: le_u32(c, 4),
                deeper: le_u32(c, 8),
                pool: le_u32(c, 12),
            };
        }
        Some(out)
    }
}

impl Bytes for L4PortChunk {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 7168];
    fn to_bytes(&self) -> [u8; 7168] {
        let mut b = [0u8; 7168];
        for (out, v) in b.chunks_exact_mut(L4Value::SIZE).zip(&self.slots) {
            out.copy_from_slice(&v.to_bytes());
        }
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut out = Self::default();
        for (slot, v) in out.slots.iter_mut().zip(b.chunks_exact(L4Value::SIZE)) {
            *slot = L4Value::from_bytes(v)?;
        }
        Some(out)
    }
}

impl Bytes for ClassValue {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 8];
    fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..4].copy_from_slice(&self.wide_class.to_le_bytes());
        b[4..8].copy_from_slice(&self.narrow_class.to_le_bytes());
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE)
            .then(|| Self { wide_class: le_u32(b, 0), narrow_class: le_u32(b, 4) })
    }
}

impl Bytes for L4LpmKey {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 16];
    fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.prefix_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.class);
        b[8..12].copy_from_slice(&self.workload);
        b[12..16].copy_from_slice(&self.l4);
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self {
            prefix_len: le_u32(b, 0),
            class: array4(b, 4),
            workload: array4(b, 8),
            l4: array4(b, 12),
        })
    }
}

impl Bytes for L4Value {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 28];
    fn to_bytes(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0] = self.verdict_action;
        b[1] = self.audit_action;
        b[2] = self.flags;
        b[3] = self._pad;
        b[4..8].copy_from_slice(&self.verdict_rule.to_le_bytes());
        b[8..12].copy_from_slice(&self.audit_rule.to_le_bytes());
        b[12..16].copy_from_slice(&self.verdict_rank_hi.to_le_bytes());
        b[16..20].copy_from_slice(&self.verdict_rank_lo.to_le_bytes());
        b[20..24].copy_from_slice(&self.audit_rank_hi.to_le_bytes());
        b[24..28].copy_from_slice(&self.audit_rank_lo.to_le_bytes());
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self {
            verdict_action: b[0],
            audit_action: b[1],
            flags: b[2],
            _pad: b[3],
            verdict_rule: le_u32(b, 4),
            audit_rule: le_u32(b, 8),
            verdict_rank_hi: le_u32(b, 12),
            verdict_rank_lo: le_u32(b, 16),
            audit_rank_hi: le_u32(b, 20),
            audit_rank_lo: le_u32(b, 24),
        })
    }
}

impl Bytes for DirectionConfig {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 40];
    fn to_bytes(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[0] = self.verdict_default;
        b[1] = self.audit_default;
        b[2] = self.v4_length_count;
        b[3] = self.l4_flags;
        b[4..40].copy_from_slice(&self.v4_lengths);
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut v4_lengths = [0u8; V4_LENGTH_SLOTS];
        v4_lengths.copy_from_slice(&b[4..40]);
        Some(Self {
            verdict_default: b[0],
            audit_default: b[1],
            v4_length_count: b[2],
            l4_flags: b[3],
            v4_lengths,
        })
    }
}

impl Bytes for WorkloadKey {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 8];
    fn to_bytes(&self) -> [u8; 8] {
        self.cgroup_id.to_le_bytes()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut w = [0u8; 8];
        (b.len() == Self::SIZE).then(|| {
            w.copy_from_slice(b);
            Self { cgroup_id: u64::from_le_bytes(w) }
        })
    }
}

impl Bytes for WorkloadValue {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 4];
    fn to_bytes(&self) -> [u8; 4] {
        self.workload.to_le_bytes()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self { workload: le_u32(b, 0) })
    }
}

impl Bytes for ActiveGeneration {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 4];
    fn to_bytes(&self) -> [u8; 4] {
        self.index.to_le_bytes()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self { index: le_u32(b, 0) })
    }
}

impl Bytes for Counters {
    const SIZE: usize = size_of::<Self>();
    type Array = [u8; 16];
    fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.packets.to_le_bytes());
        b[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        b
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let mut p = [0u8; 8];
        let mut n = [0u8; 8];
        p.copy_from_slice(&b[0..8]);
        n.copy_from_slice(&b[8..16]);
        Some(Self { packets: u64::from_le_bytes(p), bytes: u64::from_le_bytes(n) })
    }
}

/// User-space only: `aya::Pod`, the marker `aya` needs to copy these types into and out of
/// maps. The kernel side never enables `user`, so it never links aya.
#[cfg(feature = "user")]
mod pod {
    use aya::Pod;

    use super::*;

    // SAFETY: all of these are #[repr(C)] structs of integers and byte arrays with explicit
    // padding (checked by the size and offset assertions above); any bit pattern is valid.
    unsafe impl Pod for Ipv4LpmKey {}
    // SAFETY: as above.
    unsafe impl Pod for Ipv6LpmKey {}
    // SAFETY: as above.
    unsafe impl Pod for ClassValue {}
    // SAFETY: as above (an array of `V4DirSlot`, three `u32`s).
    unsafe impl Pod for V4DirChunk {}
    // SAFETY: as above (an array of `V4Dir1Slot`, four `u32`s).
    unsafe impl Pod for V4Dir1Chunk {}
    // SAFETY: as above (an array of `L4Value`).
    unsafe impl Pod for L4PortChunk {}
    // SAFETY: as above.
    unsafe impl Pod for L4ClassFilterChunk {}
    // SAFETY: as above (two `u32`s and an array of buckets of `L4ClassSlot`s, each two `u32`s
    // and an `L4Value`).
    unsafe impl Pod for L4ClassTableChunk {}
    // SAFETY: as above.
    unsafe impl Pod for L4LpmKey {}
    // SAFETY: as above.
    unsafe impl Pod for L4Value {}
    // SAFETY: as above.
    unsafe impl Pod for DirectionConfig {}
    // SAFETY: as above.
    unsafe impl Pod for WorkloadKey {}
    // SAFETY: as above.
    unsafe impl Pod for WorkloadValue {}
    // SAFETY: as above.
    unsafe impl Pod for ActiveGeneration {}
    // SAFETY: as above.
    unsafe impl Pod for Counters {}
    // SAFETY: as above.
    unsafe impl Pod for RuleCounterSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in [
            maps::INGRESS_V4,
            maps::INGRESS_V4_DIR,
            maps::INGRESS_V4_DIR1,
            maps::INGRESS_V4_DIR2,
            maps::INGRESS_V6,
            maps::INGRESS_L4,
            maps::INGRESS_L4_EXACT,
            maps::INGRESS_L4_PORTS,
            maps::INGRESS_L4_CLASSES,
            maps::INGRESS_L4_CLASS_TABLE,
            maps::EGRESS_V4,
            maps::EGRESS_V6,
            maps::EGRESS_L4,
            maps::CONFIG,
            maps::WORKLOADS,
            maps::GENERATION,
            maps::RULE_COUNTERS,
            maps::RULE_COUNTER_CACHE,
            maps::STATS,
            maps::CONNTRACK,
            maps::CONNTRACK_SEEN,
            maps::EVENTS,
            maps::EVENT_LIMIT,
            programs::INGRESS,
            programs::CONNECT4,
            programs::CONNECT6,
            programs::SENDMSG4,
            programs::SENDMSG6,
            programs::CONNTRACK,
        ] {
            assert!(name.len() <= 15, "{name}");
        }
        // Inner maps are named "<outer>.g<N>" by the loader.
        for name in maps::GENERATIONAL.into_iter().chain(maps::DERIVED) {
            assert!(name.len() + 3 <= 15, "{name}");
        }
    }

    #[test]
    fn stat_slots_are_distinct_per_direction() {
        let slots = [
            STAT_DEFAULT_ALLOW,
            STAT_DEFAULT_DENY,
            STAT_AUDIT_DENY,
            STAT_AUDIT_DEFAULT_DENY,
            STAT_ALWAYS_ARP,
            STAT_ALWAYS_ND,
            STAT_ALWAYS_LOOPBACK,
            STAT_ALWAYS_REPLY,
            STAT_ALWAYS_RELATED,
            STAT_NOT_IP,
            STAT_MALFORMED,
            STAT_INTERNAL_ERROR,
        ];
        for (i, a) in slots.iter().enumerate() {
            assert!(*a < STATS_PER_DIRECTION);
            assert!(slots[i + 1..].iter().all(|b| b != a));
        }
        assert_eq!(stat_index(DIRECTION_EGRESS, STAT_DEFAULT_DENY), 17);
        assert!(stat_index(DIRECTION_EGRESS, STAT_INTERNAL_ERROR) < STATS_ENTRIES);
    }

    #[test]
    fn counters_and_generation_bytes_are_little_endian() {
        let c = Counters { packets: 0x0102, bytes: 0x0a0b_0c0d };
        assert_eq!(c.to_bytes(), [2, 1, 0, 0, 0, 0, 0, 0, 0x0d, 0x0c, 0x0b, 0x0a, 0, 0, 0, 0]);
        assert_eq!(Counters::from_bytes(&c.to_bytes()), Some(c));
        assert_eq!(Counters::from_bytes(&[0; 15]), None);
        let g = ActiveGeneration { index: 1 };
        assert_eq!(g.to_bytes(), [1, 0, 0, 0]);
        assert_eq!(ActiveGeneration::from_bytes(&g.to_bytes()), Some(g));
    }

    #[test]
    fn l4_key_bytes_put_lpm_data_in_big_endian_after_a_little_endian_length() {
        let key = L4LpmKey {
            prefix_len: 64 + 24,
            class: 0x0102_0304u32.to_be_bytes(),
            workload: 0u32.to_be_bytes(),
            l4: (6u32 << 24 | 443).to_be_bytes(),
        };
        let b = key.to_bytes();
        assert_eq!(b, [88, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 6, 0, 1, 0xbb]);
        assert_eq!(L4LpmKey::from_bytes(&b), Some(key));
        assert_eq!(L4LpmKey::from_bytes(&b[1..]), None);
    }

    #[test]
    fn value_bytes_round_trip_with_little_endian_fields() {
        let v = L4Value {
            verdict_action: ACTION_DENY,
            audit_action: ACTION_ALLOW,
            flags: FLAG_LOG_AUDIT,
            _pad: 0,
            verdict_rule: 0x0a0b_0c0d,
            audit_rule: 7,
            verdict_rank_hi: 0x0102,
            verdict_rank_lo: 3,
            audit_rank_hi: 0,
            audit_rank_lo: 9,
        };
        assert_eq!((v.verdict_rank(), v.audit_rank()), (0x0102_0000_0003, 9));
        let b = v.to_bytes();
        assert_eq!(
            b,
            [
                2, 1, 2, 0, 0x0d, 0x0c, 0x0b, 0x0a, 7, 0, 0, 0, 2, 1, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0,
                9, 0, 0, 0
            ]
        );
        assert_eq!(L4Value::from_bytes(&b), Some(v));
        let k = Ipv6LpmKey {
            prefix_len: 48,
            addr: [0x20, 1, 0xd, 0xb8, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        assert_eq!(Ipv6LpmKey::from_bytes(&k.to_bytes()), Some(k));
        let mut v4_lengths = [0; V4_LENGTH_SLOTS];
        v4_lengths[..3].copy_from_slice(&[32, 24, 0]);
        let c = DirectionConfig {
            verdict_default: ACTION_DENY,
            audit_default: ACTION_DENY,
            v4_length_count: 3,
            l4_flags: L4F_TRIE_CLASSES,
            v4_lengths,
        };
        let b = c.to_bytes();
        assert_eq!(b[..8], [2, 2, 3, 2, 32, 24, 0, 0]);
        assert!(b[8..].iter().all(|&x| x == 0));
        assert_eq!(DirectionConfig::from_bytes(&c.to_bytes()), Some(c));
        let cv = ClassValue { wide_class: 0x0102, narrow_class: 7 };
        assert_eq!(cv.to_bytes(), [2, 1, 0, 0, 7, 0, 0, 0]);
        assert_eq!(ClassValue::from_bytes(&cv.to_bytes()), Some(cv));
        let w = WorkloadKey { cgroup_id: 0x0102 };
        assert_eq!(w.to_bytes(), [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(WorkloadKey::from_bytes(&w.to_bytes()), Some(w));
    }

    #[test]
    fn port_slots_mirror_only_shared_tcp_and_udp_port_entries_with_a_decision() {
        let key = |class: u32, workload: u32, len: u32, word: u32| L4LpmKey {
            prefix_len: L4_KEY_FIXED_BITS + len,
            class: class.to_be_bytes(),
            workload: workload.to_be_bytes(),
            l4: word.to_be_bytes(),
        };
        let allow = L4Value { verdict_action: ACTION_ALLOW, verdict_rule: 9, ..L4Value::default() };
        let audit = L4Value { audit_action: ACTION_DENY, audit_rule: 9, ..L4Value::default() };
        let none = L4Value::default();
        // TCP 443: chunk 1 (ports 256-511), slot 443 - 256; UDP 53: chunk 256, slot 53.
        assert_eq!(l4_port_mirror(&key(0, 0, 32, 6 << 24 | 443), &allow), Some((1, 187)));
        assert_eq!(l4_port_mirror(&key(0, 0, 32, 17 << 24 | 53), &audit), Some((256, 53)));
        assert_eq!(l4_port_mirror(&key(0, 0, 32, 17 << 24 | 65535), &allow), Some((511, 255)));
        assert_eq!(l4_port_index(6, 0), Some((0, 0)));
        assert_eq!(l4_port_index(1, 3), None);
        // Not mirrored: no decision, a class's entry, a workload, a prefix, another protocol,
        // the "no port" word.
        assert_eq!(l4_port_mirror(&key(0, 0, 32, 6 << 24 | 443), &none), None);
        assert_eq!(l4_port_mirror(&key(5, 0, 32, 6 << 24 | 443), &allow), None);
        assert_eq!(l4_port_mirror(&key(0, 3, 32, 6 << 24 | 443), &allow), None);
        assert_eq!(l4_port_mirror(&key(0, 0, 24, 6 << 24 | 256), &allow), None);
        assert_eq!(l4_port_mirror(&key(0, 0, 32, 1 << 24 | 8), &allow), None);
        assert_eq!(l4_port_mirror(&key(0, 0, 32, 6 << 24 | 1 << 16), &allow), None);
        let mut chunk = L4PortChunk::default();
        chunk.slots[187] = allow;
        let b = chunk.to_bytes();
        assert_eq!(b[187 * 28..188 * 28], allow.to_bytes());
        assert_eq!(L4PortChunk::from_bytes(&b), Some(chunk));
        assert_eq!(L4PortChunk::from_bytes(&b[1..]), None);
    }

    #[test]
    fn first_level_chunk_bytes_round_trip_with_the_pool_reference_last() {
        let mut chunk = V4Dir1Chunk::default();
        let slot = V4DirSlot { wide_class: 1, narrow_class: 2, deeper: 0x8000_0001 };
        chunk.slots[255] = V4Dir1Slot::new(slot, 4096);
        let b = chunk.to_bytes();
        let at = 255 * size_of::<V4Dir1Slot>() + core::mem::offset_of!(V4Dir1Slot, pool);
        assert_eq!(b[at..at + 4], 4096u32.to_le_bytes());
        assert_eq!(V4Dir1Chunk::from_bytes(&b), Some(chunk));
        assert_eq!(V4Dir1Chunk::from_bytes(&b[1..]), None);
        assert_eq!(chunk.dir_chunk().slots[255], slot);
    }

    #[test]
    fn class_filter_bits_cover_class_entries_only() {
        let key = |class: u32, word: u32| L4LpmKey {
            prefix_len: L4_KEY_FIXED_BITS + 32,
            class: class.to_be_bytes(),
            workload: [0; 4],
            l4: word.to_be_bytes(),
        };
        // The shared table's entries are looked up without the filter.
        assert_eq!(l4_class_filter_entry(&key(SHARED_CLASS, 6 << 24 | 443)), None);
        // A class's entry needs the bit of its class and the word's protocol.
        let tcp = l4_class_filter_entry(&key(77, 6 << 24 | 443)).unwrap();
        assert_eq!(tcp, l4_class_filter_bit(77, 6));
        assert!(tcp < L4_CLASS_FILTER_BITS);
        // The protocols' bits of one class differ; ICMP and ICMPv6 share one, as do the others.
        let bits = [6, 17, 1, 47].map(|p| l4_class_filter_bit(77, p));
        assert_eq!(bits.map(|b| b >> 2), [bits[0] >> 2; 4]);
        assert_eq!(bits.map(|b| b & 3), [0, 1, 2, 3]);
        assert_eq!(l4_class_filter_bit(77, 58), bits[2]);
        assert_eq!(l4_class_filter_bit(77, 132), bits[3]);
        // Ids that differ in their high bits only get different bits.
        assert_ne!(l4_class_filter_bit(1, 6), l4_class_filter_bit(1 | 1 << 30, 6));
        assert!(l4_class_filter_bit(u32::MAX, 255) < L4_CLASS_FILTER_BITS);
        assert_eq!(l4_class_filter_at(0), (0, 0, 1));
        assert_eq!(l4_class_filter_at(65), (0, 1, 2));
        assert_eq!(l4_class_filter_at(L4_CLASS_FILTER_BITS - 1), (31, 511, 1 << 63));
    }

    #[test]
    fn byte_lengths_equal_type_sizes() {
        assert_eq!(Ipv4LpmKey::default().to_bytes().len(), Ipv4LpmKey::SIZE);
        assert_eq!(Ipv6LpmKey::default().to_bytes().len(), Ipv6LpmKey::SIZE);
        assert_eq!(ClassValue::default().to_bytes().len(), ClassValue::SIZE);
        assert_eq!(L4LpmKey::default().to_bytes().len(), L4LpmKey::SIZE);
        assert_eq!(L4Value::default().to_bytes().len(), L4Value::SIZE);
        assert_eq!(DirectionConfig::default().to_bytes().len(), DirectionConfig::SIZE);
        assert_eq!(WorkloadKey::default().to_bytes().len(), WorkloadKey::SIZE);
        assert_eq!(WorkloadValue::default().to_bytes().len(), WorkloadValue::SIZE);
        assert_eq!(ActiveGeneration::default().to_bytes().len(), ActiveGeneration::SIZE);
        assert_eq!(Counters::default().to_bytes().len(), Counters::SIZE);
    }
}
