//! Reply streams against a real broker: a long stream reaches a slow
//! requester whole and in order, with the broker's and the requester's
//! memory bounded by flow control (PROTOCOL §8.8).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Broker;
use courier_client::{Client, ClientOptions};

const REPLIES: u64 = 100_000;
/// Each reply's payload: its index, padded, so that holding the stream
/// anywhere in full would show (~100 MB in all).
const PAYLOAD_BYTES: usize = 1_000;
const WINDOW: u32 = 32;

fn payload(index: u64) -> Vec<u8> {
    let mut p = format!("{index:08}").into_bytes();
    p.resize(PAYLOAD_BYTES, b'.');
    p
}

fn index_of(payload: &[u8]) -> u64 {
    std::str::from_utf8(&payload[..8])
        .ok()
        .and_then(|i| i.parse().ok())
        .expect("the payload starts with the reply's index")
}

async fn client(broker: &Broker, service: &str) -> Client {
    let mut opts = ClientOptions::new(broker.addr.clone(), service);
    opts.reply_window = WINDOW;
    opts.request_timeout = Duration::from_secs(600);
    Client::connect(opts).await.expect("connect")
}

/// Samples the broker's resident memory until stopped; returns the peak.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(common::rss_bytes(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak.max(common::rss_bytes(pid))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_replies_reach_a_slow_requester_whole_and_in_order() {
    let broker = Broker::start();
    let responder = client(&broker, "file").await;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    responder
        .on("file.copy", move |msg| {
            let counter = counter.clone();
            async move {
                for i in 0..REPLIES {
                    // Each send waits for the broker's answer, which a held
                    // reply gets only when the requester makes room.
                    msg.reply_builder("file.copy.progress", i + 1 == REPLIES)
                        .payload(payload(i))
                        .send()
                        .await?;
                    counter.store(i + 1, Ordering::Relaxed);
                }
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe file.copy");
    // Other work on the responder's connection while it streams.
    responder
        .on("file.stat", |msg| async move {
            msg.reply("file.stat.result", &"ok").await
        })
        .await
        .expect("subscribe file.stat");
    let requester = client(&broker, "web").await;
    let echo = client(&broker, "echo").await;
    echo.on("echo.ping", |msg| async move {
        msg.reply("echo.pong", &"pong").await
    })
    .await
    .expect("subscribe echo.ping");
    // The handshakes and subscriptions are done: this is the idle broker.
    let pid = broker.child.id();
    let baseline = common::rss_bytes(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let peak_rss = watch_rss(pid, stop.clone());

    let started = Instant::now();
    let mut stream = requester
        .request_stream("file.copy", &())
        .await
        .expect("the command is accepted");
    let mut next = 0u64;
    let mut most_buffered = 0;
    while let Some(reply) = stream.next_reply().await {
        let reply = reply.unwrap_or_else(|e| panic!("reply {next} of {REPLIES}: {e}"));
        assert_eq!(
            index_of(reply.payload()),
            next,
            "replies arrive in order, none missing"
        );
        assert_eq!(reply.is_final(), next + 1 == REPLIES);
        most_buffered = most_buffered.max(stream.buffered());
        assert!(
            stream.buffered() <= WINDOW as usize,
            "{} replies buffered, window {WINDOW}",
            stream.buffered()
        );
        next += 1;
        if next <= 300 {
            // A slow reader at first: the responder must wait for it.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        if next == 300 {
            let ahead = sent.load(Ordering::Relaxed);
            assert!(
                ahead <= next + 2 * u64::from(WINDOW) + 1,
                "the responder ran {ahead} replies ahead of a requester at {next}: it is paced by the window"
            );
            // Neither connection is blocked behind the slow stream.
            let quick = Duration::from_secs(5);
            let pong = tokio::time::timeout(quick, requester.request("echo.ping", &()))
                .await
                .expect("the requester's connection still serves other requests")
                .expect("pong");
            assert_eq!(pong.name(), "echo.pong");
            let stat = tokio::time::timeout(quick, echo.request("file.stat", &()))
                .await
                .expect("the responder still handles other commands")
                .expect("stat");
            assert_eq!(stat.name(), "file.stat.result");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let peak = peak_rss.join().expect("RSS sampler");
    assert_eq!(next, REPLIES, "every reply arrived");
    assert_eq!(sent.load(Ordering::Relaxed), REPLIES);
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "{REPLIES} replies of {PAYLOAD_BYTES} B in {:?}; most buffered {most_buffered}; broker RSS {} MiB -> peak {} MiB",
        started.elapsed(),
        baseline >> 20,
        peak >> 20
    );
    // What the broker may hold for the stream: the window delivered and
    // as many held (~64 KiB here), plus what the sockets and allocator keep.
    // Holding the stream in full would be ~100 MB.
    let bound = 24 << 20;
    assert!(
        growth < bound,
        "broker RSS grew by {} MiB (bound {} MiB)",
        growth >> 20,
        bound >> 20
    );
    let metrics = common::json_lines(&broker.run(&["metrics"]));
    assert!(
        metrics[0]["replies_held"].as_u64().expect("counter") > 0,
        "replies waited for credit: {metrics:?}"
    );
    for client in [&requester, &responder, &echo] {
        client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_that_gives_up_stops_the_stream_and_the_responder_hears_it() {
    let broker = Broker::start();
    let responder = client(&broker, "file").await;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1);
    responder
        .on("file.copy", move |msg| {
            let done_tx = done_tx.clone();
            async move {
                let mut answers = Vec::new();
                for i in 0..1_000u64 {
                    let sent = msg
                        .reply_builder("file.copy.progress", i == 999)
                        .payload(payload(i))
                        .send()
                        .await;
                    answers.push(sent.is_ok());
                }
                let _ = done_tx.send(answers).await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe");
    let requester = client(&broker, "web").await;
    let mut stream = requester
        .request_stream("file.copy", &())
        .await
        .expect("accepted");
    for i in 0..10 {
        let reply = stream.next_reply().await.expect("a reply").expect("ok");
        assert_eq!(index_of(reply.payload()), i);
    }
    drop(stream);
    let answers = tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
        .await
        .expect("the responder was released, not left waiting for credit")
        .expect("answers");
    assert!(
        answers.iter().all(|ok| *ok),
        "replies after the requester stopped are accepted and discarded, not failed"
    );
    let metrics = common::json_lines(&broker.run(&["metrics"]));
    assert!(
        metrics[0]["replies_discarded"].as_u64().expect("counter") > 0,
        "{metrics:?}"
    );
    requester.shutdown().await;
    responder.shutdown().await;
}

#[test]
fn courier_request_prints_a_long_stream_whole() {
    const STREAM: usize = 3_000;
    let broker = Broker::start();
    let mut responder = broker.spawn(&[
        "reply",
        "file.copy",
        "--outcome",
        "file.copy.progress",
        "--data",
        "chunk",
        "--stream",
        &STREAM.to_string(),
        "--service",
        "file",
    ]);
    responder.wait_stderr("replying to file.copy", Duration::from_secs(10));
    let out = broker.run(&["request", "file.copy", "--timeout", "2m"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let lines = common::json_lines(&out);
    assert_eq!(lines.len(), STREAM, "every reply printed");
    assert!(lines.iter().all(|l| l["payload"] == "chunk"));
    assert_eq!(
        lines.iter().filter(|l| l["final"] == true).count(),
        1,
        "{:?}",
        lines.last()
    );
    responder.kill9();
}
