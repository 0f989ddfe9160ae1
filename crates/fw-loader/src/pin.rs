//! Pinning the data plane under a bpffs root, adopting it from there, and unloading it.
//!
//! Why it is built this way:
//! - Everything that must outlive the process is pinned flat under one root (default
//!   [`DEFAULT_ROOT`]): the program (`fw_ingress`), the outer maps and the counter and
//!   generation maps (by their ABI names), the record map (`FW_RECORD`), one saved-state map per
//!   saved state a record names (`FW_STATE_<id>`) and, in `links/`, one XDP link per interface
//!   (`links/<drv|skb>-<interface>`, the mode in the name because the kernel's link info does
//!   not say it). bpffs refuses names with a dot, so `.` and `%` in interface names (VLANs:
//!   `eth0.100`) are written `%2E` and `%25`. Each generation's inner maps are pinned too
//!   (`<outer name>_G<generation>`), although programs reach them only through their outer slot
//!   (which is what lets apply replace one with a bigger map in a single slot update): opening a
//!   map by the id a slot holds needs `CAP_SYS_ADMIN`, opening a pin does not, so a daemon
//!   holding only `CAP_BPF`, `CAP_NET_ADMIN` and `CAP_PERFMON` can adopt the pins. An adopting
//!   process uses a pin only when its map id is the one the slot holds (a crash between growing
//!   a map and re-pinning it leaves a stale pin), else opens the slot's map by id and re-pins it.
//!   The same goes for programs: an upgrade opens the running program from its pin.
//! - A later process adopts the pins instead of loading again, so program ids and map ids
//!   never change across applies. Adoption is refused when the record's ABI version (a hash of
//!   the embedded object) differs from this build's: the maps' layout could differ. That case
//!   is the one path on which program ids change: `upgrade` swaps the programs under their
//!   pinned links and replaces the pins.
//! - One lock per root ([`lock_root`], an `flock` on the root directory): loading, adopting
//!   and upgrading take it, and an applier holds it for its apply ([`Dataplane::lock`]), so two
//!   processes opening a fresh root at once load once (the second adopts), and no process
//!   adopts pins another is still making or replacing.
//! - The record map is an array of three fixed-size text records, one per generation
//!   (revision, digest, write id, and the id and length of the saved state of what that
//!   generation holds) and one of metadata (ABI, conntrack entry layout, cgroup), so `status`
//!   and `diff` read the applied revision from the kernel, not from a file that could disagree
//!   with it. bpffs holds no regular files, so the saved state (what the caller keeps with a
//!   generation: fwctl's rule table, which the kernel maps do not hold) lives in an array map of
//!   4 KiB chunks, pinned under an id both records name when both generations hold the same
//!   state, so an unchanged one is not written again.
//! - Pins are made 0600 and directories 0700: the maps decide what the host lets through.
//! - Links are bpf links (`bpf_link_create`), pinned: the attachment lives as long as the pin,
//!   and removing the pin detaches (once no process holds the link open).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{Array, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{Xdp, XdpMode};
use aya_obj::generated::bpf_map_type;
use aya_obj::programs::XdpAttachType;
use fw_common::{GENERATIONS, maps, programs};
use fw_compiler::mapstate::Capacities;

use crate::generation::{GenerationMaps, create};
use crate::{Dataplane, Error, object};

/// The default bpffs root.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/fw";

pub(crate) const RECORD: &str = "FW_RECORD";
/// Saved-state pins are `FW_STATE_<id>`.
const STATE_PREFIX: &str = "FW_STATE_";
pub(crate) const LINKS: &str = "links";
/// Bytes per record entry.
pub(crate) const RECORD_SIZE: usize = 1024;
/// Bytes per chunk of a saved-state map.
pub(crate) const CHUNK: usize = 4096;
/// Record index of the metadata entry (after one entry per generation).
pub(crate) const META: u32 = GENERATIONS;

type Record = [u8; RECORD_SIZE];
pub(crate) type Chunk = [u8; CHUNK];

