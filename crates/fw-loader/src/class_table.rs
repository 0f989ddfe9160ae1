//! Placement in the ingress class table (`fw_common::maps::INGRESS_L4_CLASS_TABLE`): a
//! two-choice cuckoo table of the exact hash's address-class entries, which the ingress
//! program reads with array lookups instead of hash calls.
//!
//! The table is derived: the exact hash stays the record, and a table that cannot hold every
//! class entry says so in its header, which sends the program back to the hash. That keeps
//! placement simple (a bounded random walk of evictions, no rehashing, no stash): when a walk
//! gives up, the table is marked incomplete until the next full write builds it again.
//!
//! Placement works on chunks held in memory and knows nothing of maps: a full write starts
//! from an empty table, a delta reads the chunks it touches through a closure, and the caller
//! writes back [`ClassTable::dirty`]. That also lets the unit tests below check it without a
//! kernel.

use std::collections::{BTreeMap, BTreeSet};

use fw_common::{
    L4_CLASS_BUCKET_SLOTS, L4_CLASS_TABLE_CHUNKS, L4_CLASS_TABLE_INCOMPLETE, L4ClassSlot,
    L4ClassTableChunk, L4Value, l4_class_bucket_at, l4_class_buckets,
};

/// Evictions one insertion may make before the table gives up. With two-slot buckets a walk
/// this long fails only when the table is nearly full.
const MAX_KICKS: usize = 500;

/// The class table's chunks that placement has read or changed, and whether it still holds
/// every class entry.
pub(crate) struct ClassTable {
    chunks: BTreeMap<u32, L4ClassTableChunk>,
    dirty: BTreeSet<u32>,
    complete: bool,
    /// xorshift32 state: which bucket and slot an eviction takes (fixed seed, so a state
    /// always gets the same table).
    rng: u32,
}

impl ClassTable {
    /// An empty, complete table with every chunk in memory (a full write).
    pub fn empty() -> Self {
        Self {
            chunks: (0..L4_CLASS_TABLE_CHUNKS).map(|c| (c, L4ClassTableChunk::default())).collect(),
            dirty: (0..L4_CLASS_TABLE_CHUNKS).collect(),
            complete: true,
            rng: 0x2545_f491,
        }
    }

    /// A table whose chunks are read on demand (a delta), complete as its header says.
    pub fn lazy(header: &L4ClassTableChunk) -> Self {
        Self {
            chunks: BTreeMap::new(),
            dirty: BTreeSet::new(),
            complete: header.incomplete != L4_CLASS_TABLE_INCOMPLETE,
            rng: 0x2545_f491,
        }
    }

    /// The table of exactly `entries` ((class, L4 word) -> value), complete unless one found
    /// no place.
    pub fn build(entries: impl IntoIterator<Item = (u32, u32, L4Value)>) -> Self {
        let mut t = Self::empty();
        for (class, word, value) in entries {
            let never = |_: u32| -> Result<L4ClassTableChunk, std::convert::Infallible> {
                unreachable!("a full table holds every chunk")
            };
            let Ok(placed) = t.insert(class, word, value, never);
            if !placed {
                break;
            }
        }
        t
    }

    /// Whether the table holds every class entry.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The header chunk for this table.
    pub fn header(&self) -> L4ClassTableChunk {
        let incomplete = if self.complete { 0 } else { L4_CLASS_TABLE_INCOMPLETE };
        L4ClassTableChunk { incomplete, ..L4ClassTableChunk::default() }
    }

    /// The chunks changed since this table was made, by index.
    pub fn dirty(&self) -> impl Iterator<Item = (u32, &L4ClassTableChunk)> {
        self.dirty.iter().map(|c| (*c, &self.chunks[c]))
    }

