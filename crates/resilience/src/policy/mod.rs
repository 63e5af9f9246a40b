//! The policy: one engine that runs a call with a bulkhead, retries, a
//! circuit breaker and a timeout, used by [`Policy::call`] (any future,
//! borrowing what it likes) and by [`PolicyLayer`] (any tower service).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::balance::Balancer;
use crate::breaker::{
    Breaker, BreakerConfig, BreakerSet, BreakerState, Outcome, Permit, Rejected, StateCounts,
};
use crate::{BoxError, Error};

mod layer;
mod metrics;

pub use layer::{PolicyLayer, PolicyService};
pub use metrics::prometheus_text;

/// Endpoints' series a snapshot (and so the metrics text) has per policy
/// at most: the labels stay bounded however many instances a service
/// has. Those not open come last and are left out first; the counts of
/// endpoints by state cover every one.
pub const ENDPOINT_SERIES_MAX: usize = 64;

/// Whether a call may be made again after it failed: only an idempotent
/// operation (a read, or a write with a dedup key) is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    Idempotent,
    NotIdempotent,
}

/// What to build a [`Policy`] with; see [`Policy::builder`].
#[derive(Debug, Clone)]
pub struct PolicyBuilder {
    name: String,
    timeout: Duration,
    retries: u32,
    backoff: Backoff,
    breaker: Option<BreakerConfig>,
    bulkhead: Option<usize>,
}

impl PolicyBuilder {
    /// How long one attempt may take (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Attempts after the first, for idempotent calls (default 2).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The wait before each retry (default: 50 ms doubling to 2 s, full jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// A circuit breaker (default: none).
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(config);
        self
    }

    /// At most `max` calls outstanding; more are refused at once (default: no limit).
    pub fn bulkhead(mut self, max: usize) -> Self {
        self.bulkhead = Some(max);
        self
    }

    pub fn build(self) -> Policy {
        Policy {
            shared: Arc::new(Shared {
                bulkhead: self
                    .bulkhead
                    .map(|max| (Arc::new(Semaphore::new(max)), max)),
                endpoint_breakers: self
                    .breaker
                    .clone()
                    .map(|config| Mutex::new(BreakerSet::new(config))),
                breaker: self.breaker.map(|config| Mutex::new(Breaker::new(config))),
                name: self.name,
                timeout: self.timeout,
                retries: self.retries,
                backoff: self.backoff,
                counters: Counters::default(),
            }),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    retried: AtomicU64,
    rejected_open: AtomicU64,
    rejected_full: AtomicU64,
    fallbacks: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared {
    name: String,
    timeout: Duration,
    retries: u32,
    backoff: Backoff,
    /// For calls not spread over endpoints (bus requests, say).
    breaker: Option<Mutex<Breaker>>,
    /// For calls spread over a service's endpoints: one breaker each.
    endpoint_breakers: Option<Mutex<BreakerSet>>,
    bulkhead: Option<(Arc<Semaphore>, usize)>,
    counters: Counters,
}

/// A service's endpoints for [`Policy::call_spread`]: each attempt goes to
/// one of them, the balancer's pick unless that one's breaker is open.
pub struct Spread<'a, P> {
    /// The service's name, for the error when it has no endpoint.
    pub service: &'a str,
    pub balancer: &'a Balancer,
    /// The endpoints listed now, asked once per attempt.
    pub endpoints: &'a (dyn Fn() -> Arc<[P]> + Send + Sync),
    /// An endpoint's key (its id): of its breaker, of its count in the
    /// balancer, and its label in the metrics.
    pub key: fn(&P) -> &str,
}

/// How calls to one dependency are made: timeout, retries of idempotent
/// calls, circuit breaker, bulkhead. Cheap to clone; clones share the
/// breaker, the bulkhead and the counters, so make one per dependency and
/// use it for every call to it.
#[derive(Debug, Clone)]
pub struct Policy {
    shared: Arc<Shared>,
}

/// One endpoint's breaker in a [`PolicySnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointBreaker {
    /// The endpoint's key (its instance id).
    pub endpoint: String,
    pub state: BreakerState,
    /// Times it opened.
    pub opened: u64,
    /// Calls it turned away (to another endpoint, or refused).
    pub rejected: u64,
}

