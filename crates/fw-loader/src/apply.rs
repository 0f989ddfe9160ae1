//! The update protocol: make the kernel hold a new compiled state without a packet ever
//! seeing a mix of old and new.
//!
//! Why it is built this way (the steps of [`Dataplane::apply`]):
//! 1. Find out what the standby generation holds and diff it against the desired encoding,
//!    entry by entry. The kernel is the truth, but reading a 100k-prefix generation back costs
//!    ~170 ms, so a `Dataplane` keeps, per generation, the encoded state it last wrote *and
//!    verified* there (or, for maps it created and pinned itself, the empty state they start
//!    with), tagged with a random 64-bit write id. The same id goes into the
//!    generation's pinned record, which is cleared before the generation is written and set
//!    only after the write is verified. An apply reads the record (one small array lookup):
//!    when its write id is the one cached, nothing wrote the generation through the protocol
//!    since, and the cache is what the kernel holds; otherwise (a fresh process, another
//!    writer, a write interrupted by a crash, which leaves the record cleared) the generation
//!    is read in full as before, so the protocol stays self-healing. A random id rather than a
//!    counter: there is no shared counter to keep consistent across processes and crashes, and
//!    only equality matters. Entries changed behind the protocol's back (by hand, with
//!    bpftool) do not change the record: [`Dataplane::drift`] finds them with a full read.
//! 2. Check the desired state before anything is written: the entries to be written are
//!    checked as `encode::decode` checks them (`encode::validate`, which skips building the
//!    decoded maps when the keys are distinct by construction; every map that changes is
//!    checked in full when the desired entries are not sorted, which is how duplicate keys
//!    are ruled out), the unchanged ones are what the kernel already holds. Clear the
//!    standby's record, write only the diff, and verify only what was written: each upserted
//!    key is present with its value, each removed key is absent (O(diff) lookups; a large
//!    write of a hash, such as a full load, is checked against one batched read of the map
//!    instead, and the ingress IPv4 table's loader-only record is read back whole). If the
//!    desired state does not fit the standby's maps, bigger inner maps are created, filled,
//!    read back in full and put into the standby's outer slots instead (each slot update
//!    waits for an RCU grace period).
//! 3. Record the standby's revision, digest and write id, then flip: one write of the
//!    one-element generation array. This is the commit point; any error before it leaves the
//!    active generation untouched and enforcing.
//! 4. Save the caller's saved state (fwctl's rule table) when it differs from the one saved
//!    last, in a pinned map named by an id the records refer to: after the flip, so it is not
//!    on the path to "enforced". A crash between the flip and this step leaves the active
//!    record without a saved state (readers say so), and the next apply saves it.
//! 5. Wait for an RCU grace period (re-setting an outer slot to the map it already holds
//!    returns only after one), so no packet still runs on the old generation.
//! 6. Replay onto the old generation (diff against what it holds, known the same way as in
//!    step 1) and record it, so both generations hold the same state and the next apply's diff
//!    is small.
//! 7. Clean up what no generation refers to any more: per-rule counters of rules no L4 entry
//!    names (safe only now: the grace period has passed and both generations hold the new
//!    state, so no program can still count for them), and saved-state pins neither record
//!    names. Counters of rules that are still referenced, changed or not, are kept.
//!
//! The first load into a data plane no program runs on yet (loaded by this handle and not
//! attached: `enforce` on a fresh root, which holds the root's lock from the load to the
//! attach; see `Dataplane::exclusive`) skips the wait and the replay: with both generations
//! known to hold the fresh state and no packet able to read either, the same deltas go into
//! both at once (`ApplyReport::both_at_once`), each written and verified as in step 2, the
//! active generation's config last (until then its all-zero config makes the programs drop,
//! so a write that fails halfway lets nothing through), then the records and the flip. That
//! is a host's first policy, the one it waits for unfiltered: a 100k-prefix load completes in
//! about two thirds of the time of writing one generation, waiting and replaying.
//!
//! Step 1 still compares the whole desired state with what the generation holds, in memory:
//! O(policy size), about a millisecond at 100k entries. [`Dataplane::apply_changes`] takes the
//! change as entry deltas instead, on top of the state applied last (checked by its digest
//! and the write id in the record), so nothing before the flip is O(policy size).
//!
//! `FW_LOADER_HOOK` ([`HOOK_ENV`]) lets tests stop an apply between steps to check that the
//! data plane fails static: `STEP[:pause|:abort]`, comma-separated, with STEP one of
//! `after-standby-write`, `after-flip`, `before-replay`. `pause` prints
//! `fw-loader: paused at STEP` to stderr and sleeps (the test kills the process); `abort`
//! returns [`Error::HookAbort`]. This is the one place the library writes to stderr.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fw_common::{GENERATIONS, RuleCounterSlot};
use fw_compiler::encode::{Encoded, Entries, validate};

use crate::generation::{self, DIR_HASH_FIRST, GenerationMaps, MapDelta};
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
    /// Per-rule counters deleted because no generation refers to their rule any more.
    pub counters_removed: usize,
    /// A first load into a data plane no program runs on yet: both generations were written
    /// at once, and no grace period was waited for (`replay` is what the old generation got).
    pub both_at_once: bool,
    /// How long each step took, in order: `diff`, `write standby`, `flip` (the state is
    /// enforced from here), `save state`, `grace period`, `replay`, `clean up`.
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

/// Whether a record's fields are those of a generation the loader created empty (`know_fresh`):
/// a write id and nothing else, so known to hold the fresh state, with nothing applied.
fn records_nothing_applied(fields: &BTreeMap<String, String>) -> bool {
    fields.len() == 1 && fields.contains_key("write")
}

/// Refuses a revision or a digest the record cannot hold (each one short line).
fn check_record_fields(revision: &str, digest: &str) -> Result<(), Error> {
    if revision.len() > MAX_REVISION || revision.contains(['\n', '\0']) {
        return Err(Error::BadRevision { max: MAX_REVISION });
    }
    if digest.contains(['\n', '\0']) || digest.len() > 128 {
        return Err(Error::Record("the digest is not one short line"));
    }
    Ok(())
}

/// Times an apply's steps: each call records, under the step's name, the time since the
/// previous call (the first: since this was made).
fn stopwatch() -> impl FnMut(&mut ApplyReport, &'static str) {
    let mut t = Instant::now();
    move |report, step| {
        report.timings.push((step, t.elapsed()));
        t = Instant::now();
    }
}

/// The smallest power of two at least `n` and at least `old`.
fn grow(old: u32, n: usize) -> u32 {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    old.max(n.checked_next_power_of_two().unwrap_or(u32::MAX))
}

/// The capacity of a hash of IPv4 chunks that outgrew `old` for `n` chunks: a quarter more
/// than `n`, in steps of [`DIR_HASH_FIRST`] chunks, at most every chunk there can be. Not a
/// power of two like [`grow`]: each chunk is 3 KiB preallocated, so doubling would cost up
/// to twice the memory of the chunks in use (1M prefixes: 4,163 chunks, 6,144 slots).
fn grow_chunks(old: u32, n: usize) -> u32 {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    let want = n.saturating_add(n / 4).div_ceil(DIR_HASH_FIRST).saturating_mul(DIR_HASH_FIRST);
    old.max(want).min(fw_common::V4_DIR_MAX_CHUNKS)
}

/// What this process last wrote into one generation and verified, with the write id of that
/// write (the generation's record carries the same id while nothing else wrote it). After a
/// complete apply both generations hold the same state: their entries share one `state`, and
/// an apply that finds them shared takes both, patches the one copy for the standby and
/// replays the same deltas onto the old generation. The maps of `state` are `Entries`, shared
/// buffers: once an apply is done, [`Dataplane::share_cached_maps`] makes them the caller's
/// desired encoding's own (17 MiB at 100k rules held once, not once by the caller and once
/// here).
#[derive(Debug)]
pub(crate) struct Held {
    write: String,
    state: Arc<Encoded>,
}