/// The ABI version of the embedded object: 64-bit FNV-1a of its bytes, in hex.
pub fn abi_version() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in object() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The layout of the connection-tracking table's entries: each field's offset and size in
/// `ConntrackKey` and `ConntrackValue`, and both sizes. Kept in the record, so an upgrade can
/// tell whether the pinned table's entries mean the same to the new programs (then they are
/// copied over) or not. It sees layout only: a change of what a field means without a change
/// of where it is must come with a renamed or moved field.
pub fn conntrack_layout() -> String {
    use core::mem::{offset_of, size_of};
    use fw_common::conntrack::{ConntrackKey as K, ConntrackValue as V};
    format!(
        "key{}:family@{},proto@{},local_port@{},remote_port@{},local@{},remote@{};\
         value{}:last_seen_ns@{},state@{}",
        size_of::<K>(),
        offset_of!(K, family),
        offset_of!(K, proto),
        offset_of!(K, local_port),
        offset_of!(K, remote_port),
        offset_of!(K, local),
        offset_of!(K, remote),
        size_of::<V>(),
        offset_of!(V, last_seen_ns),
        offset_of!(V, state),
    )
}

/// What [`Dataplane::open_pinned`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Nothing was pinned: the object was loaded and pinned.
    Loaded,
    /// The pins were adopted; no program was loaded or attached.
    Adopted,
}

/// One XDP attachment, as pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    /// "drv" (native) or "skb" (generic).
    pub mode: String,
    pub link_id: u32,
    pub program_id: u32,
    pub pin: PathBuf,
}

/// One generational map of the active generation (for a derived map, `fw_common::maps::DERIVED`:
/// its chunks, for the pool of second-level chunks those in use, for the port array its
/// non-zero slots, for the class filter its set bits, against how many it has).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapStatus {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// What `fwctl status` shows (everything read from the kernel).
#[derive(Clone, Debug)]
pub struct Status {
    pub root: PathBuf,
    pub abi: String,
    pub program: &'static str,
    pub program_id: u32,
    pub attachments: Vec<Attachment>,
    pub active_generation: u32,
    /// What each generation holds, by the record.
    pub generations: Vec<Option<crate::Applied>>,
    /// Per generation, whether its record says nothing was ever applied to it (the maps are
    /// as the loader created them); `generations` has `None` there too.
    pub empty: Vec<bool>,
    pub cgroup: Option<String>,
    pub maps: Vec<MapStatus>,
}

/// The pinned objects a [`Dataplane`] owns besides the ones every data plane has.
pub(crate) struct Pins {
    pub root: PathBuf,
    pub record: Array<MapData, Record>,
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

pub(crate) fn pin_err(path: &Path) -> impl FnOnce(aya::pin::PinError) -> Error + '_ {
    move |source| Error::Pin { path: path.to_path_buf(), source: Box::new(source) }
}

pub(crate) fn private(path: &Path, mode: u32) -> Result<(), Error> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))
}

fn mkdir_private(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(io(path))?;
    private(path, 0o700)
}

pub(crate) fn open_pinned_map(root: &Path, name: &str) -> Result<Map, Error> {
    let data = MapData::from_pin(root.join(name)).map_err(Error::map(name))?;
    Map::from_map_data(data).map_err(Error::map(name))
}

