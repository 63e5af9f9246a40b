//! Carrying out a subscription change: the compare-and-set on the
//! service's key in `courier_services`, then its consumers; and the keyed
//! lane holder's part of a replay (joining, ending) and of a hold
//! (leaving the keyed consumer).

use std::time::Duration;

use async_nats::jetstream::{
    consumer::pull,
    kv::{self, CreateErrorKind, UpdateErrorKind},
    stream::Stream,
};
use courier_proto::StartFrom;
use courier_store::Upstream;

use super::{
    hold::PausePlan, is_consumer_not_found, pause_until, read, service_of, store_error,
    PatternState, ServiceSubscriptions, ServicesError, CAS_ATTEMPTS_MAX, CAS_RETRY_PAUSE,
};
use crate::consumers::{
    consumer_config, consumer_name, ensure_consumer, held_consumer_name, replay_config,
    replay_consumer_name, Lane,
};
use crate::lease::is_wrong_revision;

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

    /// A service consumer's last delivered stream seq; `None` when the
    /// consumer does not exist.
    pub(super) async fn delivered(
        &self,
        service: &str,
        lane: Lane,
    ) -> Result<Option<u64>, ServicesError> {
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
    pub(super) async fn last_seq(&self, service: &str) -> Result<u64, ServicesError> {
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

    pub(super) async fn delete_consumer(&self, name: &str) -> Result<(), ServicesError> {
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
    pub(super) async fn write_entry(
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
    pub(super) async fn align_consumers(
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
