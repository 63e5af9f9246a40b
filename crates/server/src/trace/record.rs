//! Trace records as bytes: the same encoding in memory (an activity's
//! records, end to end) and on disk (one log record each), specified in
//! `docs/STORAGE.md` §13. Integers are big-endian; strings are `str8`
//! (a length byte, then UTF-8), cut at a character boundary when longer.

use bytes::{Buf, BufMut};
use courier_broker::{Outcome, TraceRecord};
use courier_proto::{Kind, Message, Version};
use thiserror::Error;
use uuid::Uuid;

/// The most payload bytes one message keeps in a trace (with
/// `--trace-payloads`); the rest is cut off, and the record says so.
pub(crate) const TRACE_PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// The most receivers one record names (a fan-out wider than this is
/// rare; the count says how many there were).
const RECEIVERS_MAX: usize = 255;

mod tag {
    pub const ACCEPTED: u8 = 1;
    pub const DELIVERED: u8 = 2;
    pub const SETTLED: u8 = 3;
}

mod flag {
    pub const FINAL: u8 = 0x01;
    pub const TRANSIENT: u8 = 0x02;
    pub const PARENT: u8 = 0x04;
    pub const RESPONSE_TO: u8 = 0x08;
    pub const KEY: u8 = 0x10;
    pub const EXPIRES_AT: u8 = 0x20;
    pub const DELIVER_AT: u8 = 0x40;
    pub const PAYLOAD: u8 = 0x80;
}

/// A message the broker accepted, as a trace keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub at: u64,
    pub id: Uuid,
    pub activity: Uuid,
    /// The message's store seq; 0 when not stored.
    pub seq: u64,
    pub kind: Kind,
    pub name: String,
    pub version: Version,
    pub sender: String,
    pub receivers: Vec<String>,
    pub parent_id: Option<Uuid>,
    pub response_to: Option<Uuid>,
    pub key: Option<String>,
    pub is_final: bool,
    pub transient: bool,
    pub expires_at: Option<u64>,
    pub deliver_at: Option<u64>,
    /// With `--trace-payloads`: (its full length, the bytes kept).
    pub payload: Option<(u32, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub at: u64,
    pub activity: Uuid,
    pub message: Uuid,
    pub seq: u64,
    pub attempt: u32,
    pub service: String,
    pub instance: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settled {
    pub at: u64,
    pub activity: Uuid,
    pub seq: u64,
    pub outcome: SettledAs,
    pub service: String,
}

/// [`Outcome`] with owned text, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SettledAs {
    Acked,
    Nacked { delay_ms: u32 },
    Released { reason: String },
    DeadLettered { reason: String },
    Expired,
}

impl SettledAs {
    pub fn as_str(&self) -> &'static str {
        match self {
            SettledAs::Acked => "acked",
            SettledAs::Nacked { .. } => "nacked",
            SettledAs::Released { .. } => "released",
            SettledAs::DeadLettered { .. } => "dead_lettered",
            SettledAs::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Accepted(Accepted),
    Delivered(Delivered),
    Settled(Settled),
}

impl Record {
    pub fn at(&self) -> u64 {
        match self {
            Record::Accepted(a) => a.at,
            Record::Delivered(d) => d.at,
            Record::Settled(s) => s.at,
        }
    }

