//! Event ABI: what the programs report to user space through the [`crate::maps::EVENTS`] ring
//! buffer, and the per-CPU rate limiter ([`crate::maps::EVENT_LIMIT`]) in front of it.
//!
//! An event is emitted when a rule with `log: true` decides a verdict, when a direction's
//! default denies, and for every audit-deny (what audit-mode policies would have denied). A
//! flood of such packets must not starve the host (every event costs a ring-buffer reservation
//! and a wake-up of the reader), so each CPU has a token bucket: [`EVENTS_PER_SEC_PER_CPU`]
//! events per second on average, bursts of up to [`EVENT_BURST`]; events over the limit, and
//! events that do not fit in the ring because the reader is behind, are counted in
//! [`EventLimiter::dropped`] instead. The verdict never depends on the event.
//!
//! The bucket is kept in nanoseconds of credit: each event costs `1e9 /
//! EVENTS_PER_SEC_PER_CPU` ns, credit grows with elapsed time and is capped at
//! `EVENT_BURST` events' worth. Integer arithmetic only, no division in the kernel.

use core::mem::{offset_of, size_of};

/// Bytes of the ring buffer (a power of two, a multiple of the page size).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;
/// Average events per second each CPU may emit.
pub const EVENTS_PER_SEC_PER_CPU: u64 = 1000;
/// Events a CPU may emit at once after a quiet period.
pub const EVENT_BURST: u64 = 200;
/// Credit one event costs, in nanoseconds.
pub const EVENT_COST_NS: u64 = 1_000_000_000 / EVENTS_PER_SEC_PER_CPU;
/// The most credit a bucket holds.
pub const EVENT_MAX_CREDIT_NS: u64 = EVENT_BURST * EVENT_COST_NS;

/// [`Event::verdict`]: allowed by a rule with `log: true` (defaults never log allows).
pub const EVENT_ALLOW: u8 = 1;
/// [`Event::verdict`]: denied.
pub const EVENT_DENY: u8 = 2;
/// [`Event::verdict`]: allowed, but audit-mode policies would have denied.
pub const EVENT_AUDIT_DENY: u8 = 3;

/// One event (the ring buffer's record).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Event {
    /// `bpf_ktime_get_ns` (monotonic, since boot) when the program decided.
    pub timestamp_ns: u64,
    /// The deciding rule: for [`EVENT_AUDIT_DENY`] the audit rule that would have denied,
    /// otherwise the verdict rule; 0 = the (audit) default. Host order.
    pub rule: u32,
    /// `DIRECTION_INGRESS` or `DIRECTION_EGRESS`.
    pub direction: u8,
    /// [`EVENT_ALLOW`], [`EVENT_DENY`] or [`EVENT_AUDIT_DENY`].
    pub verdict: u8,
    /// IP protocol number.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Source port (TCP, UDP; 0 otherwise or unknown). Host order.
    pub src_port: u16,
    /// Destination port (TCP, UDP), ICMP type; 0 when the packet has none. Host order.
    pub dst_port: u16,
    /// Always 0.
    pub _pad: u32,
    /// Source address, network order (IPv4 in the first 4 bytes). On egress (connect,
    /// sendmsg) the local address is not chosen yet: all zeros.
    pub src: [u8; 16],
    /// Destination address, as `src`.
    pub dst: [u8; 16],
}

/// The per-CPU value of [`crate::maps::EVENT_LIMIT`] (one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventLimiter {
    /// Credit in nanoseconds (see the module doc).
    pub credit_ns: u64,
    /// `bpf_ktime_get_coarse_ns` (the monotonic clock at the last tick) of the last refill.
    pub last_ns: u64,
    /// Events written to the ring.
    pub emitted: u64,
    /// Events dropped by the limit or because the ring was full.
    pub dropped: u64,
}

const _: () = {
    assert!(size_of::<Event>() == 56);
    assert!(offset_of!(Event, rule) == 8);
    assert!(offset_of!(Event, direction) == 12);
    assert!(offset_of!(Event, src_port) == 16);
    assert!(offset_of!(Event, src) == 24);
    assert!(offset_of!(Event, dst) == 40);
    assert!(size_of::<EventLimiter>() == 32);
    assert!(EVENT_RING_BYTES.is_power_of_two());
};

impl Event {
    /// Reads an event from the ring buffer record's bytes (`None` for a wrong size).
    pub fn from_record(b: &[u8]) -> Option<Self> {
        if b.len() != size_of::<Self>() {
            return None;
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        let mut rule = [0u8; 4];
        rule.copy_from_slice(&b[8..12]);
        let mut src = [0u8; 16];
        src.copy_from_slice(&b[24..40]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&b[40..56]);
        Some(Self {
            timestamp_ns: u64::from_le_bytes(ts),
            rule: u32::from_le_bytes(rule),
            direction: b[12],
            verdict: b[13],
            proto: b[14],
            family: b[15],
            src_port: u16_at(16),
            dst_port: u16_at(18),
            _pad: 0,
            src,
            dst,
        })
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] structs of integers and byte arrays with explicit padding (checked
    // by the assertions above); any bit pattern is valid.
    unsafe impl aya::Pod for super::EventLimiter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_little_endian_fields_and_reject_other_sizes() {
        let mut b = [0u8; 56];
        b[0] = 1;
        b[8] = 7;
        b[12] = 1;
        b[13] = EVENT_DENY;
        b[14] = 6;
        b[15] = 4;
        b[18] = 0xbb;
        b[19] = 0x01;
        b[24..28].copy_from_slice(&[10, 0, 0, 1]);
        let e = Event::from_record(&b).unwrap();
        assert_eq!((e.timestamp_ns, e.rule, e.direction, e.verdict), (1, 7, 1, EVENT_DENY));
        assert_eq!((e.proto, e.family, e.dst_port), (6, 4, 443));
        assert_eq!(e.src[..4], [10, 0, 0, 1]);
        assert_eq!(Event::from_record(&b[1..]), None);
    }

    #[test]
    fn the_bucket_allows_a_burst() {
        assert_eq!(EVENT_MAX_CREDIT_NS / EVENT_COST_NS, EVENT_BURST);
    }
}
