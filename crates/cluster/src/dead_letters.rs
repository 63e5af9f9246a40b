//! A service's dead letters in `COURIER_DEAD` (SCALE-OUT.md §7) as the
//! admin commands `courier.dead-letters.*` read and change them, without a
//! consumer: every node answers them alike, whichever dead-lettered what.
//!
//! A dead letter's id is the stream seq of its original in `COURIER_MSGS`,
//! the last token of its subject `courier.dl.<service>.<id>`; its seq in
//! `COURIER_DEAD` follows dead-lettering order, which is not the order of
//! ids (a later message can die first), so a listing goes by the stream's
//! per-subject state, not by a range of the stream's seqs. Single reads go
//! to the stream's leader (a "get", not a direct get from any replica), so
//! a dead letter replayed or purged through one node is gone for the next
//! command through any node.

use std::collections::BinaryHeap;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{self, message::StreamMessage};
use async_nats::HeaderMap;
use courier_proto::Message;
use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::names::{service_token, DEAD_STREAM};
use crate::store::{
    dead_letter_subject, is_traced, mark_traced, ATTEMPTS_HEADER, DEAD_LETTERED_AT_HEADER,
    REASON_HEADER,
};

/// Dead letters of one page read at once: a page of 1000 is that many
/// reads, and in flight together they cost a few round trips.
pub const PAGE_READS_IN_FLIGHT_MAX: usize = 16;

/// One dead letter as stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original's stream seq in `COURIER_MSGS`.
    pub id: u64,
    pub attempts: u32,
    pub reason: String,
    /// When it was dead-lettered (unix ns).
    pub at: u64,
    /// `None` when the stored bytes do not decode.
    pub message: Option<Message>,
}

