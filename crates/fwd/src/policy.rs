//! From a commit's policy files to the state the kernel should hold, or to the reasons it
//! cannot.
//!
//! Why it is built this way:
//! - The files come from the commit's tree in memory ([`crate::source::Snapshot`]) and go to
//!   the compiler as named byte buffers (`fw_compiler::load::Input`): nothing is read from a
//!   work tree, so the state compiled is exactly the commit's.
//! - A commit is rejected as a whole ([`Rejected`]) when any file fails to validate, when it
//!   does not compile for this host, or when it does not fit the maps; the first error's
//!   file:line:column *in that commit* is kept so status, logs and metrics can point at it.
//! - A commit with no policy file at all is rejected too: an empty folder (a wrong
//!   `source.path`, a commit that moved the folder) compiling to "no rules" and being
//!   enforced is the kind of mistake a daemon must not make on its own.
//! - What is saved with the applied generation is the rule table (the state without its
//!   prefix and port entries), the same bytes `fwctl apply` saves, so `fwctl status` and
//!   `fwctl diff` name rules of a state fwd applied.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fw_compiler::cache::LoadCache;
use fw_compiler::compile::{CompileMemo, compile, compile_reusing};
use fw_compiler::encode::Encoded;
use fw_compiler::incremental::{DigestMarks, digest_reusing, encode_reusing};
use fw_compiler::load::{Input, Loaded, load};
use fw_compiler::mapstate::{Capacities, DirectionMaps, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use serde::Serialize;

use crate::source::PolicyFile;

/// The state to enforce, compiled from one commit.
#[derive(Clone, Debug)]
pub struct Desired {
    /// The compiled state, with its entries: the next commit's encoding and digest reuse
    /// what depends only on its parts that did not change (`fw_compiler::incremental`).
    pub state: MapState,
    /// `encode(state)`; its workload table (keyed by cgroup path) is what the loader checks,
    /// the kernel's is keyed by cgroup id and written from the resolved paths.
    pub encoded: Encoded,
    pub digest: String,
    /// The digest's hash after each part of the state, to resume it from next time.
    pub marks: DigestMarks,
    /// The maps of `encoded` taken from the previous state's encoding
    /// (`fw_compiler::incremental::encode_reusing`): the same buffers, shared, so they cost
    /// no memory of their own and diff as equal without being read.
    pub reused: Vec<&'static str>,
    /// The rule table, as JSON (see the module docs; [`saved_table`]). fwd empties it once
    /// the state is applied and writes it again from `state` when it applies the state again.
    pub saved: Vec<u8>,
}

/// Which stage refused a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// No policy file, or a file does not parse or validate.
    Validate,
    /// It does not compile for this host (capacity errors included: it does not fit).
    Compile,
}

/// One error of a rejected commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Problem {
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.file, self.line, self.column) {
            (Some(file), Some(l), Some(c)) => write!(f, "{file}:{l}:{c}: ")?,
            (Some(file), _, _) => write!(f, "{file}: ")?,
            _ => {}
        }
        write!(f, "{} [{}]", self.message, self.code)
    }
}

/// Why a commit is not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub stage: Stage,
    /// Every error, in file order; never empty.
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.stage {
            Stage::Validate => "invalid policy",
            Stage::Compile => "does not compile for this host",
        };
        match self.problems.first() {
            Some(p) if self.problems.len() > 1 => {
                write!(f, "{what}: {p} (and {} more)", self.problems.len() - 1)
            }
            Some(p) => write!(f, "{what}: {p}"),
            None => write!(f, "{what}"),
        }
    }
}

/// The rule table as saved with an applied generation (see the module docs), as JSON.
pub fn saved_table(state: &MapState) -> Vec<u8> {
    serde_json::to_vec(&rule_table(state)).unwrap_or_default()
}

/// The state without its prefix and L4 entries: O(rules) rather than O(policy size).
pub fn rule_table(state: &MapState) -> MapState {
    let rules_of = |d: &DirectionMaps| DirectionMaps {
        defaults: d.defaults,
        v4: BTreeMap::new(),
        v6: BTreeMap::new(),
        l4: BTreeMap::new(),
    };
    MapState {
        host: state.host.clone(),
        ingress: rules_of(&state.ingress),
        egress: rules_of(&state.egress),
        workloads: state.workloads.clone(),
        rules: state.rules.clone(),
    }
}

fn strip_entries(state: &mut MapState) {
    for d in [&mut state.ingress, &mut state.egress] {
        d.v4.clear();
        d.v6.clear();
        d.l4.clear();
    }
}

