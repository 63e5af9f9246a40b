//! Courier's side of the workloads ([`Side`] and its extensions): a fresh
//! `courier serve` child and data directory per run, driven through the
//! SDK. W1–W3's flow control is in `courier_transient.rs`.

use super::side::{self, Backlog, BacklogSide, IdleSide, Key, RestartSide, RoutingSide};
use super::*;

pub(super) const W6_SERVICE: &str = "bench-consumer";
pub(super) const W7_SERVICE: &str = "bench-offline";
pub(super) const W8_SERVICE: &str = "bench-ordered";
pub(super) const W4_NAME: &str = "bench.w4.asked";
pub(super) const W4_REPLY: &str = "bench.w4.answered";
pub(super) const W4_SERVICE: &str = "bench-w4-responder";
pub(super) const W4_REQUESTER: &str = "bench-w4-requester";
/// The 16 B W4 replies carry.
static W4_REPLY_PAYLOAD: [u8; TINY_BYTES] = [b'r'; TINY_BYTES];

pub(super) async fn connect(
    addr: &str,
    service: &str,
    max_in_flight: Option<u32>,
) -> anyhow::Result<Client> {
    let mut opts = ClientOptions::new(addr, service);
    if let Some(m) = max_in_flight {
        opts.max_in_flight = m;
    }
    Client::connect(opts)
        .await
        .with_context(|| format!("cannot connect to the broker at {addr} as {service}"))
}

/// Subscribes `service` to `name` and leaves: messages then wait for it.
pub(super) async fn subscribe_offline(addr: &str, service: &str, name: &str) -> anyhow::Result<()> {
    let client = connect(addr, service, None).await?;
    client
        .on(name, |_msg| async { Ok::<(), courier_client::Error>(()) })
        .await
        .with_context(|| format!("cannot subscribe {service} to {name}"))?;
    client.shutdown().await;
    Ok(())
}

/// Publishes `count` durable events through the SDK, keeping at most
/// `window` unacknowledged.
pub(super) async fn publish_pipelined(
    client: &Client,
    name: &'static str,
    payload: &Bytes,
    count: u64,
    window: usize,
) -> anyhow::Result<()> {
    side::publish_pipelined::<CourierSide>(client, name, payload, count, window).await
}

/// Shuts every client down at once.
pub(super) async fn shutdown_all(clients: &[Client]) {
    futures_util::future::join_all(clients.iter().map(Client::shutdown)).await;
}

/// Connects the W4 responder: it answers every (transient) W4 command
/// with a transient final reply of 16 B.
pub(super) async fn w4_responder(addr: &str) -> anyhow::Result<Client> {
    let responder = connect(addr, W4_SERVICE, None).await?;
    let subscribed = responder
        .on(W4_NAME, |msg| async move {
            // Like the NATS responder's publish: no answer unless refused.
            msg.reply_builder(W4_REPLY, true)
                .payload(Bytes::from_static(&W4_REPLY_PAYLOAD))
                .transient()
                .send_quiet()
                .await?;
            Ok::<(), courier_client::Error>(())
        })
        .await
        .with_context(|| format!("cannot subscribe {W4_SERVICE} to {W4_NAME}"));
    if let Err(e) = subscribed {
        responder.shutdown().await;
        return Err(e);
    }
    Ok(responder)
}

/// One transient W4 request, from `client`; checks the reply.
pub(super) fn w4_ask(
    client: &Client,
    payload: &Bytes,
    i: u64,
    of: u64,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
    let builder = client
        .command(W4_NAME)
        .payload(payload.clone())
        .transient()
        .timeout(STALL_TIMEOUT);
    async move {
        let reply = builder.request().await.with_context(|| {
            format!(
                "request {} of {of} got no reply (timeout {} s): a transient command is dropped when no \
                 instance of {W4_SERVICE} is connected and unpaused, and then never answered",
                i + 1,
                STALL_TIMEOUT.as_secs()
            )
        })?;
        if reply.name() != W4_REPLY || reply.payload().len() != TINY_BYTES {
            bail!(
                "request {} of {of} got the reply {} of {} B, not {W4_REPLY} of {TINY_BYTES} B",
                i + 1,
                reply.name(),
                reply.payload().len()
            );
        }
        Ok(())
    }
}

