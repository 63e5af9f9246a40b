//! The connection's life: reconnects after a crash, its events, graceful
//! shutdown, a current-thread runtime.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_and_resubscribes_after_a_broker_crash() {
    let broker = Bus::start().await;
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

    let broker = broker.crash_and_restart().await;
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
    let broker = Bus::start().await;
    let web = client(&broker, "web").await;
    let mut events = web.connection_events();

    let broker = broker.crash_and_restart().await;
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
                // One address or several (a cluster's nodes).
                assert!(
                    error.contains("cannot reach broker at")
                        || error.contains("cannot reach a broker at"),
                    "{error}"
                )
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
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