impl Pins {
    /// Parses record entry `index`: `key=value` lines up to the first NUL. `None` when empty.
    pub fn read(&self, index: u32) -> Result<Option<BTreeMap<String, String>>, Error> {
        let raw = self.record.get(&index, 0).map_err(Error::map(RECORD))?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        if end == 0 {
            return Ok(None);
        }
        let text = std::str::from_utf8(raw.get(..end).unwrap_or_default())
            .map_err(|_| Error::Record("not UTF-8"))?;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=').ok_or(Error::Record("a line without '='"))?;
            out.insert(k.to_string(), v.to_string());
        }
        Ok(Some(out))
    }

    /// Replaces record entry `index` (an empty list clears it).
    pub fn write(&mut self, index: u32, fields: &[(&str, &str)]) -> Result<(), Error> {
        let mut text = String::new();
        for (k, v) in fields {
            if v.contains(['\n', '\0']) || k.contains(['\n', '\0', '=']) {
                return Err(Error::Record("a field with a newline or NUL"));
            }
            text.push_str(k);
            text.push('=');
            text.push_str(v);
            text.push('\n');
        }
        let mut raw = [0u8; RECORD_SIZE];
        raw.get_mut(..text.len())
            .ok_or(Error::Record("the fields do not fit the record"))?
            .copy_from_slice(text.as_bytes());
        self.record.set(index, raw, 0).map_err(Error::map(RECORD))
    }

    fn state_pin(&self, id: &str) -> PathBuf {
        self.root.join(format!("{STATE_PREFIX}{id}"))
    }

    /// Pins a saved-state map holding `bytes` under the id `id` (hex, from the apply): a new
    /// map pinned under a temporary name, then renamed into place.
    pub fn write_state(&self, id: &str, bytes: &[u8]) -> Result<(), Error> {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Record("a saved-state id that is not hex"));
        }
        let name = format!("{STATE_PREFIX}{id}");
        let chunks = bytes.len().div_ceil(CHUNK).max(1);
        let n = u32::try_from(chunks)
            .map_err(|_| Error::StateTooLarge { len: bytes.len(), max: u32::MAX as usize })?;
        let map = create("FW_STATE", bpf_map_type::BPF_MAP_TYPE_ARRAY, 4, CHUNK, n, 0)?;
        let mut array: Array<MapData, Chunk> = Array::try_from(map).map_err(Error::map(&name))?;
        for (i, part) in bytes.chunks(CHUNK).enumerate() {
            let mut chunk = [0u8; CHUNK];
            if let Some(dst) = chunk.get_mut(..part.len()) {
                dst.copy_from_slice(part);
            }
            array.set(i as u32, chunk, 0).map_err(Error::map(&name))?;
        }
        let tmp = self.root.join(format!("{name}_new"));
        let _ = fs::remove_file(&tmp);
        array.map().pin(&tmp).map_err(pin_err(&tmp))?;
        private(&tmp, 0o600)?;
        let dst = self.state_pin(id);
        fs::rename(&tmp, &dst).map_err(io(&dst))
    }

    /// The saved state pinned under `id`, `len` bytes long (both from a record).
    pub fn read_state(&self, id: &str, len: usize) -> Result<Vec<u8>, Error> {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Record("a saved-state id that is not hex"));
        }
        let path = self.state_pin(id);
        let name = "FW_STATE";
        let data = MapData::from_pin(&path).map_err(Error::map(name))?;
        let array: Array<MapData, Chunk> =
            Array::try_from(Map::from_map_data(data).map_err(Error::map(name))?)
                .map_err(Error::map(name))?;
        let mut out = Vec::with_capacity(len);
        let mut i = 0u32;
        while out.len() < len {
            let chunk = array.get(&i, 0).map_err(Error::map(name))?;
            let take = (len - out.len()).min(CHUNK);
            out.extend_from_slice(chunk.get(..take).unwrap_or_default());
            i += 1;
        }
        Ok(out)
    }

    /// Removes every saved-state pin no generation's record names (older states, the
    /// per-generation pins of earlier versions, a temporary pin left by a crash).
    pub fn remove_unreferenced_states(&self) -> Result<(), Error> {
        let mut keep = Vec::new();
        for g in 0..GENERATIONS {
            if let Some(id) = self.read(g)?.and_then(|mut f| f.remove("state")) {
                keep.push(format!("{STATE_PREFIX}{id}"));
            }
        }
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))? {
            let path = entry.map_err(io(&self.root))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if name.starts_with(STATE_PREFIX) && !keep.iter().any(|k| k == name) {
                fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }
}

impl Dataplane {
    /// Adopts the data plane pinned under `root`, or loads and pins one when nothing is pinned
    /// there. The check and the load or adoption happen under the root's lock
    /// ([`lock_root`]), so two processes opening the same fresh root at once load once: the
    /// second waits and adopts what the first pinned.
    pub fn open_pinned(root: &Path, caps: &Capacities) -> Result<(Self, Opened), Error> {
        if !on_bpffs(root) {
            return Err(Error::NotBpffs(root.to_path_buf()));
        }
        let _lock = lock_root(root, true)?;
        if root.join(RECORD).exists() {
            Ok((Self::adopt_locked(root)?, Opened::Adopted))
        } else {
            let mut dp = Self::load_pinned_locked(root, caps)?;
            // The lock is released on return: another process may adopt and attach it.
            dp.exclusive = false;
            Ok((dp, Opened::Loaded))
        }
    }

    /// Loads the embedded object and pins it under `root` (created 0700), under the root's
    /// lock. Refused when a data plane is already pinned there ([`Error::AlreadyPinned`]). On
    /// failure whatever was pinned is removed again.
    pub fn load_pinned(root: &Path, caps: &Capacities) -> Result<Self, Error> {
        if !on_bpffs(root) {
            return Err(Error::NotBpffs(root.to_path_buf()));
        }
        let _lock = lock_root(root, true)?;
        if root.join(RECORD).exists() {
            return Err(Error::AlreadyPinned(root.to_path_buf()));
        }
        let mut dp = Self::load_pinned_locked(root, caps)?;
        // The lock is released on return: another process may adopt and attach it.
        dp.exclusive = false;
        Ok(dp)
    }

