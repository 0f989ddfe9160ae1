//! What fwd reports about itself: one document, served whole as JSON on the status socket
//! and read by `fwctl status --socket`.
//!
//! Why it is built this way:
//! - One plain document rather than a request language: a reader connects, reads one JSON
//!   object and a newline, and the server closes. Nothing to negotiate, and `socat` or `nc -U`
//!   are enough to debug it.
//! - The reconcile loop owns the document and replaces parts of it as it works; readers get a
//!   copy taken under a short lock, so a slow reader never holds up a reconcile.
//! - Counters and map fill are read from the kernel when a reader asks (the server asks the
//!   loop for a refresh, with a deadline), not on a timer: an idle daemon reads nothing.
//! - Times are Unix milliseconds, so a reader can compute ages without parsing dates.
//! - The socket is created with owner-only permissions inside a 0700 directory: the document
//!   names the policy's rules and their traffic.

use serde::{Deserialize, Serialize};

use crate::policy::Problem;

/// The whole status document.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub source: SourceStatus,
    /// What the kernel enforces, by fwd's last apply or adoption.
    pub applied: Option<AppliedStatus>,
    pub last_reconcile: Option<Reconcile>,
    /// The last commit that was refused or failed to apply; cleared when a later commit
    /// applies.
    pub last_error: Option<ErrorStatus>,
    pub drift: DriftStatus,
    pub workloads: WorkloadStatus,
    /// Per-rule counters, read when the document was served.
    pub rules: Vec<RuleCounter>,
    /// The active generation's maps: entries against capacity.
    pub maps: Vec<MapFill>,
    /// Packets dropped, per direction.
    pub drops: Vec<Drops>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceStatus {
    pub url: String,
    #[serde(rename = "ref")]
    pub reference: String,
    pub path: String,
    /// The last commit fetched.
    pub head: Option<String>,
    pub last_fetch_ms: Option<u64>,
    /// The current fetch error (`None` once a fetch succeeds again).
    pub error: Option<String>,
    /// Consecutive failed fetches.
    pub failures: u32,
    /// Whether the head was reached through a rewritten history (a force-push); kept until
    /// the head changes again.
    pub forced: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppliedStatus {
    pub commit: String,
    pub summary: String,
    pub digest: String,
    /// When it was enforced (the flip), or adopted at start-up.
    pub at_ms: u64,
    /// The commit's author time.
    pub commit_time_ms: Option<u64>,
    /// From the moment fwd saw the commit to the flip.
    pub detect_to_enforced_ms: Option<f64>,
    /// From the commit's author time (second resolution) to the flip.
    pub commit_to_enforced_ms: Option<f64>,
    /// True when fwd found this state already enforced at start-up and adopted it.
    pub adopted: bool,
    pub program_id: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reconcile {
    pub commit: String,
    /// `applied`, `unchanged`, `rejected` or `failed`.
    pub outcome: String,
    pub at_ms: u64,
    /// fwd's steps (`fetch`: the fetch that found the commit, when one did; `snapshot`: the
    /// commit's files; `parse`: parse and lower the files that changed since the last
    /// compile; `resolve`; `select`: this host's policy; `compile`; `encode` and `digest`
    /// (reusing what depends only on unchanged parts of the state); `rule table`; `diff`: the
    /// entry deltas against the state applied last; `enforce`: lock, apply and attachments)
    /// and then the loader's apply steps.
    pub steps: Vec<Step>,
    /// Entries written before the flip and replayed after it.
    pub written: usize,
    pub deleted: usize,
    /// Whether the change went in as entry deltas (false: a full diff).
    pub delta: bool,
    /// From fwd seeing the commit to the loader's flip, the moment the kernel enforces the new
    /// state (fwd's steps before `enforce`, the time `enforce` took to start the apply, and the
    /// loader's steps up to and including `flip`); the grace period, the replay onto the old
    /// generation and the attachments check come after it. Only for an applied change.
    #[serde(default)]
    pub seen_to_flip_ms: Option<f64>,
    /// What changed, as rules (`+`/`-`/`~` lines naming each rule and its file:line).
    #[serde(default)]
    pub changes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorStatus {
    pub commit: Option<String>,
    /// `validate`, `compile`, `enforce`, `source` or `drift`.
    pub stage: String,
    pub message: String,
    /// The commit's errors with file:line, when it was refused.
    pub problems: Vec<Problem>,
    pub at_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DriftStatus {
    pub checked_at_ms: Option<u64>,
    /// Entries that differed at the last check (both generations, all maps).
    pub last_entries: usize,
    /// Whether the workload table differed at the last check.
    pub last_workloads: bool,
    /// Whether an interface or the cgroup had lost its attachment at the last check.
    #[serde(default)]
    pub last_detached: bool,
    /// Entries corrected since start.
    pub corrected_total: u64,
    pub checks: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// Workload paths in the applied policy.
    pub paths: usize,
    /// Of those, cgroups that exist (cgroup id -> class entries).
    pub resolved: usize,
    pub updates: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleCounter {
    pub id: u32,
    pub name: String,
    pub direction: String,
    pub action: String,
    pub file: String,
    pub line: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Drops {
    pub direction: String,
    /// Denied by the default.
    pub default: u64,
    /// Denied by a deny rule.
    pub rule: u64,
    pub malformed: u64,
    pub internal: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_round_trips_through_json() {
        let mut s = Status::default();
        s.source.url = "file:///srv/p.git".into();
        s.last_error = Some(ErrorStatus {
            commit: Some("abc".into()),
            stage: "validate".into(),
            message: "invalid".into(),
            problems: vec![Problem {
                file: Some("p/a.yaml".into()),
                line: Some(3),
                column: Some(5),
                code: "E1".into(),
                message: "bad".into(),
            }],
            at_ms: 1,
        });
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"ref\":\"\""), "{json}");
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back.last_error.unwrap().problems[0].line, Some(3));
    }
}
