//! Fresh message ids: UUID v7 with random bits from a per-thread pool.
//!
//! `Uuid::now_v7` asks the OS for randomness on every call — a `getrandom`
//! syscall per id, which profiles of the send path showed; a pool refilled
//! from the OS a few kilobytes at a time still spent a tenth of a fast
//! publisher's time in the kernel's ChaCha. So the pool refills from a
//! per-thread ChaCha12 keyed by the OS (a CSPRNG: another service cannot
//! guess ids to collide with them in the broker's dedup window), rekeyed
//! from the OS every [`REKEY_EVERY_REFILLS`] refills and in a forked child
//! (which would otherwise repeat its parent's ids).
//!
//! The millisecond comes from the coarse real-time clock on Linux (one
//! tick behind at most, a quarter of the cost of the precise one, which a
//! profile showed at a tenth of a publisher's time too); a v7 timestamp
//! only orders ids by the millisecond and places them in the broker's
//! dedup buckets, which allow seconds of skew.

use std::cell::RefCell;

use chacha20::rand_core::{Rng, SeedableRng};
use chacha20::ChaCha12Rng;
use uuid::{Builder, Uuid};

/// Bytes drawn per refill: 409 ids' worth.
const POOL_BYTES: usize = 4096;
/// Random bytes per id (v7 keeps 74 of these 80 bits; the rest are its
/// version and variant).
const ID_RANDOM_BYTES: usize = 10;
/// Refills between fresh keys from the OS: every ~100,000 ids.
const REKEY_EVERY_REFILLS: u32 = 256;

struct Pool {
    bytes: Box<[u8; POOL_BYTES]>,
    used: usize,
    /// `None` until the first refill, or when the OS had no randomness.
    rng: Option<ChaCha12Rng>,
    /// The process (id) the key was drawn in, and the refills since.
    keyed_in: u32,
    refills: u32,
}

impl Pool {
    /// Fills the pool; `false` if the OS gave no randomness to key it.
    fn refill(&mut self) -> bool {
        let pid = std::process::id();
        let rng = match self.rng.as_mut() {
            Some(rng) if self.keyed_in == pid && self.refills < REKEY_EVERY_REFILLS => rng,
            _ => {
                let mut key = [0u8; 32];
                if getrandom::fill(&mut key).is_err() {
                    self.rng = None;
                    return false;
                }
                self.keyed_in = pid;
                self.refills = 0;
                self.rng.insert(ChaCha12Rng::from_seed(key))
            }
        };
        rng.fill_bytes(&mut self.bytes[..]);
        self.refills += 1;
        self.used = 0;
        true
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        bytes: Box::new([0; POOL_BYTES]),
        used: POOL_BYTES,
        rng: None,
        keyed_in: 0,
        refills: 0,
    });
}

/// A new UUID v7 (millisecond timestamp, then random bits).
pub fn new_id() -> Uuid {
    new_id_at(now_millis())
}

#[cfg(target_os = "linux")]
fn now_millis() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    u64::try_from(now.tv_sec).map_or(0, |secs| {
        secs * 1000 + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000
    })
}

#[cfg(not(target_os = "linux"))]
fn now_millis() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_id_at(millis: u64) -> Uuid {
    let random = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + ID_RANDOM_BYTES > POOL_BYTES && !pool.refill() {
            return None;
        }
        let mut random = [0u8; ID_RANDOM_BYTES];
        let start = pool.used;
        random.copy_from_slice(&pool.bytes[start..start + ID_RANDOM_BYTES]);
        pool.used += ID_RANDOM_BYTES;
        Some(random)
    });
    match random {
        Some(random) => Builder::from_unix_timestamp_millis(millis, &random).into_uuid(),
        // No OS randomness to key the pool: let uuid find its own.
        None => Uuid::now_v7(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// How far the coarse clock may lag the precise one: a tick, at most
    /// 10 ms on kernels with HZ ≥ 100.
    const COARSE_LAG_MS: u64 = 10;

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
                (before - COARSE_LAG_MS..=after).contains(&ms),
                "{ms} not in {before}-{COARSE_LAG_MS}..={after}"
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

    #[test]
    fn the_pool_takes_a_fresh_key_after_its_quota_and_in_another_process() {
        let mut pool = Pool {
            bytes: Box::new([0; POOL_BYTES]),
            used: POOL_BYTES,
            rng: None,
            keyed_in: 0,
            refills: 0,
        };
        let mut seen = HashSet::new();
        for refill in 1..=REKEY_EVERY_REFILLS + 2 {
            assert!(pool.refill());
            assert_eq!(pool.keyed_in, std::process::id());
            let expected = if refill <= REKEY_EVERY_REFILLS {
                refill
            } else {
                refill - REKEY_EVERY_REFILLS
            };
            assert_eq!(pool.refills, expected, "refill {refill}");
            assert!(seen.insert(pool.bytes.to_vec()), "a pool repeated");
        }
        // As in a forked child: the key was drawn by another process.
        pool.keyed_in = pool.keyed_in.wrapping_add(1);
        let before = pool.refills;
        assert!(pool.refill());
        assert_eq!(pool.refills, 1, "was at {before}: not rekeyed");
        assert_eq!(pool.keyed_in, std::process::id());
        assert!(seen.insert(pool.bytes.to_vec()));
    }
}
