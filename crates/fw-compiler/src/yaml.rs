//! YAML text to a generic, spanned node tree.
//!
//! We do not deserialize policy documents straight into typed structs: serde stops at the first
//! error of a document and cannot say where a duplicate key was first defined. Instead
//! serde-saphyr (a maintained, budgeted YAML parser) builds this small tree with a span on every
//! key and value, and `lower` walks it to the typed AST, reporting every problem it sees.
//! Duplicate keys are passed through by the parser on purpose so `lower` can point at both.
//!
//! Hostile input is bounded here: a size limit before parsing, and serde-saphyr's budget
//! (events, aliases, anchors, nesting depth) while parsing, so alias bombs, deep nesting and huge
//! files end in a diagnostic, not a hang or an unbounded allocation.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::diag::{Code, Diagnostic};
use crate::source::{FileId, Span};

/// Bounds on what one file may cost to parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    /// Largest file accepted, in bytes.
    pub max_file_bytes: usize,
    /// Most parser events (scalars, collection starts and ends) in one file.
    pub max_events: usize,
    /// Deepest nesting of sequences and mappings.
    pub max_depth: usize,
    /// Most alias (`*name`) uses in one file.
    pub max_aliases: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self { max_file_bytes: 64 << 20, max_events: 8_000_000, max_depth: 64, max_aliases: 1_000 }
    }
}

/// A YAML value with its span.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in file order; duplicates are kept so `lower` can report them.
    Map(Vec<(Node, Node)>),
}

impl NodeKind {
    /// How the value is described in "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self {
            NodeKind::Null => "null",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Int(_) => "an integer",
            NodeKind::Float(_) => "a number",
            NodeKind::Str(_) => "a string",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Parses every document of one file. Empty documents are dropped.
pub fn parse(file: FileId, bytes: &[u8], limits: &ParseLimits) -> Result<Vec<Node>, Diagnostic> {
    let whole = Span::new(file, 0, 0);
    if bytes.len() > limits.max_file_bytes {
        return Err(Diagnostic::error(
            Code::InputTooLarge,
            format!(
                "file is {} bytes, more than the limit of {} bytes",
                bytes.len(),
                limits.max_file_bytes
            ),
        )
        .at(whole, "file too large")
        .hint("split the policy into several files"));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.valid_up_to() as u32;
            return Err(Diagnostic::error(Code::NotUtf8, "file is not UTF-8 text")
                .at(Span::new(file, at, at + 1), "invalid UTF-8 byte here")
                .hint("policy files must be UTF-8 encoded YAML"));
        }
    };
    if text.contains('\0') {
        let at = text.find('\0').unwrap_or(0) as u32;
        return Err(Diagnostic::error(Code::YamlSyntax, "file contains a NUL byte")
            .at(Span::new(file, at, at + 1), "binary data here")
            .hint("policy files must be YAML text"));
    }

    let limits = *limits;
    let run = move || -> Result<Vec<Node>, Diagnostic> {
        // Built here because the options are not `Send`.
        let mut budget = serde_saphyr::Budget::default();
        budget.max_events = limits.max_events;
        budget.max_depth = limits.max_depth;
        budget.max_aliases = limits.max_aliases;
        budget.max_anchors = limits.max_aliases;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::PassThrough;

        let docs: Vec<Spanned<RawNode>> =
            serde_saphyr::from_str_multiple_with_options(text, options)
                .map_err(|e| saphyr_error(file, text, &e))?;
        Ok(docs
            .into_iter()
            .map(|d| convert(file, text, d))
            .filter(|n| n.kind != NodeKind::Null)
            .collect())
    };
    // The deserializer recurses once per nesting level, and in a debug build one level takes
    // tens of KiB of stack: a file nested up to `max_depth` overflowed a 2 MiB test thread
    // before the depth budget could stop it. So parsing runs on a thread whose stack fits the
    // budget, whatever thread the caller is on (the memory is only reserved, not touched).
    let stack = (limits.max_depth.saturating_add(16)).saturating_mul(256 << 10);
    std::thread::scope(|scope| {
        match std::thread::Builder::new()
            .name("fw-yaml-parse".into())
            .stack_size(stack)
            .spawn_scoped(scope, run)
        {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                Err(Diagnostic::error(Code::YamlSyntax, "the YAML parser failed on this file")
                    .at(whole, "while parsing this file"))
            }),
            // No thread to be had: parse here and hope the caller's stack suffices.
            Err(_) => run(),
        }
    })
}

fn saphyr_error(file: FileId, text: &str, e: &serde_saphyr::Error) -> Diagnostic {
    // Syntax errors carry a line and column but often no byte offset (it is 0), so the line and
    // column are the reliable part; the byte offset is the fallback.
    let offset = e
        .location()
        .and_then(|l| {
            offset_of_line_col(text, l.line(), l.column()).or_else(|| l.span().byte_offset())
        })
        .map_or(0, |o| (o as usize).min(text.len()));
    let at_char = text.get(offset..).and_then(|t| t.chars().next()).map_or(0, char::len_utf8);
    let span = Span::new(file, offset as u32, (offset + at_char) as u32);
    // The parser's own message; its first line is the useful part (later lines are its own
    // snippet rendering, which our renderer replaces). Its "error: line N column M: " prefix
    // is dropped: the diagnostic's span already says where.
    let full = e.to_string();
    let first = full.lines().next().unwrap_or("invalid YAML").trim();
    let mut message = budget_message(e).unwrap_or_else(|| strip_location_prefix(first).to_string());
    let lower = full.to_lowercase();
    if lower.contains("recursion limit") {
        // The parser's own guard against very deep nesting, before the budget sees it.
        message = "nested too deeply".into();
    }
    if lower.contains("budget") || lower.contains("depth") || lower.contains("limit") {
        Diagnostic::error(Code::InputTooLarge, format!("YAML over budget: {message}"))
            .at(span, "parsing stopped here")
            .hint("the file nests too deeply, has too many aliases or too many values")
    } else {
        Diagnostic::error(Code::YamlSyntax, format!("invalid YAML: {message}"))
            .at(span, "here")
            .hint(
                "the mistake may be on an earlier line: look for an unclosed bracket or quote, \
                 wrong indentation, or a missing space after `:`",
            )
    }
}

