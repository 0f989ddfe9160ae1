//! Fixture snapshots for parsing and lowering.
//!
//! Every file under `fixtures/invalid/` is named after the code it demonstrates
//! (`fw008-invalid-cidr.yaml`) and must produce that code; its diagnostics are snapshotted in a
//! plain text form with the source line under each, so a reviewer can read the snapshot and
//! judge whether every message is right and helpful. Every file under `fixtures/valid/` must
//! lower without a diagnostic; a compact form of its documents (no spans) is snapshotted.
//! Inputs that are impractical as files (an alias bomb, non-UTF-8 bytes, 100 MB) are built here.
//!
//! Update snapshots with `INSTA_UPDATE=always cargo test -p fw-compiler --test lower_fixtures`
//! (or `cargo insta review`), then read the changed `.snap` files.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fw_compiler::ast::{AddressItem, Document, Rule};
use fw_compiler::diag::{Code, Diagnostic, Diagnostics};
use fw_compiler::lower::lower;
use fw_compiler::source::{FileId, SourceFile, SourceMap};
use fw_compiler::yaml::{ParseLimits, parse};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The `.yaml` files of one fixture folder, sorted, as paths relative to `fixtures/`.
fn fixture_files(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join(dir))
        .expect("fixture folder exists")
        .map(|e| e.expect("readable entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    names.sort();
    names
}

/// Parses and lowers one file's bytes under a display name.
fn run(name: &str, bytes: &[u8]) -> (SourceMap, Vec<Document>, Vec<Diagnostic>) {
    let mut sources = SourceMap::new();
    // Non-UTF-8 input is kept lossily for display; the parser sees the real bytes.
    let file = sources.add(SourceFile::new(name, String::from_utf8_lossy(bytes).into_owned()));
    match parse(file, bytes, &ParseLimits::default()) {
        Ok(nodes) => {
            let (docs, diags) = lower(&nodes);
            // In position order, as the CLI shows them.
            let diags = Diagnostics { items: diags }.into_sorted();
            (sources, docs, diags)
        }
        Err(d) => (sources, Vec::new(), vec![d]),
    }
}

/// One block per diagnostic: the `file:line:col: severity[code] message` line, the source line
/// with the primary span underlined and labelled, then related locations and the hint.
fn render(sources: &SourceMap, diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diags {
        let r = d.to_record(sources);
        let severity = if d.is_error() { "error" } else { "warning" };
        let at = match (&r.file, r.line, r.column) {
            (Some(f), Some(l), Some(c)) => format!("{f}:{l}:{c}: "),
            _ => String::new(),
        };
        let _ = writeln!(out, "{at}{severity}[{}] {}", r.code, r.message);
        if let (Some(primary), Some(line), Some(col)) = (&d.primary, r.line, r.column) {
            let file = sources.get(primary.span.file);
            let text = file.text.lines().nth(line as usize - 1).unwrap_or("");
            // Long lines (the deep-nesting fixture) are cut around the column.
            let skip = (col as usize - 1).saturating_sub(40);
            let shown: String = text.chars().skip(skip).take(100).collect();
            let width = match r.end {
                Some((end_line, end_col)) if end_line == line => (end_col - col).max(1),
                _ => 1,
            } as usize;
            let pad = col as usize - 1 - skip;
            let _ = writeln!(out, "    | {}", shown.replace('\t', "→"));
            let _ = writeln!(
                out,
                "    | {}{} {}",
                " ".repeat(pad),
                "^".repeat(width),
                r.label.as_deref().unwrap_or("")
            );
        }
        for rel in &r.related {
            let _ = writeln!(out, "    = related: {}: {}", rel.location, rel.message);
        }
        if let Some(h) = &r.hint {
            let _ = writeln!(out, "    = hint: {h}");
        }
    }
    out
}

/// The code a fixture is named after: `invalid/fw008-invalid-cidr.yaml` -> `FW008`.
fn code_of(name: &str) -> Option<Code> {
    let stem = name.rsplit('/').next()?;
    let code = stem.get(..5)?.to_ascii_uppercase();
    Code::ALL.iter().copied().find(|c| c.as_str() == code)
}

fn snapshot_name(name: &str) -> String {
    name.trim_end_matches(".yaml").replace('/', "__")
}

#[test]
fn invalid_fixtures_report_their_code() {
    let mut seen = BTreeSet::new();
    for name in fixture_files("invalid") {
        let bytes = std::fs::read(fixtures().join(&name)).expect("readable fixture");
        let (sources, docs, diags) = run(&name, &bytes);
        let code = code_of(&name).unwrap_or_else(|| panic!("{name}: not named after a code"));
        assert!(diags.iter().any(|d| d.code == code), "{name}: expected {code}, got {diags:#?}");
        // Files under invalid/ hold only broken documents, so nothing may lower.
        assert!(docs.is_empty(), "{name}: lowered {docs:#?}");
        seen.insert(code);
        insta::assert_snapshot!(snapshot_name(&name), render(&sources, &diags));
    }
    // Every code that parsing and lowering can produce has a fixture (FW021 is built in
    // `not_utf8`; the rest belong to later stages).
    let produced_here = [
        Code::YamlSyntax,
        Code::DuplicateKey,
        Code::UnknownField,
        Code::WrongType,
        Code::MissingField,
        Code::UnknownApiVersion,
        Code::UnknownKind,
        Code::InvalidCidr,
        Code::HostBitsSet,
        Code::InvalidIp,
        Code::PortOutOfRange,
        Code::ReversedRange,
        Code::PortsNeedTcpUdp,
        Code::DuplicateName,
        Code::EmptyAddressList,
        Code::InputTooLarge,
        Code::InvalidValue,
        Code::FieldNotAllowed,
        Code::InvalidIcmpType,
        Code::InvalidWorkload,
        Code::InvalidSelector,
    ];
    for code in produced_here {
        assert!(seen.contains(&code), "no fixture under invalid/ for {code}");
    }
}

#[test]
fn valid_fixtures_lower_cleanly() {
    let files = fixture_files("valid");
    assert!(!files.is_empty());
    for name in files {
        let bytes = std::fs::read(fixtures().join(&name)).expect("readable fixture");
        let (sources, docs, diags) = run(&name, &bytes);
        assert!(diags.is_empty(), "{name}:\n{}", render(&sources, &diags));
        assert!(!docs.is_empty(), "{name}: no documents");
        let shown: Vec<String> = docs.iter().map(show).collect();
        insta::assert_snapshot!(snapshot_name(&name), shown.join("\n"));
    }
}

/// A compact, span-free form of a document for snapshots.
fn show(doc: &Document) -> String {
    let mut out = String::new();
    let meta = doc.metadata();
    let _ = write!(out, "{} {}", doc.kind().as_str(), meta.name.value);
    if let Some(d) = &meta.description {
        let _ = write!(out, " ({d:?})");
    }
    out.push('\n');
    match doc {
        Document::AddressSet(s) => {
            let _ = writeln!(out, "  addresses: {}", addrs(s.addresses.iter().map(|a| &a.value)));
            if !s.except.is_empty() {
                let _ = writeln!(out, "  except: {}", addrs(s.except.iter().map(|a| &a.value)));
            }
        }
        Document::Policy(p) => {
            let _ = writeln!(out, "  mode: {:?}", p.mode);
            if let Some(h) = &p.hosts {
                let labels: Vec<String> =
                    h.labels.iter().map(|(k, v)| format!("{k}={}", v.value)).collect();
                let names: Vec<&str> = h.names.iter().map(|n| n.value.as_str()).collect();
                let _ = writeln!(out, "  hosts: labels [{}] names {names:?}", labels.join(", "));
            }
            let d = |a: Option<fw_compiler::source::Sp<fw_compiler::ast::Action>>| {
                a.map_or("-", |a| a.value.as_str())
            };
            let _ = writeln!(
                out,
                "  defaults: ingress {} egress {}",
                d(p.defaults.ingress),
                d(p.defaults.egress)
            );
            for (dir, rules) in [("ingress", &p.ingress), ("egress", &p.egress)] {
                for r in rules {
                    let _ = writeln!(out, "  {dir} {}", rule(r));
                }
            }
        }
        Document::PolicyTest(t) => {
            let labels: Vec<String> =
                t.host.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "  host: {} [{}]", t.host.name.value, labels.join(", "));
            for c in &t.cases {
                let _ = write!(
                    out,
                    "  case {} {} {}",
                    c.direction.as_str(),
                    c.peer.value,
                    c.proto.as_str()
                );
                if let Some(p) = c.port {
                    let _ = write!(out, " port {p}");
                }
                if let Some(t) = c.icmp {
                    let _ = write!(out, " icmp {t}");
                }
                if let Some(w) = &c.workload {
                    let _ = write!(out, " workload {w}");
                }
                let _ = writeln!(out, " -> {}", c.expect.value.as_str());
            }
        }
    }
    out
}

