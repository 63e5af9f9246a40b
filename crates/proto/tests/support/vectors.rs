//! The conformance vectors of `docs/protocol-vectors.json` (format in
//! `docs/PROTOCOL.md` §12), read into the reference codec's values and
//! written back. Shared by the codec's test (`crates/proto/tests/vectors.rs`)
//! and the broker's (`crates/cli/tests/conformance_e2e.rs`).
//!
//! Reading is strict: a missing field, a field of the wrong type or a field
//! the format does not know fails with the vector's name and the field's
//! path, so a mistyped vector cannot pass by being ignored.
#![allow(dead_code)] // each test uses a different part

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use courier_proto::{
    Credentials, DecodeError, Delivery, ErrorCode, ErrorFrame, Frame, Hello, Kind, Message, Nack,
    OpResult, SendEntry, SendOutcome, StartFrom, Subscribe, Version, Welcome,
};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// `docs/protocol-vectors.json`, parsed.
pub fn load() -> Value {
    let text = std::fs::read_to_string(vectors_path())
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", vectors_path().display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", vectors_path().display()))
}

/// The repository's root, from the crate that includes this file.
pub fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn vectors_path() -> PathBuf {
    repository_root().join("docs/protocol-vectors.json")
}

/// The list `section` of the file (`frames`, `malformed`, …).
pub fn section<'a>(vectors: &'a Value, section: &str) -> &'a [Value] {
    vectors[section]
        .as_array()
        .unwrap_or_else(|| panic!("the vectors have no list {section:?}"))
}

pub fn name_of(vector: &Value) -> &str {
    vector["name"].as_str().unwrap_or("(unnamed vector)")
}

pub fn hex_decode(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {text:?}"
    );
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("ASCII");
            u8::from_str_radix(pair, 16).unwrap_or_else(|_| panic!("{pair:?} is not hex"))
        })
        .collect()
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of a frame type in PROTOCOL.md §5 (`HELLO`, `SEND_RESULT` …).
pub fn type_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "HELLO",
        Frame::Welcome(_) => "WELCOME",
        Frame::Send(_) => "SEND",
        Frame::SendResult(_) => "SEND_RESULT",
        Frame::Subscribe(_) => "SUBSCRIBE",
        Frame::Unsubscribe { .. } => "UNSUBSCRIBE",
        Frame::Result(_) => "RESULT",
        Frame::Deliver(_) => "DELIVER",
        Frame::Ack(_) => "ACK",
        Frame::Nack(_) => "NACK",
        Frame::Flow { .. } => "FLOW",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::Error(_) => "ERROR",
        Frame::Drain => "DRAIN",
        Frame::Drained => "DRAINED",
    }
}

/// Every frame type, with who sends it (`direction` in the vectors).
pub const FRAME_TYPES: &[(&str, &str)] = &[
    ("HELLO", "client_to_broker"),
    ("WELCOME", "broker_to_client"),
    ("SEND", "client_to_broker"),
    ("SEND_RESULT", "broker_to_client"),
    ("SUBSCRIBE", "client_to_broker"),
    ("UNSUBSCRIBE", "client_to_broker"),
    ("RESULT", "broker_to_client"),
    ("DELIVER", "broker_to_client"),
    ("ACK", "client_to_broker"),
    ("NACK", "client_to_broker"),
    ("FLOW", "client_to_broker"),
    ("PING", "either"),
    ("PONG", "either"),
    ("ERROR", "broker_to_client"),
    ("DRAIN", "client_to_broker"),
    ("DRAINED", "broker_to_client"),
];

/// The wire flags of `message` (in a SEND entry marked `quiet` or not).
pub fn message_flags(message: &Message, quiet: bool) -> u8 {
    let bits = [
        (message.transient, 0x01),
        (message.is_final, 0x02),
        (message.response_to.is_some(), 0x04),
        (message.key.is_some(), 0x08),
        (message.expires_at.is_some(), 0x10),
        (message.deliver_at.is_some(), 0x20),
        (quiet, 0x40),
        (message.parent_id.is_some(), 0x80),
    ];
    bits.iter()
        .filter(|(set, _)| *set)
        .fold(0, |flags, (_, bit)| flags | bit)
}