/// A page of a service's dead letters by id.
#[derive(Debug)]
pub struct Page {
    /// At most the `limit` asked for, by id.
    pub letters: Vec<DeadLetter>,
    /// How many the service has with an id above `after`, the page's
    /// included.
    pub total_after: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLettersError {
    #[error("service {service} has no dead letter {id}")]
    NotFound { service: String, id: u64 },
    #[error("dead letter {id} of service {service} cannot be replayed: its stored message does not decode")]
    Unreadable { service: String, id: u64 },
    #[error("the cluster's dead letters cannot be read or changed now: {0}")]
    Backend(String),
}

fn backend(e: impl std::fmt::Display) -> DeadLettersError {
    DeadLettersError::Backend(e.to_string())
}

async fn dead_stream(js: &jetstream::Context) -> Result<Stream<()>, DeadLettersError> {
    js.get_stream_no_info(DEAD_STREAM).await.map_err(backend)
}

/// The subjects of all of `service`'s dead letters, and the prefix before
/// each one's id.
fn service_subjects(service: &str) -> (String, String) {
    let prefix = format!("courier.dl.{}.", service_token(service));
    (format!("{prefix}>"), prefix)
}

fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

fn parse(id: u64, stored: StreamMessage) -> DeadLetter {
    let number = |name| header(&stored, name).and_then(|v| v.parse::<u64>().ok());
    DeadLetter {
        id,
        attempts: number(ATTEMPTS_HEADER).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        reason: header(&stored, REASON_HEADER)
            .unwrap_or_default()
            .to_string(),
        at: number(DEAD_LETTERED_AT_HEADER).unwrap_or(0),
        message: courier_proto::decode_message(stored.payload).ok(),
    }
}

/// How many dead letters `service` has (one subject each: the count of
/// its subjects, read from the stream's per-subject state).
pub async fn count(js: &jetstream::Context, service: &str) -> Result<u64, DeadLettersError> {
    let stream = dead_stream(js).await?;
    let (filter, _) = service_subjects(service);
    let subjects = stream.info_with_subjects(&filter).await.map_err(backend)?;
    subjects
        .try_fold(0u64, |count, _| async move { Ok(count + 1) })
        .await
        .map_err(backend)
}

/// The stored dead letter `id` of `service`, `None` when there is none.
async fn read(
    stream: &Stream<()>,
    service: &str,
    id: u64,
) -> Result<Option<StreamMessage>, DeadLettersError> {
    match stream
        .get_last_raw_message_by_subject(&dead_letter_subject(service, id))
        .await
    {
        Ok(stored) => Ok(Some(stored)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(backend(e)),
    }
}

/// The service's dead letters with an id above `after`, at most `limit`,
/// by id. The stream's per-subject state names them all (paged by the
/// server); only the `limit` smallest ids are kept while it is read, and
/// only those are fetched, so a page costs `limit` reads and memory
/// however many dead letters there are.
pub async fn list(
    js: &jetstream::Context,
    service: &str,
    after: u64,
    limit: usize,
) -> Result<Page, DeadLettersError> {
    let stream = dead_stream(js).await?;
    let (filter, prefix) = service_subjects(service);
    let mut subjects = stream.info_with_subjects(&filter).await.map_err(backend)?;
    let mut smallest: BinaryHeap<u64> = BinaryHeap::with_capacity(limit + 1);
    let mut total_after = 0;
    while let Some((subject, _count)) = subjects.try_next().await.map_err(backend)? {
        let Some(id) = subject
            .strip_prefix(&prefix)
            .and_then(|id| id.parse::<u64>().ok())
        else {
            continue;
        };
        if id <= after {
            continue;
        }
        total_after += 1;
        smallest.push(id);
        if smallest.len() > limit {
            smallest.pop();
        }
    }
    let mut ids = smallest.into_vec();
    ids.sort_unstable();
    let read_all = futures_util::stream::iter(ids)
        .map(|id| {
            let stream = &stream;
            async move { read(stream, service, id).await.map(|m| (id, m)) }
        })
        .buffered(PAGE_READS_IN_FLIGHT_MAX);
    let read: Vec<(u64, Option<StreamMessage>)> = read_all.try_collect().await?;
    let letters = read
        .into_iter()
        // Replayed or purged since the subjects were read: not listed.
        .filter_map(|(id, stored)| stored.map(|stored| parse(id, stored)))
        .collect();
    Ok(Page {
        letters,
        total_after,
    })
}

/// One dead letter of the service.
pub async fn show(
    js: &jetstream::Context,
    service: &str,
    id: u64,
) -> Result<DeadLetter, DeadLettersError> {
    let stream = dead_stream(js).await?;
    read(&stream, service, id)
        .await?
        .map(|stored| parse(id, stored))
        .ok_or_else(|| DeadLettersError::NotFound {
            service: service.to_string(),
            id,
        })
}

/// Where a dead letter replayed for `service` is published in
/// `COURIER_MSGS`: only that service's consumer takes it
/// (`consumers::filter_subjects`), as a new message whose attempts start
/// over.
pub fn replay_subject(service: &str, name: &str) -> String {
    format!("courier.m.r.{}.{name}", service_token(service))
}

/// Delivers dead letter `id` to `service` again and then deletes it.
/// `request` (the asking command's id) makes the publish's `Nats-Msg-Id`,
/// so a replay resent for the same request is stored once. Two replays of
/// one dead letter at once, through different nodes, may both deliver it.
pub async fn replay(
    js: &jetstream::Context,
    service: &str,
    id: u64,
    request: &str,
) -> Result<(), DeadLettersError> {
    let stream = dead_stream(js).await?;
    let Some(stored) = read(&stream, service, id).await? else {
        return Err(DeadLettersError::NotFound {
            service: service.to_string(),
            id,
        });
    };
    let message = courier_proto::decode_message(stored.payload.clone()).map_err(|_| {
        DeadLettersError::Unreadable {
            service: service.to_string(),
            id,
        }
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("replay.{service}.{id}.{request}").as_str(),
    );
    mark_traced(&mut headers, is_traced(Some(&stored.headers)));
    let publish = PublishMessage::build()
        .payload(stored.payload)
        .headers(headers);
    js.send_publish(replay_subject(service, &message.name), publish)
        .await
        .map_err(backend)?
        .await
        .map_err(backend)?;
    // Only once the replay is stored: a failure here leaves the dead
    // letter in place, to be replayed or purged again.
    stream
        .delete_message(stored.sequence)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Deletes dead letter `id` of the service, or all of its dead letters;
/// returns how many went.
pub async fn purge(
    js: &jetstream::Context,
    service: &str,
    id: Option<u64>,
) -> Result<u64, DeadLettersError> {
    let stream = dead_stream(js).await?;
    let filter = match id {
        Some(id) => dead_letter_subject(service, id),
        None => service_subjects(service).0,
    };
    let purged = stream.purge().filter(filter).await.map_err(backend)?;
    Ok(purged.purged)
}
