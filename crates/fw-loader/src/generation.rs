//! The inner maps of one generation: creating them, writing encoded state into them, reading
//! them back.
//!
//! The kernel object declares each generational map as an array-of-maps whose inner map is a
//! template; the real inner maps are created here so their capacities come from the compiler's
//! `Capacities` (a later standby generation can be created bigger than the active one). The
//! kernel accepts an inner map when its type, key size, value size and flags equal the
//! template's (and, for arrays, its size), so those are fixed here to the values the programs
//! declare.
//!
//! Writing is a sync, not an append: after [`GenerationMaps::write`] each map holds exactly the
//! encoded entries (stale keys are deleted), whatever it held before. It works map by map,
//! mostly in batches (`crate::batch`), which the kernel applies element by element, so it is
//! not atomic: write only a generation packets are not using, then flip. The ingress IPv4
//! table is split between its hash and a loader-only record (`crate::v4rest`).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::Pod;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, ArrayOfMaps, HashMap, InnerMap, IterableMap as _, Map, MapData};
use aya_obj::generated::bpf_map_type;
use fw_common::{
    ACTION_ALLOW, Bytes, CONFIG_ENTRIES, ClassValue, DirectionConfig, Ipv4LpmKey, Ipv6LpmKey,
    L4_CLASS_BUCKET_SLOTS, L4_CLASS_BUCKETS, L4_CLASS_FILTER_BITS, L4_CLASS_FILTER_CHUNKS,
    L4_CLASS_TABLE_CHUNKS, L4_CLASS_TABLE_ENTRIES, L4_CLASS_TABLE_HEADER,
    L4_CLASS_TABLE_INCOMPLETE, L4_PORT_CHUNKS, L4_PORT_SLOTS, L4ClassFilterChunk,
    L4ClassTableChunk, L4LpmKey, L4PortChunk, L4Value, V4_DIR_L2_BASE, V4_DIR_POOL_CHUNKS,
    V4_DIR_SLOTS, V4Dir1Chunk, V4Dir1Slot, V4DirChunk, WorkloadKey, WorkloadValue,
    l4_class_bucket_at, l4_class_buckets, l4_class_filter_at, l4_class_filter_entry,
    l4_class_table_entry, l4_port_mirror, maps,
};
use fw_compiler::encode::{Encoded, Entries};
use fw_compiler::mapstate::Capacities;

use crate::Error;
use crate::class_table::{self, ClassTable};

/// `BPF_F_NO_PREALLOC`: the kernel requires it for LPM tries (and the templates set it).
const BPF_F_NO_PREALLOC: u32 = 1;

/// The size of a hash delta from which it is written, and checked, on a thread of its own while
/// the other maps are (a full load at 100k prefixes writes 50k entries into the ingress IPv4
/// hash); smaller ones, the one-rule changes above all, do not pay for a thread.
const PARALLEL_ENTRIES: usize = 4096;

/// The capacity a new generation's ingress IPv4 hash starts with (or the table's capacity,
/// when smaller). The hash is preallocated (see [`prefix_hash`]), so its capacity is memory
/// whatever the policy holds: about 80 bytes an element with its bucket, 5 MiB per generation
/// here, where the whole table's capacity (`Capacities::v4_prefixes`, 262,144 by default)
/// would be 20 MiB. A write whose probed prefixes do not fit gets a bigger generation (see
/// `Dataplane::apply`), as a table that outgrows its capacity does.
pub(crate) const V4_HASH_FIRST: u32 = 1 << 16;

/// The capacity a new generation's hash of IPv4 chunks starts with: the 256 first-level chunks
/// and 768 second-level ones (about 3 MiB per generation, preallocated: see [`dir_hash`]). The
/// benchmarks' 100k prefixes need 647 chunks, 1M 4,163; a state with more gets a bigger
/// generation, as one whose probed prefixes outgrow [`V4_HASH_FIRST`] does.
pub(crate) const DIR_HASH_FIRST: u32 = 1 << 10;

/// The inner maps of one generation.
pub(crate) struct GenerationMaps {
    /// A hash, not an LPM trie: see `fw_common::maps::INGRESS_V4`.
    pub in_v4: HashMap<MapData, Ipv4LpmKey, ClassValue>,
    /// The ingress IPv4 table's direct-indexed chunks: see `fw_common::maps::INGRESS_V4_DIR`.
    pub in_v4_dir: HashMap<MapData, u32, V4DirChunk>,
    /// `in_v4_dir`'s chunks as the arrays the program reads: the first level (keys 0..=255,
    /// `fw_common::maps::INGRESS_V4_DIR1`) and the pool of second-level chunks
    /// (`fw_common::maps::INGRESS_V4_DIR2`). Written with `in_v4_dir`, never on its own.
    pub in_v4_dir1: V4DirArrays,
    pub in_v6: LpmTrie<MapData, [u8; 16], ClassValue>,
    pub in_l4: LpmTrie<MapData, [u8; 12], L4Value>,
    /// The ingress L4 entries of whole-word prefixes: see `fw_common::maps::INGRESS_L4_EXACT`.
    pub in_l4x: HashMap<MapData, L4LpmKey, L4Value>,
    /// `in_l4x`'s shared TCP and UDP port entries as an array the program reads: see
    /// `fw_common::maps::INGRESS_L4_PORTS`. Written with `in_l4x`, never on its own.
    pub in_l4p: Array<MapData, L4PortChunk>,
    /// Which (class, protocol) pairs `in_l4x` may hold: see
    /// `fw_common::maps::INGRESS_L4_CLASSES`. Written with `in_l4x`, never on its own.
    pub in_l4c: Array<MapData, L4ClassFilterChunk>,
    /// `in_l4x`'s address-class entries as a cuckoo table the program reads: see
    /// `fw_common::maps::INGRESS_L4_CLASS_TABLE`. Written with `in_l4x`, never on its own.
    pub in_l4k: Array<MapData, L4ClassTableChunk>,
    pub eg_v4: LpmTrie<MapData, [u8; 4], ClassValue>,
    pub eg_v6: LpmTrie<MapData, [u8; 16], ClassValue>,
    pub eg_l4: LpmTrie<MapData, [u8; 12], L4Value>,
    pub config: Array<MapData, DirectionConfig>,
    pub workloads: HashMap<MapData, WorkloadKey, WorkloadValue>,
    /// The capacities these maps were created with (read back from the kernel when adopted).
    pub caps: Capacities,
    /// `in_v4`'s own capacity: it holds only the probed prefixes, and is preallocated, so it
    /// starts smaller than `caps.v4_prefixes` ([`V4_HASH_FIRST`]) and grows when they do not
    /// fit.
    pub v4_hash: u32,
    /// How many entries `in_v4` holds at most, as far as this process's writes tell (`None`:
    /// not known, for an adopted generation): checked against `v4_hash` before a delta is
    /// written, so a delta that would fill the hash is refused before anything is written.
    pub v4_hash_len: Option<usize>,
    /// `in_v4_dir`'s capacity: preallocated, so it starts at [`DIR_HASH_FIRST`] chunks and
    /// grows when a state has more.
    pub dir_hash: u32,
    /// The ingress IPv4 prefixes the program never probes, which `in_v4` does not hold: a
    /// loader-only record no program sees (see the `v4rest` module). `None`: none written
    /// yet (a fresh generation, one written by a loader that kept every prefix in the hash).
    pub in_v4_rest: Option<MapData>,
    /// Set when a read-back found a prefix in the wrong one of `in_v4` and `in_v4_rest` (or
    /// in both): the next write re-sorts the whole table.
    pub v4_unsorted: std::sync::atomic::AtomicBool,
    /// What the last delta written here did to `in_v4` and `in_v4_rest` (`None`: nothing),
    /// which a replay of the same delta onto the same state does again.
    pub last_v4: Option<crate::v4rest::V4Plan>,
    /// This generation's index (names the record).
    pub generation: u32,
}

/// How many entries a write changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Entries written (inserted or overwritten).
    pub written: usize,
    /// Stale entries deleted.
    pub deleted: usize,
}

impl std::ops::AddAssign for WriteStats {
    fn add_assign(&mut self, o: Self) {
        self.written += o.written;
        self.deleted += o.deleted;
    }
}

/// Creates one inner map. `name` is what bpftool shows ("FW_IN_V4.g0").
pub(crate) fn create(
    name: &str,
    map_type: bpf_map_type,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    flags: u32,
) -> Result<Map, Error> {
    let obj = aya_obj::Map::new_from_params(
        map_type as u32,
        key_size as u32,
        value_size as u32,
        max_entries,
        flags,
    );
    let data = MapData::create(obj, name, None).map_err(Error::map(name))?;
    Map::from_map_data(data).map_err(Error::map(name))
}

fn lpm<K: Pod, V: Pod>(name: &str, max_entries: u32) -> Result<LpmTrie<MapData, K, V>, Error> {
    let map = create(
        name,
        bpf_map_type::BPF_MAP_TYPE_LPM_TRIE,
        size_of::<Key<K>>(),
        size_of::<V>(),
        max_entries,
        BPF_F_NO_PREALLOC,
    )?;
    LpmTrie::try_from(map).map_err(Error::map(name))
}

/// The ingress IPv4 table: a hash of (prefix length, masked address) -> classes, with the
/// flags of the kernel object's template: none, so the kernel preallocates all `max_entries`
/// elements here and a full write takes them from its free list rather than allocating each
/// (the cost of a full load is mostly these inserts, in both generations; about 0.2 µs an
/// insert against 0.6 µs allocated).
fn prefix_hash(
    name: &str,
    max_entries: u32,
) -> Result<HashMap<MapData, Ipv4LpmKey, ClassValue>, Error> {
    let map = create(
        name,
        bpf_map_type::BPF_MAP_TYPE_HASH,
        size_of::<Ipv4LpmKey>(),
        size_of::<ClassValue>(),
        max_entries,
        0,
    )?;
    HashMap::try_from(map).map_err(Error::map(name))
}

/// The ingress IPv4 table's chunks: a hash of chunk key -> 256 slots with room for
/// `max_entries` chunks, preallocated like [`prefix_hash`] (the kernel object's template has
/// no flags either): an insert of a 3 KiB chunk takes an element from the free list instead
/// of allocating one, about 10 µs a chunk with `BPF_F_NO_PREALLOC`, most of the chunks'
/// share of a 100k-prefix write.
fn dir_hash(name: &str, max_entries: u32) -> Result<HashMap<MapData, u32, V4DirChunk>, Error> {
    let map = create(
        name,
        bpf_map_type::BPF_MAP_TYPE_HASH,
        size_of::<u32>(),
        size_of::<V4DirChunk>(),
        max_entries,
        0,
    )?;
    HashMap::try_from(map).map_err(Error::map(name))
}

/// A derived inner array of `entries` values of `V`: the first level of the IPv4 chunks
/// (`V4_DIR_L2_BASE` chunks), the pool of second-level chunks (`V4_DIR_POOL_CHUNKS`), the L4
/// port array (`L4_PORT_CHUNKS`) or the class filter
/// (`L4_CLASS_FILTER_CHUNKS`). An inner array must have its template's size, which the kernel
/// object declares with those counts.
fn inner_array<V: Pod>(name: &str, entries: u32) -> Result<Array<MapData, V>, Error> {
    let map = create(
        name,
        bpf_map_type::BPF_MAP_TYPE_ARRAY,
        size_of::<u32>(),
        size_of::<V>(),
        entries,
        0,
    )?;
    Array::try_from(map).map_err(Error::map(name))
}

/// The ingress L4 exact table: a hash of `L4LpmKey` -> `L4Value` (`BPF_F_NO_PREALLOC`).
fn l4_hash(name: &str, max_entries: u32) -> Result<HashMap<MapData, L4LpmKey, L4Value>, Error> {
    let map = create(
        name,
        bpf_map_type::BPF_MAP_TYPE_HASH,
        size_of::<L4LpmKey>(),
        size_of::<L4Value>(),
        max_entries,
        BPF_F_NO_PREALLOC,
    )?;
    HashMap::try_from(map).map_err(Error::map(name))
}

