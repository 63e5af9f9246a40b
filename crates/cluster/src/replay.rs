//! History replay on a cluster (docs/SCALE-OUT.md §4 "History replay"):
//! a pattern subscribed with `start` 1 or 2 replays the retained events
//! it matches from a consumer of its own, `svc-<service>-replay-<hash>`,
//! which only the holder of the service's keyed lane reads, before it
//! reads the keyed lane again: a key's history comes before its new
//! messages, one node at a time hands out both.
//!
//! The replay's end is where the service's consumers took over: an
//! unkeyed event belongs to the replay up to the pattern's `from_seq`,
//! a keyed one up to its `keyed_from_seq` (what the consumers fetch up to
//! there is skipped, [`crate::fetch::Skip`]). What the replay consumer
//! holds past that is acknowledged unread.

use std::sync::Arc;

use async_nats::jetstream::consumer::PullConsumer;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{watch, Notify};

use crate::consumers::{held_consumer_name, replay_consumer_name, Lane};
use crate::fetch::{
    decode, gathering_pull, in_log_order, Fetched, FETCH_EXPIRES, HANDOFF_MAX, LOOKUP_TIMEOUT,
    ROOM_RECHECK,
};
use crate::names::MESSAGES_STREAM;
use crate::services::PatternState;
use crate::Connection;

/// The most one pull of a replay asks for.
pub const REPLAY_BATCH_MAX: u32 = 256;

#[derive(Debug, thiserror::Error)]
#[error("history replay of {pattern} to service {service}: {reason}")]
pub struct ReplayError {
    pub service: String,
    pub pattern: String,
    pub reason: String,
}

/// How a [`drain`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Everything up to the replay's end was handed out and settled (or
    /// there was nothing): the replay can end.
    Done,
    /// Told to stop first; the replay goes on at the lane's next holder.
    Stopped,
}

/// Whether the message at `seq`, keyed or not, is outside what the
/// hand-out gives: past its end (the service's consumers have it), or —
/// from a hold — at or before what they had delivered when it began.
fn outside(state: &PatternState, keyed: bool, seq: u64) -> bool {
    let (after, end) = match (keyed, &state.hold) {
        (false, hold) => (hold.as_ref().map_or(0, |h| h.unkeyed_after), state.from_seq),
        (true, hold) => (
            hold.as_ref().map_or(0, |h| h.keyed_after),
            state.keyed_from_seq,
        ),
    };
    seq <= after || seq > end
}

