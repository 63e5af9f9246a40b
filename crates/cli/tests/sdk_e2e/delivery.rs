//! Delivery rules: order per key, nacks, ack deadlines, dedup, TTL, deferral, flow control.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_in_order_one_at_a_time_with_concurrent_handlers() {
    let broker = Bus::start().await;
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
    let log = common::wait_for_async("the 60 posts handled", T, || {
        let handled = log.lock().expect("lock").clone();
        async move { (handled.len() >= 60).then_some(handled) }
    })
    .await;
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
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
