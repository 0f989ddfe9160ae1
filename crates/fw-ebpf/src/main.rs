//! The kernel programs of the host firewall: the XDP ingress filter (this file), the egress
//! filter on connect/sendmsg (`egress`), the connection tracker (`conntrack`) and events
//! (`events`).
//!
//! The program is a direct transcription of the lookup precedence documented at the top of
//! fw-compiler's `mapstate.rs` (and modelled in user space by `lookup.rs`): it holds no policy
//! logic of its own. It parses the frame (`parse`), lets always-allowed traffic through, then
//! asks the maps the compiler filled, in the order that document gives, and counts the outcome.
//!
//! Maps. Everything the compiler fills exists in two generations: each map below marked
//! "generational" is an array-of-maps with [`GENERATIONS`] slots whose inner maps user space
//! creates (so a standby generation can get bigger inner maps than the active one), and
//! [`FW_GEN`] says which slot is active. A packet reads the generation once and then uses only
//! that generation's maps, so a policy update written to the standby slot takes effect with one
//! array write. The inner map types declared here are templates: the kernel requires inner maps
//! of the same type, key size, value size and flags (and, for arrays, the same size); the
//! templates' `max_entries` only size the template itself (LPM tries are never preallocated,
//! so it costs nothing). The egress tables and the workload table are read by `egress`; the
//! conntrack table and the event maps live in their modules and are not generational (they
//! hold traffic state, not policy).
//!
//! Byte order: LPM data is big-endian, values are host order (see `fw-common`).

#![no_std]
#![no_main]

#[cfg(feature = "bench")]
mod bench;
mod conntrack;
mod egress;
mod events;
mod parse;

use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, xdp_action};
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap};
use aya_ebpf::macros::{btf_map, xdp};
use aya_ebpf::programs::XdpContext;
use fw_common::{
    ACTION_ALLOW, ACTION_DENY, ACTION_NONE, ActiveGeneration, CONFIG_ENTRIES, CONFIG_INGRESS,
    ClassValue, Counters, DIRECTION_INGRESS, DirectionConfig, FLAG_LOG_AUDIT, FLAG_LOG_VERDICT,
    GENERATIONS, Ipv4LpmKey, L4_CLASS_FILTER_CHUNKS, L4_CLASS_TABLE_ENTRIES, L4_CLASS_TABLE_HEADER,
    L4_CLASS_TABLE_INCOMPLETE, L4_KEY_FIXED_BITS, L4_PORT_CHUNKS, L4ClassFilterChunk,
    L4ClassTableChunk, L4F_EXACT_SHARED_PORTS, L4F_TRIE_CLASSES, L4F_TRIE_SHARED, L4PortChunk,
    L4Value, RULE_COUNTER_SLOTS, RuleCounterSlot, SHARED_CLASS, STAT_ALWAYS_ARP,
    STAT_ALWAYS_LOOPBACK, STAT_ALWAYS_ND, STAT_ALWAYS_RELATED, STAT_ALWAYS_REPLY,
    STAT_AUDIT_DEFAULT_DENY, STAT_AUDIT_DENY, STAT_DEFAULT_ALLOW, STAT_DEFAULT_DENY,
    STAT_INTERNAL_ERROR, STAT_MALFORMED, STAT_NOT_IP, STATS_ENTRIES, V4_DIR_L2_BASE,
    V4_DIR_POOL_CHUNKS, V4Dir1Chunk, V4DirChunk, V4DirSlot, WorkloadKey, WorkloadValue,
    l4_class_bucket_at, l4_class_buckets, l4_class_filter_at, l4_class_filter_bit, l4_port_index,
    rule_counter_slot, stat_index, v4_dir_l1, v4_dir_l2,
};

use crate::parse::{Frame, IpPacket, PROTO_ICMP, PROTO_ICMPV6};

/// `max_entries` of the inner-map templates. The loader creates the real inner maps with the
/// capacities it is given; a template is only the shape the kernel checks them against.
const TEMPLATE_ENTRIES: usize = 1;
/// Default capacity of the rule counter table; the loader overrides it from the compiler's
/// `Capacities::rules`.
const RULE_COUNTER_ENTRIES: usize = 1 << 18;
/// Outer map slots.
const GENERATION_SLOTS: usize = GENERATIONS as usize;
/// LPM trie flags: the kernel requires `BPF_F_NO_PREALLOC` for LPM tries. The hash of exact L4
/// entries uses the same flag (entries are allocated as they are inserted).
const LPM_FLAGS: usize = BPF_F_NO_PREALLOC as usize;

/// Source prefix -> address class, IPv4, ingress: a hash keyed by (prefix length, address
/// with the bits past it zero), the same keys and values an LPM trie of the table would hold,
/// matched exactly. The longest match is found by probing the lengths the generation's
/// ingress config lists (`DirectionConfig::v4_lengths`), longest first: a few hash lookups
/// that cost about the same at any table size, where the LPM trie's walk grows with the
/// table and misses the cache at every level for random sources. Preallocated
/// ([`PREFIX_HASH_FLAGS`]). Generational.
#[btf_map]
static FW_IN_V4: ArrayOfMaps<
    HashMap<Ipv4LpmKey, ClassValue, TEMPLATE_ENTRIES, PREFIX_HASH_FLAGS>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// `FW_IN_V4`'s flags: none, so the kernel preallocates every element when the loader creates
/// a generation's inner map (at the size the loader gives it, which follows the prefixes the
/// program probes, not the table's capacity: see fw-loader's `V4_HASH_FIRST`). A full write
/// is then one take from a free list per prefix rather than an allocation (about three times
/// cheaper per insert, which both generations pay on every full load), and an insert can never
/// fail for memory halfway through a write.
const PREFIX_HASH_FLAGS: usize = 0;

/// The ingress IPv4 table's direct-indexed levels (DIR-16-8, see
/// `fw_common::maps::INGRESS_V4_DIR`): chunk key -> 256 slots of classes. The first level
/// (keys 0..=255, one slot per /16) is always complete; a /16 with longer prefixes has a
/// second-level chunk (one slot per /24) unless the compiler's budget ran out. Each slot has
/// a mask of the /21s (/29s) longer prefixes intersect, so an address outside them needs no
/// further lookup, and `FW_IN_V4` is probed only inside them. Preallocated like `FW_IN_V4`
/// ([`PREFIX_HASH_FLAGS`]), at a size the loader gives each generation (see fw-loader's
/// `DIR_HASH_FIRST`): a write of a 3 KiB chunk takes an element from the free list instead of
/// allocating one. Generational.
#[btf_map]
static FW_IN_V4_DIR: ArrayOfMaps<
    HashMap<u32, V4DirChunk, TEMPLATE_ENTRIES, PREFIX_HASH_FLAGS>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// The first level of `FW_IN_V4_DIR` (its keys 0..=255) as an array (see
