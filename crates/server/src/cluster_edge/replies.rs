//! Replies across nodes (docs/SCALE-OUT.md §10): a reply to a command
//! accepted on another node goes to that node (`courier.node.<id>.reply`);
//! one whose requester's node is gone, or whose requester left it, goes
//! to an instance of the requesting service on any node
//! (`courier.r.<service>`), else waits on the node that has it. A reply
//! to a command the replier's node does not know — the replier
//! reconnected there while handling it — asks every node on
//! `courier.routes`; the node that accepted the command, or the one that
//! fetched it, answers where its replies go.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use courier_broker::{KnownReplyRoute, RemoteReply};
use courier_cluster::Connection;
use courier_proto::{ErrorCode, Message};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::{per_service, ClusterEdge, Find, Forward};
use crate::Shared;

/// How long a node waits for the requester's node to take a reply: a
/// reply of a flow-controlled stream is taken when the requester has
/// credit for it, so this is as long as a client waits for a send's
/// answer (the SDK's send timeout).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to a forwarded reply that waited for the requester's
/// credit: the number its node awaits it under, the code and the reason.
pub(crate) type Answer = (u64, ErrorCode, String);

/// Forwarded replies waiting in a stream here for the requester's
/// credit: the inbox each forwarding node awaits the answer on.
#[derive(Default)]
pub(crate) struct PendingAnswers {
    next: std::sync::atomic::AtomicU64,
    inboxes: std::sync::Mutex<HashMap<u64, async_nats::Subject>>,
}

impl PendingAnswers {
    fn inboxes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, async_nats::Subject>> {
        self.inboxes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A number to await an answer under, sent to `inbox` when it comes.
    fn await_on(&self, inbox: async_nats::Subject) -> u64 {
        let answer = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inboxes().insert(answer, inbox);
        answer
    }

    fn take(&self, answer: u64) -> Option<async_nats::Subject> {
        self.inboxes().remove(&answer)
    }
}

/// Sends each answer the core gives to a forwarded reply that waited for
/// credit to the node awaiting it.
pub(super) async fn answer_waiting_replies(
    shared: Weak<Shared>,
    mut answers: mpsc::UnboundedReceiver<Answer>,
) {
    while let Some((answer, code, reason)) = answers.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &shared.cluster else {
            return;
        };
        let Some(inbox) = edge.pending_answers.take(answer) else {
            continue;
        };
        let client = edge.node.connection.client.clone();
        drop(shared);
        if let Err(e) = client.publish(inbox, encode_answer(code, &reason)).await {
            warn!(error = %e, "could not answer a forwarded reply that waited for credit");
        }
    }
}

/// Where a node asks the others for the route of a reply to a command it
/// does not know; only a node that knows answers.
const ROUTE_SUBJECT: &str = "courier.routes";

/// How long a node waits for another to say where a reply goes before it
/// refuses it as a reply to no known command: a node that knows answers
/// within a round trip on the cluster's network.
const ROUTE_ASK_PATIENCE: Duration = Duration::from_secs(1);

/// A node's answer on [`ROUTE_SUBJECT`].
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct RouteAnswer {
    /// The node the command was accepted on.
    node: String,
    receivers: Vec<String>,
    requester: String,
}

/// The subject a node takes forwarded replies on.
fn reply_subject(node: &str) -> String {
    format!("courier.node.{node}.reply")
}

/// Encodes a node's answer to a forwarded reply: the code, then the reason.
fn encode_answer(code: ErrorCode, reason: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(2 + reason.len());
    out.put_u16(code.as_u16());
    out.put_slice(reason.as_bytes());
    out.freeze()
}

fn decode_answer(bytes: &[u8]) -> (ErrorCode, String) {
    match bytes {
        [high, low, reason @ ..] => (
            ErrorCode::from_u16(u16::from_be_bytes([*high, *low])),
            String::from_utf8_lossy(reason).into_owned(),
        ),
        _ => (
            ErrorCode::StorageFailed,
            "the requester's node answered with nothing readable".to_string(),
        ),
    }
}