/// The counters and state of a [`Policy`], for a service to expose
/// (as JSON, or with [`prometheus_text`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySnapshot {
    pub policy: String,
    /// `None` without a breaker; see [`Policy::breaker_state`].
    pub breaker: Option<BreakerState>,
    /// Times a breaker opened (the policy's own and its endpoints').
    pub breaker_opened: u64,
    /// The breakers of the endpoints called through [`Policy::call_spread`]
    /// (a discovered service's instances), at most [`ENDPOINT_SERIES_MAX`]
    /// of them, open and half-open ones first.
    pub endpoints: Vec<EndpointBreaker>,
    /// Endpoints' breakers in each state, every one counted.
    pub endpoint_states: StateCounts,
    /// Calls made (each counts once, however many attempts it took).
    pub calls: u64,
    pub succeeded: u64,
    /// Calls that ended in an error (rejections included).
    pub failed: u64,
    /// Attempts that ran out of time.
    pub timed_out: u64,
    /// Attempts after a first one.
    pub retried: u64,
    /// Attempts refused by the open (or half-open) breaker; for a call
    /// spread over endpoints, when every endpoint's breaker refused.
    pub rejected_open: u64,
    /// Calls refused by the full bulkhead.
    pub rejected_full: u64,
    /// Failed calls answered by a fallback.
    pub fallbacks: u64,
    /// Calls under way now (bulkhead slots taken).
    pub outstanding: u64,
}