/// `encoded`'s maps but the workload table (which a generation's state does not include),
/// sharing their buffers.
fn kernel_view(encoded: &Encoded) -> Encoded {
    let maps = encoded
        .maps
        .iter()
        .filter(|(n, _)| **n != fw_common::maps::WORKLOADS)
        .map(|(&n, e)| (n, e.clone()))
        .collect();
    Encoded { maps }
}

/// The state out of its `Arc`: moved when this is the only reference, else copied.
fn owned(state: Arc<Encoded>) -> Encoded {
    Arc::try_unwrap(state).unwrap_or_else(|shared| (*shared).clone())
}

/// The length of a saved state and its keyed BLAKE3 hash (a key random per process): tells
/// whether bytes are those pinned last without keeping them. Two different byte strings of one
/// length match with probability about 2^-256, and without the process's key no one can choose
/// bytes that match. Not SipHash, which `std` has: the fingerprint is taken before the flip,
/// and fwd's saved rule table is 24 MiB at 100k rules, which two 64-bit SipHash passes read in
/// about 20 ms and BLAKE3 in about 7 (a 500 KB table: 0.35 against 0.11 ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    len: usize,
    hash: [u8; blake3::OUT_LEN],
}

impl Fingerprint {
    fn of(bytes: &[u8]) -> Result<Self, Error> {
        static KEY: std::sync::OnceLock<[u8; blake3::KEY_LEN]> = std::sync::OnceLock::new();
        let key = match KEY.get() {
            Some(key) => key,
            // Two threads may both draw; the first key set is every thread's.
            None => {
                let drawn = random_bytes()?;
                KEY.get_or_init(|| drawn)
            }
        };
        Ok(Self { len: bytes.len(), hash: *blake3::keyed_hash(key, bytes).as_bytes() })
    }
}

/// `N` random bytes from the kernel.
fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    // SAFETY: `b` is a writable buffer of the given length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if usize::try_from(n).ok() != Some(N) {
        return Err(Error::Random(std::io::Error::last_os_error()));
    }
    Ok(b)
}

/// A fresh write id: 64 random bits in hex.
pub(crate) fn write_id() -> Result<String, Error> {
    Ok(format!("{:016x}", u64::from_ne_bytes(random_bytes()?)))
}

/// What must be checked (`decode`) before writing `deltas`: the config and the workload
/// table whole (both are tiny), and of the other maps only the entries to be written when
/// `desired` was found sorted without duplicate keys (`generation::delta_checked`), else every
/// map that changes, whole. The maps that do not change are what the kernel already holds.
fn to_check(encoded: &Encoded, deltas: &BTreeMap<&'static str, MapDelta>, sorted: bool) -> Encoded {
    let maps = encoded
        .maps
        .iter()
        .map(|(&name, entries)| {
            let entries = if name == fw_common::maps::CONFIG || name == fw_common::maps::WORKLOADS {
                entries.clone()
            } else {
                match deltas.get(name) {
                    Some(d) if sorted => d.upsert.clone(),
                    Some(_) => entries.clone(),
                    None => Entries::new(),
                }
            };
            (name, entries)
        })
        .collect();
    Encoded { maps }
}

/// The maps whose values name rules (the L4 tables).
const L4_MAPS: [&str; 3] =
    [fw_common::maps::INGRESS_L4, fw_common::maps::INGRESS_L4_EXACT, fw_common::maps::EGRESS_L4];

/// The rule ids the L4 values of `encoded` name: the only rules a program can count for.
fn referenced_rules(encoded: &Encoded) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for name in L4_MAPS {
        for (_, v) in encoded.maps.get(name).into_iter().flatten() {
            if let Some(v) = <fw_common::L4Value as fw_common::Bytes>::from_bytes(v) {
                out.extend([v.verdict_rule, v.audit_rule].into_iter().filter(|&r| r != 0));
            }
        }
    }
    out
}

/// `changes` reduced to what differs from `current` (key-sorted, `current` being sorted):
/// upserts of entries already held and removals of keys not held are dropped. A key given
/// twice, or both upserted and removed, is refused, as is a map the data plane does not have.
fn effective_changes(
    current: &Encoded,
    changes: &BTreeMap<&'static str, MapDelta>,
) -> Result<BTreeMap<&'static str, MapDelta>, Error> {
    let empty = Entries::new();
    let mut out = BTreeMap::new();
    for (&name, change) in changes {
        if !fw_common::maps::GENERATIONAL.contains(&name) || name == fw_common::maps::WORKLOADS {
            return Err(Error::UnknownMap(name.to_string()));
        }
        let held = current.maps.get(name).unwrap_or(&empty);
        let mut d = MapDelta::default();
        let mut keys: Vec<&[u8]> = Vec::new();
        for (k, v) in &change.upsert {
            keys.push(k);
            if held.value_of(k) != Some(v) {
                d.upsert.push(k, v);
            }
        }
        for k in &change.remove {
            keys.push(k);
            if held.binary_search(k).is_ok() {
                d.remove.push(k.clone());
            }
        }
        keys.sort_unstable();
        if keys.windows(2).any(|w| w.first() == w.get(1)) {
            return Err(Error::InvalidState(fw_compiler::encode::DecodeError::DuplicateKey {
                map: name,
            }));
        }
        d.upsert.sort();
        d.remove.sort_unstable();
        if !d.is_empty() {
            out.insert(name, d);
        }
    }
    Ok(out)
}

/// Checks `deltas` against what the standby holds before anything is written: the entries to
/// write decode (with the config as it will be), and every map still fits its capacity.
fn check_changes(
    current: &Encoded,
    deltas: &BTreeMap<&'static str, MapDelta>,
    caps: &fw_compiler::mapstate::Capacities,
) -> Result<(), Error> {
    let mut check = Encoded::default();
    for name in fw_common::maps::GENERATIONAL {
        let d = deltas.get(name);
        let entries = if name == fw_common::maps::CONFIG {
            let mut config = current.maps.get(name).cloned().unwrap_or_default();
            if let Some(d) = d {
                generation::patch(&mut config, d);
            }
            config
        } else {
            d.map(|d| d.upsert.clone()).unwrap_or_default()
        };
        check.maps.insert(name, entries);
    }
    validate(&check).map_err(Error::InvalidState)?;
    for (&name, d) in deltas {
        let held = current.maps.get(name).map_or(0, Entries::len);
        let new = d
            .upsert
            .iter()
            .filter(|(k, _)| current.maps.get(name).is_none_or(|h| h.binary_search(k).is_err()))
            .count();
        let cap = match name {
            fw_common::maps::INGRESS_V4 | fw_common::maps::EGRESS_V4 => caps.v4_prefixes,
            fw_common::maps::INGRESS_V6 | fw_common::maps::EGRESS_V6 => caps.v6_prefixes,
            fw_common::maps::INGRESS_L4
            | fw_common::maps::INGRESS_L4_EXACT
            | fw_common::maps::EGRESS_L4 => caps.l4_entries,
            _ => continue,
        };
        if held + new - d.remove.len().min(held + new) > cap as usize {
            return Err(Error::StaleBase);
        }
    }
    Ok(())
}

/// One generation's drift: what must change in its maps to hold the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerationDrift {
    pub generation: u32,
    /// Whether packets use this generation.
    pub active: bool,
    /// Whether the generation has a record (a verified write that was not interrupted).
    pub recorded: bool,
    /// Per map, the entries to write and the keys to delete (only maps that differ).
    pub maps: BTreeMap<&'static str, MapDelta>,
}

/// What [`Dataplane::drift`] found, per generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriftReport {
    pub generations: Vec<GenerationDrift>,
}

impl DriftReport {
    /// Whether every generation holds exactly the desired state.
    pub fn is_clean(&self) -> bool {
        self.generations.iter().all(|g| g.maps.is_empty())
    }

    /// Entries that differ, over all generations and maps.
    pub fn entries(&self) -> usize {
        self.generations.iter().flat_map(|g| g.maps.values()).map(MapDelta::len).sum()
    }
}