/// Takes replies other nodes forward to this node's requesters.
pub(super) async fn serve_forwarded_replies(shared: Weak<Shared>) {
    let Some((connection, subject)) = shared.upgrade().and_then(|s| {
        s.cluster.as_ref().map(|e| {
            (
                e.node.connection.clone(),
                reply_subject(e.node.node.as_str()),
            )
        })
    }) else {
        return;
    };
    let client = connection.client.clone();
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(requests) => requests,
        Err(e) => {
            warn!(error = %e, %subject, "cannot take forwarded replies; replies to this node's requesters from other nodes will fail");
            return;
        }
    };
    let shared_weak = shared;
    while let Some(request) = requests.next().await {
        let Some(shared) = shared_weak.upgrade() else {
            return;
        };
        let Some(to) = request.reply else {
            continue;
        };
        let message = match courier_proto::decode_message(request.payload.clone()) {
            Ok(message) => Arc::new(message),
            Err(e) => {
                let reason = format!("the forwarded reply cannot be decoded: {e}");
                let _ = client
                    .publish(to, encode_answer(ErrorCode::InvalidMessage, &reason))
                    .await;
                continue;
            }
        };
        let mut fate = RemoteReply::Answer(ErrorCode::Ok, String::new());
        // Awaited before the core takes it: its answer may come in the
        // same pass.
        let pending = shared.cluster.as_ref().map(|edge| &edge.pending_answers);
        let answer = pending.map_or(0, |p| p.await_on(to.clone()));
        shared.with_core_deferred(|core, now| {
            fate = core.remote_reply(message.clone(), answer, now);
        });
        if fate == RemoteReply::Pending {
            continue;
        }
        if let Some(pending) = pending {
            pending.take(answer);
        }
        drop(shared);
        let (client, connection) = (client.clone(), connection.clone());
        let shared_weak = shared_weak.clone();
        // Offering it elsewhere waits on other nodes: not in this loop.
        tokio::spawn(async move {
            let (code, reason) = match fate {
                RemoteReply::Answer(code, reason) => (code, reason),
                RemoteReply::Pending => return,
                RemoteReply::ToService(service) => {
                    to_service_or_parked(
                        &shared_weak,
                        &connection,
                        &service,
                        &request.payload,
                        message,
                    )
                    .await
                }
            };
            if let Err(e) = client.publish(to, encode_answer(code, &reason)).await {
                warn!(error = %e, "could not answer a forwarded reply");
            }
        });
    }
}

/// Where a service's instances on other nodes take replies whose
/// requesting connection is gone: one node of the service's queue group
/// (SCALE-OUT §10).
fn service_reply_subject(service: &str) -> String {
    format!(
        "courier.r.{}",
        courier_cluster::names::service_token(service)
    )
}