impl GenerationMaps {
    /// Creates the empty inner maps of generation `generation`, the ingress IPv4 hash with
    /// room for `v4_hash` entries (see [`V4_HASH_FIRST`]) and the hash of its chunks with room
    /// for `dir_hash` ([`DIR_HASH_FIRST`]).
    pub fn create(
        generation: u32,
        caps: &Capacities,
        v4_hash: u32,
        dir_hash: u32,
    ) -> Result<Self, Error> {
        let name = |outer: &str| format!("{outer}.g{generation}");
        let config_name = name(maps::CONFIG);
        let config = create(
            &config_name,
            bpf_map_type::BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<DirectionConfig>(),
            CONFIG_ENTRIES,
            0,
        )?;
        let workloads_name = name(maps::WORKLOADS);
        let workloads = create(
            &workloads_name,
            bpf_map_type::BPF_MAP_TYPE_HASH,
            size_of::<WorkloadKey>(),
            size_of::<WorkloadValue>(),
            caps.workloads,
            0,
        )?;
        Ok(Self {
            in_v4: prefix_hash(&name(maps::INGRESS_V4), v4_hash)?,
            in_v4_dir: self::dir_hash(&name(maps::INGRESS_V4_DIR), dir_hash)?,
            in_v4_dir1: V4DirArrays::new(
                inner_array(&name(maps::INGRESS_V4_DIR1), V4_DIR_L2_BASE)?,
                inner_array(&name(maps::INGRESS_V4_DIR2), V4_DIR_POOL_CHUNKS)?,
            ),
            in_v6: lpm(&name(maps::INGRESS_V6), caps.v6_prefixes)?,
            in_l4: lpm(&name(maps::INGRESS_L4), caps.l4_entries)?,
            in_l4x: l4_hash(&name(maps::INGRESS_L4_EXACT), caps.l4_entries)?,
            in_l4p: inner_array(&name(maps::INGRESS_L4_PORTS), L4_PORT_CHUNKS)?,
            in_l4c: inner_array(&name(maps::INGRESS_L4_CLASSES), L4_CLASS_FILTER_CHUNKS)?,
            in_l4k: inner_array(&name(maps::INGRESS_L4_CLASS_TABLE), L4_CLASS_TABLE_ENTRIES)?,
            eg_v4: lpm(&name(maps::EGRESS_V4), caps.v4_prefixes)?,
            eg_v6: lpm(&name(maps::EGRESS_V6), caps.v6_prefixes)?,
            eg_l4: lpm(&name(maps::EGRESS_L4), caps.l4_entries)?,
            config: Array::try_from(config).map_err(Error::map(config_name))?,
            workloads: HashMap::try_from(workloads).map_err(Error::map(workloads_name))?,
            caps: *caps,
            v4_hash,
            v4_hash_len: Some(0),
            dir_hash,
            in_v4_rest: None,
            v4_unsorted: Default::default(),
            last_v4: None,
            generation,
        })
    }

    /// Makes every map but `FW_WORKLOADS` hold exactly the encoded entries. The caller has
    /// validated `encoded` (`fw_compiler::encode::decode`), so every key and value parses.
    pub fn write(&mut self, encoded: &Encoded) -> Result<WriteStats, Error> {
        let mut stats = WriteStats::default();
        for (&name, entries) in &encoded.maps {
            stats += match name {
                maps::INGRESS_V4 => {
                    // The probed prefixes into the hash, the others into the record.
                    let plan = self.plan_v4_full(encoded)?;
                    let held = self.v4_hash_after(&plan)?;
                    // Not known should the write fail halfway.
                    self.v4_hash_len = None;
                    self.batch_delta(name, &plan.hash)?;
                    self.write_rest(&plan)?;
                    self.v4_unsorted.store(false, std::sync::atomic::Ordering::Relaxed);
                    self.v4_hash_len = Some(held);
                    WriteStats { written: entries.len(), deleted: plan.hash.remove.len() }
                }
                maps::INGRESS_V4_DIR => {
                    sync_dir(&mut self.in_v4_dir, &mut self.in_v4_dir1, name, entries)?
                }
                maps::INGRESS_V6 => {
                    let present = read_lpm(&self.in_v6, name, v6_key_bytes)?;
                    self.sync_batched(name, entries, present)?
                }
                maps::INGRESS_L4 => {
                    let present = read_lpm(&self.in_l4, name, l4_key_bytes)?;
                    self.sync_batched(name, entries, present)?
                }
                maps::INGRESS_L4_EXACT => {
                    let (x, p, c, k) =
                        (&mut self.in_l4x, &mut self.in_l4p, &mut self.in_l4c, &mut self.in_l4k);
                    sync_l4x(x, p, c, k, name, entries)?
                }
                maps::EGRESS_V4 => {
                    let present = read_lpm(&self.eg_v4, name, v4_key_bytes)?;
                    self.sync_batched(name, entries, present)?
                }
                maps::EGRESS_V6 => {
                    let present = read_lpm(&self.eg_v6, name, v6_key_bytes)?;
                    self.sync_batched(name, entries, present)?
                }
                maps::EGRESS_L4 => {
                    let present = read_lpm(&self.eg_l4, name, l4_key_bytes)?;
                    self.sync_batched(name, entries, present)?
                }
                maps::CONFIG => self.write_config(entries)?,
                // Keyed by cgroup path until the daemon resolves paths to cgroup ids; see
                // `Dataplane::write_workloads`.
                maps::WORKLOADS => WriteStats::default(),
                other => return Err(Error::UnknownMap(other.to_string())),
            };
        }
        Ok(stats)
    }

    /// Sets every config index: the encoded value, or all zeros (which the programs treat as
    /// a broken config) for an index the state does not give.
    fn write_config(&mut self, entries: &Entries) -> Result<WriteStats, Error> {
        let name = maps::CONFIG;
        let mut given = BTreeMap::new();
        for (k, v) in entries {
            let index = <[u8; 4]>::try_from(k)
                .map(u32::from_le_bytes)
                .map_err(|_| Error::Entry { map: name, reason: "config key is not 4 bytes" })?;
            let value = DirectionConfig::from_bytes(v)
                .ok_or(Error::Entry { map: name, reason: "config value of the wrong size" })?;
            given.insert(index, value);
        }
        for index in 0..CONFIG_ENTRIES {
            let value = given.get(&index).copied().unwrap_or_default();
            self.config.set(index, value, 0).map_err(Error::map(name))?;
        }
        Ok(WriteStats { written: CONFIG_ENTRIES as usize, deleted: 0 })
    }

    /// Makes the workload table hold exactly `entries` (cgroup id -> workload class).
    pub fn write_workloads(&mut self, entries: &BTreeMap<u64, u32>) -> Result<WriteStats, Error> {
        let name = maps::WORKLOADS;
        let present: Vec<WorkloadKey> =
            self.workloads.keys().collect::<Result<_, _>>().map_err(Error::map(name))?;
        let mut stats = WriteStats::default();
        for key in present.iter().filter(|k| !entries.contains_key(&k.cgroup_id)) {
            self.workloads.remove(key).map_err(Error::map(name))?;
            stats.deleted += 1;
        }
        for (&cgroup_id, &workload) in entries {
            let (key, value) = (WorkloadKey { cgroup_id }, WorkloadValue { workload });
            self.workloads.insert(key, value, 0).map_err(Error::map(name))?;
            stats.written += 1;
        }
        Ok(stats)
    }

    /// What [`read`](Self::read) returns for maps just created: every map empty but the
    /// config, an array, whose entries are all zeros.
    pub fn fresh_state() -> Encoded {
        let mut config = Entries::with_capacity(CONFIG_ENTRIES as usize);
        let zero = DirectionConfig::default().to_bytes();
        for index in 0..CONFIG_ENTRIES {
            config.push(&index.to_le_bytes(), &zero);
        }
        let maps = maps::GENERATIONAL
            .into_iter()
            .filter(|&n| n != maps::WORKLOADS)
            .map(|n| (n, if n == maps::CONFIG { config.clone() } else { Entries::new() }))
            .collect();
        Encoded { maps }
    }

    /// Reads every map but `FW_WORKLOADS` back in `encode`'s format (entries sorted by key
    /// bytes), so a write can be verified by comparing with what was written.
    pub fn read(&self) -> Result<Encoded, Error> {
        let mut out = BTreeMap::new();
        let dir = read_dir(&self.in_v4_dir, &self.in_v4_dir1, maps::INGRESS_V4_DIR)?;
        out.insert(maps::INGRESS_V4, self.read_v4(&dir)?);
        out.insert(maps::INGRESS_V4_DIR, dir);
        out.insert(maps::INGRESS_V6, read_lpm(&self.in_v6, maps::INGRESS_V6, v6_key_bytes)?);
        out.insert(maps::INGRESS_L4, read_lpm(&self.in_l4, maps::INGRESS_L4, l4_key_bytes)?);
        out.insert(
            maps::INGRESS_L4_EXACT,
            read_l4x(&self.in_l4x, &self.in_l4p, &self.in_l4c, &self.in_l4k)?,
        );
        out.insert(maps::EGRESS_V4, read_lpm(&self.eg_v4, maps::EGRESS_V4, v4_key_bytes)?);
        out.insert(maps::EGRESS_V6, read_lpm(&self.eg_v6, maps::EGRESS_V6, v6_key_bytes)?);
        out.insert(maps::EGRESS_L4, read_lpm(&self.eg_l4, maps::EGRESS_L4, l4_key_bytes)?);
        out.insert(maps::CONFIG, self.read_map(maps::CONFIG)?);
        Ok(Encoded { maps: out })
    }
}

/// The port array's chunks for the exact hash's `entries` (`fw_common::l4_port_mirror`).
fn port_chunks<'a>(entries: impl Iterator<Item = (&'a L4LpmKey, &'a L4Value)>) -> Vec<L4PortChunk> {
    let mut chunks = vec![L4PortChunk::default(); L4_PORT_CHUNKS as usize];
    for (key, value) in entries {
        if let Some((chunk, slot)) = l4_port_mirror(key, value) {
            chunks[chunk as usize].slots[slot] = *value;
        }
    }
    chunks
}

/// The class filter's chunks for the exact hash's keys: exactly the bits its class entries
/// need (`fw_common::l4_class_filter_entry`).
fn class_filter_chunks<'a>(keys: impl Iterator<Item = &'a L4LpmKey>) -> Vec<L4ClassFilterChunk> {
    let mut chunks = vec![L4ClassFilterChunk::default(); L4_CLASS_FILTER_CHUNKS as usize];
    for key in keys {
        if let Some(bit) = l4_class_filter_entry(key) {
            let (chunk, word, mask) = l4_class_filter_at(bit);
            chunks[chunk as usize].words[word] |= mask;
        }
    }
    chunks
}

/// The class filter's bits that writing `d` into the exact hash sets (those of the entries
/// it writes), by chunk as (word, mask).
fn class_filter_delta(
    name: &'static str,
    d: &MapDelta,
) -> Result<BTreeMap<u32, Vec<(usize, u64)>>, Error> {
    let mut out: BTreeMap<u32, Vec<(usize, u64)>> = BTreeMap::new();
    for ((_, key), _) in parse_entries::<L4LpmKey, L4LpmKey, L4Value>(name, &d.upsert, |k| (0, k))?
    {
        if let Some(bit) = l4_class_filter_entry(&key) {
            let (chunk, word, mask) = l4_class_filter_at(bit);
            out.entry(chunk).or_default().push((word, mask));
        }
    }
    Ok(out)
}

/// The port array's chunk and slot for an exact hash key whatever its value: where the entry
/// is mirrored when it has a decision (and a zero slot when it has none).
fn port_slot(key: &L4LpmKey) -> Option<(u32, usize)> {
    let decided = L4Value { verdict_action: ACTION_ALLOW, ..L4Value::default() };
    l4_port_mirror(key, &decided)
}

/// Makes the L4 exact hash hold exactly `entries`, and the port array exactly its mirrored
/// entries (every chunk is written: 512 writes of 7 KiB).
fn sync_l4x(
    map: &mut HashMap<MapData, L4LpmKey, L4Value>,
    ports: &mut Array<MapData, L4PortChunk>,
    filter: &mut Array<MapData, L4ClassFilterChunk>,
    table: &mut Array<MapData, L4ClassTableChunk>,
    name: &'static str,
    entries: &Entries,
) -> Result<WriteStats, Error> {
    let desired: Vec<(L4LpmKey, L4Value)> = parse_entries(name, entries, |k: L4LpmKey| (0, k))?
        .into_iter()
        .map(|((_, k), v)| (k, v))
        .collect();
    let wanted: BTreeSet<[u8; 16]> = desired.iter().map(|(k, _)| k.to_bytes()).collect();
    let remove = read_hash(map, name)?
        .iter()
        .filter(|(k, _)| <[u8; 16]>::try_from(*k).is_ok_and(|k| !wanted.contains(&k)))
        .map(|(k, _)| k.to_vec())
        .collect();
    let d = MapDelta { upsert: entries.clone(), remove };
    let (fd, key_size, value_size) =
        (map.map().fd().as_fd(), size_of::<L4LpmKey>(), size_of::<L4Value>());
    let stats = batch_write(fd, name, key_size, value_size, &d)?;
    for (index, chunk) in (0..).zip(port_chunks(desired.iter().map(|(k, v)| (k, v)))) {
        ports.set(index, chunk, 0).map_err(Error::map(maps::INGRESS_L4_PORTS))?;
    }
    for (index, chunk) in (0..).zip(class_filter_chunks(desired.iter().map(|(k, _)| k))) {
        filter.set(index, chunk, 0).map_err(Error::map(maps::INGRESS_L4_CLASSES))?;
    }
    let built = ClassTable::build(class_table_entries(desired.iter().map(|(k, v)| (k, v))));
    write_class_table(table, &built)?;
    Ok(stats)
}

/// A delta's keys and entries as the contiguous buffers a batch takes.
struct Packed {
    removed: Vec<u8>,
    keys: Vec<u8>,
    values: Vec<u8>,
}