/// Hands out `pattern`'s history to `service`'s instances here: fetches
/// its replay consumer within `credit`, hands each message to `deliver`
/// as the service's lanes do, and returns once every message up to the
/// replay's end is settled — the keyed lane waits until then, so a key's
/// redelivered history still comes before its new messages. `state` is
/// the pattern's, once the keyed lane joined it.
/// `gather`: the messages of its consumer due again from the last
/// holder, taken in one pull ([`crate::fetch::first_pull`]).
#[allow(clippy::too_many_arguments)] // the loop's inputs, each its own
pub async fn drain<C, D>(
    connection: &Connection,
    service: &str,
    pattern: &str,
    state: &PatternState,
    credit: C,
    room: Arc<Notify>,
    mut deliver: D,
    mut gather: u32,
    mut stop: watch::Receiver<bool>,
) -> Result<Drained, ReplayError>
where
    C: Fn() -> u32,
    D: FnMut(Vec<Fetched>),
{
    let error = |reason: String| ReplayError {
        service: service.to_string(),
        pattern: pattern.to_string(),
        reason,
    };
    let name = consumer_of(service, pattern, state);
    let lookup = tokio::time::timeout(
        LOOKUP_TIMEOUT * 5,
        connection
            .jetstream
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                &name,
                MESSAGES_STREAM,
            ),
    )
    .await
    .map_err(|_| error(format!("consumer {name} was not found in time")))?;
    let mut consumer: PullConsumer = match lookup {
        Ok(consumer) => consumer,
        // Ended by a holder before, which then could not say so.
        Err(e) if crate::services::is_consumer_not_found(e.kind()) => return Ok(Drained::Done),
        Err(e) => return Err(error(format!("consumer {name}: {e}"))),
    };
    let end = state.from_seq.max(state.keyed_from_seq);
    loop {
        if *stop.borrow() || stop.has_changed().is_err() {
            return Ok(Drained::Stopped);
        }
        let info = consumer
            .info()
            .await
            .map_err(|e| error(format!("consumer {name}: {e}")))?
            .clone();
        let handed_out = info.num_pending == 0 || info.delivered.stream_sequence >= end;
        if handed_out && info.num_ack_pending == 0 {
            return Ok(Drained::Done);
        }
        let (ask, gathering) = gathering_pull(credit().min(REPLAY_BATCH_MAX), &mut gather);
        if ask == 0 {
            tokio::select! {
                _ = room.notified() => {}
                _ = tokio::time::sleep(ROOM_RECHECK) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let ack_wait = info.config.ack_wait;
        let mut batch = crate::fetch::pull(&consumer, ask)
            .await
            .map_err(|e| error(format!("consumer {name}: pull failed: {e}")))?;
        let mut ready = Vec::new();
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(FETCH_EXPIRES + LOOKUP_TIMEOUT, batch.next()) => next,
                _ = stop.changed() => break,
            };
            let message = match next {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => {
                    tracing::debug!("consumer {name}: {e}; pulling again");
                    break;
                }
                Ok(None) | Err(_) => break,
            };
            let subject = message.subject.as_str();
            let keyed =
                subject.starts_with("courier.m.ek.") || subject.starts_with("courier.m.ck.");
            let Some(fetched) =
                decode(connection, service, lane_of(keyed), ack_wait, message).await
            else {
                continue;
            };
            if outside(state, keyed, fetched.stream_seq) {
                // The service's consumers hand it out.
                ack(connection, &fetched.handle).await;
                continue;
            }
            ready.push(fetched);
            if ready.len() >= HANDOFF_MAX && !gathering {
                in_log_order(&mut ready);
                deliver(std::mem::take(&mut ready));
            }
        }
        if !ready.is_empty() {
            in_log_order(&mut ready);
            deliver(ready);
        }
    }
}

/// The consumer `pattern`'s hand-out reads: its hold's once it resumed
/// from a pause, else its replay's.
pub fn consumer_of(service: &str, pattern: &str, state: &PatternState) -> String {
    match state.hold {
        Some(_) => held_consumer_name(service, pattern),
        None => replay_consumer_name(service, pattern),
    }
}

fn lane_of(keyed: bool) -> Lane {
    if keyed {
        Lane::Keyed
    } else {
        Lane::Unkeyed
    }
}

async fn ack(connection: &Connection, handle: &str) {
    let acked = connection
        .client
        .publish(handle.to_string(), Bytes::from_static(b"+ACK"))
        .await;
    if let Err(e) = acked {
        // Redelivered after its ack deadline, and acknowledged then.
        tracing::debug!("a replayed message past the replay's end was not acked: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{Hold, Replay};

    #[test]
    fn the_end_is_where_each_lane_took_over() {
        let state = PatternState {
            from_seq: 10,
            keyed_from_seq: 20,
            replay: Some(Replay {
                keyed_joined: true,
                keyed_read: true,
            }),
            ..PatternState::default()
        };
        assert!(!outside(&state, false, 1));
        assert!(!outside(&state, false, 10));
        assert!(outside(&state, false, 11));
        assert!(!outside(&state, true, 20));
        assert!(outside(&state, true, 21));
    }

    #[test]
    fn a_hold_begins_after_what_the_consumers_had_delivered() {
        let state = PatternState {
            from_seq: 50,
            keyed_from_seq: 60,
            replay: Some(Replay {
                keyed_joined: true,
                keyed_read: true,
            }),
            hold: Some(Hold {
                unkeyed_after: 10,
                keyed_after: 12,
                keyed_left: true,
            }),
            ..PatternState::default()
        };
        assert!(outside(&state, false, 10));
        assert!(!outside(&state, false, 11));
        assert!(outside(&state, true, 12));
        assert!(!outside(&state, true, 13));
        // Resumed before it left the keyed consumer: no keyed message
        // waited.
        let kept = PatternState {
            hold: Some(Hold {
                unkeyed_after: 10,
                keyed_after: u64::MAX,
                keyed_left: true,
            }),
            ..state
        };
        assert!(outside(&kept, true, 13));
        assert!(kept.replay.is_some() && !kept.keyed_join_waiting());
    }
}
