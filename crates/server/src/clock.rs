//! The server's two clocks.
//!
//! **Broker time** is what every input to the core carries as `now`: the
//! wall clock read once when the server starts, advanced from then on by
//! the monotonic clock. Ack deadlines, nack delays, timers, rate buckets
//! and expiry windows are measured on it, so a step of the wall clock (an
//! NTP correction, an operator's `date -s`) moves none of them: no mass
//! redelivery when it jumps ahead, no stalled bucket when it jumps back.
//! Because it starts at the wall clock, deadlines kept in the log stay
//! meaningful across a restart, which starts it again from the wall clock.
//!
//! **Wall time** is what the envelope and the protocol define as such:
//! message timestamps, `expires_at` and `deliver_at`, `--from` a time,
//! trace and tail timestamps. The core learns how far the wall clock is
//! from broker time before each pass ([`Clock::wall_offset`]) and reads
//! wall time through it.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use courier_broker::Nanos;

/// The wall clock as nanoseconds since the unix epoch (0 before it).
pub(crate) fn wall_nanos() -> Nanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Where the wall clock is read; tests step it by hand.
type WallSource = Arc<dyn Fn() -> Nanos + Send + Sync>;

pub(crate) struct Clock {
    origin: Instant,
    /// The wall clock at `origin`.
    origin_wall: Nanos,
    wall: WallSource,
}

impl Clock {
    /// Broker time from the system's monotonic clock, started at the
    /// system's wall clock.
    pub(crate) fn system() -> Clock {
        Clock::with_wall(Arc::new(wall_nanos))
    }

    /// Broker time started at, and wall time read from, `wall`.
    pub(crate) fn with_wall(wall: WallSource) -> Clock {
        Clock {
            origin: Instant::now(),
            origin_wall: wall(),
            wall,
        }
    }

    /// Broker time: never goes back, never jumps.
    pub(crate) fn now(&self) -> Nanos {
        let elapsed = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.origin_wall.saturating_add(elapsed)
    }

    /// Wall time, as the envelope means it.
    pub(crate) fn wall(&self) -> Nanos {
        (self.wall)()
    }

    /// How far the wall clock is ahead of broker time `now` (negative when
    /// behind), for [`courier_broker::Broker::set_wall_offset`].
    pub(crate) fn wall_offset(&self, now: Nanos) -> i64 {
        let wall = i128::from(self.wall());
        let offset = wall - i128::from(now);
        i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const HOUR: u64 = 3_600 * 1_000_000_000;
    const SECOND: u64 = 1_000_000_000;

    fn stepped_clock() -> (Clock, Arc<AtomicU64>) {
        let wall = Arc::new(AtomicU64::new(1_700_000_000 * SECOND));
        let source = Arc::clone(&wall);
        let clock = Clock::with_wall(Arc::new(move || source.load(Ordering::Relaxed)));
        (clock, wall)
    }

    #[test]
    fn broker_time_starts_at_the_wall_clock() {
        let (clock, _wall) = stepped_clock();
        let now = clock.now();
        assert!(now >= 1_700_000_000 * SECOND);
        assert!(now < 1_700_000_000 * SECOND + HOUR);
        assert!(clock.wall_offset(now) <= 0);
        assert!(clock.wall_offset(now) > -(HOUR as i64));
    }

    #[test]
    fn a_wall_clock_step_moves_wall_time_only() {
        let (clock, wall) = stepped_clock();
        let before = clock.now();
        wall.fetch_add(HOUR, Ordering::Relaxed);
        let after = clock.now();
        assert!(after >= before, "broker time went back");
        assert!(
            after - before < HOUR / 2,
            "broker time jumped with the wall clock"
        );
        assert_eq!(clock.wall(), 1_700_000_000 * SECOND + HOUR);
        let offset = clock.wall_offset(after);
        assert!(
            offset > (HOUR / 2) as i64,
            "the core is not told of the step: {offset}"
        );

        wall.fetch_sub(2 * HOUR, Ordering::Relaxed);
        let back = clock.now();
        assert!(back >= after, "broker time went back with the wall clock");
        assert!(clock.wall_offset(back) < -((HOUR / 2) as i64));
    }
}
