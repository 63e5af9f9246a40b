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

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use courier_client::{BoxRead, BoxWrite, Client, ClientOptions, Connector};
use courier_manifest::Identity;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::http::problem;
use crate::Shared;

mod credentials;
mod envelope;
pub(crate) mod requests;
mod sessions;
pub(crate) mod subscribe;
pub(crate) mod webhook;
mod ws;

use envelope::refusal;
use requests::AsyncRequests;

/// The service an unauthenticated loopback caller acts for when the
/// broker runs without a manifest.
pub(crate) const ANONYMOUS_SERVICE: &str = "http";

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
    let subscriptions = sessions::Subscriptions::new(gateway.clone());
    Router::new()
        .route("/v1/messages/{name}", post(requests::post_message))
        .route(
            "/v1/requests/{name}",
            post(requests::post_request).get(requests::get_request),
        )
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

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}