/// `d`'s keys and entries as the contiguous buffers a batch takes (keys of `key_size` bytes,
/// values of `value_size`). An entry of another size is refused before anything is written.
fn packed(
    name: &'static str,
    d: &MapDelta,
    key_size: usize,
    value_size: usize,
) -> Result<Packed, Error> {
    let key_err = Error::Entry { map: name, reason: "key size" };
    let mut removed = Vec::with_capacity(d.remove.len() * key_size);
    for k in &d.remove {
        if k.len() != key_size {
            return Err(key_err);
        }
        removed.extend_from_slice(k);
    }
    let mut keys = Vec::with_capacity(d.upsert.len() * key_size);
    let mut values = Vec::with_capacity(d.upsert.len() * value_size);
    for (k, v) in &d.upsert {
        if k.len() != key_size {
            return Err(key_err);
        }
        if v.len() != value_size {
            return Err(Error::Entry { map: name, reason: "value size" });
        }
        keys.extend_from_slice(k);
        values.extend_from_slice(v);
    }
    Ok(Packed { removed, keys, values })
}

/// Writes `d` into the map behind `fd` with one delete batch and one update batch (the
/// encoded keys and values are the kernel's bytes): the removed keys first, then the upserts.
fn batch_write(
    fd: BorrowedFd<'_>,
    name: &'static str,
    key_size: usize,
    value_size: usize,
    d: &MapDelta,
) -> Result<WriteStats, Error> {
    let Packed { removed, keys, values } = packed(name, d, key_size, value_size)?;
    let deleted = crate::batch::delete(fd, key_size, &removed).map_err(Error::batch(name))?;
    let written = crate::batch::update(fd, key_size, value_size, &keys, &values)
        .map_err(Error::batch(name))?;
    Ok(WriteStats { written, deleted })
}

/// The class table's entries among the exact hash's (`fw_common::l4_class_table_entry`).
fn class_table_entries<'a>(
    entries: impl Iterator<Item = (&'a L4LpmKey, &'a L4Value)>,
) -> impl Iterator<Item = (u32, u32, L4Value)> {
    entries.filter_map(|(k, v)| l4_class_table_entry(k).map(|(class, word)| (class, word, *v)))
}

/// Writes the class table's changed chunks, then its header (a table that became
/// incomplete is marked so; the program is not reading this generation).
fn write_class_table(
    map: &mut Array<MapData, L4ClassTableChunk>,
    table: &ClassTable,
) -> Result<(), Error> {
    let name = maps::INGRESS_L4_CLASS_TABLE;
    for (index, chunk) in table.dirty() {
        map.set(index, *chunk, 0).map_err(Error::map(name))?;
    }
    map.set(L4_CLASS_TABLE_HEADER, table.header(), 0).map_err(Error::map(name))
}

/// The port array's slots that writing `d` into the exact hash changes, with their new
/// values (zeros for a removed entry or one without a decision), by chunk.
fn port_delta(
    name: &'static str,
    d: &MapDelta,
) -> Result<BTreeMap<u32, Vec<(usize, L4Value)>>, Error> {
    let mut out: BTreeMap<u32, Vec<(usize, L4Value)>> = BTreeMap::new();
    for k in &d.remove {
        let key = L4LpmKey::from_bytes(k).ok_or(Error::Entry { map: name, reason: "key size" })?;
        if let Some((chunk, slot)) = port_slot(&key) {
            out.entry(chunk).or_default().push((slot, L4Value::default()));
        }
    }
    for ((_, key), value) in
        parse_entries::<L4LpmKey, L4LpmKey, L4Value>(name, &d.upsert, |k| (0, k))?
    {
        if let Some((chunk, slot)) = port_slot(&key) {
            let mirrored = l4_port_mirror(&key, &value).map_or_else(L4Value::default, |_| value);
            out.entry(chunk).or_default().push((slot, mirrored));
        }
    }
    Ok(out)
}

/// Writes only `d` into the L4 exact hash, and the slots it changes into the port array (each
/// chunk touched is read, patched and written whole). The class filter's bits of the entries
/// written are set first (a chunk read, patched and written when it changes); the bits of the
/// entries removed stay, since other entries may share them (a stale bit costs a hash call,
/// a clear bit that an entry needs would hide it).
fn l4x_delta(
    map: &mut HashMap<MapData, L4LpmKey, L4Value>,
    ports: &mut Array<MapData, L4PortChunk>,
    filter: &mut Array<MapData, L4ClassFilterChunk>,
    table: &mut Array<MapData, L4ClassTableChunk>,
    name: &'static str,
    d: &MapDelta,
) -> Result<WriteStats, Error> {
    let mut stats = WriteStats::default();
    class_table_delta(table, name, d)?;
    let filter_name = maps::INGRESS_L4_CLASSES;
    for (index, bits) in class_filter_delta(name, d)? {
        let mut chunk = filter.get(&index, 0).map_err(Error::map(filter_name))?;
        let before = chunk;
        for (word, mask) in bits {
            chunk.words[word] |= mask;
        }
        if chunk != before {
            filter.set(index, chunk, 0).map_err(Error::map(filter_name))?;
        }
    }
    let (fd, key_size, value_size) =
        (map.map().fd().as_fd(), size_of::<L4LpmKey>(), size_of::<L4Value>());
    stats += batch_write(fd, name, key_size, value_size, d)?;
    let ports_name = maps::INGRESS_L4_PORTS;
    for (index, slots) in port_delta(name, d)? {
        let mut chunk = ports.get(&index, 0).map_err(Error::map(ports_name))?;
        for (slot, value) in slots {
            chunk.slots[slot] = value;
        }
        ports.set(index, chunk, 0).map_err(Error::map(ports_name))?;
    }
    Ok(stats)
}

/// Moves the class table's entries as writing `d` into the exact hash does: removes the
/// class entries it removes, then places those it writes (reading only the chunks it
/// touches). When an entry finds no place, the header marks the table incomplete and the
/// program asks the hash until the next full write.
fn class_table_delta(
    map: &mut Array<MapData, L4ClassTableChunk>,
    name: &'static str,
    d: &MapDelta,
) -> Result<(), Error> {
    let table_name = maps::INGRESS_L4_CLASS_TABLE;
    let header = map.get(&L4_CLASS_TABLE_HEADER, 0).map_err(Error::map(table_name))?;
    let mut table = ClassTable::lazy(&header);
    if !table.complete() {
        return Ok(());
    }
    let read = |index: u32| map.get(&index, 0).map_err(Error::map(table_name));
    for k in &d.remove {
        let key = L4LpmKey::from_bytes(k).ok_or(Error::Entry { map: name, reason: "key size" })?;
        if let Some((class, word)) = l4_class_table_entry(&key) {
            table.remove(class, word, read)?;
        }
    }
    for ((_, key), value) in
        parse_entries::<L4LpmKey, L4LpmKey, L4Value>(name, &d.upsert, |k| (0, k))?
    {
        if let Some((class, word)) = l4_class_table_entry(&key)
            && !table.insert(class, word, value, read)?
        {
            break;
        }
    }
    if table.complete() {
        for (index, chunk) in table.dirty() {
            map.set(index, *chunk, 0).map_err(Error::map(table_name))?;
        }
        Ok(())
    } else {
        map.set(L4_CLASS_TABLE_HEADER, table.header(), 0).map_err(Error::map(table_name))
    }
}

/// Reads the L4 exact hash back (`encode`'s format, sorted by key bytes), checking that the
/// port array holds exactly the hash's mirrored entries (zeros everywhere else) and that the
/// class filter has every bit the hash's class entries need (it may hold more: see
/// `l4x_delta`).
fn read_l4x(
    map: &HashMap<MapData, L4LpmKey, L4Value>,
    ports: &Array<MapData, L4PortChunk>,
    filter: &Array<MapData, L4ClassFilterChunk>,
    table: &Array<MapData, L4ClassTableChunk>,
) -> Result<Entries, Error> {
    let (name, ports_name) = (maps::INGRESS_L4_EXACT, maps::INGRESS_L4_PORTS);
    let mut held = Vec::new();
    for (k, v) in read_hash(map, name)?.iter() {
        let key = L4LpmKey::from_bytes(k).ok_or(Error::Entry { map: name, reason: "key size" })?;
        let value =
            L4Value::from_bytes(v).ok_or(Error::Entry { map: name, reason: "value size" })?;
        held.push((key, value));
    }
    for (index, want) in (0..).zip(port_chunks(held.iter().map(|(k, v)| (k, v)))) {
        if ports.get(&index, 0).map_err(Error::map(ports_name))? != want {
            return Err(Error::VerifyFailed(ports_name));
        }
    }
    let filter_name = maps::INGRESS_L4_CLASSES;
    for (index, want) in (0..).zip(class_filter_chunks(held.iter().map(|(k, _)| k))) {
        let chunk = filter.get(&index, 0).map_err(Error::map(filter_name))?;
        if chunk.words.iter().zip(want.words).any(|(held, want)| held & want != want) {
            return Err(Error::VerifyFailed(filter_name));
        }
    }
    let table_name = maps::INGRESS_L4_CLASS_TABLE;
    let get = |index: u32| table.get(&index, 0).map_err(Error::map(table_name));
    let header = get(L4_CLASS_TABLE_HEADER)?;
    let chunks = (0..L4_CLASS_TABLE_CHUNKS).map(get).collect::<Result<Vec<_>, _>>()?;
    let expected = class_table_entries(held.iter().map(|(k, v)| (k, v)))
        .map(|(class, word, value)| ((class, word), value))
        .collect();
    if !class_table::holds_exactly(&header, &chunks, &expected) {
        return Err(Error::VerifyFailed(table_name));
    }
    let mut entries = Entries::with_capacity(held.len());
    for (key, value) in &held {
        entries.push(key.to_bytes().as_ref(), value.to_bytes().as_ref());
    }
    Ok(entries)
}

/// The chunk key and chunk of each entry.
fn dir_entries(name: &'static str, e: &Entries) -> Result<Vec<(u32, V4DirChunk)>, Error> {
    e.iter()
        .map(|(k, v)| {
            let key = <[u8; 4]>::try_from(k)
                .map(u32::from_le_bytes)
                .map_err(|_| Error::Entry { map: name, reason: "key size" })?;
            let value = V4DirChunk::from_bytes(v)
                .ok_or(Error::Entry { map: name, reason: "value size" })?;
            Ok((key, value))
        })
        .collect()
}

/// Makes the chunk hash hold exactly `entries` (see [`write_dir`]).
fn sync_dir(
    map: &mut HashMap<MapData, u32, V4DirChunk>,
    level1: &mut V4DirArrays,
    name: &'static str,
    entries: &Entries,
) -> Result<WriteStats, Error> {
    let present: Vec<u32> = map.keys().collect::<Result<_, _>>().map_err(Error::map(name))?;
    let mut upsert = entries.clone();
    upsert.sort();
    let remove = present
        .into_iter()
        .map(u32::to_le_bytes)
        .filter(|k| upsert.binary_search(k).is_err())
        .map(|k| k.to_vec())
        .collect();
    write_dir(map, level1, name, &MapDelta { upsert, remove })
}

/// Writes `d` into the chunk hash and mirrors it into the arrays, a batch per map and
/// command: the hash's deletes and updates, then the pool's chunks, then the first-level
/// chunks with their pool references ([`V4DirArrays::write`]). Entry by entry this was four
/// syscalls of 3-4 KiB per second-level chunk, about 7 ms of a 100k-prefix write.
fn write_dir(
    map: &mut HashMap<MapData, u32, V4DirChunk>,
    arrays: &mut V4DirArrays,
    name: &'static str,
    d: &MapDelta,
) -> Result<WriteStats, Error> {
    let remove = d
        .remove
        .iter()
        .map(|k| {
            <[u8; 4]>::try_from(k.as_slice())
                .map(u32::from_le_bytes)
                .map_err(|_| Error::Entry { map: name, reason: "key size" })
        })
        .collect::<Result<Vec<u32>, Error>>()?;
    let upsert = dir_entries(name, &d.upsert)?;
    let stats = batch_write(map.map().fd().as_fd(), name, 4, size_of::<V4DirChunk>(), d)?;
    arrays.write(&remove, &upsert)?;
    Ok(stats)
}

/// The arrays the program reads `FW_IN_V4_DIR`'s chunks from (see
/// `fw_common::maps::INGRESS_V4_DIR1` and `INGRESS_V4_DIR2`), and which pool slot holds which
/// /16's second-level chunk.
pub(crate) struct V4DirArrays {
    /// The first level, each slot with its /16's pool reference (`V4Dir1Slot::pool`).
    pub level1: Array<MapData, V4Dir1Chunk>,
    /// The pool of second-level chunks.
    pub pool: Array<MapData, V4DirChunk>,
    /// The pool's allocation as this process wrote it; `None` when not known (maps adopted
    /// from another process, or a write failed half-way): then it is read back from the
    /// first-level array before the next write.
    alloc: Option<PoolAlloc>,
    /// Pool slots from this index on are never allocated (`V4_DIR_POOL_CHUNKS` unless a test
    /// or a measurement asks for a smaller pool, [`V4DirArrays::limit_pool`]).
    limit: u32,
}

