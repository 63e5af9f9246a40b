//! Leases in KV `courier_leases` (docs/SCALE-OUT.md §5): one node at a
//! time leads a keyed lane, the scheduler or the reclaimer.
//!
//! The key's revision is the fencing token. A holder renews with a
//! compare-and-set on the revision it last wrote; a holder that was
//! paused wakes with a stale revision, its renewal is refused (`wrong
//! last sequence`), and it knows it lost the lease. Between renewals it
//! acts only while its own monotonic clock says it is within
//! [`LeaseTiming::valid_for`] of the last confirmed renewal, which is
//! shorter than the bucket's max age: the key is gone — and another node
//! may take it — only after the max age, by then the old holder stopped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::names::NodeId;

/// How a holder keeps a lease. The bucket's max age
/// ([`crate::Settings::lease_max_age`]) must exceed `valid_for` by more
/// than any clock-rate difference and request latency between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// Renew this long after the last confirmed renewal.
    pub renew_every: Duration,
    /// Act on the lease only this long after the last confirmed renewal.
    pub valid_for: Duration,
}

impl Default for LeaseTiming {
    /// The design's: renew every 3 s, act for 7 s, with a 10 s max age.
    fn default() -> LeaseTiming {
        LeaseTiming {
            renew_every: Duration::from_secs(3),
            valid_for: Duration::from_secs(7),
        }
    }
}

/// Attempts of one [`Lease::acquire`] when the key is refused as taken
/// and then read as free, and the pause before the next (times the
/// attempt).
const ACQUIRE_ATTEMPTS: u32 = 4;
const ACQUIRE_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A lease key's value: who holds it, since when (unix ns). `since`
/// tells two tenures of one node apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    pub node: String,
    pub since: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another node holds it now, or it aged out: the holder must stop at
    /// once and drop what it did under the lease, acknowledging nothing.
    #[error("lease {key} is lost{}", match .now_held_by { Some(n) => format!(" to node {n}"), None => " (it aged out)".to_string() })]
    Lost {
        key: String,
        now_held_by: Option<String>,
    },
    /// The request did not complete (no quorum, a timeout): whether it
    /// was applied is unknown. Retry; the lease stays valid only until
    /// [`Lease::valid_until`].
    #[error("lease {key}: the KV request failed: {reason}")]
    Store { key: String, reason: String },
    #[error("lease {key} holds a value that is not a lease ({reason}); delete the key")]
    Corrupt { key: String, reason: String },
}

/// The outcome of an attempt to take a lease.
#[derive(Debug)]
pub enum Acquired {
    Gained(Box<Lease>),
    /// Another node holds it; watch the key, try again when it is gone.
    HeldBy {
        node: String,
        revision: u64,
    },
}

/// A lease this node holds.
#[derive(Debug)]
pub struct Lease {
    store: kv::Store,
    key: String,
    value: LeaseValue,
    revision: u64,
    /// When the last confirmed write was *sent*: the key's age on the
    /// server is no more than the time since then.
    renewed_at: Instant,
    timing: LeaseTiming,
}

fn store_error(key: &str, e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Store {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The live holder of `key` and the key's revision, if any. Read from the
/// bucket's stream leader: a direct get (what `kv::Store::entry` does) may
/// be served by a replica that has not applied the last write yet, and a
/// lease must not be read stale.
pub async fn holder(store: &kv::Store, key: &str) -> Result<Option<(LeaseValue, u64)>, LeaseError> {
    let subject = format!("{}{key}", store.prefix);
    let message = match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(store_error(key, e)),
    };
    // A delete or purge leaves a marker message: the key is free.
    let operation = message.headers.get("KV-Operation").map(|v| v.as_str());
    if matches!(operation, Some("DEL") | Some("PURGE"))
        || message.headers.get("Nats-Marker-Reason").is_some()
    {
        return Ok(None);
    }
    let value: LeaseValue =
        serde_json::from_slice(&message.payload).map_err(|e| LeaseError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
    Ok(Some((value, message.sequence)))
}

/// Whether a KV write was refused for its expected revision. nats-server
/// 2.15 answers a `create` of an existing key with error 10164 (`wrong
/// last sequence`, for an expected sequence of 0), which async-nats does
/// not classify, so the cause chain is searched for either code.
pub(crate) fn is_wrong_revision(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            let code = js.error_code();
            return code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT;
        }
        cause = err.source();
    }
    false
}

