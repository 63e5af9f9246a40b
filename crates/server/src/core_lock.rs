//! The broker core's one lock, measured: how often it is taken, how long
//! takers wait for it and how long they hold it (`/metrics`). Held time
//! over wall time is the share of one core the lock serialises, the figure
//! that says when one lock stops scaling with cores (ARCHITECTURE.md,
//! "The lock and more cores").

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Totals since the broker started.
#[derive(Debug, Default)]
pub(crate) struct LockStats {
    takings: AtomicU64,
    waited_ns: AtomicU64,
    held_ns: AtomicU64,
}

/// What `/metrics` shows of [`LockStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct LockTotals {
    pub takings: u64,
    pub waited_ns: u64,
    pub held_ns: u64,
}

impl LockStats {
    pub(crate) fn totals(&self) -> LockTotals {
        LockTotals {
            takings: self.takings.load(Ordering::Relaxed),
            waited_ns: self.waited_ns.load(Ordering::Relaxed),
            held_ns: self.held_ns.load(Ordering::Relaxed),
        }
    }
}

/// Takes `mutex` (a poisoned one too: the core's state is checked by its
/// own invariants, not by whether a panic passed through) and counts it.
pub(crate) fn lock<'a, T>(mutex: &'a Mutex<T>, stats: &'a LockStats) -> Measured<'a, T> {
    let asked = Instant::now();
    let guard = mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let taken = Instant::now();
    stats.takings.fetch_add(1, Ordering::Relaxed);
    stats
        .waited_ns
        .fetch_add(nanos(taken.duration_since(asked)), Ordering::Relaxed);
    Measured {
        guard,
        stats,
        taken,
    }
}

/// A held lock that adds its holding time to the totals when let go.
pub(crate) struct Measured<'a, T> {
    guard: MutexGuard<'a, T>,
    stats: &'a LockStats,
    taken: Instant,
}

impl<T> Deref for Measured<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for Measured<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for Measured<'_, T> {
    fn drop(&mut self) {
        self.stats
            .held_ns
            .fetch_add(nanos(self.taken.elapsed()), Ordering::Relaxed);
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    #[test]
    fn waiting_and_holding_are_counted_apart() {
        let mutex = Arc::new(Mutex::new(0u32));
        let stats = Arc::new(LockStats::default());
        let held = Arc::new(Barrier::new(2));
        let holder = {
            let (mutex, stats, held) = (mutex.clone(), stats.clone(), held.clone());
            std::thread::spawn(move || {
                let mut guard = lock(&mutex, &stats);
                *guard += 1;
                held.wait();
                std::thread::sleep(Duration::from_millis(50));
            })
        };
        held.wait();
        // The holder keeps it ~50 ms from here: this taking waits.
        *lock(&mutex, &stats) += 1;
        holder.join().expect("holder");
        let totals = stats.totals();
        assert_eq!(totals.takings, 2);
        assert_eq!(*lock(&mutex, &stats), 2);
        assert!(totals.held_ns >= 50_000_000, "{totals:?}");
        assert!(totals.waited_ns >= 20_000_000, "{totals:?}");
    }
}
