//! NATS's side of the workloads ([`Side`] and its extensions):
//! async-nats against a nats-server child with JetStream (see
//! `nats_server.rs`), started fresh per run. W1–W3 are in
//! `nats_transient.rs`, W6–W8 in `nats_backlog.rs`.

use super::*;

use super::nats_server::NatsServer;
pub(super) use super::nats_server::{install, NatsInstall};
use super::side::{self, Fsync, IdleSide, Key, Side};
use async_nats::jetstream;
use futures_util::StreamExt as _;

/// async-nats, as in Cargo.toml.
pub(super) const CLIENT_VERSION: &str = "0.51";

/// `--nats-msg-ids`: W5's publishes carry a `Nats-Msg-Id` each. Set once,
/// before any run.
pub(super) static MSG_IDS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Publishes `payload` on `subject`, with a fresh `Nats-Msg-Id` under
/// `--nats-msg-ids`.
async fn publish_maybe_with_id(
    js: &jetstream::Context,
    subject: String,
    payload: Bytes,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    if !MSG_IDS.load(std::sync::atomic::Ordering::Relaxed) {
        return js.publish(subject, payload).await;
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        uuid::Uuid::now_v7().hyphenated().to_string().as_str(),
    );
    js.publish_with_headers(subject, headers, payload).await
}
/// Core NATS subject of W4.
const REQUEST_SUBJECT: &str = "bench.requests";
/// async-nats drops messages for a subscription whose buffer is full (a
/// "slow consumer"); the subscriptions of W1–W3 get room for a whole run,
/// and never less than the client's default.
pub(super) const MIN_SUBSCRIPTION_CAPACITY: usize = 65_536;
/// JetStream API requests and publish acks wait this long (async-nats's
/// default is 5 s, short for a slow disk with `sync_interval: always`).
pub(super) const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// After a client reported dropped messages or a lost connection, the
/// receivers may still catch up for this long before the run fails.
pub(super) const LOSS_GRACE: Duration = Duration::from_secs(1);
/// Reconnect attempts of a client before it gives up; a reconnect would
/// mean lost messages anyway, and a client of a killed server stops soon.
const MAX_RECONNECTS: usize = 3;

// ---------------------------------------------------------------------------
// Clients

/// What a client's event callback reported: dropped messages (slow
/// consumer), lost connections, errors from the server.
#[derive(Default)]
pub(super) struct ClientEvents {
    slow_consumer: AtomicU64,
    pub(super) closed: AtomicBool,
    closed_notify: Notify,
    other: Mutex<Vec<String>>,
}

impl ClientEvents {
    pub(super) fn record(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {}
            async_nats::Event::SlowConsumer(_) => {
                self.slow_consumer.fetch_add(1, Ordering::Relaxed);
            }
            async_nats::Event::Closed => {
                self.closed.store(true, Ordering::Release);
                self.closed_notify.notify_waiters();
            }
            other => {
                let mut list = self.other.lock().unwrap_or_else(|p| p.into_inner());
                if list.len() < 8 {
                    list.push(other.to_string());
                }
            }
        }
    }

    /// Whether messages may have been lost.
    pub(super) fn troubled(&self) -> bool {
        self.slow_consumer.load(Ordering::Relaxed) > 0
            || !self
                .other
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

    /// `; the client reported …`, or nothing.
    pub(super) fn note(&self) -> String {
        let mut parts = Vec::new();
        let slow = self.slow_consumer.load(Ordering::Relaxed);
        if slow > 0 {
            parts.push(format!(
                "{slow} slow-consumer drop(s) (a subscription's buffer was full)"
            ));
        }
        parts.extend(
            self.other
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        if parts.is_empty() {
            String::new()
        } else {
            format!("; the NATS clients reported: {}", parts.join(", "))
        }
    }
}

/// The servers an address names: one URL, or several comma-separated
/// (the servers of a cluster), each `nats://[user:password@]host:port`.
pub(super) fn server_addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(|one| {
            one.trim()
                .parse::<async_nats::ServerAddr>()
                .with_context(|| format!("{one:?} is not a NATS server URL"))
        })
        .collect()
}

