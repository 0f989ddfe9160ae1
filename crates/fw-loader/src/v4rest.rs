//! The ingress IPv4 table split between the hash the program probes and a record it never
//! reads.
//!
//! Why: the ingress program probes `FW_IN_V4` only at lengths longer than the DIR level that
//! answered (`v4_classes` in fw-ebpf): /25-/32 under a /16 with a second-level chunk, /17-/32
//! under one without; a prefix of at most /16, or of /17-/24 under a chunked /16, is answered
//! by the chunks and never looked up. Yet every prefix was inserted into the hash, whose
//! inserts are the largest cost of a full load (about 0.7 µs each on the bench machine, twice
//! per apply). They were kept there only so that reading a generation back gives the table
//! exactly (`decode`, adoption after a restart, `drift`, the diff of an apply that does not
//! trust its cache). Here the hash holds only the prefixes the program can probe, and the
//! others go into a loader-only record: an array map of 4 KiB values (slot 0 a header with the
//! count, then 16-byte `Ipv4LpmKey` + `ClassValue` records in key order), written with one
//! batch, pinned per generation as `FW_IN_V4R_G<n>`, never seen by a program. A generation
//! read back is the union of both, exactly the encoded table.
//!
//! The record is rewritten whole (a new map, then an atomic pin rename) whenever what it holds
//! can change: a change of a prefix it holds or would hold, or a /16 gaining or losing its
//! second-level chunk, which moves that /16's /17-/24 prefixes between the hash and the record
//! (those moves are written into the hash with the rest of its delta). A change that touches
//! neither (any L4 change, a /25-/32 prefix) does not touch it.
//!
//! Placement is checked when a generation is read back: a prefix in the hash that the program
//! cannot probe, or one in the record that it can, or one in both (a generation written by a
//! loader that kept every prefix in the hash, a write interrupted by a crash) marks the
//! generation, and its next write re-sorts the whole table (the hash synced to exactly the
//! probed prefixes, the record rewritten), as a write of bigger maps does.

use std::collections::BTreeSet;
use std::os::fd::AsFd as _;
use std::sync::atomic::Ordering;

use aya::maps::{IterableMap as _, MapData};
use aya_obj::generated::bpf_map_type;
use fw_common::{Bytes, ClassValue, Ipv4LpmKey, V4_DIR_L2_BASE, maps};
use fw_compiler::encode::{Encoded, Entries};

use crate::Error;
use crate::generation::{GenerationMaps, MapDelta};

/// Bytes per value of the record's array.
const REST_VALUE: usize = 4096;
/// Bytes per record: an `Ipv4LpmKey` and a `ClassValue`.
const RECORD: usize = size_of::<Ipv4LpmKey>() + size_of::<ClassValue>();
/// The name the record's pins use for it (as the inner maps' `inner_pin` names).
pub(crate) const REST_NAME: &str = "FW_IN_V4R";

/// What a write of the ingress IPv4 table does to the kernel's maps.
#[derive(Clone, Debug, Default)]
pub(crate) struct V4Plan {
    /// Written into the hash: the probed prefixes that change, and the moves.
    pub hash: MapDelta,
    /// The record's whole new content, when it changes.
    pub rest: Option<Entries>,
    /// Made without trusting the placement (the hash's delta is against what this
    /// generation's hash held): not to be replayed onto another generation.
    pub full: bool,
}

/// Which /16s have a second-level chunk in the encoded chunks `dir`: one bit per /16, built
/// once per plan (a binary search of the chunks per prefix took most of a 100k-prefix plan).
pub(crate) struct Chunked(Vec<u64>);

impl Chunked {
    pub fn of(dir: Option<&Entries>) -> Self {
        let mut bits = vec![0u64; 1 << 10];
        for (k, _) in dir.into_iter().flatten() {
            let Ok(k) = <[u8; 4]>::try_from(k).map(u32::from_le_bytes) else { continue };
            if let Some(x) = k.checked_sub(V4_DIR_L2_BASE).filter(|&x| x < 1 << 16)
                && let Some(w) = bits.get_mut((x >> 6) as usize)
            {
                *w |= 1 << (x & 63);
            }
        }
        Self(bits)
    }

