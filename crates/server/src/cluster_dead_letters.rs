//! The dead-letter commands (`courier.dead-letters.*`) on a cluster
//! backend: the core checks their arguments and hands them here
//! ([`Action::DeadLetterQuery`]); a task reads or changes `COURIER_DEAD`
//! (`courier_cluster::dead_letters`) and gives the outcome back to the
//! core ([`Broker::dead_letters_answered`]), which answers as one broker
//! does. The commands never wait on the network under the core's lock.
//!
//! [`Broker::dead_letters_answered`]: courier_broker::Broker::dead_letters_answered

use std::sync::{Arc, Mutex, Weak};

use courier_broker::{
    Action, DeadLetter, DeadLetterAnswer, DeadLetterFound, DeadLetterPage, DeadLetterQuery,
};
use courier_cluster::dead_letters::{self, DeadLettersError};
use courier_proto::ErrorCode;
use tokio::sync::mpsc;
use tracing::warn;

use crate::Shared;

/// The commands waiting for the task, and the task's end of the queue
/// until it starts.
pub(crate) struct Queries {
    sender: mpsc::UnboundedSender<Action>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Action>>>,
}

impl Queries {
    pub(crate) fn new() -> Queries {
        let (sender, receiver) = mpsc::unbounded_channel();
        Queries {
            sender,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// Starts the task that carries the commands out; it ends with the
    /// server (it holds it only weakly).
    pub(crate) fn start(&self, shared: &Arc<Shared>) -> Option<crate::AbortOnDrop> {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(crate::AbortOnDrop(tokio::spawn(serve(
            Arc::downgrade(shared),
            receiver,
        ))))
    }
}

/// Hands an [`Action::DeadLetterQuery`] to the cluster edge (from the
/// dispatch of the core's actions, on any thread).
pub(crate) fn ask(shared: &Shared, action: Action) {
    let Some(edge) = &shared.cluster else {
        // Never: only a cluster backend's core asks.
        warn!("a dead-letter command without a cluster backend; left unanswered");
        return;
    };
    if edge.dead_letters.sender.send(action).is_err() {
        warn!("the cluster edge has stopped; a dead-letter command is left unanswered");
    }
}

async fn serve(shared: Weak<Shared>, mut queries: mpsc::UnboundedReceiver<Action>) {
    while let Some(action) = queries.recv().await {
        let Action::DeadLetterQuery {
            conn,
            seq,
            quiet,
            request,
            activity_id,
            query,
        } = action
        else {
            continue;
        };
        let Some(jetstream) = shared.upgrade().and_then(|s| {
            s.cluster
                .as_ref()
                .map(|e| e.node.connection.jetstream.clone())
        }) else {
            return;
        };
        let shared = shared.clone();
        // Each on its own: a long listing does not hold up a purge.
        tokio::spawn(async move {
            let found = carry_out(&jetstream, &query, &request.to_string()).await;
            let answer = DeadLetterAnswer {
                conn,
                seq,
                quiet,
                request,
                activity_id,
                command: query.command(),
                found,
            };
            if let Some(shared) = shared.upgrade() {
                shared.with_core_deferred(|core, now| core.dead_letters_answered(answer, now));
            }
        });
    }
}

fn letter(d: dead_letters::DeadLetter) -> (DeadLetter, Option<Arc<courier_proto::Message>>) {
    (
        DeadLetter {
            seq: d.id,
            attempts: d.attempts,
            reason: d.reason,
            at: d.at,
        },
        d.message.map(Arc::new),
    )
}

fn refusal(e: DeadLettersError) -> (ErrorCode, String) {
    let code = match e {
        DeadLettersError::NotFound { .. } | DeadLettersError::Unreadable { .. } => {
            ErrorCode::InvalidMessage
        }
        // Like a send the cluster did not confirm: retry later.
        DeadLettersError::Backend(_) => ErrorCode::StorageFailed,
    };
    (code, e.to_string())
}

pub(crate) async fn carry_out(
    jetstream: &async_nats::jetstream::Context,
    query: &DeadLetterQuery,
    request: &str,
) -> Result<DeadLetterFound, (ErrorCode, String)> {
    let found = match query {
        DeadLetterQuery::List {
            service,
            after,
            limit,
        } => {
            let page = dead_letters::list(jetstream, service, *after, *limit).await;
            page.map(|page| DeadLetterFound::Listing {
                page: DeadLetterPage {
                    letters: page.letters.into_iter().map(letter).collect(),
                    total_after: page.total_after,
                },
                limit: *limit,
            })
        }
        DeadLetterQuery::Show { service, id } => {
            dead_letters::show(jetstream, service, *id).await.map(|d| {
                let (d, m) = letter(d);
                DeadLetterFound::Letter(d, m)
            })
        }
        DeadLetterQuery::Replay { service, id } => {
            dead_letters::replay(jetstream, service, *id, request)
                .await
                .map(|()| DeadLetterFound::Replayed {
                    service: service.clone(),
                    id: *id,
                })
        }
        DeadLetterQuery::Purge { service, id } => dead_letters::purge(jetstream, service, *id)
            .await
            .map(|purged| DeadLetterFound::Purged {
                service: service.clone(),
                purged: usize::try_from(purged).unwrap_or(usize::MAX),
            }),
    };
    found.map_err(refusal)
}

/// The console's dead-letter pages and changes on a cluster: `query`
/// carried out on `COURIER_DEAD` as the protocol's commands are; `None`
/// on one broker (the core has the dead letters). A refusal that names
/// a missing dead letter is `InvalidMessage`, one the cluster did not
/// answer `StorageFailed`.
pub(crate) async fn for_console(
    shared: &Shared,
    query: DeadLetterQuery,
) -> Option<Result<DeadLetterFound, (ErrorCode, String)>> {
    let jetstream = shared.cluster.as_ref()?.node.connection.jetstream.clone();
    let request = uuid::Uuid::now_v7().to_string();
    Some(carry_out(&jetstream, &query, &request).await)
}