/// The replicas of the streams made through `address`: one per server it
/// names (a cluster's three get R3, one server R1).
pub(super) fn replicas_for(address: &str) -> usize {
    address.split(',').count()
}

/// One connection as `name`, with subscriptions buffering up to `capacity`
/// messages; its events go to `events`. `url` may name several servers,
/// and a user and password (taken from the first that has them).
pub(super) async fn connect(
    url: &str,
    name: &str,
    capacity: usize,
    events: &Arc<ClientEvents>,
) -> anyhow::Result<async_nats::Client> {
    let servers = server_addrs(url)?;
    let mut options = async_nats::ConnectOptions::new();
    // async-nats 0.51 ignores the user in a URL: it goes in the options.
    if let Some(server) = servers.iter().find(|s| s.has_user_pass()) {
        if let (Some(user), Some(password)) = (server.username(), server.password()) {
            options = options.user_and_password(user.to_string(), password.to_string());
        }
    }
    let events = events.clone();
    options
        .name(name)
        .subscription_capacity(capacity)
        .max_reconnects(MAX_RECONNECTS)
        // Tried in the order given (the client shuffles them otherwise),
        // so the clients of a run spread over a cluster as they are told.
        .retain_servers_order()
        .event_callback(move |event| {
            let events = events.clone();
            async move { events.record(event) }
        })
        .connect(servers)
        .await
        .with_context(|| format!("cannot connect to nats-server at {url} as {name}"))
}

/// Drains a connection and waits (briefly) until it is closed, so that it
/// does not reconnect to a restarted server.
pub(super) async fn close(client: async_nats::Client, events: &ClientEvents) {
    if client.drain().await.is_err() {
        return;
    }
    drop(client);
    let closed = async {
        while !events.closed.load(Ordering::Acquire) {
            let _ =
                tokio::time::timeout(Duration::from_millis(10), events.closed_notify.notified())
                    .await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
}

pub(super) fn jetstream_context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(JETSTREAM_TIMEOUT)
        .build(client)
}

/// A file-storage stream `name` on `subject`; limits retention,
/// `replicas` replicas (1 on one server, 3 on the cluster).
pub(super) async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    replicas: usize,
) -> anyhow::Result<jetstream::stream::Stream> {
    js.create_stream(jetstream::stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create the JetStream stream {name}"))
}

/// Aborts its tasks on drop (they hold subscriptions, which would keep
/// their connections open).
#[derive(Default)]
pub(super) struct Tasks(pub(super) Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts a responder connection that answers every request on
/// [`REQUEST_SUBJECT`] with [`TINY_BYTES`]; the task stops when `tasks`
/// is dropped.
async fn start_responder(
    url: &str,
    events: &Arc<ClientEvents>,
    tasks: &mut Tasks,
) -> anyhow::Result<()> {
    let responder = connect(url, "bench-responder", MIN_SUBSCRIPTION_CAPACITY, events).await?;
    let mut requests = responder
        .subscribe(REQUEST_SUBJECT)
        .await
        .context("the responder cannot subscribe")?;
    responder
        .flush()
        .await
        .context("the responder's flush after subscribing failed")?;
    let reply = Bytes::from(vec![b'r'; TINY_BYTES]);
    tasks.0.push(tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(to) = request.reply {
                if responder.publish(to, reply.clone()).await.is_err() {
                    break;
                }
            }
        }
    }));
    Ok(())
}

// ---------------------------------------------------------------------------
// The runs, NATS side

