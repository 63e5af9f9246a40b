//! Exponential backoff with full jitter: the n-th retry waits a uniformly
//! random time between zero and `min(max, base × 2ⁿ)`, so callers that
//! failed together do not retry together.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long to wait before each retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry's wait.
    pub base: Duration,
    /// No wait is longer than this.
    pub max: Duration,
}

impl Default for Backoff {
    /// 50 ms, doubling, at most 2 s.
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// The ceiling of retry `retry`'s wait (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry `retry`: full jitter under its ceiling.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, random_u64())
    }

    /// [`Backoff::delay`] with the random draw given (for tests).
    pub fn delay_with(&self, retry: u32, random: u64) -> Duration {
        let ceiling = self.ceiling(retry).as_nanos().min(u128::from(u64::MAX)) as u64;
        if ceiling == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(random % (ceiling + 1))
    }
}

/// A random number good enough for jitter and for picking two endpoints:
/// std's randomly keyed SipHash over a counter, so no RNG crate.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static KEYS: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new();
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    KEYS.with(|keys| {
        let mut hasher = keys.build_hasher();
        hasher.write_u64(n);
        hasher.finish()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_max() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let ceilings: Vec<u128> = (0..6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_spread_over_zero_to_the_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<Duration> = (0..1000).map(|_| b.delay(1)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(200)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(50)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(150)));
        assert_eq!(b.delay_with(0, 0), Duration::ZERO);
    }
}
