//! The log's source of monotonic time: when the `Interval` fsync policy
//! last synced, and how long the scrub must pause to keep to its rate.
//! Production uses the system's monotonic clock; tests use a manual clock
//! they move forward by hand, so a test about time never sleeps.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Cheap to clone: clones of a manual clock share its time.
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<ManualTime>>);

struct ManualTime {
    origin: Instant,
    /// Nanoseconds the clock has been moved on since `origin`.
    elapsed_nanos: AtomicU64,
}

impl Clock {
    /// The system's monotonic clock (`Instant::now`, `thread::sleep`).
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands still until [`Clock::advance`] moves it; its
    /// [`Clock::sleep`] moves it instead of waiting.
    pub fn manual() -> Clock {
        Clock(Some(Arc::new(ManualTime {
            origin: Instant::now(),
            elapsed_nanos: AtomicU64::new(0),
        })))
    }

    pub fn now(&self) -> Instant {
        match &self.0 {
            None => Instant::now(),
            Some(manual) => {
                manual.origin + Duration::from_nanos(manual.elapsed_nanos.load(Ordering::Relaxed))
            }
        }
    }

    /// Waits `duration` of this clock's time: a real sleep on the system
    /// clock, a step forward on a manual one.
    pub fn sleep(&self, duration: Duration) {
        match &self.0 {
            None => std::thread::sleep(duration),
            Some(_) => self.advance(duration),
        }
    }

    /// Moves a manual clock forward; the system clock cannot be moved, and
    /// this does nothing to it.
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.0 {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            let _ =
                manual
                    .elapsed_nanos
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                        Some(now.saturating_add(nanos))
                    });
        }
    }

    /// How far a manual clock has been moved on (zero for the system clock).
    pub fn elapsed_manually(&self) -> Duration {
        match &self.0 {
            None => Duration::ZERO,
            Some(manual) => Duration::from_nanos(manual.elapsed_nanos.load(Ordering::Relaxed)),
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Clock::system"),
            Some(_) => write!(f, "Clock::manual(+{:?})", self.elapsed_manually()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_share_it() {
        let clock = Clock::manual();
        let start = clock.now();
        assert_eq!(clock.now(), start);
        let clone = clock.clone();
        clone.sleep(Duration::from_millis(250));
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now() - start, Duration::from_millis(1250));
        assert_eq!(clone.elapsed_manually(), Duration::from_millis(1250));
    }

    #[test]
    fn the_system_clock_cannot_be_moved() {
        let clock = Clock::system();
        let before = clock.now();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now() - before < Duration::from_secs(3600));
        assert_eq!(clock.elapsed_manually(), Duration::ZERO);
    }
}
