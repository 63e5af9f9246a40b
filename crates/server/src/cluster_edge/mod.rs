//! A node's edge to a NATS JetStream cluster (docs/SCALE-OUT.md): the
//! tasks that feed the core what other nodes did and what the backend
//! holds for this node's instances.
//!
//! - **Fetching.** For every service with an instance here that consumes,
//!   a loop pulls from the service's consumers no more than the core's
//!   [`Broker::fetch_credit`], and hands each message to
//!   [`Broker::fetched`] (the keyed lane only under its lease). Loops
//!   start and stop as instances come and go.
//! - **Transient messages** no instance here takes are offered to the
//!   nodes with instances of their service, and taken from them.
//! - **Subscriptions.** A watch of the `courier_services` bucket feeds
//!   [`Broker::subscriptions_changed`]: a subscription made on any node
//!   routes on every node.
//! - **Replies.** A reply to a command accepted on another node leaves as
//!   a core NATS request to `courier.node.<node>.reply`
//!   ([`courier_broker::Action::ForwardReply`]); this node answers those
//!   requests for its own requesters with [`Broker::remote_reply`]. A
//!   reply whose requester's node is gone, or whose requester left it, is
//!   offered to its service's instances on any node (`courier.r.<service>`),
//!   else parked on the node that has it. A reply to a command this node
//!   does not know (its replier reconnected here while handling it) first
//!   asks the other nodes where it goes (`courier.routes`).
//! - **Traces.** A trace query on any node merges every node's part of
//!   the activities (`traces.rs`); the console's services page shows
//!   every node's instances (`views.rs`), its names and topology pages
//!   every node's counters (`names.rs`); tails see every node's accepted
//!   messages, relayed while some node tails (`tails.rs`).
//! - **Registry.** A watch of `courier_registry` feeds
//!   [`Broker::registry_replicated`], TTL heartbeats taken on any node
//!   reach every node, and the node that holds the `registry` lease runs
//!   the checks (`registry.rs`).
//! - **Registration.** The node's record in `courier_nodes`, renewed.
//!
//! - **Keyed messages to other nodes' instances.** The keyed lane's
//!   holder relays them to the nodes that pull (`relaying.rs`).
//!
//! `fetching.rs` holds the fetch loops, the keyed lanes' leases and the
//! transient offers; `replies.rs` the replies across nodes; this file
//! starts them all and keeps the per-service ones in step with the core.
//!
//! [`Broker::fetch_credit`]: courier_broker::Broker::fetch_credit
//! [`Broker::fetched`]: courier_broker::Broker::fetched
//! [`Broker::subscriptions_changed`]: courier_broker::Broker::subscriptions_changed
//! [`Broker::remote_reply`]: courier_broker::Broker::remote_reply
//! [`Broker::registry_replicated`]: courier_broker::Broker::registry_replicated

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use courier_broker::{ConnId, RemoteSubscriptions};
use courier_cluster::lease::{Acquired, Lease, LeaseKeeper, LeaseTiming};
use courier_cluster::{Connection, NodeId};
use courier_proto::Message;
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use crate::Shared;

mod fetching;
pub(crate) mod gauges;
pub(crate) mod names;
mod registry;
pub(crate) mod relaying;
pub(crate) mod replays;
pub(crate) mod replies;
mod tails;
pub(crate) mod traces;
pub(crate) mod views;

use fetching::{offer_transients, run_fetchers, LANE_LEASE_RETRY};
use replies::{
    answer_route_questions, find_reply_routes, forward_replies, run_reply_takers,
    serve_forwarded_replies,
};

