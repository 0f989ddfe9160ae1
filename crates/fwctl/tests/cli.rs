//! `fwctl` as users and CI run it: exit codes, and every error code's rendered message.
//!
//! Each fixture is checked with `fwctl validate` in all three formats. The human rendering is
//! snapshotted (insta), so a change to any message shows up in review as a diff.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fwctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fwctl"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run fwctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fixture paths relative to the fwctl crate: lowering-stage fixtures of fw-compiler and the
/// resolve-stage ones here.
fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["../fw-compiler/tests/fixtures/invalid", "tests/fixtures"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("fixture folder") {
            let name = entry.expect("entry").file_name();
            out.push(Path::new(dir).join(name));
        }
    }
    out.sort();
    out
}

/// `fw014-unknown-set.yaml` -> `FW014`.
fn code_of(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name[..5].to_uppercase()
}

#[test]
fn every_fixture_reports_its_code_in_every_format() {
    let fixtures = fixtures();
    assert!(fixtures.len() >= 25, "expected fixtures for every code, found {}", fixtures.len());
    for path in fixtures {
        let p = path.to_str().expect("utf-8 path");
        let code = code_of(&path);
        let human = fwctl(&["validate", p]);
        let warning_only = matches!(code.as_str(), "FW018" | "FW029");
        let want = if warning_only { 0 } else { 1 };
        assert_eq!(human.status.code(), Some(want), "{p}: exit code\n{}", stdout(&human));
        let text = stdout(&human);
        assert!(text.contains(&code), "{p}: {code} missing from\n{text}");
        insta::assert_snapshot!(path.file_stem().and_then(|s| s.to_str()).expect("stem"), text);

        let json = fwctl(&["validate", "--format", "json", p]);
        let records: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json output");
        let records = records.as_array().expect("a list");
        assert!(records.iter().any(|r| r["code"] == code.as_str()), "{p}: json lacks {code}");
        for r in records {
            if r["code"] != "FW028" {
                assert!(
                    r["line"].as_u64().is_some_and(|l| l >= 1),
                    "{p}: json record without a line: {r}"
                );
            }
        }

        let github = stdout(&fwctl(&["validate", "--format", "github", p]));
        assert!(
            github.lines().any(|l| l.starts_with(if warning_only {
                "::warning "
            } else {
                "::error "
            }) && l.contains(&format!("title={code}"))),
            "{p}: github annotations lack {code}:\n{github}"
        );
    }
}

#[test]
fn the_example_policies_are_valid_and_their_tests_pass() {
    for dir in ["../../policies", "../../examples"] {
        let v = fwctl(&["validate", dir]);
        assert_eq!(v.status.code(), Some(0), "{dir}: {}{}", stdout(&v), stderr(&v));
        let t = fwctl(&["test", dir]);
        assert_eq!(t.status.code(), Some(0), "{dir}: {}{}", stdout(&t), stderr(&t));
        assert!(stdout(&t).contains(" 0 failed"), "{}", stdout(&t));
    }
}

#[test]
fn a_failing_policy_test_exits_1_and_names_the_deciding_rule() {
    let dir = tempdir();
    std::fs::write(
        dir.join("p.yaml"),
        "apiVersion: fw/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  defaults: {ingress: deny}\n  ingress:\n    - {name: web, action: allow, proto: tcp, ports: [443]}\n---\napiVersion: fw/v1\nkind: PolicyTest\nmetadata: {name: t}\nspec:\n  host: {name: h}\n  cases:\n    - {direction: ingress, from: 192.0.2.1, proto: tcp, port: 443, expect: deny}\n",
    )
    .expect("write");
    let out = fwctl(&["test", dir.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("FAIL t case 0"), "{text}");
    assert!(text.contains("expected deny, evaluator says allow by rule p/web"), "{text}");
    assert!(text.contains("1 failed"), "{text}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn explain_names_the_deciding_rule_and_the_others() {
    let out = fwctl(&[
        "explain",
        "../../policies",
        "--host",
        "web-1",
        "--label",
        "role=web",
        "--ingress",
        "--from",
        "192.0.2.1",
        "--proto",
        "tcp",
        "--port",
        "443",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("verdict: deny"), "{text}");
    assert!(
        text.contains("decided by: rule base/blocklist-in (../../policies/base.yaml:"),
        "{text}"
    );
    assert!(text.contains("allow web/https"), "{text}");
    assert!(text.contains("compiled map lookup: agrees"), "{text}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(fwctl(&["validate"]).status.code(), Some(2));
    assert_eq!(
        fwctl(&["explain", "../../policies", "--host", "h", "--proto", "tcp"]).status.code(),
        Some(2)
    );
}

#[test]
fn an_unreadable_path_is_fw027() {
    let out = fwctl(&["validate", "--format", "json", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("\"FW027\""), "{text}");
}

#[test]
fn compile_prints_entry_counts_and_is_deterministic() {
    let args =
        ["compile", "../../policies", "--host", "db-1", "--label", "role=db", "--format", "json"];
    let a = fwctl(&args);
    let b = fwctl(&args);
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).expect("json");
    assert!(v["entries"]["ingress_v4"].as_u64().is_some_and(|n| n >= 1));
    assert!(v["entries"]["workloads"].as_u64() == Some(1));
}

#[test]
fn schema_command_matches_the_checked_in_schema() {
    let out = fwctl(&["schema"]);
    let checked_in = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/fw-v1.schema.json"),
    )
    .expect("schema file");
    assert_eq!(
        stdout(&out),
        checked_in,
        "regenerate with: cargo run -p fwctl -- schema > schemas/fw-v1.schema.json"
    );
}

fn tempdir() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("fwctl-cli-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("tempdir");
    dir
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