impl Desired {
    /// The entry deltas from `prev` to this state, per map that differs (the maps this state
    /// shares with `prev`'s encoding are skipped without being read).
    pub fn delta_from(&self, prev: &Desired) -> BTreeMap<&'static str, fw_loader::MapDelta> {
        fw_loader::entry_delta(&prev.encoded, &self.encoded)
    }

    /// Drops the state's prefix and port entries, keeping what a daemon needs after the apply
    /// (rules, workloads, host; the entries stay in `encoded`): about half the memory of a
    /// large policy.
    pub fn shrink(&mut self) {
        strip_entries(&mut self.state);
    }
}

/// Compiles `files` (paths relative to the repository root) for `host`.
pub fn desired(
    files: &[PolicyFile],
    host: &HostIdentity,
    caps: &Capacities,
) -> Result<Desired, Rejected> {
    if let Some(r) = no_files(files) {
        return Err(r);
    }
    let limits = ParseLimits::default();
    let inputs = files.iter().map(|f| Input::new(f.path.clone(), f.bytes.clone()));
    let loaded = load(inputs, &limits);
    finish(&loaded, host, caps, None, None, &mut |_| {})
}

/// Compiles commit after commit as [`desired`] does, with the same result for the same
/// files, but parses and lowers only the files that changed since the last compile
/// (`fw_compiler::cache`: a file is reused only when its position, path and bytes are the
/// same), reads from git only the blobs it does not hold yet ([`Compiler::bytes_of`]), and
/// takes a direction's prefix tables from the last compile when its rules' positions, ids and
/// peers did not change (`fw_compiler::compile::compile_reusing`).
#[derive(Debug)]
pub struct Compiler {
    cache: LoadCache,
    /// The blob id of each file of the last compile, by path: the cache's bytes for that path
    /// are that blob's.
    blobs: BTreeMap<String, String>,
    /// The last compile's address tables (`fw_compiler::compile::compile_reusing`).
    memo: CompileMemo,
    spent: Option<Loaded>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self {
            cache: LoadCache::new(ParseLimits::default()),
            blobs: BTreeMap::new(),
            memo: CompileMemo::default(),
            spent: None,
        }
    }
}

impl Compiler {
    /// The bytes of the file at `path` when the last compile read it from blob `blob`.
    pub fn bytes_of(&self, path: &str, blob: &str) -> Option<Vec<u8>> {
        if self.blobs.get(path).map(String::as_str) != Some(blob) {
            return None;
        }
        self.cache.bytes_of(path).map(<[u8]>::to_vec)
    }

