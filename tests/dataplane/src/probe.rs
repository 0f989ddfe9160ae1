//! Flows turned into frames, and what the program must do with each.
//!
//! A flow (the reference evaluator's view: peer, protocol, port or ICMP type) becomes a frame
//! of some [`Shape`]: VLAN tags, IPv4 options, IPv6 extension headers, fragmentation, payload.
//! The shape never changes the verdict, except where the program's documented parsing rules
//! say so: a flow without a port is a non-first fragment (the only packets of those protocols
//! that carry none), and a frame cut short is malformed (dropped). The expectations written
//! here are that contract, stated once:
//! - verdict: `eval::evaluate` (allow and audit-deny pass, deny drops);
//! - counters: the rule (or default) that decided the verdict; for audit-deny also the audit
//!   rule (or audit default) that would have denied, and the audit-deny total;
//! - a frame cut anywhere before its end ("raw" cut, length fields untouched) is malformed when
//!   it is IP, and for ARP as long as the VLAN tags are cut;
//! - a frame whose IP payload is cut with consistent length fields is malformed exactly when
//!   the cut falls inside the extension header chain or the fixed L4 header (TCP 20 bytes, UDP,
//!   ICMP and ICMPv6 8) of a first or unfragmented packet.

use std::net::IpAddr;

use fw_common::{
    STAT_ALWAYS_ARP, STAT_ALWAYS_LOOPBACK, STAT_ALWAYS_ND, STAT_AUDIT_DEFAULT_DENY,
    STAT_AUDIT_DENY, STAT_DEFAULT_ALLOW, STAT_DEFAULT_DENY, STAT_MALFORMED, STAT_NOT_IP,
};
use fw_compiler::eval::evaluate;
use fw_compiler::model::{AlwaysAllowed, Decider, Flow, HostPolicy, Verdict};
use fw_loader::XdpAction;
use proptest::prelude::*;
use proptest::sample::select;

use crate::packet::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Ext, Ipv4, ethernet, ext_chain,
    icmp, ipv6, tcp, udp,
};

/// A counter a frame must add to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Count {
    /// The rule counter of this rule id.
    Rule(u32),
    /// This ingress stats slot (`fw_common::STAT_*`).
    Stat(u32),
}

/// What the program must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expectation {
    pub action: XdpAction,
    pub counts: Vec<Count>,
}

impl Expectation {
    pub fn malformed() -> Self {
        Self { action: XdpAction::Drop, counts: vec![Count::Stat(STAT_MALFORMED)] }
    }

    pub fn not_ip() -> Self {
        Self { action: XdpAction::Pass, counts: vec![Count::Stat(STAT_NOT_IP)] }
    }

    /// What the reference evaluator says about `flow`, as program action and counters.
    /// `enforcing_only` is `policygen::enforcing_only(policy)`.
    pub fn of_flow(policy: &HostPolicy, enforcing_only: &HostPolicy, flow: &Flow) -> Self {
        let outcome = evaluate(policy, flow).outcome;
        let pass = |counts| Self { action: XdpAction::Pass, counts };
        let drop = |counts| Self { action: XdpAction::Drop, counts };
        let decider = |d: Decider, default: u32| match d {
            Decider::Rule(r) => Count::Rule(r.0),
            Decider::Default => Count::Stat(default),
            Decider::Always(a) => panic!("not a policy decision: {a:?}"),
        };
        match (outcome.verdict, outcome.decided_by) {
            (_, Decider::Always(AlwaysAllowed::Arp)) => pass(vec![Count::Stat(STAT_ALWAYS_ARP)]),
            (_, Decider::Always(AlwaysAllowed::NeighbourDiscovery)) => {
                pass(vec![Count::Stat(STAT_ALWAYS_ND)])
            }
            (_, Decider::Always(AlwaysAllowed::Loopback)) => {
                pass(vec![Count::Stat(STAT_ALWAYS_LOOPBACK)])
            }
            (_, Decider::Always(a)) => panic!("new ingress flows are never {a:?}"),
            (Verdict::Deny, by) => drop(vec![decider(by, STAT_DEFAULT_DENY)]),
            (Verdict::Allow, by) => pass(vec![decider(by, STAT_DEFAULT_ALLOW)]),
            (Verdict::AuditDeny, by) => {
                let real = evaluate(enforcing_only, flow).outcome;
                assert_eq!(real.verdict, Verdict::Allow, "audit-deny without an allow verdict");
                pass(vec![
                    decider(real.decided_by, STAT_DEFAULT_ALLOW),
                    Count::Stat(STAT_AUDIT_DENY),
                    decider(by, STAT_AUDIT_DEFAULT_DENY),
                ])
            }
        }
    }
}