    /// [`Dataplane::load_pinned`] for a caller that holds the root's lock.
    pub(crate) fn load_pinned_locked(root: &Path, caps: &Capacities) -> Result<Self, Error> {
        let mut dp = match Self::load(caps) {
            Ok(dp) => dp,
            Err(e) => {
                // The root was made to be locked; leave no empty root behind (a process
                // waiting for its lock notices the removal and locks the next one).
                let _ = fs::remove_dir(root);
                return Err(e);
            }
        };
        mkdir_private(root)?;
        match dp.pin_all(root).and_then(|pins| {
            dp.pins = Some(pins);
            dp.know_fresh()
        }) {
            Ok(()) => Ok(dp),
            Err(e) => {
                drop(dp);
                let _ = unload_locked(root);
                Err(e)
            }
        }
    }

    fn pin_all(&mut self, root: &Path) -> Result<Pins, Error> {
        Ok(self.pin_all_as(root, "")?.0)
    }

    /// Pins every program and map of this (loaded) data plane under `root`, each under its
    /// name followed by `suffix`, and returns the record (already holding the metadata) with
    /// the (pinned path, name) pairs, the record last. With an empty suffix these are the final
    /// names; an upgrade pins under a temporary suffix and renames afterwards.
    pub(crate) fn pin_all_as(
        &mut self,
        root: &Path,
        suffix: &str,
    ) -> Result<(Pins, Vec<(PathBuf, PathBuf)>), Error> {
        let mut pinned = Vec::new();
        let at = |name: &str| {
            let path = root.join(format!("{name}{suffix}"));
            if !suffix.is_empty() {
                // Left by an upgrade that died before renaming.
                let _ = fs::remove_file(&path);
            }
            (path, root.join(name))
        };
        // Every program of the object, by its name (the egress programs too, so a later
        // process can open them from their pins).
        if let Some(ebpf) = self.ebpf.as_mut() {
            for (name, program) in ebpf.programs_mut() {
                if program.fd().is_err() {
                    continue; // not loaded by this loader: nothing to pin
                }
                let (path, dst) = at(name);
                program.pin(&path).map_err(pin_err(&path))?;
                pinned.push((path, dst));
            }
        }
        // Maps still inside the object (those other modules take when they need them: the
        // conntrack table, the event ring, ...), so a later process can open them by name
        // ([`Dataplane::open_pinned_map`]). Names with a dot are the programs' own data
        // sections (.rodata, .bss), which bpffs would refuse anyway.
        if let Some(ebpf) = self.ebpf.as_ref() {
            for (name, map) in ebpf.maps().filter(|(n, _)| !n.contains('.')) {
                let (path, dst) = at(name);
                map.pin(&path).map_err(pin_err(&path))?;
                pinned.push((path, dst));
            }
        }
        for (name, map) in &self.outer {
            let (path, dst) = at(name);
            map.pin(&path).map_err(pin_err(&path))?;
            pinned.push((path, dst));
        }
        // The inner maps too, so an adopting process opens them by pin rather than by id
        // (which needs CAP_SYS_ADMIN).
        for (g, maps) in (0..GENERATIONS).zip(&self.generations) {
            pinned.extend(maps.pin_as(root, g, suffix)?);
        }
        for (name, data) in [
            (maps::GENERATION, self.generation.map()),
            (maps::RULE_COUNTERS, self.rule_counters.map()),
            (maps::RULE_COUNTER_CACHE, self.rule_counter_cache.map()),
            (maps::STATS, self.stats.map()),
        ] {
            let (path, dst) = at(name);
            data.pin(&path).map_err(pin_err(&path))?;
            pinned.push((path, dst));
        }
        let map = create(RECORD, bpf_map_type::BPF_MAP_TYPE_ARRAY, 4, RECORD_SIZE, META + 1, 0)?;
        let record = Array::try_from(map).map_err(Error::map(RECORD))?;
        let mut pins = Pins { root: root.to_path_buf(), record };
        pins.write(META, &[("abi", &abi_version()), ("conntrack", &conntrack_layout())])?;
        // Pinned last: its presence is what makes a root adoptable.
        let (path, dst) = at(RECORD);
        pins.record.map().pin(&path).map_err(pin_err(&path))?;
        pinned.push((path, dst));
        for (p, _) in &pinned {
            private(p, 0o600)?;
        }
        mkdir_private(&root.join(LINKS))?;
        Ok((pins, pinned))
    }