/// Courier's side of the workloads: a fresh broker and data directory,
/// driven through the SDK.
pub(super) struct CourierSide {
    // Killed before its directory is removed (fields drop in this order).
    broker: BrokerProcess,
    /// W7's first connection after the restart, kept for its check.
    probe: Option<Client>,
    dir: DataDir,
    exe: PathBuf,
}

impl CourierSide {
    pub(super) async fn start(exe: &Path) -> anyhow::Result<CourierSide> {
        CourierSide::start_with(exe, &[]).await
    }

    /// [`CourierSide::start`] with `extra` flags for `serve`.
    pub(super) async fn start_with(exe: &Path, extra: &[&str]) -> anyhow::Result<CourierSide> {
        let dir = DataDir::create()?;
        let broker = BrokerProcess::start(exe, dir.path(), extra).await?;
        Ok(CourierSide {
            broker,
            probe: None,
            dir,
            exe: exe.to_path_buf(),
        })
    }
}

impl CourierSide {
    /// See [`BrokerProcess::lock_totals`].
    pub(super) async fn lock_totals(&self) -> Option<process::LockTotals> {
        self.broker.lock_totals().await
    }
}

/// The W4 requester and responder, Courier side.
pub(super) struct CourierRequester {
    requester: Client,
    responder: Client,
    payload: Bytes,
}

impl Side for CourierSide {
    type Publisher = Client;
    type Pending = PendingAck;
    type Requester = CourierRequester;

    fn address(&self) -> String {
        self.broker.addr.clone()
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        self.broker.rss_mib()
    }

    async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.broker.watch(work).await
    }

    async fn publisher(address: &str, _name: &'static str) -> anyhow::Result<Client> {
        connect(address, "bench-publisher", None).await
    }

    fn publish<'a>(
        publisher: &'a Client,
        name: &'static str,
        payload: Bytes,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'a {
        let builder = publisher.event(name).payload(payload);
        async move {
            builder.send().await?;
            Ok(())
        }
    }

    fn send<'a>(
        publisher: &'a Client,
        name: &'static str,
        key: Option<Key>,
        payload: Bytes,
    ) -> impl std::future::Future<Output = anyhow::Result<PendingAck>> + Send + 'a {
        let mut event = publisher.event(name).payload(payload);
        if let Some(key) = key {
            event = event.key(key.value.to_string());
        }
        // Queued at once; only its ack is awaited later.
        std::future::ready(event.enqueue().map_err(anyhow::Error::from))
    }

    async fn acked(pending: PendingAck) -> anyhow::Result<()> {
        pending.wait().await?;
        Ok(())
    }

    async fn close_publisher(publisher: Client) {
        publisher.shutdown().await;
    }

    async fn requester(requester: &str, responder: &str) -> anyhow::Result<CourierRequester> {
        let responder = w4_responder(responder).await?;
        match connect(requester, W4_REQUESTER, None).await {
            Ok(requester) => Ok(CourierRequester {
                requester,
                responder,
                payload: Bytes::from(vec![b'x'; TINY_BYTES]),
            }),
            Err(e) => {
                responder.shutdown().await;
                Err(e)
            }
        }
    }

    fn request<'a>(
        requester: &'a CourierRequester,
        i: u64,
        of: u64,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'a {
        w4_ask(&requester.requester, &requester.payload, i, of)
    }

    async fn close_requester(requester: CourierRequester) {
        shutdown_all(&[requester.requester, requester.responder]).await;
    }
}

/// The service a backlog waits for, and its event name.
fn backlog_service(backlog: Backlog) -> (&'static str, &'static str) {
    match backlog {
        Backlog::Consume => (W6_SERVICE, W6_NAME),
        Backlog::Restart => (W7_SERVICE, W7_NAME),
        Backlog::Ordered(_) => (W8_SERVICE, W8_NAME),
    }
}

/// What consumes a backlog: its service; W6's one consumer connects
/// before the timing starts, W8's instances after (as they always did).
pub(super) struct CourierConsumer {
    address: String,
    service: &'static str,
    name: &'static str,
    connected: Option<Client>,
}

