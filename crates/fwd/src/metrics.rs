//! Prometheus metrics (prometheus-client), served as text on `GET /metrics`.
//!
//! Why it is built this way:
//! - Events fwd itself counts (reconcile outcomes and durations, commit-to-enforced latency,
//!   drift corrections) are ordinary counters and histograms updated by the reconcile loop.
//! - Values the kernel counts (per-rule packets, drops, map fill) are not mirrored into
//!   counters fwd would have to keep in step: a collector encodes them from the latest kernel
//!   reading in the status document at scrape time (the server asks the loop to refresh that
//!   reading first), as `ConstCounter`s and `ConstGauge`s.
//! - The applied revision is an info metric whose labels carry the commit and digest, the
//!   usual way to put a string into Prometheus.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::status::Status;

type Labels = Vec<(String, String)>;

/// The metrics the reconcile loop updates.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// `{commit, digest}` = 1 for the state enforced now.
    pub revision: Family<Labels, Gauge>,
    /// `{outcome}`: applied, unchanged, rejected, failed.
    pub reconciles: Family<Labels, Counter>,
    pub reconcile_seconds: Histogram,
    pub commit_to_enforced_seconds: Histogram,
    pub drift_corrections: Counter,
    pub drift_checks: Counter,
    pub source_errors: Counter,
    pub workload_updates: Counter,
}

/// Encodes the kernel-side readings of the status document.
#[derive(Debug)]
struct Kernel(Arc<Mutex<Status>>);

impl Collector for Kernel {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = match self.0.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let c = ConstCounter::new(0u64);
        let mut e = encoder.encode_descriptor(
            "fwd_rule_packets",
            "Packets decided by each rule",
            None,
            c.metric_type(),
        )?;
        for r in &s.rules {
            let labels: Labels = vec![
                ("rule".into(), r.name.clone()),
                ("location".into(), format!("{}:{}", r.file, r.line)),
                ("direction".into(), r.direction.clone()),
                ("action".into(), r.action.clone()),
            ];
            ConstCounter::new(r.packets).encode(e.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "fwd_drops",
            "Packets dropped, by direction and reason",
            None,
            c.metric_type(),
        )?;
        for d in &s.drops {
            for (reason, n) in [
                ("default", d.default),
                ("rule", d.rule),
                ("malformed", d.malformed),
                ("internal", d.internal),
            ] {
                let labels: Labels = vec![
                    ("direction".into(), d.direction.clone()),
                    ("reason".into(), reason.into()),
                ];
                ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
            }
        }
        let g = ConstGauge::new(0i64);
        for (name, help, pick) in [
            (
                "fwd_map_entries",
                "Entries in each map of the active generation",
                (|m: &crate::status::MapFill| m.entries as i64) as fn(&_) -> i64,
            ),
            ("fwd_map_capacity", "Capacity of each map of the active generation", |m| {
                i64::from(m.capacity)
            }),
        ] {
            let mut e = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            for m in &s.maps {
                let labels: Labels = vec![("map".into(), m.name.clone())];
                ConstGauge::new(pick(m)).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(status: Arc<Mutex<Status>>) -> Metrics {
        let mut registry = Registry::default();
        let revision = Family::<Labels, Gauge>::default();
        registry.register(
            "fwd_applied_revision",
            "The policy revision enforced now",
            revision.clone(),
        );
        let reconciles = Family::<Labels, Counter>::default();
        registry.register("fwd_reconciles", "Reconciles by outcome", reconciles.clone());
        let buckets =
            [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let reconcile_seconds = Histogram::new(buckets);
        registry.register(
            "fwd_reconcile_seconds",
            "Time from a new commit seen to its outcome",
            reconcile_seconds.clone(),
        );
        let latency = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
        let commit_to_enforced_seconds = Histogram::new(latency);
        registry.register(
            "fwd_commit_to_enforced_seconds",
            "Time from a commit's author time to its state being enforced",
            commit_to_enforced_seconds.clone(),
        );
        let drift_corrections = Counter::default();
        registry.register(
            "fwd_drift_corrections",
            "Map entries found drifted and corrected",
            drift_corrections.clone(),
        );
        let drift_checks = Counter::default();
        registry.register("fwd_drift_checks", "Full comparisons of the maps", drift_checks.clone());
        let source_errors = Counter::default();
        registry.register(
            "fwd_source_errors",
            "Failed fetches of the source",
            source_errors.clone(),
        );
        let workload_updates = Counter::default();
        registry.register(
            "fwd_workload_updates",
            "Rewrites of the workload table after cgroups changed",
            workload_updates.clone(),
        );
        registry.register_collector(Box::new(Kernel(status)));
        Metrics {
            registry,
            revision,
            reconciles,
            reconcile_seconds,
            commit_to_enforced_seconds,
            drift_corrections,
            drift_checks,
            source_errors,
            workload_updates,
        }
    }

    pub fn outcome(&self, outcome: &str) {
        self.reconciles.get_or_create(&vec![("outcome".into(), outcome.into())]).inc();
    }

    pub fn set_revision(&self, commit: &str, digest: &str) {
        self.revision.clear();
        let labels: Labels =
            vec![("commit".into(), commit.into()), ("digest".into(), digest.into())];
        self.revision.get_or_create(&labels).set(1);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Drops, MapFill, RuleCounter};

    #[test]
    fn the_exposition_names_rules_drops_map_fill_and_the_revision() {
        let status = Arc::new(Mutex::new(Status::default()));
        {
            let mut s = status.lock().unwrap();
            s.rules.push(RuleCounter {
                id: 7,
                name: "base/ssh".into(),
                direction: "ingress".into(),
                action: "allow".into(),
                file: "p/base.yaml".into(),
                line: 9,
                packets: 42,
                bytes: 4200,
            });
            s.drops.push(Drops {
                direction: "ingress".into(),
                default: 3,
                rule: 1,
                malformed: 0,
                internal: 0,
            });
            s.maps.push(MapFill { name: "FW_IN_V4".into(), entries: 5, capacity: 64 });
        }
        let m = Metrics::new(status);
        m.set_revision("abc", "d1");
        m.set_revision("def", "d2");
        m.outcome("applied");
        m.commit_to_enforced_seconds.observe(0.12);
        let text = m.encode();
        for want in [
            "fwd_applied_revision{commit=\"def\",digest=\"d2\"} 1",
            "fwd_reconciles_total{outcome=\"applied\"} 1",
            "fwd_rule_packets_total{rule=\"base/ssh\",location=\"p/base.yaml:9\",direction=\"ingress\",action=\"allow\"} 42",
            "fwd_drops_total{direction=\"ingress\",reason=\"default\"} 3",
            "fwd_map_entries{map=\"FW_IN_V4\"} 5",
            "fwd_map_capacity{map=\"FW_IN_V4\"} 64",
            "fwd_commit_to_enforced_seconds_count 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains("commit=\"abc\""), "{text}");
    }
}
