//! The circuit breaker as a pure state machine: time comes in with every
//! input, nothing sleeps or spawns, so every transition is a unit test.
//!
//! Closed lets every call through and counts failures; enough of them (in
//! a row, or as a share of the calls in a sliding window) open it. Open
//! refuses every call until its cool-down is over, then it is half-open:
//! a few probes go through; as many successes close it, one failure opens
//! it again for another cool-down.
//!
//! A [`BreakerSet`] keeps one breaker per endpoint of a service: a call
//! goes to the first of its candidate endpoints whose breaker lets it
//! through, so one dead instance opens only its own breaker and calls go
//! around it; only when every endpoint's breaker refuses is the call
//! refused.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

mod set;

pub use set::{BreakerSet, StateCounts};

/// When a breaker opens and how it comes back.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker; 0 turns this rule off.
    pub consecutive_failures: u32,
    /// The share of failed calls (0.0 to 1.0) in the last `window` that
    /// opens the breaker; `None` turns this rule off.
    pub failure_rate: Option<f64>,
    /// How far back the failure rate looks.
    pub window: Duration,
    /// Calls the window must hold before its rate can open the breaker, so
    /// one failure of the first call is not a rate of 100 %.
    pub window_calls_min: u32,
    /// How long an open breaker refuses calls before it lets probes through.
    pub cool_down: Duration,
    /// Probes let through at once while half-open; as many successes close
    /// the breaker.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// Opens after 5 failures in a row, or when half the calls of the last
    /// 10 s (at least 20 of them) failed; probes once after 5 s.
    fn default() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: Some(0.5),
            window: Duration::from_secs(10),
            window_calls_min: 20,
            cool_down: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// What a breaker does with calls now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Every call goes through.
    Closed,
    /// Every call is refused at once.
    Open,
    /// A few probes go through; the rest are refused.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Leave to make one call; hand it back with [`Breaker::record`] (or
/// [`Breaker::release`] if the call never ran).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a permit's call must be recorded or released"]
pub struct Permit {
    /// The breaker's generation when granted: the outcome of a call let
    /// through before a transition says nothing about the state after it.
    generation: u64,
    probe: bool,
}

impl Permit {
    /// A half-open breaker's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// The breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// How long until the breaker lets a probe through (zero while
    /// half-open with every probe out).
    pub retry_in: Duration,
}

/// How a call let through ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { probes_out: u32, succeeded: u32 },
}

/// Calls and failures of the last `window`, in buckets of a tenth of it.
#[derive(Debug, Clone)]
struct Window {
    span: Duration,
    bucket_width: Duration,
    buckets: VecDeque<Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    calls: u32,
    failures: u32,
}

/// Buckets per window: the rate forgets old calls a tenth of a window at a time.
const WINDOW_BUCKETS: u32 = 10;

impl Window {
    fn new(span: Duration) -> Window {
        Window {
            span,
            bucket_width: (span / WINDOW_BUCKETS).max(Duration::from_millis(1)),
            buckets: VecDeque::with_capacity(WINDOW_BUCKETS as usize + 1),
        }
    }

    fn add(&mut self, now: Instant, failed: bool) {
        self.forget_before(now);
        let fits_last = self
            .buckets
            .back()
            .is_some_and(|b| now < b.start + self.bucket_width);
        if !fits_last {
            self.buckets.push_back(Bucket {
                start: now,
                calls: 0,
                failures: 0,
            });
        }
        if let Some(bucket) = self.buckets.back_mut() {
            bucket.calls = bucket.calls.saturating_add(1);
            bucket.failures = bucket.failures.saturating_add(u32::from(failed));
        }
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .buckets
            .front()
            .is_some_and(|b| b.start + self.span <= now)
        {
            self.buckets.pop_front();
        }
    }

    fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(c, f), b| {
            (c + u64::from(b.calls), f + u64::from(b.failures))
        })
    }

    fn clear(&mut self) {
        self.buckets.clear();
    }
}

