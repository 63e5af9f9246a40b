//! The subscription table, KV `courier_services` (docs/SCALE-OUT.md §4):
//! key = service name, value = its settings and patterns. A SUBSCRIBE,
//! UNSUBSCRIBE, pause or resume is a compare-and-set on the key's
//! revision, then the matching change of the service's consumers; every
//! node [`watch`]es the bucket and keeps the table in memory.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{
    consumer::pull,
    kv::{self, CreateErrorKind, Operation, UpdateErrorKind},
    stream::{ConsumerErrorKind, LastRawMessageErrorKind, Stream},
    ErrorCode,
};
use courier_store::Upstream;
use futures_util::{Stream as FuturesStream, StreamExt as _};
use serde::{Deserialize, Serialize};

use crate::consumers::{consumer_config, consumer_name, ensure_consumer, Lane};
use crate::lease::is_wrong_revision;
use crate::names::SERVICES_BUCKET;
use crate::Connection;

/// One service's entry in `courier_services`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSubscriptions {
    /// The consumers' `ack_wait`.
    pub ack_deadline_ms: u32,
    /// A delivery failing at this attempt becomes a dead letter (§7).
    pub max_deliveries: u32,
    #[serde(default)]
    pub patterns: BTreeMap<String, PatternState>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternState {
    /// The log's last seq when the pattern joined (history replay, §4).
    #[serde(default)]
    pub from_seq: u64,
    #[serde(default)]
    pub paused: bool,
}

impl ServiceSubscriptions {
    /// Patterns that deliver now (not paused), sorted.
    pub fn active_patterns(&self) -> Vec<&str> {
        self.patterns
            .iter()
            .filter(|(_, state)| !state.paused)
            .map(|(p, _)| p.as_str())
            .collect()
    }

    /// Applies a subscription change of this service; whether anything
    /// changed. Subscribing again keeps the pattern's state (idempotent)
    /// but takes the new settings; changes to a pattern the service does
    /// not have, and outcomes of deliveries, change nothing.
    pub fn apply(&mut self, change: &Upstream) -> bool {
        let before = self.clone();
        match change {
            Upstream::Subscribe {
                pattern,
                ack_deadline_ms,
                max_deliveries,
                ..
            } => {
                self.ack_deadline_ms = *ack_deadline_ms;
                self.max_deliveries = *max_deliveries;
                self.patterns.entry(pattern.clone()).or_default();
            }
            Upstream::Unsubscribe { pattern, .. } => {
                self.patterns.remove(pattern);
            }
            Upstream::Pause { pattern, .. } | Upstream::Resume { pattern, .. } => {
                let paused = matches!(change, Upstream::Pause { .. });
                if let Some(state) = self.patterns.get_mut(pattern) {
                    state.paused = paused;
                }
            }
            Upstream::Ack { .. }
            | Upstream::Nak { .. }
            | Upstream::DeadLetter { .. }
            | Upstream::Registry { .. }
            | Upstream::RegistryHeartbeat { .. } => {}
        }
        *self != before
    }
}

/// The service a subscription change is about; `None` for outcomes of
/// deliveries and registry changes.
pub fn service_of(change: &Upstream) -> Option<&str> {
    match change {
        Upstream::Subscribe { service, .. }
        | Upstream::Unsubscribe { service, .. }
        | Upstream::Pause { service, .. }
        | Upstream::Resume { service, .. } => Some(service),
        Upstream::Ack { .. }
        | Upstream::Nak { .. }
        | Upstream::DeadLetter { .. }
        | Upstream::Registry { .. }
        | Upstream::RegistryHeartbeat { .. } => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("subscription table (KV courier_services), service {service}: {reason}")]
    Store { service: String, reason: String },
    #[error("service {service} in KV courier_services holds a value that is not a subscription entry ({reason}); delete the key and subscribe again")]
    Corrupt { service: String, reason: String },
    #[error("consumer {consumer}: {reason}")]
    Consumer { consumer: String, reason: String },
    #[error(
        "subscription table (KV courier_services), service {service}: the key kept changing under {attempts} attempts to update it"
    )]
    Contended { service: String, attempts: u32 },
}

fn store_error(service: &str, e: impl std::fmt::Display) -> ServicesError {
    ServicesError::Store {
        service: service.to_string(),
        reason: e.to_string(),
    }
}

fn decode(service: &str, bytes: &[u8]) -> Result<ServiceSubscriptions, ServicesError> {
    serde_json::from_slice(bytes).map_err(|e| ServicesError::Corrupt {
        service: service.to_string(),
        reason: e.to_string(),
    })
}

/// One change seen by [`watch`]: the service and its entry (`None`: the
/// key was deleted, the service has no subscriptions).
pub type ServiceUpdate = (String, Option<ServiceSubscriptions>);

