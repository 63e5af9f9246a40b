//! Fresh message ids: UUID v7 with random bits from a per-thread pool.
//!
//! `Uuid::now_v7` asks the OS for randomness on every call — a `getrandom`
//! syscall per id, which profiles of the send path showed. The pool refills from the same OS source a few
//! kilobytes at a time, so the ids are as unpredictable as before (another
//! service cannot guess them to collide with them in the broker's dedup
//! window) at one syscall per few hundred ids.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::{Builder, Uuid};

/// Bytes fetched from the OS per refill: 409 ids' worth.
const POOL_BYTES: usize = 4096;
/// Random bytes per id (v7 keeps 74 of these 80 bits; the rest are its
/// version and variant).
const ID_RANDOM_BYTES: usize = 10;

struct Pool {
    bytes: Box<[u8; POOL_BYTES]>,
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        bytes: Box::new([0; POOL_BYTES]),
        used: POOL_BYTES,
    });
}

/// A new UUID v7 (millisecond timestamp, then random bits).
pub fn new_id() -> Uuid {
    new_id_at(now_millis())
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_id_at(millis: u64) -> Uuid {
    let random = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + ID_RANDOM_BYTES > POOL_BYTES {
            if getrandom::fill(&mut pool.bytes[..]).is_err() {
                return None;
            }
            pool.used = 0;
        }
        let mut random = [0u8; ID_RANDOM_BYTES];
        let start = pool.used;
        random.copy_from_slice(&pool.bytes[start..start + ID_RANDOM_BYTES]);
        pool.used += ID_RANDOM_BYTES;
        Some(random)
    });
    match random {
        Some(random) => Builder::from_unix_timestamp_millis(millis, &random).into_uuid(),
        // No OS randomness through the pool: let uuid find its own.
        None => Uuid::now_v7(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_v7_distinct_and_carry_the_current_millisecond() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ids: Vec<Uuid> = (0..3 * POOL_BYTES).map(|_| new_id()).collect();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let distinct: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "ids repeat across pool refills");
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = id.get_timestamp().expect("v7 has a timestamp").to_unix();
            let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(
                (before..=after).contains(&ms),
                "{ms} not in {before}..={after}"
            );
        }
    }

    #[test]
    fn threads_draw_different_ids() {
        let a = std::thread::spawn(|| (0..100).map(|_| new_id()).collect::<Vec<_>>());
        let b = std::thread::spawn(|| (0..100).map(|_| new_id()).collect::<Vec<_>>());
        let (a, b) = (a.join().expect("thread a"), b.join().expect("thread b"));
        let all: HashSet<Uuid> = a.into_iter().chain(b).collect();
        assert_eq!(all.len(), 200);
    }
}
