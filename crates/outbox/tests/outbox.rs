//! The outbox and inbox against a real PostgreSQL 15 (started by
//! scripts/test.sh, found through COURIER_TEST_POSTGRES_URL) and SQLite,
//! with a broker in the test process.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_client::{Client, ClientOptions};
use courier_outbox::{Inbox, InboxError, Outbox, OutboxMessage, Relay};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

/// A fresh database of its own on the test PostgreSQL.
async fn postgres() -> PgPool {
    let url = std::env::var("COURIER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "COURIER_TEST_POSTGRES_URL is not set: run the tests through scripts/test.sh, \
             which installs and starts PostgreSQL 15 and sets it"
        )
    });
    let admin = PgPool::connect(&url)
        .await
        .expect("connect to COURIER_TEST_POSTGRES_URL");
    let name = format!("courier_outbox_{}", Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let base = url.rsplit_once('/').unwrap().0;
    PgPoolOptions::new()
        .max_connections(8)
        .connect(&format!("{base}/{name}"))
        .await
        .unwrap()
}

async fn sqlite(dir: &std::path::Path) -> SqlitePool {
    let opts = SqliteConnectOptions::new()
        .filename(dir.join("app.db"))
        .create_if_missing(true);
    SqlitePool::connect_with(opts).await.unwrap()
}

async fn broker() -> String {
    let config = courier_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = courier_server::Server::bind(config, Box::new(courier_store::MemoryStore::new()))
        .await
        .unwrap();
    let url = server.local_addr().unwrap().to_string();
    tokio::spawn(server.run());
    url
}

/// Every delivery of `pattern`: (message id, key, payload), in arrival order.
type Seen = Arc<Mutex<Vec<(Uuid, Option<Vec<u8>>, Vec<u8>)>>>;

