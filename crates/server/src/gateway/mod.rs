//! The HTTP gateway: services in any language send, publish and request
//! over plain HTTP on the broker's HTTP port.
//!
//! The gateway speaks to the broker core through the same path bus
//! clients use: one SDK connection per authenticated service, served by
//! the bus's own connection code over an in-memory pipe (no loopback
//! socket). Authentication, manifest rules, limits and dedup are
//! therefore the bus's own, not a second copy of them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use courier_client::{
    BoxRead, BoxWrite, Client, ClientOptions, Connector, Error as ClientError, ErrorCode,
    MessageBuilder,
};
use courier_manifest::Identity;
use serde::Serialize;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::http::problem;
use crate::Shared;

pub(crate) mod subscribe;
pub(crate) mod webhook;
mod ws;

/// The service an unauthenticated loopback caller acts for when the
/// broker runs without a manifest.
pub(crate) const ANONYMOUS_SERVICE: &str = "http";

/// Longest `?timeout=` a request may ask for.
const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// Timeout of a request that names none.
const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

pub(crate) struct Gateway {
    shared: Arc<Shared>,
    bus: SocketAddr,
    /// One bus connection per credential presented (token, or none).
    clients: std::sync::Mutex<HashMap<Option<String>, Client>>,
    /// Held while a bus connection is being opened, so one credential
    /// gets one connection however many requests arrive at once.
    connecting: Mutex<()>,
    /// Requests answered asynchronously, kept for polling.
    asynchronous: std::sync::Mutex<AsyncRequests>,
}

/// Requests sent with `Prefer: respond-async`, kept for
/// [`ASYNC_RETENTION`] after they end, and at most [`ASYNC_REQUESTS_MAX`]
/// of them (the oldest go first).
#[derive(Default)]
struct AsyncRequests {
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
    id: String,
    /// Where the broker's log holds it (its seq there); null for what the
    /// log does not keep: a transient message, or a duplicate of an
    /// earlier send.
    #[schema(minimum = 1)]
    seq: Option<u64>,
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

/// The envelope headers of a message: one list for both operations.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // described; read from the HeaderMap by `envelope`
pub(crate) struct EnvelopeHeaders {
    /// Partition key: messages with the same key are delivered in order.
    #[param(
        nullable = false,
        rename = "Courier-Key",
        pattern = r"^[\x20-\x7e]*$",
        max_length = 255
    )]
    courier_key: Option<String>,
    /// The message's id (a UUID); a retry with the same id is deduplicated.
    #[param(nullable = false, rename = "Courier-Id", format = "uuid")]
    courier_id: Option<String>,
    /// Time to live, such as 30s or 1500ms (the document asks for 1s or
    /// more: a shorter one may run out before the broker has the message).
    #[param(
        nullable = false,
        rename = "Courier-TTL",
        pattern = r"^([1-9][0-9]{0,5}(s|m)|[1-9][0-9]{3,5}(ms)?)$"
    )]
    courier_ttl: Option<String>,
    /// Deliver no sooner than this, such as 5s.
    #[param(
        nullable = false,
        rename = "Courier-Delay",
        pattern = r"^[0-9]{1,6}(ms|s|m)?$"
    )]
    courier_delay: Option<String>,
    /// The payload's schema version, MAJOR.MINOR.
    #[param(
        nullable = false,
        rename = "Courier-Version",
        pattern = r"^[0-9]{1,4}(\.[0-9]{1,4})?$"
    )]
    courier_version: Option<String>,
    /// true: at most once, memory only.
    #[param(nullable = false, rename = "Courier-Transient")]
    courier_transient: Option<bool>,
}

