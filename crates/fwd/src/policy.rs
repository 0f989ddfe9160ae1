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

use fw_compiler::compile::compile;
use fw_compiler::encode::{Encoded, encode};
use fw_compiler::load::{Input, load};
use fw_compiler::mapstate::{Capacities, MapState};
use fw_compiler::model::HostIdentity;
use fw_compiler::yaml::ParseLimits;
use serde::Serialize;

use crate::source::PolicyFile;

/// The state to enforce, compiled from one commit.
#[derive(Clone, Debug)]
pub struct Desired {
    /// The compiled state (after [`Desired::shrink`], without its entries).
    pub state: MapState,
    /// `encode(state)`; its workload table (keyed by cgroup path) is what the loader checks,
    /// the kernel's is keyed by cgroup id and written from the resolved paths.
    pub encoded: Encoded,
    pub digest: String,
    /// The rule table, as JSON (see the module docs).
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

/// The state without its prefix and L4 entries: O(rules) rather than O(policy size).
pub fn rule_table(state: &MapState) -> MapState {
    let mut t = state.clone();
    strip_entries(&mut t);
    t
}

fn strip_entries(state: &mut MapState) {
    for d in [&mut state.ingress, &mut state.egress] {
        d.v4.clear();
        d.v6.clear();
        d.l4.clear();
    }
}

impl Desired {
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
    if files.is_empty() {
        return Err(Rejected {
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
    let limits = ParseLimits::default();
    let inputs = files.iter().map(|f| Input::new(f.path.clone(), f.bytes.clone()));
    let loaded = load(inputs, &limits);
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
    let state = compile(&set.for_host(host), caps)
        .map_err(|errors| Rejected { stage: Stage::Compile, problems: problems(&errors) })?;
    let encoded = encode(&state);
    let saved = serde_json::to_vec(&rule_table(&state)).unwrap_or_default();
    Ok(Desired { digest: state.digest(), encoded, saved, state })
}

/// At most this many lines of [`rule_changes`]; the rest is counted in a last line.
const MAX_CHANGE_LINES: usize = 100;

/// What changes between two states, as rules (`MapState::diff`, the diff `fwctl diff` shows):
/// one line per rule added, removed or changed, per changed default and per workload path.
/// Meant for states without their entries ([`Desired::shrink`]): prefix and port entries are
/// not listed.
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
    let d = old.diff(new);
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
    use super::*;

    fn file(path: &str, text: &str) -> PolicyFile {
        PolicyFile { path: path.into(), bytes: text.as_bytes().to_vec() }
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
            let f = PolicyFile { path: "p/j.yaml".into(), bytes: junk.to_vec() };
            assert!(desired(&[f], &host(), &Capacities::default()).is_err());
        }
    }
}