/// Offers a reply to `service`'s instances on the other nodes; if none
/// takes it, gives it to one here, else parks it in `COURIER_PARKED` for
/// the next instance of `service` to connect to any node (in this node's
/// memory if the cluster cannot store it). The answer for the replier.
async fn to_service_or_parked(
    shared: &Weak<Shared>,
    connection: &Connection,
    service: &str,
    encoded: &Bytes,
    message: Arc<Message>,
) -> (ErrorCode, String) {
    let offer = || {
        connection
            .client
            .request(service_reply_subject(service), encoded.clone())
    };
    let mut offered = tokio::time::timeout(FORWARD_TIMEOUT, offer()).await;
    if matches!(&offered, Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut) {
        // The one node of the group was killed a moment ago, and a server
        // still took its interest for real (it leaves by gossip): by now
        // it is gone, and nobody answers at once.
        offered = tokio::time::timeout(FORWARD_TIMEOUT, offer()).await;
    }
    match offered {
        Ok(Ok(answer)) => {
            let (code, reason) = decode_answer(&answer.payload);
            // Its instance there left meanwhile: park it here after all.
            if code != ErrorCode::UnknownRequest {
                return (code, reason);
            }
        }
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
        Ok(Err(e)) => {
            return (
                ErrorCode::StorageFailed,
                format!(
                    "the reply could not be offered to service {service}'s instances: {e}; retry"
                ),
            )
        }
        Err(_) => {
            return (
                ErrorCode::StorageFailed,
                format!(
                    "no node with an instance of {service} took the reply within {} s; retry",
                    FORWARD_TIMEOUT.as_secs()
                ),
            )
        }
    }
    let shared_weak = shared;
    let Some(shared) = shared_weak.upgrade() else {
        return (
            ErrorCode::StorageFailed,
            "the node is shutting down; retry".to_string(),
        );
    };
    // An instance that connected here a moment ago may not be taking
    // offers yet: it comes first.
    let mut taken = None;
    shared.with_core_deferred(|core, now| {
        taken = core.reply_to_service(service, message.clone(), now)
    });
    if let Some(answer) = taken {
        return answer;
    }
    drop(shared);
    if let Err(e) = courier_cluster::parked::park(connection, service, &message).await {
        warn!(%service, "{e}; the reply waits in this node's memory instead");
        if let Some(shared) = shared_weak.upgrade() {
            shared.with_core_deferred(|core, _now| core.park_reply(service, message));
        }
    }
    (ErrorCode::Ok, String::new())
}

/// Keeps one taker of offered replies per service with an instance here.
pub(super) async fn run_reply_takers(shared: Weak<Shared>) {
    let wanted = |shared: &Shared| shared.core().services_with_instances();
    let taker = |edge: &ClusterEdge, shared: Weak<Shared>, service, stop| {
        take_service_replies(shared, edge.node.connection.clone(), service, stop)
    };
    per_service(shared, wanted, taker).await;
}

/// While `service` has instances here: takes the replies other nodes
/// offer it, and those parked for it in `COURIER_PARKED`.
async fn take_service_replies(
    shared: Weak<Shared>,
    connection: Connection,
    service: String,
    stop: watch::Receiver<bool>,
) {
    let deliver = {
        let (shared, service) = (shared.clone(), service.clone());
        move |reply: Message| {
            let Some(shared) = shared.upgrade() else {
                return false;
            };
            let mut taken = None;
            shared.with_core_deferred(|core, now| {
                taken = core.reply_to_service(&service, Arc::new(reply), now)
            });
            taken.is_some()
        }
    };
    let parked =
        courier_cluster::parked::take(connection.clone(), service.clone(), deliver, stop.clone());
    let offered = take_offered_replies(shared, connection.client, service, stop);
    tokio::join!(parked, offered);
}

/// Takes the replies other nodes offer `service` ([`Broker::reply_to_service`]);
/// answers `UnknownRequest` if its instances all left meanwhile, so the
/// offering node parks the reply.
///
/// [`Broker::reply_to_service`]: courier_broker::Broker::reply_to_service
async fn take_offered_replies(
    shared: Weak<Shared>,
    client: async_nats::Client,
    service: String,
    mut stop: watch::Receiver<bool>,
) {
    let subject = service_reply_subject(&service);
    let group = courier_cluster::names::service_token(&service);
    let mut offered = match client.queue_subscribe(subject, group).await {
        Ok(offered) => offered,
        Err(e) => {
            warn!(error = %e, %service, "cannot take replies other nodes offer; they wait on those nodes instead");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            request = offered.next() => request,
            _ = stop.changed() => None,
        };
        let Some(request) = request else {
            return;
        };
        let Some(to) = request.reply else {
            continue;
        };
        let answer = match courier_proto::decode_message(request.payload) {
            Ok(message) => {
                let mut taken = None;
                if let Some(shared) = shared.upgrade() {
                    shared.with_core_deferred(|core, now| {
                        taken = core.reply_to_service(&service, Arc::new(message), now)
                    });
                }
                taken.unwrap_or_else(|| {
                    (
                        ErrorCode::UnknownRequest,
                        format!("no instance of {service} is on this node any more"),
                    )
                })
            }
            Err(e) => (
                ErrorCode::InvalidMessage,
                format!("the offered reply cannot be decoded: {e}"),
            ),
        };
        if let Err(e) = client.publish(to, encode_answer(answer.0, &answer.1)).await {
            warn!(error = %e, "could not answer an offered reply");
        }
    }
}

