//! Parked replies in `COURIER_PARKED` (SCALE-OUT.md §10): a reply that
//! no instance of its requesting service took, anywhere, waits here —
//! not in the memory of the node that had it, which may die — until an
//! instance of the service connects to any node, whose taker fetches it.
//! The stream keeps at most its per-subject limit a service, the oldest
//! dropped, as one broker does.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::BytesMut;
use courier_proto::Message;
use futures_util::StreamExt as _;
use tokio::sync::watch;

use crate::names::{service_token, PARKED_STREAM};
use crate::Connection;

/// A pull waits this long for parked replies before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// A taker whose pull failed waits this long before trying again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// A fetched reply not acknowledged within this comes again (its node
/// died between taking and delivering it).
const ACK_WAIT: Duration = Duration::from_secs(30);
/// A consumer of a service no instance has been taking for this long is
/// removed by the servers.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(3600);
/// Parked replies taken at once.
const PULL_BATCH: usize = 64;

/// The subject of `service`'s parked replies.
pub fn parked_subject(service: &str) -> String {
    format!("courier.p.{}", service_token(service))
}

/// The durable pull consumer every node with an instance of `service`
/// takes its parked replies from.
pub fn parked_consumer(service: &str) -> String {
    format!("svc-{}-parked", service_token(service))
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
    Ok(())
}

/// Hands `service`'s parked replies to `deliver` until `stop`: each is
/// acknowledged once `deliver` took it (`true`: an instance here got it),
/// else given back for another node's instance.
pub async fn take(
    connection: Connection,
    service: String,
    mut deliver: impl FnMut(Message) -> bool + Send,
    mut stop: watch::Receiver<bool>,
) {
    let config = pull::Config {
        durable_name: Some(parked_consumer(&service)),
        filter_subject: parked_subject(&service),
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        deliver_policy: DeliverPolicy::All,
        inactive_threshold: INACTIVE_THRESHOLD,
        ..Default::default()
    };
    loop {
        if *stop.borrow() {
            return;
        }
        let consumer = match connection.jetstream.get_stream(PARKED_STREAM).await {
            Ok(stream) => stream
                .create_consumer(config.clone())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let consumer = match consumer {
            Ok(consumer) => consumer,
            Err(e) => {
                tracing::debug!(%service, "cannot take parked replies yet: {e}");
                if !pause(&mut stop).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let batch = consumer
                .batch()
                .max_messages(PULL_BATCH)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::debug!(%service, "a pull of parked replies failed: {e}");
                    break;
                }
            };
            loop {
                let next = tokio::select! {
                    next = batch.next() => next,
                    _ = stop.changed() => return,
                };
                let Some(Ok(fetched)) = next else {
                    break;
                };
                let taken = match courier_proto::decode_message(fetched.payload.clone()) {
                    Ok(reply) => deliver(reply),
                    Err(e) => {
                        tracing::warn!(%service, "a parked reply does not decode: {e}; dropped");
                        true
                    }
                };
                let settled = if taken {
                    fetched.ack().await
                } else {
                    fetched
                        .ack_with(async_nats::jetstream::AckKind::Nak(None))
                        .await
                };
                if let Err(e) = settled {
                    tracing::debug!(%service, "a parked reply was not settled: {e}");
                }
            }
        }
        if !pause(&mut stop).await {
            return;
        }
    }
}

/// Waits [`RETRY_PAUSE`]; `false` if stopped meanwhile.
async fn pause(stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(RETRY_PAUSE) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_with_dots_has_one_subject_token() {
        assert_eq!(parked_subject("billing.eu"), "courier.p.billing~eu");
        assert_eq!(parked_consumer("billing.eu"), "svc-billing~eu-parked");
    }
}
