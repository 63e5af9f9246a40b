//! Durable subscriptions over HTTP, the routes: Server-Sent Events at
//! `GET /v1/subscribe`, settled by `POST /v1/acks/{delivery}` and
//! `POST /v1/nacks/{delivery}`, and commands answered by
//! `POST /v1/replies/{delivery}` (the sessions behind them are
//! `sessions.rs`; the WebSocket flavour is `ws.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::bearer;
use super::credentials::with_browser_credentials;
use super::envelope::{envelope, parse_duration, refusal, SendRefusals};
use super::json_answer;
use super::requests::Accepted;
use super::sessions::{Settlement, Subscriptions, Unanswerable, Unsettleable};
use crate::http::problem;

/// How often an idle stream sends a comment, so that proxies keep it
/// open and a client gone away is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The subscription routes, with their state.
pub(crate) fn router(subscriptions: Arc<Subscriptions>) -> Router {
    Router::new()
        .route("/v1/subscribe", get(subscribe))
        .route("/v1/acks/{delivery}", post(ack))
        .route("/v1/nacks/{delivery}", post(nack))
        .route("/v1/replies/{delivery}", post(post_reply))
        .with_state(subscriptions)
}

/// `GET /v1/subscribe?pattern=…&service=…&max_in_flight=…&ack=auto`: the
/// service's deliveries as Server-Sent Events. The token comes in
/// `Authorization`, or from a browser as `?access_token=`.
async fn subscribe(
    State(subscriptions): State<Arc<Subscriptions>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let headers = match with_browser_credentials(headers, &query) {
        Ok(headers) => headers,
        Err(refused) => return *refused,
    };
    let session = match subscriptions.open(peer, &headers, &query).await {
        Ok(session) => session,
        Err(refused) => return *refused,
    };
    let first = Event::default()
        .event("subscribed")
        .data(session.subscribed_json().to_string());
    let events =
        futures_util::stream::unfold((Some(first), session), |(first, mut session)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, std::convert::Infallible>(first), (None, session)));
            }
            let delivery = session.next().await?;
            let event = Event::default()
                .id(delivery.id)
                .event("delivery")
                .data(delivery.json.to_string());
            Some((Ok(event), (None, session)))
        });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// `POST /v1/acks/{delivery}`: handled; the broker forgets it.
async fn ack(
    State(subscriptions): State<Arc<Subscriptions>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(delivery): Path<String>,
    headers: HeaderMap,
) -> Response {
    settle_over_http(&subscriptions, peer, &headers, &delivery, Settlement::Ack).await
}

/// `POST /v1/nacks/{delivery}?delay=…`: not handled; redelivered after
/// the delay (none by default).
async fn nack(
    State(subscriptions): State<Arc<Subscriptions>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(delivery): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let delay = match query.get("delay").map(|d| parse_duration(d)) {
        None => Duration::ZERO,
        Some(Some(delay)) => delay,
        Some(None) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "?delay= takes a duration, such as 500ms, 5s or 2m",
            )
        }
    };
    settle_over_http(
        &subscriptions,
        peer,
        &headers,
        &delivery,
        Settlement::Nack(delay),
    )
    .await
}

/// `POST /v1/replies/{delivery}`: answers a command delivered on a
/// stream. The body is the reply's payload (its `Content-Type` kept);
/// `Courier-Outcome` names the reply; `Courier-Final: false` sends one of
/// a stream of replies, more to follow; the final reply (the default)
/// also acks the delivery.
#[utoipa::path(
    post,
    path = "/v1/replies/{delivery}",
    tag = "gateway",
    params(
        ("delivery" = String, Path, description = "The command's delivery id, from its SSE `id:` or its delivery's `delivery` field", max_length = 64),
        ("Courier-Outcome" = String, Header, nullable = false, description = "The reply's name: the outcome, such as todo.created", pattern = r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$", max_length = 255),
        ("Courier-Final" = Option<bool>, Header, nullable = false, description = "false: one of a stream of replies, more follow (the delivery stays unsettled); true (the default): the last reply, which also acks the delivery"),
        ("Courier-Id" = Option<String>, Header, nullable = false, format = "uuid", description = "The reply's id; a retry with the same id is deduplicated"),
        ("Courier-Version" = Option<String>, Header, nullable = false, description = "The payload's schema version, MAJOR.MINOR", pattern = r"^[0-9]{1,4}(\.[0-9]{1,4})?$"),
    ),
    request_body(description = "The reply's payload, its Content-Type kept in the reply's headers", content(
        (serde_json::Value = "application/json"),
        (String = "application/octet-stream"),
    )),
    responses(
        (status = 202, description = "The broker took the reply", body = Accepted),
        (status = 400, description = "No or a bad Courier-Outcome, Courier-Final or envelope header", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))),
        SendRefusals,
        (status = 404, description = "No command delivered on this caller's open streams awaits a reply by this id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 410, description = "The requester no longer awaits replies (its route expired, or it abandoned the stream)", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "unknown_request"))),
        (status = 429, description = "Over the send rate, or the requester's reply window is full: send it again after the requester took some", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Courier-Error" = String, description = "rate_limited or stream_full"))),
        (status = 504, description = "The broker did not answer in time", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn post_reply(
    State(subscriptions): State<Arc<Subscriptions>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(delivery): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = subscriptions.gateway.client(peer, &headers).await {
        return *refused;
    }
    let bad = |detail: &str| problem(StatusCode::BAD_REQUEST, detail);
    let outcome = match headers.get("courier-outcome").map(|v| v.to_str()) {
        Some(Ok(outcome)) if !outcome.trim().is_empty() => outcome.trim().to_string(),
        _ => {
            return bad(
                "name the reply in Courier-Outcome, such as 'Courier-Outcome: todo.created'",
            )
        }
    };
    let is_final = match headers.get("courier-final").map(|v| v.to_str()) {
        None => true,
        Some(Ok("true" | "1")) => true,
        Some(Ok("false" | "0")) => false,
        Some(_) => {
            return bad(
                "Courier-Final takes true (the last reply, the default) or false (more follow)",
            )
        }
    };
    let owner = bearer(&headers).map(str::to_string);
    let sent = subscriptions
        .reply(&delivery, &owner, &outcome, is_final, |builder| {
            envelope(builder, &headers, body)
        })
        .await;
    match sent {
        Ok(id) => json_answer(
            StatusCode::ACCEPTED,
            &Accepted {
                id: id.to_string(),
                seq: None,
            },
        ),
        Err(Unanswerable::Unknown) => problem(
            StatusCode::NOT_FOUND,
            &format!(
                "no command delivery '{delivery}' awaits a reply from this caller: it is not a command, its final reply was sent, or its stream closed (then it is delivered again)"
            ),
        ),
        Err(Unanswerable::Unbuildable(refused)) => *refused,
        Err(Unanswerable::Refused(e)) => refusal(&e),
    }
}

async fn settle_over_http(
    subscriptions: &Subscriptions,
    peer: SocketAddr,
    headers: &HeaderMap,
    delivery: &str,
    settlement: Settlement,
) -> Response {
    if let Err(refused) = subscriptions.gateway.client(peer, headers).await {
        return *refused;
    }
    let owner = bearer(headers).map(str::to_string);
    match subscriptions.settle(delivery, &owner, settlement) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(Unsettleable::Unknown) => problem(
            StatusCode::NOT_FOUND,
            &format!(
                "no delivery '{delivery}' awaits a verdict from this caller: it was settled already, or its stream closed (then it is delivered again)"
            ),
        ),
    }
}
