//! Events: a record per logged decision in a ring buffer, behind a per-CPU token bucket that
//! is asked before the record is built.
//!
//! See `fw_common::events` for what is logged and the limiter's arithmetic. The limiter is
//! per CPU so it needs no atomics (a per-CPU array value is only touched by its CPU, and
//! programs do not migrate mid-run), and a flood on one CPU cannot use up another's budget.
//! `bpf_ringbuf_output` copies the record and wakes the reader; a full ring fails the output,
//! which counts as a drop like a limited event.

use aya_ebpf::btf_maps::{PerCpuArray, RingBuf};
use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use aya_ebpf::macros::btf_map;
use aya_ebpf::programs::XdpContext;
use fw_common::events::{
    EVENT_ALLOW, EVENT_AUDIT_DENY, EVENT_COST_NS, EVENT_DENY, EVENT_MAX_CREDIT_NS,
    EVENT_RING_BYTES, Event, EventLimiter,
};
use fw_common::{DIRECTION_INGRESS, FLAG_LOG_VERDICT};

use crate::Outcome;
use crate::parse::{IpPacket, PROTO_TCP, PROTO_UDP, load};

#[btf_map]
static FW_EVENTS: RingBuf<Event, { EVENT_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
static FW_EV_LIMIT: PerCpuArray<EventLimiter, 1> = PerCpuArray::new();

/// Whether an outcome is logged: a deciding rule with `log: true`, a default deny, or any
/// audit-deny (so the audit rule's own `FLAG_LOG_AUDIT` adds nothing).
#[inline(always)]
pub fn wanted(o: &Outcome) -> bool {
    o.audit_deny.is_some()
        || (o.deny && o.verdict_rule == 0)
        || (o.verdict_rule != 0 && o.flags & FLAG_LOG_VERDICT != 0)
}

/// Fills in the verdict and rule of `e` from `o`.
#[inline(always)]
pub fn describe(o: &Outcome, e: &mut Event) {
    match o.audit_deny {
        Some(rule) => {
            e.verdict = EVENT_AUDIT_DENY;
            e.rule = rule;
        }
        None => {
            e.verdict = if o.deny { EVENT_DENY } else { EVENT_ALLOW };
            e.rule = o.verdict_rule;
        }
    }
}

/// Takes one event's credit from this CPU's bucket: false, with the drop counted, when there is
/// none. Called before an event is built, so a flood of logged packets (a default deny under
/// attack) costs each packet this check, not the event's construction. The bucket runs on the
/// coarse monotonic clock (`bpf_ktime_get_coarse_ns`: the time of the last tick, read without
/// the clock source, where `bpf_ktime_get_ns` costs about as much as the rest of a denied
/// packet's path on a virtual machine): credit then grows a tick at a time, a few events'
/// worth, which keeps the average rate and the burst.
#[inline(always)]
pub fn take_credit() -> bool {
    let Some(limiter) = FW_EV_LIMIT.get_ptr_mut(0) else { return false };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a per-CPU array value of this CPU, valid for the whole run and written only by
    // this CPU.
    let l = unsafe { &mut *limiter };
    let credit = l.credit_ns.saturating_add(now.saturating_sub(l.last_ns));
    let credit = if credit > EVENT_MAX_CREDIT_NS { EVENT_MAX_CREDIT_NS } else { credit };
    l.last_ns = now;
    if credit < EVENT_COST_NS {
        l.credit_ns = credit;
        l.dropped += 1;
        return false;
    }
    l.credit_ns = credit - EVENT_COST_NS;
    true
}

/// Emits `e` (its timestamp, the precise monotonic clock, is set here) into the ring; the
/// caller has taken its credit ([`take_credit`]). A full ring counts as a dropped event.
#[inline(always)]
pub fn emit(e: &mut Event) {
    let Some(limiter) = FW_EV_LIMIT.get_ptr_mut(0) else { return };
    // SAFETY: a helper without preconditions.
    e.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as in `take_credit`.
    let l = unsafe { &mut *limiter };
    if FW_EVENTS.output(&*e, 0).is_ok() {
        l.emitted += 1;
    } else {
        l.dropped += 1;
    }
}

/// Emits the event of a logged ingress decision.
#[inline(always)]
pub fn ingress(ctx: &XdpContext, ip: &IpPacket, o: &Outcome) {
    if !take_credit() {
        return;
    }
    let src_port = match (ip.proto, ip.port) {
        (PROTO_TCP | PROTO_UDP, Some(_)) => match load::<2>(ctx, ip.l4_off) {
            Ok(b) => u16::from_be_bytes(b),
            Err(_) => 0,
        },
        _ => 0,
    };
    let mut e = Event {
        direction: DIRECTION_INGRESS as u8,
        proto: ip.proto,
        family: if ip.v6 { 6 } else { 4 },
        src_port,
        dst_port: ip.port.unwrap_or(0),
        src: ip.src,
        dst: ip.dst,
        ..Event::default()
    };
    describe(o, &mut e);
    emit(&mut e);
}