/// The gateway's routes, with their state applied.
pub(crate) fn router(shared: Arc<Shared>, mut bus: SocketAddr) -> Router {
    // A broker listening on every address is reached over loopback.
    if bus.ip().is_unspecified() {
        bus.set_ip(match bus {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let gateway = Arc::new(Gateway {
        shared,
        bus,
        clients: std::sync::Mutex::new(HashMap::new()),
        connecting: Mutex::new(()),
        asynchronous: std::sync::Mutex::new(AsyncRequests::default()),
    });
    let subscriptions = subscribe::Subscriptions::new(gateway.clone());
    Router::new()
        .route("/v1/messages/{name}", post(post_message))
        .route("/v1/requests/{name}", post(post_request).get(get_request))
        .with_state(gateway.clone())
        .merge(subscribe::router(subscriptions.clone()))
        .merge(ws::router(subscriptions))
}

impl Gateway {
    /// The bus connection of the caller's service, opened on first use.
    async fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<Client, Box<Response>> {
        let token = bearer(headers);
        // Without a manifest file none is ever loaded: no need for the
        // core's lock to learn so on every request.
        let manifest = match self.shared.config.manifest_path {
            None => None,
            Some(_) => self.shared.core().manifest().cloned(),
        };
        match (&manifest, token) {
            (None, _) if !(peer.ip().is_loopback() || self.shared.config.insecure) => {
                return Err(Box::new(problem(
                    StatusCode::FORBIDDEN,
                    "without a manifest the HTTP gateway answers loopback clients only; start the broker with --manifest and send a service token",
                )));
            }
            (Some(_), None) => {
                return Err(Box::new(problem(
                    StatusCode::UNAUTHORIZED,
                    "send the token of a service of the manifest as 'Authorization: Bearer <token>'",
                )));
            }
            (Some(manifest), Some(token)) => match manifest.authenticate_token(token) {
                Some(Identity::Service(_)) => {}
                Some(Identity::Admin) => {
                    return Err(Box::new(problem(
                        StatusCode::FORBIDDEN,
                        "this is an [admin] token; the gateway acts for a service: send that service's token",
                    )));
                }
                None => {
                    return Err(Box::new(problem(
                        StatusCode::UNAUTHORIZED,
                        "this token is in no entry of the manifest; send the token of a service listed in it",
                    )));
                }
            },
            _ => {}
        }
        let key = if manifest.is_some() {
            token.map(str::to_string)
        } else {
            None
        };
        if let Some(client) = lock(&self.clients).get(&key) {
            return Ok(client.clone());
        }
        let _connecting = self.connecting.lock().await;
        if let Some(client) = lock(&self.clients).get(&key) {
            return Ok(client.clone());
        }
        let service = if key.is_some() { "" } else { ANONYMOUS_SERVICE };
        let mut opts = ClientOptions::new(self.bus.to_string(), service);
        opts.token = key.clone();
        opts.instance = "http-gateway".to_string();
        let client = Client::connect_with(opts, self.in_process())
            .await
            .map_err(|e| Box::new(refusal(&e)))?;
        lock(&self.clients).insert(key, client.clone());
        Ok(client)
    }

    /// Bus connections through the broker's own connection code, in memory:
    /// whatever the bus port speaks (plaintext or TLS only), the gateway's
    /// connections need neither a socket nor a certificate.
    pub(super) fn in_process(&self) -> Connector {
        let shared = self.shared.clone();
        let peer = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
        Connector::new(move || {
            let pipe = crate::connect_in_process(&shared, peer);
            Box::pin(async move {
                let (reader, writer) = tokio::io::split(pipe?);
                Ok((Box::pin(reader) as BoxRead, Box::pin(writer) as BoxWrite))
            })
        })
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
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
        (status = 401, description = "No token, or one the manifest does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not allowed: by the manifest, an admin token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))),
        (status = 404, description = "No service receives this command", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "no_receiver"))),
        (status = 413, description = "The payload is over the broker's limit", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "payload_too_large"))),
        (status = 429, description = "The service is over its send rate", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "rate_limited"))),
        (status = 502, description = "Another refusal by the broker", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code"))),
        (status = 503, description = "The broker cannot take it now (disk failing, shutting down, connection lost)", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))),
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
        (status = 401, description = "No token, or one the manifest does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not allowed: by the manifest, an admin token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))),
        (status = 404, description = "No service receives this command", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "no_receiver"))),
        (status = 413, description = "The payload is over the broker's limit", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "payload_too_large"))),
        (status = 429, description = "The service is over its send rate", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "rate_limited"))),
        (status = 502, description = "Another refusal by the broker", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code"))),
        (status = 503, description = "The broker cannot take it now", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))),
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

