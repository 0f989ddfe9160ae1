//! The reconcile loop: one thread that owns the git source and the data plane and turns
//! events (poll tick, local repository changed, cgroup changed, drift timer, status refresh,
//! shutdown) into work.
//!
//! Why it is built this way:
//! - One owner, one thread. git2 and the loader are blocking APIs, and every change to the
//!   kernel must be serialised anyway; a plain thread with a channel and `recv_timeout` is
//!   the whole scheduler. The async side (status socket, metrics, signals) only sends
//!   messages and reads the shared status document.
//! - The `Dataplane` is opened once and kept: it knows what each generation holds (the
//!   loader's write ids), so an apply costs O(diff). A new commit's change is handed to the
//!   loader as entry deltas against the state applied last (`Change::Delta`); the loader
//!   falls back to a full diff when its base is stale (someone else wrote the maps).
//! - Start-up never reloads or detaches: pinned programs are adopted (an ABI change goes
//!   through the loader's upgrade with link replacement when the first state is applied); a
//!   state found already enforced is checked for drift and kept, not re-applied.
//! - A commit that does not validate or compile is never applied: the last good state keeps
//!   enforcing, the refusal (with file:line in that commit) goes to status, logs and metrics,
//!   and the same commit is not compiled again until the ref moves.
//! - Source errors leave enforcement alone; fetches are retried with exponential backoff
//!   (capped at the poll interval), and the mirror's last fetched commit stands in at start-up
//!   while the remote is unreachable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fw_compiler::ast::{Action, Direction};
use fw_compiler::mapstate::Capacities;
use fw_compiler::model::HostIdentity;
use fw_loader::enforce::{Change, Enforced, Target, enforce};
use fw_loader::{Dataplane, Desired as LoaderDesired, Error as LoaderError};
use tracing::{debug, error, info, warn};

use crate::cgroups::{CgroupWatch, watch_set};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::{self, Desired, Rejected};
use crate::source::{Backoff, Source, SourceSpec, Watch};
use crate::status::{
    AppliedStatus, Drops, ErrorStatus, MapFill, Reconcile, RuleCounter, Status, Step, now_ms,
};

/// What wakes the loop.
#[derive(Debug)]
pub enum Msg {
    /// The local repository changed: fetch now.
    SourceChanged,
    /// A watched cgroup directory was created or removed.
    CgroupChanged,
    /// Read counters and map fill into the status document, then answer.
    Refresh(SyncSender<()>),
    Shutdown,
}

/// The state fwd enforces, as it applied or adopted it.
struct Applied {
    commit: String,
    desired: Desired,
    workloads: BTreeMap<u64, u32>,
}

