//! `GET /v1/ws`: the durable subscription of `/v1/subscribe` over a
//! WebSocket, settled by frames on the same socket, which also sends.
//!
//! Frames are JSON text. From the gateway: `subscribed` (first),
//! `delivery` (the same object as an SSE delivery's data, with
//! `"type": "delivery"`), `sent` (a send's message id) and `error`. From
//! the client: `ack`, `nack` (with an optional `delay` such as `"5s"`) and
//! `send` (a command or an event, by the tense of its name, as
//! `POST /v1/messages/{name}`), and `reply` (to a delivered command, as
//! `POST /v1/replies/{delivery}`), answered `replied`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as Frame, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use courier_client::MessageBuilder;
use serde_json::{json, Value};

use super::credentials::{bearer_protocol, with_browser_credentials};
use super::envelope::{is_event_name, parse_duration};
use super::sessions::{Session, Settlement, Subscriptions, Unanswerable, Unsettleable};

pub(crate) fn router(subscriptions: Arc<Subscriptions>) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .with_state(subscriptions)
}

/// Opens the session first, so that a refusal is an HTTP answer
/// (problem+json) rather than a socket closed for no stated reason. A
/// browser's token comes as the subprotocol `courier.bearer.<token>`
/// (echoed as the protocol chosen, as a browser requires of an offered
/// one) or as `?access_token=`.
async fn upgrade(
    State(subscriptions): State<Arc<Subscriptions>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let protocol = bearer_protocol(&headers).map(str::to_string);
    let headers = match with_browser_credentials(headers, &query) {
        Ok(headers) => headers,
        Err(refused) => return *refused,
    };
    let upgrade = match protocol {
        Some(protocol) => upgrade.protocols([protocol]),
        None => upgrade,
    };
    match subscriptions.open(peer, &headers, &query).await {
        Ok(session) => upgrade.on_upgrade(move |socket| run(socket, session)),
        Err(refused) => *refused,
    }
}

