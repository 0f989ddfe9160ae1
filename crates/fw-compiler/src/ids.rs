//! Stable ids for rules and address classes.
//!
//! Ids are map keys in the kernel. If they were positions in a sorted list, adding one policy
//! named "aaa" would renumber everything and turn a one-rule change into a rewrite of every
//! entry. So an id is a hash of what identifies the object (FNV-1a: simple, and fixed forever,
//! unlike `std`'s hasher), folded into `1..2^31`, with collisions settled deterministically:
//! keys are placed in order of (hash, key), and a key whose slot is taken moves to the next
//! free one. The same key set always gives the same ids, and a change moves only the ids of
//! keys that collide with it, which at our sizes is rare.

use std::collections::{BTreeMap, HashSet};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// Ids live in `1..=ID_MASK`; 0 means "none" in the data plane, and the top bit is left free.
pub const ID_MASK: u32 = (1 << 31) - 1;

fn slot(hash: u64) -> u32 {
    let folded = (hash ^ (hash >> 32)) as u32 & ID_MASK;
    folded.max(1)
}

/// Assigns an id to every key. Keys must be distinct; the result is independent of their order.
pub fn assign<K: Ord + Clone + AsRef<[u8]>>(keys: impl IntoIterator<Item = K>) -> BTreeMap<K, u32> {
    let mut ordered: Vec<(u32, K)> =
        keys.into_iter().map(|k| (slot(fnv1a(k.as_ref())), k)).collect();
    ordered.sort();
    ordered.dedup_by(|a, b| a.1 == b.1);
    let mut taken = HashSet::with_capacity(ordered.len());
    let mut out = BTreeMap::new();
    for (mut id, key) in ordered {
        while !taken.insert(id) {
            id = if id == ID_MASK { 1 } else { id + 1 };
        }
        out.insert(key, id);
    }
    out
}

/// [`assign`] for keys given as a list: the id of each key, by position, without building a
/// map (equal keys get the same id). Same ids as `assign` for the same keys.
pub fn assign_each<K: Ord + AsRef<[u8]>>(keys: &[K]) -> Vec<u32> {
    let mut order: Vec<(u32, usize)> =
        keys.iter().enumerate().map(|(i, k)| (slot(fnv1a(k.as_ref())), i)).collect();
    // (hash, key) order as in `assign`; equal keys end up next to each other.
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| keys[a.1].cmp(&keys[b.1])));
    let mut taken = HashSet::with_capacity(order.len());
    let mut ids = vec![0; keys.len()];
    let mut previous: Option<usize> = None;
    for (mut id, i) in order {
        if let Some(p) = previous
            && keys[p] == keys[i]
        {
            ids[i] = ids[p];
            continue;
        }
        while !taken.insert(id) {
            id = if id == ID_MASK { 1 } else { id + 1 };
        }
        ids[i] = id;
        previous = Some(i);
    }
    ids
}

/// Appends `n` in decimal, without the formatting machinery (rule keys and summaries write
/// numbers for each of up to hundreds of thousands of rules).
pub(crate) fn push_decimal(s: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    for &d in digits.get(at..).unwrap_or_default() {
        s.push(char::from(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_each_gives_the_ids_of_assign() {
        // Many keys (so slots collide and probe), in no particular order, some repeated.
        let keys: Vec<String> =
            (0..50_000).map(|i| format!("p{}/ingress/#{}", (i * 7919) % 40_000, i % 3)).collect();
        let map = assign(keys.clone());
        let each = assign_each(&keys);
        assert_eq!(each.len(), keys.len());
        for (key, id) in keys.iter().zip(&each) {
            assert_eq!(map[key], *id, "{key}");
        }
        // Forced collisions: every key in one slot range.
        let crowded: Vec<u32> = (0..1000).collect();
        let keys: Vec<[u8; 4]> = crowded.iter().map(|i| i.to_le_bytes()).collect();
        let map = assign(keys.clone());
        assert_eq!(assign_each(&keys), keys.iter().map(|k| map[k]).collect::<Vec<_>>());
    }

    #[test]
    fn ids_are_order_independent_and_distinct() {
        let a = assign(["web/ingress/https", "db/egress/#0", "x"].map(String::from));
        let b = assign(["x", "web/ingress/https", "db/egress/#0"].map(String::from));
        assert_eq!(a, b);
        let ids: HashSet<u32> = a.values().copied().collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|&i| (1..=ID_MASK).contains(&i)));
    }

    #[test]
    fn adding_a_key_keeps_other_ids() {
        let before = assign((0..1000).map(|i| format!("p/ingress/{i}")));
        let mut keys: Vec<String> = before.keys().cloned().collect();
        keys.push("aaa/ingress/new".into());
        let after = assign(keys);
        let moved = before.iter().filter(|(k, v)| after[*k] != **v).count();
        assert_eq!(moved, 0);
    }

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(fnv1a(b""), FNV_OFFSET);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn many_keys_get_distinct_ids() {
        let ids = assign((0..200_000).map(|i| format!("k{i}")));
        let distinct: HashSet<u32> = ids.values().copied().collect();
        assert_eq!(distinct.len(), 200_000);
    }
}
