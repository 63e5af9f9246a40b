//! The subscription table, KV `courier_services` (docs/SCALE-OUT.md §4):
//! key = service name, value = its settings and patterns. A SUBSCRIBE,
//! UNSUBSCRIBE, pause or resume is a compare-and-set on the key's
//! revision, then the matching change of the service's consumers; every
//! node [`watch`]es the bucket and keeps the table in memory.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{
    kv::{self, Operation},
    stream::{ConsumerErrorKind, LastRawMessageErrorKind},
    ErrorCode,
};
use courier_proto::StartFrom;
use courier_store::Upstream;
use futures_util::{Stream as FuturesStream, StreamExt as _};
use serde::{Deserialize, Serialize};

use crate::consumers::Lane;
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
    /// With a history replay: the log's last seq once the pattern joined
    /// the unkeyed consumer. Its messages up to here are the replay's, not
    /// the consumer's (§4 "History replay").
    #[serde(default)]
    pub from_seq: u64,
    #[serde(default)]
    pub paused: bool,
    /// With a history replay: the log's last seq once the pattern joined
    /// the keyed consumer, which the keyed lane's holder does before it
    /// replays (0 until then).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keyed_from_seq: u64,
    /// An unfinished history replay — or, once a held pattern resumes,
    /// the hand-out of what waited in its hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
    /// The pattern is paused while others of the service are not: its
    /// messages wait in a consumer of their own (§4 "Pausing").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
}

/// A pattern paused alone: its messages stored after what the service's
/// consumers had delivered when it paused wait in
/// `svc-<service>-held-<hash>`, until it resumes and they are handed out
/// as a replay is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The unkeyed consumer's last delivered seq as the pause began: its
    /// messages up to there were the consumer's.
    #[serde(default)]
    pub unkeyed_after: u64,
    /// The keyed consumer's, once the keyed lane's holder took the
    /// pattern out of it (`keyed_left`).
    #[serde(default)]
    pub keyed_after: u64,
    #[serde(default)]
    pub keyed_left: bool,
}

