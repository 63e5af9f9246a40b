//! The admin commands' reads and changes of `COURIER_DEAD` on a real
//! three-server cluster (tests/common): pages by the original's id, not
//! by dead-lettering order; services with dots kept apart; a replay taken
//! by the service's consumer as a first attempt, then gone from the dead
//! letters; purges of one and of all.
#![allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{NatsCluster, Sync};
use courier_cluster::consumers::{consumer_config, ensure_consumer, Lane};
use courier_cluster::dead_letters::{self, DeadLettersError};
use courier_cluster::store::{
    dead_letter_subject, ATTEMPTS_HEADER, DEAD_LETTERED_AT_HEADER, REASON_HEADER,
};
use courier_cluster::{provision, Settings};
use courier_proto::{Kind, Message};
use futures_util::StreamExt as _;

/// Stores a dead letter as a node does (`store.rs`); `None`: bytes that
/// do not decode.
async fn dead_letter(
    js: &async_nats::jetstream::Context,
    service: &str,
    id: u64,
    message: Option<&Message>,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("dl.{service}.{id}").as_str());
    headers.insert(ATTEMPTS_HEADER, "3");
    headers.insert(REASON_HEADER, "nacked");
    headers.insert(DEAD_LETTERED_AT_HEADER, (1_000 + id).to_string().as_str());
    let payload = match message {
        Some(m) => {
            let mut buf = BytesMut::new();
            courier_proto::encode_message(m, &mut buf).unwrap();
            buf.freeze()
        }
        None => "not a message".into(),
    };
    js.publish_with_headers(dead_letter_subject(service, id), headers, payload)
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_and_purged_by_id() {
    let cluster = NatsCluster::start([Sync::Always; 3]).await;
    let node = cluster.connect("courier node a").await;
    let provisioned = provision(&node, &Settings::default()).await.unwrap();
    let js = &node.jetstream;
    let service = "billing.eu";
    let message = |n: u32| {
        let mut m = Message::new(Kind::Command, "job.run", format!("{{\"n\": {n}}}"));
        m.sender = "web".into();
        m
    };
    let (m10, m20, m30) = (message(10), message(20), message(30));
    // Dead-lettered out of id order, one unreadable; `billing` is another
    // service, whose subjects `billing.eu`'s must not take.
    dead_letter(js, service, 30, Some(&m30)).await;
    dead_letter(js, service, 10, Some(&m10)).await;
    dead_letter(js, service, 40, None).await;
    dead_letter(js, service, 20, Some(&m20)).await;
    dead_letter(js, "billing", 15, Some(&m10)).await;

    let page = dead_letters::list(js, service, 0, 2).await.unwrap();
    let ids: Vec<u64> = page.letters.iter().map(|d| d.id).collect();
    assert_eq!(ids, [10, 20]);
    assert_eq!(page.total_after, 4);
    let first = &page.letters[0];
    assert_eq!(
        (first.attempts, first.reason.as_str(), first.at),
        (3, "nacked", 1_010)
    );
    assert_eq!(first.message.as_ref().unwrap().id, m10.id);
    let rest = dead_letters::list(js, service, 20, 100).await.unwrap();
    let ids: Vec<u64> = rest.letters.iter().map(|d| d.id).collect();
    assert_eq!(ids, [30, 40]);
    assert_eq!(rest.total_after, 2);
    assert!(
        rest.letters[1].message.is_none(),
        "an unreadable one decoded"
    );
    let other = dead_letters::list(js, "billing", 0, 100).await.unwrap();
    assert_eq!(other.letters.len(), 1);
    assert_eq!(other.letters[0].id, 15);

    let shown = dead_letters::show(js, service, 30).await.unwrap();
    assert_eq!(shown.message.unwrap().id, m30.id);
    assert!(matches!(
        dead_letters::show(js, service, 15).await,
        Err(DeadLettersError::NotFound { id: 15, .. })
    ));

    // A replay reaches the service's consumer as a first attempt.
    let consumer = ensure_consumer(
        &provisioned.messages,
        consumer_config(
            service,
            &["job.*"],
            Lane::Unkeyed,
            Duration::from_secs(30),
            64,
            3,
        ),
    )
    .await
    .unwrap();
    dead_letters::replay(js, service, 10, "request-1")
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(delivered) = batch.next().await {
        got.push(delivered.unwrap());
    }
    assert_eq!(got.len(), 1, "one replay, delivered once");
    assert_eq!(got[0].subject.as_str(), "courier.m.r.billing~eu.job.run");
    assert_eq!(got[0].info().unwrap().delivered, 1);
    let replayed = courier_proto::decode_message(got[0].payload.clone()).unwrap();
    assert_eq!(replayed.id, m10.id);
    assert!(matches!(
        dead_letters::show(js, service, 10).await,
        Err(DeadLettersError::NotFound { .. })
    ));
    assert!(matches!(
        dead_letters::replay(js, service, 10, "request-2").await,
        Err(DeadLettersError::NotFound { .. })
    ));
    assert!(matches!(
        dead_letters::replay(js, service, 40, "request-3").await,
        Err(DeadLettersError::Unreadable { id: 40, .. })
    ));

    // Purges: one, then the rest of the service's; the other service's
    // stays.
    assert_eq!(dead_letters::purge(js, service, Some(20)).await.unwrap(), 1);
    assert_eq!(dead_letters::purge(js, service, Some(20)).await.unwrap(), 0);
    assert_eq!(dead_letters::purge(js, service, None).await.unwrap(), 2);
    let none = dead_letters::list(js, service, 0, 100).await.unwrap();
    assert!(none.letters.is_empty());
    assert_eq!(none.total_after, 0);
    assert_eq!(
        dead_letters::list(js, "billing", 0, 100)
            .await
            .unwrap()
            .total_after,
        1
    );
}
