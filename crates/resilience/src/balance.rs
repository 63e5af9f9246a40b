//! Client-side load balancing over a service's endpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::backoff::random_u64;

/// How a [`Balancer`] picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// Two endpoints at random, the one with fewer calls outstanding (so a
    /// slow instance gets less work, without every caller herding onto the
    /// least loaded one).
    PowerOfTwoChoices,
}

/// Picks endpoints and counts the calls outstanding on each, by key (an
/// endpoint's id). Counts outlive list changes, so an endpoint that comes
/// back keeps what is still under way on it.
#[derive(Debug, Default)]
pub struct Balancer {
    balance: Balance,
    next: AtomicUsize,
    outstanding: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// A call outstanding on an endpoint; the count drops with it.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub fn new(balance: Balance) -> Balancer {
        Balancer {
            balance,
            ..Balancer::default()
        }
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// Calls outstanding on the endpoint `key`.
    pub fn outstanding(&self, key: &str) -> usize {
        self.counts()
            .get(key)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Picks one of `endpoints` (`key` names each) and counts a call on it
    /// until the [`InFlight`] is dropped; `None` when there are none.
    pub fn pick<'a, T>(
        &self,
        endpoints: &'a [T],
        key: impl Fn(&T) -> &str,
    ) -> Option<(&'a T, InFlight)> {
        let chosen = *self.order(endpoints, &key).first()?;
        let endpoint = &endpoints[chosen];
        Some((endpoint, self.hold(key(endpoint))))
    }

    /// Every index of `endpoints`, in the order to try them: the balance's
    /// pick first (round robin: the next in turn, then the ones after it;
    /// two choices: the less loaded of two at random, then the other, then
    /// the rest), so a caller that may not use the first (its breaker is
    /// open) falls back on the next.
    pub fn order<T>(&self, endpoints: &[T], key: impl Fn(&T) -> &str) -> Vec<usize> {
        let n = endpoints.len();
        let start = match (self.balance, n) {
            (_, 0) => return Vec::new(),
            (_, 1) => return vec![0],
            (Balance::RoundRobin, n) => self.next.fetch_add(1, Ordering::Relaxed) % n,
            (Balance::PowerOfTwoChoices, n) => {
                let random = random_u64();
                let first = (random % n as u64) as usize;
                // A second index, different from the first.
                let second = (first + 1 + ((random >> 32) % (n as u64 - 1)) as usize) % n;
                let load = |i: usize| self.outstanding(key(&endpoints[i]));
                let (better, other) = if load(second) < load(first) {
                    (second, first)
                } else {
                    (first, second)
                };
                let mut order = Vec::with_capacity(n);
                order.extend([better, other]);
                order.extend(
                    (0..n)
                        .map(|k| (first + k) % n)
                        .filter(|i| *i != second && *i != first),
                );
                return order;
            }
        };
        (0..n).map(|k| (start + k) % n).collect()
    }

    /// Counts a call on the endpoint `key` until the [`InFlight`] is dropped.
    pub fn hold(&self, key: &str) -> InFlight {
        let counter = {
            let mut counts = self.counts();
            match counts.get(key) {
                Some(counter) => counter.clone(),
                None => counts.entry(key.to_string()).or_default().clone(),
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    /// Forgets the counts of endpoints no longer listed with nothing under way.
    pub fn retain(&self, listed: &[&str]) {
        self.counts()
            .retain(|key, n| listed.contains(&key.as_str()) || n.load(Ordering::Relaxed) > 0);
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicUsize>>> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    fn id<'a>(s: &'a &'static str) -> &'a str {
        s
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let b = Balancer::new(Balance::RoundRobin);
        let endpoints = ["a", "b", "c"];
        let picked: Vec<&str> = (0..6).map(|_| *b.pick(&endpoints, id).unwrap().0).collect();
        assert_eq!(picked, vec!["a", "b", "c", "a", "b", "c"]);
        assert!(b.pick(&[] as &[&str], id).is_none());
    }

    #[test]
    fn two_choices_avoid_the_loaded_endpoint_and_counts_drop_with_the_call() {
        let b = Balancer::new(Balance::PowerOfTwoChoices);
        let endpoints = ["a", "b"];
        let (first, held) = b.pick(&endpoints, id).unwrap();
        let busy = *first;
        let idle = if busy == "a" { "b" } else { "a" };
        assert_eq!(b.outstanding(busy), 1);
        // With two endpoints both are always compared: the idle one wins
        // until the loads are even.
        let (second, held_too) = b.pick(&endpoints, id).unwrap();
        assert_eq!(*second, idle);
        assert_eq!(b.outstanding(idle), 1);
        drop(held);
        for _ in 0..20 {
            let (e, _in_flight) = b.pick(&endpoints, id).unwrap();
            assert_eq!(*e, busy, "the less loaded of the two");
        }
        drop(held_too);
        assert_eq!(b.outstanding(busy), 0);
        assert_eq!(b.outstanding(idle), 0);
    }

    #[test]
    fn the_order_puts_the_pick_first_and_every_endpoint_once() {
        let b = Balancer::new(Balance::RoundRobin);
        let endpoints = ["a", "b", "c"];
        assert_eq!(b.order(&endpoints, id), vec![0, 1, 2]);
        assert_eq!(b.order(&endpoints, id), vec![1, 2, 0]);
        let b = Balancer::new(Balance::PowerOfTwoChoices);
        let _busy = b.hold("a");
        for _ in 0..50 {
            let order = b.order(&endpoints, id);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2], "{order:?}");
            assert_ne!(order[0], 0, "a is busier than either other: {order:?}");
        }
        assert!(b.order(&[] as &[&str], id).is_empty());
    }

    #[test]
    fn two_choices_spread_calls_over_equal_endpoints() {
        let b = Balancer::new(Balance::PowerOfTwoChoices);
        let endpoints = ["a", "b", "c"];
        let mut seen = HashMap::new();
        for _ in 0..300 {
            *seen.entry(*b.pick(&endpoints, id).unwrap().0).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|n| *n > 50), "{seen:?}");
    }
}
