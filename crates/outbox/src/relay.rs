//! The relay: publishes the outbox's rows to the broker, and deletes them
//! once the broker accepted them.

use std::time::Duration;

use courier_client::{Client, PendingAck};
use sqlx::postgres::{PgListener, PgPool, Postgres};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Transaction};
use uuid::Uuid;

use crate::{migrate_postgres, migrate_sqlite, Error, Kind, OutboxMessage, NOTIFY_CHANNEL};

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