impl BacklogSide for CourierSide {
    type Consumer = CourierConsumer;
    const BACKLOG_WAITS_FOR: &'static str = "one subscribed offline service";

    async fn backlog_publisher(address: &str, backlog: Backlog) -> anyhow::Result<Client> {
        let (service, name) = backlog_service(backlog);
        subscribe_offline(address, service, name).await?;
        connect(address, "bench-publisher", None).await
    }

    async fn consumer(address: &str, backlog: Backlog) -> anyhow::Result<CourierConsumer> {
        let (service, name) = backlog_service(backlog);
        let connected = match backlog {
            Backlog::Consume => Some(connect(address, service, Some(MAX_IN_FLIGHT)).await?),
            Backlog::Restart | Backlog::Ordered(_) => None,
        };
        Ok(CourierConsumer {
            address: address.to_string(),
            service,
            name,
            connected,
        })
    }

    async fn consume_all(consumer: CourierConsumer, count: u64) -> anyhow::Result<u64> {
        let handled = Arc::new(AtomicU64::new(0));
        let redelivered = Arc::new(AtomicU64::new(0));
        let all_handled = Arc::new(Notify::new());
        let client = match consumer.connected {
            Some(client) => client,
            None => connect(&consumer.address, consumer.service, Some(MAX_IN_FLIGHT)).await?,
        };
        let (h, r, done) = (handled.clone(), redelivered.clone(), all_handled.clone());
        client
            .on(consumer.name, move |msg| {
                let (h, r, done) = (h.clone(), r.clone(), done.clone());
                async move {
                    if msg.attempt() > 1 {
                        r.fetch_add(1, Ordering::Relaxed);
                    } else if h.fetch_add(1, Ordering::Relaxed) + 1 == count {
                        done.notify_one();
                    }
                    Ok::<(), courier_client::Error>(())
                }
            })
            .await
            .context("cannot subscribe the consumer")?;
        wait_for_count(&handled, count, &all_handled).await?;
        // The acks are applied (and journaled) before the broker answers
        // the drain, so this includes them.
        client.shutdown().await;
        Ok(redelivered.load(Ordering::Relaxed))
    }

    async fn consume_in_order(
        consumer: CourierConsumer,
        _keys: Keys,
        count: u64,
        order: Arc<OrderCheck>,
    ) -> anyhow::Result<()> {
        let all_handled = Arc::new(Notify::new());
        let mut instances = Vec::new();
        for i in 0..2 {
            let address = side::spread(&consumer.address, i);
            let instance = connect(&address, consumer.service, Some(MAX_IN_FLIGHT)).await?;
            let (order, done) = (order.clone(), all_handled.clone());
            instance
                .on(consumer.name, move |msg| {
                    let (order, done) = (order.clone(), done.clone());
                    async move {
                        let key = msg
                            .message()
                            .key
                            .as_deref()
                            .and_then(|k| std::str::from_utf8(k).ok())
                            .and_then(|k| k.parse::<u64>().ok());
                        if order.handled(key, msg.payload(), msg.attempt()) == count {
                            done.notify_one();
                        }
                        Ok::<(), courier_client::Error>(())
                    }
                })
                .await
                .context("cannot subscribe an instance")?;
            instances.push(instance);
        }
        order.wait_all(count, &all_handled).await?;
        for instance in instances {
            instance.shutdown().await;
        }
        Ok(())
    }
}

/// Connects as `service` over a plain TCP socket of one descriptor. By
/// default the SDK keeps a second descriptor of its socket (to write a
/// lone request without waking a worker); 10,000 idle clients would then
/// need 20,000 open files in this process, this machine's hard limit.
/// The broker sees the same connection either way.
async fn connect_one_descriptor(addr: &str, service: &str) -> anyhow::Result<Client> {
    let target = addr.to_string();
    let connector = courier_client::Connector::new(move || {
        let target = target.clone();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&target).await?;
            stream.set_nodelay(true)?;
            let (reader, writer) = stream.into_split();
            let halves: (courier_client::BoxRead, courier_client::BoxWrite) =
                (Box::pin(reader), Box::pin(writer));
            Ok(halves)
        })
    });
    Client::connect_with(ClientOptions::new(addr, service), connector)
        .await
        .with_context(|| format!("cannot connect to the broker at {addr} as {service}"))
}