/// A circuit breaker. Not thread-safe by itself: the layer keeps it behind
/// a mutex, held for a few comparisons per call.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    phase: Phase,
    generation: u64,
    window: Window,
    opened_total: u64,
    rejected_total: u64,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker::from_generation(config, 0)
    }

    /// A closed breaker whose permits start at `generation`, so a permit
    /// of a breaker it replaces is never taken for one of its own.
    fn from_generation(config: BreakerConfig, generation: u64) -> Breaker {
        Breaker {
            window: Window::new(config.window),
            config,
            phase: Phase::Closed {
                consecutive_failures: 0,
            },
            generation,
            opened_total: 0,
            rejected_total: 0,
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The state at `now` (an open breaker whose cool-down is over is
    /// half-open, though nothing has asked it since).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.phase {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { until } if now < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Times the breaker opened (from closed or half-open).
    pub fn opened_total(&self) -> u64 {
        self.opened_total
    }

    /// Calls refused.
    pub fn rejected_total(&self) -> u64 {
        self.rejected_total
    }

    /// Asks to make a call at `now`.
    pub fn acquire(&mut self, now: Instant) -> Result<Permit, Rejected> {
        if let Phase::Open { until } = self.phase {
            if now >= until {
                self.transition(Phase::HalfOpen {
                    probes_out: 0,
                    succeeded: 0,
                });
            }
        }
        match &mut self.phase {
            Phase::Closed { .. } => Ok(Permit {
                generation: self.generation,
                probe: false,
            }),
            Phase::Open { until } => {
                let retry_in = until.saturating_duration_since(now);
                self.rejected_total += 1;
                Err(Rejected { retry_in })
            }
            Phase::HalfOpen { probes_out, .. } => {
                if *probes_out < self.config.half_open_probes.max(1) {
                    *probes_out += 1;
                    Ok(Permit {
                        generation: self.generation,
                        probe: true,
                    })
                } else {
                    self.rejected_total += 1;
                    Err(Rejected {
                        retry_in: Duration::ZERO,
                    })
                }
            }
        }
    }

    /// The outcome of the call `permit` let through, at `now`.
    pub fn record(&mut self, permit: Permit, outcome: Outcome, now: Instant) {
        if permit.generation != self.generation {
            return;
        }
        match (&mut self.phase, outcome) {
            (
                Phase::Closed {
                    consecutive_failures,
                },
                Outcome::Success,
            ) => {
                *consecutive_failures = 0;
                self.window.add(now, false);
            }
            (
                Phase::Closed {
                    consecutive_failures,
                },
                Outcome::Failure,
            ) => {
                *consecutive_failures = consecutive_failures.saturating_add(1);
                let in_a_row = *consecutive_failures;
                self.window.add(now, true);
                if self.trips(in_a_row) {
                    self.open(now);
                }
            }
            (
                Phase::HalfOpen {
                    probes_out,
                    succeeded,
                },
                Outcome::Success,
            ) => {
                *probes_out = probes_out.saturating_sub(1);
                *succeeded += 1;
                if *succeeded >= self.config.half_open_probes.max(1) {
                    self.transition(Phase::Closed {
                        consecutive_failures: 0,
                    });
                }
            }
            (Phase::HalfOpen { .. }, Outcome::Failure) => self.open(now),
            // No permit of an open breaker's generation exists.
            (Phase::Open { .. }, _) => {}
        }
    }

    /// Hands back a permit whose call never ran (cancelled, or refused
    /// further in): it neither succeeded nor failed, but a probe's slot is
    /// free again.
    pub fn release(&mut self, permit: Permit) {
        if permit.generation != self.generation || !permit.probe {
            return;
        }
        if let Phase::HalfOpen { probes_out, .. } = &mut self.phase {
            *probes_out = probes_out.saturating_sub(1);
        }
    }

    fn trips(&self, in_a_row: u32) -> bool {
        let consecutive = self.config.consecutive_failures;
        if consecutive > 0 && in_a_row >= consecutive {
            return true;
        }
        let Some(rate) = self.config.failure_rate else {
            return false;
        };
        let (calls, failures) = self.window.totals();
        calls >= u64::from(self.config.window_calls_min.max(1))
            && failures as f64 >= rate * calls as f64
    }

    fn open(&mut self, now: Instant) {
        self.opened_total += 1;
        self.transition(Phase::Open {
            until: now + self.config.cool_down,
        });
    }

    fn transition(&mut self, to: Phase) {
        self.phase = to;
        self.generation += 1;
        self.window.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod properties;