    /// A chunk, read through `read` the first time.
    fn chunk<E>(
        &mut self,
        index: u32,
        read: &mut impl FnMut(u32) -> Result<L4ClassTableChunk, E>,
    ) -> Result<&mut L4ClassTableChunk, E> {
        Ok(match self.chunks.entry(index) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(read(index)?),
        })
    }

    /// Slot `slot` of bucket `bucket`.
    fn slot<E>(
        &mut self,
        bucket: u32,
        slot: usize,
        read: &mut impl FnMut(u32) -> Result<L4ClassTableChunk, E>,
    ) -> Result<L4ClassSlot, E> {
        let (c, b) = l4_class_bucket_at(bucket);
        Ok(self.chunk(c, read)?.buckets[b].slots[slot])
    }

    /// Writes `value` into slot `slot` of bucket `bucket`.
    fn put<E>(
        &mut self,
        bucket: u32,
        slot: usize,
        value: L4ClassSlot,
        read: &mut impl FnMut(u32) -> Result<L4ClassTableChunk, E>,
    ) -> Result<(), E> {
        let (c, b) = l4_class_bucket_at(bucket);
        self.chunk(c, read)?.buckets[b].slots[slot] = value;
        self.dirty.insert(c);
        Ok(())
    }

    /// Where (`class`, `word`) is held: (bucket, slot).
    fn find<E>(
        &mut self,
        class: u32,
        word: u32,
        read: &mut impl FnMut(u32) -> Result<L4ClassTableChunk, E>,
    ) -> Result<Option<(u32, usize)>, E> {
        let (b1, b2) = l4_class_buckets(class, word);
        for bucket in [b1, b2] {
            for slot in 0..L4_CLASS_BUCKET_SLOTS {
                let s = self.slot(bucket, slot, read)?;
                if s.class == class && s.word == word {
                    return Ok(Some((bucket, slot)));
                }
            }
        }
        Ok(None)
    }

    /// Removes the entry of (`class`, `word`) if held. Nothing to do in an incomplete table
    /// (the program does not read it).
    pub fn remove<E>(
        &mut self,
        class: u32,
        word: u32,
        mut read: impl FnMut(u32) -> Result<L4ClassTableChunk, E>,
    ) -> Result<(), E> {
        if !self.complete {
            return Ok(());
        }
        if let Some((bucket, slot)) = self.find(class, word, &mut read)? {
            self.put(bucket, slot, L4ClassSlot::default(), &mut read)?;
        }
        Ok(())
    }

    /// Holds `value` for (`class`, `word`): overwrites the entry if held, else places it,
    /// evicting entries to their other bucket as needed. False when no place was found: the
    /// table is then incomplete (an entry was left out) and stays so.
    pub fn insert<E>(
        &mut self,
        class: u32,
        word: u32,
        value: L4Value,
        mut read: impl FnMut(u32) -> Result<L4ClassTableChunk, E>,
    ) -> Result<bool, E> {
        if !self.complete {
            return Ok(false);
        }
        let read = &mut read;
        if let Some((bucket, slot)) = self.find(class, word, read)? {
            self.put(bucket, slot, L4ClassSlot { class, word, value }, read)?;
            return Ok(true);
        }
        let mut moving = L4ClassSlot { class, word, value };
        // The bucket `moving` was just evicted from (none for the new entry).
        let mut from = None;
        for _ in 0..MAX_KICKS {
            let (b1, b2) = l4_class_buckets(moving.class, moving.word);
            for bucket in [b1, b2] {
                for slot in 0..L4_CLASS_BUCKET_SLOTS {
                    if self.slot(bucket, slot, read)?.class == 0 {
                        self.put(bucket, slot, moving, read)?;
                        return Ok(true);
                    }
                }
            }
            let r = self.next_random();
            let bucket = match from {
                Some(f) if f == b1 => b2,
                Some(f) if f == b2 => b1,
                _ if r & 1 == 0 => b1,
                _ => b2,
            };
            let slot = (r >> 1) as usize % L4_CLASS_BUCKET_SLOTS;
            let evicted = self.slot(bucket, slot, read)?;
            self.put(bucket, slot, moving, read)?;
            moving = evicted;
            from = Some(bucket);
        }
        self.complete = false;
        Ok(false)
    }

    fn next_random(&mut self) -> u32 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.rng = x;
        x
    }
}