/// `fw_common::maps::INGRESS_V4_DIR1`): the verifier inlines an array lookup (inner maps of
/// arrays included, since every inner array has the template's size), where a hash lookup is
/// a call that hashes the key and walks a bucket. The loader writes the same chunks into both
/// maps. Generational.
///
/// Each slot also carries its /16's place in `FW_IN_V4_D2` (`V4Dir1Slot::pool`).
#[btf_map]
static FW_IN_V4_D1: ArrayOfMaps<Level1, GENERATION_SLOTS> = ArrayOfMaps::new();

/// The first level of the ingress IPv4 chunks (inner map of `FW_IN_V4_D1`).
type Level1 = Array<V4Dir1Chunk, { V4_DIR_L2_BASE as usize }>;

/// The second-level chunks of `FW_IN_V4_DIR` again, in a preallocated pool of
/// `V4_DIR_POOL_CHUNKS` (see `fw_common::maps::INGRESS_V4_DIR2`): a /16's chunk sits at the
/// index its first-level slot gives, and the verifier inlines the array lookup where the
/// hash lookup is a call. A /16 with no chunk here (the pool was full) is looked up in the
/// hash as before. Derived by the loader. Generational.
#[btf_map]
static FW_IN_V4_D2: ArrayOfMaps<Pool, GENERATION_SLOTS> = ArrayOfMaps::new();

/// The pool of second-level chunks (inner map of `FW_IN_V4_D2`).
type Pool = Array<V4DirChunk, { V4_DIR_POOL_CHUNKS as usize }>;

/// Source address -> address class, IPv6, ingress. Generational.
#[btf_map]
static FW_IN_V6: ArrayOfMaps<
    LpmTrie<[u8; 16], ClassValue, TEMPLATE_ENTRIES, LPM_FLAGS>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// An L4 trie (inner map): (class, workload, L4 word prefix) -> decisions.
type L4Trie = LpmTrie<[u8; 12], L4Value, TEMPLATE_ENTRIES, LPM_FLAGS>;

/// (class, workload, L4 word prefix) -> decisions, ingress. The 12 data bytes are class,
/// workload and L4 word, each big-endian (`fw_common::L4LpmKey` without its prefix length).
/// Class `SHARED_CLASS` (0) is the shared table: the rules without an address restriction.
/// Generational.
#[btf_map]
static FW_IN_L4: ArrayOfMaps<L4Trie, GENERATION_SLOTS> = ArrayOfMaps::new();

/// The ingress L4 entries whose L4 prefix is the whole word, matched exactly: same key and
/// value as `FW_IN_L4` (the prefix length is always `L4_KEY_FIXED_BITS + 32`). Such an entry
/// is the longest match for its word, so the trie (holding the other entries) is asked only
/// on a miss; a hash lookup does not walk a trie's levels. Generational.
#[btf_map]
static FW_IN_L4X: ArrayOfMaps<
    HashMap<Key<[u8; 12]>, L4Value, TEMPLATE_ENTRIES, LPM_FLAGS>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// The shared table's TCP and UDP port entries of `FW_IN_L4X` again, as an array of chunks of
/// 256 ports (see `fw_common::maps::INGRESS_L4_PORTS`, `fw_common::l4_port_index`): the
/// verifier inlines an array lookup where a hash lookup is a call. A slot of zeros holds no
/// entry. The loader writes every entry it mirrors into both maps. Generational.
#[btf_map]
static FW_IN_L4P: ArrayOfMaps<Array<L4PortChunk, { L4_PORT_CHUNKS as usize }>, GENERATION_SLOTS> =
    ArrayOfMaps::new();

/// Which (address class, protocol) pairs may have an entry in `FW_IN_L4X` (see
/// `fw_common::maps::INGRESS_L4_CLASSES`, `fw_common::l4_class_filter_bit`): a class's exact
/// lookup is made only when its bit is set. Derived by the loader. Generational.
#[btf_map]
static FW_IN_L4C: ArrayOfMaps<ClassFilter, GENERATION_SLOTS> = ArrayOfMaps::new();

/// The address classes' entries of `FW_IN_L4X` again, in a cuckoo table of array chunks (see
/// `fw_common::maps::INGRESS_L4_CLASS_TABLE`, `fw_common::l4_class_buckets`): when its header
/// says it is complete, a class's entry is in one of two buckets or nowhere, found with two
/// inlined array lookups instead of a hash call; otherwise the program asks the class filter
/// and the hash. Derived by the loader. Generational.
#[btf_map]
static FW_IN_L4K: ArrayOfMaps<ClassTable, GENERATION_SLOTS> = ArrayOfMaps::new();

/// The ingress L4 class table (inner map).
type ClassTable = Array<L4ClassTableChunk, { L4_CLASS_TABLE_ENTRIES as usize }>;

/// The ingress L4 class filter (inner map).
type ClassFilter = Array<L4ClassFilterChunk, { L4_CLASS_FILTER_CHUNKS as usize }>;

/// An ingress L4 exact table (inner map).
type L4Exact = HashMap<Key<[u8; 12]>, L4Value, TEMPLATE_ENTRIES, LPM_FLAGS>;

/// Destination address -> address class, IPv4, egress. Generational. Read by `egress`.
#[btf_map]
static FW_EG_V4: ArrayOfMaps<
    LpmTrie<[u8; 4], ClassValue, TEMPLATE_ENTRIES, LPM_FLAGS>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// Destination address -> address class, IPv6, egress. Generational. Read by `egress`.
#[btf_map]
static FW_EG_V6: ArrayOfMaps<
    LpmTrie<[u8; 16], ClassValue, TEMPLATE_ENTRIES, LPM_FLAGS>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// (class, workload, L4 word prefix) -> decisions, egress; class 0 is the shared table, as for
/// `FW_IN_L4`. Generational. Read by `egress`.
#[btf_map]
static FW_EG_L4: ArrayOfMaps<L4Trie, GENERATION_SLOTS> = ArrayOfMaps::new();

/// Per-direction defaults, indexed by `CONFIG_INGRESS` / `CONFIG_EGRESS`. Generational: the
/// defaults change with the policy, so they flip with the tables they belong to.
#[btf_map]
static FW_CONFIG: ArrayOfMaps<
    Array<DirectionConfig, { CONFIG_ENTRIES as usize }>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// cgroup id -> workload class (egress). Generational. Read by `egress`; the inner map is a
/// preallocated hash, so its template holds a single entry.
#[btf_map]
static FW_WORKLOADS: ArrayOfMaps<
    HashMap<WorkloadKey, WorkloadValue, TEMPLATE_ENTRIES>,
    GENERATION_SLOTS,
> = ArrayOfMaps::new();

/// The active generation: which slot of every generational map packets use. One element,
/// written by user space only; a packet reads it once.
#[btf_map]
static FW_GEN: Array<ActiveGeneration, 1> = Array::new();