    pub fn activity(&self) -> Uuid {
        match self {
            Record::Accepted(a) => a.activity,
            Record::Delivered(d) => d.activity,
            Record::Settled(s) => s.activity,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum RecordError {
    #[error("trace record ends early at byte {offset}")]
    Truncated { offset: usize },
    #[error("unknown trace record tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("unknown message kind {code} in a trace record")]
    UnknownKind { code: u8 },
    #[error("unknown delivery outcome {code} in a trace record")]
    UnknownOutcome { code: u8 },
}

fn put_uuid(out: &mut Vec<u8>, id: &Uuid) {
    out.put_slice(id.as_bytes());
}

/// A `str8`; longer text is cut at a character boundary.
fn put_str8(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(u8::MAX as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u8(end as u8);
    out.put_slice(&text.as_bytes()[..end]);
}

/// Appends the record of an accepted message to `out`.
pub(crate) fn encode_accepted(
    out: &mut Vec<u8>,
    m: &Message,
    seq: u64,
    receivers: &[String],
    payloads: bool,
) {
    let mut flags = 0;
    let bit = |on: bool, f: u8| if on { f } else { 0 };
    flags |= bit(m.is_final, flag::FINAL);
    flags |= bit(m.transient, flag::TRANSIENT);
    flags |= bit(m.parent_id.is_some(), flag::PARENT);
    flags |= bit(m.response_to.is_some(), flag::RESPONSE_TO);
    flags |= bit(m.key.is_some(), flag::KEY);
    flags |= bit(m.expires_at.is_some(), flag::EXPIRES_AT);
    flags |= bit(m.deliver_at.is_some(), flag::DELIVER_AT);
    flags |= bit(payloads, flag::PAYLOAD);
    out.put_u8(tag::ACCEPTED);
    out.put_u8(m.kind.code());
    out.put_u8(flags);
    out.put_u64(m.timestamp);
    put_uuid(out, &m.id);
    put_uuid(out, &m.activity_id);
    out.put_u64(seq);
    if let Some(p) = &m.parent_id {
        put_uuid(out, p);
    }
    if let Some(r) = &m.response_to {
        put_uuid(out, r);
    }
    put_str8(out, &m.name);
    out.put_u16(m.version.major);
    out.put_u16(m.version.minor);
    put_str8(out, &m.sender);
    let named = receivers.len().min(RECEIVERS_MAX);
    out.put_u8(named as u8);
    for r in &receivers[..named] {
        put_str8(out, r);
    }
    if let Some(key) = &m.key {
        put_str8(out, &String::from_utf8_lossy(key));
    }
    if let Some(t) = m.expires_at {
        out.put_u64(t);
    }
    if let Some(t) = m.deliver_at {
        out.put_u64(t);
    }
    if payloads {
        let kept = m.payload.len().min(TRACE_PAYLOAD_BYTES_MAX);
        out.put_u32(m.payload.len().min(u32::MAX as usize) as u32);
        out.put_u32(kept as u32);
        out.put_slice(&m.payload[..kept]);
    }
}

/// Appends a delivery or an outcome; `Accepted` goes through
/// [`encode_accepted`] (it needs the payload setting). `activity` is the
/// activity the record belongs to (known for a settled one by its seq).
pub(crate) fn encode_event(out: &mut Vec<u8>, record: &TraceRecord, activity: &Uuid) {
    match record {
        TraceRecord::Accepted { .. } => {}
        TraceRecord::Delivered {
            message,
            seq,
            service,
            instance,
            attempt,
            at,
        } => {
            out.put_u8(tag::DELIVERED);
            out.put_u64(*at);
            put_uuid(out, activity);
            put_uuid(out, &message.id);
            out.put_u64(*seq);
            out.put_u32(*attempt);
            put_str8(out, service);
            put_str8(out, instance);
        }
        TraceRecord::Settled {
            seq,
            service,
            outcome,
            at,
        } => {
            let (code, delay_ms, reason) = match outcome {
                Outcome::Acked => (1, 0, ""),
                Outcome::Nacked { delay_ms } => (2, *delay_ms, ""),
                Outcome::Released { reason } => (3, 0, *reason),
                Outcome::DeadLettered { reason } => (4, 0, *reason),
                Outcome::Expired => (5, 0, ""),
            };
            out.put_u8(tag::SETTLED);
            out.put_u64(*at);
            put_uuid(out, activity);
            out.put_u64(*seq);
            out.put_u8(code);
            out.put_u32(delay_ms);
            put_str8(out, service);
            put_str8(out, reason);
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    start: usize,
}

impl Reader<'_> {
    fn offset(&self) -> usize {
        self.start - self.buf.len()
    }

    fn need(&self, n: usize) -> Result<(), RecordError> {
        if self.buf.len() < n {
            return Err(RecordError::Truncated {
                offset: self.offset(),
            });
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    fn uuid(&mut self) -> Result<Uuid, RecordError> {
        self.need(16)?;
        let mut bytes = [0u8; 16];
        self.buf.copy_to_slice(&mut bytes);
        Ok(Uuid::from_bytes(bytes))
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, RecordError> {
        self.need(n)?;
        let out = self.buf[..n].to_vec();
        self.buf.advance(n);
        Ok(out)
    }

    fn str8(&mut self) -> Result<String, RecordError> {
        let len = usize::from(self.u8()?);
        let bytes = self.bytes(len)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Decodes the record at the front of `buf`; returns it and the bytes it
/// took.
pub(crate) fn decode(buf: &[u8]) -> Result<(Record, usize), RecordError> {
    let mut r = Reader {
        buf,
        start: buf.len(),
    };
    let record = match r.u8()? {
        tag::ACCEPTED => {
            let code = r.u8()?;
            let kind = Kind::from_code(code).ok_or(RecordError::UnknownKind { code })?;
            let flags = r.u8()?;
            let on = |f: u8| flags & f != 0;
            let at = r.u64()?;
            let id = r.uuid()?;
            let activity = r.uuid()?;
            let seq = r.u64()?;
            let parent_id = if on(flag::PARENT) {
                Some(r.uuid()?)
            } else {
                None
            };
            let response_to = if on(flag::RESPONSE_TO) {
                Some(r.uuid()?)
            } else {
                None
            };
            let name = r.str8()?;
            let version = Version::new(r.u16()?, r.u16()?);
            let sender = r.str8()?;
            let count = r.u8()?;
            let mut receivers = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                receivers.push(r.str8()?);
            }
            let key = if on(flag::KEY) { Some(r.str8()?) } else { None };
            let expires_at = if on(flag::EXPIRES_AT) {
                Some(r.u64()?)
            } else {
                None
            };
            let deliver_at = if on(flag::DELIVER_AT) {
                Some(r.u64()?)
            } else {
                None
            };
            let payload = if on(flag::PAYLOAD) {
                let full = r.u32()?;
                let kept = r.u32()? as usize;
                Some((full, r.bytes(kept)?))
            } else {
                None
            };
            Record::Accepted(Accepted {
                at,
                id,
                activity,
                seq,
                kind,
                name,
                version,
                sender,
                receivers,
                parent_id,
                response_to,
                key,
                is_final: on(flag::FINAL),
                transient: on(flag::TRANSIENT),
                expires_at,
                deliver_at,
                payload,
            })
        }
        tag::DELIVERED => Record::Delivered(Delivered {
            at: r.u64()?,
            activity: r.uuid()?,
            message: r.uuid()?,
            seq: r.u64()?,
            attempt: r.u32()?,
            service: r.str8()?,
            instance: r.str8()?,
        }),
        tag::SETTLED => {
            let at = r.u64()?;
            let activity = r.uuid()?;
            let seq = r.u64()?;
            let code = r.u8()?;
            let delay_ms = r.u32()?;
            let service = r.str8()?;
            let reason = r.str8()?;
            let outcome = match code {
                1 => SettledAs::Acked,
                2 => SettledAs::Nacked { delay_ms },
                3 => SettledAs::Released { reason },
                4 => SettledAs::DeadLettered { reason },
                5 => SettledAs::Expired,
                code => return Err(RecordError::UnknownOutcome { code }),
            };
            Record::Settled(Settled {
                at,
                activity,
                seq,
                outcome,
                service,
            })
        }
        tag => return Err(RecordError::UnknownTag { tag }),
    };
    Ok((record, r.offset()))
}

/// Every record of `buf` (records end to end), in order; stops at the
/// first that does not decode (a bug: memory holds only what was encoded).
pub(crate) fn decode_all(mut buf: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        match decode(buf) {
            Ok((record, used)) => {
                out.push(record);
                buf = &buf[used..];
            }
            Err(e) => {
                tracing::warn!(error = %e, "an activity's trace records do not decode; showing what came before");
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn every_record_decodes_to_what_was_encoded() {
        let mut m = Message::new(Kind::Reply, "todo.created", "{\"n\":1}");
        m.timestamp = 7;
        m.sender = "todo".into();
        m.parent_id = Some(Uuid::now_v7());
        m.response_to = m.parent_id;
        m.key = Some(bytes::Bytes::from_static(b"k1"));
        m.expires_at = Some(9);
        let m = Arc::new(m);
        let receivers: Vec<String> = vec!["web".into()];
        let mut buf = Vec::new();
        encode_accepted(&mut buf, &m, 0, &receivers, true);
        let activity = m.activity_id;
        encode_event(
            &mut buf,
            &TraceRecord::Delivered {
                message: m.clone(),
                seq: 0,
                service: "web".into(),
                instance: "web-1".into(),
                attempt: 1,
                at: 8,
            },
            &activity,
        );
        encode_event(
            &mut buf,
            &TraceRecord::Settled {
                seq: 12,
                service: "audit".into(),
                outcome: Outcome::DeadLettered { reason: "nacked" },
                at: 10,
            },
            &activity,
        );
        let records = decode_all(&buf);
        assert_eq!(records.len(), 3);
        let Record::Accepted(a) = &records[0] else {
            panic!("{records:?}")
        };
        assert_eq!(
            (a.at, a.id, a.kind, a.name.as_str(), a.sender.as_str()),
            (7, m.id, Kind::Reply, "todo.created", "todo")
        );
        assert_eq!((a.parent_id, a.response_to), (m.parent_id, m.response_to));
        assert_eq!(a.receivers, ["web"]);
        assert_eq!(a.key.as_deref(), Some("k1"));
        assert_eq!((a.expires_at, a.deliver_at), (Some(9), None));
        assert!(a.is_final && !a.transient);
        assert_eq!(a.payload, Some((7, b"{\"n\":1}".to_vec())));
        assert_eq!(
            records[1],
            Record::Delivered(Delivered {
                at: 8,
                activity,
                message: m.id,
                seq: 0,
                attempt: 1,
                service: "web".into(),
                instance: "web-1".into(),
            })
        );
        assert_eq!(
            records[2],
            Record::Settled(Settled {
                at: 10,
                activity,
                seq: 12,
                outcome: SettledAs::DeadLettered {
                    reason: "nacked".into()
                },
                service: "audit".into(),
            })
        );
        for cut in 0..buf.len() {
            let decoded = decode_all(&buf[..cut]);
            assert!(decoded.len() <= 3, "a cut record never decodes as more");
        }
    }

    #[test]
    fn a_large_payload_is_kept_cut_and_says_its_length() {
        let m = Message::new(Kind::Event, "a.b", vec![b'x'; TRACE_PAYLOAD_BYTES_MAX + 10]);
        let mut buf = Vec::new();
        encode_accepted(&mut buf, &m, 3, &[], true);
        let Record::Accepted(a) = decode(&buf).expect("decodes").0 else {
            panic!("accepted")
        };
        let (full, kept) = a.payload.expect("kept");
        assert_eq!(full as usize, TRACE_PAYLOAD_BYTES_MAX + 10);
        assert_eq!(kept.len(), TRACE_PAYLOAD_BYTES_MAX);
        let mut without = Vec::new();
        encode_accepted(&mut without, &m, 3, &[], false);
        assert!(without.len() < 120, "no payload unless asked");
    }
}
