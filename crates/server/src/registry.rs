//! The service registry's edge: the checks the broker asks for (HTTP GET,
//! TCP connect), the change index watchers wait on, and the HTTP routes
//! under `/v1/services`.
//!
//! `GET /v1/registry` lists the registry's services (`GET /v1/services`
//! is the console's listing of the bus); `GET /v1/services/{name}` their
//! healthy instances (`?all=1`: every one, with its state), and with
//! `?index=N` it blocks until the registry's index differs from N (at most
//! `?wait=`, default 30 s). `POST /v1/services/{name}` registers (a JSON
//! body), `DELETE /v1/services/{name}/{id}` deregisters, `POST
//! /v1/services/{name}/{id}/heartbeat` passes a TTL check.
//!
//! Under a manifest the two lookups take any token it lists, a service's
//! too (a caller finds its dependencies with its own token, as Consul's
//! `service:read`); the changes take `[admin]` tokens only, like the rest
//! of the port: a registration records no owner, and a name off the bus
//! (a database, say) belongs to no manifest service, so no token but an
//! admin's can be shown to own one. Without a manifest: loopback peers.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use courier_broker::registry::{Check, Health, Instance, InstanceSpec, Registry, RegistryError};
use courier_broker::{Broker, Nanos};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::http::{authorize, authorize_for, problem, Audience};
use crate::{Shared, Store};

/// Defaults of a registration that names none.
const INTERVAL_MS_DEFAULT: u32 = 5_000;
const TIMEOUT_MS_DEFAULT: u32 = 2_000;
const FLAP_THRESHOLD_DEFAULT: u32 = 2;
/// Critical this long (by default) and the instance is removed.
const DEREGISTER_AFTER_MS_DEFAULT: u32 = 60_000;
const WAIT_MS_DEFAULT: u64 = 30_000;
const WAIT_MS_MAX: u64 = 300_000;

/// A check's outcome on its way back to the broker.
pub(crate) struct CheckOutcome {
    service: String,
    id: String,
    health: Health,
    output: String,
}

pub(crate) struct RegistryEdge {
    index: watch::Sender<u64>,
    results: mpsc::UnboundedSender<CheckOutcome>,
    pending: std::sync::Mutex<Option<mpsc::UnboundedReceiver<CheckOutcome>>>,
}

impl RegistryEdge {
    pub(crate) fn new() -> RegistryEdge {
        let (results, pending) = mpsc::unbounded_channel();
        RegistryEdge {
            index: watch::channel(0).0,
            results,
            pending: std::sync::Mutex::new(Some(pending)),
        }
    }

    /// The registry's change index as of the broker's last pass.
    pub(crate) fn current_index(&self) -> u64 {
        *self.index.borrow()
    }

    /// After every pass of the broker: wakes watchers if the index moved
    /// and starts the checks that fell due.
    pub(crate) fn after_core(&self, registry_index: u64, checks: Vec<(String, String, Check)>) {
        self.index.send_if_modified(|index| {
            let moved = *index != registry_index;
            *index = registry_index;
            moved
        });
        if checks.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (service, id, check) in checks {
            let results = self.results.clone();
            runtime.spawn(async move {
                let (health, output) = run_check(&check).await;
                let _ = results.send(CheckOutcome {
                    service,
                    id,
                    health,
                    output,
                });
            });
        }
    }
}

/// Hands check results to the broker, in batches, until the server stops.
pub(crate) async fn report_results(shared: Arc<Shared>) {
    let pending = shared
        .registry
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let Some(mut pending) = pending else { return };
    let mut batch = Vec::new();
    while pending.recv_many(&mut batch, 1024).await > 0 {
        shared.with_core(|core, now| {
            for outcome in batch.drain(..) {
                core.registry_check_result(
                    &outcome.service,
                    &outcome.id,
                    outcome.health,
                    outcome.output,
                    now,
                );
            }
        });
    }
}

async fn run_check(check: &Check) -> (Health, String) {
    match check {
        Check::None | Check::Ttl { .. } => (Health::Passing, String::new()),
        Check::Tcp {
            address,
            timeout_ms,
        } => {
            let limit = Duration::from_millis(u64::from(*timeout_ms));
            match tokio::time::timeout(limit, TcpStream::connect(address.as_str())).await {
                Ok(Ok(_)) => (Health::Passing, format!("connected to {address}")),
                Ok(Err(e)) => (Health::Critical, format!("connect to {address}: {e}")),
                Err(_) => (
                    Health::Critical,
                    format!("connect to {address}: no answer within {timeout_ms} ms"),
                ),
            }
        }
        Check::Http { url, timeout_ms } => {
            let limit = Duration::from_millis(u64::from(*timeout_ms));
            match tokio::time::timeout(limit, http_status(url)).await {
                Ok(Ok(status)) => (health_of_status(status), format!("GET {url}: {status}")),
                Ok(Err(e)) => (Health::Critical, format!("GET {url}: {e}")),
                Err(_) => (
                    Health::Critical,
                    format!("GET {url}: no answer within {timeout_ms} ms"),
                ),
            }
        }
    }
}

