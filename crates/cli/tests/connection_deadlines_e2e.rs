//! Every state a connection can be in has a deadline, and the broker caps
//! its connections below its file-descriptor limit: raw sockets against a
//! real `courier serve`, each deadline measured (the broker's close is seen
//! as EOF or a reset) against the option that set it.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{courier_bin, free_port, strip_ansi, tempdir, Broker};
use courier_client::proto::{decode_frame, ErrorCode, Frame, FrameWriter};

/// What a close may take beyond its deadline on a loaded test machine.
const SLACK: Duration = Duration::from_millis(1500);

fn hello(service: &str) -> Vec<u8> {
    common::hello_frame(service)
}

fn ping(nonce: u64) -> Vec<u8> {
    let mut w = FrameWriter::new();
    w.push(&Frame::Ping(nonce)).expect("encode");
    w.take().to_vec()
}

fn connect(broker: &Broker) -> TcpStream {
    let s = TcpStream::connect(&broker.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s
}

/// How a connection ended, seen from the client.
#[derive(Debug)]
struct Closed {
    /// Since the caller's `since`.
    after: Duration,
    /// The ERROR frame the broker sent before closing, if any.
    error: Option<(ErrorCode, String)>,
    /// Every other frame received meanwhile.
    frames: Vec<Frame>,
}

/// Reads until the broker closes the connection (EOF or reset), giving
/// up after `limit`; returns when that happened and what came before.
fn wait_closed(stream: &mut TcpStream, since: Instant, limit: Duration) -> Closed {
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let mut error = None;
    let mut frames = Vec::new();
    loop {
        let left = limit.saturating_sub(since.elapsed());
        assert!(
            !left.is_zero(),
            "the broker kept the connection open for more than {limit:?}"
        );
        stream.set_read_timeout(Some(left)).expect("timeout");
        let closed = match stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                true
            }
            // A signal (the test harness's threads get some) is not the
            // broker's answer: read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(e) => panic!("the broker kept the connection open for more than {limit:?}: {e}"),
        };
        while let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("broker frames decode") {
            match frame {
                Frame::Error(e) => error = Some((e.code, e.message)),
                other => frames.push(other),
            }
        }
        if closed {
            return Closed {
                after: since.elapsed(),
                error,
                frames,
            };
        }
    }
}

