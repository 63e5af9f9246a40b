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

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

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

/// Generations apart of two breakers made for the same key: far more
/// transitions than one breaker makes.
const GENERATIONS_PER_BREAKER: u64 = 1 << 32;

/// How many endpoints' breakers are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    pub closed: u64,
    pub open: u64,
    pub half_open: u64,
}

/// One breaker per endpoint (by key, an endpoint's id), all with the same
/// config; pure like [`Breaker`]. Made on an endpoint's first call; the
/// breakers of endpoints no longer listed are dropped by
/// [`BreakerSet::acquire`], so the set holds at most one more than the
/// endpoints listed.
#[derive(Debug, Clone)]
pub struct BreakerSet {
    config: BreakerConfig,
    breakers: BTreeMap<String, Breaker>,
    /// Where the next breaker's generations start.
    next_generation: u64,
    opened_total: u64,
    rejected_total: u64,
}

impl BreakerSet {
    pub fn new(config: BreakerConfig) -> BreakerSet {
        BreakerSet {
            config,
            breakers: BTreeMap::new(),
            next_generation: 0,
            opened_total: 0,
            rejected_total: 0,
        }
    }

    /// Asks the breakers of `candidates` (every endpoint listed, in the
    /// order the balancer would call them) for leave to call at `now`:
    /// the position of the first that grants it, with its permit. A
    /// breaker that refuses is skipped, and counts the refusal; an open
    /// one past its cool-down grants its probe. When every one refuses
    /// (or there are none), the call is refused, to be tried again in the
    /// shortest of their waits.
    ///
    /// With more breakers than candidates, those of keys not among them
    /// (endpoints that left the list) are dropped first; at most one
    /// breaker is made per call, so the set never holds more than one
    /// breaker over the endpoints listed.
    pub fn acquire(
        &mut self,
        candidates: &[&str],
        now: Instant,
    ) -> Result<(usize, Permit), Rejected> {
        if self.breakers.len() > candidates.len() {
            self.breakers
                .retain(|key, _| candidates.contains(&key.as_str()));
        }
        let mut soonest: Option<Duration> = None;
        for (at, key) in candidates.iter().enumerate() {
            let breaker = match self.breakers.get_mut(*key) {
                Some(breaker) => breaker,
                None => {
                    let breaker =
                        Breaker::from_generation(self.config.clone(), self.next_generation);
                    self.next_generation =
                        self.next_generation.wrapping_add(GENERATIONS_PER_BREAKER);
                    self.breakers.entry(key.to_string()).or_insert(breaker)
                }
            };
            match breaker.acquire(now) {
                Ok(permit) => return Ok((at, permit)),
                Err(refused) => {
                    self.rejected_total += 1;
                    soonest = Some(soonest.map_or(refused.retry_in, |s| s.min(refused.retry_in)));
                }
            }
        }
        Err(Rejected {
            retry_in: soonest.unwrap_or(Duration::ZERO),
        })
    }

    /// The outcome of the call to `key` that `permit` let through.
    pub fn record(&mut self, key: &str, permit: Permit, outcome: Outcome, now: Instant) {
        if let Some(breaker) = self.breakers.get_mut(key) {
            let opened = breaker.opened_total();
            breaker.record(permit, outcome, now);
            self.opened_total += breaker.opened_total() - opened;
        }
    }

    /// Hands back a permit of `key` whose call never ran.
    pub fn release(&mut self, key: &str, permit: Permit) {
        if let Some(breaker) = self.breakers.get_mut(key) {
            breaker.release(permit);
        }
    }

    /// The state of `key`'s breaker at `now`; `None` before its first call.
    pub fn state(&self, key: &str, now: Instant) -> Option<BreakerState> {
        self.breakers.get(key).map(|b| b.state(now))
    }

    /// The breakers, by key.
    pub fn breakers(&self) -> impl Iterator<Item = (&str, &Breaker)> {
        self.breakers.iter().map(|(k, b)| (k.as_str(), b))
    }

    pub fn is_empty(&self) -> bool {
        self.breakers.is_empty()
    }