/// Rule id -> packets and bytes the rule decided (per CPU; see `fw_common::Counters`). Not
/// generational: rule ids are stable across compiles. Entries appear on a rule's first packet
/// (not preallocated, so the capacity costs nothing until used).
#[btf_map]
static FW_RULE_CNT: PerCpuHashMap<
    u32,
    Counters,
    RULE_COUNTER_ENTRIES,
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// Rule id -> packets and bytes, in front of `FW_RULE_CNT` (per CPU; see
/// `fw_common::maps::RULE_COUNTER_CACHE`): slot `rule_counter_slot(rule)` counts for the rule
/// that took it first on this CPU, with an inlined array lookup instead of the hash's call.
#[btf_map]
static FW_RULE_CNT_DM: PerCpuArray<RuleCounterSlot, { RULE_COUNTER_SLOTS as usize }> =
    PerCpuArray::new();

/// Outcomes no rule decided, per direction (`fw_common::stat_index`, `STAT_*`), per CPU.
#[btf_map]
static FW_STATS: PerCpuArray<Counters, { STATS_ENTRIES as usize }> = PerCpuArray::new();

/// Action when the program's own state is unusable: the active generation has no inner map,
/// no config, or a value holds an action byte the program does not know. Fail closed (drop).
/// The loader fills every map of a generation before it attaches the program or flips to it,
/// so this only happens when the state is broken; a firewall with broken state must not let
/// everything in silently. Always-allowed traffic (ARP, neighbour discovery, loopback) is
/// decided before any policy map is read, so the link keeps working and the
/// `STAT_INTERNAL_ERROR` counter makes the failure visible.
const INTERNAL_ERROR_ACTION: u32 = xdp_action::XDP_DROP;

/// Action for truncated or malformed IP frames (see `parse`): drop. The kernel would reject
/// them anyway, and a packet whose headers cannot be read must not reach a path where no rule
/// can match it.
const MALFORMED_ACTION: u32 = xdp_action::XDP_DROP;

/// Action for frames that are neither IPv4, IPv6 nor ARP: pass. This is an IP firewall; other
/// ethertypes (LLDP, MPLS, PPPoE, ...) are outside its scope. The kernel only hands their
/// payloads to the IP stack through other devices (a ppp device for PPPoE), which this program
/// does not filter.
const NOT_IP_ACTION: u32 = xdp_action::XDP_PASS;

/// The program's state is missing or invalid (see [`INTERNAL_ERROR_ACTION`]).
struct InternalError;

#[xdp]
pub fn fw_ingress(ctx: XdpContext) -> u32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        Err(InternalError) => INTERNAL_ERROR_ACTION,
    }
}

fn try_ingress(ctx: &XdpContext) -> Result<u32, InternalError> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    // Parsing comes first: a malformed IP packet is dropped whatever it claims to be (a
    // truncated neighbour advertisement or a packet from 127.0.0.1 too).
    let ip = match parse::parse(ctx) {
        Ok(Frame::Ip(ip)) => ip,
        Ok(Frame::Arp) => {
            count_stat(STAT_ALWAYS_ARP, len);
            return Ok(xdp_action::XDP_PASS);
        }
        Ok(Frame::NotIp) => {
            count_stat(STAT_NOT_IP, len);
            return Ok(NOT_IP_ACTION);
        }
        Err(parse::Malformed) => {
            count_stat(STAT_MALFORMED, len);
            return Ok(MALFORMED_ACTION);
        }
    };
    // The benchmark build only (feature `bench`): a random source address; see `bench`.
    #[cfg(feature = "bench")]
    let ip = {
        let mut ip = ip;
        bench::randomise(ctx, &mut ip);
        ip
    };

    // Step 1 of the precedence: always-allowed traffic (fw-compiler `model::always_allowed`,
    // in its order) never reaches the policy maps. ARP passed above.
    if ip.loopback_source() {
        count_stat(STAT_ALWAYS_LOOPBACK, len);
        return Ok(xdp_action::XDP_PASS);
    }
    if ip.neighbour_discovery() {
        count_stat(STAT_ALWAYS_ND, len);
        return Ok(xdp_action::XDP_PASS);
    }
    // Replies and related ICMP errors are always allowed, but the conntrack lookup that finds
    // them is a hash lookup of its own, so it is made only where it can change what happens
    // to the packet: after the policy, when the policy denies the packet, would deny it in
    // audit or wants an event, or the policy state is broken. A packet the policy simply
    // allows passes either way, and is counted under the rule (or default) that allowed it.
    //
    // The common case leaves right after the policy: an allow that neither audit nor logging
    // is interested in needs no conntrack lookup and no event, so it is counted and passed
    // straight from the registers (a short tail the verifier walks per path through
    // `decide`). Every other outcome is parked in a per-CPU map value across the lookup: the
    // verifier does not track values in map memory, so the many paths through `decide` meet
    // again before the conntrack code instead of each being verified through it.
    let decided = decide(&ip);
    if let Ok(o) = &decided {
        if !needs_more(o) {
            count_outcome(o, len);
            return Ok(xdp_action::XDP_PASS);
        }
    }
    let parked = FW_PARKED.get_ptr_mut(0).ok_or(InternalError)?;
    // SAFETY: a per-CPU map value of this CPU, valid for the whole run; volatile so the
    // values are really stored and read back rather than kept in registers.
    unsafe { Parked::park(parked, &decided) };
    if let Some(stat) = always_allowed_flow(ctx, &ip) {
        count_stat(stat, len);
        return Ok(xdp_action::XDP_PASS);
    }
    // SAFETY: as above.
    let outcome = unsafe { Parked::outcome(parked) };
    let Some(outcome) = outcome else {
        count_stat(STAT_INTERNAL_ERROR, len);
        return Err(InternalError);
    };
    count_outcome(&outcome, len);
    if events::wanted(&outcome) {
        events::ingress(ctx, &ip, &outcome);
    }
    Ok(if outcome.deny { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS })
}

/// The stat of a packet connection tracking always allows (a reply, or an ICMP error about a
/// flow the host started), `None` for anything else. A BPF function of its own, so its
/// stack (the flow key, the embedded header of an ICMP error) is not part of the ingress
/// program's frame.
#[inline(always)]
fn always_allowed_flow(ctx: &XdpContext, ip: &IpPacket) -> Option<u32> {
    match flow_stat(ctx, ip) {
        0 => None,
        stat => Some(stat),
    }
}

/// [`always_allowed_flow`] as a plain scalar (0: not always allowed), for a BPF call.
#[inline(never)]
fn flow_stat(ctx: &XdpContext, ip: &IpPacket) -> u32 {
    match flow_state(ctx, ip) {
        FlowState::New => 0,
        FlowState::Reply => STAT_ALWAYS_REPLY,
        // Only ICMP errors about a flow are allowed as related; anything else the feeder might
        // call related is decided by the policy like a new packet.
        FlowState::Related if is_icmp_error(ip) => STAT_ALWAYS_RELATED,
        FlowState::Related => 0,
    }
}

