//! W7, written once for both sides ([`RestartSide`]): a backlog of large
//! events for a consumer that never takes them; the server's RSS; kill -9;
//! a restart on the same data and port, timed to its ready line and to
//! the first connection that sees the whole backlog; the RSS again.

use super::side::{publish_pipelined, Backlog, RestartSide};
use super::*;

/// One run of W7 on `side`; fills W7a (the restart's times) and W7b (the
/// server's RSS with the backlog, before and after the restart).
pub(super) async fn run<S: RestartSide>(
    side: &mut S,
    plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let count = plan.w7;
    let rss_before = side.rss_mib()?;
    let built = async {
        let publisher = S::backlog_publisher(&address, Backlog::Restart).await?;
        let payload = Bytes::from(vec![b'x'; plan.w7_bytes]);
        let started = Instant::now();
        publish_pipelined::<S>(&publisher, W7_NAME, &payload, count, WINDOW)
            .await
            .context("publishing the backlog")?;
        let elapsed = started.elapsed();
        // Closed before the kill, so it cannot reconnect to the restart.
        S::close_publisher(publisher).await;
        Ok(elapsed)
    };
    let build_time = side.watch(built).await?;
    side.backlog_written().await?;
    let rss_with_backlog = side.rss_mib()?;
    progress(&format!(
        "  backlog of {} × {} published in {:.1} s ({} msg/s); {} {}; {} VmRSS {:.1} MiB before, {:.1} MiB with it ({:.0} B per waiting message)",
        thousands(count),
        bytes_text(plan.w7_bytes as u64),
        build_time.as_secs_f64(),
        format_value(per_second(count, build_time)),
        S::DATA,
        bytes_text(side.data_bytes()),
        S::SERVER,
        rss_before,
        rss_with_backlog,
        (rss_with_backlog - rss_before) * 1024.0 * 1024.0 / count as f64
    ));

    let (ready, connected) = side.restart(count).await?;
    let rss_after_restart = side.rss_mib()?;
    side.check_backlog(count).await?;
    if let Some(note) = side.recovery_note() {
        progress(&format!("  restarted {}: {note}", S::SERVER));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(vec![
        (Workload::W7a, Metric::ReadyLine, ms(ready)),
        (Workload::W7a, Metric::FirstConnect, ms(connected)),
        (Workload::W7b, Metric::RssWithBacklog, rss_with_backlog),
        (Workload::W7b, Metric::RssAfterRestart, rss_after_restart),
    ])
}
