//! Sending over HTTP: `POST /v1/messages/{name}` (a command or an
//! event), `POST /v1/requests/{name}` (a command answered by its replies,
//! at once, later by polling, or to a webhook) and `GET
//! /v1/requests/{id}` (an asynchronous request's state).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use courier_client::Error as ClientError;
use serde::Serialize;
use uuid::Uuid;

use super::envelope::{
    envelope, is_event_name, parse_duration, refusal, EnvelopeHeaders, SendRefusals,
};
use super::{bearer, insert, json_answer, lock, webhook, Gateway};
use crate::http::problem;

/// Longest `?timeout=` a request may ask for.
const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// Timeout of a request that names none.
const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Requests sent with `Prefer: respond-async`, kept for
/// [`ASYNC_RETENTION`] after they end, and at most [`ASYNC_REQUESTS_MAX`]
/// of them (the oldest go first).
#[derive(Default)]
pub(super) struct AsyncRequests {
    by_id: HashMap<Uuid, AsyncRequest>,
    order: std::collections::VecDeque<Uuid>,
}

struct AsyncRequest {
    /// The service whose token asked: only it may poll.
    owner: Option<String>,
    status: &'static str,
    replies: Vec<ReplyJson>,
    ended_at: Option<std::time::Instant>,
}

/// How long a finished asynchronous request stays to be polled.
const ASYNC_RETENTION: Duration = Duration::from_secs(600);
/// Asynchronous requests kept at most.
const ASYNC_REQUESTS_MAX: usize = 10_000;

impl AsyncRequests {
    fn insert(&mut self, id: Uuid, owner: Option<String>) {
        let now = std::time::Instant::now();
        while let Some(oldest) = self.order.front().copied() {
            let expired = self
                .by_id
                .get(&oldest)
                .and_then(|r| r.ended_at)
                .is_some_and(|t| now.duration_since(t) > ASYNC_RETENTION);
            if !expired && self.order.len() < ASYNC_REQUESTS_MAX {
                break;
            }
            self.order.pop_front();
            self.by_id.remove(&oldest);
        }
        self.order.push_back(id);
        self.by_id.insert(
            id,
            AsyncRequest {
                owner,
                status: "pending",
                replies: Vec::new(),
                ended_at: None,
            },
        );
    }
}

/// `202` to a message sent or published.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Accepted {
    /// The message's id (the `Courier-Id` sent, or one chosen for it).
    #[schema(format = "uuid")]
    pub(super) id: String,
    /// Where the broker's log holds it (its seq there); null for what the
    /// log does not keep: a transient message, or a duplicate of an
    /// earlier send.
    #[schema(minimum = 1)]
    pub(super) seq: Option<u64>,
}

/// `202` to a request sent with `Prefer: respond-async`.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AsyncAccepted {
    #[schema(format = "uuid")]
    id: String,
    /// Always `pending`.
    status: &'static str,
    /// Where to poll: `/v1/requests/{id}`.
    location: String,
}

/// An asynchronous request's state.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AsyncStatus<'a> {
    #[schema(format = "uuid")]
    id: String,
    /// pending, done or expired.
    status: &'static str,
    replies: &'a [ReplyJson],
}

/// One reply, as a line of a stream or in an asynchronous request's state.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ReplyJson {
    #[schema(format = "uuid")]
    id: String,
    /// The outcome: the reply's name.
    name: String,
    /// The service that answered.
    sender: String,
    /// Whether this reply ends the request.
    #[serde(rename = "final")]
    #[schema(rename = "final")]
    is_final: bool,
    /// The payload, inline when it is JSON, else as text.
    payload: serde_json::Value,
}

