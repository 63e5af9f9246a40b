//! One breaker per endpoint of a service (`BreakerSet`): a call goes to
//! the first candidate whose breaker lets it through.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::*;

/// Generations apart of two breakers made for the same key: far more
/// transitions than one breaker makes.
pub(crate) const GENERATIONS_PER_BREAKER: u64 = 1 << 32;

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
    pub(crate) config: BreakerConfig,
    pub(crate) breakers: BTreeMap<String, Breaker>,
    /// Where the next breaker's generations start.
    pub(crate) next_generation: u64,
    pub(crate) opened_total: u64,
    pub(crate) rejected_total: u64,
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
