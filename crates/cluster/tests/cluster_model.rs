//! The JetStream model (`courier_cluster::model`) against the real thing:
//! one scenario of publishes, dedup, fetches, ACK, NAK with delay,
//! redelivery after `ack_wait`, and KV compare-and-set, run on a real
//! three-server cluster and on the model, every answer compared.
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use common::{wait_for, NatsCluster, Sync};
use courier_cluster::model::{ConsumerSpec, ConsumerState, JetStreamModel, PubAck, StreamSpec};
use courier_cluster::{names, provision, Settings};
use futures_util::StreamExt as _;

const CONSUMER: &str = "svc-todo";
/// Long beside the NAK delay, so that the NAKed message is due well
/// before the unanswered one even on a loaded machine.
const ACK_WAIT_MS: u64 = 4_000;
const NAK_DELAY_MS: u64 = 1_000;
/// How long one pull waits: well below the NAK delay, so that no pull
/// takes a redelivery the model's fetch at that moment would not.
const FETCH_EXPIRES: Duration = Duration::from_millis(200);

/// One fetch's (stream seq, num_delivered) pairs, and the messages to
/// answer.
async fn fetch(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
) -> (Vec<(u64, u32)>, Vec<jetstream::Message>) {
    // A short pull: what is there now. (A no-wait fetch is held open by
    // the server while `max_ack_pending` is reached, and then takes
    // redeliveries too.)
    let mut batch = consumer
        .batch()
        .max_messages(10)
        .expires(FETCH_EXPIRES)
        .messages()
        .await
        .unwrap();
    let mut pairs = Vec::new();
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.unwrap();
        let info = message.info().unwrap();
        pairs.push((info.stream_sequence, u32::try_from(info.delivered).unwrap()));
        messages.push(message);
    }
    (pairs, messages)
}

/// Fetches until something comes (a redelivery the server times).
async fn fetch_some(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    what: &str,
) -> (Vec<(u64, u32)>, Vec<jetstream::Message>) {
    wait_for(what, Duration::from_secs(10), || async {
        let (pairs, messages) = fetch(consumer).await;
        (!pairs.is_empty()).then_some((pairs, messages))
    })
    .await
}

fn model_pairs(d: &[courier_cluster::model::Delivery]) -> Vec<(u64, u32)> {
    d.iter().map(|d| (d.stream_seq, d.delivered)).collect()
}