pub struct Engine {
    cfg: Config,
    host: HostIdentity,
    cgroup: PathBuf,
    caps: Capacities,
    spec: SourceSpec,
    source: Option<Source>,
    watch: Option<Watch>,
    backoff: Backoff,
    /// Retries of a commit whose apply failed (kept apart from the fetch backoff, which a
    /// successful fetch resets).
    apply_backoff: Backoff,
    dp: Option<Dataplane>,
    /// Compiles each commit, reusing what did not change since the last one.
    compiler: policy::Compiler,
    applied: Option<Applied>,
    /// The last commit refused, so it is not compiled again on every poll.
    rejected: Option<String>,
    cgroups: Option<CgroupWatch>,
    tx: Sender<Msg>,
    status: Arc<Mutex<Status>>,
    metrics: Arc<Metrics>,
    next_fetch: Instant,
    next_drift: Instant,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Engine {
    pub fn new(
        cfg: Config,
        host: HostIdentity,
        cgroup: PathBuf,
        tx: Sender<Msg>,
        status: Arc<Mutex<Status>>,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let spec = SourceSpec {
            url: cfg.source.url.clone(),
            reference: cfg.source.reference.clone(),
            path: cfg.source.path.clone(),
        };
        {
            let mut s = lock(&status);
            s.source.url = cfg.source.url.clone();
            s.source.reference = cfg.source.reference.clone();
            s.source.path = cfg.source.path.display().to_string();
        }
        let cap = cfg.source.interval.max(Duration::from_millis(200));
        let now = Instant::now();
        Engine {
            backoff: Backoff::new(Duration::from_millis(200).min(cap), cap),
            apply_backoff: Backoff::new(cap, (cap * 16).max(Duration::from_secs(60))),
            next_fetch: now,
            next_drift: now + cfg.drift_interval,
            cfg,
            host,
            cgroup,
            caps: Capacities::default(),
            spec,
            source: None,
            watch: None,
            dp: None,
            compiler: policy::Compiler::default(),
            applied: None,
            rejected: None,
            cgroups: None,
            tx,
            status,
            metrics,
        }
    }

    /// Runs until [`Msg::Shutdown`] (or every sender is gone). Enforcement is left in place.
    pub fn run(mut self, rx: &Receiver<Msg>) {
        self.start();
        loop {
            let now = Instant::now();
            let due = self.next_fetch.min(self.next_drift);
            let msg = rx.recv_timeout(due.saturating_duration_since(now));
            match msg {
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Msg::SourceChanged) => self.sync_source(),
                Ok(Msg::CgroupChanged) => {
                    // A burst of mkdir/rmdir: one re-resolve for all of it.
                    while let Ok(m) = rx.try_recv() {
                        if !matches!(m, Msg::CgroupChanged) {
                            let _ = self.tx.send(m);
                            break;
                        }
                    }
                    self.sync_workloads();
                }
                Ok(Msg::Refresh(done)) => {
                    self.refresh();
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if now >= self.next_fetch {
                self.sync_source();
            }
            if now >= self.next_drift {
                self.drift();
                self.next_drift = Instant::now() + self.cfg.drift_interval;
            }
        }
        info!("shutting down; enforcement stays in place");
    }

    /// Adopts what is pinned, then follows the source once (from the mirror when the remote
    /// is unreachable) and checks drift.
    fn start(&mut self) {
        match Dataplane::adopt(&self.cfg.bpffs) {
            Ok(dp) => {
                let id = dp.ingress_program_id().ok();
                info!(root = %self.cfg.bpffs.display(), program_id = ?id, "adopted the pinned data plane");
                self.dp = Some(dp);
            }
            Err(LoaderError::NotPinned(_)) => {
                info!(root = %self.cfg.bpffs.display(), "nothing pinned yet: the first good commit loads the data plane");
            }
            Err(e @ LoaderError::AbiMismatch { .. }) => {
                info!("{e}: the first state applied upgrades the programs in place");
            }
            Err(e) => warn!("cannot adopt the pinned data plane: {e}"),
        }
        self.adopt_recorded();
        self.sync_source();
        let fetched = lock(&self.status).source.error.is_none();
        if self.applied.is_none()
            && !fetched
            && let Some(commit) = self.source.as_ref().and_then(Source::last_fetched)
        {
            // The remote is unreachable: converge on what the mirror last fetched.
            info!(%commit, "using the mirror's last fetched commit until the remote answers");
            self.reconcile(&commit, None);
        }
        self.drift();
        self.next_drift = Instant::now() + self.cfg.drift_interval;
    }

    /// Takes what the pinned data plane enforces as the applied state, without writing
    /// anything, when its record names a commit the mirror has and that commit compiles to
    /// the recorded digest: drift checks and workload updates then work from the start, even
    /// while the head commit is refused or the remote is away.
    fn adopt_recorded(&mut self) {
        let Some(dp) = &self.dp else { return };
        let Ok(active) = dp.active_generation() else { return };
        let Ok(Some(rec)) = dp.applied(active) else { return };
        lock(&self.status).applied = Some(AppliedStatus {
            commit: rec.revision.clone(),
            digest: rec.digest.clone(),
            at_ms: now_ms(),
            adopted: true,
            program_id: dp.ingress_program_id().ok(),
            ..AppliedStatus::default()
        });
        if !self.open_source() {
            return;
        }
        let Some(source) = &self.source else { return };
        let Ok(snapshot) = source.snapshot(&rec.revision) else {
            debug!(revision = %rec.revision, "the recorded revision is not a commit of the mirror");
            return;
        };
        match self.compiler.desired(&snapshot.files, &self.host, &self.caps, None, &mut Vec::new())
        {
            Ok(desired) if desired.digest == rec.digest => {
                info!(commit = %rec.revision, digest = %rec.digest, "adopted the enforced state");
                let workloads =
                    fw_loader::workloads::resolve(&self.cgroup, &desired.state.workloads);
                // The loader holds the rule table saved with the generation.
                let desired = Desired { saved: Vec::new(), ..desired };
                self.applied = Some(Applied { commit: rec.revision, desired, workloads });
                self.after_apply(&snapshot, Instant::now(), true);
            }
            _ => {
                debug!(revision = %rec.revision, "the recorded revision does not compile to the recorded digest")
            }
        }
    }

    fn open_source(&mut self) -> bool {
        if self.source.is_some() {
            return true;
        }
        match Source::open(&self.spec, &self.cfg.state) {
            Ok(source) => {
                if source.is_local() {
                    let tx = self.tx.clone();
                    match source.watch(move || {
                        let _ = tx.send(Msg::SourceChanged);
                    }) {
                        Ok(w) => self.watch = Some(w),
                        Err(e) => warn!("cannot watch the local repository ({e}); polling only"),
                    }
                }
                self.source = Some(source);
                true
            }
            Err(e) => {
                self.source_failed(&e.to_string(), e.is_transient());
                false
            }
        }
    }

    fn source_failed(&mut self, message: &str, transient: bool) {
        let delay = self.backoff.next_delay();
        self.next_fetch = Instant::now() + delay;
        self.metrics.source_errors.inc();
        warn!(error = %message, transient, retry_in_ms = delay.as_millis() as u64, "source error; enforcement unchanged");
        let mut s = lock(&self.status);
        s.source.error = Some(message.to_string());
        s.source.failures = self.backoff.failures();
    }

    /// Fetches; on a new commit, reconciles.
    fn sync_source(&mut self) {
        self.next_fetch = Instant::now() + self.cfg.source.interval;
        if !self.open_source() {
            return;
        }
        let seen = Instant::now();
        let Some(source) = self.source.as_mut() else { return };
        let fetched = match source.fetch() {
            Ok(f) => f,
            Err(e) => {
                let (m, t) = (e.to_string(), e.is_transient());
                self.source_failed(&m, t);
                return;
            }
        };
        self.backoff.reset();
        self.next_fetch = Instant::now() + self.cfg.source.interval;
        if fetched.forced {
            warn!(commit = %fetched.commit, previous = ?fetched.previous, "the ref was rewritten (force-push); following it");
        }
        if fetched.recloned {
            warn!("the local mirror was damaged or missing and was cloned again");
        }
        {
            let mut s = lock(&self.status);
            s.source.error = None;
            s.source.failures = 0;
            // `forced` describes how the head was reached, so it changes with the head only: a
            // fetch that finds nothing new must not clear it.
            if s.source.head.as_deref() != Some(fetched.commit.as_str()) {
                s.source.forced = fetched.forced;
            }
            s.source.head = Some(fetched.commit.clone());
            s.source.last_fetch_ms = Some(now_ms());
        }
        let current = self.applied.as_ref().map(|a| a.commit.as_str());
        if current == Some(fetched.commit.as_str())
            || self.rejected.as_deref() == Some(&fetched.commit)
        {
            return;
        }
        self.reconcile(&fetched.commit, Some(seen));
    }

    /// Makes the kernel enforce `commit`, unless it is refused.
    fn reconcile(&mut self, commit: &str, seen: Option<Instant>) {
        let t0 = seen.unwrap_or_else(Instant::now);
        let mut steps = Vec::new();
        if seen.is_some() {
            // The fetch that found the commit (into fwd's mirror).
            steps.push(Step { step: "fetch".into(), ms: ms(t0.elapsed()) });
        }
        let mut lap = Instant::now();
        let mut step = |steps: &mut Vec<Step>, name: &str| {
            steps.push(Step { step: name.into(), ms: ms(lap.elapsed()) });
            lap = Instant::now();
        };
        let Some(source) = self.source.as_ref() else { return };
        let compiler = &self.compiler;
        let mut snapshot =
            match source.snapshot_reusing(commit, &|path, blob| compiler.bytes_of(path, blob)) {
                Ok(s) => s,
                Err(e) => {
                    error!(%commit, "cannot read the commit's policy files: {e}");
                    self.record_error(Some(commit), "source", &e.to_string(), Vec::new());
                    self.metrics.outcome("failed");
                    return;
                }
            };
        step(&mut steps, "snapshot");
        let mut parts = Vec::new();
        let prev = self.applied.as_ref().map(|a| &a.desired);
        let compiled =
            self.compiler.desired(&snapshot.files, &self.host, &self.caps, prev, &mut parts);
        // The files' bytes (megabytes at 100k rules; the cache keeps what it needs) are freed
        // now, so that the memory released after the apply includes them.
        snapshot.files = Vec::new();
        let timed: Duration = parts.iter().map(|(_, d)| *d).sum();
        steps.extend(parts.into_iter().map(|(name, d)| Step { step: name.into(), ms: ms(d) }));
        // What the compiler's steps do not cover (handing the files over, dropping what the
        // load no longer needs); resets the lap.
        let mut rest = Vec::new();
        step(&mut rest, "compile: rest");
        if let Some(r) = rest.pop() {
            steps.push(Step { ms: (r.ms - ms(timed)).max(0.0), ..r });
        }
        let mut desired = match compiled {
            Ok(d) => d,
            Err(rejected) => {
                self.compiler.release();
                self.reject(commit, &rejected, steps);
                return;
            }
        };

        // Already enforced (a restart): keep it, check it for drift, apply nothing.
        if self.applied.is_none()
            && let Some(dp) = &self.dp
            && let Ok(active) = dp.active_generation()
            && let Ok(Some(rec)) = dp.applied(active)
            && rec.digest == desired.digest
            && rec.revision == commit
        {
            info!(%commit, digest = %desired.digest, "the pinned data plane already enforces this commit");
            self.compiler.release();
            let workloads = fw_loader::workloads::resolve(&self.cgroup, &desired.state.workloads);
            desired.saved = Vec::new();
            self.applied = Some(Applied { commit: commit.into(), desired, workloads });
            self.rejected = None;
            self.after_apply(&snapshot, t0, true);
            self.set_reconcile(commit, "unchanged", steps, None);
            self.metrics.outcome("unchanged");
            return;
        }

        let workloads = fw_loader::workloads::resolve(&self.cgroup, &desired.state.workloads);
        let deltas = self.applied.as_ref().map(|a| {
            // The kernel's workload table is keyed by cgroup id: written from `workloads`.
            // (The maps `desired` shares with the applied encoding are skipped unread.)
            let mut d = desired.delta_from(&a.desired);
            d.remove(fw_common::maps::WORKLOADS);
            d
        });
        let base = self.applied.as_ref().map(|a| a.desired.digest.clone());
        step(&mut steps, "diff");
        let enforce_at = t0.elapsed();
        let result =
            self.enforce(&desired, &workloads, commit, base.as_deref().zip(deltas.as_ref()));
        step(&mut steps, "enforce");
        self.compiler.release();
        match result {
            Ok(done) => {
                let enforced_after = t0.elapsed();
                info!(
                    %commit,
                    summary = %snapshot.summary,
                    digest = %desired.digest,
                    written = done.apply.standby.written,
                    deleted = done.apply.standby.deleted,
                    delta = done.delta,
                    ms = ms(enforced_after),
                    "applied"
                );
                self.metrics.reconcile_seconds.observe(enforced_after.as_secs_f64());
                self.apply_backoff.reset();
                let changes = match &self.applied {
                    Some(a) => policy::rule_changes(&a.desired.state, &desired.state),
                    None => vec!["(first state: every rule)".to_string()],
                };
                for c in &changes {
                    info!(%commit, "{c}");
                }
                // The loader saved the rule table; tens of MB at 100k rules.
                desired.saved = Vec::new();
                self.applied = Some(Applied { commit: commit.into(), desired, workloads });
                self.rejected = None;
                lock(&self.status).last_error = None;
                release_freed_memory();
                self.after_apply(&snapshot, t0, false);
                self.set_reconcile(commit, "applied", steps, Some(&done));
                if let Some(r) = lock(&self.status).last_reconcile.as_mut() {
                    r.changes = changes;
                    r.seen_to_flip_ms = seen_to_flip(enforce_at, &done);
                }
                self.metrics.outcome("applied");
            }
            Err(e) => {
                error!(%commit, "applying failed; the kernel keeps enforcing what it did: {e}");
                // The applied state stays as it was (`desired` only shared its maps).
                // The handle may name pins that are gone (an unload): reopen next time.
                self.dp = None;
                self.next_fetch = Instant::now() + self.apply_backoff.next_delay();
                self.record_error(Some(commit), "enforce", &e.to_string(), Vec::new());
                self.set_reconcile(commit, "failed", steps, None);
                self.metrics.outcome("failed");
            }
        }
    }

    fn enforce(
        &mut self,
        desired: &Desired,
        workloads: &BTreeMap<u64, u32>,
        revision: &str,
        delta: Option<(&str, &BTreeMap<&'static str, fw_loader::MapDelta>)>,
    ) -> Result<Enforced, LoaderError> {
        // The rule table is kept only until its state is applied (`Applied`); a later apply
        // of the same state (drift, workloads) writes it again from the state.
        let table;
        let saved_state = if desired.saved.is_empty() {
            table = policy::saved_table(&desired.state);
            &table
        } else {
            &desired.saved
        };
        let d = LoaderDesired {
            encoded: &desired.encoded,
            workloads: Some(workloads),
            revision,
            digest: &desired.digest,
            saved_state,
        };
        let change = match delta {
            Some((base_digest, changes)) => Change::Delta { base_digest, changes },
            None => Change::Full,
        };
        let target = Target {
            root: &self.cfg.bpffs,
            caps: &self.caps,
            interfaces: &self.cfg.interfaces,
            cgroup: &self.cgroup,
        };
        match self.dp.as_mut() {
            Some(dp) => dp.enforce(&target, &d, change),
            None => {
                let (dp, done) = enforce(&target, &d)?;
                self.dp = Some(dp);
                Ok(done)
            }
        }
    }

    fn after_apply(&mut self, snapshot: &crate::source::Snapshot, t0: Instant, adopted: bool) {
        let Some(a) = &self.applied else { return };
        let now = now_ms();
        let commit_ms = u64::try_from(snapshot.author_time).ok().map(|s| s.saturating_mul(1000));
        let to_enforced = commit_ms.map(|c| now.saturating_sub(c) as f64);
        if !adopted && let Some(l) = to_enforced {
            self.metrics.commit_to_enforced_seconds.observe(l / 1e3);
        }
        self.metrics.set_revision(&a.commit, &a.desired.digest);
        let program_id = self.dp.as_ref().and_then(|d| d.ingress_program_id().ok());
        {
            let mut s = lock(&self.status);
            s.applied = Some(AppliedStatus {
                commit: a.commit.clone(),
                summary: snapshot.summary.clone(),
                digest: a.desired.digest.clone(),
                at_ms: now,
                commit_time_ms: commit_ms,
                detect_to_enforced_ms: (!adopted).then(|| ms(t0.elapsed())),
                commit_to_enforced_ms: if adopted { None } else { to_enforced },
                adopted,
                program_id,
            });
            s.workloads.paths = a.desired.state.workloads.len();
            s.workloads.resolved = a.workloads.len();
        }
        // The watches go up only now, after the paths were resolved for the apply: a cgroup
        // made or removed in between sent no event to anyone, so the paths are resolved once
        // more with the watches in place (a `stat` each; a change rewrites the table).
        self.sync_workloads();
    }

    fn set_reconcile(
        &self,
        commit: &str,
        outcome: &str,
        mut steps: Vec<Step>,
        done: Option<&Enforced>,
    ) {
        let (mut written, mut deleted, mut delta) = (0, 0, false);
        if let Some(d) = done {
            for (name, t) in &d.apply.timings {
                steps.push(Step { step: format!("loader: {name}"), ms: ms(*t) });
            }
            written = d.apply.standby.written + d.apply.replay.written;
            deleted = d.apply.standby.deleted + d.apply.replay.deleted;
            delta = d.delta;
        }
        lock(&self.status).last_reconcile = Some(Reconcile {
            commit: commit.into(),
            outcome: outcome.into(),
            at_ms: now_ms(),
            steps,
            written,
            deleted,
            delta,
            seen_to_flip_ms: None,
            changes: Vec::new(),
        });
    }

    fn reject(&mut self, commit: &str, rejected: &Rejected, steps: Vec<Step>) {
        let stage = match rejected.stage {
            policy::Stage::Validate => "validate",
            policy::Stage::Compile => "compile",
        };
        error!(%commit, "commit refused, the last good policy keeps enforcing: {rejected}");
        for p in &rejected.problems {
            warn!(%commit, "{p}");
        }
        self.rejected = Some(commit.into());
        self.record_error(Some(commit), stage, &rejected.to_string(), rejected.problems.clone());
        self.set_reconcile(commit, "rejected", steps, None);
        self.metrics.outcome("rejected");
        release_freed_memory();
    }

    fn record_error(
        &self,
        commit: Option<&str>,
        stage: &str,
        message: &str,
        problems: Vec<policy::Problem>,
    ) {
        lock(&self.status).last_error = Some(ErrorStatus {
            commit: commit.map(String::from),
            stage: stage.into(),
            message: message.into(),
            problems,
            at_ms: now_ms(),
        });
    }

    /// Compares the kernel with the applied state in full and corrects what differs.
    fn drift(&mut self) {
        let (Some(dp), Some(a)) = (self.dp.as_mut(), self.applied.as_ref()) else { return };
        self.metrics.drift_checks.inc();
        let report = match dp.drift(&a.desired.encoded) {
            Ok(r) => r,
            Err(e) => {
                warn!("drift check failed: {e}");
                return;
            }
        };
        let workloads = fw_loader::workloads::resolve(&self.cgroup, &a.desired.state.workloads);
        let held = (0..fw_common::GENERATIONS)
            .map(|g| dp.read_workloads(g))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        let workloads_drift = held.iter().any(|h| *h != workloads);
        // Attachments removed by hand (a link pin deleted detaches it).
        let interfaces: Vec<String> = fw_loader::attachments(&self.cfg.bpffs)
            .map(|a| a.into_iter().map(|a| a.interface).collect())
            .unwrap_or_default();
        let egress = dp.cgroup_attachments().map(|l| l.len()).unwrap_or(0);
        let detached = self.cfg.interfaces.iter().any(|i| !interfaces.contains(i))
            || egress < fw_common::programs::EGRESS.len() + 1;
        let entries = report.entries();
        // The check read both generations in full (tens of MB at 100k rules; the loader keeps
        // the applied encoding's buffers for what matched): hand the copies back to the system.
        release_freed_memory();
        {
            let mut s = lock(&self.status);
            s.drift.checked_at_ms = Some(now_ms());
            s.drift.last_entries = entries;
            s.drift.last_workloads = workloads_drift;
            s.drift.last_detached = detached;
            s.drift.checks += 1;
        }
        if report.is_clean() && !workloads_drift && !detached {
            debug!("no drift");
            return;
        }
        for g in &report.generations {
            for (map, d) in &g.maps {
                warn!(
                    generation = g.generation,
                    active = g.active,
                    map,
                    upserts = d.upsert.len(),
                    removals = d.remove.len(),
                    "drift found"
                );
            }
        }
        // Taken out while the loader uses it (no copy of a possibly large state).
        let Some(mut a) = self.applied.take() else { return };
        match self.enforce(&a.desired, &workloads, &a.commit, None) {
            Ok(_) => {
                info!(entries, workloads = workloads_drift, detached, "drift corrected");
                self.metrics.drift_corrections.inc_by(entries as u64);
                let mut s = lock(&self.status);
                s.drift.corrected_total += entries as u64;
                // The paths resolved differently than at the last write (a cgroup came or went
                // without an event seen): the table written now is an update like any other.
                if workloads != a.workloads {
                    self.metrics.workload_updates.inc();
                    s.workloads.updates += 1;
                }
                s.workloads.resolved = workloads.len();
                drop(s);
                a.workloads = workloads;
            }
            Err(e) => {
                error!("correcting drift failed: {e}");
                self.dp = None;
                self.record_error(Some(&a.commit), "drift", &e.to_string(), Vec::new());
            }
        }
        self.applied = Some(a);
    }

    fn rewatch_cgroups(&mut self) {
        let Some(a) = &self.applied else { return };
        let want = watch_set(&self.cgroup, a.desired.state.workloads.keys().map(String::as_str));
        if self.cgroups.is_none() && !want.is_empty() {
            let tx = self.tx.clone();
            match CgroupWatch::new(move || {
                let _ = tx.send(Msg::CgroupChanged);
            }) {
                Ok(w) => self.cgroups = Some(w),
                Err(e) => warn!(
                    "cannot watch the cgroup tree ({e}); workloads are re-resolved at each drift check"
                ),
            }
        }
        if let Some(w) = self.cgroups.as_mut() {
            w.set(want);
        }
    }

    /// Re-resolves the workload paths and rewrites the workload table when it changed.
    fn sync_workloads(&mut self) {
        self.rewatch_cgroups();
        let Some(a) = &self.applied else { return };
        let workloads = fw_loader::workloads::resolve(&self.cgroup, &a.desired.state.workloads);
        if workloads == a.workloads {
            return;
        }
        let Some(mut a) = self.applied.take() else { return };
        let none = BTreeMap::new();
        let base = a.desired.digest.clone();
        match self.enforce(&a.desired, &workloads, &a.commit, Some((&base, &none))) {
            Ok(_) => {
                info!(
                    resolved = workloads.len(),
                    paths = a.desired.state.workloads.len(),
                    "workload table updated"
                );
                self.metrics.workload_updates.inc();
                let mut s = lock(&self.status);
                s.workloads.resolved = workloads.len();
                s.workloads.updates += 1;
                drop(s);
                a.workloads = workloads;
            }
            Err(e) => {
                error!("updating the workload table failed: {e}");
                self.dp = None;
            }
        }
        self.applied = Some(a);
    }

    /// Reads counters and map fill into the status document.
    fn refresh(&mut self) {
        let Some(dp) = self.dp.as_ref() else { return };
        let rules = self.applied.as_ref().map(|a| &a.desired.state.rules);
        let mut out = Vec::new();
        let mut denied = [0u64; 2];
        if let Ok(counters) = dp.rule_counters() {
            for (id, c) in counters {
                let info = rules.and_then(|r| r.get(&fw_compiler::model::RuleId(id)));
                let (name, direction, action, file, line) = match info {
                    Some(r) => (
                        match &r.name {
                            Some(n) => format!("{}/{n}", r.policy),
                            None => format!("{}#{}", r.policy, r.index),
                        },
                        r.direction,
                        r.action,
                        r.location.file.to_string(),
                        r.location.line,
                    ),
                    None => {
                        ("(unknown)".into(), Direction::Ingress, Action::Allow, String::new(), 0)
                    }
                };
                if info.is_some() && action == Action::Deny {
                    denied[usize::from(direction == Direction::Egress)] += c.packets;
                }
                out.push(RuleCounter {
                    id,
                    name,
                    direction: dir_name(direction).into(),
                    action: if action == Action::Deny { "deny" } else { "allow" }.into(),
                    file,
                    line,
                    packets: c.packets,
                    bytes: c.bytes,
                });
            }
        }
        let maps = dp
            .status()
            .map(|st| {
                st.maps
                    .iter()
                    .map(|m| MapFill {
                        name: m.name.into(),
                        entries: m.entries,
                        capacity: m.capacity,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let stat = |dir: u32, slot: u32| dp.stat(dir, slot).map(|c| c.packets).unwrap_or(0);
        let drops = [
            (fw_common::DIRECTION_INGRESS, "ingress", denied[0]),
            (fw_common::DIRECTION_EGRESS, "egress", denied[1]),
        ]
        .into_iter()
        .map(|(d, name, rule)| Drops {
            direction: name.into(),
            default: stat(d, fw_common::STAT_DEFAULT_DENY),
            rule,
            malformed: stat(d, fw_common::STAT_MALFORMED),
            internal: stat(d, fw_common::STAT_INTERNAL_ERROR),
        })
        .collect();
        let mut s = lock(&self.status);
        s.rules = out;
        s.maps = maps;
        s.drops = drops;
    }
}

/// From seeing the commit to the flip: `enforce_at` (when `enforce` was called, from the
/// moment the commit was seen) plus the loader's steps up to and including the flip. The
/// time `enforce` spends before the loader's first step (taking the root's lock) is not in
/// the loader's steps; it is a few system calls. `None` when the apply had no flip step.
fn seen_to_flip(enforce_at: Duration, done: &Enforced) -> Option<f64> {
    let t = &done.apply.timings;
    let flip = t.iter().position(|(name, _)| *name == "flip")?;
    let loader: Duration = t.iter().take(flip + 1).map(|(_, d)| *d).sum();
    Some(ms(enforce_at + loader))
}

/// Hands memory freed after a compile back to the system: the compiler's intermediate
/// structures of a large policy are hundreds of MB at peak, which glibc's allocator would
/// otherwise keep mapped between commits.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// The status lock; a panic elsewhere while holding it leaves the document usable.
pub fn lock(status: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    status.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