    /// How many breakers are in each state at `now`.
    pub fn counts(&self, now: Instant) -> StateCounts {
        let mut counts = StateCounts::default();
        for breaker in self.breakers.values() {
            match breaker.state(now) {
                BreakerState::Closed => counts.closed += 1,
                BreakerState::Open => counts.open += 1,
                BreakerState::HalfOpen => counts.half_open += 1,
            }
        }
        counts
    }

    /// The set's state as a whole at `now`: closed while any endpoint's
    /// breaker is, open only when every one is; `None` while empty.
    pub fn state_overall(&self, now: Instant) -> Option<BreakerState> {
        let counts = self.counts(now);
        if counts.closed > 0 {
            Some(BreakerState::Closed)
        } else if counts.half_open > 0 {
            Some(BreakerState::HalfOpen)
        } else if counts.open > 0 {
            Some(BreakerState::Open)
        } else {
            None
        }
    }

    /// Times any of its breakers opened, those since dropped included.
    pub fn opened_total(&self) -> u64 {
        self.opened_total
    }

    /// Calls any of its breakers refused (a skipped endpoint counts once).
    pub fn rejected_total(&self) -> u64 {
        self.rejected_total
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: None,
            window: Duration::from_secs(10),
            window_calls_min: 4,
            cool_down: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }

    fn fail(b: &mut Breaker, now: Instant) {
        let permit = b.acquire(now).unwrap();
        b.record(permit, Outcome::Failure, now);
    }

    fn succeed(b: &mut Breaker, now: Instant) {
        let permit = b.acquire(now).unwrap();
        b.record(permit, Outcome::Success, now);
    }