impl IdleSide for CourierSide {
    type Idle = Client;

    async fn idle(address: &str, service: u64) -> anyhow::Result<Client> {
        let (name, pattern) = (w9::service(service), w9::pattern(service));
        let client = connect_one_descriptor(address, &name).await?;
        client
            .on(&pattern, |_msg| async {
                Ok::<(), courier_client::Error>(())
            })
            .await
            .with_context(|| format!("cannot subscribe {name} to {pattern}"))?;
        Ok(client)
    }

    async fn close_idle(idle: Vec<Client>) {
        shutdown_all(&idle).await;
    }
}

impl RoutingSide for CourierSide {
    type TableService = Client;

    async fn table_service(address: &str, service: u64) -> anyhow::Result<Client> {
        let name = w10::service(service);
        let client = connect(address, &name, None).await?;
        let patterns = w10::patterns(service);
        let subscribed = patterns.iter().map(|pattern| {
            let on = client.on(pattern, |_msg| async {
                Ok::<(), courier_client::Error>(())
            });
            let name = &name;
            async move {
                on.await
                    .with_context(|| format!("cannot subscribe {name} to {pattern}"))
            }
        });
        futures_util::future::try_join_all(subscribed).await?;
        Ok(client)
    }

    async fn close_table(table: Vec<Client>) {
        shutdown_all(&table).await;
    }
}

/// Connects as soon as the broker lets us; the time since `since`.
pub(super) async fn first_connect(
    addr: &str,
    since: Instant,
) -> anyhow::Result<(Duration, Client)> {
    loop {
        match Client::connect(ClientOptions::new(addr, "bench-probe")).await {
            Ok(client) => return Ok((since.elapsed(), client)),
            Err(e) if since.elapsed() > READY_TIMEOUT => {
                bail!(
                    "no connection to the restarted broker at {addr} within {} s: {e}",
                    READY_TIMEOUT.as_secs()
                )
            }
            Err(_) => tokio::time::sleep(CONNECT_POLL).await,
        }
    }
}

impl RestartSide for CourierSide {
    const SERVER: &'static str = "broker";
    const DATA: &'static str = "data dir";

    fn data_bytes(&self) -> u64 {
        self.dir.size()
    }

    async fn restart(&mut self, _count: u64) -> anyhow::Result<(Duration, Duration)> {
        let addr = self.broker.addr.clone();
        self.broker.kill9();
        self.broker = BrokerProcess::spawn(&self.exe, &addr, self.dir.path(), &[])?;
        let spawned_at = self.broker.server.spawned_at;
        let broker = &mut self.broker;
        let restarted = async {
            let (ready, (connected, client)) =
                tokio::try_join!(broker.wait_ready(), first_connect(&addr, spawned_at))?;
            Ok((ready, connected, client))
        }
        .await;
        let (ready, connected, client) = self.broker.explain(restarted).await?;
        self.probe = Some(client);
        Ok((ready, connected))
    }

    async fn check_backlog(&mut self, count: u64) -> anyhow::Result<()> {
        let client = self
            .probe
            .take()
            .ok_or_else(|| anyhow!("internal: no connection to the restarted broker"))?;
        let checked = async {
            let reply = client
                .command("courier.services.list")
                .json(&json!({}))?
                .request()
                .await
                .context("courier.services.list after the restart")?;
            let services: Value = reply.json()?;
            let backlog = services
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == W7_SERVICE)
                .and_then(|s| s["backlog"].as_u64());
            client.shutdown().await;
            match backlog {
                Some(b) if b == count => Ok(()),
                other => Err(anyhow!(
                    "after the restart the backlog of {W7_SERVICE} is {other:?}, not {count}: the broker lost messages"
                )),
            }
        };
        self.broker.watch(checked).await
    }

    fn recovery_note(&self) -> Option<String> {
        self.broker.recovery_line()
    }
}
