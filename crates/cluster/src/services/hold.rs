//! Pausing one pattern while others of its service go on (SCALE-OUT.md
//! §4 "Pausing"): the holds a pause or resume begins and ends.

use std::collections::BTreeMap;
use std::time::Duration;

use courier_store::Upstream;

use super::{pause_until, read, Hold, Replay, ServiceSubscriptions, ServiceWriter, ServicesError};
use crate::consumers::{ensure_consumer, held_config, held_consumer_name, Lane};

impl ServiceWriter {
    /// What a pause or resume does besides the patterns' `paused` flags
    /// (§4 "Pausing"): the holds it begins — a pattern paused alone, or
    /// left paused by a resume of others — and the holds it ends. The
    /// consumers are made and the resumed patterns' filters set here,
    /// before the entry names them.
    pub(super) async fn plan_pause(
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
            let start = unkeyed.min(keyed.unwrap_or(unkeyed)) + 1;
            for (pattern, was_paused) in begins {
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
}

/// See [`ServiceWriter::plan_pause`].
#[derive(Debug, Default)]
pub(super) struct PausePlan {
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
    pub(super) fn apply(&self, value: &mut ServiceSubscriptions, change: &Upstream) -> bool {
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
