//! Giving the log's space back (SCALE-OUT.md §3 "Reclaiming space"): a
//! stored send leaves `COURIER_MSGS` once no consumer may still need it.
//!
//! A consumer delivers its matching messages in stream order, so below the
//! first seq it has not delivered it needs nothing new, and below its ack
//! floor nothing at all; the log is purged below the smallest of those
//! over every consumer. Deferred sends' schedules (`courier.m.s.…`) are
//! never purged: they wait for their time outside every consumer's filter.
//! Run by one node at a time, the holder of the `reclaimer` lease.

use async_nats::jetstream::{self, consumer};
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

/// Purges the stored sends no consumer needs; returns the seq below which
/// they are gone, `None` when nothing could go.
pub async fn reclaim_once(js: &jetstream::Context) -> Result<Option<u64>, ReclaimError> {
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
    for subject in RECLAIMED_SUBJECTS {
        stream
            .purge()
            .filter(subject)
            .sequence(floor)
            .await
            .map_err(reclaim_error)?;
    }
    Ok(Some(floor))
}
