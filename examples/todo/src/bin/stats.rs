//! The `stats` service: counts `todo.created` events in its own SQLite
//! database and answers `stats.get` with `stats.counted`.
//!
//! Each event is counted through the inbox: its id is recorded in the
//! transaction that adds one to the count, so an event delivered again (we
//! crashed after the commit and before the ack, or the todo service's
//! relay published it twice) is acked without counting twice.

use std::time::Duration;

use anyhow::Context as _;
use courier_client::{Client, ClientOptions, Incoming, StartFrom};
use courier_example_todo::{
    init_logging, log_connection_changes, open_database, stop_requested, Counted,
};
use courier_outbox::{Inbox, InboxError};
use sqlx::SqlitePool;

/// Where the count is kept unless STATS_DATABASE says otherwise.
const DEFAULT_DATABASE: &str = ".courier/stats.sqlite";
/// How long a counted event's id is remembered: longer than any
/// redelivery or re-publish of it can come late (the broker's ack
/// deadline and dedup window are minutes; a relay down for days is not).
const INBOX_HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let mut opts = ClientOptions::from_env();
    opts.service = "stats".into();
    let bus = opts.url.clone();
    let db = open_database("STATS_DATABASE", DEFAULT_DATABASE).await?;
    courier_outbox::migrate_sqlite(&db)
        .await
        .context("cannot set up the inbox")?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS stats (todos_created INTEGER NOT NULL);
         INSERT INTO stats (todos_created) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM stats)",
    )
    .execute(&db)
    .await
    .context("cannot create the stats table")?;
    let pruning = tokio::spawn(Inbox::keep_pruned(db.clone(), INBOX_HORIZON, PRUNE_EVERY));
    let client = Client::connect(opts).await?;
    log_connection_changes(&client, &bus);

    let d = db.clone();
    client
        .on("stats.get", move |msg: Incoming| {
            let db = d.clone();
            async move {
                let counted = Counted {
                    todos_created: count(&db).await?,
                };
                msg.reply("stats.counted", &counted).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
        .await?;

    // From the beginning of the retained events: todos created before
    // this service first subscribed count too.
    let d = db.clone();
    client
        .on_from(
            "todo.created",
            StartFrom::Beginning,
            move |msg: Incoming| {
                let db = d.clone();
                async move { count_once(&db, &msg).await }
            },
        )
        .await?;

    println!("stats service ready");
    stop_requested().await;
    pruning.abort();
    client.shutdown().await;
    println!("stats service stopped (drained)");
    Ok(())
}

async fn count(db: &SqlitePool) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT todos_created FROM stats")
        .fetch_one(db)
        .await?;
    Ok(u64::try_from(n)?)
}

/// Adds the event to the count unless it was counted before; the ack
/// (returning `Ok`) follows the commit.
async fn count_once(db: &SqlitePool, event: &Incoming) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    let counted = Inbox::process_once(&mut tx, event, |tx| {
        Box::pin(async move {
            sqlx::query("UPDATE stats SET todos_created = todos_created + 1")
                .execute(&mut **tx)
                .await
        })
    })
    .await;
    match counted {
        Ok(Some(_)) => tx.commit().await?,
        Ok(None) => {
            tracing::info!(id = %event.message().id, "todo.created seen before; not counted again")
        }
        Err(InboxError::Handler(e) | InboxError::Database(e)) => return Err(e.into()),
    }
    Ok(())
}
