//! Raw bytes against a real broker: bad input gets an ERROR frame, closes
//! only its own connection, and never disturbs anyone else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use common::{stderr, Broker};
use courier_client::proto::{
    decode_frame, Credentials, ErrorCode, Frame, FrameWriter, Hello, PROTOCOL_VERSION,
};

fn raw(broker: &Broker) -> TcpStream {
    let s = TcpStream::connect(&broker.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

fn hello(service: &str) -> Vec<u8> {
    let mut w = FrameWriter::new();
    w.push(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        service: service.into(),
        instance: String::new(),
        max_in_flight: 0,
        credentials: Credentials::None,
    }))
    .expect("encode");
    w.take().to_vec()
}

/// Reads frames until an ERROR arrives and the broker closes the stream.
fn expect_error_then_close(stream: &mut TcpStream) -> (ErrorCode, String) {
    let mut buf = BytesMut::new();
    let mut error = None;
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("broker frames decode") {
            if let Frame::Error(e) = frame {
                error = Some((e.code, e.message));
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("broker did not close the connection: {e}"),
        }
    }
    error.expect("an ERROR frame before close")
}

fn broker_still_serves(broker: &Broker) {
    let out = broker.run(&["publish", "health.check"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn garbage_before_hello_is_refused() {
    let broker = Broker::start();
    let mut s = raw(&broker);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let (code, message) = expect_error_then_close(&mut s);
    // "GET " read as a length prefix is far over the limit.
    assert_eq!(code, ErrorCode::FrameTooLarge, "{message}");
    broker_still_serves(&broker);
}

#[test]
fn hostile_length_prefixes_are_refused_without_allocating() {
    let broker = Broker::start();
    for len in [u32::MAX, (1u32 << 31) - 1] {
        let mut s = raw(&broker);
        s.write_all(&hello("evil")).expect("hello");
        s.write_all(&len.to_be_bytes()).expect("write");
        let (code, message) = expect_error_then_close(&mut s);
        assert_eq!(code, ErrorCode::FrameTooLarge);
        assert!(message.contains(&len.to_string()), "{message}");
    }
    broker_still_serves(&broker);
}

#[test]
fn malformed_frame_after_hello_closes_only_that_connection() {
    let broker = Broker::start();
    let listener = broker.spawn(&["subscribe", "a.b", "--service", "good"]);
    std::thread::sleep(Duration::from_millis(300));
    let mut s = raw(&broker);
    s.write_all(&hello("evil")).expect("hello");
    // A SEND frame claiming one entry but truncated inside the message.
    s.write_all(&[0, 0, 0, 9, 0x03, 0, 0, 0, 1, 0, 0, 0, 7])
        .expect("write");
    let (code, message) = expect_error_then_close(&mut s);
    assert_eq!(code, ErrorCode::MalformedFrame, "{message}");
    assert!(
        message.contains("batch claims 1 entries"),
        "the error says what is wrong: {message}"
    );
    let out = broker.run(&["publish", "a.b", "--data", "still here"]);
    assert!(out.status.success());
    assert_eq!(
        listener.json_line(Duration::from_secs(5))["payload"],
        "still here"
    );
}

#[test]
fn frames_before_the_handshake_and_wrong_versions_are_refused() {
    let broker = Broker::start();
    let mut s = raw(&broker);
    let mut w = FrameWriter::new();
    w.push(&Frame::Ping(1)).expect("encode");
    s.write_all(&w.take()).expect("write");
    assert_eq!(
        expect_error_then_close(&mut s).0,
        ErrorCode::HandshakeRequired
    );

    let mut s = raw(&broker);
    let mut w = FrameWriter::new();
    w.push(&Frame::Hello(Hello {
        version: 99,
        service: "x".into(),
        instance: String::new(),
        max_in_flight: 0,
        credentials: Credentials::None,
    }))
    .expect("encode");
    s.write_all(&w.take()).expect("write");
    assert_eq!(
        expect_error_then_close(&mut s).0,
        ErrorCode::UnsupportedVersion
    );

    let mut s = raw(&broker);
    s.write_all(&hello("Not Valid")).expect("write");
    assert_eq!(expect_error_then_close(&mut s).0, ErrorCode::InvalidName);
    broker_still_serves(&broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_half_open_connections_do_not_stop_anyone_else() {
    let broker = Broker::start();
    let listener = broker.spawn(&["subscribe", "still.here", "--service", "good"]);
    let publisher = courier_client::Client::connect(courier_client::ClientOptions::new(
        broker.addr.clone(),
        "web",
    ))
    .await
    .expect("connect before the flood");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Connections that never finish (or even start) their handshake, some
    // with a partial frame: more than the broker's cap on handshakes. New
    // connections may be turned away while the cap is reached; connected
    // ones must not notice.
    let mut idle = Vec::new();
    for i in 0..3000 {
        match TcpStream::connect(&broker.addr) {
            Ok(mut s) => {
                if i % 2 == 0 {
                    let _ = s.write_all(&[0, 0, 0, 40, 0x01, b'C']);
                }
                idle.push(s);
            }
            // The OS backlog may refuse some at this rate: that is fine too.
            Err(_) => continue,
        }
    }
    let started = std::time::Instant::now();
    publisher
        .publish("still.here", &"served")
        .await
        .expect("a connected client keeps being served");
    assert_eq!(
        listener.json_line(Duration::from_secs(10))["payload"],
        "served"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    drop(idle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| broker_still_serves(&broker));
}
