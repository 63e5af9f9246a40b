//! The core's store on a real three-server cluster (tests/common): what
//! `append` and a sync store, subscription changes in KV and consumers,
//! and fetched messages settled upstream as the core reports.
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull;
use bytes::Bytes;
use common::{wait_for, NatsCluster, Sync};
use courier_cluster::consumers::{self, Lane};
use courier_cluster::fetch::{self, Fetched};
use courier_cluster::services::{self, ServiceSubscriptions};
use courier_cluster::store::{ClusterStore, StoreOptions};
use courier_cluster::{provision, Connection, NodeId, Provisioned, Settings};
use courier_proto::{decode_message, Kind, Message};
use courier_store::{MessageStore, Upstream};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

const ALL_SYNC: [Sync; 3] = [Sync::Always, Sync::Always, Sync::Always];

async fn node(cluster: &NatsCluster, name: &str) -> (Connection, Provisioned, ClusterStore) {
    let connection = cluster.connect(&format!("courier node {name}")).await;
    let provisioned = provision(&connection, &Settings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let store = ClusterStore::new(
        connection.clone(),
        tokio::runtime::Handle::current(),
        NodeId::new(name).unwrap(),
        &provisioned,
        StoreOptions::default(),
    );
    (connection, provisioned, store)
}

/// A sync as the core runs it: the wait blocks, off the runtime's tasks.
fn sync(store: &mut ClusterStore) -> Result<(), courier_store::StoreError> {
    tokio::task::block_in_place(|| store.sync())
}

fn unix_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

fn accepted(kind: Kind, name: &str, payload: &'static str) -> Message {
    let mut m = Message::new(kind, name, payload);
    m.sender = "web".into();
    m.timestamp = unix_ns();
    m
}

fn subscribe(service: &str, pattern: &str, ack_deadline_ms: u32) -> Upstream {
    Upstream::Subscribe {
        service: service.into(),
        pattern: pattern.into(),
        ack_deadline_ms,
        max_deliveries: 3,
        history: courier_proto::StartFrom::New,
    }
}

fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_string())
}

