//! The egress filter: cgroup `sock_addr` programs on connect(2) and sendmsg(2) (connect4,
//! connect6, sendmsg4, sendmsg6).
//!
//! Why these hooks. They run in the calling process's context before anything is sent, so a
//! denial is an immediate `EPERM` for the process (return 0) instead of a silently dropped
//! packet and a timeout, and the process's cgroup (its workload) is known exactly: the
//! "current task" is the process that called connect/sendmsg. A TCP connection is decided once
//! at connect; a UDP socket at connect (connected sockets) or at every sendmsg that names a
//! destination (unconnected sockets; sendmsg on a connected socket without an address does not
//! run the hook, the connect already decided it).
//!
//! The decision is the same transcription of fw-compiler's `mapstate.rs` precedence as the XDP
//! program, for the egress tables: loopback destinations always pass; the destination's two
//! classes (wide and narrow layer) come from the egress v4/v6 trie of the generation read
//! once; the workload class from the caller's cgroup and its ancestors, deepest first, in
//! that generation's workload table; the L4 entries for (shared table, workload, L4 word),
//! (wide class, workload, L4 word) and (narrow class, workload, L4 word), each falling back
//! to workload 0 when a non-zero workload has no entry, combined by `Best` (deny beats
//! allow, then the lower rank); then verdict, default and audit exactly as on ingress.
//!
//! Protocol. The hook sees a socket, not a packet: `SOCK_STREAM` is TCP, `SOCK_DGRAM` UDP.
//! ICMP is not decided here: raw sockets (`ping` as root) run no sock_addr hook when sending,
//! and ICMP "ping" sockets (`SOCK_DGRAM` with protocol ICMP / ICMPv6) run connect4/6 but not
//! sendmsg4/6, so ping could bypass a decision made here. Instead the cgroup_skb egress
//! program (`conntrack.rs`) decides every outgoing echo request, whatever socket sent it, with
//! the same lookup ([`allow_echo_request`]; a denied packet makes sendmsg fail with EPERM), and
//! the sock_addr hooks let ICMP sockets through undecided. Other protocols on raw sockets
//! (GRE, SCTP via raw, ...) are not filtered on egress; a sock_addr call of another socket type
//! is decided by its protocol number with "no port" (what rules without ports match).
//!
//! IPv4-mapped IPv6 destinations (`::ffff:a.b.c.d`, a dual-stack socket talking IPv4) are
//! decided as the IPv4 address: the packet on the wire is IPv4, and the connect4 hook does not
//! run for them.
//!
//! Counting: as on ingress, per rule or per stats slot, direction egress. One "packet" is one
//! hook decision (a connect, or one sendmsg); the byte count is 0 because the hook does not
//! see a length.

use aya_ebpf::bindings::{__sk_buff, bpf_sock_addr};
use aya_ebpf::btf_maps::lpm_trie::Key;
use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_skb_ancestor_cgroup_id,
    bpf_skb_cgroup_id,
};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use fw_common::events::Event;
use fw_common::{
    CONFIG_EGRESS, DIRECTION_EGRESS, STAT_ALWAYS_LOOPBACK, STAT_AUDIT_DEFAULT_DENY,
    STAT_AUDIT_DENY, STAT_DEFAULT_ALLOW, STAT_DEFAULT_DENY, STAT_INTERNAL_ERROR, WorkloadKey,
    stat_index,
};

use crate::events;
use crate::parse::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crate::{
    FW_CONFIG, FW_EG_L4, FW_EG_V4, FW_EG_V6, FW_GEN, FW_STATS, FW_WORKLOADS, InternalError,
    Outcome, add, count_rule, l4_decide, l4_word, outcome,
};

/// Return value of a cgroup sock_addr program that lets the call proceed.
const ALLOW: i32 = 1;
/// Return value that makes the call fail with `EPERM`.
const DENY: i32 = 0;
/// Action when the program's own state is unusable (see `INTERNAL_ERROR_ACTION` in main.rs):
/// fail closed, as on ingress. Loopback is decided before any policy map is read, so local
/// services keep working.
const INTERNAL_ERROR_ACTION: i32 = DENY;

