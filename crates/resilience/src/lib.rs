//! Resilience for calls from one service to another: a [`Policy`] runs
//! each call with a timeout, retries idempotent calls with exponential
//! backoff and full jitter, fails fast through a circuit breaker and a
//! bulkhead, and can fall back; a [`Balancer`] spreads calls over a
//! service's endpoints (round robin, or the less loaded of two picked at
//! random), and [`Policy::call_spread`] gives each endpoint a breaker of
//! its own, so calls go around a dead instance and fail fast only when
//! every one's breaker is open.
//!
//! ```
//! use std::time::Duration;
//! use courier_resilience::{BreakerConfig, Policy};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let policy = Policy::builder("inventory")
//!     .timeout(Duration::from_secs(2))
//!     .retries(3)
//!     .breaker(BreakerConfig::default())
//!     .bulkhead(64)
//!     .build();
//! let stock: Result<u32, _> = policy
//!     .call_idempotent(|| async { Ok::<u32, std::io::Error>(7) })
//!     .await;
//! assert_eq!(stock.unwrap(), 7);
//! assert_eq!(policy.snapshot().succeeded, 1);
//! # }
//! ```
#![forbid(unsafe_code)]

mod backoff;
mod balance;
pub mod breaker;
mod policy;

use std::time::Duration;

pub use backoff::Backoff;
pub use balance::{Balance, Balancer, InFlight};
pub use breaker::{BreakerConfig, BreakerState, StateCounts};
pub use policy::{
    prometheus_text, EndpointBreaker, Idempotency, Policy, PolicyBuilder, PolicyLayer,
    PolicyService, PolicySnapshot, Spread, ENDPOINT_SERIES_MAX,
};

/// Any error of the call a policy runs.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a call under a [`Policy`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The circuit breaker is open: the call was not made.
    #[error(
        "{policy}: the circuit breaker is open after repeated failures; calls fail at once for {retry_in:?} more, then a probe goes through"
    )]
    Open { policy: String, retry_in: Duration },
    /// The bulkhead is full: the call was not made.
    #[error("{policy}: {max} calls are under way, the bulkhead's limit; this one was refused rather than queued (raise it with PolicyBuilder::bulkhead)")]
    Full { policy: String, max: usize },
    /// An attempt took longer than the policy's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// No healthy endpoint of the service to call.
    #[error("no healthy instance of service {0} is registered; see `courier services {0} --all`")]
    NoEndpoints(String),
    /// The call itself failed.
    #[error(transparent)]
    Failed(BoxError),
}

impl Error {
    /// Whether the breaker or the bulkhead refused the call (it was not made).
    pub fn is_rejection(&self) -> bool {
        matches!(self, Error::Open { .. } | Error::Full { .. })
    }

    /// Whether another attempt might succeed: not after a rejection, which
    /// is there to spare the dependency.
    fn is_retryable(&self) -> bool {
        !self.is_rejection()
    }

    /// A call's error, unwrapped when it is a policy's own (a policy
    /// around another, or a call that found no endpoint).
    fn from_box(error: BoxError) -> Error {
        match error.downcast::<Error>() {
            Ok(own) => *own,
            Err(other) => Error::Failed(other),
        }
    }
}
