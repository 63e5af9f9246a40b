//! The Rust SDK against a real broker process.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Broker;
use courier_client::{Client, ClientOptions, ConnectionEvent, ErrorCode, Incoming};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

fn opts(broker: &Broker, service: &str) -> ClientOptions {
    let mut o = ClientOptions::new(broker.addr.clone(), service);
    o.reconnect_delay_max = Duration::from_millis(200);
    o
}

async fn client(broker: &Broker, service: &str) -> Client {
    Client::connect(opts(broker, service))
        .await
        .expect("connect")
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Todo {
    text: String,
}

/// Forwards each delivery's (name, attempt, payload) to a channel and acks.
async fn recorder(client: &Client, pattern: &str) -> mpsc::Receiver<(String, u32, Vec<u8>)> {
    let (tx, rx) = mpsc::channel(10_000);
    client
        .on(pattern, move |msg: Incoming| {
            let tx = tx.clone();
            async move {
                let _ = tx
                    .send((
                        msg.name().to_string(),
                        msg.attempt(),
                        msg.payload().to_vec(),
                    ))
                    .await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe");
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_request_reply_carries_the_activity_into_everything_sent_while_handling() {
    let broker = Broker::start();
    let todo = client(&broker, "todo").await;
    let audit = client(&broker, "audit").await;
    let mut events = recorder(&audit, "todo.created").await;
    let (seen_tx, mut seen) = mpsc::channel(10);
    todo.on("todo.create", move |msg: Incoming| {
        let seen_tx = seen_tx.clone();
        async move {
            let new: Todo = msg.json()?;
            let _ = seen_tx.send(msg.message().activity_id).await;
            // Sent through the plain client inside the handler: same activity.
            msg.client().publish("todo.created", &new).await?;
            msg.reply("todo.created", &new).await?;
            Ok::<(), courier_client::Error>(())
        }
    })
    .await
    .expect("subscribe");

    let web = client(&broker, "web").await;
    let builder = web
        .command("todo.create")
        .json(&Todo {
            text: "milk".into(),
        })
        .expect("json");
    let activity = builder.message().activity_id;
    let reply = builder.timeout(T).request().await.expect("reply");
    assert_eq!(reply.name(), "todo.created");
    assert!(reply.is_final());
    assert_eq!(
        reply.json::<Todo>().expect("typed"),
        Todo {
            text: "milk".into()
        }
    );
    assert_eq!(reply.message().sender, "todo");
    assert_eq!(reply.message().activity_id, activity);
    assert_eq!(reply.message().id.get_version_num(), 7, "ids are UUID v7");
    assert_eq!(seen.recv().await, Some(activity));
    let (name, _, payload) = tokio::time::timeout(T, events.recv())
        .await
        .expect("event in time")
        .expect("event");
    assert_eq!(name, "todo.created");
    assert_eq!(
        serde_json::from_slice::<Todo>(&payload).expect("json"),
        Todo {
            text: "milk".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acceptance_says_where_the_broker_s_log_holds_the_message() {
    let broker = Broker::start();
    let web = client(&broker, "web").await;
    let first = web
        .event("todo.created")
        .json(&1)
        .expect("json")
        .send_receipt()
        .await
        .expect("accepted");
    let second = web
        .event("todo.created")
        .json(&2)
        .expect("json")
        .enqueue()
        .expect("queued")
        .wait_receipt()
        .await
        .expect("accepted");
    let (Some(one), Some(two)) = (first.seq, second.seq) else {
        panic!("durable events are stored: {first:?}, {second:?}");
    };
    assert!(two > one, "log seqs {one} then {two}");
    let transient = web
        .event("todo.created")
        .json(&3)
        .expect("json")
        .transient()
        .send_receipt()
        .await
        .expect("accepted");
    assert_eq!(transient.seq, None, "the log keeps no transient message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_send_says_why() {
    let broker = Broker::start();
    let web = client(&broker, "web").await;
    let err = web
        .send("todo.create", &())
        .await
        .expect_err("nobody receives it");
    assert_eq!(err.code(), Some(ErrorCode::NoReceiver));
    assert!(
        err.to_string().contains("no service receives todo.create"),
        "{err}"
    );
    let err = web
        .request("todo.create", &())
        .await
        .expect_err("refused request");
    assert_eq!(err.code(), Some(ErrorCode::NoReceiver));
    let err = web.send("Bad Name", &()).await.expect_err("bad name");
    assert!(err.to_string().contains("invalid name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sends_are_delivered_and_only_their_refusals_are_counted_by_flush() {
    let broker = Broker::start();
    let audit = client(&broker, "audit").await;
    let mut events = recorder(&audit, "metric.sampled").await;
    let todo = client(&broker, "todo").await;
    let _commands = recorder(&todo, "todo.create").await;
    let web = client(&broker, "web").await;

    for i in 0..2_000u32 {
        web.event("metric.sampled")
            .json(&i)
            .expect("encode")
            .transient()
            .send_quiet()
            .await
            .expect("quiet send");
    }
    tokio::time::timeout(T, web.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    assert_eq!(web.unheard_refusals(), 0);
    assert!(web.last_unheard_refusal().is_none());
    // Handlers run concurrently, so the recorder may see them out of order.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2_000u32 {
        let (name, _, payload) = tokio::time::timeout(T, events.recv())
            .await
            .expect("delivered in time")
            .expect("open");
        assert_eq!(name, "metric.sampled");
        seen.insert(serde_json::from_slice::<u32>(&payload).expect("a number"));
    }
    assert_eq!(seen, (0..2_000u32).collect());

    // No service receives these commands, so the broker refuses them;
    // send_quiet itself succeeds, and the flush behind them counts both.
    for _ in 0..2 {
        web.command("nobody.listens")
            .json(&())
            .expect("encode")
            .send_quiet()
            .await
            .expect("queued");
    }
    // A durable quiet send after them is accepted and not counted.
    web.command("todo.create")
        .json(&())
        .expect("encode")
        .send_quiet()
        .await
        .expect("queued");
    tokio::time::timeout(T, web.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    assert_eq!(web.unheard_refusals(), 2);
    let (code, reason) = web.last_unheard_refusal().expect("a refusal");
    assert_eq!(code, ErrorCode::NoReceiver);
    assert!(reason.contains("nobody.listens"), "{reason}");

    // Once the broker is gone, quiet sends and flushes fail instead of
    // pretending.
    drop(broker);
    let deadline = Instant::now() + T;
    loop {
        let sent = web
            .event("metric.sampled")
            .json(&0)
            .expect("encode")
            .transient()
            .send_quiet()
            .await;
        let flushed = tokio::time::timeout(T, web.flush())
            .await
            .expect("answered");
        if sent.is_err() || flushed.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepted without a broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On one thread the connection's writer cannot run while the publisher
/// never waits, so the socket's buffer fills: from then on send_quiet's
/// future waits for room instead of being ready, and nothing is lost.
#[tokio::test(flavor = "current_thread")]
async fn quiet_sends_wait_for_room_once_the_socket_buffer_is_full() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    let broker = Broker::start();
    let audit = client(&broker, "audit").await;
    let mut events = recorder(&audit, "metric.sampled").await;
    let web = client(&broker, "web").await;
    let payload = bytes::Bytes::from(vec![b'x'; 4096]);
    // Two and a half buffers' worth: below the broker's pause threshold for
    // a slow subscriber, so no transient delivery is dropped.
    let count = 5 * courier_client::QUIET_BUFFER_BYTES_MAX / 2 / payload.len();
    let mut waited = 0;
    for _ in 0..count {
        let send = web
            .event("metric.sampled")
            .payload(payload.clone())
            .transient()
            .send_quiet();
        let mut send = std::pin::pin!(send);
        let sent = match send.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(sent) => sent,
            Poll::Pending => {
                waited += 1;
                tokio::time::timeout(T, send).await.expect("room in time")
            }
        };
        sent.expect("quiet send");
    }
    assert!(
        waited > 0,
        "the buffer never filled: the test does not test waiting"
    );
    tokio::time::timeout(T, web.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    assert_eq!(web.unheard_refusals(), 0);
    for _ in 0..count {
        let (_, _, got) = tokio::time::timeout(T, events.recv())
            .await
            .expect("delivered in time")
            .expect("open");
        assert_eq!(got.len(), payload.len());
    }
}

/// Transient commands go QUIET: the broker answers only a refusal, which
/// must still end the request at once, and every reply must reach the
/// request it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_requests_get_their_own_replies_and_their_refusals() {
    let broker = Broker::start();
    let web = client(&broker, "web").await;
    let started = Instant::now();
    let err = web
        .command("price.get")
        .json(&1)
        .expect("json")
        .transient()
        .timeout(T)
        .request()
        .await
        .expect_err("nobody receives price.get");
    assert_eq!(err.code(), Some(ErrorCode::NoReceiver), "{err}");
    assert!(
        started.elapsed() < T / 2,
        "the refusal ended the request, not its timeout"
    );

    let prices = client(&broker, "prices").await;
    prices
        .on("price.get", |msg: Incoming| async move {
            let item: u32 = msg.json()?;
            reply_quietly(&msg, "price.quoted", &(item * 10)).await
        })
        .await
        .expect("subscribe");
    let mut asked = tokio::task::JoinSet::new();
    for item in 0..200u32 {
        let web = web.clone();
        asked.spawn(async move {
            let reply = web
                .command("price.get")
                .json(&item)?
                .transient()
                .timeout(T)
                .request()
                .await?;
            Ok::<(u32, u32), courier_client::Error>((item, reply.json()?))
        });
    }
    let mut answered = 0;
    while let Some(joined) = asked.join_next().await {
        let (item, price) = joined.expect("task").expect("reply");
        assert_eq!(price, item * 10, "the reply to {item}");
        answered += 1;
    }
    assert_eq!(answered, 200);
}

/// Answers `msg` with one final transient reply, sent QUIET.
async fn reply_quietly<T: Serialize>(
    msg: &Incoming,
    name: &str,
    value: &T,
) -> Result<(), courier_client::Error> {
    msg.reply_builder(name, true)
        .json(value)?
        .transient()
        .send_quiet()
        .await?;
    Ok(())
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |sum, b| {
        sum.wrapping_mul(31).wrapping_add(u64::from(*b))
    })
}

/// A lone request is written from the caller's thread; one larger than
/// the socket takes at once leaves the rest to the connection's writer,
/// and the next request must still follow it intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_larger_than_the_socket_buffer_arrives_whole() {
    let broker = Broker::start();
    let sizes = client(&broker, "sizes").await;
    sizes
        .on("size.measure", |msg: Incoming| async move {
            let payload = &msg.message().payload;
            let measured = (payload.len(), checksum(payload));
            reply_quietly(&msg, "size.measured", &measured).await
        })
        .await
        .expect("subscribe");
    let web = client(&broker, "web").await;
    for len in [6 * 1024 * 1024, 16, 3 * 1024 * 1024 + 7, 1] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let sum = checksum(&payload);
        let reply = web
            .command("size.measure")
            .payload(bytes::Bytes::from(payload))
            .transient()
            .timeout(T)
            .request()
            .await
            .expect("reply");
        assert_eq!(
            reply.json::<(usize, u64)>().expect("json"),
            (len, sum),
            "request of {len} B"
        );
    }
}

/// A transient request whose connection is lost ends at once with a
/// clear error: its command is not sent again (at most once), so no
/// reply can come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_request_ends_at_once_when_its_connection_is_lost() {
    let broker = Broker::start();
    let slow = client(&broker, "slow").await;
    let (got_tx, mut got) = mpsc::channel(1);
    slow.on("slow.work", move |_msg: Incoming| {
        let got_tx = got_tx.clone();
        async move {
            let _ = got_tx.send(()).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<(), courier_client::Error>(())
        }
    })
    .await
    .expect("subscribe");
    let web = client(&broker, "web").await;
    let long = Duration::from_secs(60);
    let request = tokio::spawn({
        let web = web.clone();
        async move {
            web.command("slow.work")
                .transient()
                .timeout(long)
                .request()
                .await
        }
    });
    tokio::time::timeout(T, got.recv())
        .await
        .expect("the command reached the handler in time");
    let killed = Instant::now();
    let _broker = broker.crash_and_restart();
    let err = tokio::time::timeout(T, request)
        .await
        .expect("the request ended well before its timeout")
        .expect("task")
        .expect_err("no reply can come");
    assert!(
        matches!(&err, courier_client::Error::Closed(why) if why.contains("at most once")),
        "{err}"
    );
    assert!(killed.elapsed() < T);
}

/// `courier serve --send-rate N`: a service's sends past its rate are
/// refused with `rate_limited` and a reason that says to retry; none is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_the_service_send_rate_are_refused() {
    let broker = Broker::start_with(&["--send-rate", "5"]);
    let audit = client(&broker, "audit").await;
    let mut seen = recorder(&audit, "noise.made").await;
    let chatty = client(&broker, "chatty").await;
    let (mut accepted, mut limited) = (0, 0);
    for i in 0..12 {
        match chatty.publish("noise.made", &i).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
                assert!(e.to_string().contains("retry later"), "{e}");
                limited += 1;
            }
        }
    }
    // The burst is one second's worth (5); sends take milliseconds, so at
    // most one more token can have been refilled meanwhile.
    assert!((5..=6).contains(&accepted), "accepted {accepted}");
    assert_eq!(accepted + limited, 12);
    for _ in 0..accepted {
        tokio::time::timeout(T, seen.recv())
            .await
            .expect("accepted events arrive")
            .expect("event");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), seen.recv())
            .await
            .is_err(),
        "a refused event was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_times_out_when_nobody_replies() {
    let broker = Broker::start();
    let todo = client(&broker, "todo").await;
    todo.on("todo.create", |_msg| async {
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("sub");
    let web = client(&broker, "web").await;
    let started = Instant::now();
    let err = web
        .command("todo.create")
        .timeout(Duration::from_millis(300))
        .request()
        .await
        .expect_err("times out");
    assert!(matches!(err, courier_client::Error::Timeout(_)), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_replies_arrive_in_order_and_end_with_the_final() {
    let broker = Broker::start();
    let files = client(&broker, "files").await;
    files
        .on("file.copy", |msg: Incoming| async move {
            for percent in [25, 50, 75] {
                msg.reply_progress("file.copy.in-progress", &percent)
                    .await?;
            }
            msg.reply("file.copy.done", &100).await?;
            Ok::<(), courier_client::Error>(())
        })
        .await
        .expect("sub");
    let web = client(&broker, "web").await;
    let mut stream = web.request_stream("file.copy", &()).await.expect("sent");
    let mut got = Vec::new();
    while let Some(reply) = stream.next_reply().await {
        let reply = reply.expect("reply");
        got.push((
            reply.name().to_string(),
            reply.json::<u32>().expect("n"),
            reply.is_final(),
        ));
    }
    assert_eq!(
        got,
        vec![
            ("file.copy.in-progress".into(), 25, false),
            ("file.copy.in-progress".into(), 50, false),
            ("file.copy.in-progress".into(), 75, false),
            ("file.copy.done".into(), 100, true),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_in_order_one_at_a_time_with_concurrent_handlers() {
    let broker = Broker::start();
    let log: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let busy: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let w = client(&broker, "ledger").await;
        let (log, busy) = (log.clone(), busy.clone());
        w.on("ledger.post", move |msg: Incoming| {
            let (log, busy) = (log.clone(), busy.clone());
            async move {
                let key = String::from_utf8_lossy(msg.message().key.as_deref().unwrap_or_default())
                    .into_owned();
                let n: u32 = msg.json()?;
                assert!(
                    !busy
                        .lock()
                        .expect("lock")
                        .insert(key.clone(), true)
                        .unwrap_or(false),
                    "two of {key} at once"
                );
                tokio::time::sleep(Duration::from_millis(u64::from(n % 3))).await;
                log.lock().expect("lock").push((key.clone(), n));
                busy.lock().expect("lock").insert(key, false);
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("sub");
        workers.push(w);
    }
    let sender = client(&broker, "web").await;
    let mut acks = Vec::new();
    for n in 0..60u32 {
        let key = format!("account-{}", n % 3);
        acks.push(
            sender
                .command("ledger.post")
                .key(key)
                .json(&n)
                .expect("json")
                .enqueue()
                .expect("queued"),
        );
    }
    for ack in acks {
        ack.wait().await.expect("accepted");
    }
    let deadline = Instant::now() + T;
    while log.lock().expect("lock").len() < 60 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = log.lock().expect("lock").clone();
    assert_eq!(log.len(), 60);
    for k in 0..3u32 {
        let order: Vec<u32> = log
            .iter()
            .filter(|(key, _)| *key == format!("account-{k}"))
            .map(|(_, n)| *n)
            .collect();
        let expected: Vec<u32> = (0..60).filter(|n| n % 3 == k).collect();
        assert_eq!(order, expected, "key account-{k} in send order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_after_its_delay_then_dead_letters_after_max_deliveries() {
    let broker = Broker::start();
    let mut o = opts(&broker, "mailer");
    o.max_deliveries = Some(3);
    let mailer = Client::connect(o).await.expect("connect");
    let (tx, mut rx) = mpsc::channel(100);
    mailer
        .on("mail.send", move |msg: Incoming| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((msg.attempt(), Instant::now())).await;
                msg.nack(Duration::from_millis(200))?;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("sub");
    let web = client(&broker, "web").await;
    web.send("mail.send", &"hi").await.expect("sent");
    let mut attempts = Vec::new();
    while let Ok(Some(a)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        attempts.push(a);
    }
    assert_eq!(
        attempts.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "stops at max_deliveries"
    );
    assert!(
        attempts[1].1 - attempts[0].1 >= Duration::from_millis(190),
        "nack delay respected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_delivery_goes_elsewhere_after_the_ack_deadline() {
    let broker = Broker::start();
    let mut o = opts(&broker, "jobs");
    o.ack_deadline = Some(Duration::from_millis(300));
    let stuck = Client::connect(o.clone()).await.expect("connect");
    let (tx, mut rx) = mpsc::channel(10);
    let tx2 = tx.clone();
    stuck
        .on("job.run", move |msg: Incoming| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(("stuck", msg.attempt())).await;
                std::future::pending::<()>().await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("sub");
    let web = client(&broker, "web").await;
    web.send("job.run", &1).await.expect("sent");
    assert_eq!(rx.recv().await, Some(("stuck", 1)));
    let healthy = Client::connect(o).await.expect("connect");
    healthy
        .on("job.run", move |msg: Incoming| {
            let tx = tx2.clone();
            async move {
                let _ = tx.send(("healthy", msg.attempt())).await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("sub");
    let next = tokio::time::timeout(T, rx.recv())
        .await
        .expect("redelivered in time");
    assert_eq!(next, Some(("healthy", 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_ttl_deferred_and_flow_control() {
    let broker = Broker::start();
    let worker = client(&broker, "w").await;
    let mut rx = recorder(&worker, "w.>").await;
    let web = client(&broker, "web").await;

    // Dedup: the same message (same id) twice is accepted twice, delivered once.
    let mut m = courier_client::proto::Message::new(
        courier_client::proto::Kind::Command,
        "w.dedup",
        "once",
    );
    m.sender = Default::default();
    web.send_message(m.clone()).await.expect("first");
    web.send_message(m).await.expect("duplicate accepted");
    assert_eq!(
        tokio::time::timeout(T, rx.recv())
            .await
            .expect("in time")
            .map(|d| d.0),
        Some("w.dedup".into())
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "delivered once"
    );

    // Deferred delivery.
    let sent = Instant::now();
    web.command("w.later")
        .deliver_after(Duration::from_millis(400))
        .send()
        .await
        .expect("sent");
    let got = tokio::time::timeout(T, rx.recv())
        .await
        .expect("in time")
        .expect("delivery");
    assert_eq!(got.0, "w.later");
    assert!(
        sent.elapsed() >= Duration::from_millis(390),
        "not before deliver_at"
    );

    // TTL: expires while its service has no instance connected.
    worker.shutdown().await;
    web.command("w.short")
        .ttl(Duration::from_millis(100))
        .send()
        .await
        .expect("sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut o = opts(&broker, "w");
    o.max_in_flight = 2;
    let slow = Client::connect(o).await.expect("connect");
    let running = Arc::new(Mutex::new((0u32, 0u32))); // (now, max)
    let (done_tx, mut done) = mpsc::channel(100);
    let r = running.clone();
    slow.on("w.>", move |msg: Incoming| {
        let (r, done_tx) = (r.clone(), done_tx.clone());
        async move {
            {
                let mut g = r.lock().expect("lock");
                g.0 += 1;
                g.1 = g.1.max(g.0);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.lock().expect("lock").0 -= 1;
            let _ = done_tx.send(msg.name().to_string()).await;
            Ok::<(), courier_client::Error>(())
        }
    })
    .await
    .expect("sub");
    for i in 0..8 {
        web.send("w.flow", &i).await.expect("sent");
    }
    let mut names = Vec::new();
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_secs(2), done.recv()).await {
        names.push(n);
    }
    assert_eq!(
        names.len(),
        8,
        "all flow messages handled and the expired one not: {names:?}"
    );
    assert!(
        !names.contains(&"w.short".to_string()),
        "expired message was delivered"
    );
    assert_eq!(
        running.lock().expect("lock").1,
        2,
        "never more than max_in_flight at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_and_resubscribes_after_a_broker_crash() {
    let broker = Broker::start();
    let worker = client(&broker, "todo").await;
    let mut rx = recorder(&worker, "todo.create").await;
    let web = client(&broker, "web").await;
    web.send("todo.create", &1).await.expect("sent");
    assert_eq!(
        tokio::time::timeout(T, rx.recv())
            .await
            .expect("in time")
            .map(|d| d.2),
        Some(b"1".to_vec())
    );

    let broker = broker.crash_and_restart();
    // The worker resubscribes by itself; the sender's retry finds it.
    let deadline = Instant::now() + T;
    loop {
        match web.send("todo.create", &2).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no resubscription after restart: {e}"),
        }
    }
    // "1" may come again: its ack may not have reached the broker before
    // the crash (at least once). "2" must come.
    loop {
        let got = tokio::time::timeout(T, rx.recv())
            .await
            .expect("in time")
            .map(|d| d.2);
        if got == Some(b"2".to_vec()) {
            break;
        }
        assert_eq!(
            got,
            Some(b"1".to_vec()),
            "only a redelivery of 1 may come first"
        );
    }
    assert!(worker.is_connected());
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_events_tell_of_an_outage_and_end_at_shutdown() {
    let broker = Broker::start();
    let web = client(&broker, "web").await;
    let mut events = web.connection_events();

    let broker = broker.crash_and_restart();
    let lost = tokio::time::timeout(T, events.next())
        .await
        .expect("an event in time");
    assert!(
        matches!(&lost, Some(ConnectionEvent::Lost { reason }) if !reason.is_empty()),
        "the outage starts with Lost: {lost:?}"
    );
    // Failed attempts may come between, depending on how fast the broker is back.
    loop {
        match tokio::time::timeout(T, events.next())
            .await
            .expect("restored in time")
        {
            Some(ConnectionEvent::ReconnectFailed { error, .. }) => {
                assert!(error.contains("cannot reach broker"), "{error}")
            }
            Some(ConnectionEvent::Restored) => break,
            other => panic!("expected ReconnectFailed or Restored, got {other:?}"),
        }
    }
    assert!(web.is_connected(), "Restored comes once connected");

    // Ids set by hand: the second send of one id is accepted and dropped.
    let worker = client(&broker, "w").await;
    let mut rx = recorder(&worker, "w.once").await;
    let id = uuid::Uuid::now_v7();
    for _ in 0..2 {
        let sent = web.command("w.once").id(id).send().await.expect("accepted");
        assert_eq!(sent, id);
    }
    let first = tokio::time::timeout(T, rx.recv()).await.expect("in time");
    assert_eq!(first.map(|d| d.0), Some("w.once".to_string()));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "the same id is delivered once"
    );

    web.shutdown().await;
    assert_eq!(
        tokio::time::timeout(T, events.next())
            .await
            .expect("ends in time"),
        None,
        "the events end with the client"
    );
    assert_eq!(web.connection_events().next().await, None);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_handlers_and_acks_them() {
    let broker = Broker::start();
    let worker = client(&broker, "resize").await;
    let (tx, mut rx) = mpsc::channel(10);
    let (started_tx, mut started) = mpsc::channel(10);
    worker
        .on("image.resize", move |_msg: Incoming| {
            let (tx, started_tx) = (tx.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = tx.send(()).await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("sub");
    let web = client(&broker, "web").await;
    web.send("image.resize", &()).await.expect("sent");
    tokio::time::timeout(T, started.recv())
        .await
        .expect("the handler started in time");
    worker.shutdown().await;
    assert!(rx.try_recv().is_ok(), "shutdown waited for the handler");
    // The ack went out before the connection closed: nothing is redelivered.
    let next = client(&broker, "resize").await;
    let mut again = recorder(&next, "image.resize").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(700), again.recv())
            .await
            .is_err()
    );
}

/// The same SDK on tokio's current-thread runtime: handlers that finish at
/// once, handlers that wait (here: on a request of their own), pipelined
/// sends and request/reply all share one thread with the connections.
#[tokio::test(flavor = "current_thread")]
async fn the_sdk_works_on_a_current_thread_runtime_too() {
    let broker = Broker::start();
    let prices = client(&broker, "prices").await;
    prices
        .on("price.get", |msg: Incoming| async move {
            msg.reply("price.quoted", &42).await?;
            Ok::<(), courier_client::Error>(())
        })
        .await
        .expect("subscribe prices");
    // A handler that waits on a request of its own before it answers.
    let orders = client(&broker, "orders").await;
    let orders_client = orders.clone();
    orders
        .on("order.quote", move |msg: Incoming| {
            let orders_client = orders_client.clone();
            async move {
                let price: u32 = orders_client.request("price.get", &()).await?.json()?;
                msg.reply("order.quoted", &(price * 2)).await?;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe orders");
    let audit = client(&broker, "audit").await;
    let mut seen = recorder(&audit, "order.placed").await;

    let web = client(&broker, "web").await;
    for _ in 0..20 {
        let quote: u32 = tokio::time::timeout(T, web.request("order.quote", &()))
            .await
            .expect("a reply in time")
            .expect("quoted")
            .json()
            .expect("a number");
        assert_eq!(quote, 84);
    }
    let acks: Vec<_> = (0..500)
        .map(|i| {
            web.event("order.placed")
                .json(&i)
                .expect("json")
                .enqueue()
                .expect("queued")
        })
        .collect();
    for ack in acks {
        ack.wait().await.expect("accepted");
    }
    let mut payloads = Vec::new();
    while payloads.len() < 500 {
        let (name, attempt, payload) = tokio::time::timeout(T, seen.recv())
            .await
            .expect("all 500 events in time")
            .expect("recorder open");
        assert_eq!((name.as_str(), attempt), ("order.placed", 1));
        payloads.push(String::from_utf8(payload).expect("utf-8"));
    }
    payloads.sort_by_key(|p| p.parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(
        payloads,
        (0..500).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    for c in [web, audit, orders, prices] {
        c.shutdown().await;
    }
}

/// Forwards each delivered message whole to a channel and acks.
async fn envelopes(
    client: &Client,
    pattern: &str,
) -> mpsc::Receiver<courier_client::proto::Message> {
    let (tx, rx) = mpsc::channel(100);
    client
        .on(pattern, move |msg: Incoming| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(msg.message().clone()).await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe");
    rx
}

async fn next(
    rx: &mut mpsc::Receiver<courier_client::proto::Message>,
) -> courier_client::proto::Message {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("a delivery in time")
        .expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_handling_name_their_cause_and_continue_its_trace() {
    use courier_client::TraceParent;
    let broker = Broker::start();
    // todo: todo.create → publishes todo.created (plain client), replies.
    let todo = client(&broker, "todo").await;
    todo.on("todo.create", |msg: Incoming| async move {
        msg.client().publish("todo.created", &"milk").await?;
        msg.reply("todo.done", &"ok").await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");
    // audit: todo.created → command mail.send through the Incoming.
    let audit = client(&broker, "audit").await;
    audit
        .on("todo.created", |msg: Incoming| async move {
            msg.command("mail.send").json(&"hi")?.send().await?;
            Ok::<(), courier_client::Error>(())
        })
        .await
        .expect("subscribe");
    let mail = client(&broker, "mail").await;
    let mut mails = envelopes(&mail, "mail.send").await;
    let watcher = client(&broker, "watcher").await;
    let mut created = envelopes(&watcher, "todo.created").await;

    let web = client(&broker, "web").await;
    let builder = web.command("todo.create").json(&"milk").expect("json");
    let command = builder.message().clone();
    assert_eq!(command.parent_id, None, "a new activity has no parent");
    assert_eq!(
        command.header("traceparent"),
        None,
        "its trace is its activity"
    );
    let reply = builder.timeout(T).request().await.expect("reply");
    let event = next(&mut created).await;
    let mailed = next(&mut mails).await;

    let trace_of = |m: &courier_client::proto::Message| {
        TraceParent::parse(m.header("traceparent").expect("a traceparent"))
            .expect("a valid traceparent")
    };
    for (m, parent) in [
        (reply.message(), command.id),
        (&event, command.id),
        (&mailed, event.id),
    ] {
        assert_eq!(m.activity_id, command.activity_id, "{}", m.name);
        assert_eq!(m.parent_id, Some(parent), "{}'s cause", m.name);
        let trace = trace_of(m);
        assert_eq!(
            trace.trace_id,
            *command.activity_id.as_bytes(),
            "{}: one trace, named by the activity",
            m.name
        );
        assert_eq!(trace.span_id, m.id.as_bytes()[8..], "{}'s own span", m.name);
        assert_eq!(trace.flags, 1);
    }

    // A traceparent the sender brings is continued, not replaced.
    let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    web.command("todo.create")
        .header("traceparent", upstream)
        .json(&"bread")
        .expect("json")
        .timeout(T)
        .request()
        .await
        .expect("reply");
    let event = next(&mut created).await;
    let mailed = next(&mut mails).await;
    for m in [&event, &mailed] {
        let trace = trace_of(m);
        assert_eq!(trace.to_header()[3..35], upstream[3..35], "{}", m.name);
        assert_eq!(trace.span_id, m.id.as_bytes()[8..]);
    }
}
