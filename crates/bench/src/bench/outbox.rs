//! `--only outbox`: the transactional outbox's relay, PostgreSQL → broker.
//!
//! Each run makes a scratch database on a running PostgreSQL (created and
//! dropped by the run, also on an error or Ctrl-C) and a fresh broker, and
//! measures three things:
//!
//! - the relay's throughput: a backlog of rows already in the outbox,
//!   published and deleted by one relay (`Relay::publish_batch` back to
//!   back), timed until the outbox is empty;
//! - the direct-publish rate beside it: the same number of messages, same
//!   size, published by the SDK straight to the broker (pipelined, window
//!   [`WINDOW`]);
//! - commit → broker acceptance: one business transaction at a time
//!   (`Outbox::enqueue` + commit) with a relay running on LISTEN/NOTIFY,
//!   from the commit's return to the relay seeing the broker's acceptance.

use std::collections::HashMap;

use courier_outbox::{Outbox, OutboxMessage, Relay};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

use super::*;

pub(super) const OUTBOX_NAME: &str = "bench.outbox.published";
pub(super) const OUTBOX_DIRECT_NAME: &str = "bench.outbox.direct";
const OUTBOX_SERVICE: &str = "bench-outbox";
/// Where the bench finds PostgreSQL unless told otherwise: the role and
/// database `scripts/test.sh` makes on the local cluster.
pub(super) const DEFAULT_POSTGRES_URL: &str =
    "postgres://courier_test:courier_test@127.0.0.1:5432/courier_test";
/// A transaction's acceptance must be seen within this.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to get a PostgreSQL the bench can use, for every error about it.
fn postgres_help(url: &str) -> String {
    format!(
        "the outbox bench needs a running PostgreSQL and a role that may create databases, at {} (--postgres-url or COURIER_BENCH_POSTGRES_URL). \
         On Debian: `apt-get install postgresql-15`, `pg_ctlcluster 15 main start`, then \
         `su postgres -c \"psql -c \\\"CREATE ROLE courier_test LOGIN PASSWORD 'courier_test' CREATEDB\\\"\"` \
         and `su postgres -c \"createdb -O courier_test courier_test\"` (or run `bash scripts/test.sh` once, which does all of it)",
        redact(url)
    )
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let user = url[scheme_end + 3..at].split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A database of the run's own; dropped (with its connections) on drop.
struct ScratchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<ScratchDatabase> {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(admin_url)
            .await
            .map_err(|e| anyhow!("cannot connect: {e}; {}", postgres_help(admin_url)))?;
        // The pid first: whose database it is, if one is ever left behind.
        let name = format!(
            "courier_bench_{}_{}",
            std::process::id(),
            Uuid::new_v4().simple()
        );
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot create the scratch database {name}: {e}; {}",
                    postgres_help(admin_url)
                )
            })?;
        admin.close().await;
        let base = admin_url
            .split('?')
            .next()
            .and_then(|u| u.rsplit_once('/'))
            .map(|(base, _)| base)
            .ok_or_else(|| anyhow!("{}: not a postgres://HOST/DATABASE URL", redact(admin_url)))?;
        Ok(ScratchDatabase {
            admin_url: admin_url.to_string(),
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // Drop runs inside the bench's runtime: a thread of its own with a
        // runtime of its own does the async work, and is waited for.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let admin = PgPool::connect(&admin_url)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await
                    .map_err(|e| e.to_string())?;
                admin.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            progress(&format!(
                "  could not drop the scratch database {}: {e}; drop it by hand",
                self.name
            ));
        }
    }
}

pub(super) async fn courier_outbox(exe: &Path, plan: &Plan) -> anyhow::Result<Vec<Measurement>> {
    let database = ScratchDatabase::create(&plan.postgres_url).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&database.url)
        .await
        .with_context(|| format!("cannot connect to the scratch database {}", database.name))?;
    courier_outbox::migrate_postgres(&pool).await?;
    let dir = DataDir::create()?;
    let mut broker = BrokerProcess::start(exe, dir.path(), &[]).await?;
    let addr = broker.addr.clone();
    let result = async {
        let mut measured = Vec::new();

        // The backlog, written by PostgreSQL itself: what is timed is the
        // relay, not how fast the bench can insert.
        let count = plan.outbox_relay;
        fill_outbox(&pool, count).await?;
        let relay =
            Relay::postgres(pool.clone(), connect(&addr, OUTBOX_SERVICE, None).await?).await?;
        let started = Instant::now();
        let mut published = 0u64;
        while published < count {
            let n = relay.publish_batch().await.context("the relay failed")?;
            if n == 0 {
                bail!(
                    "the relay found the outbox empty after {} of {} rows",
                    thousands(published),
                    thousands(count)
                );
            }
            published += n as u64;
        }
        let elapsed = started.elapsed();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM courier_outbox")
            .fetch_one(&pool)
            .await?;
        if left != 0 {
            bail!("the relay left {left} rows in the outbox");
        }
        measured.push((
            Workload::Outbox,
            Metric::RelayThroughput,
            per_second(count, elapsed),
        ));

        let direct = connect(&addr, OUTBOX_SERVICE, None).await?;
        let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
        let started = Instant::now();
        publish_pipelined(&direct, OUTBOX_DIRECT_NAME, &payload, count, WINDOW).await?;
        measured.push((
            Workload::Outbox,
            Metric::DirectPublish,
            per_second(count, started.elapsed()),
        ));
        direct.shutdown().await;

        let latencies = commit_to_acceptance(&pool, &addr, plan.outbox_latency).await?;
        let p = |sorted: &[u64], q| percentile(sorted, q).map_or(f64::NAN, |v| v as f64);
        measured.push((
            Workload::Outbox,
            Metric::CommitToAcceptP50,
            p(&latencies.commit, 50.0),
        ));
        measured.push((
            Workload::Outbox,
            Metric::CommitToAcceptP99,
            p(&latencies.commit, 99.0),
        ));
        measured.push((
            Workload::Outbox,
            Metric::SendToAcceptP50,
            p(&latencies.direct, 50.0),
        ));
        measured.push((
            Workload::Outbox,
            Metric::SendToAcceptP99,
            p(&latencies.direct, 99.0),
        ));
        Ok(measured)
    };
    let result = broker.watch(result).await;
    pool.close().await;
    drop(database);
    result
}

