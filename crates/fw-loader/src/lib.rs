//! Loads the firewall's eBPF object and manages its maps: the user-space half of the data plane.
//!
//! The object is built from crates/fw-ebpf by this crate's build script and embedded
//! ([`object`]). [`Dataplane::load`] loads it, has the verifier check the programs, creates the
//! inner maps of both generations with the compiler's capacities and puts them into the outer
//! maps. From there the caller writes a compiled state into a generation
//! ([`Dataplane::write_generation`], whose input is exactly `fw_compiler::encode`'s output),
//! flips the active generation, and reads counters.
//!
//! A data plane that outlives the process lives under a bpffs root (`pin`): the programs, the
//! XDP links, the outer maps, the counters and a small record map are pinned there, and a later
//! process adopts them (`Dataplane::open_pinned`) instead of loading again, so program ids never
//! change, except when this build's ABI differs from the pinned one: then
//! `Dataplane::upgrade_pinned` (`upgrade`) swaps the programs in place under their links.
//! `enforce` is the one path from a compiled state to enforcement that fwctl and the daemon
//! share: lock the root, open, load or upgrade, apply, attach.
//! `apply` is the update protocol on top of that: diff against what the standby generation
//! holds, write the diff, verify what was written, flip, wait a grace period, replay; its
//! kernel work is proportional to the diff once the process knows what each generation holds.
//! `apply_changes` does the same from a change given as entry deltas, with nothing O(policy
//! size) before the flip; `drift` compares the generations with a desired state in full.
//!
//! [`Dataplane::test_run_ingress`] runs the XDP program on a frame with `BPF_PROG_TEST_RUN`,
//! without attaching it anywhere: the kernel's real program and maps, no traffic. The
//! differential tests are built on it.
//!
//! The physical layout of the maps (which kernel map types, how keys are laid out) is private
//! to this crate, fw-common and fw-ebpf: callers hand over `Encoded` state and get verdicts and
//! counters back, so the representation can change without touching the compiler or callers.

mod apply;
mod batch;
mod cgroup;
mod class_table;
pub mod conntrack;
pub mod enforce;
mod error;
mod events;
mod generation;
mod pin;
mod upgrade;
mod v4rest;
/// For the tests of crates that use the loader (the `testing` feature): states a pinned root
/// is left in by other builds, made by writing its pins the way those builds would.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::pin::{clear_record, rewrite_recorded_abi};
}
pub mod workloads;

use std::collections::BTreeMap;
use std::os::fd::AsFd as _;
use std::time::Duration;

use aya::maps::{
    Array, ArrayOfMaps, InnerMap, IterableMap as _, Map, MapData, PerCpuArray, PerCpuHashMap,
};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::util::nr_cpus;
use aya::{Ebpf, EbpfLoader};
use fw_common::{
    ActiveGeneration, Counters, GENERATIONS, RULE_COUNTER_SLOTS, RuleCounterSlot, STATS_ENTRIES,
    maps, programs, stat_index,
};
use fw_compiler::encode::{Encoded, validate};
use fw_compiler::mapstate::Capacities;

pub use crate::apply::{Applied, ApplyReport, DriftReport, GenerationDrift, HOOK_ENV};
pub use crate::batch::BatchError;
pub use crate::cgroup::{CgroupAttachment, CgroupLinks, EgressAttachment, cgroup2_mount};
pub use crate::error::Error;
pub use crate::events::{EventStats, Events};
use crate::generation::{DIR_HASH_FIRST, GenerationMaps, V4_HASH_FIRST};
pub use crate::generation::{MapDelta, WriteStats, delta as entry_delta};
pub use crate::pin::{
    Attachment, DEFAULT_ROOT, MapStatus, Opened, Status, abi_version, attachments,
    conntrack_layout, lock_root, unload_pinned,
};
pub use crate::upgrade::{ConntrackMigration, Desired, SwappedLink, Upgrade};

/// The eBPF object built from crates/fw-ebpf; empty when fw-loader was built with
/// `AYA_BUILD_SKIP=1`.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fw-ebpf"))
}

/// What an XDP program returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdpAction {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    /// A value outside the kernel's `enum xdp_action`.
    Other(u32),
}