/// Which pool slot holds which /16's second-level chunk.
#[derive(Debug, Default)]
struct PoolAlloc {
    /// /16 (the address's top 16 bits) -> pool index.
    slots: BTreeMap<u32, u32>,
    /// Pool indexes no /16 uses, the lowest allocated first.
    free: BTreeSet<u32>,
}

impl PoolAlloc {
    /// The allocation the first-level array's pool references describe. A reference past the
    /// pool, or to a slot another /16 already has, is not taken as an allocation (reading the
    /// generation back refuses such an array; the next write of that /16 corrects it).
    fn read(level1: &Array<MapData, V4Dir1Chunk>) -> Result<Self, Error> {
        let name = maps::INGRESS_V4_DIR1;
        let mut alloc =
            PoolAlloc { slots: BTreeMap::new(), free: (0..V4_DIR_POOL_CHUNKS).collect() };
        // One batched read of the whole array (1 MiB) instead of 256 lookups.
        let size = V4Dir1Chunk::SIZE;
        let (keys, values, _) = crate::batch::lookup_all(level1.map().fd().as_fd(), 4, size)
            .map_err(Error::batch(name))?;
        for (key, value) in keys.chunks_exact(4).zip(values.chunks_exact(size)) {
            let key = <[u8; 4]>::try_from(key).map(u32::from_le_bytes);
            let (Ok(key), Some(chunk)) = (key, V4Dir1Chunk::from_bytes(value)) else {
                return Err(Error::Entry { map: name, reason: "size" });
            };
            for (s, slot) in chunk.slots.iter().enumerate() {
                let index = slot.pool.wrapping_sub(1);
                if slot.pool != 0 && alloc.free.remove(&index) {
                    alloc.slots.insert(key << 8 | s as u32, index);
                }
            }
        }
        Ok(alloc)
    }
}

impl V4DirArrays {
    fn new(level1: Array<MapData, V4Dir1Chunk>, pool: Array<MapData, V4DirChunk>) -> Self {
        Self { level1, pool, alloc: None, limit: V4_DIR_POOL_CHUNKS }
    }

    /// Allocates no pool slot from index `chunks` on (at most `V4_DIR_POOL_CHUNKS`): a pool
    /// that fills up sooner, for tests and measurements. Slots already allocated stay.
    pub fn limit_pool(&mut self, chunks: u32) {
        self.limit = chunks.min(V4_DIR_POOL_CHUNKS);
    }

    /// How many /16s have their second-level chunk in the pool.
    fn pool_used(&self) -> Result<usize, Error> {
        if let Some(a) = &self.alloc {
            return Ok(a.slots.len());
        }
        Ok(PoolAlloc::read(&self.level1)?.slots.len())
    }

    /// Mirrors a write of the chunk hash into the arrays: the chunks of keys `remove` left it,
    /// `upsert`'s were written. A first-level chunk goes into the first-level array with the
    /// pool references of its /16s (a removed one becomes zeros: `encode` always writes all
    /// 256, so only a state written by hand removes one); a second-level chunk goes into its
    /// /16's pool slot, allocating one (the pool's lowest free slot below the limit) when the
    /// /16 has none (when none is free the /16 stays without one and the program asks the
    /// hash); a removed second-level chunk frees its slot and loses its reference.
    ///
    /// The pool is written in one batch, then every first-level chunk whose slots or
    /// references changed in another. Only the standby generation is written, which no
    /// program reads, so the order inside a write does not matter to a packet; a write that
    /// fails part-way leaves the allocation unknown (read back from the first-level array
    /// before the next write) and the generation's record cleared.
    fn write(&mut self, remove: &[u32], upsert: &[(u32, V4DirChunk)]) -> Result<(), Error> {
        let r = self.try_write(remove, upsert);
        if r.is_err() {
            self.alloc = None;
        }
        r
    }

    fn try_write(&mut self, remove: &[u32], upsert: &[(u32, V4DirChunk)]) -> Result<(), Error> {
        let limit = self.limit;
        let mut alloc = match self.alloc.take() {
            Some(a) => a,
            None => PoolAlloc::read(&self.level1)?,
        };
        // First-level chunks written whole (their slots from the hash's chunk) and those
        // only some of whose references change.
        let mut chunks: BTreeMap<u32, V4DirChunk> = BTreeMap::new();
        let mut refs_changed = BTreeSet::new();
        let mut pool: Vec<(u32, &V4DirChunk)> = Vec::new();
        for &key in remove {
            if key < V4_DIR_L2_BASE {
                chunks.insert(key, V4DirChunk::default());
            } else if let Some(index) = alloc.slots.remove(&(key - V4_DIR_L2_BASE)) {
                alloc.free.insert(index);
                refs_changed.insert((key - V4_DIR_L2_BASE) >> 8);
            }
        }
        for (key, value) in upsert {
            if *key < V4_DIR_L2_BASE {
                chunks.insert(*key, *value);
                continue;
            }
            let x = key - V4_DIR_L2_BASE;
            let index = match alloc.slots.get(&x) {
                Some(&index) => index,
                None => {
                    let Some(&index) = alloc.free.range(..limit).next() else { continue };
                    alloc.free.remove(&index);
                    alloc.slots.insert(x, index);
                    refs_changed.insert(x >> 8);
                    index
                }
            };
            pool.push((index, value));
        }
        let mut keys = Vec::with_capacity(pool.len() * 4);
        let mut values = Vec::with_capacity(pool.len() * size_of::<V4DirChunk>());
        for (index, chunk) in &pool {
            keys.extend_from_slice(&index.to_le_bytes());
            values.extend_from_slice(&chunk.to_bytes());
        }
        let (fd, size) = (self.pool.map().fd().as_fd(), size_of::<V4DirChunk>());
        crate::batch::update(fd, 4, size, &keys, &values)
            .map_err(Error::batch(maps::INGRESS_V4_DIR2))?;

        let name = maps::INGRESS_V4_DIR1;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for key in refs_changed.into_iter().chain(chunks.keys().copied()).collect::<BTreeSet<_>>() {
            let slots = match chunks.get(&key) {
                Some(chunk) => *chunk,
                None => self.level1.get(&key, 0).map_err(Error::map(name))?.dir_chunk(),
            };
            let mut refs = [0u32; V4_DIR_SLOTS];
            for (&x, &index) in alloc.slots.range(key << 8..(key + 1) << 8) {
                refs[(x & 0xff) as usize] = index + 1;
            }
            let mut chunk = V4Dir1Chunk::default();
            for ((out, slot), pool) in chunk.slots.iter_mut().zip(&slots.slots).zip(refs) {
                *out = V4Dir1Slot::new(*slot, pool);
            }
            keys.extend_from_slice(&key.to_le_bytes());
            values.extend_from_slice(&chunk.to_bytes());
        }
        let fd = self.level1.map().fd().as_fd();
        crate::batch::update(fd, 4, size_of::<V4Dir1Chunk>(), &keys, &values)
            .map_err(Error::batch(name))?;
        self.alloc = Some(alloc);
        Ok(())
    }
}

/// Reads the chunk hash back (`encode`'s format, sorted by key bytes), checking the arrays
/// derived from it: the first-level array holds the same first-level chunks as the hash
/// (zeros where the hash has none), and each pool reference is to a distinct slot inside the
/// pool that holds the hash's second-level chunk of that /16 (a /16 the hash has no chunk
/// for has no reference).
fn read_dir(
    map: &HashMap<MapData, u32, V4DirChunk>,
    arrays: &V4DirArrays,
    name: &'static str,
) -> Result<Entries, Error> {
    let mut entries = Entries::new();
    let mut level1 = vec![V4DirChunk::default(); V4_DIR_L2_BASE as usize];
    let mut level2 = BTreeSet::new();
    for item in map.iter() {
        let (key, value) = item.map_err(Error::map(name))?;
        if key < V4_DIR_L2_BASE {
            level1[key as usize] = value;
        } else {
            level2.insert(key - V4_DIR_L2_BASE);
        }
        entries.push(&key.to_le_bytes(), &value.to_bytes());
    }
    let mut taken = BTreeSet::new();
    for (key, want) in (0..V4_DIR_L2_BASE).zip(&level1) {
        let held = arrays.level1.get(&key, 0).map_err(Error::map(maps::INGRESS_V4_DIR1))?;
        if held.dir_chunk() != *want {
            return Err(Error::VerifyFailed(maps::INGRESS_V4_DIR1));
        }
        for (i, slot) in held.slots.iter().enumerate().filter(|(_, s)| s.pool != 0) {
            let x = key << 8 | i as u32;
            check_pool_ref(map, arrays, x, slot.pool, level2.contains(&x), &mut taken)?;
        }
    }
    entries.sort();
    Ok(entries)
}

/// One pool reference `pool` (not 0) of /16 `x`: the hash has a second-level chunk for `x`
/// (`in_hash`), the reference is inside the pool and to a slot no other /16's reference
/// took (`taken`), and the slot holds the hash's chunk.
fn check_pool_ref(
    map: &HashMap<MapData, u32, V4DirChunk>,
    arrays: &V4DirArrays,
    x: u32,
    pool: u32,
    in_hash: bool,
    taken: &mut BTreeSet<u32>,
) -> Result<(), Error> {
    let name = maps::INGRESS_V4_DIR2;
    let index = pool - 1;
    if !in_hash || index >= V4_DIR_POOL_CHUNKS || !taken.insert(index) {
        return Err(Error::VerifyFailed(name));
    }
    let want = map.get(&(V4_DIR_L2_BASE + x), 0).map_err(Error::map(maps::INGRESS_V4_DIR))?;
    let held = arrays.pool.get(&index, 0).map_err(Error::map(name))?;
    if held != want {
        return Err(Error::VerifyFailed(name));
    }
    Ok(())
}

/// Reads a hash map back in `encode`'s format, sorted by key bytes ([`read_lpm`] for the
/// hashes: the ingress IPv4 prefix hash and the ingress exact L4 hash), with batched lookups
/// (the kernel's bytes are `encode`'s).
pub(crate) fn read_hash<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Entries, Error> {
    let snap = crate::batch::Snapshot::read(map.map().fd().as_fd(), size_of::<K>(), size_of::<V>())
        .map_err(Error::batch(name))?;
    let mut entries = Entries::with_capacity(snap.len());
    for (key, value) in snap.iter() {
        entries.push(key, value);
    }
    Ok(entries)
}

fn read_lpm<K: Pod, V: Pod + Bytes>(
    map: &LpmTrie<MapData, K, V>,
    name: &'static str,
    key_bytes: fn(u32, K) -> Vec<u8>,
) -> Result<Entries, Error> {
    let mut entries = Entries::new();
    for item in map.iter() {
        let (key, value) = item.map_err(Error::map(name))?;
        entries.push(&key_bytes(key.prefix_len(), key.data()), value.to_bytes().as_ref());
    }
    entries.sort();
    Ok(entries)
}

type Parsed<K, V> = Vec<((u32, K), V)>;

fn parse_entries<T: Bytes, K, V: Bytes>(
    name: &'static str,
    entries: &Entries,
    split: fn(T) -> (u32, K),
) -> Result<Parsed<K, V>, Error> {
    entries
        .iter()
        .map(|(k, v)| {
            let key = T::from_bytes(k).ok_or(Error::Entry { map: name, reason: "key size" })?;
            let value = V::from_bytes(v).ok_or(Error::Entry { map: name, reason: "value size" })?;
            Ok((split(key), value))
        })
        .collect()
}

fn v4_key_bytes(prefix_len: u32, addr: [u8; 4]) -> Vec<u8> {
    Ipv4LpmKey { prefix_len, addr }.to_bytes().to_vec()
}

fn v6_key_bytes(prefix_len: u32, addr: [u8; 16]) -> Vec<u8> {
    Ipv6LpmKey { prefix_len, addr }.to_bytes().to_vec()
}

fn l4_key_bytes(prefix_len: u32, d: [u8; 12]) -> Vec<u8> {
    let part = |i: usize| [d[i], d[i + 1], d[i + 2], d[i + 3]];
    L4LpmKey { prefix_len, class: part(0), workload: part(4), l4: part(8) }.to_bytes().to_vec()
}

/// What must change in one map to go from what it holds to what is desired: the entries to
/// write (new or with a different value) and the keys to delete, as `encode`'s bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDelta {
    pub upsert: Entries,
    pub remove: Vec<Vec<u8>>,
}

