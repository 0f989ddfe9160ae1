//! Benchmark-only programs and hooks (cargo feature `bench`): never part of the production
//! object, which is built without the feature.
//!
//! `BPF_PROG_TEST_RUN` feeds the same frame on every repetition, so a per-packet figure taken
//! with it would always walk the same trie path, warm in the cache. The benchmark build of
//! `fw_ingress` therefore replaces the parsed source address with a random one before the
//! lookup ([`randomise`], called from `try_ingress`), drawn as a descriptor in the frame says
//! (so one loaded object serves hit-heavy and miss-heavy traffic and every prefix count
//! without maps of its own): 32 bits at byte `off` of the address become
//! `base + (r1 % count) << shift + (r2 & mask)` for two `bpf_get_prandom_u32` draws.
//! `fw_bench_base` does the same reading and drawing and returns XDP_PASS: the bench
//! subtracts it, so what remains is the program's own cost. `fw_bench_pass` and
//! `fw_bench_drop` are bare programs (one instruction and `exit`), the references. `fw_bench_gen` is the packet
//! generator of the packet-rate bench: run with `BPF_F_TEST_XDP_LIVE_FRAMES`, it rewrites the
//! IPv4 source address of a UDP frame the same way (from a descriptor after the UDP header),
//! fixes the header checksum and transmits the frame (XDP_TX) out of the test device.

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;

use crate::parse::{self, IpPacket, Malformed};

/// Where the descriptor of a test-run frame starts (after the headers of a TCP SYN over
/// IPv6, the longest frame the bench sends, padded).
pub const DESC_OFF: usize = 80;
/// Where the generator's descriptor starts: after Ethernet, IPv4 (no options) and UDP, plus
/// two bytes of padding.
pub const GEN_DESC_OFF: usize = 44;
/// The descriptor's magic bytes (its bytes 2 and 3).
const MAGIC: [u8; 2] = *b"FB";

/// A descriptor: off (u8), shift (u8), magic (2 bytes), count, base, mask (u32, big-endian).
struct Desc {
    off: u8,
    shift: u32,
    count: u32,
    base: u32,
    mask: u32,
}

#[inline(always)]
fn be32(b: &[u8; 16], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline(always)]
fn desc(ctx: &XdpContext, off: usize) -> Option<Desc> {
    let b: [u8; 16] = parse::load(ctx, off).ok()?;
    if b[2] != MAGIC[0] || b[3] != MAGIC[1] {
        return None;
    }
    Some(Desc {
        off: b[0],
        shift: u32::from(b[1] & 31),
        count: be32(&b, 4),
        base: be32(&b, 8),
        mask: be32(&b, 12),
    })
}

#[inline(always)]
fn draw(d: &Desc) -> [u8; 4] {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let (r1, r2) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let count = if d.count == 0 { 1 } else { d.count };
    d.base.wrapping_add((r1 % count).wrapping_shl(d.shift)).wrapping_add(r2 & d.mask).to_be_bytes()
}

/// The benchmark build's hook in `try_ingress`: a random source address as the frame's
/// descriptor says; frames without one are left alone.
#[inline(always)]
pub fn randomise(ctx: &XdpContext, ip: &mut IpPacket) {
    let Some(d) = desc(ctx, DESC_OFF) else {
        return;
    };
    let v = draw(&d);
    // One path, not one per offset: the word is written at a variable index (0..=3; offsets
    // past 12 write the last word), so the verifier continues from a single state here
    // instead of walking the rest of the program once per arm.
    let idx = core::cmp::min(usize::from(d.off) / 4, 3);
    let s = &mut ip.src;
    let mut words = [
        [s[0], s[1], s[2], s[3]],
        [s[4], s[5], s[6], s[7]],
        [s[8], s[9], s[10], s[11]],
        [s[12], s[13], s[14], s[15]],
    ];
    if let Some(w) = words.get_mut(idx) {
        *w = v;
    }
    let mut i = 0;
    while i < 4 {
        let w = words[i];
        s[i * 4] = w[0];
        s[i * 4 + 1] = w[1];
        s[i * 4 + 2] = w[2];
        s[i * 4 + 3] = w[3];
        i += 1;
    }
}

/// The randomisation alone: read the descriptor, draw, pass.
#[xdp]
pub fn fw_bench_base(ctx: XdpContext) -> u32 {
    if let Some(d) = desc(&ctx, DESC_OFF) {
        let v = draw(&d);
        // Keep the draw's result alive the way the ingress program uses it (one byte decides).
        if v[0] == 0xff && v[1] == 0xff && v[2] == 0xff && v[3] == 0xfe {
            return xdp_action::XDP_DROP;
        }
    }
    xdp_action::XDP_PASS
}

/// A bare XDP_PASS: the denominator of the per-packet figures.
#[xdp]
pub fn fw_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A bare XDP_DROP: the ceiling of the packet-rate figures.
#[xdp]
pub fn fw_bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// The packet generator: a random IPv4 source as the descriptor after the UDP header says, a
/// fresh header checksum, XDP_TX. Frames it cannot read are dropped.
#[xdp]
pub fn fw_bench_gen(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Ok(()) => xdp_action::XDP_TX,
        Err(Malformed) => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Result<(), Malformed> {
    const IP: usize = 14;
    let d = desc(ctx, GEN_DESC_OFF).ok_or(Malformed)?;
    let v = draw(&d);
    let mut h: [u8; 20] = parse::load(ctx, IP)?;
    h[12] = v[0];
    h[13] = v[1];
    h[14] = v[2];
    h[15] = v[3];
    h[10] = 0;
    h[11] = 0;
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = (!(sum as u16)).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    let start = ctx.data();
    if start + IP + 20 > ctx.data_end() {
        return Err(Malformed);
    }
    // SAFETY: the 20 bytes at start + IP are inside the packet (checked just above).
    unsafe { *((start + IP) as *mut [u8; 20]) = h };
    Ok(())
}
