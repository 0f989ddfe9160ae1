//! Reading the programs' events: the ring buffer of `fw_common::events::Event` records and
//! the per-CPU limiter's counts of emitted and dropped events.
//!
//! [`Events`] drains what is in the ring without blocking ([`Events::drain`]), or waits with
//! `poll(2)` until the kernel signals data or a timeout passes ([`Events::wait`]); its file
//! descriptor is exposed so a daemon can put it into its own event loop instead. The kernel
//! side never blocks on a slow reader: when the ring is full, events are dropped and counted
//! ([`EventStats::dropped`]), as are events over the per-CPU rate limit.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use fw_common::events::{Event, EventLimiter};
use fw_common::maps;

use crate::{Dataplane, Error};

/// The event reader.
pub struct Events {
    ring: RingBuf<MapData>,
    limit: PerCpuArray<MapData, EventLimiter>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

/// Totals of the per-CPU limiters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Events written to the ring.
    pub emitted: u64,
    /// Events dropped by the rate limit or because the ring was full.
    pub dropped: u64,
}

impl Events {
    /// Every event in the ring now, oldest first. Records of an unexpected size (an object
    /// from another version) are skipped.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(e) = Event::from_record(&item) {
                out.push(e);
            }
        }
        out
    }

    /// Waits until the ring has data or `timeout` passes, then drains it (empty on timeout).
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<Event>, Error> {
        let events = self.drain();
        if !events.is_empty() {
            return Ok(events);
        }
        let mut fd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut fd, 1, ms) } < 0 {
            let source = std::io::Error::last_os_error();
            if source.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Io { path: maps::EVENTS.into(), source });
            }
        }
        Ok(self.drain())
    }

    /// The limiters' totals over every CPU.
    pub fn stats(&self) -> Result<EventStats, Error> {
        let per_cpu = self.limit.get(&0, 0).map_err(Error::map(maps::EVENT_LIMIT))?;
        Ok(per_cpu.iter().fold(EventStats::default(), |a, l| EventStats {
            emitted: a.emitted + l.emitted,
            dropped: a.dropped + l.dropped,
        }))
    }
}

impl AsFd for Events {
    /// The ring buffer's descriptor: readable when events are waiting.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl Dataplane {
    /// The event reader. The ring has one consumer position, so there is one reader: on a
    /// data plane this process loaded, the maps are moved into it and a second call fails
    /// with `MissingMap`; on one adopted from its pins, the maps are opened from the pins
    /// (`fwctl events`), and two readers would split the events between them.
    pub fn events(&mut self) -> Result<Events, Error> {
        let (ring_map, limit_map) = match self.ebpf.as_mut() {
            Some(ebpf) => (
                ebpf.take_map(maps::EVENTS).ok_or(Error::MissingMap(maps::EVENTS))?,
                ebpf.take_map(maps::EVENT_LIMIT).ok_or(Error::MissingMap(maps::EVENT_LIMIT))?,
            ),
            // Adopted from pins: open the pinned maps (each call opens its own handle; the
            // ring's consumer position is the kernel's, shared by every reader).
            None => (self.open_pinned_map(maps::EVENTS)?, self.open_pinned_map(maps::EVENT_LIMIT)?),
        };
        let ring = RingBuf::try_from(ring_map).map_err(Error::map(maps::EVENTS))?;
        let limit = PerCpuArray::try_from(limit_map).map_err(Error::map(maps::EVENT_LIMIT))?;
        Ok(Events { ring, limit })
    }
}
