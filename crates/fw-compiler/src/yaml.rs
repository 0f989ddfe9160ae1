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

    if let Some(nodes) = fast::parse(file, text, limits) {
        return Ok(nodes);
    }
    parse_with_serde_saphyr(file, text, limits)
}

/// The budget serde-saphyr enforces for our limits; the fast path reads its limits too.
fn budget(limits: &ParseLimits) -> serde_saphyr::Budget {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = limits.max_events;
    budget.max_depth = limits.max_depth;
    budget.max_aliases = limits.max_aliases;
    budget.max_anchors = limits.max_aliases;
    budget
}

/// The reference path: serde-saphyr's deserializer fills in [`RawNode`]s. It handles every
/// input (anchors, aliases, tags, merge keys, all scalar spellings) and produces every
/// error message; [`fast`] hands anything unusual to it.
fn parse_with_serde_saphyr(
    file: FileId,
    text: &str,
    limits: &ParseLimits,
) -> Result<Vec<Node>, Diagnostic> {
    let whole = Span::new(file, 0, 0);
    let limits = *limits;
    let run = move || -> Result<Vec<Node>, Diagnostic> {
        // Built here because the options are not `Send`.
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget(&limits));
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

/// The fast path: a node tree built straight from the parser's events.
///
/// serde-saphyr's generic deserializer costs about three times what its parser does on policy
/// files: every node goes through serde's visitor protocol, `Spanned` deserializes each
/// location as a little struct of its own, and every mapping key is captured and fingerprinted
/// for duplicate detection (which we switch off: `lower` reports duplicates). Policy files use
/// a small part of YAML, so this walks the events of the same parser (`granit-parser`, with
/// the options serde-saphyr would give it) into the tree with an explicit stack: no recursion,
/// so no big-stack thread either.
///
/// It gives up (returns `None`, and [`parse`] runs serde-saphyr on the file instead) on
/// anything where it is not certain to build exactly the tree serde-saphyr builds: any parser
/// error (so every error message still comes from serde-saphyr), anchors, aliases, tags, merge
/// keys (`<<`), keys that are not scalars, plain scalars whose type it does not resolve itself
/// (see `plain_scalar`), and inputs near any budget limit (files nested deeper than
/// `MAX_DEPTH` included). The tests compare both paths on the fixtures, the fuzz seeds,
/// mutations of them and generated scalars.
mod fast {
    use serde_saphyr::granit_parser::{Event, Options, Parser, ScalarStyle, StrInput};

    use super::{Node, NodeKind, ParseLimits};
    use crate::source::{FileId, Span};

    /// Deeper files go the reference path, whose depth budget and recursion limit decide.
    /// Policy documents nest about six levels.
    pub(super) const MAX_DEPTH: usize = 32;

    /// An open collection.
    enum Frame {
        Seq(Span, Vec<Node>),
        /// Entries so far and the key waiting for its value.
        Map(Span, Vec<(Node, Node)>, Option<Node>),
    }

    pub(super) fn parse(file: FileId, text: &str, limits: &ParseLimits) -> Option<Vec<Node>> {
        let budget = super::budget(limits);
        // The parser options serde-saphyr derives from the same budget and default options.
        let mut options = Options::default();
        options.simple_key_max_lookahead = budget.simple_key_max_lookahead;
        options.flow_nesting_limit = budget.flow_nesting_limit;
        options.block_nesting_limit =
            options.block_nesting_limit.max(budget.max_depth.saturating_add(1));
        options.emit_comments = false;
        options.emit_anchor_events = false;
        options.emit_unresolved_aliases = false;
        if budget.max_reader_input_bytes.is_some_and(|max| text.len() >= max) {
            return None;
        }
        // Every count errs high (all events, not only those serde-saphyr's budget counts)
        // and stops at the limit, not past it: whatever would breach the budget goes the
        // reference path, which reports the breach.
        let max_depth = budget.max_depth.min(MAX_DEPTH);
        let (mut events, mut nodes, mut documents, mut scalar_bytes) = (0usize, 0usize, 0, 0);

        let mut stack: Vec<Frame> = Vec::new();
        let mut out = Vec::new();
        for item in Parser::with_options(StrInput::new(text), options) {
            let (event, span) = item.ok()?;
            events += 1;
            if events >= budget.max_events {
                return None;
            }
            let start = span.start.byte_offset()?;
            let len = span.end.byte_offset()?.saturating_sub(start);
            let end = start.checked_add(len)?.min(text.len());
            let span = Span::new(file, u32::try_from(start).ok()?, u32::try_from(end).ok()?);
            let node = match event {
                Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => continue,
                Event::DocumentStart(..) => {
                    documents += 1;
                    if documents >= budget.max_documents {
                        return None;
                    }
                    continue;
                }
                Event::Scalar(value, style, anchor, tag) => {
                    nodes += 1;
                    scalar_bytes += value.len();
                    if anchor != 0
                        || tag.is_some()
                        || nodes >= budget.max_nodes
                        || scalar_bytes >= budget.max_total_scalar_bytes
                        || value == "<<"
                    {
                        return None;
                    }
                    let kind = match style {
                        ScalarStyle::Plain => plain_scalar(&value)?,
                        _ => NodeKind::Str(value.into_owned()),
                    };
                    Node { kind, span }
                }
                Event::SequenceStart(_, anchor, ref tag)
                | Event::MappingStart(_, anchor, ref tag) => {
                    nodes += 1;
                    if anchor != 0
                        || tag.is_some()
                        || nodes >= budget.max_nodes
                        || stack.len() + 1 >= max_depth
                    {
                        return None;
                    }
                    stack.push(match event {
                        Event::SequenceStart(..) => Frame::Seq(span, Vec::new()),
                        _ => Frame::Map(span, Vec::new(), None),
                    });
                    continue;
                }
                Event::SequenceEnd => match stack.pop()? {
                    Frame::Seq(span, items) => Node { kind: NodeKind::Seq(items), span },
                    Frame::Map(..) => return None,
                },
                Event::MappingEnd => match stack.pop()? {
                    Frame::Map(span, entries, None) => Node { kind: NodeKind::Map(entries), span },
                    _ => return None,
                },
                // Aliases, anchors, comments, and whatever a newer parser may add.
                _ => return None,
            };
            match stack.last_mut() {
                None => {
                    // A document's root; empty (null) documents are dropped.
                    if node.kind != NodeKind::Null {
                        out.push(node);
                    }
                }
                Some(Frame::Seq(_, items)) => items.push(node),
                Some(Frame::Map(_, entries, key)) => match key.take() {
                    Some(k) => entries.push((k, node)),
                    None if matches!(node.kind, NodeKind::Seq(_) | NodeKind::Map(_)) => {
                        return None;
                    }
                    None => *key = Some(node),
                },
            }
        }
        if !stack.is_empty() {
            return None;
        }
        Some(out)
    }

    /// The kind serde-saphyr's untyped deserialization (with our options: YAML 1.1 booleans,
    /// no legacy octal) gives an untagged plain scalar, where this is certain; `None` for
    /// the rest, such as `-1`, `1.5`, `0x1f`, `1_000`, `.inf` or `007`.
    pub(super) fn plain_scalar(value: &str) -> Option<NodeKind> {
        if matches!(value, "" | "~" | "null" | "Null" | "NULL") {
            return Some(NodeKind::Null);
        }
        let is = |words: &[&str]| words.iter().any(|w| value.eq_ignore_ascii_case(w));
        if is(&["true", "yes", "y", "on"]) {
            return Some(NodeKind::Bool(true));
        }
        if is(&["false", "no", "n", "off"]) {
            return Some(NodeKind::Bool(false));
        }
        let bytes = value.as_bytes();
        // No integer or float spelling has a byte outside these (CIDRs have `/`, IPv6
        // addresses `:`, names spaces or other punctuation).
        let numeric_byte =
            |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_');
        let string = || Some(NodeKind::Str(value.to_owned()));
        if !bytes.iter().all(numeric_byte) {
            return string();
        }
        match bytes.first() {
            // Integers start with a digit or a sign, and the floats that start with a letter
            // (`inf`, `nan`) are not finite, which makes them strings.
            Some(b) if b.is_ascii_alphabetic() || *b == b'_' => return string(),
            _ => {}
        }
        let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
        // A decimal without a leading zero that fits u64: an integer.
        if digits(bytes) && (bytes[0] != b'0' || bytes.len() == 1) {
            return value.parse::<u64>().ok().map(|v| NodeKind::Int(v.into()));
        }
        // Two or more dots between digits (an IPv4 address): neither an integer nor a float.
        if bytes.iter().filter(|&&b| b == b'.').count() >= 2
            && bytes.iter().all(|&b| b.is_ascii_digit() || b == b'.')
        {
            return string();
        }
        // `8000-8100`: a port range.
        if let Some(i) = bytes.iter().position(|&b| b == b'-')
            && digits(&bytes[..i])
            && digits(&bytes[i + 1..])
        {
            return string();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::*;

    const FILE: FileId = FileId(3);

    /// The fast path, when it takes the input, must build exactly what serde-saphyr builds
    /// (kinds, values, spans, document order). Returns whether it took the input.
    fn check_same(text: &str, limits: &ParseLimits) -> bool {
        let Some(fast) = fast::parse(FILE, text, limits) else {
            return false;
        };
        match parse_with_serde_saphyr(FILE, text, limits) {
            Ok(reference) => assert_eq!(fast, reference, "fast path differs on {text:?}"),
            Err(d) => panic!("fast path accepted what serde-saphyr rejects ({d:?}): {text:?}"),
        }
        true
    }

    fn yaml_files(dir: &Path) -> Vec<(PathBuf, String)> {
        let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .filter_map(|p| Some((p.clone(), std::fs::read_to_string(&p).ok()?)))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    fn manifest(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    /// The fixtures and fuzz seeds: every file the fast path takes gives the same tree.
    fn corpus() -> Vec<(PathBuf, String)> {
        let mut files = Vec::new();
        for dir in [
            "tests/fixtures/valid",
            "tests/fixtures/invalid",
            "../../fuzz/seeds/parse_compile",
            "../../fuzz/regressions/parse_compile",
        ] {
            files.extend(yaml_files(&manifest(dir)));
        }
        files
    }

    #[test]
    fn fast_path_matches_serde_saphyr_on_the_corpus() {
        let corpus = corpus();
        assert!(corpus.len() >= 25, "corpus not found: {} files", corpus.len());
        let taken = corpus.iter().filter(|(_, text)| check_same(text, &ParseLimits::default()));
        assert!(taken.count() >= 20);
    }

    #[test]
    fn fast_path_takes_ordinary_policy_files() {
        // The valid fixtures use every field of the language; none needs the slow path.
        for (path, text) in yaml_files(&manifest("tests/fixtures/valid")) {
            assert!(check_same(&text, &ParseLimits::default()), "slow path for {path:?}");
        }
        let text = "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: web}\nspec:\n  \
                    ingress:\n    - {action: allow, from: [10.0.0.0/8, 198.51.100.7, \
                    '2001:db8::/48', {set: office}], proto: tcp, ports: [443, 8000-8100], \
                    log: true}\n---\n---\nkind: x\n";
        assert!(check_same(text, &ParseLimits::default()));
        let nodes = fast::parse(FILE, text, &ParseLimits::default()).unwrap_or_default();
        assert_eq!(nodes.len(), 2, "the empty document in the middle is dropped");
    }

    #[test]
    fn fast_path_hands_over_what_it_does_not_handle() {
        let limits = ParseLimits::default();
        for text in [
            "a: &x 1\nb: *x\n",
            "a: !!str 1\n",
            "<<: {a: 1}\n",
            "? [a]\n: b\n",
            "a: -1\n",
            "a: 1.5\n",
            "a: 0x1f\n",
            "a: 1_000\n",
            "a: .inf\n",
            "a: 007\n",
            "a: 99999999999999999999\n",
            "a: [1, 2\n",
            "a:\n\t- b\n",
        ] {
            assert!(fast::parse(FILE, text, &limits).is_none(), "{text:?}");
            // And the public entry point still gives serde-saphyr's answer.
            assert_eq!(
                parse(FILE, text.as_bytes(), &limits),
                parse_with_serde_saphyr(FILE, text, &limits)
            );
        }
        // Nesting at the fast path's depth goes to the reference path; within, it stays.
        let nested = |d: usize| format!("{}1{}", "[".repeat(d), "]".repeat(d));
        assert!(check_same(&nested(fast::MAX_DEPTH - 1), &limits));
        assert!(fast::parse(FILE, &nested(fast::MAX_DEPTH), &limits).is_none());
        // Budgets: over-limit inputs still get serde-saphyr's budget error.
        let small = ParseLimits { max_events: 20, ..limits };
        let many = format!("[{}]", vec!["1"; 30].join(", "));
        assert!(fast::parse(FILE, &many, &small).is_none());
        let err = parse(FILE, many.as_bytes(), &small).expect_err("over budget");
        assert_eq!(err.code, Code::InputTooLarge);
    }

    #[test]
    fn plain_scalars_resolve_like_serde_saphyr() {
        for (text, kind) in [
            ("~", NodeKind::Null),
            ("Yes", NodeKind::Bool(true)),
            ("off", NodeKind::Bool(false)),
            ("0", NodeKind::Int(0)),
            ("443", NodeKind::Int(443)),
            ("nan", NodeKind::Str("nan".into())),
            ("10.0.0.0/8", NodeKind::Str("10.0.0.0/8".into())),
            ("1.2.3.4", NodeKind::Str("1.2.3.4".into())),
            ("0-65535", NodeKind::Str("0-65535".into())),
        ] {
            assert_eq!(fast::plain_scalar(text), Some(kind), "{text:?}");
            assert!(check_same(&format!("k: {text}\n{text}: v\n"), &ParseLimits::default()));
        }
    }

    /// Spellings near every rule of `plain_scalar`: whatever it resolves must resolve the
    /// same way in serde-saphyr, as a value, a key and a flow item.
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9a-fA-FxXoObBeEiInNyY+._~-]{0,6}",
            "[0-9]{1,4}(\\.[0-9]{0,3}){0,4}(/[0-9]{1,3})?",
            "[0-9]{1,21}",
            "[0-9]{1,5}-[0-9]{0,5}",
            "(true|false|yes|no|on|off|null|inf|nan|y|n)",
            "[a-zA-Z0-9:/_.-]{1,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

        #[test]
        fn generated_scalars_agree(s in scalar()) {
            let limits = ParseLimits::default();
            for text in [format!("k: {s}\n"), format!("{s}: v\n"), format!("[{s}, x]\n"),
                         format!("- '{s}'\n- \"{s}\"\n")] {
                check_same(&text, &limits);
            }
        }

        /// Mutated corpus files: wherever the fast path takes a mutant, it agrees.
        #[test]
        fn mutated_corpus_agrees(
            file in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            token in prop::sample::select(vec![
                "", " ", "\n", "\t", ":", "- ", "[", "]", "{", "}", ",", "'", "\"", "#", "&a ",
                "*a", "!!str ", "---\n", "...\n", "<<", "? ", "|\n", ">\n", "~", "0x1", "-1",
                "1.5", "yes", "  ", "\n  ", "%YAML 1.2\n---\n",
            ]),
            cut in 0usize..4,
        ) {
            let corpus = corpus();
            let (_, text) = &corpus[file.index(corpus.len())];
            let mut at = at.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mut end = (at + cut).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let mutant = format!("{}{token}{}", &text[..at], &text[end..]);
            check_same(&mutant, &ParseLimits::default());
        }
    }
}
