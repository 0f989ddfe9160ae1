//! The JSON Schema of fw/v1 documents, for editors and CI.
//!
//! The schema is generated with schemars from the mirror types below instead of from `ast`:
//! the AST holds parsed values with spans (an `IpNet`, a `Sp<u8>`), while the schema must
//! describe what a person writes (a CIDR string, an ICMP type name or number). The mirror types
//! exist only for this; nothing deserializes into them, since `lower` reads documents and gives
//! better errors. Doc comments become the descriptions an editor shows on hover, so they are
//! written for the policy author.
//!
//! The schema is deliberately a little looser than `lower` where JSON Schema cannot say
//! something simply (a CIDR without host bits, a reversed port range, ICMP names per protocol);
//! `lower` is the authority. A checked-in copy lives at `schemas/fw-v1.schema.json`, and a test
//! keeps it equal to [`json_schema`].

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings, json_schema};

use crate::lower::{ICMP_TYPES, ICMPV6_TYPES};

/// The `$id` of the schema.
pub const SCHEMA_ID: &str = "https://fw.example.invalid/schemas/fw-v1.schema.json";

const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]*$";
const LABEL_KEY_PATTERN: &str = "^[A-Za-z0-9._/-]+$";
const LABEL_VALUE_PATTERN: &str = "^[A-Za-z0-9._-]*$";
/// Characters of IPv4 and IPv6 addresses, with an optional prefix length. `lower` checks that
/// the address really parses.
const CIDR_PATTERN: &str = "^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$";
const IP_PATTERN: &str = "^[0-9A-Fa-f:.]+$";
const PORT_PATTERN: &str = "^[0-9]{1,5}(-[0-9]{1,5})?$";
const GLOB_PATTERN: &str = r"^([A-Za-z0-9._*?-]|\[[A-Za-z0-9._-]+\])+$";
const WORKLOAD_PATTERN: &str = "^/?[^/]+(/[^/]+)*/?$";

/// The JSON Schema (draft 2020-12) of one fw/v1 document.
pub fn json_schema() -> serde_json::Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = generator.into_root_schema_for::<Document>();
    schema.insert("$id".into(), SCHEMA_ID.into());
    schema.insert("title".into(), "fw/v1 policy document".into());
    let mut value = schema.to_value();
    unwrap_descriptions(&mut value);
    value
}

/// Doc comments are wrapped at 100 columns; editors show descriptions as flowing text, so a
/// single line break becomes a space (a blank line, a paragraph break, stays).
fn unwrap_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(s) if key == "description" => {
                        *s = s
                            .split("\n\n")
                            .map(|p| p.replace('\n', " "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => unwrap_descriptions(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// One document of an fw/v1 policy file. A file holds any number of documents separated by
/// `---`; `kind` says which one this is.
#[derive(JsonSchema)]
#[serde(tag = "kind", deny_unknown_fields)]
#[allow(dead_code)]
enum Document {
    /// A named list of addresses that rules and other sets refer to with `{set: NAME}`.
    AddressSet {
        #[serde(rename = "apiVersion")]
        api_version: ApiVersion,
        metadata: Metadata,
        spec: AddressSetSpec,
    },
    /// Rules for the hosts that the policy selects.
    Policy {
        #[serde(rename = "apiVersion")]
        api_version: ApiVersion,
        metadata: Metadata,
        spec: PolicySpec,
    },
    /// Test cases: packets and the verdict the policy set must give them on one host.
    PolicyTest {
        #[serde(rename = "apiVersion")]
        api_version: ApiVersion,
        metadata: Metadata,
        spec: PolicyTestSpec,
    },
}

/// The version of the policy language.
#[derive(JsonSchema)]
#[allow(dead_code)]
enum ApiVersion {
    #[serde(rename = "fw/v1")]
    V1,
}

/// A name: letters, digits, `.`, `_` and `-`, starting with a letter or digit.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct Name(#[schemars(pattern(NAME_PATTERN))] String);

/// Identifies the document.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Metadata {
    /// Unique among the documents of the same kind.
    name: Name,
    /// Free text for people.
    #[serde(default)]
    #[schemars(with = "String")]
    description: Absent,
}

/// A marker for optional fields: schemars describes `Option<T>` as "T or null", but a field
/// that is present must have a value, so optional fields use `#[serde(default)]` with this
/// type and `#[schemars(with = "T")]`.
#[derive(Default)]
struct Absent;

#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct AddressSetSpec {
    /// The addresses of the set: CIDRs, single IPs and other sets.
    #[schemars(length(min = 1))]
    addresses: Vec<SetAddress>,
    /// Addresses taken out of the set again.
    #[serde(default)]
    #[schemars(with = "Vec<SetAddress>", length(min = 1))]
    except: Absent,
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) with no bits set after the prefix, or a single IP
/// address (`192.0.2.1`, `2001:db8::1`).
#[derive(JsonSchema)]
#[allow(dead_code)]
struct Cidr(#[schemars(pattern(CIDR_PATTERN))] String);

/// The addresses of another AddressSet.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SetRef {
    /// The name of the AddressSet.
    set: Name,
}

/// An item of an AddressSet: a CIDR, an IP or `{set: NAME}`.
struct SetAddress;

impl JsonSchema for SetAddress {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SetAddress".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A CIDR, a single IP address or `{set: NAME}`. `any` is not allowed in an AddressSet.",
            "oneOf": [generator.subschema_for::<Cidr>(), generator.subschema_for::<SetRef>()]
        })
    }
}