async fn consumer_info(
    provisioned: &Provisioned,
    name: &str,
) -> Option<async_nats::jetstream::consumer::Info> {
    let mut consumer = provisioned
        .messages
        .get_consumer::<pull::Config>(name)
        .await
        .ok()?;
    Some(consumer.info().await.unwrap().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_stored_once_and_subscriptions_make_consumers() {
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let (connection, provisioned, mut store) = node(&cluster, "a").await;
    assert!(!store.keeps_deliveries());
    assert!(store.start_sync().unwrap().is_none(), "nothing to wait for");

    let command = accepted(Kind::Command, "todo.create", "{\"text\":\"milk\"}");
    let mut keyed = accepted(Kind::Event, "todo.created", "{}");
    keyed.key = Some(Bytes::from_static(b"list-7"));
    let mut expiring = accepted(Kind::Event, "todo.reminded", "{}");
    expiring.expires_at = Some(unix_ns() + 1_500_000_000);
    let seqs: Vec<u64> = [&command, &keyed, &expiring]
        .into_iter()
        .map(|m| store.append(Arc::new(m.clone())).unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let job = store.start_sync().unwrap().expect("a job");
    assert_eq!(job.covers(), 4);
    let mut job = job;
    let result = tokio::task::block_in_place(|| job.run());
    store.finish_sync(job, result).unwrap();

    let log = &provisioned.messages;
    let stored = log
        .get_last_raw_message_by_subject("courier.m.c.todo.create")
        .await
        .unwrap();
    assert_eq!(
        header(&stored.headers, "Nats-Msg-Id").unwrap(),
        command.id.hyphenated().to_string()
    );
    assert_eq!(
        header(&stored.headers, "Courier-Reply-To").as_deref(),
        Some("a")
    );
    assert_eq!(decode_message(stored.payload).unwrap(), command);
    let stored = log
        .get_last_raw_message_by_subject("courier.m.ek.todo.created")
        .await
        .unwrap();
    assert_eq!(header(&stored.headers, "Courier-Reply-To"), None);
    assert_eq!(decode_message(stored.payload).unwrap(), keyed);
    let stored = log
        .get_last_raw_message_by_subject("courier.m.e.todo.reminded")
        .await
        .unwrap();
    assert_eq!(header(&stored.headers, "Nats-TTL").as_deref(), Some("2"));

    // The same id again (a client's resend): acknowledged, stored once.
    store.append(Arc::new(command.clone())).unwrap();
    sync(&mut store).unwrap();
    let info = log.clone().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 3, "the resend is a duplicate");
    assert_eq!(store.discards(), 0);
    // A reply is never stored in the log.
    assert!(store
        .append(Arc::new(accepted(Kind::Reply, "todo.done", "")))
        .is_err());
    let stats = store.storage_stats();
    assert_eq!(stats.sync_seconds.cumulative().last().unwrap().1, 2);
    assert!(stats.sync_batch_records.quantile(1.0).is_some());

    // A batch of sends is one sync: the PubAcks are awaited together.
    const BATCH: u64 = 2_000;
    let started = Instant::now();
    for _ in 0..BATCH {
        store
            .append(Arc::new(accepted(Kind::Event, "load.tick", "x")))
            .unwrap();
    }
    sync(&mut store).unwrap();
    eprintln!(
        "{BATCH} appends and one sync on a local three-server cluster: {:?}",
        started.elapsed()
    );
    let info = log.clone().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 3 + BATCH);

    // The watch starts with what is there (nothing) and then sees changes.
    let mut watch = Box::pin(services::watch(&connection).await.unwrap());

    store.upstream(subscribe("todo", "todo.*", 2_000));
    store.upstream(subscribe("todo", "audit.>", 2_000));
    sync(&mut store).unwrap();
    let (entry, _) = services::read(&provisioned.services, "todo")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.ack_deadline_ms, 2_000);
    assert_eq!(entry.active_patterns(), ["audit.>", "todo.*"]);
    let unkeyed = consumer_info(&provisioned, "svc-todo").await.unwrap();
    assert_eq!(
        unkeyed.config.filter_subjects,
        consumers::filter_subjects("todo", &["audit.>", "todo.*"], Lane::Unkeyed)
    );
    assert_eq!(unkeyed.config.ack_wait, Duration::from_secs(2));
    assert_eq!(unkeyed.config.num_replicas, 3);
    let keyed_consumer = consumer_info(&provisioned, "svc-todo-keyed").await.unwrap();
    assert_eq!(
        keyed_consumer.config.filter_subjects,
        consumers::filter_subjects("todo", &["audit.>", "todo.*"], Lane::Keyed)
    );
    let seen = watched(&mut watch, |(_, entry)| {
        entry.as_ref().is_some_and(|e| e.patterns.len() == 2)
    })
    .await;
    assert_eq!(seen.0, "todo");

    // Pausing one pattern takes it out of the filters; pausing all
    // pauses the consumers with every pattern's filter kept.
    store.upstream(Upstream::Pause {
        service: "todo".into(),
        pattern: "audit.>".into(),
        whole: false,
    });
    sync(&mut store).unwrap();
    let info = consumer_info(&provisioned, "svc-todo").await.unwrap();
    assert_eq!(
        info.config.filter_subjects,
        consumers::filter_subjects("todo", &["todo.*"], Lane::Unkeyed)
    );
    assert!(!info.paused);
    store.upstream(Upstream::Pause {
        service: "todo".into(),
        pattern: "todo.*".into(),
        whole: false,
    });
    sync(&mut store).unwrap();
    for name in ["svc-todo", "svc-todo-keyed"] {
        // The pause's answer may come before the consumer's info shows it
        // (seen on 2.15.1: `paused: true` answered, `paused: false` read
        // right after).
        let info = wait_for(
            &format!("{name} paused"),
            Duration::from_secs(5),
            || async { consumer_info(&provisioned, name).await.filter(|i| i.paused) },
        )
        .await;
        assert_eq!(
            info.config.filter_subjects.len(),
            if name == "svc-todo" { 5 } else { 4 }
        );
    }
    store.upstream(Upstream::Resume {
        service: "todo".into(),
        pattern: "todo.*".into(),
        whole: false,
    });
    sync(&mut store).unwrap();
    let info = wait_for("svc-todo resumed", Duration::from_secs(5), || async {
        consumer_info(&provisioned, "svc-todo")
            .await
            .filter(|i| !i.paused)
    })
    .await;
    assert_eq!(
        info.config.filter_subjects,
        consumers::filter_subjects("todo", &["todo.*"], Lane::Unkeyed)
    );

    // A second node's change lands on the first's by compare-and-set.
    let (_, _, mut other) = node(&cluster, "b").await;
    other.upstream(subscribe("todo", "x.y", 2_000));
    sync(&mut other).unwrap();
    let (entry, _) = services::read(&provisioned.services, "todo")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.patterns.len(), 3);

    // The last pattern gone: no key, no consumers.
    for pattern in ["todo.*", "audit.>", "x.y"] {
        store.upstream(Upstream::Unsubscribe {
            service: "todo".into(),
            pattern: pattern.into(),
        });
    }
    sync(&mut store).unwrap();
    assert!(services::read(&provisioned.services, "todo")
        .await
        .unwrap()
        .is_none());
    assert!(consumer_info(&provisioned, "svc-todo").await.is_none());
    assert!(consumer_info(&provisioned, "svc-todo-keyed")
        .await
        .is_none());
    let gone = watched(&mut watch, |(_, entry)| entry.is_none()).await;
    assert_eq!(gone.0, "todo");
    // Unsubscribing what is not there changes nothing and succeeds.
    store.upstream(Upstream::Unsubscribe {
        service: "todo".into(),
        pattern: "todo.*".into(),
    });
    sync(&mut store).unwrap();
}

