//! W6–W8 on the NATS side ([`BacklogSide`], [`RestartSide`]): JetStream
//! file streams, durable pull consumers with explicit acks, and nats-server
//! killed and restarted on the same store.

use super::nats::{
    connect, create_stream, jetstream_context, replicas_for, ClientEvents, NatsPublisher, NatsSide,
    JETSTREAM_TIMEOUT, MIN_SUBSCRIPTION_CAPACITY,
};
use super::side::{spread, Backlog, BacklogSide, RestartSide};
use super::*;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use futures_util::StreamExt as _;

/// The streams and durable consumers of W6–W8.
pub(super) const W6_STREAM: &str = "BENCH_W6";
/// W6's durable consumer, and the name of the connection that pulls it.
pub(super) const W6_CONSUMER: &str = "bench-consumer";
pub(super) const W7_STREAM: &str = "BENCH_W7";
const W7_CONSUMER: &str = "bench-offline";
/// W8: one stream over `bench.w8.<partition>.<key>`.
const W8_STREAM: &str = "BENCH_W8";
const W8_SUBJECTS: &str = "bench.w8.>";
const W8_CONSUMER: &str = "bench-ordered";

/// A durable pull consumer with explicit acks and at most
/// [`MAX_IN_FLIGHT`] unacknowledged.
fn consumer_config(name: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_string()),
        ack_policy: AckPolicy::Explicit,
        max_ack_pending: i64::from(MAX_IN_FLIGHT),
        ..Default::default()
    }
}

/// What consumes a backlog: the consuming connections (one for W6, the 2
/// instances of W8) and the stream, looked up before the timing starts.
pub(super) struct NatsConsumer {
    events: Arc<ClientEvents>,
    instances: Vec<(async_nats::Client, jetstream::Context)>,
    stream: jetstream::stream::Stream,
    /// W6's durable pull consumer, made before the timing starts (W8's
    /// consumers are made by its instances).
    pull: Option<jetstream::consumer::PullConsumer>,
}

impl BacklogSide for NatsSide {
    type Consumer = NatsConsumer;
    const BACKLOG_WAITS_FOR: &'static str = "a stream without consumers yet";

    async fn backlog_publisher(address: &str, backlog: Backlog) -> anyhow::Result<NatsPublisher> {
        let publisher = NatsPublisher::connect(address).await?;
        let replicas = replicas_for(address);
        match backlog {
            Backlog::Consume => {
                create_stream(&publisher.js, W6_STREAM, W6_NAME, replicas).await?;
            }
            Backlog::Restart => {
                let stream = create_stream(&publisher.js, W7_STREAM, W7_NAME, replicas).await?;
                stream
                    .create_consumer(consumer_config(W7_CONSUMER))
                    .await
                    .context("cannot create the durable consumer")?;
            }
            Backlog::Ordered(_) => {
                create_stream(&publisher.js, W8_STREAM, W8_SUBJECTS, replicas).await?;
            }
        }
        Ok(publisher)
    }

