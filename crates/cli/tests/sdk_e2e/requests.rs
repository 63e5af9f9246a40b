//! Requests: transient ones, large ones, rate limits, timeouts, reply streams.

use super::*;

/// Transient commands go QUIET: the broker answers only a refusal, which
/// must still end the request at once, and every reply must reach the
/// request it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_requests_get_their_own_replies_and_their_refusals() {
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
    let _broker = broker.crash_and_restart().await;
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
    let broker = Bus::start_with(&["--send-rate", "5"]).await;
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
    let broker = Bus::start().await;
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
    let broker = Bus::start().await;
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