fn health_of_status(status: u16) -> Health {
    match status {
        200..=299 => Health::Passing,
        429 => Health::Warning,
        _ => Health::Critical,
    }
}

/// The status of `GET url` (plain `http://` only): the status line is all
/// a check needs, so no client library.
async fn http_status(url: &str) -> Result<u16, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err("only http:// checks are run; put a TLS check behind tcp://".to_string());
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = TcpStream::connect(&address)
        .await
        .map_err(|e| format!("connect to {address}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: courier-check\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| "the answer is not HTTP".to_string())
}

// ---- HTTP routes --------------------------------------------------------

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/registry", get(list_services))
        .route("/v1/services/{name}", get(service_instances).post(register))
        .route("/v1/services/{name}/{id}", delete(deregister))
        .route("/v1/services/{name}/{id}/heartbeat", post(heartbeat))
}

fn instance_json(i: &Instance) -> Value {
    let (host, port) = match i.spec.address.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse::<u16>().ok()),
        None => (String::new(), None),
    };
    json!({
        "service": i.spec.service,
        "id": i.spec.id,
        "address": i.spec.address,
        "host": host,
        "port": port,
        "meta": i.spec.meta,
        "health": i.health.as_str(),
        "check": i.spec.check.describe(),
        "output": i.last_output,
        "on_bus": i.spec.on_bus,
        "modify_index": i.modify_index,
    })
}

pub fn services_json(registry: &Registry) -> Value {
    let services: Vec<Value> = registry
        .service_names()
        .into_iter()
        .map(|name| {
            let all = registry.instances(&name, true);
            let healthy = all.iter().filter(|i| i.health.is_healthy()).count();
            json!({"name": name, "instances": all.len(), "healthy": healthy})
        })
        .collect();
    json!({"index": registry.index(), "services": services})
}

fn json_response(status: StatusCode, value: &Value, index: u64) -> Response {
    (
        status,
        [
            ("content-type", "application/json".to_string()),
            ("x-courier-index", index.to_string()),
        ],
        format!("{value}\n"),
    )
        .into_response()
}

fn truthy(query: &HashMap<String, String>, key: &str) -> bool {
    query
        .get(key)
        .is_some_and(|v| matches!(v.as_str(), "" | "1" | "true" | "yes"))
}

#[utoipa::path(
    get,
    path = "/v1/registry",
    tag = "registry",
    responses(
        (status = 200, description = "The registry's services", body = crate::openapi::RegistryListing, headers(("X-Courier-Index" = String, description = "The registry's change index"))),
        (status = 401, description = "Under a manifest: no token, or one it does not list (a service's token or an admin's is taken)", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn list_services(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize_for(&shared, peer, &headers, Audience::ManifestTokens) {
        return *refusal;
    }
    let core = shared.core();
    let body = services_json(core.registry());
    let index = core.registry().index();
    drop(core);
    json_response(StatusCode::OK, &body, index)
}

#[utoipa::path(
    get,
    path = "/v1/services/{name}",
    tag = "registry",
    params(
        ("name" = String, Path, description = "The service's name"),
        ("all" = Option<bool>, Query, description = "Every instance with its state, not only the healthy ones"),
        ("index" = Option<u64>, Query, description = "Block until the registry's index differs from this one"),
        ("wait" = Option<String>, Query, description = "With index: wait at most this long, such as 30s (at most 300s)"),
    ),
    responses(
        (status = 200, description = "The service's instances", body = crate::openapi::RegistryInstances, headers(("X-Courier-Index" = String, description = "The registry's change index"))),
        (status = 400, description = "A bad index or wait", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no token, or one it does not list (a service's token or an admin's is taken)", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn service_instances(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize_for(&shared, peer, &headers, Audience::ManifestTokens) {
        return *refusal;
    }
    let all = truthy(&query, "all");
    if let Some(seen) = query.get("index") {
        let Ok(seen) = seen.parse::<u64>() else {
            return problem(
                StatusCode::BAD_REQUEST,
                "index must be the number an earlier answer gave (its \"index\" field)",
            );
        };
        let wait_ms = match query.get("wait").map(|w| humantime::parse_duration(w)) {
            None => WAIT_MS_DEFAULT,
            Some(Ok(d)) => (d.as_millis() as u64).min(WAIT_MS_MAX),
            Some(Err(e)) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    &format!("wait: {e}; write for example wait=30s"),
                )
            }
        };
        let mut changes = shared.registry.index.subscribe();
        // Any other index (a restart may make it smaller) answers at once.
        let _ = tokio::time::timeout(
            Duration::from_millis(wait_ms),
            changes.wait_for(|index| *index != seen),
        )
        .await;
    }
    let core = shared.core();
    let registry = core.registry();
    let instances: Vec<Value> = registry
        .instances(&name, all)
        .into_iter()
        .map(instance_json)
        .collect();
    let index = registry.index();
    drop(core);
    json_response(
        StatusCode::OK,
        &json!({"index": index, "service": name, "instances": instances}),
        index,
    )
}

