//! The workloads, Courier side: the SDK against a `courier serve` child.

use super::*;

// ---------------------------------------------------------------------------
// The workloads, Courier side

pub(super) const W6_NAME: &str = "bench.w6.published";
pub(super) const W7_NAME: &str = "bench.w7.published";
pub(super) const W6_SERVICE: &str = "bench-consumer";
pub(super) const W7_SERVICE: &str = "bench-offline";
pub(super) const W8_NAME: &str = "bench.w8.recorded";
pub(super) const W8_SERVICE: &str = "bench-ordered";

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

/// Publishes `count` durable events, keeping at most `window`
/// unacknowledged.
pub(super) async fn publish_pipelined(
    client: &Client,
    name: &str,
    payload: &Bytes,
    count: u64,
    window: usize,
) -> anyhow::Result<()> {
    let mut pending: VecDeque<(u64, PendingAck)> = VecDeque::with_capacity(window);
    for i in 0..count {
        if pending.len() >= window {
            if let Some((j, ack)) = pending.pop_front() {
                ack.wait()
                    .await
                    .with_context(|| format!("publish {} of {count} failed", j + 1))?;
            }
        }
        let ack = client
            .event(name)
            .payload(payload.clone())
            .enqueue()
            .with_context(|| format!("publish {} of {count} could not be queued", i + 1))?;
        pending.push_back((i, ack));
    }
    for (j, ack) in pending {
        ack.wait()
            .await
            .with_context(|| format!("publish {} of {count} failed", j + 1))?;
    }
    Ok(())
}

/// Publishes `count` transient events as quiet sends (the broker answers
/// only refusals), with a flush every half [`transient_window`] sends and
/// at most two flushes unanswered, and never more than
/// [`transient_lead`] events ahead of the slowest receiving service;
/// fails if the broker refused any.
async fn publish_transient(
    client: &Client,
    name: &str,
    payload: &Bytes,
    count: u64,
    receivers: &Receivers,
) -> anyhow::Result<()> {
    let refused_before = client.unheard_refusals();
    let every = (transient_window(name, payload.len()) / 2) as u64;
    let lead = transient_lead(name, payload.len());
    let received_before = receivers.slowest();
    let mut flushes = VecDeque::with_capacity(3);
    for i in 0..count {
        if i % LEAD_CHECK_EVERY == 0 && i > lead {
            // The flushes bound what the broker has not routed yet, not
            // what waits in its outbox for a slow receiver: this does.
            // Once past the lead, the publisher waits until the receivers
            // are a quarter of it behind. A 1 ms sleep instead (~30 per W1b
            // run) overslept while they ran dry; resuming at half the lead
            // cost the fan-out 2–15 % (W2b), a quarter did not (2026-12-03,
            // alternating runs with `--only`).
            if receivers.slowest() < received_before + (i - lead) {
                receivers.caught_up(received_before + (i - lead / 4)).await;
            }
        }
        client
            .event(name)
            .payload(payload.clone())
            .transient()
            .send_quiet()
            .await
            .with_context(|| format!("transient publish {} of {count} failed", i + 1))?;
        if (i + 1) % every == 0 {
            flushes.push_back(client.flush());
            if flushes.len() > 2 {
                if let Some(flush) = flushes.pop_front() {
                    flush.await.context("flush after transient publishes")?;
                }
            }
        }
    }
    flushes.push_back(client.flush());
    for flush in flushes {
        flush.await.context("flush after transient publishes")?;
    }
    let refused = client.unheard_refusals() - refused_before;
    if refused > 0 {
        let last = client
            .last_unheard_refusal()
            .map(|(code, reason)| format!("{reason} [{code}]"))
            .unwrap_or_default();
        bail!("the broker refused {refused} of {count} transient publishes; the last: {last}");
    }
    Ok(())
}