/// An item of a rule's `from` or `to`: `any`, a CIDR, an IP or `{set: NAME}`.
struct PeerAddress;

impl JsonSchema for PeerAddress {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PeerAddress".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "`any` (every IPv4 and IPv6 address), a CIDR, a single IP address or `{set: NAME}`.",
            "oneOf": [
                {"const": "any"},
                generator.subschema_for::<Cidr>(),
                generator.subschema_for::<SetRef>()
            ]
        })
    }
}

#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PolicySpec {
    /// Which hosts the policy applies to; absent means every host.
    #[serde(default)]
    #[schemars(with = "HostSelector")]
    hosts: Absent,
    /// `enforce` (the default) or `audit`.
    #[serde(default)]
    #[schemars(with = "Mode")]
    mode: Absent,
    /// The verdict for traffic that no rule decides, per direction. A direction's default is
    /// deny if any enforcing policy for the host says deny.
    #[serde(default)]
    #[schemars(with = "Defaults")]
    defaults: Absent,
    /// Rules for packets arriving at the host.
    #[serde(default)]
    #[schemars(with = "Vec<IngressRule>")]
    ingress: Absent,
    /// Rules for connections and datagrams sent by local processes.
    #[serde(default)]
    #[schemars(with = "Vec<EgressRule>")]
    egress: Absent,
}

/// Selects hosts: a host matches when it has every label and, if `names` is given, its name
/// matches one of the globs.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct HostSelector {
    /// Labels the host must carry, with these values.
    #[serde(default)]
    #[schemars(with = "Labels")]
    labels: Absent,
    /// Host name globs; `*` matches any characters, `?` one character, `[...]` one character
    /// of a set such as `[0-9]`.
    #[serde(default)]
    #[schemars(with = "Vec<Glob>", length(min = 1))]
    names: Absent,
}

/// Host labels: names of letters, digits, `.`, `_`, `/` and `-`; values of letters, digits,
/// `.`, `_` and `-`.
#[derive(JsonSchema)]
#[schemars(extend("propertyNames" = {"pattern": LABEL_KEY_PATTERN}))]
#[allow(dead_code)]
struct Labels(BTreeMap<String, LabelValue>);

/// A label value.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct LabelValue(#[schemars(pattern(LABEL_VALUE_PATTERN))] String);

