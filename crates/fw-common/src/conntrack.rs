//! Connection tracking ABI: the table the egress side fills and the ingress side reads.
//!
//! The key is the flow as seen from the host: protocol, local address and port, remote address
//! and port, family. The cgroup_skb egress program writes it for every outgoing TCP, UDP and
//! ICMP/ICMPv6 echo request of a local process; the XDP ingress program looks a packet up with
//! its addresses and ports swapped (its destination is the local side), and an ICMP error up
//! with the header it embeds (which is the host's own outgoing packet, so not swapped).
//! For ICMP echo the "local port" is the echo identifier and the remote port 0.
//!
//! Timeouts (nanoseconds of `bpf_ktime_get_ns`, monotonic, since the last outgoing packet):
//! TCP established 5 min, other TCP states 30 s, UDP 60 s, ICMP echo 30 s. "Established" is
//! what the host last sent: an ACK without SYN, FIN or RST. A SYN (connecting), FIN or RST
//! (closing) leaves 30 s for the peer's answer. Entries are never deleted by the programs; the
//! map is an LRU hash, so the oldest flows make room for new ones when it is full, and an
//! expired entry is simply ignored.

//!
//! The seen filter ([`crate::maps::CONNTRACK_SEEN`]): the ingress program looks a packet up in
//! the table only when it is not simply allowed by the policy, but for a denied flood from
//! random sources that lookup (hashing a 40-byte key and reading a random bucket of the table)
//! was the largest part of the packet's cost. So every writer of the table also writes, in an
//! array of [`CT_SEEN_SLOTS`] slots indexed by a hash of the key ([`ct_seen_slot`]), the coarse
//! time of the write ([`ct_seen_epoch`]); the ingress program reads the slot first (an array
//! read the verifier inlines) and skips the table when no flow hashing there can still be
//! live ([`ct_seen_may_live`]). Slots are shared by the flows that hash alike and only ever
//! say "maybe": a set slot costs the lookup the program made before, a clear or old slot
//! proves that no entry with that key has been written within the longest timeout. Writers
//! write the slot before the entry (so a reader that finds the entry finds the slot too), the
//! user-space writers (tests seeding a flow, an upgrade copying the old table) included.

use core::mem::{offset_of, size_of};

/// `ConntrackKey::family` for IPv4.
pub const CT_FAMILY_V4: u8 = 4;
/// `ConntrackKey::family` for IPv6.
pub const CT_FAMILY_V6: u8 = 6;
/// `ConntrackValue::state`: TCP, the host last sent an ACK without SYN/FIN/RST.
pub const CT_STATE_ESTABLISHED: u32 = 1;
/// `ConntrackValue::state`: anything else (TCP handshake or close, UDP, ICMP).
pub const CT_STATE_OTHER: u32 = 0;
/// Timeout of an established TCP flow.
pub const CT_TCP_ESTABLISHED_NS: u64 = 300 * 1_000_000_000;
/// Timeout of a TCP flow in any other state.
pub const CT_TCP_OTHER_NS: u64 = 30 * 1_000_000_000;
/// Timeout of a UDP flow.
pub const CT_UDP_NS: u64 = 60 * 1_000_000_000;
/// Timeout of an ICMP/ICMPv6 echo flow.
pub const CT_ICMP_NS: u64 = 30 * 1_000_000_000;
/// Capacity of the conntrack table.
pub const CT_ENTRIES: u32 = 1 << 16;

/// Key of [`crate::maps::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackKey {
    /// [`CT_FAMILY_V4`] or [`CT_FAMILY_V6`].
    pub family: u8,
    /// IP protocol number (6, 17, 1, 58).
    pub proto: u8,
    /// Local port (ICMP: echo identifier). Host order.
    pub local_port: u16,
    /// Remote port (ICMP: 0). Host order.
    pub remote_port: u16,
    /// Always 0.
    pub _pad: u16,
    /// Local address, network order; IPv4 in the first 4 bytes, the rest 0.
    pub local: [u8; 16],
    /// Remote address, as `local`.
    pub remote: [u8; 16],
}