fn duration_ms(body: &Value, key: &str, default: u32) -> Result<u32, String> {
    match &body[key] {
        Value::Null => Ok(default),
        // 5000 and 5000.0 alike.
        Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f.min(f64::from(u32::MAX)) as u64)
            })
            .map(|n| n.min(u64::from(u32::MAX)) as u32)
            .ok_or_else(|| {
                format!("{key} must be a whole number of milliseconds or text like \"5s\"")
            }),
        Value::String(s) => humantime::parse_duration(s)
            .map(|d| d.as_millis().min(u128::from(u32::MAX)) as u32)
            .map_err(|e| format!("{key}: {e}; write for example \"5s\"")),
        _ => Err(format!("{key} must be text like \"5s\"")),
    }
}

/// Builds a spec from a registration body; an error names the fix.
pub fn spec_from_json(service: &str, body: &Value) -> Result<InstanceSpec, String> {
    let address = body["address"]
        .as_str()
        .ok_or("the body needs \"address\": \"HOST:PORT\"")?
        .to_string();
    let id = match &body["id"] {
        Value::String(id) => id.to_string(),
        Value::Null => format!("{service}-{}", uuid::Uuid::now_v7().simple()),
        other => return Err(format!("\"id\" is text, such as \"db-1\", not {other}")),
    };
    let timeout_ms = duration_ms(body, "timeout", TIMEOUT_MS_DEFAULT)?;
    let check = match &body["check"] {
        Value::Null => Check::None,
        Value::String(text) if text.is_empty() => Check::None,
        Value::String(text) => Check::parse(text, timeout_ms)?,
        other => {
            return Err(format!(
                "\"check\" is text: http://…, tcp://HOST:PORT or ttl:30s, not {other}"
            ))
        }
    };
    if !(body["meta"].is_null() || body["meta"].is_object()) {
        return Err("\"meta\" is an object of text values, such as {\"zone\": \"a\"}".to_string());
    }
    let mut meta = BTreeMap::new();
    if let Some(object) = body["meta"].as_object() {
        for (k, v) in object {
            let v = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            meta.insert(k.clone(), v);
        }
    }
    let flap_threshold = match &body["flap_threshold"] {
        Value::Null => FLAP_THRESHOLD_DEFAULT,
        v => v
            .as_f64()
            .filter(|n| n.fract() == 0.0 && (1.0..=100.0).contains(n))
            .ok_or("flap_threshold must be a whole number from 1 to 100")? as u32,
    };
    Ok(InstanceSpec {
        service: service.to_string(),
        id,
        address,
        meta,
        check,
        interval_ms: duration_ms(body, "interval", INTERVAL_MS_DEFAULT)?.max(100),
        flap_threshold,
        deregister_after_ms: duration_ms(body, "deregister_after", DEREGISTER_AFTER_MS_DEFAULT)?,
        on_bus: false,
    })
}

