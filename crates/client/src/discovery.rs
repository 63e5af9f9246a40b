//! [`Client::discover`]: a service's healthy endpoints, kept current by
//! long-polling the broker's registry (`GET /v1/services/NAME?index=N`
//! on its HTTP port), with change notifications and client-side load
//! balancing for calls under a [`Policy`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use courier_resilience::{Balance, Balancer, BoxError, Idempotency, InFlight, Policy, Spread};
use serde::Deserialize;
use tokio::sync::watch;

use crate::{http, Client, Error, Result};

/// How long one long-poll asks the broker to hold it.
const WAIT: Duration = Duration::from_secs(30);
/// How long past `WAIT` an answer may take before the poll is given up.
const ANSWER_SLACK: Duration = Duration::from_secs(10);
/// Bytes of an answer read at most (a service's instance list).
const ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;
const RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);

/// The broker's HTTP port when nothing names it.
pub(crate) const HTTP_PORT_DEFAULT: u16 = 7780;

/// One healthy instance of a service, as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Endpoint {
    /// The instance id.
    pub id: String,
    /// `host:port`, as registered (or advertised).
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// `passing` or `warning` (the lookup lists healthy instances only).
    #[serde(default)]
    pub health: String,
}

/// A service's endpoints at one registry index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The registry's index when the broker answered.
    pub index: u64,
    pub endpoints: Arc<[Endpoint]>,
}

#[derive(Deserialize)]
struct Answer {
    index: u64,
    instances: Vec<Endpoint>,
}

/// A watched list of one service's healthy endpoints (see
/// [`Client::discover`]). Cheap to clone; clones share the watch and the
/// balancer. The watch stops when the last clone is dropped.
#[derive(Clone)]
pub struct Discovery {
    service: Arc<str>,
    balancer: Arc<Balancer>,
    current: watch::Receiver<Endpoints>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("service", &self.service)
            .field("endpoints", &*self.current.borrow())
            .finish()
    }
}

impl Discovery {
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The endpoints now (as of the last answer of the broker).
    pub fn endpoints(&self) -> Endpoints {
        self.current.borrow().clone()
    }

    /// Waits until the list of endpoints changes, and returns the new one.
    /// Changes come in the registry's order; a reader slower than the
    /// changes sees the latest list, not every one in between.
    pub async fn changed(&mut self) -> Result<Endpoints> {
        self.current.changed().await.map_err(|_| Error::Shutdown)?;
        Ok(self.current.borrow_and_update().clone())
    }

