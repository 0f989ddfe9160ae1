//! The update protocol: make the kernel hold a new compiled state without a packet ever
//! seeing a mix of old and new.
//!
//! Why it is built this way (the steps of [`Dataplane::apply`]):
//! 1. Read what the standby generation holds and diff it against the desired encoding, entry
//!    by entry. Reading rather than trusting a record makes the protocol self-healing: after a
//!    crash at any step the next apply writes whatever is really missing.
//! 2. Clear the standby's record (it no longer describes the maps), write only the diff, and
//!    read the changed maps back to verify. If the desired state does not fit the standby's
//!    maps, bigger inner maps are created, filled and put into the standby's outer slots
//!    instead (each slot update waits for an RCU grace period).
//! 3. Record the standby's revision, digest and saved state, then flip: one write of the
//!    one-element generation array. This is the commit point; any error before it leaves the
//!    active generation untouched and enforcing.
//! 4. Wait for an RCU grace period (re-setting an outer slot to the map it already holds
//!    returns only after one), so no packet still runs on the old generation.
//! 5. Replay onto the old generation (diff against what it really holds again) and record it,
//!    so both generations hold the same state and the next apply's diff is small.
//!
//! `FW_LOADER_HOOK` ([`HOOK_ENV`]) lets tests stop an apply between steps to check that the
//! data plane fails static: `STEP[:pause|:abort]`, comma-separated, with STEP one of
//! `after-standby-write`, `after-flip`, `before-replay`. `pause` prints
//! `fw-loader: paused at STEP` to stderr and sleeps (the test kills the process); `abort`
//! returns [`Error::HookAbort`]. This is the one place the library writes to stderr.

use std::time::{Duration, Instant};

use fw_common::GENERATIONS;
use fw_compiler::encode::{Encoded, decode};

use crate::generation::{self, GenerationMaps};
use crate::{Dataplane, Error, WriteStats};

/// The environment variable of the test hook (see the module docs).
pub const HOOK_ENV: &str = "FW_LOADER_HOOK";

/// Longest revision string the record holds.
const MAX_REVISION: usize = 256;

/// What a generation holds, by the pinned record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub revision: String,
    pub digest: String,
    /// Length of the saved state in bytes.
    pub state_len: usize,
}

/// What one apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// The generation that was active before (and was replayed onto).
    pub from: u32,
    /// The generation that is active now.
    pub to: u32,
    /// Entries written into the standby before the flip.
    pub standby: WriteStats,
    /// Entries written into the old generation after the flip.
    pub replay: WriteStats,
    /// Generations whose inner maps were replaced by bigger ones.
    pub grown: Vec<u32>,
    /// How long each step took.
    pub timings: Vec<(&'static str, Duration)>,
}