    /// Opens the data plane pinned under `root` without loading or attaching anything. Takes
    /// the root's lock while it opens the pins (not after), so it never sees a root that a
    /// load or an upgrade is still pinning; it waits for them instead. The lock is an `flock`,
    /// which conflicts between two opens even within one process: do not call this while
    /// holding [`Dataplane::lock`] on the same root.
    pub fn adopt(root: &Path) -> Result<Self, Error> {
        if !root.join(RECORD).exists() {
            return Err(Error::NotPinned(root.to_path_buf()));
        }
        let _lock = lock_root(root, false)?;
        Self::adopt_locked(root)
    }

    /// [`Dataplane::adopt`] for a caller that holds the root's lock.
    pub(crate) fn adopt_locked(root: &Path) -> Result<Self, Error> {
        let record_path = root.join(RECORD);
        if !record_path.exists() {
            return Err(Error::NotPinned(root.to_path_buf()));
        }
        let record = Array::try_from(open_pinned_map(root, RECORD)?).map_err(Error::map(RECORD))?;
        let pins = Pins { root: root.to_path_buf(), record };
        let meta = pins.read(META)?.ok_or(Error::Record("no metadata entry"))?;
        let pinned = meta.get("abi").cloned().unwrap_or_default();
        let embedded = abi_version();
        if pinned != embedded {
            return Err(Error::AbiMismatch { root: root.to_path_buf(), pinned, embedded });
        }
        let name = programs::INGRESS;
        let program = Xdp::from_pin(root.join(name), XdpAttachType::Interface)
            .map_err(Error::program(name))?;
        let mut outer = BTreeMap::new();
        for name in maps::GENERATIONAL.into_iter().chain(maps::DERIVED) {
            outer.insert(name, open_pinned_map(root, name)?);
        }
        let generation = Array::try_from(open_pinned_map(root, maps::GENERATION)?)
            .map_err(Error::map(maps::GENERATION))?;
        let counters = MapData::from_pin(root.join(maps::RULE_COUNTERS))
            .map_err(Error::map(maps::RULE_COUNTERS))?;
        let rules = counters.info().map_err(Error::map(maps::RULE_COUNTERS))?.max_entries();
        let rule_counters: PerCpuHashMap<MapData, u32, fw_common::Counters> =
            PerCpuHashMap::try_from(
                Map::from_map_data(counters).map_err(Error::map(maps::RULE_COUNTERS))?,
            )
            .map_err(Error::map(maps::RULE_COUNTERS))?;
        let rule_counter_cache: PerCpuArray<MapData, fw_common::RuleCounterSlot> =
            PerCpuArray::try_from(open_pinned_map(root, maps::RULE_COUNTER_CACHE)?)
                .map_err(Error::map(maps::RULE_COUNTER_CACHE))?;
        let stats: PerCpuArray<MapData, fw_common::Counters> =
            PerCpuArray::try_from(open_pinned_map(root, maps::STATS)?)
                .map_err(Error::map(maps::STATS))?;
        let mut generations = Vec::new();
        for g in 0..GENERATIONS {
            let (maps, all_pinned) = GenerationMaps::from_outer(g, &outer, rules, Some(root))?;
            if !all_pinned {
                // A root pinned before inner maps were pinned, or a crash between growing a
                // map and re-pinning it: pin what the slots hold now (best effort; the next
                // adoption tries again), so later adoptions need no CAP_SYS_ADMIN.
                let _ = maps.repin(root, g);
            }
            generations.push(maps);
        }
        let caps = generations.first().map(|g| g.caps).unwrap_or_default();
        Ok(Self {
            ebpf: None,
            pinned_ingress: Some(program),
            generations,
            generation,
            rule_counters,
            rule_counter_cache,
            stats,
            outer,
            caps,
            pins: Some(pins),
            held: (0..GENERATIONS).map(|_| None).collect(),
            saved: None,
            // Pinned by someone else: its programs may be attached anywhere.
            exclusive: false,
        })
    }

    /// Takes the pin root's exclusive lock ([`lock_root`]), held until the returned file is
    /// dropped (or the process dies), so two appliers never interleave their steps. Blocks
    /// while another holds it.
    pub fn lock(&self) -> Result<fs::File, Error> {
        let root = self.pin_root().ok_or(Error::NotPinned(PathBuf::from("<unpinned>")))?;
        lock_root(root, false)
    }

