//! The sessions behind durable subscriptions over HTTP (`subscribe.rs`'s
//! Server-Sent Events and `ws.rs`'s WebSocket).
//!
//! Each stream is a session: a bus connection of its own, of the caller's
//! service, subscribed to the pattern with the stream's `max_in_flight`.
//! The broker therefore keeps the books — what waits, what is in flight,
//! what to redeliver — and the gateway only relays: a delivery's handler
//! hands it to the stream and waits for the HTTP client's ack or nack.
//! When the stream ends, the session's connection closes, and the broker
//! redelivers what it left unsettled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use courier_client::proto::Kind;
use courier_client::{Client, ClientOptions, Incoming, MessageBuilder};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;
use uuid::Uuid;

use super::envelope::refusal;
use super::{bearer, lock, Gateway};
use crate::http::problem;

/// Deliveries a session holds unsettled unless `?max_in_flight=` says
/// otherwise.
const MAX_IN_FLIGHT_DEFAULT: u32 = 16;
/// The most a session may ask for.
const MAX_IN_FLIGHT_MAX: u32 = 1024;
/// Transient deliveries a stream may have waiting to be written.
const TRANSIENT_WAITING_MAX: usize = 1024;
/// How long a delivered command stays answerable without its final
/// reply: the broker's reply route lasts as long (docs/PROTOCOL.md §8.1),
/// so a later reply would be refused anyway.
const ANSWERABLE_FOR: Duration = Duration::from_secs(600);
/// Commands awaiting a reply held at once, across sessions; past it the
/// expired go, and a command that finds no room is not answerable here.
const ANSWERABLE_MAX: usize = 65_536;

/// The sessions open and the deliveries they hold unsettled.
pub(crate) struct Subscriptions {
    pub(super) gateway: Arc<Gateway>,
    unsettled: std::sync::Mutex<HashMap<String, Unsettled>>,
    answerable: std::sync::Mutex<HashMap<String, Answerable>>,
    sessions: std::sync::Mutex<HashMap<Uuid, Open>>,
}

/// A delivery handed to an HTTP client and waiting for its verdict.
///
/// The verdict is written to the bus by whoever settles, before the HTTP
/// answer: a stream closed right after its ack cannot lose the ack to
/// the close.
struct Unsettled {
    /// The token of the session's caller: only it settles.
    owner: Option<String>,
    session: Uuid,
    incoming: Arc<Incoming>,
    /// Dropped with the entry: the delivery's handler may end.
    _settled: oneshot::Sender<()>,
}

/// A command handed to an HTTP client, which may answer it until its
/// final reply, whether or not the delivery was settled yet (with
/// `?ack=auto` it is settled as it is sent), for as long as the session
/// lasts: the replies go out on the session's connection, the one the
/// command was delivered to.
struct Answerable {
    owner: Option<String>,
    session: Uuid,
    incoming: Arc<Incoming>,
    since: Instant,
}

/// A session as the registry knows it, to close it when a reconnecting
/// client names it in `Last-Event-ID`.
struct Open {
    owner: Option<String>,
    client: Client,
    /// Dropped when the session closes: its handlers still waiting then
    /// leave their deliveries to the broker.
    _closing: watch::Sender<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    Ack,
    Nack(Duration),
}

/// Why a settlement was not taken.
pub(crate) enum Unsettleable {
    /// No such delivery awaits a verdict from this caller.
    Unknown,
}

/// Why a reply was not sent.
pub(crate) enum Unanswerable<E> {
    /// No such command awaits a reply from this caller.
    Unknown,
    /// The reply could not be built (a bad header or payload).
    Unbuildable(E),
    /// The broker refused it, or could not be reached.
    Refused(courier_client::Error),
}

