//! Diagnostics as data.
//!
//! The compiler never prints. Every problem becomes a [`Diagnostic`]: a stable code, a message,
//! a primary span with a label, optional secondary spans ("first defined here") and a hint.
//! Only the CLI renders them (code frames, JSON, GitHub annotations), so the same data serves
//! people, CI and editors. Stages keep going after an error and collect all of them, so a user
//! fixes a whole file in one round.

use crate::source::{Location, SourceMap, Span};

macro_rules! codes {
    ($($variant:ident = $code:literal, $slug:literal, $summary:literal;)*) => {
        /// A stable error code. Codes are never reused or renumbered; `docs/errors.md` explains
        /// each one with an example fix.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Code { $($variant,)* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// `FW001` and so on.
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $code,)* }
            }

            /// A short kebab-case name, e.g. `duplicate-key`.
            pub fn slug(self) -> &'static str {
                match self { $(Code::$variant => $slug,)* }
            }

            /// One line saying what the code means.
            pub fn summary(self) -> &'static str {
                match self { $(Code::$variant => $summary,)* }
            }
        }
    };
}

codes! {
    YamlSyntax = "FW001", "yaml-syntax", "the file is not valid YAML";
    DuplicateKey = "FW002", "duplicate-key", "a mapping has the same key twice";
    UnknownField = "FW003", "unknown-field", "a field that this kind does not have";
    WrongType = "FW004", "wrong-type", "a value of the wrong type (a list where a string belongs, and so on)";
    MissingField = "FW005", "missing-field", "a required field is absent";
    UnknownApiVersion = "FW006", "unknown-api-version", "an apiVersion this version of fw does not support";
    UnknownKind = "FW007", "unknown-kind", "a kind that fw/v1 does not have";
    InvalidCidr = "FW008", "invalid-cidr", "a CIDR that does not parse or has an impossible prefix length";
    HostBitsSet = "FW009", "host-bits-set", "a CIDR with bits set after the prefix, such as 10.0.0.1/8";
    InvalidIp = "FW010", "invalid-ip", "an IP address that does not parse";
    PortOutOfRange = "FW011", "port-out-of-range", "a port outside 0-65535, or malformed";
    ReversedRange = "FW012", "reversed-range", "a port range whose start is above its end";
    PortsNeedTcpUdp = "FW013", "ports-need-tcp-or-udp", "ports given on a rule whose proto is not tcp or udp";
    UnknownSet = "FW014", "unknown-set", "a reference to an AddressSet that does not exist";
    SetCycle = "FW015", "set-cycle", "AddressSets that include each other in a cycle";
    DuplicateName = "FW016", "duplicate-name", "two objects of one kind, or two rules of one policy, share a name";
    EmptyAddressList = "FW017", "empty-address-list", "an address list that is empty, or empty once excepts are removed";
    SelectorMatchesNoTestHost = "FW018", "selector-matches-no-test-host", "a policy's hosts selector matches none of the hosts that PolicyTests describe";
    CapacityExceeded = "FW019", "capacity-exceeded", "the compiled policy does not fit the data plane's maps";
    InputTooLarge = "FW020", "input-too-large", "a file over the size, nesting or alias budget";
    NotUtf8 = "FW021", "not-utf8", "a file that is not UTF-8 text";
    InvalidValue = "FW022", "invalid-value", "a value that is not one of the allowed ones";
    FieldNotAllowed = "FW023", "field-not-allowed", "a field that is valid in general but not in this place";
    InvalidIcmpType = "FW024", "invalid-icmp-type", "an ICMP or ICMPv6 type name or number that does not exist";
    InvalidWorkload = "FW025", "invalid-workload", "a workload that is not a clean cgroup v2 path";
    InvalidSelector = "FW026", "invalid-selector", "a host name glob or label that is malformed";
    Io = "FW027", "io", "a file or folder that cannot be read";
    NoPolicyFiles = "FW028", "no-policy-files", "a folder with no *.yaml or *.yml files";
    FamilyMismatch = "FW029", "family-mismatch", "a rule whose addresses can never match its protocol (IPv4 only with icmpv6, IPv6 only with icmp)";
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A span with a short label shown under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

/// One problem found in the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    pub message: String,
    /// Where the problem is. `None` only for problems with no place in a file (an unreadable
    /// path is reported with the path in the message).
    pub primary: Option<Label>,
    /// Other places that explain it, such as "first defined here".
    pub secondary: Vec<Label>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn error(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            severity: Severity::Error,
            message: message.into(),
            primary: None,
            secondary: Vec::new(),
            hint: None,
        }
    }

    pub fn warning(code: Code, message: impl Into<String>) -> Self {
        Self { severity: Severity::Warning, ..Self::error(code, message) }
    }

    pub fn at(mut self, span: Span, label: impl Into<String>) -> Self {
        self.primary = Some(Label { span, message: label.into() });
        self
    }

    pub fn also(mut self, span: Span, label: impl Into<String>) -> Self {
        self.secondary.push(Label { span, message: label.into() });
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// A flat, serializable form with line and column resolved.
    pub fn to_record(&self, sources: &SourceMap) -> DiagnosticRecord {
        let location = self.primary.as_ref().map(|l| sources.location(l.span));
        DiagnosticRecord {
            file: location.as_ref().map(|l| l.file.to_string()),
            line: location.as_ref().map(|l| l.line),
            column: location.as_ref().map(|l| l.column),
            end: self.primary.as_ref().map(|l| {
                let loc = sources.location(Span { start: l.span.end, ..l.span });
                (loc.line, loc.column)
            }),
            code: self.code.as_str(),
            severity: self.severity,
            message: self.message.clone(),
            label: self.primary.as_ref().map(|l| l.message.clone()),
            related: self
                .secondary
                .iter()
                .map(|l| Related { location: sources.location(l.span), message: l.message.clone() })
                .collect(),
            hint: self.hint.clone(),
        }
    }
}

/// The machine-readable form of a diagnostic (`fwctl validate --format json`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiagnosticRecord {
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// Line and column just past the end of the primary span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<(u32, u32)>,
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<Related>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Related {
    #[serde(flatten)]
    pub location: Location,
    pub message: String,
}

/// A sink that stages push diagnostics into.
#[derive(Clone, Debug, Default)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    pub fn extend(&mut self, other: impl IntoIterator<Item = Diagnostic>) {
        self.items.extend(other);
    }

    /// Sorted by file, position and code so output is deterministic.
    pub fn into_sorted(mut self) -> Vec<Diagnostic> {
        self.items.sort_by_key(|d| (d.primary.as_ref().map(|l| l.span), d.code, d.message.clone()));
        self.items.dedup();
        self.items
    }
}