fn addrs<'a>(items: impl Iterator<Item = &'a AddressItem>) -> String {
    let shown: Vec<String> = items
        .map(|a| match a {
            AddressItem::Net(n) => n.to_string(),
            AddressItem::Set(s) => format!("{{set: {}}}", s.value),
            AddressItem::Any => "any".into(),
        })
        .collect();
    format!("[{}]", shown.join(", "))
}

fn rule(r: &Rule) -> String {
    let mut out = format!(
        "{} {}",
        r.name.as_ref().map_or("#", |n| n.value.as_str()),
        r.action.value.as_str()
    );
    if let Some(p) = &r.peers {
        let _ = write!(out, " peers {}", addrs(p.iter().map(|a| &a.value)));
    }
    let _ = write!(out, " proto {}", r.proto.value.as_str());
    if !r.ports.is_empty() {
        let ports: Vec<String> = r
            .ports
            .iter()
            .map(|p| {
                if p.start == p.end {
                    p.start.to_string()
                } else {
                    format!("{}-{}", p.start, p.end)
                }
            })
            .collect();
        let _ = write!(out, " ports [{}]", ports.join(", "));
    }
    if !r.icmp.is_empty() {
        let types: Vec<u8> = r.icmp.iter().map(|t| t.value).collect();
        let _ = write!(out, " icmp {types:?}");
    }
    if !r.workloads.is_empty() {
        let w: Vec<&str> = r.workloads.iter().map(|w| w.value.as_str()).collect();
        let _ = write!(out, " workloads {w:?}");
    }
    if r.log {
        out.push_str(" log");
    }
    out
}

