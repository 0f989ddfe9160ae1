//! The fuzz target's check on stable, so CI covers it without nightly or libFuzzer.
//!
//! Inputs are the fuzz seeds (`fuzz/seeds/parse_compile/`), any saved regressions
//! (`fuzz/regressions/parse_compile/`), a few hundred proptest mutations of the seeds (byte
//! flips and overwrites, truncations, deletions, splices of bytes and of whole lines between
//! seeds, insertions of YAML-significant tokens), and small generated policy sets. Each goes
//! through `load::load`; when a policy set comes out, the shared oracle compiles it for
//! several hosts and requires `MapState::lookup == eval::evaluate` on probe flows. A panic
//! anywhere fails the test, and proptest shrinks the input to a small reproducer.

#[path = "../benches/oracle/mod.rs"]
mod oracle;
#[path = "../benches/policygen/mod.rs"]
mod policygen;

use std::path::PathBuf;

use fw_compiler::mapstate::Capacities;
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use fw_compiler::{compile, load};
use proptest::prelude::*;
use proptest::sample::Index;

fn fuzz_dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz").join(sub)
}

/// Every file of a folder, sorted by name; an absent folder is empty.
fn read_dir(sub: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fuzz_dir(sub))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .filter_map(|e| {
                    let bytes = std::fs::read(e.path()).ok()?;
                    Some((e.file_name().to_string_lossy().into_owned(), bytes))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn seeds() -> Vec<Vec<u8>> {
    read_dir("seeds/parse_compile").into_iter().map(|(_, b)| b).collect()
}

/// Smaller than the fuzz target's budget: the test runs unoptimised.
fn budget() -> oracle::Budget {
    oracle::Budget { flows_per_host: 150, hosts: 5, determinism: true }
}

#[test]
fn seeds_load_compile_and_agree() {
    let seeds = read_dir("seeds/parse_compile");
    assert!(seeds.len() >= 5, "expected the fuzz seeds in fuzz/seeds/parse_compile");
    let mut loaded = 0;
    let mut flows = 0;
    for (name, bytes) in &seeds {
        let stats = oracle::check_bytes(bytes, &budget()).unwrap_or_else(|e| panic!("{name}: {e}"));
        loaded += usize::from(stats.loaded);
        flows += stats.flows;
    }
    // Only errors.yaml is meant to be rejected; the rest must really be compiled and checked,
    // or this test proves nothing.
    assert!(loaded >= seeds.len() - 1, "only {loaded} of {} seeds loaded", seeds.len());
    assert!(flows > 1000, "only {flows} flows compared");
}

#[test]
fn saved_regressions_stay_fixed() {
    for (name, bytes) in read_dir("regressions/parse_compile") {
        if name.ends_with(".md") {
            continue;
        }
        if let Err(e) = oracle::check_bytes(&bytes, &budget()) {
            panic!("regression {name}: {e}");
        }
    }
}

#[test]
fn generated_policy_sets_agree() {
    for seed in 0..6u64 {
        let generated = policygen::rules_corpus(60, seed);
        let text =
            generated.files.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("---\n");
        let stats = oracle::check_bytes(text.as_bytes(), &budget())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            stats.loaded && stats.compiled > 0,
            "generated set {seed} did not load and compile: {stats:?}"
        );
    }
}

/// The oracle is only worth running if it notices a wrong state: compile the quickstart
/// example, then hold that state against the policy with its `ssh` rule removed.
#[test]
fn the_oracle_notices_a_wrong_compile() {
    let bytes =
        std::fs::read(fuzz_dir("seeds/parse_compile/quickstart.yaml")).expect("quickstart seed");
    let loaded = load::load([load::Input::new("quickstart.yaml", bytes)], &ParseLimits::default());
    let set = loaded.policy_set.as_ref().expect("quickstart loads");
    let policy = set.for_host(&HostIdentity::default());
    let state = compile::compile(&policy, &Capacities::default()).expect("quickstart compiles");
    let flows = oracle::probe_flows(&policy, &[], 400);
    assert_eq!(oracle::compare(&policy, &state, &flows), Ok(flows.len()));

    let mut wrong = policy.clone();
    wrong.rules.retain(|r| r.name.as_deref() != Some("ssh"));
    assert_eq!(wrong.rules.len() + 1, policy.rules.len());
    let err = oracle::compare(&wrong, &state, &flows).expect_err("a missing rule must be noticed");
    assert!(err.contains("port: Some(22)"), "{err}");
}

/// One edit of an input. Byte-level edits test the parser's robustness; the line- and
/// value-level ones mostly keep the text valid, so a good share of mutants gets through to
/// resolving and compiling (which is where lookup and evaluation can disagree).
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit {
        at: Index,
        bit: u8,
    },
    SetByte {
        at: Index,
        byte: u8,
    },
    Truncate {
        at: Index,
    },
    Delete {
        at: Index,
        len: u8,
    },
    /// Bytes of another seed inserted here.
    Splice {
        at: Index,
        from: Index,
        from_at: Index,
        len: u8,
    },
    /// A line replaced by a line of another seed with the same indentation.
    SwapLine {
        line: Index,
        from: Index,
        from_line: Index,
    },
    /// A line deleted; list items (`- ...`) preferred.
    DeleteLine {
        line: Index,
    },
    /// A line repeated; list items preferred (a repeated key is just a duplicate-key error).
    DuplicateLine {
        line: Index,
    },
    InsertToken {
        at: Index,
        token: Index,
    },
    /// A scalar (after `: `, `[` or `, `) replaced by a value that suits its key (`action:`
    /// gets an action, `ports:` a port), sometimes by any value.
    ReplaceValue {
        at: Index,
        value: Index,
        fitting: bool,
    },
}