/// Answers other nodes' questions for the routes of commands this node
/// accepted or fetched ([`courier_broker::Broker::reply_route_of`]);
/// says nothing of the others.
pub(super) async fn answer_route_questions(shared: Weak<Shared>) {
    let lost = (
        "reply routes",
        "replies through them to commands accepted or fetched here will be refused",
    );
    super::answer_questions(
        shared,
        |_| ROUTE_SUBJECT.to_string(),
        lost,
        |shared, question| {
            let command = uuid::Uuid::from_slice(question).ok()?;
            let known = shared.core().reply_route_of(command)?;
            let node = shared.cluster.as_ref()?.node.node.as_str().to_string();
            let answer = RouteAnswer {
                node: known.node.unwrap_or(node),
                receivers: known.receivers,
                requester: known.requester,
            };
            serde_json::to_vec(&answer).ok().map(Into::into)
        },
    )
    .await;
}

/// Asks the other nodes where the replies to `command` go; `None` if no
/// node knows within [`ROUTE_ASK_PATIENCE`].
async fn ask_route(
    client: &async_nats::Client,
    command: uuid::Uuid,
) -> Option<(String, KnownReplyRoute)> {
    let question = client.request(ROUTE_SUBJECT, Bytes::copy_from_slice(command.as_bytes()));
    let answer = tokio::time::timeout(ROUTE_ASK_PATIENCE, question)
        .await
        .ok()?
        .ok()?;
    let RouteAnswer {
        node,
        receivers,
        requester,
    } = serde_json::from_slice(&answer.payload).ok()?;
    let route = KnownReplyRoute {
        node: Some(node.clone()),
        receivers,
        requester,
    };
    Some((node, route))
}

/// Asks for the routes of replies to commands this node does not know,
/// and hands the answers to the core, which forwards or refuses them.
pub(super) async fn find_reply_routes(
    shared: Weak<Shared>,
    mut finds: mpsc::UnboundedReceiver<Find>,
) {
    while let Some(find) = finds.recv().await {
        let Some(client) = shared
            .upgrade()
            .and_then(|s| s.cluster.as_ref().map(|e| e.node.connection.client.clone()))
        else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let found = match find.message.response_to {
                Some(command) => ask_route(&client, command).await,
                None => None,
            };
            if let Some(shared) = shared.upgrade() {
                shared.with_core_deferred(|core, now| {
                    core.reply_route_found(
                        find.conn,
                        find.seq,
                        find.quiet,
                        find.message,
                        found,
                        now,
                    )
                });
            }
        });
    }
}

/// Sends replies to their command's node and answers their senders.
pub(super) async fn forward_replies(
    shared: Weak<Shared>,
    mut forwards: mpsc::UnboundedReceiver<Forward>,
) {
    while let Some(forward) = forwards.recv().await {
        let Some(connection) = shared
            .upgrade()
            .and_then(|s| s.cluster.as_ref().map(|e| e.node.connection.clone()))
        else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (code, reason) = match forward_one(&connection.client, &forward).await {
                Some(answer) => answer,
                // The requester's node is gone: its instances reconnect
                // elsewhere, and one of them takes the reply.
                None => match encoded(&forward.message) {
                    Ok(payload) => {
                        to_service_or_parked(
                            &shared,
                            &connection,
                            &forward.requester,
                            &payload,
                            forward.message.clone(),
                        )
                        .await
                    }
                    Err(answer) => answer,
                },
            };
            if let Some(shared) = shared.upgrade() {
                shared.with_core_deferred(|core, _now| {
                    core.forwarded_reply_answer(
                        forward.conn,
                        forward.seq,
                        forward.quiet,
                        code,
                        reason,
                    )
                });
            }
        });
    }
}

