//! YAML nodes to the typed AST, with every problem reported.
//!
//! Why a hand-written walk and not serde: serde stops at the first error and cannot say where a
//! duplicate key was first defined, and we want a user to fix a whole file in one round. So each
//! lowering function checks one shape, reports what is wrong as a [`Diagnostic`] and returns
//! `None` for the part it could not build, while its siblings carry on. A document with any
//! error is dropped (later stages only see documents that are whole); other documents of the
//! same file still lower.
//!
//! Mappings are read through one helper, [`Cx::fields`], that takes the list of known fields,
//! so unknown fields ("did you mean ...?"), duplicate keys (both spans) and keys that are not
//! strings are reported the same way everywhere, once. Checks here are local to one value: a
//! CIDR parses and has no host bits set, a port range is ordered, an ICMP name exists for its
//! protocol. Set references, name uniqueness across documents and host selection are
//! `resolve`'s job. The one cross-value check done here is rule-name uniqueness inside a
//! policy, since everything it needs is in the document.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::ast::{
    API_VERSIONS, Action, AddressItem, AddressSet, Defaults, Direction, Document, Expect,
    HostSelector, Kind, Metadata, Mode, Policy, PolicyTest, PortRange, Proto, Rule, TestCase,
    TestHost,
};
use crate::diag::{Code, Diagnostic, Severity};
use crate::source::{Sp, Span};
use crate::yaml::{Node, NodeKind};

/// ICMP (IPv4) type names accepted in `icmp:`, with their numbers.
pub const ICMP_TYPES: &[(&str, u8)] = &[
    ("echo-reply", 0),
    ("destination-unreachable", 3),
    ("source-quench", 4),
    ("redirect", 5),
    ("echo-request", 8),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp-request", 13),
    ("timestamp-reply", 14),
];

/// ICMPv6 type names accepted in `icmp:`, with their numbers.
pub const ICMPV6_TYPES: &[(&str, u8)] = &[
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", 128),
    ("echo-reply", 129),
    ("router-solicitation", 133),
    ("router-advertisement", 134),
    ("neighbor-solicitation", 135),
    ("neighbor-advertisement", 136),
    ("redirect", 137),
];

const DOCUMENT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const METADATA_FIELDS: &[&str] = &["name", "description"];
const ADDRESS_SET_FIELDS: &[&str] = &["addresses", "except"];
const POLICY_FIELDS: &[&str] = &["hosts", "mode", "defaults", "ingress", "egress"];
const HOSTS_FIELDS: &[&str] = &["labels", "names"];
const DEFAULTS_FIELDS: &[&str] = &["ingress", "egress"];
/// Every field a rule may have in one direction or the other; which direction allows which is
/// checked after, so a misplaced `to` is "not allowed here" (FW023), not "unknown" (FW003).
const RULE_FIELDS: &[&str] =
    &["name", "action", "from", "to", "proto", "ports", "icmp", "log", "workloads"];
const SET_REF_FIELDS: &[&str] = &["set"];
const POLICY_TEST_FIELDS: &[&str] = &["host", "cases"];
const TEST_HOST_FIELDS: &[&str] = &["name", "labels"];
const CASE_FIELDS: &[&str] =
    &["direction", "from", "to", "proto", "port", "icmp", "workload", "expect"];

const KINDS: &[(&str, Kind)] =
    &[("AddressSet", Kind::AddressSet), ("Policy", Kind::Policy), ("PolicyTest", Kind::PolicyTest)];
const MODES: &[(&str, Mode)] = &[("enforce", Mode::Enforce), ("audit", Mode::Audit)];
const ACTIONS: &[(&str, Action)] = &[("allow", Action::Allow), ("deny", Action::Deny)];
const DIRECTIONS: &[(&str, Direction)] =
    &[("ingress", Direction::Ingress), ("egress", Direction::Egress)];
const PROTOS: &[(&str, Proto)] = &[
    ("tcp", Proto::Tcp),
    ("udp", Proto::Udp),
    ("icmp", Proto::Icmp),
    ("icmpv6", Proto::Icmpv6),
    ("any", Proto::Any),
];
/// A test case describes one concrete packet, so `any` is not a protocol it can have.
const CASE_PROTOS: &[(&str, Proto)] =
    &[("tcp", Proto::Tcp), ("udp", Proto::Udp), ("icmp", Proto::Icmp), ("icmpv6", Proto::Icmpv6)];
/// Words other firewalls use, and ours: `drop` suggests `deny`, and so on.
const SYNONYMS: &[(&str, &str)] = &[
    ("drop", "deny"),
    ("reject", "deny"),
    ("block", "deny"),
    ("denied", "deny"),
    ("permit", "allow"),
    ("accept", "allow"),
    ("pass", "allow"),
    ("allowed", "allow"),
    ("in", "ingress"),
    ("input", "ingress"),
    ("inbound", "ingress"),
    ("out", "egress"),
    ("output", "egress"),
    ("outbound", "egress"),
    ("monitor", "audit"),
    ("dry-run", "audit"),
    ("log", "audit"),
    ("all", "any"),
    ("ipv6-icmp", "icmpv6"),
    ("icmp6", "icmpv6"),
];
const EXPECTS: &[(&str, Expect)] =
    &[("allow", Expect::Allow), ("deny", Expect::Deny), ("audit-deny", Expect::AuditDeny)];

type AddressList = Vec<Sp<AddressItem>>;

/// Mappings with at most this many entries check for duplicate keys by a linear scan, which
/// beats hashing at this size; larger ones use a hash map.
const SMALL_MAPPING: usize = 16;

/// Lowers the documents of one file (as returned by [`crate::yaml::parse`]).
///
/// Returns the documents that lowered without error, in file order, and every diagnostic.
pub fn lower(nodes: &[Node]) -> (Vec<Document>, Vec<Diagnostic>) {
    let mut cx = Cx::default();
    let mut documents = Vec::new();
    for node in nodes {
        let errors_before = cx.errors();
        let document = cx.document(node);
        if cx.errors() == errors_before
            && let Some(document) = document
        {
            documents.push(document);
        }
    }
    (documents, cx.diags)
}

/// Whether a metadata name, rule name or set reference is well formed: letters, digits, `.`,
/// `_` and `-`, starting with a letter or digit. Names end up in rule ids (`policy/ingress/rule`)
/// and in command-line output, so no `/`, spaces or `#`.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Normalises a cgroup v2 path as written in `workloads:` or a test case's `workload:`:
/// leading and trailing `/` are dropped (`/system.slice/app.service/` and
/// `system.slice/app.service` are the same cgroup). Paths that could not name one cgroup are
/// rejected with the reason: empty, `//`, `.` or `..` segments, NUL or other control
/// characters.
pub fn normalise_workload(raw: &str) -> Result<String, String> {
    if raw.contains('\0') {
        return Err("contains a NUL character".into());
    }
    if raw.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    if raw.contains("//") {
        return Err("contains an empty path segment (`//`)".into());
    }
    let path = raw.strip_prefix('/').unwrap_or(raw);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return Err("is empty (the root cgroup)".into());
    }
    if let Some(seg) = path.split('/').find(|s| *s == "." || *s == "..") {
        return Err(format!("contains a `{seg}` segment"));
    }
    Ok(path.to_string())
}

