//! Reclaiming the log's space on a real three-server cluster
//! (tests/common): stored sends leave once every consumer is past them,
//! and a deferred send's schedule stays.
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

mod common;

use std::time::Duration;

use async_nats::jetstream::AckKind;
use common::{NatsCluster, Sync};
use courier_cluster::consumers::{consumer_config, ensure_consumer, Lane};
use courier_cluster::reclaim::reclaim_once;
use courier_cluster::{provision, Settings};
use futures_util::StreamExt as _;

#[tokio::test]
async fn sends_leave_once_every_consumer_is_past_them() {
    let cluster = NatsCluster::start([Sync::Always; 3]).await;
    let node = cluster.connect("courier node a").await;
    let provisioned = provision(&node, &Settings::default()).await.unwrap();
    let log = &provisioned.messages;
    let config = consumer_config(
        "work",
        &["job.*"],
        Lane::Unkeyed,
        Duration::from_secs(30),
        1024,
        3,
    );
    let work = ensure_consumer(log, config).await.unwrap();
    // A deferred send's schedule, an hour ahead, stored first.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Schedule", "@at 2099-01-01T00:00:00Z");
    headers.insert("Nats-Schedule-Target", "courier.m.c.job.run");
    let schedule = node
        .jetstream
        .publish_with_headers("courier.m.s.later", headers, "later".into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let mut seqs = Vec::new();
    for n in 0..10 {
        let ack = node
            .jetstream
            .publish("courier.m.c.job.run", format!("{n}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        seqs.push(ack.sequence);
    }
    // Nothing consumed: nothing goes.
    assert_eq!(
        reclaim_once(&node.jetstream, Duration::ZERO).await.unwrap(),
        None
    );

    // Six handled in order, the seventh delivered and not acked.
    let mut batch = work.fetch().max_messages(7).messages().await.unwrap();
    let mut got = Vec::new();
    while let Some(message) = batch.next().await {
        got.push(message.unwrap());
    }
    assert_eq!(got.len(), 7);
    for message in &got[..6] {
        message.double_ack().await.unwrap();
    }
    let floor = reclaim_once(&node.jetstream, Duration::ZERO).await.unwrap();
    assert_eq!(floor, Some(seqs[6]), "purged below the first unacked");
    let mut stream = node
        .jetstream
        .get_stream(courier_cluster::names::MESSAGES_STREAM)
        .await
        .unwrap();
    assert!(
        stream.get_raw_message(seqs[5]).await.is_err(),
        "an acked send stayed"
    );
    assert!(
        stream.get_raw_message(seqs[6]).await.is_ok(),
        "an unacked send went"
    );
    assert!(
        stream.get_raw_message(schedule).await.is_ok(),
        "the schedule went"
    );

    // Everything handled: every send goes, the schedule stays.
    got[6].ack_with(AckKind::Ack).await.unwrap();
    let mut rest = work.fetch().max_messages(3).messages().await.unwrap();
    while let Some(message) = rest.next().await {
        message.unwrap().double_ack().await.unwrap();
    }
    let last = *seqs.last().unwrap();
    assert_eq!(
        reclaim_once(&node.jetstream, Duration::ZERO).await.unwrap(),
        Some(last + 1)
    );
    let state = stream.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 1, "{state:?}");
    assert!(stream.get_raw_message(schedule).await.is_ok());
}

#[tokio::test]
async fn events_stay_for_the_retention_commands_go_once_handled() {
    let cluster = NatsCluster::start([Sync::Always; 3]).await;
    let node = cluster.connect("courier node a").await;
    provision(&node, &Settings::default()).await.unwrap();
    let publish = |subject: &'static str| {
        let jetstream = node.jetstream.clone();
        async move {
            jetstream
                .publish(subject, "x".into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    // No service takes any of them: only the retention keeps an event.
    let old_event = publish("courier.m.e.audit.old").await;
    let old_keyed = publish("courier.m.ek.audit.old").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let command = publish("courier.m.c.job.run").await;
    let new_event = publish("courier.m.e.audit.new").await;

    let retention = Duration::from_secs(2);
    let floor = reclaim_once(&node.jetstream, retention).await.unwrap();
    assert_eq!(floor, Some(new_event + 1), "every send no consumer needs");
    let stream = node
        .jetstream
        .get_stream(courier_cluster::names::MESSAGES_STREAM)
        .await
        .unwrap();
    for (seq, what) in [
        (old_event, "an old event"),
        (old_keyed, "an old keyed event"),
        (command, "a command"),
    ] {
        assert!(stream.get_raw_message(seq).await.is_err(), "{what} stayed");
    }
    assert!(
        stream.get_raw_message(new_event).await.is_ok(),
        "an event within the retention went"
    );
    // The probe that found the retention's first seq is gone.
    let mut stream = stream;
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0);
}
