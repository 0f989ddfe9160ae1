//! The connection-tracking table from user space: listing the flows the programs recorded
//! (for `fwctl` and tests) and seeding entries (tests use it to put a flow at a chosen age,
//! which real traffic cannot do without waiting out a timeout).
//!
//! Times are `bpf_ktime_get_ns`, i.e. `CLOCK_MONOTONIC` in nanoseconds; [`monotonic_ns`]
//! reads the same clock here.

use aya::maps::{Array, HashMap, MapData};
use fw_common::conntrack::{ConntrackKey, ConntrackValue, ct_seen_epoch, ct_seen_slot};
use fw_common::maps;

use crate::{Dataplane, Error};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock the conntrack timestamps use.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec for the duration of the call; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl Dataplane {
    /// Every recorded flow (expired ones included: the table only forgets by LRU eviction).
    pub fn conntrack_entries(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>, Error> {
        let name = maps::CONNTRACK;
        if self.ebpf.is_none() {
            // Adopted from pins.
            let table: HashMap<_, ConntrackKey, ConntrackValue> =
                HashMap::try_from(self.open_pinned_map(name)?).map_err(Error::map(name))?;
            return table.iter().map(|item| item.map_err(Error::map(name))).collect();
        }
        let map = self.ebpf.as_ref().and_then(|e| e.map(name)).ok_or(Error::MissingMap(name))?;
        let table: HashMap<_, ConntrackKey, ConntrackValue> =
            HashMap::try_from(map).map_err(Error::map(name))?;
        table.iter().map(|item| item.map_err(Error::map(name))).collect()
    }

    /// Writes one flow into the table, as the egress recorder would (its seen-filter slot
    /// first, see `fw_common::conntrack`).
    pub fn conntrack_insert(
        &mut self,
        key: &ConntrackKey,
        value: &ConntrackValue,
    ) -> Result<(), Error> {
        self.conntrack_mark_seen(&[(*key, *value)])?;
        let name = maps::CONNTRACK;
        if self.ebpf.is_none() {
            // Adopted from pins.
            let mut table: HashMap<_, ConntrackKey, ConntrackValue> =
                HashMap::try_from(self.open_pinned_map(name)?).map_err(Error::map(name))?;
            return table.insert(key, value, 0).map_err(Error::map(name));
        }
        let map =
            self.ebpf.as_mut().and_then(|e| e.map_mut(name)).ok_or(Error::MissingMap(name))?;
        let mut table: HashMap<_, ConntrackKey, ConntrackValue> =
            HashMap::try_from(map).map_err(Error::map(name))?;
        table.insert(key, value, 0).map_err(Error::map(name))
    }

    /// Writes the seen-filter slots of `entries` (`fw_common::conntrack`), each the later of
    /// what it holds and the entry's last write, so the ingress program does not skip the
    /// table for them. Every user-space writer of the table calls it before writing.
    pub(crate) fn conntrack_mark_seen(
        &mut self,
        entries: &[(ConntrackKey, ConntrackValue)],
    ) -> Result<(), Error> {
        let name = maps::CONNTRACK_SEEN;
        if self.ebpf.is_none() {
            // Adopted from pins.
            let mut filter: Array<MapData, u32> =
                Array::try_from(self.open_pinned_map(name)?).map_err(Error::map(name))?;
            return mark_seen(&mut filter, entries);
        }
        let map =
            self.ebpf.as_mut().and_then(|e| e.map_mut(name)).ok_or(Error::MissingMap(name))?;
        let mut filter: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(Error::map(name))?;
        mark_seen(&mut filter, entries)
    }
}

/// [`Dataplane::conntrack_mark_seen`] on an opened filter.
fn mark_seen<T: std::borrow::BorrowMut<MapData>>(
    filter: &mut Array<T, u32>,
    entries: &[(ConntrackKey, ConntrackValue)],
) -> Result<(), Error> {
    let name = maps::CONNTRACK_SEEN;
    for (key, value) in entries {
        let slot = ct_seen_slot(key);
        let epoch = ct_seen_epoch(value.last_seen_ns);
        let held = filter.get(&slot, 0).map_err(Error::map(name))?;
        if held < epoch {
            filter.set(slot, epoch, 0).map_err(Error::map(name))?;
        }
    }
    Ok(())
}