/// Checks a host name glob: host name characters (letters, digits, `.`, `_`, `-`) and the
/// wildcards `*` (any run of characters), `?` (one character) and `[...]` (one character of a
/// set such as `[abc]` or `[0-9]`; no negation, no nesting). Returns what is wrong.
pub fn check_glob(glob: &str) -> Result<(), String> {
    if glob.is_empty() {
        return Err("is empty".into());
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' | '?' => {}
            '[' => {
                let mut class = Vec::new();
                loop {
                    match chars.next() {
                        None => return Err("has a `[` without a closing `]`".into()),
                        Some(']') => break,
                        Some('[') => return Err("has a `[` inside `[...]`".into()),
                        Some(c) if name_char(c) => class.push(c),
                        Some(c) => return Err(format!("has {c:?} inside `[...]`")),
                    }
                }
                if class.is_empty() {
                    return Err("has an empty `[]`".into());
                }
                // `-` between two characters is a range; at either end it is a literal `-`.
                for w in class.windows(3) {
                    if let [a, '-', b] = w
                        && a > b
                    {
                        return Err(format!("has a reversed range `{a}-{b}` inside `[...]`"));
                    }
                }
            }
            ']' => return Err("has a `]` without an opening `[`".into()),
            c if name_char(c) => {}
            c => return Err(format!("has {c:?}, which cannot be in a host name")),
        }
    }
    Ok(())
}

/// The ICMP or ICMPv6 type table for a protocol.
fn icmp_table(proto: Proto) -> &'static [(&'static str, u8)] {
    if proto == Proto::Icmpv6 { ICMPV6_TYPES } else { ICMP_TYPES }
}

/// An ICMP (`Proto::Icmp`) or ICMPv6 type by its name in the language, e.g. `echo-request`.
pub fn icmp_type_by_name(proto: Proto, name: &str) -> Option<u8> {
    icmp_table(proto).iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
}

/// The closest candidate within a small edit distance, for "did you mean ...?" hints.
/// Comparison ignores case, so `policy` suggests `Policy`.
fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word, &c.to_ascii_lowercase()), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb)).min(above + 1).min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// `a, b or c`.
fn one_of(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => format!("`{one}`"),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(|w| format!("`{w}`")).collect();
            format!("{} or `{last}`", init.join(", "))
        }
    }
}

fn names<T>(table: &[(&'static str, T)]) -> Vec<&'static str> {
    table.iter().map(|(n, _)| *n).collect()
}

/// The span from the start of a node to the end of its first key, for a mapping; the node's
/// own span otherwise. Block mappings have an empty span at their first key, so this gives
/// "missing field" and "rule defined here" labels something visible to underline.
fn head(node: &Node) -> Span {
    match &node.kind {
        NodeKind::Map(entries) => match entries.first() {
            Some((key, _)) => Span::new(node.span.file, node.span.start, key.span.end),
            None => node.span,
        },
        _ => node.span,
    }
}

/// The span from the start of a node to the end of its last descendant (collections only have
/// a span at their start).
fn extent(node: &Node) -> Span {
    let last = match &node.kind {
        NodeKind::Map(entries) => entries.last().map(|(_, v)| extent(v)),
        NodeKind::Seq(items) => items.last().map(extent),
        _ => None,
    };
    let end = last.map_or(node.span.end, |l| l.end.max(node.span.end));
    Span::new(node.span.file, node.span.start, end)
}

/// One field of a mapping: the key's text and span, and the value.
struct Field<'a> {
    key: Sp<&'a str>,
    value: &'a Node,
}

/// A mapping whose keys were checked against a list of known fields. Holds the first occurrence
/// of each known key (duplicates were reported).
struct Fields<'a> {
    head: Span,
    what: &'a str,
    fields: Vec<Field<'a>>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.fields.iter().find(|f| f.key.value == key).map(|f| f.value)
    }

    fn key_span(&self, key: &str) -> Option<Span> {
        self.fields.iter().find(|f| f.key.value == key).map(|f| f.key.span)
    }
}

/// The lowering context: the diagnostics collected so far.
#[derive(Default)]
struct Cx {
    diags: Vec<Diagnostic>,
    /// How many of `diags` are errors (asked after every document: counting them each time
    /// would make a file with many broken documents quadratic).
    errors: usize,
}

impl Cx {
    fn errors(&self) -> usize {
        self.errors
    }

    fn push(&mut self, d: Diagnostic) {
        self.errors += usize::from(d.severity == Severity::Error);
        self.diags.push(d);
    }

    // ---- generic shape helpers -------------------------------------------------------------

    /// FW004: `what` should be `expected` but is something else.
    fn wrong_type(&mut self, node: &Node, what: &str, expected: &str) {
        let found = node.kind.describe();
        let mut d = Diagnostic::error(
            Code::WrongType,
            format!("wrong type for {what}: expected {expected}, found {found}"),
        )
        .at(extent(node), format!("expected {expected}"));
        d = match (&node.kind, expected) {
            (NodeKind::Null, _) => d.hint("the value is empty; give a value or remove the field"),
            (NodeKind::Str(_), e) if e.starts_with("a boolean") => {
                d.hint("write `true` or `false`, without quotes")
            }
            (NodeKind::Str(_) | NodeKind::Int(_) | NodeKind::Bool(_) | NodeKind::Float(_), e)
                if e.starts_with("a list") =>
            {
                d.hint("write a single value as a one-item list: `[value]`")
            }
            (NodeKind::Int(_) | NodeKind::Bool(_) | NodeKind::Float(_), e)
                if e.starts_with("a string") || e.starts_with("a name") =>
            {
                d.hint("YAML read this as a number or boolean; put it in quotes to make it text")
            }
            _ => d,
        };
        self.push(d);
    }