    fn has(&self, x: u32) -> bool {
        self.0.get((x >> 6) as usize).is_some_and(|w| w & (1 << (x & 63)) != 0)
    }
}

/// Whether the ingress program can probe the hash for the encoded key `key`, with the chunks
/// `chunked` (see the module docs). A key that does not parse counts as probed: it goes to
/// the hash, whose write refuses it as before.
pub(crate) fn probed(key: &[u8], chunked: &Chunked) -> bool {
    let Some(k) = Ipv4LpmKey::from_bytes(key) else { return true };
    let len = k.prefix_len;
    len > 24 || (len > 16 && !chunked.has(u32::from_be_bytes(k.addr) >> 16))
}

/// How many entries of the encoded ingress IPv4 table the program can probe, which is what
/// the hash holds once the table is written.
pub(crate) fn probed_len(encoded: &Encoded) -> usize {
    let chunked = Chunked::of(encoded.maps.get(maps::INGRESS_V4_DIR));
    let v4 = encoded.maps.get(maps::INGRESS_V4);
    v4.into_iter().flatten().filter(|(k, _)| probed(k, &chunked)).count()
}

/// The entries of `v4` the program never probes under `chunked`.
fn unprobed(v4: Option<&Entries>, chunked: &Chunked) -> Entries {
    let mut out = Entries::new();
    for (k, v) in v4.into_iter().flatten() {
        if !probed(k, chunked) {
            out.push(k, v);
        }
    }
    out
}

/// The /16s whose second-level chunk `dir_delta` adds or removes, going from `old_dir` to
/// `new_dir`.
fn flipped(dir_delta: Option<&MapDelta>, old_dir: &Chunked, new_dir: &Chunked) -> BTreeSet<u32> {
    let Some(d) = dir_delta else { return BTreeSet::new() };
    let keys = d.upsert.iter().map(|(k, _)| k).chain(d.remove.iter().map(Vec::as_slice));
    keys.filter_map(|k| <[u8; 4]>::try_from(k).ok().map(u32::from_le_bytes))
        .filter_map(|k| k.checked_sub(V4_DIR_L2_BASE))
        .filter(|&x| old_dir.has(x) != new_dir.has(x))
        .collect()
}