/// `POST /v1/messages/{name}`: a command sent, or an event published
/// (names in the past tense are events, as on the bus).
///
/// The answer is `{"id", "seq"}`: the seq is the broker's log position of
/// the message, from the bus's acknowledgement (SEND_RESULT's `log_seq`).
#[utoipa::path(
    post,
    path = "/v1/messages/{name}",
    tag = "gateway",
    params(
        ("name" = String, Path, description = "The message's name; names in the past tense (todo.created) are published as events, others sent as commands", pattern = r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$", max_length = 255),
        EnvelopeHeaders,
    ),
    request_body(description = "The payload, its Content-Type kept in the message's headers", content(
        (serde_json::Value = "application/json"),
        (String = "application/octet-stream"),
    )),
    responses(
        (status = 202, description = "The broker accepted the message (a durable one is fsynced)", body = Accepted),
        (status = 400, description = "A bad name, envelope header or message", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))),
        SendRefusals,
        (status = 404, description = "No service receives this command", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "no_receiver"))),
        (status = 429, description = "The service is over its send rate", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "rate_limited"))),
        (status = 504, description = "The broker did not answer in time", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn post_message(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = match gateway.client(peer, &headers).await {
        Ok(client) => client,
        Err(refused) => return *refused,
    };
    let builder = if is_event_name(&name) {
        client.event(name)
    } else {
        client.command(name)
    };
    let builder = match envelope(builder, &headers, body) {
        Ok(builder) => builder,
        Err(refused) => return *refused,
    };
    match builder.send_receipt().await {
        Ok(receipt) => json_answer(
            StatusCode::ACCEPTED,
            &Accepted {
                id: receipt.id.to_string(),
                seq: receipt.seq,
            },
        ),
        Err(e) => refusal(&e),
    }
}

/// `POST /v1/requests/{name}?timeout=…`: a command sent, answered with
/// its final reply.
#[utoipa::path(
    post,
    path = "/v1/requests/{name}",
    tag = "gateway",
    params(
        ("name" = String, Path, description = "The command's name", pattern = r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$", max_length = 255),
        ("timeout" = Option<String>, Query, description = "How long to wait for the final reply: 1ms to 300s, such as 500ms or 5s (default 30s)", pattern = r"^([1-9][0-9]{0,4}(ms)?|[1-9][0-9]?s|[12][0-9]{2}s|300s|[1-5]m)$"),
        ("Prefer" = Option<String>, Header, nullable = false, description = "respond-async: answer 202 at once, with a Location to poll"),
        EnvelopeHeaders,
    ),
    request_body(description = "The payload, its Content-Type kept in the message's headers", content(
        (serde_json::Value = "application/json"),
        (String = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "The final reply: its payload as the body (its own content type), its envelope in headers; or, for a stream of replies, one JSON reply a line as they come", content(
            (serde_json::Value = "*/*"),
            (ReplyJson = "application/x-ndjson"),
        ), headers(
            ("Courier-Outcome" = String, description = "The reply's name"),
            ("Courier-Id" = String, description = "The reply's id"),
            ("Courier-Sender" = String, description = "The service that answered"),
            ("Courier-Version" = String, description = "The reply's schema version"),
        )),
        (status = 202, description = "With Prefer: respond-async: sent; poll the Location", body = AsyncAccepted, headers(("Location" = String, description = "/v1/requests/{id}"))),
        (status = 400, description = "A bad name, timeout, envelope header or message", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))),
        SendRefusals,
        (status = 404, description = "No service receives this command", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "no_receiver"))),
        (status = 429, description = "The service is over its send rate", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "rate_limited"))),
        (status = 504, description = "No final reply within the timeout", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn post_request(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let timeout = match query.get("timeout").map(|t| parse_duration(t)) {
        None => REQUEST_TIMEOUT_DEFAULT,
        Some(Some(t)) if t > Duration::ZERO && t <= REQUEST_TIMEOUT_MAX => t,
        Some(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "?timeout= takes a duration from 1ms to 300s, such as 500ms or 5s",
            )
        }
    };
    let reply_to = match webhook::reply_to(&headers) {
        Ok(reply_to) => reply_to,
        Err(refused) => return *refused,
    };
    let client = match gateway.client(peer, &headers).await {
        Ok(client) => client,
        Err(refused) => return *refused,
    };
    let builder = match envelope(client.command(name), &headers, body) {
        Ok(builder) => builder.timeout(timeout),
        Err(refused) => return *refused,
    };
    let respond_async = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "respond-async"));
    // Answered later: a refusal must come now, before the 202. Answered
    // now: a refusal comes as the first reply would, without a wake-up
    // for the acceptance between.
    let started = if reply_to.is_some() || respond_async {
        builder.request_stream().await
    } else {
        builder.request_stream_now()
    };
    let mut stream = match started {
        Ok(stream) => stream,
        Err(e) => return refusal(&e),
    };
    if let Some(target) = reply_to {
        let id = stream.command_id();
        let secret = gateway.shared.webhook_key.secret(client.service());
        webhook::deliver(stream, target, secret, gateway.shared.webhooks.clone());
        return (
            StatusCode::ACCEPTED,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "id": id.to_string(), "status": "pending" }).to_string(),
        )
            .into_response();
    }
    if respond_async {
        let id = stream.command_id();
        let owner = bearer(&headers).map(str::to_string);
        lock(&gateway.asynchronous).insert(id, owner);
        let gateway = gateway.clone();
        tokio::spawn(async move {
            loop {
                let next = stream.next_reply().await;
                let mut requests = lock(&gateway.asynchronous);
                let Some(entry) = requests.by_id.get_mut(&id) else {
                    return;
                };
                match next {
                    Some(Ok(reply)) => {
                        entry.replies.push(reply_json(&reply));
                        if reply.is_final() {
                            entry.status = "done";
                        }
                    }
                    Some(Err(_)) | None => {
                        if entry.status == "pending" {
                            entry.status = "expired";
                        }
                    }
                }
                if entry.status != "pending" {
                    entry.ended_at = Some(std::time::Instant::now());
                    return;
                }
            }
        });
        let location = format!("/v1/requests/{id}");
        let mut response = json_answer(
            StatusCode::ACCEPTED,
            &AsyncAccepted {
                id: id.to_string(),
                status: "pending",
                location: location.clone(),
            },
        );
        insert(response.headers_mut(), header::LOCATION, &location);
        return response;
    }
    let first = match stream.next_reply().await {
        Some(Ok(reply)) => reply,
        Some(Err(ClientError::Timeout(_))) | None => return no_reply(timeout),
        Some(Err(e)) => return refusal(&e),
    };
    if first.is_final() {
        return reply_response(&first);
    }
    // A stream: every reply as one JSON line, while they come.
    let lines =
        futures_util::stream::unfold((Some(first), Some(stream)), |(first, stream)| async move {
            if let Some(reply) = first {
                let last = reply.is_final();
                return Some((
                    ndjson_line(&reply_json(&reply)),
                    (None, stream.filter(|_| !last)),
                ));
            }
            let mut stream = stream?;
            match stream.next_reply().await {
                Some(Ok(reply)) => {
                    let line = ndjson_line(&reply_json(&reply));
                    let rest = (!reply.is_final()).then_some(stream);
                    Some((line, (None, rest)))
                }
                Some(Err(e)) => {
                    let line = ndjson_line(&serde_json::json!({ "error": e.to_string() }));
                    Some((line, (None, None)))
                }
                None => None,
            }
        });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// `GET /v1/requests/{id}`: an asynchronous request's status
