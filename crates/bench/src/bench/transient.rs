//! W1–W3, written once for both sides ([`TransientSide`]): transient (at
//! most once) events from one publisher to one receiver, to four that
//! each get every event, or to four competing ones; W10's events go
//! through here too.

use super::side::{Audience, TransientSide};
use super::*;

/// One run of W1, W2 or W3: [`Plan::transient`] events of `size` to
/// `audience`, after [`Plan::warmup`] of them; throughput is events
/// published per second until every receiver has handled the last.
pub(super) async fn run<S: TransientSide>(
    side: &mut S,
    plan: &Plan,
    audience: Audience,
    size: Size,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    run_counted(
        side,
        plan.transient(size),
        plan.warmup,
        audience,
        size,
        workload,
    )
    .await
}

/// [`run`] with `count` events after `warmup` (W10 has counts of its own).
pub(super) async fn run_counted<S: TransientSide>(
    side: &mut S,
    count: u64,
    warmup: u64,
    audience: Audience,
    size: Size,
    workload: Workload,
) -> anyhow::Result<Vec<Measurement>> {
    let address = side.address();
    let work = async {
        let mut receivers = S::receivers(&address, audience, warmup + count).await?;
        let measured = async {
            let sender = S::sender(&address, &mut receivers).await?;
            let payload = Bytes::from(vec![b'x'; size.bytes()]);

            S::expect(&receivers, warmup);
            S::publish_transient(&sender, &receivers, &payload, warmup)
                .await
                .context("warm-up")?;
            S::received(&receivers, &sender).await.context("warm-up")?;

            S::expect(&receivers, warmup + count);
            let started = Instant::now();
            S::publish_transient(&sender, &receivers, &payload, count).await?;
            let published = started.elapsed();
            let done = S::received(&receivers, &sender).await?;
            let elapsed = done.saturating_duration_since(started);
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
        S::close_transient(receivers).await;
        measured
    };
    side.watch(work).await
}
