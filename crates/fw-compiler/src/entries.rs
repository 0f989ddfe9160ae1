//! The key/value byte pairs of one encoded map, packed.
//!
//! Why it is built this way:
//! - Memory. A map of a large policy holds hundreds of thousands of entries of a few bytes
//!   each. As a list of `(Vec<u8>, Vec<u8>)` every key and every value was its own heap
//!   allocation (two per entry, each with its allocator overhead, and hundreds of thousands
//!   of small long-lived blocks that fragment the heap). Here one map is one byte buffer
//!   holding key0 value0 key1 value1 … and one list of end offsets: two allocations per map,
//!   whatever its size. Lengths stay variable (`FW_WORKLOADS` keys are cgroup paths).
//! - Sharing. The content sits behind an `Arc` and is immutable once shared: a clone is a
//!   reference count, so the daemon's desired encoding, the next encoding's unchanged maps and
//!   the loader's cached generation states can all be the same buffers instead of copies.
//!   Building (`push`, `sort`) goes through `Arc::make_mut`, which copies only when the
//!   content is already shared.
//! - Equality is by content, with a pointer comparison first: two handles on one buffer are
//!   equal without reading it.

use std::fmt;
use std::sync::Arc;

#[derive(Clone, Default, PartialEq, Eq)]
struct Packed {
    /// key0 value0 key1 value1 …
    bytes: Vec<u8>,
    /// Per entry the end of its key and the end of its value in `bytes` (an entry starts
    /// where the one before it ends).
    ends: Vec<u32>,
}

/// Key/value byte pairs of one map (sorted by key where `encode` made them); see the module
/// docs. A clone shares the content.
#[derive(Clone, Default)]
pub struct Entries(Arc<Packed>);

impl Entries {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `entries` entries (their bytes are reserved as they come).
    pub fn with_capacity(entries: usize) -> Self {
        Self(Arc::new(Packed { bytes: Vec::new(), ends: Vec::with_capacity(entries * 2) }))
    }

    /// Appends one entry.
    ///
    /// # Panics
    /// When the map's bytes would reach 4 GiB (offsets are `u32`; a map is far smaller).
    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        let p = Arc::make_mut(&mut self.0);
        let end = |bytes: &Vec<u8>| u32::try_from(bytes.len()).expect("a map of under 4 GiB");
        p.bytes.extend_from_slice(key);
        let key_end = end(&p.bytes);
        p.bytes.extend_from_slice(value);
        let value_end = end(&p.bytes);
        p.ends.push(key_end);
        p.ends.push(value_end);
    }

    pub fn len(&self) -> usize {
        self.0.ends.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.0.ends.is_empty()
    }

    /// Entry `i`: its key and value.
    pub fn get(&self, i: usize) -> Option<(&[u8], &[u8])> {
        let p = &*self.0;
        let start = match i.checked_sub(1) {
            Some(prev) => *p.ends.get(prev * 2 + 1)? as usize,
            None => 0,
        };
        let key_end = *p.ends.get(i * 2)? as usize;
        let value_end = *p.ends.get(i * 2 + 1)? as usize;
        Some((p.bytes.get(start..key_end)?, p.bytes.get(key_end..value_end)?))
    }

    pub fn first(&self) -> Option<(&[u8], &[u8])> {
        self.get(0)
    }

    pub fn last(&self) -> Option<(&[u8], &[u8])> {
        self.len().checked_sub(1).and_then(|i| self.get(i))
    }

    /// The entries in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter { entries: self, front: 0, back: self.len() }
    }

    /// The entries in order, as owned pairs (for tests and for editing by hand).
    pub fn to_vec(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    /// Sorts the entries by key bytes, then by value bytes (the order `encode` emits and a
    /// read-back produces).
    pub fn sort(&mut self) {
        let n = self.len();
        let sorted = (1..n).all(|i| self.get(i - 1) <= self.get(i));
        if sorted {
            self.shrink_to_fit();
            return;
        }
        // The entries as slices (a short-lived list of pointers), sorted, then copied in order.
        let mut order: Vec<(&[u8], &[u8])> = self.iter().collect();
        order.sort_unstable();
        let mut fresh = Entries(Arc::new(Packed {
            bytes: Vec::with_capacity(self.0.bytes.len()),
            ends: Vec::with_capacity(self.0.ends.len()),
        }));
        for (k, v) in order {
            fresh.push(k, v);
        }
        *self = fresh;
    }

    /// Gives back the room reserved beyond the content, unless the content is shared (then
    /// it is left as it is rather than copied).
    pub fn shrink_to_fit(&mut self) {
        if let Some(p) = Arc::get_mut(&mut self.0) {
            p.bytes.shrink_to_fit();
            p.ends.shrink_to_fit();
        }
    }

    /// The index of the entry with key `key`, or where it would go (`slice::binary_search`'s
    /// contract); the entries must be sorted by key.
    pub fn binary_search(&self, key: &[u8]) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid).map(|(k, _)| k.cmp(key)) {
                Some(std::cmp::Ordering::Less) => lo = mid + 1,
                Some(std::cmp::Ordering::Greater) | None => hi = mid,
                Some(std::cmp::Ordering::Equal) => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// The value of the entry with key `key`; the entries must be sorted by key.
    pub fn value_of(&self, key: &[u8]) -> Option<&[u8]> {
        self.binary_search(key).ok().and_then(|i| self.get(i)).map(|(_, v)| v)
    }

    /// Whether both handles share one content (then they are equal without comparing it).
    pub fn shares(&self, other: &Entries) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The bytes held on the heap for the content (not counting the `Arc` header).
    pub fn heap_bytes(&self) -> usize {
        self.0.bytes.capacity() + self.0.ends.capacity() * std::mem::size_of::<u32>()
    }
}