    #[test]
    fn failures_in_a_row_open_it_and_a_success_between_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        fail(&mut b, t);
        fail(&mut b, t);
        succeed(&mut b, t);
        fail(&mut b, t);
        fail(&mut b, t);
        assert_eq!(b.state(t), BreakerState::Closed);
        fail(&mut b, t);
        assert_eq!(b.state(t), BreakerState::Open);
        assert_eq!(b.opened_total(), 1);
        let refused = b.acquire(t + Duration::from_secs(1)).unwrap_err();
        assert_eq!(refused.retry_in, Duration::from_secs(4));
        assert_eq!(b.rejected_total(), 1);
    }

    #[test]
    fn after_the_cool_down_one_probe_goes_through_and_its_success_closes_it() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        (0..3).for_each(|_| fail(&mut b, t));
        let later = t + Duration::from_secs(5);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        let probe = b.acquire(later).unwrap();
        assert!(probe.is_probe());
        assert_eq!(
            b.acquire(later).unwrap_err().retry_in,
            Duration::ZERO,
            "one probe at a time"
        );
        b.record(probe, Outcome::Success, later);
        assert_eq!(b.state(later), BreakerState::Closed);
        succeed(&mut b, later);
    }

    #[test]
    fn a_failed_probe_opens_it_for_another_cool_down() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        (0..3).for_each(|_| fail(&mut b, t));
        let later = t + Duration::from_secs(6);
        let probe = b.acquire(later).unwrap();
        b.record(probe, Outcome::Failure, later);
        assert_eq!(b.state(later), BreakerState::Open);
        assert_eq!(b.opened_total(), 2);
        assert_eq!(
            b.state(later + Duration::from_millis(4_999)),
            BreakerState::Open
        );
        assert_eq!(
            b.state(later + Duration::from_secs(5)),
            BreakerState::HalfOpen
        );
    }

    #[test]
    fn a_released_probe_frees_its_slot() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        (0..3).for_each(|_| fail(&mut b, t));
        let later = t + Duration::from_secs(5);
        let probe = b.acquire(later).unwrap();
        b.release(probe);
        assert!(b.acquire(later).is_ok());
    }

    #[test]
    fn outcomes_of_calls_from_before_a_transition_are_ignored() {
        let t = Instant::now();
        let mut b = Breaker::new(config());
        let slow = b.acquire(t).unwrap();
        (0..3).for_each(|_| fail(&mut b, t));
        let later = t + Duration::from_secs(5);
        let probe = b.acquire(later).unwrap();
        // The slow call of the closed breaker ends now: it is no probe.
        b.record(slow, Outcome::Success, later);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        b.record(probe, Outcome::Success, later);
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn a_set_skips_endpoints_whose_breakers_are_open_and_refuses_only_when_all_are() {
        let t = Instant::now();
        let mut set = BreakerSet::new(config());
        for _ in 0..3 {
            let (at, permit) = set.acquire(&["a", "b"], t).unwrap();
            assert_eq!(at, 0);
            set.record("a", permit, Outcome::Failure, t);
        }
        assert_eq!(set.state("a", t), Some(BreakerState::Open));
        assert_eq!(set.state("b", t), None, "b has had no call yet");
        let (at, permit) = set.acquire(&["a", "b"], t).unwrap();
        assert_eq!(at, 1, "a's open breaker is skipped");
        set.record("b", permit, Outcome::Success, t);
        assert_eq!(set.rejected_total(), 1);
        assert_eq!(set.state_overall(t), Some(BreakerState::Closed));

        let later = t + Duration::from_secs(1);
        for _ in 0..3 {
            let (at, permit) = set.acquire(&["b", "a"], later).unwrap();
            assert_eq!(at, 0);
            set.record("b", permit, Outcome::Failure, later);
        }
        let refused = set.acquire(&["a", "b"], later).unwrap_err();
        assert_eq!(
            refused.retry_in,
            Duration::from_secs(4),
            "a's is the shorter wait"
        );
        assert_eq!(set.state_overall(later), Some(BreakerState::Open));
        assert_eq!(set.opened_total(), 2);

        // a's cool-down ends first: its probe goes to it, listed second.
        let a_cooled = t + Duration::from_secs(5);
        let (at, probe) = set.acquire(&["b", "a"], a_cooled).unwrap();
        assert_eq!(at, 1);
        assert!(probe.is_probe());
        set.record("a", probe, Outcome::Success, a_cooled);
        assert_eq!(set.state("a", a_cooled), Some(BreakerState::Closed));
        assert_eq!(
            set.counts(a_cooled),
            StateCounts {
                closed: 1,
                open: 1,
                half_open: 0
            }
        );
    }

    #[test]
    fn a_set_drops_the_breakers_of_endpoints_no_longer_listed() {
        let t = Instant::now();
        let mut set = BreakerSet::new(config());
        let (_, stale) = set.acquire(&["a"], t).unwrap();
        let (_, permit) = set.acquire(&["b"], t).unwrap();
        set.record("b", permit, Outcome::Success, t);
        let (_, permit) = set.acquire(&["b"], t).unwrap();
        set.record("b", permit, Outcome::Success, t);
        assert_eq!(set.state("a", t), None, "a left the list");
        assert_eq!(set.breakers().count(), 1);
        // a is back with a new breaker: a permit of the old one counts
        // for nothing in it.
        let (_, fresh) = set.acquire(&["a", "b"], t).unwrap();
        set.record("a", stale, Outcome::Failure, t);
        set.release("a", fresh);
        for _ in 0..2 {
            let (_, permit) = set.acquire(&["a", "b"], t).unwrap();
            set.record("a", permit, Outcome::Failure, t);
        }
        assert_eq!(
            set.state("a", t),
            Some(BreakerState::Closed),
            "2 failures, not 3"
        );
    }

    #[test]
    fn a_failure_rate_over_the_window_opens_it_once_enough_calls_were_seen() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            ..config()
        });
        fail(&mut b, t);
        fail(&mut b, t);
        succeed(&mut b, t);
        assert_eq!(
            b.state(t),
            BreakerState::Closed,
            "3 calls: below the minimum"
        );
        succeed(&mut b, t);
        succeed(&mut b, t);
        fail(&mut b, t);
        assert_eq!(b.state(t), BreakerState::Open, "3 of 6 failed");
    }

    #[test]
    fn the_window_forgets_calls_older_than_its_span() {
        let t = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            consecutive_failures: 0,
            failure_rate: Some(0.5),
            ..config()
        });
        (0..3).for_each(|_| fail(&mut b, t));
        let later = t + Duration::from_secs(11);
        succeed(&mut b, later);
        succeed(&mut b, later);
        succeed(&mut b, later);
        fail(&mut b, later);
        assert_eq!(
            b.state(later),
            BreakerState::Closed,
            "1 of the last 4 failed; the 3 old failures are forgotten"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod properties {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        /// Ends the outstanding call at this index (mod their number).
        Finish(usize, bool),
        Release(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Acquire),
            4 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Finish(i, ok)),
            1 => any::<usize>().prop_map(Op::Release),
            2 => (0u64..3_000).prop_map(Op::Advance),
        ]
    }

    fn config() -> impl Strategy<Value = BreakerConfig> {
        (0u32..5, prop::option::of(0.1f64..1.0), 1u32..6, 1u32..4).prop_map(
            |(consecutive, rate, calls_min, probes)| BreakerConfig {
                consecutive_failures: consecutive,
                failure_rate: rate,
                window: Duration::from_secs(5),
                window_calls_min: calls_min,
                cool_down: Duration::from_secs(1),
                half_open_probes: probes,
            },
        )
    }

    #[derive(Debug, Clone)]
    enum SetOp {
        /// Asks with every key, the list rotated this far.
        Acquire(usize),
        Finish(usize, bool),
        Release(usize),
        Advance(u64),
    }

    fn set_op() -> impl Strategy<Value = SetOp> {
        prop_oneof![
            4 => (0usize..3).prop_map(SetOp::Acquire),
            4 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| SetOp::Finish(i, ok)),
            1 => any::<usize>().prop_map(SetOp::Release),
            2 => (0u64..3_000).prop_map(SetOp::Advance),
        ]
    }

    proptest! {
        /// Whatever happens to a set of endpoints' breakers: a call goes
        /// to the first candidate whose breaker is not open (a closed one,
        /// or a half-open one with a probe free), never past a closed one;
        /// it is refused only when none is closed, and then told to wait
        /// the shortest of the waits; the set's openings are its breakers'.
        #[test]
        fn a_set_picks_the_first_endpoint_its_breaker_lets_through(
            config in config(),
            ops in prop::collection::vec(set_op(), 1..200),
        ) {
            const KEYS: [&str; 3] = ["a", "b", "c"];
            let start = Instant::now();
            let mut now = start;
            let mut set = BreakerSet::new(config);
            let mut out: Vec<(&str, Permit)> = Vec::new();
            for op in ops {
                match op {
                    SetOp::Acquire(rotation) => {
                        let candidates: Vec<&str> =
                            (0..3).map(|i| KEYS[(i + rotation) % 3]).collect();
                        let states: Vec<BreakerState> = candidates
                            .iter()
                            .map(|k| set.state(k, now).unwrap_or(BreakerState::Closed))
                            .collect();
                        match set.acquire(&candidates, now) {
                            Ok((at, permit)) => {
                                prop_assert!(
                                    states[..at].iter().all(|s| *s != BreakerState::Closed),
                                    "went past a closed breaker: {:?}, took {}", states, at
                                );
                                prop_assert_ne!(states[at], BreakerState::Open);
                                prop_assert_eq!(permit.is_probe(), states[at] == BreakerState::HalfOpen);
                                out.push((candidates[at], permit));
                            }
                            Err(refused) => {
                                prop_assert!(states.iter().all(|s| *s != BreakerState::Closed), "{:?}", states);
                                let any_half_open = states.contains(&BreakerState::HalfOpen);
                                prop_assert_eq!(refused.retry_in == Duration::ZERO, any_half_open);
                            }
                        }
                    }
                    SetOp::Finish(i, ok) if !out.is_empty() => {
                        let (key, permit) = out.remove(i % out.len());
                        let outcome = if ok { Outcome::Success } else { Outcome::Failure };
                        set.record(key, permit, outcome, now);
                    }
                    SetOp::Release(i) if !out.is_empty() => {
                        let (key, permit) = out.remove(i % out.len());
                        set.release(key, permit);
                    }
                    SetOp::Advance(ms) => now += Duration::from_millis(ms),
                    SetOp::Finish(..) | SetOp::Release(_) => {}
                }
                let opened: u64 = set.breakers().map(|(_, b)| b.opened_total()).sum();
                prop_assert_eq!(set.opened_total(), opened);
                let rejected: u64 = set.breakers().map(|(_, b)| b.rejected_total()).sum();
                prop_assert_eq!(set.rejected_total(), rejected);
            }
        }

    }

    proptest! {
        /// Whatever happens: an open breaker refuses everything until its
        /// cool-down is over; a half-open one has at most its probes out;
        /// only a failure opens it, only a probe's success closes it, never
        /// straight from open; and failures in a row open a closed one.
        #[test]
        fn transitions_follow_the_rules(config in config(), ops in prop::collection::vec(op(), 1..200)) {
            let start = Instant::now();
            let mut now = start;
            let mut b = Breaker::new(config.clone());
            let mut out: Vec<(Permit, u64)> = Vec::new();
            let mut epoch = 0u64;
            let mut state = b.state(now);
            let mut open_until = None;
            let mut probes_out = 0u32;
            let mut in_a_row = 0u32;
            for op in ops {
                let before = state;
                let mut finished = None;
                match op {
                    Op::Acquire => match b.acquire(now) {
                        Ok(permit) => {
                            if let Some(until) = open_until {
                                prop_assert!(now >= until, "a call let through while open");
                            }
                            prop_assert_eq!(permit.is_probe(), before != BreakerState::Closed);
                            if permit.is_probe() {
                                probes_out += 1;
                                prop_assert!(probes_out <= config.half_open_probes);
                            }
                            out.push((permit, epoch));
                        }
                        Err(refused) => {
                            prop_assert_ne!(before, BreakerState::Closed, "a closed breaker refused");
                            if before == BreakerState::HalfOpen {
                                prop_assert_eq!(probes_out, config.half_open_probes.max(1));
                            }
                            prop_assert!(now + refused.retry_in >= open_until.unwrap_or(now));
                        }
                    },
                    Op::Finish(i, ok) if !out.is_empty() => {
                        let (permit, granted) = out.remove(i % out.len());
                        let current = granted == epoch;
                        if current && permit.is_probe() {
                            probes_out -= 1;
                        }
                        finished = Some((ok, current, permit.is_probe()));
                        b.record(permit, if ok { Outcome::Success } else { Outcome::Failure }, now);
                    }
                    Op::Release(i) if !out.is_empty() => {
                        let (permit, granted) = out.remove(i % out.len());
                        if granted == epoch && permit.is_probe() {
                            probes_out -= 1;
                        }
                        b.release(permit);
                    }
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                    Op::Finish(..) | Op::Release(_) => {}
                }
                state = b.state(now);
                if let Some((ok, current, _)) = finished {
                    if current && before == BreakerState::Closed {
                        in_a_row = if ok { 0 } else { in_a_row + 1 };
                    }
                }
                if state != before {
                    match (before, state) {
                        (BreakerState::Closed, BreakerState::Open) => {
                            prop_assert!(matches!(finished, Some((false, true, false))));
                        }
                        (BreakerState::HalfOpen, BreakerState::Open) => {
                            prop_assert!(matches!(finished, Some((false, true, true))));
                        }
                        (BreakerState::HalfOpen, BreakerState::Closed) => {
                            prop_assert!(matches!(finished, Some((true, true, true))));
                        }
                        (BreakerState::Open, BreakerState::HalfOpen) => {
                            prop_assert!(now >= open_until.unwrap_or(now));
                        }
                        (from, to) => prop_assert!(false, "{:?} -> {:?}", from, to),
                    }
                    open_until = (state == BreakerState::Open).then(|| now + config.cool_down);
                    // Calls let through before a change count for nothing after it.
                    epoch += 1;
                    probes_out = 0;
                    in_a_row = 0;
                }
                if config.consecutive_failures > 0 && state == BreakerState::Closed {
                    prop_assert!(in_a_row < config.consecutive_failures, "{} failures in a row and still closed", in_a_row);
                }
            }
        }
    }
}
