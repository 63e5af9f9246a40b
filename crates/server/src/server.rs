//! `Server` (bind, recover, run) and `ServerHandle`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_broker::{Broker, FastMap, RecoveryReport};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::warn;

use crate::accept::{refuse_over_cap, serve_connection, ConnectionSlot};
use crate::background::{reload_manifest, run_scrub, run_timer, watch_manifest};
use crate::shared::say_alerts;
use crate::{
    dns, gateway, group_commit, http, load_manifest, registry, tail, tls, trace, wall_nanos,
    BrokerConfig, ServerConfig, ServerError, Shared, Store,
};

/// A running broker.
pub struct Server {
    pub(crate) shared: Arc<Shared>,
    pub(crate) listener: TcpListener,
    pub(crate) http: Option<http::HttpListener>,
    pub(crate) dns: Option<dns::DnsListener>,
    pub(crate) recovery: RecoveryReport,
}

/// Operations on a running server from outside its tasks.
#[derive(Clone)]
pub struct ServerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl ServerHandle {
    /// Reads the manifest file again. A bad one is refused (the error names
    /// line and column) and the one in force stays; a good one takes effect
    /// at once, and connections whose credentials it no longer accepts are
    /// closed.
    pub fn reload_manifest(&self) -> Result<(), String> {
        reload_manifest(&self.shared)
    }

    /// Snapshots the state and compacts the store (also done periodically);
    /// returns the bytes freed. The core's lock is held to encode the
    /// state and to let go of old segments, not for the files: writing the
    /// snapshot and deleting segments run without it, so sends and
    /// deliveries go on meanwhile.
    pub fn checkpoint(&self) -> Result<u64, courier_store::StoreError> {
        let shared = &self.shared;
        let _one_at_a_time = shared
            .checkpointing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut snapshot = {
            let mut core = shared.core();
            let now = shared.clock.now();
            core.set_wall_offset(shared.clock.wall_offset(now));
            let begun = core.begin_checkpoint(now);
            say_alerts(&mut core);
            match begun? {
                Some(snapshot) => snapshot,
                None => return Ok(0),
            }
        };
        snapshot.write()?;
        {
            let mut core = shared.core();
            let ready = core.checkpoint_ready(&snapshot);
            say_alerts(&mut core);
            ready?;
        }
        let covers = snapshot.covers();
        snapshot.install()?;
        let removal = {
            let mut core = shared.core();
            let now = shared.clock.now();
            core.set_wall_offset(shared.clock.wall_offset(now));
            let finished = core.finish_checkpoint(covers, now);
            say_alerts(&mut core);
            finished?
        };
        removal.run()
    }
}

