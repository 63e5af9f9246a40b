//! The transactional outbox and idempotent inbox end to end: business
//! transactions on a real PostgreSQL 15 (started by scripts/test.sh, found
//! through COURIER_TEST_POSTGRES_URL), `courier outbox-relay` processes, a
//! consumer process and `courier serve`, each killed with SIGKILL at random
//! points; the consumer's database must count every effect exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Broker;
use courier_client::{Client, ClientOptions};
use courier_outbox::{Inbox, InboxError, Outbox, OutboxMessage};
use sqlx::postgres::PgPool;
use uuid::Uuid;

const TRANSACTIONS: u64 = 1000;
/// Set in the consumer process this test starts (its database's URL).
const CONSUMER_DB_VAR: &str = "COURIER_OUTBOX_E2E_CONSUMER_DB";
/// Set for a consumer that aborts after this many commits, before acking.
const CRASH_AFTER_VAR: &str = "COURIER_OUTBOX_E2E_CRASH_AFTER_COMMITS";

fn test_postgres_url() -> String {
    std::env::var("COURIER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "COURIER_TEST_POSTGRES_URL is not set: run the tests through scripts/test.sh, \
             which installs and starts PostgreSQL 15 and sets it"
        )
    })
}

/// A fresh database of its own; returns its URL.
async fn fresh_database(tag: &str) -> String {
    let url = test_postgres_url();
    let admin = PgPool::connect(&url)
        .await
        .expect("connect to COURIER_TEST_POSTGRES_URL");
    let name = format!("courier_{tag}_{}", Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    format!("{}/{name}", url.rsplit_once('/').unwrap().0)
}

/// Small xorshift: the kill schedule, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A relay; with `abort_after`, one that aborts itself after that many
/// batches were accepted by the broker and before it deletes the last one
/// (the kill point between publish and mark-sent, hit for sure).
fn spawn_relay(broker: &Broker, database_url: &str, abort_after: Option<u64>) -> common::Proc {
    let abort_after = abort_after.map(|n| n.to_string());
    let mut args = vec![
        "outbox-relay",
        "--database-url",
        database_url,
        "--service",
        "shop",
        "--batch-size",
        "50",
    ];
    if let Some(n) = &abort_after {
        args.extend(["--abort-after-batches", n.as_str()]);
    }
    let relay = broker.spawn(&args);
    relay.wait_stderr("relaying the outbox", Duration::from_secs(30));
    relay
}

/// The consumer: this test binary again, running only
/// `consumer_process` (ignored unless asked for).
/// The consumer process; SIGKILLed on drop, so a failing test leaves none.
struct Consumer(Child);

impl Drop for Consumer {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

fn spawn_consumer(broker: &Broker, database_url: &str, crash_after: Option<u64>) -> Consumer {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "consumer_process",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env("COURIER_URL", &broker.addr)
    .env(CONSUMER_DB_VAR, database_url)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(n) = crash_after {
        cmd.env(CRASH_AFTER_VAR, n.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Consumer(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("consumer ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the consumer process subscribed in time");
    child
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

async fn effects(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The consumer process: handles `order.placed` through the inbox, one
/// effect row per order, and acks after its commit.
#[test]
#[ignore = "run as a child process by exactly_once_effects_while_relay_broker_and_consumer_are_killed"]
fn consumer_process() {
    let Ok(database_url) = std::env::var(CONSUMER_DB_VAR) else {
        panic!("{CONSUMER_DB_VAR} is not set: this test is the consumer process of another one");
    };
    let crash_after: Option<u64> = std::env::var(CRASH_AFTER_VAR)
        .ok()
        .map(|n| n.parse().unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let pool = PgPool::connect(&database_url).await.unwrap();
        let mut opts = ClientOptions::new(std::env::var("COURIER_URL").unwrap(), "ledger");
        opts.reconnect_delay_min = Duration::from_millis(10);
        opts.reconnect_delay_max = Duration::from_millis(100);
        // Every kill of this process or the broker with a delivery in
        // flight counts an attempt; the kills here come every few hundred
        // milliseconds, and a key's first messages can be in flight at
        // five of them. What is tested is that each order has its effect
        // once, not dead-lettering: attempts enough for the schedule.
        opts.max_deliveries = Some(100);
        let client = Client::connect(opts).await.unwrap();
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        client
            .on("order.placed", move |msg| {
                let pool = pool.clone();
                let commits = commits.clone();
                async move {
                    let order: i64 = msg.json()?;
                    let mut tx = pool.begin().await?;
                    let outcome = Inbox::process_once(&mut tx, &msg, |tx| {
                        Box::pin(async move {
                            sqlx::query("INSERT INTO effects (order_id) VALUES ($1)")
                                .bind(order)
                                .execute(&mut **tx)
                                .await
                        })
                    })
                    .await;
                    match outcome {
                        Ok(_) => {}
                        Err(InboxError::Handler(e)) => return Err(e.into()),
                        Err(InboxError::Database(e)) => return Err(e.into()),
                    }
                    tx.commit().await?;
                    let done = commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    if crash_after == Some(done) {
                        // Written and committed, not acked: the broker redelivers.
                        std::process::abort();
                    }
                    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
                }
            })
            .await
            .unwrap();
        println!("consumer ready");
        std::future::pending::<()>().await;
    });
}

#[test]
fn exactly_once_effects_while_relay_broker_and_consumer_are_killed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (shop_url, ledger_url) =
        runtime.block_on(async { (fresh_database("shop").await, fresh_database("ledger").await) });
    let shop = runtime.block_on(async {
        let pool = PgPool::connect(&shop_url).await.unwrap();
        courier_outbox::migrate_postgres(&pool).await.unwrap();
        sqlx::raw_sql("CREATE TABLE orders (id BIGINT PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    });
    let ledger = runtime.block_on(async {
        let pool = PgPool::connect(&ledger_url).await.unwrap();
        courier_outbox::migrate_postgres(&pool).await.unwrap();
        sqlx::raw_sql("CREATE TABLE effects (order_id BIGINT NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    });
    // `COURIER_OUTBOX_E2E_SEED` replays a printed schedule.
    let seed = std::env::var("COURIER_OUTBOX_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("kill schedule seed: {seed} (COURIER_OUTBOX_E2E_SEED)");
    let mut rng = Rng(seed);

    let mut broker = Broker::start();
    let mut consumer = spawn_consumer(&broker, &ledger_url, None);
    let mut relay = spawn_relay(&broker, &shop_url, None);

    // The business: TRANSACTIONS orders, each with its event, plus some
    // transactions that roll back (never published).
    let business = {
        let shop = shop.clone();
        runtime.spawn(async move {
            for order in 0..TRANSACTIONS as i64 {
                for attempt in 0..2 {
                    let mut tx = shop.begin().await.unwrap();
                    sqlx::query("INSERT INTO orders (id) VALUES ($1)")
                        .bind(order)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    Outbox::enqueue(
                        &mut tx,
                        OutboxMessage::event("order.placed")
                            .json(&order)
                            .unwrap()
                            .key(format!("customer-{}", order % 13)),
                    )
                    .await
                    .unwrap();
                    if attempt == 0 && order % 17 == 0 {
                        tx.rollback().await.unwrap();
                        continue;
                    }
                    tx.commit().await.unwrap();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };

    let mut kills = [0u32; 5];
    while !business.is_finished() || kills.contains(&0) {
        std::thread::sleep(Duration::from_millis(150 + rng.below(350)));
        match rng.below(5) {
            0 => {
                relay.kill9();
                relay = spawn_relay(&broker, &shop_url, None);
                kills[0] += 1;
            }
            4 => {
                // Dies right after the broker accepted a batch, before
                // deleting it: that batch is published again.
                relay.kill9();
                relay = spawn_relay(&broker, &shop_url, Some(1 + rng.below(3)));
                kills[4] += 1;
            }
            1 => {
                broker = broker.crash_and_restart();
                kills[1] += 1;
            }
            2 => {
                drop(consumer);
                consumer = spawn_consumer(&broker, &ledger_url, None);
                kills[2] += 1;
            }
            _ => {
                // A consumer that dies after committing its writes and
                // before acking them.
                drop(consumer);
                consumer = spawn_consumer(&broker, &ledger_url, Some(1 + rng.below(20)));
                kills[3] += 1;
            }
        }
    }
    runtime.block_on(business).unwrap();
    eprintln!(
        "kills: relay {}, broker {}, consumer {}, consumer after commit {}, relay after publish before delete {}",
        kills[0], kills[1], kills[2], kills[3], kills[4]
    );
    // The crash-after-commit consumer and the aborting relay may have died;
    // the last ones run on.
    drop(consumer);
    consumer = spawn_consumer(&broker, &ledger_url, None);
    relay.kill9();
    relay = spawn_relay(&broker, &shop_url, None);

    let deadline = Instant::now() + Duration::from_secs(180);
    let (total, distinct) = loop {
        let (total, distinct) = runtime.block_on(effects(&ledger));
        if total >= TRANSACTIONS as i64 || Instant::now() > deadline {
            break (total, distinct);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if distinct != TRANSACTIONS as i64 {
        // Which: stuck, or dead-lettered (each kill of the consumer or the
        // broker with a delivery in flight counts an attempt).
        let out = broker
            .cli(&[
                "dead-letters",
                "list",
                "--service",
                "ledger",
                "--limit",
                "1000",
            ])
            .output()
            .unwrap();
        panic!(
            "orders with an effect: {distinct} of {TRANSACTIONS} after 180 s; ledger's dead letters:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Let any late redelivery arrive before counting for good.
    std::thread::sleep(Duration::from_secs(2));
    let (total, _) = (runtime.block_on(effects(&ledger)).0.max(total), distinct);
    assert_eq!(total, TRANSACTIONS as i64, "effects, duplicates included");
    let left: i64 = runtime
        .block_on(sqlx::query_scalar("SELECT count(*) FROM courier_outbox").fetch_one(&shop))
        .unwrap();
    assert_eq!(left, 0, "rows left in the outbox");
    drop(consumer);
    relay.kill9();
}