impl PartialEq for Entries {
    fn eq(&self, other: &Self) -> bool {
        self.shares(other) || *self.0 == *other.0
    }
}

impl Eq for Entries {}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(K, V)> for Entries {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut out = Entries::with_capacity(iter.size_hint().0);
        out.extend(iter);
        out
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> Extend<(K, V)> for Entries {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.push(k.as_ref(), v.as_ref());
        }
    }
}

impl From<Vec<(Vec<u8>, Vec<u8>)>> for Entries {
    fn from(v: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        v.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Entries {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// [`Entries::iter`].
#[derive(Clone, Debug)]
pub struct Iter<'a> {
    entries: &'a Entries,
    front: usize,
    back: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        let e = self.entries.get(self.front);
        self.front += 1;
        e
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.back.saturating_sub(self.front);
        (n, Some(n))
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        self.back -= 1;
        self.entries.get(self.back)
    }
}

impl ExactSizeIterator for Iter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(e: &Entries) -> Vec<(Vec<u8>, Vec<u8>)> {
        e.to_vec()
    }

    #[test]
    fn entries_keep_variable_lengths_in_order() {
        let mut e = Entries::new();
        assert!(e.is_empty() && e.first().is_none() && e.last().is_none());
        e.push(b"/sys/fs/cgroup/a", &[1, 0, 0, 0]);
        e.push(b"", b"");
        e.push(&[7], &[]);
        assert_eq!(e.len(), 3);
        assert_eq!(e.get(0), Some((&b"/sys/fs/cgroup/a"[..], &[1u8, 0, 0, 0][..])));
        assert_eq!(e.get(1), Some((&b""[..], &b""[..])));
        assert_eq!(e.get(2), Some((&[7u8][..], &[][..])));
        assert_eq!(e.get(3), None);
        assert_eq!(e.iter().len(), 3);
        assert_eq!(e.iter().rev().map(|(k, _)| k.len()).collect::<Vec<_>>(), [1, 0, 16]);
        let v = pairs(&e);
        assert_eq!(Entries::from(v.clone()), e);
        assert_eq!(format!("{e:?}"), format!("{:?}", e.iter().collect::<Vec<_>>()));
    }

    #[test]
    fn sorting_and_searching_go_by_key_bytes() {
        let mut e: Entries =
            [(vec![3u8], vec![0u8]), (vec![1, 5], vec![9]), (vec![1], vec![2]), (vec![2], vec![])]
                .into_iter()
                .collect();
        e.sort();
        let keys: Vec<Vec<u8>> = e.iter().map(|(k, _)| k.to_vec()).collect();
        assert_eq!(keys, [vec![1], vec![1, 5], vec![2], vec![3]]);
        assert_eq!(e.binary_search(&[1, 5]), Ok(1));
        assert_eq!(e.binary_search(&[2, 0]), Err(3));
        assert_eq!(e.binary_search(&[0]), Err(0));
        assert_eq!(e.binary_search(&[4]), Err(4));
        assert_eq!(e.value_of(&[1]), Some(&[2u8][..]));
        assert_eq!(e.value_of(&[9]), None);
    }

    #[test]
    fn clones_share_until_changed_and_compare_by_content() {
        let a: Entries = [(vec![1u8], vec![1u8])].into_iter().collect();
        let mut b = a.clone();
        assert!(a.shares(&b) && a == b);
        b.push(&[2], &[2]);
        assert!(!a.shares(&b) && a != b);
        assert_eq!(a.len(), 1, "the shared content was copied, not changed");
        let c: Entries = [(vec![1u8], vec![1u8])].into_iter().collect();
        assert!(!a.shares(&c) && a == c);
        // The same bytes split differently are different entries.
        let d: Entries = [(vec![1u8, 1], vec![])].into_iter().collect();
        assert_ne!(c, d);
    }
}