    /// [`desired`], timing its steps into `steps` (`parse`: the files that changed, `resolve`,
    /// `select`, `compile`, `encode`, `digest`, `rule table`). `prev`, the state compiled
    /// last (for this host and capacities), lets the encoding and the digest reuse what
    /// depends only on parts of the state that did not change.
    pub fn desired(
        &mut self,
        files: &[PolicyFile],
        host: &HostIdentity,
        caps: &Capacities,
        prev: Option<&Desired>,
        steps: &mut Vec<(&'static str, Duration)>,
    ) -> Result<Desired, Rejected> {
        if let Some(r) = no_files(files) {
            return Err(r);
        }
        let inputs = files.iter().map(|f| Input::new(f.path.clone(), f.bytes.clone()));
        let (loaded, stats) = self.cache.load(inputs);
        self.blobs = files.iter().map(|f| (f.path.clone(), f.blob.clone())).collect();
        steps.push(("parse", stats.parse));
        steps.push(("resolve", stats.resolve));
        let mut lap = Instant::now();
        let out = finish(&loaded, host, caps, prev, Some(&mut self.memo), &mut |name| {
            steps.push((name, lap.elapsed()));
            lap = Instant::now();
        });
        // Dropped by `release`, after the apply.
        self.spent = Some(loaded);
        out
    }

    /// Frees what the last compile left (its documents and policy set: at 100k prefixes,
    /// milliseconds of work that need not delay the apply).
    pub fn release(&mut self) {
        self.spent = None;
    }
}

fn no_files(files: &[PolicyFile]) -> Option<Rejected> {
    if files.is_empty() {
        return Some(Rejected {
            stage: Stage::Validate,
            problems: vec![Problem {
                file: None,
                line: None,
                column: None,
                code: "no-policy".into(),
                message: "the policy folder holds no .yaml or .yml file".into(),
            }],
        });
    }
    None
}

/// From the loaded files to the state: select this host's policy, compile, encode, digest;
/// `step` is called after each of those steps with its name.
fn finish(
    loaded: &Loaded,
    host: &HostIdentity,
    caps: &Capacities,
    prev: Option<&Desired>,
    memo: Option<&mut CompileMemo>,
    step: &mut dyn FnMut(&'static str),
) -> Result<Desired, Rejected> {
    let problems = |diags: &[fw_compiler::diag::Diagnostic]| -> Vec<Problem> {
        diags
            .iter()
            .filter(|d| d.is_error())
            .map(|d| {
                let r = d.to_record(&loaded.sources);
                Problem {
                    file: r.file,
                    line: r.line,
                    column: r.column,
                    code: r.code.to_string(),
                    message: r.message,
                }
            })
            .collect()
    };
    let set = match &loaded.policy_set {
        Some(set) if !loaded.has_errors() => set,
        _ => {
            let mut p = problems(&loaded.diagnostics);
            if p.is_empty() {
                p.push(Problem {
                    file: None,
                    line: None,
                    column: None,
                    code: "invalid".into(),
                    message: "the policy set did not load".into(),
                });
            }
            return Err(Rejected { stage: Stage::Validate, problems: p });
        }
    };
    let policy = set.for_host(host);
    step("select");
    let compiled = match memo {
        Some(memo) => compile_reusing(&policy, caps, memo),
        None => compile(&policy, caps),
    };
    let mut state = compiled
        .map_err(|errors| Rejected { stage: Stage::Compile, problems: problems(&errors) })?;
    drop(policy);
    step("compile");
    let (encoded, reused) = encode_reusing(&mut state, prev.map(|p| (&p.state, &p.encoded)));
    step("encode");
    let (digest, marks) = digest_reusing(&state, prev.map(|p| (&p.state, &p.marks)));
    step("digest");
    let saved = saved_table(&state);
    step("rule table");
    Ok(Desired { digest, marks, reused, encoded, saved, state })
}

/// At most this many lines of [`rule_changes`]; the rest is counted in a last line.
const MAX_CHANGE_LINES: usize = 100;

/// What changes between two states, as rules (`MapState::diff`, the diff `fwctl diff` shows):
/// one line per rule added, removed or changed, per changed default and per workload path.
/// Prefix and port entries are not listed (the rule tables are compared, [`rule_table`]).
pub fn rule_changes(old: &MapState, new: &MapState) -> Vec<String> {
    use fw_compiler::ast::{Action, Direction};
    use fw_compiler::mapstate::RuleInfo;
    let dir = |d: Direction| match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let action = |a: Action| match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    let line = |sign: char, r: &RuleInfo| {
        let who = match &r.name {
            Some(n) => format!("{}/{n}", r.policy),
            None => format!("{}#{}", r.policy, r.index),
        };
        let audit = if r.audit { " [audit]" } else { "" };
        format!(
            "{sign} {} {}{audit} ({who}, {}:{})",
            dir(r.direction),
            r.summary,
            r.location.file,
            r.location.line
        )
    };
    let d = rule_table(old).diff(&rule_table(new));
    let mut out = Vec::new();
    for (_, r) in &d.rules.removed {
        out.push(line('-', r));
    }
    for (_, r) in &d.rules.added {
        out.push(line('+', r));
    }
    for (_, o, n) in &d.rules.changed {
        if o.summary != n.summary || o.action != n.action || o.audit != n.audit {
            out.push(line('-', o));
            out.push(line('+', n));
        } else {
            out.push(format!("{} (metadata: log, name or location)", line('~', n)));
        }
    }
    for (name, dd) in [("ingress", &d.ingress), ("egress", &d.egress)] {
        if let Some((o, n)) = &dd.defaults {
            out.push(format!("~ {name} default {} -> {}", action(o.verdict), action(n.verdict)));
        }
    }
    for (path, class) in &d.workloads.added {
        out.push(format!("+ workload {path} (class {})", class.0));
    }
    for (path, class) in &d.workloads.removed {
        out.push(format!("- workload {path} (class {})", class.0));
    }
    if out.len() > MAX_CHANGE_LINES {
        let more = out.len() - MAX_CHANGE_LINES;
        out.truncate(MAX_CHANGE_LINES);
        out.push(format!("... and {more} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    use fw_compiler::encode::encode;

    use super::*;

    fn file(path: &str, text: &str) -> PolicyFile {
        PolicyFile { path: path.into(), blob: String::new(), bytes: text.as_bytes().to_vec() }
    }

    fn host() -> HostIdentity {
        HostIdentity { name: "h1".into(), labels: Default::default() }
    }

    const GOOD: &str = "apiVersion: fw/v1
kind: Policy
metadata: {name: base}
spec:
  defaults: {ingress: deny}
  ingress:
    - {name: ssh, action: allow, proto: tcp, ports: [22]}
";

    #[test]
    fn a_valid_commit_compiles_to_its_encoding_and_rule_table() {
        let d = desired(&[file("policies/base.yaml", GOOD)], &host(), &Capacities::default())
            .expect("compiles");
        assert_eq!(d.digest, d.state.digest());
        assert_eq!(d.encoded, encode(&d.state));
        let table: MapState = serde_json::from_slice(&d.saved).expect("rule table");
        assert_eq!(table.rules, d.state.rules);
        assert!(table.ingress.l4.is_empty());
    }

    #[test]
    fn an_invalid_file_is_rejected_with_its_file_and_line() {
        let bad = GOOD.replace("proto: tcp", "proto: tcpp");
        let r = desired(
            &[file("policies/base.yaml", &bad), file("policies/z.yaml", "")],
            &host(),
            &Capacities::default(),
        )
        .expect_err("rejected");
        assert_eq!(r.stage, Stage::Validate);
        let p = &r.problems[0];
        assert_eq!(p.file.as_deref(), Some("policies/base.yaml"));
        assert_eq!(p.line, Some(7));
        assert!(r.to_string().starts_with("invalid policy: policies/base.yaml:7:"), "{r}");
    }

    #[test]
    fn changes_are_listed_as_rules_with_their_location() {
        let caps = Capacities::default();
        let mut a = desired(&[file("policies/base.yaml", GOOD)], &host(), &caps).unwrap();
        let more = format!("{GOOD}    - {{name: web, action: allow, proto: tcp, ports: [80]}}\n");
        let mut b = desired(&[file("policies/base.yaml", &more)], &host(), &caps).unwrap();
        a.shrink();
        b.shrink();
        assert!(a.state.ingress.l4.is_empty());
        let lines = rule_changes(&a.state, &b.state);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("+ ingress allow tcp/80"), "{lines:?}");
        assert!(lines[0].ends_with("(base/web, policies/base.yaml:8)"), "{lines:?}");
        assert_eq!(rule_changes(&b.state, &a.state)[0].chars().next(), Some('-'));
        assert!(rule_changes(&a.state, &a.state).is_empty());
    }

    fn blob(path: &str, text: &str) -> PolicyFile {
        // Any id that names the bytes does (git's is a hash of them).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(text, &mut h);
        let id = format!("{:016x}{}", std::hash::Hasher::finish(&h), text.len());
        PolicyFile { path: path.into(), blob: id, bytes: text.as_bytes().to_vec() }
    }

    /// A sequence of commits compiled by one [`Compiler`] (cached parses, reused encodings and
    /// digests, the previous state's maps shared) gives what a fresh [`desired`] gives for
    /// every commit: files changed, removed, renamed, changed back, a refused commit in
    /// between, and an apply that failed (the previous state stays whole).
    #[test]
    fn a_cached_compile_equals_a_fresh_compile_across_commits() {
        let set = |n: u32| {
            let addrs: Vec<String> = (0..n)
                .map(|k| format!("{}/32", std::net::Ipv4Addr::from((30u32 << 24) + k * 7)))
                .collect();
            format!(
                "apiVersion: fw/v1\nkind: AddressSet\nmetadata: {{name: block}}\nspec:\n  addresses: [{}]\n",
                addrs.join(", ")
            )
        };
        let deny = "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: blocklist}\nspec:\n  ingress:\n    - {name: blocked, action: deny, from: [{set: block}]}\n";
        let base = |port: u16| GOOD.replace("ports: [22]", &format!("ports: [{port}]"));
        let commits: Vec<Vec<PolicyFile>> = vec![
            vec![
                blob("p/base.yaml", &base(22)),
                blob("p/block.yaml", &set(500)),
                blob("p/deny.yaml", deny),
            ],
            vec![
                blob("p/base.yaml", &base(23)),
                blob("p/block.yaml", &set(500)),
                blob("p/deny.yaml", deny),
            ],
            // Refused: the next commit compiles against the state applied before it.
            vec![
                blob("p/base.yaml", &base(23).replace("tcp", "tcpp")),
                blob("p/block.yaml", &set(500)),
                blob("p/deny.yaml", deny),
            ],
            vec![
                blob("p/base.yaml", &base(22)),
                blob("p/block.yaml", &set(500)),
                blob("p/deny.yaml", deny),
            ],
            // The set file removed (its rule now inline), then back under another name.
            vec![
                blob("p/base.yaml", &base(22)),
                blob("p/deny.yaml", &deny.replace("{set: block}", "10.9.0.0/16")),
            ],
            vec![
                blob("p/base.yaml", &base(22)),
                blob("p/deny.yaml", deny),
                blob("p/z-block.yaml", &set(500)),
            ],
            // More prefixes, then changed back.
            vec![
                blob("p/base.yaml", &base(22)),
                blob("p/deny.yaml", deny),
                blob("p/z-block.yaml", &set(501)),
            ],
            vec![
                blob("p/base.yaml", &base(22)),
                blob("p/deny.yaml", deny),
                blob("p/z-block.yaml", &set(500)),
            ],
            vec![
                blob("p/base.yaml", &base(24)),
                blob("p/deny.yaml", deny),
                blob("p/z-block.yaml", &set(500)),
            ],
        ];
        let caps = Capacities::default();
        let mut compiler = Compiler::default();
        let mut applied: Option<Desired> = None;
        let mut reused_any = false;
        for (i, files) in commits.iter().enumerate() {
            // What a snapshot would take from the compiler instead of reading the blob.
            for f in files {
                if let Some(bytes) = compiler.bytes_of(&f.path, &f.blob) {
                    assert_eq!(bytes, f.bytes, "commit {i}: {}", f.path);
                }
            }
            let fresh = desired(files, &host(), &caps);
            let cached = compiler.desired(files, &host(), &caps, applied.as_ref(), &mut Vec::new());
            compiler.release();
            match (fresh, cached) {
                (Ok(f), Ok(c)) => {
                    assert_eq!(c.state, f.state, "commit {i}");
                    assert_eq!(c.encoded, f.encoded, "commit {i}");
                    assert_eq!(c.digest, f.digest, "commit {i}");
                    assert_eq!(c.saved, f.saved, "commit {i}");
                    reused_any |= !c.reused.is_empty();
                    if let Some(prev) = applied.as_ref() {
                        let before = prev.clone();
                        for name in &c.reused {
                            assert!(c.encoded.maps[name].shares(&prev.encoded.maps[name]));
                        }
                        let delta = c.delta_from(prev);
                        let mut want = fw_loader::entry_delta(&encode(&prev.state), &f.encoded);
                        want.remove(fw_common::maps::WORKLOADS);
                        let mut got = delta;
                        got.remove(fw_common::maps::WORKLOADS);
                        assert_eq!(got, want, "commit {i}: the delta");
                        if i == 6 {
                            // This apply fails: the applied state stays, whole.
                            drop(c);
                            assert_eq!(prev.encoded, encode(&prev.state), "commit {i}");
                            assert_eq!(prev.state, before.state);
                            continue;
                        }
                    }
                    applied = Some(c);
                }
                (Err(f), Err(c)) => assert_eq!(c, f, "commit {i}"),
                (f, c) => panic!("commit {i}: fresh {:?}, cached {:?}", f.is_ok(), c.is_ok()),
            }
        }
        assert!(reused_any, "the encodings were reused");
    }

    #[test]
    fn a_state_that_does_not_fit_is_rejected_at_compile() {
        let caps = Capacities { l4_entries: 1, ..Capacities::default() };
        let two = GOOD.replace("ports: [22]", "ports: [22, 80, 443]");
        let r = desired(&[file("p/a.yaml", &two)], &host(), &caps).expect_err("too big");
        assert_eq!(r.stage, Stage::Compile);
        assert!(!r.problems.is_empty());
    }

    #[test]
    fn no_file_at_all_is_rejected_and_garbage_never_panics() {
        let r = desired(&[], &host(), &Capacities::default()).expect_err("empty");
        assert_eq!(r.problems[0].code, "no-policy");
        for junk in [&b"\xff\xfe\x00"[..], b"[[[[", b"apiVersion: 7\nkind: [", b"- - - -"] {
            let f =
                PolicyFile { path: "p/j.yaml".into(), blob: String::new(), bytes: junk.to_vec() };
            assert!(desired(&[f], &host(), &Capacities::default()).is_err());
        }
    }
}
