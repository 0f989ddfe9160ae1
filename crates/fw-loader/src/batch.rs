//! Batched map commands: `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH` and
//! `BPF_MAP_LOOKUP_BATCH` through `bpf(2)` on a map's descriptor (aya 0.14 has no batch API).
//!
//! Why: a full load writes every prefix of a 100k-prefix state into each generation, and
//! verifies it. Entry by entry that is one syscall per write and two per verified key (about
//! 1 µs each, the syscall entry and the per-call copies as much as the map work); one batch
//! call per map moves the same entries with one syscall, the kernel looping over them.
//!
//! Which map types take which command (kernel 5.6 and later; checked against real maps by the
//! tests below): hashes and arrays take all three; an LPM trie takes update and delete
//! batches (the generic per-element loop) but not lookup batches, so a trie is read with
//! `BPF_MAP_GET_NEXT_KEY` and lookups as before. Arrays cannot delete.
//!
//! The entries are given as contiguous buffers of fixed-size keys and values, which are the
//! bytes the kernel takes (`encode`'s key and value bytes are the kernel's). A batch that
//! fails part-way stops at the failing element, and the kernel reports how many it did:
//! [`BatchError`] says so. Nothing here retries: the apply protocol treats any failure as a
//! failed write of the standby generation (whose record was cleared first).

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya_obj::generated::bpf_cmd;

/// A batched command that failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The kernel refused the command after doing `done` of `total` elements (`total` is
    /// `None` for a lookup, which does not know how many there are).
    #[error("{op}: failed after {done} entries{}: {source}", total.map(|t| format!(" of {t}")).unwrap_or_default())]
    Kernel {
        op: &'static str,
        done: usize,
        total: Option<usize>,
        #[source]
        source: io::Error,
    },
    /// The buffers do not hold whole keys and values of the map's sizes.
    #[error(
        "{op}: {len} bytes are not a whole number of {size}-byte items, or keys and values disagree in count"
    )]
    Size { op: &'static str, len: usize, size: usize },
}