/// Runs one job against a fresh nats-server (one per fsync setting where
/// the row has an `-always` twin).
pub(super) async fn run(
    job: Job,
    nats: &NatsInstall,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    if let Some((audience, size)) = side::Audience::of(job) {
        let mut side = NatsSide::start(nats, Fsync::Default).await?;
        return super::transient::run(&mut side, plan, audience, size, job.workload()).await;
    }
    match job {
        Job::PubSub(_) | Job::FanOut(_) | Job::Competing(_) => {
            bail!("internal: W1–W3 run above")
        }
        Job::RequestSequential | Job::RequestConcurrent => {
            bail!("internal: W4 runs through w4::run")
        }
        Job::PublishOneByOne => {
            on_both_fsyncs(nats, move |mut side, fsync| async move {
                let workload = fsync.pick(Workload::W5a, Workload::W5aAlways);
                super::publish::publish_one_by_one(&mut side, plan, workload).await
            })
            .await
        }
        Job::PublishPipelined => {
            on_both_fsyncs(nats, move |mut side, fsync| async move {
                let workload = fsync.pick(Workload::W5b, Workload::W5bAlways);
                super::publish::publish_windowed(&mut side, plan, workload).await
            })
            .await
        }
        Job::PublishConcurrent => {
            on_both_fsyncs(nats, move |mut side, fsync| async move {
                let twin = |c| Workload::w13(c, fsync == Fsync::Always);
                let (figures, _) =
                    super::publish::publish_concurrent(&mut side, plan, twin).await?;
                Ok(figures)
            })
            .await
        }
        Job::LargeEvents => {
            on_both_fsyncs(nats, move |mut side, fsync| async move {
                let workload = fsync.pick(Workload::W11, Workload::W11Always);
                super::publish::large_events(&mut side, plan, workload).await
            })
            .await
        }
        Job::Consume => {
            let mut side = NatsSide::start(nats, Fsync::Default).await?;
            super::backlog::consume(&mut side, plan).await
        }
        Job::Restart => {
            let mut side = NatsSide::start(nats, Fsync::Default).await?;
            super::restart::run(&mut side, plan).await
        }
        Job::Ordered(keys) => {
            let mut side = NatsSide::start(nats, Fsync::Default).await?;
            super::backlog::ordered(&mut side, plan, keys).await
        }
        Job::RequestUnderLoad => {
            let mut side = NatsSide::start(nats, Fsync::Default).await?;
            super::w4::requests_under_load(&mut side, plan).await
        }
        Job::IdleConnections => {
            let mut side = NatsSide::start(nats, Fsync::Default).await?;
            super::w9::run(&mut side, plan).await
        }
        Job::RoutingTable => {
            let mut side = NatsSide::start(nats, Fsync::Default).await?;
            super::w10::run(&mut side, plan).await
        }
        Job::Outbox => Ok(Vec::new()),
    }
}

/// Runs `work` on a fresh server at JetStream's default fsync, then on
/// one with `sync_interval: always`; their figures together.
async fn on_both_fsyncs<F, Fut>(nats: &NatsInstall, mut work: F) -> anyhow::Result<Vec<Measurement>>
where
    F: FnMut(NatsSide, Fsync) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<Measurement>>>,
{
    let mut measured = Vec::new();
    for fsync in Fsync::BOTH {
        let side = NatsSide::start(nats, fsync).await?;
        measured.extend(work(side, fsync).await.context(fsync.described())?);
    }
    Ok(measured)
}

/// NATS's side of the workloads: a fresh nats-server with JetStream,
/// driven through async-nats.
pub(super) struct NatsSide {
    pub(super) server: NatsServer,
}

impl NatsSide {
    pub(super) async fn start(nats: &NatsInstall, fsync: Fsync) -> anyhow::Result<NatsSide> {
        Ok(NatsSide {
            server: NatsServer::start(nats, fsync).await?,
        })
    }
}

/// The W4 requester and responder, NATS side.
pub(super) struct NatsRequester {
    // Stops the responder before the server is killed.
    tasks: Tasks,
    events: Arc<ClientEvents>,
    requester: async_nats::Client,
    payload: Bytes,
}