/// Value of [`crate::maps::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackValue {
    /// `bpf_ktime_get_ns` of the last outgoing packet.
    pub last_seen_ns: u64,
    /// [`CT_STATE_ESTABLISHED`] or [`CT_STATE_OTHER`].
    pub state: u32,
    /// Always 0.
    pub _pad: u32,
}

/// Slots of the seen filter (see the module doc): a power of two.
pub const CT_SEEN_SLOTS: u32 = 1 << 14;

/// The longest of the timeouts above.
pub const CT_MAX_TIMEOUT_NS: u64 = {
    let mut m = CT_TCP_ESTABLISHED_NS;
    if CT_TCP_OTHER_NS > m {
        m = CT_TCP_OTHER_NS;
    }
    if CT_UDP_NS > m {
        m = CT_UDP_NS;
    }
    if CT_ICMP_NS > m {
        m = CT_ICMP_NS;
    }
    m
};

/// Log2 of the seen filter's time unit in nanoseconds (2^30 ns, about 1.07 s).
pub const CT_SEEN_SHIFT: u32 = 30;

/// How many time units a slot stays "maybe live" after its last write: an entry written at
/// `t` is live at most until `t + CT_MAX_TIMEOUT_NS`, and whole units can differ by one more
/// than the timeout's units (rounded up).
pub const CT_SEEN_HORIZON: u32 = (CT_MAX_TIMEOUT_NS.div_ceil(1 << CT_SEEN_SHIFT) as u32) + 1;

/// The seen filter's value for a write at `now_ns` (`bpf_ktime_get_ns`, i.e.
/// `CLOCK_MONOTONIC`): the time unit plus one, so 0 stays "never written".
#[inline(always)]
pub const fn ct_seen_epoch(now_ns: u64) -> u32 {
    ((now_ns >> CT_SEEN_SHIFT) as u32).wrapping_add(1)
}

/// Whether a flow hashing to a slot holding `slot` may still be live at `now_ns`: the slot
/// was written, and not more than [`CT_SEEN_HORIZON`] units ago (a slot ahead of `now_ns`,
/// written by another CPU an instant later, counts as live).
#[inline(always)]
pub const fn ct_seen_may_live(slot: u32, now_ns: u64) -> bool {
    slot != 0 && slot.saturating_add(CT_SEEN_HORIZON) >= ct_seen_epoch(now_ns)
}

/// The seen filter's slot of `key` (below [`CT_SEEN_SLOTS`]): [`ct_seen_hash`] of its fields.
#[inline(always)]
pub const fn ct_seen_slot(key: &ConntrackKey) -> u32 {
    ct_seen_hash(
        key.family,
        key.proto,
        key.local_port,
        key.remote_port,
        ct_seen_fold(&key.local),
        ct_seen_fold(&key.remote),
    )
}

/// The seen filter's slot of a flow given by its fields, the addresses folded by
/// [`ct_seen_fold`]: a multiplicative hash (few instructions, as the verifier walks them on
/// many paths), the same in the programs and in user space. The ingress program computes it
/// from the packet's fields before it builds a key, so a packet whose slot was never written
/// costs no key at all.
#[inline(always)]
pub const fn ct_seen_hash(
    family: u8,
    proto: u8,
    local_port: u16,
    remote_port: u16,
    local: u32,
    remote: u32,
) -> u32 {
    const M: u32 = 0x9e37_79b1;
    let mut h = (family as u32) | ((proto as u32) << 8) | ((local_port as u32) << 16);
    h = h.wrapping_mul(M) ^ (remote_port as u32);
    h = h.wrapping_mul(M) ^ local;
    h = h.wrapping_mul(M) ^ remote;
    h = h.wrapping_mul(M);
    (h >> (32 - CT_SEEN_SLOTS.trailing_zeros())) & (CT_SEEN_SLOTS - 1)
}