#[tokio::test]
async fn the_model_answers_as_a_real_cluster_does() {
    let cluster = NatsCluster::start([Sync::Always; 3]).await;
    let node = cluster.connect("courier node a").await;
    let real = provision(&node, &Settings::default()).await.unwrap();
    let consumer = real
        .messages
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            filter_subjects: vec!["courier.m.c.todo.*".into()],
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(ACK_WAIT_MS),
            max_ack_pending: 2,
            max_deliver: -1,
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut model = JetStreamModel::new();
    model.add_stream(StreamSpec {
        name: names::MESSAGES_STREAM.into(),
        subjects: vec![names::MESSAGES_SUBJECTS.into()],
        duplicate_window: 120_000,
        max_msgs_per_subject: None,
    });
    model
        .add_consumer(
            names::MESSAGES_STREAM,
            ConsumerSpec {
                name: CONSUMER.into(),
                filter_subjects: vec!["courier.m.c.todo.*".into()],
                ack_wait: ACK_WAIT_MS,
                max_ack_pending: 2,
                deliver_new: true,
            },
        )
        .unwrap();
    model.add_bucket(names::LEASES_BUCKET, 10_000);

    // Publishes, one resent.
    let sends = [
        ("courier.m.c.todo.create", "a"),
        ("courier.m.c.todo.create", "b"),
        ("courier.m.c.todo.create", "a"),
        ("courier.m.c.todo.done", "c"),
        ("courier.m.c.other.create", "d"),
    ];
    for (subject, id) in sends {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let ack = node
            .jetstream
            .publish_with_headers(subject, headers, id.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        let modelled = model
            .publish(subject, Some(id), id.to_string().into(), 0)
            .unwrap();
        assert_eq!(
            PubAck {
                seq: ack.sequence,
                duplicate: ack.duplicate
            },
            modelled,
            "publish {subject} {id}"
        );
    }

    let m = names::MESSAGES_STREAM;
    // max_ack_pending 2: two of the three matching messages.
    let (pairs, messages) = fetch(&consumer).await;
    assert_eq!(
        pairs,
        model_pairs(&model.fetch(m, CONSUMER, 10, 0).unwrap())
    );
    assert_eq!(pairs, [(1, 1), (2, 1)]);
    messages[0].double_ack().await.unwrap();
    model.ack(m, CONSUMER, 1).unwrap();
    messages[1]
        .ack_with(AckKind::Nak(Some(Duration::from_millis(NAK_DELAY_MS))))
        .await
        .unwrap();
    model.nak(m, CONSUMER, 2, NAK_DELAY_MS, 10).unwrap();

    let (pairs, third) = fetch_some(&consumer, "the third message").await;
    assert_eq!(
        pairs,
        model_pairs(&model.fetch(m, CONSUMER, 10, 11).unwrap())
    );

    let (pairs, naked) = fetch_some(&consumer, "the NAKed message after its delay").await;
    assert_eq!(
        pairs,
        model_pairs(&model.fetch(m, CONSUMER, 10, 1_010).unwrap())
    );
    naked[0].double_ack().await.unwrap();
    model.ack(m, CONSUMER, 2).unwrap();

    drop(third); // not answered: back after ack_wait
    let (pairs, again) = fetch_some(&consumer, "the unanswered message after ack_wait").await;
    assert_eq!(
        pairs,
        model_pairs(&model.fetch(m, CONSUMER, 10, 4_011).unwrap())
    );
    assert_eq!(pairs, [(3, 2)]);
    again[0].double_ack().await.unwrap();
    model.ack(m, CONSUMER, 3).unwrap();

    let mut consumer = consumer;
    let info = consumer.info().await.unwrap();
    let real_state = ConsumerState {
        delivered_stream_seq: info.delivered.stream_sequence,
        ack_floor_stream_seq: info.ack_floor.stream_sequence,
        num_ack_pending: info.num_ack_pending,
        num_pending: usize::try_from(info.num_pending).unwrap(),
    };
    assert_eq!(real_state, model.consumer_state(m, CONSUMER).unwrap());

    // KV: compare-and-set by revision, delete markers take a revision.
    let kv = &real.leases;
    let b = names::LEASES_BUCKET;
    let r1 = kv.create("scheduler", "a".into()).await.unwrap();
    assert_eq!(r1, model.kv_create(b, "scheduler", "a".into(), 0).unwrap());
    assert!(kv.create("scheduler", "b".into()).await.is_err());
    assert!(model.kv_create(b, "scheduler", "b".into(), 0).is_err());
    let r2 = kv.update("scheduler", "a".into(), r1).await.unwrap();
    assert_eq!(
        r2,
        model.kv_update(b, "scheduler", "a".into(), r1, 0).unwrap()
    );
    assert!(kv.update("scheduler", "a".into(), r1).await.is_err());
    assert!(model.kv_update(b, "scheduler", "a".into(), r1, 0).is_err());
    assert!(kv
        .delete_expect_revision("scheduler", Some(r1))
        .await
        .is_err());
    assert!(model.kv_delete(b, "scheduler", Some(r1), 0).is_err());
    kv.delete_expect_revision("scheduler", Some(r2))
        .await
        .unwrap();
    model.kv_delete(b, "scheduler", Some(r2), 0).unwrap();
    let r4 = kv.create("scheduler", "b".into()).await.unwrap();
    assert_eq!(r4, model.kv_create(b, "scheduler", "b".into(), 0).unwrap());
    assert_eq!(r4, 4, "the delete marker took revision 3");
}