impl GenerationMaps {
    /// What writing `deltas` (going from `old` to `new`) does to the ingress IPv4 hash and
    /// record; `None` when it touches neither. `shared` is the plan of the other generation's
    /// last write, for a replay of the same deltas onto the same state (`old` unknown).
    pub(crate) fn plan_v4(
        &self,
        old: Option<&Encoded>,
        new: &Encoded,
        deltas: &std::collections::BTreeMap<&'static str, MapDelta>,
        shared: Option<&V4Plan>,
    ) -> Result<Option<V4Plan>, Error> {
        let (v4d, dird) = (deltas.get(maps::INGRESS_V4), deltas.get(maps::INGRESS_V4_DIR));
        let unsorted = self.v4_unsorted.load(Ordering::Relaxed);
        if !unsorted && v4d.is_none() && dird.is_none() {
            return Ok(None);
        }
        let new_v4 = new.maps.get(maps::INGRESS_V4);
        let new_dir = &Chunked::of(new.maps.get(maps::INGRESS_V4_DIR));
        let old = match old {
            Some(old) if !unsorted => old,
            _ => match shared {
                Some(plan) if !unsorted && !plan.full => return Ok(Some(plan.clone())),
                // Re-sort the whole table: the hash synced to exactly the probed prefixes.
                _ => return self.plan_v4_full(new).map(Some),
            },
        };
        let old_v4 = old.maps.get(maps::INGRESS_V4);
        let old_dir = &Chunked::of(old.maps.get(maps::INGRESS_V4_DIR));
        let mut plan = V4Plan::default();
        let mut rest_changes = false;
        if let Some(d) = v4d {
            for (k, v) in &d.upsert {
                let was = old_v4.is_some_and(|o| o.binary_search(k).is_ok());
                let (now_probed, was_probed) = (probed(k, new_dir), probed(k, old_dir));
                if now_probed {
                    plan.hash.upsert.push(k, v);
                } else if was && was_probed {
                    plan.hash.remove.push(k.to_vec());
                }
                rest_changes |= !now_probed || (was && !was_probed);
            }
            for k in &d.remove {
                if probed(k, old_dir) {
                    plan.hash.remove.push(k.clone());
                } else {
                    rest_changes = true;
                }
            }
        }
        // The /17-/24 prefixes of a /16 whose chunk came or went move (those the delta
        // writes or removes are placed above).
        // (Nothing moves out of an empty table: a first load skips the search.)
        let held_any = old_v4.is_some_and(|o| !o.is_empty());
        let moved = if held_any { flipped(dird, old_dir, new_dir) } else { BTreeSet::new() };
        rest_changes |= !moved.is_empty();
        let in_delta = |k: &[u8]| {
            v4d.is_some_and(|d| {
                d.upsert.binary_search(k).is_ok()
                    || d.remove.binary_search_by(|r| r.as_slice().cmp(k)).is_ok()
            })
        };
        for x in moved {
            let Some(v4) = new_v4 else { break };
            for len in 17..=24u32 {
                let addr = (x << 16).to_be_bytes();
                let from = Ipv4LpmKey { prefix_len: len, addr }.to_bytes();
                let mut i = v4.binary_search(&from).unwrap_or_else(|i| i);
                while let Some((k, v)) = v4.get(i) {
                    let Some(key) = Ipv4LpmKey::from_bytes(k) else { break };
                    if key.prefix_len != len || key.addr[..2] != addr[..2] {
                        break;
                    }
                    if !in_delta(k) {
                        if probed(k, new_dir) {
                            plan.hash.upsert.push(k, v);
                        } else {
                            plan.hash.remove.push(k.to_vec());
                        }
                    }
                    i += 1;
                }
            }
        }
        plan.hash.upsert.sort();
        plan.hash.remove.sort_unstable();
        if rest_changes {
            plan.rest = Some(unprobed(new_v4, new_dir));
        }
        Ok(Some(plan))
    }

    /// [`GenerationMaps::plan_v4`] without trusting the placement: the hash made to hold
    /// exactly the probed prefixes of `new` (whatever it holds, read in one batch), the record
    /// rewritten.
    /// How many entries the hash holds once `plan` is written (at most), or
    /// [`Error::StaleBase`] when that is more than its capacity, before anything is written:
    /// then a whole apply finds the table does not fit and gives the generation a bigger hash.
    /// Counted from what this process wrote while that bound fits; else from the hash itself.
    pub(crate) fn v4_hash_after(&self, plan: &V4Plan) -> Result<usize, Error> {
        let cap = self.v4_hash as usize;
        let fits = |n: usize| if n > cap { Err(Error::StaleBase) } else { Ok(n) };
        if plan.full {
            // A full plan syncs the hash to exactly its upserts.
            return fits(plan.hash.upsert.len());
        }
        // An upper bound: every upsert new, every removal present.
        let (up, removed) = (plan.hash.upsert.len(), plan.hash.remove.len());
        if let Some(held) = self.v4_hash_len
            && held.saturating_sub(removed) + up <= cap
        {
            return Ok(held.saturating_sub(removed) + up);
        }
        // Not known, or perhaps too many: what the hash holds and which upserts are new.
        let held = crate::batch::Snapshot::read(
            self.in_v4.map().fd().as_fd(),
            size_of::<Ipv4LpmKey>(),
            size_of::<ClassValue>(),
        )
        .map_err(Error::batch(maps::INGRESS_V4))?;
        let mut at = held.cursor();
        let gone = plan.hash.remove.iter().filter(|k| at.get(k).is_some()).count();
        let mut at = held.cursor();
        let new = plan.hash.upsert.iter().filter(|(k, _)| at.get(k).is_none()).count();
        fits(held.len() - gone + new)
    }