/// A publisher of durable events: a JetStream context, and its connection
/// to close.
#[derive(Clone)]
pub(super) struct NatsPublisher {
    pub(super) js: jetstream::Context,
    pub(super) client: async_nats::Client,
    pub(super) events: Arc<ClientEvents>,
}

impl NatsPublisher {
    /// Connects as `bench-publisher`.
    pub(super) async fn connect(url: &str) -> anyhow::Result<NatsPublisher> {
        let events = Arc::new(ClientEvents::default());
        let client = connect(
            url,
            PUBLISHER_CONNECTION,
            MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        Ok(NatsPublisher {
            js: jetstream_context(client.clone()),
            client,
            events,
        })
    }
}

/// The name a publisher's connection shows on the servers.
pub(super) const PUBLISHER_CONNECTION: &str = "bench-publisher";

/// The JetStream stream that holds the subject `name`:
/// `bench.w5.published` → `BENCH_W5_PUBLISHED`.
pub(super) fn stream_name(name: &str) -> String {
    name.to_ascii_uppercase().replace(['.', '-'], "_")
}

/// The subject of a keyed event named `name`: its last token replaced by
/// the key's partition and the key (`bench.w8.recorded`, key 7 of 16
/// partitions → `bench.w8.<partition of "7">.7`).
fn keyed_subject(name: &str, key: Key) -> String {
    let prefix = name.rsplit_once('.').map_or(name, |(prefix, _)| prefix);
    let value = key.value.to_string();
    format!(
        "{prefix}.{}.{value}",
        partition(&value) % key.partitions.max(1)
    )
}

/// The partition of a key as the server's `partition(16, …)` subject
/// mapping computes it (FNV-1a, 32 bits, of the token), before the modulo.
/// The publisher puts it in the subject itself: the same messages land on
/// the same subjects without the server's mapping, which this client's
/// stream config (no `server_2_10` feature) cannot set.
fn partition(key: &str) -> u64 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    u64::from(hash)
}

impl Side for NatsSide {
    type Publisher = NatsPublisher;
    type Pending = jetstream::context::PublishAckFuture;
    type Requester = NatsRequester;

    fn address(&self) -> String {
        self.server.url()
    }

    fn data_dir(&self) -> &Path {
        self.server.dir.path()
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        self.server.rss_mib()
    }

    async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.server.watch(work).await
    }

    async fn publisher(address: &str, name: &'static str) -> anyhow::Result<NatsPublisher> {
        let publisher = NatsPublisher::connect(address).await?;
        create_stream(
            &publisher.js,
            &stream_name(name),
            name,
            replicas_for(address),
        )
        .await?;
        Ok(publisher)
    }

    async fn publish(
        publisher: &NatsPublisher,
        name: &'static str,
        payload: Bytes,
    ) -> anyhow::Result<()> {
        publish_maybe_with_id(&publisher.js, name.to_string(), payload)
            .await
            .context("publish failed")?
            .await
            .context("publish was not acknowledged")?;
        Ok(())
    }

    async fn send(
        publisher: &NatsPublisher,
        name: &'static str,
        key: Option<Key>,
        payload: Bytes,
    ) -> anyhow::Result<Self::Pending> {
        let subject = match key {
            None => name.to_string(),
            Some(key) => keyed_subject(name, key),
        };
        let ack = publish_maybe_with_id(&publisher.js, subject, payload).await?;
        Ok(ack)
    }

    async fn acked(pending: Self::Pending) -> anyhow::Result<()> {
        pending.await.context("not acknowledged")?;
        Ok(())
    }

    async fn close_publisher(publisher: NatsPublisher) {
        let NatsPublisher { js, client, events } = publisher;
        drop(js);
        close(client, &events).await;
    }

    async fn requester(requester: &str, responder: &str) -> anyhow::Result<NatsRequester> {
        let events = Arc::new(ClientEvents::default());
        let mut tasks = Tasks::default();
        start_responder(responder, &events, &mut tasks).await?;
        let requester = connect(
            requester,
            "bench-requester",
            MIN_SUBSCRIPTION_CAPACITY,
            &events,
        )
        .await?;
        Ok(NatsRequester {
            tasks,
            events,
            requester,
            payload: Bytes::from(vec![b'q'; TINY_BYTES]),
        })
    }

    async fn request(requester: &NatsRequester, i: u64, of: u64) -> anyhow::Result<()> {
        requester
            .requester
            .request(REQUEST_SUBJECT, requester.payload.clone())
            .await
            .map_err(|e| {
                anyhow!(
                    "request {} of {of} failed: {e}{}",
                    i + 1,
                    requester.events.note()
                )
            })?;
        Ok(())
    }

    async fn close_requester(requester: NatsRequester) {
        drop(requester.tasks);
    }
}

