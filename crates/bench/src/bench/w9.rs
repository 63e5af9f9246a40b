//! W9, written once for both sides ([`IdleSide`]): thousands of idle
//! connections, each subscribed — the server's memory per connection,
//! and W4a's p99 just before they connect and while they are connected.

use super::side::IdleSide;
use super::w4::{timed_requests, Requests};
use super::*;

use futures_util::stream::{self, StreamExt as _};

/// Services the idle connections are instances of (fewer only when there
/// are fewer connections).
pub(super) const SERVICES: u64 = 100;
/// Connections (W10: services) being set up at once: a few hundred keep
/// both cores busy without a burst of thousands of handshakes.
pub(super) const CONNECTING_AT_ONCE: usize = 256;
/// The wait after the last connection before the server's memory is
/// read: the handshakes' garbage collected (nats-server) and freed.
pub(super) const SETTLE: Duration = Duration::from_secs(2);
/// Open files the bench process needs besides the idle connections.
const OPEN_FILES_SPARE: u64 = 512;
/// The broker's `--connections-max` above the idle connections: the
/// requester, the responder and room for a reconnect.
const CONNECTIONS_SPARE: u64 = 1_000;

/// The services of `connections` idle connections.
pub(super) fn service_count(connections: u64) -> u64 {
    SERVICES.min(connections).max(1)
}

/// "100 services × 100 instances".
pub(super) fn shape(connections: u64) -> String {
    let services = service_count(connections);
    let (least, most) = (connections / services, connections.div_ceil(services));
    let instances = if least == most {
        thousands(least)
    } else {
        format!("{least}–{most}")
    };
    format!("{services} services × {instances} instances")
}

/// Service `k`'s name (NATS: its queue group).
pub(super) fn service(k: u64) -> String {
    format!("bench-w9-svc-{k:03}")
}

/// What service `k`'s instances subscribe to (the same on NATS).
pub(super) fn pattern(k: u64) -> String {
    format!("w9.svc-{k:03}.>")
}

pub(super) fn pattern_shown() -> &'static str {
    "w9.svc-NNN.>"
}

/// The `--connections-max` the broker of a W9 run gets.
pub(super) fn connections_max(connections: u64) -> u64 {
    connections + CONNECTIONS_SPARE
}

/// The soft and hard open-files limits of this process, from
/// /proc/self/limits.
fn open_files_limits() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut figures = line["Max open files".len()..].split_whitespace();
    let mut next = || -> Option<u64> {
        match figures.next()? {
            "unlimited" => Some(u64::MAX),
            n => n.parse().ok(),
        }
    };
    Some((next()?, next()?))
}

/// Fails unless this process may open `connections` sockets and its own
/// files besides.
fn check_open_files(connections: u64) -> anyhow::Result<()> {
    let needed = connections + OPEN_FILES_SPARE;
    match open_files_limits() {
        Some((soft, hard)) if soft < needed => bail!(
            "W9 holds {} connections open in the bench process, which needs about {needed} open files, but its limit is {soft} (hard limit {hard}); raise it first with `ulimit -n {needed}`, or run fewer with --quick",
            thousands(connections),
        ),
        _ => Ok(()),
    }
}

/// Sets up `count` of something with `connect(i)`, [`CONNECTING_AT_ONCE`]
/// at a time, with a progress line every tenth; fails at the first that
/// fails (those set up are dropped, their connections closed).
pub(super) async fn connect_many<T, F, Fut>(
    what: &str,
    count: u64,
    connect: F,
) -> anyhow::Result<Vec<T>>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    let step = (count / 10).max(1);
    let mut done = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut pending = stream::iter(0..count)
        .map(connect)
        .buffer_unordered(CONNECTING_AT_ONCE);
    while let Some(one) = pending.next().await {
        done.push(one.with_context(|| {
            format!("{what}: {} of {} were ready", done.len(), thousands(count))
        })?);
        let n = done.len() as u64;
        if n.is_multiple_of(step) || n == count {
            progress(&format!(
                "  {what}: {} of {} after {:.1} s",
                thousands(n),
                thousands(count),
                started.elapsed().as_secs_f64()
            ));
        }
    }
    Ok(done)
}