/// How often the per-service tasks (fetch loops, reply takers) are
/// checked against the services they serve when nothing woke the check
/// earlier.
const SERVICE_TASKS_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Keeps one task per service that `wanted` lists (asked whenever the
/// core's [`courier_broker::Broker::membership_changes`] moved, at least
/// every [`SERVICE_TASKS_CHECK_EVERY`]): `task` makes it with a signal
/// that stops it once the service leaves the list.
async fn per_service<Task>(
    shared: Weak<Shared>,
    wanted: impl Fn(&Shared) -> Vec<String>,
    task: impl Fn(&ClusterEdge, Weak<Shared>, String, watch::Receiver<bool>) -> Task,
) where
    Task: std::future::Future<Output = ()> + Send + 'static,
{
    let mut running: HashMap<String, watch::Sender<bool>> = HashMap::new();
    let mut membership = match shared.upgrade() {
        Some(strong) => match &strong.cluster {
            Some(edge) => edge.membership.subscribe(),
            None => return,
        },
        None => return,
    };
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let Some(edge) = &strong.cluster else {
            return;
        };
        let services = wanted(&strong);
        running.retain(|service, stop| {
            let keep = services.contains(service);
            if !keep {
                let _ = stop.send(true);
            }
            keep
        });
        for service in services {
            if running.contains_key(&service) {
                continue;
            }
            let (stop, stopped) = watch::channel(false);
            running.insert(service.clone(), stop);
            tokio::spawn(task(edge, shared.clone(), service, stopped));
        }
        drop(strong);
        // A change made while the list was read is still seen: a watch
        // marks it until looked at.
        if let Ok(Err(_)) =
            tokio::time::timeout(SERVICE_TASKS_CHECK_EVERY, membership.changed()).await
        {
            // The edge is gone.
            return;
        }
    }
}

