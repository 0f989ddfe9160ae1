//! Running frames through the loaded program and checking verdicts and counters.
//!
//! Verdicts are checked frame by frame (a test run returns the action). Counters are checked
//! per batch: the harness adds up what every frame should have counted and compares the sums
//! with the kernel's maps at the end, which costs two map dumps instead of two per frame. When
//! the sums differ, [`Harness::pinpoint`] replays the batch one frame at a time to name the
//! first frame whose counters are wrong.

use std::collections::BTreeMap;
use std::io::Write as _;

use fw_common::{Counters, DIRECTION_EGRESS, DIRECTION_INGRESS, STATS_PER_DIRECTION, stat_index};
use fw_compiler::mapstate::Capacities;
use fw_loader::{Dataplane, Error};

use crate::probe::{Count, Expectation};

/// Whether the process may load BPF programs. The privileged tests call this first and return
/// (after saying why) when it is false; CI runs them as root.
pub fn privileged(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|ids| {
                // Real, effective, saved, filesystem: the effective one decides.
                ids.split_whitespace().nth(1) == Some("0")
            })
        })
        .unwrap_or(false);
    if !root {
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests, and a
        // skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs root (loads eBPF programs and creates maps); run the tests as root"
        );
    }
    root
}

/// The loaded data plane and the counters the frames run so far should have produced.
pub struct Harness {
    pub dp: Dataplane,
    rules: BTreeMap<u32, Counters>,
    stats: BTreeMap<u32, Counters>,
    batch: Vec<(Vec<u8>, Expectation)>,
    pub runs: usize,
}

fn add(c: &mut Counters, len: usize) {
    c.packets += 1;
    c.bytes += len as u64;
}

impl Harness {
    /// Loads the embedded object with default capacities.
    pub fn load() -> Result<Self, Error> {
        Ok(Self {
            dp: Dataplane::load(&Capacities::default())?,
            rules: BTreeMap::new(),
            stats: BTreeMap::new(),
            batch: Vec::new(),
            runs: 0,
        })
    }

    /// Zeroes the kernel's counters and the expected ones; starts a new batch.
    pub fn reset(&mut self) -> Result<(), Error> {
        self.dp.reset_counters()?;
        self.rules.clear();
        self.stats.clear();
        self.batch.clear();
        Ok(())
    }

    /// Runs one frame; `Err` describes a wrong verdict.
    pub fn run(&mut self, frame: &[u8], expect: &Expectation) -> Result<(), String> {
        let out = self.dp.test_run_ingress(frame).map_err(|e| format!("test run failed: {e}"))?;
        self.runs += 1;
        if out.action != expect.action {
            return Err(format!(
                "verdict {:?}, expected {:?} for frame {}",
                out.action,
                expect.action,
                hex(frame)
            ));
        }
        for count in &expect.counts {
            match *count {
                Count::Rule(r) => add(self.rules.entry(r).or_default(), frame.len()),
                Count::Stat(s) => add(self.stats.entry(s).or_default(), frame.len()),
            }
        }
        self.batch.push((frame.to_vec(), expect.clone()));
        Ok(())
    }

    /// The kernel's stats, without the zero ones: ingress by `STAT_*` slot, egress (where
    /// nothing may count) by 1000 + slot.
    fn kernel_stats(&self) -> Result<BTreeMap<u32, Counters>, Error> {
        let all = self.dp.stats()?;
        let mut out = BTreeMap::new();
        for stat in 0..STATS_PER_DIRECTION {
            for (direction, key) in [(DIRECTION_INGRESS, stat), (DIRECTION_EGRESS, 1000 + stat)] {
                let c = all.get(stat_index(direction, stat) as usize).copied().unwrap_or_default();
                if c != Counters::default() {
                    out.insert(key, c);
                }
            }
        }
        Ok(out)
    }

    /// Compares the kernel's counters with the expected sums of the batch.
    pub fn check_counters(&self) -> Result<(), String> {
        let rules = self.dp.rule_counters().map_err(|e| e.to_string())?;
        let stats = self.kernel_stats().map_err(|e| e.to_string())?;
        if rules == self.rules && stats == self.stats {
            return Ok(());
        }
        Err(format!(
            "counters differ after {} frames\n rules:  kernel {rules:?}\n         expected {:?}\n stats:  kernel {stats:?}\n         expected {:?}",
            self.batch.len(),
            self.rules,
            self.stats
        ))
    }

    /// Replays the batch one frame at a time and names the first frame whose counter changes
    /// are not the expected ones.
    pub fn pinpoint(&mut self) -> String {
        let batch = std::mem::take(&mut self.batch);
        for (frame, expect) in &batch {
            if let Err(e) = self.reset() {
                return format!("reset failed: {e}");
            }
            if let Err(e) = self.run(frame, expect) {
                return e;
            }
            if let Err(e) = self.check_counters() {
                return format!("frame {} ({expect:?}): {e}", hex(frame));
            }
        }
        "no single frame reproduces the difference".to_string()
    }
}

impl Harness {
    /// Runs each named case (a frame and what the program must do with it, counters
    /// included) from a reset, and fails naming every case that did not hold.
    pub fn assert_cases(&mut self, cases: &[(&str, Vec<u8>, Expectation)]) {
        let mut failures = Vec::new();
        for (name, frame, expect) in cases {
            self.reset().expect("reset");
            let result = self.run(frame, expect).and_then(|()| self.check_counters());
            if let Err(e) = result {
                failures.push(format!("{name}: {e}\n  frame {}", hex(frame)));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}

/// A frame as hex, for failure messages.
pub fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// A bpffs root of a test's own (`/sys/fs/bpf/fwtest-<tag>-<pid>-<n>`, unique within the
/// process), with everything pinned under it unloaded and the folder removed on drop, so a
/// test that panics leaves nothing behind.
pub struct PinRoot(pub std::path::PathBuf);

impl PinRoot {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(format!("/sys/fs/bpf/fwtest-{tag}-{}-{n}", std::process::id()).into())
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = fw_loader::unload_pinned(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