impl Policy {
    /// A policy named `name` (the label of its metrics): 10 s timeout, two
    /// retries for idempotent calls, no breaker, no bulkhead.
    pub fn builder(name: impl Into<String>) -> PolicyBuilder {
        PolicyBuilder {
            name: name.into(),
            timeout: Duration::from_secs(10),
            retries: 2,
            backoff: Backoff::default(),
            breaker: None,
            bulkhead: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs a call that must not be repeated: one attempt.
    pub async fn call<T, E, F, Fut>(&self, attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        self.run(Idempotency::NotIdempotent, attempt).await
    }

    /// Runs an idempotent call: failed attempts (errors and timeouts, not
    /// rejections) are made again, after a backoff, up to the retries.
    pub async fn call_idempotent<T, E, F, Fut>(&self, attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        self.run(Idempotency::Idempotent, attempt).await
    }

    /// Runs a call and, if it fails (rejections included), answers with
    /// what `fallback` makes of the error instead.
    pub async fn call_with_fallback<T, E, F, Fut, G>(
        &self,
        idempotency: Idempotency,
        attempt: F,
        fallback: G,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
        G: FnOnce(Error) -> Result<T, Error>,
    {
        match self.run(idempotency, attempt).await {
            Ok(value) => Ok(value),
            Err(error) => {
                bump(&self.shared.counters.fallbacks);
                fallback(error)
            }
        }
    }

    /// This policy as a tower layer: every request to the wrapped service
    /// runs under it (requests are cloned for retries).
    pub fn layer(&self, idempotency: Idempotency) -> PolicyLayer {
        PolicyLayer {
            policy: self.clone(),
            idempotency,
        }
    }

    /// The breaker's state now, `None` without one. Once calls were
    /// spread over endpoints ([`Policy::call_spread`]), the state of their
    /// breakers as a whole: closed while any endpoint's is, open only when
    /// every one is (calls then fail at once).
    pub fn breaker_state(&self) -> Option<BreakerState> {
        let now = Instant::now().into_std();
        let spread = self
            .shared
            .endpoint_breakers
            .as_ref()
            .and_then(|set| lock(set).state_overall(now));
        spread.or_else(|| {
            self.shared
                .breaker
                .as_ref()
                .map(|breaker| lock(breaker).state(now))
        })
    }

    /// The state of the endpoint `key`'s breaker now; `None` without a
    /// breaker or before a call to it.
    pub fn endpoint_breaker_state(&self, key: &str) -> Option<BreakerState> {
        let now = Instant::now().into_std();
        self.shared
            .endpoint_breakers
            .as_ref()
            .and_then(|set| lock(set).state(key, now))
    }

    pub fn snapshot(&self) -> PolicySnapshot {
        let c = &self.shared.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let now = Instant::now().into_std();
        let (own_state, own_opened) = match &self.shared.breaker {
            Some(breaker) => {
                let breaker = lock(breaker);
                (Some(breaker.state(now)), breaker.opened_total())
            }
            None => (None, 0),
        };
        let (spread_state, spread_opened, endpoint_states, mut endpoints) =
            match &self.shared.endpoint_breakers {
                Some(set) => {
                    let set = lock(set);
                    let endpoints: Vec<EndpointBreaker> = set
                        .breakers()
                        .map(|(key, b)| EndpointBreaker {
                            endpoint: key.to_string(),
                            state: b.state(now),
                            opened: b.opened_total(),
                            rejected: b.rejected_total(),
                        })
                        .collect();
                    (
                        set.state_overall(now),
                        set.opened_total(),
                        set.counts(now),
                        endpoints,
                    )
                }
                None => (None, 0, StateCounts::default(), Vec::new()),
            };
        // Open ones first, then half-open, then closed, each by key.
        endpoints.sort_by_key(|e| match e.state {
            BreakerState::Open => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Closed => 2,
        });
        endpoints.truncate(ENDPOINT_SERIES_MAX);
        let breaker = spread_state.or(own_state);
        let breaker_opened = own_opened + spread_opened;
        let outstanding = self.shared.bulkhead.as_ref().map_or(0, |(slots, max)| {
            max.saturating_sub(slots.available_permits()) as u64
        });
        PolicySnapshot {
            policy: self.shared.name.clone(),
            breaker,
            breaker_opened,
            endpoints,
            endpoint_states,
            calls: load(&c.calls),
            succeeded: load(&c.succeeded),
            failed: load(&c.failed),
            timed_out: load(&c.timed_out),
            retried: load(&c.retried),
            rejected_open: load(&c.rejected_open),
            rejected_full: load(&c.rejected_full),
            fallbacks: load(&c.fallbacks),
            outstanding,
        }
    }

    /// Runs a call to one of a service's endpoints: each attempt asks
    /// `spread` for the endpoints listed now, picks one (the balancer's
    /// choice, or the next whose breaker lets the call through: each
    /// endpoint has a breaker of its own, so one dead instance is called
    /// around) and runs `call` with it. A retry may go to another
    /// endpoint. Fails at once with [`Error::Open`] only when every
    /// endpoint's breaker is open, with [`Error::NoEndpoints`] when none
    /// is listed.
    pub async fn call_spread<P, T, E, F, Fut>(
        &self,
        idempotency: Idempotency,
        spread: &Spread<'_, P>,
        mut call: F,
    ) -> Result<T, Error>
    where
        P: Clone,
        F: FnMut(P) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        self.engine(idempotency, Some(spread), |endpoint| {
            let attempt = endpoint.map(&mut call);
            async move {
                match attempt {
                    Some(attempt) => attempt.await.map_err(Into::into),
                    // The engine names an endpoint to every spread attempt.
                    None => Err(BoxError::from(Error::NoEndpoints(String::new()))),
                }
            }
        })
        .await
    }

    /// Runs `attempt` under the policy, retried when `idempotency` says
    /// so: what [`Policy::call`], [`Policy::call_idempotent`] and the
    /// tower layer do.
    pub async fn run<T, E, F, Fut>(
        &self,
        idempotency: Idempotency,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        self.engine(idempotency, None::<&Spread<'_, ()>>, |_| attempt())
            .await
    }

    /// The engine: bulkhead around the whole call (retries keep their
    /// slot), then per attempt the breaker's leave (the policy's own, or
    /// with `spread` the chosen endpoint's) and the timeout.
    async fn engine<P, T, E, F, Fut>(
        &self,
        idempotency: Idempotency,
        spread: Option<&Spread<'_, P>>,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        P: Clone,
        F: FnMut(Option<P>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let shared = &*self.shared;
        bump(&shared.counters.calls);
        let _slot = match &shared.bulkhead {
            None => None,
            Some((slots, max)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    bump(&shared.counters.rejected_full);
                    bump(&shared.counters.failed);
                    return Err(Error::Full {
                        policy: shared.name.clone(),
                        max: *max,
                    });
                }
            },
        };
        let mut retry = 0;
        loop {
            let result = match spread {
                None => self.attempt(&mut attempt).await,
                Some(spread) => self.attempt_spread(spread, &mut attempt).await,
            };
            match result {
                Ok(value) => {
                    bump(&shared.counters.succeeded);
                    return Ok(value);
                }
                Err(error)
                    if idempotency == Idempotency::Idempotent
                        && retry < shared.retries
                        && error.is_retryable() =>
                {
                    bump(&shared.counters.retried);
                    tokio::time::sleep(shared.backoff.delay(retry)).await;
                    retry += 1;
                }
                Err(error) => {
                    bump(&shared.counters.failed);
                    return Err(error);
                }
            }
        }
    }

    /// One attempt under the policy's own breaker.
    async fn attempt<P, T, E, F, Fut>(&self, attempt: &mut F) -> Result<T, Error>
    where
        F: FnMut(Option<P>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let mut leave = match &self.shared.breaker {
            None => None,
            Some(breaker) => match lock(breaker).acquire(Instant::now().into_std()) {
                Ok(permit) => Some(Leave {
                    gate: Gate::Own(breaker),
                    permit: Some(permit),
                }),
                Err(rejected) => return Err(self.refused(rejected)),
            },
        };
        let result = self.timed(attempt(None)).await;
        if let Some(leave) = &mut leave {
            leave.record(&result);
        }
        result
    }

    /// One attempt at one of `spread`'s endpoints, under its breaker.
    async fn attempt_spread<P, T, E, F, Fut>(
        &self,
        spread: &Spread<'_, P>,
        attempt: &mut F,
    ) -> Result<T, Error>
    where
        P: Clone,
        F: FnMut(Option<P>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<BoxError>,
    {
        let listed = (spread.endpoints)();
        let order = spread.balancer.order(&listed, spread.key);
        let keys: Vec<&str> = order.iter().map(|&i| (spread.key)(&listed[i])).collect();
        let (chosen, mut leave) = match &self.shared.endpoint_breakers {
            None => (0, None),
            Some(set) => {
                let acquired = lock(set).acquire(&keys, Instant::now().into_std());
                match acquired {
                    Ok((at, permit)) => (
                        at,
                        Some(Leave {
                            gate: Gate::Endpoint(set, keys[at].to_string()),
                            permit: Some(permit),
                        }),
                    ),
                    Err(_) if keys.is_empty() => (0, None),
                    Err(rejected) => return Err(self.refused(rejected)),
                }
            }
        };
        let Some(&index) = order.get(chosen) else {
            return Err(Error::NoEndpoints(spread.service.to_string()));
        };
        let endpoint = listed[index].clone();
        let in_flight = spread.balancer.hold(keys[chosen]);
        drop(keys);
        drop(listed);
        let result = self.timed(attempt(Some(endpoint))).await;
        drop(in_flight);
        if let Some(leave) = &mut leave {
            leave.record(&result);
        }
        result
    }

    /// A breaker's refusal as the call's error.
    fn refused(&self, rejected: Rejected) -> Error {
        bump(&self.shared.counters.rejected_open);
        Error::Open {
            policy: self.shared.name.clone(),
            retry_in: rejected.retry_in,
        }
    }

    /// An attempt's outcome within the policy's timeout.
    async fn timed<T, E>(&self, attempt: impl Future<Output = Result<T, E>>) -> Result<T, Error>
    where
        E: Into<BoxError>,
    {
        let shared = &*self.shared;
        match tokio::time::timeout(shared.timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Error::from_box(error.into())),
            Err(_) => {
                bump(&shared.counters.timed_out);
                Err(Error::Timeout(shared.timeout))
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whose permit an attempt holds.
enum Gate<'a> {
    Own(&'a Mutex<Breaker>),
    Endpoint(&'a Mutex<BreakerSet>, String),
}

/// A breaker's permit for one attempt; an attempt dropped before it ended
/// (its caller gave up) hands the permit back unrecorded.
struct Leave<'a> {
    gate: Gate<'a>,
    permit: Option<Permit>,
}

impl Leave<'_> {
    fn record<T>(&mut self, result: &Result<T, Error>) {
        let outcome = if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        let Some(permit) = self.permit.take() else {
            return;
        };
        let now = Instant::now().into_std();
        match &self.gate {
            Gate::Own(breaker) => lock(breaker).record(permit, outcome, now),
            Gate::Endpoint(set, key) => lock(set).record(key, permit, outcome, now),
        }
    }
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            match &self.gate {
                Gate::Own(breaker) => lock(breaker).release(permit),
                Gate::Endpoint(set, key) => lock(set).release(key, permit),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests;