/// Sends HELLO and reads WELCOME.
fn handshake(stream: &mut TcpStream, service: &str) {
    stream.write_all(&hello(service)).expect("hello");
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    loop {
        if let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("decode") {
            assert!(matches!(frame, Frame::Welcome(_)), "{frame:?}");
            return;
        }
        let n = stream.read(&mut chunk).expect("WELCOME");
        assert!(n > 0, "closed before WELCOME");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A new connection is welcomed within a few seconds (places freed by
/// closed connections are given back as the broker sees them close).
/// Connects until one connection is welcomed; returns how many were
/// refused before it (the broker may not have seen freed places close yet).
fn welcomed_soon(broker: &Broker) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = 0;
    loop {
        let mut s = connect(broker);
        s.write_all(&hello("web")).expect("hello");
        let closed_or_welcomed = {
            let mut buf = BytesMut::new();
            let mut chunk = [0u8; 4096];
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let n = s.read(&mut chunk).unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            decode_frame(&mut buf, u32::MAX).expect("decode")
        };
        match closed_or_welcomed {
            Some(Frame::Welcome(_)) => return refused,
            other => assert!(
                Instant::now() < deadline,
                "a freed place is not given to a new connection: {other:?}"
            ),
        }
        refused += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(broker: &Broker) -> serde_json::Value {
    let out = broker.run(&["metrics"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    common::json_lines(&out).remove(0)
}

/// Partial HELLO, then the client shuts its write side: the HELLO can never
/// complete, so the broker closes at once (it used to keep such a
/// connection, and its descriptor, forever). A partial HELLO that merely
/// goes silent is closed at the handshake deadline with `handshake_timeout`.
#[test]
fn a_partial_hello_is_closed_by_the_handshake_deadline_half_closed_or_not() {
    let broker = Broker::start_with(&["--handshake-timeout", "2s"]);
    let partial = &hello("web")[..7];

    let mut half_closed = connect(&broker);
    half_closed.write_all(partial).expect("write");
    half_closed.shutdown(Shutdown::Write).expect("shutdown");
    let since = Instant::now();
    let mut silent = connect(&broker);
    silent.write_all(partial).expect("write");
    let silent_since = Instant::now();

    let closed = wait_closed(&mut half_closed, since, Duration::from_secs(2) + SLACK);
    assert!(closed.frames.is_empty(), "{closed:?}");

    let closed = wait_closed(&mut silent, silent_since, Duration::from_secs(2) + SLACK);
    assert!(
        closed.after >= Duration::from_millis(1900),
        "not before the deadline: {closed:?}"
    );
    let (code, message) = closed.error.expect("an ERROR before the close");
    assert_eq!(code, ErrorCode::HandshakeTimeout, "{message}");
    assert!(message.contains("2000 ms"), "{message}");
}

/// After the handshake: a frame begun and not finished is cut at the
/// frame deadline (ERROR `read_timeout`), whether the client then goes
/// silent or half-closes (then at once: it can never finish).
#[test]
fn a_partial_frame_after_hello_is_closed_by_the_frame_deadline() {
    let broker = Broker::start_with(&["--frame-timeout", "1s", "--keepalive-timeout", "30s"]);
    let partial_ping = &ping(7)[..6];

    let mut silent = connect(&broker);
    handshake(&mut silent, "web");
    silent.write_all(partial_ping).expect("write");
    let since = Instant::now();
    let mut half_closed = connect(&broker);
    handshake(&mut half_closed, "web");
    half_closed.write_all(partial_ping).expect("write");
    half_closed.shutdown(Shutdown::Write).expect("shutdown");
    let half_since = Instant::now();

    let closed = wait_closed(&mut half_closed, half_since, Duration::from_secs(1) + SLACK);
    assert!(closed.frames.is_empty(), "{closed:?}");

    let closed = wait_closed(&mut silent, since, Duration::from_secs(1) + SLACK);
    assert!(
        closed.after >= Duration::from_millis(900),
        "not before the deadline: {closed:?}"
    );
    let (code, message) = closed.error.expect("an ERROR before the close");
    assert_eq!(code.as_str(), "read_timeout", "{message}");
    assert!(
        message.contains("1000 ms") && message.contains("frame"),
        "{message}"
    );
    assert!(metrics(&broker)["frame_timeouts"].as_u64() >= Some(1));
}

/// A connection that sends nothing after its handshake is closed at the
/// keepalive deadline; one that sends a PING now and then stays, and its
/// PINGs are answered.
#[test]
fn an_idle_connection_is_closed_at_the_keepalive_deadline_and_a_pinging_one_stays() {
    let broker = Broker::start_with(&["--keepalive-timeout", "2s"]);
    let mut idle = connect(&broker);
    handshake(&mut idle, "web");
    let since = Instant::now();
    let mut pinging = connect(&broker);
    handshake(&mut pinging, "web");

    let pinger = std::thread::spawn(move || {
        let started = Instant::now();
        let mut nonce = 0;
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 64];
        pinging
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // Five deadlines long, a PING every third of one.
        while started.elapsed() < Duration::from_secs(10) {
            nonce += 1;
            pinging
                .write_all(&ping(nonce))
                .expect("the broker keeps it");
            loop {
                if let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("decode") {
                    assert_eq!(frame, Frame::Pong(nonce));
                    break;
                }
                let n = pinging.read(&mut chunk).expect("a PONG");
                assert!(n > 0, "closed although it pinged");
                buf.extend_from_slice(&chunk[..n]);
            }
            std::thread::sleep(Duration::from_millis(650));
        }
        nonce
    });

    let closed = wait_closed(&mut idle, since, Duration::from_secs(2) + SLACK);
    assert!(
        closed.after >= Duration::from_millis(1900),
        "not before the deadline: {closed:?}"
    );
    let (code, message) = closed.error.expect("an ERROR before the close");
    assert_eq!(code.as_str(), "read_timeout", "{message}");
    assert!(
        message.contains("2000 ms") && message.contains("PING"),
        "{message}"
    );
    let pings = pinger.join().expect("the pinging connection was never cut");
    assert!(pings >= 10, "{pings}");
    assert_eq!(metrics(&broker)["keepalive_timeouts"], 1);
}

/// The SDK pings an idle connection well within the broker's keepalive
/// deadline: an SDK subscriber that hears nothing for longer than the
/// deadline is still connected and gets the next event, while a raw
/// connection as idle is cut at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sdk_client_is_never_cut_by_the_keepalive_deadline() {
    const KEEPALIVE: Duration = Duration::from_secs(25);
    let broker = Broker::start_with(&["--keepalive-timeout", "25s"]);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    let subscriber = courier_client::Client::connect(courier_client::ClientOptions::new(
        broker.addr.clone(),
        "audit",
    ))
    .await
    .expect("connect");
    subscriber
        .on("audit.logged", move |msg| {
            let tx = tx.clone();
            async move {
                let _ = tx
                    .send(String::from_utf8_lossy(msg.payload()).into_owned())
                    .await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe");
    let mut raw = connect(&broker);
    let closed = tokio::task::block_in_place(|| {
        handshake(&mut raw, "web");
        wait_closed(&mut raw, Instant::now(), KEEPALIVE + SLACK)
    });
    assert!(
        closed.after >= KEEPALIVE - Duration::from_millis(100),
        "{closed:?}"
    );

    let publisher = courier_client::Client::connect(courier_client::ClientOptions::new(
        broker.addr.clone(),
        "web",
    ))
    .await
    .expect("connect");
    publisher
        .event("audit.logged")
        .payload("after the deadline")
        .send()
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the idle SDK subscriber still gets deliveries");
    assert_eq!(got.as_deref(), Some("after the deadline"));
    let m = tokio::task::block_in_place(|| metrics(&broker));
    assert_eq!(m["keepalive_timeouts"], 1, "only the raw connection: {m}");
}

/// At `--connections-max` the broker answers a new connection with ERROR
/// `too_many_connections` (naming the option) and closes it, instead of
/// running out of descriptors; a closed connection frees its place.
#[test]
fn connections_beyond_the_cap_are_refused_with_an_error_frame() {
    let broker = Broker::start_with(&["--connections-max", "8"]);
    let mut held: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = connect(&broker);
            handshake(&mut s, "web");
            s
        })
        .collect();
    let mut refused = connect(&broker);
    let closed = wait_closed(&mut refused, Instant::now(), Duration::from_secs(3));
    let (code, message) = closed.error.expect("an ERROR before the close");
    assert_eq!(code, ErrorCode::TooManyConnections, "{message}");
    assert!(message.contains("--connections-max"), "{message}");

    drop(held.pop());
    let _ = welcomed_soon(&broker);
    assert!(metrics(&broker)["connections_over_cap"].as_u64() >= Some(1));
}

/// A broker's stderr lines as they come.
#[derive(Clone, Default)]
struct StderrLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl StderrLog {
    fn collect(&self, from: impl Read) {
        for line in std::io::BufRead::lines(std::io::BufReader::new(from)) {
            let Ok(line) = line else { return };
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(strip_ansi(&line));
        }
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// Waits for a line containing `needle`; returns it.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `courier serve` under a file-descriptor limit, with stderr collected.
fn serve_with_fd_limit(limit: &str, extra: &str) -> (Broker, StderrLog) {
    let listen = format!("127.0.0.1:{}", free_port());
    let data_dir = tempdir::Dir::new("fd-limit");
    let script = format!(
        "ulimit {limit} && exec '{}' serve --listen {listen} --http off --data-dir '{}' {extra}",
        courier_bin(),
        data_dir.path().display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .env("COURIER_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier serve");
    let log = StderrLog::default();
    let lines = log.clone();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || lines.collect(stderr));
    let stdout = child.stdout.take().expect("stdout");
    let mut out = std::io::BufReader::new(stdout);
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut out, &mut ready).expect("ready line");
    assert!(
        ready.contains(&listen),
        "ready line {ready:?}; stderr:\n{}",
        log.text()
    );
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (
        Broker {
            child,
            addr: listen,
            data_dir,
            http: None,
        },
        log,
    )
}

/// The report's attack: with 1,024 descriptors, 1,100 connections that
/// send part of a HELLO and shut their write side. Each is closed (none
/// outlives the handshake deadline), and a new client is welcomed at once.
#[test]
fn half_closed_handshakes_cannot_exhaust_the_descriptors() {
    let (broker, log) = serve_with_fd_limit("-n 1024", "");
    log.wait_for("connections are capped at", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no connection cap line:\n{}", log.text()));
    let partial = &hello("web")[..7];
    let since = Instant::now();
    let mut attackers = Vec::new();
    for _ in 0..1100 {
        let mut s = connect(&broker);
        let _ = s.write_all(partial);
        let _ = s.shutdown(Shutdown::Write);
        attackers.push(s);
    }
    for s in &mut attackers {
        wait_closed(s, since, Duration::from_secs(10) + SLACK);
    }
    let mut client = connect(&broker);
    handshake(&mut client, "web");
}

/// `courier serve` raises its soft descriptor limit to the hard one and
/// sizes the default connection cap below it; connections past the cap
/// get `too_many_connections` while the broker keeps serving.
#[test]
fn the_default_cap_follows_the_raised_descriptor_limit() {
    let hard = {
        let out = Command::new("sh")
            .args(["-c", "ulimit -H -n"])
            .output()
            .expect("ulimit");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (broker, log) = serve_with_fd_limit("-S -n 256", "");
    let line = log
        .wait_for("connections are capped at", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no connection cap line:\n{}", log.text()));
    if hard != "unlimited" {
        assert!(
            line.contains(&format!("open files limit {hard}")),
            "the soft limit was raised to the hard one ({hard}): {line}"
        );
    }

    let (broker_low, log_low) = serve_with_fd_limit("-n 256", "--handshake-timeout 60s");
    drop(broker);
    let line = log_low
        .wait_for("connections are capped at", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no connection cap line:\n{}", log_low.text()));
    assert!(line.contains("open files limit 256"), "{line}");
    // The cap: 256 less the 128 kept for the broker's own files.
    const CAP: u64 = 128;
    let silent: Vec<TcpStream> = (0..CAP)
        .map(|_| {
            let mut s = connect(&broker_low);
            s.write_all(&hello("web")[..7]).expect("write");
            s
        })
        .collect();
    // Every one past the cap is told so, while the broker holds its files.
    // (The broker takes places in accept order, so the silent ones hold
    // them all by the time the next is accepted.)
    for _ in 0..172 {
        let mut s = connect(&broker_low);
        s.write_all(&hello("web")[..7]).expect("write");
        let closed = wait_closed(&mut s, Instant::now(), Duration::from_secs(5));
        let (code, message) = closed.error.expect("an ERROR before the close");
        assert_eq!(code, ErrorCode::TooManyConnections, "{message}");
    }
    drop(silent);
    let refused_while_closing = welcomed_soon(&broker_low);
    assert_eq!(
        metrics(&broker_low)["connections_over_cap"],
        172 + refused_while_closing
    );
}