/// Tokens that change meaning rather than just break the syntax.
#[rustfmt::skip]
const TOKENS: &[&str] = &[
    ": ", "- ", "{", "}", "[", "]", ",", "\n", "---\n", "&a ", "*a", "!!str ", "\"", "'", "#",
    "any", "deny", "allow", "audit", "0.0.0.0/0", "::/0", "/0", "/32", "/128", "0-65535", "65536",
    "{set: a}", "except: []", "icmpv6", "workloads: [a]", "~", "null", "\u{feff}", "\t", "é",
];

/// Values by the key they follow; the last entry is the fallback for any key.
#[rustfmt::skip]
const VALUES: &[(&[&str], &[&str])] = &[
    (&["action"], &["allow", "deny"]),
    (&["mode"], &["audit", "enforce"]),
    (&["ingress", "egress"], &["allow", "deny", "[]"]),
    (&["proto"], &["tcp", "udp", "icmp", "icmpv6", "any"]),
    (&["direction"], &["ingress", "egress"]),
    (&["expect"], &["allow", "deny", "audit-deny"]),
    (&["ports", "port"], &["1", "22", "443", "65535", "80-90", "1-65535", "442-444", "0", "70000"]),
    (&["icmp"], &["echo-request", "echo-reply", "0", "3", "8", "128", "129", "2", "255", "packet-too-big"]),
    (&["from", "to", "addresses", "except"], &[
        "any", "0.0.0.0/0", "::/0", "10.0.0.0/8", "10.0.0.1", "10.0.0.0/31", "10.0.0.255",
        "fd00::/8", "2001:db8::1", "\"::ffff:10.0.0.1\"", "255.255.255.255/32", "0.0.0.0/32",
        "128.0.0.0/1", "{set: inner}", "{set: staff}", "{set: blocklist}", "{set: admins}",
    ]),
    (&["workloads", "workload"], &["system.slice/app.service", "system.slice", "user.slice/x", "a/b/c"]),
    (&["role", "zone", "name"], &["web", "db", "web-1", "edge-1", "bastion", "x"]),
    (&[], &["any", "deny", "tcp", "[]", "{}", "null", "true", "1", "web-*", "/", "x", "10.0.0.0/8"]),
];

