//! The console: the web page at `/` of the HTTP port, and the admin JSON
//! API under `/v1` that the page reads and acts through.
//!
//! - The page's files (`crates/server/console/`) are compiled into the
//!   binary and served as they are: nothing is built, nothing fetched from
//!   elsewhere. They hold no data, so they are served without credentials.
//! - Every `/v1` route sits behind [`authorized`] (what `/metrics` asks:
//!   an `[admin]` token under a manifest, a loopback peer without one);
//!   a POST must also come from the page's own origin as JSON, so another
//!   site open in the operator's browser cannot make one.
//! - A read holds the core's lock only to copy state out; the JSON is
//!   built after the lock is released. A change (replay, purge, pause,
//!   resume) runs through `Shared::with_core`, so the deliveries it causes
//!   leave at once and its journal entry is synced before the answer.
//! - Every error is an RFC 9457 problem document, bad input a 4xx.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, MethodRouter};
use axum::Router;
use courier_broker::stats::{NameStats, Traffic};
use courier_broker::{
    dead_letter_json, Broker, InstanceInfo, PauseError, SubscriptionGauges, SYSTEM_PREFIX,
};
use courier_store::histogram::Histogram;
use serde_json::{json, Value};

use crate::http::{authorize, problem, seconds};
use crate::{wall_nanos, ConnId, FastMap, Nanos, Shared, Store};

/// Where a connection comes from, and since when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub addr: SocketAddr,
    pub connected_at: Nanos,
}

/// Dead letters listed per call at most: each is a read from the store
/// under the core's lock.
const DEAD_LETTERS_LISTED_MAX: usize = 500;

/// The page's files, embedded: (path under `/assets/`, content type, bytes).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/api.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/charts.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../console/console.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_str!("../console/icon.svg"),
    ),
];

const INDEX_HTML: &str = include_str!("../console/index.html");

/// Only the page's own files run; nothing is loaded from elsewhere, and no
/// other site may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The console's routes, merged into the HTTP port's router.
pub(crate) fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let api = Router::new()
        .route("/v1/services", only_get(get(services)))
        .route("/v1/names", only_get(get(names)))
        .route("/v1/topology", only_get(get(topology)))
        .route("/v1/dead-letters/{service}", only_get(get(dead_letters)))
        .route("/v1/dead-letters/{service}/purge", only_post(post(purge)))
        .route(
            "/v1/dead-letters/{service}/{id}",
            only_get(get(dead_letter)),
        )
        .route(
            "/v1/dead-letters/{service}/{id}/replay",
            only_post(post(replay)),
        )
        .route("/v1/subscriptions/{service}/pause", only_post(post(pause)))
        .route(
            "/v1/subscriptions/{service}/resume",
            only_post(post(resume)),
        )
        .route_layer(middleware::from_fn_with_state(shared, authorized));
    Router::new()
        .route("/", get(page))
        .route("/assets/{file}", get(asset))
        .route("/v1/{*rest}", any(no_such_endpoint))
        .merge(api)
}

fn only_get(route: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    route.fallback(|| async {
        let mut refused = refuse(StatusCode::METHOD_NOT_ALLOWED, "this endpoint answers GET");
        refused
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        refused
    })
}

/// A change: POST only, and only as JSON from the page's own origin (the
/// check runs for the POST itself, so another method is told 405).
fn only_post(route: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    route
        .route_layer(middleware::from_fn(json_from_same_origin))
        .fallback(|| async {
            let mut refused = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint answers POST (with a JSON body)",
            );
            refused
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            refused
        })
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    problem(status, detail)
}

/// A refusal on its way to becoming a problem document (small, unlike a
/// `Response`, so a `Result` can carry it).
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    detail: String,
}

impl Refusal {
    fn new(status: StatusCode, detail: impl Into<String>) -> Refusal {
        Refusal {
            status,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        problem(self.status, &self.detail)
    }
}

/// The guard in front of every `/v1` route.
async fn authorized(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(refusal) = authorize(&shared, peer, request.headers()) {
        return *refusal;
    }
    next.run(request).await
}

/// The guard in front of every change (see [`only_post`]).
async fn json_from_same_origin(request: Request, next: Next) -> Response {
    if let Err(refusal) = same_origin_json(request.headers()) {
        return refusal.into_response();
    }
    next.run(request).await
}

/// A POST must say it is JSON (a plain HTML form cannot) and, when the
/// browser names its origin, come from this port's own.
fn same_origin_json(headers: &HeaderMap) -> Result<(), Refusal> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request with 'Content-Type: application/json' (the body may be {})",
        ));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "changes are accepted from the console's own page only (the Origin is another site's)",
        )),
    }
}