impl Subscriptions {
    pub(crate) fn new(gateway: Arc<Gateway>) -> Arc<Subscriptions> {
        Arc::new(Subscriptions {
            gateway,
            unsettled: std::sync::Mutex::new(HashMap::new()),
            answerable: std::sync::Mutex::new(HashMap::new()),
            sessions: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Acks or nacks a delivery for the caller holding `owner`'s token.
    pub(crate) fn settle(
        &self,
        delivery: &str,
        owner: &Option<String>,
        settlement: Settlement,
    ) -> Result<(), Unsettleable> {
        let mut unsettled = lock(&self.unsettled);
        match unsettled.get(delivery) {
            Some(entry) if entry.owner == *owner => {}
            _ => return Err(Unsettleable::Unknown),
        }
        let entry = unsettled.remove(delivery).ok_or(Unsettleable::Unknown)?;
        // Under the lock, so that the handler cannot meanwhile find the
        // entry gone and settle the delivery its own way.
        let settled = match settlement {
            Settlement::Ack => entry.incoming.ack(),
            Settlement::Nack(delay) => entry.incoming.nack(delay),
        };
        drop(unsettled);
        if let Settlement::Nack(_) = settlement {
            // Given back: it is answered when it comes again, by its new
            // delivery id.
            lock(&self.answerable).remove(delivery);
        }
        settled.map_err(|_| Unsettleable::Unknown)
    }

    /// Sends a reply to a delivered command for the caller holding
    /// `owner`'s token, built by `build` from the reply's start. A final
    /// reply ends what may be answered and acks the delivery if it was
    /// not settled yet, as an SDK handler that returns after replying
    /// does; a reply the broker refuses leaves both as they were.
    pub(crate) async fn reply<E>(
        &self,
        delivery: &str,
        owner: &Option<String>,
        outcome: &str,
        is_final: bool,
        build: impl FnOnce(MessageBuilder) -> Result<MessageBuilder, E>,
    ) -> Result<uuid::Uuid, Unanswerable<E>> {
        let incoming = match lock(&self.answerable).get(delivery) {
            Some(entry) if entry.owner == *owner => entry.incoming.clone(),
            _ => return Err(Unanswerable::Unknown),
        };
        let builder =
            build(incoming.reply_builder(outcome, is_final)).map_err(Unanswerable::Unbuildable)?;
        let id = builder.send().await.map_err(Unanswerable::Refused)?;
        if is_final {
            lock(&self.answerable).remove(delivery);
            // Settled already (by hand, or with ?ack=auto) is as good.
            let _ = self.settle(delivery, owner, Settlement::Ack);
        }
        Ok(id)
    }

    /// Holds a delivered command for its replies.
    fn answerable(&self, delivery: &str, entry: Answerable) {
        let mut answerable = lock(&self.answerable);
        if answerable.len() >= ANSWERABLE_MAX {
            answerable.retain(|_, e| e.since.elapsed() < ANSWERABLE_FOR);
        }
        if answerable.len() < ANSWERABLE_MAX {
            answerable.insert(delivery.to_string(), entry);
        } else {
            debug!(
                delivery,
                "too many commands await replies: this one cannot be answered through the gateway"
            );
        }
    }

    /// Leaves a delivery still unsettled to the broker's redelivery.
    fn release(&self, delivery: &str) {
        if let Some(entry) = lock(&self.unsettled).remove(delivery) {
            let _ = entry.incoming.abandon();
        }
    }

    /// Opens a session: checks the caller, connects for its service and
    /// subscribes. Refusals come back as the HTTP answer to give.
    pub(crate) async fn open(
        self: &Arc<Self>,
        peer: SocketAddr,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<Session, Box<Response>> {
        let bad = |detail: &str| Box::new(problem(StatusCode::BAD_REQUEST, detail));
        let pattern = query
            .get("pattern")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("name what to receive with ?pattern=, such as todo.* or todo.>"))?
            .clone();
        let max_in_flight = match query.get("max_in_flight").map(|n| n.parse::<u32>()) {
            None => MAX_IN_FLIGHT_DEFAULT,
            Some(Ok(n)) if (1..=MAX_IN_FLIGHT_MAX).contains(&n) => n,
            Some(_) => {
                return Err(bad(&format!(
                    "?max_in_flight= takes a number from 1 to {MAX_IN_FLIGHT_MAX}: the deliveries held unacked at once"
                )))
            }
        };
        let auto_ack = match query.get("ack").map(String::as_str) {
            None | Some("manual") => false,
            Some("auto") => true,
            Some(_) => {
                return Err(bad(
                    "?ack= takes auto (acked as sent) or manual (the default: POST /v1/acks/{delivery})",
                ))
            }
        };
        // Authenticates the caller (and tells its service).
        let caller = self.gateway.client(peer, headers).await?;
        let token = bearer(headers).map(str::to_string);
        let wanted = query.get("service").filter(|s| !s.is_empty());
        let service = if token.is_some() && self.gateway.shared.core().manifest().is_some() {
            match wanted {
                Some(wanted) if wanted != caller.service() => {
                    return Err(Box::new(problem(
                        StatusCode::FORBIDDEN,
                        &format!(
                            "this token belongs to service '{}', not '{wanted}': ask for ?service={} or send a token of '{wanted}'",
                            caller.service(),
                            caller.service()
                        ),
                    )));
                }
                _ => String::new(),
            }
        } else {
            wanted
                .ok_or_else(|| {
                    bad("name the service whose subscription this is with ?service=, such as ?service=notifier")
                })?
                .clone()
        };
        if let Some(previous) = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(session_of)
        {
            // The client is back: the session it left, if still open
            // (its end not yet noticed), goes now, so what it left
            // unsettled comes to this one.
            self.close_now(previous, &token).await;
        }

        let id = Uuid::new_v4();
        let mut opts = ClientOptions::new(self.gateway.bus.to_string(), service);
        opts.token = token.clone();
        opts.instance = format!("http-subscribe-{}", &id.simple().to_string()[..8]);
        opts.max_in_flight = max_in_flight;
        opts.drain_timeout = Duration::from_secs(1);
        let client = Client::connect_with(opts, self.gateway.in_process())
            .await
            .map_err(|e| Box::new(refusal(&e)))?;
        // Durable deliveries are bounded by max_in_flight already;
        // transient ones are not, and are dropped past this much room.
        let (tx, deliveries) = mpsc::channel(max_in_flight as usize + TRANSIENT_WAITING_MAX);
        let (closing, closed) = watch::channel(());
        let handler = {
            let subscriptions = self.clone();
            let owner = token.clone();
            let next = Arc::new(AtomicU64::new(1));
            move |incoming: Incoming| {
                let subscriptions = subscriptions.clone();
                let owner = owner.clone();
                let tx = tx.clone();
                let mut closed = closed.clone();
                let n = next.fetch_add(1, Ordering::Relaxed);
                async move {
                    let delivery = format!("{}.{n}", id.simple());
                    let json = delivery_json(&delivery, &incoming);
                    let incoming = Arc::new(incoming);
                    if incoming.kind() == Kind::Command {
                        subscriptions.answerable(
                            &delivery,
                            Answerable {
                                owner: owner.clone(),
                                session: id,
                                incoming: incoming.clone(),
                                since: Instant::now(),
                            },
                        );
                    }
                    if incoming.message().transient {
                        // Nothing to settle: at most once, so a stream that
                        // does not keep up loses some.
                        if tx.try_send(Delivery { id: delivery, json }).is_err() {
                            debug!(session = %id, "transient delivery dropped: the stream is behind");
                        }
                        return Ok(());
                    }
                    let (settled, verdict) = oneshot::channel::<()>();
                    lock(&subscriptions.unsettled).insert(
                        delivery.clone(),
                        Unsettled {
                            owner,
                            session: id,
                            incoming,
                            _settled: settled,
                        },
                    );
                    let sent = tx.send(Delivery {
                        id: delivery.clone(),
                        json,
                    });
                    if sent.await.is_ok() {
                        // Settled over HTTP (the entry is gone), or the
                        // session closed: the broker then redelivers it
                        // when the connection has gone.
                        tokio::select! {
                            _ = verdict => {}
                            _ = closed.changed() => {}
                        }
                    }
                    subscriptions.release(&delivery);
                    Ok::<(), courier_client::Error>(())
                }
            }
        };
        if let Err(e) = client.on(&pattern, handler).await {
            client.shutdown().await;
            return Err(Box::new(refusal(&e)));
        }
        lock(&self.sessions).insert(
            id,
            Open {
                owner: token.clone(),
                client: client.clone(),
                _closing: closing,
            },
        );
        Ok(Session {
            id,
            pattern,
            service: client.service().to_string(),
            owner: token,
            client,
            auto_ack,
            deliveries,
            subscriptions: self.clone(),
        })
    }

    /// Forgets the session's unsettled deliveries (their handlers leave
    /// them to the broker) and closes its connection.
    fn forget(&self, session: Uuid) -> Option<Client> {
        // The deliveries first: a handler woken by the session's end must
        // find its own gone or still there, never settled behind it.
        lock(&self.unsettled).retain(|_, entry| {
            let keep = entry.session != session;
            if !keep {
                let _ = entry.incoming.abandon();
            }
            keep
        });
        lock(&self.answerable).retain(|_, entry| entry.session != session);
        let open = lock(&self.sessions).remove(&session);
        open.map(|open| open.client)
    }

    async fn close_now(&self, session: Uuid, owner: &Option<String>) {
        let owned = lock(&self.sessions)
            .get(&session)
            .is_some_and(|open| open.owner == *owner);
        if owned {
            if let Some(client) = self.forget(session) {
                client.shutdown().await;
            }
        }
    }
}

/// The session a delivery id (`<session>.<n>`) belongs to.
fn session_of(delivery: &str) -> Option<Uuid> {
    let (session, n) = delivery.split_once('.')?;
    n.parse::<u64>().ok()?;
    Uuid::parse_str(session).ok()
}

/// One HTTP client's subscription, open until dropped.
pub(crate) struct Session {
    pub(crate) id: Uuid,
    pub(crate) pattern: String,
    pub(crate) service: String,
    pub(crate) owner: Option<String>,
    client: Client,
    auto_ack: bool,
    deliveries: mpsc::Receiver<Delivery>,
    subscriptions: Arc<Subscriptions>,
}

/// A delivery as the HTTP client sees it.
pub(crate) struct Delivery {
    pub(crate) id: String,
    pub(crate) json: serde_json::Value,
}

impl Session {
    /// The next delivery; with `?ack=auto`, acked as it is taken.
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        let delivery = self.deliveries.recv().await?;
        if self.auto_ack {
            let _ = self
                .subscriptions
                .settle(&delivery.id, &self.owner, Settlement::Ack);
        }
        Some(delivery)
    }

    /// Settles a delivery of this session's caller.
    pub(crate) fn settle(
        &self,
        delivery: &str,
        settlement: Settlement,
    ) -> Result<(), Unsettleable> {
        self.subscriptions.settle(delivery, &self.owner, settlement)
    }

    /// Answers a command delivered to this session's caller.
    pub(crate) async fn reply<E>(
        &self,
        delivery: &str,
        outcome: &str,
        is_final: bool,
        build: impl FnOnce(MessageBuilder) -> Result<MessageBuilder, E>,
    ) -> Result<uuid::Uuid, Unanswerable<E>> {
        self.subscriptions
            .reply(delivery, &self.owner, outcome, is_final, build)
            .await
    }

    /// The session's bus connection, to send on.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The first event of a stream: the subscription is in place.
    pub(crate) fn subscribed_json(&self) -> serde_json::Value {
        serde_json::json!({
            "session": self.id.simple().to_string(),
            "service": self.service,
            "pattern": self.pattern,
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let (Some(client), Ok(runtime)) = (
            self.subscriptions.forget(self.id),
            tokio::runtime::Handle::try_current(),
        ) {
            // Drop cannot wait: the connection drains and closes on its own.
            runtime.spawn(async move { client.shutdown().await });
        }
    }
}

/// A delivery as JSON: the envelope, the payload as UTF-8 text or, when
/// it is not, base64 (`encoding` says which; the key likewise, with
/// `key_encoding`).
fn delivery_json(delivery: &str, incoming: &Incoming) -> serde_json::Value {
    let message = incoming.message();
    let (payload, encoding) = text_or_base64(&message.payload);
    let headers: serde_json::Map<String, serde_json::Value> = message
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut json = serde_json::json!({
        "delivery": delivery,
        "id": message.id.to_string(),
        "name": &*message.name,
        "kind": message.kind.as_str(),
        "version": message.version.to_string(),
        "sender": &*message.sender,
        "activity_id": message.activity_id.to_string(),
        "attempt": incoming.attempt(),
        "transient": message.transient,
        "headers": headers,
        "payload": payload,
        "encoding": encoding,
    });
    if let Some(key) = &message.key {
        let (key, key_encoding) = text_or_base64(key);
        json["key"] = key.into();
        if key_encoding != "utf-8" {
            json["key_encoding"] = key_encoding.into();
        }
    }
    json
}

fn text_or_base64(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), "utf-8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            "base64",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_name_their_session() {
        let session = Uuid::new_v4();
        let id = format!("{}.7", session.simple());
        assert_eq!(session_of(&id), Some(session));
        assert_eq!(session_of("nonsense"), None);
        assert_eq!(session_of(&format!("{}.x", session.simple())), None);
    }

    #[test]
    fn payloads_are_text_when_they_can_be() {
        assert_eq!(text_or_base64(b"{\"a\":1}"), ("{\"a\":1}".into(), "utf-8"));
        assert_eq!(text_or_base64(&[0xff, 0x00]), ("/wA=".into(), "base64"));
    }
}
