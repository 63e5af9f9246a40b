//! A map whose entries expire after a fixed time and whose size is capped:
//! the shape shared by the dedup window and the reply routes.

use std::collections::VecDeque;
use std::hash::Hash;

use crate::Nanos;

pub(crate) struct ExpiringMap<K, V> {
    entries: crate::FastMap<K, V>,
    /// Insertion order, which is also expiry order: the lifetime is fixed.
    order: VecDeque<(Nanos, K)>,
    lifetime: Nanos,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> ExpiringMap<K, V> {
    pub fn new(lifetime: Nanos, capacity: usize) -> Self {
        ExpiringMap {
            entries: crate::FastMap::default(),
            order: VecDeque::new(),
            lifetime,
            capacity,
        }
    }

    /// Inserts; at capacity, the oldest entry is forgotten first.
    pub fn insert(&mut self, key: K, value: V, now: Nanos) {
        if self.order.len() >= self.capacity {
            if let Some((_, old)) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(key.clone(), value);
        self.order.push_back((now, key));
    }

    /// Room for `additional` more entries (never beyond the capacity), so
    /// a bulk load does not rehash as it grows.
    pub fn reserve(&mut self, additional: usize) {
        let room = additional.min(self.capacity.saturating_sub(self.order.len()));
        self.entries.reserve(room);
        self.order.reserve(room);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Forgets `key` now; its slot in the order expires harmlessly later.
    pub fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Live entries with the time they were inserted, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V, Nanos)> {
        self.order
            .iter()
            .filter_map(|(t, k)| self.entries.get_key_value(k).map(|(k, v)| (k, v, *t)))
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    /// Forgets every entry older than the lifetime at `now`.
    pub fn expire(&mut self, now: Nanos) {
        while let Some((t, _)) = self.order.front() {
            if t + self.lifetime > now {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.entries.remove(&key);
            }
        }
    }
}

/// The dedup window's key for a message id: 64 bits instead of 128.
///
/// A million remembered ids cost about 36 MiB as fingerprints and 61 MiB
/// as whole ids. The price is a false "duplicate" when two different ids
/// share a fingerprint: for random ids, at most one chance in 2^64 divided
/// by the ids in the window (about 5·10^-14 per message with a million).
/// Ids that differ in only one half never collide: each half goes through
/// a bijection before they are combined. The function is fixed (no random
/// key), because snapshots store fingerprints.
pub(crate) fn fingerprint(id: &uuid::Uuid) -> u64 {
    let (high, low) = id.as_u64_pair();
    mix(high ^ mix(low))
}

/// MurmurHash3's 64-bit finaliser: a bijection that spreads every bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_for_ids_that_differ_in_one_half() {
        use std::collections::HashSet;
        let mut seen = HashSet::new();
        for i in 0..1000u64 {
            assert!(seen.insert(fingerprint(&uuid::Uuid::from_u64_pair(7, i))));
            assert!(seen.insert(fingerprint(&uuid::Uuid::from_u64_pair(i + 1000, 7))));
        }
        // Swapped halves are different ids and get different fingerprints.
        assert_ne!(
            fingerprint(&uuid::Uuid::from_u64_pair(1, 2)),
            fingerprint(&uuid::Uuid::from_u64_pair(2, 1))
        );
    }

    #[test]
    fn entries_expire_and_capacity_evicts_the_oldest() {
        let mut m = ExpiringMap::new(10, 2);
        m.insert("a", 1, 0);
        m.insert("b", 2, 5);
        m.insert("c", 3, 6);
        assert!(!m.contains(&"a"), "evicted at capacity");
        m.expire(15);
        assert!(!m.contains(&"b"));
        assert_eq!(m.get(&"c"), Some(&3));
        m.expire(16);
        assert!(!m.contains(&"c"));
    }
}