/// The `batch` member of `union bpf_attr` (`BPF_MAP_*_BATCH`), as the kernel declares it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    /// Where to resume (a token the previous call wrote into `out_batch`); 0 to start.
    in_batch: u64,
    /// Where the kernel writes the token of the next call (lookups only).
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: how many elements the buffers hold (or have room for); out: how many were done.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Elements per lookup call: up to 8192, fewer for large values (buffers of at most about
/// 2 MiB), at least 256. A hash's lookup batch returns whole buckets, so this must exceed the
/// longest bucket (it does by far).
fn lookup_chunk(key_size: usize, value_size: usize) -> usize {
    ((2 << 20) / (key_size + value_size)).clamp(256, 8192)
}

fn raw_fd(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
}

/// One batch command; returns the kernel's result and the element count it wrote back.
fn call(cmd: bpf_cmd, attr: &mut BatchAttr) -> (io::Result<()>, usize) {
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the batch commands, the exact size is
    // passed, and every pointer in it (set by the callers) points at buffers that outlive the
    // call and hold `count` elements of the map's key and value sizes (lookups: room for
    // them; tokens: at least the map's key size and 8 bytes).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    let result = if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    (result, attr.count as usize)
}

/// Writes `keys[i]` -> `values[i]` for every `i` (flags `BPF_ANY`): `keys` holds whole keys of
/// `key_size` bytes, `values` as many values of `value_size` bytes. Returns how many.
pub(crate) fn update(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    keys: &[u8],
    values: &[u8],
) -> Result<usize, BatchError> {
    let op = "BPF_MAP_UPDATE_BATCH";
    let n = whole(op, keys.len(), key_size)?;
    if whole(op, values.len(), value_size)? != n {
        return Err(BatchError::Size { op, len: values.len(), size: value_size });
    }
    write_batch(bpf_cmd::BPF_MAP_UPDATE_BATCH, op, fd, key_size, keys, values.as_ptr() as u64, n)
}

/// An update or delete batch (`cmd`) of the `n` keys of `keys`, with `values` the address of
/// the values for an update (0 for a delete).
fn write_batch(
    cmd: bpf_cmd,
    op: &'static str,
    fd: BorrowedFd<'_>,
    key_size: usize,
    keys: &[u8],
    values: u64,
    n: usize,
) -> Result<usize, BatchError> {
    if n == 0 {
        return Ok(0);
    }
    let map_fd = raw_fd(fd).map_err(|source| kernel(op, 0, n, source))?;
    let count =
        u32::try_from(n).map_err(|_| BatchError::Size { op, len: keys.len(), size: key_size })?;
    let mut attr =
        BatchAttr { keys: keys.as_ptr() as u64, values, count, map_fd, ..BatchAttr::default() };
    finish(op, n, call(cmd, &mut attr))
}

fn kernel(op: &'static str, done: usize, total: usize, source: io::Error) -> BatchError {
    BatchError::Kernel { op, done, total: Some(total), source }
}

/// The outcome of an update or delete batch of `n` elements: all done, or an error saying how
/// many were (the kernel stops at the first element that fails).
fn finish(
    op: &'static str,
    n: usize,
    (result, did): (io::Result<()>, usize),
) -> Result<usize, BatchError> {
    match result {
        Ok(()) if did == n => Ok(n),
        Ok(()) => Err(kernel(op, did, n, io::Error::from_raw_os_error(libc::EIO))),
        Err(source) => Err(kernel(op, did, n, source)),
    }
}

/// Deletes every key of `keys` (whole keys of `key_size` bytes); a key the map does not hold
/// fails the batch (`ENOENT`), as a single delete would. Returns how many.
pub(crate) fn delete(
    fd: BorrowedFd<'_>,
    key_size: usize,
    keys: &[u8],
) -> Result<usize, BatchError> {
    let op = "BPF_MAP_DELETE_BATCH";
    let n = whole(op, keys.len(), key_size)?;
    write_batch(bpf_cmd::BPF_MAP_DELETE_BATCH, op, fd, key_size, keys, 0, n)
}

/// Every entry of a hash or an array, in the kernel's iteration order: `(keys, values, n)`
/// with `n` keys of `key_size` bytes and `n` values of `value_size` bytes, contiguous.
pub(crate) fn lookup_all(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> Result<(Vec<u8>, Vec<u8>, usize), BatchError> {
    let op = "BPF_MAP_LOOKUP_BATCH";
    if key_size == 0 || value_size == 0 {
        return Err(BatchError::Size { op, len: 0, size: key_size.min(value_size) });
    }
    let map_fd =
        raw_fd(fd).map_err(|source| BatchError::Kernel { op, done: 0, total: None, source })?;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut n = 0;
    // Resume tokens: a hash writes a u32 bucket index, an array (the generic lookup) the last
    // key; room for either, 8-byte aligned.
    let words = key_size.div_ceil(8).max(1);
    let (mut token_in, mut token_out) = (vec![0u64; words], vec![0u64; words]);
    let mut first = true;
    let chunk = lookup_chunk(key_size, value_size);
    loop {
        keys.resize((n + chunk) * key_size, 0);
        values.resize((n + chunk) * value_size, 0);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys[n * key_size..].as_mut_ptr() as u64,
            values: values[n * value_size..].as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd,
            ..BatchAttr::default()
        };
        let (result, did) = call(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        let did = did.min(chunk);
        n += did;
        match result {
            Ok(()) => {}
            // The end of the map (the last call may still have returned entries).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(source) => return Err(BatchError::Kernel { op, done: n, total: None, source }),
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
    keys.truncate(n * key_size);
    values.truncate(n * value_size);
    Ok((keys, values, n))
}

/// How many whole items of `size` bytes `len` bytes are.
fn whole(op: &'static str, len: usize, size: usize) -> Result<usize, BatchError> {
    if size == 0 || !len.is_multiple_of(size) {
        return Err(BatchError::Size { op, len, size });
    }
    Ok(len / size)
}

/// The entries of a map read with [`lookup_all`], sorted by key bytes, for exact lookups by
/// key without a syscall each (what verifying a large write needs).
pub(crate) struct Snapshot {
    keys: Vec<u8>,
    values: Vec<u8>,
    key_size: usize,
    value_size: usize,
    /// Per entry, its key's first 16 bytes as a big-endian number (which orders like the
    /// bytes) and its index, in key order: sorting and searching compare integers, not
    /// slices (a `memcmp` call per comparison took most of a 100k-entry verification).
    order: Vec<(u128, u32)>,
}

/// The first 16 bytes of `key` (zero-padded) as a big-endian number.
fn head(key: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let n = key.len().min(16);
    b[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(b)
}

impl Snapshot {
    /// Reads every entry of the map (see [`lookup_all`]).
    pub fn read(
        fd: BorrowedFd<'_>,
        key_size: usize,
        value_size: usize,
    ) -> Result<Self, BatchError> {
        let (keys, values, n) = lookup_all(fd, key_size, value_size)?;
        let n = u32::try_from(n).map_err(|_| BatchError::Size {
            op: "BPF_MAP_LOOKUP_BATCH",
            len: keys.len(),
            size: key_size,
        })?;
        let mut order: Vec<(u128, u32)> = (0..n)
            .map(|i| (head(&keys[i as usize * key_size..(i as usize + 1) * key_size]), i))
            .collect();
        let mut snap = Self { keys, values, key_size, value_size, order: Vec::new() };
        if key_size <= 16 {
            order.sort_unstable_by_key(|&(h, _)| h);
        } else {
            order.sort_unstable_by(|a, b| {
                a.0.cmp(&b.0).then_with(|| snap.key(a.1).cmp(snap.key(b.1)))
            });
        }
        snap.order = order;
        Ok(snap)
    }

    fn key(&self, i: u32) -> &[u8] {
        let i = i as usize;
        &self.keys[i * self.key_size..(i + 1) * self.key_size]
    }

    fn value(&self, i: u32) -> &[u8] {
        let i = i as usize;
        &self.values[i * self.value_size..(i + 1) * self.value_size]
    }

    /// How many entries the map held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// A reader of values by key that is fastest when asked in key order (a delta's removed
    /// keys, its upserted entries): each lookup searches forward from the previous one with
    /// doubling steps, so a sorted run of lookups walks the snapshot once instead of paying a
    /// cache-missing binary search each. Keys asked out of order are still found.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor { snap: self, at: 0 }
    }

    /// Where `key` is in `order[from..]`, or where it would go.
    fn search_from(&self, from: usize, key: &[u8]) -> Result<usize, usize> {
        let h = head(key);
        let cmp = |&(oh, i): &(u128, u32)| oh.cmp(&h).then_with(|| self.key(i).cmp(key));
        // Double the step until past `key`, then search the last step's span.
        let (mut lo, mut step) = (from, 1);
        while let Some(e) = self.order.get(lo + step - 1) {
            if cmp(e).is_ge() {
                break;
            }
            lo += step;
            step *= 2;
        }
        let hi = (lo + step).min(self.order.len());
        match self.order.get(lo..hi).map(|span| span.binary_search_by(cmp)) {
            Some(Ok(i)) => Ok(lo + i),
            Some(Err(i)) => Err(lo + i),
            None => Err(self.order.len()),
        }
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.order.iter().map(|&(_, i)| (self.key(i), self.value(i)))
    }
}

/// See [`Snapshot::cursor`].
pub(crate) struct Cursor<'a> {
    snap: &'a Snapshot,
    /// Where the previous lookup ended: later keys are at or after it.
    at: usize,
}

impl<'a> Cursor<'a> {
    /// The value the map held under `key` (an exact match; `None` for a key of another size).
    pub fn get(&mut self, key: &[u8]) -> Option<&'a [u8]> {
        let snap = self.snap;
        if key.len() != snap.key_size {
            return None;
        }
        let behind = self
            .at
            .checked_sub(1)
            .and_then(|p| snap.order.get(p))
            .is_some_and(|&(_, i)| snap.key(i) >= key);
        let from = if behind { 0 } else { self.at };
        match snap.search_from(from, key) {
            Ok(at) => {
                self.at = at + 1;
                snap.order.get(at).map(|&(_, i)| snap.value(i))
            }
            Err(at) => {
                self.at = at;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use aya::maps::{Map, MapData};
    use aya_obj::generated::bpf_map_type;

    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            use std::io::Write as _;
            let _ = writeln!(io::stderr(), "SKIPPED batch tests: need root (create maps)");
        }
        root
    }

    fn map(kind: bpf_map_type, key: usize, value: usize, max: u32, flags: u32) -> Map {
        crate::generation::create("fw_batch_test", kind, key, value, max, flags).expect("a map")
    }

    fn data(m: &Map) -> &MapData {
        match m {
            Map::HashMap(d) | Map::Array(d) | Map::LpmTrie(d) => d,
            _ => panic!("unexpected map kind"),
        }
    }

    /// `n` 8-byte keys and 12-byte values, both derived from the index.
    fn entries(n: u32) -> (Vec<u8>, Vec<u8>) {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for i in 0..n {
            keys.extend_from_slice(&u64::from(i.wrapping_mul(2_654_435_761)).to_le_bytes());
            values.extend_from_slice(&[i.to_le_bytes(), (!i).to_le_bytes(), [7; 4]].concat());
        }
        (keys, values)
    }

    #[test]
    fn a_hash_is_written_read_back_and_emptied_in_batches() {
        if !root() {
            return;
        }
        // More than one lookup chunk, without preallocation as the loader's hashes.
        let n = 20_000;
        let m = map(bpf_map_type::BPF_MAP_TYPE_HASH, 8, 12, 32_768, 1);
        let fd = data(&m).fd().as_fd();
        let (keys, values) = entries(n);
        assert_eq!(update(fd, 8, 12, &keys, &values).expect("update"), n as usize);
        let snap = Snapshot::read(fd, 8, 12).expect("lookup");
        assert_eq!(snap.len(), n as usize);
        let mut want: Vec<(&[u8], &[u8])> = keys.chunks(8).zip(values.chunks(12)).collect();
        want.sort();
        assert!(snap.iter().eq(want.iter().copied()));
        assert_eq!(snap.cursor().get(&keys[8..16]), Some(&values[12..24]));
        assert_eq!(snap.cursor().get(&[0xff; 8]), None);
        // A cursor finds the same in key order, out of order, and misses what is absent.
        let mut cursor = snap.cursor();
        for (k, v) in &want {
            assert_eq!(cursor.get(k), Some(*v));
        }
        for (k, v) in want.iter().rev().step_by(997) {
            assert_eq!(
                (cursor.get(k), cursor.get(&[0xff; 8]), cursor.get(&[0; 3])),
                (Some(*v), None, None)
            );
        }
        // Overwriting keeps one entry per key.
        let (_, other) = entries(n + 1);
        update(fd, 8, 12, &keys[..8], &other[12..24]).expect("overwrite");
        let snap = Snapshot::read(fd, 8, 12).expect("lookup");
        assert_eq!((snap.len(), snap.cursor().get(&keys[..8])), (n as usize, Some(&other[12..24])));
        // Deleting half, then a key that is gone: refused, with what was done.
        let half = (n / 2) as usize * 8;
        assert_eq!(delete(fd, 8, &keys[..half]).expect("delete"), n as usize / 2);
        assert_eq!(lookup_all(fd, 8, 12).expect("lookup").2, n as usize / 2);
        match delete(fd, 8, &keys[half - 8..half + 8]) {
            Err(BatchError::Kernel { done: 0, total: Some(2), source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_map_reads_as_nothing_and_sizes_are_checked() {
        if !root() {
            return;
        }
        let m = map(bpf_map_type::BPF_MAP_TYPE_HASH, 8, 12, 16, 1);
        let fd = data(&m).fd().as_fd();
        assert_eq!(lookup_all(fd, 8, 12).expect("lookup").2, 0);
        assert_eq!(update(fd, 8, 12, &[], &[]).expect("nothing"), 0);
        assert!(matches!(update(fd, 8, 12, &[0; 9], &[0; 12]), Err(BatchError::Size { .. })));
        assert!(matches!(update(fd, 8, 12, &[0; 16], &[0; 12]), Err(BatchError::Size { .. })));
        // A full map refuses the element past its capacity; the ones before are in.
        let (keys, values) = entries(17);
        match update(fd, 8, 12, &keys, &values) {
            Err(BatchError::Kernel { done: 16, total: Some(17), .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(lookup_all(fd, 8, 12).expect("lookup").2, 16);
    }

    #[test]
    fn an_array_is_written_and_read_in_batches() {
        if !root() {
            return;
        }
        let n = 9000u32;
        let m = map(bpf_map_type::BPF_MAP_TYPE_ARRAY, 4, 12, n, 0);
        let fd = data(&m).fd().as_fd();
        let keys: Vec<u8> = (0..n).flat_map(u32::to_le_bytes).collect();
        let (_, values) = entries(n);
        update(fd, 4, 12, &keys, &values).expect("update");
        let (k, v, got) = lookup_all(fd, 4, 12).expect("lookup");
        assert_eq!((k, v, got), (keys, values, n as usize));
    }

    #[test]
    fn an_lpm_trie_takes_update_and_delete_batches() {
        if !root() {
            return;
        }
        let m = map(bpf_map_type::BPF_MAP_TYPE_LPM_TRIE, 8, 12, 64, 1);
        let fd = data(&m).fd().as_fd();
        // (prefix length, address) keys: 10.0.0.0/8, 10.1.0.0/16, 10.1.2.3/32.
        let key = |len: u32, a: [u8; 4]| [len.to_le_bytes(), a].concat();
        let keys = [key(8, [10, 0, 0, 0]), key(16, [10, 1, 0, 0]), key(32, [10, 1, 2, 3])].concat();
        let (_, values) = entries(3);
        assert_eq!(update(fd, 8, 12, &keys, &values).expect("update"), 3);
        let trie: aya::maps::lpm_trie::LpmTrie<&MapData, [u8; 4], [u8; 12]> =
            aya::maps::lpm_trie::LpmTrie::try_from(&m).expect("a trie");
        assert_eq!(trie.keys().count(), 3);
        assert_eq!(delete(fd, 8, &keys[8..]).expect("delete"), 2);
        assert_eq!(trie.keys().count(), 1);
    }
}