/// A readable message for the budget breaches a hostile file runs into (the parser's own
/// message is its debug form, such as `Nodes { nodes: 250001 }`).
fn budget_message(e: &serde_saphyr::Error) -> Option<String> {
    use serde_saphyr::budget::BudgetBreach;
    // The breach may be wrapped, e.g. in an alias error that says where the alias was used.
    let mut current = e;
    let breach = loop {
        if let serde_saphyr::Error::Budget { breach, .. } = current.without_snippet() {
            break breach;
        }
        current = std::error::Error::source(current)?.downcast_ref::<serde_saphyr::Error>()?;
    };
    Some(match breach {
        BudgetBreach::Depth { depth } => {
            format!("nested more than {} levels deep", depth.saturating_sub(1))
        }
        BudgetBreach::Nodes { nodes } => format!(
            "more than {} values, counting every copy an alias makes",
            nodes.saturating_sub(1)
        ),
        BudgetBreach::Aliases { aliases } => {
            format!("more than {} aliases", aliases.saturating_sub(1))
        }
        BudgetBreach::Anchors { anchors } => {
            format!("more than {} anchors", anchors.saturating_sub(1))
        }
        BudgetBreach::Events { events } => {
            format!("more than {} YAML events", events.saturating_sub(1))
        }
        _ => return None,
    })
}

/// Byte offset of a 1-based line and character column; `None` when the position is unknown
/// (line 0) or past the end of the text.
fn offset_of_line_col(text: &str, line: u64, column: u64) -> Option<u64> {
    let line = usize::try_from(line.checked_sub(1)?).ok()?;
    let column = usize::try_from(column.saturating_sub(1)).ok()?;
    let mut start = 0usize;
    for _ in 0..line {
        start += text.get(start..)?.find('\n')? + 1;
    }
    // A column past the end of its line stops at the line's end.
    let rest = text.get(start..)?;
    let rest = rest.split('\n').next().unwrap_or(rest);
    let in_line = rest.char_indices().nth(column).map_or(rest.len(), |(i, _)| i);
    Some((start + in_line) as u64)
}

/// `error: line 2 column 5: mapping values are not allowed` -> `mapping values are not allowed`.
fn strip_location_prefix(message: &str) -> &str {
    let m = message.strip_prefix("error:").map_or(message, str::trim_start);
    if let Some(rest) = m.strip_prefix("line ")
        && let Some((position, tail)) = rest.split_once(':')
        && position.split(" column ").all(|n| n.trim().chars().all(|c| c.is_ascii_digit()))
    {
        return tail.trim_start();
    }
    m
}

fn convert(file: FileId, text: &str, raw: Spanned<RawNode>) -> Node {
    let start = raw.referenced.span().byte_offset().unwrap_or(0) as u32;
    let len = raw.referenced.span().byte_len().unwrap_or(0) as u32;
    let end = (start + len).min(text.len() as u32);
    let span = Span::new(file, start, end);
    let kind = match raw.value {
        RawNode::Null => NodeKind::Null,
        RawNode::Bool(b) => NodeKind::Bool(b),
        RawNode::Int(i) => NodeKind::Int(i),
        RawNode::Float(f) => NodeKind::Float(f),
        RawNode::Str(s) => NodeKind::Str(s),
        RawNode::Seq(items) => {
            NodeKind::Seq(items.into_iter().map(|n| convert(file, text, n)).collect())
        }
        RawNode::Map(entries) => NodeKind::Map(
            entries
                .into_iter()
                .map(|(k, v)| (convert(file, text, k), convert(file, text, v)))
                .collect(),
        ),
    };
    Node { kind, span }
}

/// The shape serde-saphyr fills in; `Spanned` records where each value came from.
enum RawNode {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<RawNode>>),
    Map(Vec<(Spanned<RawNode>, Spanned<RawNode>)>),
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawNode;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<RawNode, E> {
        Ok(RawNode::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<RawNode, E> {
        Ok(RawNode::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<RawNode, E> {
        Ok(RawNode::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<RawNode, E> {
        Ok(RawNode::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<RawNode, E> {
        Ok(RawNode::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<RawNode, E> {
        Ok(RawNode::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<RawNode, E> {
        Ok(RawNode::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<RawNode, E> {
        Ok(RawNode::Str(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<RawNode, E> {
        Ok(RawNode::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_unit<E>(self) -> Result<RawNode, E> {
        Ok(RawNode::Null)
    }
    fn visit_none<E>(self) -> Result<RawNode, E> {
        Ok(RawNode::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<RawNode, D::Error> {
        d.deserialize_any(RawVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawNode, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(RawNode::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawNode, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(RawNode::Map(entries))
    }
}

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}