async fn no_such_endpoint(request: Request) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        &format!(
            "this broker has no endpoint {}; it serves /v1/services, /v1/names, /v1/topology, \
             /v1/dead-letters/SERVICE and /v1/subscriptions/SERVICE/pause|resume",
            request.uri().path()
        ),
    )
}

// ---- the page ------------------------------------------------------------

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        ],
        asset_headers(),
        INDEX_HTML,
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [(header::CONTENT_TYPE, *content_type)],
            asset_headers(),
            *body,
        )
            .into_response(),
        None => refuse(
            StatusCode::NOT_FOUND,
            &format!("the console has no file {file}"),
        ),
    }
}

/// The files change with the binary: revalidate rather than cache blindly.
fn asset_headers() -> [(header::HeaderName, &'static str); 4] {
    [
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ]
}

fn json_answer(body: Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

// ---- reads ---------------------------------------------------------------

/// `GET /v1/services`: every service the broker knows (subscribed or
/// connected), its subscriptions and whether each is paused, its queue,
/// and its connected instances.
#[utoipa::path(
    get,
    path = "/v1/services",
    tag = "console",
    responses(
        (status = 200, description = "Every service the broker knows, its subscriptions, queue and instances", body = crate::openapi::ServicesListing),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn services(State(shared): State<Arc<Shared>>) -> Response {
    let now = wall_nanos();
    let (gauges, instances) = {
        let mut core = shared.core();
        (core.subscription_gauges(now), core.instances())
    };
    let peers: FastMap<ConnId, Peer> = shared
        .peers()
        .iter()
        .map(|(conn, peer)| (*conn, *peer))
        .collect();
    json_answer(services_json(&gauges, &instances, &peers, now))
}

fn services_json(
    gauges: &[SubscriptionGauges],
    instances: &[InstanceInfo],
    peers: &FastMap<ConnId, Peer>,
    now: Nanos,
) -> Value {
    let services: Vec<Value> = gauges
        .iter()
        .map(|g| {
            let patterns: Vec<Value> = g
                .patterns
                .iter()
                .map(|p| json!({"pattern": p, "paused": g.paused.contains(p)}))
                .collect();
            let instances: Vec<Value> = instances
                .iter()
                .filter(|i| i.service == g.service)
                .map(|i| instance_json(i, peers.get(&i.conn)))
                .collect();
            json!({
                "name": g.service,
                "patterns": patterns,
                "paused": g.paused,
                "instances": instances,
                "backlog": g.backlog,
                "backlog_bytes": g.backlog_bytes,
                "in_flight": g.in_flight,
                "dead_letters": g.dead_letters,
                "oldest_unacked_seconds": g.oldest_unacked_age.map(seconds),
                "consumers": g.consumers,
                "consumers_paused": g.consumers_paused,
            })
        })
        .collect();
    json!({ "at": now, "services": services })
}

fn instance_json(i: &InstanceInfo, peer: Option<&Peer>) -> Value {
    json!({
        "instance": i.instance,
        "connection": i.conn,
        "peer": peer.map(|p| p.addr.to_string()),
        "connected_at": peer.map(|p| p.connected_at),
        "in_flight": i.in_flight,
        "max_in_flight": i.max_in_flight,
        "consumes": i.patterns,
        "draining": i.draining,
        "backpressure": i.paused,
    })
}

/// What `/v1/names` and `/v1/topology` read: the traffic counters.
fn traffic_copy(shared: &Shared) -> (Vec<NameStats>, usize, u64) {
    let core = shared.core();
    let traffic = core.traffic();
    (
        traffic.names().to_vec(),
        traffic.names_max(),
        traffic.names_over_cap,
    )
}

/// `GET /v1/names`: per message name its counters (since the broker
/// started), reply-latency percentiles and outcomes. Rates are the page's
/// to derive, by diffing two answers over their `at`.
#[utoipa::path(
    get,
    path = "/v1/names",
    tag = "console",
    responses(
        (status = 200, description = "Per message name: counters, reply latency, outcomes", body = crate::openapi::NamesListing),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn names(State(shared): State<Arc<Shared>>) -> Response {
    let now = wall_nanos();
    let (names, names_max, over_cap) = traffic_copy(&shared);
    let names: Vec<Value> = names.iter().map(name_json).collect();
    json_answer(json!({
        "at": now,
        "names": names,
        "names_max": names_max,
        "names_over_cap": over_cap,
    }))
}

fn refused_total(t: &Traffic) -> u64 {
    t.refused.iter().map(|(_, n)| n).sum()
}

fn counters_json(t: &Traffic) -> Value {
    json!({
        "sent": t.sent,
        "delivered": t.delivered,
        "acked": t.acked,
        "nacked": t.nacked,
        "redelivered": t.redelivered,
        "expired": t.expired,
        "dead_lettered": t.dead_lettered,
        "refused": refused_total(t),
    })
}

fn name_json(n: &NameStats) -> Value {
    let mut total = Traffic::default();
    let mut services = Vec::with_capacity(n.by_service.len());
    for (service, t) in &n.by_service {
        total.sent += t.sent;
        total.delivered += t.delivered;
        total.acked += t.acked;
        total.nacked += t.nacked;
        total.redelivered += t.redelivered;
        total.expired += t.expired;
        total.dead_lettered += t.dead_lettered;
        for (code, count) in &t.refused {
            match total.refused.iter_mut().find(|(c, _)| c == code) {
                Some((_, n)) => *n += count,
                None => total.refused.push((*code, *count)),
            }
        }
        let mut counters = counters_json(t);
        counters["service"] = json!(service.as_str());
        counters["refused_by_reason"] = Value::Object(
            t.refused
                .iter()
                .map(|(code, n)| (code.as_str().to_string(), json!(n)))
                .collect(),
        );
        services.push(counters);
    }
    let latency = (n.reply_latency.count > 0).then(|| latency_json(&n.reply_latency));
    let outcomes: Vec<Value> = n
        .outcomes
        .iter()
        .map(|(outcome, count)| json!({"outcome": outcome.as_str(), "count": count}))
        .collect();
    json!({
        "name": n.name.as_str(),
        "totals": counters_json(&total),
        "services": services,
        "reply_latency": latency,
        "outcomes": outcomes,
    })
}

fn latency_json(h: &Histogram) -> Value {
    let buckets: Vec<Value> = h
        .cumulative()
        .into_iter()
        .map(|(le, n)| {
            json!([
                if le.is_finite() {
                    json!(le)
                } else {
                    json!("+Inf")
                },
                n
            ])
        })
        .collect();
    json!({
        "count": h.count,
        "sum_seconds": h.sum,
        "p50": quantile(h, 0.5),
        "p90": quantile(h, 0.9),
        "p99": quantile(h, 0.99),
        "buckets": buckets,
    })
}

/// The `q` quantile in seconds, interpolated linearly inside its bucket as
/// Prometheus's `histogram_quantile` does; past the last bound, that bound.
fn quantile(h: &Histogram, q: f64) -> Option<f64> {
    if h.count == 0 {
        return None;
    }
    let rank = q * h.count as f64;
    let mut below_bound = 0.0;
    let mut below_count = 0u64;
    for (le, cumulative) in h.cumulative() {
        if cumulative as f64 >= rank && cumulative > below_count {
            if !le.is_finite() {
                return Some(below_bound);
            }
            let share = (rank - below_count as f64) / (cumulative - below_count) as f64;
            return Some(below_bound + (le - below_bound) * share.clamp(0.0, 1.0));
        }
        if le.is_finite() {
            below_bound = le;
        }
        below_count = cumulative;
    }
    Some(below_bound)
}

/// `GET /v1/topology`: who talks to whom, as observed. For each message
/// name, an edge from every service that sent it to every service it was
/// delivered to; `count` is what the sender sent of it (each message goes
/// to every receiving service once), `errors` the receiver's nacks and
/// dead letters of it plus the sender's refused sends of it.
#[utoipa::path(
    get,
    path = "/v1/topology",
    tag = "console",
    responses(
        (status = 200, description = "Who sent what to whom", body = crate::openapi::Topology),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn topology(State(shared): State<Arc<Shared>>) -> Response {
    let now = wall_nanos();
    let (names, _, _) = traffic_copy(&shared);
    let known: Vec<String> = shared
        .core()
        .services()
        .into_iter()
        .map(|s| s.name)
        .collect();
    json_answer(topology_json(&names, known, now))
}

fn topology_json(names: &[NameStats], mut services: Vec<String>, now: Nanos) -> Value {
    let mut edges = Vec::new();
    for n in names.iter().filter(|n| !n.name.starts_with(SYSTEM_PREFIX)) {
        let receivers: Vec<(&str, &Traffic)> = n
            .by_service
            .iter()
            .filter(|(_, t)| t.delivered > 0)
            .map(|(s, t)| (s.as_str(), t))
            .collect();
        for (sender, sent) in n.by_service.iter().filter(|(_, t)| t.sent > 0) {
            for (receiver, got) in &receivers {
                edges.push(json!({
                    "from": sender.as_str(),
                    "to": receiver,
                    "name": n.name.as_str(),
                    "count": sent.sent,
                    "errors": got.nacked + got.dead_lettered + refused_total(sent),
                }));
                for s in [sender.as_str(), receiver] {
                    if !services.iter().any(|known| known == s) {
                        services.push(s.to_string());
                    }
                }
            }
        }
    }
    services.sort();
    json!({ "at": now, "services": services, "edges": edges })
}

/// `GET /v1/dead-letters/{service}`: a page of dead letters by id (at
/// most `DEAD_LETTERS_LISTED_MAX`, `?after=ID&limit=N`) and how many there
/// are. The core's lock is held for the page only: it reads each listed
/// message from the log.
#[utoipa::path(
    get,
    path = "/v1/dead-letters/{service}",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
        ("after" = Option<u64>, Query, description = "Only dead letters whose id is larger (default 0); the previous page's rest_after"),
        ("limit" = Option<u32>, Query, description = "At most this many (default and most 500)", minimum = 1, maximum = 500),
    ),
    responses(
        (status = 200, description = "A page of dead letters by id, how many there are, and where the next page starts", body = crate::openapi::DeadLetters),
        (status = 400, description = "after or limit is not a number in range", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such service", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn dead_letters(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let after =
        match query.get("after").map(|a| a.parse::<u64>()) {
            None => 0,
            Some(Ok(after)) => after,
            Some(Err(_)) => return problem(
                StatusCode::BAD_REQUEST,
                "after must be a dead letter id (a whole number); the previous page's rest_after",
            ),
        };
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => DEAD_LETTERS_LISTED_MAX,
        Some(Ok(limit)) if (1..=DEAD_LETTERS_LISTED_MAX).contains(&limit) => limit,
        Some(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("limit must be a whole number from 1 to {DEAD_LETTERS_LISTED_MAX}"),
            )
        }
    };
    let (total, page) = {
        let mut core = shared.core();
        let Some(total) = core.dead_letter_count(&service) else {
            return unknown_service(&service);
        };
        (total, core.dead_letters_page(&service, after, limit))
    };
    let rest_after = page.rest_after();
    let letters: Vec<Value> = page
        .letters
        .iter()
        .map(|(d, m)| dead_letter_json(d, m.as_ref(), false))
        .collect();
    json_answer(json!({
        "service": service,
        "total": total,
        "listed_max": DEAD_LETTERS_LISTED_MAX,
        "dead_letters": letters,
        "rest_after": rest_after,
    }))
}

/// `GET /v1/dead-letters/{service}/{id}`: one, with its whole envelope
/// and payload.
#[utoipa::path(
    get,
    path = "/v1/dead-letters/{service}/{id}",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
        ("id" = u64, Path, description = "The dead letter's id"),
    ),
    responses(
        (status = 200, description = "One dead letter with its envelope and payload", body = crate::openapi::DeadLetter),
        (status = 400, description = "Not a dead letter id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn dead_letter(
    State(shared): State<Arc<Shared>>,
    Path((service, id)): Path<(String, String)>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(refusal) => return refusal.into_response(),
    };
    let found = shared.core().find_dead_letter(&service, id);
    match found {
        Some((d, m)) => json_answer(dead_letter_json(&d, m.as_ref(), true)),
        None => no_dead_letter(&service, id),
    }
}

fn parse_id(id: &str) -> Result<u64, Refusal> {
    id.parse().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a dead letter id; ids are the numbers /v1/dead-letters/SERVICE lists"),
        )
    })
}

