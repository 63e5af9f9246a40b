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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_client::{Client, Incoming, PendingAck};
use sqlx::postgres::{PgListener, PgPool, Postgres};
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::{Row, Transaction};
use uuid::Uuid;

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

/// What [`Inbox::process_once`] can take a message id from.
pub trait MessageId {
    fn message_id(&self) -> Uuid;
}

impl MessageId for Incoming {
    fn message_id(&self) -> Uuid {
        self.message().id
    }
}

impl MessageId for Uuid {
    fn message_id(&self) -> Uuid {
        *self
    }
}

/// [`Inbox::process_once`]'s failure: the handler's own error, or the
/// database's.
#[derive(Debug, thiserror::Error)]
pub enum InboxError<E> {
    #[error("{0}")]
    Handler(E),
    #[error("inbox: {0}")]
    Database(#[from] sqlx::Error),
}

/// Records processed message ids so a message has its effect once.
pub struct Inbox;

impl Inbox {
    /// Runs `handler` in `tx` unless the message was already processed,
    /// and records its id in `tx`: the record and the handler's writes
    /// commit together or not at all. Returns `None` for a message already
    /// processed (the handler did not run; ack it). Commit `tx` before
    /// acknowledging the message.
    ///
    /// ```no_run
    /// # async fn run(pool: sqlx::SqlitePool, msg: courier_client::Incoming) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// use courier_outbox::Inbox;
    /// let mut tx = pool.begin().await?;
    /// Inbox::process_once(&mut tx, &msg, |tx| Box::pin(async move {
    ///     sqlx::query("UPDATE stats SET created = created + 1").execute(&mut **tx).await
    /// })).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn process_once<'t, DB, M, T, E, F>(
        tx: &mut Transaction<'t, DB>,
        message: &M,
        handler: F,
    ) -> Result<Option<T>, InboxError<E>>
    where
        DB: Backend,
        M: MessageId + ?Sized,
        F: for<'c> FnOnce(&'c mut Transaction<'t, DB>) -> BoxFuture<'c, Result<T, E>>,
    {
        if !DB::claim_inbox(&mut **tx, message.message_id(), now_micros()).await? {
            return Ok(None);
        }
        handler(tx).await.map(Some).map_err(InboxError::Handler)
    }

    /// Forgets the ids processed more than `horizon` ago; returns how many.
    /// The horizon must exceed the longest time after which a copy of a
    /// message can still arrive: the broker's redelivery of an unacked
    /// message (a consumer that stays down), and a relay's re-publish
    /// after it was down longer than the broker's dedup window.
    pub async fn prune<DB: Backend>(
        conn: &mut DB::Connection,
        horizon: Duration,
    ) -> Result<u64, Error> {
        let horizon_us = i64::try_from(horizon.as_micros()).unwrap_or(i64::MAX);
        Ok(DB::prune_inbox(conn, now_micros().saturating_sub(horizon_us)).await?)
    }

    /// Prunes the inbox of `pool` now and then every `every`, forgetting
    /// ids older than `horizon` (see [`Inbox::prune`]); runs until dropped
    /// (spawn it). A failed prune is logged and tried again next time.
    pub async fn keep_pruned<DB: Backend>(
        pool: sqlx::Pool<DB>,
        horizon: Duration,
        every: Duration,
    ) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let pruned = match pool.acquire().await {
                Ok(mut conn) => Inbox::prune::<DB>(&mut conn, horizon).await,
                Err(e) => Err(e.into()),
            };
            match pruned {
                Ok(0) => {}
                Ok(n) => tracing::debug!("inbox: forgot {n} message ids older than {horizon:?}"),
                Err(e) => {
                    tracing::warn!("inbox: pruning old message ids: {e}; trying again in {every:?}")
                }
            }
        }
    }
}

/// How a [`Relay`] reads and waits.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Rows read, published (pipelined) and deleted per batch.
    pub batch_size: i64,
    /// How long the relay sleeps when the outbox is empty and no
    /// notification came: the only wake-up for SQLite, a fallback for
    /// PostgreSQL (a notification lost with its connection).
    pub poll_interval: Duration,
    /// The pause after a failed batch (database or broker unavailable).
    pub retry_delay: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            retry_delay: Duration::from_millis(200),
        }
    }
}

enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Publishes the outbox's rows to the broker.
///
/// A batch: lock partitions (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
/// relays on one database share the partitions and never hold the same
/// one), read their oldest rows in order, queue them all on the client
/// (pipelined, in order), wait for every acceptance, delete them, commit.
/// A crash anywhere before the commit leaves the rows in place, and they
/// are published again with the same ids. The deleting commit does not
/// wait for PostgreSQL's WAL flush (`synchronous_commit = off` for the
/// relay's own transactions only): a database crash may undo the last
/// deletes, with the same outcome as a relay crash.
///
/// For SQLite, run one relay per database: it has one writer anyway and no
/// row locks, and a second relay could publish a row twice at the same
/// time (harmless within the dedup window, but wasted).
pub struct Relay {
    db: Db,
    client: Client,
    opts: RelayOptions,
    on_accepted: Option<AcceptedHook>,
}

/// What [`Relay::on_accepted`] calls.
pub type AcceptedHook = std::sync::Arc<dyn Fn(&[Uuid]) + Send + Sync>;

/// A row read from the outbox.
struct Pending {
    seq: i64,
    message: OutboxMessage,
}

impl Relay {
    /// A relay for a PostgreSQL outbox; applies the schema.
    pub async fn postgres(pool: PgPool, client: Client) -> Result<Relay, Error> {
        migrate_postgres(&pool).await?;
        Ok(Relay {
            db: Db::Postgres(pool),
            client,
            opts: RelayOptions::default(),
            on_accepted: None,
        })
    }

