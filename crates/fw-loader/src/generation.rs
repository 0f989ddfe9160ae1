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
//! encoded entries (stale keys are deleted), whatever it held before. It works entry by entry,
//! so it is not atomic: write only a generation packets are not using, then flip.

use std::collections::{BTreeMap, BTreeSet};

use aya::Pod;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData};
use aya_obj::generated::bpf_map_type;
use fw_common::{
    Bytes, CONFIG_ENTRIES, ClassValue, DirectionConfig, Ipv4LpmKey, Ipv6LpmKey, L4LpmKey, L4Value,
    WorkloadKey, WorkloadValue, maps,
};
use fw_compiler::encode::{Encoded, Entries};
use fw_compiler::mapstate::Capacities;

use crate::Error;

/// `BPF_F_NO_PREALLOC`: the kernel requires it for LPM tries (and the templates set it).
const BPF_F_NO_PREALLOC: u32 = 1;

/// The inner maps of one generation.
pub(crate) struct GenerationMaps {
    pub in_v4: LpmTrie<MapData, [u8; 4], ClassValue>,
    pub in_v6: LpmTrie<MapData, [u8; 16], ClassValue>,
    pub in_l4: LpmTrie<MapData, [u8; 12], L4Value>,
    pub eg_v4: LpmTrie<MapData, [u8; 4], ClassValue>,
    pub eg_v6: LpmTrie<MapData, [u8; 16], ClassValue>,
    pub eg_l4: LpmTrie<MapData, [u8; 12], L4Value>,
    pub config: Array<MapData, DirectionConfig>,
    pub workloads: HashMap<MapData, WorkloadKey, WorkloadValue>,
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
fn create(
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

impl GenerationMaps {
    /// Creates the empty inner maps of generation `generation`.
    pub fn create(generation: u32, caps: &Capacities) -> Result<Self, Error> {
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
            in_v4: lpm(&name(maps::INGRESS_V4), caps.v4_prefixes)?,
            in_v6: lpm(&name(maps::INGRESS_V6), caps.v6_prefixes)?,
            in_l4: lpm(&name(maps::INGRESS_L4), caps.l4_entries)?,
            eg_v4: lpm(&name(maps::EGRESS_V4), caps.v4_prefixes)?,
            eg_v6: lpm(&name(maps::EGRESS_V6), caps.v6_prefixes)?,
            eg_l4: lpm(&name(maps::EGRESS_L4), caps.l4_entries)?,
            config: Array::try_from(config).map_err(Error::map(config_name))?,
            workloads: HashMap::try_from(workloads).map_err(Error::map(workloads_name))?,
        })
    }

