//! The policy: one engine that runs a call with a bulkhead, retries, a
//! circuit breaker and a timeout, used by [`Policy::call`] (any future,
//! borrowing what it likes) and by [`PolicyLayer`] (any tower service).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
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

/// A [`Policy`] as a tower [`Layer`](tower_layer::Layer).
#[derive(Debug, Clone)]
pub struct PolicyLayer {
    policy: Policy,
    idempotency: Idempotency,
}

impl<S> tower_layer::Layer<S> for PolicyLayer {
    type Service = PolicyService<S>;

    fn layer(&self, inner: S) -> PolicyService<S> {
        PolicyService {
            inner,
            policy: self.policy.clone(),
            idempotency: self.idempotency,
        }
    }
}

/// A service whose requests run under a [`Policy`].
#[derive(Debug, Clone)]
pub struct PolicyService<S> {
    inner: S,
    policy: Policy,
    idempotency: Idempotency,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req> tower_service::Service<Req> for PolicyService<S>
where
    S: tower_service::Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    Req: Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = BoxFuture<Result<S::Response, Error>>;

    /// Always ready: the bulkhead refuses instead of making callers wait,
    /// and each attempt waits for the inner service's readiness itself.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let inner = self.inner.clone();
        let policy = self.policy.clone();
        let idempotency = self.idempotency;
        Box::pin(async move {
            policy
                .run(idempotency, move || {
                    let mut service = inner.clone();
                    let request = request.clone();
                    async move {
                        std::future::poll_fn(|cx| service.poll_ready(cx))
                            .await
                            .map_err(Into::into)?;
                        service.call(request).await.map_err(Into::into)
                    }
                })
                .await
        })
    }
}

