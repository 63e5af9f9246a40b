//! The HTTP port's OpenAPI 3.1 document, served at `/v1/openapi.json`.
//!
//! Every operation comes from the `#[utoipa::path]` annotation on its
//! handler, so a route and its description sit side by side; this module
//! only gathers them and holds the schemas of answers that the handlers
//! build as JSON values. Nothing else is served: no UI, no assets.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Courier HTTP API",
        description = "The broker's HTTP port: the gateway to the bus (send, publish, request), \
            the service registry, the console's admin API, health probes and metrics. \
            Under a manifest, send `Authorization: Bearer <token>`: a service's token for the \
            gateway and the registry's lookups (`GET /v1/registry`, `GET /v1/services/{name}`; \
            an `[admin]` token does too), an `[admin]` token for the rest. Without one, loopback \
            callers need none. \
            Every error is an RFC 9457 `application/problem+json` document.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        crate::gateway::requests::post_message,
        crate::gateway::requests::post_request,
        crate::gateway::requests::get_request,
        crate::gateway::subscribe::post_reply,
        crate::registry::list_services,
        crate::registry::service_instances,
        crate::registry::register,
        crate::registry::deregister,
        crate::registry::heartbeat,
        crate::console::services,
        crate::console::names,
        crate::console::topology,
        crate::console::dead_letters,
        crate::console::dead_letter,
        crate::console::replay,
        crate::console::purge,
        crate::console::pause,
        crate::console::resume,
        crate::http::healthz,
        crate::http::readyz,
        crate::http::metrics,
        crate::http::tail,
        crate::http::activities,
        crate::http::activity,
        document,
    ),
    components(schemas(
        Problem,
        crate::gateway::requests::Accepted,
        crate::gateway::requests::AsyncAccepted,
        crate::gateway::requests::AsyncStatus,
        crate::gateway::requests::ReplyJson,
        RegistryListing,
        RegistryService,
        RegistryInstances,
        RegistryInstance,
        RegistryChange,
        Registration,
        Duration,
        ServicesListing,
        NamesListing,
        Topology,
        TopologyEdge,
        DeadLetters,
        DeadLetter,
        Replayed,
        Purged,
        PauseChange,
        Paused,
    )),
    modifiers(&BearerToken),
    security((), ("bearer" = [])),
    tags(
        (name = "gateway", description = "Send, publish and request over plain HTTP"),
        (name = "registry", description = "The service registry"),
        (name = "console", description = "The console's admin API"),
        (name = "operations", description = "Health probes, metrics, tail and activity traces"),
    ),
)]
pub(crate) struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as JSON, built once.
pub(crate) fn document_json() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut openapi = ApiDoc::openapi();
        openapi.info.version = env!("CARGO_PKG_VERSION").to_string();
        serde_json::to_string(&openapi).unwrap_or_else(|e| {
            // Serializing a value built in memory does not fail; if it
            // ever did, say so rather than serve half a document.
            format!(r#"{{"openapi":"3.1.0","info":{{"title":"unavailable: {e}","version":""}}}}"#)
        })
    })
}

/// `GET /v1/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this port", content_type = "application/json", body = Object)),
)]
pub(crate) async fn document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

/// An RFC 9457 problem document: the body of every error of the port.
#[derive(ToSchema)]
#[allow(dead_code)] // described, built by `http::problem`
pub(crate) struct Problem {
    /// Always `about:blank`: the status says what kind of error it is.
    r#type: String,
    /// The status's reason phrase.
    title: String,
    status: u16,
    /// What went wrong, and how to fix it.
    detail: String,
}

// ---- registry --------------------------------------------------------------

/// `GET /v1/registry`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct RegistryListing {
    /// The registry's change index.
    index: u64,
    services: Vec<RegistryService>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct RegistryService {
    name: String,
    instances: u64,
    healthy: u64,
}

/// `GET /v1/services/{name}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct RegistryInstances {
    index: u64,
    service: String,
    instances: Vec<RegistryInstance>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct RegistryInstance {
    service: String,
    id: String,
    address: String,
    host: String,
    port: Option<u16>,
    #[schema(value_type = Object)]
    meta: std::collections::BTreeMap<String, String>,
    /// passing, warning or critical.
    health: String,
    check: String,
    output: String,
    on_bus: bool,
    modify_index: u64,
}

/// The answer to a registration, a deregistration or a heartbeat.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct RegistryChange {
    service: String,
    id: String,
    index: u64,
}

