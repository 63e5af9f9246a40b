//! A map whose entries expire after a fixed time and whose size is capped:
//! the reply routes, and the dedup window's ids without a usable timestamp.

use std::collections::VecDeque;
use std::hash::Hash;

use crate::Nanos;

pub(crate) struct ExpiringMap<K, V> {
    /// Each value with the time it was inserted: a slot in `order` acts
    /// on the entry only if the times match, so a key removed and
    /// inserted again is not forgotten by its earlier slot.
    entries: crate::FastMap<K, (Nanos, V)>,
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

    /// Inserts; at capacity, the oldest entry is forgotten first, and
    /// handed back if it was still live.
    pub fn insert(&mut self, key: K, value: V, now: Nanos) -> Option<(K, V)> {
        let mut evicted = None;
        if self.order.len() >= self.capacity {
            if let Some((t, old)) = self.order.pop_front() {
                evicted = self.take_if_inserted_at(&old, t);
            }
        }
        self.entries.insert(key.clone(), (now, value));
        self.order.push_back((now, key));
        evicted
    }

    /// Removes `key`'s entry if it is the one inserted at `t`.
    fn take_if_inserted_at(&mut self, key: &K, t: Nanos) -> Option<(K, V)> {
        if self.entries.get(key).is_some_and(|(at, _)| *at == t) {
            self.entries.remove_entry(key).map(|(k, (_, v))| (k, v))
        } else {
            None
        }
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
        self.entries.get(key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|(_, v)| v)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Forgets `key` now; its slot in the order expires harmlessly later.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key).map(|(_, v)| v)
    }

    /// Live entries with the time they were inserted, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V, Nanos)> {
        self.order.iter().filter_map(|(t, k)| {
            self.entries
                .get_key_value(k)
                .filter(|(_, (at, _))| at == t)
                .map(|(k, (_, v))| (k, v, *t))
        })
    }

    /// When the oldest entry still in the order was inserted (it may have
    /// been removed since: close enough to choose what to evict).
    pub fn oldest(&self) -> Option<Nanos> {
        self.order.front().map(|(t, _)| *t)
    }

    /// Forgets the oldest live entry; `false` if there was none.
    pub fn forget_oldest(&mut self) -> bool {
        while let Some((t, key)) = self.order.pop_front() {
            if self.take_if_inserted_at(&key, t).is_some() {
                return true;
            }
        }
        false
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    /// Forgets every entry older than the lifetime at `now`.
    pub fn expire(&mut self, now: Nanos) {
        self.expire_each(now, |_, _| {});
    }

    /// Forgets every entry older than the lifetime at `now`, handing each
    /// live one to `gone`.
    pub fn expire_each(&mut self, now: Nanos, mut gone: impl FnMut(K, V)) {
        while let Some((t, _)) = self.order.front() {
            if t + self.lifetime > now {
                break;
            }
            if let Some((t, key)) = self.order.pop_front() {
                if let Some((key, value)) = self.take_if_inserted_at(&key, t) {
                    gone(key, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_capacity_evicts_the_oldest() {
        let mut m = ExpiringMap::new(10, 2);
        m.insert("a", 1, 0);
        m.insert("b", 2, 5);
        assert_eq!(m.insert("c", 3, 6), Some(("a", 1)), "evicted at capacity");
        assert!(!m.contains(&"a"));
        let mut expired = Vec::new();
        m.expire_each(15, |k, v| expired.push((k, v)));
        assert_eq!(expired, vec![("b", 2)]);
        assert_eq!(m.get(&"c"), Some(&3));
        m.expire(16);
        assert!(!m.contains(&"c"));
    }

    #[test]
    fn a_key_inserted_again_lives_from_its_new_insertion() {
        let mut m = ExpiringMap::new(10, 8);
        m.insert("a", 1, 0);
        m.remove(&"a");
        m.insert("a", 2, 8);
        m.expire(12);
        assert_eq!(m.get(&"a"), Some(&2), "forgotten by its earlier slot");
        assert_eq!(m.iter().count(), 1);
        m.insert("a", 3, 9);
        m.expire(18);
        assert_eq!(m.get(&"a"), Some(&3));
        m.expire(19);
        assert!(!m.contains(&"a"));
    }
}