impl XdpAction {
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::Aborted,
            1 => Self::Drop,
            2 => Self::Pass,
            3 => Self::Tx,
            4 => Self::Redirect,
            v => Self::Other(v),
        }
    }
}

/// The result of one test run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    pub action: XdpAction,
    /// Average time per repetition, as the kernel measured it.
    pub duration: Duration,
}

/// The loaded programs and maps.
pub struct Dataplane {
    /// The object as this process loaded it; `None` when the data plane was adopted from its
    /// pins, whose programs are then opened from the pins (`pinned_ingress`).
    ebpf: Option<Ebpf>,
    pinned_ingress: Option<Xdp>,
    /// Slot `g` holds generation `g`'s inner maps (user-space handles; the outer maps hold
    /// the kernel's references).
    generations: Vec<GenerationMaps>,
    generation: Array<MapData, ActiveGeneration>,
    rule_counters: PerCpuHashMap<MapData, u32, Counters>,
    /// The direct-mapped front of `rule_counters` (`maps::RULE_COUNTER_CACHE`).
    rule_counter_cache: PerCpuArray<MapData, RuleCounterSlot>,
    stats: PerCpuArray<MapData, Counters>,
    /// The outer maps, kept open for pinning.
    outer: BTreeMap<&'static str, Map>,
    caps: Capacities,
    /// Present when the data plane is pinned under a bpffs root.
    pins: Option<pin::Pins>,
    /// Per generation, what this process last wrote there and verified, with its write id
    /// (trusted only while the pinned record carries the same id; see `apply`).
    held: Vec<Option<apply::Held>>,
    /// The saved state pinned last: its id and a fingerprint of its bytes (the bytes are the
    /// caller's rule table, tens of MB at 100k rules: not kept).
    saved: Option<(String, apply::Fingerprint)>,
    /// No program of this data plane can be running, so no packet can see its generations
    /// mid-write: this handle loaded the programs itself, has not attached them or handed
    /// them out, and no other process can have reached them (they are unpinned, or pinned
    /// under a root lock held ever since, as [`enforce::enforce`] holds it from load to
    /// attach). Cleared by every attach, by [`Dataplane::ingress_program`], and when a
    /// public `load_pinned`/`open_pinned` returns (the root's lock is released then). A
    /// first apply on such a data plane writes both generations at once and waits for no
    /// grace period (see `apply`). Attaching a loaded program by its id, outside this
    /// library, is as far outside the protocol as writing its maps by hand.
    exclusive: bool,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane").field("caps", &self.caps).finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Loads the embedded object; see [`Dataplane::load_object`].
    pub fn load(caps: &Capacities) -> Result<Self, Error> {
        Self::load_object(object(), caps)
    }