impl MapDelta {
    pub fn len(&self) -> usize {
        self.upsert.len() + self.remove.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The entry-level difference between two encodings, per map (only maps that differ). The
/// workload table is left out: the encoded state keys it by cgroup path, the kernel by id.
///
/// This runs on every apply before anything is written, so it is built to cost little when
/// little changed: the entries both sides share at the start and at the end are skipped with
/// a plain element-by-element comparison (a tight loop, no allocation), and only the middle
/// is diffed. That middle is normally sorted by key with no duplicates (`encode` emits entries
/// so, a read-back sorts), and then it is one merge walk; a side that is not strictly sorted
/// falls back to a map-based comparison of the middle (the shared ends are equal pairwise, so
/// the set difference is the middles'; a key repeated across the two parts is a duplicate,
/// which `decode` rejects for every map that changes). Either way the output lists upserts and
/// removals in key order. At 100k entries, building two `BTreeMap`s per map took tens of
/// milliseconds.
pub fn delta(current: &Encoded, desired: &Encoded) -> BTreeMap<&'static str, MapDelta> {
    delta_checked(current, desired).0
}

/// [`delta`], and whether every map of `desired` that differs was found strictly sorted by
/// key (so without duplicate keys), assuming `current`'s maps are (a read-back or a patched
/// cache always is). When it was, checking the upserted entries checks every entry the
/// apply writes and every key is unique; when not, the caller must check the changed maps in
/// full.
pub(crate) fn delta_checked(
    current: &Encoded,
    desired: &Encoded,
) -> (BTreeMap<&'static str, MapDelta>, bool) {
    let empty = Entries::new();
    let mut out = BTreeMap::new();
    let mut sorted = true;
    let names: BTreeSet<&'static str> =
        current.maps.keys().chain(desired.maps.keys()).copied().collect();
    for name in names.into_iter().filter(|&n| n != maps::WORKLOADS) {
        let have_all = current.maps.get(name).unwrap_or(&empty);
        let want_all = desired.maps.get(name).unwrap_or(&empty);
        // One shared buffer (an unchanged map of the daemon's encodings, a cache entry that
        // is the desired encoding): equal without reading it.
        if have_all.shares(want_all) {
            continue;
        }
        let (hn, wn) = (have_all.len(), want_all.len());
        // Into an empty map (a first load) every desired entry is an upsert: the desired
        // buffer itself when it is strictly sorted, not a copy of it (the chunks alone are
        // 12 MiB at 100k prefixes).
        if hn == 0 && strictly_sorted(want_all) {
            if wn > 0 {
                out.insert(name, MapDelta { upsert: want_all.clone(), remove: Vec::new() });
            }
            continue;
        }
        let head = (0..hn.min(wn)).take_while(|&i| same(have_all.get(i), want_all.get(i))).count();
        if head == hn && head == wn {
            continue;
        }
        let tail = (1..=(hn - head).min(wn - head))
            .take_while(|&t| same(have_all.get(hn - t), want_all.get(wn - t)))
            .count();
        let (have, want) = (head..hn - tail, head..wn - tail);
        // The shared ends equal `current`'s, which is sorted; the middle must also sort after
        // the head and before the tail.
        let before = head.checked_sub(1).and_then(|i| want_all.get(i));
        let after = want_all.get(wn - tail).filter(|_| tail > 0);
        let first = want_all.get(want.start).filter(|_| !want.is_empty());
        let last =
            want.end.checked_sub(1).and_then(|i| want_all.get(i)).filter(|_| !want.is_empty());
        let joins = match (first, last) {
            (Some(first), Some(last)) => {
                before.is_none_or(|b| b.0 < first.0) && after.is_none_or(|a| last.0 < a.0)
            }
            _ => true,
        };
        let d = match merge_delta(have_all, have.clone(), want_all, want.clone()).filter(|_| joins)
        {
            Some(d) => d,
            None => {
                sorted = false;
                map_delta(have_all, have, want_all, want)
            }
        };
        if !d.is_empty() {
            out.insert(name, d);
        }
    }
    (out, sorted)
}

/// Whether `entries`' keys are strictly increasing (so sorted without duplicates).
fn strictly_sorted(entries: &Entries) -> bool {
    let mut keys = entries.iter().map(|(k, _)| k);
    let Some(mut last) = keys.next() else { return true };
    keys.all(|k| {
        let up = last < k;
        last = k;
        up
    })
}

/// Entry equality without a `memcmp` call per byte slice: the slices are a few bytes long and
/// the head and tail comparison of [`delta_checked`] runs over every entry of every map.
#[inline]
fn same(a: Option<Entry<'_>>, b: Option<Entry<'_>>) -> bool {
    #[inline]
    fn eq(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        ca.zip(cb).all(|(x, y)| {
            let word = |c: &[u8]| <[u8; 8]>::try_from(c).map(u64::from_ne_bytes).unwrap_or(0);
            word(x) == word(y)
        }) && ra.iter().zip(rb).all(|(x, y)| x == y)
    }
    match (a, b) {
        (Some(a), Some(b)) => eq(a.0, b.0) && eq(a.1, b.1),
        _ => false,
    }
}

/// One entry: key and value bytes.
type Entry<'a> = (&'a [u8], &'a [u8]);

/// One merge walk over the entries `hr` of `have` and `wr` of `want`, both key-sorted; `None`
/// when either is not strictly sorted.
fn merge_delta(
    have: &Entries,
    hr: Range<usize>,
    want: &Entries,
    wr: Range<usize>,
) -> Option<MapDelta> {
    use std::cmp::Ordering;
    let mut d = MapDelta::default();
    let (mut i, mut j) = (hr.start, wr.start);
    fn at<'a>(e: &'a Entries, r: &Range<usize>, i: usize) -> Option<Entry<'a>> {
        if r.contains(&i) { e.get(i) } else { None }
    }
    fn sorted_at(e: &Entries, r: &Range<usize>, i: usize) -> bool {
        match (i.checked_sub(1).filter(|&p| p >= r.start).and_then(|p| e.get(p)), at(e, r, i)) {
            (Some(a), Some(b)) => a.0 < b.0,
            _ => true,
        }
    }
    loop {
        match (at(have, &hr, i), at(want, &wr, j)) {
            (Some(h), Some(w)) => {
                if !sorted_at(have, &hr, i) || !sorted_at(want, &wr, j) {
                    return None;
                }
                match h.0.cmp(w.0) {
                    Ordering::Less => {
                        d.remove.push(h.0.to_vec());
                        i += 1;
                    }
                    Ordering::Greater => {
                        d.upsert.push(w.0, w.1);
                        j += 1;
                    }
                    Ordering::Equal => {
                        if h.1 != w.1 {
                            d.upsert.push(w.0, w.1);
                        }
                        i += 1;
                        j += 1;
                    }
                }
            }
            (Some(h), None) => {
                if !sorted_at(have, &hr, i) {
                    return None;
                }
                d.remove.push(h.0.to_vec());
                i += 1;
            }
            (None, Some(w)) => {
                if !sorted_at(want, &wr, j) {
                    return None;
                }
                d.upsert.push(w.0, w.1);
                j += 1;
            }
            (None, None) => return Some(d),
        }
    }
}

/// The same as [`merge_delta`] for entry lists in any order (a duplicate key counts once, the
/// last value winning, as it would in the kernel).
fn map_delta(have: &Entries, hr: Range<usize>, want: &Entries, wr: Range<usize>) -> MapDelta {
    let have: BTreeMap<&[u8], &[u8]> = hr.filter_map(|i| have.get(i)).collect();
    let want: BTreeMap<&[u8], &[u8]> = wr.filter_map(|i| want.get(i)).collect();
    let mut d = MapDelta::default();
    for (k, v) in &want {
        if have.get(k) != Some(v) {
            d.upsert.push(k, v);
        }
    }
    for k in have.keys().filter(|k| !want.contains_key(*k)) {
        d.remove.push(k.to_vec());
    }
    d
}

/// Applies `d` to a key-sorted entry list (the result stays sorted): what a map that held
/// `entries` holds once `d` is written. Builds the new list in one pass into a buffer of the
/// final size; an unchanged list keeps its (possibly shared) buffer.
pub(crate) fn patch(entries: &mut Entries, d: &MapDelta) {
    if d.is_empty() {
        return;
    }
    let old = std::mem::take(entries);
    let mut out = Entries::with_capacity(old.len() + d.upsert.len());
    let mut up = d.upsert.iter().peekable();
    let mut rm = d.remove.iter().peekable();
    for (k, v) in &old {
        while let Some(u) = up.next_if(|u| u.0 < k) {
            out.push(u.0, u.1);
        }
        while rm.next_if(|r| r.as_slice() < k).is_some() {}
        if rm.next_if(|r| r.as_slice() == k).is_some() {
            continue;
        }
        match up.next_if(|u| u.0 == k) {
            Some(u) => out.push(u.0, u.1),
            None => out.push(k, v),
        }
    }
    for u in up {
        out.push(u.0, u.1);
    }
    out.shrink_to_fit();
    *entries = out;
}

/// Generation `generation`'s inner map of the outer map `name`, and its capacity.
fn inner_of(
    outer: &BTreeMap<&'static str, Map>,
    name: &'static str,
    generation: u32,
) -> Result<(Map, u32), Error> {
    let map = outer.get(name).ok_or(Error::MissingMap(name))?;
    let slots: ArrayOfMaps<&MapData, MapData> =
        ArrayOfMaps::try_from(map).map_err(Error::map(name))?;
    let data = slots.get(&generation, 0).map_err(Error::map(name))?;
    let max = data.info().map_err(Error::map(name))?.max_entries();
    Ok((Map::from_map_data(data).map_err(Error::map(name))?, max))
}

/// Puts `inner` into slot `generation` of the outer map `name`. The kernel waits for an RCU
/// grace period before the update returns (no program still uses the map it replaced).
fn set_slot<V: InnerMap>(
    outer: &mut BTreeMap<&'static str, Map>,
    name: &'static str,
    generation: u32,
    inner: &V,
) -> Result<(), Error> {
    let map = outer.get_mut(name).ok_or(Error::MissingMap(name))?;
    let mut slots: ArrayOfMaps<&mut MapData, V> =
        ArrayOfMaps::try_from(map).map_err(Error::map(name))?;
    slots.set(generation, inner, 0).map_err(Error::map(name))
}

/// The pin name of generation `generation`'s inner map of the outer map `name` (bpffs names
/// take no dots, so not the kernel name `FW_IN_V4.g0`).
pub(crate) fn inner_pin(name: &str, generation: u32) -> String {
    format!("{name}_G{generation}")
}

/// The id of the map in slot `generation` of `outer` (an array of maps): a lookup from user
/// space returns the inner map's id, which needs no privilege (opening a map by its id needs
/// `CAP_SYS_ADMIN`).
fn slot_id(outer: &MapData, generation: u32) -> std::io::Result<u32> {
    let key = generation;
    let mut value = 0u32;
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: aya_obj::generated::bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_2.map_fd = outer.fd().as_fd().as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(&key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_mut(&mut value) as u64;
    // SAFETY: `attr` is a valid bpf_attr for the whole call and points at `key` and `value`,
    // which outlive it and have the outer map's key and value sizes (4 bytes each).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_MAP_LOOKUP_ELEM as libc::c_long,
            std::ptr::from_mut(&mut attr),
            size_of::<aya_obj::generated::bpf_attr>(),
        )
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(value) }
}

/// Generation `generation`'s inner map of `name` from its pin under `root`, when the pin is
/// the map the outer slot holds now (a pin left stale by a crash between growing a map and
/// re-pinning it is not used).
fn inner_pinned(root: &std::path::Path, name: &'static str, generation: u32) -> Option<(Map, u32)> {
    let outer = MapData::from_pin(root.join(name)).ok()?;
    let want = slot_id(&outer, generation).ok()?;
    let data = MapData::from_pin(root.join(inner_pin(name, generation))).ok()?;
    let info = data.info().ok()?;
    if info.id() != want {
        return None;
    }
    let max = info.max_entries();
    Some((Map::from_map_data(data).ok()?, max))
}

