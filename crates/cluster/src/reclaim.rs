//! Giving the log's space back (SCALE-OUT.md §3 "Reclaiming space"): a
//! stored send leaves `COURIER_MSGS` once no consumer may still need it
//! and, for an event, once it is older than the retention (kept for
//! history replays, as on one broker).
//!
//! A consumer delivers its matching messages in stream order, so below the
//! first seq it has not delivered it needs nothing new, and below its ack
//! floor nothing at all; the log is purged below the smallest of those
//! over every consumer, events only below the first one stored within the
//! retention too. Deferred sends' schedules (`courier.m.s.…`) are never
//! purged: they wait for their time outside every consumer's filter. Run
//! by one node at a time, the holder of the `reclaimer` lease.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream::Stream};
use futures_util::TryStreamExt as _;

use crate::names::MESSAGES_STREAM;

/// The subjects of stored sends (§2), the only ones a purge touches.
pub const RECLAIMED_SUBJECTS: [&str; 5] = [
    "courier.m.c.>",
    "courier.m.e.>",
    "courier.m.ck.>",
    "courier.m.ek.>",
    "courier.m.r.>",
];

/// Those of [`RECLAIMED_SUBJECTS`] that hold events, kept for the
/// retention whether a consumer needs them or not.
pub const EVENT_SUBJECTS: [&str; 2] = ["courier.m.e.>", "courier.m.ek.>"];

#[derive(Debug, thiserror::Error)]
#[error("reclaiming the log's space: {0}")]
pub struct ReclaimError(String);

fn reclaim_error(e: impl std::fmt::Display) -> ReclaimError {
    ReclaimError(e.to_string())
}

/// The first seq of the stream a consumer may still hand out: its ack
/// floor's successor while it has deliveries unacknowledged (they may be
/// redelivered), else the successor of the last it delivered. Both stay at
/// the consumer's last *matching* message while later ones do not match
/// (checked on 2.15.1), which only keeps more.
pub fn first_needed(info: &consumer::Info) -> u64 {
    if info.num_ack_pending > 0 {
        info.ack_floor.stream_sequence + 1
    } else {
        info.delivered.stream_sequence + 1
    }
}

/// The first seq of `stream` stored at or after `since` (its last seq + 1
/// when none is): the start of an ephemeral consumer created there, which
/// the server finds in its own index by time.
pub async fn first_seq_since(stream: &Stream, since: SystemTime) -> Result<u64, ReclaimError> {
    let since_ns = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let start_time = async_nats::datetime::from_nanos(i128::try_from(since_ns).unwrap_or(0))
        .map_err(reclaim_error)?;
    let probe = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ack_policy: consumer::AckPolicy::None,
            // Gone by itself if the delete below never comes.
            inactive_threshold: Duration::from_secs(30),
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(reclaim_error)?;
    let name = probe.cached_info().name.clone();
    let first = probe.cached_info().delivered.stream_sequence + 1;
    if let Err(e) = stream.delete_consumer(&name).await {
        tracing::debug!("the retention probe {name} was not deleted ({e}); it ages out");
    }
    Ok(first)
}

/// Purges the stored sends no consumer needs, events only once older than
/// `event_retention`; returns the seq below which every send is gone,
/// `None` when nothing could go.
pub async fn reclaim_once(
    js: &jetstream::Context,
    event_retention: Duration,
) -> Result<Option<u64>, ReclaimError> {
    let mut stream = js
        .get_stream(MESSAGES_STREAM)
        .await
        .map_err(reclaim_error)?;
    let state = stream.info().await.map_err(reclaim_error)?.state.clone();
    let mut floor = state.last_sequence + 1;
    let mut listed = 0;
    let mut consumers = stream.consumers();
    while let Some(info) = consumers.try_next().await.map_err(reclaim_error)? {
        floor = floor.min(first_needed(&info));
        listed += 1;
    }
    // A consumer whose leader is being elected can be missing from the
    // listing, without an error: its floor would be missing too, and a
    // purge to the others' floors would take what it still needs.
    if listed < state.consumer_count {
        return Err(ReclaimError(format!(
            "{listed} of the stream's {} consumers answered; nothing purged",
            state.consumer_count
        )));
    }
    if floor <= state.first_sequence {
        return Ok(None);
    }
    let events_floor = if event_retention.is_zero() {
        floor
    } else {
        let since = SystemTime::now()
            .checked_sub(event_retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        floor.min(first_seq_since(&stream, since).await?)
    };
    for subject in RECLAIMED_SUBJECTS {
        let below = if EVENT_SUBJECTS.contains(&subject) {
            events_floor
        } else {
            floor
        };
        stream
            .purge()
            .filter(subject)
            .sequence(below)
            .await
            .map_err(reclaim_error)?;
    }
    Ok(Some(floor))
}