fn encoded(message: &Message) -> Result<Bytes, (ErrorCode, String)> {
    let mut payload = BytesMut::new();
    courier_proto::encode_message(message, &mut payload).map_err(|e| {
        (
            ErrorCode::InvalidMessage,
            format!("the reply cannot be encoded: {e}"),
        )
    })?;
    Ok(payload.freeze())
}

/// The requester's node's answer to a forwarded reply; `None` if that
/// node is gone (nothing listens on its subject).
async fn forward_one(
    client: &async_nats::Client,
    forward: &Forward,
) -> Option<(ErrorCode, String)> {
    let payload = match encoded(&forward.message) {
        Ok(payload) => payload,
        Err(answer) => return Some(answer),
    };
    let request = client.send_request(
        reply_subject(&forward.node),
        async_nats::Request::new()
            .payload(payload)
            .timeout(Some(FORWARD_TIMEOUT)),
    );
    tokio::pin!(request);
    let gave_up = tokio::time::sleep(FORWARD_TIMEOUT);
    tokio::pin!(gave_up);
    // A node killed a moment ago can still look subscribed from another
    // server of the cluster (its interest leaves by gossip), and then the
    // request waits in vain: while waiting, ask now and then whether the
    // node is there at all.
    let mut probe = tokio::time::interval_at(
        tokio::time::Instant::now() + LIVENESS_PROBE_EVERY,
        LIVENESS_PROBE_EVERY,
    );
    loop {
        tokio::select! {
            answer = &mut request => {
                return Some(match answer {
                    Ok(answer) => decode_answer(&answer.payload),
                    Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => return None,
                    Err(e) => (
                        ErrorCode::StorageFailed,
                        format!("the reply could not reach node {}: {e}; retry", forward.node),
                    ),
                });
            }
            () = &mut gave_up => {
                return Some((
                    ErrorCode::StorageFailed,
                    format!(
                        "node {} did not take the reply within {} s; retry",
                        forward.node,
                        FORWARD_TIMEOUT.as_secs()
                    ),
                ));
            }
            _ = probe.tick() => {
                if !node_answers(client, &forward.node).await {
                    return None;
                }
            }
        }
    }
}

/// How often a node waiting on another to take a reply asks whether it
/// is there.
const LIVENESS_PROBE_EVERY: Duration = Duration::from_secs(2);

/// Whether node `node` is there: `false` only when nothing listens on its
/// subjects any more (a probe that times out says nothing).
pub(super) async fn node_answers(client: &async_nats::Client, node: &str) -> bool {
    let probe = client.request(super::views::instances_subject(node), Bytes::new());
    match tokio::time::timeout(Duration::from_secs(1), probe).await {
        Ok(Err(e)) => e.kind() != async_nats::RequestErrorKind::NoResponders,
        Ok(Ok(_)) | Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_answers_round_trip() {
        let answer = RouteAnswer {
            node: "a".to_string(),
            receivers: vec!["ledger".to_string()],
            requester: "shop".to_string(),
        };
        let bytes = serde_json::to_vec(&answer).expect("encode");
        assert_eq!(
            serde_json::from_slice::<RouteAnswer>(&bytes).expect("decode"),
            answer
        );
    }

    #[test]
    fn answers_round_trip() {
        let bytes = encode_answer(ErrorCode::UnknownRequest, "gone");
        assert_eq!(
            decode_answer(&bytes),
            (ErrorCode::UnknownRequest, "gone".to_string())
        );
        assert_eq!(decode_answer(&[]).0, ErrorCode::StorageFailed);
    }
}