    /// Waits (at most `timeout`) until `ready` holds for the endpoints.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut(&Endpoints) -> bool,
    ) -> Result<Endpoints> {
        let waited = tokio::time::timeout(timeout, self.current.wait_for(|e| ready(e))).await;
        match waited {
            Ok(Ok(endpoints)) => Ok(endpoints.clone()),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// The balancer (its outstanding counts per endpoint id).
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Picks an endpoint as the balancer does; the pick counts as a call
    /// outstanding on it until the [`InFlight`] is dropped.
    pub fn pick(&self) -> Option<(Endpoint, InFlight)> {
        let endpoints = self.current.borrow().endpoints.clone();
        self.balancer
            .pick(&endpoints, |e| e.id.as_str())
            .map(|(endpoint, in_flight)| (endpoint.clone(), in_flight))
    }

    /// Calls the service under `policy`: each attempt picks an endpoint
    /// (a retry may go to another one) and runs `call` with it. Each
    /// endpoint has a breaker of its own in the policy: the balancer's
    /// pick is passed over while its breaker is open (its half-open probe
    /// still goes to it), and the call fails at once with
    /// [`courier_resilience::Error::Open`] only when every endpoint's
    /// breaker is open. With no healthy endpoint an attempt fails with
    /// [`courier_resilience::Error::NoEndpoints`].
    pub async fn call<T, E, F, Fut>(
        &self,
        policy: &Policy,
        idempotency: Idempotency,
        call: F,
    ) -> std::result::Result<T, courier_resilience::Error>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<BoxError>,
    {
        let endpoints = || self.current.borrow().endpoints.clone();
        let spread = Spread {
            service: &self.service,
            balancer: &self.balancer,
            endpoints: &endpoints,
            key: |e: &Endpoint| e.id.as_str(),
        };
        policy.call_spread(idempotency, &spread, call).await
    }
}

impl Client {
    /// Watches the healthy endpoints of `service` in the broker's registry,
    /// balanced round robin; see [`Client::discover_with`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use courier_client::{BreakerConfig, Client, ClientOptions, Idempotency, Policy};
    ///
    /// # async fn get(address: &str, path: &str) -> std::io::Result<String> { Ok(String::new()) }
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut opts = ClientOptions::from_env();
    /// opts.http = Some("127.0.0.1:7780".into()); // the broker's --http
    /// let client = Client::connect(opts).await?;
    ///
    /// // One policy per dependency, shared by every call to it.
    /// let todo_api = Policy::builder("todo-api")
    ///     .timeout(Duration::from_secs(2))
    ///     .retries(2)                          // idempotent calls only
    ///     .breaker(BreakerConfig::default())   // 5 failures in a row, or 50 % of 20+ calls in 10 s
    ///     .bulkhead(32)                        // more outstanding calls fail at once
    ///     .build();
    ///
    /// let mut todo = client.discover("todo").await?;
    /// let list = todo
    ///     .call(&todo_api, Idempotency::Idempotent, |endpoint| async move {
    ///         get(&endpoint.address, "/todos").await // any HTTP client
    ///     })
    ///     .await?;
    ///
    /// // Bus requests run under a policy the same way.
    /// let pricing = Policy::builder("pricing").breaker(BreakerConfig::default()).build();
    /// let quote = pricing.call(|| client.request("pricing.quote", &7)).await?;
    ///
    /// // Changes to the list, as they happen; and metrics for /metrics.
    /// let now = todo.changed().await?;
    /// let text = courier_client::resilience::prometheus_text(&[todo_api.snapshot(), pricing.snapshot()]);
    /// # Ok(()) }
    /// ```
    pub async fn discover(&self, service: &str) -> Result<Discovery> {
        self.discover_with(service, Balance::RoundRobin).await
    }

    /// Watches the healthy endpoints of `service` through the broker's
    /// HTTP port ([`ClientOptions::http`](crate::ClientOptions::http)),
    /// sending the client's token as a bearer token. Fails if the first
    /// lookup fails; after that, a failed poll is retried with backoff and
    /// the last list stays in use meanwhile.
    pub async fn discover_with(&self, service: &str, balance: Balance) -> Result<Discovery> {
        let lookup = Lookup {
            http: match &self.inner.opts.http {
                Some(http) => HttpPort::Named(trim_http(http)),
                None => HttpPort::BrokerHost(Arc::downgrade(&self.inner)),
            },
            token: self.inner.opts.token.clone(),
            service: service.to_string(),
        };
        let first = lookup.get(None).await?;
        let (sender, current) = watch::channel(first);
        let balancer = Arc::new(Balancer::new(balance));
        tokio::spawn(watch_loop(lookup, sender, balancer.clone()));
        Ok(Discovery {
            service: service.into(),
            balancer,
            current,
        })
    }
}

fn trim_http(http: &str) -> String {
    http.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// The host of the broker connected to (or last connected to), with the
/// default HTTP port: after a failover, the lookups follow the client to
/// its new broker.
fn broker_http_port(inner: &crate::Inner) -> String {
    let index = inner.lock().address;
    let address = inner.address(index);
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    format!("{host}:{HTTP_PORT_DEFAULT}")
}

/// Where lookups go.
enum HttpPort {
    /// [`ClientOptions::http`](crate::ClientOptions::http).
    Named(String),
    /// The host of the broker the client is connected to, whichever of its
    /// addresses that is at each lookup. Weak: the watch does not keep a
    /// dropped client's state alive.
    BrokerHost(std::sync::Weak<crate::Inner>),
}

impl HttpPort {
    fn address(&self) -> Result<String> {
        match self {
            HttpPort::Named(http) => Ok(http.clone()),
            HttpPort::BrokerHost(inner) => inner
                .upgrade()
                .map(|inner| broker_http_port(&inner))
                .ok_or(Error::Shutdown),
        }
    }
}

async fn watch_loop(lookup: Lookup, sender: watch::Sender<Endpoints>, balancer: Arc<Balancer>) {
    let mut delay = RETRY_DELAY_MIN;
    loop {
        let index = sender.borrow().index;
        let answer = tokio::select! {
            answer = lookup.get(Some(index)) => answer,
            () = sender.closed() => return,
        };
        match answer {
            Ok(endpoints) => {
                delay = RETRY_DELAY_MIN;
                let ids: Vec<&str> = endpoints.endpoints.iter().map(|e| e.id.as_str()).collect();
                balancer.retain(&ids);
                sender.send_if_modified(|current| {
                    let changed = current.endpoints != endpoints.endpoints;
                    *current = endpoints;
                    changed
                });
            }
            // The client is gone, and with it the broker to ask.
            Err(Error::Shutdown) => return,
            Err(error) => {
                tracing::debug!(service = %lookup.service, %error, "registry lookup failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = sender.closed() => return,
                }
                delay = (delay * 2).min(RETRY_DELAY_MAX);
            }
        }
    }
}

struct Lookup {
    http: HttpPort,
    token: Option<String>,
    service: String,
}

fn lookup_error(http: &str, reason: impl Into<String>) -> Error {
    Error::Discovery {
        http: http.to_string(),
        reason: reason.into(),
    }
}

impl Lookup {
    /// `GET /v1/services/NAME`; with an index, held until the registry
    /// moves past it (or `WAIT` passes).
    async fn get(&self, index: Option<u64>) -> Result<Endpoints> {
        let http = self.http.address()?;
        let mut path = format!("/v1/services/{}", encode_path(&self.service));
        if let Some(index) = index {
            path.push_str(&format!("?index={index}&wait={}s", WAIT.as_secs()));
        }
        let limit = if index.is_some() {
            WAIT + ANSWER_SLACK
        } else {
            ANSWER_SLACK
        };
        let (status, body) = tokio::time::timeout(limit, self.http_get(&http, &path))
            .await
            .map_err(|_| lookup_error(&http, format!("no answer within {limit:?}")))??;
        if status != 200 {
            let detail = http::problem_detail(&body);
            return Err(lookup_error(&http, format!("{status}: {detail}")));
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            lookup_error(&http, format!("the answer is not a registry listing: {e}"))
        })?;
        Ok(Endpoints {
            index: answer.index,
            endpoints: answer.instances.into(),
        })
    }

    async fn http_get(&self, http: &str, path: &str) -> Result<(u16, Vec<u8>)> {
        let answer = http::exchange(
            http,
            "GET",
            path,
            self.token.as_deref(),
            None,
            ANSWER_BYTES_MAX,
        )
        .await
        .map_err(|e| match e {
            http::HttpError::Unreachable { source, .. } => lookup_error(http, format!(
                "{source} — is the broker's HTTP port there? Set ClientOptions::http (or COURIER_HTTP) to its --http address"
            )),
            http::HttpError::Io { source, .. } => lookup_error(http, source.to_string()),
            other => lookup_error(http, other.to_string()),
        })?;
        Ok((answer.status, answer.body))
    }
}

/// Percent-encodes what is not unreserved in a path segment.
fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_for_the_path() {
        assert_eq!(encode_path("todo.api-v1"), "todo.api-v1");
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }
}