/// Subscribes `service` to `name` and leaves it offline, then publishes
/// `count` events of `payload_bytes` to it, pipelined; returns how long the
/// publishing took. W6 and W7 both start from such a backlog.
pub(super) async fn build_backlog(
    addr: &str,
    service: &str,
    name: &str,
    payload_bytes: usize,
    count: u64,
) -> anyhow::Result<Duration> {
    subscribe_offline(addr, service, name).await?;
    let producer = connect(addr, "bench-publisher", None).await?;
    let payload = Bytes::from(vec![b'x'; payload_bytes]);
    let started = Instant::now();
    publish_pipelined(&producer, name, &payload, count, WINDOW)
        .await
        .context("publishing the backlog")?;
    let elapsed = started.elapsed();
    producer.shutdown().await;
    Ok(elapsed)
}

pub(super) fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

pub(super) fn progress(text: &str) {
    eprintln!("courier-bench: {text}");
}

pub(super) async fn courier_w6(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let count = plan.w6;
    let result = async {
        let setup = build_backlog(&addr, W6_SERVICE, W6_NAME, SMALL_BYTES, count).await?;
        progress(&format!(
            "  backlog of {} published in {:.1} s ({} msg/s, one subscribed offline service)",
            thousands(count),
            setup.as_secs_f64(),
            format_value(per_second(count, setup))
        ));

        let handled = Arc::new(AtomicU64::new(0));
        let redelivered = Arc::new(AtomicU64::new(0));
        let all_handled = Arc::new(Notify::new());
        let consumer = connect(&addr, W6_SERVICE, Some(MAX_IN_FLIGHT)).await?;
        let started = Instant::now();
        let (h, r, done) = (handled.clone(), redelivered.clone(), all_handled.clone());
        consumer
            .on(W6_NAME, move |msg| {
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
        let mut last = 0;
        let mut last_change = Instant::now();
        loop {
            let now = handled.load(Ordering::Relaxed);
            if now >= count {
                break;
            }
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if last_change.elapsed() > STALL_TIMEOUT {
                bail!(
                    "deliveries stopped at {} of {} for {} s",
                    thousands(now),
                    thousands(count),
                    STALL_TIMEOUT.as_secs()
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), all_handled.notified()).await;
        }
        // The acks are applied (and journaled) before the broker answers
        // the drain, so this includes them.
        consumer.shutdown().await;
        let elapsed = started.elapsed();
        let again = redelivered.load(Ordering::Relaxed);
        if again > 0 {
            progress(&format!("  note: {again} deliveries were redeliveries"));
        }
        Ok(vec![(
            Workload::W6,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    broker.watch(result).await
}

/// W8: a backlog of keyed events for an offline service (the key of
/// message i is `i % keys`, its index within the key in the payload's
/// first 8 bytes), then 2 instances consume it with explicit acks; each
/// checks that every key's messages come in order.
pub(super) async fn courier_w8(
    exe: &Path,
    plan: &Plan,
    keys: Keys,
) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let count = plan.w8;
    let workload = match keys {
        Keys::One => Workload::W8a,
        Keys::Thousand => Workload::W8b,
    };
    let result = async {
        subscribe_offline(&addr, W8_SERVICE, W8_NAME).await?;
        let producer = connect(&addr, "bench-publisher", None).await?;
        let setup = Instant::now();
        let mut pending: VecDeque<(u64, PendingAck)> = VecDeque::with_capacity(WINDOW);
        for i in 0..count {
            if pending.len() >= WINDOW {
                if let Some((j, ack)) = pending.pop_front() {
                    ack.wait()
                        .await
                        .with_context(|| format!("publish {} of {count} failed", j + 1))?;
                }
            }
            let ack = producer
                .event(W8_NAME)
                .key((i % keys.count()).to_string())
                .payload(ordered_payload(i / keys.count()))
                .enqueue()
                .with_context(|| format!("publish {} of {count} could not be queued", i + 1))?;
            pending.push_back((i, ack));
        }
        for (j, ack) in pending {
            ack.wait()
                .await
                .with_context(|| format!("publish {} of {count} failed", j + 1))?;
        }
        let setup = setup.elapsed();
        producer.shutdown().await;
        progress(&format!(
            "  keyed backlog of {} published in {:.1} s ({} msg/s)",
            thousands(count),
            setup.as_secs_f64(),
            format_value(per_second(count, setup))
        ));

        let order = Arc::new(OrderCheck::new(keys.count()));
        let all_handled = Arc::new(Notify::new());
        let started = Instant::now();
        let mut instances = Vec::new();
        for _ in 0..2 {
            let instance = connect(&addr, W8_SERVICE, Some(MAX_IN_FLIGHT)).await?;
            let (order, done) = (order.clone(), all_handled.clone());
            instance
                .on(W8_NAME, move |msg| {
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
        let elapsed = started.elapsed();
        order.verdict()?;
        Ok(vec![(
            workload,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    broker.watch(result).await
}

/// W8's payload: the message's index within its key, then padding to
/// [`SMALL_BYTES`].
pub(super) fn ordered_payload(index: u64) -> Bytes {
    let mut payload = vec![b'x'; SMALL_BYTES];
    payload[..8].copy_from_slice(&index.to_be_bytes());
    Bytes::from(payload)
}

/// What W8's instances saw: per key the next index expected, first
/// deliveries counted, and what came out of order.
pub(super) struct OrderCheck {
    next: Vec<AtomicU64>,
    handled: AtomicU64,
    out_of_order: AtomicU64,
    redelivered: AtomicU64,
}

impl OrderCheck {
    pub(super) fn new(keys: u64) -> OrderCheck {
        OrderCheck {
            next: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            handled: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
        }
    }

    /// One delivery; returns the first deliveries handled so far.
    pub(super) fn handled(&self, key: Option<u64>, payload: &[u8], attempt: u32) -> u64 {
        if attempt > 1 {
            self.redelivered.fetch_add(1, Ordering::Relaxed);
            return self.handled.load(Ordering::Relaxed);
        }
        let index = payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        let slot = key.and_then(|k| self.next.get(k as usize));
        match (slot, index) {
            (Some(next), Some(index)) => {
                // Only the key's holder writes its slot, one at a time.
                if next.swap(index + 1, Ordering::Relaxed) != index {
                    self.out_of_order.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                self.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.handled.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Waits until `count` first deliveries were handled, or fails when
    /// they stop coming.
    pub(super) async fn wait_all(&self, count: u64, done: &Notify) -> anyhow::Result<()> {
        let mut last = 0;
        let mut last_change = Instant::now();
        loop {
            let now = self.handled.load(Ordering::Relaxed);
            if now >= count {
                return Ok(());
            }
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if last_change.elapsed() > STALL_TIMEOUT {
                bail!(
                    "deliveries stopped at {} of {} for {} s",
                    thousands(now),
                    thousands(count),
                    STALL_TIMEOUT.as_secs()
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), done.notified()).await;
        }
    }

    /// Fails if any key's messages came out of order.
    pub(super) fn verdict(&self) -> anyhow::Result<()> {
        let again = self.redelivered.load(Ordering::Relaxed);
        if again > 0 {
            progress(&format!("  note: {again} deliveries were redeliveries"));
        }
        let wrong = self.out_of_order.load(Ordering::Relaxed);
        if wrong > 0 {
            bail!("{wrong} deliveries came out of their key's order");
        }
        Ok(())
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

pub(super) async fn courier_w7(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let count = plan.w7;
    let rss_before = broker.rss_mib()?;
    let built = build_backlog(&addr, W7_SERVICE, W7_NAME, LARGE_BYTES, count);
    let build_time = broker.watch(built).await?;
    let rss_with_backlog = broker.rss_mib()?;
    let log_bytes = dir.size();
    progress(&format!(
        "  backlog of {} × {} published in {:.1} s ({} msg/s); data dir {}; broker VmRSS {:.1} MiB before, {:.1} MiB with it ({:.0} B per waiting message)",
        thousands(count),
        bytes_text(LARGE_BYTES as u64),
        build_time.as_secs_f64(),
        format_value(per_second(count, build_time)),
        bytes_text(log_bytes),
        rss_before,
        rss_with_backlog,
        (rss_with_backlog - rss_before) * 1024.0 * 1024.0 / count as f64
    ));

    broker.kill9();
    drop(broker);
    let mut broker = BrokerProcess::spawn(exe, &addr, dir.path())?;
    let spawned_at = broker.server.spawned_at;
    let restarted = async {
        let (ready, (connected, client)) =
            tokio::try_join!(broker.wait_ready(), first_connect(&addr, spawned_at))?;
        Ok((ready, connected, client))
    }
    .await;
    let (ready, connected, client) = broker.explain(restarted).await?;
    let rss_after_restart = broker.rss_mib()?;
    // The restarted broker must still hold the whole backlog.
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
    broker.watch(checked).await?;
    if let Some(line) = broker.recovery_line() {
        progress(&format!("  restarted broker: {line}"));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(vec![
        (Workload::W7a, Metric::ReadyLine, ms(ready)),
        (Workload::W7a, Metric::FirstConnect, ms(connected)),
        (Workload::W7b, Metric::RssWithBacklog, rss_with_backlog),
        (Workload::W7b, Metric::RssAfterRestart, rss_after_restart),
    ])
}

// ---------------------------------------------------------------------------
// W1–W4: transient traffic (at most once, in memory, no acks)

pub(super) const W1_NAME: &str = "bench.w1.published";
pub(super) const W2_NAME: &str = "bench.w2.published";
pub(super) const W3_NAME: &str = "bench.w3.published";
pub(super) const W4_NAME: &str = "bench.w4.asked";
pub(super) const W4_REPLY: &str = "bench.w4.answered";
pub(super) const W1_SERVICE: &str = "bench-w1-subscriber";
pub(super) const W2_SERVICES: [&str; 4] = [
    "bench-w2-subscriber-1",
    "bench-w2-subscriber-2",
    "bench-w2-subscriber-3",
    "bench-w2-subscriber-4",
];
pub(super) const W3_SERVICE: &str = "bench-w3-worker";
/// Instances of the one W3 service (competing consumers).
pub(super) const W3_INSTANCES: usize = 4;
pub(super) const W4_SERVICE: &str = "bench-w4-responder";
pub(super) const W4_REQUESTER: &str = "bench-w4-requester";
pub(super) const TRANSIENT_PUBLISHER: &str = "bench-transient-publisher";
/// Transient sends W1–W3 keep past the last flush the broker answered.
/// They are quiet sends (no answer unless refused), so flushes — a PING
/// the broker answers once it has routed everything before it — are the
/// publisher's only brake: they bound the burst of deliveries the broker
/// may queue for a receiver at once. Past the server's `pause_bytes`
/// (4 MiB) queued for a receiver, the broker pauses it and drops its
/// transient messages; with acknowledged sends, a window of 4 096 × 1 KiB
/// lost events that way, 1 024 did not; with quiet sends, 2 048 lost 310 of
/// W1b's 201,000 (2026-12-03), 1 024 none. So the window is counted in
/// bytes — about 1 MiB of encoded messages, the SDK's own bound on quiet
/// sends it holds (`QUIET_BUFFER_BYTES_MAX`) — and never below 1 024
/// messages: 1 024 at 1 KiB, ~12,000 at 16 B (where 1 024 left the cores
/// idle between flushes: W1a 0.86M msg/s, 1.1–1.3M with 12,288).
pub(super) const TRANSIENT_WINDOW_BYTES: usize = 1024 * 1024;
pub(super) const TRANSIENT_WINDOW_MIN: usize = 1024;
/// How far (in encoded bytes) the W1–W3 publisher may run ahead of the
/// slowest receiver: half the broker's default `pause_bytes` (4 MiB), past
/// which it pauses the receiver and drops its transient messages. The
/// flush window alone did not bound this — a run of 3ac5bc0 lost 512 of
/// W1b's 201,000 when the subscriber fell behind (2026-12-03).
pub(super) const TRANSIENT_LEAD_BYTES: usize = 2 * 1024 * 1024;
/// Sends between two looks at the receivers' progress.
const LEAD_CHECK_EVERY: u64 = 64;

/// The most events of `payload_bytes` the publisher may have sent beyond
/// what the slowest receiver handled: [`TRANSIENT_LEAD_BYTES`] of DELIVER
/// entries (the message, its delivery id and attempt), and at least one
/// flush window.
pub(super) fn transient_lead(name: &str, payload_bytes: usize) -> u64 {
    // A DELIVER entry is its delivery id (8 bytes), attempt (4) and the message.
    let entry = 12 + event_len(name, payload_bytes);
    (TRANSIENT_LEAD_BYTES / entry).max(transient_window(name, payload_bytes)) as u64
}

/// The transient window for events named `name` with `payload_bytes` of
/// payload: [`TRANSIENT_WINDOW_BYTES`] of encoded SEND entries, at least
/// [`TRANSIENT_WINDOW_MIN`] of them, and even (flushes go every half).
pub(super) fn transient_window(name: &str, payload_bytes: usize) -> usize {
    // A SEND entry is its seq (8 bytes) and the message.
    let entry = 8 + event_len(name, payload_bytes);
    (TRANSIENT_WINDOW_BYTES / entry).max(TRANSIENT_WINDOW_MIN) & !1
}

/// The encoded size of an event named `name` with `payload_bytes` of
/// payload, as the bench's publisher sends it.
fn event_len(name: &str, payload_bytes: usize) -> usize {
    let sample = courier_proto::Message::new(
        courier_proto::Kind::Event,
        name,
        bytes::Bytes::from(vec![0u8; payload_bytes]),
    );
    courier_proto::encoded_message_len(&sample)
}

/// A W1–W3 receiver that handles nothing for this long after the last send
/// was acknowledged makes the bench ask the broker whether it dropped any.
const LOSS_CHECK_AFTER: Duration = Duration::from_secs(2);
/// The 16 B W4 replies carry.
static W4_REPLY_PAYLOAD: [u8; TINY_BYTES] = [b'r'; TINY_BYTES];

/// What one receiving service of W1–W3 has handled, however many
/// instances it runs.
struct Tally {
    service: &'static str,
    handled: Arc<AtomicU64>,
    catch_up: Arc<CatchUp>,
}

/// Receptions of a W1–W3 run: one tally per receiving service, the count
/// each must reach, and a signal when one reaches it.
struct Receivers {
    tallies: Vec<Tally>,
    goal: Arc<AtomicU64>,
    reached: Arc<Notify>,
}

/// The publisher's wait for one receiving service: the count it waits for
/// (`u64::MAX`: it does not wait), and its wake-up once the service has
/// handled that many. One relaxed load per handled event when nobody waits.
struct CatchUp {
    at: AtomicU64,
    reached: Notify,
}

impl CatchUp {
    fn handled(&self, count: u64) {
        if count >= self.at.load(Ordering::Relaxed) {
            self.at.store(u64::MAX, Ordering::Relaxed);
            self.reached.notify_one();
        }
    }
}

impl Receivers {
    fn new() -> Receivers {
        Receivers {
            tallies: Vec::new(),
            goal: Arc::new(AtomicU64::new(u64::MAX)),
            reached: Arc::new(Notify::new()),
        }
    }

    /// Returns once every receiving service has handled `count`.
    async fn caught_up(&self, count: u64) {
        for tally in &self.tallies {
            let catch_up = &tally.catch_up;
            loop {
                // Set before looking, so a receiver that passes `count`
                // between the look and the wait still leaves its wake-up.
                catch_up.at.store(count, Ordering::Relaxed);
                if tally.handled.load(Ordering::Relaxed) >= count {
                    catch_up.at.store(u64::MAX, Ordering::Relaxed);
                    break;
                }
                // A permit left by an earlier wait may wake us early.
                catch_up.reached.notified().await;
            }
        }
    }

    /// Connects `instances` instances of `service`, each handling `name`
    /// by counting it; the clients go to `clients` (to be shut down).
    async fn subscribe(
        &mut self,
        addr: &str,
        service: &'static str,
        instances: usize,
        name: &str,
        clients: &mut Vec<Client>,
    ) -> anyhow::Result<()> {
        let handled = Arc::new(AtomicU64::new(0));
        let catch_up = Arc::new(CatchUp {
            at: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        });
        for _ in 0..instances {
            let client = connect(addr, service, None).await?;
            clients.push(client.clone());
            let (h, goal, reached) = (handled.clone(), self.goal.clone(), self.reached.clone());
            let catch_up = catch_up.clone();
            client
                .on(name, move |_msg| {
                    let count = h.fetch_add(1, Ordering::Relaxed) + 1;
                    if count == goal.load(Ordering::Relaxed) {
                        reached.notify_one();
                    }
                    catch_up.handled(count);
                    std::future::ready(Ok::<(), courier_client::Error>(()))
                })
                .await
                .with_context(|| format!("cannot subscribe {service} to {name}"))?;
        }
        self.tallies.push(Tally {
            service,
            handled,
            catch_up,
        });
        Ok(())
    }

    /// Every tally must reach `goal` from now on.
    fn expect(&self, goal: u64) {
        self.goal.store(goal, Ordering::Relaxed);
    }

    /// What the slowest receiving service has handled.
    fn slowest(&self) -> u64 {
        self.tallies
            .iter()
            .map(|t| t.handled.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    fn counts(&self) -> Vec<u64> {
        self.tallies
            .iter()
            .map(|t| t.handled.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every tally has reached `goal`, once the publisher's
    /// sends are all acknowledged. Transient deliveries the broker dropped
    /// never come: when no count moves for [`LOSS_CHECK_AFTER`], `broker`
    /// is asked for its drop counter, and the run fails if it dropped any,
    /// or in any case after [`STALL_TIMEOUT`].
    async fn wait_for(&self, goal: u64, broker: &Client) -> anyhow::Result<()> {
        let mut last = Vec::new();
        let mut last_change = Instant::now();
        let mut checked = false;
        loop {
            let counts = self.counts();
            if counts.iter().all(|c| *c >= goal) {
                if let Some((t, c)) = self.tallies.iter().zip(&counts).find(|(_, c)| **c > goal) {
                    bail!(
                        "{} handled {} transient events, more than the {} published: a delivery came twice",
                        t.service,
                        thousands(*c),
                        thousands(goal)
                    );
                }
                return Ok(());
            }
            let stalled = last_change.elapsed();
            // The publisher's sends are all acknowledged by now, so the
            // broker has routed every event: a drop it counted is final.
            if counts != last {
                (last, last_change, checked) = (counts, Instant::now(), false);
            } else if (!checked && stalled > LOSS_CHECK_AFTER) || stalled > STALL_TIMEOUT {
                checked = true;
                let metrics = broker_metrics(broker).await;
                let dropped: u64 = ["dropped_unrouted", "transient_dropped_paused"]
                    .iter()
                    .filter_map(|counter| metrics.as_ref().ok()?[counter].as_u64())
                    .sum();
                if dropped > 0 || stalled > STALL_TIMEOUT {
                    let each: Vec<String> = self
                        .tallies
                        .iter()
                        .zip(&counts)
                        .map(|(t, c)| format!("{} received {}", t.service, thousands(*c)))
                        .collect();
                    let total: u64 = counts.iter().sum();
                    let expected = goal * self.tallies.len() as u64;
                    let why = match &metrics {
                        Ok(m) => format!(
                            "broker metrics: dropped_unrouted {}, transient_dropped_paused {}, receivers_paused {}, slow_consumers_cut {}, delivered {}",
                            m["dropped_unrouted"], m["transient_dropped_paused"], m["receivers_paused"], m["slow_consumers_cut"], m["delivered"]
                        ),
                        Err(e) => format!("the broker's metrics could not be read: {e:#}"),
                    };
                    bail!(
                        "transient events lost: {} of {} arrived ({}), none more for {:.1} s; {why}. \
                         Transient delivery is at most once: the broker drops a transient message for a \
                         service with no connected instance it may deliver to, and it pauses a receiver \
                         while more than the server's pause_bytes (4 MiB) of deliveries wait to be \
                         written to it (receivers_paused), dropping its transient messages meanwhile \
                         (transient_dropped_paused); the receivers must keep up with the \
                         publisher, e.g. with a smaller TRANSIENT_LEAD_BYTES in bench/courier.rs",
                        thousands(total),
                        thousands(expected),
                        each.join(", "),
                        stalled.as_secs_f64(),
                    );
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.reached.notified()).await;
        }
    }
}

/// The broker's counters (`courier.metrics`).
async fn broker_metrics(client: &Client) -> anyhow::Result<Value> {
    let reply = client
        .command("courier.metrics")
        .json(&json!({}))?
        .timeout(Duration::from_secs(5))
        .request()
        .await
        .context("courier.metrics")?;
    Ok(reply.json::<Value>()?)
}

/// Shuts every client down at once.
pub(super) async fn shutdown_all(clients: &[Client]) {
    futures_util::future::join_all(clients.iter().map(Client::shutdown)).await;
}

/// W1–W3: `count` transient events of `size` from one publisher to the
/// receiving `services` (name, instances), after a warm-up; throughput is
/// events published per second until every service has handled the last.
async fn transient_run(
    exe: &Path,
    plan: &Plan,
    size: Size,
    workload: Workload,
    name: &str,
    services: &[(&'static str, usize)],
) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let (count, warmup) = (plan.transient(size), plan.warmup);
    let run = async {
        let mut clients = Vec::new();
        let measured = async {
            let mut receivers = Receivers::new();
            for &(service, instances) in services {
                receivers
                    .subscribe(&addr, service, instances, name, &mut clients)
                    .await?;
            }
            let publisher = connect(&addr, TRANSIENT_PUBLISHER, None).await?;
            clients.push(publisher.clone());
            let payload = Bytes::from(vec![b'x'; size.bytes()]);

            receivers.expect(warmup);
            publish_transient(&publisher, name, &payload, warmup, &receivers)
                .await
                .context("warm-up")?;
            receivers
                .wait_for(warmup, &publisher)
                .await
                .context("warm-up")?;

            let goal = warmup + count;
            receivers.expect(goal);
            let started = Instant::now();
            publish_transient(&publisher, name, &payload, count, &receivers).await?;
            let published = started.elapsed();
            receivers.wait_for(goal, &publisher).await?;
            let elapsed = started.elapsed();
            progress(&format!(
                "  {} published in {:.2} s, all handled after {:.2} s",
                thousands(count),
                published.as_secs_f64(),
                elapsed.as_secs_f64()
            ));
            Ok(vec![(
                workload,
                Metric::Throughput,
                per_second(count, elapsed),
            )])
        }
        .await;
        shutdown_all(&clients).await;
        measured
    };
    broker.watch(run).await
}

pub(super) async fn courier_w1(
    exe: &Path,
    plan: &Plan,
    size: Size,
) -> anyhow::Result<Vec<Measurement>> {
    let workload = Job::PubSub(size).workload();
    transient_run(exe, plan, size, workload, W1_NAME, &[(W1_SERVICE, 1)]).await
}

pub(super) async fn courier_w2(
    exe: &Path,
    plan: &Plan,
    size: Size,
) -> anyhow::Result<Vec<Measurement>> {
    let workload = Job::FanOut(size).workload();
    let services = W2_SERVICES.map(|s| (s, 1));
    transient_run(exe, plan, size, workload, W2_NAME, &services).await
}

pub(super) async fn courier_w3(
    exe: &Path,
    plan: &Plan,
    size: Size,
) -> anyhow::Result<Vec<Measurement>> {
    let workload = Job::Competing(size).workload();
    let services = [(W3_SERVICE, W3_INSTANCES)];
    transient_run(exe, plan, size, workload, W3_NAME, &services).await
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

/// Courier's side of the workloads written once ([`Side`]): a fresh
/// broker and data directory, driven through the SDK.
pub(super) struct CourierSide {
    // Killed before its directory is removed (fields drop in this order).
    broker: BrokerProcess,
    _dir: DataDir,
}

impl CourierSide {
    pub(super) async fn start(exe: &Path) -> anyhow::Result<CourierSide> {
        let dir = DataDir::create()?;
        let broker = BrokerProcess::start(exe, dir.path()).await?;
        Ok(CourierSide { broker, _dir: dir })
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
    type Requester = CourierRequester;

    fn address(&self) -> String {
        self.broker.addr.clone()
    }

    fn data_dir(&self) -> &Path {
        self._dir.path()
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

    fn publish_pipelined<'a>(
        publisher: &'a Client,
        name: &'static str,
        payload: &'a Bytes,
        count: u64,
        window: usize,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'a {
        publish_pipelined(publisher, name, payload, count, window)
    }

    async fn requester(address: &str) -> anyhow::Result<CourierRequester> {
        let responder = w4_responder(address).await?;
        match connect(address, W4_REQUESTER, None).await {
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
