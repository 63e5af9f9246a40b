//! Transactional outbox and idempotent inbox for Courier, over PostgreSQL
//! and SQLite (sqlx).
//!
//! **Outbox.** [`Outbox::enqueue`] writes a message into the
//! `courier_outbox` table inside the caller's transaction: the message
//! exists exactly when the business change does. A [`Relay`] publishes the
//! pending rows to the broker and deletes them only after the broker
//! accepted them (for a durable message: after it is on the broker's disk).
//! A relay that dies between publishing and deleting publishes the rows
//! again; they carry the same message ids, so the broker drops them as
//! duplicates within its dedup window (120 s by default). A relay that was
//! down longer than the window re-publishes messages the broker accepts
//! again: a receiver then sees a second copy, which the inbox discards.
//!
//! **Inbox.** [`Inbox::process_once`] records the message's id in the
//! `courier_inbox` table in the same transaction as the handler's writes,
//! so a redelivered message (a consumer that crashed after committing but
//! before its ack, or a re-publish after the dedup window) has no second
//! effect. [`Inbox::prune`] forgets ids older than a horizon, which must
//! be longer than any delay after which a copy may still arrive.
//!
//! The schema ([`migrate_postgres`], [`migrate_sqlite`]) ships with the
//! crate and is applied by [`Relay::postgres`] and [`Relay::sqlite`]; call
//! the migration yourself before the first `enqueue` or `process_once`
//! when the relay runs elsewhere. It keeps its own version table
//! (`courier_outbox_schema`), so it does not mix with the application's
//! own sqlx migrations.
//!
//! ```no_run
//! # async fn run(pool: sqlx::PgPool, client: courier_client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use courier_outbox::{Outbox, OutboxMessage, Relay};
//! courier_outbox::migrate_postgres(&pool).await?;
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (1)").execute(&mut *tx).await?;
//! Outbox::enqueue(&mut tx, OutboxMessage::event("order.placed").json(&1)?.key("order-1")).await?;
//! tx.commit().await?;
//! // Elsewhere, one or more relays:
//! Relay::postgres(pool, client).await?.run().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgPool, Postgres};
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::Transaction;
use uuid::Uuid;

mod inbox;
mod relay;

pub use inbox::{Inbox, InboxError, MessageId};
pub use relay::{AcceptedHook, Relay, RelayOptions};

/// The PostgreSQL channel the outbox's insert trigger notifies.
pub const NOTIFY_CHANNEL: &str = "courier_outbox";
/// Partitions of the PostgreSQL outbox: a key always falls in the same
/// one, and one relay at a time holds a partition.
pub const PARTITIONS: u32 = 16;
/// The schema version this crate writes and reads.
const SCHEMA_VERSION: i64 = 1;
const POSTGRES_SCHEMA: &str = include_str!("../migrations/postgres.sql");
const SQLITE_SCHEMA: &str = include_str!("../migrations/sqlite.sql");

/// What can go wrong in the outbox, the inbox or the relay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] courier_client::Error),
    #[error("message payload could not be encoded as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the outbox schema is at version {found}, newer than this courier-outbox knows ({SCHEMA_VERSION}); upgrade courier-outbox")]
    SchemaTooNew { found: i64 },
    #[error("the outbox row {seq} is damaged ({what}); delete it or fix it by hand")]
    DamagedRow { seq: i64, what: &'static str },
}

/// A boxed future borrowing a transaction, as [`Inbox::process_once`]'s
/// handler returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whether the relay publishes a message as an event or a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Event,
    Command,
}

impl Kind {
    fn code(self) -> i16 {
        match self {
            Kind::Event => 0,
            Kind::Command => 1,
        }
    }

    fn from_code(code: i64) -> Option<Kind> {
        match code {
            0 => Some(Kind::Event),
            1 => Some(Kind::Command),
            _ => None,
        }
    }
}

/// A message to publish once the transaction commits.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    id: Uuid,
    kind: Kind,
    name: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

impl OutboxMessage {
    /// An event; its id (the broker's dedup key) is a fresh UUID v7.
    pub fn event(name: impl Into<String>) -> OutboxMessage {
        OutboxMessage::new(Kind::Event, name.into())
    }

    /// A command (to the one service that receives it).
    pub fn command(name: impl Into<String>) -> OutboxMessage {
        OutboxMessage::new(Kind::Command, name.into())
    }

    fn new(kind: Kind, name: String) -> OutboxMessage {
        OutboxMessage {
            id: Uuid::now_v7(),
            kind,
            name,
            key: None,
            payload: Vec::new(),
        }
    }

    /// The payload, as JSON.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, payload: &T) -> Result<Self, Error> {
        self.payload = serde_json::to_vec(payload)?;
        Ok(self)
    }

    /// The payload, as bytes.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// The ordering key: the relay publishes a key's messages in the order
    /// they were enqueued, one relay at a time.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the id (the dedup key) instead of a fresh one.
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// The message's id: the id the broker and the receivers will see.
    pub fn message_id(&self) -> Uuid {
        self.id
    }

    /// The partition of the message: its key's, or its id's when it has
    /// none. FNV-1a, so every process and version agrees.
    fn partition(&self) -> i32 {
        let bytes = self.key.as_deref().unwrap_or(self.id.as_bytes());
        let mut hash: u32 = 0x811c_9dc5;
        for byte in bytes {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        // Below 16: fits.
        (hash % PARTITIONS) as i32
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// The databases the outbox and inbox work on: PostgreSQL and SQLite.
pub trait Backend: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    fn insert_outbox<'a>(
        conn: &'a mut Self::Connection,
        message: &'a OutboxMessage,
        now_us: i64,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    #[doc(hidden)]
    fn claim_inbox<'a>(
        conn: &'a mut Self::Connection,
        id: Uuid,
        now_us: i64,
    ) -> BoxFuture<'a, Result<bool, sqlx::Error>>;

    #[doc(hidden)]
    fn prune_inbox<'a>(
        conn: &'a mut Self::Connection,
        before_us: i64,
    ) -> BoxFuture<'a, Result<u64, sqlx::Error>>;
}