/// Connection-tracking state of a packet, as in fw-compiler's `model::FlowState`.
enum FlowState {
    /// Not part of anything the host initiated.
    New,
    /// A reply to a connection or datagram the host initiated.
    Reply,
    /// An ICMP/ICMPv6 error about a connection or datagram the host initiated.
    Related,
}

/// Whether this packet is a reply to, or an ICMP error about, a flow a local process started
/// (semantics rule 5: those are always allowed on ingress); see `conntrack`.
#[inline(always)]
fn flow_state(ctx: &XdpContext, ip: &IpPacket) -> FlowState {
    conntrack::flow_state(ctx, ip)
}

/// An ICMP error type that may relate to an existing flow (fw-compiler `model`'s
/// `ICMP_ERROR_TYPES` / `ICMPV6_ERROR_TYPES`).
#[inline(always)]
fn is_icmp_error(ip: &IpPacket) -> bool {
    match (ip.proto, ip.port) {
        (PROTO_ICMP, Some(t)) => t == 3 || t == 11 || t == 12,
        (PROTO_ICMPV6, Some(t)) => (1..=4).contains(&t),
        _ => false,
    }
}

/// Whether an outcome needs more than counting: a deny or an audit-deny (conntrack may
/// still allow it), or an event.
#[inline(always)]
fn needs_more(o: &Outcome) -> bool {
    o.deny || o.audit_deny.is_some() || events::wanted(o)
}

/// An outcome (or a broken state) as parked in [`FW_PARKED`]: plain `u32`s.
#[repr(C)]
struct Parked {
    /// The policy state was broken (`decide` failed).
    error: u32,
    deny: u32,
    verdict_rule: u32,
    /// 1: `audit_deny` is `Some(audit_rule)`.
    audit_deny: u32,
    audit_rule: u32,
    flags: u32,
    /// The key the ingress L4 lookups build (kept here, not on the 512-byte stack).
    l4_key: Key<[u8; 12]>,
    /// The entries the ingress L4 lookups found (shared, wide, narrow), copied here from
    /// whichever table had them.
    l4_values: [L4Value; 3],
    /// Which of `l4_values` were found (bit `i`: entry `i`), see `l4_find_ingress`.
    l4_found: u32,
}

impl Parked {
    /// Writes `decided` into `p`, field by field (no copy of the struct on the stack).
    ///
    /// # Safety
    /// `p` points at a `Parked` this program run may write (a per-CPU map value).
    #[inline(always)]
    unsafe fn park(p: *mut Parked, decided: &Result<Outcome, InternalError>) {
        use core::ptr::{addr_of_mut, write_volatile};
        let (error, deny, rule, audit, audit_rule, flags) = match decided {
            Ok(o) => (
                0,
                u32::from(o.deny),
                o.verdict_rule,
                u32::from(o.audit_deny.is_some()),
                o.audit_deny.unwrap_or(0),
                u32::from(o.flags),
            ),
            Err(InternalError) => (1, 1, 0, 0, 0, 0),
        };
        // SAFETY: the caller's contract.
        unsafe {
            write_volatile(addr_of_mut!((*p).error), error);
            write_volatile(addr_of_mut!((*p).deny), deny);
            write_volatile(addr_of_mut!((*p).verdict_rule), rule);
            write_volatile(addr_of_mut!((*p).audit_deny), audit);
            write_volatile(addr_of_mut!((*p).audit_rule), audit_rule);
            write_volatile(addr_of_mut!((*p).flags), flags);
        }
    }

    /// One field of `p`, read from memory.
    ///
    /// # Safety
    /// `field` points into a live `Parked`.
    #[inline(always)]
    unsafe fn read(_p: *mut Parked, field: *const u32) -> u32 {
        // SAFETY: the caller's contract.
        unsafe { core::ptr::read_volatile(field) }
    }

    /// The parked outcome, `None` for a broken state.
    ///
    /// # Safety
    /// `p` points at a live `Parked` written by [`Parked::park`].
    #[inline(always)]
    unsafe fn outcome(p: *mut Parked) -> Option<Outcome> {
        use core::ptr::addr_of;
        // SAFETY: the caller's contract.
        unsafe {
            if Self::read(p, addr_of!((*p).error)) != 0 {
                return None;
            }
            let audit = Self::read(p, addr_of!((*p).audit_deny)) != 0;
            let audit_rule = Self::read(p, addr_of!((*p).audit_rule));
            Some(Outcome {
                deny: Self::read(p, addr_of!((*p).deny)) != 0,
                verdict_rule: Self::read(p, addr_of!((*p).verdict_rule)),
                audit_deny: if audit { Some(audit_rule) } else { None },
                flags: Self::read(p, addr_of!((*p).flags)) as u8,
            })
        }
    }
}

/// Per CPU, one element: the outcome of the packet being processed, parked across the
/// conntrack lookup (see `try_ingress`), and the L4 lookups' key and results. Not
/// generational; nothing in it outlives the packet (only the ingress program uses it, and a
/// run of it is not interrupted by another on the same CPU).
#[btf_map]
static FW_PARKED: PerCpuArray<Parked, 1> = PerCpuArray::new();

/// The result of the policy lookup for one packet.
pub(crate) struct Outcome {
    /// The verdict is deny (else allow).
    deny: bool,
    /// The rule that decided the verdict; 0 = the direction's default.
    verdict_rule: u32,
    /// The verdict is allow but audit-mode policies would have denied: `Some(rule)` (0 = the
    /// audit default).
    audit_deny: Option<u32>,
    /// The L4 entry's `FLAG_LOG_*` bits (0 when no entry matched).
    flags: u8,
}