/// The first update from the watch that `wanted` takes, within 5 s.
async fn watched<W>(
    watch: &mut W,
    wanted: impl Fn(&(String, Option<ServiceSubscriptions>)) -> bool,
) -> (String, Option<ServiceSubscriptions>)
where
    W: futures_util::Stream<Item = Result<services::ServiceUpdate, services::ServicesError>>
        + Unpin,
{
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let update = tokio::time::timeout_at(until, watch.next())
            .await
            .expect("the watch answers within 5 s")
            .expect("the watch goes on")
            .unwrap();
        if wanted(&update) {
            return update;
        }
    }
}

/// A fetch loop for `service` whose deliveries come out of the returned
/// channel; credit as the atomic says.
fn start_fetching(
    connection: &Connection,
    service: &str,
    credit: Arc<AtomicU32>,
    room: Arc<Notify>,
) -> (
    mpsc::UnboundedReceiver<Fetched>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(fetch::run(
        connection.clone(),
        service.to_string(),
        move || credit.load(Ordering::Acquire),
        room,
        move |batch: Vec<Fetched>| {
            for fetched in batch {
                let _ = tx.send(fetched);
            }
        },
        stop,
    ));
    (rx, stop_tx, task)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Fetched>, within: Duration) -> Fetched {
    tokio::time::timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing fetched within {within:?}"))
        .unwrap()
}