fn values_for(key: &str) -> &'static [&'static str] {
    VALUES.iter().find(|(keys, _)| keys.is_empty() || keys.contains(&key)).map_or(&[], |(_, v)| v)
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let index = any::<Index>;
    prop_oneof![
        6 => (index(), index(), prop::bool::weighted(0.85))
            .prop_map(|(at, value, fitting)| Mutation::ReplaceValue { at, value, fitting }),
        2 => (index(), index(), index())
            .prop_map(|(line, from, from_line)| Mutation::SwapLine { line, from, from_line }),
        2 => index().prop_map(|line| Mutation::DeleteLine { line }),
        2 => index().prop_map(|line| Mutation::DuplicateLine { line }),
        1 => (index(), index()).prop_map(|(at, token)| Mutation::InsertToken { at, token }),
        1 => (index(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        1 => (index(), any::<u8>()).prop_map(|(at, byte)| Mutation::SetByte { at, byte }),
        1 => index().prop_map(|at| Mutation::Truncate { at }),
        1 => (index(), 1u8..32).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (index(), index(), index(), 1u8..64)
            .prop_map(|(at, from, from_at, len)| Mutation::Splice { at, from, from_at, len }),
    ]
}

/// Byte ranges of the lines of `text`, newline included.
fn lines(text: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &b) in text.iter().enumerate() {
        if b == b'\n' {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < text.len() {
        out.push((start, text.len()));
    }
    out
}

fn indent(line: &[u8]) -> usize {
    line.iter().take_while(|&&b| b == b' ').count()
}

/// Lines that are list items (`- ...`), or every line when there are none.
fn items(text: &[u8]) -> Vec<(usize, usize)> {
    let all = lines(text);
    let items: Vec<(usize, usize)> = all
        .iter()
        .copied()
        .filter(|&(a, b)| text[a..b].trim_ascii_start().starts_with(b"- "))
        .collect();
    if items.is_empty() { all } else { items }
}

/// The key whose value starts at `at`: the last `word:` on the line before it.
fn key_before(input: &[u8], at: usize) -> String {
    let line_start = input[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let before = String::from_utf8_lossy(&input[line_start..at]).into_owned();
    let Some(colon) = before.rfind(':') else {
        return String::new();
    };
    let key: String = before[..colon]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    key.chars().rev().collect()
}

fn apply(input: &mut Vec<u8>, m: &Mutation, seeds: &[Vec<u8>]) {
    let other = |from: &Index| &seeds[from.index(seeds.len())];
    match m {
        Mutation::FlipBit { at, bit } if !input.is_empty() => {
            let i = at.index(input.len());
            input[i] ^= 1 << bit;
        }
        Mutation::SetByte { at, byte } if !input.is_empty() => {
            let i = at.index(input.len());
            input[i] = *byte;
        }
        Mutation::Truncate { at } => {
            let i = at.index(input.len() + 1);
            input.truncate(i);
        }
        Mutation::Delete { at, len } if !input.is_empty() => {
            let i = at.index(input.len());
            let end = (i + usize::from(*len)).min(input.len());
            input.drain(i..end);
        }
        Mutation::Splice { at, from, from_at, len } => {
            let src = other(from);
            if src.is_empty() {
                return;
            }
            let s = from_at.index(src.len());
            let e = (s + usize::from(*len)).min(src.len());
            let i = at.index(input.len() + 1);
            input.splice(i..i, src[s..e].iter().copied());
        }
        Mutation::SwapLine { line, from, from_line } => {
            let (mine, src) = (lines(input), other(from));
            if mine.is_empty() {
                return;
            }
            let (a, b) = mine[line.index(mine.len())];
            let want = indent(&input[a..b]);
            let theirs: Vec<(usize, usize)> =
                lines(src).into_iter().filter(|&(c, d)| indent(&src[c..d]) == want).collect();
            if theirs.is_empty() {
                return;
            }
            let (c, d) = theirs[from_line.index(theirs.len())];
            let mut replacement = src[c..d].to_vec();
            if !replacement.ends_with(b"\n") && input[a..b].ends_with(b"\n") {
                replacement.push(b'\n');
            }
            input.splice(a..b, replacement);
        }
        Mutation::DeleteLine { line } => {
            let mine = items(input);
            if !mine.is_empty() {
                let (a, b) = mine[line.index(mine.len())];
                input.drain(a..b);
            }
        }
        Mutation::DuplicateLine { line } => {
            let mine = items(input);
            if !mine.is_empty() {
                let (a, b) = mine[line.index(mine.len())];
                let mut copy = input[a..b].to_vec();
                if !copy.ends_with(b"\n") {
                    copy.insert(0, b'\n');
                }
                input.splice(b..b, copy);
            }
        }
        Mutation::InsertToken { at, token } => {
            let i = at.index(input.len() + 1);
            let t = TOKENS[token.index(TOKENS.len())].as_bytes();
            input.splice(i..i, t.iter().copied());
        }
        Mutation::ReplaceValue { at, value, fitting } => {
            let starts: Vec<usize> = (1..input.len())
                .filter(|&i| {
                    let before = &input[..i];
                    before.ends_with(b": ") || before.ends_with(b"[") || before.ends_with(b", ")
                })
                .collect();
            if starts.is_empty() {
                return;
            }
            let s = starts[at.index(starts.len())];
            let e =
                input[s..].iter().position(|b| b",]}\n".contains(b)).map_or(input.len(), |p| s + p);
            let choices =
                values_for(if *fitting { key_before(input, s) } else { String::new() }.as_str());
            if choices.is_empty() {
                return;
            }
            let v = choices[value.index(choices.len())].as_bytes();
            input.splice(s..e, v.iter().copied());
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds_never_panic_and_agree(
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let seeds = seeds();
        prop_assume!(!seeds.is_empty());
        let mut input = seeds[seed.index(seeds.len())].clone();
        for m in &mutations {
            apply(&mut input, m, &seeds);
        }
        if let Err(e) = oracle::check_bytes(&input, &budget()) {
            panic!("input:\n{}\n---\n{e}", String::from_utf8_lossy(&input));
        }
    }
}
