//! The idempotent inbox: a message's id recorded in the transaction of
//! its effects, so a second copy has none.

use std::time::Duration;

use courier_client::Incoming;
use sqlx::Transaction;
use uuid::Uuid;

use crate::{now_micros, Backend, BoxFuture, Error};

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
