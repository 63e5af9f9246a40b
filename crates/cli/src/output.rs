//! JSON lines with the envelope field names of DESIGN §2.

use std::io::Write;

use bytes::Bytes;
use courier_client::proto::{Kind, Message};
use courier_client::MessageBuilder;
use serde_json::{json, Map, Value};

/// Prints one JSON object per line and flushes, so pipes see it at once.
pub fn line(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// A payload as JSON when it is JSON, else as text.
fn payload_value(payload: &Bytes) -> Value {
    if payload.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
}

/// The envelope as a JSON object; `attempt` on deliveries, `final` on replies.
pub fn envelope(m: &Message, attempt: Option<u32>) -> Value {
    let mut o = Map::new();
    o.insert("name".into(), json!(m.name.as_str()));
    o.insert("kind".into(), json!(m.kind.as_str()));
    o.insert("version".into(), json!(m.version.to_string()));
    o.insert("id".into(), json!(m.id.to_string()));
    o.insert("timestamp".into(), json!(m.timestamp));
    o.insert("activity_id".into(), json!(m.activity_id.to_string()));
    o.insert(
        "parent_id".into(),
        json!(m.parent_id.map(|p| p.to_string())),
    );
    o.insert(
        "response_to".into(),
        json!(m.response_to.map(|r| r.to_string())),
    );
    o.insert("sender".into(), json!(m.sender.as_str()));
    o.insert(
        "key".into(),
        json!(m
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned())),
    );
    if let Some(t) = m.expires_at {
        o.insert("expires_at".into(), json!(t));
    }
    if let Some(t) = m.deliver_at {
        o.insert("deliver_at".into(), json!(t));
    }
    let headers: Map<String, Value> = m
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    o.insert("headers".into(), Value::Object(headers));
    o.insert("payload".into(), payload_value(&m.payload));
    if m.kind == Kind::Reply {
        o.insert("final".into(), json!(m.is_final));
    }
    if let Some(a) = attempt {
        o.insert("attempt".into(), json!(a));
    }
    Value::Object(o)
}

/// Sets `data` as the payload, marked as JSON when it parses as JSON.
pub fn with_payload_bytes(builder: MessageBuilder, data: Bytes) -> MessageBuilder {
    let is_json =
        !data.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_ok();
    let builder = builder.payload(data);
    if is_json {
        builder.header("content-type", "application/json")
    } else {
        builder
    }
}