/// How a frame truncated copies of a probe get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cuts {
    /// Only the full frame.
    None,
    /// Also the frame cut at every length from the Ethernet header on (length fields left).
    Raw,
    /// Also the IP payload cut at every length, with consistent length fields.
    Consistent,
}

/// Fragmentation of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    None,
    /// The first fragment (offset 0, more fragments).
    First,
    /// A non-first fragment at this offset (8-byte units, 1..8192).
    NonFirst { offset: u16, more: bool },
}

/// Everything about a frame that is not the flow.
#[derive(Clone, Debug)]
pub struct Shape {
    /// VLAN tag TPIDs, outermost first (0 to 2).
    pub tags: Vec<u16>,
    /// IPv4 option bytes (multiple of 4, NOPs).
    pub v4_options: usize,
    /// IPv6 extension headers before the upper layer (and before the fragment header).
    pub v6_ext: Vec<Ext>,
    /// Fragmentation for flows that carry a port (flows without one are always non-first).
    pub frag: Frag,
    /// The offset used when the flow must be a non-first fragment.
    pub nonfirst_offset: u16,
    pub payload: Vec<u8>,
    pub cuts: Cuts,
}

/// A random shape.
pub fn shape() -> impl Strategy<Value = Shape> {
    let tags = prop_oneof![
        6 => Just(vec![]),
        2 => select(vec![vec![ETH_P_8021Q], vec![ETH_P_8021AD]]),
        1 => Just(vec![ETH_P_8021AD, ETH_P_8021Q]),
    ];
    let ext = (0u8..3, 0u8..4).prop_map(|(kind, units)| match kind {
        0 => Ext::HopByHop { units },
        1 => Ext::Routing { units },
        _ => Ext::DestOpts { units },
    });
    let exts = prop_oneof![2 => Just(vec![]), 1 => prop::collection::vec(ext, 1..5)].prop_map(
        |mut v: Vec<Ext>| {
            // Hop-by-hop only first (anywhere else the packet is malformed; frames.rs covers it).
            for e in v.iter_mut().skip(1) {
                if let Ext::HopByHop { units } = *e {
                    *e = Ext::DestOpts { units };
                }
            }
            v
        },
    );
    let frag = prop_oneof![
        6 => Just(Frag::None),
        1 => Just(Frag::First),
        1 => (1u16..8192, any::<bool>()).prop_map(|(offset, more)| Frag::NonFirst { offset, more }),
    ];
    let cuts =
        prop_oneof![8 => Just(Cuts::None), 1 => Just(Cuts::Raw), 1 => Just(Cuts::Consistent)];
    (
        tags,
        prop_oneof![3 => Just(0usize), 1 => (1usize..=10).prop_map(|w| w * 4)],
        exts,
        frag,
        1u16..8192,
        prop::collection::vec(any::<u8>(), 0..40),
        cuts,
    )
        .prop_map(|(tags, v4_options, v6_ext, frag, nonfirst_offset, payload, cuts)| Shape {
            tags,
            v4_options,
            v6_ext,
            frag,
            nonfirst_offset,
            payload,
            cuts,
        })
}

/// The L4 header a flow's packet starts its upper layer with (empty for other protocols).
fn l4_header(flow: &Flow, payload_len: usize) -> Vec<u8> {
    match (flow.proto, flow.port, flow.icmp_type) {
        (6, Some(p), _) => tcp(p),
        (17, Some(p), _) => udp(p, payload_len),
        (1 | 58, _, Some(t)) => icmp(t),
        _ => Vec::new(),
    }
}

/// A flow of tcp/udp without a port, or icmp/icmpv6 without a type, only exists as a
/// non-first fragment.
fn must_be_nonfirst(flow: &Flow) -> bool {
    match flow.proto {
        6 | 17 => flow.port.is_none(),
        1 | 58 => flow.icmp_type.is_none(),
        _ => false,
    }
}

/// A built probe: the frame and, for consistent cuts, how to rebuild it with less IP payload.
pub struct Probe {
    pub frame: Vec<u8>,
    /// Bytes of IP payload (after the IPv4 header or the fixed IPv6 header) the program needs
    /// intact: extension headers plus the fixed L4 header, if any.
    pub required: usize,
    /// Length of the IP payload.
    pub payload_len: usize,
    flow: Flow,
    shape: Shape,
}

impl Probe {
    /// Builds `flow` in `shape`. Not for ARP flows (see [`arp_frame`]).
    pub fn new(flow: &Flow, shape: &Shape) -> Self {
        let (frame, required, payload_len) = Self::build(flow, shape, None);
        Self { frame, required, payload_len, flow: flow.clone(), shape: shape.clone() }
    }

    /// The frame with its IP payload cut to `keep` bytes and the length fields adjusted.
    pub fn consistent_cut(&self, keep: usize) -> Vec<u8> {
        Self::build(&self.flow, &self.shape, Some(keep)).0
    }

