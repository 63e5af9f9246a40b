//! The broker's HTTP port: health, readiness, Prometheus metrics, the
//! live tail and activity traces, on the broker's own tokio runtime.
//!
//! Who may ask: with a manifest, the `[admin]` tokens as `Authorization:
//! Bearer` (the registry's lookups take a service's token too, see
//! [`Audience`]); without one, loopback peers only (as on the bus port, a
//! non-loopback address without a manifest needs `--insecure`). `/healthz`
//! and `/readyz` answer everyone who can reach the port: they say no more
//! than whether the broker is up, and orchestrators probe them without
//! credentials.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use std::collections::HashMap;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use courier_broker::{ActivityFilter, Nanos, TailFilter};
use courier_manifest::Identity;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower_service::Service as _;
use tracing::debug;

use crate::metrics_text::{encode_metrics, MetricsSnapshot};
use crate::{wall_nanos, Shared};

/// The HTTP listener, bound before the broker reports itself ready.
pub(crate) struct HttpListener {
    listener: TcpListener,
}

impl HttpListener {
    pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<HttpListener> {
        Ok(HttpListener {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    ///
    /// HTTP/1.1 only, each connection on hyper's own HTTP/1 loop (what
    /// `axum::serve` would wrap in a version-detecting one): nothing on
    /// the port speaks HTTP/2 (the WebSocket upgrade is HTTP/1.1's).
    /// Without hyper's `pipeline_flush`: with it a stream's body (a tail's
    /// Server-Sent Events) was polled into memory while its reader did not
    /// read, instead of the tail falling behind and saying so.
    pub(crate) async fn serve(self, shared: Arc<Shared>, bus: std::io::Result<SocketAddr>) {
        let mut app = router(shared.clone());
        if let Ok(bus) = bus {
            app = app.merge(crate::gateway::router(shared, bus));
        }
        let mut listener = self.listener;
        loop {
            // Refused or reset connections are skipped, and other errors
            // (out of file descriptors) logged and retried after a pause,
            // inside `accept`.
            let (stream, peer) = axum::serve::Listener::accept(&mut listener).await;
            // An answer is one write; Nagle's algorithm would only hold
            // back the lines of a stream (ndjson, Server-Sent Events)
            // behind an ACK.
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().call(request)
                });
            tokio::spawn(async move {
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                if let Err(e) = served {
                    debug!(error = %e, %peer, "an HTTP connection ended in error");
                }
            });
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .merge(crate::console::routes(shared.clone()))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/tail", get(tail))
        .route("/v1/activities", get(activities))
        .route("/v1/activities/{id}", get(activity))
        .merge(crate::registry::routes())
        .route("/v1/openapi.json", get(crate::openapi::document))
        .with_state(shared)
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "The broker is up", body = String, content_type = "text/plain"),
    ),
)]
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Degraded: the broker's disk is failing; durable sends are refused", body = String, content_type = "text/plain"),
    ),
)]
pub(crate) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let degraded = shared.core().is_degraded();
    if degraded {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "degraded: the broker's disk is failing (full or erroring; see its log); durable sends are refused until it works again\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The broker's metrics", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn metrics(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&shared, peer, &headers) {
        return *refusal;
    }
    let started = Instant::now();
    // Off the runtime: the trace counters wait for the trace thread.
    let taker = shared.clone();
    let snapshot =
        tokio::task::spawn_blocking(move || MetricsSnapshot::take(&taker, wall_nanos())).await;
    let Ok(mut snapshot) = snapshot else {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be gathered (the task failed); see the broker's log",
        );
    };
    if let Some(edge) = &shared.cluster {
        let services = snapshot
            .subscriptions
            .iter()
            .map(|s| s.service.clone())
            .collect();
        snapshot.cluster = Some(crate::cluster_edge::gauges::gather(edge, services).await);
    }
    let text = encode_metrics(snapshot, started);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /v1/tail?pattern=…&service=…&kind=…&payload=true`: the live tail
/// as Server-Sent Events.
#[utoipa::path(
    get,
    path = "/v1/tail",
    tag = "operations",
    params(
        ("pattern" = Option<String>, Query, description = "Only names matching this pattern, such as todo.*"),
        ("service" = Option<String>, Query, description = "Only messages from or to this service"),
        ("kind" = Option<String>, Query, description = "command, event or reply"),
        ("payload" = Option<bool>, Query, description = "Include payloads"),
    ),
    responses(
        (status = 200, description = "The live tail, as Server-Sent Events", body = String, content_type = "text/event-stream"),
        (status = 400, description = "A bad filter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn tail(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&shared, peer, &headers) {
        return *refusal;
    }
    let mut args = serde_json::Map::new();
    for field in ["pattern", "service", "kind"] {
        if let Some(v) = query.get(field) {
            args.insert(field.to_string(), serde_json::Value::String(v.clone()));
        }
    }
    let payload = query
        .get("payload")
        .is_some_and(|v| matches!(v.as_str(), "" | "1" | "true" | "yes"));
    args.insert("payload".to_string(), serde_json::Value::Bool(payload));
    match TailFilter::from_args(&serde_json::Value::Object(args)) {
        Ok(filter) => shared.tails.sse(filter).into_response(),
        Err((_, reason)) => problem(StatusCode::BAD_REQUEST, &reason),
    }
}

/// `GET /v1/activities/{id}`: one activity's causal tree as JSON
/// (`docs/PROTOCOL.md` §8.8 shows its shape).
#[utoipa::path(
    get,
    path = "/v1/activities/{id}",
    tag = "operations",
    params(
        ("id" = String, Path, format = "uuid", description = "The activity's id"),
    ),
    responses(
        (status = 200, description = "The activity's causal tree", body = Object),
        (status = 400, description = "Not a UUID", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such activity in the traces", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Activity traces are off on this broker", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn activity(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&shared, peer, &headers) {
        return *refusal;
    }
    let Some(tracer) = shared.tracer.clone() else {
        return traces_off();
    };
    let id = match uuid::Uuid::parse_str(&id) {
        Ok(id) => id,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("{id:?} is not an activity id (a UUID): {e}"),
            )
        }
    };
    let found = match &shared.cluster {
        Some(edge) => Ok(crate::cluster_edge::traces::tree(&edge.node, &tracer, id)
            .await
            .ok_or_else(|| tracer.not_found(&id))),
        None => {
            tokio::task::spawn_blocking(move || {
                tracer.tree(&id).ok_or_else(|| tracer.not_found(&id))
            })
            .await
        }
    };
    match found {
        Ok(Ok(tree)) => json_response(&tree),
        Ok(Err(why)) => problem(
            StatusCode::NOT_FOUND,
            why["reason"].as_str().unwrap_or("no such activity"),
        ),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("building the tree failed: {e}"),
        ),
    }
}

/// `GET /v1/activities?name=…&outcome=…&since=…&limit=…`: recent
/// activities, newest first.
#[utoipa::path(
    get,
    path = "/v1/activities",
    tag = "operations",
    params(
        ("name" = Option<String>, Query, description = "Only activities that started with a name matching this pattern", pattern = r"^$|^(([a-z0-9_-]+|\*)\.)*([a-z0-9_-]+|\*|>)$", max_length = 255),
        ("outcome" = Option<String>, Query, description = "Only activities with this outcome"),
        ("since" = Option<String>, Query, description = "Only activities since then: an age (90s, 15m, 2h, 1d) or Unix nanoseconds (up to 19 digits); the broker also takes RFC 3339 times (2026-12-05T10:00:00Z), which the pattern does not describe", pattern = r"^$|^[0-9]{1,6}[smhd]$|^[0-9]{1,19}$"),
        ("limit" = Option<u32>, Query, description = "At most this many (default 50)", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "Recent activities, newest first", body = Object),
        (status = 400, description = "A bad or unknown parameter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Activity traces are off on this broker", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn activities(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(&shared, peer, &headers) {
        return *refusal;
    }
    let Some(tracer) = shared.tracer.clone() else {
        return traces_off();
    };
    if let Some(unknown) = query
        .keys()
        .find(|k| !["name", "outcome", "since", "limit"].contains(&k.as_str()))
    {
        return problem(
            StatusCode::BAD_REQUEST,
            &format!("unknown parameter {unknown:?}; use name, outcome, since and limit"),
        );
    }
    let args = serde_json::Value::Object(
        query
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    );
    let filter = match ActivityFilter::from_args(&args, wall_nanos()) {
        Ok(filter) => filter,
        Err((_, reason)) => return problem(StatusCode::BAD_REQUEST, &reason),
    };
    if let Some(edge) = &shared.cluster {
        return json_response(
            &crate::cluster_edge::traces::find(&edge.node, &tracer, &filter).await,
        );
    }
    match tokio::task::spawn_blocking(move || tracer.find(&filter)).await {
        Ok(listing) => json_response(&listing),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("listing failed: {e}"),
        ),
    }
}

fn traces_off() -> Response {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "activity traces are off on this broker (it was started with --trace off)",
    )
}

fn json_response(value: &serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Whose tokens an endpoint takes under a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// `[admin]` tokens only: everything that changes state or shows more
    /// than one service's own business.
    Admins,
    /// Any token the manifest lists, a service's or an admin's: the
    /// registry's lookups, which every service needs to find the others
    /// (as a DNS answer shows anyone who can reach `--dns`).
    ManifestTokens,
}

/// Admin tokens under a manifest; loopback peers without one.
pub(crate) fn authorize(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), Box<Response>> {
    authorize_for(shared, peer, headers, Audience::Admins)
}

/// [`authorize`] for an endpoint that takes `audience`'s tokens; without a
/// manifest, loopback peers (or everyone with `--insecure`) whatever the
/// audience.
pub(crate) fn authorize_for(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
    audience: Audience,
) -> Result<(), Box<Response>> {
    let manifest = shared.core().manifest().cloned();
    let Some(manifest) = manifest else {
        if peer.ip().is_loopback() || shared.config.insecure {
            return Ok(());
        }
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            "without a manifest the HTTP port answers loopback clients only; start the broker with --manifest and send an admin token",
        )));
    };
    let wanted = match audience {
        Audience::Admins => "an admin token of the manifest",
        Audience::ManifestTokens => "a token of the manifest (a service's or an [admin] one)",
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return Err(Box::new(problem(
            StatusCode::UNAUTHORIZED,
            &format!("send {wanted} as 'Authorization: Bearer <token>'"),
        )));
    };
    match (manifest.authenticate_token(token), audience) {
        (Some(Identity::Admin), _) | (Some(Identity::Service(_)), Audience::ManifestTokens) => {
            Ok(())
        }
        (Some(Identity::Service(service)), Audience::Admins) => Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            &format!("this token belongs to service {service}; this endpoint takes an [admin] token (a service's token reads only the registry's lookups)"),
        ))),
        (None, _) => Err(Box::new(problem(
            StatusCode::UNAUTHORIZED,
            &format!("this token is in no entry of the manifest; send {wanted}"),
        ))),
    }
}

/// An RFC 9457 problem document.
pub(crate) fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

/// Seconds from nanoseconds, for gauges.
pub(crate) fn seconds(nanos: Nanos) -> f64 {
    nanos as f64 / 1e9
}