fn unknown_service(service: &str) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        &format!("the broker knows no service {service}; /v1/services lists those it knows"),
    )
}

fn no_dead_letter(service: &str, id: u64) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        &format!(
            "service {service} has no dead letter {id}; /v1/dead-letters/{service} lists them"
        ),
    )
}

// ---- changes -------------------------------------------------------------

/// Runs a change on the core through `with_core` (its deliveries leave,
/// its journal entry is synced); a 503 if that sync failed.
fn change<T>(
    shared: &Shared,
    f: impl FnOnce(&mut Broker<Store>, Nanos) -> T,
) -> Result<T, Refusal> {
    let mut outcome = None;
    let mut failures_before = 0;
    shared.with_core(|core, now| {
        failures_before = core.metrics().storage_failures;
        outcome = Some(f(core, now));
    });
    let failed = shared.core().metrics().storage_failures > failures_before;
    match outcome {
        Some(outcome) if !failed => Ok(outcome),
        _ => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker's disk failed while saving this change, so it may not have happened; see the broker's log, and retry once /readyz answers ready",
        )),
    }
}

/// `POST /v1/dead-letters/{service}/{id}/replay`: back into the service's
/// queue, delivered as a fresh message.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{service}/{id}/replay",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
        ("id" = u64, Path, description = "The dead letter's id"),
    ),
    request_body(content = Object, content_type = "application/json", description = "{}"),
    responses(
        (status = 200, description = "Back in the service's queue", body = crate::openapi::Replayed),
        (status = 400, description = "Not a dead letter id, or a body that is not a JSON object", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "It cannot be replayed now", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "A POST must be sent as Content-Type: application/json", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker's disk failed while saving the change", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn replay(
    State(shared): State<Arc<Shared>>,
    Path((service, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let id = match parse_id(&id).and_then(|id| no_fields(&body).map(|()| id)) {
        Ok(id) => id,
        Err(refusal) => return refusal.into_response(),
    };
    let revived = change(&shared, |core, now| {
        core.find_dead_letter(&service, id)?;
        Some(core.revive(&service, id, now))
    });
    match revived {
        Err(refusal) => refusal.into_response(),
        Ok(None) => no_dead_letter(&service, id),
        Ok(Some(Err(reason))) => refuse(StatusCode::CONFLICT, &reason),
        Ok(Some(Ok(()))) => json_answer(json!({"service": service, "id": id, "replayed": true})),
    }
}

/// `POST /v1/dead-letters/{service}/purge`: deletes all of the service's
/// dead letters.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{service}/purge",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
    ),
    request_body(content = Object, content_type = "application/json", description = "{}"),
    responses(
        (status = 200, description = "All of the service's dead letters deleted", body = crate::openapi::Purged),
        (status = 400, description = "A body that is not a JSON object", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such service", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "A POST must be sent as Content-Type: application/json", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker's disk failed while saving the change", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn purge(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(refusal) = no_fields(&body) {
        return refusal.into_response();
    }
    let purged = change(&shared, |core, _| {
        core.dead_letter_count(&service)?;
        Some(core.purge(&service, None))
    });
    match purged {
        Err(refusal) => refusal.into_response(),
        Ok(None) => unknown_service(&service),
        Ok(Some(purged)) => json_answer(json!({"service": service, "purged": purged})),
    }
}

#[utoipa::path(
    post,
    path = "/v1/subscriptions/{service}/pause",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
    ),
    request_body(content = crate::openapi::PauseChange, content_type = "application/json"),
    responses(
        (status = 200, description = "Paused", body = crate::openapi::Paused),
        (status = 400, description = "A bad body", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such service or subscription", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "A POST must be sent as Content-Type: application/json", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker's disk failed while saving the change", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn pause(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    body: Bytes,
) -> Response {
    pause_or_resume(&shared, &service, &body, true)
}

#[utoipa::path(
    post,
    path = "/v1/subscriptions/{service}/resume",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
    ),
    request_body(content = crate::openapi::PauseChange, content_type = "application/json"),
    responses(
        (status = 200, description = "Resumed", body = crate::openapi::Paused),
        (status = 400, description = "A bad body", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such service or subscription", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "A POST must be sent as Content-Type: application/json", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker's disk failed while saving the change", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn resume(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    body: Bytes,
) -> Response {
    pause_or_resume(&shared, &service, &body, false)
}

/// `POST /v1/subscriptions/{service}/pause|resume` with `{"pattern": P}`,
/// or `{}` for every subscription of the service.
fn pause_or_resume(shared: &Shared, service: &str, body: &[u8], pause: bool) -> Response {
    let pattern = match pattern_of(body) {
        Ok(pattern) => pattern,
        Err(refusal) => return refusal.into_response(),
    };
    let done = change(shared, |core, now| {
        let changed = if pause {
            core.pause_subscription(service, pattern.as_deref(), now)
        } else {
            core.resume_subscription(service, pattern.as_deref(), now)
        };
        changed.map(|patterns| (patterns, core.paused_patterns(service)))
    });
    match done {
        Err(refusal) => refusal.into_response(),
        Ok(Ok((patterns, paused))) => json_answer(json!({
            "service": service,
            "patterns": patterns,
            "paused": paused,
        })),
        Ok(Err(e @ PauseError::StorageFailing)) => {
            refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Ok(Err(e)) => refuse(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

/// The body of a change that takes no arguments: empty, or a JSON object.
fn no_fields(body: &[u8]) -> Result<(), Refusal> {
    if body.is_empty() {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(_)) => Ok(()),
        _ => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the body must be empty or a JSON object, {} (this change takes no arguments)",
        )),
    }
}

/// The optional `pattern` of a pause or resume body.
fn pattern_of(body: &[u8]) -> Result<Option<String>, Refusal> {
    let bad = |detail: String| Refusal::new(StatusCode::BAD_REQUEST, detail);
    if body.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "the body is not JSON ({e}); send {{\"pattern\": \"todo.*\"}}, or {{}} for all of the service's subscriptions"
        ))
    })?;
    let Value::Object(fields) = value else {
        return Err(bad(
            "the body is a JSON object: {\"pattern\": \"todo.*\"}, or {} for all of the service's subscriptions".to_string(),
        ));
    };
    match fields.get("pattern") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(p)) => Ok(Some(p.clone())),
        Some(other) => Err(bad(format!(
            "\"pattern\" is a string such as \"todo.*\", not {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::{ErrorCode, SharedStr};
    use courier_store::histogram::SECONDS_BUCKETS;

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let mut h = Histogram::new(&SECONDS_BUCKETS);
        assert_eq!(quantile(&h, 0.5), None);
        // Four in (0.001, 0.0025], none elsewhere.
        for _ in 0..4 {
            h.observe(0.002);
        }
        let p50 = quantile(&h, 0.5).expect("p50");
        assert!((p50 - 0.00175).abs() < 1e-12, "{p50}");
        assert_eq!(quantile(&h, 1.0), Some(0.0025));
        // Past the last bound: the last bound, not infinity.
        h.observe(1000.0);
        assert_eq!(quantile(&h, 1.0), Some(60.0));
    }

    fn stats(name: &str, by_service: &[(&str, u64, u64, u64)]) -> NameStats {
        NameStats {
            name: SharedStr::from(name),
            by_service: by_service
                .iter()
                .map(|(service, sent, delivered, nacked)| {
                    let mut t = Traffic {
                        sent: *sent,
                        delivered: *delivered,
                        nacked: *nacked,
                        ..Traffic::default()
                    };
                    if *sent > 0 {
                        t.refuse(ErrorCode::RateLimited);
                    }
                    (SharedStr::from(*service), t)
                })
                .collect(),
            reply_latency: Histogram::new(&SECONDS_BUCKETS),
            outcomes: Vec::new(),
        }
    }

    #[test]
    fn topology_edges_go_from_senders_to_receivers_per_name() {
        let names = [
            stats("todo.create", &[("web", 5, 0, 0), ("todo", 0, 5, 2)]),
            stats("todo.created", &[("todo", 5, 0, 0), ("web", 0, 5, 0)]),
            stats("courier.services.list", &[("cli", 1, 0, 0)]),
        ];
        let t = topology_json(&names, vec!["audit".into()], 7);
        assert_eq!(t["services"], json!(["audit", "todo", "web"]));
        assert_eq!(
            t["edges"],
            json!([
                {"from": "web", "to": "todo", "name": "todo.create", "count": 5, "errors": 3},
                {"from": "todo", "to": "web", "name": "todo.created", "count": 5, "errors": 1},
            ])
        );
    }

    #[test]
    fn a_change_without_arguments_takes_nothing_or_a_json_object() {
        assert!(no_fields(b"").is_ok());
        assert!(no_fields(b" {} ").is_ok());
        for bad in [&b"\x00"[..], b"[]", b"null", b"{"] {
            assert_eq!(
                no_fields(bad).expect_err("refused").status,
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn a_pause_body_names_one_pattern_or_none() {
        assert_eq!(pattern_of(b"").ok(), Some(None));
        assert_eq!(pattern_of(b"{}").ok(), Some(None));
        assert_eq!(
            pattern_of(br#"{"pattern":"todo.*"}"#).ok(),
            Some(Some("todo.*".to_string()))
        );
        for bad in [&b"{"[..], b"[]", br#"{"pattern":3}"#] {
            let refusal = pattern_of(bad).expect_err("refused");
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
        }
    }
}
