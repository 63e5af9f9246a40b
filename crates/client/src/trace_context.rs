//! W3C Trace Context (`traceparent`) for messages: a message sent while
//! handling another carries a child of the handled message's trace, so
//! tracing systems see one trace per activity across services.
//!
//! Without a tracing system in the picture (the `otel` feature off, or no
//! span current) nothing is recorded anywhere: the header alone carries
//! the trace from hop to hop. A message's own span id is taken from its
//! id (the random half of its UUID v7), so no random draw is made per
//! message, and a span id found in a tracing system names its message.
//! A message that starts an activity carries no header: its trace id is
//! its activity id, which every message of the activity carries anyway —
//! so the messages of publishers that never handle anything are not made
//! 70 bytes longer for a header that says nothing new.

use courier_proto::Message;
use uuid::Uuid;

/// The header's name (lower case, as W3C Trace Context writes it).
pub const TRACEPARENT: &str = "traceparent";

/// Bit 0 of the header's flags: the trace is sampled (recorded).
const SAMPLED: u8 = 0x01;

/// The trace a message belongs to and the span that sent it: the fields
/// of a `traceparent` header (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The sending span ("parent-id" in the header).
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Reads a `traceparent` value. Version 00 exactly; a higher version
    /// is read by its version-00 prefix, as the specification asks; `ff`,
    /// all-zero ids and malformed text are `None`.
    ///
    /// ```
    /// use courier_client::TraceParent;
    /// let t = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    /// assert_eq!(t.to_header(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    /// assert!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    /// ```
    pub fn parse(text: &str) -> Option<TraceParent> {
        let text = text.trim();
        let bytes = text.as_bytes();
        if bytes.len() < 55 {
            return None;
        }
        let version = hex_byte(&bytes[0..2])?;
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if version != 0 && bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&bytes[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&bytes[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&bytes[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The header's value: `00-<trace id>-<span id>-<flags>`, lower-case hex.
    pub fn to_header(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        fn push(out: &mut String, byte: u8) {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        self.trace_id.iter().for_each(|b| push(&mut out, *b));
        out.push('-');
        self.span_id.iter().for_each(|b| push(&mut out, *b));
        out.push('-');
        push(&mut out, self.flags);
        out
    }

    /// The trace of `message`: its `traceparent` if it carries a valid
    /// one, else the trace its activity started (trace id = activity id,
    /// span id from the message's id, sampled).
    pub fn of(message: &Message) -> TraceParent {
        message
            .header(TRACEPARENT)
            .and_then(TraceParent::parse)
            .unwrap_or_else(|| TraceParent {
                trace_id: nonzero_trace(message.activity_id),
                span_id: span_id_of(message.id),
                flags: SAMPLED,
            })
    }

    /// The context a message with id `message_id` carries when this span
    /// sends it: same trace and flags, the message's own span id.
    pub fn child(&self, message_id: Uuid) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            span_id: span_id_of(message_id),
            flags: self.flags,
        }
    }
}

/// A span id from a message id: its last eight bytes, the random half of
/// a UUID v7 (never all zero but by a 2^-62 chance, then made nonzero).
fn span_id_of(id: Uuid) -> [u8; 8] {
    let mut span = [0u8; 8];
    span.copy_from_slice(&id.as_bytes()[8..]);
    if span == [0; 8] {
        span[7] = 1;
    }
    span
}

fn nonzero_trace(activity: Uuid) -> [u8; 16] {
    let mut trace = *activity.as_bytes();
    if trace == [0; 16] {
        trace[15] = 1;
    }
    trace
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

/// The `traceparent` of `message` if the SDK derived it from the message's
/// id `id` (its span id is that id's): one a sender set keeps its own.
fn derived_from(message: &Message, id: Uuid) -> Option<TraceParent> {
    message
        .header(TRACEPARENT)
        .and_then(TraceParent::parse)
        .filter(|context| context.span_id == span_id_of(id))
}

/// `message` was given the id it now has in place of `old_id`: a
/// `traceparent` derived from the old id names the new one.
pub(crate) fn follow_new_id(message: &mut Message, old_id: Uuid) {
    if let Some(context) = derived_from(message, old_id) {
        set_traceparent(message, &context.child(message.id));
    }
}

/// `message` no longer follows from the message being handled: the
/// `traceparent` derived for it goes.
pub(crate) fn drop_derived(message: &mut Message) {
    if derived_from(message, message.id).is_some() {
        message.headers.retain(|(k, _)| k != TRACEPARENT);
    }
}

/// Sets `message`'s `traceparent` (replacing one it has) to `context`.
pub(crate) fn set_traceparent(message: &mut Message, context: &TraceParent) {
    message.headers.retain(|(k, _)| k != TRACEPARENT);
    message
        .headers
        .push((TRACEPARENT.to_string(), context.to_header()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Kind;

    #[test]
    fn parses_and_writes_the_w3c_examples() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(text).expect("valid");
        assert_eq!(t.flags, 1);
        assert_eq!(t.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(t.to_header(), text);
        // A future version is read by its version-00 fields.
        assert!(TraceParent::parse(&format!("01{}-more", &text[2..])).is_some());
        for bad in [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_takes_the_message_s_span() {
        let mut handled = Message::new(Kind::Command, "a.b", "");
        let root = TraceParent::of(&handled);
        assert_eq!(
            root.trace_id,
            *handled.activity_id.as_bytes(),
            "without a header, the activity is the trace"
        );
        let sent = Message::new(Kind::Event, "a.c", "");
        let child = root.child(sent.id);
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.span_id, sent.id.as_bytes()[8..]);
        assert_ne!(child.span_id, root.span_id);

        set_traceparent(
            &mut handled,
            &TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid"),
        );
        let carried = TraceParent::of(&handled);
        assert_eq!(
            carried.to_header()[3..35],
            *"4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(carried.child(sent.id).flags, 0, "flags carry over");
    }
}