async fn watch(url: &str, pattern: &str) -> (Client, Seen) {
    let client = Client::connect(ClientOptions::new(url, "watcher"))
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    client
        .on(pattern, move |msg| {
            let sink = sink.clone();
            async move {
                let m = msg.message();
                sink.lock().unwrap().push((
                    m.id,
                    m.key.as_ref().map(|k| k.to_vec()),
                    m.payload.to_vec(),
                ));
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .unwrap();
    (client, seen)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM courier_outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_messages_are_published_in_order_per_key_and_rolled_back_ones_never() {
    let pool = postgres().await;
    courier_outbox::migrate_postgres(&pool).await.unwrap();
    let url = broker().await;
    let (_watcher, seen) = watch(&url, "order.*").await;

    let mut expected = HashMap::<Vec<u8>, Vec<Vec<u8>>>::new();
    let mut rolled_back = Vec::new();
    for i in 0..300u32 {
        let key = format!("order-{}", i % 7).into_bytes();
        let mut tx = pool.begin().await.unwrap();
        let id = Outbox::enqueue(
            &mut tx,
            OutboxMessage::event("order.placed")
                .payload(i.to_string())
                .key(key.clone()),
        )
        .await
        .unwrap();
        if i % 10 == 3 {
            tx.rollback().await.unwrap();
            rolled_back.push(id);
        } else {
            tx.commit().await.unwrap();
            expected
                .entry(key)
                .or_default()
                .push(i.to_string().into_bytes());
        }
    }
    let relay = Relay::postgres(
        pool.clone(),
        Client::connect(ClientOptions::new(&url, "shop"))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    let relay_task = tokio::spawn(async move { relay.run().await });
    wait_until("270 deliveries", || seen.lock().unwrap().len() >= 270).await;
    let start = Instant::now();
    while outbox_rows(&pool).await != 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "the relay left rows in the outbox"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Nothing more arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 270);
    assert!(seen.iter().all(|(id, _, _)| !rolled_back.contains(id)));
    let mut by_key = HashMap::<Vec<u8>, Vec<Vec<u8>>>::new();
    for (_, key, payload) in seen {
        by_key.entry(key.unwrap()).or_default().push(payload);
    }
    assert_eq!(by_key, expected);
    relay_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_died_after_publishing_but_before_deleting_publishes_again_harmlessly() {
    let pool = postgres().await;
    courier_outbox::migrate_postgres(&pool).await.unwrap();
    let url = broker().await;
    let (_watcher, seen) = watch(&url, "order.*").await;
    let mut ids = Vec::new();
    for i in 0..50u32 {
        let mut tx = pool.begin().await.unwrap();
        ids.push(
            Outbox::enqueue(
                &mut tx,
                OutboxMessage::event("order.placed").payload(i.to_string()),
            )
            .await
            .unwrap(),
        );
        tx.commit().await.unwrap();
    }
    // What a dead relay leaves behind: every row published (same ids),
    // none deleted.
    let dead = Client::connect(ClientOptions::new(&url, "shop"))
        .await
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        dead.event("order.placed")
            .id(*id)
            .payload(i.to_string())
            .send()
            .await
            .unwrap();
    }
    assert_eq!(outbox_rows(&pool).await, 50);
    let relay = Relay::postgres(
        pool.clone(),
        Client::connect(ClientOptions::new(&url, "shop"))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(relay.publish_batch().await.unwrap(), 50);
    assert_eq!(outbox_rows(&pool).await, 0);
    wait_until("50 deliveries", || seen.lock().unwrap().len() >= 50).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        50,
        "a re-published row was delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_relays_share_the_outbox_and_publish_each_row_once_in_key_order() {
    let pool = postgres().await;
    courier_outbox::migrate_postgres(&pool).await.unwrap();
    let url = broker().await;
    let (_watcher, seen) = watch(&url, "order.*").await;
    let mut relays = Vec::new();
    for _ in 0..3 {
        let client = Client::connect(ClientOptions::new(&url, "shop"))
            .await
            .unwrap();
        let relay = Relay::postgres(pool.clone(), client).await.unwrap();
        relays.push(tokio::spawn(async move { relay.run().await }));
    }
    for i in 0..2000u32 {
        let mut tx = pool.begin().await.unwrap();
        Outbox::enqueue(
            &mut tx,
            OutboxMessage::event("order.placed")
                .payload(i.to_string())
                .key(format!("k{}", i % 40)),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    wait_until("2000 deliveries", || seen.lock().unwrap().len() >= 2000).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().unwrap().clone();
    let distinct: std::collections::HashSet<Uuid> = seen.iter().map(|s| s.0).collect();
    assert_eq!((seen.len(), distinct.len()), (2000, 2000));
    let mut last = HashMap::<Vec<u8>, u32>::new();
    for (_, key, payload) in seen {
        let n: u32 = String::from_utf8(payload).unwrap().parse().unwrap();
        if let Some(before) = last.insert(key.clone().unwrap(), n) {
            assert!(before < n, "key {:?}: {n} after {before}", key);
        }
    }
    for relay in relays {
        relay.abort();
    }
}

async fn count_effect(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: Uuid,
) -> Result<Option<()>, InboxError<sqlx::Error>> {
    Inbox::process_once(tx, &id, |tx| {
        Box::pin(async move {
            sqlx::query("UPDATE effects SET n = n + 1")
                .execute(&mut **tx)
                .await?;
            Ok(())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_gives_a_redelivered_message_no_second_effect() {
    let pool = postgres().await;
    courier_outbox::migrate_postgres(&pool).await.unwrap();
    sqlx::raw_sql("CREATE TABLE effects (n BIGINT NOT NULL); INSERT INTO effects VALUES (0)")
        .execute(&pool)
        .await
        .unwrap();
    let id = Uuid::now_v7();
    // A handler that fails: nothing of it, not even the id, is kept.
    let mut tx = pool.begin().await.unwrap();
    let failed =
        Inbox::process_once(&mut tx, &id, |_tx| Box::pin(async { Err::<(), _>("boom") })).await;
    assert!(matches!(failed, Err(InboxError::Handler("boom"))));
    drop(tx);
    // A consumer that committed but crashed before its ack: the broker
    // redelivers, and the second time has no effect.
    for attempt in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        let outcome = count_effect(&mut tx, id).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(outcome.is_some(), attempt == 0);
    }
    let n: i64 = sqlx::query_scalar("SELECT n FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Pruned after the horizon, not before.
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        Inbox::prune::<sqlx::Postgres>(&mut conn, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        Inbox::prune::<sqlx::Postgres>(&mut conn, Duration::from_millis(10))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbox_and_inbox_work_end_to_end() {
    let dir = std::env::temp_dir().join(format!("courier-outbox-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = sqlite(&dir).await;
    let url = broker().await;
    let (_watcher, seen) = watch(&url, "todo.*").await;
    let relay = Relay::sqlite(
        pool.clone(),
        Client::connect(ClientOptions::new(&url, "todo"))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    // Migrating twice is harmless.
    courier_outbox::migrate_sqlite(&pool).await.unwrap();
    let relay_task = tokio::spawn(async move { relay.run().await });
    for i in 0..20u32 {
        let mut tx = pool.begin().await.unwrap();
        Outbox::enqueue(
            &mut tx,
            OutboxMessage::event("todo.created").payload(i.to_string()),
        )
        .await
        .unwrap();
        if i == 5 {
            tx.rollback().await.unwrap();
        } else {
            tx.commit().await.unwrap();
        }
    }
    wait_until("19 deliveries", || seen.lock().unwrap().len() >= 19).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = seen.lock().unwrap().clone();
    let payloads: Vec<String> = seen
        .iter()
        .map(|s| String::from_utf8(s.2.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (0..20)
        .filter(|i| *i != 5)
        .map(|i: u32| i.to_string())
        .collect();
    assert_eq!(payloads, expected);
    // The inbox on SQLite.
    let mut tx = pool.begin().await.unwrap();
    let first = Inbox::process_once(&mut tx, &seen[0].0, |_tx| {
        Box::pin(async { Ok::<_, sqlx::Error>(1) })
    })
    .await
    .unwrap();
    let again = Inbox::process_once(&mut tx, &seen[0].0, |_tx| {
        Box::pin(async { Ok::<_, sqlx::Error>(2) })
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((first, again), (Some(1), None));
    relay_task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_pruned_forgets_ids_past_the_horizon_and_keeps_recent_ones() {
    let dir = std::env::temp_dir().join(format!("courier-inbox-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = sqlite(&dir).await;
    courier_outbox::migrate_sqlite(&pool).await.unwrap();
    // Processed two hours ago.
    let two_hours_ago_us = (std::time::SystemTime::now() - Duration::from_secs(7200))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    sqlx::query("INSERT INTO courier_inbox (id, processed_us) VALUES ($1, $2)")
        .bind(Uuid::now_v7().as_bytes().as_slice())
        .bind(two_hours_ago_us)
        .execute(&pool)
        .await
        .unwrap();
    let recent = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    Inbox::process_once(&mut tx, &recent, |_tx| {
        Box::pin(async { Ok::<_, sqlx::Error>(()) })
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let pruner = tokio::spawn(Inbox::keep_pruned(
        pool.clone(),
        Duration::from_secs(3600),
        Duration::from_millis(10),
    ));
    let start = Instant::now();
    loop {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id FROM courier_inbox")
            .fetch_all(&pool)
            .await
            .unwrap();
        if ids == vec![recent.as_bytes().to_vec()] {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "{ids:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pruner.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