    pub(crate) fn plan_v4_full(&self, new: &Encoded) -> Result<V4Plan, Error> {
        let v4 = new.maps.get(maps::INGRESS_V4);
        let dir = &Chunked::of(new.maps.get(maps::INGRESS_V4_DIR));
        let mut plan = V4Plan { full: true, ..V4Plan::default() };
        for (k, v) in v4.into_iter().flatten() {
            if probed(k, dir) {
                plan.hash.upsert.push(k, v);
            }
        }
        plan.hash.upsert.sort();
        let present = crate::batch::Snapshot::read(
            self.in_v4.map().fd().as_fd(),
            size_of::<Ipv4LpmKey>(),
            size_of::<ClassValue>(),
        )
        .map_err(Error::batch(maps::INGRESS_V4))?;
        plan.hash.remove = present
            .iter()
            .filter(|(k, _)| plan.hash.upsert.binary_search(k).is_err())
            .map(|(k, _)| k.to_vec())
            .collect();
        plan.rest = Some(unprobed(v4, dir));
        Ok(plan)
    }

    /// Writes `plan`'s record, when it has one, into a new array map that replaces this
    /// generation's (the caller pins it: [`GenerationMaps::pin_rest`]); returns how many
    /// prefixes it holds.
    pub(crate) fn write_rest(&mut self, plan: &V4Plan) -> Result<usize, Error> {
        let Some(rest) = &plan.rest else { return Ok(0) };
        let name = maps::INGRESS_V4;
        let mut bytes = Vec::with_capacity(REST_VALUE + rest.len() * RECORD);
        bytes.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        bytes.resize(REST_VALUE, 0);
        for (k, v) in rest {
            if k.len() + v.len() != RECORD {
                return Err(Error::Entry { map: name, reason: "key or value size" });
            }
            bytes.extend_from_slice(k);
            bytes.extend_from_slice(v);
        }
        bytes.resize(bytes.len().div_ceil(REST_VALUE) * REST_VALUE, 0);
        let slots = bytes.len() / REST_VALUE;
        let map = crate::generation::create(
            &format!("{REST_NAME}.g{}", self.generation),
            bpf_map_type::BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            REST_VALUE,
            u32::try_from(slots).map_err(|_| Error::Entry { map: name, reason: "too many" })?,
            0,
        )?;
        let aya::maps::Map::Array(data) = map else {
            return Err(Error::Entry { map: name, reason: "the record is not an array" });
        };
        let keys: Vec<u8> = (0..slots as u32).flat_map(u32::to_le_bytes).collect();
        crate::batch::update(data.fd().as_fd(), size_of::<u32>(), REST_VALUE, &keys, &bytes)
            .map_err(Error::batch(name))?;
        self.in_v4_rest = Some(data);
        Ok(rest.len())
    }

    /// Pins the record as this generation's under `root` (pinned under a temporary name, then
    /// renamed over the old pin: the name never points at nothing).
    pub(crate) fn pin_rest(&self, root: &std::path::Path) -> Result<(), Error> {
        let Some(data) = &self.in_v4_rest else { return Ok(()) };
        let dst = root.join(crate::generation::inner_pin(REST_NAME, self.generation));
        let tmp =
            root.join(format!("{}_tmp", crate::generation::inner_pin(REST_NAME, self.generation)));
        let _ = std::fs::remove_file(&tmp);
        data.pin(&tmp).map_err(crate::pin::pin_err(&tmp))?;
        crate::pin::private(&tmp, 0o600)?;
        std::fs::rename(&tmp, &dst).map_err(crate::pin::io(&dst))
    }

    /// Generation `generation`'s record from its pin under `root`, if there is one.
    pub(crate) fn rest_pinned(root: &std::path::Path, generation: u32) -> Option<MapData> {
        MapData::from_pin(root.join(crate::generation::inner_pin(REST_NAME, generation))).ok()
    }

    /// How many prefixes the record holds, from its header alone (what a status needs).
    pub(crate) fn rest_len(&self) -> Result<usize, Error> {
        let Some(data) = &self.in_v4_rest else { return Ok(0) };
        let mut header = vec![0u8; REST_VALUE];
        let found = crate::generation::elem_cmd(
            crate::generation::BPF_MAP_LOOKUP_ELEM,
            data.fd().as_fd(),
            Some(&0u32.to_le_bytes()),
            &mut header,
        )
        .map_err(|source| Error::MapSyscall { map: maps::INGRESS_V4, source })?;
        let count =
            header.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
        match count.and_then(|c| usize::try_from(c).ok()) {
            Some(c) if found => Ok(c),
            _ => Err(Error::Entry {
                map: maps::INGRESS_V4,
                reason: "the prefix record is malformed",
            }),
        }
    }

