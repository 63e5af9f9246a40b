//! W6 and W8, written once for both sides ([`BacklogSide`]): a backlog
//! of durable events published while its consumer is offline, then
//! consumed with explicit acks — by one consumer (W6), or in order by 2
//! instances that check every key's order as they go (W8).

use super::side::{publish_each, publish_pipelined, Backlog, BacklogSide, Key, Leg};
use super::*;

/// W6's and W7's event names (NATS: subjects).
pub(super) const W6_NAME: &str = "bench.w6.published";
pub(super) const W7_NAME: &str = "bench.w7.published";
/// W8's event name; NATS puts each event's partition and key in place of
/// its last token (`bench.w8.<partition>.<key>`).
pub(super) const W8_NAME: &str = "bench.w8.recorded";
/// W8b's partitions of the subject on the NATS side, one consumer each.
pub(super) const W8_PARTITIONS: u64 = 16;

/// W8's partitions of the subject on the NATS side: W8a's one key in
/// one, W8b's 1,000 keys in [`W8_PARTITIONS`].
pub(super) fn w8_partitions(keys: Keys) -> u64 {
    match keys {
        Keys::One => 1,
        Keys::Thousand => W8_PARTITIONS,
    }
}

/// W6: [`Plan::w6`] events of [`SMALL_BYTES`] for an offline consumer,
/// then consumed; timed from the start of consuming until every event is
/// acked and the acks applied.
pub(super) async fn consume<S: BacklogSide>(
    side: &mut S,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let count = plan.w6;
    let leaders = side.leaders();
    let work = async {
        let publisher = S::backlog_publisher(&address, Backlog::Consume).await?;
        leaders.place(Leg::Backlog).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let setup = Instant::now();
        publish_pipelined::<S>(&publisher, W6_NAME, &payload, count, WINDOW)
            .await
            .context("publishing the backlog")?;
        let setup = setup.elapsed();
        S::close_publisher(publisher).await;
        progress(&format!(
            "  backlog of {} published in {:.1} s ({} msg/s, {})",
            thousands(count),
            setup.as_secs_f64(),
            format_value(per_second(count, setup)),
            S::BACKLOG_WAITS_FOR
        ));

        let consumer = S::consumer(&address, Backlog::Consume).await?;
        leaders.place(Leg::Consume).await?;
        let started = Instant::now();
        let redelivered = S::consume_all(consumer, count).await?;
        let elapsed = started.elapsed();
        if redelivered > 0 {
            progress(&format!(
                "  note: {redelivered} deliveries were redeliveries"
            ));
        }
        Ok(vec![(
            Workload::W6,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    side.watch(work).await
}

/// W8: [`Plan::w8`] keyed events for an offline service (the key of
/// event i is `i % keys`, its index within the key in the payload's
/// first 8 bytes), then 2 instances consume them with explicit acks, each
/// checking that every key's events come in order; timed from the start
/// of consuming until every event is acked and the acks applied.
pub(super) async fn ordered<S: BacklogSide>(
    side: &mut S,
    plan: &Plan,
    keys: Keys,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let count = plan.w8;
    let workload = match keys {
        Keys::One => Workload::W8a,
        Keys::Thousand => Workload::W8b,
    };
    let partitions = w8_partitions(keys);
    let work = async {
        let publisher = S::backlog_publisher(&address, Backlog::Ordered(keys)).await?;
        let setup = Instant::now();
        publish_each::<S>(&publisher, count, WINDOW, |i| {
            let key = Key {
                value: i % keys.count(),
                partitions,
            };
            (W8_NAME, Some(key), ordered_payload(i / keys.count()))
        })
        .await?;
        let setup = setup.elapsed();
        S::close_publisher(publisher).await;
        progress(&format!(
            "  keyed backlog of {} published in {:.1} s ({} msg/s)",
            thousands(count),
            setup.as_secs_f64(),
            format_value(per_second(count, setup))
        ));

        let order = Arc::new(OrderCheck::new(keys.count()));
        let consumer = S::consumer(&address, Backlog::Ordered(keys)).await?;
        let started = Instant::now();
        S::consume_in_order(consumer, keys, count, order.clone()).await?;
        let elapsed = started.elapsed();
        order.verdict()?;
        Ok(vec![(
            workload,
            Metric::Throughput,
            per_second(count, elapsed),
        )])
    };
    side.watch(work).await
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
        wait_for_count(&self.handled, count, done).await
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

/// Waits until `handled` reaches `count` (woken by `done`), or fails when
/// it stops moving for [`STALL_TIMEOUT`].
pub(super) async fn wait_for_count(
    handled: &AtomicU64,
    count: u64,
    done: &Notify,
) -> anyhow::Result<()> {
    let mut last = 0;
    let mut last_change = Instant::now();
    loop {
        let now = handled.load(Ordering::Relaxed);
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