// ---- generated inputs -----------------------------------------------------------------------

/// The billion laughs: ten levels of aliases, each nine copies of the one before.
fn alias_bomb() -> String {
    let mut text =
        String::from("apiVersion: fw/v1\nkind: AddressSet\nmetadata: {name: lol}\nspec:\n");
    text.push_str("  a: &a [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n");
    let letters: Vec<char> = ('a'..='j').collect();
    for pair in letters.windows(2) {
        let (prev, cur) = (pair[0], pair[1]);
        let refs = vec![format!("*{prev}"); 9].join(", ");
        let _ = writeln!(text, "  {cur}: &{cur} [{refs}]");
    }
    text.push_str("  addresses: *j\n");
    text
}

/// Runs `f` and checks it took less than `limit`: hostile input must end quickly.
fn quickly<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < limit, "took {took:?}");
    out
}

fn codes(diags: &[Diagnostic]) -> Vec<Code> {
    diags.iter().map(|d| d.code).collect()
}

#[test]
fn alias_bomb_is_over_budget() {
    let text = alias_bomb();
    let (sources, docs, diags) = quickly(Duration::from_secs(10), || {
        run("generated/fw020-alias-bomb.yaml", text.as_bytes())
    });
    assert!(docs.is_empty());
    assert_eq!(codes(&diags), [Code::InputTooLarge]);
    insta::assert_snapshot!("generated__fw020-alias-bomb", render(&sources, &diags));
}