fn hook(step: &'static str) -> Result<(), Error> {
    let Ok(spec) = std::env::var(HOOK_ENV) else { return Ok(()) };
    for item in spec.split(',') {
        let (s, action) = item.split_once(':').unwrap_or((item, "pause"));
        if s != step {
            continue;
        }
        if action == "abort" {
            return Err(Error::HookAbort(step));
        }
        eprintln!("fw-loader: paused at {step}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}

/// The smallest power of two at least `n` and at least `old`.
fn grow(old: u32, n: usize) -> u32 {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    old.max(n.checked_next_power_of_two().unwrap_or(u32::MAX))
}

impl Dataplane {
    /// What generation `generation` holds by the record (`None`: unknown, e.g. a write to it
    /// was interrupted, or the data plane is not pinned).
    pub fn applied(&self, generation: u32) -> Result<Option<Applied>, Error> {
        let Some(pins) = self.pins() else { return Ok(None) };
        let Some(fields) = pins.read(generation)? else { return Ok(None) };
        let get = |k: &str| fields.get(k).cloned().ok_or(Error::Record("a field is missing"));
        Ok(Some(Applied {
            revision: get("revision")?,
            digest: get("digest")?,
            state_len: get("state_len")?.parse().map_err(|_| Error::Record("state_len"))?,
        }))
    }

    /// The saved state of generation `generation` (the bytes given to the apply that wrote
    /// it), when the record has one.
    pub fn saved_state(&self, generation: u32) -> Result<Option<Vec<u8>>, Error> {
        let Some(applied) = self.applied(generation)? else { return Ok(None) };
        let Some(pins) = self.pins() else { return Ok(None) };
        pins.read_state(generation, applied.state_len).map(Some)
    }

    /// Makes generation `generation` hold exactly `encoded`: writes the entry diff against
    /// what it holds, or, when `encoded` does not fit, fills bigger maps and puts them into
    /// the generation's outer slots. Verifies by reading the changed maps back.
    fn sync_generation(
        &mut self,
        generation: u32,
        encoded: &Encoded,
        grown: &mut Vec<u32>,
    ) -> Result<WriteStats, Error> {
        let g = usize::try_from(generation).map_err(|_| Error::NoSuchGeneration(generation))?;
        let gm = self.generations.get_mut(g).ok_or(Error::NoSuchGeneration(generation))?;
        if gm.fits(encoded).is_some() {
            let mut caps = gm.caps;
            for (&name, entries) in &encoded.maps {
                let n = entries.len();
                match name {
                    fw_common::maps::INGRESS_V4 | fw_common::maps::EGRESS_V4 => {
                        caps.v4_prefixes = grow(caps.v4_prefixes, n)
                    }
                    fw_common::maps::INGRESS_V6 | fw_common::maps::EGRESS_V6 => {
                        caps.v6_prefixes = grow(caps.v6_prefixes, n)
                    }
                    fw_common::maps::INGRESS_L4 | fw_common::maps::EGRESS_L4 => {
                        caps.l4_entries = grow(caps.l4_entries, n)
                    }
                    _ => {}
                }
            }
            let mut fresh = GenerationMaps::create(generation, &caps)?;
            let stats = fresh.write(encoded)?;
            verify(&fresh, encoded, encoded.maps.keys().copied())?;
            fresh.install(generation, &mut self.outer)?;
            *gm = fresh;
            grown.push(generation);
            return Ok(stats);
        }
        let current = gm.read()?;
        let deltas = generation::delta(&current, encoded);
        let stats = gm.apply_delta(&deltas)?;
        verify(gm, encoded, deltas.keys().copied())?;
        Ok(stats)
    }

    fn record(
        &mut self,
        generation: u32,
        revision: &str,
        digest: &str,
        saved_state: &[u8],
    ) -> Result<(), Error> {
        let Some(pins) = self.pins_mut() else { return Ok(()) };
        pins.write_state(generation, saved_state)?;
        let len = saved_state.len().to_string();
        pins.write(generation, &[("revision", revision), ("digest", digest), ("state_len", &len)])
    }

    /// Applies a compiled state (`fw_compiler::encode`'s output) with the protocol in the
    /// module docs. `revision` names the policy version, `digest` is `MapState::digest`, and
    /// `saved_state` is kept with the generation (fwctl keeps the `MapState` JSON there, for
    /// the rule table). On an error before the flip the active generation is untouched.
    pub fn apply(
        &mut self,
        encoded: &Encoded,
        revision: &str,
        digest: &str,
        saved_state: &[u8],
    ) -> Result<ApplyReport, Error> {
        self.apply_with_workloads(encoded, None, revision, digest, saved_state)
    }

    /// [`Dataplane::apply`], also making each generation's workload table hold `workloads`
    /// (cgroup id -> class, see [`crate::workloads::resolve`]) when given: written into the
    /// standby before the flip and replayed onto the old generation with the rest, so a
    /// packet never sees rules of one state with workload classes of another. `None` leaves
    /// the tables as they are.
    pub fn apply_with_workloads(
        &mut self,
        encoded: &Encoded,
        workloads: Option<&std::collections::BTreeMap<u64, u32>>,
        revision: &str,
        digest: &str,
        saved_state: &[u8],
    ) -> Result<ApplyReport, Error> {
        if revision.len() > MAX_REVISION || revision.contains(['\n', '\0']) {
            return Err(Error::BadRevision { max: MAX_REVISION });
        }
        if digest.contains(['\n', '\0']) || digest.len() > 128 {
            return Err(Error::Record("the digest is not one short line"));
        }
        decode(encoded).map_err(Error::InvalidState)?;
        let mut report = ApplyReport::default();
        let mut t = Instant::now();
        let mut lap = |report: &mut ApplyReport, step| {
            report.timings.push((step, t.elapsed()));
            t = Instant::now();
        };
        let active = self.active_generation()?;
        if active >= GENERATIONS {
            return Err(Error::NoSuchGeneration(active));
        }
        let standby = (active + 1) % GENERATIONS;
        report.from = active;
        report.to = standby;

        if let Some(pins) = self.pins_mut() {
            pins.write(standby, &[])?;
        }
        report.standby = self.sync_generation(standby, encoded, &mut report.grown)?;
        if let Some(w) = workloads {
            report.standby += self.write_workloads(standby, w)?;
        }
        self.record(standby, revision, digest, saved_state)?;
        lap(&mut report, "write standby");
        hook("after-standby-write")?;

        self.set_active_generation(standby)?;
        lap(&mut report, "flip");
        hook("after-flip")?;

        let g = usize::try_from(standby).map_err(|_| Error::NoSuchGeneration(standby))?;
        self.generations
            .get(g)
            .ok_or(Error::NoSuchGeneration(standby))?
            .wait_grace_period(standby, &mut self.outer)?;
        lap(&mut report, "grace period");
        hook("before-replay")?;

        if let Some(pins) = self.pins_mut() {
            pins.write(active, &[])?;
        }
        report.replay = self.sync_generation(active, encoded, &mut report.grown)?;
        if let Some(w) = workloads {
            report.replay += self.write_workloads(active, w)?;
        }
        self.record(active, revision, digest, saved_state)?;
        lap(&mut report, "replay");
        Ok(report)
    }
}

/// Checks that each of `names` holds exactly what `encoded` gives it.
fn verify<'a>(
    gm: &GenerationMaps,
    encoded: &Encoded,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), Error> {
    let empty = Vec::new();
    for name in names {
        if name == fw_common::maps::WORKLOADS {
            continue;
        }
        let want = encoded.maps.get(name).unwrap_or(&empty);
        let have = gm.read_map(name)?;
        if &have != want {
            let name = fw_common::maps::GENERATIONAL
                .into_iter()
                .find(|n| *n == name)
                .unwrap_or("unknown map");
            return Err(Error::VerifyFailed(name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_rounds_up_to_a_power_of_two_and_never_shrinks() {
        assert_eq!(grow(16, 17), 32);
        assert_eq!(grow(64, 17), 64);
        assert_eq!(grow(1, 1000), 1024);
    }

    #[test]
    fn an_entry_diff_lists_only_what_changed() {
        let mut a = Encoded::default();
        let mut b = Encoded::default();
        a.maps.insert("FW_IN_V4", vec![(vec![1], vec![1]), (vec![2], vec![2]), (vec![3], vec![3])]);
        b.maps.insert("FW_IN_V4", vec![(vec![1], vec![1]), (vec![2], vec![9]), (vec![4], vec![4])]);
        let d = generation::delta(&a, &b);
        let m = d.get("FW_IN_V4").expect("a diff for FW_IN_V4");
        assert_eq!(m.upsert, vec![(vec![2], vec![9]), (vec![4], vec![4])]);
        assert_eq!(m.remove, vec![vec![3]]);
        assert!(generation::delta(&a, &a).is_empty());
    }
}
