//! Durable publishing, written once for both sides ([`Side`]): W5 (one
//! at a time, and pipelined), W13 (one at a time from many connections at
//! once) and W11 (1 MiB events, beside the disk's own bandwidth).

use super::side::{publish_pipelined, Leg};
use super::*;

/// The event name (NATS: the subject) W5 publishes to.
pub(super) const W5_NAME: &str = "bench.w5.published";

/// W5a: durable events one at a time, each ack awaited; throughput and
/// the p50 and p99 of one publish, filed under `workload`.
pub(super) async fn publish_one_by_one<S: Side>(
    side: &mut S,
    plan: &Plan,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let leaders = side.leaders();
    let work = async {
        let publisher = S::publisher(&address, W5_NAME).await?;
        leaders.place(Leg::Publish(W5_NAME)).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        for i in 0..plan.w5a_warmup {
            S::publish(&publisher, W5_NAME, payload.clone())
                .await
                .with_context(|| format!("warm-up publish {} of {}", i + 1, plan.w5a_warmup))?;
        }
        let mut latencies = Vec::with_capacity(usize::try_from(plan.w5a).unwrap_or(0));
        let started = Instant::now();
        for i in 0..plan.w5a {
            let t = Instant::now();
            S::publish(&publisher, W5_NAME, payload.clone())
                .await
                .with_context(|| format!("publish {} of {}", i + 1, plan.w5a))?;
            latencies.push(t.elapsed().as_nanos() as u64);
        }
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        let micros = |p| percentile(&latencies, p).unwrap_or(0) as f64 / 1000.0;
        Ok(vec![
            (workload, Metric::Throughput, per_second(plan.w5a, elapsed)),
            (workload, Metric::LatencyP50, micros(50.0)),
            (workload, Metric::LatencyP99, micros(99.0)),
        ])
    };
    side.watch(work).await
}

/// W5b: durable events pipelined with a window of [`WINDOW`].
pub(super) async fn publish_windowed<S: Side>(
    side: &mut S,
    plan: &Plan,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let rate = pipelined_from(side, 1, plan.w5b, plan.w5b_warmup).await?;
    Ok(vec![(workload, Metric::Throughput, rate)])
}

/// W5b's shape from `connections` connections at once, each pipelined
/// with a window of [`WINDOW`]: `count` durable events shared among them
/// after `warmup`; events per second until the last ack.
pub(super) async fn pipelined_from<S: Side>(
    side: &mut S,
    connections: usize,
    count: u64,
    warmup: u64,
) -> anyhow::Result<f64> {
    let address = side.address();
    let leaders = side.leaders();
    let work = async {
        let mut publishers = Vec::with_capacity(connections);
        for _ in 0..connections {
            publishers.push(S::publisher(&address, W5_NAME).await?);
        }
        leaders.place(Leg::Publish(W5_NAME)).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let n = connections.max(1) as u64;
        let each = (count / n).max(1);
        pipelined_from_each::<S>(&publishers, &payload, (warmup / n).max(1))
            .await
            .context("warm-up")?;
        let started = Instant::now();
        pipelined_from_each::<S>(&publishers, &payload, each).await?;
        let elapsed = started.elapsed();
        for publisher in publishers {
            S::close_publisher(publisher).await;
        }
        Ok(per_second(each * n, elapsed))
    };
    side.watch(work).await
}