#[utoipa::path(
    post,
    path = "/v1/services/{name}",
    tag = "registry",
    params(
        ("name" = String, Path, description = "The service's name (it becomes a DNS label)", pattern = r"^[A-Za-z0-9_-]{1,63}$"),
    ),
    request_body(content = crate::openapi::Registration, content_type = "application/json"),
    responses(
        (status = 200, description = "Registered", body = crate::openapi::RegistryChange, headers(("X-Courier-Index" = String, description = "The registry's change index"))),
        (status = 400, description = "A bad registration", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn register(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = authorize(&shared, peer, &headers) {
        return *refusal;
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("the body is not JSON ({e}); send {{\"address\": \"HOST:PORT\", \"check\": \"http://…\"}}"),
            )
        }
    };
    let spec = match spec_from_json(&name, &body) {
        Ok(spec) => spec,
        Err(reason) => return problem(StatusCode::BAD_REQUEST, &reason),
    };
    let id = spec.id.clone();
    let mut result = Ok(());
    shared.with_core(|core, now| result = core.registry_register(spec, now));
    match result {
        Ok(()) => changed(&shared, &name, &id),
        Err(e) => problem(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// The answer to a change of instance `id` of `name`: the registry's
/// index after it.
fn changed(shared: &Shared, name: &str, id: &str) -> Response {
    let index = shared.core().registry().index();
    json_response(
        StatusCode::OK,
        &json!({"service": name, "id": id, "index": index}),
        index,
    )
}

/// A change to one registered instance (deregister, heartbeat):
/// authorized as every change is, run in the core, answered with the
/// index after it; an unknown instance is 404, a heartbeat to one whose
/// check is not TTL 409.
fn change_instance(
    shared: &Shared,
    peer: SocketAddr,
    headers: &HeaderMap,
    (name, id): (&str, &str),
    change: impl FnOnce(&mut Broker<Store>, Nanos) -> Result<(), RegistryError>,
) -> Response {
    if let Err(refusal) = authorize(shared, peer, headers) {
        return *refusal;
    }
    let mut result = Ok(());
    shared.with_core(|core, now| result = change(core, now));
    match result {
        Ok(()) => changed(shared, name, id),
        Err(e @ RegistryError::NotTtl { .. }) => problem(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => problem(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

#[utoipa::path(
    delete,
    path = "/v1/services/{name}/{id}",
    tag = "registry",
    params(
        ("name" = String, Path, description = "The service's name"),
        ("id" = String, Path, description = "The instance's id"),
    ),
    responses(
        (status = 200, description = "Deregistered", body = crate::openapi::RegistryChange, headers(("X-Courier-Index" = String, description = "The registry's change index"))),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such instance", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn deregister(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    change_instance(&shared, peer, &headers, (&name, &id), |core, _| {
        core.registry_deregister(&name, &id)
    })
}

#[utoipa::path(
    post,
    path = "/v1/services/{name}/{id}/heartbeat",
    tag = "registry",
    params(
        ("name" = String, Path, description = "The service's name"),
        ("id" = String, Path, description = "The instance's id"),
    ),
    responses(
        (status = 200, description = "The instance's TTL check passed", body = crate::openapi::RegistryChange, headers(("X-Courier-Index" = String, description = "The registry's change index"))),
        (status = 401, description = "Under a manifest: no admin token, or one it does not list", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "A service's token, or a non-loopback caller without a manifest", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such instance", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The instance's check is not a TTL check", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn heartbeat(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    change_instance(&shared, peer, &headers, (&name, &id), |core, now| {
        core.registry_heartbeat(&name, &id, now)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_body_becomes_a_spec_or_an_error_that_names_the_fix() {
        let spec = spec_from_json(
            "db",
            &json!({"address": "127.0.0.1:5432", "check": "tcp://127.0.0.1:5432", "interval": "1s", "meta": {"zone": "a"}}),
        )
        .expect("valid");
        assert_eq!(spec.interval_ms, 1000);
        assert_eq!(spec.meta["zone"], "a");
        assert!(spec.id.starts_with("db-"));
        assert!(matches!(spec.check, Check::Tcp { .. }));
        let e = spec_from_json("db", &json!({})).expect_err("no address");
        assert!(e.contains("HOST:PORT"), "{e}");
        let e = spec_from_json("db", &json!({"address": "h:1", "interval": "soon"}))
            .expect_err("bad interval");
        assert!(e.contains("5s"), "{e}");
        // Whole numbers written as floats are whole numbers.
        let spec = spec_from_json(
            "db",
            &json!({"address": "h:1", "interval": 400.0, "flap_threshold": 3.0}),
        )
        .expect("valid");
        assert_eq!((spec.interval_ms, spec.flap_threshold), (400, 3));
        for bad in [
            json!({"address": "h:1", "id": {}}),
            json!({"address": "h:1", "check": 7}),
            json!({"address": "h:1", "meta": []}),
            json!({"address": "h:1", "flap_threshold": 2.5}),
        ] {
            assert!(spec_from_json("db", &bad).is_err(), "{bad} was taken");
        }
    }

    #[test]
    fn statuses_map_to_health() {
        assert_eq!(health_of_status(204), Health::Passing);
        assert_eq!(health_of_status(429), Health::Warning);
        assert_eq!(health_of_status(503), Health::Critical);
    }
}