/// Steps 2 to 6 of the precedence for an ingress packet.
#[inline(always)]
fn decide(ip: &IpPacket) -> Result<Outcome, InternalError> {
    // ------------------------------------------------------------------------------------
    // Verdict precedence: fw-compiler's mapstate.rs, "Lookup" (lookup.rs is its user-space
    // model; eval.rs the reference the tests hold both against).
    //  1. Always-allowed traffic has already passed (try_ingress).
    //  2. Read the active generation ONCE; every map below is that generation's. The source
    //     address's longest prefix gives the address's two classes, one per layer (wide:
    //     rules matching through short prefixes; narrow: through long ones): IPv6 from the
    //     LPM trie, IPv4 from the direct-indexed chunks (one slot per /16, then per /24) and,
    //     only under a /24 (or /16) holding longer prefixes, the hash probed at those lengths,
    //     longest first (what the trie would return; `v4_classes`). The
    //     compiler always puts a /0 there; on a miss anyway there is no class and step 4 finds
    //     nothing for the two layers.
    //  3. Egress only (the workload class). Ingress always uses workload 0.
    //  4. Three entries, longest prefix over the L4 word in the L4 trie each: (SHARED_CLASS,
    //     0, L4 word), the shared table of the rules without an address restriction
    //     (consulted even without a class), then (wide class, 0, L4 word) and (narrow class,
    //     0, L4 word). A miss is an entry with no decisions. A rule is in at most one of the
    //     three, so together they hold the decisions of exactly the rules that match. (The
    //     maps hold the trie's entries in three places: the port array for the shared table's
    //     TCP/UDP ports, the exact hash, the trie; `l4_find_ingress` asks them in that order,
    //     skipping what the config's `l4_flags` say is empty.)
    //  5. Combine the three (`Best`), verdict and audit separately: deny beats allow, then the
    //     lower rank; none loses to anything.
    //  6. Verdict: the combined verdict action deny -> DENY (final), allow -> ALLOW, none ->
    //     the direction's default. If the verdict is allow and the combined audit action is
    //     deny (none -> the audit default decides), the outcome is AUDIT-DENY: the packet
    //     passes and is counted as what audit-mode policies would have denied.
    // ------------------------------------------------------------------------------------

    // Step 2. The config is read first: its IPv4 prefix lengths drive the address lookup.
    let generation = FW_GEN.get(0).ok_or(InternalError)?.index;
    let config =
        FW_CONFIG.get(generation).ok_or(InternalError)?.get(CONFIG_INGRESS).ok_or(InternalError)?;
    // (found, wide, narrow) rather than an `Option`: a `None`'s undefined payload can end up
    // spilled to the stack, which the verifier rejects as a read of an uninitialised register.
    let (has_class, wide, narrow) = if ip.v6 {
        let trie = FW_IN_V6.get(generation).ok_or(InternalError)?;
        trie.get(&Key::new(128, ip.src))
            .map_or((false, 0, 0), |c| (true, c.wide_class, c.narrow_class))
    } else {
        let dir1 = FW_IN_V4_D1.get(generation).ok_or(InternalError)?;
        let pool = FW_IN_V4_D2.get(generation).ok_or(InternalError)?;
        let src = [ip.src[0], ip.src[1], ip.src[2], ip.src[3]];
        v4_classes(generation, dir1, pool, config, src)?
    };

    // Step 4 (step 3: ingress has no workload, so the keys' workload is 0): the shared
    // table's entry and the entries of the two classes.
    // Step 5, as the entries are read: the best decision of the three, for the verdict and
    // for audit (in the order shared, wide, narrow; a tie keeps the earlier one). Class ids
    // are never 0, so (0, 0) is "no class".
    let (wide, narrow) = if has_class { (wide, narrow) } else { (0, 0) };
    let word = l4_word(ip.proto, ip.port);
    if l4_find_ingress(generation, wide, narrow, word, u32::from(config.l4_flags)) != 0 {
        return Err(InternalError);
    }
    let parked = FW_PARKED.get_ptr_mut(0).ok_or(InternalError)?;
    // SAFETY: a per-CPU map value of this CPU, valid for the whole run, written by
    // `l4_find_ingress` for the bits it set; read from memory, so the verifier continues
    // from one state here rather than one per path through the lookups.
    let found = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*parked).l4_found)) };
    // SAFETY: as above.
    let values = unsafe { &(*parked).l4_values };
    let mut best = Best::NONE;
    if found & 1 != 0 {
        best.add(Some(&values[0]))?;
    }
    if found & 2 != 0 {
        best.add(Some(&values[1]))?;
    }
    if found & 4 != 0 {
        best.add(Some(&values[2]))?;
    }
    let combined = best.combined();

    // Step 6.
    outcome(combined, config)
}

/// Step 2 for IPv4: the longest prefix of `addr` in the ingress IPv4 table, as an LPM trie
/// holding the same entries would return it. The first-level slot of the /16 (always present)
/// answers unless a longer prefix intersects the address's /21; then the second-level slot of
/// the /24 answers unless a longer prefix intersects the address's /29; only then is the hash
/// probed, at the lengths `config` lists that are longer than the level (/25-/32, or /17-/32
/// for a /16 the compiler built no chunk for), longest first, the slot's classes being the
/// answer when no probe hits. The second-level chunk comes from the pool at the index the
/// first-level slot gives, or from the chunk hash when the slot gives none. `(found, wide
/// class, narrow class)`.
#[inline(always)]
fn v4_classes(
    generation: u32,
    dir1: &Level1,
    pool: &Pool,
    config: &DirectionConfig,
    addr: [u8; 4],
) -> Result<(bool, u32, u32), InternalError> {
    let a = u32::from_be_bytes(addr);
    let (k1, s1, b1) = v4_dir_l1(a);
    let c1 = dir1.get_ptr(k1).ok_or(InternalError)?;
    // SAFETY: a pointer from a map lookup, valid for the whole run (RCU); the slot index is
    // below 256 (`v4_dir_l1` masks it).
    let e1 = unsafe { *(*c1).slots.as_ptr().add(s1 & 0xff) };
    // The slot's own classes (its `deeper` mask is not needed past this point).
    let e1_slot = V4DirSlot { wide_class: e1.wide_class, narrow_class: e1.narrow_class, deeper: 0 };
    if e1.deeper & b1 == 0 {
        return Ok(slot_classes(&e1_slot));
    }
    let (k2, s2, b2) = v4_dir_l2(a);
    // `pool` is 1 + the pool index (0: not in the pool); an index past the pool (never
    // written) finds nothing, which is also correct, only slower: the hash is probed from /17.
    let c2 = match e1.pool {
        0 => FW_IN_V4_DIR.get(generation).ok_or(InternalError)?.get_ptr(&k2),
        p => pool.get_ptr(p.wrapping_sub(1)),
    };
    let (above, fallback) = match c2 {
        Some(c2) => {
            // SAFETY: as above.
            let e2 = unsafe { *(*c2).slots.as_ptr().add(s2 & 0xff) };
            if e2.deeper & b2 == 0 {
                return Ok(slot_classes(&e2));
            }
            (24, e2)
        }
        None => (16, e1_slot),
    };
    let table = FW_IN_V4.get(generation).ok_or(InternalError)?;
    let count = usize::from(config.v4_length_count);
    let mut key = Ipv4LpmKey { prefix_len: 0, addr: [0; 4] };
    // The lengths longer than /16 are at most 16 (/17-/32) and come first in the list
    // (longest first), so 16 slots hold them all: a constant trip count for the verifier,
    // which `count` and the level end early.
    for i in 0..V4_PROBE_SLOTS {
        if i >= count {
            break;
        }
        let len = u32::from(config.v4_lengths[i]);
        if len <= above {
            break;
        }
        // `len` is 17..=32 here: the shift is 0..=15.
        let mask = u32::MAX.wrapping_shl(32u32.wrapping_sub(len));
        key.prefix_len = len;
        key.addr = (a & mask).to_be_bytes();
        if let Some(c) = table.get_ptr(&key) {
            // SAFETY: a pointer from a map lookup, valid for the whole run (RCU); a
            // concurrent update of the standby generation never touches this one.
            let c = unsafe { &*c };
            return Ok((true, c.wide_class, c.narrow_class));
        }
    }
    Ok(slot_classes(&fallback))
}

