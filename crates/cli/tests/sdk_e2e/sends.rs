//! Sends: typed request-reply, acceptances, refusals, quiet sends.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_request_reply_carries_the_activity_into_everything_sent_while_handling() {
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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

    let broker = Bus::start().await;
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