/// A registration's body: only `address` is required. Durations are
/// milliseconds, or text such as "5s" (the document shows the simplest
/// forms; humantime's others, like "1m 30s", are taken too).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Registration {
    /// HOST:PORT (or empty, for an instance reached otherwise).
    #[schema(pattern = r"^$|:")]
    address: String,
    /// Chosen by the broker when left out.
    #[schema(pattern = r"^[!-~]{1,255}$")]
    id: Option<String>,
    /// `http://…`, `tcp://HOST:PORT`, or `ttl:30s`; none or empty checks
    /// nothing.
    #[schema(pattern = r"^$|^https?://|^tcp://[^:]*:|^ttl:[1-9][0-9]{0,5}(ms|s|m|h)$")]
    check: Option<String>,
    #[schema(value_type = Option<Duration>)]
    interval: Option<String>,
    #[schema(value_type = Option<Duration>)]
    timeout: Option<String>,
    #[schema(value_type = Option<Duration>)]
    deregister_after: Option<String>,
    #[schema(minimum = 1, maximum = 100)]
    flap_threshold: Option<u32>,
    #[schema(value_type = Option<Object>)]
    meta: Option<std::collections::BTreeMap<String, String>>,
}

/// Milliseconds, or text such as "5s".
pub(crate) struct Duration;

impl utoipa::PartialSchema for Duration {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .description(Some("Milliseconds, or text such as \"5s\""))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^[0-9]{1,6}(ms|s|m|h)$")),
            )
            .into()
    }
}

impl ToSchema for Duration {}

// ---- console ---------------------------------------------------------------

/// `GET /v1/services`: each service's subscriptions, queue and instances.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct ServicesListing {
    /// When, in nanoseconds since the Unix epoch.
    at: u64,
    #[schema(value_type = Vec<Object>)]
    services: Vec<()>,
    /// On a cluster: the nodes that did not answer in time; the page
    /// lacks their part.
    #[schema(nullable = false)]
    partial: Option<Vec<String>>,
}

/// `GET /v1/names`: per message name, counters and reply latency.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct NamesListing {
    at: u64,
    #[schema(value_type = Vec<Object>)]
    names: Vec<()>,
    names_max: u64,
    names_over_cap: u64,
    /// On a cluster: the nodes that did not answer in time; the page
    /// lacks their part.
    #[schema(nullable = false)]
    partial: Option<Vec<String>>,
}

/// `GET /v1/topology`: who sent what to whom.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Topology {
    at: u64,
    services: Vec<String>,
    edges: Vec<TopologyEdge>,
    /// On a cluster: the nodes that did not answer in time; the page
    /// lacks their part.
    #[schema(nullable = false)]
    partial: Option<Vec<String>>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct TopologyEdge {
    from: String,
    to: String,
    name: String,
    count: u64,
    errors: u64,
}

/// `GET /v1/dead-letters/{service}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct DeadLetters {
    service: String,
    /// Dead letters the service holds.
    total: u64,
    /// The largest page.
    listed_max: u64,
    /// This page, by id.
    dead_letters: Vec<DeadLetter>,
    /// The next page's `after`; null when this is the last page.
    rest_after: Option<u64>,
}

/// A dead letter; one read by its id also carries the message's version,
/// activity_id, key, headers and payload.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct DeadLetter {
    id: u64,
    attempts: u32,
    reason: String,
    dead_lettered_at: u64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Replayed {
    service: String,
    id: u64,
    replayed: bool,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Purged {
    service: String,
    purged: u64,
}

/// A pause or resume: one pattern, or all of the service's when left out.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct PauseChange {
    pattern: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Paused {
    service: String,
    /// The patterns this call changed.
    patterns: Vec<String>,
    /// The service's patterns paused now.
    paused: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route_and_problem_errors() {
        let doc: serde_json::Value = serde_json::from_str(document_json()).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        for route in [
            "/v1/messages/{name}",
            "/v1/requests/{name}",
            "/v1/registry",
            "/v1/services/{name}",
            "/v1/services",
            "/v1/dead-letters/{service}/{id}/replay",
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/openapi.json",
        ] {
            assert!(paths.contains_key(route), "{route} is not documented");
        }
        // One template per route: polling an asynchronous request is the
        // GET of the requests' route.
        assert!(doc["paths"]["/v1/requests/{name}"]["get"].is_object());
        let bad = &doc["paths"]["/v1/messages/{name}"]["post"]["responses"]["400"];
        assert!(
            bad["content"]["application/problem+json"].is_object(),
            "{bad}"
        );
        assert!(bad["headers"]["Courier-Error"].is_object(), "{bad}");
        assert!(doc["components"]["schemas"]["Problem"]["properties"]["type"].is_object());
    }
}