    /// The record's prefixes (`encode`'s format, in key order); none without a record.
    pub(crate) fn read_rest(&self) -> Result<Entries, Error> {
        let name = maps::INGRESS_V4;
        let Some(data) = &self.in_v4_rest else { return Ok(Entries::new()) };
        let (_, bytes, _) =
            crate::batch::lookup_all(data.fd().as_fd(), size_of::<u32>(), REST_VALUE)
                .map_err(Error::batch(name))?;
        let bad = || Error::Entry { map: name, reason: "the prefix record is malformed" };
        let count = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .and_then(|c| usize::try_from(c).ok())
            .ok_or_else(bad)?;
        let records = bytes
            .get(REST_VALUE..)
            .and_then(|r| r.get(..count.checked_mul(RECORD)?))
            .ok_or_else(bad)?;
        let mut out = Entries::with_capacity(count);
        let key = size_of::<Ipv4LpmKey>();
        for r in records.chunks_exact(RECORD) {
            out.push(&r[..key], &r[key..]);
        }
        Ok(out)
    }

    /// The ingress IPv4 table as the encoding has it: the hash's prefixes and the record's,
    /// given the chunks `dir` the generation holds. Marks the generation for a re-sorting
    /// write when a prefix is in the wrong one or in both (see the module docs); a prefix in
    /// both reads with the hash's value (the one packets see).
    pub(crate) fn read_v4(&self, dir: &Entries) -> Result<Entries, Error> {
        let hash = crate::generation::read_hash(&self.in_v4, maps::INGRESS_V4)?;
        let rest = self.read_rest()?;
        let dir = &Chunked::of(Some(dir));
        let mut misplaced =
            hash.iter().any(|(k, _)| !probed(k, dir)) || rest.iter().any(|(k, _)| probed(k, dir));
        let mut out = Entries::with_capacity(hash.len() + rest.len());
        let (mut h, mut r) = (hash.iter().peekable(), rest.iter().peekable());
        loop {
            match (h.peek(), r.peek()) {
                (Some(a), Some(b)) if a.0 == b.0 => {
                    misplaced = true;
                    out.push(a.0, a.1);
                    h.next();
                    r.next();
                }
                (Some(a), Some(b)) if a.0 < b.0 => {
                    out.push(a.0, a.1);
                    h.next();
                }
                (_, Some(b)) => {
                    out.push(b.0, b.1);
                    r.next();
                }
                (Some(a), None) => {
                    out.push(a.0, a.1);
                    h.next();
                }
                (None, None) => break,
            }
        }
        // The record is written in key order; sorting here keeps a hand-made one readable.
        out.sort();
        if misplaced {
            self.v4_unsorted.store(true, Ordering::Relaxed);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(len: u32, a: [u8; 4]) -> Vec<u8> {
        Ipv4LpmKey { prefix_len: len, addr: a }.to_bytes().to_vec()
    }

    #[test]
    fn a_prefix_is_probed_only_past_the_level_that_answers() {
        // A chunk for 10.1.0.0/16 only.
        let dir: Entries =
            vec![((V4_DIR_L2_BASE + (10 << 8 | 1)).to_le_bytes().to_vec(), vec![0])].into();
        let dir = &Chunked::of(Some(&dir));
        for (len, a, want) in [
            (8, [10, 0, 0, 0], false),
            (16, [10, 1, 0, 0], false),
            (17, [10, 1, 128, 0], false),
            (24, [10, 1, 2, 0], false),
            (25, [10, 1, 2, 128], true),
            (32, [10, 1, 2, 3], true),
            (17, [10, 2, 128, 0], true),
            (24, [10, 2, 2, 0], true),
            (16, [10, 2, 0, 0], false),
        ] {
            assert_eq!(probed(&key(len, a), dir), want, "/{len} {a:?}");
        }
        assert!(probed(&[1, 2, 3], dir), "an odd key goes to the hash, which refuses it");
    }
}
