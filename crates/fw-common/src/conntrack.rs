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
    fn timeouts_follow_protocol_and_state() {
        assert_eq!(timeout_ns(6, CT_STATE_ESTABLISHED), 300_000_000_000);
        assert_eq!(timeout_ns(6, CT_STATE_OTHER), 30_000_000_000);
        assert_eq!(timeout_ns(17, CT_STATE_OTHER), 60_000_000_000);
        assert_eq!(timeout_ns(1, CT_STATE_OTHER), 30_000_000_000);
        assert_eq!(timeout_ns(58, CT_STATE_OTHER), 30_000_000_000);
    }
}