/// The slots of `DirectionConfig::v4_lengths` that can hold a length longer than /16.
const V4_PROBE_SLOTS: usize = 16;

/// A chunk slot's own classes; `0, 0` is no class.
#[inline(always)]
fn slot_classes(c: &V4DirSlot) -> (bool, u32, u32) {
    (c.wide_class != 0, c.wide_class, c.narrow_class)
}

/// Step 6 of the precedence, for either direction: a decision gives allow or deny, none gives
/// the direction's default; an allow whose audit decision (or, when none, the audit default)
/// is deny is an audit-deny.
#[inline(always)]
pub(crate) fn outcome(c: Combined, config: &DirectionConfig) -> Result<Outcome, InternalError> {
    let Combined { verdict_action, verdict_rule, audit_action, audit_rule, flags } = c;
    let (deny, verdict_rule) = match verdict_action {
        ACTION_DENY => (true, verdict_rule),
        ACTION_ALLOW => (false, verdict_rule),
        ACTION_NONE => (is_deny(config.verdict_default)?, 0),
        _ => return Err(InternalError),
    };
    if deny {
        return Ok(Outcome { deny, verdict_rule, audit_deny: None, flags });
    }
    let audit_deny = match audit_action {
        ACTION_DENY => Some(audit_rule),
        ACTION_ALLOW => None,
        ACTION_NONE => is_deny(config.audit_default)?.then_some(0),
        _ => return Err(InternalError),
    };
    Ok(Outcome { deny, verdict_rule, audit_deny, flags })
}

/// Steps 4 and 5 of the precedence, for either direction: the L4 entries of the shared table
/// and, when the address has classes (`classes` is `Some((wide, narrow))`), of its wide and
/// narrow class, in that order, each (table, `workload`, `word`) first and, on a miss with a
/// non-zero workload, (table, 0, `word`); folded into the best decisions as they are read.
/// One key on the stack is rewritten for every lookup and each entry is read in place: three
/// tables with a key and a copied entry each overflow the 512-byte BPF stack of the egress
/// programs.
#[inline(always)]
pub(crate) fn l4_decide(
    trie: &L4Trie,
    classes: Option<(u32, u32)>,
    workload: u32,
    word: [u8; 4],
) -> Result<Combined, InternalError> {
    let mut key = Key::new(L4_KEY_FIXED_BITS + 32, [0u8; 12]);
    let mut best = Best::NONE;
    // Written out rather than as a loop over the tables: a loop made the verifier walk many
    // more states (about 5x the verified instructions of the egress programs).
    best.add(l4_lookup(trie, &mut key, SHARED_CLASS, workload, word))?;
    if let Some((wide, narrow)) = classes {
        best.add(l4_lookup(trie, &mut key, wide, workload, word))?;
        best.add(l4_lookup(trie, &mut key, narrow, workload, word))?;
    }
    Ok(best.combined())
}

/// Step 4 for ingress (workload 0): the entries of the shared table and, when `wide` is not
/// 0 (class ids never are), of the two classes, copied into `FW_PARKED`'s `l4_values` (0
/// shared, 1 wide, 2 narrow); bit `i` of its `l4_found` says entry `i` was found. The shared
/// table's entry for a TCP or UDP packet with a port comes from the port array `FW_IN_L4P`
/// (an inlined array read); every other entry, and the shared one behind a zero slot, from
/// the exact hash or, on a miss, from the trie, each asked only when the generation's
/// `l4_flags` (`fw_common::L4F_*`) say it can hold the entry. Not 0 when the maps are
/// missing.
///
/// A global BPF function (exported, so its BTF linkage is global): the verifier checks it
/// once, on its own, for any values of its five scalar arguments, and the caller continues
/// past the call with an unknown result instead of walking the lookups' hit and miss paths
/// again for every state it reaches the call in. That halved the verified instructions of
/// `fw_ingress`. Everything it returns goes through `FW_PARKED`, so the caller needs nothing
/// the verifier would have to know. (Inlined, its spills also overflowed the program's
/// 512-byte stack.)
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn l4_find_ingress(
    generation: u32,
    wide: u32,
    narrow: u32,
    word: u32,
    flags: u32,
) -> u32 {
    let (Some(trie), Some(exact), Some(ports), Some(filter), Some(table), Some(parked)) = (
        FW_IN_L4.get(generation),
        FW_IN_L4X.get(generation),
        FW_IN_L4P.get(generation),
        FW_IN_L4C.get(generation),
        FW_IN_L4K.get(generation),
        FW_PARKED.get_ptr_mut(0),
    ) else {
        return 1;
    };
    // SAFETY: a per-CPU map value of this CPU, valid for the whole run; the key and the
    // values are distinct fields.
    let (key, values, out) =
        unsafe { (&mut (*parked).l4_key, &mut (*parked).l4_values, &mut (*parked).l4_found) };
    key.prefix_len = L4_KEY_FIXED_BITS + 32;
    let trie_shared = flags & u32::from(L4F_TRIE_SHARED) != 0;
    let trie_classes = flags & u32::from(L4F_TRIE_CLASSES) != 0;
    let [v0, v1, v2] = values;
    let mut found = 0;
    // The "no port" bit clear: the word is `proto << 24 | port` (see `l4_word`).
    let slot =
        if word & (1 << 16) == 0 { l4_port_index((word >> 24) as u8, word as u16) } else { None };
    let shared = match slot {
        Some((chunk, slot)) => match ports.get_ptr(chunk) {
            Some(c) => {
                // SAFETY: a pointer from a map lookup, valid for the whole run (RCU); the
                // slot index is below 256 (`l4_port_index` masks it).
                let v = unsafe { &*(*c).slots.as_ptr().add(slot & 0xff) };
                if v.verdict_action != ACTION_NONE || v.audit_action != ACTION_NONE {
                    copy_l4(v, v0);
                    true
                } else {
                    // No mirrored entry: the hash can still hold one without a decision,
                    // which hides the trie's shorter entries.
                    let ask_exact = flags & u32::from(L4F_EXACT_SHARED_PORTS) != 0;
                    l4_lookup_ingress(
                        exact,
                        trie,
                        key,
                        SHARED_CLASS,
                        word,
                        v0,
                        ask_exact,
                        trie_shared,
                    )
                }
            }
            None => return 1,
        },
        None => l4_lookup_ingress(exact, trie, key, SHARED_CLASS, word, v0, true, trie_shared),
    };
    if shared {
        found |= 1;
    }
    if wide != 0 {
        // A class table not marked incomplete holds every class entry of the exact hash (a
        // fresh one of a fresh hash too, both empty): a miss there is a miss in the hash, and
        // only the trie is left. Otherwise the exact hash. Either only when the class filter
        // says the hash may hold the class's entry for this protocol.
        let tabled = match table.get_ptr(L4_CLASS_TABLE_HEADER) {
            // SAFETY: a pointer from a map lookup, valid for the whole run (RCU).
            Some(h) => (unsafe { (*h).incomplete }) != L4_CLASS_TABLE_INCOMPLETE,
            None => false,
        };
        // The filter first: a clear bit means neither holds the entry, and reading it (one
        // inlined load) is cheaper than the table's two buckets.
        let proto = (word >> 24) as u8;
        let ask = class_filter_has(filter, wide, proto);
        let hit = ask && tabled && class_table_get(table, wide, word, v1);
        let ask_wide = ask && !tabled;
        if hit || l4_lookup_ingress(exact, trie, key, wide, word, v1, ask_wide, trie_classes) {
            found |= 2;
        }
        let ask = class_filter_has(filter, narrow, proto);
        let hit = ask && tabled && class_table_get(table, narrow, word, v2);
        let ask_narrow = ask && !tabled;
        if hit || l4_lookup_ingress(exact, trie, key, narrow, word, v2, ask_narrow, trie_classes) {
            found |= 4;
        }
    }
    // SAFETY: a field of the per-CPU map value above.
    unsafe { core::ptr::write_volatile(out, found) };
    0
}