impl GenerationMaps {
    /// Every inner map with its outer map's name.
    fn named(&self) -> [(&'static str, &MapData); 15] {
        [
            (maps::INGRESS_V4, self.in_v4.map()),
            (maps::INGRESS_V4_DIR, self.in_v4_dir.map()),
            (maps::INGRESS_V4_DIR1, self.in_v4_dir1.level1.map()),
            (maps::INGRESS_V4_DIR2, self.in_v4_dir1.pool.map()),
            (maps::INGRESS_V6, self.in_v6.map()),
            (maps::INGRESS_L4, self.in_l4.map()),
            (maps::INGRESS_L4_EXACT, self.in_l4x.map()),
            (maps::INGRESS_L4_PORTS, self.in_l4p.map()),
            (maps::INGRESS_L4_CLASSES, self.in_l4c.map()),
            (maps::INGRESS_L4_CLASS_TABLE, self.in_l4k.map()),
            (maps::EGRESS_V4, self.eg_v4.map()),
            (maps::EGRESS_V6, self.eg_v6.map()),
            (maps::EGRESS_L4, self.eg_l4.map()),
            (maps::CONFIG, self.config.map()),
            (maps::WORKLOADS, self.workloads.map()),
        ]
    }

    /// Pins these maps as generation `generation`'s under `root`, each as
    /// [`inner_pin`]`(name)` followed by `suffix`; returns the (pinned path, final path)
    /// pairs. With a suffix, a leftover pin of that name is replaced.
    pub fn pin_as(
        &self,
        root: &std::path::Path,
        generation: u32,
        suffix: &str,
    ) -> Result<Vec<(std::path::PathBuf, std::path::PathBuf)>, Error> {
        let mut out = Vec::new();
        for (name, data) in self.named() {
            let dst = root.join(inner_pin(name, generation));
            let path = root.join(format!("{}{suffix}", inner_pin(name, generation)));
            if !suffix.is_empty() {
                let _ = std::fs::remove_file(&path);
            }
            data.pin(&path).map_err(crate::pin::pin_err(&path))?;
            out.push((path, dst));
        }
        if let Some(data) = &self.in_v4_rest {
            let base = inner_pin(crate::v4rest::REST_NAME, generation);
            let dst = root.join(&base);
            let path = root.join(format!("{base}{suffix}"));
            if !suffix.is_empty() {
                let _ = std::fs::remove_file(&path);
            }
            data.pin(&path).map_err(crate::pin::pin_err(&path))?;
            out.push((path, dst));
        }
        Ok(out)
    }

    /// Pins these maps as generation `generation`'s under `root` in place of what is pinned
    /// there (each pinned under a temporary name, then renamed over the old pin: a rename on
    /// bpffs replaces its target atomically, so the name never points at nothing).
    pub fn repin(&self, root: &std::path::Path, generation: u32) -> Result<(), Error> {
        for (path, dst) in self.pin_as(root, generation, "_tmp")? {
            crate::pin::private(&path, 0o600)?;
            std::fs::rename(&path, &dst).map_err(crate::pin::io(&dst))?;
        }
        Ok(())
    }

    /// Opens generation `generation`'s inner maps as a process that adopts pinned maps: from
    /// their pins under `root` when those are the maps the outer slots hold, else through the
    /// outer maps by id (which needs `CAP_SYS_ADMIN`). The second element is false when any
    /// map came by id (its pin is missing or stale; the caller re-pins).
    pub fn from_outer(
        generation: u32,
        outer: &BTreeMap<&'static str, Map>,
        rules: u32,
        root: Option<&std::path::Path>,
    ) -> Result<(Self, bool), Error> {
        let g = generation;
        let mut all_pinned = true;
        let mut get = |name: &'static str| {
            if let Some(found) = root.and_then(|r| inner_pinned(r, name, g)) {
                return Ok(found);
            }
            all_pinned = false;
            inner_of(outer, name, g)
        };
        let (in_v4, v4_hash) = get(maps::INGRESS_V4)?;
        let (in_v4_dir, dir_hash) = get(maps::INGRESS_V4_DIR)?;
        let (in_v4_dir1, _) = get(maps::INGRESS_V4_DIR1)?;
        let (in_v4_dir2, _) = get(maps::INGRESS_V4_DIR2)?;
        let (in_v6, v6) = get(maps::INGRESS_V6)?;
        let (in_l4, l4) = get(maps::INGRESS_L4)?;
        let (in_l4x, _) = get(maps::INGRESS_L4_EXACT)?;
        let (in_l4p, _) = get(maps::INGRESS_L4_PORTS)?;
        let (in_l4c, _) = get(maps::INGRESS_L4_CLASSES)?;
        let (in_l4k, _) = get(maps::INGRESS_L4_CLASS_TABLE)?;
        let (eg_v4, v4) = get(maps::EGRESS_V4)?;
        let (eg_v6, _) = get(maps::EGRESS_V6)?;
        let (eg_l4, _) = get(maps::EGRESS_L4)?;
        let (config, _) = get(maps::CONFIG)?;
        let (workloads, w) = get(maps::WORKLOADS)?;
        let m = |name: &'static str| Error::map(name);
        let maps = Self {
            in_v4: HashMap::try_from(in_v4).map_err(m(maps::INGRESS_V4))?,
            in_v4_dir: HashMap::try_from(in_v4_dir).map_err(m(maps::INGRESS_V4_DIR))?,
            in_v4_dir1: V4DirArrays::new(
                Array::try_from(in_v4_dir1).map_err(m(maps::INGRESS_V4_DIR1))?,
                Array::try_from(in_v4_dir2).map_err(m(maps::INGRESS_V4_DIR2))?,
            ),
            in_v6: LpmTrie::try_from(in_v6).map_err(m(maps::INGRESS_V6))?,
            in_l4: LpmTrie::try_from(in_l4).map_err(m(maps::INGRESS_L4))?,
            in_l4x: HashMap::try_from(in_l4x).map_err(m(maps::INGRESS_L4_EXACT))?,
            in_l4p: Array::try_from(in_l4p).map_err(m(maps::INGRESS_L4_PORTS))?,
            in_l4c: Array::try_from(in_l4c).map_err(m(maps::INGRESS_L4_CLASSES))?,
            in_l4k: Array::try_from(in_l4k).map_err(m(maps::INGRESS_L4_CLASS_TABLE))?,
            eg_v4: LpmTrie::try_from(eg_v4).map_err(m(maps::EGRESS_V4))?,
            eg_v6: LpmTrie::try_from(eg_v6).map_err(m(maps::EGRESS_V6))?,
            eg_l4: LpmTrie::try_from(eg_l4).map_err(m(maps::EGRESS_L4))?,
            config: Array::try_from(config).map_err(m(maps::CONFIG))?,
            workloads: HashMap::try_from(workloads).map_err(m(maps::WORKLOADS))?,
            caps: Capacities {
                v4_prefixes: v4,
                v6_prefixes: v6,
                l4_entries: l4,
                rules,
                workloads: w,
            },
            v4_hash,
            v4_hash_len: None,
            dir_hash,
            in_v4_rest: root.and_then(|r| Self::rest_pinned(r, g)),
            v4_unsorted: Default::default(),
            last_v4: None,
            generation: g,
        };
        Ok((maps, all_pinned))
    }

    /// Puts these maps into slot `generation` of every outer map (one RCU wait per slot).
    pub fn install(
        &self,
        generation: u32,
        outer: &mut BTreeMap<&'static str, Map>,
    ) -> Result<(), Error> {
        let g = generation;
        set_slot(outer, maps::INGRESS_V4, g, &self.in_v4)?;
        set_slot(outer, maps::INGRESS_V4_DIR, g, &self.in_v4_dir)?;
        set_slot(outer, maps::INGRESS_V4_DIR1, g, &self.in_v4_dir1.level1)?;
        set_slot(outer, maps::INGRESS_V4_DIR2, g, &self.in_v4_dir1.pool)?;
        set_slot(outer, maps::INGRESS_V6, g, &self.in_v6)?;
        set_slot(outer, maps::INGRESS_L4, g, &self.in_l4)?;
        set_slot(outer, maps::INGRESS_L4_EXACT, g, &self.in_l4x)?;
        set_slot(outer, maps::INGRESS_L4_PORTS, g, &self.in_l4p)?;
        set_slot(outer, maps::INGRESS_L4_CLASSES, g, &self.in_l4c)?;
        set_slot(outer, maps::INGRESS_L4_CLASS_TABLE, g, &self.in_l4k)?;
        set_slot(outer, maps::EGRESS_V4, g, &self.eg_v4)?;
        set_slot(outer, maps::EGRESS_V6, g, &self.eg_v6)?;
        set_slot(outer, maps::EGRESS_L4, g, &self.eg_l4)?;
        set_slot(outer, maps::CONFIG, g, &self.config)?;
        set_slot(outer, maps::WORKLOADS, g, &self.workloads)
    }

    /// Re-sets slot `generation` of the config outer map to the map it already holds: the
    /// update changes nothing, but returns only after an RCU grace period, so every program
    /// run that started before the call has finished.
    pub fn wait_grace_period(
        &self,
        generation: u32,
        outer: &mut BTreeMap<&'static str, Map>,
    ) -> Result<(), Error> {
        set_slot(outer, maps::CONFIG, generation, &self.config)
    }

    /// Whether `encoded` fits these maps' capacities: the first map that does not, with how
    /// many entries it needs and its capacity. For the ingress IPv4 table that is the table's
    /// capacity or, when the table fits it, the hash's own for the prefixes it probes.
    pub fn fits(&self, encoded: &Encoded) -> Option<(&'static str, usize, u32)> {
        let c = &self.caps;
        for (&name, entries) in &encoded.maps {
            let cap = match name {
                maps::INGRESS_V4 | maps::EGRESS_V4 => c.v4_prefixes,
                maps::INGRESS_V6 | maps::EGRESS_V6 => c.v6_prefixes,
                maps::INGRESS_L4 | maps::INGRESS_L4_EXACT | maps::EGRESS_L4 => c.l4_entries,
                _ => continue,
            };
            if entries.len() > cap as usize {
                return Some((name, entries.len(), cap));
            }
        }
        let chunks = encoded.maps.get(maps::INGRESS_V4_DIR).map_or(0, Entries::len);
        if chunks > self.dir_hash as usize {
            return Some((maps::INGRESS_V4_DIR, chunks, self.dir_hash));
        }
        let v4 = encoded.maps.get(maps::INGRESS_V4).map_or(0, Entries::len);
        if v4 > self.v4_hash as usize {
            let probed = crate::v4rest::probed_len(encoded);
            if probed > self.v4_hash as usize {
                return Some((maps::INGRESS_V4, probed, self.v4_hash));
            }
        }
        None
    }

    /// Writes only `deltas` (from [`delta`]): deletes, then upserts, map by map.
    ///
    /// The ingress IPv4 table is written as `plan` says (see the `v4rest` module): its delta
    /// into the hash, and the record rewritten when the plan has one. Its stats count the
    /// encoded table's entries written and removed, wherever they went.
    pub fn apply_delta(
        &mut self,
        deltas: &BTreeMap<&'static str, MapDelta>,
        plan: Option<&crate::v4rest::V4Plan>,
    ) -> Result<WriteStats, Error> {
        let mut stats = WriteStats::default();
        if let Some(d) = deltas.get(maps::INGRESS_V4) {
            stats += WriteStats { written: d.upsert.len(), deleted: d.remove.len() };
        }
        let Some(plan) = plan else { return self.apply_rest_of(deltas, stats) };
        // The order of the writes does not matter: no program reads this generation.
        self.write_rest(plan)?;
        if plan.hash.len() < PARALLEL_ENTRIES {
            self.batch_delta(maps::INGRESS_V4, &plan.hash)?;
            return self.apply_rest_of(deltas, stats);
        }
        // A large delta of the hash (a full load) on a thread of its own: its inserts are
        // most of the write, and touch none of the maps written meanwhile.
        // A descriptor of its own (the other maps are written through `self` meanwhile).
        let fd = self.in_v4.map().fd().as_fd().try_clone_to_owned();
        let fd = fd.map_err(|source| Error::MapSyscall { map: maps::INGRESS_V4, source })?;
        let (k, v) = (size_of::<Ipv4LpmKey>(), size_of::<ClassValue>());
        std::thread::scope(|s| {
            let hash = s.spawn(move || batch_write(fd.as_fd(), maps::INGRESS_V4, k, v, &plan.hash));
            let rest = self.apply_rest_of(deltas, stats);
            let hash = hash.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            hash.and(rest)
        })
    }

    /// [`apply_delta`](Self::apply_delta) for every map but the ingress IPv4 table, adding to
    /// `stats`.
    fn apply_rest_of(
        &mut self,
        deltas: &BTreeMap<&'static str, MapDelta>,
        mut stats: WriteStats,
    ) -> Result<WriteStats, Error> {
        for (&name, d) in deltas.iter().filter(|(n, _)| **n != maps::INGRESS_V4) {
            stats += match name {
                maps::INGRESS_V4
                | maps::INGRESS_V6
                | maps::INGRESS_L4
                | maps::EGRESS_V4
                | maps::EGRESS_V6
                | maps::EGRESS_L4 => self.batch_delta(name, d)?,
                maps::INGRESS_V4_DIR => {
                    write_dir(&mut self.in_v4_dir, &mut self.in_v4_dir1, name, d)?
                }
                maps::INGRESS_L4_EXACT => {
                    let (x, p, c, k) =
                        (&mut self.in_l4x, &mut self.in_l4p, &mut self.in_l4c, &mut self.in_l4k);
                    l4x_delta(x, p, c, k, name, d)?
                }
                maps::CONFIG => {
                    // An array cannot delete: a removed index goes back to all zeros.
                    let mut s = WriteStats::default();
                    let zero = DirectionConfig::default().to_bytes();
                    let entries =
                        d.upsert.iter().chain(d.remove.iter().map(|k| (k.as_slice(), &zero[..])));
                    for (k, v) in entries {
                        let index =
                            <[u8; 4]>::try_from(k).map(u32::from_le_bytes).map_err(|_| {
                                Error::Entry { map: name, reason: "config key is not 4 bytes" }
                            })?;
                        let value = DirectionConfig::from_bytes(v).ok_or(Error::Entry {
                            map: name,
                            reason: "config value of the wrong size",
                        })?;
                        self.config.set(index, value, 0).map_err(Error::map(name))?;
                        s.written += 1;
                    }
                    s
                }
                other => return Err(Error::UnknownMap(other.to_string())),
            };
        }
        Ok(stats)
    }

