//! Packet parsing for the XDP ingress program: from the frame to the few fields the policy reads.
//!
//! Written for the verifier first: every read goes through [`load`], which checks the read
//! against `data_end` right before it happens and caps the offset (so the verifier always knows
//! a bound for it), loops have constant trip counts, and nothing is read that the decision does
//! not need. The result is a [`Frame`]: ARP, not IP, or an [`IpPacket`] with the source address,
//! the upper-layer protocol and the destination port (TCP, UDP) or type (ICMP, ICMPv6).
//!
//! What counts as malformed (the program drops it: a packet the kernel would reject anyway must
//! not be classified by a half-read header, and a header we cannot see must not reach a path
//! where no rule can match it):
//! - a VLAN tag that does not fit, or more than [`MAX_VLAN_TAGS`] tags;
//! - IPv4: fewer than 20 bytes, version not 4, IHL < 5, total length shorter than the header or
//!   longer than the frame;
//! - IPv6: fewer than 40 bytes, version not 6, payload length longer than the frame (so also
//!   jumbograms, whose payload length is 0), an extension header that does not fit, a
//!   hop-by-hop header that is not the first, more than [`MAX_EXT_HEADERS`] extension headers;
//! - a first or unfragmented packet whose fixed L4 header does not fit inside both the frame and
//!   the IP packet: TCP 20 bytes, UDP 8, ICMP 8, ICMPv6 8 (what the kernel's receive paths
//!   require; it also drops the "tiny first fragment" of RFC 1858 / RFC 7112).
//!
//! The L4 fields depend on the protocol number alone, not on the IP version (ICMP type inside
//! IPv6 too), because that is how the compiler's L4 word and the reference evaluator see a flow.
//! IPv6 skips hop-by-hop, routing, destination-options and fragment headers; other next-header
//! values (AH, ESP, mobility, no-next-header, ...) are the packet's protocol, as in IPv4 where
//! AH is the protocol too.

use aya_ebpf::programs::XdpContext;

/// 802.1Q / 802.1ad tags parsed before the ethertype must be IP, ARP or something else:
/// a single tag, or the two of 802.1ad stacking (S-tag then C-tag). A frame with more is
/// malformed: passing it as "not IP" would let an IP packet behind a third tag skip the policy
/// on a host that decodes it.
pub const MAX_VLAN_TAGS: usize = 2;
/// Extension headers an IPv6 packet may carry before its upper-layer header (RFC 8200 allows
/// each at most once, destination options twice: 6 in a sane packet).
pub const MAX_EXT_HEADERS: usize = 8;
/// Largest offset read. A frame without XDP fragments (the program does not set `xdp.frags`)
/// is linear inside one page, so nothing beyond 4 KiB exists; the cap gives the verifier a
/// bound for offsets that grow in the IPv6 extension header loop.
const MAX_OFFSET: usize = 4096;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// The frame could not be parsed: see the module doc for the list.
pub struct Malformed;

/// What the frame carries.
pub enum Frame {
    /// An ARP packet (always allowed on ingress).
    Arp,
    /// Neither IPv4, IPv6 nor ARP.
    NotIp,
    /// An IPv4 or IPv6 packet.
    Ip(IpPacket),
}

/// The fields of an IP packet the policy reads.
pub struct IpPacket {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Source address in network order; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address, as `src` (connection tracking).
    pub dst: [u8; 16],
    /// Offset of the L4 header in the frame when `port` is `Some` (its fixed part is inside
    /// the packet); 0 otherwise.
    pub l4_off: usize,
    /// Upper-layer protocol: IPv4's protocol field, or IPv6's last next-header value after the
    /// skipped extension headers.
    pub proto: u8,
    /// Destination port (TCP, UDP) or type (ICMP, ICMPv6); `None` for non-first fragments and
    /// other protocols: the "no port" L4 word.
    pub port: Option<u16>,
}

impl IpPacket {
    /// The peer is a loopback address (127.0.0.0/8 or ::1): always allowed.
    #[inline(always)]
    pub fn loopback_source(&self) -> bool {
        if self.v6 {
            let s = &self.src;
            s[..15].iter().all(|b| *b == 0) && s[15] == 1
        } else {
            self.src[0] == 127
        }
    }

    /// An ICMPv6 neighbour discovery message (types 133-137): always allowed.
    #[inline(always)]
    pub fn neighbour_discovery(&self) -> bool {
        self.proto == PROTO_ICMPV6 && matches!(self.port, Some(133..=137))
    }
}