    /// Loads an object built from fw-ebpf, has the verifier check its programs, and creates
    /// the inner maps of every generation (empty) with the given capacities. The active
    /// generation is 0. Nothing is attached; until a generation is written its config is all
    /// zeros, which the programs treat as an internal error (drop).
    pub fn load_object(object: &[u8], caps: &Capacities) -> Result<Self, Error> {
        if object.is_empty() {
            return Err(Error::ObjectNotBuilt);
        }
        for (what, n) in [
            ("IPv4 prefixes", caps.v4_prefixes),
            ("IPv6 prefixes", caps.v6_prefixes),
            ("L4 entries", caps.l4_entries),
            ("rules", caps.rules),
            ("workloads", caps.workloads),
        ] {
            if n == 0 {
                return Err(Error::ZeroCapacity(what));
            }
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::RULE_COUNTERS, caps.rules)
            .load(object)
            .map_err(|e| Error::Object(Box::new(e)))?;

        let name = programs::INGRESS;
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(Error::program(name))?;
        program.load().map_err(Error::program(name))?;
        cgroup::load_egress_programs(&mut ebpf)?;

        let generations = (0..GENERATIONS)
            .map(|g| {
                let v4_hash = caps.v4_prefixes.min(V4_HASH_FIRST);
                GenerationMaps::create(g, caps, v4_hash, DIR_HASH_FIRST)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut outer = BTreeMap::new();
        let g = &generations;
        let e = &mut ebpf;
        let o = &mut outer;
        fill(e, o, maps::INGRESS_V4, g.iter().map(|m| &m.in_v4))?;
        fill(e, o, maps::INGRESS_V4_DIR, g.iter().map(|m| &m.in_v4_dir))?;
        fill(e, o, maps::INGRESS_V4_DIR1, g.iter().map(|m| &m.in_v4_dir1.level1))?;
        fill(e, o, maps::INGRESS_V4_DIR2, g.iter().map(|m| &m.in_v4_dir1.pool))?;
        fill(e, o, maps::INGRESS_V6, g.iter().map(|m| &m.in_v6))?;
        fill(e, o, maps::INGRESS_L4, g.iter().map(|m| &m.in_l4))?;
        fill(e, o, maps::INGRESS_L4_EXACT, g.iter().map(|m| &m.in_l4x))?;
        fill(e, o, maps::INGRESS_L4_PORTS, g.iter().map(|m| &m.in_l4p))?;
        fill(e, o, maps::INGRESS_L4_CLASSES, g.iter().map(|m| &m.in_l4c))?;
        fill(e, o, maps::INGRESS_L4_CLASS_TABLE, g.iter().map(|m| &m.in_l4k))?;
        fill(e, o, maps::EGRESS_V4, g.iter().map(|m| &m.eg_v4))?;
        fill(e, o, maps::EGRESS_V6, g.iter().map(|m| &m.eg_v6))?;
        fill(e, o, maps::EGRESS_L4, g.iter().map(|m| &m.eg_l4))?;
        fill(e, o, maps::CONFIG, g.iter().map(|m| &m.config))?;
        fill(e, o, maps::WORKLOADS, g.iter().map(|m| &m.workloads))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(Error::MissingMap(name))
        };
        let generation = Array::try_from(take(&mut ebpf, maps::GENERATION)?)
            .map_err(Error::map(maps::GENERATION))?;
        let rule_counters = PerCpuHashMap::try_from(take(&mut ebpf, maps::RULE_COUNTERS)?)
            .map_err(Error::map(maps::RULE_COUNTERS))?;
        let rule_counter_cache = PerCpuArray::try_from(take(&mut ebpf, maps::RULE_COUNTER_CACHE)?)
            .map_err(Error::map(maps::RULE_COUNTER_CACHE))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, maps::STATS)?)
            .map_err(Error::map(maps::STATS))?;
        Ok(Self {
            ebpf: Some(ebpf),
            pinned_ingress: None,
            generations,
            generation,
            rule_counters,
            rule_counter_cache,
            stats,
            outer,
            caps: *caps,
            pins: None,
            held: (0..GENERATIONS).map(|_| None).collect(),
            saved: None,
            exclusive: true,
        })
    }

    /// The capacities the inner maps were created with.
    pub fn capacities(&self) -> &Capacities {
        &self.caps
    }

    /// The XDP ingress program (loaded, not attached).
    pub fn ingress_program(&mut self) -> Result<&mut Xdp, Error> {
        // The caller can attach it.
        self.exclusive = false;
        let name = programs::INGRESS;
        if let Some(p) = self.pinned_ingress.as_mut() {
            return Ok(p);
        }
        self.ebpf
            .as_mut()
            .and_then(|e| e.program_mut(name))
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(Error::program(name))
    }

    fn ingress(&self) -> Result<&Xdp, Error> {
        let name = programs::INGRESS;
        if let Some(p) = self.pinned_ingress.as_ref() {
            return Ok(p);
        }
        self.ebpf
            .as_ref()
            .and_then(|e| e.program(name))
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(Error::program(name))
    }

    /// An outer (generational) map, e.g. to pin it.
    pub fn outer_map(&self, name: &str) -> Option<&Map> {
        self.outer.get(name)
    }

    fn generation_maps(&mut self, generation: u32) -> Result<&mut GenerationMaps, Error> {
        usize::try_from(generation)
            .ok()
            .and_then(|g| self.generations.get_mut(g))
            .ok_or(Error::NoSuchGeneration(generation))
    }

    /// Makes generation `generation`'s maps hold exactly `encoded` (stale entries are
    /// deleted; maps it does not fit are replaced by bigger ones, as in an apply), except the
    /// workload table, which the encoded state keys by cgroup path (see
    /// [`Dataplane::write_workloads`]). `encoded` is checked first (`encode::validate`: what
    /// `encode::decode` checks); nothing is written when it is invalid. Not atomic: write a generation packets are not
    /// using, then [`Dataplane::set_active_generation`].
    pub fn write_generation(
        &mut self,
        generation: u32,
        encoded: &Encoded,
    ) -> Result<WriteStats, Error> {
        validate(encoded).map_err(Error::InvalidState)?;
        // Written outside the apply protocol: what this process knew it holds is void.
        if let Some(h) = usize::try_from(generation).ok().and_then(|g| self.held.get_mut(g)) {
            *h = None;
        }
        if self.generation_maps(generation)?.fits(encoded).is_some() {
            // Bigger maps, filled, verified and put in place, as an apply gets them.
            let (stats, _) = self.sync_generation(
                generation,
                encoded,
                None,
                &BTreeMap::new(),
                false,
                &mut Vec::new(),
            )?;
            return Ok(stats);
        }
        self.generation_maps(generation)?.write(encoded)
    }

    /// Makes generation `generation`'s workload table hold exactly `entries`: cgroup id ->
    /// workload class (the ids the daemon resolves the encoded state's cgroup paths to).
    pub fn write_workloads(
        &mut self,
        generation: u32,
        entries: &BTreeMap<u64, u32>,
    ) -> Result<WriteStats, Error> {
        self.generation_maps(generation)?.write_workloads(entries)
    }

    /// Reads generation `generation`'s maps back in `encode`'s format (every map but the
    /// workload table), to verify a write.
    pub fn read_generation(&self, generation: u32) -> Result<Encoded, Error> {
        usize::try_from(generation)
            .ok()
            .and_then(|g| self.generations.get(g))
            .ok_or(Error::NoSuchGeneration(generation))?
            .read()
    }

    /// Generation `generation`'s workload table: cgroup id -> workload class, as the kernel
    /// holds it (the ids [`Dataplane::write_workloads`] was given).
    pub fn read_workloads(&self, generation: u32) -> Result<BTreeMap<u64, u32>, Error> {
        let name = maps::WORKLOADS;
        let gm = usize::try_from(generation)
            .ok()
            .and_then(|g| self.generations.get(g))
            .ok_or(Error::NoSuchGeneration(generation))?;
        gm.workloads
            .iter()
            .map(|item| item.map(|(k, v)| (k.cgroup_id, v.workload)).map_err(Error::map(name)))
            .collect()
    }

    /// The generation packets use.
    pub fn active_generation(&self) -> Result<u32, Error> {
        let value = self.generation.get(&0, 0).map_err(Error::map(maps::GENERATION))?;
        Ok(value.index)
    }

    /// Flips packets to `generation`: one write of a one-element array, so every packet after
    /// it sees the new generation's maps and none sees a mix. Packets already running finish
    /// on the old generation; wait an RCU grace period before changing it.
    pub fn set_active_generation(&mut self, generation: u32) -> Result<(), Error> {
        if generation >= GENERATIONS {
            return Err(Error::NoSuchGeneration(generation));
        }
        self.generation
            .set(0, ActiveGeneration { index: generation }, 0)
            .map_err(Error::map(maps::GENERATION))
    }

    /// Uses at most the first `chunks` slots of every generation's pool of second-level IPv4
    /// chunks (`fw_common::maps::INGRESS_V4_DIR2`; at most `V4_DIR_POOL_CHUNKS`) from the next
    /// write on: a pool that fills up sooner, so tests and measurements can see /16s whose
    /// chunk the program finds in the chunk hash instead. Slots already in use stay until
    /// their chunk is removed. Not kept across processes, nor by a generation the loader
    /// re-creates with bigger capacities.
    pub fn limit_v4_dir_pool(&mut self, chunks: u32) {
        for g in &mut self.generations {
            g.in_v4_dir1.limit_pool(chunks);
        }
    }

    /// Runs the XDP ingress program once on `frame` (from the Ethernet header on) with
    /// `BPF_PROG_TEST_RUN`. Counters count the packet as if it had arrived.
    pub fn test_run_ingress(&self, frame: &[u8]) -> Result<TestRunOutput, Error> {
        self.test_run_ingress_repeat(frame, 1)
    }

    /// As [`Dataplane::test_run_ingress`], `repeat` times (counters count every repetition).
    /// A repeat above 1 makes the kernel switch its XDP dispatcher to the program and back,
    /// which costs milliseconds; single runs do not.
    pub fn test_run_ingress_repeat(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput, Error> {
        let name = programs::INGRESS;
        let program = self.ingress()?;
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() };
        let result = program.test_run(opts).map_err(Error::program(name))?;
        Ok(TestRunOutput {
            action: XdpAction::from_u32(result.return_value),
            duration: result.duration,
        })
    }

    /// How many instructions the verifier processed when it loaded the ingress program
    /// (`None` on kernels that do not report it). The verifier refuses a program past
    /// 1,000,000, so this is the headroom left for the program to grow.
    pub fn ingress_verified_instructions(&self) -> Result<Option<u32>, Error> {
        let info = self.ingress()?.info().map_err(Error::program(programs::INGRESS))?;
        Ok(info.verified_instruction_count())
    }

    /// Every rule counter, summed over CPUs: a rule's hash entry plus the slots of the
    /// direct-mapped front that it holds on any CPU.
    pub fn rule_counters(&self) -> Result<BTreeMap<u32, Counters>, Error> {
        let name = maps::RULE_COUNTERS;
        let mut out = BTreeMap::new();
        for item in self.rule_counters.iter() {
            let (rule, per_cpu) = item.map_err(Error::map(name))?;
            out.insert(rule, sum(&per_cpu));
        }
        for s in self.counter_slots()?.0 {
            if s.rule != 0 {
                let c = out.entry(s.rule).or_default();
                c.packets += s.counters.packets;
                c.bytes += s.counters.bytes;
            }
        }
        Ok(out)
    }

    /// The direct-mapped front of the rule counters, read whole in one batch: slot `k` of
    /// CPU `c` at `k * cpus + c`, and `cpus` (the possible CPUs, as the kernel lays per-CPU
    /// values out).
    pub(crate) fn counter_slots(&self) -> Result<(Vec<RuleCounterSlot>, usize), Error> {
        let name = maps::RULE_COUNTER_CACHE;
        let cpus = nr_cpus().map_err(|(_, e)| Error::Cpus(e))?;
        let size = size_of::<RuleCounterSlot>();
        let fd = self.rule_counter_cache.map().fd().as_fd();
        let (keys, values, n) =
            batch::lookup_all(fd, 4, size * cpus).map_err(Error::batch(name))?;
        let mut slots = vec![RuleCounterSlot::default(); RULE_COUNTER_SLOTS as usize * cpus];
        for i in 0..n {
            let k = u32::from_ne_bytes(keys[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            for c in 0..cpus {
                let at = (i * cpus + c) * size;
                let bytes = &values[at..at + size];
                // SAFETY: one whole `RuleCounterSlot` as the kernel copied it out, a plain-data
                // struct of integers (any bit pattern is valid); read unaligned.
                let slot = unsafe { bytes.as_ptr().cast::<RuleCounterSlot>().read_unaligned() };
                if let Some(dst) = slots.get_mut(k as usize * cpus + c) {
                    *dst = slot;
                }
            }
        }
        Ok((slots, cpus))
    }

    /// Writes slot `k` of the front for every CPU (`per_cpu`: one per possible CPU).
    pub(crate) fn write_counter_slot(
        &mut self,
        k: u32,
        per_cpu: &[RuleCounterSlot],
    ) -> Result<(), Error> {
        let name = maps::RULE_COUNTER_CACHE;
        let values = per_cpu.to_vec().try_into().map_err(Error::Cpus)?;
        self.rule_counter_cache.set(k, values, 0).map_err(Error::map(name))
    }

    /// One stats slot (`fw_common::DIRECTION_*`, `fw_common::STAT_*`), summed over CPUs.
    pub fn stat(&self, direction: u32, stat: u32) -> Result<Counters, Error> {
        let name = maps::STATS;
        let per_cpu = self.stats.get(&stat_index(direction, stat), 0).map_err(Error::map(name))?;
        Ok(sum(&per_cpu))
    }

    /// Every stats slot (index `fw_common::stat_index`), summed over CPUs.
    pub fn stats(&self) -> Result<Vec<Counters>, Error> {
        let name = maps::STATS;
        (0..STATS_ENTRIES)
            .map(|i| self.stats.get(&i, 0).map(|v| sum(&v)).map_err(Error::map(name)))
            .collect()
    }

    /// Zeroes every counter: deletes the rule counters, zeroes the stats.
    pub fn reset_counters(&mut self) -> Result<(), Error> {
        let name = maps::RULE_COUNTERS;
        let rules: Vec<u32> =
            self.rule_counters.keys().collect::<Result<_, _>>().map_err(Error::map(name))?;
        for rule in rules {
            self.rule_counters.remove(&rule).map_err(Error::map(name))?;
        }
        let cpus = nr_cpus().map_err(|(_, e)| Error::Cpus(e))?;
        let name = maps::RULE_COUNTER_CACHE;
        let keys: Vec<u8> = (0..RULE_COUNTER_SLOTS).flat_map(u32::to_ne_bytes).collect();
        let slot = size_of::<RuleCounterSlot>();
        let zeros = vec![0u8; RULE_COUNTER_SLOTS as usize * slot * cpus];
        let fd = self.rule_counter_cache.map().fd().as_fd();
        batch::update(fd, 4, slot * cpus, &keys, &zeros).map_err(Error::batch(name))?;
        for i in 0..STATS_ENTRIES {
            let zeros = vec![Counters::default(); cpus].try_into().map_err(Error::Cpus)?;
            self.stats.set(i, zeros, 0).map_err(Error::map(maps::STATS))?;
        }
        Ok(())
    }
}

fn sum(per_cpu: &[Counters]) -> Counters {
    per_cpu.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    })
}

