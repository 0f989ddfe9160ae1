//! The resolved policy for one host, and what is evaluated against it.
//!
//! `resolve` turns documents into these types: set references are linked, host selectors are
//! applied, every rule has a stable id. Both the reference evaluator (`eval`) and the compiler
//! (`compile`) start from here, so they read the same rules, but they share no matching code:
//! the evaluator checks each rule directly, the compiler flattens everything into map entries,
//! and tests hold the two against each other.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::ast::{Action, Direction, Mode, PortRange, Proto};
use crate::source::{Location, Span};

/// The host a policy is compiled for.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct HostIdentity {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A rule's id: stable while the rule's policy, direction and name (or index, for unnamed rules)
/// stay the same, so counters and map entries of unchanged rules survive an update. Never 0.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct RuleId(pub u32);

/// A term of an address list after set references are linked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrTerm {
    Any,
    Net(IpNet),
    Set(Arc<ResolvedSet>),
}

/// An AddressSet with its references linked (cycles are rejected before this exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedSet {
    pub name: String,
    pub addresses: Vec<AddrTerm>,
    pub except: Vec<AddrTerm>,
}

impl AddrTerm {
    /// Whether the address is in this term. The plain definition: in a set when in one of its
    /// addresses and in none of its excepts.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            AddrTerm::Any => true,
            AddrTerm::Net(net) => net.contains(&ip),
            AddrTerm::Set(set) => {
                set.addresses.iter().any(|t| t.contains(ip))
                    && !set.except.iter().any(|t| t.contains(ip))
            }
        }
    }
}

/// One rule of one policy that applies to this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRule {
    pub id: RuleId,
    pub direction: Direction,
    pub policy: String,
    /// Position in the policy's `ingress` or `egress` list, from 0.
    pub index: u32,
    pub name: Option<String>,
    pub action: Action,
    pub mode: Mode,
    pub log: bool,
    /// `from` (ingress) or `to` (egress); the rule matches an address in any term.
    pub peers: Vec<AddrTerm>,
    pub proto: Proto,
    /// Empty = every port.
    pub ports: Vec<PortRange>,
    /// Empty = every type.
    pub icmp: Vec<u8>,
    /// Normalised cgroup paths (no leading or trailing `/`); empty = every process.
    pub workloads: Vec<String>,
    pub span: Span,
    pub location: Location,
}

impl ResolvedRule {
    pub fn enforcing(&self) -> bool {
        self.mode == Mode::Enforce
    }

    /// `name` if given, else `#index`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("#{}", self.index),
        }
    }
}

/// The default of one direction, and which policy made it deny.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionDefault {
    /// Deny if an enforcing policy sets `defaults.<direction>: deny`.
    pub verdict: Action,
    /// As if audit policies were enforcing: deny if any policy sets deny.
    pub audit: Action,
    /// The first policy (by name) that sets deny in enforce mode, then in audit mode.
    pub verdict_policy: Option<String>,
    pub audit_policy: Option<String>,
}

impl Default for DirectionDefault {
    fn default() -> Self {
        Self {
            verdict: Action::Allow,
            audit: Action::Allow,
            verdict_policy: None,
            audit_policy: None,
        }
    }
}

/// Everything that applies to one host: the rules of the matching policies, sorted by
/// (policy name, direction, index), and the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPolicy {
    pub host: HostIdentity,
    pub rules: Vec<ResolvedRule>,
    pub ingress_default: DirectionDefault,
    pub egress_default: DirectionDefault,
    /// Names of the policies that apply, sorted.
    pub policies: Vec<String>,
}

impl HostPolicy {
    pub fn default_for(&self, direction: Direction) -> &DirectionDefault {
        match direction {
            Direction::Ingress => &self.ingress_default,
            Direction::Egress => &self.egress_default,
        }
    }

    pub fn rules(&self, direction: Direction) -> impl Iterator<Item = &ResolvedRule> {
        self.rules.iter().filter(move |r| r.direction == direction)
    }

    pub fn rule(&self, id: RuleId) -> Option<&ResolvedRule> {
        self.rules.iter().find(|r| r.id == id)
    }
}