impl Lease {
    /// Takes `key` for `node` if nobody holds it (KV `create`).
    pub async fn acquire(
        store: &kv::Store,
        key: &str,
        node: &NodeId,
        timing: LeaseTiming,
    ) -> Result<Acquired, LeaseError> {
        let value = LeaseValue {
            node: node.to_string(),
            since: unix_ns(),
        };
        let body: bytes::Bytes = serde_json::to_vec(&value)
            .map_err(|e| store_error(key, e))?
            .into();
        for attempt in 1..=ACQUIRE_ATTEMPTS {
            let sent_at = Instant::now();
            match store.create(key, body.clone()).await {
                Ok(revision) => {
                    return Ok(Acquired::Gained(Box::new(Lease {
                        store: store.clone(),
                        key: key.to_string(),
                        value,
                        revision,
                        renewed_at: sent_at,
                        timing,
                    })))
                }
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists || is_wrong_revision(&e) => {
                    if let Some((value, revision)) = holder(store, key).await? {
                        return Ok(Acquired::HeldBy {
                            node: value.node,
                            revision,
                        });
                    }
                    // Refused, yet nothing is stored: another node's create
                    // is proposed but not applied yet (the leader refuses a
                    // second write expecting the same revision meanwhile),
                    // or the holder released it since. Look again shortly.
                    tokio::time::sleep(ACQUIRE_RETRY_PAUSE * attempt).await;
                }
                Err(e) => return Err(store_error(key, e)),
            }
        }
        Err(store_error(
            key,
            "the key was refused as taken but read as free, repeatedly; retry",
        ))
    }

    /// Renews by compare-and-set on the last revision written. A refused
    /// renewal is [`LeaseError::Lost`]; stop acting on the lease.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let body = serde_json::to_vec(&self.value).map_err(|e| store_error(&self.key, e))?;
        let sent_at = Instant::now();
        match self
            .store
            .update(&self.key, body.clone().into(), self.revision)
            .await
        {
            Ok(revision) => {
                self.revision = revision;
                self.renewed_at = sent_at;
                Ok(())
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision || is_wrong_revision(&e) => {
                // Our own renewal whose answer was lost may have moved the
                // revision: the key then holds exactly this tenure's value
                // (node ids are new at every start, `since` new at every
                // acquisition), which nobody else writes. Take its revision
                // and renew once more; `renewed_at` stays at the last
                // confirmed renewal.
                match holder(&self.store, &self.key).await? {
                    Some((value, revision)) if value == self.value => {
                        let sent_at = Instant::now();
                        let revision = self
                            .store
                            .update(&self.key, body.into(), revision)
                            .await
                            .map_err(|e| self.lost_or_store(e))?;
                        self.revision = revision;
                        self.renewed_at = sent_at;
                        Ok(())
                    }
                    Some((value, _)) => Err(LeaseError::Lost {
                        key: self.key.clone(),
                        now_held_by: Some(value.node),
                    }),
                    None => Err(LeaseError::Lost {
                        key: self.key.clone(),
                        now_held_by: None,
                    }),
                }
            }
            Err(e) => Err(store_error(&self.key, e)),
        }
    }

    fn lost_or_store(&self, e: kv::UpdateError) -> LeaseError {
        if e.kind() == UpdateErrorKind::WrongLastRevision || is_wrong_revision(&e) {
            LeaseError::Lost {
                key: self.key.clone(),
                now_held_by: None,
            }
        } else {
            store_error(&self.key, e)
        }
    }

    /// Gives the lease up (a clean stop): deletes the key if it is still
    /// this holder's revision, so the next holder need not wait out the
    /// max age.
    pub async fn release(self) -> Result<(), LeaseError> {
        self.store
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
            .map_err(|e| store_error(&self.key, e))
    }

    /// Whether the holder may act on the lease at `now`.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.valid_until()
    }

    pub fn valid_until(&self) -> Instant {
        self.renewed_at + self.timing.valid_for
    }

    /// When to renew next.
    pub fn renew_at(&self) -> Instant {
        self.renewed_at + self.timing.renew_every
    }

    /// The fencing token: the key's revision as this holder last wrote it.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn value(&self) -> &LeaseValue {
        &self.value
    }
}

/// After a renewal failed for want of an answer (no quorum, a timeout),
/// the next attempt comes this much later (while the lease is still valid,
/// and after too).
const RENEW_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// What a [`LeaseKeeper`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holding {
    /// Held: act on it while `now < valid_until`.
    Held { revision: u64, valid_until: Instant },
    /// Lost for good (refused renewal); the keeper stopped.
    Lost { now_held_by: Option<String> },
}

/// The leases a node has held since it started, each with its current
/// tenure's outcome (none between tenures): what its `courier_lease_held`
/// gauge shows, and how it knows whether it holds one now.
#[derive(Default)]
pub struct HeldLeases {
    leases: std::sync::Mutex<Tenures>,
}

