//! The workloads, Courier side: the SDK against a `courier serve` child.

use super::*;

// ---------------------------------------------------------------------------
// The workloads, Courier side

pub(super) const W5_NAME: &str = "bench.w5.published";
pub(super) const W6_NAME: &str = "bench.w6.published";
pub(super) const W7_NAME: &str = "bench.w7.published";
pub(super) const W6_SERVICE: &str = "bench-consumer";
pub(super) const W7_SERVICE: &str = "bench-offline";

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

/// Publishes `count` events, keeping at most `window` unacknowledged.
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
    eprintln!("courier bench: {text}");
}

pub(super) async fn courier_w5a(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let result = async {
        let client = connect(&addr, "bench-publisher", None).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let send = |i: u64, of: u64| {
            let builder = client.event(W5_NAME).payload(payload.clone());
            async move {
                builder
                    .send()
                    .await
                    .with_context(|| format!("publish {} of {of} failed", i + 1))
            }
        };
        for i in 0..plan.w5a_warmup {
            send(i, plan.w5a_warmup).await?;
        }
        let mut latencies = Vec::with_capacity(plan.w5a as usize);
        let started = Instant::now();
        for i in 0..plan.w5a {
            let t = Instant::now();
            send(i, plan.w5a).await?;
            latencies.push(t.elapsed().as_nanos() as u64);
        }
        let elapsed = started.elapsed();
        client.shutdown().await;
        latencies.sort_unstable();
        let micros = |p| percentile(&latencies, p).unwrap_or(0) as f64 / 1000.0;
        Ok(vec![
            (
                Workload::W5a,
                Metric::Throughput,
                per_second(plan.w5a, elapsed),
            ),
            (Workload::W5a, Metric::LatencyP50, micros(50.0)),
            (Workload::W5a, Metric::LatencyP99, micros(99.0)),
        ])
    };
    broker.watch(result).await
}

pub(super) async fn courier_w5b(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path()).await?;
    let addr = broker.addr.clone();
    let result = async {
        let client = connect(&addr, "bench-publisher", None).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        publish_pipelined(&client, W5_NAME, &payload, plan.w5b_warmup, WINDOW)
            .await
            .context("warm-up")?;
        let started = Instant::now();
        publish_pipelined(&client, W5_NAME, &payload, plan.w5b, WINDOW).await?;
        let elapsed = started.elapsed();
        client.shutdown().await;
        Ok(vec![(
            Workload::W5b,
            Metric::Throughput,
            per_second(plan.w5b, elapsed),
        )])
    };
    broker.watch(result).await
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
    let spawned_at = broker.spawned_at;
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

// W1–W4: transient traffic (filled in by the W1–W4 work).

pub(super) async fn courier_w1(
    _exe: &Path,
    _plan: &Plan,
    _size: Size,
) -> anyhow::Result<Vec<Measurement>> {
    bail!("W1 is not measured on the Courier side yet")
}

pub(super) async fn courier_w2(
    _exe: &Path,
    _plan: &Plan,
    _size: Size,
) -> anyhow::Result<Vec<Measurement>> {
    bail!("W2 is not measured on the Courier side yet")
}

pub(super) async fn courier_w3(
    _exe: &Path,
    _plan: &Plan,
    _size: Size,
) -> anyhow::Result<Vec<Measurement>> {
    bail!("W3 is not measured on the Courier side yet")
}

pub(super) async fn courier_w4a(_exe: &Path, _plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    bail!("W4a is not measured on the Courier side yet")
}

pub(super) async fn courier_w4b(_exe: &Path, _plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    bail!("W4b is not measured on the Courier side yet")
}