/// A host name glob.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct Glob(#[schemars(pattern(GLOB_PATTERN))] String);

/// Whether the policy's rules decide verdicts.
#[derive(JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
enum Mode {
    /// The rules allow and deny (the default).
    Enforce,
    /// The rules only count and log what they would do; they never drop traffic.
    Audit,
}

/// What a rule or a default does.
#[derive(JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
enum Action {
    Allow,
    Deny,
}

#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Defaults {
    /// Default for arriving packets; allow if no enforcing policy says deny.
    #[serde(default)]
    #[schemars(with = "Action")]
    ingress: Absent,
    /// Default for outgoing traffic; allow if no enforcing policy says deny.
    #[serde(default)]
    #[schemars(with = "Action")]
    egress: Absent,
}

/// A protocol a rule matches.
#[derive(JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
enum Proto {
    /// Every protocol (the default).
    Any,
    Tcp,
    Udp,
    /// ICMP for IPv4.
    Icmp,
    /// ICMP for IPv6.
    Icmpv6,
}

/// A destination port (1-65535), or a range written as a string such as `"8000-8100"`.
struct Port;

impl JsonSchema for Port {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Port".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A destination port (1-65535), or a range such as \"8000-8100\" (start not above end).",
            "oneOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": PORT_PATTERN}
            ]
        })
    }
}

/// A test packet's destination port.
struct CasePort;

impl JsonSchema for CasePort {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CasePort".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A destination port, 1-65535.",
            "oneOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": "^[0-9]{1,5}$"}
            ]
        })
    }
}

/// An ICMP or ICMPv6 type, by name or number.
struct IcmpType;

impl JsonSchema for IcmpType {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IcmpType".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut names: Vec<&str> = ICMP_TYPES.iter().chain(ICMPV6_TYPES).map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        json_schema!({
            "description": "An ICMP type (with proto icmp) or ICMPv6 type (with proto icmpv6): a name or a number 0-255. Names depend on the protocol; for example neighbor-solicitation is ICMPv6 only.",
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 255},
                {"type": "string", "enum": names},
                {"type": "string", "pattern": "^[0-9]{1,3}$"}
            ]
        })
    }
}

/// A cgroup v2 path below /sys/fs/cgroup, such as `system.slice/app.service`; the process and
/// its descendants match. No empty, `.` or `..` segments.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct Workload(#[schemars(pattern(WORKLOAD_PATTERN))] String);

/// `ports` need proto tcp or udp, `icmp` needs proto icmp or icmpv6.
fn rule_constraints(schema: &mut Schema) {
    proto_constraints(schema, "ports");
}

/// A test case's `port` needs proto tcp or udp, `icmp` needs proto icmp or icmpv6.
fn case_constraints(schema: &mut Schema) {
    proto_constraints(schema, "port");
}

fn proto_constraints(schema: &mut Schema, ports: &str) {
    schema.insert(
        "allOf".into(),
        serde_json::json!([
            {
                "if": {"required": [ports]},
                "then": {"required": ["proto"], "properties": {"proto": {"enum": ["tcp", "udp"]}}}
            },
            {
                "if": {"required": ["icmp"]},
                "then": {"required": ["proto"], "properties": {"proto": {"enum": ["icmp", "icmpv6"]}}}
            }
        ]),
    );
}

/// A rule for arriving packets. The rule matches a packet that fits every field given.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = rule_constraints)]
#[allow(dead_code)]
struct IngressRule {
    /// Unique within the policy; shown in logs, counters and `explain`.
    #[serde(default)]
    #[schemars(with = "Name")]
    name: Absent,
    action: Action,
    /// Senders; absent means any.
    #[serde(default)]
    #[schemars(with = "Vec<PeerAddress>", length(min = 1))]
    from: Absent,
    /// Absent means any.
    #[serde(default)]
    #[schemars(with = "Proto")]
    proto: Absent,
    /// Destination ports; only with proto tcp or udp. Absent means every port.
    #[serde(default)]
    #[schemars(with = "Vec<Port>", length(min = 1))]
    ports: Absent,
    /// ICMP types; only with proto icmp or icmpv6. Absent means every type.
    #[serde(default)]
    #[schemars(with = "Vec<IcmpType>", length(min = 1))]
    icmp: Absent,
    /// Emit an event when this rule decides a verdict (default false).
    #[serde(default)]
    #[schemars(with = "bool")]
    log: Absent,
}

