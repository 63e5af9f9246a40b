//! The HTTP gateway: services in any language send, publish and request
//! over plain HTTP on the broker's HTTP port.
//!
//! The gateway speaks to the broker core through the same path bus
//! clients use: one SDK connection per authenticated service, over
//! loopback to the bus listener. Authentication, manifest rules, limits
//! and dedup are therefore the bus's own, not a second copy of them.

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
use courier_client::{Client, ClientOptions, Error as ClientError, ErrorCode, MessageBuilder};
use courier_manifest::Identity;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::http::problem;
use crate::Shared;

mod subscribe;
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
    clients: Mutex<HashMap<Option<String>, Client>>,
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
    replies: Vec<serde_json::Value>,
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
        clients: Mutex::new(HashMap::new()),
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
        if self.shared.tls.is_some() {
            return Err(Box::new(problem(
                StatusCode::NOT_IMPLEMENTED,
                "the HTTP gateway needs a plaintext bus listener; this broker's bus port speaks TLS only",
            )));
        }
        let token = bearer(headers).map(str::to_string);
        let manifest = self.shared.core().manifest().cloned();
        match (&manifest, &token) {
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
            token.clone()
        } else {
            None
        };
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let service = if key.is_some() { "" } else { ANONYMOUS_SERVICE };
        let mut opts = ClientOptions::new(self.bus.to_string(), service);
        opts.token = key.clone();
        opts.instance = "http-gateway".to_string();
        let client = Client::connect(opts)
            .await
            .map_err(|e| Box::new(refusal(&e)))?;
        clients.insert(key, client.clone());
        Ok(client)
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
async fn post_message(
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
    match builder.send().await {
        Ok(id) => (
            StatusCode::ACCEPTED,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "id": id.to_string() }).to_string(),
        )
            .into_response(),
        Err(e) => refusal(&e),
    }
}

/// `POST /v1/requests/{name}?timeout=…`: a command sent, answered with
/// its final reply.
async fn post_request(
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
    let mut stream = match builder.request_stream().await {
        Ok(stream) => stream,
        Err(e) => return refusal(&e),
    };
    if let Some(target) = reply_to {
        let id = stream.command_id();
        let secret = webhook::webhook_secret(bearer(&headers).unwrap_or_default());
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
        return (
            StatusCode::ACCEPTED,
            [
                (header::LOCATION, location.clone()),
                (header::CONTENT_TYPE, "application/json".to_string()),
            ],
            serde_json::json!({ "id": id.to_string(), "status": "pending", "location": location })
                .to_string(),
        )
            .into_response();
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
async fn get_request(
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
        Some(entry) if entry.owner == owner => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({
                "id": id.to_string(),
                "status": entry.status,
                "replies": entry.replies,
            })
            .to_string(),
        )
            .into_response(),
        _ => problem(
            StatusCode::NOT_FOUND,
            "no such request: it was never sent with 'Prefer: respond-async' by this service, or it ended more than 10 minutes ago",
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
fn reply_json(reply: &courier_client::Reply) -> serde_json::Value {
    let message = reply.message();
    let payload =
        serde_json::from_slice::<serde_json::Value>(&message.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
    serde_json::json!({
        "id": message.id.to_string(),
        "name": &*message.name,
        "sender": &*message.sender,
        "final": message.is_final,
        "payload": payload,
    })
}

fn ndjson_line(value: &serde_json::Value) -> Result<Bytes, std::convert::Infallible> {
    let mut line = value.to_string();
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
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
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