async fn run(mut socket: WebSocket, mut session: Session) {
    let mut subscribed = session.subscribed_json();
    subscribed["type"] = "subscribed".into();
    if socket
        .send(Frame::Text(subscribed.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let out = tokio::select! {
            delivery = session.next() => {
                let Some(delivery) = delivery else { return };
                let mut json = delivery.json;
                json["type"] = "delivery".into();
                json
            }
            frame = socket.recv() => match frame {
                Some(Ok(Frame::Text(text))) => match answer(&session, text.as_str()).await {
                    Some(out) => out,
                    None => continue,
                },
                Some(Ok(Frame::Binary(_))) => error(None, "frames are JSON text"),
                Some(Ok(_)) => continue,
                // Closed or broken: the session ends, and the broker
                // redelivers what it left unsettled.
                Some(Err(_)) | None => return,
            },
        };
        if socket
            .send(Frame::Text(out.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
}

fn error(reference: Option<&Value>, detail: &str) -> Value {
    let mut out = json!({ "type": "error", "detail": detail });
    if let Some(reference) = reference {
        out["ref"] = reference.clone();
    }
    out
}

/// What a client frame asks, done; the frame to answer with, if any.
async fn answer(session: &Session, text: &str) -> Option<Value> {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        return Some(error(
            None,
            "frames are JSON objects with a \"type\": ack, nack, send or reply",
        ));
    };
    let reference = frame.get("ref");
    let delivery = frame.get("delivery").and_then(Value::as_str);
    match (frame.get("type").and_then(Value::as_str), delivery) {
        (Some("ack"), Some(delivery)) => settle(session, delivery, Settlement::Ack, reference),
        (Some("nack"), Some(delivery)) => {
            let delay = match frame.get("delay") {
                None => Duration::ZERO,
                Some(delay) => match delay.as_str().and_then(parse_duration) {
                    Some(delay) => delay,
                    None => {
                        return Some(error(
                            reference,
                            "\"delay\" takes a duration, such as \"500ms\", \"5s\" or \"2m\"",
                        ))
                    }
                },
            };
            settle(session, delivery, Settlement::Nack(delay), reference)
        }
        (Some("ack" | "nack"), None) => Some(error(
            reference,
            "name the delivery to settle: {\"type\": \"ack\", \"delivery\": \"<the delivery's id>\"}",
        )),
        (Some("send"), _) => Some(send(session, &frame).await),
        (Some("reply"), Some(delivery)) => Some(reply(session, delivery, &frame).await),
        (Some("reply"), None) => Some(error(
            reference,
            "name the command to answer: {\"type\": \"reply\", \"delivery\": \"<the delivery's id>\", \"outcome\": \"todo.created\", \"payload\": …}",
        )),
        _ => Some(error(
            reference,
            "a frame's \"type\" is ack, nack, send or reply",
        )),
    }
}

fn settle(
    session: &Session,
    delivery: &str,
    settlement: Settlement,
    reference: Option<&Value>,
) -> Option<Value> {
    match session.settle(delivery, settlement) {
        Ok(()) => None,
        Err(Unsettleable::Unknown) => Some(error(
            reference,
            &format!(
                "no delivery '{delivery}' awaits a verdict on this socket: it was settled already"
            ),
        )),
    }
}

/// A `send` frame: `{"type": "send", "name", "payload", "encoding"?,
/// "key"?, "id"?, "ref"?}`. A string payload is sent as its text (or, with
/// `"encoding": "base64"`, as the bytes it encodes); any other JSON value
/// as JSON.
async fn send(session: &Session, frame: &Value) -> Value {
    let reference = frame.get("ref");
    let Some(name) = frame.get("name").and_then(Value::as_str) else {
        return error(
            reference,
            "a send names its message: \"name\": \"todo.created\"",
        );
    };
    let client = session.client();
    let mut builder = if is_event_name(name) {
        client.event(name)
    } else {
        client.command(name)
    };
    builder = match with_payload_and_id(builder, frame) {
        Ok(builder) => builder,
        Err(detail) => return error(reference, detail),
    };
    if let Some(key) = frame.get("key").and_then(Value::as_str) {
        builder = builder.key(key.as_bytes().to_vec());
    }
    match builder.send().await {
        Ok(id) => {
            let mut out = json!({ "type": "sent", "id": id.to_string() });
            if let Some(reference) = reference {
                out["ref"] = reference.clone();
            }
            out
        }
        Err(e) => error(reference, &e.to_string()),
    }
}

/// A frame's `payload` (a string as its text, or with `"encoding":
/// "base64"` the bytes it encodes; any other JSON value as JSON) and `id`.
fn with_payload_and_id(
    mut builder: MessageBuilder,
    frame: &Value,
) -> Result<MessageBuilder, &'static str> {
    let base64 = frame.get("encoding").and_then(Value::as_str) == Some("base64");
    builder = match frame.get("payload") {
        None => builder,
        Some(Value::String(text)) if base64 => {
            match base64::engine::general_purpose::STANDARD.decode(text) {
                Ok(bytes) => builder.payload(bytes),
                Err(_) => return Err("\"payload\" is not valid base64"),
            }
        }
        Some(Value::String(text)) => builder.payload(text.clone()),
        Some(json) => builder
            .header("content-type", "application/json")
            .payload(json.to_string()),
    };
    if let Some(id) = frame.get("id").and_then(Value::as_str) {
        match uuid::Uuid::parse_str(id) {
            Ok(id) => builder = builder.id(id),
            Err(_) => return Err("\"id\" is a UUID, for dedup on retries"),
        }
    }
    Ok(builder)
}

/// A `reply` frame: `{"type": "reply", "delivery", "outcome", "payload",
/// "encoding"?, "final"?, "id"?, "ref"?}`, answered `{"type": "replied",
/// "id", "final"}`. `"final": false` sends one of a stream of replies,
/// more to follow; the final reply (the default) also acks the delivery.
async fn reply(session: &Session, delivery: &str, frame: &Value) -> Value {
    let reference = frame.get("ref");
    let Some(outcome) = frame.get("outcome").and_then(Value::as_str) else {
        return error(
            reference,
            "a reply names its outcome: \"outcome\": \"todo.created\"",
        );
    };
    let is_final = match frame.get("final") {
        None => true,
        Some(Value::Bool(is_final)) => *is_final,
        Some(_) => {
            return error(
                reference,
                "\"final\" is true (the last reply, the default) or false (more follow)",
            )
        }
    };
    let sent = session
        .reply(delivery, outcome, is_final, |builder| {
            with_payload_and_id(builder, frame)
        })
        .await;
    match sent {
        Ok(id) => {
            let mut out = json!({ "type": "replied", "id": id.to_string(), "final": is_final });
            if let Some(reference) = reference {
                out["ref"] = reference.clone();
            }
            out
        }
        Err(Unanswerable::Unknown) => error(
            reference,
            &format!(
                "no command delivery '{delivery}' awaits a reply on this socket: it is not a command, or its final reply was sent"
            ),
        ),
        Err(Unanswerable::Unbuildable(detail)) => error(reference, detail),
        Err(Unanswerable::Refused(e)) => error(reference, &e.to_string()),
    }
}