/// Asks every other node in `courier_nodes` at once, each on its own
/// `subject`, waiting up to `patience` for each: the answers that came,
/// by node, and the nodes that gave none in time (or, if the registry
/// cannot be read, what stands for them).
pub(crate) async fn ask_every_other_node(
    node: &ClusterNode,
    subject: impl Fn(&str) -> String,
    payload: bytes::Bytes,
    patience: Duration,
) -> (Vec<(String, bytes::Bytes)>, Vec<String>) {
    let others: Vec<String> = match courier_cluster::nodes::list_nodes(&node.nodes).await {
        Ok(nodes) => nodes
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| id != node.node.as_str())
            .collect(),
        Err(e) => {
            warn!(error = %e, "cannot list the cluster's nodes; answering with this node's part only");
            return (Vec::new(), vec![format!("every other node ({e})")]);
        }
    };
    let asks = others.iter().map(|id| {
        let request = node.connection.client.request(subject(id), payload.clone());
        async move {
            match tokio::time::timeout(patience, request).await {
                Ok(Ok(answer)) => Some(answer.payload),
                _ => None,
            }
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut came = Vec::new();
    let mut silent = Vec::new();
    for (id, answer) in others.into_iter().zip(answers) {
        match answer {
            Some(answer) => came.push((id, answer)),
            None => silent.push(id),
        }
    }
    (came, silent)
}

/// What a node that cannot answer the console's questions costs the
/// others.
const PARTIAL_ELSEWHERE: &str = "their pages will name this node as partial";

/// Answers the questions other nodes ask this one on `subject(node)`
/// with `answer(shared, question)` (`None`: stays silent), until the
/// server is gone; `why` says in a warning what is lost when this node
/// cannot subscribe, `what` names the answers.
pub(super) async fn answer_questions(
    shared: Weak<Shared>,
    subject: fn(&str) -> String,
    (what, why): (&str, &str),
    answer: impl Fn(&Shared, &bytes::Bytes) -> Option<bytes::Bytes>,
) {
    let Some((client, subject)) = shared.upgrade().and_then(|s| {
        let edge = s.cluster.as_ref()?;
        Some((
            edge.node.connection.client.clone(),
            subject(edge.node.node.as_str()),
        ))
    }) else {
        return;
    };
    let mut questions = match client.subscribe(subject).await {
        Ok(questions) => questions,
        Err(e) => {
            warn!(error = %e, "cannot answer other nodes' questions for {what}; {why}");
            return;
        }
    };
    while let Some(question) = questions.next().await {
        let Some(to) = question.reply else {
            continue;
        };
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let answered = answer(&strong, &question.payload);
        drop(strong);
        let Some(answered) = answered else {
            continue;
        };
        if let Err(e) = client.publish(to, answered).await {
            warn!(error = %e, "could not answer a question for {what}");
        }
    }
}

/// What a server on a cluster backend is given.
pub struct ClusterNode {
    pub connection: Connection,
    pub node: NodeId,
    /// The node's record in `courier_nodes` is put into this bucket.
    pub nodes: async_nats::jetstream::kv::Store,
    /// `courier_leases`: the keyed lanes' leases.
    pub leases: async_nats::jetstream::kv::Store,
    /// `courier_registry`: the service registry's entries.
    pub registry: async_nats::jetstream::kv::Store,
    /// The record put there (its addresses are filled in at start).
    pub record: courier_cluster::nodes::NodeRecord,
    /// The leases this node holds (the `courier_lease_held` gauge).
    pub held_leases: courier_cluster::lease::HeldLeases,
    /// The store's fetched messages kept alive on JetStream while held
    /// ([`courier_cluster::store::ClusterStore::in_progress`]).
    pub in_progress: Arc<courier_cluster::in_progress::InProgress>,
    /// The keys this node gave back to a relay's holder
    /// ([`courier_cluster::store::ClusterStore::given_back`]).
    pub given_back: Arc<courier_cluster::relay::GivenBack>,
    /// Changes the subscription table (the keyed lane's holder joins and
    /// ends history replays, `replays.rs`).
    pub services: courier_cluster::services::ServiceWriter,
    /// Started with `--accept-weaker-durability` past a failed check
    /// (the `courier_durability_weaker` gauge).
    pub durability_weaker: bool,
    /// How long events stay in the log for history replays: the longest
    /// of `--retention` and the `--retain` rules' ages (a purge cannot
    /// spare one pattern's events, so each is kept at least as asked).
    pub event_retention: Duration,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("node", &self.node.as_str())
            .finish_non_exhaustive()
    }
}

/// A reply on its way to the node its command was accepted on.
pub(crate) struct Forward {
    pub conn: ConnId,
    pub seq: u64,
    pub quiet: bool,
    pub node: String,
    /// The command's sender, whose instances elsewhere take the reply if
    /// `node` is gone.
    pub requester: String,
    pub message: Arc<Message>,
}

/// A reply to a command this node does not know, whose route it asks
/// the other nodes for.
pub(crate) struct Find {
    pub conn: ConnId,
    pub seq: u64,
    pub quiet: bool,
    pub message: Arc<Message>,
}

/// A transient message offered to another node's instances.
pub(crate) struct Transient {
    pub service: String,
    pub message: Arc<Message>,
    /// This node traces its activity (`Courier-Traced`).
    pub traced: bool,
}

/// The edge's state the server shares.
pub(crate) struct ClusterEdge {
    pub node: Arc<ClusterNode>,
    /// Replies to forward ([`courier_broker::Action::ForwardReply`]).
    pub forwards: mpsc::UnboundedSender<Forward>,
    forwards_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Forward>>>,
    /// Replies whose route to ask for ([`courier_broker::Action::FindReplyRoute`]).
    pub finds: mpsc::UnboundedSender<Find>,
    finds_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Find>>>,
    /// Transient messages to offer ([`courier_broker::Action::ForwardTransient`]).
    pub transients: mpsc::UnboundedSender<Transient>,
    transients_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Transient>>>,
    /// The dead-letter commands (`cluster_dead_letters.rs`).
    pub dead_letters: crate::cluster_dead_letters::Queries,
    /// Woken after every pass of the core: room may have freed up for a
    /// fetch loop.
    pub room: Arc<Notify>,
    /// The core's [`courier_broker::Broker::membership_changes`] as of
    /// its last pass: the per-service tasks' supervisors wait for it to
    /// move.
    pub membership: watch::Sender<u64>,
    /// The cluster's counts as `/metrics` last read them.
    pub readings: gauges::Readings,
    /// Forwarded replies waiting in a stream for the requester's credit:
    /// where their nodes await the answer.
    pub pending_answers: replies::PendingAnswers,
    /// Their answers, once the core gives them
    /// ([`courier_broker::Action::AnswerForwardedReply`]).
    pub answers: mpsc::UnboundedSender<replies::Answer>,
    answers_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<replies::Answer>>>,
    /// This node's copy of `courier_services`.
    pub subscriptions: Arc<replays::SubscriptionTable>,
    /// The relays of keyed messages to other nodes' instances, while this
    /// node holds keyed lanes (`relaying.rs`).
    pub relays: relaying::Relays,
}

impl ClusterEdge {
    pub(crate) fn new(node: Arc<ClusterNode>) -> ClusterEdge {
        let (forwards, rx) = mpsc::unbounded_channel();
        let (finds, finds_rx) = mpsc::unbounded_channel();
        let (transients, transients_rx) = mpsc::unbounded_channel();
        let (answers, answers_rx) = mpsc::unbounded_channel();
        ClusterEdge {
            node,
            forwards,
            forwards_rx: std::sync::Mutex::new(Some(rx)),
            finds,
            finds_rx: std::sync::Mutex::new(Some(finds_rx)),
            transients,
            transients_rx: std::sync::Mutex::new(Some(transients_rx)),
            dead_letters: crate::cluster_dead_letters::Queries::new(),
            room: Arc::new(Notify::new()),
            membership: watch::Sender::new(0),
            readings: gauges::Readings::default(),
            pending_answers: replies::PendingAnswers::default(),
            answers,
            answers_rx: std::sync::Mutex::new(Some(answers_rx)),
            subscriptions: Arc::default(),
            relays: relaying::Relays::default(),
        }
    }
}

/// Starts the edge's tasks; they end when the server's tasks are dropped
/// (each holds the server only weakly).
pub(crate) fn start(shared: &Arc<Shared>) -> Vec<crate::AbortOnDrop> {
    let Some(edge) = &shared.cluster else {
        return Vec::new();
    };
    // Until this node leads the registry, another one runs its checks.
    shared.with_core(|core, now| core.set_registry_checks_here(false, now));
    let forwards = edge
        .forwards_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let answers = edge
        .answers_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let mut tasks = vec![
        crate::AbortOnDrop(tokio::spawn(run_fetchers(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(watch_subscriptions(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(serve_forwarded_replies(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(run_reply_takers(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(answer_route_questions(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(traces::serve_trace_questions(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(views::serve_instance_questions(
            Arc::downgrade(shared),
        ))),
        crate::AbortOnDrop(tokio::spawn(names::serve_names_questions(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(tails::announce_tails(Arc::downgrade(shared)))),
        crate::AbortOnDrop(tokio::spawn(tails::relay_to_other_tails(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(tails::take_other_nodes_lines(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(registry::watch_registry(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(registry::hear_heartbeats(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(registry::lead_registry(Arc::downgrade(
            shared,
        )))),
        crate::AbortOnDrop(tokio::spawn(keep_registered(edge.node.clone()))),
        crate::AbortOnDrop(tokio::spawn(reclaim_while_leading(edge.node.clone()))),
    ];
    tasks.extend(edge.dead_letters.start(shared));
    tasks.extend(relaying::start(shared));
    let finds = edge
        .finds_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(rx) = finds {
        tasks.push(crate::AbortOnDrop(tokio::spawn(find_reply_routes(
            Arc::downgrade(shared),
            rx,
        ))));
    }
    if let Some(rx) = forwards {
        tasks.push(crate::AbortOnDrop(tokio::spawn(forward_replies(
            Arc::downgrade(shared),
            rx,
        ))));
    }
    if let Some(rx) = answers {
        tasks.push(crate::AbortOnDrop(tokio::spawn(
            replies::answer_waiting_replies(Arc::downgrade(shared), rx),
        )));
    }
    let transients = edge
        .transients_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(rx) = transients {
        tasks.push(crate::AbortOnDrop(tokio::spawn(offer_transients(
            edge.node.connection.client.clone(),
            edge.node.node.as_str().to_string(),
            rx,
        ))));
    }
    tasks
}

/// A stream the cluster gives: a KV watch, a core NATS subscription.
pub(super) type Followed<Item> = std::pin::Pin<Box<dyn futures_util::Stream<Item = Item> + Send>>;

/// Hands every item of `what` to `each` for as long as the server lives:
/// `open` makes the stream on the node's connection, again whenever it
/// cannot be made or ends.
pub(super) async fn follow<Item, Fut>(
    shared: Weak<Shared>,
    what: &'static str,
    open: impl Fn(courier_cluster::Connection) -> Fut,
    each: impl Fn(&Shared, Item),
) where
    Fut: std::future::Future<Output = Result<Followed<Item>, String>>,
{
    loop {
        let Some(connection) = shared
            .upgrade()
            .and_then(|s| s.cluster.as_ref().map(|e| e.node.connection.clone()))
        else {
            return;
        };
        let mut items = match open(connection).await {
            Ok(items) => items,
            Err(e) => {
                warn!(error = %e, "cannot follow {what}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(item) = items.next().await {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            each(&shared, item);
        }
        warn!("{what} ended; following it again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Feeds the core every change of `courier_services`, from any node.
async fn watch_subscriptions(shared: Weak<Shared>) {
    let open = |connection: courier_cluster::Connection| async move {
        match courier_cluster::services::watch(&connection).await {
            Ok(changes) => Ok(Box::pin(changes)
                as Followed<
                    Result<
                        courier_cluster::services::ServiceUpdate,
                        courier_cluster::services::ServicesError,
                    >,
                >),
            Err(e) => Err(e.to_string()),
        }
    };
    follow(
        shared,
        "the cluster's subscriptions",
        open,
        |shared, change| match change {
            Ok((service, subscriptions)) => {
                if let Some(edge) = &shared.cluster {
                    edge.subscriptions.update(&service, subscriptions.clone());
                }
                let subscriptions = subscriptions.map(|s| RemoteSubscriptions {
                    ack_deadline_ms: s.ack_deadline_ms,
                    max_deliveries: s.max_deliveries,
                    patterns: s
                        .patterns
                        .into_iter()
                        .map(|(pattern, state)| (pattern, state.paused))
                        .collect(),
                });
                shared.with_core_deferred(|core, now| {
                    core.subscriptions_changed(&service, subscriptions, now)
                });
            }
            Err(e) => warn!(error = %e, "a subscription change could not be read"),
        },
    )
    .await;
}

/// How often the holder of the `reclaimer` lease purges what no consumer
/// needs any more.
const RECLAIM_EVERY: Duration = Duration::from_secs(30);

/// Takes lease `lease` whenever it is free (asking again `ask_again`
/// after finding it held) and hands each tenure's keeper to `lead`, which
/// returns once the lease may no longer be acted on: one node at a time
/// does the work, whichever.
pub(super) async fn while_leading<Fut>(
    node: &ClusterNode,
    lease: &'static str,
    ask_again: Duration,
    mut lead: impl FnMut(LeaseKeeper) -> Fut,
) where
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let acquired =
            Lease::acquire(&node.leases, lease, &node.node, LeaseTiming::default()).await;
        match acquired {
            Ok(Acquired::Gained(gained)) => {
                let keeper = LeaseKeeper::keep(*gained);
                node.held_leases.began(lease, &keeper);
                lead(keeper).await;
                node.held_leases.ended(lease);
            }
            Ok(Acquired::HeldBy { .. }) => tokio::time::sleep(ask_again).await,
            Err(e) => {
                warn!(error = %e, "cannot take the {lease} lease; retrying");
                tokio::time::sleep(LANE_LEASE_RETRY).await;
            }
        }
    }
}

/// Gives the log's space back every [`RECLAIM_EVERY`] while this node
/// holds the `reclaimer` lease (`courier_cluster::reclaim`).
async fn reclaim_while_leading(node: Arc<ClusterNode>) {
    let lease = courier_cluster::names::RECLAIMER_LEASE;
    let jetstream = &node.connection.jetstream;
    let retention = node.event_retention;
    while_leading(&node, lease, RECLAIM_EVERY, |keeper| async move {
        while keeper.is_valid_at(tokio::time::Instant::now()) {
            match courier_cluster::reclaim::reclaim_once(jetstream, retention).await {
                Ok(Some(below)) => {
                    tracing::debug!(below, "purged the stored sends every consumer is past")
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "the log's space was not reclaimed this time"),
            }
            tokio::time::sleep(RECLAIM_EVERY).await;
        }
    })
    .await;
}

/// Puts the node's record into `courier_nodes` now and every few seconds,
/// so other nodes and the console find it while it lives.
async fn keep_registered(node: Arc<ClusterNode>) {
    let mut announced = false;
    loop {
        match courier_cluster::nodes::put_node(&node.nodes, &node.node, &node.record).await {
            Ok(_) if !announced => {
                announced = true;
                info!(node = node.node.as_str(), "registered in the cluster");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not renew this node's registration"),
        }
        tokio::time::sleep(courier_cluster::nodes::NODE_PUT_EVERY).await;
    }
}
