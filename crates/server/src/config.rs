//! What a server is told: `ServerConfig` and its defaults, and why it
//! may refuse to start (`ServerError`).

use std::net::SocketAddr;

use courier_proto::FRAME_BYTES_MAX_DEFAULT;
use thiserror::Error;

use crate::{gateway, BrokerConfig, TlsSettings, TraceSettings};

/// Listener settings; each limit is named with its unit.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The frame limit announced in WELCOME, for both directions: the
    /// longest frame a client may send, and the longest the broker sends
    /// (it refuses messages whose delivery would be longer). Overrides
    /// `broker.frame_bytes_max`.
    pub frame_bytes_max: u32,
    /// A connection must finish HELLO within this time (its TLS handshake
    /// included), whether it goes silent or shuts its write side.
    pub handshake_timeout_ms: u64,
    /// Once a frame has begun to arrive, all of it must arrive within this
    /// time, or the connection is closed (`read_timeout`).
    pub frame_timeout_ms: u64,
    /// An established connection that sends nothing (not even a PING) for
    /// this long is closed (`read_timeout`). The SDK pings every 10 s.
    pub keepalive_timeout_ms: u64,
    /// Connections open at once, in their handshake or established; more
    /// are answered `too_many_connections` and closed, so the process never
    /// runs out of file descriptors. `courier serve` sizes it from its
    /// open-files limit.
    pub connections_max: usize,
    /// Bytes queued for one connection at which it gets no more deliveries
    /// until it has written all but a quarter of them (back-pressure).
    pub pause_bytes: usize,
    /// Bytes queued for one connection before it counts as a slow consumer
    /// and is cut off (its unacked deliveries go to other instances).
    pub pending_bytes_max: usize,
    /// Reads are made in chunks of at least this size.
    pub read_buffer_bytes: usize,
    /// A snapshot is taken this often (when anything changed), so recovery
    /// replays at most this much log.
    pub checkpoint_interval_ms: u64,
    /// `courier.toml`: who may connect, send and receive what. Reloaded on
    /// SIGHUP and when the file changes.
    pub manifest_path: Option<std::path::PathBuf>,
    /// Accept unauthenticated connections on a non-loopback address.
    pub insecure: bool,
    /// Connections still in their handshake at once; more are closed at once.
    pub handshakes_max: usize,
    /// The background scrub of the log's sealed segments; `None`: off.
    pub scrub: Option<ScrubSettings>,
    /// TLS on the listener: every connection's TLS handshake comes before
    /// HELLO and counts against `handshake_timeout_ms`. TLS alone is not
    /// authentication (the `insecure` rule is unchanged).
    pub tls: Option<TlsSettings>,
    /// The HTTP port (health, readiness, metrics); `None` serves none.
    pub http: Option<SocketAddr>,
    /// DNS for the service registry (UDP and TCP, `NAME.service.courier.`);
    /// `None` serves none.
    pub dns: Option<SocketAddr>,
    /// Activity traces; `None` keeps none.
    pub trace: Option<TraceSettings>,
    /// The file of the key the HTTP gateway derives each service's webhook
    /// secret from, made on first start; `None`: a key for this process
    /// only (its secrets change with every start).
    pub webhook_key: Option<std::path::PathBuf>,
    /// A node on a NATS JetStream cluster (the store given to
    /// [`crate::Server::bind`] is then the cluster's); `None`: a single
    /// broker on its own store.
    pub cluster: Option<std::sync::Arc<crate::ClusterNode>>,
    pub broker: BrokerConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            handshake_timeout_ms: 10_000,
            frame_timeout_ms: FRAME_TIMEOUT_MS_DEFAULT,
            keepalive_timeout_ms: KEEPALIVE_TIMEOUT_MS_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            pending_bytes_max: 64 * 1024 * 1024,
            pause_bytes: 4 * 1024 * 1024,
            read_buffer_bytes: 64 * 1024,
            checkpoint_interval_ms: 30_000,
            manifest_path: None,
            insecure: false,
            handshakes_max: 1024,
            scrub: None,
            tls: None,
            http: None,
            dns: None,
            trace: Some(TraceSettings::default()),
            webhook_key: None,
            cluster: None,
            broker: BrokerConfig::default(),
        }
    }
}