/// `count` rows of [`SMALL_BYTES`] in the outbox, spread over the
/// partitions as keyless messages are, in one statement.
async fn fill_outbox(pool: &PgPool, count: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO courier_outbox (id, kind, name, key, part, payload, enqueued_us) \
         SELECT uuid_send(gen_random_uuid()), 0, $1, NULL, g % 16, \
                decode(repeat('78', $2), 'hex'), 0 \
         FROM generate_series(1, $3) AS g",
    )
    .bind(OUTBOX_NAME)
    .bind(SMALL_BYTES as i32)
    .bind(i64::try_from(count).unwrap_or(i64::MAX))
    .execute(pool)
    .await
    .context("cannot fill the outbox")?;
    sqlx::raw_sql("ANALYZE courier_outbox")
        .execute(pool)
        .await?;
    progress(&format!(
        "  outbox filled with {} rows in {:.1} s",
        thousands(count),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Sorted latencies in µs: of the outbox (commit → acceptance) and, beside
/// each transaction, of one durable event sent straight to the broker
/// (send → acceptance): the same moments' floor, the broker's fsync
/// included, which the outbox cannot beat.
struct AcceptLatencies {
    commit: Vec<u64>,
    direct: Vec<u64>,
}

/// Runs `count` transactions one after the other, each waiting for its
/// message's acceptance, and after each a direct durable send.
async fn commit_to_acceptance(
    pool: &PgPool,
    addr: &str,
    count: u64,
) -> anyhow::Result<AcceptLatencies> {
    let accepted: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let seen = Arc::new(Notify::new());
    let hook = {
        let (accepted, seen) = (accepted.clone(), seen.clone());
        Arc::new(move |ids: &[Uuid]| {
            let now = Instant::now();
            if let Ok(mut accepted) = accepted.lock() {
                for id in ids {
                    accepted.entry(*id).or_insert(now);
                }
            }
            seen.notify_one();
        })
    };
    let relay = Relay::postgres(pool.clone(), connect(addr, OUTBOX_SERVICE, None).await?)
        .await?
        .on_accepted(hook);
    let relay = tokio::spawn(async move { relay.run().await });
    // The relay listens before the first transaction: a warm-up one is
    // accepted only once it does (its poll would find it anyway).
    let direct = connect(addr, OUTBOX_SERVICE, None).await?;
    let payload = Bytes::from(vec![b'x'; SMALL_BYTES]);
    let result = async {
        let mut latencies = Vec::with_capacity(count as usize);
        let mut direct_latencies = Vec::with_capacity(count as usize);
        for i in 0..=count {
            let mut tx = pool.begin().await?;
            let id = Outbox::enqueue(
                &mut tx,
                OutboxMessage::event(OUTBOX_NAME).payload(vec![b'x'; SMALL_BYTES]),
            )
            .await?;
            tx.commit().await?;
            let committed = Instant::now();
            let deadline = committed + ACCEPT_TIMEOUT;
            let at = loop {
                let notified = seen.notified();
                if let Some(at) = accepted.lock().ok().and_then(|a| a.get(&id).copied()) {
                    break at;
                }
                if Instant::now() > deadline {
                    bail!(
                        "transaction {i}'s message was not accepted within {} s",
                        ACCEPT_TIMEOUT.as_secs()
                    );
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            };
            if i > 0 {
                // The relay may see the acceptance before the commit call
                // returns here; that counts as no delay.
                latencies.push(at.saturating_duration_since(committed).as_micros() as u64);
                let sent = Instant::now();
                direct
                    .event(OUTBOX_DIRECT_NAME)
                    .payload(payload.clone())
                    .enqueue()?
                    .wait()
                    .await?;
                direct_latencies.push(sent.elapsed().as_micros() as u64);
            }
        }
        latencies.sort_unstable();
        direct_latencies.sort_unstable();
        Ok(AcceptLatencies {
            commit: latencies,
            direct: direct_latencies,
        })
    }
    .await;
    relay.abort();
    direct.shutdown().await;
    result
}