    fn build(flow: &Flow, shape: &Shape, keep: Option<usize>) -> (Vec<u8>, usize, usize) {
        let frag = if must_be_nonfirst(flow) {
            Frag::NonFirst {
                offset: shape.nonfirst_offset,
                more: shape.payload.len().is_multiple_of(2),
            }
        } else if matches!(shape.frag, Frag::NonFirst { .. }) && flow_has_l4(flow) {
            // A flow with a port or type is never a non-first fragment.
            Frag::First
        } else {
            shape.frag
        };
        let nonfirst = matches!(frag, Frag::NonFirst { .. });
        let upper = if nonfirst { Vec::new() } else { l4_header(flow, shape.payload.len()) };
        let mut body = upper.clone();
        body.extend(&shape.payload);
        let (v4, required, mut payload) = match flow.peer {
            IpAddr::V4(src) => {
                let (frag_offset, more_fragments) = match frag {
                    Frag::None => (0, false),
                    Frag::First => (0, true),
                    Frag::NonFirst { offset, more } => (offset, more),
                };
                let header = Ipv4 {
                    options: vec![1; shape.v4_options],
                    frag_offset,
                    more_fragments,
                    ..Ipv4::new(src, flow.proto)
                };
                (Some(header), upper.len(), body)
            }
            IpAddr::V6(_) => {
                let mut exts = shape.v6_ext.clone();
                match frag {
                    Frag::None => {}
                    Frag::First => exts.push(Ext::Fragment { offset: 0, more: true }),
                    Frag::NonFirst { offset, more } => exts.push(Ext::Fragment { offset, more }),
                }
                let (_, chain) = ext_chain(&exts, flow.proto);
                let required = chain.len() + upper.len();
                let mut payload = chain;
                payload.extend(body);
                (None, required, payload)
            }
        };
        let payload_len = payload.len();
        if let Some(keep) = keep {
            payload.truncate(keep);
        }
        let frame = match (v4, flow.peer) {
            (Some(v4), _) => ethernet(&shape.tags, ETH_P_IP, &v4.build(&payload)),
            (None, IpAddr::V6(src)) => {
                let exts = shape.v6_ext.iter().copied().chain(match frag {
                    Frag::None => None,
                    Frag::First => Some(Ext::Fragment { offset: 0, more: true }),
                    Frag::NonFirst { offset, more } => Some(Ext::Fragment { offset, more }),
                });
                let first = exts.map(|e| e.code()).next().unwrap_or(flow.proto);
                ethernet(&shape.tags, ETH_P_IPV6, &ipv6(src, first, &payload))
            }
            (None, IpAddr::V4(_)) => unreachable!("IPv4 flows build an IPv4 header"),
        };
        (frame, required, payload_len)
    }

    /// Every raw cut of the frame (lengths from the Ethernet header to one short of the whole)
    /// with its expectation: all malformed, since an IP packet's length no longer fits.
    pub fn raw_cuts(&self) -> impl Iterator<Item = (Vec<u8>, Expectation)> + '_ {
        (crate::packet::ETH_HLEN..self.frame.len())
            .map(|len| (self.frame[..len].to_vec(), Expectation::malformed()))
    }

    /// Every consistent cut of the IP payload with its expectation: malformed while the
    /// required headers are cut, `full` once they are whole.
    pub fn consistent_cuts<'a>(
        &'a self,
        full: &'a Expectation,
    ) -> impl Iterator<Item = (Vec<u8>, Expectation)> + 'a {
        (0..self.payload_len).map(move |keep| {
            let expect = if keep < self.required { Expectation::malformed() } else { full.clone() };
            (self.consistent_cut(keep), expect)
        })
    }
}

fn flow_has_l4(flow: &Flow) -> bool {
    matches!((flow.proto, flow.port, flow.icmp_type), (6 | 17, Some(_), _) | (1 | 58, _, Some(_)))
}

/// An ARP request frame with `tags`.
pub fn arp_frame(tags: &[u16]) -> Vec<u8> {
    let mut body = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    body.extend([0x02, 0, 0, 0, 0, 0x02, 192, 0, 2, 1]);
    body.extend([0, 0, 0, 0, 0, 0, 192, 0, 2, 200]);
    ethernet(tags, ETH_P_ARP, &body)
}

/// Raw cuts of an ARP frame: malformed while a VLAN tag is cut, ARP after.
pub fn arp_cuts(tags: &[u16], full: &Expectation) -> Vec<(Vec<u8>, Expectation)> {
    let frame = arp_frame(tags);
    let visible = crate::packet::ETH_HLEN + 4 * tags.len();
    (crate::packet::ETH_HLEN..frame.len())
        .map(|len| {
            let e = if len < visible { Expectation::malformed() } else { full.clone() };
            (frame[..len].to_vec(), e)
        })
        .collect()
}