/// W4a's p99 in µs: `warmup` requests untimed, then `count` one at a time.
async fn w4a_p99<S: Side>(
    requester: &S::Requester,
    warmup: u64,
    count: u64,
) -> anyhow::Result<f64> {
    let mut latencies = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let warm = Requests {
        first: 0,
        count: warmup,
        of: warmup,
        in_flight: 1,
    };
    timed_requests(warm, &mut latencies, |i| S::request(requester, i, warmup))
        .await
        .context("warm-up")?;
    latencies.clear();
    let timed = Requests {
        first: 0,
        count,
        of: count,
        in_flight: 1,
    };
    timed_requests(timed, &mut latencies, |i| S::request(requester, i, count)).await?;
    latencies.sort_unstable();
    Ok(percentile(&latencies, 99.0).unwrap_or(0) as f64 / 1000.0)
}

/// What one run of W9 measured.
pub(super) struct IdleFigures {
    pub(super) connections: u64,
    /// The server's VmRSS just before the idle connections connect, and
    /// [`SETTLE`] after the last did.
    pub(super) rss_before_mib: f64,
    pub(super) rss_with_mib: f64,
    /// W4a's p99 in µs just before they connect, and while they are
    /// connected.
    pub(super) p99_before: f64,
    pub(super) p99_with: f64,
}

impl IdleFigures {
    pub(super) fn per_connection_kib(&self) -> f64 {
        (self.rss_with_mib - self.rss_before_mib) * 1024.0 / self.connections.max(1) as f64
    }
}

/// One run of W9 on `side`, whose server takes at least
/// [`connections_max`] connections.
pub(super) async fn run<S: IdleSide>(
    side: &mut S,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    let figures = measure(side, plan).await?;
    let (before, with) = (figures.p99_before, figures.p99_with);
    Ok(vec![
        (
            Workload::W9,
            Metric::RssPerIdleConnection,
            figures.per_connection_kib(),
        ),
        (Workload::W9, Metric::P99BeforeIdle, before),
        (Workload::W9, Metric::P99WithIdle, with),
        (
            Workload::W9,
            Metric::P99IdleGrowth,
            with / before.max(f64::MIN_POSITIVE),
        ),
    ])
}

/// [`run`]'s figures, with [`Plan::w9_connections`] idle connections.
pub(super) async fn measure<S: IdleSide>(side: &mut S, plan: &Plan) -> anyhow::Result<IdleFigures> {
    let connections = plan.w9_connections;
    check_open_files(connections)?;
    let services = service_count(connections);
    let address = side.address();
    let requester = side.watch(S::requester(&address, &address)).await?;
    let measured = async {
        let before = side
            .watch(w4a_p99::<S>(&requester, plan.warmup, plan.w4a))
            .await
            .context("W4a before the idle connections")?;
        let rss_before = side.rss_mib()?;
        let started = Instant::now();
        let idle = side
            .watch(connect_many(
                "idle connections subscribed",
                connections,
                |i| S::idle(&address, i % services),
            ))
            .await?;
        let connected_in = started.elapsed();
        let with = async {
            tokio::time::sleep(SETTLE).await;
            let rss_after = side.rss_mib()?;
            let with = side
                .watch(w4a_p99::<S>(&requester, plan.warmup, plan.w4a))
                .await
                .context("W4a with the idle connections")?;
            Ok::<_, anyhow::Error>((rss_after, with))
        }
        .await;
        S::close_idle(idle).await;
        let (rss_after, with) = with?;
        let figures = IdleFigures {
            connections,
            rss_before_mib: rss_before,
            rss_with_mib: rss_after,
            p99_before: before,
            p99_with: with,
        };
        progress(&format!(
            "  VmRSS {rss_before:.1} MiB before, {rss_after:.1} MiB with {} idle connections ({}, connected in {:.1} s): {:.1} KiB each; W4a p99 {before:.0} µs before, {with:.0} µs with them",
            thousands(connections),
            shape(connections),
            connected_in.as_secs_f64(),
            figures.per_connection_kib()
        ));
        Ok(figures)
    }
    .await;
    S::close_requester(requester).await;
    measured
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_keeps_a_hundred_services_while_there_are_enough_connections() {
        assert_eq!(shape(10_000), "100 services × 100 instances");
        assert_eq!(shape(1_000), "100 services × 10 instances");
        assert_eq!(shape(1_050), "100 services × 10–11 instances");
        assert_eq!(shape(20), "20 services × 1 instances");
        assert_eq!(connections_max(10_000), 11_000);
        assert_eq!(pattern(7), "w9.svc-007.>");
    }

    #[test]
    fn this_process_reads_its_open_files_limits() {
        let (soft, hard) = open_files_limits().expect("/proc/self/limits");
        assert!(soft > 0 && soft <= hard, "{soft} {hard}");
        let err = check_open_files(u64::MAX / 2).expect_err("too many");
        assert!(format!("{err}").contains("ulimit -n"), "{err}");
    }
}
