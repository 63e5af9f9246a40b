//! `courier outbox-relay`: publishes a database's outbox (courier-outbox)
//! to the broker, as a process of its own.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use courier_client::Client;
use courier_outbox::{Relay, RelayOptions};

use crate::conn::Conn;

/// `courier outbox-relay`.
#[derive(Args)]
pub struct OutboxRelayArgs {
    /// The database holding the outbox: postgres://… or sqlite:PATH.
    #[arg(long, env = "COURIER_OUTBOX_DATABASE_URL")]
    database_url: String,
    /// Rows read, published and deleted per batch.
    #[arg(long, default_value_t = 1000)]
    batch_size: i64,
    /// How often to look for rows without a notification (SQLite's only
    /// wake-up; PostgreSQL's fallback to LISTEN/NOTIFY).
    #[arg(long, value_parser = humantime::parse_duration)]
    poll_interval: Option<Duration>,
    /// For crash tests: abort the process (like `kill -9`) once the broker
    /// has accepted this many batches, the last one's rows not yet deleted.
    #[arg(long, hide = true)]
    abort_after_batches: Option<u64>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn run(args: OutboxRelayArgs) -> anyhow::Result<()> {
    let client = Client::connect(args.conn.options())
        .await
        .with_context(|| format!("connecting to the broker at {}", args.conn.broker.url))?;
    let url = args.database_url.as_str();
    let relay = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx::PgPool::connect(url)
            .await
            .with_context(|| format!("connecting to {}", redact(url)))?;
        Relay::postgres(pool, client).await?
    } else if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url)
            .await
            .with_context(|| format!("opening {url}"))?;
        Relay::sqlite(pool, client).await?
    } else {
        anyhow::bail!(
            "--database-url {}: not a database this relay knows; give postgres://USER:PASSWORD@HOST/DB or sqlite:PATH",
            redact(url)
        );
    };
    let mut opts = RelayOptions {
        batch_size: args.batch_size,
        ..relay.options().clone()
    };
    if let Some(poll) = args.poll_interval {
        opts.poll_interval = poll;
    }
    let mut relay = relay.with_options(opts);
    if let Some(limit) = args.abort_after_batches {
        let accepted = std::sync::atomic::AtomicU64::new(0);
        relay = relay.on_accepted(std::sync::Arc::new(move |_ids| {
            if accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= limit {
                eprintln!("courier: aborting after {limit} accepted batches, before deleting them (--abort-after-batches)");
                std::process::abort();
            }
        }));
    }
    eprintln!("courier: relaying the outbox of {}", redact(url));
    relay.run().await?;
    Ok(())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:…@h/db");
        assert_eq!(redact("sqlite:app.db"), "sqlite:app.db");
    }
}