impl Server {
    /// Binds the listener; call [`Server::run`] to serve.
    pub async fn bind(config: ServerConfig, store: Store) -> Result<Server, ServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let mut manifest_modified = None;
        let manifest = match &config.manifest_path {
            Some(path) => {
                let (manifest, modified) = load_manifest(path).map_err(ServerError::Manifest)?;
                manifest_modified = modified;
                Some(manifest)
            }
            None => None,
        };
        if manifest.is_none() && !config.insecure && !config.listen.ip().is_loopback() {
            return Err(ServerError::Insecure(config.listen));
        }
        if let Some(addr) = config.http {
            if manifest.is_none() && !config.insecure && !addr.ip().is_loopback() {
                return Err(ServerError::InsecureHttp(addr));
            }
        }
        let http = match config.http {
            Some(addr) => Some(
                http::HttpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::BindHttp { addr, source })?,
            ),
            None => None,
        };
        let dns = match config.dns {
            Some(addr) if !config.insecure && !addr.ip().is_loopback() => {
                return Err(ServerError::InsecureDns(addr));
            }
            Some(addr) => Some(
                dns::DnsListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::BindDns { addr, source })?,
            ),
            None => None,
        };
        let tls = match &config.tls {
            Some(settings) => Some(tls::acceptor(settings).map_err(ServerError::Tls)?),
            None => None,
        };
        // One limit both ways: what clients may send, and what the broker
        // accepts only if its delivery fits.
        let broker_config = BrokerConfig {
            frame_bytes_max: config.frame_bytes_max,
            ..config.broker.clone()
        };
        let clock = crate::clock::Clock::system();
        let mut core = Broker::new(broker_config, store);
        core.set_manifest(manifest);
        let recovery_started = std::time::Instant::now();
        let now = clock.now();
        core.set_wall_offset(clock.wall_offset(now));
        let recovery = core.recover(now)?;
        let recovery_seconds = recovery_started.elapsed().as_secs_f64();
        say_alerts(&mut core);
        let tracer = match &config.trace {
            Some(settings) if config.cluster.is_some() => Some(
                trace::Tracer::start_on_cluster(settings, wall_nanos())
                    .map_err(ServerError::Trace)?,
            ),
            Some(settings) => {
                Some(trace::Tracer::start(settings, wall_nanos()).map_err(ServerError::Trace)?)
            }
            None => None,
        };
        core.set_tracing(
            tracer
                .as_ref()
                .and(config.trace.as_ref())
                .map(|settings| settings.rate),
        );
        let webhook_key = match &config.webhook_key {
            Some(path) => gateway::webhook::WebhookKey::load_or_create(path),
            None => gateway::webhook::WebhookKey::ephemeral(),
        }?;
        let cluster = config
            .cluster
            .clone()
            .map(crate::cluster_edge::ClusterEdge::new);
        Ok(Server {
            recovery,
            http,
            dns,
            shared: Arc::new(Shared {
                config,
                clock,
                registry: registry::RegistryEdge::new(),
                credentials: Mutex::new(HashMap::new()),
                tls,
                manifest_modified: Mutex::new(manifest_modified),
                handshakes: std::sync::atomic::AtomicUsize::new(0),
                connections: std::sync::atomic::AtomicUsize::new(0),
                refusals: std::sync::atomic::AtomicUsize::new(0),
                cap_warned_at: AtomicU64::new(0),
                connections_warned_at: AtomicU64::new(0),
                paused: Mutex::new(std::collections::HashSet::new()),
                core: Mutex::new(core),
                core_lock: crate::core_lock::LockStats::default(),
                outboxes: Mutex::new(FastMap::default()),
                peers: Mutex::new(FastMap::default()),
                next_conn: AtomicU64::new(1),
                timer_due: AtomicU64::new(u64::MAX),
                timer_wake: Arc::new(Notify::new()),
                recovery_seconds,
                frames_in: AtomicU64::new(0),
                entries_out: AtomicU64::new(0),
                tails: tail::Tails::new(cluster.as_ref().map(|edge| edge.node.node.as_str())),
                tracer,
                webhooks: Arc::default(),
                webhook_key,
                committer: Arc::default(),
                backend_syncs: Default::default(),
                checkpointing: Mutex::new(()),
                dispatching: Mutex::new(()),
                cluster,
            }),
            listener,
        })
    }

    /// What recovery found at start-up.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The HTTP port's address, if it serves one (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr().ok())
    }

    /// The DNS port's address (UDP and TCP), if it serves one.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().and_then(|d| d.local_addr().ok())
    }

    /// Serves until the task is dropped.
    pub async fn run(mut self) {
        let _dns = self
            .dns
            .take()
            .map(|dns| AbortOnDrop(tokio::spawn(dns.serve(self.shared.clone()))));
        let _http = self.http.take().map(|http| {
            AbortOnDrop(tokio::spawn(
                http.serve(self.shared.clone(), self.listener.local_addr()),
            ))
        });
        if let Some(settings) = self.shared.config.scrub.clone() {
            let shared = Arc::downgrade(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("courier-scrub".to_string())
                .spawn(move || run_scrub(shared, settings));
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start the background scrub; sealed segments are checked only when read");
            }
        }
        group_commit::start(&self.shared);
        let _timer = tokio::spawn(run_timer(self.shared.clone()));
        let _checks = AbortOnDrop(tokio::spawn(registry::report_results(self.shared.clone())));
        let _reloader = tokio::spawn(watch_manifest(self.shared.clone()));
        let _cluster = crate::cluster_edge::start(&self.shared);
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match ConnectionSlot::take(&self.shared) {
                        Some(slot) => {
                            tokio::spawn(serve_connection(self.shared.clone(), slot, stream, peer));
                        }
                        None => refuse_over_cap(&self.shared, stream, peer),
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Stops a spawned task when the server's task is dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