/// Each of `publishers` sends `each` events pipelined, all at once; one
/// publisher sends on this task, as W5b always did.
async fn pipelined_from_each<S: Side>(
    publishers: &[S::Publisher],
    payload: &Bytes,
    each: u64,
) -> anyhow::Result<()> {
    if let [publisher] = publishers {
        return publish_pipelined::<S>(publisher, W5_NAME, payload, each, WINDOW).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for publisher in publishers {
        let (publisher, payload) = (publisher.clone(), payload.clone());
        tasks.spawn(async move {
            publish_pipelined::<S>(&publisher, W5_NAME, &payload, each, WINDOW).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a publishing task failed")??;
    }
    Ok(())
}

/// Each of `publishers` sends `each` events one at a time, all at once;
/// returns how long until the last ack.
async fn publish_from_each<S: Side>(
    publishers: &[S::Publisher],
    payload: &Bytes,
    each: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for publisher in publishers {
        let (publisher, payload) = (publisher.clone(), payload.clone());
        tasks.spawn(async move {
            for i in 0..each {
                S::publish(&publisher, W5_NAME, payload.clone())
                    .await
                    .with_context(|| format!("publish {} of {each}", i + 1))?;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a publishing task failed")??;
    }
    Ok(started.elapsed())
}

/// W13: durable events from 1, 4, 16 and 64 connections at once, each
/// awaiting every ack (what one fsync shared across connections buys);
/// `twin` picks each count's row. Returns the figures and each count's
/// rate.
pub(super) async fn publish_concurrent<S: Side>(
    side: &mut S,
    plan: &Plan,
    twin: impl Fn(usize) -> Workload,
) -> anyhow::Result<(Vec<Measurement>, Vec<(usize, f64)>)> {
    let address = side.address();
    let work = async {
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let mut measured = Vec::new();
        let mut rates = Vec::new();
        for connections in W13_CONNECTIONS {
            let mut publishers = Vec::with_capacity(connections);
            for _ in 0..connections {
                publishers.push(S::publisher(&address, W5_NAME).await?);
            }
            let n = connections as u64;
            publish_from_each::<S>(&publishers, &payload, (plan.w13_warmup / n).max(1))
                .await
                .context("warm-up")?;
            let each = (plan.w13 / n).max(1);
            let elapsed = publish_from_each::<S>(&publishers, &payload, each).await?;
            let rate = per_second(each * n, elapsed);
            rates.push((connections, rate));
            measured.push((twin(connections), Metric::Throughput, rate));
        }
        Ok((measured, rates))
    };
    side.watch(work).await
}

/// W11's event name (NATS: subject).
pub(super) const W11_NAME: &str = "bench.w11.stored";
/// W11's payload: 1 MiB.
pub(super) const W11_BYTES: usize = 1024 * 1024;
/// W11's unacknowledged events at most: 16 MiB in flight.
pub(super) const W11_WINDOW: usize = 16;
/// The disk's own figure is taken on at most this many MiB.
pub(super) const DISK_PROBE_MIB_MAX: u64 = 256;

/// MB (10⁶ bytes) per second.
fn megabytes_per_second(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// The disk's own write+fsync bandwidth in `dir`, in MB/s: `mib` writes
/// of 1 MiB to a fresh file there, each followed by an fdatasync (each
/// event made durable before the next), the file removed afterwards.
pub(super) async fn disk_write_fsync(dir: &Path, mib: u64) -> anyhow::Result<f64> {
    use std::io::Write as _;
    let path = dir.join("courier-bench-disk-probe");
    let probe = path.clone();
    let timed = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
        let mut file = std::fs::File::create(&probe)
            .with_context(|| format!("cannot create {}", probe.display()))?;
        let block = vec![b'x'; W11_BYTES];
        let started = Instant::now();
        for _ in 0..mib {
            file.write_all(&block)
                .with_context(|| format!("cannot write {}", probe.display()))?;
            file.sync_data()
                .with_context(|| format!("cannot fdatasync {}", probe.display()))?;
        }
        Ok(started.elapsed())
    })
    .await
    .context("internal: the disk probe panicked")?;
    let _ = std::fs::remove_file(&path);
    Ok(megabytes_per_second(mib * W11_BYTES as u64, timed?))
}

/// W11: [`Plan::w11`] durable events of 1 MiB, pipelined ([`W11_WINDOW`]
/// unacknowledged); MB/s, and that as a share of the disk's own
/// write+fsync bandwidth measured right after in the same data directory.
pub(super) async fn large_events<S: Side>(
    side: &mut S,
    plan: &Plan,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let count = plan.w11;
    let work = async {
        let publisher = S::publisher(&address, W11_NAME).await?;
        let payload = Bytes::from(vec![b'x'; W11_BYTES]);
        let started = Instant::now();
        publish_pipelined::<S>(&publisher, W11_NAME, &payload, count, W11_WINDOW).await?;
        Ok(started.elapsed())
    };
    let elapsed = side.watch(work).await?;
    let rate = megabytes_per_second(count * W11_BYTES as u64, elapsed);
    let disk = disk_write_fsync(side.data_dir(), count.min(DISK_PROBE_MIB_MAX)).await?;
    progress(&format!(
        "  {} × 1 MiB in {:.2} s: {rate:.0} MB/s; the disk alone (1 MiB writes, each fdatasync'd, in the same data dir): {disk:.0} MB/s",
        thousands(count),
        elapsed.as_secs_f64()
    ));
    Ok(vec![
        (workload, Metric::MegabytesPerSecond, rate),
        (workload, Metric::DiskShare, rate * 100.0 / disk.max(1e-9)),
    ])
}