/// The class table's entry for (`class`, `word`), copied into `out`: looked for in the two
/// buckets `l4_class_buckets` gives; false when neither holds it (or `class` is 0, the
/// shared table's id, which marks an empty slot).
#[inline(always)]
fn class_table_get(table: &ClassTable, class: u32, word: u32, out: &mut L4Value) -> bool {
    if class == 0 {
        return false;
    }
    let (b1, b2) = l4_class_buckets(class, word);
    class_bucket_get(table, b1, class, word, out)
        || (b2 != b1 && class_bucket_get(table, b2, class, word, out))
}

/// [`class_table_get`] in one bucket.
#[inline(always)]
fn class_bucket_get(
    table: &ClassTable,
    bucket: u32,
    class: u32,
    word: u32,
    out: &mut L4Value,
) -> bool {
    let (chunk, index) = l4_class_bucket_at(bucket);
    let Some(c) = table.get_ptr(chunk) else {
        return false;
    };
    // SAFETY: a pointer from a map lookup, valid for the whole run (RCU); the bucket index is
    // below 64 (masked again for the verifier).
    let b = unsafe { &*(*c).buckets.as_ptr().add(index & 63) };
    let [s0, s1] = &b.slots;
    if s0.class == class && s0.word == word {
        copy_l4(&s0.value, out);
        return true;
    }
    if s1.class == class && s1.word == word {
        copy_l4(&s1.value, out);
        return true;
    }
    false
}

/// Whether the class filter's bit for (`class`, `proto`) is set: false means the exact hash
/// holds no entry of that class for that protocol. A chunk the lookup cannot find (never,
/// the index is below `L4_CLASS_FILTER_CHUNKS`) counts as set.
#[inline(always)]
fn class_filter_has(filter: &ClassFilter, class: u32, proto: u8) -> bool {
    let (chunk, word, mask) = l4_class_filter_at(l4_class_filter_bit(class, proto));
    match filter.get_ptr(chunk) {
        // SAFETY: a pointer from a map lookup, valid for the whole run (RCU); the word index
        // is below 512 (masked again for the verifier).
        Some(c) => (unsafe { *(*c).words.as_ptr().add(word & 511) } & mask) != 0,
        None => true,
    }
}

/// One table's ingress entry: (table, 0, word) in the exact hash (when `ask_exact`), else in
/// the trie (when `ask_trie`), copied into `found`; false on a miss.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn l4_lookup_ingress(
    exact: &L4Exact,
    trie: &L4Trie,
    key: &mut Key<[u8; 12]>,
    table: u32,
    word: u32,
    found: &mut L4Value,
    ask_exact: bool,
    ask_trie: bool,
) -> bool {
    let word = word.to_be_bytes();
    let d = &mut key.data;
    let c = table.to_be_bytes();
    d[0] = c[0];
    d[1] = c[1];
    d[2] = c[2];
    d[3] = c[3];
    d[4] = 0;
    d[5] = 0;
    d[6] = 0;
    d[7] = 0;
    d[8] = word[0];
    d[9] = word[1];
    d[10] = word[2];
    d[11] = word[3];
    if ask_exact {
        if let Some(v) = exact.get_ptr(&*key) {
            // SAFETY: a pointer from a map lookup, valid for the whole run (RCU).
            copy_l4(unsafe { &*v }, found);
            return true;
        }
    }
    if !ask_trie {
        return false;
    }
    match trie.get(key) {
        Some(v) => {
            copy_l4(v, found);
            true
        }
        None => false,
    }
}

/// `*to = *from`, as seven word moves (a plain assignment becomes a byte-by-byte `memcpy`
/// loop, which the verifier walks on every path).
#[inline(always)]
fn copy_l4(from: &L4Value, to: &mut L4Value) {
    let src = (from as *const L4Value).cast::<u32>();
    let dst = (to as *mut L4Value).cast::<u32>();
    // SAFETY: `L4Value` is 28 bytes of `u32`-aligned plain data (fw-common checks the layout),
    // so both are seven readable / writable words.
    unsafe {
        dst.write_volatile(src.read_volatile());
        dst.add(1).write_volatile(src.add(1).read_volatile());
        dst.add(2).write_volatile(src.add(2).read_volatile());
        dst.add(3).write_volatile(src.add(3).read_volatile());
        dst.add(4).write_volatile(src.add(4).read_volatile());
        dst.add(5).write_volatile(src.add(5).read_volatile());
        dst.add(6).write_volatile(src.add(6).read_volatile());
    }
}

/// One table's entry for `l4_decide`, through the caller's `key`: (table, workload, word),
/// then (table, 0, word) on a miss with a non-zero workload; `None` on a miss.
#[inline(always)]
fn l4_lookup<'a>(
    trie: &'a L4Trie,
    key: &mut Key<[u8; 12]>,
    table: u32,
    workload: u32,
    word: [u8; 4],
) -> Option<&'a L4Value> {
    // Byte by byte into the one key: a temporary array per lookup would take a stack slot
    // of its own in each inlined copy.
    let d = &mut key.data;
    let c = table.to_be_bytes();
    let w = workload.to_be_bytes();
    d[0] = c[0];
    d[1] = c[1];
    d[2] = c[2];
    d[3] = c[3];
    d[4] = w[0];
    d[5] = w[1];
    d[6] = w[2];
    d[7] = w[3];
    d[8] = word[0];
    d[9] = word[1];
    d[10] = word[2];
    d[11] = word[3];
    if let Some(v) = trie.get(key) {
        return Some(v);
    }
    if workload == 0 {
        return None;
    }
    let d = &mut key.data;
    d[4] = 0;
    d[5] = 0;
    d[6] = 0;
    d[7] = 0;
    trie.get(key)
}