    /// Opens a map pinned under this data plane's root by its name (`fw_common::maps`), e.g.
    /// the conntrack table or the event ring of an adopted data plane.
    pub fn open_pinned_map(&self, name: &str) -> Result<Map, Error> {
        let root = self.pin_root().ok_or(Error::NotPinned(PathBuf::from("<unpinned>")))?;
        open_pinned_map(root, name)
    }

    /// The bpffs root, when pinned.
    pub fn pin_root(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.root.as_path())
    }

    pub(crate) fn pins_mut(&mut self) -> Option<&mut Pins> {
        self.pins.as_mut()
    }

    pub(crate) fn pins(&self) -> Option<&Pins> {
        self.pins.as_ref()
    }

    /// The kernel's id of the ingress program.
    pub fn ingress_program_id(&self) -> Result<u32, Error> {
        let name = programs::INGRESS;
        Ok(self.ingress()?.info().map_err(Error::program(name))?.id())
    }

    /// Attaches the ingress program to `interface` (native mode, else generic) and pins the
    /// link. Already attached (a pinned link running this program): nothing changes.
    pub fn attach_xdp(&mut self, interface: &str) -> Result<Attachment, Error> {
        self.exclusive = false;
        let root =
            self.pin_root().ok_or(Error::NotPinned(PathBuf::from("<unpinned>")))?.to_path_buf();
        let program_id = self.ingress_program_id()?;
        for a in attachments(&root)? {
            if a.interface == interface {
                if a.program_id == program_id {
                    return Ok(a);
                }
                // A link left by another program: replace it.
                fs::remove_file(&a.pin).map_err(io(&a.pin))?;
            }
        }
        let program = self.ingress_program()?;
        let (id, mode) = match program.attach(interface, XdpMode::Driver) {
            Ok(id) => (id, "drv"),
            Err(_) => match program.attach(interface, XdpMode::Skb) {
                Ok(id) => (id, "skb"),
                Err(e) => {
                    return Err(Error::Attach {
                        interface: interface.to_string(),
                        source: Box::new(e),
                    });
                }
            },
        };
        let attach_err =
            |e| Error::Attach { interface: interface.to_string(), source: Box::new(e) };
        let link = program.take_link(id).map_err(attach_err)?;
        let link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| {
            Error::Link { path: PathBuf::from(interface), source: Box::new(e) }
        })?;
        let path = root.join(LINKS).join(format!("{mode}-{}", escape(interface)));
        let pinned = link.pin(&path).map_err(pin_err(&path))?;
        private(&path, 0o600)?;
        let info = FdLink::from(pinned)
            .info()
            .map_err(|e| Error::Link { path: path.clone(), source: Box::new(e) })?;
        Ok(Attachment {
            interface: interface.to_string(),
            mode: mode.to_string(),
            link_id: info.id(),
            program_id: info.program_id(),
            pin: path,
        })
    }

    /// Detaches (unpins) every XDP link whose interface is not in `keep`; returns the removed
    /// pins.
    pub fn detach_xdp_except(&mut self, keep: &[String]) -> Result<Vec<PathBuf>, Error> {
        let root =
            self.pin_root().ok_or(Error::NotPinned(PathBuf::from("<unpinned>")))?.to_path_buf();
        let mut removed = Vec::new();
        for a in attachments(&root)? {
            if !keep.contains(&a.interface) {
                fs::remove_file(&a.pin).map_err(io(&a.pin))?;
                removed.push(a.pin);
            }
        }
        Ok(removed)
    }

    /// The cgroup the egress programs were attached to, by the record's metadata.
    pub fn recorded_cgroup(&self) -> Result<Option<String>, Error> {
        let Some(pins) = self.pins.as_ref() else { return Ok(None) };
        Ok(pins.read(META)?.and_then(|mut m| m.remove("cgroup")))
    }

    /// Stores the cgroup the egress programs attach to (in the record's metadata).
    pub fn set_cgroup(&mut self, cgroup: Option<&str>) -> Result<(), Error> {
        let Some(pins) = self.pins.as_mut() else { return Ok(()) };
        let mut meta = pins.read(META)?.unwrap_or_default();
        match cgroup {
            Some(c) => meta.insert("cgroup".into(), c.to_string()),
            None => meta.remove("cgroup"),
        };
        let fields: Vec<(&str, &str)> =
            meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        pins.write(META, &fields)
    }

    /// Everything `fwctl status` shows, read from the kernel.
    pub fn status(&self) -> Result<Status, Error> {
        let pins = self.pins.as_ref().ok_or(Error::NotPinned(PathBuf::from("<unpinned>")))?;
        let meta = pins.read(META)?.unwrap_or_default();
        let active = self.active_generation()?;
        let generations =
            (0..GENERATIONS).map(|g| self.applied(g)).collect::<Result<Vec<_>, _>>()?;
        let empty =
            (0..GENERATIONS).map(|g| self.nothing_applied(g)).collect::<Result<Vec<_>, _>>()?;
        let gm = self.generations.get(active as usize).ok_or(Error::NoSuchGeneration(active))?;
        let mut map_status = Vec::new();
        for name in maps::GENERATIONAL {
            let capacity = match name {
                maps::INGRESS_V4 | maps::EGRESS_V4 => gm.caps.v4_prefixes,
                maps::INGRESS_V6 | maps::EGRESS_V6 => gm.caps.v6_prefixes,
                maps::INGRESS_L4 | maps::INGRESS_L4_EXACT | maps::EGRESS_L4 => gm.caps.l4_entries,
                maps::CONFIG => fw_common::CONFIG_ENTRIES,
                maps::INGRESS_V4_DIR => fw_common::V4_DIR_MAX_CHUNKS,
                maps::WORKLOADS => gm.caps.workloads,
                _ => 0,
            };
            let entries = match name {
                maps::WORKLOADS => gm.workloads.keys().count(),
                _ => gm.count_map(name)?,
            };
            map_status.push(MapStatus { name, entries, capacity });
        }
        // The maps the loader derives: chunks of the first level, chunks of the pool in use,
        // slots of the port array, bits of the class filter.
        for name in maps::DERIVED {
            let (entries, capacity) = gm.derived_fill(name)?;
            map_status.push(MapStatus { name, entries, capacity });
        }
        Ok(Status {
            root: pins.root.clone(),
            abi: meta.get("abi").cloned().unwrap_or_default(),
            program: programs::INGRESS,
            program_id: self.ingress_program_id()?,
            attachments: attachments(&pins.root)?,
            active_generation: active,
            generations,
            empty,
            cgroup: meta.get("cgroup").cloned(),
            maps: map_status,
        })
    }

    /// Drops this handle, then detaches and unpins everything under its root.
    pub fn unload(self) -> Result<Vec<PathBuf>, Error> {
        let root = self.pin_root().map(Path::to_path_buf);
        drop(self);
        match root {
            Some(root) => unload_pinned(&root),
            None => Ok(Vec::new()),
        }
    }
}