    /// Makes the prefix hash or one of the tries (`name`), which holds `present`, hold exactly
    /// `entries`: the keys not desired deleted, then every desired entry written, in batches.
    fn sync_batched(
        &self,
        name: &'static str,
        entries: &Entries,
        present: Entries,
    ) -> Result<WriteStats, Error> {
        let remove = present
            .iter()
            .filter(|(k, _)| entries.binary_search(k).is_err())
            .map(|(k, _)| k.to_vec())
            .collect();
        let mut upsert = entries.clone();
        // `binary_search` needs the entries sorted by key (`encode`'s order; sorted here in
        // case a caller's are not).
        upsert.sort();
        let d = MapDelta { upsert, remove };
        self.batch_delta(name, &d)
    }

    /// Writes `d` into the prefix hash or one of the tries (`name`) in batches.
    fn batch_delta(&self, name: &'static str, d: &MapDelta) -> Result<WriteStats, Error> {
        let (fd, key_size, value_size) = self.fd(name)?;
        batch_write(fd, name, key_size, value_size, d)
    }

    /// How many entries one map holds, walking its keys only: what a status needs, without
    /// the copy of every entry that [`GenerationMaps::read_map`] makes (megabytes at 100k
    /// prefixes, read on every status request).
    pub fn count_map(&self, name: &str) -> Result<usize, Error> {
        fn keys<I: Iterator<Item = Result<T, aya::maps::MapError>>, T>(
            mut it: I,
            name: &'static str,
        ) -> Result<usize, Error> {
            it.try_fold(0, |n, k| k.map(|_| n + 1).map_err(Error::map(name)))
        }
        match name {
            maps::INGRESS_V4 => Ok(keys(self.in_v4.keys(), maps::INGRESS_V4)? + self.rest_len()?),
            maps::INGRESS_V4_DIR => keys(self.in_v4_dir.keys(), maps::INGRESS_V4_DIR),
            maps::INGRESS_V6 => keys(self.in_v6.keys(), maps::INGRESS_V6),
            maps::INGRESS_L4 => keys(self.in_l4.keys(), maps::INGRESS_L4),
            maps::INGRESS_L4_EXACT => keys(self.in_l4x.keys(), maps::INGRESS_L4_EXACT),
            maps::EGRESS_V4 => keys(self.eg_v4.keys(), maps::EGRESS_V4),
            maps::EGRESS_V6 => keys(self.eg_v6.keys(), maps::EGRESS_V6),
            maps::EGRESS_L4 => keys(self.eg_l4.keys(), maps::EGRESS_L4),
            other => Ok(self.read_map(other)?.len()),
        }
    }

    /// Reads one map back (`encode`'s format, sorted by key).
    pub fn read_map(&self, name: &str) -> Result<Entries, Error> {
        match name {
            maps::INGRESS_V4 => {
                self.read_v4(&read_dir(&self.in_v4_dir, &self.in_v4_dir1, maps::INGRESS_V4_DIR)?)
            }
            maps::INGRESS_V4_DIR => {
                read_dir(&self.in_v4_dir, &self.in_v4_dir1, maps::INGRESS_V4_DIR)
            }
            maps::INGRESS_V6 => read_lpm(&self.in_v6, maps::INGRESS_V6, v6_key_bytes),
            maps::INGRESS_L4 => read_lpm(&self.in_l4, maps::INGRESS_L4, l4_key_bytes),
            maps::INGRESS_L4_EXACT => {
                read_l4x(&self.in_l4x, &self.in_l4p, &self.in_l4c, &self.in_l4k)
            }
            maps::EGRESS_V4 => read_lpm(&self.eg_v4, maps::EGRESS_V4, v4_key_bytes),
            maps::EGRESS_V6 => read_lpm(&self.eg_v6, maps::EGRESS_V6, v6_key_bytes),
            maps::EGRESS_L4 => read_lpm(&self.eg_l4, maps::EGRESS_L4, l4_key_bytes),
            maps::CONFIG => {
                let mut config = Entries::with_capacity(CONFIG_ENTRIES as usize);
                for index in 0..CONFIG_ENTRIES {
                    let value = self.config.get(&index, 0).map_err(Error::map(maps::CONFIG))?;
                    config.push(&index.to_le_bytes(), &value.to_bytes());
                }
                Ok(config)
            }
            other => Err(Error::UnknownMap(other.to_string())),
        }
    }
}

/// `bpf_attr` for the map element commands (`BPF_MAP_LOOKUP_ELEM`, `BPF_MAP_GET_NEXT_KEY`).
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

pub(crate) const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
/// [`GenerationMaps::verify_delta`] reads a hash whole when the delta has at least
/// `1 / BULK_VERIFY` of its entries: a batched read costs about a tenth of the two syscalls
/// a key costs when checked on its own (measured at 100k entries), so it wins from there.
const BULK_VERIFY: usize = 8;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// One map element command; `Ok(false)` for ENOENT.
pub(crate) fn elem_cmd(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: Option<&[u8]>,
    out: &mut [u8],
) -> std::io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: u32::try_from(fd.as_raw_fd())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: out.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for the element commands; `key` (when given)
    // and `out` outlive the call, and the callers size them to the map's key (for a next key)
    // or value size, so the kernel writes inside `out`.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, &mut attr as *mut ElemAttr, size_of::<ElemAttr>())
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) { Ok(false) } else { Err(e) }
}

impl GenerationMaps {
    /// The map's descriptor, key size and value size (as the kernel has them: an LPM key is
    /// the prefix length and the data).
    fn fd(&self, name: &str) -> Result<(BorrowedFd<'_>, usize, usize), Error> {
        let lpm = |data: usize, value: usize| (size_of::<u32>() + data, value);
        let (key, value) = match name {
            maps::INGRESS_V4 | maps::EGRESS_V4 => lpm(4, size_of::<ClassValue>()),
            maps::INGRESS_V6 | maps::EGRESS_V6 => lpm(16, size_of::<ClassValue>()),
            maps::INGRESS_L4 | maps::EGRESS_L4 => lpm(12, size_of::<L4Value>()),
            maps::INGRESS_L4_EXACT => (size_of::<L4LpmKey>(), size_of::<L4Value>()),
            maps::INGRESS_V4_DIR => (size_of::<u32>(), size_of::<V4DirChunk>()),
            _ => (size_of::<u32>(), size_of::<DirectionConfig>()),
        };
        let data = match name {
            maps::INGRESS_V4 => self.in_v4.map(),
            maps::INGRESS_V4_DIR => self.in_v4_dir.map(),
            maps::INGRESS_V6 => self.in_v6.map(),
            maps::INGRESS_L4 => self.in_l4.map(),
            maps::INGRESS_L4_EXACT => self.in_l4x.map(),
            maps::EGRESS_V4 => self.eg_v4.map(),
            maps::EGRESS_V6 => self.eg_v6.map(),
            maps::EGRESS_L4 => self.eg_l4.map(),
            maps::CONFIG => self.config.map(),
            other => return Err(Error::UnknownMap(other.to_string())),
        };
        Ok((data.fd().as_fd(), key, value))
    }

    /// Checks that the maps hold what writing `deltas` should have left, looking at nothing
    /// else: each upserted key is present with the written value, each removed key is absent
    /// (a config index reads as zeros). O(diff) syscalls, where reading the maps back was
    /// O(policy).
    ///
    /// An LPM trie's lookup is a longest-prefix match, not an exact one (a removed /32 inside
    /// a /24 still "finds" the /24), so presence is decided with `BPF_MAP_GET_NEXT_KEY`, which
    /// does look the key up exactly: for a key the trie holds it returns the key after it in
    /// the trie's order (or ENOENT for the last one), for any other key the first key of the
    /// trie. So a key is present exactly when its "next" is not the first key, or is ENOENT
    /// in a non-empty trie. For a present key, the lookup's longest match is the key itself.
    /// The ingress IPv4 hash answers `BPF_MAP_GET_NEXT_KEY` the same way (an absent key gives
    /// the first key, the last key ENOENT) and its lookup is exact, so one check serves both.
    ///
    /// A large write of a hash (at least an eighth of the entries the map holds afterwards,
    /// as `sizes` gives them: a full load, a replay of one) is checked the same way against
    /// one batched read of the whole map ([`crate::batch::Snapshot`]) instead of two syscalls
    /// per key, about a tenth of the cost per entry. A map `sizes` does not give is checked key
    /// by key.
    ///
    /// The ingress IPv4 table is checked as `plan` wrote it: the hash's delta as above, and
    /// the record read back whole and compared.
    pub fn verify_delta(
        &self,
        deltas: &BTreeMap<&'static str, MapDelta>,
        sizes: &BTreeMap<&'static str, usize>,
        plan: Option<&crate::v4rest::V4Plan>,
    ) -> Result<(), Error> {
        let mut kernel: BTreeMap<&'static str, &MapDelta> =
            deltas.iter().filter(|(n, _)| **n != maps::INGRESS_V4).map(|(n, d)| (*n, d)).collect();
        if let Some(plan) = plan {
            kernel.insert(maps::INGRESS_V4, &plan.hash);
            if let Some(rest) = &plan.rest
                && self.read_rest()? != *rest
            {
                return Err(Error::VerifyFailed(maps::INGRESS_V4));
            }
        }
        // A large delta of the hash (a full load) is checked on a thread of its own, as it
        // was written.
        let hash = kernel.remove(maps::INGRESS_V4);
        let (parallel, hash) = match hash {
            Some(d) if d.len() >= PARALLEL_ENTRIES => (Some(d), None),
            other => (None, other),
        };
        if let Some(d) = hash {
            kernel.insert(maps::INGRESS_V4, d);
        }
        std::thread::scope(|s| {
            let job =
                parallel.map(|d| s.spawn(move || self.verify_map(maps::INGRESS_V4, d, sizes)));
            let rest = kernel.into_iter().try_for_each(|(name, d)| self.verify_map(name, d, sizes));
            let hash = job.map_or(Ok(()), |j| {
                j.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            });
            rest.and(hash)
        })
    }

    /// [`verify_delta`](Self::verify_delta) for one map of the kernel's (the ingress IPv4
    /// table as the hash's delta).
    fn verify_map(
        &self,
        name: &'static str,
        d: &MapDelta,
        sizes: &BTreeMap<&'static str, usize>,
    ) -> Result<(), Error> {
        let failed = || Error::VerifyFailed(name);
        let sys = |e: std::io::Error| Error::Verify { map: name, source: e };
        let (fd, key_len, value_len) = self.fd(name)?;
        let hash = matches!(name, maps::INGRESS_V4 | maps::INGRESS_V4_DIR | maps::INGRESS_L4_EXACT);
        let snapshot = match sizes.get(name) {
            Some(&after) if hash && d.len().saturating_mul(BULK_VERIFY) >= after => Some(
                crate::batch::Snapshot::read(fd, key_len, value_len).map_err(Error::batch(name))?,
            ),
            _ => None,
        };
        let bulk = snapshot.is_some();
        // Buffers the kernel writes into have the map's sizes, whatever the entries say.
        let mut value = vec![0u8; value_len];
        let mut upserted = snapshot.as_ref().map(crate::batch::Snapshot::cursor);
        let mut holds = |k: &[u8], v: &[u8]| -> Result<bool, Error> {
            if k.len() != key_len {
                return Err(Error::Entry { map: name, reason: "key size" });
            }
            if let Some(cursor) = &mut upserted {
                return Ok(cursor.get(k) == Some(v));
            }
            Ok(elem_cmd(BPF_MAP_LOOKUP_ELEM, fd, Some(k), &mut value).map_err(sys)? && value == v)
        };
        if name == maps::CONFIG {
            let zero = DirectionConfig::default().to_bytes();
            let upserts = d.upsert.iter();
            for (k, v) in upserts.chain(d.remove.iter().map(|k| (k.as_slice(), &zero[..]))) {
                if !holds(k, v)? {
                    return Err(failed());
                }
            }
            return Ok(());
        }
        let mut first = vec![0u8; key_len];
        let first = match &snapshot {
            Some(_) => None,
            None => {
                elem_cmd(BPF_MAP_GET_NEXT_KEY, fd, None, &mut first).map_err(sys)?.then_some(first)
            }
        };
        let mut next = vec![0u8; key_len];
        let mut removed = snapshot.as_ref().map(crate::batch::Snapshot::cursor);
        let mut present = |k: &[u8]| -> Result<bool, Error> {
            if k.len() != key_len {
                return Err(Error::Entry { map: name, reason: "key size" });
            }
            if let Some(cursor) = &mut removed {
                return Ok(cursor.get(k).is_some());
            }
            Ok(if elem_cmd(BPF_MAP_GET_NEXT_KEY, fd, Some(k), &mut next).map_err(sys)? {
                first.as_deref() != Some(next.as_slice())
            } else {
                first.is_some()
            })
        };
        for k in &d.remove {
            if present(k)? {
                return Err(failed());
            }
        }
        for (k, v) in &d.upsert {
            // From a snapshot, holding the value is presence (an exact lookup).
            if (!bulk && !present(k)?) || !holds(k, v)? {
                return Err(failed());
            }
        }
        if name == maps::INGRESS_V4_DIR {
            self.verify_level1(d)?;
        }
        if name == maps::INGRESS_L4_EXACT {
            self.verify_ports(d)?;
            self.verify_class_filter(d)?;
            self.verify_class_table(d)?;
        }
        Ok(())
    }