/// Per lease, the current tenure's outcome.
type Tenures = std::collections::BTreeMap<String, Option<tokio::sync::watch::Receiver<Holding>>>;

impl HeldLeases {
    fn leases(&self) -> std::sync::MutexGuard<'_, Tenures> {
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A tenure of `lease` began, kept by `keeper`.
    pub fn began(&self, lease: &str, keeper: &LeaseKeeper) {
        self.leases()
            .insert(lease.to_string(), Some(keeper.watch()));
    }

    /// The tenure of `lease` ended (lost, let go, or no longer valid).
    pub fn ended(&self, lease: &str) {
        if let Some(tenure) = self.leases().get_mut(lease) {
            *tenure = None;
        }
    }

    /// Whether this node may act on `lease` at `now`.
    pub fn holds(&self, lease: &str, now: Instant) -> bool {
        self.leases()
            .get(lease)
            .and_then(Option::as_ref)
            .is_some_and(|tenure| valid(&tenure.borrow(), now))
    }

    /// Every lease held since start, by name, and whether it is held at
    /// `now`.
    pub fn at(&self, now: Instant) -> Vec<(String, bool)> {
        self.leases()
            .iter()
            .map(|(lease, tenure)| {
                let held = tenure.as_ref().is_some_and(|t| valid(&t.borrow(), now));
                (lease.clone(), held)
            })
            .collect()
    }
}

fn valid(holding: &Holding, now: Instant) -> bool {
    matches!(holding, Holding::Held { valid_until, .. } if now < *valid_until)
}

/// Keeps a lease: renews it on time in a task of its own and publishes
/// the outcome. A renewal that gets no answer is retried; the lease stays
/// usable only until its last confirmed renewal's `valid_until`, which
/// [`LeaseKeeper::is_valid_at`] checks.
pub struct LeaseKeeper {
    holding: tokio::sync::watch::Receiver<Holding>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Option<Lease>>,
}

impl LeaseKeeper {
    pub fn keep(mut lease: Lease) -> LeaseKeeper {
        let (tx, holding) = tokio::sync::watch::channel(Holding::Held {
            revision: lease.revision(),
            valid_until: lease.valid_until(),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut next = lease.renew_at();
            loop {
                tokio::select! {
                    _ = &mut stopped => return Some(lease),
                    () = tokio::time::sleep_until(next) => {}
                }
                match lease.renew().await {
                    Ok(()) => {
                        next = lease.renew_at();
                        tx.send_replace(Holding::Held {
                            revision: lease.revision(),
                            valid_until: lease.valid_until(),
                        });
                    }
                    Err(LeaseError::Lost { now_held_by, .. }) => {
                        tracing::warn!(
                            "lease {} lost{}",
                            lease.key(),
                            now_held_by
                                .as_deref()
                                .map(|n| format!(" to node {n}"))
                                .unwrap_or_default()
                        );
                        tx.send_replace(Holding::Lost { now_held_by });
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!("{e}; retrying");
                        next = Instant::now() + RENEW_RETRY_PAUSE;
                    }
                }
            }
        });
        LeaseKeeper {
            holding,
            stop: Some(stop),
            task,
        }
    }

    /// Whether the holder may act at `now`: held, and within the last
    /// confirmed renewal's validity.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        valid(&self.holding.borrow(), now)
    }

    /// The latest outcome; `changed()` on it wakes at the next renewal
    /// and at the loss (a clone would also wake for every renewal since
    /// the keeper began).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Holding> {
        let mut holding = self.holding.clone();
        holding.mark_unchanged();
        holding
    }

    /// Stops renewing and deletes the key if it is still this tenure's.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(Some(lease)) => lease.release().await,
            // Lost already, or the task ended abnormally: nothing to delete.
            Ok(None) | Err(_) => Ok(()),
        }
    }
}

impl Drop for LeaseKeeper {
    /// Without `release`, the key is left to age out, as a crash would.
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn the_default_timing_fits_the_bucket() {
        let timing = LeaseTiming::default();
        let max_age = crate::Settings::default().lease_max_age;
        assert!(timing.renew_every < timing.valid_for);
        // Two renewals may fail before the holder stops, and the key
        // outlives the holder's validity by 3 s of margin.
        assert!(timing.renew_every * 2 < timing.valid_for);
        assert!(timing.valid_for + Duration::from_secs(3) <= max_age);
    }

    #[test]
    fn a_lease_value_is_the_documented_json() {
        let v = LeaseValue {
            node: "a".into(),
            since: 7,
        };
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"node":"a","since":7}"#
        );
    }
}