/// Where and how fast the background scrub reads (docs/STORAGE.md §8.8).
#[derive(Debug, Clone)]
pub struct ScrubSettings {
    /// The log's directory (`LogConfig::dir`).
    pub log_dir: std::path::PathBuf,
    /// Bytes read per second at most (the scrub's whole I/O).
    pub bytes_per_sec: u64,
    /// A pass starts this long after the previous one started (or when it
    /// ends, if it took longer). The first starts with the broker.
    pub pass_interval_ms: u64,
}

/// Default of [`ScrubSettings::bytes_per_sec`]: a 64 MiB segment in 8 s,
/// a 10 GiB log in about 21 minutes, a small share of any disk.
pub const SCRUB_BYTES_PER_SEC_DEFAULT: u64 = 8 * 1024 * 1024;

/// Default of [`ScrubSettings::pass_interval_ms`]: hourly.
pub const SCRUB_PASS_INTERVAL_MS_DEFAULT: u64 = 3_600_000;

/// Default of [`ServerConfig::frame_timeout_ms`]: a frame of the default
/// 8 MiB limit still arrives at 280 KB/s.
pub const FRAME_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// Default of [`ServerConfig::keepalive_timeout_ms`]: six of the SDK's
/// 10-second PING intervals, so a lost PING or two never cuts an idle
/// client, while a dead peer's descriptor is freed within a minute.
pub use courier_proto::KEEPALIVE_TIMEOUT_MS_DEFAULT;

/// Default of [`ServerConfig::connections_max`] when nothing sized it from
/// the process's open-files limit.
pub const CONNECTIONS_MAX_DEFAULT: usize = 4096;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("{0}")]
    Manifest(String),
    #[error(
        "refusing to listen on {0} without authentication: anyone who can reach it could send anything; \
         pass --manifest courier.toml, or --insecure if that is really what you want"
    )]
    Insecure(SocketAddr),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    WebhookKey(#[from] gateway::webhook::WebhookKeyError),
    #[error("cannot start the activity traces' thread: {0}")]
    Trace(std::io::Error),
    #[error("cannot recover the broker's state from its store: {0}")]
    Recovery(#[from] courier_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for HTTP on {addr}: {source}; pass --http with a free address, or --http off")]
    BindHttp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve HTTP on {0} without authentication: anyone who can reach it could read the broker's metrics; \
         pass --manifest courier.toml (its [admin] tokens guard the port), or --insecure if that is really what you want"
    )]
    InsecureHttp(SocketAddr),
    #[error("cannot serve DNS on {addr} (UDP and TCP): {source}; pass --dns with a free address")]
    BindDns {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve DNS on {0}: DNS has no authentication, so anyone who can reach it could list the registry's services and addresses; \
         bind it to loopback (e.g. --dns 127.0.0.1:8600), or pass --insecure if that is really what you want"
    )]
    InsecureDns(SocketAddr),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_loopback_and_pause_a_receiver_before_cutting_it_off() {
        let config = ServerConfig::default();
        // Without a manifest, only loopback may be listened on
        // (`ServerError::Insecure`): the defaults must start as they are.
        assert!(config.listen.ip().is_loopback());
        assert!(config.pause_bytes < config.pending_bytes_max);
        assert_eq!(config.frame_bytes_max, FRAME_BYTES_MAX_DEFAULT);
        assert!(config.trace.is_some(), "activity traces are on by default");
    }

    #[test]
    fn refusals_to_start_name_the_fix() {
        let addr = SocketAddr::from(([0, 0, 0, 0], 7700));
        let cases = [
            (ServerError::Insecure(addr), "--manifest"),
            (ServerError::InsecureHttp(addr), "--manifest"),
            (ServerError::InsecureDns(addr), "loopback"),
            (
                ServerError::BindHttp {
                    addr,
                    source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
                },
                "--http off",
            ),
            (
                ServerError::BindDns {
                    addr,
                    source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
                },
                "--dns",
            ),
        ];
        for (error, fix) in cases {
            let said = error.to_string();
            assert!(said.contains(fix), "{said}");
            assert!(said.contains("0.0.0.0:7700"), "{said}");
        }
    }
}
