//! The typed syntax tree of fw/v1 documents.
//!
//! Values here are checked for shape and for local validity (a CIDR parses and has no host bits
//! set, a port range is ordered), but not for cross-document meaning: set references, name
//! uniqueness and host selection are `resolve`'s job. Everything keeps its span so later stages
//! can point back at the source. The JSON Schema is generated from the `schema` module, which
//! mirrors these types.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::source::{Sp, Span};

/// One document of a policy file.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    AddressSet(AddressSet),
    Policy(Policy),
    PolicyTest(PolicyTest),
}

impl Document {
    pub fn metadata(&self) -> &Metadata {
        match self {
            Document::AddressSet(d) => &d.metadata,
            Document::Policy(d) => &d.metadata,
            Document::PolicyTest(d) => &d.metadata,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Document::AddressSet(_) => Kind::AddressSet,
            Document::Policy(_) => Kind::Policy,
            Document::PolicyTest(_) => Kind::PolicyTest,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    AddressSet,
    Policy,
    PolicyTest,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::AddressSet, Kind::Policy, Kind::PolicyTest];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AddressSet => "AddressSet",
            Kind::Policy => "Policy",
            Kind::PolicyTest => "PolicyTest",
        }
    }
}

/// The apiVersions this build understands.
pub const API_VERSIONS: &[&str] = &["fw/v1"];

#[derive(Clone, Debug, PartialEq)]
pub struct Metadata {
    pub name: Sp<String>,
    pub description: Option<String>,
    /// The span of the whole document (its first key), for "defined here" labels.
    pub document: Span,
}

/// One item of an address list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressItem {
    /// A CIDR, or a bare IP (stored as /32 or /128).
    Net(IpNet),
    /// `{set: NAME}`: the addresses of another AddressSet.
    Set(Sp<String>),
    /// `any`: every IPv4 and IPv6 address. Allowed in rule `from`/`to`, not in AddressSets.
    Any,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AddressSet {
    pub metadata: Metadata,
    /// Non-empty (checked by `lower`).
    pub addresses: Vec<Sp<AddressItem>>,
    pub except: Vec<Sp<AddressItem>>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// `proto:` of a rule or a test case.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Proto {
    /// IANA protocol number; `None` for `any`.
    pub fn number(self) -> Option<u8> {
        match self {
            Proto::Any => None,
            Proto::Tcp => Some(6),
            Proto::Udp => Some(17),
            Proto::Icmp => Some(1),
            Proto::Icmpv6 => Some(58),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp)
    }

    pub fn is_icmp(self) -> bool {
        matches!(self, Proto::Icmp | Proto::Icmpv6)
    }
}

/// An inclusive port range; a single port has `start == end`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSelector {
    /// Every label must be present with this value.
    pub labels: BTreeMap<String, Sp<String>>,
    /// Globs (`*`, `?`, `[...]`) on the host name; any may match. Empty = any name.
    pub names: Vec<Sp<String>>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Defaults {
    pub ingress: Option<Sp<Action>>,
    pub egress: Option<Sp<Action>>,
}

impl Defaults {
    pub fn get(&self, direction: Direction) -> Option<Sp<Action>> {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub metadata: Metadata,
    /// `None`: every host.
    pub hosts: Option<HostSelector>,
    pub mode: Mode,
    pub defaults: Defaults,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The span of the rule (its first key), used as the rule's file:line.
    pub span: Span,
    pub name: Option<Sp<String>>,
    pub action: Sp<Action>,
    /// `from` on ingress, `to` on egress. `None` (absent) means any.
    pub peers: Option<Vec<Sp<AddressItem>>>,
    pub proto: Sp<Proto>,
    /// Destination ports; only with tcp or udp. Empty = every port.
    pub ports: Vec<Sp<PortRange>>,
    /// ICMP or ICMPv6 types; only with icmp or icmpv6. Empty = every type.
    pub icmp: Vec<Sp<u8>>,
    pub log: bool,
    /// Normalised cgroup v2 paths without leading or trailing `/` (egress only). Empty = every
    /// process.
    pub workloads: Vec<Sp<String>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PolicyTest {
    pub metadata: Metadata,
    pub host: TestHost,
    pub cases: Vec<TestCase>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestHost {
    pub name: Sp<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    Allow,
    Deny,
    /// Allowed, but an audit-mode policy would have denied it.
    AuditDeny,
}

impl Expect {
    pub fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
            Expect::AuditDeny => "audit-deny",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCase {
    pub span: Span,
    pub direction: Direction,
    /// `from` (ingress) or `to` (egress).
    pub peer: Sp<std::net::IpAddr>,
    pub proto: Proto,
    pub port: Option<u16>,
    pub icmp: Option<u8>,
    /// Normalised cgroup path; `None` is a process in the root cgroup.
    pub workload: Option<String>,
    pub expect: Sp<Expect>,
}