/// (pending, done or expired) and its replies so far.
#[utoipa::path(
    get,
    // The same route as the POST (OpenAPI allows one template per
    // route): here `{name}` is the request's id.
    path = "/v1/requests/{name}",
    tag = "gateway",
    params(("name" = String, Path, format = "uuid", description = "The request's id, from the Location of its 202")),
    responses(
        (status = 200, description = "Its status and replies so far", body = AsyncStatus),
        (status = 400, description = "Not a UUID", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No token, or one the manifest does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "An admin token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such request of this service (or it ended over 10 minutes ago)", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The bus connection could not be opened", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn get_request(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    // The same credentials as the request's own.
    if let Err(refused) = gateway.client(peer, &headers).await {
        return *refused;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "a request id is a UUID, as in the Location of its 202 answer",
        );
    };
    let owner = bearer(&headers).map(str::to_string);
    let requests = lock(&gateway.asynchronous);
    match requests.by_id.get(&id) {
        Some(entry) if entry.owner == owner => json_answer(
            StatusCode::OK,
            &AsyncStatus {
                id: id.to_string(),
                status: entry.status,
                replies: &entry.replies,
            },
        ),
        _ => problem(
            StatusCode::NOT_FOUND,
            "no such request: it was never sent with 'Prefer: respond-async' by this service, or it ended more than 10 minutes ago",
        ),
    }
}

fn no_reply(timeout: Duration) -> Response {
    problem(
        StatusCode::GATEWAY_TIMEOUT,
        &format!("no reply within {timeout:?}; ask again with a longer ?timeout="),
    )
}

/// A reply as JSON: its payload inline when it is JSON, else as text.
fn reply_json(reply: &courier_client::Reply) -> ReplyJson {
    let message = reply.message();
    let payload =
        serde_json::from_slice::<serde_json::Value>(&message.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
    ReplyJson {
        id: message.id.to_string(),
        name: message.name.to_string(),
        sender: message.sender.to_string(),
        is_final: message.is_final,
        payload,
    }
}

fn ndjson_line(value: &impl Serialize) -> Result<Bytes, std::convert::Infallible> {
    let mut line = serde_json::to_string(value)
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
    line.push('\n');
    Ok(Bytes::from(line))
}

/// A message's payload type, as its sender gave it.
pub(super) fn content_type(message: &courier_client::proto::Message) -> &str {
    message
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .unwrap_or("application/octet-stream")
}

/// The final reply: its payload as the body, its envelope in headers.
fn reply_response(reply: &courier_client::Reply) -> Response {
    let message = reply.message();
    let mut response = (StatusCode::OK, message.payload.clone()).into_response();
    let out = response.headers_mut();
    insert(out, header::CONTENT_TYPE, content_type(message));
    insert(
        out,
        HeaderName::from_static("courier-outcome"),
        &message.name,
    );
    insert(
        out,
        HeaderName::from_static("courier-id"),
        &message.id.to_string(),
    );
    insert(
        out,
        HeaderName::from_static("courier-sender"),
        &message.sender,
    );
    insert(
        out,
        HeaderName::from_static("courier-version"),
        &message.version.to_string(),
    );
    response
}