    /// [`verify_delta`](Self::verify_delta) for the arrays mirrored from the chunk delta `d`:
    /// each first-level chunk upserted is there, each removed one is zeros (pool references
    /// aside); each second-level chunk upserted is in its pool slot or has none, each removed
    /// one has no pool reference.
    fn verify_level1(&self, d: &MapDelta) -> Result<(), Error> {
        let name = maps::INGRESS_V4_DIR1;
        let arrays = &self.in_v4_dir1;
        let zero = V4DirChunk::default().to_bytes();
        let upserts = d.upsert.iter().map(|(k, v)| (k, v, true));
        let removes = d.remove.iter().map(|k| (k.as_slice(), &zero[..], false));
        for (k, v, upsert) in upserts.chain(removes) {
            let key = <[u8; 4]>::try_from(k)
                .map(u32::from_le_bytes)
                .map_err(|_| Error::Entry { map: name, reason: "key size" })?;
            if key < V4_DIR_L2_BASE {
                let held = arrays.level1.get(&key, 0).map_err(Error::map(name))?;
                if held.dir_chunk().to_bytes() != v {
                    return Err(Error::VerifyFailed(name));
                }
                continue;
            }
            let x = key - V4_DIR_L2_BASE;
            if x >= 1 << 16 {
                return Err(Error::Entry { map: name, reason: "chunk key" });
            }
            let held = arrays.level1.get(&(x >> 8), 0).map_err(Error::map(name))?;
            let pool = held.slots[(x & 0xff) as usize].pool;
            if pool == 0 {
                continue;
            }
            let pool_name = maps::INGRESS_V4_DIR2;
            if !upsert || pool > V4_DIR_POOL_CHUNKS {
                return Err(Error::VerifyFailed(pool_name));
            }
            let chunk = arrays.pool.get(&(pool - 1), 0).map_err(Error::map(pool_name))?;
            if chunk.to_bytes() != v {
                return Err(Error::VerifyFailed(pool_name));
            }
        }
        Ok(())
    }

    /// A derived map's fill (`fw_common::maps::DERIVED`): the first-level array's chunks, the
    /// pool's chunks in use (one per /16 that has its second-level chunk there), the port
    /// array's non-zero slots (one per mirrored entry), or the class filter's set bits, and
    /// how many it holds.
    pub fn derived_fill(&self, name: &str) -> Result<(usize, u32), Error> {
        match name {
            maps::INGRESS_V4_DIR1 => Ok((V4_DIR_L2_BASE as usize, V4_DIR_L2_BASE)),
            maps::INGRESS_V4_DIR2 => Ok((self.in_v4_dir1.pool_used()?, V4_DIR_POOL_CHUNKS)),
            maps::INGRESS_L4_PORTS => {
                let mut used = 0;
                for index in 0..L4_PORT_CHUNKS {
                    let chunk =
                        self.in_l4p.get(&index, 0).map_err(Error::map(maps::INGRESS_L4_PORTS))?;
                    used += chunk.slots.iter().filter(|v| **v != L4Value::default()).count();
                }
                Ok((used, L4_PORT_CHUNKS * L4_PORT_SLOTS as u32))
            }
            maps::INGRESS_L4_CLASSES => {
                let name = maps::INGRESS_L4_CLASSES;
                let mut set = 0;
                for index in 0..L4_CLASS_FILTER_CHUNKS {
                    let chunk = self.in_l4c.get(&index, 0).map_err(Error::map(name))?;
                    set += chunk.words.iter().map(|w| w.count_ones() as usize).sum::<usize>();
                }
                Ok((set, L4_CLASS_FILTER_BITS))
            }
            maps::INGRESS_L4_CLASS_TABLE => {
                let name = maps::INGRESS_L4_CLASS_TABLE;
                let mut used = 0;
                for index in 0..L4_CLASS_TABLE_CHUNKS {
                    let chunk = self.in_l4k.get(&index, 0).map_err(Error::map(name))?;
                    let slots = chunk.buckets.iter().flat_map(|b| &b.slots);
                    used += slots.filter(|s| s.class != 0).count();
                }
                Ok((used, L4_CLASS_BUCKETS * L4_CLASS_BUCKET_SLOTS as u32))
            }
            other => Err(Error::UnknownMap(other.to_string())),
        }
    }

    /// [`verify_delta`](Self::verify_delta) for the port array mirrored from the exact hash's
    /// delta `d`: each slot the delta changes holds the mirrored entry (or zeros).
    fn verify_ports(&self, d: &MapDelta) -> Result<(), Error> {
        let name = maps::INGRESS_L4_PORTS;
        for (index, slots) in port_delta(maps::INGRESS_L4_EXACT, d)? {
            let held = self.in_l4p.get(&index, 0).map_err(Error::map(name))?;
            if slots.iter().any(|(slot, value)| held.slots[*slot] != *value) {
                return Err(Error::VerifyFailed(name));
            }
        }
        Ok(())
    }

    /// [`verify_delta`](Self::verify_delta) for the class table under the exact hash's delta
    /// `d`: when the table says it is complete, each class entry the delta removes is in
    /// neither of its buckets and each it writes is in one of them with its value.
    fn verify_class_table(&self, d: &MapDelta) -> Result<(), Error> {
        let name = maps::INGRESS_L4_CLASS_TABLE;
        let get = |index: u32| self.in_l4k.get(&index, 0).map_err(Error::map(name));
        if get(L4_CLASS_TABLE_HEADER)?.incomplete == L4_CLASS_TABLE_INCOMPLETE {
            // Incomplete: the program asks the hash, whatever the table holds.
            return Ok(());
        }
        let held = |class: u32, word: u32| -> Result<Option<L4Value>, Error> {
            let (b1, b2) = l4_class_buckets(class, word);
            for bucket in [b1, b2] {
                let (c, b) = l4_class_bucket_at(bucket);
                let chunk = get(c)?;
                if let Some(s) =
                    chunk.buckets[b].slots.iter().find(|s| s.class == class && s.word == word)
                {
                    return Ok(Some(s.value));
                }
            }
            Ok(None)
        };
        let exact = maps::INGRESS_L4_EXACT;
        for k in &d.remove {
            let key =
                L4LpmKey::from_bytes(k).ok_or(Error::Entry { map: exact, reason: "key size" })?;
            if let Some((class, word)) = l4_class_table_entry(&key)
                && held(class, word)?.is_some()
            {
                return Err(Error::VerifyFailed(name));
            }
        }
        for ((_, key), value) in
            parse_entries::<L4LpmKey, L4LpmKey, L4Value>(exact, &d.upsert, |k| (0, k))?
        {
            if let Some((class, word)) = l4_class_table_entry(&key)
                && held(class, word)? != Some(value)
            {
                return Err(Error::VerifyFailed(name));
            }
        }
        Ok(())
    }

    /// [`verify_delta`](Self::verify_delta) for the class filter under the exact hash's delta
    /// `d`: the bit of each class entry the delta writes is set.
    fn verify_class_filter(&self, d: &MapDelta) -> Result<(), Error> {
        let name = maps::INGRESS_L4_CLASSES;
        for (index, bits) in class_filter_delta(maps::INGRESS_L4_EXACT, d)? {
            let held = self.in_l4c.get(&index, 0).map_err(Error::map(name))?;
            if bits.iter().any(|(word, mask)| held.words[*word] & mask == 0) {
                return Err(Error::VerifyFailed(name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            use std::io::Write as _;
            let _ =
                writeln!(std::io::stderr(), "SKIPPED generation tests: need root (create maps)");
        }
        root
    }

    fn v4(prefix_len: u32, a: u32) -> Vec<u8> {
        Ipv4LpmKey { prefix_len, addr: a.to_be_bytes() }.to_bytes().to_vec()
    }

    fn class(c: u32) -> Vec<u8> {
        ClassValue { wide_class: c, narrow_class: c + 1 }.to_bytes().to_vec()
    }

    /// Checks a write of `d` both ways: against a batched read (the size given says the
    /// write is large, whatever the map holds) and key by key (no sizes).
    fn verified(maps: &GenerationMaps, d: &MapDelta) -> [bool; 2] {
        let (deltas, plan) = hash_only(d);
        let bulk = BTreeMap::from([(maps::INGRESS_V4, d.len())]);
        let plan = Some(&plan);
        [
            maps.verify_delta(&deltas, &bulk, plan),
            maps.verify_delta(&deltas, &BTreeMap::new(), plan),
        ]
        .map(|r| match r {
            Ok(()) => true,
            Err(Error::VerifyFailed(maps::INGRESS_V4)) => false,
            Err(e) => panic!("{e}"),
        })
    }

    /// A write of `d` into the prefix hash alone (a plan that leaves the record as it is).
    fn hash_only(d: &MapDelta) -> (BTreeMap<&'static str, MapDelta>, crate::v4rest::V4Plan) {
        let plan = crate::v4rest::V4Plan { hash: d.clone(), ..Default::default() };
        (BTreeMap::new(), plan)
    }

    #[test]
    fn a_large_write_is_verified_by_one_read_as_strictly_as_key_by_key() {
        if !root() {
            return;
        }
        let caps = Capacities { v4_prefixes: 4096, ..Capacities::default() };
        let mut maps =
            GenerationMaps::create(0, &caps, caps.v4_prefixes, DIR_HASH_FIRST).expect("maps");
        // Every length from /8 to /32, 100 prefixes each.
        let mut d = MapDelta::default();
        for len in 8..=32u32 {
            for i in 1..=100u32 {
                d.upsert.push(&v4(len, i << (32 - len)), &class(len));
            }
        }
        d.upsert.sort();
        let n = d.upsert.len();
        let (deltas, plan) = hash_only(&d);
        maps.apply_delta(&deltas, Some(&plan)).expect("write");
        let _ = n;
        assert_eq!(verified(&maps, &d), [true, true]);
        assert_eq!(
            crate::generation::read_hash(&maps.in_v4, maps::INGRESS_V4).expect("read"),
            d.upsert
        );

        // Removing a tenth: both checks see the keys gone.
        let remove = d.upsert.iter().step_by(10).map(|(k, _)| k.to_vec()).collect();
        let cut = MapDelta { remove, ..MapDelta::default() };
        let (deltas, plan) = hash_only(&cut);
        maps.apply_delta(&deltas, Some(&plan)).expect("remove");
        assert_eq!(verified(&maps, &cut), [true, true]);

        // An entry changed behind the write, one that is missing, one that should be gone:
        // each fails both checks.
        let fd = maps.in_v4.map().fd().as_fd();
        let (k, _) = d.upsert.get(1).expect("an entry");
        crate::batch::update(fd, 8, 8, k, &class(999)).expect("tamper");
        assert_eq!(verified(&maps, &d), [false, false]);
        crate::batch::delete(fd, 8, k).expect("tamper");
        let one = MapDelta { upsert: vec![(k.to_vec(), class(999))].into(), remove: Vec::new() };
        assert_eq!(verified(&maps, &one), [false, false]);
        let gone = &cut.remove[3];
        crate::batch::update(fd, 8, 8, gone, &class(1)).expect("tamper");
        assert_eq!(verified(&maps, &cut), [false, false]);

        // A full write (what bigger maps get) makes the map hold exactly the entries given,
        // whatever it held: here every other prefix of the first set.
        let half: Entries = d
            .upsert
            .iter()
            .step_by(2)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect::<Vec<_>>()
            .into();
        let enc = Encoded { maps: [(maps::INGRESS_V4, half.clone())].into() };
        let stats = maps.write(&enc).expect("full write");
        assert_eq!(maps.read_map(maps::INGRESS_V4).expect("read"), half);
        assert_eq!(stats.written, half.len());
        // Without second-level chunks the program probes the hash at /17-/32 only: the
        // shorter prefixes are in the record.
        let probed: Entries = half
            .iter()
            .filter(|(k, _)| Ipv4LpmKey::from_bytes(k).is_some_and(|k| k.prefix_len > 16))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect::<Vec<_>>()
            .into();
        assert_eq!(read_hash(&maps.in_v4, maps::INGRESS_V4).expect("read"), probed);
        assert_eq!(maps.read_rest().expect("record").len(), half.len() - probed.len());
        assert_eq!(maps.rest_len().expect("record"), half.len() - probed.len());
        assert_eq!(maps.count_map(maps::INGRESS_V4).expect("count"), half.len());
    }
}