    /// The entries of a mapping with string keys; reports non-string keys (FW004) and duplicate
    /// keys (FW002, keeping the first).
    fn entries<'a>(&mut self, node: &'a Node, what: &str) -> Option<Vec<Field<'a>>> {
        let NodeKind::Map(entries) = &node.kind else {
            self.wrong_type(node, what, "a mapping");
            return None;
        };
        let mut out: Vec<Field<'a>> = Vec::with_capacity(entries.len());
        // Duplicates are looked up by scanning `out` in the usual small mappings, and in a hash
        // map in large ones: a hostile mapping may have a hundred thousand keys.
        let mut seen: HashMap<&'a str, Span> = HashMap::new();
        let large = entries.len() > SMALL_MAPPING;
        for (key, value) in entries {
            let Some(name) = key.as_str() else {
                self.wrong_type(key, &format!("a key of {what}"), "a string");
                continue;
            };
            let first = if large {
                seen.get(name).copied()
            } else {
                out.iter().find(|f| f.key.value == name).map(|f| f.key.span)
            };
            if let Some(first) = first {
                let d = Diagnostic::error(
                    Code::DuplicateKey,
                    format!("duplicate key `{name}` in {what}"),
                )
                .at(key.span, "defined again here")
                .also(first, "first defined here")
                .hint("a key may appear once in a mapping; remove one of them");
                self.push(d);
                continue;
            }
            if large {
                seen.insert(name, key.span);
            }
            out.push(Field { key: Sp::new(name, key.span), value });
        }
        Some(out)
    }

    /// A mapping with a fixed set of fields: reports unknown fields (FW003) as well.
    fn fields<'a>(&mut self, node: &'a Node, what: &'a str, known: &[&str]) -> Option<Fields<'a>> {
        let entries = self.entries(node, what)?;
        let mut fields = Vec::with_capacity(entries.len());
        for field in entries {
            if known.contains(&field.key.value) {
                fields.push(field);
                continue;
            }
            let valid = known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            let hint = match suggest(field.key.value, known.iter().copied()) {
                Some(s) => format!("did you mean `{s}`? Valid fields: {valid}"),
                None => format!("valid fields: {valid}"),
            };
            let d = Diagnostic::error(
                Code::UnknownField,
                format!("unknown field `{}` in {what}", field.key.value),
            )
            .at(field.key.span, "unknown field")
            .hint(hint);
            self.push(d);
        }
        Some(Fields { head: head(node), what, fields })
    }

    /// FW005 at the mapping when a required field is absent.
    fn require<'a>(&mut self, m: &Fields<'a>, key: &str, hint: &str) -> Option<&'a Node> {
        let node = m.get(key);
        if node.is_none() {
            let mut d = Diagnostic::error(
                Code::MissingField,
                format!("missing required field `{key}` in {}", m.what),
            )
            .at(m.head, format!("`{key}` is missing here"));
            if !hint.is_empty() {
                d = d.hint(hint);
            }
            self.push(d);
        }
        node
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<Sp<String>> {
        match &node.kind {
            NodeKind::Str(s) => Some(Sp::new(s.clone(), node.span)),
            _ => {
                self.wrong_type(node, what, "a string");
                None
            }
        }
    }

    fn list<'a>(&mut self, node: &'a Node, what: &str) -> Option<&'a [Node]> {
        match &node.kind {
            NodeKind::Seq(items) => Some(items),
            _ => {
                self.wrong_type(node, what, "a list");
                None
            }
        }
    }

    /// A list that must not be empty when given (`[]` would read as both "nothing" and
    /// "everything"); reported with `code`.
    fn nonempty_list<'a>(
        &mut self,
        node: &'a Node,
        what: &str,
        code: Code,
        hint: &str,
    ) -> Option<&'a [Node]> {
        let items = self.list(node, what)?;
        if items.is_empty() {
            self.push(
                Diagnostic::error(code, format!("{what} is an empty list"))
                    .at(node.span, "empty list")
                    .hint(hint),
            );
            return None;
        }
        Some(items)
    }

    fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.kind {
            NodeKind::Bool(b) => Some(b),
            _ => {
                self.wrong_type(node, what, "a boolean (true or false)");
                None
            }
        }
    }

    /// A string that must be one of a fixed set of words (FW022 otherwise).
    fn keyword<T: Copy>(
        &mut self,
        node: &Node,
        what: &str,
        table: &[(&'static str, T)],
    ) -> Option<Sp<T>> {
        let words = names(table);
        let NodeKind::Str(s) = &node.kind else {
            self.wrong_type(node, what, &format!("one of {}", one_of(&words)));
            return None;
        };
        if let Some(&(_, value)) = table.iter().find(|(n, _)| n == s) {
            return Some(Sp::new(value, node.span));
        }
        let mut d = Diagnostic::error(
            Code::InvalidValue,
            format!("invalid {what} `{s}`: expected {}", one_of(&words)),
        )
        .at(node.span, "not allowed here");
        let synonym = SYNONYMS
            .iter()
            .find(|(other, _)| other.eq_ignore_ascii_case(s))
            .map(|&(_, ours)| ours)
            .filter(|ours| words.contains(ours));
        if let Some(s) = synonym.or_else(|| suggest(s, words.iter().copied())) {
            d = d.hint(format!("did you mean `{s}`?"));
        }
        self.push(d);
        None
    }

    /// A metadata name, rule name or set reference (FW022 when malformed).
    fn name(&mut self, node: &Node, what: &str) -> Option<Sp<String>> {
        let name = self.string(node, what)?;
        if is_valid_name(&name) {
            return Some(name);
        }
        let message = if name.is_empty() {
            format!("{what} is empty")
        } else {
            format!("invalid {what} `{}`", name.value)
        };
        self.push(
            Diagnostic::error(Code::InvalidValue, message).at(node.span, "invalid name").hint(
                "names use letters, digits, `.`, `_` and `-`, and start with a letter or digit",
            ),
        );
        None
    }

    // ---- documents ---------------------------------------------------------------------

    fn document(&mut self, node: &Node) -> Option<Document> {
        let doc = self.fields(node, "the document", DOCUMENT_FIELDS)?;
        let api = self.require(&doc, "apiVersion", "add `apiVersion: fw/v1`");
        let kind = self.require(
            &doc,
            "kind",
            "add `kind: AddressSet`, `kind: Policy` or `kind: PolicyTest`",
        );
        let metadata = self.require(&doc, "metadata", "add `metadata: {name: NAME}`");
        let spec = self.require(&doc, "spec", "add a `spec:` mapping with the document's content");

        // A missing apiVersion is most likely an omission: check the rest as fw/v1.
        let api_ok = match api {
            Some(api) => self.api_version(api),
            None => true,
        };
        let kind = kind.and_then(|k| self.kind(k));
        let metadata = metadata.and_then(|m| self.metadata(m, doc.head));
        // An unknown apiVersion means we do not know what the spec should look like; saying
        // that once is more useful than a list of complaints about its fields.
        if !api_ok {
            return None;
        }
        let (kind, spec) = (kind?, spec?);
        match kind.value {
            Kind::AddressSet => {
                let (addresses, except) = self.address_set_spec(spec)?;
                Some(Document::AddressSet(AddressSet { metadata: metadata?, addresses, except }))
            }
            // The spec is checked even when the metadata is broken, so every error is reported.
            Kind::Policy => self.policy_spec(spec, metadata).map(Document::Policy),
            Kind::PolicyTest => self.policy_test_spec(spec, metadata).map(Document::PolicyTest),
        }
    }

    fn api_version(&mut self, node: &Node) -> bool {
        let Some(api) = self.string(node, "`apiVersion`") else {
            return false;
        };
        if API_VERSIONS.contains(&api.as_str()) {
            return true;
        }
        let mut d = Diagnostic::error(
            Code::UnknownApiVersion,
            format!(
                "unsupported apiVersion `{}`; this version of fw supports {}",
                api.value,
                one_of(API_VERSIONS)
            ),
        )
        .at(node.span, "unsupported apiVersion");
        if let Some(s) = suggest(&api, API_VERSIONS.iter().copied()) {
            d = d.hint(format!("did you mean `{s}`?"));
        }
        self.push(d);
        false
    }

    fn kind(&mut self, node: &Node) -> Option<Sp<Kind>> {
        let words = names(KINDS);
        let NodeKind::Str(s) = &node.kind else {
            self.wrong_type(node, "`kind`", &format!("one of {}", one_of(&words)));
            return None;
        };
        if let Some(&(_, kind)) = KINDS.iter().find(|(n, _)| n == s) {
            return Some(Sp::new(kind, node.span));
        }
        let kinds: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
        let mut d = Diagnostic::error(
            Code::UnknownKind,
            format!("unknown kind `{s}`; fw/v1 has the kinds {}", kinds.join(", ")),
        )
        .at(node.span, "unknown kind");
        if let Some(s) = suggest(s, words.iter().copied()) {
            d = d.hint(format!("did you mean `{s}`? Kinds are case-sensitive"));
        }
        self.push(d);
        None
    }

    fn metadata(&mut self, node: &Node, document: Span) -> Option<Metadata> {
        let m = self.fields(node, "`metadata`", METADATA_FIELDS)?;
        let name = self
            .require(&m, "name", "add `name: NAME`")
            .and_then(|n| self.name(n, "`metadata.name`"));
        let description = match m.get("description") {
            Some(n) => Some(self.string(n, "`metadata.description`")?.value),
            None => None,
        };
        Some(Metadata { name: name?, description, document })
    }

    // ---- addresses ---------------------------------------------------------------------

    fn address_set_spec(&mut self, node: &Node) -> Option<(AddressList, AddressList)> {
        let m = self.fields(node, "the `spec` of an AddressSet", ADDRESS_SET_FIELDS)?;
        let addresses = self
            .require(&m, "addresses", "add `addresses: [CIDR, ...]`")
            .and_then(|n| self.address_list(n, "`addresses`", false));
        let except = match m.get("except") {
            Some(n) => Some(self.address_list(n, "`except`", false)?),
            None => Some(Vec::new()),
        };
        Some((addresses?, except?))
    }

    /// A non-empty list of address items (FW017 when empty). `any` is allowed in rules only.
    fn address_list(&mut self, node: &Node, what: &str, any_allowed: bool) -> Option<AddressList> {
        let hint = if any_allowed {
            "list at least one address, or remove the field to match any address"
        } else {
            "list at least one address, or remove the field"
        };
        let items = self.nonempty_list(node, what, Code::EmptyAddressList, hint)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match self.address_item(item, any_allowed) {
                Some(a) => out.push(a),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn address_item(&mut self, node: &Node, any_allowed: bool) -> Option<Sp<AddressItem>> {
        let span = extent(node);
        match &node.kind {
            NodeKind::Str(s) if s == "any" => {
                if any_allowed {
                    return Some(Sp::new(AddressItem::Any, span));
                }
                self.push(
                    Diagnostic::error(Code::InvalidValue, "`any` is not allowed in an AddressSet")
                        .at(span, "not allowed here")
                        .hint(
                            "an AddressSet lists concrete addresses; write `0.0.0.0/0` and `::/0` \
                             for every address, or use `any` directly in a rule's `from` or `to`",
                        ),
                );
                None
            }
            NodeKind::Str(s) => match parse_net(s) {
                Ok(net) => Some(Sp::new(AddressItem::Net(net), span)),
                Err(bad) => {
                    let mut d = Diagnostic::error(bad.code, bad.message).at(span, bad.label);
                    if let Some(h) = bad.hint {
                        d = d.hint(h);
                    }
                    self.push(d);
                    None
                }
            },
            NodeKind::Map(_) => {
                let m = self.fields(node, "an address set reference", SET_REF_FIELDS)?;
                let name = self
                    .require(&m, "set", "write `{set: NAME}` to use the addresses of an AddressSet")
                    .and_then(|n| self.name(n, "AddressSet name"));
                Some(Sp::new(AddressItem::Set(name?), span))
            }
            _ => {
                let expected = if any_allowed {
                    "a CIDR, an IP address, `any` or `{set: NAME}`"
                } else {
                    "a CIDR, an IP address or `{set: NAME}`"
                };
                self.wrong_type(node, "an address", expected);
                None
            }
        }
    }

    // ---- policies ----------------------------------------------------------------------

    fn policy_spec(&mut self, node: &Node, metadata: Option<Metadata>) -> Option<Policy> {
        let m = self.fields(node, "the `spec` of a Policy", POLICY_FIELDS)?;
        let hosts = match m.get("hosts") {
            Some(n) => self.hosts(n).map(Some),
            None => Some(None),
        };
        let mode = match m.get("mode") {
            Some(n) => self.keyword(n, "`mode`", MODES).map(|m| m.value),
            None => Some(Mode::Enforce),
        };
        let defaults = match m.get("defaults") {
            Some(n) => self.defaults(n),
            None => Some(Defaults::default()),
        };
        // Rule names are unique across both directions of the policy.
        let mut rule_names = HashMap::new();
        let mut rules = |cx: &mut Self, direction: Direction| match m.get(direction.as_str()) {
            Some(n) => cx.rules(n, direction, &mut rule_names),
            None => Some(Vec::new()),
        };
        let ingress = rules(self, Direction::Ingress);
        let egress = rules(self, Direction::Egress);
        Some(Policy {
            metadata: metadata?,
            hosts: hosts?,
            mode: mode?,
            defaults: defaults?,
            ingress: ingress?,
            egress: egress?,
        })
    }

    fn hosts(&mut self, node: &Node) -> Option<HostSelector> {
        let m = self.fields(node, "`hosts`", HOSTS_FIELDS)?;
        let labels = match m.get("labels") {
            Some(n) => self.labels(n, "`hosts.labels`"),
            None => Some(BTreeMap::new()),
        };
        let names = match m.get("names") {
            Some(n) => self.globs(n),
            None => Some(Vec::new()),
        };
        Some(HostSelector { labels: labels?, names: names?, span: extent(node) })
    }

    /// A label map: keys `[A-Za-z0-9._/-]+`, values `[A-Za-z0-9._-]*` (FW026 otherwise).
    fn labels(&mut self, node: &Node, what: &str) -> Option<BTreeMap<String, Sp<String>>> {
        let entries = self.entries(node, what)?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for Field { key, value } in entries {
            let key_ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
            if !key_ok {
                ok = false;
                self.push(
                    Diagnostic::error(
                        Code::InvalidSelector,
                        format!("invalid label name `{}`", key.value),
                    )
                    .at(key.span, "invalid label name")
                    .hint("label names use letters, digits, `.`, `_`, `/` and `-`"),
                );
            }
            let Some(v) = self.string(value, &format!("label `{}`", key.value)) else {
                ok = false;
                continue;
            };
            if !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
                ok = false;
                self.push(
                    Diagnostic::error(
                        Code::InvalidSelector,
                        format!("invalid value `{}` for label `{}`", v.value, key.value),
                    )
                    .at(v.span, "invalid label value")
                    .hint("label values use letters, digits, `.`, `_` and `-`"),
                );
                continue;
            }
            out.insert(key.value.to_string(), v);
        }
        ok.then_some(out)
    }

    fn globs(&mut self, node: &Node) -> Option<Vec<Sp<String>>> {
        let items = self.nonempty_list(
            node,
            "`hosts.names`",
            Code::InvalidValue,
            "list at least one host name glob, or remove `names` to match every host name",
        )?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            let Some(glob) = self.string(item, "a host name glob") else {
                ok = false;
                continue;
            };
            match check_glob(&glob) {
                Ok(()) => out.push(glob),
                Err(why) => {
                    ok = false;
                    self.push(
                        Diagnostic::error(
                            Code::InvalidSelector,
                            format!("invalid host name glob `{}`: it {why}", glob.value),
                        )
                        .at(item.span, "invalid glob")
                        .hint(
                            "globs are host names with `*` (any characters), `?` (one character) \
                             and `[...]` (one character of a set, such as `[0-9]`)",
                        ),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    fn defaults(&mut self, node: &Node) -> Option<Defaults> {
        let m = self.fields(node, "`defaults`", DEFAULTS_FIELDS)?;
        let get = |cx: &mut Self, d: Direction| match m.get(d.as_str()) {
            Some(n) => cx.keyword(n, &format!("`defaults.{}`", d.as_str()), ACTIONS).map(Some),
            None => Some(None),
        };
        let ingress = get(self, Direction::Ingress);
        let egress = get(self, Direction::Egress);
        Some(Defaults { ingress: ingress?, egress: egress? })
    }

    fn rules(
        &mut self,
        node: &Node,
        direction: Direction,
        names: &mut HashMap<String, Span>,
    ) -> Option<Vec<Rule>> {
        let items = self.list(node, &format!("`{}`", direction.as_str()))?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match self.rule(item, direction, names) {
                Some(rule) => out.push(rule),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn rule(
        &mut self,
        node: &Node,
        direction: Direction,
        names: &mut HashMap<String, Span>,
    ) -> Option<Rule> {
        let what = match direction {
            Direction::Ingress => "an ingress rule",
            Direction::Egress => "an egress rule",
        };
        let m = self.fields(node, what, RULE_FIELDS)?;
        let span = m.head;
        let mut ok = true;

        let name = match m.get("name") {
            Some(n) => match self.name(n, "rule name") {
                Some(name) => {
                    if let Some(&first) = names.get(&name.value) {
                        ok = false;
                        self.push(
                            Diagnostic::error(
                                Code::DuplicateName,
                                format!("two rules of this policy are named `{}`", name.value),
                            )
                            .at(name.span, "defined again here")
                            .also(first, "first defined here")
                            .hint("rule names must be unique within a policy, across ingress and egress"),
                        );
                    } else {
                        names.insert(name.value.clone(), name.span);
                    }
                    Some(name)
                }
                None => {
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let action = self
            .require(&m, "action", "add `action: allow` or `action: deny`")
            .and_then(|n| self.keyword(n, "`action`", ACTIONS));

        // `from` on ingress, `to` on egress; the other one is misplaced.
        let (peer_key, wrong_key) = match direction {
            Direction::Ingress => ("from", "to"),
            Direction::Egress => ("to", "from"),
        };
        if let Some(key) = m.key_span(wrong_key) {
            ok = false;
            let hint = match direction {
                Direction::Ingress => {
                    "ingress rules match the sender of arriving packets: use `from`"
                }
                Direction::Egress => {
                    "egress rules match the destination of outgoing connections: use `to`"
                }
            };
            self.push(
                Diagnostic::error(
                    Code::FieldNotAllowed,
                    format!("`{wrong_key}` is not allowed in {what}"),
                )
                .at(key, "not allowed here")
                .hint(hint),
            );
        }
        let peers = match m.get(peer_key) {
            Some(n) => self.address_list(n, &format!("`{peer_key}`"), true).map(Some),
            None => Some(None),
        };

        let proto = match m.get("proto") {
            Some(n) => self.keyword(n, "`proto`", PROTOS),
            None => Some(Sp::new(Proto::Any, span)),
        };

        let ports = match m.get("ports") {
            Some(n) => {
                if let Some(proto) = proto
                    && !proto.has_ports()
                    && let Some(key) = m.key_span("ports")
                {
                    ok = false;
                    let mut d = Diagnostic::error(
                        Code::PortsNeedTcpUdp,
                        format!(
                            "`ports` needs `proto: tcp` or `proto: udp`, but proto is `{}`",
                            proto.as_str()
                        ),
                    )
                    .at(key, "ports given here");
                    d = if m.get("proto").is_some() {
                        d.also(proto.span, "proto set here")
                    } else {
                        d.also(proto.span, "proto defaults to `any`")
                    };
                    self.push(
                        d.hint("only tcp and udp have ports; add `proto: tcp` or `proto: udp`"),
                    );
                }
                self.ports(n)
            }
            None => Some(Vec::new()),
        };

        let icmp = match m.get("icmp") {
            Some(n) => {
                match proto {
                    Some(p) if p.is_icmp() => self.icmp_types(n, p.value),
                    Some(p) => {
                        let key = m.key_span("icmp").unwrap_or(n.span);
                        self.push(
                        Diagnostic::error(
                            Code::FieldNotAllowed,
                            format!("`icmp` needs `proto: icmp` or `proto: icmpv6`, but proto is `{}`", p.as_str()),
                        )
                        .at(key, "not allowed here")
                        .also(p.span, if m.get("proto").is_some() { "proto set here" } else { "proto defaults to `any`" })
                        .hint("add `proto: icmp` (IPv4) or `proto: icmpv6` (IPv6)"),
                    );
                        None
                    }
                    // The proto was invalid and already reported; the types cannot be checked
                    // without knowing which table they come from.
                    None => None,
                }
            }
            None => Some(Vec::new()),
        };

        let log = match m.get("log") {
            Some(n) => self.bool(n, "`log`"),
            None => Some(false),
        };

        let workloads = match (m.get("workloads"), direction) {
            (None, _) => Some(Vec::new()),
            (Some(_), Direction::Ingress) => {
                let key = m.key_span("workloads").unwrap_or(span);
                self.push(
                    Diagnostic::error(
                        Code::FieldNotAllowed,
                        "`workloads` is not allowed in an ingress rule",
                    )
                    .at(key, "not allowed here")
                    .hint(
                        "workloads select the local processes that send traffic, which only \
                             egress rules see; move this rule to `egress`",
                    ),
                );
                None
            }
            (Some(n), Direction::Egress) => self.workloads(n),
        };

        let rule = Rule {
            span,
            name,
            action: action?,
            peers: peers?,
            proto: proto?,
            ports: ports?,
            icmp: icmp?,
            log: log?,
            workloads: workloads?,
        };
        ok.then_some(rule)
    }

    fn ports(&mut self, node: &Node) -> Option<Vec<Sp<PortRange>>> {
        let items = self.nonempty_list(
            node,
            "`ports`",
            Code::InvalidValue,
            "list at least one port, or remove `ports` to match every port",
        )?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match self.port_item(item) {
                Some(p) => out.push(Sp::new(p, item.span)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// `443`, `"443"` or `"8000-8100"`.
    fn port_item(&mut self, node: &Node) -> Option<PortRange> {
        match &node.kind {
            NodeKind::Int(n) => {
                let port = self.port_number(node, &n.to_string(), Some(*n))?;
                Some(PortRange { start: port, end: port })
            }
            NodeKind::Str(s) => {
                if let Some((a, b)) = s.split_once('-') {
                    let digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
                    if !digits(a) || !digits(b) {
                        self.push(
                            Diagnostic::error(
                                Code::PortOutOfRange,
                                format!("`{s}` is not a port range"),
                            )
                            .at(node.span, "not a port range")
                            .hint("write a range as \"START-END\", such as \"8000-8100\""),
                        );
                        return None;
                    }
                    let start = self.port_number(node, a, None);
                    let end = self.port_number(node, b, None);
                    let (start, end) = (start?, end?);
                    if start > end {
                        self.push(
                            Diagnostic::error(
                                Code::ReversedRange,
                                format!("port range `{s}` starts above its end"),
                            )
                            .at(node.span, "reversed range")
                            .hint(format!("did you mean `{end}-{start}`?")),
                        );
                        return None;
                    }
                    Some(PortRange { start, end })
                } else {
                    let port = self.port_number(node, s, None)?;
                    Some(PortRange { start: port, end: port })
                }
            }
            _ => {
                self.wrong_type(node, "a port", "a port number or a range such as \"8000-8100\"");
                None
            }
        }
    }

    /// One destination port, 1-65535 (FW011 otherwise). `text` is the written form.
    fn port_number(&mut self, node: &Node, text: &str, int: Option<i128>) -> Option<u16> {
        let value = int.or_else(|| {
            let digits =
                !text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit());
            digits.then(|| text.parse::<i128>().ok()).flatten()
        });
        match value {
            Some(v) if (1..=65535).contains(&v) => u16::try_from(v).ok(),
            Some(v) => {
                let hint = if v == 0 {
                    "port 0 is reserved and never a destination port; ports run from 1 to 65535"
                } else {
                    "ports run from 1 to 65535"
                };
                self.push(
                    Diagnostic::error(Code::PortOutOfRange, format!("port {v} is out of range"))
                        .at(node.span, "out of range")
                        .hint(hint),
                );
                None
            }
            None => {
                self.push(
                    Diagnostic::error(
                        Code::PortOutOfRange,
                        format!("`{text}` is not a port number"),
                    )
                    .at(node.span, "not a port")
                    .hint(
                        "write a number such as 443 or a range such as \"8000-8100\"; \
                             service names are not supported",
                    ),
                );
                None
            }
        }
    }

    fn icmp_types(&mut self, node: &Node, proto: Proto) -> Option<Vec<Sp<u8>>> {
        let items = self.nonempty_list(
            node,
            "`icmp`",
            Code::InvalidValue,
            "list at least one ICMP type, or remove `icmp` to match every type",
        )?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match self.icmp_type(item, proto) {
                Some(t) => out.push(Sp::new(t, item.span)),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// An ICMP or ICMPv6 type: a name from the protocol's table or a number 0-255.
    fn icmp_type(&mut self, node: &Node, proto: Proto) -> Option<u8> {
        let table = icmp_table(proto);
        let family = if proto == Proto::Icmpv6 { "ICMPv6" } else { "ICMP" };
        let number = |cx: &mut Self, v: i128| match u8::try_from(v) {
            Ok(t) => Some(t),
            Err(_) => {
                cx.push(
                    Diagnostic::error(
                        Code::InvalidIcmpType,
                        format!("{family} type {v} is out of range"),
                    )
                    .at(node.span, "out of range")
                    .hint("ICMP types are numbers from 0 to 255"),
                );
                None
            }
        };
        match &node.kind {
            NodeKind::Int(v) => number(self, *v),
            NodeKind::Str(s)
                if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                number(self, s.parse::<i128>().ok()?)
            }
            NodeKind::Str(s) => {
                if let Some(&(_, t)) = table.iter().find(|(n, _)| n == s) {
                    return Some(t);
                }
                let other = if proto == Proto::Icmpv6 { ICMP_TYPES } else { ICMPV6_TYPES };
                let hint = if other.iter().any(|(n, _)| n == s) {
                    let (other_family, other_proto) = if proto == Proto::Icmpv6 {
                        ("ICMP (IPv4)", "icmp")
                    } else {
                        ("ICMPv6", "icmpv6")
                    };
                    format!("`{s}` is an {other_family} type; use `proto: {other_proto}` for it")
                } else {
                    let known = names(table).join(", ");
                    match suggest(s, names(table)) {
                        Some(m) => format!(
                            "did you mean `{m}`? {family} types: {known}, or a number 0-255"
                        ),
                        None => format!("{family} types: {known}, or a number 0-255"),
                    }
                };
                self.push(
                    Diagnostic::error(
                        Code::InvalidIcmpType,
                        format!("unknown {family} type `{s}`"),
                    )
                    .at(node.span, "unknown type")
                    .hint(hint),
                );
                None
            }
            _ => {
                self.wrong_type(node, "an ICMP type", "an ICMP type name or a number 0-255");
                None
            }
        }
    }

    fn workloads(&mut self, node: &Node) -> Option<Vec<Sp<String>>> {
        let items = self.nonempty_list(
            node,
            "`workloads`",
            Code::InvalidValue,
            "list at least one cgroup path, or remove `workloads` to match every process",
        )?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match self.workload(item) {
                Some(w) => out.push(w),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn workload(&mut self, node: &Node) -> Option<Sp<String>> {
        let raw = self.string(node, "a workload")?;
        match normalise_workload(&raw) {
            Ok(path) => Some(Sp::new(path, raw.span)),
            Err(why) => {
                let hint = if raw.trim_matches('/').is_empty() && !raw.contains("//") {
                    "the root cgroup holds every process: remove `workloads` to match every \
                     process"
                } else {
                    "a workload is a cgroup v2 path below /sys/fs/cgroup, such as \
                     `system.slice/app.service`"
                };
                self.push(
                    Diagnostic::error(
                        Code::InvalidWorkload,
                        format!("invalid workload {:?}: the cgroup path {why}", raw.value),
                    )
                    .at(node.span, "invalid cgroup path")
                    .hint(hint),
                );
                None
            }
        }
    }

    // ---- policy tests ------------------------------------------------------------------

    fn policy_test_spec(&mut self, node: &Node, metadata: Option<Metadata>) -> Option<PolicyTest> {
        let m = self.fields(node, "the `spec` of a PolicyTest", POLICY_TEST_FIELDS)?;
        let host = self
            .require(
                &m,
                "host",
                "add `host: {name: NAME, labels: {...}}`: the host the cases run on",
            )
            .and_then(|n| self.test_host(n));
        let cases =
            self.require(&m, "cases", "add `cases:` with a list of test cases").and_then(|n| {
                let items = self.list(n, "`cases`")?;
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for item in items {
                    match self.case(item) {
                        Some(c) => out.push(c),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            });
        Some(PolicyTest { metadata: metadata?, host: host?, cases: cases? })
    }

    fn test_host(&mut self, node: &Node) -> Option<TestHost> {
        let m = self.fields(node, "`host`", TEST_HOST_FIELDS)?;
        let name = self
            .require(&m, "name", "add `name: HOSTNAME`")
            .and_then(|n| self.name(n, "host name"));
        let labels = match m.get("labels") {
            Some(n) => self.labels(n, "`host.labels`"),
            None => Some(BTreeMap::new()),
        };
        let labels = labels?.into_iter().map(|(k, v)| (k, v.value)).collect();
        Some(TestHost { name: name?, labels })
    }

    fn case(&mut self, node: &Node) -> Option<TestCase> {
        let m = self.fields(node, "a test case", CASE_FIELDS)?;
        let span = m.head;
        let mut ok = true;
        let direction = self
            .require(&m, "direction", "add `direction: ingress` or `direction: egress`")
            .and_then(|n| self.keyword(n, "`direction`", DIRECTIONS));

        let peer = direction.and_then(|direction| {
            let (key, wrong, what) = match direction.value {
                Direction::Ingress => ("from", "to", "an ingress test case"),
                Direction::Egress => ("to", "from", "an egress test case"),
            };
            if let Some(at) = m.key_span(wrong) {
                ok = false;
                self.push(
                    Diagnostic::error(
                        Code::FieldNotAllowed,
                        format!("`{wrong}` is not allowed in {what}"),
                    )
                    .at(at, "not allowed here")
                    .also(direction.span, "direction set here")
                    .hint(format!("{what} gives the remote address with `{key}`")),
                );
                // When the right key is absent too, the hint above already says to add it.
                m.get(key)?;
            }
            let node = self.require(&m, key, &format!("add `{key}: IP`: the remote address"))?;
            self.case_ip(node, key)
        });

        let proto = self
            .require(&m, "proto", "add `proto: tcp`, `udp`, `icmp` or `icmpv6`")
            .and_then(|n| {
                if n.as_str() == Some("any") {
                    self.push(
                        Diagnostic::error(Code::InvalidValue, "a test case cannot have `proto: any`")
                            .at(n.span, "not a packet's protocol")
                            .hint("a test case describes one packet: use `tcp`, `udp`, `icmp` or `icmpv6`"),
                    );
                    return None;
                }
                self.keyword(n, "`proto`", CASE_PROTOS)
            });

        let port = match m.get("port") {
            None => Some(None),
            Some(n) => match proto {
                Some(p) if p.has_ports() => match &n.kind {
                    NodeKind::Int(v) => self.port_number(n, &v.to_string(), Some(*v)).map(Some),
                    NodeKind::Str(s) if !s.contains('-') => self.port_number(n, s, None).map(Some),
                    _ => {
                        self.wrong_type(n, "`port`", "a port number (1-65535)");
                        None
                    }
                },
                Some(p) => {
                    let key = m.key_span("port").unwrap_or(n.span);
                    self.push(
                        Diagnostic::error(
                            Code::PortsNeedTcpUdp,
                            format!(
                                "`port` needs `proto: tcp` or `proto: udp`, but proto is `{}`",
                                p.as_str()
                            ),
                        )
                        .at(key, "port given here")
                        .also(p.span, "proto set here")
                        .hint("only tcp and udp packets have ports"),
                    );
                    None
                }
                None => None,
            },
        };

        let icmp = match m.get("icmp") {
            None => Some(None),
            Some(n) => {
                match proto {
                    Some(p) if p.is_icmp() => self.icmp_type(n, p.value).map(Some),
                    Some(p) => {
                        let key = m.key_span("icmp").unwrap_or(n.span);
                        self.push(
                        Diagnostic::error(
                            Code::FieldNotAllowed,
                            format!("`icmp` needs `proto: icmp` or `proto: icmpv6`, but proto is `{}`", p.as_str()),
                        )
                        .at(key, "not allowed here")
                        .also(p.span, "proto set here")
                        .hint("only ICMP and ICMPv6 packets have a type"),
                    );
                        None
                    }
                    None => None,
                }
            }
        };

        let workload = match m.get("workload") {
            None => Some(None),
            Some(n) => match direction {
                Some(d) if d.value == Direction::Egress => self.workload(n).map(|w| Some(w.value)),
                Some(d) => {
                    let key = m.key_span("workload").unwrap_or(n.span);
                    self.push(
                        Diagnostic::error(Code::FieldNotAllowed, "`workload` is not allowed in an ingress test case")
                            .at(key, "not allowed here")
                            .also(d.span, "direction set here")
                            .hint("workloads are the local processes that send traffic, so only egress cases have one"),
                    );
                    None
                }
                None => None,
            },
        };

        let expect = self
            .require(&m, "expect", "add `expect: allow`, `expect: deny` or `expect: audit-deny`")
            .and_then(|n| self.keyword(n, "`expect`", EXPECTS));

        let case = TestCase {
            span,
            direction: direction?.value,
            peer: peer?,
            proto: proto?.value,
            port: port?,
            icmp: icmp?,
            workload: workload?,
            expect: expect?,
        };
        ok.then_some(case)
    }

    /// A test case's remote address: one IP (FW010 otherwise, also for a CIDR).
    fn case_ip(&mut self, node: &Node, key: &str) -> Option<Sp<IpAddr>> {
        let text = self.string(node, &format!("`{key}`"))?;
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(Sp::new(ip, node.span));
        }
        let hint = if text.contains('/') {
            "a test case is one packet: give a single address such as 192.0.2.1, not a CIDR"
        } else if text.as_str() == "any" {
            "a test case is one packet: give a single address such as 192.0.2.1"
        } else {
            "write an IPv4 address such as 192.0.2.1 or an IPv6 address such as 2001:db8::1"
        };
        self.push(
            Diagnostic::error(Code::InvalidIp, format!("invalid IP address `{}`", text.value))
                .at(node.span, "not an IP address")
                .hint(hint),
        );
        None
    }
}

/// Why an address string did not parse.
struct BadAddress {
    code: Code,
    message: String,
    label: &'static str,
    hint: Option<String>,
}

/// A CIDR (`10.0.0.0/8`) or a bare IP (`10.0.0.1`, stored as /32 or /128).
fn parse_net(s: &str) -> Result<IpNet, BadAddress> {
    let Some((addr, prefix)) = s.split_once('/') else {
        return s.parse::<IpAddr>().map(IpNet::from).map_err(|_| bad_ip(s));
    };
    let cidr = |message: String, hint: Option<String>| BadAddress {
        code: Code::InvalidCidr,
        message,
        label: "invalid CIDR",
        hint,
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return Err(cidr(
            format!("invalid CIDR `{s}`: `{addr}` is not an IP address"),
            Some(
                "write a network address and a prefix length, such as 10.0.0.0/8 or 2001:db8::/32"
                    .into(),
            ),
        ));
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let len =
        (!prefix.is_empty() && prefix.len() <= 3 && prefix.bytes().all(|b| b.is_ascii_digit()))
            .then(|| prefix.parse::<u8>().ok())
            .flatten();
    let Some(len) = len.filter(|&l| l <= max) else {
        let message = if prefix.is_empty() {
            format!("invalid CIDR `{s}`: the prefix length after `/` is missing")
        } else {
            format!(
                "invalid CIDR `{s}`: `/{prefix}` is not a prefix length for an {family} address"
            )
        };
        return Err(cidr(message, Some(format!("{family} prefix lengths run from 0 to {max}"))));
    };
    let net = IpNet::new(ip, len).map_err(|_| cidr(format!("invalid CIDR `{s}`"), None))?;
    let network = net.trunc();
    if network != net {
        return Err(BadAddress {
            code: Code::HostBitsSet,
            message: format!("`{s}` has host bits set after the /{len} prefix"),
            label: "host bits set",
            hint: Some(format!("did you mean {network} (the network) or {ip} (the one address)?")),
        });
    }
    Ok(net)
}

fn bad_ip(s: &str) -> BadAddress {
    let hint = if s.contains('%') {
        "zone ids such as `%eth0` are not supported".to_string()
    } else if let Some((a, b)) = s.split_once('-')
        && a.trim().parse::<IpAddr>().is_ok()
        && b.trim().parse::<IpAddr>().is_ok()
    {
        "address ranges are not supported; write them as CIDRs".to_string()
    } else if s.chars().any(|c| c.is_ascii_alphabetic() && !c.is_ascii_hexdigit()) {
        "host names are not resolved; to use an AddressSet write `{set: NAME}`".to_string()
    } else {
        "write an IP address such as 192.0.2.1 or 2001:db8::1, or a CIDR such as 192.0.2.0/24"
            .to_string()
    };
    BadAddress {
        code: Code::InvalidIp,
        message: format!("invalid IP address `{s}`"),
        label: "not an IP address",
        hint: Some(hint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileId;

    /// Duplicate keys are found with both spans in small mappings (scanned) and large ones
    /// (hashed) alike, each duplicate once, against its first definition.
    #[test]
    fn duplicate_keys_in_small_and_large_mappings() {
        for size in [3, SMALL_MAPPING, SMALL_MAPPING + 1, 500] {
            let mut text = String::from("apiVersion: fw/v1\nkind: Policy\nmetadata:\n  name: p\n");
            for i in 0..size {
                text.push_str(&format!("  k{i}: v\n"));
            }
            text.push_str("  k1: again\n  k1: third\n  name: q\n");
            let nodes = crate::yaml::parse(FileId(0), text.as_bytes(), &Default::default())
                .expect("valid YAML");
            let (docs, diags) = lower(&nodes);
            assert!(docs.is_empty());
            let dups: Vec<&Diagnostic> =
                diags.iter().filter(|d| d.code == Code::DuplicateKey).collect();
            let span_text = |s: Span| &text[s.start as usize..s.end as usize];
            let first_k1 = text.find("k1:").unwrap_or(0) as u32;
            let described: Vec<(String, u32, u32)> = dups
                .iter()
                .map(|d| {
                    let again = d.primary.as_ref().map(|l| l.span).unwrap_or_default();
                    let first = d.secondary.first().map(|l| l.span).unwrap_or_default();
                    (span_text(again).to_string(), again.start, first.start)
                })
                .collect();
            let name_at = text.find("name: p").unwrap_or(0) as u32;
            let k1_again = text.find("k1: again").unwrap_or(0) as u32;
            let k1_third = text.find("k1: third").unwrap_or(0) as u32;
            let name_again = text.find("name: q").unwrap_or(0) as u32;
            assert_eq!(
                described,
                vec![
                    ("k1".to_string(), k1_again, first_k1),
                    ("k1".to_string(), k1_third, first_k1),
                    ("name".to_string(), name_again, name_at),
                ],
                "size {size}"
            );
            // And the unknown fields are reported once each, duplicates not again.
            let unknown = diags.iter().filter(|d| d.code == Code::UnknownField).count();
            assert_eq!(unknown, size, "size {size}");
        }
    }

    #[test]
    fn names_allow_a_small_charset() {
        assert!(is_valid_name("web-1.prod_a"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("-web"));
        assert!(!is_valid_name("web policy"));
        assert!(!is_valid_name("a/b"));
    }

    #[test]
    fn workloads_are_normalised_and_checked() {
        assert_eq!(
            normalise_workload("/system.slice/app.service/").as_deref(),
            Ok("system.slice/app.service")
        );
        assert_eq!(normalise_workload("a").as_deref(), Ok("a"));
        for bad in ["", "/", "//", "a//b", "a/./b", "../a", "a/..", "a\0b", "a\nb"] {
            assert!(normalise_workload(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn globs_need_closed_classes_and_name_characters() {
        for good in ["web-*", "db-?", "web-[0-9]*", "*", "a[-x]"] {
            assert_eq!(check_glob(good), Ok(()), "{good}");
        }
        for bad in ["", "web-[0-9", "web-]", "a[]", "a[[b]]", "a b", "a[9-0]", "a/b"] {
            assert!(check_glob(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn suggestions_are_close_and_case_insensitive() {
        assert_eq!(suggest("prot", RULE_FIELDS.iter().copied()), Some("proto"));
        assert_eq!(suggest("policy", ["AddressSet", "Policy", "PolicyTest"]), Some("Policy"));
        assert_eq!(suggest("xyzzy", RULE_FIELDS.iter().copied()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn nets_parse_and_reject_host_bits() {
        assert_eq!(parse_net("10.0.0.0/8").ok(), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_net("198.51.100.7").ok(), "198.51.100.7/32".parse().ok());
        assert_eq!(parse_net("2001:db8::1").ok(), "2001:db8::1/128".parse().ok());
        assert_eq!(parse_net("10.0.0.1/8").err().map(|b| b.code), Some(Code::HostBitsSet));
        assert_eq!(parse_net("10.0.0.0/33").err().map(|b| b.code), Some(Code::InvalidCidr));
        assert_eq!(parse_net("10.0.0.0/").err().map(|b| b.code), Some(Code::InvalidCidr));
        assert_eq!(parse_net("10.0.0.0/+8").err().map(|b| b.code), Some(Code::InvalidCidr));
        assert_eq!(parse_net("10.0.0.256").err().map(|b| b.code), Some(Code::InvalidIp));
    }

    #[test]
    fn every_icmp_name_is_unique_per_family() {
        for table in [ICMP_TYPES, ICMPV6_TYPES] {
            let mut names = names(table);
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), table.len());
        }
    }

    #[test]
    fn a_bad_document_does_not_stop_the_next() {
        let text = "apiVersion: fw/v1\nkind: Nope\nmetadata: {name: a}\nspec: {}\n---\n\
                    apiVersion: fw/v1\nkind: AddressSet\nmetadata: {name: b}\nspec: {addresses: [10.0.0.0/8]}\n";
        let nodes =
            crate::yaml::parse(crate::source::FileId(0), text.as_bytes(), &Default::default())
                .unwrap_or_default();
        let (docs, diags) = lower(&nodes);
        assert_eq!(docs.len(), 1);
        assert_eq!(diags.len(), 1);
        assert_eq!(diags.first().map(|d| d.code), Some(Code::UnknownKind));
    }
}