impl Dataplane {
    /// What generation `generation` holds by the record (`None`: nothing applied yet, or
    /// unknown, e.g. a write to it was interrupted, or the data plane is not pinned).
    pub fn applied(&self, generation: u32) -> Result<Option<Applied>, Error> {
        let Some(pins) = self.pins() else { return Ok(None) };
        let Some(fields) = pins.read(generation)? else { return Ok(None) };
        if records_nothing_applied(&fields) {
            return Ok(None);
        }
        let get = |k: &str| fields.get(k).cloned().ok_or(Error::Record("a field is missing"));
        Ok(Some(Applied {
            revision: get("revision")?,
            digest: get("digest")?,
            state_len: get("state_len")?.parse().map_err(|_| Error::Record("state_len"))?,
        }))
    }

    /// The saved state of generation `generation` (the bytes given to the apply that wrote
    /// it), when the record names one.
    pub fn saved_state(&self, generation: u32) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.saved_with_id(generation)?.map(|(_, bytes)| bytes))
    }

    /// Whether `generation`'s record says nothing was ever applied to it: the loader created
    /// its maps and recorded them empty (`applied` is `None` then too, as it is for a write
    /// that was interrupted, which clears the record).
    pub fn nothing_applied(&self, generation: u32) -> Result<bool, Error> {
        let Some(pins) = self.pins() else { return Ok(false) };
        let Some(fields) = pins.read(generation)? else { return Ok(false) };
        Ok(records_nothing_applied(&fields))
    }

    /// The saved state of `generation` and its id (`None`: no record, or no saved state yet).
    fn saved_with_id(&self, generation: u32) -> Result<Option<(String, Vec<u8>)>, Error> {
        let Some(pins) = self.pins() else { return Ok(None) };
        let Some(fields) = pins.read(generation)? else { return Ok(None) };
        let len = fields.get("state_len").and_then(|l| l.parse().ok());
        let (Some(id), Some(len)) = (fields.get("state"), len) else { return Ok(None) };
        Ok(Some((id.clone(), pins.read_state(id, len)?)))
    }

    fn slot(generation: u32) -> Result<usize, Error> {
        usize::try_from(generation)
            .ok()
            .filter(|&g| g < GENERATIONS as usize)
            .ok_or(Error::NoSuchGeneration(generation))
    }

    /// What generation `generation` holds (every map but the workload table): the cached
    /// state when the record still carries the write id it was cached with, else read from
    /// the kernel in full. Either way the cache entry is taken out: it is put back only after
    /// the next verified write.
    fn held_state(&mut self, generation: u32) -> Result<Arc<Encoded>, Error> {
        let g = Self::slot(generation)?;
        let cached = self.held.get_mut(g).and_then(Option::take);
        if let (Some(c), Some(pins)) = (cached, self.pins()) {
            let write = pins.read(generation)?.and_then(|mut f| f.remove("write"));
            if write.as_deref() == Some(c.write.as_str()) {
                return Ok(c.state);
            }
        }
        Ok(Arc::new(self.generations.get(g).ok_or(Error::NoSuchGeneration(generation))?.read()?))
    }

    /// Records every generation as holding what maps just created hold
    /// ([`GenerationMaps::fresh_state`]), under one write id per generation, with one shared
    /// cache entry: so the first apply on a data plane this process created neither reads
    /// the standby back nor diffs the old generation in full before its replay (at 100k
    /// prefixes the read of an empty generation alone is milliseconds, most of it the
    /// chunk pool's 12 MiB). Only for maps this process created and pinned under the root's
    /// lock, before anyone else could write them; the record holds nothing but the write id,
    /// which [`Dataplane::applied`] reads as "nothing applied".
    pub(crate) fn know_fresh(&mut self) -> Result<(), Error> {
        let state = Arc::new(GenerationMaps::fresh_state());
        for generation in 0..GENERATIONS {
            let write = write_id()?;
            let Some(pins) = self.pins_mut() else { return Ok(()) };
            pins.write(generation, &[("write", &write)])?;
            if let Some(slot) = self.held.get_mut(Self::slot(generation)?) {
                *slot = Some(Held { write, state: Arc::clone(&state) });
            }
        }
        Ok(())
    }

    /// Takes `generation`'s cache entry out when it shares `state`; returns its write id.
    fn take_sharer(&mut self, generation: u32, state: &Arc<Encoded>) -> Option<String> {
        let slot = self.held.get_mut(Self::slot(generation).ok()?)?;
        if slot.as_ref().is_some_and(|h| Arc::ptr_eq(&h.state, state)) {
            slot.take().map(|h| h.write)
        } else {
            None
        }
    }

    /// Whether `generation`'s record still carries write id `write` (and names `digest`, when
    /// given): then it holds what it held when that write was cached.
    fn record_carries(
        &self,
        generation: u32,
        write: &str,
        digest: Option<&str>,
    ) -> Result<bool, Error> {
        let Some(pins) = self.pins() else { return Ok(false) };
        let Some(fields) = pins.read(generation)? else { return Ok(false) };
        Ok(fields.get("write").map(String::as_str) == Some(write)
            && digest.is_none_or(|d| fields.get("digest").map(String::as_str) == Some(d)))
    }

    /// What a replay leaves the old generation holding, as a cache entry: `held` when the
    /// write patched a copy, shared with `standby`'s entry when equal to it (a generation read
    /// from the kernel, as on the first apply); `None` (the same deltas written onto the same
    /// state) is the standby's entry.
    fn share_with(&self, standby: u32, held: Option<Encoded>) -> Result<Arc<Encoded>, Error> {
        let new = self.cached(standby);
        match (held, new) {
            (Some(h), Some(new)) if *new == h => Ok(new),
            (Some(h), _) => Ok(Arc::new(h)),
            (None, new) => new.ok_or(Error::StaleBase),
        }
    }

    /// The cached state of `generation` (shared, not taken out), if any.
    fn cached(&self, generation: u32) -> Option<Arc<Encoded>> {
        let g = Self::slot(generation).ok()?;
        self.held.get(g).and_then(Option::as_ref).map(|h| Arc::clone(&h.state))
    }

    /// For tests: what this `Dataplane` caches as held by `generation` (a cheap clone).
    #[cfg(feature = "testing")]
    pub fn cached_state(&self, generation: u32) -> Option<Encoded> {
        self.cached(generation).map(|state| (*state).clone())
    }

    /// Makes the cache entries hold `desired`'s own buffers for every map whose content is
    /// the same (a pointer comparison when they already do, else a byte comparison of the two
    /// packed buffers), and drops the copies they replace. What an entry says a generation
    /// holds does not change, nor the write id it is trusted with; only where the bytes live.
    /// After an apply of `desired` both generations hold it (but the workload table), so the
    /// caller's encoding and both cache entries are then one copy in memory rather than
    /// three. Equal entries of the two generations stay one `Arc`.
    pub fn share_cached_maps(&mut self, desired: &Encoded) {
        let mut replaced: Vec<(Arc<Encoded>, Arc<Encoded>)> = Vec::new();
        for held in self.held.iter_mut().flatten() {
            if let Some((_, new)) = replaced.iter().find(|(old, _)| Arc::ptr_eq(old, &held.state)) {
                held.state = Arc::clone(new);
                continue;
            }
            let mut state = (*held.state).clone();
            let mut changed = false;
            for (name, entries) in &mut state.maps {
                if let Some(want) = desired.maps.get(name)
                    && !entries.shares(want)
                    && entries == want
                {
                    *entries = want.clone();
                    changed = true;
                }
            }
            if changed {
                let new = Arc::new(state);
                replaced.push((std::mem::replace(&mut held.state, Arc::clone(&new)), new));
            }
        }
    }

    /// Makes generation `generation` hold exactly `encoded`, given what it holds (`current`)
    /// and the diff: writes the diff and verifies what was written, or, when `encoded` does
    /// not fit, fills bigger maps, verifies them by reading them back, and puts them into the
    /// generation's outer slots. Returns what the generation holds afterwards.
    pub(crate) fn sync_generation(
        &mut self,
        generation: u32,
        encoded: &Encoded,
        current: Option<Encoded>,
        deltas: &BTreeMap<&'static str, MapDelta>,
        sorted: bool,
        grown: &mut Vec<u32>,
    ) -> Result<(WriteStats, Option<Encoded>), Error> {
        let g = Self::slot(generation)?;
        let root = self.pin_root().map(std::path::Path::to_path_buf);
        let gm = self.generations.get_mut(g).ok_or(Error::NoSuchGeneration(generation))?;
        if gm.fits(encoded).is_some() {
            let mut caps = gm.caps;
            let mut v4_hash = gm.v4_hash;
            let mut dir_hash = gm.dir_hash;
            for (&name, entries) in &encoded.maps {
                let n = entries.len();
                match name {
                    fw_common::maps::INGRESS_V4 | fw_common::maps::EGRESS_V4 => {
                        caps.v4_prefixes = grow(caps.v4_prefixes, n)
                    }
                    fw_common::maps::INGRESS_V6 | fw_common::maps::EGRESS_V6 => {
                        caps.v6_prefixes = grow(caps.v6_prefixes, n)
                    }
                    fw_common::maps::INGRESS_L4
                    | fw_common::maps::INGRESS_L4_EXACT
                    | fw_common::maps::EGRESS_L4 => caps.l4_entries = grow(caps.l4_entries, n),
                    _ => {}
                }
            }
            let probed = crate::v4rest::probed_len(encoded);
            if probed > v4_hash as usize {
                // The table's capacity bounds the hash's (it holds some of the table).
                v4_hash = grow(v4_hash, probed).min(caps.v4_prefixes);
            }
            let chunks = encoded.maps.get(fw_common::maps::INGRESS_V4_DIR).map_or(0, Entries::len);
            if chunks > dir_hash as usize {
                dir_hash = grow_chunks(dir_hash, chunks);
            }
            let mut fresh = GenerationMaps::create(generation, &caps, v4_hash, dir_hash)?;
            let stats = fresh.write(encoded)?;
            // A fresh map is written in full, so it is verified in full (growing is rare).
            let back = fresh.read()?;
            if let Some(&name) = generation::delta(&back, encoded).keys().next() {
                return Err(Error::VerifyFailed(name));
            }
            fresh.install(generation, &mut self.outer)?;
            if let Some(root) = &root {
                // A crash before this leaves a stale pin, which adoption detects by id.
                fresh.repin(root, generation)?;
            }
            *gm = fresh;
            grown.push(generation);
            return Ok((stats, Some(back)));
        }
        // `deltas` take `current` to `encoded`: when `encoded` is sorted without duplicates
        // (as `encode` writes it), the generation then holds `encoded`'s own entries.
        self.write_delta(generation, current, sorted.then_some(encoded), deltas)
    }

    /// The middle of the protocol, the same for a whole apply and a delta one: the standby's
    /// record and cache entry (`held`, what it now holds), the flip, the saved state pinned
    /// when it was not before, then the grace period. Returns the saved state's id, which the
    /// old generation's record names after the replay.
    fn flip_to(
        &mut self,
        standby: u32,
        held: Arc<Encoded>,
        (revision, digest, saved_state): (&str, &str, &[u8]),
        report: &mut ApplyReport,
        lap: &mut impl FnMut(&mut ApplyReport, &'static str),
    ) -> Result<Option<String>, Error> {
        // Hashed once (tens of MB at 100k rules), compared before and after the flip.
        let print = Fingerprint::of(saved_state)?;
        let saved = self.save_state(saved_state, &print, false)?;
        let write = write_id()?;
        let saved_ref = saved.as_deref().map(|id| (id, saved_state.len()));
        self.record(standby, revision, digest, &write, saved_ref)?;
        if let Some(slot) = self.held.get_mut(Self::slot(standby)?) {
            *slot = Some(Held { write: write.clone(), state: held });
        }
        lap(report, "write standby");
        hook("after-standby-write")?;

        self.set_active_generation(standby)?;
        lap(report, "flip");
        hook("after-flip")?;

        let saved = match saved {
            Some(id) => Some(id),
            None => {
                let id = self.save_state(saved_state, &print, true)?;
                let saved_ref = id.as_deref().map(|id| (id, saved_state.len()));
                self.record(standby, revision, digest, &write, saved_ref)?;
                id
            }
        };
        lap(report, "save state");

        // Not on a first load both generations got at once (no program can be running):
        // nothing to wait for.
        if !report.both_at_once {
            let g = Self::slot(standby)?;
            self.generations
                .get(g)
                .ok_or(Error::NoSuchGeneration(standby))?
                .wait_grace_period(standby, &mut self.outer)?;
        }
        lap(report, "grace period");
        hook("before-replay")?;
        Ok(saved)
    }

    /// The end of a replay: the old generation's record (under a new write id, naming the
    /// saved state `saved` when there is one) and its cache entry, `held`; the ingress IPv4
    /// plans kept for the replay are dropped.
    fn record_replayed(
        &mut self,
        active: u32,
        held: Arc<Encoded>,
        (revision, digest, saved_state): (&str, &str, &[u8]),
        saved: Option<&str>,
    ) -> Result<(), Error> {
        let write = write_id()?;
        let saved_ref = saved.map(|id| (id, saved_state.len()));
        self.record(active, revision, digest, &write, saved_ref)?;
        if let Some(slot) = self.held.get_mut(Self::slot(active)?) {
            *slot = Some(Held { write, state: held });
        }
        self.forget_v4_plans();
        Ok(())
    }

    /// Writes generation `generation`'s record (its write id last).
    fn record(
        &mut self,
        generation: u32,
        revision: &str,
        digest: &str,
        write: &str,
        saved: Option<(&str, usize)>,
    ) -> Result<(), Error> {
        let Some(pins) = self.pins_mut() else { return Ok(()) };
        let (len, id) = match saved {
            Some((id, len)) => (len.to_string(), Some(id)),
            None => ("0".to_string(), None),
        };
        let mut fields = vec![("revision", revision), ("digest", digest), ("state_len", &len)];
        if let Some(id) = id {
            fields.push(("state", id));
        }
        fields.push(("write", write));
        pins.write(generation, &fields)
    }

    /// The id of a pinned saved state holding `bytes`: the one saved last when its bytes are
    /// equal (by `Fingerprint`; read back once in a fresh process), else a new pin.
    fn save_state(
        &mut self,
        bytes: &[u8],
        print: &Fingerprint,
        write_new: bool,
    ) -> Result<Option<String>, Error> {
        if self.pins().is_none() {
            return Ok(None);
        }
        if self.saved.is_none() {
            let active = self.active_generation()?;
            self.saved = match self.saved_with_id(active).ok().flatten() {
                Some((id, saved)) => Some((id, Fingerprint::of(&saved)?)),
                None => None,
            };
        }
        if let Some((id, saved)) = &self.saved
            && saved == print
        {
            return Ok(Some(id.clone()));
        }
        if !write_new {
            return Ok(None);
        }
        let id = write_id()?;
        if let Some(pins) = self.pins() {
            pins.write_state(&id, bytes)?;
        }
        self.saved = Some((id.clone(), print.clone()));
        Ok(Some(id))
    }

    /// Compares every generation's maps with `desired` (`encode`'s output; the workload table
    /// is not compared), reading them in full from the kernel: finds entries changed behind
    /// the protocol's back (by hand, by another tool), which the records cannot show. O(policy
    /// size); meant to run now and then (the daemon runs it on a timer), not on every apply.
    ///
    /// It also refreshes what this `Dataplane` knows each generation holds, so the repair is
    /// an ordinary [`Dataplane::apply`] of the desired state: it writes exactly the drifted
    /// entries into the standby, flips, and replays them onto the other generation.
    pub fn drift(&mut self, desired: &Encoded) -> Result<DriftReport, Error> {
        let active = self.active_generation()?;
        let mut report = DriftReport::default();
        for generation in 0..GENERATIONS {
            let g = Self::slot(generation)?;
            let held =
                self.generations.get(g).ok_or(Error::NoSuchGeneration(generation))?.read()?;
            let write = match self.pins() {
                Some(pins) => pins.read(generation)?.and_then(|mut f| f.remove("write")),
                None => None,
            };
            report.generations.push(GenerationDrift {
                generation,
                active: generation == active,
                recorded: write.is_some(),
                maps: generation::delta(&held, desired),
            });
            // Equal generations (the usual case) share one copy.
            let shared = generation
                .checked_sub(1)
                .and_then(|p| self.cached(p))
                .filter(|prev| **prev == held);
            let state = shared.unwrap_or_else(|| Arc::new(held));
            if let Some(slot) = self.held.get_mut(g) {
                *slot = write.map(|write| Held { write, state });
            }
        }
        // What was read equal to `desired` is kept as `desired`'s buffers, not as a copy.
        self.share_cached_maps(desired);
        Ok(report)
    }

    /// Applies a compiled state (`fw_compiler::encode`'s output) with the protocol in the
    /// module docs. `revision` names the policy version, `digest` is `MapState::digest`, and
    /// `saved_state` is kept with the generation (fwctl keeps its rule table there). On an
    /// error before the flip the active generation is untouched.
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
        workloads: Option<&BTreeMap<u64, u32>>,
        revision: &str,
        digest: &str,
        saved_state: &[u8],
    ) -> Result<ApplyReport, Error> {
        check_record_fields(revision, digest)?;
        let mut report = ApplyReport::default();
        let mut lap = stopwatch();
        let active = self.active_generation()?;
        if active >= GENERATIONS {
            return Err(Error::NoSuchGeneration(active));
        }
        let standby = (active + 1) % GENERATIONS;
        report.from = active;
        report.to = standby;

        let current = self.held_state(standby)?;
        // The old generation's cache entry, when it shares the standby's: taken out too, so
        // the one copy is patched rather than copied; it holds what the standby held.
        let sharer = self.take_sharer(active, &current);
        let current = owned(current);
        let (deltas, sorted) = generation::delta_checked(&current, encoded);
        let l4_rules = deltas.keys().any(|n| L4_MAPS.contains(n));
        // A first load into a data plane no program runs on yet (`exclusive`; `enforce` on a
        // fresh root): both generations are known to hold the fresh state and nothing can
        // read them, so they are written at once and nothing waits for a grace period.
        let fresh = match &sharer {
            Some(w) if self.exclusive && current == GenerationMaps::fresh_state() => {
                self.record_carries(active, w, None)?
            }
            _ => false,
        };
        // Nothing is written unless what is written decodes (see the module docs, step 2).
        let check = || validate(&to_check(encoded, &deltas, sorted)).map_err(Error::InvalidState);
        let first = match fresh {
            true => self.first_load_plan(standby, &current, encoded, (&deltas, sorted), check)?,
            false => {
                check()?;
                None
            }
        };
        lap(&mut report, "diff");
        if let Some(plan) = first {
            let desired = crate::Desired { encoded, workloads, revision, digest, saved_state };
            return self.apply_fresh(
                (active, standby),
                current,
                &desired,
                (&deltas, sorted, plan),
                report,
                &mut lap,
            );
        }

        if let Some(pins) = self.pins_mut() {
            pins.write(standby, &[])?;
        }
        let (stats, held) = self.sync_generation(
            standby,
            encoded,
            Some(current),
            &deltas,
            sorted,
            &mut report.grown,
        )?;
        let held = Arc::new(held.ok_or(Error::StaleBase)?);
        report.standby = stats;
        if let Some(w) = workloads {
            report.standby += self.write_workloads(standby, w)?;
        }
        let saved =
            self.flip_to(standby, held, (revision, digest, saved_state), &mut report, &mut lap)?;

        // Known to hold what the standby held: the same deltas, and then the same state.
        let (current, replay) = match sharer {
            Some(w) if self.record_carries(active, &w, None)? => (None, deltas),
            _ => {
                let current = owned(self.held_state(active)?);
                let replay = generation::delta(&current, encoded);
                (Some(current), replay)
            }
        };
        if let Some(pins) = self.pins_mut() {
            pins.write(active, &[])?;
        }
        let (stats, held) =
            self.sync_generation(active, encoded, current, &replay, sorted, &mut report.grown)?;
        let held = self.share_with(standby, held)?;
        report.replay = stats;
        if let Some(w) = workloads {
            report.replay += self.write_workloads(active, w)?;
        }
        self.record_replayed(active, held, (revision, digest, saved_state), saved.as_deref())?;
        lap(&mut report, "replay");
        let counters = l4_rules || replay.keys().any(|n| L4_MAPS.contains(n));
        self.clean_up(encoded, counters, report, &mut lap)
    }

    /// The last step of a whole apply (step 7 of the module docs): the per-rule counters of
    /// rules no generation refers to (when `counters`: the L4 tables changed), the saved
    /// states no record names; then the cache entries share `encoded`'s buffers.
    fn clean_up(
        &mut self,
        encoded: &Encoded,
        counters: bool,
        mut report: ApplyReport,
        lap: &mut impl FnMut(&mut ApplyReport, &'static str),
    ) -> Result<ApplyReport, Error> {
        if counters {
            report.counters_removed = self.remove_counters_except(&referenced_rules(encoded))?;
        }
        if let Some(pins) = self.pins() {
            pins.remove_unreferenced_states()?;
        }
        self.share_cached_maps(encoded);
        lap(&mut report, "clean up");
        Ok(report)
    }

    /// For a first load ([`Dataplane::apply_fresh`]): runs `check` (the desired entries'
    /// checks, which must pass before anything is written) on a thread of its own while it
    /// finds out whether the desired state fits both generations' maps and makes the ingress
    /// IPv4 plan both writes share (both generations hold `current`, so one plan serves
    /// both). `None` when it does not fit: the usual path then gives the standby bigger maps.
    fn first_load_plan(
        &self,
        standby: u32,
        current: &Encoded,
        encoded: &Encoded,
        (deltas, sorted): (&BTreeMap<&'static str, MapDelta>, bool),
        check: impl FnOnce() -> Result<(), Error> + Send,
    ) -> Result<Option<Plan>, Error> {
        let s = self.generations.get(Self::slot(standby)?);
        let o = self.generations.get(Self::slot((standby + 1) % GENERATIONS)?);
        let (Some(s), Some(o)) = (s, o) else { return Err(Error::NoSuchGeneration(standby)) };
        let plan = || -> Result<Option<Plan>, Error> {
            if s.fits(encoded).is_some() {
                return Ok(None);
            }
            let unsorted =
                |g: &GenerationMaps| g.v4_unsorted.load(std::sync::atomic::Ordering::Relaxed);
            if !sorted || unsorted(s) || unsorted(o) {
                // Each write makes its own.
                return Ok(Some(Plan::Make(None)));
            }
            let plan = s.plan_v4(Some(&v4_tables(current)), &kernel_view(encoded), deltas, None)?;
            Ok(Some(Plan::Made(plan)))
        };
        // The old generation's fit beside the checks: each scans the table, so the two threads
        // take about as long.
        let (checked, plan) = std::thread::scope(|scope| {
            let checked = scope.spawn(|| check().map(|()| o.fits(encoded).is_none()));
            let plan = plan();
            (checked.join(), plan)
        });
        let fits = match checked {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        if !fits {
            return Ok(None);
        }
        plan
    }

    /// [`Dataplane::apply_with_workloads`] on a data plane no program runs on, whose two
    /// generations hold the fresh state (`current`; both their cache entries were taken out):
    /// the same deltas written into both at once, each on its own threads, each verified as
    /// usual, then the flip without a grace period (no packet can be on the old generation)
    /// and no replay (the old generation holds the state already).
    ///
    /// The old generation is the active one. Its config is written last, after everything
    /// else of both generations is written and verified: until then it keeps the fresh
    /// all-zero config, which the programs treat as an internal error (drop), so an apply
    /// that fails halfway leaves nothing that would let a packet through should the data
    /// plane be attached anyway. Both records are cleared before the writes, so a later apply
    /// reads both generations back.
    fn apply_fresh(
        &mut self,
        (active, standby): (u32, u32),
        current: Encoded,
        desired: &crate::Desired<'_>,
        (deltas, sorted, plan): (&BTreeMap<&'static str, MapDelta>, bool, Plan),
        mut report: ApplyReport,
        lap: &mut impl FnMut(&mut ApplyReport, &'static str),
    ) -> Result<ApplyReport, Error> {
        let (encoded, workloads) = (desired.encoded, desired.workloads);
        let config = fw_common::maps::CONFIG;
        report.both_at_once = true;
        if let Some(pins) = self.pins_mut() {
            pins.write(standby, &[])?;
            pins.write(active, &[])?;
        }
        // The old generation's first write: every delta but the config's, reaching `encoded`
        // with the config it holds now.
        let mut first = deltas.clone();
        let config_delta = first.remove(config);
        let mut first_reached = kernel_view(encoded);
        if let Some(c) = current.maps.get(config) {
            first_reached.maps.insert(config, c.clone());
        }
        let reached = sorted.then_some(encoded);
        let first_target = sorted.then_some(&first_reached);
        let root = self.pin_root().map(std::path::Path::to_path_buf);
        let root = root.as_deref();
        let (s, o) = match (&mut self.generations[..], standby) {
            ([g0, g1], 0) => (g0, g1),
            ([g0, g1], _) => (g1, g0),
            _ => return Err(Error::NoSuchGeneration(standby)),
        };
        let old_current = current.clone();
        let old_plan = plan.clone();
        let (new, old) = std::thread::scope(|scope| {
            let old = scope.spawn(|| {
                write_into(o, Some(old_current), first_target, &first, None, old_plan, root)
            });
            let new = write_into(s, Some(current), reached, deltas, None, plan, root);
            (new, old.join())
        });
        let (stats, held) = new?;
        let (old_stats, old_held) = match old {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let held = Arc::new(held.ok_or(Error::StaleBase)?);
        report.standby = stats;
        report.replay = old_stats;
        if let Some(w) = workloads {
            report.standby += self.write_workloads(standby, w)?;
            report.replay += self.write_workloads(active, w)?;
        }
        let old_held = match config_delta {
            Some(d) => {
                let d = BTreeMap::from([(config, d)]);
                let (stats, old_held) = self.write_delta(active, old_held, reached, &d)?;
                report.replay += stats;
                old_held
            }
            None => old_held,
        };
        let saved = (desired.revision, desired.digest, desired.saved_state);
        let saved_id = self.flip_to(standby, held, saved, &mut report, lap)?;
        let held = self.share_with(standby, old_held)?;
        self.record_replayed(active, held, saved, saved_id.as_deref())?;
        lap(&mut report, "replay");
        let counters = deltas.keys().any(|n| L4_MAPS.contains(n));
        self.clean_up(encoded, counters, report, lap)
    }

    /// The cached state of `generation`, taken out of the cache, when the record still carries
    /// its write id and names `digest` as what the generation holds; else `None` (and the
    /// cache entry, if any, stays).
    fn held_as(&mut self, generation: u32, digest: &str) -> Result<Option<Arc<Encoded>>, Error> {
        let g = Self::slot(generation)?;
        let Some(pins) = self.pins() else { return Ok(None) };
        let Some(fields) = pins.read(generation)? else { return Ok(None) };
        let matches = |h: &Held| {
            fields.get("digest").map(String::as_str) == Some(digest)
                && fields.get("write") == Some(&h.write)
        };
        match self.held.get_mut(g) {
            Some(slot) if slot.as_ref().is_some_and(matches) => Ok(slot.take().map(|h| h.state)),
            _ => Ok(None),
        }
    }

    /// Applies a change given as entry deltas on top of the state applied last, with the same
    /// protocol as [`Dataplane::apply`], for a caller that knows what changed (the daemon,
    /// from an incremental compile): nothing in it is O(policy size) before the flip, where
    /// `apply` compares the whole desired state with what the generation holds.
    ///
    /// `base_digest` is the digest the state the change applies to was applied with. The
    /// change is refused ([`Error::StaleBase`], nothing written) unless the standby
    /// generation's record names that digest and carries the write id of a write this
    /// `Dataplane` made and still caches (so what it holds is known without reading it); the
    /// caller then falls back to `apply` with the whole state. Upserts equal to what is held
    /// and removals of keys not held are dropped; the entries to write are decoded first, and
    /// a key given twice, or both written and removed, is refused. A change that would not fit
    /// the standby's maps is refused too (`apply` grows them). The old generation is replayed
    /// the same way when its record also names `base_digest`, else read and diffed in full.
    /// The workload tables are not touched (see [`Dataplane::apply_changes_with_workloads`]).
    pub fn apply_changes(
        &mut self,
        base_digest: &str,
        changes: &BTreeMap<&'static str, MapDelta>,
        revision: &str,
        digest: &str,
        saved_state: &[u8],
    ) -> Result<ApplyReport, Error> {
        self.apply_changes_with_workloads(base_digest, changes, None, revision, digest, saved_state)
    }

    /// [`Dataplane::apply_changes`], also making each generation's workload table hold
    /// `workloads` when given, as [`Dataplane::apply_with_workloads`] does (O(workloads)).
    pub fn apply_changes_with_workloads(
        &mut self,
        base_digest: &str,
        changes: &BTreeMap<&'static str, MapDelta>,
        workloads: Option<&BTreeMap<u64, u32>>,
        revision: &str,
        digest: &str,
        saved_state: &[u8],
    ) -> Result<ApplyReport, Error> {
        check_record_fields(revision, digest)?;
        let mut report = ApplyReport::default();
        let mut lap = stopwatch();
        let active = self.active_generation()?;
        let standby = (active + 1) % GENERATIONS;
        report.from = active;
        report.to = standby;

        let Some(current) = self.held_as(standby, base_digest)? else {
            return Err(Error::StaleBase);
        };
        // As in `apply_with_workloads`: the old generation's entry when it shares this one.
        let sharer = self.take_sharer(active, &current);
        let current = owned(current);
        let checked = effective_changes(&current, changes).and_then(|deltas| {
            let gm = self.generations.get(Self::slot(standby)?);
            let caps = gm.ok_or(Error::NoSuchGeneration(standby))?.caps;
            check_changes(&current, &deltas, &caps)?;
            Ok(deltas)
        });
        let deltas = match checked {
            Ok(d) => d,
            Err(e) => {
                // Nothing was written: what the standby holds is still known.
                let g = Self::slot(standby)?;
                let write = self.pins().and_then(|p| p.read(standby).ok().flatten());
                let state = Arc::new(current);
                if let (Some(slot), Some(write)) =
                    (self.held.get_mut(g), write.and_then(|mut f| f.remove("write")))
                {
                    *slot = Some(Held { write, state: Arc::clone(&state) });
                }
                if let (Some(write), Ok(a)) = (sharer, Self::slot(active))
                    && let Some(slot) = self.held.get_mut(a)
                {
                    *slot = Some(Held { write, state });
                }
                return Err(e);
            }
        };
        lap(&mut report, "diff");

        if let Some(pins) = self.pins_mut() {
            pins.write(standby, &[])?;
        }
        let (stats, held) = self.write_delta(standby, Some(current), None, &deltas)?;
        let held = Arc::new(held.ok_or(Error::StaleBase)?);
        report.standby = stats;
        if let Some(w) = workloads {
            report.standby += self.write_workloads(standby, w)?;
        }
        let l4_rules = deltas.keys().any(|n| L4_MAPS.contains(n));
        let saved =
            self.flip_to(standby, held, (revision, digest, saved_state), &mut report, &mut lap)?;
        let g = Self::slot(standby)?;

        // The old generation: the same deltas when it is known to hold the base, else a diff
        // against what the standby now holds.
        // When it shared the base with the standby, the same deltas give the same state.
        let shared = match &sharer {
            Some(w) => self.record_carries(active, w, Some(base_digest))?,
            None => false,
        };
        let (current, replay) = match self.held_as(active, base_digest)? {
            _ if shared => (None, deltas),
            Some(current) => (Some(owned(current)), deltas),
            None => {
                let current = owned(self.held_state(active)?);
                let new = self.held.get(g).and_then(Option::as_ref).map(|h| &h.state);
                let replay = generation::delta(&current, new.ok_or(Error::StaleBase)?);
                (Some(current), replay)
            }
        };
        if let Some(pins) = self.pins_mut() {
            pins.write(active, &[])?;
        }
        let (stats, held) = self.write_delta(active, current, None, &replay)?;
        let held = self.share_with(standby, held)?;
        report.replay = stats;
        if let Some(w) = workloads {
            report.replay += self.write_workloads(active, w)?;
        }
        self.record_replayed(active, held, (revision, digest, saved_state), saved.as_deref())?;
        lap(&mut report, "replay");

        if l4_rules {
            let held = self.held.get(g).and_then(Option::as_ref).map(|h| &*h.state);
            let keep = held.map(referenced_rules).unwrap_or_default();
            if held.is_some() {
                report.counters_removed = self.remove_counters_except(&keep)?;
            }
        }
        if let Some(pins) = self.pins() {
            pins.remove_unreferenced_states()?;
        }
        lap(&mut report, "clean up");
        Ok(report)
    }

    /// Writes `deltas` into generation `generation`, which holds `current`, verifies what was
    /// written, and returns what it holds afterwards.
    fn write_delta(
        &mut self,
        generation: u32,
        current: Option<Encoded>,
        reached: Option<&Encoded>,
        deltas: &BTreeMap<&'static str, MapDelta>,
    ) -> Result<(WriteStats, Option<Encoded>), Error> {
        let g = Self::slot(generation)?;
        // What the generation holds afterwards when `current` is not given (a replay of the
        // standby's deltas onto the state they shared): what the standby now holds.
        let other = (generation + 1) % GENERATIONS;
        let cached = match &current {
            Some(_) => None,
            None => Some(self.cached(other).ok_or(Error::StaleBase)?),
        };
        // Taken, not copied: it serves this one replay.
        let shared = self.generations.get_mut(Self::slot(other)?).and_then(|o| o.last_v4.take());
        let root = self.pin_root().map(std::path::Path::to_path_buf);
        let gm = self.generations.get_mut(g).ok_or(Error::NoSuchGeneration(generation))?;
        let plan = Plan::Make(shared);
        write_into(gm, current, reached, deltas, cached.as_deref(), plan, root.as_deref())
    }

    /// Drops the ingress IPv4 plans kept for a replay once it is done (at 1M prefixes they
    /// hold tens of MB).
    fn forget_v4_plans(&mut self) {
        for gm in &mut self.generations {
            gm.last_v4 = None;
        }
    }

    /// Deletes the per-rule counters of every rule not in `keep`; returns how many.
    fn remove_counters_except(&mut self, keep: &BTreeSet<u32>) -> Result<usize, Error> {
        let name = fw_common::maps::RULE_COUNTERS;
        let present: Vec<u32> =
            self.rule_counters.keys().collect::<Result<_, _>>().map_err(Error::map(name))?;
        let mut removed = BTreeSet::new();
        for rule in present.into_iter().filter(|r| !keep.contains(r)) {
            match self.rule_counters.remove(&rule) {
                Ok(()) => {
                    removed.insert(rule);
                }
                // Gone meanwhile (another cleaner): what was wanted.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map(name)(e)),
            }
        }
        // The direct-mapped front: a slot a removed rule holds on some CPU is freed there. A
        // per-CPU array is written for all CPUs at once, so the slot's other CPUs are written
        // back as read: a kept rule sharing the slot index on another CPU can lose the
        // packets it counted between the read and the write (microseconds, only when a rule
        // is removed).
        let (slots, cpus) = self.counter_slots()?;
        for (k, per_cpu) in slots.chunks_exact(cpus.max(1)).enumerate() {
            let gone = |s: &RuleCounterSlot| s.rule != 0 && !keep.contains(&s.rule);
            if !per_cpu.iter().any(gone) {
                continue;
            }
            let mut fresh = per_cpu.to_vec();
            for s in &mut fresh {
                if gone(s) {
                    removed.insert(s.rule);
                    *s = RuleCounterSlot::default();
                }
            }
            self.write_counter_slot(k as u32, &fresh)?;
        }
        Ok(removed.len())
    }
}

/// Writes `deltas` into the generation whose maps are `gm`, which holds `current` (`None`: the
/// state the other generation held before the same deltas; it holds `cached` now), verifies
/// what was written, and returns what it holds afterwards (`None`: `cached`). `reached` is the
/// state the deltas were computed to reach, when it is sorted without duplicate keys; `plan`
/// where the ingress IPv4 plan comes from; `root` where the data plane is pinned. Touches nothing but `gm`'s maps and pins, so both generations of a data plane no
/// program runs on can be written at once.
/// The ingress IPv4 table and chunks of `state` (shared buffers, not copies): what the plan of
/// the table's write reads of what a generation held.
fn v4_tables(state: &Encoded) -> Encoded {
    let maps = [fw_common::maps::INGRESS_V4, fw_common::maps::INGRESS_V4_DIR]
        .into_iter()
        .filter_map(|n| state.maps.get(n).map(|e| (n, e.clone())))
        .collect();
    Encoded { maps }
}

/// Where a write's ingress IPv4 plan comes from.
#[derive(Clone)]
enum Plan {
    /// Made by the write; from the other generation's plan for the same deltas, when given and
    /// the write is a replay.
    Make(Option<crate::v4rest::V4Plan>),
    /// Made already, for what the generation holds and these deltas (`None`: the table does
    /// not change).
    Made(Option<crate::v4rest::V4Plan>),
}

fn write_into(
    gm: &mut GenerationMaps,
    current: Option<Encoded>,
    reached: Option<&Encoded>,
    deltas: &BTreeMap<&'static str, MapDelta>,
    cached: Option<&Encoded>,
    plan: Plan,
    root: Option<&std::path::Path>,
) -> Result<(WriteStats, Option<Encoded>), Error> {
    // The old ingress IPv4 table and chunks, which the plan of the table's write needs once
    // `current` is patched.
    let old = current.as_ref().map(v4_tables);
    // `reached`: the state the deltas were computed to reach, sorted without duplicate
    // keys as `encode` writes it, so equal to `current` patched, and shared rather than
    // built (2-3 ms at 100k prefixes).
    let patch = |mut current: Encoded| {
        for (&name, d) in deltas {
            generation::patch(current.maps.entry(name).or_default(), d);
        }
        current
    };
    let patched = current.map(|current| match reached {
        Some(after) => {
            let after = kernel_view(after);
            debug_assert!(patch(current) == after, "the deltas do not reach the state");
            after
        }
        None => patch(current),
    });
    // What the generation holds afterwards: the patched state, else `cached`. Borrowed,
    // not cloned (a copy of a 100k-prefix state is milliseconds).
    let after: &Encoded = match (&patched, cached) {
        (Some(p), _) => p,
        (None, Some(c)) => c,
        (None, None) => return Err(Error::StaleBase),
    };
    // How many entries each written map holds afterwards, which decides how the write is
    // verified.
    let sizes: BTreeMap<&'static str, usize> =
        deltas.keys().map(|&name| (name, after.maps.get(name).map_or(0, Entries::len))).collect();
    // A delta that would overfill the preallocated hash of chunks is refused before
    // anything is written (a whole apply gives the generation a bigger one).
    if sizes.get(fw_common::maps::INGRESS_V4_DIR).is_some_and(|&n| n > gm.dir_hash as usize) {
        return Err(Error::StaleBase);
    }
    let plan = match plan {
        Plan::Make(shared) => gm.plan_v4(old.as_ref(), after, deltas, shared.as_ref())?,
        Plan::Made(plan) => plan,
    };
    // A failed write leaves nothing to replay.
    gm.last_v4 = None;
    let hash_len = match &plan {
        Some(plan) => Some(gm.v4_hash_after(plan)?),
        None => None,
    };
    if hash_len.is_some() {
        // Not known should the write fail halfway.
        gm.v4_hash_len = None;
    }
    let stats = gm.apply_delta(deltas, plan.as_ref())?;
    gm.verify_delta(deltas, &sizes, plan.as_ref())?;
    if let Some(n) = hash_len {
        gm.v4_hash_len = Some(n);
    }
    if let Some(plan) = &plan {
        if plan.rest.is_some()
            && let Some(root) = root
        {
            gm.pin_rest(root)?;
        }
        if plan.full {
            gm.v4_unsorted.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
    gm.last_v4 = plan;
    Ok((stats, patched))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_tells_saved_states_apart() {
        let a = br#"{"rules":{"1":"a"}}"#.to_vec();
        let print = |b: &[u8]| Fingerprint::of(b).expect("a random key");
        assert_eq!(print(&a), print(&a.clone()));
        let mut b = a.clone();
        b[12] = b'2';
        assert_ne!(print(&a), print(&b));
        assert_ne!(print(&a), print(&a[..a.len() - 1]));
        assert_ne!(print(b""), print(b"\0"));
    }

    #[test]
    fn an_unshared_state_is_moved_out_of_its_arc_and_a_shared_one_copied() {
        let mut e = Encoded::default();
        e.maps.insert("FW_IN_V4", vec![(vec![1], vec![2])].into());
        let one = Arc::new(e.clone());
        assert_eq!(owned(one), e);
        let shared = Arc::new(e.clone());
        let other = Arc::clone(&shared);
        assert_eq!(owned(shared), e);
        assert_eq!(*other, e);
    }

    #[test]
    fn growth_rounds_up_to_a_power_of_two_and_never_shrinks() {
        assert_eq!(grow(16, 17), 32);
        assert_eq!(grow(64, 17), 64);
        assert_eq!(grow(1, 1000), 1024);
    }

    #[test]
    fn the_chunk_hash_grows_by_a_quarter_in_steps_and_never_shrinks() {
        assert_eq!(grow_chunks(1024, 1025), 2048);
        assert_eq!(grow_chunks(1024, 4163), 6144);
        assert_eq!(grow_chunks(8192, 4163), 8192);
        assert_eq!(grow_chunks(1024, usize::MAX), fw_common::V4_DIR_MAX_CHUNKS);
    }

    #[test]
    fn an_entry_diff_lists_only_what_changed() {
        let mut a = Encoded::default();
        let mut b = Encoded::default();
        let e = |pairs: Vec<(Vec<u8>, Vec<u8>)>| Entries::from(pairs);
        a.maps.insert(
            "FW_IN_V4",
            e(vec![(vec![1], vec![1]), (vec![2], vec![2]), (vec![3], vec![3])]),
        );
        b.maps.insert(
            "FW_IN_V4",
            e(vec![(vec![1], vec![1]), (vec![2], vec![9]), (vec![4], vec![4])]),
        );
        let d = generation::delta(&a, &b);
        let m = d.get("FW_IN_V4").expect("a diff for FW_IN_V4");
        assert_eq!(m.upsert, e(vec![(vec![2], vec![9]), (vec![4], vec![4])]));
        assert_eq!(m.remove, vec![vec![3]]);
        assert!(generation::delta(&a, &a).is_empty());
    }

    #[test]
    fn unsorted_entries_diff_like_sorted_ones() {
        let sorted = vec![(vec![1], vec![1]), (vec![2], vec![2]), (vec![3], vec![3])];
        let want = vec![(vec![4], vec![4]), (vec![2], vec![9]), (vec![1], vec![1])];
        let mut want_sorted = want.clone();
        want_sorted.sort();
        let enc =
            |e: &Vec<(Vec<u8>, Vec<u8>)>| Encoded { maps: [("FW_IN_V4", e.clone().into())].into() };
        let a = generation::delta(&enc(&sorted), &enc(&want));
        let b = generation::delta(&enc(&sorted), &enc(&want_sorted));
        assert_eq!(a, b);
        let d = a.get("FW_IN_V4").expect("a diff");
        assert_eq!(d.upsert.to_vec(), vec![(vec![2], vec![9]), (vec![4], vec![4])]);
        assert_eq!(d.remove, vec![vec![3]]);
        // The same with shared entries before and after (skipped before the middle is diffed).
        let wrap = |e: &Vec<(Vec<u8>, Vec<u8>)>| {
            let mut w = vec![(vec![0], vec![0])];
            w.extend(e.iter().cloned());
            w.push((vec![9], vec![9]));
            w
        };
        assert_eq!(generation::delta(&enc(&wrap(&sorted)), &enc(&wrap(&want))), b);
        assert_eq!(generation::delta(&enc(&wrap(&sorted)), &enc(&wrap(&want_sorted))), b);
    }

    #[test]
    fn a_diff_from_nothing_shares_the_desired_entries_when_they_are_sorted() {
        let enc = |e: Vec<(Vec<u8>, Vec<u8>)>| Encoded { maps: [("FW_IN_V4", e.into())].into() };
        let empty = Encoded::default();
        let want = enc(vec![(vec![1], vec![1]), (vec![2], vec![2]), (vec![4], vec![4])]);
        let (d, sorted) = generation::delta_checked(&empty, &want);
        assert!(sorted);
        let upsert = &d.get("FW_IN_V4").expect("a diff").upsert;
        assert!(upsert.shares(want.maps.get("FW_IN_V4").expect("entries")), "not a copy");
        // Out of order, or a key twice: not sorted, and diffed (and checked) as before.
        for bad in [
            vec![(vec![2], vec![2]), (vec![1], vec![1])],
            vec![(vec![1], vec![1]), (vec![1], vec![9])],
        ] {
            let want = enc(bad);
            let (d, sorted) = generation::delta_checked(&empty, &want);
            assert!(!sorted, "{want:?}");
            let upsert = &d.get("FW_IN_V4").expect("a diff").upsert;
            assert!(!upsert.shares(want.maps.get("FW_IN_V4").expect("entries")));
        }
        assert!(generation::delta_checked(&empty, &enc(Vec::new())).0.is_empty());
    }

    #[test]
    fn patching_with_a_diff_gives_the_desired_entries() {
        let cases: [(&[u8], &[u8]); 4] =
            [(&[1, 2, 3], &[2, 4]), (&[], &[1, 5]), (&[1, 2], &[]), (&[3, 5, 7], &[1, 5, 9])];
        for (have, want) in cases {
            let entries = |keys: &[u8], v: u8| -> Vec<(Vec<u8>, Vec<u8>)> {
                keys.iter().map(|&k| (vec![k], vec![k.wrapping_add(v)])).collect()
            };
            // Key 5 changes its value, the others keep theirs.
            let current = entries(have, 0);
            let mut desired = entries(want, 0);
            for e in desired.iter_mut().filter(|e| e.0 == [5]) {
                e.1 = vec![99];
            }
            let enc = |e: &Vec<(Vec<u8>, Vec<u8>)>| Encoded {
                maps: [("FW_IN_L4", e.clone().into())].into(),
            };
            let d = generation::delta(&enc(&current), &enc(&desired));
            let mut patched = Entries::from(current.clone());
            if let Some(d) = d.get("FW_IN_L4") {
                generation::patch(&mut patched, d);
            }
            assert_eq!(patched.to_vec(), desired, "{have:?} -> {want:?}");
        }
    }

    #[test]
    fn counters_are_kept_for_the_rules_l4_values_name() {
        let value = |verdict: u32, audit: u32| {
            let v = fw_common::L4Value {
                verdict_action: u8::from(verdict != 0),
                audit_action: u8::from(audit != 0),
                verdict_rule: verdict,
                audit_rule: audit,
                ..Default::default()
            };
            fw_common::Bytes::to_bytes(&v).as_ref().to_vec()
        };
        let mut e = Encoded::default();
        e.maps.insert(
            "FW_IN_L4",
            vec![(vec![0; 16], value(7, 0)), (vec![1; 16], value(0, 9))].into(),
        );
        e.maps.insert("FW_EG_L4", vec![(vec![0; 16], value(3, 3))].into());
        e.maps.insert("FW_IN_V4", vec![(vec![0; 8], vec![5, 0, 0, 0])].into());
        assert_eq!(referenced_rules(&e), [3, 7, 9].into());
    }
}