/// Every key of `courier_services`: first the current values, then each
/// change as it is made. A value that does not decode is an `Err` item;
/// the watch goes on.
pub async fn watch(
    connection: &Connection,
) -> Result<impl FuturesStream<Item = Result<ServiceUpdate, ServicesError>>, ServicesError> {
    let store = connection
        .jetstream
        .get_key_value(SERVICES_BUCKET)
        .await
        .map_err(|e| store_error(">", e))?;
    let watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| store_error(">", e))?;
    Ok(watch.map(|entry| {
        let entry = entry.map_err(|e| store_error(">", e))?;
        match entry.operation {
            Operation::Put => {
                let value = decode(&entry.key, &entry.value)?;
                Ok((entry.key, Some(value)))
            }
            Operation::Delete | Operation::Purge => Ok((entry.key, None)),
        }
    }))
}

/// A service's entry as the bucket's stream leader holds it, with its
/// revision. Read from the leader, not by a direct get: a replica that
/// has not applied the last write answers with an older revision, and a
/// compare-and-set on it would only fail and retry.
pub async fn read(
    store: &kv::Store,
    service: &str,
) -> Result<Option<(ServiceSubscriptions, u64)>, ServicesError> {
    let subject = format!("{}{service}", store.prefix);
    let message = match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(store_error(service, e)),
    };
    let operation = message.headers.get("KV-Operation").map(|v| v.as_str());
    if matches!(operation, Some("DEL") | Some("PURGE"))
        || message.headers.get("Nats-Marker-Reason").is_some()
    {
        return Ok(None);
    }
    Ok(Some((decode(service, &message.payload)?, message.sequence)))
}

/// Compare-and-set attempts of one change before it fails: each conflict
/// is another node's write to the same service in between.
pub const CAS_ATTEMPTS_MAX: u32 = 16;
const CAS_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// How far ahead a consumer is paused when every pattern of its service
/// is: "until resumed" (JetStream needs a time).
const PAUSED_FOR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What a subscription change writes to: the bucket and the log's
/// consumers.
#[derive(Clone, Debug)]
pub(crate) struct ServiceWriter {
    pub services: kv::Store,
    pub messages: Stream,
    pub replicas: usize,
    pub max_ack_pending: i64,
}

impl ServiceWriter {
    /// Carries out one subscription change: the compare-and-set on the
    /// service's key, then its consumers as the new entry says. The
    /// consumers are brought in line even when the entry did not change,
    /// so a change whose consumer step failed is completed by its retry.
    pub async fn change(&self, change: &Upstream) -> Result<(), ServicesError> {
        let Some(service) = service_of(change) else {
            return Ok(());
        };
        if matches!(change, Upstream::Subscribe { .. }) {
            // The consumers first: a node that learns of the subscription
            // from the bucket routes to the service at once, and a message
            // stored before the consumer that takes it exists never
            // reaches the service.
            let mut value = read(&self.services, service)
                .await?
                .map(|(value, _)| value)
                .unwrap_or_default();
            value.apply(change);
            self.align_consumers(service, Some(&value)).await?;
        }
        let entry = self.write_entry(service, change).await?;
        self.align_consumers(service, entry.as_ref()).await
    }