/// An unfinished history replay of one pattern (§4 "History replay").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// The pattern is in the keyed consumer's filters (its
    /// `keyed_from_seq` follows once read).
    #[serde(default)]
    pub keyed_joined: bool,
    /// The pattern's `keyed_from_seq` was read for this hand-out (an
    /// earlier one's stays in the pattern's state until then).
    #[serde(default)]
    pub keyed_read: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PatternState {
    /// Whether the keyed lane's holder still has to join this pattern's
    /// hand-out to the keyed consumer (a replay's, or a resumed hold's
    /// that left the keyed consumer).
    pub fn keyed_join_waiting(&self) -> bool {
        let kept_keyed = self
            .hold
            .as_ref()
            .is_some_and(|h| h.keyed_after == u64::MAX);
        self.replay
            .as_ref()
            .is_some_and(|r| !r.keyed_joined || (!r.keyed_read && !kept_keyed))
    }

    /// Whether the message at `seq` of this pattern belongs to its
    /// history replay rather than to the service's consumer of `lane`.
    pub fn replays(&self, lane: Lane, seq: u64) -> bool {
        match lane {
            Lane::Unkeyed => seq <= self.from_seq,
            Lane::Keyed => seq <= self.keyed_from_seq,
        }
    }
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

    /// The patterns `lane`'s consumer filters on: all of them (the active
    /// ones, unless every one is paused), the keyed lane without those
    /// whose replay the lane's holder has not joined yet.
    pub fn lane_patterns(&self, lane: Lane) -> Vec<&str> {
        let active = self.active_patterns();
        let patterns: Vec<&str> = if active.is_empty() {
            self.patterns.keys().map(String::as_str).collect()
        } else {
            active
        };
        let mut patterns: Vec<&str> = patterns
            .into_iter()
            .filter(|p| {
                lane == Lane::Unkeyed
                    || self.patterns[*p]
                        .replay
                        .as_ref()
                        .is_none_or(|r| r.keyed_joined)
            })
            .collect();
        if lane == Lane::Keyed {
            // A pattern paused alone stays until the keyed lane's holder
            // takes it out.
            for (pattern, state) in &self.patterns {
                let leaving = state.paused && state.hold.as_ref().is_some_and(|h| !h.keyed_left);
                if leaving && !patterns.contains(&pattern.as_str()) {
                    patterns.push(pattern);
                }
            }
            patterns.sort_unstable();
        }
        patterns
    }

    /// Whether the keyed lane's holder has a change to make before it
    /// fetches the lane again: a replay to join, a held pattern to take
    /// out of the lane.
    pub fn keyed_lane_change_waiting(&self) -> bool {
        self.patterns.values().any(|s| {
            s.replay.as_ref().is_some_and(|r| !r.keyed_joined)
                || (s.paused && s.hold.as_ref().is_some_and(|h| !h.keyed_left))
        })
    }

    /// The consumers whose messages the keyed lane's holder hands out
    /// before the lane's: each unfinished replay's or hold's.
    pub fn hand_out_consumers(&self, service: &str) -> Vec<String> {
        self.patterns
            .iter()
            .filter(|(_, s)| s.replay.is_some() || s.hold.is_some())
            .map(|(p, s)| crate::replay::consumer_of(service, p, s))
            .collect()
    }

    /// Whether the message named `name` at `seq` of the service's
    /// consumer of `lane` belongs to a history replay instead: every
    /// pattern of the service that matches it replays it. A name no
    /// pattern matches (a table not yet up to date) is the consumer's.
    pub fn replays(&self, lane: Lane, name: &str, seq: u64) -> bool {
        let mut matching = self
            .patterns
            .iter()
            .filter(|(p, _)| courier_proto::pattern_matches(p, name))
            .peekable();
        matching.peek().is_some() && matching.all(|(_, state)| state.replays(lane, seq))
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
                history,
                ..
            } => {
                self.ack_deadline_ms = *ack_deadline_ms;
                self.max_deliveries = *max_deliveries;
                self.patterns
                    .entry(pattern.clone())
                    .or_insert_with(|| PatternState {
                        replay: (*history != StartFrom::New).then(Replay::default),
                        ..PatternState::default()
                    });
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
    #[error("service {service}, pattern {pattern}: its earlier messages are still being handed out (a history replay or a resume); pause it again in a moment")]
    Busy { service: String, pattern: String },
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

mod hold;
mod writer;

pub use writer::ServiceWriter;

pub(crate) fn is_consumer_not_found(kind: ConsumerErrorKind) -> bool {
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
            history: StartFrom::New,
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
    fn a_replayed_pattern_joins_the_keyed_lane_only_once_its_holder_says_so() {
        let mut entry = ServiceSubscriptions::default();
        entry.apply(&subscribe("todo.*"));
        let with_history = Upstream::Subscribe {
            service: "todo".into(),
            pattern: "audit.>".into(),
            ack_deadline_ms: 30_000,
            max_deliveries: 5,
            history: StartFrom::Beginning,
        };
        assert!(entry.apply(&with_history));
        assert_eq!(entry.patterns["audit.>"].replay, Some(Replay::default()));
        assert_eq!(entry.lane_patterns(Lane::Unkeyed), ["audit.>", "todo.*"]);
        assert_eq!(entry.lane_patterns(Lane::Keyed), ["todo.*"]);
        // Subscribing again with a start replays nothing more.
        assert!(!entry.apply(&with_history));
        if let Some(replay) = entry
            .patterns
            .get_mut("audit.>")
            .and_then(|s| s.replay.as_mut())
        {
            replay.keyed_joined = true;
        }
        assert_eq!(entry.lane_patterns(Lane::Keyed), ["audit.>", "todo.*"]);
        // Alone, an unjoined replay leaves the keyed lane no pattern.
        let mut alone = ServiceSubscriptions::default();
        alone.apply(&with_history);
        assert!(alone.lane_patterns(Lane::Keyed).is_empty());
        // The value without a replay reads as before.
        let json = serde_json::to_value(&entry.patterns["todo.*"]).unwrap();
        assert_eq!(json, serde_json::json!({"from_seq": 0, "paused": false}));
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
            whole: false,
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
            whole: false,
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