/// A rule for connections and datagrams sent by local processes.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = rule_constraints)]
#[allow(dead_code)]
struct EgressRule {
    /// Unique within the policy; shown in logs, counters and `explain`.
    #[serde(default)]
    #[schemars(with = "Name")]
    name: Absent,
    action: Action,
    /// Destinations; absent means any.
    #[serde(default)]
    #[schemars(with = "Vec<PeerAddress>", length(min = 1))]
    to: Absent,
    /// Absent means any.
    #[serde(default)]
    #[schemars(with = "Proto")]
    proto: Absent,
    /// Destination ports; only with proto tcp or udp. Absent means every port.
    #[serde(default)]
    #[schemars(with = "Vec<Port>", length(min = 1))]
    ports: Absent,
    /// ICMP types; only with proto icmp or icmpv6. Absent means every type.
    #[serde(default)]
    #[schemars(with = "Vec<IcmpType>", length(min = 1))]
    icmp: Absent,
    /// Emit an event when this rule decides a verdict (default false).
    #[serde(default)]
    #[schemars(with = "bool")]
    log: Absent,
    /// Cgroup v2 paths of the sending processes (descendants included); absent means every
    /// process.
    #[serde(default)]
    #[schemars(with = "Vec<Workload>", length(min = 1))]
    workloads: Absent,
}

#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PolicyTestSpec {
    /// The host the cases run on: policies are selected by its name and labels.
    host: TestHost,
    /// Packets and the verdict each must get.
    cases: Vec<TestCase>,
}

#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TestHost {
    /// The host name.
    name: Name,
    /// The host's labels.
    #[serde(default)]
    #[schemars(with = "Labels")]
    labels: Absent,
}

/// A single IP address.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct Ip(#[schemars(pattern(IP_PATTERN))] String);

/// The protocol of a test packet.
#[derive(JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
enum CaseProto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

/// The verdict a test case expects.
#[derive(JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
enum Expect {
    Allow,
    Deny,
    /// Allowed, but an audit-mode policy would have denied it.
    AuditDeny,
}

/// One packet (ingress) or connection (egress) and the verdict it must get.
#[derive(JsonSchema)]
#[serde(tag = "direction", rename_all = "kebab-case", deny_unknown_fields)]
#[schemars(transform = case_constraints)]
#[allow(dead_code)]
enum TestCase {
    /// A packet arriving at the host.
    Ingress {
        /// The sender.
        from: Ip,
        proto: CaseProto,
        /// Destination port (tcp and udp only); absent for a packet without one, such as a
        /// non-first fragment.
        #[serde(default)]
        #[schemars(with = "CasePort")]
        port: Absent,
        /// ICMP or ICMPv6 type (icmp and icmpv6 only).
        #[serde(default)]
        #[schemars(with = "IcmpType")]
        icmp: Absent,
        expect: Expect,
    },
    /// A connection or datagram sent by a local process.
    Egress {
        /// The destination.
        to: Ip,
        proto: CaseProto,
        /// Destination port (tcp and udp only).
        #[serde(default)]
        #[schemars(with = "CasePort")]
        port: Absent,
        /// ICMP or ICMPv6 type (icmp and icmpv6 only).
        #[serde(default)]
        #[schemars(with = "IcmpType")]
        icmp: Absent,
        /// The sending process's cgroup path; absent means a process in the root cgroup.
        #[serde(default)]
        #[schemars(with = "Workload")]
        workload: Absent,
        expect: Expect,
    },
}
