//! A small packet builder: Ethernet with VLAN tags, IPv4 with options and fragments, IPv6 with
//! extension headers, TCP, UDP, ICMP.
//!
//! Only what the XDP program reads has to be right: length fields, versions, header lengths,
//! fragment offsets, ports and types. Checksums are left at zero (a test run hands the frame
//! to the program directly; nothing verifies them), and addresses other than the source are
//! fixed documentation addresses.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// Length of an untagged Ethernet header.
pub const ETH_HLEN: usize = 14;

/// An Ethernet frame: fixed MAC addresses, one 4-byte tag per entry of `tags` (its TPID, VLAN
/// id 100, 101, ...), the ethertype, the payload.
pub fn ethernet(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    for (i, tpid) in tags.iter().enumerate() {
        f.extend(tpid.to_be_bytes());
        f.extend((100 + i as u16).to_be_bytes());
    }
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

/// An IPv4 header.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub proto: u8,
    /// Option bytes, a multiple of 4, at most 40 (padded with end-of-options when not).
    pub options: Vec<u8>,
    /// Fragment offset in 8-byte units (0..8192).
    pub frag_offset: u16,
    pub more_fragments: bool,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, proto: u8) -> Self {
        Self { src, proto, options: Vec::new(), frag_offset: 0, more_fragments: false }
    }

    /// Header length in bytes.
    pub fn header_len(&self) -> usize {
        20 + self.options.len().div_ceil(4) * 4
    }

    /// The header and `payload`, with a total length that matches.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = self.header_len();
        let total = (hlen + payload.len()) as u16;
        let frag = (self.frag_offset & 0x1fff) | if self.more_fragments { 0x2000 } else { 0 };
        let mut h = vec![0x40 | (hlen / 4) as u8, 0];
        h.extend(total.to_be_bytes());
        h.extend([0x12, 0x34]); // identification
        h.extend(frag.to_be_bytes());
        h.extend([64, self.proto, 0, 0]); // ttl, protocol, checksum
        h.extend(self.src.octets());
        h.extend(Ipv4Addr::new(192, 0, 2, 200).octets());
        h.extend(&self.options);
        h.resize(hlen, 0);
        h.extend(payload);
        h
    }
}

/// An IPv6 header with `next` as its next header and `payload` (extension headers and upper
/// layer) after it; the payload length matches.
pub fn ipv6(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload.len() as u16).to_be_bytes());
    h.extend([next, 64]);
    h.extend(src.octets());
    h.extend("2001:db8:ffff::200".parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::LOCALHOST).octets());
    h.extend(payload);
    h
}

/// IPv6 next-header values of the extension headers the program skips.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options, `(units + 1) * 8` bytes.
    HopByHop { units: u8 },
    /// Routing, `(units + 1) * 8` bytes.
    Routing { units: u8 },
    /// Destination options, `(units + 1) * 8` bytes.
    DestOpts { units: u8 },
    /// Fragment (8 bytes); `offset` in 8-byte units.
    Fragment { offset: u16, more: bool },
}

impl Ext {
    pub fn code(self) -> u8 {
        match self {
            Ext::HopByHop { .. } => NEXTHDR_HOP,
            Ext::Routing { .. } => NEXTHDR_ROUTING,
            Ext::DestOpts { .. } => NEXTHDR_DEST,
            Ext::Fragment { .. } => NEXTHDR_FRAGMENT,
        }
    }

    pub fn byte_len(self) -> usize {
        match self {
            Ext::HopByHop { units } | Ext::Routing { units } | Ext::DestOpts { units } => {
                (usize::from(units) + 1) * 8
            }
            Ext::Fragment { .. } => 8,
        }
    }

    /// The header bytes, with `next` as its next header. Options are Pad1 bytes (zeros).
    pub fn build(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop { units } | Ext::Routing { units } | Ext::DestOpts { units } => {
                let mut h = vec![next, units];
                h.resize(self.byte_len(), 0);
                h
            }
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | u16::from(more);
                let mut h = vec![next, 0];
                h.extend(field.to_be_bytes());
                h.extend([0xca, 0xfe, 0xf0, 0x0d]); // identification
                h
            }
        }
    }
}

/// A chain of extension headers ending in `upper`: the next-header value for the IPv6 header
/// and the chain's bytes.
pub fn ext_chain(exts: &[Ext], upper: u8) -> (u8, Vec<u8>) {
    let mut bytes = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(upper, |e| e.code());
        bytes.extend(ext.build(next));
    }
    (exts.first().map_or(upper, |e| e.code()), bytes)
}

/// A TCP header (20 bytes, SYN) to `dst_port`.
pub fn tcp(dst_port: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend(40000u16.to_be_bytes());
    h.extend(dst_port.to_be_bytes());
    h.extend([0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
    h.extend([5 << 4, 0x02]); // data offset 5, SYN
    h.extend([0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent pointer
    h
}

/// A UDP header (8 bytes) to `dst_port`, for a datagram with `payload_len` bytes of data.
pub fn udp(dst_port: u16, payload_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(8);
    h.extend(40000u16.to_be_bytes());
    h.extend(dst_port.to_be_bytes());
    h.extend(((8 + payload_len) as u16).to_be_bytes());
    h.extend([0, 0]);
    h
}

/// An ICMP or ICMPv6 header (8 bytes) of type `ty`.
pub fn icmp(ty: u8) -> Vec<u8> {
    vec![ty, 0, 0, 0, 0, 1, 0, 1]
}

/// An Ethernet frame of IPv4 TCP from `src` to port `port`.
pub fn tcp_frame(src: Ipv4Addr, port: u16) -> Vec<u8> {
    ethernet(&[], ETH_P_IP, &Ipv4::new(src, 6).build(&tcp(port)))
}

/// An Ethernet frame of IPv4 UDP from `src` to port `port`.
pub fn udp_frame(src: Ipv4Addr, port: u16) -> Vec<u8> {
    ethernet(&[], ETH_P_IP, &Ipv4::new(src, 17).build(&udp(port, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_the_fields_the_program_reads() {
        let v4 = Ipv4 {
            options: vec![1, 1, 1],
            frag_offset: 5,
            more_fragments: true,
            ..Ipv4::new(Ipv4Addr::new(10, 0, 0, 1), 6)
        };
        let p = v4.build(&tcp(443));
        assert_eq!(p[0], 0x46); // version 4, IHL 6
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(u16::from_be_bytes([p[6], p[7]]), 0x2005);
        assert_eq!(&p[12..16], &[10, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([p[24 + 2], p[24 + 3]]), 443);

        let (next, chain) =
            ext_chain(&[Ext::HopByHop { units: 1 }, Ext::Fragment { offset: 3, more: false }], 17);
        assert_eq!(next, NEXTHDR_HOP);
        assert_eq!(chain.len(), 24);
        assert_eq!(chain[0], NEXTHDR_FRAGMENT);
        assert_eq!(chain[16], 17);
        assert_eq!(u16::from_be_bytes([chain[18], chain[19]]) >> 3, 3);
        let p = ipv6(Ipv6Addr::LOCALHOST, next, &chain);
        assert_eq!(p[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 24);

        let f = ethernet(&[ETH_P_8021AD, ETH_P_8021Q], ETH_P_IP, &[]);
        assert_eq!(f.len(), ETH_HLEN + 8);
        assert_eq!(&f[12..14], &[0x88, 0xa8]);
        assert_eq!(&f[20..22], &[0x08, 0x00]);
    }
}
