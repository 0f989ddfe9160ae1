//! Connection tracking: which ingress packets are replies to, or ICMP errors about, flows local
//! processes started (semantics rule 5: always allowed on ingress).
//!
//! Two halves around one LRU hash ([`FW_CONNTRACK`], ABI and timeouts in
//! `fw_common::conntrack`):
//! - [`fw_ct_egress`], a cgroup_skb egress program attached at the same cgroup as the egress
//!   filter, records every outgoing TCP segment, UDP datagram and ICMP/ICMPv6 echo request of
//!   the processes below that cgroup, keyed by the flow as seen from the host, with the time
//!   and (TCP) whether the host's side is established. It drops only ICMP/ICMPv6 echo
//!   requests the egress policy denies (see `egress.rs`: ping is filtered here because raw and
//!   ping sockets bypass the sendmsg hooks); TCP and UDP were decided at connect/sendmsg.
//!   Recording on packets rather than on connect() also covers unconnected UDP sockets and
//!   keeps established flows alive for as long as the host keeps sending.
//! - [`flow_state`], called by the XDP ingress program: a TCP/UDP packet or ICMP echo reply
//!   whose reversed flow is recorded and not expired is a `Reply`; an ICMP/ICMPv6 error (the
//!   types in `main::is_icmp_error`) addressed to the host whose embedded header is a recorded,
//!   unexpired flow of the host (embedded source = the error's destination) is `Related`.
//!   Everything else is `New` and goes to the policy.
//!
//! Limits (documented rather than hidden): IPv6 packets with extension headers before the
//! upper layer are not recorded on egress, and an ICMPv6 error whose embedded packet carries
//! extension headers is not recognised (it is then decided by the policy like any packet);
//! IPv4 non-first fragments are not recorded (the first fragment carries the ports). Only
//! flows of processes below the cgroup the program is attached to are recorded: attach it at
//! the cgroup v2 root to cover the whole host.

use aya_ebpf::bindings::BPF_ANY;
use aya_ebpf::btf_maps::{Array, LruHashMap};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{btf_map, cgroup_skb};
use aya_ebpf::programs::{SkBuffContext, XdpContext};
use fw_common::conntrack::{
    CT_ENTRIES, CT_FAMILY_V4, CT_FAMILY_V6, CT_SEEN_SLOTS, CT_STATE_ESTABLISHED, CT_STATE_OTHER,
    ConntrackKey, ConntrackValue, ct_seen_epoch, ct_seen_fold, ct_seen_hash, ct_seen_may_live,
    ct_seen_slot, timeout_ns,
};

use crate::parse::{IpPacket, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, load};
use crate::{FlowState, egress};

/// Outgoing flows of local processes (see the module doc). Not generational.
#[btf_map]
static FW_CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue, { CT_ENTRIES as usize }> =
    LruHashMap::new();

/// The table's seen filter (`fw_common::conntrack`): per slot of a key hash, the coarse time
/// of the last write of a key hashing there. Written before the table, read before it: a
/// clear or old slot means no live entry, and the table is not asked. Not generational.
#[btf_map]
static FW_CT_SEEN: Array<u32, { CT_SEEN_SLOTS as usize }> = Array::new();

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// cgroup_skb return value: let the packet go.
const SKB_PASS: i32 = 1;

