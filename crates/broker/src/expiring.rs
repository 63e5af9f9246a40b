//! A map whose entries expire after a fixed time and whose size is capped:
//! the reply routes, and the dedup window's ids without a usable timestamp.

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

    /// Inserts; at capacity, the oldest entry is forgotten first, and
    /// handed back if it was still live.
    pub fn insert(&mut self, key: K, value: V, now: Nanos) -> Option<(K, V)> {
        let mut evicted = None;
        if self.order.len() >= self.capacity {
            if let Some((_, old)) = self.order.pop_front() {
                evicted = self.entries.remove_entry(&old);
            }
        }
        self.entries.insert(key.clone(), value);
        self.order.push_back((now, key));
        evicted
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

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Forgets `key` now; its slot in the order expires harmlessly later.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key)
    }

    /// Live entries with the time they were inserted, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V, Nanos)> {
        self.order
            .iter()
            .filter_map(|(t, k)| self.entries.get_key_value(k).map(|(k, v)| (k, v, *t)))
    }

    /// When the oldest entry still in the order was inserted (it may have
    /// been removed since: close enough to choose what to evict).
    pub fn oldest(&self) -> Option<Nanos> {
        self.order.front().map(|(t, _)| *t)
    }

    /// Forgets the oldest live entry; `false` if there was none.
    pub fn forget_oldest(&mut self) -> bool {
        while let Some((_, key)) = self.order.pop_front() {
            if self.entries.remove(&key).is_some() {
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
            if let Some((_, key)) = self.order.pop_front() {
                if let Some((key, value)) = self.entries.remove_entry(&key) {
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
}