    /// A relay for a SQLite outbox; applies the schema. Polls every 10 ms
    /// unless told otherwise.
    pub async fn sqlite(pool: SqlitePool, client: Client) -> Result<Relay, Error> {
        migrate_sqlite(&pool).await?;
        Ok(Relay {
            db: Db::Sqlite(pool),
            client,
            opts: RelayOptions {
                poll_interval: Duration::from_millis(10),
                ..RelayOptions::default()
            },
            on_accepted: None,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &RelayOptions {
        &self.opts
    }

    /// Replaces the options.
    pub fn with_options(mut self, opts: RelayOptions) -> Relay {
        self.opts = opts;
        self
    }

    /// Calls `hook` with the ids of each batch once the broker accepted
    /// all of them, before their rows are deleted: for metrics (the bench
    /// times commit → acceptance with it). After a crash the same ids may
    /// come again. Keep it quick: the relay waits for it.
    pub fn on_accepted(mut self, hook: AcceptedHook) -> Relay {
        self.on_accepted = Some(hook);
        self
    }

    /// Publishes until the process ends: a batch after every notification
    /// (PostgreSQL) or poll interval, batches back to back while rows
    /// remain. Failures are logged and retried after `retry_delay`; only a
    /// failure to listen at all is returned.
    pub async fn run(&self) -> Result<(), Error> {
        let mut listener = match &self.db {
            Db::Postgres(pool) => {
                let mut listener = PgListener::connect_with(pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                Some(listener)
            }
            Db::Sqlite(_) => None,
        };
        loop {
            match self.publish_batch().await {
                // A full batch: more rows are likely waiting. A partial one
                // emptied what this relay could lock; rows committed since
                // have notified the listener (or wait for the poll), so an
                // immediate second look would only cost a round of queries.
                Ok(published) if published as i64 >= self.opts.batch_size => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("outbox relay: {e}; retrying in {:?}", self.opts.retry_delay);
                    tokio::time::sleep(self.opts.retry_delay).await;
                    continue;
                }
            }
            match listener.as_mut() {
                Some(listener) => {
                    tokio::select! {
                        notified = listener.recv() => {
                            // A lost connection is re-established by the
                            // listener on the next recv; poll meanwhile.
                            if let Err(e) = notified {
                                tracing::warn!("outbox relay: listening: {e}");
                                tokio::time::sleep(self.opts.retry_delay).await;
                            }
                        }
                        () = tokio::time::sleep(self.opts.poll_interval) => {}
                    }
                }
                None => tokio::time::sleep(self.opts.poll_interval).await,
            }
        }
    }

    /// Publishes one batch; returns how many rows it published (0: the
    /// outbox is empty, or every partition is held by other relays).
    pub async fn publish_batch(&self) -> Result<usize, Error> {
        match &self.db {
            Db::Postgres(pool) => self.publish_batch_postgres(pool).await,
            Db::Sqlite(pool) => self.publish_batch_sqlite(pool).await,
        }
    }

    async fn publish_batch_postgres(&self, pool: &PgPool) -> Result<usize, Error> {
        let mut tx = pool.begin().await?;
        // The delete need not wait for PostgreSQL's WAL flush: a crash that
        // loses it leaves rows the broker already accepted, and they are
        // published again with the same ids (dropped as duplicates, as
        // after a relay crash). Waiting would put a second disk flush
        // between a business commit and the broker's acceptance of its
        // message whenever the relay is still committing the batch before.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        // Ended explicitly on every path: a transaction merely dropped is
        // rolled back only when its connection is next used, and until
        // then its partition locks make every batch skip those partitions
        // (the relay then waits for the next poll instead of publishing).
        match self.publish_locked(&mut tx).await {
            Ok(published) => {
                tx.commit().await?;
                Ok(published)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// Reads, publishes and deletes one batch inside `tx`.
    async fn publish_locked(&self, tx: &mut Transaction<'_, Postgres>) -> Result<usize, Error> {
        // The partitions this relay can lock (skipping those other relays
        // hold; the locks last until the commit), then their oldest rows.
        // Two statements: as one (`part IN (SELECT … SKIP LOCKED)`) the
        // planner sorted the whole outbox for every batch, 4× slower.
        let parts: Vec<i32> =
            sqlx::query_scalar("SELECT part FROM courier_outbox_partitions FOR UPDATE SKIP LOCKED")
                .fetch_all(&mut **tx)
                .await?;
        if parts.is_empty() {
            return Ok(0);
        }
        let rows = sqlx::query(
            "SELECT seq, id, kind, name, key, payload FROM courier_outbox \
             WHERE part = ANY($1) ORDER BY seq LIMIT $2",
        )
        .bind(&parts)
        .bind(self.opts.batch_size)
        .fetch_all(&mut **tx)
        .await?;
        let pending = rows
            .iter()
            .map(|row| {
                pending_from(
                    row.try_get("seq")?,
                    row.try_get("id")?,
                    i64::from(row.try_get::<i16, _>("kind")?),
                    row.try_get("name")?,
                    row.try_get("key")?,
                    row.try_get("payload")?,
                )
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if pending.is_empty() {
            return Ok(0);
        }
        self.publish_all(&pending).await?;
        let seqs: Vec<i64> = pending.iter().map(|p| p.seq).collect();
        sqlx::query("DELETE FROM courier_outbox WHERE seq = ANY($1)")
            .bind(&seqs)
            .execute(&mut **tx)
            .await?;
        Ok(pending.len())
    }

    async fn publish_batch_sqlite(&self, pool: &SqlitePool) -> Result<usize, Error> {
        let rows = sqlx::query(
            "SELECT seq, id, kind, name, key, payload FROM courier_outbox ORDER BY seq LIMIT $1",
        )
        .bind(self.opts.batch_size)
        .fetch_all(pool)
        .await?;
        let pending = rows
            .iter()
            .map(|row| {
                pending_from(
                    row.try_get("seq")?,
                    row.try_get("id")?,
                    row.try_get("kind")?,
                    row.try_get("name")?,
                    row.try_get("key")?,
                    row.try_get("payload")?,
                )
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let Some(last) = pending.last() else {
            return Ok(0);
        };
        self.publish_all(&pending).await?;
        // SQLite writes one transaction at a time, so sequence numbers are
        // in commit order: everything up to the last one read was published.
        sqlx::query("DELETE FROM courier_outbox WHERE seq <= $1")
            .bind(last.seq)
            .execute(pool)
            .await?;
        Ok(pending.len())
    }

    /// Queues every message in order, then waits for every acceptance.
    async fn publish_all(&self, pending: &[Pending]) -> Result<(), Error> {
        let mut acks: Vec<PendingAck> = Vec::with_capacity(pending.len());
        for row in pending {
            let message = &row.message;
            let builder = match message.kind {
                Kind::Event => self.client.event(message.name.as_str()),
                Kind::Command => self.client.command(message.name.as_str()),
            };
            let mut builder = builder.id(message.id).payload(message.payload.clone());
            if let Some(key) = &message.key {
                builder = builder.key(key.clone());
            }
            acks.push(builder.enqueue()?);
        }
        for ack in acks {
            ack.wait().await?;
        }
        if let Some(hook) = &self.on_accepted {
            let ids: Vec<Uuid> = pending.iter().map(|p| p.message.id).collect();
            hook(&ids);
        }
        Ok(())
    }
}

fn pending_from(
    seq: i64,
    id: Vec<u8>,
    kind: i64,
    name: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
) -> Result<Pending, Error> {
    let id = Uuid::from_slice(&id).map_err(|_| Error::DamagedRow {
        seq,
        what: "its id is not 16 bytes",
    })?;
    let kind = Kind::from_code(kind).ok_or(Error::DamagedRow {
        seq,
        what: "its kind is neither 0 (event) nor 1 (command)",
    })?;
    Ok(Pending {
        seq,
        message: OutboxMessage {
            id,
            kind,
            name,
            key,
            payload,
        },
    })
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