/// Takes an exclusive `flock` on the bpffs root directory itself (bpffs directories take
/// flocks like any other), creating the root first (0700) when `create` is set; the lock is
/// held until the returned file is dropped or the process dies. Loading, adopting, upgrading
/// and applying all take it, so no process ever sees another's half-made pins.
///
/// A root can disappear while a process waits for its lock (an unload, or a failed first load
/// that removes what it pinned) and be made anew by a third process: the lock would then be on
/// a directory nobody else uses. So after locking, the locked directory is compared with what
/// `root` names now (device and inode), and the lock is taken again when they differ.
pub fn lock_root(root: &Path, create: bool) -> Result<fs::File, Error> {
    use std::os::unix::fs::MetadataExt as _;
    loop {
        if create {
            mkdir_private(root)?;
        }
        let dir = match fs::File::open(root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
                return Err(Error::NotPinned(root.to_path_buf()));
            }
            Err(e) => return Err(Error::Io { path: root.to_path_buf(), source: e }),
        };
        loop {
            // SAFETY: flock on a valid open fd has no memory-safety preconditions.
            let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&dir), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Io { path: root.to_path_buf(), source: e });
            }
        }
        let locked = dir.metadata().map_err(io(root))?;
        match fs::metadata(root) {
            Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => return Ok(dir),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
                return Err(Error::NotPinned(root.to_path_buf()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Io { path: root.to_path_buf(), source: e }),
        }
    }
}

/// An interface name as a bpffs file name: bpffs refuses dots.
fn escape(interface: &str) -> String {
    interface.replace('%', "%25").replace('.', "%2E")
}

fn unescape(name: &str) -> String {
    name.replace("%2E", ".").replace("%25", "%")
}

/// Whether `path` (or, when it does not exist yet, its nearest existing ancestor) is on a BPF
/// filesystem: pinning anywhere else fails with a confusing ENOENT or EPERM.
pub(crate) fn on_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Some(existing) = path.ancestors().find(|p| p.exists()) else { return false };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a properly sized, writable statfs.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    rc == 0 && buf.f_type as i64 == BPF_FS_MAGIC
}