async fn nothing(rx: &mut mpsc::UnboundedReceiver<Fetched>, for_: Duration, what: &str) {
    if let Ok(Some(f)) = tokio::time::timeout(for_, rx.recv()).await {
        panic!(
            "{what}: fetched {} (attempt {}) within {for_:?}",
            f.message.name, f.attempt
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_messages_are_settled_as_the_core_says() {
    const ACK_DEADLINE: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_secs(1);
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let (connection, provisioned, mut store) = node(&cluster, "a").await;
    store.upstream(subscribe("todo", "todo.*", 2_000));
    sync(&mut store).unwrap();

    let credit = Arc::new(AtomicU32::new(0));
    let room = Arc::new(Notify::new());
    let (mut fetched, stop, task) =
        start_fetching(&connection, "todo", credit.clone(), room.clone());

    // No credit, nothing fetched; room and credit, it comes.
    let command = accepted(Kind::Command, "todo.create", "one");
    store.append(Arc::new(command.clone())).unwrap();
    sync(&mut store).unwrap();
    nothing(&mut fetched, Duration::from_millis(1500), "without credit").await;
    credit.store(10, Ordering::Release);
    room.notify_waiters();
    let first = next(&mut fetched, Duration::from_secs(5)).await;
    assert_eq!((first.attempt, first.lane), (1, Lane::Unkeyed));
    assert_eq!(first.service, "todo");
    assert_eq!(first.reply_node.as_deref(), Some("a"));
    assert_eq!(*first.message, command);
    let seq = store
        .hold_fetched(first.message.clone(), first.handle.clone(), first.traced)
        .unwrap();
    assert_eq!(store.get(seq).unwrap().unwrap().id, command.id);
    assert_eq!(store.len(), 1);

    // NAK with a delay: again, with the next attempt, not sooner.
    store.upstream(Upstream::Nak { seq, delay_ms: 500 });
    let naked_at = Instant::now();
    sync(&mut store).unwrap();
    store.remove(seq);
    assert!(store.get(seq).unwrap().is_none());
    let again = next(&mut fetched, Duration::from_secs(5)).await;
    let after = naked_at.elapsed();
    assert_eq!(again.attempt, 2);
    assert_eq!(again.stream_seq, first.stream_seq);
    assert!(
        after >= Duration::from_millis(500),
        "redelivered after {after:?}"
    );

    // ACK: never again, not even after the ack deadline.
    let seq = store
        .hold_fetched(again.message.clone(), again.handle.clone(), again.traced)
        .unwrap();
    store.upstream(Upstream::Ack { seq });
    sync(&mut store).unwrap();
    store.remove(seq);
    nothing(&mut fetched, ACK_DEADLINE + MARGIN, "after the ACK").await;

    // A dead letter: stored with its headers, the original acked.
    let event = accepted(Kind::Event, "todo.created", "two");
    store.append(Arc::new(event.clone())).unwrap();
    sync(&mut store).unwrap();
    let delivery = next(&mut fetched, Duration::from_secs(5)).await;
    assert_eq!(delivery.reply_node, None, "events name no reply node");
    let seq = store
        .hold_fetched(
            delivery.message.clone(),
            delivery.handle.clone(),
            delivery.traced,
        )
        .unwrap();
    store.upstream(Upstream::DeadLetter {
        service: "todo".into(),
        seq,
        attempts: 3,
        reason: "ack deadline\npassed".into(),
        at: 1_234,
    });
    sync(&mut store).unwrap();
    store.remove(seq);
    let dead = provisioned
        .dead
        .get_last_raw_message_by_subject(&format!("courier.dl.todo.{}", delivery.stream_seq))
        .await
        .unwrap();
    assert_eq!(
        header(&dead.headers, "Nats-Msg-Id").unwrap(),
        format!("dl.todo.{}", delivery.stream_seq)
    );
    assert_eq!(
        header(&dead.headers, "Courier-Attempts").as_deref(),
        Some("3")
    );
    assert_eq!(
        header(&dead.headers, "Courier-Reason").as_deref(),
        Some("ack deadline passed")
    );
    assert_eq!(
        header(&dead.headers, "Courier-Dead-Lettered-At").as_deref(),
        Some("1234")
    );
    assert_eq!(decode_message(dead.payload).unwrap(), event);
    nothing(&mut fetched, ACK_DEADLINE + MARGIN, "after the dead letter").await;

    // Removed without an outcome: NAKed, back well before the deadline.
    let other = accepted(Kind::Event, "todo.renamed", "three");
    store.append(Arc::new(other.clone())).unwrap();
    sync(&mut store).unwrap();
    let delivery = next(&mut fetched, Duration::from_secs(5)).await;
    let seq = store
        .hold_fetched(
            delivery.message.clone(),
            delivery.handle.clone(),
            delivery.traced,
        )
        .unwrap();
    let forgotten_at = Instant::now();
    store.remove(seq);
    sync(&mut store).unwrap();
    let back = next(&mut fetched, ACK_DEADLINE).await;
    assert_eq!((back.attempt, back.stream_seq), (2, delivery.stream_seq));
    assert!(forgotten_at.elapsed() < ACK_DEADLINE);
    let seq = store
        .hold_fetched(back.message.clone(), back.handle.clone(), back.traced)
        .unwrap();
    store.upstream(Upstream::Ack { seq });
    store.remove(seq);
    sync(&mut store).unwrap();
    assert_eq!(store.len(), 0);

    // A keyed message comes through the keyed lane.
    let mut keyed = accepted(Kind::Event, "todo.created", "four");
    keyed.key = Some(Bytes::from_static(b"list-7"));
    store.append(Arc::new(keyed.clone())).unwrap();
    sync(&mut store).unwrap();
    let delivery = next(&mut fetched, Duration::from_secs(5)).await;
    assert_eq!((delivery.lane, delivery.attempt), (Lane::Keyed, 1));
    assert_eq!(*delivery.message, keyed);
    let seq = store
        .hold_fetched(
            delivery.message.clone(),
            delivery.handle.clone(),
            delivery.traced,
        )
        .unwrap();
    store.upstream(Upstream::Ack { seq });
    store.remove(seq);
    sync(&mut store).unwrap();

    // A payload that is not a message is terminated, not delivered.
    connection
        .jetstream
        .publish("courier.m.e.todo.garbage", Bytes::from_static(b"\xff\x00"))
        .await
        .unwrap()
        .await
        .unwrap();
    nothing(
        &mut fetched,
        Duration::from_millis(1500),
        "an undecodable payload",
    )
    .await;
    for name in ["svc-todo", "svc-todo-keyed"] {
        let info = consumer_info(&provisioned, name).await.unwrap();
        assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{name}");
    }

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("the fetch loop stops")
        .unwrap();
    assert_eq!(store.discards(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_without_quorum_fails_and_the_resend_is_stored_once() {
    let mut cluster = NatsCluster::start(ALL_SYNC).await;
    let (_connection, provisioned, mut store) = node(&cluster, "a").await;
    let first = accepted(Kind::Event, "todo.created", "one");
    store.append(Arc::new(first.clone())).unwrap();
    sync(&mut store).unwrap();

    // Too large for the servers: refused before it is sent.
    let large = accepted(Kind::Event, "todo.created", "");
    let large = Message {
        payload: Bytes::from(vec![b'x'; 9 << 20]),
        ..large
    };
    store.append(Arc::new(large)).unwrap();
    let e = sync(&mut store).unwrap_err();
    assert!(e.to_string().contains("failed"), "{e}");
    assert_eq!(store.discards(), 1);

    // Two of three servers gone: no quorum, the sync fails (after the
    // publish's timeout); the resend with the same id, once they are
    // back, is stored once.
    let second = accepted(Kind::Event, "todo.created", "two");
    cluster.kill9(cluster.index_of("n2"));
    cluster.kill9(cluster.index_of("n3"));
    store.append(Arc::new(second.clone())).unwrap();
    let started = Instant::now();
    let e = sync(&mut store).unwrap_err();
    assert_eq!(store.discards(), 2, "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "{e}");
    cluster.restart(cluster.index_of("n2")).await;
    cluster.restart(cluster.index_of("n3")).await;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        store.append(Arc::new(second.clone())).unwrap();
        match sync(&mut store) {
            Ok(()) => break,
            Err(e) if Instant::now() < until => {
                eprintln!("resend failed ({e}); again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the resend never succeeded: {e}\n{}", cluster.logs()),
        }
    }
    let info = provisioned.messages.clone().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 2, "first and second, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_is_kept_alive_past_ack_wait_and_comes_back_once_let_go() {
    const ACK_DEADLINE: Duration = Duration::from_secs(1);
    let cluster = NatsCluster::start(ALL_SYNC).await;
    let (connection, _provisioned, mut store) = node(&cluster, "a").await;
    store.upstream(subscribe("todo", "todo.*", 1_000));
    sync(&mut store).unwrap();
    let credit = Arc::new(AtomicU32::new(10));
    let (mut fetched, stop, task) =
        start_fetching(&connection, "todo", credit, Arc::new(Notify::new()));
    let in_progress = store.in_progress();

    store
        .append(Arc::new(accepted(Kind::Event, "todo.created", "one")))
        .unwrap();
    sync(&mut store).unwrap();
    let first = next(&mut fetched, Duration::from_secs(5)).await;
    assert_eq!(first.ack_wait, ACK_DEADLINE);
    store
        .hold_fetched(first.message.clone(), first.handle.clone(), first.traced)
        .unwrap();
    in_progress.hold([(first.handle.as_str(), first.ack_wait)], Instant::now());
    nothing(
        &mut fetched,
        3 * ACK_DEADLINE,
        "while the node holds it and keeps it alive",
    )
    .await;

    // No longer kept alive (as by a node paused or cut off): JetStream
    // hands it out again once a whole ack_wait passed without a +WPI.
    in_progress.release(&first.handle);
    let let_go = Instant::now();
    let again = next(&mut fetched, 3 * ACK_DEADLINE).await;
    assert_eq!((again.attempt, again.stream_seq), (2, first.stream_seq));
    assert!(
        let_go.elapsed() >= ACK_DEADLINE / 3,
        "back {:?} after the last +WPI could have gone",
        let_go.elapsed()
    );

    // Settling it ends its keep-alive.
    let seq = store
        .hold_fetched(again.message.clone(), again.handle.clone(), again.traced)
        .unwrap();
    in_progress.hold([(again.handle.as_str(), again.ack_wait)], Instant::now());
    assert_eq!(in_progress.len(), 1);
    store.upstream(Upstream::Ack { seq });
    sync(&mut store).unwrap();
    assert!(in_progress.is_empty());
    nothing(&mut fetched, 2 * ACK_DEADLINE, "after the ACK").await;

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("the fetch loop stops")
        .unwrap();
}