    async fn consumer(address: &str, backlog: Backlog) -> anyhow::Result<NatsConsumer> {
        let events = Arc::new(ClientEvents::default());
        let (names, stream) = match backlog {
            Backlog::Ordered(_) => (vec!["bench-ordered-0", "bench-ordered-1"], W8_STREAM),
            // W7's backlog is never consumed.
            Backlog::Consume | Backlog::Restart => (vec![W6_CONSUMER], W6_STREAM),
        };
        let mut instances = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            let address = spread(address, i);
            let client = connect(&address, name, MIN_SUBSCRIPTION_CAPACITY, &events).await?;
            let js = jetstream_context(client.clone());
            instances.push((client, js));
        }
        let stream = instances[0]
            .1
            .get_stream(stream)
            .await
            .with_context(|| format!("cannot look up the stream {stream}"))?;
        let pull = match backlog {
            Backlog::Consume => Some(
                stream
                    .create_consumer(consumer_config(W6_CONSUMER))
                    .await
                    .context("cannot create the pull consumer")?,
            ),
            Backlog::Restart | Backlog::Ordered(_) => None,
        };
        Ok(NatsConsumer {
            events,
            instances,
            stream,
            pull,
        })
    }

    async fn consume_all(consumer: NatsConsumer, count: u64) -> anyhow::Result<u64> {
        let NatsConsumer {
            events,
            instances,
            pull,
            ..
        } = consumer;
        let client = &instances[0].0;
        let consumer = pull.ok_or_else(|| anyhow!("internal: W6's pull consumer was not made"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(MAX_IN_FLIGHT as usize)
            .messages()
            .await
            .context("cannot start pulling")?;
        let mut handled = 0u64;
        let mut redelivered = 0u64;
        while handled < count {
            let message = match tokio::time::timeout(STALL_TIMEOUT, messages.next()).await {
                Err(_) => bail!(
                    "deliveries stopped at {} of {} for {} s{}",
                    thousands(handled),
                    thousands(count),
                    STALL_TIMEOUT.as_secs(),
                    events.note()
                ),
                Ok(None) => bail!(
                    "the pull consumer's messages ended after {} of {}{}",
                    thousands(handled),
                    thousands(count),
                    events.note()
                ),
                Ok(Some(Err(e))) => {
                    return Err(anyhow!(e)
                        .context(format!("pulling message {} of {count} failed", handled + 1)))
                }
                Ok(Some(Ok(message))) => message,
            };
            let first = message.info().map_or(true, |info| info.delivered <= 1);
            message.ack().await.map_err(|e| {
                anyhow!(e).context(format!("acking message {} of {count} failed", handled + 1))
            })?;
            if first {
                handled += 1;
            } else {
                redelivered += 1;
            }
        }
        client.flush().await.context("flushing the acks failed")?;
        // The acks are applied once the consumer's ack floor is the last
        // message and nothing is pending.
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            let info = consumer
                .get_info()
                .await
                .context("cannot read the consumer's info")?;
            if info.num_ack_pending == 0 && info.ack_floor.stream_sequence == count {
                return Ok(redelivered);
            }
            if Instant::now() > deadline {
                bail!(
                    "the server has not applied the acks {} s after the last: {} pending, ack floor at stream sequence {} of {}",
                    STALL_TIMEOUT.as_secs(),
                    info.num_ack_pending,
                    info.ack_floor.stream_sequence,
                    count
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// W8a: one durable pull consumer with `max_ack_pending: 1`, pulled by
    /// both instances; W8b: one such consumer per partition of the
    /// subject, each instance pulling half of them.
    async fn consume_in_order(
        consumer: NatsConsumer,
        keys: Keys,
        count: u64,
        order: Arc<OrderCheck>,
    ) -> anyhow::Result<()> {
        let NatsConsumer {
            events,
            instances,
            stream,
            ..
        } = consumer;
        let partitions = w8_partitions(keys);
        let all_handled = Arc::new(Notify::new());
        let mut consumers = Vec::new();
        for p in 0..partitions {
            let consumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(format!("{W8_CONSUMER}-{p}")),
                    ack_policy: AckPolicy::Explicit,
                    max_ack_pending: 1,
                    filter_subject: format!("bench.w8.{p}.*"),
                    ..Default::default()
                })
                .await
                .context("cannot create a pull consumer")?;
            consumers.push(consumer);
        }
        let mut pulls = Vec::new();
        for (i, (_, js)) in instances.iter().enumerate() {
            for p in 0..partitions {
                if partitions > 1 && p % 2 != i as u64 {
                    continue;
                }
                let stream = js
                    .get_stream(W8_STREAM)
                    .await
                    .with_context(|| format!("cannot look up the stream {W8_STREAM}"))?;
                let consumer: jetstream::consumer::PullConsumer = stream
                    .get_consumer(&format!("{W8_CONSUMER}-{p}"))
                    .await
                    .map_err(|e| anyhow!(e).context("cannot look up a pull consumer"))?;
                let (order, done) = (order.clone(), all_handled.clone());
                pulls.push(tokio::spawn(pull_in_order(consumer, order, done, count)));
            }
        }
        let waited = order.wait_all(count, &all_handled).await;
        if let Err(e) = waited {
            for pull in &pulls {
                pull.abort();
            }
            return Err(e.context(events.note()));
        }
        let deadline = Instant::now() + STALL_TIMEOUT;
        for consumer in &mut consumers {
            loop {
                let info = consumer
                    .info()
                    .await
                    .context("cannot read a consumer's info")?;
                if info.num_ack_pending == 0 && info.num_pending == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the server has not applied the acks {} s after the last: {} pending",
                        STALL_TIMEOUT.as_secs(),
                        info.num_ack_pending
                    );
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        for pull in &pulls {
            pull.abort();
        }
        Ok(())
    }
}

/// One instance's pulling of one W8 consumer: each message shown to
/// `order` (its key is the subject's last token), then acked.
async fn pull_in_order(
    consumer: jetstream::consumer::PullConsumer,
    order: Arc<OrderCheck>,
    done: Arc<Notify>,
    count: u64,
) -> anyhow::Result<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(100)
        .messages()
        .await
        .context("cannot start pulling")?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow!(e).context("pulling failed"))?;
        let key = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|k| k.parse::<u64>().ok());
        let attempt = message
            .info()
            .map_or(1, |info| u32::try_from(info.delivered).unwrap_or(u32::MAX));
        if order.handled(key, &message.payload, attempt) == count {
            done.notify_one();
        }
        message
            .ack()
            .await
            .map_err(|e| anyhow!(e).context("acking failed"))?;
    }
    Ok(())
}