#[test]
fn deep_nesting_is_over_budget() {
    for (name, text) in [
        ("flow-seq", format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
        ("flow-map", format!("{}1{}", "{a: ".repeat(10_000), "}".repeat(10_000))),
        ("block", (0..2_000).map(|i| format!("{}k:\n", " ".repeat(i))).collect::<String>()),
    ] {
        let (_, docs, diags) = quickly(Duration::from_secs(10), || run(name, text.as_bytes()));
        assert!(docs.is_empty(), "{name}");
        assert_eq!(codes(&diags), [Code::InputTooLarge], "{name}");
    }
}

#[test]
fn wide_input_lowers_in_linear_time() {
    // Many keys, many duplicate keys and many list items: each is one diagnostic, found without
    // comparing every key with every other.
    let mut text = String::from("apiVersion: fw/v1\nkind: Policy\nmetadata: {name: wide}\nspec:\n");
    for i in 0..50_000 {
        let _ = writeln!(text, "  unknown{i}: 1");
    }
    for _ in 0..20_000 {
        text.push_str("  mode: audit\n");
    }
    text.push_str("  ingress:\n    - action: allow\n      ports: [");
    text.push_str(&vec!["0"; 50_000].join(", "));
    text.push_str("]\n");
    let (_, docs, diags) = quickly(Duration::from_secs(20), || run("wide", text.as_bytes()));
    assert!(docs.is_empty());
    let count = |code| diags.iter().filter(|d| d.code == code).count();
    assert_eq!(count(Code::UnknownField), 50_000);
    assert_eq!(count(Code::DuplicateKey), 19_999);
    assert_eq!(count(Code::PortOutOfRange), 50_000);
}

#[test]
fn huge_input_is_rejected_by_size_before_parsing() {
    let junk = vec![b'x'; 100 << 20];
    // The size check comes first, so this is as fast as the check itself; parsing 100 MB would
    // take far longer.
    let result =
        quickly(Duration::from_secs(2), || parse(FileId(0), &junk, &ParseLimits::default()));
    let d = result.expect_err("100 MB must be rejected");
    assert_eq!(d.code, Code::InputTooLarge);
    assert!(d.message.contains("104857600 bytes"), "{}", d.message);
}

#[test]
fn not_utf8_is_reported_at_the_bad_byte() {
    let mut bytes = b"apiVersion: fw/v1\nkind: AddressSet\nmetadata: {name: caf".to_vec();
    bytes.extend_from_slice(&[0xe9]); // Latin-1 'é'
    bytes.extend_from_slice(b"}\nspec: {addresses: [10.0.0.0/8]}\n");
    let (sources, docs, diags) = run("generated/fw021-not-utf8.yaml", &bytes);
    assert!(docs.is_empty());
    assert_eq!(codes(&diags), [Code::NotUtf8]);
    insta::assert_snapshot!("generated__fw021-not-utf8", render(&sources, &diags));
}

#[test]
fn random_binary_ends_in_a_diagnostic() {
    // A fixed xorshift stream, so a failure is reproducible.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..20 {
        let bytes: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Some rounds stay in printable ASCII, so the YAML parser (not the UTF-8 check)
                // sees them.
                if round % 2 == 0 { (state >> 24) as u8 } else { b' ' + (state >> 24) as u8 % 95 }
            })
            .collect();
        let (_, docs, diags) = quickly(Duration::from_secs(10), || run("random", &bytes));
        assert!(docs.is_empty(), "round {round}");
        assert!(!diags.is_empty(), "round {round}");
    }
}