/// cgroup_skb return value: drop the packet (the sender's sendmsg fails with EPERM).
const SKB_DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn fw_ct_egress(ctx: SkBuffContext) -> i32 {
    match record(&ctx) {
        Some(false) => SKB_DROP,
        _ => SKB_PASS,
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Records one outgoing packet (the skb's data starts at the IP header). `Some(false)` when
/// the packet is an echo request the egress policy denies (it is then not recorded); `None`
/// when the packet is not tracked.
#[inline(always)]
fn record(ctx: &SkBuffContext) -> Option<bool> {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let mut key = ConntrackKey::default();
    let l4_off = if ethertype == ETH_P_IP {
        let h: [u8; 20] = ctx.load(0).ok()?;
        // Not IPv4, or a non-first fragment (no L4 header).
        if h[0] >> 4 != 4 || be16(h[6], h[7]) & 0x1fff != 0 {
            return None;
        }
        key.family = CT_FAMILY_V4;
        key.proto = h[9];
        key.local[..4].copy_from_slice(&h[12..16]);
        key.remote[..4].copy_from_slice(&h[16..20]);
        usize::from(h[0] & 0x0f) * 4
    } else if ethertype == ETH_P_IPV6 {
        let h: [u8; 40] = ctx.load(0).ok()?;
        key.family = CT_FAMILY_V6;
        key.proto = h[6];
        key.local.copy_from_slice(&h[8..24]);
        key.remote.copy_from_slice(&h[24..40]);
        40
    } else {
        return None;
    };
    let l4: [u8; 8] = ctx.load(l4_off).ok()?;
    let mut state = CT_STATE_OTHER;
    match key.proto {
        PROTO_TCP | PROTO_UDP => {
            key.local_port = be16(l4[0], l4[1]);
            key.remote_port = be16(l4[2], l4[3]);
            if key.proto == PROTO_TCP {
                let flags: u8 = ctx.load(l4_off + 13).ok()?;
                if flags & TCP_ACK != 0 && flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
                    state = CT_STATE_ESTABLISHED;
                }
            }
        }
        PROTO_ICMP | PROTO_ICMPV6
            if (key.proto == PROTO_ICMP && l4[0] == ICMP_ECHO_REQUEST)
                || (key.proto == PROTO_ICMPV6 && l4[0] == ICMPV6_ECHO_REQUEST) =>
        {
            let v6 = key.family == CT_FAMILY_V6;
            if !egress::allow_echo_request(ctx.skb.skb, v6, key.remote, l4[0]) {
                return Some(false);
            }
            key.local_port = be16(l4[4], l4[5]);
        }
        _ => return None,
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // The seen filter first (see `fw_common::conntrack`), so an ingress reader that finds the
    // entry finds the slot written too; written only when it changes (about once a second per
    // slot), so busy flows do not bounce its cache line between CPUs.
    if let Some(slot) = FW_CT_SEEN.get_ptr_mut(ct_seen_slot(&key)) {
        let epoch = ct_seen_epoch(now);
        // SAFETY: a pointer from an array lookup, valid for the whole run. Another CPU may
        // write the slot at the same instant with its own (equally recent) time.
        unsafe {
            if core::ptr::read_volatile(slot) != epoch {
                core::ptr::write_volatile(slot, epoch);
            }
        }
    }
    if let Some(v) = FW_CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: a pointer from a map lookup, valid for the whole run. Concurrent writers
        // (other CPUs sending on the same flow) write the same kind of values; a torn pair of
        // time and state costs at most one early expiry.
        unsafe {
            (*v).last_seen_ns = now;
            (*v).state = state;
        }
        return Some(true);
    }
    let value = ConntrackValue { last_seen_ns: now, state, _pad: 0 };
    // A full table evicts; a failed insert only costs tracking, never the packet.
    let _ = FW_CONNTRACK.insert(&key, &value, u64::from(BPF_ANY));
    Some(true)
}

/// The recorded flow `key` exists and has not expired. The seen filter is read first: a
/// slot never written (the common case for traffic nobody here asked for) needs neither the
/// clock nor the table, and an old one only the clock. A BPF function of its own (called from
/// one place, with the key on the caller's stack): its paths are walked once per caller path
/// rather than multiplying those of the caller.
#[inline(never)]
fn live(key: &ConntrackKey) -> u32 {
    let Some(slot) = FW_CT_SEEN.get(ct_seen_slot(key)) else { return 0 };
    let slot = *slot;
    if slot == 0 {
        return 0;
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !ct_seen_may_live(slot, now) {
        return 0;
    }
    let Some(v) = FW_CONNTRACK.get_ptr(key) else { return 0 };
    // SAFETY: a pointer from a map lookup, valid for the whole run.
    let (seen, state) = unsafe { ((*v).last_seen_ns, (*v).state) };
    u32::from(now.saturating_sub(seen) <= timeout_ns(key.proto, state))
}

/// Connection-tracking state of an ingress packet (see the module doc).
#[inline(always)]
pub fn flow_state(ctx: &XdpContext, ip: &IpPacket) -> FlowState {
    if ip.port.is_none() {
        return FlowState::New;
    }
    let Ok(l4) = load::<8>(ctx, ip.l4_off) else { return FlowState::New };
    let family = if ip.v6 { CT_FAMILY_V6 } else { CT_FAMILY_V4 };
    // The reply's key ports; related errors build their key from the embedded header.
    let (local_port, remote_port, related) = match (ip.proto, l4[0]) {
        (PROTO_TCP | PROTO_UDP, _) => (be16(l4[2], l4[3]), be16(l4[0], l4[1]), false),
        (PROTO_ICMP, ICMP_ECHO_REPLY) | (PROTO_ICMPV6, ICMPV6_ECHO_REPLY) => {
            (be16(l4[4], l4[5]), 0, false)
        }
        (PROTO_ICMP, 3 | 11 | 12) | (PROTO_ICMPV6, 1..=4) => (0, 0, true),
        _ => return FlowState::New,
    };
    if !related {
        // The seen filter's slot straight from the packet's fields: a slot never written
        // (traffic nobody here talked to, what a deny under a flood mostly is) answers before
        // the 40-byte key is built. `live` reads the slot again with its time check.
        let slot = ct_seen_hash(
            family,
            ip.proto,
            local_port,
            remote_port,
            ct_seen_fold(&ip.dst),
            ct_seen_fold(&ip.src),
        );
        match FW_CT_SEEN.get(slot) {
            Some(s) if *s != 0 => {}
            _ => return FlowState::New,
        }
    }
    let mut key = ConntrackKey {
        family,
        proto: ip.proto,
        local_port,
        remote_port,
        local: ip.dst,
        remote: ip.src,
        ..ConntrackKey::default()
    };
    if related && !related_key(ctx, ip, ip.l4_off + 8, &mut key) {
        return FlowState::New;
    }
    // One `live` for replies and related errors, so the verifier walks it once per path.
    match (live(&key), related) {
        (0, _) => FlowState::New,
        (_, false) => FlowState::Reply,
        (_, true) => FlowState::Related,
    }
}

/// The key of the packet embedded in an ICMP error at `off` into `key`, when it is a flow
/// the host could have sent (false: it is not, or cannot be read).
#[inline(always)]
fn related_key(ctx: &XdpContext, ip: &IpPacket, off: usize, key: &mut ConntrackKey) -> bool {
    *key = ConntrackKey::default();
    let l4_off = if ip.v6 {
        let Ok(h) = load::<40>(ctx, off) else { return false };
        if h[0] >> 4 != 6 {
            return false;
        }
        key.family = CT_FAMILY_V6;
        key.proto = h[6];
        key.local.copy_from_slice(&h[8..24]);
        key.remote.copy_from_slice(&h[24..40]);
        off + 40
    } else {
        let Ok(h) = load::<20>(ctx, off) else { return false };
        if h[0] >> 4 != 4 || h[0] & 0x0f < 5 {
            return false;
        }
        key.family = CT_FAMILY_V4;
        key.proto = h[9];
        key.local[..4].copy_from_slice(&h[12..16]);
        key.remote[..4].copy_from_slice(&h[16..20]);
        off + usize::from(h[0] & 0x0f) * 4
    };
    // The error must be about a packet this host sent to it: addressed to the embedded source.
    if key.local != ip.dst {
        return false;
    }
    let Ok(l4) = load::<8>(ctx, l4_off) else { return false };
    match (key.proto, l4[0]) {
        (PROTO_TCP | PROTO_UDP, _) => {
            key.local_port = be16(l4[0], l4[1]);
            key.remote_port = be16(l4[2], l4[3]);
        }
        (PROTO_ICMP, ICMP_ECHO_REQUEST) | (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST) => {
            key.local_port = be16(l4[4], l4[5]);
        }
        _ => return false,
    }
    true
}