/// Whether `chunks` (every bucket chunk, in index order) and `header` are a complete table
/// of exactly `expected` ((class, L4 word) -> value), each entry in one of its buckets, or
/// an incomplete one (which the program does not read, so any content is acceptable).
pub(crate) fn holds_exactly(
    header: &L4ClassTableChunk,
    chunks: &[L4ClassTableChunk],
    expected: &BTreeMap<(u32, u32), L4Value>,
) -> bool {
    if header.incomplete == L4_CLASS_TABLE_INCOMPLETE {
        return true;
    }
    if *header != L4ClassTableChunk::default() || chunks.len() != L4_CLASS_TABLE_CHUNKS as usize {
        return false;
    }
    let mut held = BTreeMap::new();
    for (c, chunk) in (0u32..).zip(chunks) {
        if chunk.incomplete != 0 || chunk._pad != 0 {
            return false;
        }
        for (b, bucket) in (0u32..).zip(&chunk.buckets) {
            let index = c * chunk.buckets.len() as u32 + b;
            for s in &bucket.slots {
                if s.class == 0 {
                    if *s != L4ClassSlot::default() {
                        return false;
                    }
                    continue;
                }
                let (b1, b2) = l4_class_buckets(s.class, s.word);
                if index != b1 && index != b2 || held.insert((s.class, s.word), s.value).is_some() {
                    return false;
                }
            }
        }
    }
    held == *expected
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use fw_common::{ACTION_ALLOW, ACTION_DENY, L4_CLASS_BUCKETS};

    use super::*;

    fn value(rule: u32) -> L4Value {
        L4Value { verdict_action: ACTION_ALLOW, verdict_rule: rule, ..L4Value::default() }
    }

    fn chunks(t: &ClassTable) -> Vec<L4ClassTableChunk> {
        (0..L4_CLASS_TABLE_CHUNKS).map(|c| t.chunks[&c]).collect()
    }

    #[test]
    fn a_built_table_holds_exactly_its_entries() {
        let entries: Vec<_> = (1..=5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) | 1, 6 << 24 | 443, value(i)))
            .collect();
        let t = ClassTable::build(entries.iter().copied());
        assert!(t.complete());
        let expected: BTreeMap<_, _> = entries.iter().map(|(c, w, v)| ((*c, *w), *v)).collect();
        assert!(holds_exactly(&t.header(), &chunks(&t), &expected));
        // One entry fewer, or one value changed, is not the same table.
        let mut fewer = expected.clone();
        fewer.pop_first();
        assert!(!holds_exactly(&t.header(), &chunks(&t), &fewer));
        let mut changed = expected.clone();
        changed.values_mut().next().unwrap().verdict_action = ACTION_DENY;
        assert!(!holds_exactly(&t.header(), &chunks(&t), &changed));
    }

    #[test]
    fn an_overfull_table_says_it_is_incomplete() {
        let slots = L4_CLASS_BUCKETS as usize * L4_CLASS_BUCKET_SLOTS;
        let t = ClassTable::build((1..=slots as u32 + 1).map(|i| (i, 17 << 24 | 53, value(i))));
        assert!(!t.complete());
        assert_eq!(t.header().incomplete, L4_CLASS_TABLE_INCOMPLETE);
        // An incomplete table is not read by the program: any content passes.
        assert!(holds_exactly(&t.header(), &chunks(&t), &BTreeMap::new()));
    }

    #[test]
    fn deltas_move_entries_in_place() {
        let mut t = ClassTable::build((1..=3000u32).map(|i| (i, 6 << 24 | 22, value(i))));
        let mut expected: BTreeMap<_, _> =
            (1..=3000u32).map(|i| ((i, 6 << 24 | 22), value(i))).collect();
        let never = |_: u32| -> Result<L4ClassTableChunk, Infallible> { unreachable!() };
        // Remove every third, overwrite every fifth, add new ones.
        for i in (1..=3000u32).step_by(3) {
            let Ok(()) = t.remove(i, 6 << 24 | 22, never);
            expected.remove(&(i, 6 << 24 | 22));
        }
        for i in (1..=3000u32).step_by(5) {
            let Ok(placed) = t.insert(i, 6 << 24 | 22, value(i + 10_000), never);
            assert!(placed);
            expected.insert((i, 6 << 24 | 22), value(i + 10_000));
        }
        for i in 5000..6000u32 {
            let Ok(placed) = t.insert(i, 17 << 24 | 53, value(i), never);
            assert!(placed);
            expected.insert((i, 17 << 24 | 53), value(i));
        }
        assert!(holds_exactly(&t.header(), &chunks(&t), &expected));
    }

    #[test]
    fn a_lazy_table_reads_and_writes_only_what_it_touches() {
        let full = ClassTable::build((1..=100u32).map(|i| (i, 6 << 24 | 80, value(i))));
        let stored = chunks(&full);
        let mut reads = BTreeSet::new();
        let mut t = ClassTable::lazy(&full.header());
        let read = |c: u32| -> Result<L4ClassTableChunk, Infallible> {
            reads.insert(c);
            Ok(stored[c as usize])
        };
        let Ok(()) = t.remove(7, 6 << 24 | 80, read);
        let (b1, b2) = l4_class_buckets(7, 6 << 24 | 80);
        let touched: BTreeSet<u32> = [b1, b2].map(|b| l4_class_bucket_at(b).0).into();
        // The entry's first bucket, and its second only when the first does not hold it.
        assert!(!reads.is_empty() && reads.is_subset(&touched));
        assert!(t.dirty().all(|(c, _)| touched.contains(&c)));
        assert_eq!(t.dirty().count(), 1);
        // A table whose header says incomplete is not maintained.
        let marked =
            L4ClassTableChunk { incomplete: L4_CLASS_TABLE_INCOMPLETE, ..Default::default() };
        let mut off = ClassTable::lazy(&marked);
        let fail = |_: u32| -> Result<L4ClassTableChunk, ()> { Err(()) };
        assert_eq!(off.insert(1, 2, value(1), fail), Ok(false));
        assert_eq!(off.remove(1, 2, fail), Ok(()));
    }

    #[test]
    fn misplaced_or_duplicated_entries_fail_the_check() {
        let t = ClassTable::build([(9, 6 << 24 | 443, value(1))]);
        let expected = BTreeMap::from([((9, 6 << 24 | 443), value(1))]);
        let mut moved = chunks(&t);
        let (b1, b2) = l4_class_buckets(9, 6 << 24 | 443);
        let (c, b) = l4_class_bucket_at(b1);
        let slot = moved[c as usize].buckets[b].slots.iter().position(|s| s.class == 9);
        let (c, b) = if slot.is_some() { (c, b) } else { l4_class_bucket_at(b2) };
        let s = moved[c as usize].buckets[b].slots.iter().position(|s| s.class == 9).unwrap();
        let entry = moved[c as usize].buckets[b].slots[s];
        // The same entry in a bucket that is neither of its two.
        let other = (0..L4_CLASS_BUCKETS).find(|x| *x != b1 && *x != b2).unwrap();
        let (oc, ob) = l4_class_bucket_at(other);
        moved[oc as usize].buckets[ob].slots[0] = entry;
        assert!(!holds_exactly(&t.header(), &moved, &expected));
        moved[c as usize].buckets[b].slots[s] = L4ClassSlot::default();
        assert!(!holds_exactly(&t.header(), &moved, &expected));
        // Twice in its own buckets.
        let mut twice = chunks(&t);
        let (c1, bb1) = l4_class_bucket_at(b1);
        twice[c1 as usize].buckets[bb1].slots = [entry; 2];
        assert!(!holds_exactly(&t.header(), &twice, &expected));
    }
}