    /// The entry after the change, as written.
    async fn write_entry(
        &self,
        service: &str,
        change: &Upstream,
    ) -> Result<Option<ServiceSubscriptions>, ServicesError> {
        for attempt in 1..=CAS_ATTEMPTS_MAX {
            let current = read(&self.services, service).await?;
            let mut value = current.as_ref().map(|(v, _)| v.clone()).unwrap_or_default();
            let changed = value.apply(change);
            let written = match (&current, changed) {
                (_, false) => return Ok(current.map(|(v, _)| v)),
                // The last pattern gone: the key goes (watchers see `None`).
                (Some((_, revision)), true) if value.patterns.is_empty() => self
                    .services
                    .delete_expect_revision(service, Some(*revision))
                    .await
                    .map_err(|e| (is_wrong_revision(&e), e.to_string())),
                (Some((_, revision)), true) => {
                    let body = serde_json::to_vec(&value).map_err(|e| store_error(service, e))?;
                    self.services
                        .update(service, body.into(), *revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            let conflict = e.kind() == UpdateErrorKind::WrongLastRevision
                                || is_wrong_revision(&e);
                            (conflict, e.to_string())
                        })
                }
                (None, true) => {
                    let body = serde_json::to_vec(&value).map_err(|e| store_error(service, e))?;
                    self.services
                        .create(service, body.into())
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            let conflict =
                                e.kind() == CreateErrorKind::AlreadyExists || is_wrong_revision(&e);
                            (conflict, e.to_string())
                        })
                }
            };
            match written {
                Ok(()) => return Ok(Some(value).filter(|v| !v.patterns.is_empty())),
                Err((true, reason)) => {
                    tracing::debug!(
                        "service {service}: {reason}; reading it again (attempt {attempt})"
                    );
                    tokio::time::sleep(CAS_RETRY_PAUSE * attempt).await;
                }
                Err((false, reason)) => return Err(store_error(service, reason)),
            }
        }
        Err(ServicesError::Contended {
            service: service.to_string(),
            attempts: CAS_ATTEMPTS_MAX,
        })
    }

    /// Both consumers of the service as its entry says: filters on the
    /// patterns not paused; with every pattern paused, filters on all of
    /// them and the consumers paused, so that their messages wait in the
    /// log; with no pattern, no consumers (their backlog is discarded,
    /// as a single node discards an unsubscribed queue).
    async fn align_consumers(
        &self,
        service: &str,
        entry: Option<&ServiceSubscriptions>,
    ) -> Result<(), ServicesError> {
        for lane in [Lane::Unkeyed, Lane::Keyed] {
            let name = consumer_name(service, lane);
            let consumer_error = |e: &dyn std::fmt::Display| ServicesError::Consumer {
                consumer: name.clone(),
                reason: e.to_string(),
            };
            let Some(entry) = entry.filter(|e| !e.patterns.is_empty()) else {
                match self.messages.delete_consumer(&name).await {
                    Ok(_) => {}
                    Err(e) if is_consumer_not_found(e.kind()) => {}
                    Err(e) => return Err(consumer_error(&e)),
                }
                continue;
            };
            let active = entry.active_patterns();
            let pause = active.is_empty();
            let patterns: Vec<&str> = if pause {
                entry.patterns.keys().map(String::as_str).collect()
            } else {
                active
            };
            let config: pull::Config = consumer_config(
                service,
                &patterns,
                lane,
                Duration::from_millis(u64::from(entry.ack_deadline_ms.max(1))),
                self.max_ack_pending,
                self.replicas,
            );
            ensure_consumer(&self.messages, config)
                .await
                .map_err(|e| consumer_error(&e))?;
            // Paused or resumed every time, not only when the consumer's
            // info says otherwise: that info may not show a pause yet
            // (seen on 2.15.1: a consumer read unpaused right after its
            // pause was answered), and a resume skipped on it would leave
            // the service paused for good.
            if pause {
                let until = pause_until().map_err(|e| consumer_error(&e))?;
                self.messages
                    .pause_consumer(&name, until)
                    .await
                    .map_err(|e| consumer_error(&e))?;
            } else {
                self.messages
                    .resume_consumer(&name)
                    .await
                    .map_err(|e| consumer_error(&e))?;
            }
        }
        Ok(())
    }
}

fn is_consumer_not_found(kind: ConsumerErrorKind) -> bool {
    matches!(kind, ConsumerErrorKind::JetStream(e) if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}

fn pause_until() -> Result<async_nats::datetime::DateTime, async_nats::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    async_nats::datetime::from_nanos(
        i128::try_from((now + PAUSED_FOR).as_nanos()).unwrap_or(i128::MAX),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    fn subscribe(pattern: &str) -> Upstream {
        Upstream::Subscribe {
            service: "todo".into(),
            pattern: pattern.into(),
            ack_deadline_ms: 30_000,
            max_deliveries: 5,
        }
    }

    #[test]
    fn the_value_is_the_design_json() {
        let mut entry = ServiceSubscriptions::default();
        assert!(entry.apply(&subscribe("todo.*")));
        let json: serde_json::Value = serde_json::to_value(&entry).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"ack_deadline_ms": 30000, "max_deliveries": 5,
                "patterns": {"todo.*": {"from_seq": 0, "paused": false}}})
        );
        let read: ServiceSubscriptions = serde_json::from_str(
            r#"{"ack_deadline_ms": 1000, "max_deliveries": 2,
                "patterns": {"audit.>": {"from_seq": 41230, "paused": true}}}"#,
        )
        .unwrap();
        assert_eq!(read.patterns["audit.>"].from_seq, 41230);
        assert!(read.active_patterns().is_empty());
    }

    #[test]
    fn changes_apply_idempotently() {
        let mut entry = ServiceSubscriptions::default();
        assert!(entry.apply(&subscribe("todo.*")));
        assert!(!entry.apply(&subscribe("todo.*")));
        assert!(entry.apply(&subscribe("audit.>")));
        let pause = Upstream::Pause {
            service: "todo".into(),
            pattern: "audit.>".into(),
        };
        assert!(entry.apply(&pause));
        assert!(!entry.apply(&pause));
        assert_eq!(entry.active_patterns(), ["todo.*"]);
        // Subscribing again keeps the pause.
        assert!(!entry.apply(&subscribe("audit.>")));
        assert_eq!(entry.active_patterns(), ["todo.*"]);
        let unknown = Upstream::Resume {
            service: "todo".into(),
            pattern: "nope".into(),
        };
        assert!(!entry.apply(&unknown));
        assert!(entry.apply(&Upstream::Unsubscribe {
            service: "todo".into(),
            pattern: "todo.*".into(),
        }));
        assert!(entry.active_patterns().is_empty());
        assert!(!entry.apply(&Upstream::Ack { seq: 1 }));
    }
}