/// The XDP links pinned under `root`.
pub fn attachments(root: &Path) -> Result<Vec<Attachment>, Error> {
    let dir = root.join(LINKS);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::Io { path: dir, source: e }),
    };
    for entry in entries {
        let entry = entry.map_err(io(&dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(crate::cgroup::LINK_PREFIX) {
            continue; // an egress link, not an XDP one
        }
        let Some((mode, interface)) = name.split_once('-') else { continue };
        let interface = unescape(interface);
        let link = PinnedLink::from_pin(&path)
            .map_err(|e| Error::Link { path: path.clone(), source: Box::new(e) })?;
        let info = FdLink::from(link)
            .info()
            .map_err(|e| Error::Link { path: path.clone(), source: Box::new(e) })?;
        out.push(Attachment {
            interface,
            mode: mode.to_string(),
            link_id: info.id(),
            program_id: info.program_id(),
            pin: path,
        });
    }
    out.sort_by(|a, b| a.interface.cmp(&b.interface));
    Ok(out)
}

/// Removes every pin under `root` (links first, which detaches them once no process holds
/// them open), then the directories; returns what was removed, in order. Takes the root's
/// lock first ([`lock_root`]), so an unload never removes pins an apply, a load or an upgrade
/// is working on: it waits for them to finish. Do not call it while holding that lock.
pub fn unload_pinned(root: &Path) -> Result<Vec<PathBuf>, Error> {
    if !root.exists() {
        return Err(Error::NotPinned(root.to_path_buf()));
    }
    let _lock = lock_root(root, false)?;
    unload_locked(root)
}

/// [`unload_pinned`] for a caller that holds the root's lock.
pub(crate) fn unload_locked(root: &Path) -> Result<Vec<PathBuf>, Error> {
    if !root.exists() {
        return Err(Error::NotPinned(root.to_path_buf()));
    }
    let mut removed = Vec::new();
    let links = root.join(LINKS);
    if links.exists() {
        for entry in fs::read_dir(&links).map_err(io(&links))? {
            let path = entry.map_err(io(&links))?.path();
            fs::remove_file(&path).map_err(io(&path))?;
            removed.push(path);
        }
        fs::remove_dir(&links).map_err(io(&links))?;
        removed.push(links);
    }
    let mut rest: Vec<PathBuf> = fs::read_dir(root)
        .map_err(io(root))?
        .map(|e| e.map(|e| e.path()).map_err(io(root)))
        .collect::<Result<_, _>>()?;
    rest.sort();
    for path in rest {
        fs::remove_file(&path).map_err(io(&path))?;
        removed.push(path);
    }
    fs::remove_dir(root).map_err(io(root))?;
    removed.push(root.to_path_buf());
    Ok(removed)
}

/// Makes the record under `root` name ABI `abi`, as a root pinned by another build would;
/// the ABI it named before. See [`crate::testing`].
#[cfg(feature = "testing")]
pub fn rewrite_recorded_abi(root: &Path, abi: &str) -> Result<String, Error> {
    let record = Array::try_from(open_pinned_map(root, RECORD)?).map_err(Error::map(RECORD))?;
    let mut pins = Pins { root: root.to_path_buf(), record };
    let meta = pins.read(META)?.ok_or(Error::Record("no metadata entry"))?;
    let before = meta.get("abi").cloned().unwrap_or_default();
    let fields: Vec<(&str, &str)> =
        meta.iter().map(|(k, v)| (k.as_str(), if k == "abi" { abi } else { v.as_str() })).collect();
    pins.write(META, &fields)?;
    Ok(before)
}

/// Clears generation `generation`'s record, as a write interrupted by a crash leaves it. See
/// [`crate::testing`].
#[cfg(feature = "testing")]
pub fn clear_record(dp: &mut Dataplane, generation: u32) -> Result<(), Error> {
    match dp.pins_mut() {
        Some(pins) => pins.write(generation, &[]),
        None => Err(Error::NotPinned(PathBuf::from("<unpinned>"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_round_trip_through_dot_free_pin_names() {
        for name in ["eth0", "eth0.100", "a%2Eb", "x-y.z%"] {
            let e = escape(name);
            assert!(!e.contains('.'), "{e}");
            assert_eq!(unescape(&e), name);
        }
    }
}
