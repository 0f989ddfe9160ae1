//! `fwctl status --socket PATH`: what a running fwd reports on its status socket.
//!
//! fwd serves one JSON document per connection (see fwd's `status` module for its fields).
//! fwctl reads it as untyped JSON rather than sharing fwd's types: fwctl stays free of fwd's
//! dependencies (git, tokio), and a field added to the document shows up in `--format json`
//! without a new fwctl. The human form picks the fields people ask for first: which commit is
//! enforced, the last error with its file:line, drift, counters and map fill.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

pub fn status(socket: &Path, json: bool) -> Result<ExitCode> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("cannot reach fwd at {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .with_context(|| format!("reading the status from {}", socket.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} did not answer with a status document", socket.display()))?;
    if json {
        println!("{doc}");
    } else {
        print!("{}", render(&doc));
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// Milliseconds since the epoch as seconds ago.
fn ago(v: &Value) -> String {
    let Some(ms) = v.as_u64() else { return "never".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    format!("{:.1}s ago", now.saturating_sub(ms) as f64 / 1e3)
}

/// The human form of the document.
pub fn render(doc: &Value) -> String {
    let mut out = String::new();
    let src = &doc["source"];
    let _ =
        writeln!(out, "source {} ref {} path {}", s(&src["url"]), s(&src["ref"]), s(&src["path"]));
    let _ = writeln!(out, "  head {} fetched {}", s(&src["head"]), ago(&src["last_fetch_ms"]));
    if !src["error"].is_null() {
        let _ = writeln!(
            out,
            "  source error ({} failures in a row): {}",
            s(&src["failures"]),
            s(&src["error"])
        );
    }
    match &doc["applied"] {
        Value::Null => {
            let _ = writeln!(out, "applied: nothing yet");
        }
        a => {
            let _ = writeln!(
                out,
                "applied {} \"{}\" digest {} {}{}",
                s(&a["commit"]),
                s(&a["summary"]),
                s(&a["digest"]),
                ago(&a["at_ms"]),
                if a["adopted"].as_bool() == Some(true) { " (adopted at start-up)" } else { "" }
            );
            if let Some(ms) = a["commit_to_enforced_ms"].as_f64() {
                let _ = writeln!(
                    out,
                    "  seen to enforced {:.1} ms; commit to enforced {:.1} s (from the commit's \
                     time, which git keeps in whole seconds)",
                    a["detect_to_enforced_ms"].as_f64().unwrap_or(0.0),
                    ms / 1000.0
                );
            }
        }
    }
    if let r @ Value::Object(_) = &doc["last_reconcile"] {
        let steps: Vec<String> = r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|st| format!("{} {:.1} ms", s(&st["step"]), st["ms"].as_f64().unwrap_or(0.0)))
            .collect();
        let _ = writeln!(
            out,
            "last reconcile {} {}: {}",
            s(&r["commit"]),
            s(&r["outcome"]),
            steps.join(", ")
        );
        for c in r["changes"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "  {}", s(c));
        }
    }
    match &doc["last_error"] {
        Value::Null => {
            let _ = writeln!(out, "last error: none");
        }
        e => {
            let _ = writeln!(
                out,
                "last error ({}, commit {}): {}",
                s(&e["stage"]),
                s(&e["commit"]),
                s(&e["message"])
            );
            for p in e["problems"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {}:{}:{}: {} [{}]",
                    s(&p["file"]),
                    s(&p["line"]),
                    s(&p["column"]),
                    s(&p["message"]),
                    s(&p["code"])
                );
            }
        }
    }
    let d = &doc["drift"];
    let _ = writeln!(
        out,
        "drift: checked {}, {} entries differed at the last check, {} corrected since start",
        ago(&d["checked_at_ms"]),
        s(&d["last_entries"]),
        s(&d["corrected_total"])
    );
    let w = &doc["workloads"];
    let _ = writeln!(out, "workloads: {} of {} paths resolved", s(&w["resolved"]), s(&w["paths"]));
    let _ = writeln!(out, "maps (active generation):");
    for m in doc["maps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<12} {:>8} / {}",
            s(&m["name"]),
            s(&m["entries"]),
            s(&m["capacity"])
        );
    }
    for d in doc["drops"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "drops {}: default {} rule {} malformed {} internal {}",
            s(&d["direction"]),
            s(&d["default"]),
            s(&d["rule"]),
            s(&d["malformed"]),
            s(&d["internal"])
        );
    }
    let _ = writeln!(out, "counters:");
    let rules = doc["rules"].as_array();
    if rules.is_none_or(Vec::is_empty) {
        let _ = writeln!(out, "  (none)");
    }
    for r in rules.into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:>10} packets {:>12} bytes  {} {} {} ({}:{})",
            s(&r["packets"]),
            s(&r["bytes"]),
            s(&r["direction"]),
            s(&r["action"]),
            s(&r["name"]),
            s(&r["file"]),
            s(&r["line"])
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_human_form_names_the_commit_the_error_location_and_counters() {
        let doc = serde_json::json!({
            "source": {"url": "file:///srv/p.git", "ref": "main", "path": "policies", "head": "bbb",
                       "last_fetch_ms": 1, "error": null, "failures": 0},
            "applied": {"commit": "aaa", "summary": "open ssh", "digest": "d1", "at_ms": 1,
                        "adopted": false, "commit_to_enforced_ms": 900.0, "detect_to_enforced_ms": 12.5},
            "last_reconcile": {"commit": "bbb", "outcome": "rejected", "steps": [{"step": "compile", "ms": 1.5}],
                               "changes": ["+ ingress allow tcp/80 from any (base/web, policies/a.yaml:8)"]},
            "last_error": {"stage": "validate", "commit": "bbb", "message": "invalid policy",
                           "problems": [{"file": "policies/a.yaml", "line": 7, "column": 5,
                                         "message": "unknown proto", "code": "E0101"}]},
            "drift": {"checked_at_ms": 1, "last_entries": 0, "corrected_total": 3},
            "workloads": {"paths": 2, "resolved": 1},
            "maps": [{"name": "FW_IN_V4", "entries": 3, "capacity": 64}],
            "drops": [{"direction": "ingress", "default": 4, "rule": 1, "malformed": 0, "internal": 0}],
            "rules": [{"name": "base/ssh", "direction": "ingress", "action": "allow",
                       "file": "policies/a.yaml", "line": 9, "packets": 10, "bytes": 600}]
        });
        let text = render(&doc);
        for want in [
            "applied aaa \"open ssh\" digest d1",
            "commit to enforced 0.9 s (from the commit's time",
            "last reconcile bbb rejected: compile 1.5 ms\n  + ingress allow tcp/80 from any (base/web, policies/a.yaml:8)\n",
            "  policies/a.yaml:7:5: unknown proto [E0101]",
            "3 corrected since start",
            "workloads: 1 of 2 paths resolved",
            "FW_IN_V4            3 / 64",
            "drops ingress: default 4 rule 1",
            "ingress allow base/ssh (policies/a.yaml:9)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // A document from an older or newer fwd with fields missing still renders.
        assert!(render(&serde_json::json!({})).contains("applied: nothing yet"));
    }
}
