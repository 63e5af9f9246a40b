//! `subscribe`: receives for a service and prints each delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use courier_client::{Error as ClientError, StartFrom};
use tokio::sync::mpsc;

use crate::args::{parse_duration, parse_start};
use crate::conn::{self, Conn, Deadline, Settings};
use crate::output;

#[derive(Args)]
pub struct SubscribeArgs {
    /// A name or a pattern: `*` matches one segment, `>` the rest.
    pub pattern: String,
    /// Exit after this many deliveries.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this long without a delivery (e.g. 2s).
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Give up after DUR in all: exit 5, or 3 if the broker is unreachable
    /// then, saying how many deliveries were received.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Where a new subscription starts: end (new messages only),
    /// beginning (all retained events), or an RFC 3339 time.
    #[arg(long, default_value = "end", value_parser = parse_start)]
    pub from: StartFrom,
    #[command(flatten)]
    pub conn: Conn,
}

pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let deadline = Deadline::after(args.timeout);
    // Take no more at once than we will print, so the rest stays for others.
    let settings = Settings {
        max_in_flight: args.count.map_or(0, |c| c.clamp(1, 64) as u32),
        ..Settings::default()
    };
    let client = conn::connect(&args.conn, settings, &deadline).await?;
    let (tx, mut rx) = mpsc::channel::<()>(1024);
    let printed = Arc::new(AtomicU64::new(0));
    let limit = args.count.unwrap_or(u64::MAX);
    let seen = printed.clone();
    let subscribed = client.on_from(&args.pattern, args.from, move |msg| {
        let (tx, seen) = (tx.clone(), seen.clone());
        async move {
            // Past the count, hand deliveries back at once for others.
            if seen.fetch_add(1, Ordering::SeqCst) >= limit {
                msg.nack(Duration::ZERO)?;
                return Ok::<(), ClientError>(());
            }
            output::line(&output::envelope(msg.message(), Some(msg.attempt())));
            let _ = tx.send(()).await;
            Ok(())
        }
    });
    tokio::select! {
        subscribed = subscribed => subscribed?,
        () = deadline.reached() => {
            let error = deadline.gave_up(&args.conn, client.is_connected(), "not subscribed yet");
            let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
            return Err(error);
        }
    }
    let mut received = 0u64;
    let mut outcome = Ok(());
    let deadline_reached = deadline.reached();
    tokio::pin!(deadline_reached);
    while received < limit {
        let next = async {
            match args.idle_timeout {
                Some(d) => tokio::time::timeout(d, rx.recv()).await.ok().flatten(),
                None => rx.recv().await,
            }
        };
        tokio::select! {
            got = next => match got {
                Some(()) => received += 1,
                None => break,
            },
            () = &mut deadline_reached => {
                let progress = match args.count {
                    Some(count) => format!("{received} of {count} deliveries received"),
                    None => format!("{received} deliveries received"),
                };
                outcome = Err(deadline.gave_up(&args.conn, client.is_connected(), &progress));
                break;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Acks of what was printed go out before the connection closes (at
    // once when the broker is away: nothing can be written then).
    client.shutdown().await;
    outcome
}

/// `courier unsubscribe`: removes the service's subscription to `pattern`.
pub async fn unsubscribe(pattern: &str, conn: &Conn) -> anyhow::Result<()> {
    let client = conn::connect(conn, Settings::default(), &Deadline::after(None)).await?;
    client.unsubscribe(pattern).await?;
    client.shutdown().await;
    Ok(())
}