const INSERT_OUTBOX: &str = "INSERT INTO courier_outbox (id, kind, name, key, part, payload, enqueued_us) VALUES ($1, $2, $3, $4, $5, $6, $7)";
const CLAIM_INBOX: &str =
    "INSERT INTO courier_inbox (id, processed_us) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";
const PRUNE_INBOX: &str = "DELETE FROM courier_inbox WHERE processed_us < $1";

// The same statements serve both databases (the placeholders `$1`… are
// PostgreSQL's, and SQLite takes them too); only the connection types
// differ, which a generic impl over sqlx's executor traits cannot name
// without bounds longer than the bodies.
macro_rules! backend_impl {
    ($db:ty) => {
        impl Backend for $db {
            fn insert_outbox<'a>(
                conn: &'a mut Self::Connection,
                message: &'a OutboxMessage,
                now_us: i64,
            ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
                Box::pin(async move {
                    sqlx::query(INSERT_OUTBOX)
                        .bind(message.id.as_bytes().as_slice())
                        .bind(message.kind.code())
                        .bind(message.name.as_str())
                        .bind(message.key.as_deref())
                        .bind(message.partition())
                        .bind(message.payload.as_slice())
                        .bind(now_us)
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            }

            fn claim_inbox<'a>(
                conn: &'a mut Self::Connection,
                id: Uuid,
                now_us: i64,
            ) -> BoxFuture<'a, Result<bool, sqlx::Error>> {
                Box::pin(async move {
                    let done = sqlx::query(CLAIM_INBOX)
                        .bind(id.as_bytes().as_slice())
                        .bind(now_us)
                        .execute(conn)
                        .await?;
                    Ok(done.rows_affected() == 1)
                })
            }

            fn prune_inbox<'a>(
                conn: &'a mut Self::Connection,
                before_us: i64,
            ) -> BoxFuture<'a, Result<u64, sqlx::Error>> {
                Box::pin(async move {
                    let done = sqlx::query(PRUNE_INBOX)
                        .bind(before_us)
                        .execute(conn)
                        .await?;
                    Ok(done.rows_affected())
                })
            }
        }
    };
}

backend_impl!(Postgres);
backend_impl!(Sqlite);

/// Applies the outbox and inbox schema to a PostgreSQL database, once;
/// safe to call from several processes at the same time.
pub async fn migrate_postgres(pool: &PgPool) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    // One migrator at a time; the lock ends with the transaction.
    sqlx::query("SELECT pg_advisory_xact_lock(7236501862735360001)")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS courier_outbox_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let found: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM courier_outbox_schema")
        .fetch_one(&mut *tx)
        .await?;
    match found {
        Some(found) if found > SCHEMA_VERSION => return Err(Error::SchemaTooNew { found }),
        Some(_) => return Ok(()),
        None => {}
    }
    sqlx::raw_sql(POSTGRES_SCHEMA).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO courier_outbox_schema (version) VALUES ($1)")
        .bind(SCHEMA_VERSION)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Applies the outbox and inbox schema to a SQLite database, once.
pub async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), Error> {
    let mut conn = pool.acquire().await?;
    // IMMEDIATE: the write lock from the start, so two processes migrating
    // at once wait for each other instead of failing on an upgrade.
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let result = async {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS courier_outbox_schema (version INTEGER NOT NULL)",
        )
        .execute(&mut *conn)
        .await?;
        let found: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM courier_outbox_schema")
                .fetch_one(&mut *conn)
                .await?;
        match found {
            Some(found) if found > SCHEMA_VERSION => Err(Error::SchemaTooNew { found }),
            Some(_) => Ok(()),
            None => {
                sqlx::raw_sql(SQLITE_SCHEMA).execute(&mut *conn).await?;
                sqlx::query("INSERT INTO courier_outbox_schema (version) VALUES ($1)")
                    .bind(SCHEMA_VERSION)
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }
        }
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    sqlx::raw_sql(end).execute(&mut *conn).await?;
    result
}

/// Writes messages into the outbox inside the caller's transaction.
pub struct Outbox;

impl Outbox {
    /// Saves `message` in the outbox as part of `tx`: it is published once
    /// `tx` commits, and never if it rolls back. Returns the message's id.
    pub async fn enqueue<DB: Backend>(
        tx: &mut Transaction<'_, DB>,
        message: OutboxMessage,
    ) -> Result<Uuid, Error> {
        DB::insert_outbox(&mut **tx, &message, now_micros()).await?;
        Ok(message.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_falls_in_the_same_partition() {
        let a = OutboxMessage::event("a.b").key("order-7").partition();
        let b = OutboxMessage::command("c.d").key("order-7").partition();
        assert_eq!(a, b);
        assert!((0..PARTITIONS as i32).contains(&a));
    }

    #[test]
    fn messages_without_a_key_spread_over_partitions() {
        let parts: std::collections::HashSet<i32> = (0..200)
            .map(|_| OutboxMessage::event("a.b").partition())
            .collect();
        assert!(parts.len() > 8, "{parts:?}");
    }
}