/// An address of a [`ConntrackKey`] folded to one word for [`ct_seen_hash`]: its four words
/// XORed (an IPv4 address, with 12 zero bytes, folds to its own word).
#[inline(always)]
pub const fn ct_seen_fold(a: &[u8; 16]) -> u32 {
    word(a, 0) ^ word(a, 4) ^ word(a, 8) ^ word(a, 12)
}

/// Bytes `i..i + 4` of `a` as a word (native order).
#[inline(always)]
const fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// The timeout of a flow of protocol `proto` in `state`.
pub const fn timeout_ns(proto: u8, state: u32) -> u64 {
    match proto {
        6 if state == CT_STATE_ESTABLISHED => CT_TCP_ESTABLISHED_NS,
        6 => CT_TCP_OTHER_NS,
        17 => CT_UDP_NS,
        _ => CT_ICMP_NS,
    }
}

const _: () = {
    assert!(size_of::<ConntrackKey>() == 40);
    assert!(offset_of!(ConntrackKey, local) == 8);
    assert!(offset_of!(ConntrackKey, remote) == 24);
    assert!(size_of::<ConntrackValue>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] structs of integers and byte arrays with explicit padding (checked
    // by the assertions above); any bit pattern is valid.
    unsafe impl aya::Pod for super::ConntrackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConntrackValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_filter_covers_every_live_entry() {
        assert!(CT_SEEN_SLOTS.is_power_of_two());
        assert_eq!(CT_MAX_TIMEOUT_NS, CT_TCP_ESTABLISHED_NS);
        assert!(!ct_seen_may_live(0, 5));
        // An entry written at `t` and still live at `now` (within the longest timeout): its
        // slot, written at `t` too, says "maybe" at `now`, for writes across unit boundaries.
        let unit = 1u64 << CT_SEEN_SHIFT;
        for t in [0, 1, unit - 1, unit, 7 * unit + 3, 1_000_000 * unit - 1] {
            for now in [t, t + 1, t + CT_MAX_TIMEOUT_NS - 1, t + CT_MAX_TIMEOUT_NS] {
                assert!(ct_seen_may_live(ct_seen_epoch(t), now), "t {t} now {now}");
            }
            // A slot another CPU wrote an instant later.
            assert!(ct_seen_may_live(ct_seen_epoch(t + unit), t));
        }
        // Long after, the slot no longer costs a lookup.
        let t = 3 * unit;
        assert!(!ct_seen_may_live(ct_seen_epoch(t), t + CT_MAX_TIMEOUT_NS + 3 * unit));
    }

    #[test]
    fn seen_slots_spread_and_depend_on_every_field() {
        let base = ConntrackKey {
            family: CT_FAMILY_V4,
            proto: 17,
            local_port: 53,
            remote_port: 40000,
            _pad: 0,
            local: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut seen = [false; CT_SEEN_SLOTS as usize];
        for p in 0..4096u16 {
            let k = ConntrackKey { remote_port: p, ..base };
            let s = ct_seen_slot(&k);
            assert!(s < CT_SEEN_SLOTS);
            seen[s as usize] = true;
        }
        // 4096 keys over 16384 slots: a fair hash leaves few collisions.
        let distinct = seen.iter().filter(|&&b| b).count();
        assert!(distinct > 3300, "{distinct} distinct slots");
        let mut remote = base.remote;
        remote[3] = 3;
        assert_ne!(ct_seen_slot(&base), ct_seen_slot(&ConntrackKey { remote, ..base }));
        assert_ne!(ct_seen_slot(&base), ct_seen_slot(&ConntrackKey { local_port: 54, ..base }));
    }

    #[test]
    fn timeouts_follow_protocol_and_state() {
        assert_eq!(timeout_ns(6, CT_STATE_ESTABLISHED), 300_000_000_000);
        assert_eq!(timeout_ns(6, CT_STATE_OTHER), 30_000_000_000);
        assert_eq!(timeout_ns(17, CT_STATE_OTHER), 60_000_000_000);
        assert_eq!(timeout_ns(1, CT_STATE_OTHER), 30_000_000_000);
        assert_eq!(timeout_ns(58, CT_STATE_OTHER), 30_000_000_000);
    }
}
