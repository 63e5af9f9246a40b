//! Parked replies in `COURIER_PARKED` (SCALE-OUT.md §10): a reply that
//! no instance of its requesting service took, anywhere, waits here —
//! not in the memory of the node that had it, which may die — until an
//! instance of the service is connected to some node, which takes it.
//! The stream keeps at most its per-subject limit a service, the oldest
//! dropped, as one broker does.
//!
//! No consumer: a JetStream consumer per service would be a replicated
//! group for every service ever connected, for a path most never take.
//! A taker reads a service's subject from the stream's leader, deletes
//! what an instance got, and looks again when a node says it parked one
//! (`courier.pn.<service>`) or, for a notice lost with its node, every
//! [`RECHECK_EVERY`]. Two nodes taking at once may both deliver a reply:
//! at least once, as every parked reply is.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use courier_proto::Message;
use futures_util::StreamExt as _;
use tokio::sync::watch;

use crate::names::{service_token, PARKED_STREAM};
use crate::Connection;

/// How often a taker looks for parked replies without being told.
pub const RECHECK_EVERY: Duration = Duration::from_secs(60);
/// A taker that cannot subscribe to notices tries again after this.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The subject of `service`'s parked replies.
pub fn parked_subject(service: &str) -> String {
    format!("courier.p.{}", service_token(service))
}

/// Where a node that parked a reply for `service` says so.
pub fn notice_subject(service: &str) -> String {
    format!("courier.pn.{}", service_token(service))
}

#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    #[error("the reply cannot be encoded: {0}")]
    Encode(String),
    #[error("the reply was not stored in {PARKED_STREAM}: {0}")]
    Publish(String),
}

/// Stores `reply` for `service` until one of its instances takes it; its
/// id is its `Nats-Msg-Id`, so parking it twice keeps one.
pub async fn park(
    connection: &Connection,
    service: &str,
    reply: &Message,
) -> Result<(), ParkError> {
    let mut payload = BytesMut::new();
    courier_proto::encode_message(reply, &mut payload)
        .map_err(|e| ParkError::Encode(e.to_string()))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        reply.id.simple().to_string().as_str(),
    );
    let publish = PublishMessage::build()
        .payload(payload.freeze())
        .headers(headers);
    connection
        .jetstream
        .send_publish(parked_subject(service), publish)
        .await
        .map_err(|e| ParkError::Publish(e.to_string()))?
        .await
        .map_err(|e| ParkError::Publish(e.to_string()))?;
    // A lost notice costs a delay (the takers' recheck), never the reply.
    let _ = connection
        .client
        .publish(notice_subject(service), Bytes::new())
        .await;
    Ok(())
}

/// Hands `service`'s parked replies to `deliver` until `stop`; one that
/// `deliver` took (`true`: an instance here got it) is deleted, one it
/// did not stays for another node's instance.
pub async fn take(
    connection: Connection,
    service: String,
    mut deliver: impl FnMut(Message) -> bool + Send,
    mut stop: watch::Receiver<bool>,
) {
    let mut notices = loop {
        match connection.client.subscribe(notice_subject(&service)).await {
            Ok(notices) => break notices,
            Err(e) => {
                tracing::debug!(%service, "cannot hear of parked replies yet: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = drain(&connection, &service, &mut deliver).await {
            tracing::debug!(%service, "parked replies not taken yet: {e}");
        }
        tokio::select! {
            _ = notices.next() => {}
            _ = tokio::time::sleep(RECHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Delivers `service`'s parked replies, oldest first, until none is left
/// or `deliver` takes one no more.
async fn drain(
    connection: &Connection,
    service: &str,
    deliver: &mut (impl FnMut(Message) -> bool + Send),
) -> Result<(), String> {
    let stream = connection
        .jetstream
        .get_stream_no_info(PARKED_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let subject = parked_subject(service);
    let mut from = 1;
    loop {
        let stored = match stream
            .get_first_raw_message_by_subject(&subject, from)
            .await
        {
            Ok(stored) => stored,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        from = stored.sequence + 1;
        match courier_proto::decode_message(stored.payload.clone()) {
            Ok(reply) => {
                if !deliver(reply) {
                    return Ok(());
                }
            }
            Err(e) => tracing::warn!(%service, "a parked reply does not decode: {e}; dropped"),
        }
        // Taken: gone, so that no node delivers it again.
        if let Err(e) = stream.delete_message(stored.sequence).await {
            tracing::debug!(%service, "a taken parked reply was not deleted: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_with_dots_has_one_subject_token() {
        assert_eq!(parked_subject("billing.eu"), "courier.p.billing~eu");
        assert_eq!(notice_subject("billing.eu"), "courier.pn.billing~eu");
    }
}