/// A JSON object read field by field; [`Fields::done`] fails on any field
/// nobody asked for.
pub struct Fields<'a> {
    path: String,
    object: &'a Map<String, Value>,
    read: BTreeSet<&'a str>,
}

impl<'a> Fields<'a> {
    pub fn new(path: impl Into<String>, value: &'a Value) -> Fields<'a> {
        let path = path.into();
        let object = value
            .as_object()
            .unwrap_or_else(|| panic!("{path}: expected a JSON object, got {value}"));
        Fields {
            path,
            object,
            read: BTreeSet::new(),
        }
    }

    pub fn path(&self, field: &str) -> String {
        format!("{}.{field}", self.path)
    }

    pub fn optional(&mut self, field: &'a str) -> Option<&'a Value> {
        self.read.insert(field);
        let value = self.object.get(field)?;
        assert!(
            !value.is_null(),
            "{}: leave an absent field out rather than null",
            self.path(field)
        );
        Some(value)
    }

    pub fn get(&mut self, field: &'a str) -> &'a Value {
        let path = self.path(field);
        self.optional(field)
            .unwrap_or_else(|| panic!("{path}: missing"))
    }

    pub fn u64(&mut self, field: &'a str) -> u64 {
        let path = self.path(field);
        self.get(field)
            .as_u64()
            .unwrap_or_else(|| panic!("{path}: expected an unsigned integer"))
    }

    pub fn opt_u64(&mut self, field: &'a str) -> Option<u64> {
        let path = self.path(field);
        self.optional(field).map(|v| {
            v.as_u64()
                .unwrap_or_else(|| panic!("{path}: expected an unsigned integer"))
        })
    }

    pub fn u32(&mut self, field: &'a str) -> u32 {
        let path = self.path(field);
        u32::try_from(self.u64(field)).unwrap_or_else(|_| panic!("{path}: over u32"))
    }

    pub fn u16(&mut self, field: &'a str) -> u16 {
        let path = self.path(field);
        u16::try_from(self.u64(field)).unwrap_or_else(|_| panic!("{path}: over u16"))
    }

    pub fn u8(&mut self, field: &'a str) -> u8 {
        let path = self.path(field);
        u8::try_from(self.u64(field)).unwrap_or_else(|_| panic!("{path}: over u8"))
    }

    pub fn bool(&mut self, field: &'a str) -> bool {
        let path = self.path(field);
        self.get(field)
            .as_bool()
            .unwrap_or_else(|| panic!("{path}: expected true or false"))
    }

    pub fn str(&mut self, field: &'a str) -> &'a str {
        let path = self.path(field);
        self.get(field)
            .as_str()
            .unwrap_or_else(|| panic!("{path}: expected a string"))
    }

    pub fn opt_str(&mut self, field: &'a str) -> Option<&'a str> {
        let path = self.path(field);
        self.optional(field).map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{path}: expected a string"))
        })
    }

    pub fn uuid(&mut self, field: &'a str) -> Uuid {
        let path = self.path(field);
        parse_uuid(&path, self.str(field))
    }

    pub fn opt_uuid(&mut self, field: &'a str) -> Option<Uuid> {
        let path = self.path(field);
        self.opt_str(field).map(|text| parse_uuid(&path, text))
    }

    pub fn hex(&mut self, field: &'a str) -> Vec<u8> {
        hex_decode(self.str(field))
    }

    pub fn array(&mut self, field: &'a str) -> &'a [Value] {
        let path = self.path(field);
        self.get(field)
            .as_array()
            .unwrap_or_else(|| panic!("{path}: expected a list"))
    }

    /// Fails if the object has a field that was not read.
    pub fn done(self) {
        let unknown: Vec<&String> = self
            .object
            .keys()
            .filter(|k| !self.read.contains(k.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{}: unknown field(s) {unknown:?}",
            self.path
        );
    }
}

fn parse_uuid(path: &str, text: &str) -> Uuid {
    let id = Uuid::parse_str(text).unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"));
    assert_eq!(
        id.hyphenated().to_string(),
        text,
        "{path}: write UUIDs in lower-case hyphenated form"
    );
    id
}

/// The frame a vector's `frame` object describes (`path` names it in
/// failures).
pub fn frame_from_json(path: &str, value: &Value) -> Frame {
    let mut f = Fields::new(path, value);
    let frame = match f.str("type") {
        "HELLO" => {
            let credentials = match f.u8("credentials") {
                0 => Credentials::None,
                1 => Credentials::Token(f.str("token").to_string()),
                other => panic!("{path}: credentials {other} has no frame; see `malformed`"),
            };
            Frame::Hello(Hello {
                version: f.u16("version"),
                service: f.str("service").to_string(),
                instance: f.str("instance").to_string(),
                max_in_flight: f.u32("max_in_flight"),
                credentials,
            })
        }
        "WELCOME" => Frame::Welcome(Welcome {
            version: f.u16("version"),
            connection_id: f.u64("connection_id"),
            frame_bytes_max: f.u32("frame_bytes_max"),
            broker: f.str("broker").to_string(),
            service: f.opt_str("service").map(str::to_string),
        }),
        "SEND" => Frame::Send(entries(&mut f, |path, entry| {
            let mut e = Fields::new(path, entry);
            let quiet = e.bool("quiet");
            let message = message_from_json(&e.path("message"), e.get("message"), quiet);
            let entry = SendEntry {
                seq: e.u64("seq"),
                message: Arc::new(message),
                quiet,
            };
            e.done();
            entry
        })),
        "SEND_RESULT" => Frame::SendResult(entries(&mut f, |path, entry| {
            let mut e = Fields::new(path, entry);
            let outcome = SendOutcome {
                seq: e.u64("seq"),
                code: ErrorCode::from_u16(e.u16("code")),
                reason: e.str("reason").to_string(),
                log_seq: e.opt_u64("log_seq").unwrap_or(0),
            };
            e.done();
            outcome
        })),
        "SUBSCRIBE" => {
            let request = f.u64("request");
            let pattern = f.str("pattern").to_string();
            let ack_deadline_ms = f.u32("ack_deadline_ms");
            let max_deliveries = f.u32("max_deliveries");
            let time = f.u64("start_time");
            let start = match f.u8("start") {
                0 if time == 0 => StartFrom::New,
                1 if time == 0 => StartFrom::Beginning,
                2 => StartFrom::Time(time),
                other => panic!("{path}: start {other} with start_time {time} has no frame"),
            };
            Frame::Subscribe(Subscribe {
                request,
                pattern,
                ack_deadline_ms,
                max_deliveries,
                start,
            })
        }
        "UNSUBSCRIBE" => Frame::Unsubscribe {
            request: f.u64("request"),
            pattern: f.str("pattern").to_string(),
        },
        "RESULT" => Frame::Result(OpResult {
            request: f.u64("request"),
            code: ErrorCode::from_u16(f.u16("code")),
            reason: f.str("reason").to_string(),
        }),
        "DELIVER" => Frame::Deliver(entries(&mut f, |path, entry| {
            let mut e = Fields::new(path, entry);
            let delivery = Delivery {
                delivery: e.u64("delivery"),
                attempt: e.u32("attempt"),
                message: message_from_json(&e.path("message"), e.get("message"), false),
            };
            e.done();
            delivery
        })),
        "ACK" => Frame::Ack(entries(&mut f, |path, entry| {
            entry
                .as_u64()
                .unwrap_or_else(|| panic!("{path}: expected a delivery id"))
        })),
        "NACK" => Frame::Nack(entries(&mut f, |path, entry| {
            let mut e = Fields::new(path, entry);
            let nack = Nack {
                delivery: e.u64("delivery"),
                delay_ms: e.u32("delay_ms"),
            };
            e.done();
            nack
        })),
        "FLOW" => Frame::Flow {
            max_in_flight: f.u32("max_in_flight"),
        },
        "PING" => Frame::Ping(f.u64("nonce")),
        "PONG" => Frame::Pong(f.u64("nonce")),
        "ERROR" => Frame::Error(ErrorFrame {
            code: ErrorCode::from_u16(f.u16("code")),
            message: f.str("message").to_string(),
        }),
        "DRAIN" => Frame::Drain,
        "DRAINED" => Frame::Drained,
        other => panic!("{path}: unknown frame type {other:?}"),
    };
    f.done();
    frame
}

fn entries<'a, T>(f: &mut Fields<'a>, entry: impl Fn(&str, &'a Value) -> T) -> Vec<T> {
    let path = f.path("entries");
    f.array("entries")
        .iter()
        .enumerate()
        .map(|(i, e)| entry(&format!("{path}[{i}]"), e))
        .collect()
}

/// A vector's `message` object; its `flags` must be what the fields imply.
pub fn message_from_json(path: &str, value: &Value, quiet: bool) -> Message {
    let mut f = Fields::new(path, value);
    let kind_code = f.u8("kind");
    let kind = Kind::from_code(kind_code)
        .unwrap_or_else(|| panic!("{path}: kind {kind_code} has no frame; see `malformed`"));
    let version_path = f.path("version");
    let mut version = Fields::new(version_path, f.get("version"));
    let message = Message {
        kind,
        name: f.str("name").into(),
        version: Version::new(version.u16("major"), version.u16("minor")),
        id: f.uuid("id"),
        timestamp: f.u64("timestamp"),
        activity_id: f.uuid("activity_id"),
        parent_id: f.opt_uuid("parent_id"),
        response_to: f.opt_uuid("response_to"),
        sender: f.str("sender").into(),
        key: f.opt_str("key").map(|key| Bytes::from(hex_decode(key))),
        expires_at: f.opt_u64("expires_at"),
        deliver_at: f.opt_u64("deliver_at"),
        transient: f.bool("transient"),
        is_final: f.bool("final"),
        headers: f
            .array("headers")
            .iter()
            .enumerate()
            .map(|(i, pair)| {
                let pair = pair.as_array().filter(|p| p.len() == 2);
                let text = |v: &Value| v.as_str().map(str::to_string);
                match pair.map(|p| (text(&p[0]), text(&p[1]))) {
                    Some((Some(name), Some(value))) => (name, value),
                    _ => panic!("{path}.headers[{i}]: expected [name, value]"),
                }
            })
            .collect(),
        payload: Bytes::from(f.hex("payload")),
    };
    version.done();
    let flags = f.u8("flags");
    let implied = message_flags(&message, quiet);
    assert_eq!(
        flags, implied,
        "{path}.flags: the fields imply 0x{implied:02x}, the vector says 0x{flags:02x}"
    );
    f.done();
    message
}

/// A frame as a vector's `frame` object: the inverse of [`frame_from_json`].
pub fn frame_to_json(frame: &Frame) -> Value {
    let mut object = match frame {
        Frame::Hello(h) => {
            let mut v = json!({
                "version": h.version, "service": h.service, "instance": h.instance,
                "max_in_flight": h.max_in_flight,
            });
            match &h.credentials {
                Credentials::None => v["credentials"] = json!(0),
                Credentials::Token(token) => {
                    v["credentials"] = json!(1);
                    v["token"] = json!(token);
                }
            }
            v
        }
        Frame::Welcome(w) => {
            let mut v = json!({
                "version": w.version, "connection_id": w.connection_id,
                "frame_bytes_max": w.frame_bytes_max, "broker": w.broker,
            });
            if let Some(service) = &w.service {
                v["service"] = json!(service);
            }
            v
        }
        Frame::Send(entries) => json!({"entries": entries.iter().map(|e| json!({
            "seq": e.seq, "quiet": e.quiet, "message": message_to_json(&e.message, e.quiet),
        })).collect::<Vec<_>>()}),
        Frame::SendResult(entries) => json!({"entries": entries.iter().map(|e| {
            let mut v = json!({"seq": e.seq, "code": e.code.as_u16(), "reason": e.reason});
            if e.log_seq != 0 {
                v["log_seq"] = json!(e.log_seq);
            }
            v
        }).collect::<Vec<_>>()}),
        Frame::Subscribe(s) => {
            let (start, time) = match s.start {
                StartFrom::New => (0, 0),
                StartFrom::Beginning => (1, 0),
                StartFrom::Time(t) => (2, t),
            };
            json!({
                "request": s.request, "pattern": s.pattern, "ack_deadline_ms": s.ack_deadline_ms,
                "max_deliveries": s.max_deliveries, "start": start, "start_time": time,
            })
        }
        Frame::Unsubscribe { request, pattern } => json!({"request": request, "pattern": pattern}),
        Frame::Result(r) => json!({
            "request": r.request, "code": r.code.as_u16(), "reason": r.reason,
        }),
        Frame::Deliver(entries) => json!({"entries": entries.iter().map(|e| json!({
            "delivery": e.delivery, "attempt": e.attempt,
            "message": message_to_json(&e.message, false),
        })).collect::<Vec<_>>()}),
        Frame::Ack(ids) => json!({ "entries": ids }),
        Frame::Nack(entries) => json!({"entries": entries.iter().map(|e| json!({
            "delivery": e.delivery, "delay_ms": e.delay_ms,
        })).collect::<Vec<_>>()}),
        Frame::Flow { max_in_flight } => json!({ "max_in_flight": max_in_flight }),
        Frame::Ping(nonce) | Frame::Pong(nonce) => json!({ "nonce": nonce }),
        Frame::Error(e) => json!({"code": e.code.as_u16(), "message": e.message}),
        Frame::Drain | Frame::Drained => json!({}),
    };
    object["type"] = json!(type_name(frame));
    object
}

pub fn message_to_json(m: &Message, quiet: bool) -> Value {
    let mut v = json!({
        "kind": m.kind.code(),
        "flags": message_flags(m, quiet),
        "transient": m.transient,
        "final": m.is_final,
        "name": m.name.as_str(),
        "version": {"major": m.version.major, "minor": m.version.minor},
        "id": m.id.to_string(),
        "activity_id": m.activity_id.to_string(),
        "timestamp": m.timestamp,
        "sender": m.sender.as_str(),
        "headers": m.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "payload": hex_encode(&m.payload),
    });
    if let Some(r) = m.response_to {
        v["response_to"] = json!(r.to_string());
    }
    if let Some(key) = &m.key {
        v["key"] = json!(hex_encode(key));
    }
    if let Some(t) = m.expires_at {
        v["expires_at"] = json!(t);
    }
    if let Some(t) = m.deliver_at {
        v["deliver_at"] = json!(t);
    }
    if let Some(p) = m.parent_id {
        v["parent_id"] = json!(p.to_string());
    }
    v
}

/// What a broker's frame says, as the items of a vector's `expect` list:
/// one per frame, or one per entry of a batch frame (batch boundaries
/// carry no meaning), each with the frame's `type`.
pub fn answer_items(frame: &Frame) -> Vec<Value> {
    let whole = frame_to_json(frame);
    match whole.get("entries").and_then(Value::as_array) {
        Some(entries) if !matches!(frame, Frame::Ack(_)) => entries
            .iter()
            .map(|entry| {
                let mut item = entry.clone();
                item["type"] = whole["type"].clone();
                item
            })
            .collect(),
        _ => vec![whole],
    }
}

/// Whether `actual` has every field of `expected` with the same value
/// (objects compared this way field by field; a `null` field must be
/// absent; `code_name` is the name of `code` and is checked against the
/// table instead).
pub fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => want.iter().all(|(key, want)| {
            if key == "code_name" {
                let code = have.get("code").and_then(Value::as_u64).unwrap_or(u64::MAX);
                let name = u16::try_from(code).map(|c| ErrorCode::from_u16(c).as_str());
                return want.as_str() == name.ok();
            }
            match (want, have.get(key)) {
                (Value::Null, None) => true,
                (want, Some(have)) => matches(want, have),
                (_, None) => false,
            }
        }),
        _ => expected == actual,
    }
}

/// The decoder's error a `malformed` vector names (`error` and `details`).
pub fn decode_error_from_json(path: &str, name: &str, details: Option<&Value>) -> DecodeError {
    let empty = json!({});
    let mut d = Fields::new(format!("{path}.details"), details.unwrap_or(&empty));
    let error = match name {
        "FrameTooLarge" => DecodeError::FrameTooLarge {
            len: d.u64("len"),
            max: d.u32("max"),
        },
        "EmptyFrame" => DecodeError::EmptyFrame,
        "UnknownFrameType" => DecodeError::UnknownFrameType {
            frame_type: d.u8("frame_type"),
        },
        "UnexpectedEof" => DecodeError::UnexpectedEof {
            offset: d.u64("offset") as usize,
            need: d.u64("need") as usize,
            have: d.u64("have") as usize,
        },
        "TrailingBytes" => DecodeError::TrailingBytes {
            offset: d.u64("offset") as usize,
            extra: d.u64("extra") as usize,
        },
        "InvalidUtf8" => DecodeError::InvalidUtf8 {
            offset: d.u64("offset") as usize,
        },
        "UnknownKind" => DecodeError::UnknownKind {
            offset: d.u64("offset") as usize,
            code: d.u8("code"),
        },
        "UnknownFlags" => DecodeError::UnknownFlags {
            offset: d.u64("offset") as usize,
            flags: d.u8("flags"),
        },
        "UnknownStart" => DecodeError::UnknownStart {
            offset: d.u64("offset") as usize,
            code: d.u8("code"),
        },
        "StrayStartTime" => DecodeError::StrayStartTime { code: d.u8("code") },
        "UnknownCredentials" => DecodeError::UnknownCredentials {
            offset: d.u64("offset") as usize,
            code: d.u8("code"),
        },
        "BadMagic" => DecodeError::BadMagic,
        "EmptyBatch" => DecodeError::EmptyBatch,
        "TooManyEntries" => DecodeError::TooManyEntries {
            count: d.u32("count"),
            max: d.u64("max"),
        },
        "TooManyHeaders" => DecodeError::TooManyHeaders {
            count: d.u64("count") as usize,
        },
        other => panic!("{path}: unknown decoder error {other:?}"),
    };
    d.done();
    error
}

/// A decoder error as a `malformed` vector's `error` and `details`.
pub fn decode_error_to_json(error: &DecodeError) -> (&'static str, Value) {
    match error {
        DecodeError::FrameTooLarge { len, max } => {
            ("FrameTooLarge", json!({"len": len, "max": max}))
        }
        DecodeError::EmptyFrame => ("EmptyFrame", json!({})),
        DecodeError::UnknownFrameType { frame_type } => {
            ("UnknownFrameType", json!({ "frame_type": frame_type }))
        }
        DecodeError::UnexpectedEof { offset, need, have } => (
            "UnexpectedEof",
            json!({"offset": offset, "need": need, "have": have}),
        ),
        DecodeError::TrailingBytes { offset, extra } => {
            ("TrailingBytes", json!({"offset": offset, "extra": extra}))
        }
        DecodeError::InvalidUtf8 { offset } => ("InvalidUtf8", json!({ "offset": offset })),
        DecodeError::UnknownKind { offset, code } => {
            ("UnknownKind", json!({"offset": offset, "code": code}))
        }
        DecodeError::UnknownFlags { offset, flags } => {
            ("UnknownFlags", json!({"offset": offset, "flags": flags}))
        }
        DecodeError::UnknownStart { offset, code } => {
            ("UnknownStart", json!({"offset": offset, "code": code}))
        }
        DecodeError::StrayStartTime { code } => ("StrayStartTime", json!({ "code": code })),
        DecodeError::UnknownCredentials { offset, code } => (
            "UnknownCredentials",
            json!({"offset": offset, "code": code}),
        ),
        DecodeError::BadMagic => ("BadMagic", json!({})),
        DecodeError::EmptyBatch => ("EmptyBatch", json!({})),
        DecodeError::TooManyEntries { count, max } => {
            ("TooManyEntries", json!({"count": count, "max": max}))
        }
        DecodeError::TooManyHeaders { count } => ("TooManyHeaders", json!({ "count": count })),
    }
}
