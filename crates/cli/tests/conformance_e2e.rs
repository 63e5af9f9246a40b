//! The broker against the conformance vectors: every case of the `broker`
//! list of `docs/protocol-vectors.json` (format: `docs/PROTOCOL.md` §12) is
//! played against a fresh `courier serve`, byte for byte, and the broker's
//! answers must be the ones the case expects. The codec's side is
//! `crates/proto/tests/vectors.rs`.

mod common;
#[path = "../../proto/tests/support/vectors.rs"]
mod vectors;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::Broker;
use courier_client::proto::{decode_frame_as, Frame, FrameWriter, PROTOCOL_VERSION};
use serde_json::Value;
use vectors::{answer_items, frame_from_json, hex_decode, matches, name_of, section};

/// How long one connection may take to give its answers.
const ANSWERS_TIMEOUT: Duration = Duration::from_secs(10);

/// The bytes of one `send` item: a frame encoded alone, or raw hex.
fn bytes_of(path: &str, item: &Value) -> Vec<u8> {
    match (item.get("frame"), item.get("hex").and_then(Value::as_str)) {
        (Some(frame), None) => {
            // A writer of its own per item: one next to another of the same
            // batch type would be merged into one frame.
            let mut writer = FrameWriter::new();
            writer
                .push(&frame_from_json(path, frame))
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            writer.take().to_vec()
        }
        (None, Some(hex)) => hex_decode(hex),
        _ => panic!("{path}: give either frame or hex"),
    }
}

/// What the broker answered on `stream`: its frames as answer items, and
/// whether it closed the connection. Reads until it closes, or, when
/// `enough` items came, stops there (the connection stays open).
fn answers(stream: &mut TcpStream, enough: Option<usize>) -> (Vec<Value>, bool) {
    let deadline = Instant::now() + ANSWERS_TIMEOUT;
    let mut items = Vec::new();
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 64 * 1024];
    // Frames after WELCOME are read at the version it settled.
    let mut version = PROTOCOL_VERSION;
    loop {
        while let Some(frame) =
            decode_frame_as(&mut buf, u32::MAX, version).expect("the broker's frames decode")
        {
            if let Frame::Welcome(w) = &frame {
                version = w.version;
            }
            items.extend(answer_items(&frame));
        }
        if enough.is_some_and(|n| items.len() >= n) {
            return (items, false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (items, false);
        }
        stream.set_read_timeout(Some(left)).expect("set timeout");
        match stream.read(&mut chunk) {
            Ok(0) => return (items, true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A reset after the broker's ERROR and close counts as closed.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (items, true),
            Err(_) => return (items, false),
        }
    }
}

/// Whether every expected item matches an answer: in order, or, with
/// `any_order`, each a different one.
fn all_match(expected: &[Value], got: &[Value], any_order: bool) -> bool {
    if expected.len() != got.len() {
        return false;
    }
    if !any_order {
        return expected.iter().zip(got).all(|(e, g)| matches(e, g));
    }
    let mut unused: Vec<&Value> = got.iter().collect();
    expected.iter().all(|e| {
        let Some(i) = unused.iter().position(|g| matches(e, g)) else {
            return false;
        };
        unused.remove(i);
        true
    })
}

/// Plays one case against a fresh broker; `Err` says how it went wrong.
fn play(case: &Value, manifests: &serde_json::Map<String, Value>) -> Result<(), String> {
    let name = name_of(case);
    let dir = common::tempdir::Dir::new("conformance");
    let mut flags: Vec<String> = case
        .get("serve")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if let Some(manifest) = case.get("manifest").and_then(Value::as_str) {
        let text = manifests[manifest].as_str().expect("manifest text");
        let path = dir.path().join("courier.toml");
        std::fs::write(&path, text).expect("write the manifest");
        flags.push("--manifest".into());
        flags.push(path.to_str().expect("UTF-8 path").into());
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let broker = Broker::start_with(&flags);
    let connections = case["connections"].as_array().expect("connections");
    for (i, connection) in connections.iter().enumerate() {
        let path = format!("broker[{name:?}].connections[{i}]");
        let mut stream = TcpStream::connect(&broker.addr).expect("connect");
        let mut bytes = Vec::new();
        for (j, item) in connection["send"]
            .as_array()
            .expect("send")
            .iter()
            .enumerate()
        {
            bytes.extend(bytes_of(&format!("{path}.send[{j}]"), item));
        }
        // The broker may close before taking everything (an oversized
        // length is refused from its 4 bytes): what it answered is checked.
        let _ = stream.write_all(&bytes);
        let expected = connection["expect"].as_array().expect("expect");
        let closes = connection["then"] == "closed";
        let (got, closed) = answers(&mut stream, (!closes).then_some(expected.len()));
        let any_order = connection["any_order"] == Value::Bool(true);
        if !all_match(expected, &got, any_order) || closed != closes {
            return Err(format!(
                "connection {i}: expected {}{}\n  got {}{}",
                Value::Array(expected.clone()),
                if closes { ", then close" } else { "" },
                Value::Array(got),
                if closed { ", then close" } else { "" },
            ));
        }
        if !closed {
            close_and_wait(&mut stream)?;
        }
    }
    Ok(())
}

/// Closes a connection the case left open and waits for the broker to
/// close its side: it forgets a connection (taking back what it held)
/// before closing it, so the next connection cannot race this one's end.
fn close_and_wait(stream: &mut TcpStream) -> Result<(), String> {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + ANSWERS_TIMEOUT;
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the broker did not close a connection the client closed".into());
        }
        stream.set_read_timeout(Some(left)).expect("set timeout");
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("reading until the broker closed: {e}")),
        }
    }
}

#[test]
fn the_broker_answers_every_case_of_the_conformance_vectors() {
    let all = vectors::load();
    let manifests = all["manifests"].as_object().expect("manifests");
    let cases = section(&all, "broker");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            play(case, manifests)
                .err()
                .map(|why| format!("{}: {why}", name_of(case)))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} broker cases fail:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
