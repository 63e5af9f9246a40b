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

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, MethodRouter};
use axum::Router;
use serde_json::Value;

use crate::http::{authorize, problem};
use crate::{Nanos, Shared};

mod changes;
mod reads;

// Globs: each handler comes with the path item its `utoipa::path` made.
pub(crate) use changes::*;
pub(crate) use reads::*;

/// The refusals of every console route ([`authorized`]), listed in the
/// OpenAPI document with each route's own answers.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // described, answered by `authorized`
pub(crate) enum AdminRefusals {
    #[response(
        status = 401,
        description = "Under a manifest: no admin token, or one it does not list",
        content_type = "application/problem+json"
    )]
    NoAdminToken(crate::openapi::Problem),
    #[response(
        status = 403,
        description = "A service's token, or a non-loopback caller without a manifest",
        content_type = "application/problem+json"
    )]
    NotAdmin(crate::openapi::Problem),
}

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
        include_str!("../../console/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/api.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/charts.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("../../console/console.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_str!("../../console/icon.svg"),
    ),
];

const INDEX_HTML: &str = include_str!("../../console/index.html");

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
pub(crate) struct Refusal {
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

#[cfg(test)]
mod tests;