/// One decision of an L4 entry (its verdict or its audit half), as `Best` compares it.
#[derive(Clone, Copy)]
struct Pick {
    action: u8,
    rule: u32,
    rank: u64,
    /// The deciding rule logs.
    log: bool,
}

/// The combined decisions of the shared entry and the two class entries.
pub(crate) struct Combined {
    pub(crate) verdict_action: u8,
    pub(crate) verdict_rule: u32,
    pub(crate) audit_action: u8,
    pub(crate) audit_rule: u32,
    /// `FLAG_LOG_VERDICT` / `FLAG_LOG_AUDIT` of the decisions that won.
    pub(crate) flags: u8,
}

/// Orders action bytes: deny (0) before allow (1) before none (2); anything else is a broken
/// entry.
#[inline(always)]
fn action_order(action: u8) -> Result<u8, InternalError> {
    match action {
        ACTION_DENY => Ok(0),
        ACTION_ALLOW => Ok(1),
        ACTION_NONE => Ok(2),
        _ => Err(InternalError),
    }
}

/// The better of two decisions (fw-compiler's mapstate.rs, "Lookup" step 5): deny beats
/// allow; with the same action the lower rank wins ("first in (policy, index) order"); none
/// loses to anything. On a tie (not produced by the compiler) the earlier decision `a` stays.
#[inline(always)]
fn better(a: Pick, b: Pick) -> Result<Pick, InternalError> {
    let (oa, ob) = (action_order(a.action)?, action_order(b.action)?);
    Ok(if ob < oa || (ob == oa && b.rank < a.rank) { b } else { a })
}

/// No decision: what a miss gives, and what loses to every decision.
const NO_PICK: Pick = Pick { action: ACTION_NONE, rule: 0, rank: 0, log: false };

/// The best decisions among the L4 entries folded in so far (step 5 of the precedence),
/// verdict and audit separately. Entries are folded in one at a time, so only one is being
/// read at any point (the stack stays small).
#[derive(Clone, Copy)]
pub(crate) struct Best {
    verdict: Pick,
    audit: Pick,
}

impl Best {
    /// Nothing folded in yet: no decisions.
    pub(crate) const NONE: Best = Best { verdict: NO_PICK, audit: NO_PICK };

    /// Folds in one table's entry (`None`: a miss, which has no decisions and changes
    /// nothing). On a tie the decision already held stays.
    #[inline(always)]
    pub(crate) fn add(&mut self, entry: Option<&L4Value>) -> Result<(), InternalError> {
        let Some(v) = entry else {
            return Ok(());
        };
        let verdict = Pick {
            action: v.verdict_action,
            rule: v.verdict_rule,
            rank: v.verdict_rank(),
            log: v.flags & FLAG_LOG_VERDICT != 0,
        };
        let audit = Pick {
            action: v.audit_action,
            rule: v.audit_rule,
            rank: v.audit_rank(),
            log: v.flags & FLAG_LOG_AUDIT != 0,
        };
        self.verdict = better(self.verdict, verdict)?;
        self.audit = better(self.audit, audit)?;
        Ok(())
    }

    /// The decisions that won, with their log flags.
    #[inline(always)]
    pub(crate) fn combined(self) -> Combined {
        let (v, a) = (self.verdict, self.audit);
        let mut flags = 0;
        if v.log {
            flags |= FLAG_LOG_VERDICT;
        }
        if a.log {
            flags |= FLAG_LOG_AUDIT;
        }
        Combined {
            verdict_action: v.action,
            verdict_rule: v.rule,
            audit_action: a.action,
            audit_rule: a.rule,
            flags,
        }
    }
}

/// A default's action byte: deny, allow, or (anything else) a broken config.
#[inline(always)]
fn is_deny(action: u8) -> Result<bool, InternalError> {
    match action {
        ACTION_DENY => Ok(true),
        ACTION_ALLOW => Ok(false),
        _ => Err(InternalError),
    }
}

/// fw-compiler's `mapstate::l4_word`: `proto << 24 | no_port << 16 | port`, where the port
/// slot holds the ICMP type for ICMP and ICMPv6.
#[inline(always)]
fn l4_word(proto: u8, port: Option<u16>) -> u32 {
    match port {
        Some(p) => (u32::from(proto) << 24) | u32::from(p),
        None => (u32::from(proto) << 24) | (1 << 16),
    }
}

/// Counts an outcome: the rule (or default) that decided the verdict and, for audit-deny, the
/// audit rule (or audit default) that would have denied.
#[inline(always)]
fn count_outcome(o: &Outcome, len: u64) {
    match o.verdict_rule {
        0 => count_stat(if o.deny { STAT_DEFAULT_DENY } else { STAT_DEFAULT_ALLOW }, len),
        rule => count_rule(rule, len),
    }
    if let Some(rule) = o.audit_deny {
        count_stat(STAT_AUDIT_DENY, len);
        match rule {
            0 => count_stat(STAT_AUDIT_DEFAULT_DENY, len),
            rule => count_rule(rule, len),
        }
    }
}

#[inline(always)]
fn add(c: *mut Counters, len: u64) {
    // SAFETY: `c` comes from a per-CPU map lookup on this CPU, which stays valid for the whole
    // program run; per-CPU values are only written by this CPU, so plain adds do not race.
    unsafe {
        (*c).packets += 1;
        (*c).bytes += len;
    }
}

#[inline(always)]
fn count_stat(stat: u32, len: u64) {
    if let Some(c) = FW_STATS.get_ptr_mut(stat_index(DIRECTION_INGRESS, stat)) {
        add(c, len);
    }
}

/// Counts a packet a rule (never 0) decided: in the rule's slot of `FW_RULE_CNT_DM` when the
/// slot is free or the rule's on this CPU, else in `FW_RULE_CNT` (user space adds both).
#[inline(always)]
fn count_rule(rule: u32, len: u64) {
    if let Some(s) = FW_RULE_CNT_DM.get_ptr_mut(rule_counter_slot(rule)) {
        // SAFETY: a per-CPU map value of this CPU, valid for the whole run and written only by
        // this CPU (a program run is not interrupted by another on the same CPU).
        let s = unsafe { &mut *s };
        if s.rule == rule {
            add(&mut s.counters, len);
            return;
        }
        if s.rule == 0 {
            s.rule = rule;
            s.counters = Counters { packets: 1, bytes: len };
            return;
        }
    }
    if let Some(c) = FW_RULE_CNT.get_ptr_mut(rule) {
        add(c, len);
        return;
    }
    let first = Counters { packets: 1, bytes: len };
    if FW_RULE_CNT.insert(rule, first, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created the entry since the lookup (or the table is full: then there is
        // nothing to count into, and the verdict does not depend on counting).
        if let Some(c) = FW_RULE_CNT.get_ptr_mut(rule) {
            add(c, len);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it exists for the compiler.
    loop {}
}