/// Policies' snapshots in the Prometheus text format, for a service's
/// `/metrics`: breaker state (one series per state, 1 for the current),
/// calls by outcome, rejections by reason, retries, timeouts, fallbacks,
/// breaker openings and outstanding calls, each labelled with the policy;
/// and for calls spread over a service's endpoints, each endpoint's
/// breaker state, openings and rejections labelled with the policy and the
/// endpoint (at most [`ENDPOINT_SERIES_MAX`] endpoints per policy, open
/// ones first), with the number of endpoints in each state.
pub fn prometheus_text(snapshots: &[PolicySnapshot]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, samples: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
    let label = |s: &PolicySnapshot| format!("policy=\"{}\"", escape(&s.policy));
    family(
        "courier_call_breaker_state",
        "gauge",
        "1 for the circuit breaker's current state",
        &mut snapshots.iter().flat_map(|s| {
            let current = s.breaker;
            let policy = label(s);
            current.into_iter().flat_map(move |current| {
                let policy = policy.clone();
                [
                    BreakerState::Closed,
                    BreakerState::Open,
                    BreakerState::HalfOpen,
                ]
                .into_iter()
                .map(move |state| {
                    (
                        format!("{policy},state=\"{}\"", state.as_str()),
                        u64::from(state == current),
                    )
                })
            })
        }),
    );
    family(
        "courier_call_breaker_opened_total",
        "counter",
        "Times the circuit breaker opened",
        &mut snapshots
            .iter()
            .filter(|s| s.breaker.is_some())
            .map(|s| (label(s), s.breaker_opened)),
    );
    family(
        "courier_call_calls_total",
        "counter",
        "Calls made, by outcome",
        &mut snapshots.iter().flat_map(|s| {
            [("succeeded", s.succeeded), ("failed", s.failed)]
                .map(|(outcome, n)| (format!("{},outcome=\"{outcome}\"", label(s)), n))
        }),
    );
    family(
        "courier_call_rejections_total",
        "counter",
        "Calls refused at once, by reason",
        &mut snapshots.iter().flat_map(|s| {
            [
                ("breaker_open", s.rejected_open),
                ("bulkhead_full", s.rejected_full),
            ]
            .map(|(reason, n)| (format!("{},reason=\"{reason}\"", label(s)), n))
        }),
    );
    family(
        "courier_call_retries_total",
        "counter",
        "Attempts after a first one",
        &mut snapshots.iter().map(|s| (label(s), s.retried)),
    );
    family(
        "courier_call_timeouts_total",
        "counter",
        "Attempts that ran out of time",
        &mut snapshots.iter().map(|s| (label(s), s.timed_out)),
    );
    family(
        "courier_call_fallbacks_total",
        "counter",
        "Failed calls answered by a fallback",
        &mut snapshots.iter().map(|s| (label(s), s.fallbacks)),
    );
    family(
        "courier_call_outstanding",
        "gauge",
        "Calls under way",
        &mut snapshots.iter().map(|s| (label(s), s.outstanding)),
    );
    let spread = || snapshots.iter().filter(|s| s.breaker.is_some());
    family(
        "courier_call_endpoint_breakers",
        "gauge",
        "Endpoints whose circuit breaker is in each state",
        &mut spread().flat_map(|s| {
            let counts = s.endpoint_states;
            [
                (BreakerState::Closed, counts.closed),
                (BreakerState::Open, counts.open),
                (BreakerState::HalfOpen, counts.half_open),
            ]
            .map(|(state, n)| (format!("{},state=\"{}\"", label(s), state.as_str()), n))
        }),
    );
    let endpoint_label = |s: &PolicySnapshot, e: &EndpointBreaker| {
        format!("{},endpoint=\"{}\"", label(s), escape(&e.endpoint))
    };
    family(
        "courier_call_endpoint_breaker_state",
        "gauge",
        "1 for an endpoint's circuit breaker's current state",
        &mut spread().flat_map(|s| {
            s.endpoints.iter().flat_map(move |e| {
                let endpoint = endpoint_label(s, e);
                [
                    BreakerState::Closed,
                    BreakerState::Open,
                    BreakerState::HalfOpen,
                ]
                .map(|state| {
                    (
                        format!("{endpoint},state=\"{}\"", state.as_str()),
                        u64::from(state == e.state),
                    )
                })
            })
        }),
    );
    family(
        "courier_call_endpoint_breaker_opened_total",
        "counter",
        "Times an endpoint's circuit breaker opened",
        &mut spread().flat_map(|s| {
            s.endpoints
                .iter()
                .map(move |e| (endpoint_label(s, e), e.opened))
        }),
    );
    family(
        "courier_call_endpoint_rejections_total",
        "counter",
        "Calls an endpoint's open circuit breaker turned away (to another endpoint, or refused)",
        &mut spread().flat_map(|s| {
            s.endpoints
                .iter()
                .map(move |e| (endpoint_label(s, e), e.rejected))
        }),
    );
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("down")]
    struct Down;

    fn breaker() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 2,
            failure_rate: None,
            cool_down: Duration::from_secs(1),
            ..BreakerConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idempotent_calls_are_retried_and_others_are_not() {
        let policy = Policy::builder("p").retries(3).build();
        let tries = AtomicU32::new(0);
        let flaky = || async {
            if tries.fetch_add(1, Ordering::Relaxed) < 2 {
                Err(Down)
            } else {
                Ok(42)
            }
        };
        assert_eq!(policy.call_idempotent(flaky).await.unwrap(), 42);
        assert_eq!(tries.load(Ordering::Relaxed), 3);
        tries.store(0, Ordering::Relaxed);
        assert!(matches!(policy.call(flaky).await, Err(Error::Failed(_))));
        assert_eq!(
            tries.load(Ordering::Relaxed),
            1,
            "not idempotent: one attempt"
        );
        let s = policy.snapshot();
        assert_eq!((s.calls, s.succeeded, s.failed, s.retried), (2, 1, 1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_the_timeout_fails_with_timeout() {
        let policy = Policy::builder("p")
            .timeout(Duration::from_millis(100))
            .build();
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Down>(())
        };
        let started = Instant::now();
        assert!(matches!(policy.call(slow).await, Err(Error::Timeout(_))));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(policy.snapshot().timed_out, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_fails_fast_and_a_probe_closes_it() {
        let policy = Policy::builder("p").retries(5).breaker(breaker()).build();
        let tries = AtomicU32::new(0);
        let down = || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(Down)
        };
        // The retries stop at the rejection once the breaker opened.
        assert!(matches!(
            policy.call_idempotent(down).await,
            Err(Error::Open { .. })
        ));
        assert_eq!(tries.load(Ordering::Relaxed), 2);
        assert_eq!(policy.breaker_state(), Some(BreakerState::Open));
        assert!(matches!(policy.call(down).await, Err(Error::Open { .. })));
        assert_eq!(tries.load(Ordering::Relaxed), 2, "not called while open");

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(policy.breaker_state(), Some(BreakerState::HalfOpen));
        policy.call(|| async { Ok::<_, Down>(()) }).await.unwrap();
        assert_eq!(policy.breaker_state(), Some(BreakerState::Closed));
        let s = policy.snapshot();
        assert_eq!((s.breaker_opened, s.rejected_open), (1, 2));
        let text = prometheus_text(&[s]);
        assert!(
            text.contains("courier_call_breaker_state{policy=\"p\",state=\"closed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("courier_call_rejections_total{policy=\"p\",reason=\"breaker_open\"} 2"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn spread_calls_go_around_an_endpoint_whose_breaker_is_open() {
        use crate::{Balance, Balancer};

        let policy = Policy::builder("p").retries(0).breaker(breaker()).build();
        for balance in [Balance::RoundRobin, Balance::PowerOfTwoChoices] {
            let balancer = Balancer::new(balance);
            let listed: Arc<[&'static str]> = Arc::from(vec!["up", "down"]);
            let endpoints = || listed.clone();
            let spread = Spread {
                service: "svc",
                balancer: &balancer,
                endpoints: &endpoints,
                key: |e: &&'static str| e,
            };
            let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let call = || {
                policy.call_spread(Idempotency::NotIdempotent, &spread, |e| {
                    let down = down.load(Ordering::Relaxed);
                    async move {
                        if e == "down" && down {
                            Err(Down)
                        } else {
                            Ok(e)
                        }
                    }
                })
            };
            let mut failed = 0;
            while policy.endpoint_breaker_state("down") != Some(BreakerState::Open) {
                if call().await.is_err() {
                    failed += 1;
                }
                assert!(failed <= 2, "{balance:?}: open after 2 failures");
            }
            assert_eq!(
                policy.endpoint_breaker_state("up"),
                Some(BreakerState::Closed)
            );
            assert_eq!(
                policy.breaker_state(),
                Some(BreakerState::Closed),
                "up still takes calls"
            );
            for _ in 0..10 {
                assert_eq!(call().await.unwrap(), "up", "{balance:?}");
            }

            // The probe after the cool-down goes to the endpoint that was
            // down, and closes its breaker.
            down.store(false, Ordering::Relaxed);
            tokio::time::advance(Duration::from_secs(1)).await;
            // Two choices pick at random: a few calls may go to up first.
            let mut reached = false;
            for _ in 0..64 {
                if call().await.unwrap() == "down" {
                    reached = true;
                    break;
                }
            }
            assert!(
                reached,
                "{balance:?}: the probe went to the endpoint that was down"
            );
            assert_eq!(
                policy.endpoint_breaker_state("down"),
                Some(BreakerState::Closed)
            );
        }
        let s = policy.snapshot();
        assert_eq!(s.breaker_opened, 2);
        assert!(s.endpoints.iter().all(|e| e.state == BreakerState::Closed));
        assert!(
            s.endpoints
                .iter()
                .any(|e| e.endpoint == "down" && e.rejected >= 5),
            "round robin alone turned away half of its 10 calls: {:?}",
            s.endpoints
        );
        assert_eq!(s.rejected_open, 0, "no call was refused: up took them");
        let text = prometheus_text(&[s]);
        assert!(
            text.contains("courier_call_endpoint_breaker_state{policy=\"p\",endpoint=\"down\",state=\"closed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("courier_call_endpoint_breakers{policy=\"p\",state=\"closed\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("courier_call_endpoint_rejections_total{policy=\"p\",endpoint=\"down\"}"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_spread_call_fails_fast_only_when_every_endpoint_is_open() {
        use crate::{Balance, Balancer};

        let policy = Policy::builder("p").retries(0).breaker(breaker()).build();
        let balancer = Balancer::new(Balance::RoundRobin);
        let listed: Arc<[&'static str]> = Arc::from(vec!["a", "b"]);
        let endpoints = || listed.clone();
        let spread = Spread {
            service: "svc",
            balancer: &balancer,
            endpoints: &endpoints,
            key: |e: &&'static str| e,
        };
        let tries = AtomicU32::new(0);
        let call = || {
            policy.call_spread(Idempotency::NotIdempotent, &spread, |_| async {
                tries.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(Down)
            })
        };
        for _ in 0..4 {
            assert!(matches!(call().await, Err(Error::Failed(_))));
        }
        assert_eq!(policy.breaker_state(), Some(BreakerState::Open));
        assert!(matches!(call().await, Err(Error::Open { .. })));
        assert_eq!(
            tries.load(Ordering::Relaxed),
            4,
            "not called once all are open"
        );
        let s = policy.snapshot();
        assert_eq!((s.rejected_open, s.breaker_opened), (1, 2));
        assert_eq!(s.endpoint_states.open, 2);

        let nothing: Arc<[&'static str]> = Arc::from(Vec::new());
        let none = || nothing.clone();
        let empty = Spread {
            endpoints: &none,
            ..spread
        };
        let refused = policy
            .call_spread(Idempotency::NotIdempotent, &empty, |_| async {
                Ok::<_, Down>(())
            })
            .await;
        assert!(
            matches!(refused, Err(Error::NoEndpoints(ref s)) if s == "svc"),
            "{refused:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_refuses_at_once_and_a_fallback_answers() {
        let policy = Policy::builder("p").bulkhead(1).build();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let holder = policy.clone();
        let busy = tokio::spawn(async move {
            let mut released = Some(released);
            holder
                .call(|| {
                    let released = released.take();
                    async move {
                        match released {
                            Some(released) => released.await.map_err(|_| Down),
                            None => Err(Down),
                        }
                    }
                })
                .await
        });
        while policy.snapshot().outstanding < 1 {
            tokio::task::yield_now().await;
        }
        let refused = policy.call(|| async { Ok::<_, Down>(1) }).await;
        assert!(matches!(refused, Err(Error::Full { max: 1, .. })));
        let answered = policy
            .call_with_fallback(
                Idempotency::NotIdempotent,
                || async { Ok::<_, Down>(1) },
                |e| {
                    assert!(e.is_rejection());
                    Ok(0)
                },
            )
            .await;
        assert_eq!(answered.unwrap(), 0);
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        let s = policy.snapshot();
        assert_eq!((s.rejected_full, s.fallbacks, s.outstanding), (2, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn as_a_tower_layer_it_retries_cloned_requests() {
        use tower_layer::Layer;
        use tower_service::Service;

        #[derive(Clone)]
        struct Echo(Arc<AtomicU32>);
        impl Service<String> for Echo {
            type Response = String;
            type Error = Down;
            type Future = Pin<Box<dyn Future<Output = Result<String, Down>> + Send>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Down>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, request: String) -> Self::Future {
                let first = self.0.fetch_add(1, Ordering::Relaxed) == 0;
                Box::pin(async move {
                    if first {
                        Err(Down)
                    } else {
                        Ok(request)
                    }
                })
            }
        }
        let calls = Arc::new(AtomicU32::new(0));
        let policy = Policy::builder("p").build();
        let mut service = policy
            .layer(Idempotency::Idempotent)
            .layer(Echo(calls.clone()));
        let answer = service.call("hello".to_string()).await.unwrap();
        assert_eq!(answer, "hello");
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }
}