/// cgroup levels looked at below the caller's own cgroup. The caller's cgroup is always looked
/// at first (whatever its depth); then its ancestors from level `MAX_ANCESTOR_LEVEL - 1` up to
/// the root (level 0). A workload path deeper than this under a process's own cgroup is not
/// seen as an ancestor of that process. systemd hierarchies are a handful of levels deep.
const MAX_ANCESTOR_LEVEL: i32 = 16;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const ICMP_ECHO_REQUEST: u16 = 8;
const ICMPV6_ECHO_REQUEST: u16 = 128;

#[cgroup_sock_addr(connect4)]
pub fn fw_connect4(ctx: SockAddrContext) -> i32 {
    egress::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn fw_connect6(ctx: SockAddrContext) -> i32 {
    egress::<true>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn fw_sendmsg4(ctx: SockAddrContext) -> i32 {
    egress::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn fw_sendmsg6(ctx: SockAddrContext) -> i32 {
    egress::<true>(&ctx)
}

/// The destination of a connect or sendmsg, as the policy sees it.
struct Dest {
    v6: bool,
    /// Network order; IPv4 uses the first four bytes.
    addr: [u8; 16],
    /// The L4 word (`l4_word`). Computed while reading the context rather than kept as
    /// protocol and `Option<u16>`: an `Option` whose payload is left undefined in the `None`
    /// case makes LLVM spill an uninitialised register, which the verifier rejects.
    l4: u32,
}

impl Dest {
    #[inline(always)]
    fn loopback(&self) -> bool {
        if self.v6 {
            self.addr[..15].iter().all(|b| *b == 0) && self.addr[15] == 1
        } else {
            self.addr[0] == 127
        }
    }
}

#[inline(always)]
fn egress<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let dest = read_dest::<V6>(sa);
    // ICMP (ping sockets) is decided per packet by the cgroup_skb hook, which also sees raw
    // sockets and unconnected ping sockets; deciding here too would count connects twice.
    let proto = (dest.l4 >> 24) as u8;
    if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        return ALLOW;
    }
    if run(&dest, &Cgroups::Current) { ALLOW } else { DENY }
}

/// Decides, counts and logs one egress destination; true = allow.
#[inline(always)]
fn run(dest: &Dest, cgroups: &Cgroups) -> bool {
    if dest.loopback() {
        count_stat(STAT_ALWAYS_LOOPBACK);
        return true;
    }
    match decide(dest, cgroups) {
        Ok(outcome) => {
            count_outcome(&outcome);
            if events::wanted(&outcome) {
                event(dest, &outcome);
            }
            !outcome.deny
        }
        Err(InternalError) => {
            count_stat(STAT_INTERNAL_ERROR);
            INTERNAL_ERROR_ACTION == ALLOW
        }
    }
}

/// The egress decision for an ICMP/ICMPv6 echo request seen by the cgroup_skb egress hook
/// (`conntrack`): raw and ping sockets do not run the sendmsg hooks, so this is where ping is
/// filtered. `dst` is the destination in network order (IPv4 in the first 4 bytes); true =
/// allow. Only echo requests are decided: the other ICMP messages a host sends (errors, echo
/// replies) are answers the kernel generates, not traffic a local process starts.
#[inline(always)]
pub(crate) fn allow_echo_request(
    skb: *mut __sk_buff,
    v6: bool,
    dst: [u8; 16],
    icmp_type: u8,
) -> bool {
    let proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    let dest = Dest { v6, addr: dst, l4: l4_word(proto, Some(u16::from(icmp_type))) };
    run(&dest, &Cgroups::Skb(skb))
}

/// Reads the destination from the context. Each field is read with one aligned 32-bit load,
/// the only access the verifier allows; the *4 hooks may only read `user_ip4`, the *6 hooks
/// only `user_ip6`, hence the const parameter (each program reads just its family's field).
#[inline(always)]
fn read_dest<const V6: bool>(sa: *mut bpf_sock_addr) -> Dest {
    // SAFETY: `sa` is the program's context pointer, valid for the whole run; the kernel
    // rewrites these loads into reads of the socket address being connected/sent to.
    let (port, sock_type, protocol) = unsafe { ((*sa).user_port, (*sa).type_, (*sa).protocol) };
    let mut addr = [0u8; 16];
    let mut v6 = V6;
    if V6 {
        // SAFETY: as above.
        let ip6 =
            unsafe { [(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]] };
        // The u32 words hold the address bytes in memory (network) order; reading them on a
        // little-endian target and writing them back little-endian restores the bytes.
        let mut i = 0;
        while i < 4 {
            let b = ip6[i].to_le_bytes();
            addr[i * 4] = b[0];
            addr[i * 4 + 1] = b[1];
            addr[i * 4 + 2] = b[2];
            addr[i * 4 + 3] = b[3];
            i += 1;
        }
        // ::ffff:a.b.c.d -> a.b.c.d
        if addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff {
            v6 = false;
            addr = [addr[12], addr[13], addr[14], addr[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        }
    } else {
        // SAFETY: as above.
        let b = unsafe { (*sa).user_ip4 }.to_le_bytes();
        addr[0] = b[0];
        addr[1] = b[1];
        addr[2] = b[2];
        addr[3] = b[3];
    }
    // user_port holds the __be16 port in its low 16 bits.
    let port = u16::from_be(port as u16);
    let protocol = protocol as u8;
    let l4 = match sock_type {
        SOCK_STREAM => l4_word(PROTO_TCP, Some(port)),
        SOCK_DGRAM if protocol == PROTO_ICMP => l4_word(PROTO_ICMP, Some(ICMP_ECHO_REQUEST)),
        SOCK_DGRAM if protocol == PROTO_ICMPV6 => l4_word(PROTO_ICMPV6, Some(ICMPV6_ECHO_REQUEST)),
        SOCK_DGRAM => l4_word(PROTO_UDP, Some(port)),
        _ => l4_word(protocol, None),
    };
    Dest { v6, addr, l4 }
}

/// Where the sender's cgroup comes from: the calling task (sock_addr hooks run in the
/// process's context) or the packet's socket (cgroup_skb runs wherever the packet is sent
/// from, so "current" is meaningless there; the socket keeps its creator's cgroup).
pub(crate) enum Cgroups {
    Current,
    Skb(*mut __sk_buff),
}

impl Cgroups {
    #[inline(always)]
    fn own(&self) -> u64 {
        // SAFETY: helpers without preconditions (a context pointer for the skb ones).
        unsafe {
            match self {
                Cgroups::Current => bpf_get_current_cgroup_id(),
                Cgroups::Skb(skb) => bpf_skb_cgroup_id(*skb),
            }
        }
    }

    /// The ancestor at `level` (0 = root); 0 when the cgroup is less deep.
    #[inline(always)]
    fn ancestor(&self, level: i32) -> u64 {
        // SAFETY: as above.
        unsafe {
            match self {
                Cgroups::Current => bpf_get_current_ancestor_cgroup_id(level),
                Cgroups::Skb(skb) => bpf_skb_ancestor_cgroup_id(*skb, level),
            }
        }
    }
}

/// The workload class of the sender: its cgroup, then its ancestors deepest first; the first
/// one in the workload table wins. 0 = none.
#[inline(always)]
fn workload(generation: u32, cgroups: &Cgroups) -> Result<u32, InternalError> {
    let table = FW_WORKLOADS.get(generation).ok_or(InternalError)?;
    let own = cgroups.own();
    if let Some(v) = table.get_ptr(WorkloadKey { cgroup_id: own }) {
        // SAFETY: a pointer from a map lookup, valid for the whole run.
        return Ok(unsafe { (*v).workload });
    }
    let mut level = MAX_ANCESTOR_LEVEL - 1;
    while level >= 0 {
        let id = cgroups.ancestor(level);
        if id != 0
            && id != own
            && let Some(v) = table.get_ptr(WorkloadKey { cgroup_id: id })
        {
            // SAFETY: as above.
            return Ok(unsafe { (*v).workload });
        }
        level -= 1;
    }
    Ok(0)
}

/// Steps 2 to 6 of the precedence for an egress call (step 1, loopback, is done).
#[inline(always)]
fn decide(dest: &Dest, cgroups: &Cgroups) -> Result<Outcome, InternalError> {
    let generation = FW_GEN.get(0).ok_or(InternalError)?.index;
    // Step 2: the destination's classes, one per layer, as (found, wide, narrow) for the
    // verifier (see main.rs).
    let (has_class, wide, narrow) = if dest.v6 {
        let trie = FW_EG_V6.get(generation).ok_or(InternalError)?;
        trie.get(&Key::new(128, dest.addr))
            .map_or((false, 0, 0), |c| (true, c.wide_class, c.narrow_class))
    } else {
        let trie = FW_EG_V4.get(generation).ok_or(InternalError)?;
        let a = [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]];
        trie.get(&Key::new(32, a)).map_or((false, 0, 0), |c| (true, c.wide_class, c.narrow_class))
    };
    // Step 3: the workload class.
    let workload = workload(generation, cgroups)?;
    // Step 4: three entries, each (table, workload, L4) then (table, 0, L4): the shared table
    // (rules without an address restriction, class SHARED_CLASS), consulted even without a
    // class, then the wide and the narrow class's tables.
    let l4_trie = FW_EG_L4.get(generation).ok_or(InternalError)?;
    let word = dest.l4.to_be_bytes();
    // Step 5, as the entries are read: the best decision of the three (deny beats allow,
    // then the lower rank, none loses; a tie keeps the earlier one), for the verdict and for
    // audit separately.
    let classes = if has_class { Some((wide, narrow)) } else { None };
    let combined = l4_decide(l4_trie, classes, workload, word)?;
    // Step 6.
    let config =
        FW_CONFIG.get(generation).ok_or(InternalError)?.get(CONFIG_EGRESS).ok_or(InternalError)?;
    outcome(combined, config)
}

/// Emits the event of a logged egress decision. The local address and port are not chosen yet
/// at connect/sendmsg time, so the event's source is all zeros.
#[inline(always)]
fn event(dest: &Dest, o: &Outcome) {
    if !events::take_credit() {
        return;
    }
    let no_port = dest.l4 & (1 << 16) != 0;
    let mut e = Event {
        direction: DIRECTION_EGRESS as u8,
        proto: (dest.l4 >> 24) as u8,
        family: if dest.v6 { 6 } else { 4 },
        dst_port: if no_port { 0 } else { dest.l4 as u16 },
        dst: dest.addr,
        ..Event::default()
    };
    events::describe(o, &mut e);
    events::emit(&mut e);
}

#[inline(always)]
fn count_outcome(o: &Outcome) {
    match o.verdict_rule {
        0 => count_stat(if o.deny { STAT_DEFAULT_DENY } else { STAT_DEFAULT_ALLOW }),
        rule => count_rule(rule, 0),
    }
    if let Some(rule) = o.audit_deny {
        count_stat(STAT_AUDIT_DENY);
        match rule {
            0 => count_stat(STAT_AUDIT_DEFAULT_DENY),
            rule => count_rule(rule, 0),
        }
    }
}

#[inline(always)]
fn count_stat(stat: u32) {
    if let Some(c) = FW_STATS.get_ptr_mut(stat_index(DIRECTION_EGRESS, stat)) {
        add(c, 0);
    }
}