    /// Makes every map but `FW_WORKLOADS` hold exactly the encoded entries. The caller has
    /// validated `encoded` (`fw_compiler::encode::decode`), so every key and value parses.
    pub fn write(&mut self, encoded: &Encoded) -> Result<WriteStats, Error> {
        let mut stats = WriteStats::default();
        for (&name, entries) in &encoded.maps {
            stats += match name {
                maps::INGRESS_V4 => sync_lpm(&mut self.in_v4, name, v4_entries(name, entries)?)?,
                maps::INGRESS_V6 => sync_lpm(&mut self.in_v6, name, v6_entries(name, entries)?)?,
                maps::INGRESS_L4 => sync_lpm(&mut self.in_l4, name, l4_entries(name, entries)?)?,
                maps::EGRESS_V4 => sync_lpm(&mut self.eg_v4, name, v4_entries(name, entries)?)?,
                maps::EGRESS_V6 => sync_lpm(&mut self.eg_v6, name, v6_entries(name, entries)?)?,
                maps::EGRESS_L4 => sync_lpm(&mut self.eg_l4, name, l4_entries(name, entries)?)?,
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
            let index = <[u8; 4]>::try_from(k.as_slice())
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

    /// Reads every map but `FW_WORKLOADS` back in `encode`'s format (entries sorted by key
    /// bytes), so a write can be verified by comparing with what was written.
    pub fn read(&self) -> Result<Encoded, Error> {
        let mut out = BTreeMap::new();
        out.insert(maps::INGRESS_V4, read_lpm(&self.in_v4, maps::INGRESS_V4, v4_key_bytes)?);
        out.insert(maps::INGRESS_V6, read_lpm(&self.in_v6, maps::INGRESS_V6, v6_key_bytes)?);
        out.insert(maps::INGRESS_L4, read_lpm(&self.in_l4, maps::INGRESS_L4, l4_key_bytes)?);
        out.insert(maps::EGRESS_V4, read_lpm(&self.eg_v4, maps::EGRESS_V4, v4_key_bytes)?);
        out.insert(maps::EGRESS_V6, read_lpm(&self.eg_v6, maps::EGRESS_V6, v6_key_bytes)?);
        out.insert(maps::EGRESS_L4, read_lpm(&self.eg_l4, maps::EGRESS_L4, l4_key_bytes)?);
        let mut config = Vec::new();
        for index in 0..CONFIG_ENTRIES {
            let value = self.config.get(&index, 0).map_err(Error::map(maps::CONFIG))?;
            config.push((index.to_le_bytes().to_vec(), value.to_bytes().to_vec()));
        }
        out.insert(maps::CONFIG, config);
        Ok(Encoded { maps: out })
    }
}

/// Makes an LPM trie hold exactly `desired`: deletes the keys it has that are not desired,
/// then writes every desired entry.
fn sync_lpm<K: Pod + Ord, V: Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    name: &'static str,
    desired: Vec<((u32, K), V)>,
) -> Result<WriteStats, Error> {
    let wanted: BTreeSet<(u32, K)> = desired.iter().map(|(k, _)| *k).collect();
    let present: Vec<Key<K>> = map.keys().collect::<Result<_, _>>().map_err(Error::map(name))?;
    let mut stats = WriteStats::default();
    for key in present {
        if !wanted.contains(&(key.prefix_len(), key.data())) {
            map.remove(&key).map_err(Error::map(name))?;
            stats.deleted += 1;
        }
    }
    for ((prefix_len, data), value) in desired {
        map.insert(&Key::new(prefix_len, data), value, 0).map_err(Error::map(name))?;
        stats.written += 1;
    }
    Ok(stats)
}

fn read_lpm<K: Pod, V: Pod + Bytes>(
    map: &LpmTrie<MapData, K, V>,
    name: &'static str,
    key_bytes: fn(u32, K) -> Vec<u8>,
) -> Result<Entries, Error> {
    let mut entries = Vec::new();
    for item in map.iter() {
        let (key, value) = item.map_err(Error::map(name))?;
        entries.push((key_bytes(key.prefix_len(), key.data()), value.to_bytes().as_ref().to_vec()));
    }
    entries.sort_unstable();
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

fn v4_entries(name: &'static str, e: &Entries) -> Result<Parsed<[u8; 4], ClassValue>, Error> {
    parse_entries(name, e, |k: Ipv4LpmKey| (k.prefix_len, k.addr))
}

fn v6_entries(name: &'static str, e: &Entries) -> Result<Parsed<[u8; 16], ClassValue>, Error> {
    parse_entries(name, e, |k: Ipv6LpmKey| (k.prefix_len, k.addr))
}

fn l4_entries(name: &'static str, e: &Entries) -> Result<Parsed<[u8; 12], L4Value>, Error> {
    parse_entries(name, e, |k: L4LpmKey| (k.prefix_len, l4_data(&k)))
}

/// The LPM data of an L4 key as the kernel program builds it: class, workload, L4 word.
fn l4_data(k: &L4LpmKey) -> [u8; 12] {
    let mut d = [0u8; 12];
    d[0..4].copy_from_slice(&k.class);
    d[4..8].copy_from_slice(&k.workload);
    d[8..12].copy_from_slice(&k.l4);
    d
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