/// Connection-tracking state of a packet, as the data plane sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// Not part of anything the host started.
    #[default]
    New,
    /// A reply to a connection or datagram the host initiated.
    Reply,
    /// An ICMP/ICMPv6 error about a connection or datagram the host initiated.
    Related,
}

/// A packet (ingress) or a connection/datagram (egress) to decide.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub direction: Direction,
    /// The remote address: the source on ingress, the destination on egress.
    pub peer: IpAddr,
    /// IANA protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6, anything else).
    pub proto: u8,
    /// Destination port for tcp and udp; `None` when the packet carries none (a non-first
    /// fragment), so only rules without ports can match it.
    pub port: Option<u16>,
    /// ICMP or ICMPv6 type.
    pub icmp_type: Option<u8>,
    /// Egress: the process's cgroup path, normalised; `None` is the root cgroup.
    pub workload: Option<String>,
    pub state: FlowState,
    /// Arrived on or sent to the loopback interface.
    pub loopback: bool,
    /// An ARP packet (ingress); then `peer`, `proto` and ports are ignored.
    pub arp: bool,
}

impl Flow {
    pub fn new(direction: Direction, peer: IpAddr, proto: u8) -> Self {
        Self {
            direction,
            peer,
            proto,
            port: None,
            icmp_type: None,
            workload: None,
            state: FlowState::New,
            loopback: false,
            arp: false,
        }
    }
}

/// The final verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed, but audit-mode policies would have denied it: counted and logged.
    AuditDeny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::AuditDeny => "audit-deny",
        }
    }
}

/// Why a flow is allowed whatever the policy says (semantics rule 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlwaysAllowed {
    Loopback,
    Reply,
    RelatedIcmpError,
    Arp,
    NeighbourDiscovery,
}

/// What decided a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decider {
    Rule(RuleId),
    Default,
    Always(AlwaysAllowed),
}

/// The result of evaluating one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// For allow and deny: the deciding rule (first deny in (policy, index) order, else first
    /// allow), the default, or an always-allowed reason. For audit-deny: the rule or default
    /// that would have denied.
    pub decided_by: Decider,
}

/// What the reference evaluator adds for `explain`: every rule that matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub outcome: Outcome,
    /// Every matching rule, enforcing and audit, in (policy, index) order.
    pub matched: Vec<RuleId>,
}

/// Neighbour discovery ICMPv6 types (router solicitation/advertisement, neighbour
/// solicitation/advertisement, redirect): always allowed so IPv6 keeps working.
pub const ND_TYPES: [u8; 5] = [133, 134, 135, 136, 137];

/// ICMP error types that relate to an existing flow: destination unreachable (3, includes
/// fragmentation needed), time exceeded (11), parameter problem (12).
pub const ICMP_ERROR_TYPES: [u8; 3] = [3, 11, 12];
/// ICMPv6 error types: destination unreachable (1), packet too big (2), time exceeded (3),
/// parameter problem (4).
pub const ICMPV6_ERROR_TYPES: [u8; 4] = [1, 2, 3, 4];

/// Semantics rule 5: flows allowed whatever the policy says. One function, used by the evaluator
/// and by the compiled-lookup model, because it is not policy but protocol necessity; the
/// kernel programs implement the same list.
pub fn always_allowed(flow: &Flow) -> Option<AlwaysAllowed> {
    if flow.loopback || flow.peer.is_loopback() {
        return Some(AlwaysAllowed::Loopback);
    }
    if flow.direction != Direction::Ingress {
        return None;
    }
    if flow.arp {
        return Some(AlwaysAllowed::Arp);
    }
    if flow.proto == 58 && flow.icmp_type.is_some_and(|t| ND_TYPES.contains(&t)) {
        return Some(AlwaysAllowed::NeighbourDiscovery);
    }
    match flow.state {
        FlowState::Reply => Some(AlwaysAllowed::Reply),
        FlowState::Related => {
            let is_error = match flow.proto {
                1 => flow.icmp_type.is_some_and(|t| ICMP_ERROR_TYPES.contains(&t)),
                58 => flow.icmp_type.is_some_and(|t| ICMPV6_ERROR_TYPES.contains(&t)),
                _ => false,
            };
            is_error.then_some(AlwaysAllowed::RelatedIcmpError)
        }
        FlowState::New => None,
    }
}