/// `N` bytes at `off`, or `Malformed` when they are not all inside the frame.
#[inline(always)]
pub fn load<const N: usize>(ctx: &XdpContext, off: usize) -> Result<[u8; N], Malformed> {
    if off > MAX_OFFSET {
        return Err(Malformed);
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + N > end {
        return Err(Malformed);
    }
    // SAFETY: the N bytes at start + off are inside the packet (checked just above); a byte
    // array has alignment 1.
    Ok(unsafe { *((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Parses a frame from its Ethernet header.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Frame, Malformed> {
    let eth: [u8; ETH_HLEN] = load(ctx, 0)?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut l3 = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // Tag control information (2 bytes), then the encapsulated ethertype.
        let tag: [u8; 4] = load(ctx, l3)?;
        ethertype = be16(tag[2], tag[3]);
        l3 += 4;
    }
    match ethertype {
        ETH_P_IP => ipv4(ctx, l3).map(Frame::Ip),
        ETH_P_IPV6 => ipv6(ctx, l3).map(Frame::Ip),
        ETH_P_ARP => Ok(Frame::Arp),
        ETH_P_8021Q | ETH_P_8021AD => Err(Malformed),
        _ => Ok(Frame::NotIp),
    }
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Result<IpPacket, Malformed> {
    let h: [u8; 20] = load(ctx, l3)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(be16(h[2], h[3]));
    if ihl < 20 || total < ihl || l3 + total > frame_len(ctx) {
        return Err(Malformed);
    }
    let mut src = [0u8; 16];
    src[0] = h[12];
    src[1] = h[13];
    src[2] = h[14];
    src[3] = h[15];
    let mut dst = [0u8; 16];
    dst[0] = h[16];
    dst[1] = h[17];
    dst[2] = h[18];
    dst[3] = h[19];
    let proto = h[9];
    // Fragment offset (low 13 bits of bytes 6-7): non-zero = a non-first fragment, which
    // carries no L4 header.
    let port =
        if be16(h[6], h[7]) & 0x1fff != 0 { None } else { l4(ctx, proto, l3 + ihl, l3 + total)? };
    let l4_off = if port.is_some() { l3 + ihl } else { 0 };
    Ok(IpPacket { v6: false, src, dst, l4_off, proto, port })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Result<IpPacket, Malformed> {
    let h: [u8; 8] = load(ctx, l3)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let end = l3 + 40 + usize::from(be16(h[4], h[5]));
    if end > frame_len(ctx) {
        return Err(Malformed);
    }
    let src: [u8; 16] = load(ctx, l3 + 8)?;
    let dst: [u8; 16] = load(ctx, l3 + 24)?;
    let mut next = h[6];
    let mut off = l3 + 40;
    // One iteration per extension header, plus the last one that finds the upper layer.
    for i in 0..=MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // RFC 8200: hop-by-hop options only directly after the IPv6 header (the kernel
                // rejects it anywhere else).
                if next == NEXTHDR_HOP && i != 0 {
                    return Err(Malformed);
                }
                let ext: [u8; 2] = load(ctx, off)?;
                next = ext[0];
                off += (usize::from(ext[1]) + 1) * 8;
                if off > end {
                    return Err(Malformed);
                }
            }
            NEXTHDR_FRAGMENT => {
                if off + 8 > end {
                    return Err(Malformed);
                }
                let frag: [u8; 4] = load(ctx, off)?;
                next = frag[0];
                off += 8;
                // Offset in 8-byte units (high 13 bits of bytes 2-3): non-zero = a non-first
                // fragment. Its next header is the first header of the fragmentable part: the
                // upper-layer protocol in practice (an extension header there is taken as the
                // protocol, since what follows is not at the start of this fragment).
                if be16(frag[2], frag[3]) >> 3 != 0 {
                    return Ok(IpPacket { v6: true, src, dst, l4_off: 0, proto: next, port: None });
                }
            }
            _ => {
                let port = l4(ctx, next, off, end)?;
                let l4_off = if port.is_some() { off } else { 0 };
                return Ok(IpPacket { v6: true, src, dst, l4_off, proto: next, port });
            }
        }
    }
    Err(Malformed)
}

/// The destination port (TCP, UDP) or type (ICMP, ICMPv6) of the L4 header at `off`, which
/// must fit in full before `end` (the end of the IP packet, itself inside the frame).
#[inline(always)]
fn l4(ctx: &XdpContext, proto: u8, off: usize, end: usize) -> Result<Option<u16>, Malformed> {
    let fixed_header = match proto {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => return Ok(None),
    };
    if off + fixed_header > end {
        return Err(Malformed);
    }
    let b: [u8; 4] = load(ctx, off)?;
    Ok(Some(match proto {
        PROTO_TCP | PROTO_UDP => be16(b[2], b[3]),
        _ => u16::from(b[0]),
    }))
}