/// One idle connection of W9, NATS side, and its queue subscription.
pub(super) struct NatsIdle {
    _client: async_nats::Client,
    _subscription: async_nats::Subscriber,
}

impl IdleSide for NatsSide {
    type Idle = NatsIdle;

    async fn idle(address: &str, service: u64) -> anyhow::Result<NatsIdle> {
        let (name, subject) = (super::w9::service(service), super::w9::pattern(service));
        let events = Arc::new(ClientEvents::default());
        let client = connect(address, &name, MIN_SUBSCRIPTION_CAPACITY, &events).await?;
        let subscription = client
            .queue_subscribe(subject.clone(), name.clone())
            .await
            .with_context(|| format!("{name} cannot subscribe to {subject}"))?;
        client
            .flush()
            .await
            .with_context(|| format!("{name}: flush after subscribing failed"))?;
        Ok(NatsIdle {
            _client: client,
            _subscription: subscription,
        })
    }

    async fn close_idle(idle: Vec<NatsIdle>) {
        drop(idle);
    }
}

// ---------------------------------------------------------------------------
// Settings

/// The NATS server and client settings, printed with the table.
pub(super) fn settings(nats: &NatsInstall, runtime: &str) -> Vec<String> {
    vec![
        "NATS server:".to_string(),
        format!("  {} ({})", nats.path.display(), nats.version),
        format!(
            "  config file per run: listen: 127.0.0.1:<free port>; max_payload: 8MB (for W11's 1 MiB events; Courier's frames allow 8 MiB); jetstream {{ store_dir: <fresh dir in {}> }}; no log file (logs to stderr, info level); everything else at its defaults; a fresh server and store dir per run",
            std::env::temp_dir().display()
        ),
        "  JetStream fsync: sync_interval at its default (acks once the OS has the data, fsync every 2 min) for W5a, W5b, W6 and W7; `sync_interval: always` (fsync before every ack) for W5a-always and W5b-always; W1–W4, W9 and W10 run on the same config without touching JetStream".to_string(),
        format!(
            "  streams: file storage, 1 replica, limits retention, one subject each; W5: a stream without consumers; W6: durable pull consumer created after the backlog, AckPolicy::Explicit, max_ack_pending {MAX_IN_FLIGHT}, pull batches of {MAX_IN_FLIGHT}; W7: a durable pull consumer created before the backlog that never pulls; W7 restarts on the same config, store and port after kill -9"
        ),
        "NATS client:".to_string(),
        format!(
            "  async-nats {CLIENT_VERSION} (features jetstream, ring) in the bench process, {runtime}, one connection per publisher, subscriber, queue member, requester and responder; W1–W3: core publish through the client's write buffer, flush at the end, subscription capacity ≥ the messages of a run (at least {}) so the client drops none, a run with any loss fails",
            thousands(MIN_SUBSCRIPTION_CAPACITY as u64)
        ),
        format!(
            "  W4: Client::request (one shared reply subscription per connection), the responder answers each request with {TINY_BYTES} B, W4b keeps {REQUESTS_IN_FLIGHT} requests in flight (FuturesUnordered); W5a: JetStream publish, ack awaited before the next; W5b and the W6/W7 backlogs: at most {WINDOW} PublishAckFutures unawaited; JetStream context timeout {} s; W6 acks each message with ack() and is timed until the consumer's info shows no ack pending and the ack floor at the last message; W5's publishes {} a Nats-Msg-Id (--nats-msg-ids)",
            JETSTREAM_TIMEOUT.as_secs(),
            if MSG_IDS.load(std::sync::atomic::Ordering::Relaxed) {
                "each carry"
            } else {
                "carry no"
            }
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::nats_backlog::{first_use, W7_STREAM};
    use super::super::nats_server::{find_nats_server, server_version};
    use super::*;

    #[test]
    fn keyed_subjects_carry_the_partition_then_the_key() {
        let one = Key {
            value: 7,
            partitions: 1,
        };
        assert_eq!(keyed_subject("bench.w8.recorded", one), "bench.w8.0.7");
        let sixteen = Key {
            value: 7,
            partitions: 16,
        };
        let p = partition("7") % 16;
        assert_eq!(
            keyed_subject("bench.w8.recorded", sixteen),
            format!("bench.w8.{p}.7")
        );
        // FNV-1a of "a", as nats-server's partition mapping hashes it.
        assert_eq!(partition("a"), 0xe40c_292c);
        assert_eq!(stream_name("bench.w5.published"), "BENCH_W5_PUBLISHED");
    }

    #[test]
    fn settings_name_the_server_and_the_fsync_settings() {
        let nats = NatsInstall {
            path: PathBuf::from("/usr/local/bin/nats-server"),
            version: "nats-server: v2.10.22".to_string(),
        };
        let lines = settings(&nats, &ClientRuntime::MultiThread.describe(8));
        assert_eq!(lines[0], "NATS server:");
        assert!(lines[1].contains("/usr/local/bin/nats-server") && lines[1].contains("v2.10.22"));
        let text = lines.join("\n");
        assert!(text.contains("sync_interval: always") && text.contains("2 min"));
        assert!(text.contains("async-nats 0.51") && text.contains("(8 workers)"));
        assert!(lines
            .iter()
            .all(|l| l.ends_with(':') || l.starts_with("  ")));
    }

    /// Against the real nats-server, when one is installed: it starts on
    /// its config, keeps a JetStream message across kill -9, and a dead
    /// server is reported with its stderr.
    #[tokio::test]
    async fn a_real_server_starts_restarts_and_keeps_its_stream() {
        let Some(path) = find_nats_server() else {
            eprintln!("skipped: no nats-server installed");
            return;
        };
        let nats = NatsInstall {
            version: server_version(&path).expect("version"),
            path,
        };
        let mut server = NatsServer::start(&nats, Fsync::Always)
            .await
            .expect("start");
        let url = server.url();
        let events = Arc::new(ClientEvents::default());
        let client = connect(&url, "test", MIN_SUBSCRIPTION_CAPACITY, &events)
            .await
            .expect("connect");
        let js = jetstream_context(client.clone());
        create_stream(&js, W7_STREAM, W7_NAME, 1)
            .await
            .expect("stream");
        js.publish(W7_NAME, Bytes::from_static(b"kept"))
            .await
            .expect("publish")
            .await
            .expect("ack");
        drop(js);
        close(client, &events).await;
        server.restart().expect("restart");
        let spawned_at = server.server.spawned_at;
        server.wait_ready().await.expect("ready again");
        first_use(&url, 1, spawned_at, JETSTREAM_TIMEOUT)
            .await
            .expect("first use");
        let pid = server.server.pid();
        drop(server);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the server is killed and reaped on drop"
        );
    }
}