/// Takes the outer map `name` out of the object, puts generation `g`'s inner map into slot
/// `g`, and keeps the outer map in `outer`.
fn fill<'a, V: InnerMap + 'a>(
    ebpf: &mut Ebpf,
    outer: &mut BTreeMap<&'static str, Map>,
    name: &'static str,
    inner: impl Iterator<Item = &'a V>,
) -> Result<(), Error> {
    let mut map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    {
        let mut slots: ArrayOfMaps<&mut MapData, V> =
            ArrayOfMaps::try_from(&mut map).map_err(Error::map(name))?;
        for (g, inner) in (0..GENERATIONS).zip(inner) {
            // Each slot update waits for an RCU grace period (the kernel makes sure no
            // program still uses the map it replaces), so this costs a few ms per slot.
            slots.set(g, inner, 0).map_err(Error::map(name))?;
        }
    }
    outer.insert(name, map);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_object_is_an_aligned_bpf_elf_unless_the_build_was_skipped() {
        let obj = object();
        // Compiled with AYA_BUILD_SKIP: there is no object to check (build.rs reruns, and this
        // crate recompiles, whenever the variable changes).
        if option_env!("AYA_BUILD_SKIP").is_some() && obj.is_empty() {
            return;
        }
        assert_eq!(obj.get(..4), Some(&b"\x7fELF"[..]));
        // EM_BPF (247), little-endian (EI_DATA = 1).
        assert_eq!(obj.get(5), Some(&1));
        assert_eq!(obj.get(18..20), Some(&247u16.to_le_bytes()[..]));
        assert_eq!(obj.as_ptr() as usize % 8, 0);
    }

    #[test]
    fn loading_checks_its_inputs_before_touching_the_kernel() {
        let caps = Capacities::default();
        assert!(matches!(Dataplane::load_object(&[], &caps), Err(Error::ObjectNotBuilt)));
        let zero = Capacities { l4_entries: 0, ..caps };
        assert!(matches!(
            Dataplane::load_object(b"\x7fELF", &zero),
            Err(Error::ZeroCapacity("L4 entries"))
        ));
    }

    #[test]
    fn xdp_actions_follow_the_kernel_enum() {
        assert_eq!(XdpAction::from_u32(1), XdpAction::Drop);
        assert_eq!(XdpAction::from_u32(2), XdpAction::Pass);
        assert_eq!(XdpAction::from_u32(9), XdpAction::Other(9));
    }
}
