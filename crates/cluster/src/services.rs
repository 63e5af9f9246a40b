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
use courier_proto::StartFrom;
use courier_store::Upstream;
use futures_util::{Stream as FuturesStream, StreamExt as _};
use serde::{Deserialize, Serialize};

use crate::consumers::{
    consumer_config, consumer_name, ensure_consumer, held_config, held_consumer_name,
    replay_config, replay_consumer_name, Lane,
};
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
            .map(|(p, s)| match s.hold {
                Some(_) => held_consumer_name(service, p),
                None => replay_consumer_name(service, p),
            })
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

/// What a subscription change writes to: the bucket and the log's
/// consumers.
#[derive(Clone, Debug)]
pub struct ServiceWriter {
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
        let mut from_seq = 0;
        if let Upstream::Subscribe {
            pattern, history, ..
        } = change
        {
            // The consumers first: a node that learns of the subscription
            // from the bucket routes to the service at once, and a message
            // stored before the consumer that takes it exists never
            // reaches the service.
            let mut value = read(&self.services, service)
                .await?
                .map(|(value, _)| value)
                .unwrap_or_default();
            let is_new = !value.patterns.contains_key(pattern);
            value.apply(change);
            if is_new && *history != StartFrom::New {
                let ack_wait = Duration::from_millis(u64::from(value.ack_deadline_ms.max(1)));
                let config = replay_config(
                    service,
                    pattern,
                    *history,
                    ack_wait,
                    self.max_ack_pending,
                    self.replicas,
                )
                .map_err(|reason| ServicesError::Consumer {
                    consumer: replay_consumer_name(service, pattern),
                    reason,
                })?;
                // Made again by a retry of this change, or by another node
                // subscribing the pattern at the same moment: the same
                // consumer, unless the other asked for another start.
                ensure_consumer(&self.messages, config).await.map_err(|e| {
                    ServicesError::Consumer {
                        consumer: replay_consumer_name(service, pattern),
                        reason: e.to_string(),
                    }
                })?;
            }
            self.align_consumers(service, Some(&value)).await?;
            if is_new && *history != StartFrom::New {
                from_seq = self.last_seq(service).await?;
            }
        }
        let plan = match change {
            Upstream::Pause { .. } | Upstream::Resume { .. } => {
                self.plan_pause(service, change).await?
            }
            _ => PausePlan::default(),
        };
        let entry = self
            .write_entry(service, |value| {
                let mut changed = value.apply(change);
                changed |= plan.apply(value, change);
                if let Upstream::Subscribe { pattern, .. } = change {
                    if let Some(state) = value.patterns.get_mut(pattern) {
                        if state.replay.is_some() && from_seq > state.from_seq {
                            state.from_seq = from_seq;
                            changed = true;
                        }
                    }
                }
                changed
            })
            .await?;
        if let Upstream::Unsubscribe { pattern, .. } = change {
            let still = entry
                .as_ref()
                .is_some_and(|e| e.patterns.contains_key(pattern));
            if !still {
                self.delete_consumer(&replay_consumer_name(service, pattern))
                    .await?;
                self.delete_consumer(&held_consumer_name(service, pattern))
                    .await?;
            }
        }
        self.align_consumers(service, entry.as_ref()).await
    }

    /// What a pause or resume does besides the patterns' `paused` flags
    /// (§4 "Pausing"): the holds it begins — a pattern paused alone, or
    /// left paused by a resume of others — and the holds it ends. The
    /// consumers are made and the resumed patterns' filters set here,
    /// before the entry names them.
    async fn plan_pause(
        &self,
        service: &str,
        change: &Upstream,
    ) -> Result<PausePlan, ServicesError> {
        let mut plan = PausePlan::default();
        let Some((current, _)) = read(&self.services, service).await? else {
            return Ok(plan);
        };
        let mut after = current.clone();
        after.apply(change);
        PausePlan::whole(&mut after, change);
        // A pattern whose earlier messages are still being handed out (a
        // replay, a resumed hold) pauses once that is done.
        let busy = after.patterns.iter().find(|(p, s)| {
            s.paused && s.replay.is_some() && current.patterns.get(*p).is_some_and(|c| !c.paused)
        });
        if let Some((pattern, _)) = busy {
            return Err(ServicesError::Busy {
                service: service.to_string(),
                pattern: pattern.clone(),
            });
        }
        if after.active_patterns().is_empty() {
            // Every pattern paused: the consumers pause themselves.
            return Ok(plan);
        }
        let ack_wait = Duration::from_millis(u64::from(current.ack_deadline_ms.max(1)));
        let begins: Vec<(&String, bool)> = after
            .patterns
            .iter()
            .filter(|(p, s)| s.paused && s.hold.is_none() && current.patterns.contains_key(*p))
            .map(|(p, _)| (p, current.patterns[p].paused))
            .collect();
        if !begins.is_empty() {
            // Read before a pattern leaves the filters: what the consumers
            // deliver in between is handed out again at the resume, never
            // lost.
            let unkeyed = match self.delivered(service, Lane::Unkeyed).await? {
                Some(seq) => seq,
                None => self.last_seq(service).await?,
            };
            let keyed = self.delivered(service, Lane::Keyed).await?;
            for (pattern, was_paused) in begins {
                let start = unkeyed.min(keyed.unwrap_or(unkeyed)) + 1;
                self.make_held_consumer(service, pattern, start, ack_wait)
                    .await?;
                // A pattern that was paused with the whole service stays
                // paused as others resume: the consumers were paused, so
                // what they delivered is exact, and its keyed messages
                // have waited from then on.
                let hold = match (was_paused, keyed) {
                    (true, Some(keyed_after)) => Hold {
                        unkeyed_after: unkeyed,
                        keyed_after,
                        keyed_left: true,
                    },
                    _ => Hold {
                        unkeyed_after: unkeyed,
                        ..Hold::default()
                    },
                };
                plan.holds.insert(pattern.clone(), hold);
            }
        }
        let ends: Vec<&String> = after
            .patterns
            .iter()
            .filter(|(p, s)| {
                !s.paused && s.hold.is_some() && current.patterns.get(*p).is_some_and(|c| c.paused)
            })
            .map(|(p, _)| p)
            .collect();
        if !ends.is_empty() {
            for pattern in &ends {
                let name = held_consumer_name(service, pattern);
                self.messages.resume_consumer(&name).await.map_err(|e| {
                    ServicesError::Consumer {
                        consumer: name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                plan.ends.push((*pattern).clone());
            }
            let mut provisional = after.clone();
            plan.apply(&mut provisional, change);
            self.align_consumers(service, Some(&provisional)).await?;
            plan.resumed = self.last_seq(service).await?;
        }
        Ok(plan)
    }

    /// Creates `pattern`'s held consumer from `start`, paused. Nothing
    /// reads it before the entry names the hold: one left by an earlier
    /// try of this change goes, and starts again here.
    async fn make_held_consumer(
        &self,
        service: &str,
        pattern: &str,
        start: u64,
        ack_wait: Duration,
    ) -> Result<(), ServicesError> {
        let name = held_consumer_name(service, pattern);
        let consumer_error = |e: &dyn std::fmt::Display| ServicesError::Consumer {
            consumer: name.clone(),
            reason: e.to_string(),
        };
        self.delete_consumer(&name).await?;
        let config = held_config(
            service,
            pattern,
            start,
            ack_wait,
            self.max_ack_pending,
            self.replicas,
        );
        ensure_consumer(&self.messages, config)
            .await
            .map_err(|e| consumer_error(&e))?;
        let until = pause_until().map_err(|e| consumer_error(&e))?;
        self.messages
            .pause_consumer(&name, until)
            .await
            .map_err(|e| consumer_error(&e))?;
        Ok(())
    }

    /// A service consumer's last delivered stream seq; `None` when the
    /// consumer does not exist.
    async fn delivered(&self, service: &str, lane: Lane) -> Result<Option<u64>, ServicesError> {
        let name = consumer_name(service, lane);
        match self.messages.consumer_info(&name).await {
            Ok(info) => Ok(Some(info.delivered.stream_sequence)),
            Err(e) if crate::consumers::is_not_found(&e) => Ok(None),
            Err(e) => Err(ServicesError::Consumer {
                consumer: name,
                reason: e.to_string(),
            }),
        }
    }

    /// The keyed lane's holder takes a pattern paused alone out of the
    /// keyed consumer; `keyed_after` is that consumer's last delivered
    /// seq, read while the holder fetched nothing from it.
    pub async fn leave_keyed_lane(
        &self,
        service: &str,
        pattern: &str,
        keyed_after: u64,
    ) -> Result<(), ServicesError> {
        let entry = self
            .write_entry(service, |value| {
                match value
                    .patterns
                    .get_mut(pattern)
                    .and_then(|s| s.hold.as_mut())
                {
                    Some(hold) if !hold.keyed_left => {
                        hold.keyed_left = true;
                        hold.keyed_after = keyed_after;
                        true
                    }
                    _ => false,
                }
            })
            .await?;
        self.align_consumers(service, entry.as_ref()).await
    }

    /// The keyed consumer's last delivered seq (the holder reads it).
    pub async fn keyed_delivered(&self, service: &str) -> Result<Option<u64>, ServicesError> {
        self.delivered(service, Lane::Keyed).await
    }

    /// The log's last seq, read once a consumer change was answered: a
    /// message stored after it is in that consumer's view.
    async fn last_seq(&self, service: &str) -> Result<u64, ServicesError> {
        let mut messages = self.messages.clone();
        let info = messages.info().await.map_err(|e| store_error(service, e))?;
        Ok(info.state.last_sequence)
    }

    /// The keyed lane's holder joins `pattern`'s replay: the pattern goes
    /// into the keyed consumer's filters, and the log's last seq after
    /// that is recorded as its `keyed_from_seq` — the replay hands out its
    /// keyed messages up to there, the keyed consumer those after. Returns
    /// the pattern's state as written (`None`: it is no longer subscribed,
    /// or replays nothing).
    pub async fn join_keyed_lane(
        &self,
        service: &str,
        pattern: &str,
    ) -> Result<Option<PatternState>, ServicesError> {
        let joining = |value: &mut ServiceSubscriptions| match value
            .patterns
            .get_mut(pattern)
            .and_then(|s| s.replay.as_mut())
        {
            Some(replay) if !replay.keyed_joined => {
                replay.keyed_joined = true;
                true
            }
            _ => false,
        };
        let entry = self.write_entry(service, joining).await?;
        let Some(state) = entry.as_ref().and_then(|e| e.patterns.get(pattern)) else {
            return Ok(None);
        };
        if !state.keyed_join_waiting() {
            return Ok(Some(state.clone()));
        }
        self.align_consumers(service, entry.as_ref()).await?;
        let keyed_from_seq = self.last_seq(service).await?;
        let entry = self
            .write_entry(service, |value| {
                let Some(state) = value.patterns.get_mut(pattern) else {
                    return false;
                };
                match state.replay.as_mut() {
                    Some(replay) if !replay.keyed_read => {
                        replay.keyed_read = true;
                        state.keyed_from_seq = state.keyed_from_seq.max(keyed_from_seq);
                        true
                    }
                    _ => false,
                }
            })
            .await?;
        Ok(entry.and_then(|e| e.patterns.get(pattern).cloned()))
    }

    /// A replay handed out and settled all it had: its consumer goes, and
    /// the pattern's entry says so.
    pub async fn end_replay(&self, service: &str, pattern: &str) -> Result<(), ServicesError> {
        self.delete_consumer(&replay_consumer_name(service, pattern))
            .await?;
        self.delete_consumer(&held_consumer_name(service, pattern))
            .await?;
        self.write_entry(service, |value| {
            value.patterns.get_mut(pattern).is_some_and(|s| {
                let ended = s.replay.take().is_some();
                ended | s.hold.take().is_some()
            })
        })
        .await?;
        Ok(())
    }

    async fn delete_consumer(&self, name: &str) -> Result<(), ServicesError> {
        match self.messages.delete_consumer(name).await {
            Ok(_) => Ok(()),
            Err(e) if is_consumer_not_found(e.kind()) => Ok(()),
            Err(e) => Err(ServicesError::Consumer {
                consumer: name.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// The entry after `change` (which says whether it changed anything),
    /// as written.
    async fn write_entry(
        &self,
        service: &str,
        change: impl Fn(&mut ServiceSubscriptions) -> bool,
    ) -> Result<Option<ServiceSubscriptions>, ServicesError> {
        for attempt in 1..=CAS_ATTEMPTS_MAX {
            let current = read(&self.services, service).await?;
            let mut value = current.as_ref().map(|(v, _)| v.clone()).unwrap_or_default();
            let changed = change(&mut value);
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
            let pause = entry.active_patterns().is_empty();
            let patterns = entry.lane_patterns(lane);
            if patterns.is_empty() {
                // Only replays the keyed lane has not joined: no filter
                // yet (a consumer without one would take everything).
                self.delete_consumer(&name).await?;
                continue;
            }
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

/// See [`ServiceWriter::plan_pause`].
#[derive(Debug, Default)]
struct PausePlan {
    /// Holds that begin, by pattern.
    holds: BTreeMap<String, Hold>,
    /// Held patterns that resume: what waited is handed out as a replay.
    ends: Vec<String>,
    /// With `ends`: the log's last seq once they rejoined the unkeyed
    /// consumer.
    resumed: u64,
}

impl PausePlan {
    /// A whole service's pause or resume changes every pattern at once.
    fn whole(value: &mut ServiceSubscriptions, change: &Upstream) {
        let (Upstream::Pause { whole: true, .. } | Upstream::Resume { whole: true, .. }) = change
        else {
            return;
        };
        let paused = matches!(change, Upstream::Pause { .. });
        for state in value.patterns.values_mut() {
            state.paused = paused;
        }
    }

    /// The plan on the entry: whether it changed anything.
    fn apply(&self, value: &mut ServiceSubscriptions, change: &Upstream) -> bool {
        let before = value.clone();
        PausePlan::whole(value, change);
        for (pattern, hold) in &self.holds {
            if let Some(state) = value.patterns.get_mut(pattern) {
                if state.paused && state.hold.is_none() {
                    state.hold = Some(hold.clone());
                }
            }
        }
        for pattern in &self.ends {
            let Some(state) = value.patterns.get_mut(pattern) else {
                continue;
            };
            if state.paused || state.replay.is_some() {
                continue;
            }
            if let Some(hold) = state.hold.as_mut() {
                // Resumed before the keyed lane's holder took it out of
                // the keyed consumer: its keyed messages never waited, and
                // the keyed lane goes on as is.
                let kept_keyed = !hold.keyed_left;
                if kept_keyed {
                    hold.keyed_left = true;
                    hold.keyed_after = u64::MAX;
                }
                state.replay = Some(Replay {
                    keyed_joined: kept_keyed,
                    keyed_read: kept_keyed,
                });
                state.from_seq = state.from_seq.max(self.resumed);
            }
        }
        *value != before
    }
}

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