/// Connects as soon as the restarted server lets us and asks for the
/// stream until it reports all `count` messages, each ask waiting at most
/// `ask_within` for JetStream's answer; the time since `since`.
pub(super) async fn first_use(
    url: &str,
    count: u64,
    since: Instant,
    ask_within: Duration,
) -> anyhow::Result<Duration> {
    let events = Arc::new(ClientEvents::default());
    let client = loop {
        match connect(url, "bench-probe", MIN_SUBSCRIPTION_CAPACITY, &events).await {
            Ok(client) => break client,
            Err(e) if since.elapsed() > READY_TIMEOUT => {
                bail!(
                    "no connection to the restarted nats-server at {url} within {} s: {e:#}",
                    READY_TIMEOUT.as_secs()
                )
            }
            Err(_) => tokio::time::sleep(CONNECT_POLL).await,
        }
    };
    let js = jetstream::ContextBuilder::new()
        .timeout(ask_within)
        .build(client);
    loop {
        let error = match js.get_stream(W7_STREAM).await {
            Ok(stream) => {
                let messages = stream.cached_info().state.messages;
                if messages == count {
                    return Ok(since.elapsed());
                }
                // The server recovers its streams before it accepts
                // clients: what it reports now is what it kept.
                bail!(
                    "after kill -9 and a restart the stream {W7_STREAM} holds {} messages, not {}: nats-server lost messages",
                    thousands(messages),
                    thousands(count)
                );
            }
            Err(e) => e,
        };
        if since.elapsed() > READY_TIMEOUT {
            return Err(anyhow!(error).context(format!(
                "the restarted nats-server did not report the stream {W7_STREAM} within {} s",
                READY_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(CONNECT_POLL).await;
    }
}

impl RestartSide for NatsSide {
    const SERVER: &'static str = "nats-server";
    const DATA: &'static str = "store dir";

    fn data_bytes(&self) -> u64 {
        self.server.dir.size()
    }

    async fn restart(&mut self, count: u64) -> anyhow::Result<(Duration, Duration)> {
        let url = self.server.url();
        self.server.restart()?;
        let spawned_at = self.server.server.spawned_at;
        let server = &mut self.server;
        let restarted = async {
            tokio::try_join!(
                server.wait_ready(),
                first_use(&url, count, spawned_at, JETSTREAM_TIMEOUT)
            )
        }
        .await;
        self.server.explain(restarted).await
    }

    async fn check_backlog(&mut self, count: u64) -> anyhow::Result<()> {
        let url = self.server.url();
        self.server.watch(check_w7_backlog(&url, count)).await
    }

    fn recovery_note(&self) -> Option<String> {
        self.server.recovery_lines()
    }
}

/// How long W7's check of the backlog after a restart keeps asking.
const W7_CHECK_PATIENCE: Duration = Duration::from_secs(45);

/// Fails unless W7's durable consumer still has all `count` messages
/// pending, asked through `url`.
///
/// A consumer that never answers within [`W7_CHECK_PATIENCE`] is named in
/// the progress lines rather than failing the run: `first_use` has
/// already seen the stream hold every message, and on a loaded machine a
/// restarted server's consumer groups can stay leaderless for longer
/// than the bench can wait. A consumer that answers with fewer messages
/// fails it.
pub(super) async fn check_w7_backlog(url: &str, count: u64) -> anyhow::Result<()> {
    let events = Arc::new(ClientEvents::default());
    let client = connect(url, "bench-check", MIN_SUBSCRIPTION_CAPACITY, &events).await?;
    let js = jetstream_context(client.clone());
    let pending =
        async || -> anyhow::Result<u64> {
            let stream = js.get_stream(W7_STREAM).await.with_context(|| {
                format!("cannot look up the stream {W7_STREAM} after the restart")
            })?;
            let info = stream.consumer_info(W7_CONSUMER).await.with_context(|| {
                format!("cannot read the consumer {W7_CONSUMER} after the restart")
            })?;
            Ok(info.num_pending)
        };
    // On a cluster the restarted server's groups elect leaders and catch
    // up for a while: asks time out, a replica counts what it has so far.
    let deadline = Instant::now() + W7_CHECK_PATIENCE;
    let checked = loop {
        match pending().await {
            Ok(pending) if pending == count => break Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(pending) => {
                break Err(anyhow!(
                    "after the restart the consumer {W7_CONSUMER} has {} messages pending, not {}: nats-server lost messages",
                    thousands(pending),
                    thousands(count)
                ))
            }
            Err(e) => {
                progress(&format!(
                    "  the consumer {W7_CONSUMER} did not answer within {} s of the restart ({e:#}): only the stream's count of {} messages is checked",
                    W7_CHECK_PATIENCE.as_secs(),
                    thousands(count)
                ));
                break Ok(());
            }
        }
    };
    drop(js);
    super::nats::close(client, &events).await;
    checked
}