fn json_answer(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => (status, [(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the answer could not be encoded: {e}"),
        ),
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// The final reply: its payload as the body, its envelope in headers.
fn reply_response(reply: &courier_client::Reply) -> Response {
    let message = reply.message();
    let mut response = (StatusCode::OK, message.payload.clone()).into_response();
    let out = response.headers_mut();
    let content_type = message
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .unwrap_or("application/octet-stream");
    insert(out, header::CONTENT_TYPE, content_type);
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

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// The envelope options of a message from its HTTP headers.
fn envelope(
    mut builder: MessageBuilder,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<MessageBuilder, Box<Response>> {
    let text = |name: &str| -> Result<Option<&str>, Box<Response>> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v.to_str().map(Some).map_err(|_| {
                Box::new(problem(
                    StatusCode::BAD_REQUEST,
                    &format!("header {name} must be visible ASCII"),
                ))
            }),
        }
    };
    let bad = |detail: String| Box::new(problem(StatusCode::BAD_REQUEST, &detail));
    if let Some(content_type) = text("content-type")? {
        builder = builder.header("content-type", content_type);
    }
    if let Some(key) = text("courier-key")? {
        builder = builder.key(key.as_bytes().to_vec());
    }
    if let Some(id) = text("courier-id")? {
        let id = Uuid::parse_str(id).map_err(|_| {
            bad(format!(
                "Courier-Id must be a UUID, such as {}",
                Uuid::now_v7()
            ))
        })?;
        builder = builder.id(id);
    }
    if let Some(ttl) = text("courier-ttl")? {
        let ttl = parse_duration(ttl)
            .ok_or_else(|| bad("Courier-TTL takes a duration, such as 30s or 500ms".into()))?;
        builder = builder.ttl(ttl);
    }
    if let Some(delay) = text("courier-delay")? {
        let delay = parse_duration(delay)
            .ok_or_else(|| bad("Courier-Delay takes a duration, such as 30s or 500ms".into()))?;
        builder = builder.deliver_after(delay);
    }
    if let Some(version) = text("courier-version")? {
        let version = version
            .parse()
            .map_err(|_| bad("Courier-Version takes MAJOR.MINOR, such as 1.0".into()))?;
        builder = builder.version(version);
    }
    if let Some(transient) = text("courier-transient")? {
        match transient {
            "true" | "1" => builder = builder.transient(),
            "false" | "0" => {}
            _ => return Err(bad("Courier-Transient takes true or false".into())),
        }
    }
    Ok(builder.payload(body))
}

/// Events are named in the past tense (`todo.created`), as the bus's own
/// CLI tells them from commands.
fn is_event_name(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    last.ends_with("ed")
}

/// `500ms`, `5s`, `2m`, or a bare number of milliseconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "ms"),
    };
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

/// A broker refusal as problem+json, carrying the broker's code and reason.
fn refusal(error: &ClientError) -> Response {
    let (status, code) = match error {
        ClientError::Refused { code, .. } => (status_of(*code), Some(*code)),
        ClientError::Name(_) | ClientError::Encode(_) => (StatusCode::BAD_REQUEST, None),
        ClientError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, None),
        _ => (StatusCode::SERVICE_UNAVAILABLE, None),
    };
    let mut response = problem(status, &error.to_string());
    if let Some(code) = code {
        insert(
            response.headers_mut(),
            HeaderName::from_static("courier-error"),
            code.as_str(),
        );
    }
    response
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::FORBIDDEN,
        ErrorCode::PayloadTooLarge | ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited | ErrorCode::StreamFull => StatusCode::TOO_MANY_REQUESTS,
        // A reply to a requester that no longer awaits replies.
        ErrorCode::UnknownRequest => StatusCode::GONE,
        ErrorCode::NoReceiver => StatusCode::NOT_FOUND,
        ErrorCode::InvalidName
        | ErrorCode::InvalidMessage
        | ErrorCode::InvalidPattern
        | ErrorCode::Expired => StatusCode::BAD_REQUEST,
        ErrorCode::StorageFailed | ErrorCode::ShuttingDown | ErrorCode::TooManyConnections => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_GATEWAY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_bare_milliseconds() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5h"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn past_tense_names_are_events() {
        assert!(is_event_name("todo.created"));
        assert!(!is_event_name("todo.create"));
    }
}
