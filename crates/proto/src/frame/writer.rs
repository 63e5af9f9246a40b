//! The encoder: `FrameWriter`, which batches entries into frames within
//! the receiver's limit, and the lengths the size checks use.

use bytes::{BufMut, BytesMut};

use super::*;
use crate::envelope::Message;
use crate::ErrorCode;

/// Encodes one message alone, in the same layout it has inside SEND and
/// DELIVER entries (`docs/PROTOCOL.md` §4); the durable log stores this.
pub fn encode_message(message: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
    put_message(out, message)
}

struct OpenBatch {
    frame_type: u8,
    start: usize,
    count: u32,
}

/// Fixed bytes of a batch frame before its first entry: type and count.
const BATCH_HEADER_BYTES: usize = 1 + 4;

/// Encodes frames into one buffer, merging consecutive batchable entries
/// (SEND, SEND_RESULT, DELIVER, ACK, NACK) into one frame. One buffer
/// becomes one `write` call, so under load many messages share a frame and a
/// syscall, while a lone message still leaves at once.
///
/// No frame it writes has a `length` above its frame limit (the peer's
/// `frame_bytes_max`): a batch that an entry would take over the limit is
/// closed and the entry starts a frame of its own, and a frame that alone
/// exceeds the limit is refused ([`EncodeError::FrameTooLarge`]).
///
/// A writer speaks one protocol version (the newest unless told with
/// [`FrameWriter::for_version`] or [`FrameWriter::set_version`]): at
/// version 1 messages are written without their `parent_id`, so flag
/// `0x80` never reaches a peer that does not know it.
pub struct FrameWriter {
    buf: BytesMut,
    open: Option<OpenBatch>,
    /// The largest `length` a frame may have (the receiver's limit).
    frame_bytes_max: u32,
    /// The connection's negotiated protocol version.
    version: u16,
    /// About the most recent `take`s took (the largest, fading by a quarter
    /// a take): the next batch starts with twice that much room, where
    /// growing by doubling copied each buffer about once more (reallocation
    /// copies in a 1 KiB pub/sub profile: 3.2 % of all samples with room
    /// for the last take only, 1.8 % for the recent takes' largest, 0.8 %
    /// for twice that).
    room_hint: usize,
}

/// The most room a writer sets aside for its next batch up front (the
/// broker pauses a receiver with 4 MiB waiting for it anyway).
const PRESIZE_BYTES_MAX: usize = 4 * 1024 * 1024;

impl Default for FrameWriter {
    fn default() -> FrameWriter {
        FrameWriter::with_frame_bytes_max(FRAME_BYTES_MAX_DEFAULT)
    }
}

impl FrameWriter {
    /// A writer for a receiver with the default frame limit
    /// ([`FRAME_BYTES_MAX_DEFAULT`]).
    pub fn new() -> FrameWriter {
        FrameWriter::default()
    }

    /// A writer for a receiver whose frame limit is `frame_bytes_max`
    /// (what the broker announced in WELCOME, or announces), at the newest
    /// protocol version.
    pub fn with_frame_bytes_max(frame_bytes_max: u32) -> FrameWriter {
        FrameWriter {
            buf: BytesMut::new(),
            open: None,
            frame_bytes_max,
            version: PROTOCOL_VERSION,
            room_hint: 0,
        }
    }

    /// The frame limit this writer keeps to.
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }

    /// A writer for a connection that speaks protocol `version` (frame
    /// limit: the default).
    pub fn for_version(version: u16) -> FrameWriter {
        FrameWriter {
            version,
            ..FrameWriter::default()
        }
    }

    /// The protocol version messages are written for.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Writes messages for protocol `version` from now on (after the
    /// handshake settled it).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Everything encoded so far; the writer starts afresh.
    pub fn take(&mut self) -> BytesMut {
        self.open = None;
        let taken = self.buf.split();
        if !taken.is_empty() {
            self.room_hint = taken.len().max(self.room_hint - self.room_hint / 4);
        }
        taken
    }

    /// Puts back the bytes of a `take` that a direct write to the socket
    /// did not get to: they leave first, and nothing merges into their
    /// last frame. Only on a writer that is empty (nothing pushed since).
    pub fn push_unwritten(&mut self, bytes: &[u8]) {
        debug_assert!(self.buf.is_empty(), "unwritten bytes must leave first");
        self.open = None;
        self.buf.extend_from_slice(bytes);
    }

    /// Appends a whole frame. Batch frames given here are appended entry by
    /// entry, so they merge with neighbours as the `push_*` methods do.
    pub fn push(&mut self, frame: &Frame) -> Result<(), EncodeError> {
        match frame {
            Frame::Send(entries) => {
                for e in entries {
                    if e.quiet {
                        self.push_quiet_send(e.seq, &e.message)?;
                    } else {
                        self.push_send(e.seq, &e.message)?;
                    }
                }
                Ok(())
            }
            Frame::SendResult(entries) => {
                for e in entries {
                    self.push_send_outcome(e.seq, e.code, &e.reason, e.log_seq)?;
                }
                Ok(())
            }
            Frame::Deliver(entries) => {
                for e in entries {
                    self.push_delivery(e.delivery, e.attempt, &e.message)?;
                }
                Ok(())
            }
            Frame::Ack(ids) => {
                for id in ids {
                    self.push_ack(*id);
                }
                Ok(())
            }
            Frame::Nack(entries) => {
                for e in entries {
                    self.push_nack(*e);
                }
                Ok(())
            }
            single => self.push_single(single),
        }
    }

    fn push_single(&mut self, frame: &Frame) -> Result<(), EncodeError> {
        self.open = None;
        let start = self.buf.len();
        self.buf.put_u32(0);
        let result = self.single_body(frame);
        if result.is_err() {
            self.buf.truncate(start);
            return result;
        }
        let len = self.buf.len() - start - LENGTH_PREFIX_BYTES;
        if len > self.frame_bytes_max as usize {
            self.buf.truncate(start);
            return Err(EncodeError::FrameTooLarge {
                len,
                max: self.frame_bytes_max,
            });
        }
        self.patch_length(start);
        Ok(())
    }

    fn single_body(&mut self, frame: &Frame) -> Result<(), EncodeError> {
        let b = &mut self.buf;
        match frame {
            Frame::Hello(h) => {
                b.put_u8(frame_type::HELLO);
                b.put_slice(&HELLO_MAGIC);
                b.put_u16(h.version);
                put_str8(b, "service", &h.service)?;
                put_str8(b, "instance", &h.instance)?;
                b.put_u32(h.max_in_flight);
                match &h.credentials {
                    Credentials::None => b.put_u8(0),
                    Credentials::Token(t) => {
                        b.put_u8(1);
                        put_str16(b, "token", t)?;
                    }
                }
            }
            Frame::Welcome(w) => {
                b.put_u8(frame_type::WELCOME);
                b.put_u16(w.version);
                b.put_u64(w.connection_id);
                b.put_u32(w.frame_bytes_max);
                put_str8(b, "broker", &w.broker)?;
                if let Some(service) = &w.service {
                    put_str8(b, "service", service)?;
                }
            }
            Frame::Subscribe(s) => {
                b.put_u8(frame_type::SUBSCRIBE);
                b.put_u64(s.request);
                put_str8(b, "pattern", &s.pattern)?;
                b.put_u32(s.ack_deadline_ms);
                b.put_u32(s.max_deliveries);
                let (code, time) = match s.start {
                    StartFrom::New => (0, 0),
                    StartFrom::Beginning => (1, 0),
                    StartFrom::Time(t) => (2, t),
                };
                b.put_u8(code);
                b.put_u64(time);
            }
            Frame::Unsubscribe { request, pattern } => {
                b.put_u8(frame_type::UNSUBSCRIBE);
                b.put_u64(*request);
                put_str8(b, "pattern", pattern)?;
            }
            Frame::Result(r) => {
                b.put_u8(frame_type::RESULT);
                b.put_u64(r.request);
                b.put_u16(r.code.as_u16());
                put_str16_lossy(b, &r.reason);
            }
            Frame::Flow { max_in_flight } => {
                b.put_u8(frame_type::FLOW);
                b.put_u32(*max_in_flight);
            }
            Frame::Ping(n) => {
                b.put_u8(frame_type::PING);
                b.put_u64(*n);
            }
            Frame::Pong(n) => {
                b.put_u8(frame_type::PONG);
                b.put_u64(*n);
            }
            Frame::Error(e) => {
                b.put_u8(frame_type::ERROR);
                b.put_u16(e.code.as_u16());
                put_str16_lossy(b, &e.message);
            }
            Frame::Drain => b.put_u8(frame_type::DRAIN),
            Frame::Drained => b.put_u8(frame_type::DRAINED),
            Frame::Send(_)
            | Frame::SendResult(_)
            | Frame::Deliver(_)
            | Frame::Ack(_)
            | Frame::Nack(_) => unreachable!("batch frames are pushed entry by entry"),
        }
        Ok(())
    }

    fn patch_length(&mut self, start: usize) {
        let len = (self.buf.len() - start - LENGTH_PREFIX_BYTES) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Opens (or continues) a batch frame of `frame_type`, runs `entry` to
    /// append one entry, and patches length and count. On error the entry's
    /// bytes are removed again. An entry that would take an open batch over
    /// the frame limit moves to a frame of its own.
    fn batch_entry(
        &mut self,
        frame_type: u8,
        entry: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<(), EncodeError> {
        if self.buf.is_empty() {
            self.buf
                .reserve((2 * self.room_hint).min(PRESIZE_BYTES_MAX));
        }
        let continue_open = matches!(&self.open, Some(o) if o.frame_type == frame_type
            && self.buf.len() - o.start < BATCH_BYTES_TARGET
            && o.count < BATCH_ENTRIES_MAX);
        if !continue_open {
            self.open_batch(frame_type);
        }
        let before = self.buf.len();
        if let Err(e) = entry(&mut self.buf) {
            self.drop_entry(before);
            return Err(e);
        }
        let max = self.frame_bytes_max as usize;
        let Some(open) = &self.open else {
            return Ok(());
        };
        let frame_len = self.buf.len() - open.start - LENGTH_PREFIX_BYTES;
        if frame_len > max {
            let entry_len = self.buf.len() - before;
            if open.count == 0 || BATCH_HEADER_BYTES + entry_len > max {
                // Too large even alone: no receiver with this limit takes it.
                self.drop_entry(before);
                return Err(EncodeError::FrameTooLarge {
                    len: BATCH_HEADER_BYTES + entry_len,
                    max: self.frame_bytes_max,
                });
            }
            // The open batch stays as it was; the entry starts the next
            // frame. A copy, but only of an entry near the limit in size.
            let moved = self.buf.split_off(before);
            self.open_batch(frame_type);
            self.buf.extend_from_slice(&moved);
        }
        if let Some(open) = &mut self.open {
            open.count += 1;
            let (start, count) = (open.start, open.count);
            self.buf[start + 5..start + 9].copy_from_slice(&count.to_be_bytes());
            self.patch_length(start);
        }
        Ok(())
    }

    /// Starts a batch frame of `frame_type` with no entries yet.
    fn open_batch(&mut self, frame_type: u8) {
        let start = self.buf.len();
        self.buf.put_u32(0);
        self.buf.put_u8(frame_type);
        self.buf.put_u32(0);
        self.open = Some(OpenBatch {
            frame_type,
            start,
            count: 0,
        });
    }

    /// Removes a failed entry's bytes (from `before`), and its batch frame
    /// too when that holds nothing else.
    fn drop_entry(&mut self, before: usize) {
        self.buf.truncate(before);
        if let Some(open) = &self.open {
            if open.count == 0 {
                self.buf.truncate(open.start);
                self.open = None;
            }
        }
    }

    pub fn push_send(&mut self, seq: u64, message: &Message) -> Result<(), EncodeError> {
        let version = self.version;
        self.batch_entry(frame_type::SEND, |b| {
            b.put_u64(seq);
            put_message_flagged(b, message, 0, version)
        })
    }

    /// A SEND entry with the QUIET flag: the broker answers it only if it
    /// refuses the message.
    pub fn push_quiet_send(&mut self, seq: u64, message: &Message) -> Result<(), EncodeError> {
        let version = self.version;
        self.batch_entry(frame_type::SEND, |b| {
            b.put_u64(seq);
            put_message_flagged(b, message, flag::QUIET, version)
        })
    }

    /// One SEND_RESULT entry; `log_seq` is written from protocol
    /// version 3 on (older versions have no place for it).
    pub fn push_send_outcome(
        &mut self,
        seq: u64,
        code: ErrorCode,
        reason: &str,
        log_seq: u64,
    ) -> Result<(), EncodeError> {
        let with_log_seq = self.version >= 3;
        self.batch_entry(frame_type::SEND_RESULT, |b| {
            b.put_u64(seq);
            b.put_u16(code.as_u16());
            put_str16_lossy(b, reason);
            if with_log_seq {
                b.put_u64(log_seq);
            }
            Ok(())
        })
    }

    pub fn push_delivery(
        &mut self,
        delivery: u64,
        attempt: u32,
        message: &Message,
    ) -> Result<(), EncodeError> {
        let version = self.version;
        self.batch_entry(frame_type::DELIVER, |b| {
            b.put_u64(delivery);
            b.put_u32(attempt);
            put_message_flagged(b, message, 0, version)
        })
    }

    pub fn push_ack(&mut self, delivery: u64) {
        let _infallible = self.batch_entry(frame_type::ACK, |b| {
            b.put_u64(delivery);
            Ok(())
        });
    }

    pub fn push_nack(&mut self, nack: Nack) {
        let _infallible = self.batch_entry(frame_type::NACK, |b| {
            b.put_u64(nack.delivery);
            b.put_u32(nack.delay_ms);
            Ok(())
        });
    }
}

fn put_str8(b: &mut BytesMut, what: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.len() > u8::MAX as usize {
        return Err(EncodeError::TooLong {
            what,
            len: s.len(),
            max: u8::MAX as usize,
        });
    }
    b.put_u8(s.len() as u8);
    b.put_slice(s.as_bytes());
    Ok(())
}

fn put_str16(b: &mut BytesMut, what: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.len() > u16::MAX as usize {
        return Err(EncodeError::TooLong {
            what,
            len: s.len(),
            max: u16::MAX as usize,
        });
    }
    b.put_u16(s.len() as u16);
    b.put_slice(s.as_bytes());
    Ok(())
}

/// Human-readable reasons are cut (at a character boundary) rather than
/// refused: an error about an error helps nobody.
fn put_str16_lossy(b: &mut BytesMut, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b.put_u16(end as u16);
    b.put_slice(&s.as_bytes()[..end]);
}

/// The `length` of a DELIVER frame that carries `m` alone: type, count,
/// delivery id, attempt and the message (`docs/PROTOCOL.md` §5.8). The
/// broker accepts a message only if this, for the message as it will be
/// delivered (with its `sender` set), is within its frame limit.
pub fn delivery_frame_len(m: &Message) -> usize {
    BATCH_HEADER_BYTES + 8 + 4 + encoded_message_len(m)
}

/// The `length` of a SEND frame that carries `m` alone: type, count, seq
/// and the message (`docs/PROTOCOL.md` §5.3).
pub fn send_frame_len(m: &Message) -> usize {
    BATCH_HEADER_BYTES + 8 + encoded_message_len(m)
}

/// Bytes [`put_message`] will write for `m` (at the newest protocol
/// version; a version-1 writer leaves out the 16 of a `parent_id`); lets
/// callers check a message against the frame limit before encoding it.
pub fn encoded_message_len(m: &Message) -> usize {
    MESSAGE_BYTES_MIN - 1 - 1
        + m.name.len()
        + m.sender.len()
        + 1
        + 1
        + m.response_to.map_or(0, |_| 16)
        + m.key.as_ref().map_or(0, |k| 2 + k.len())
        + m.expires_at.map_or(0, |_| 8)
        + m.deliver_at.map_or(0, |_| 8)
        + m.parent_id.map_or(0, |_| 16)
        + m.headers
            .iter()
            .map(|(k, v)| 1 + k.len() + 2 + v.len())
            .sum::<usize>()
        + m.payload.len()
}

pub(super) fn put_message(b: &mut BytesMut, m: &Message) -> Result<(), EncodeError> {
    put_message_flagged(b, m, 0, PROTOCOL_VERSION)
}

/// Writes `m` as protocol `version` defines a message: a version-1 peer
/// gets no `parent_id` (it would refuse flag `0x80`).
fn put_message_flagged(
    b: &mut BytesMut,
    m: &Message,
    extra_flags: u8,
    version: u16,
) -> Result<(), EncodeError> {
    if m.headers.len() > HEADERS_MAX {
        return Err(EncodeError::TooManyHeaders {
            count: m.headers.len(),
        });
    }
    if m.payload.len() > u32::MAX as usize {
        return Err(EncodeError::TooLong {
            what: "payload",
            len: m.payload.len(),
            max: u32::MAX as usize,
        });
    }
    let mut flags = extra_flags;
    if m.transient {
        flags |= flag::TRANSIENT;
    }
    if m.is_final {
        flags |= flag::FINAL;
    }
    if m.response_to.is_some() {
        flags |= flag::RESPONSE_TO;
    }
    if m.key.is_some() {
        flags |= flag::KEY;
    }
    if m.expires_at.is_some() {
        flags |= flag::EXPIRES_AT;
    }
    if m.deliver_at.is_some() {
        flags |= flag::DELIVER_AT;
    }
    let parent_id = m.parent_id.filter(|_| version >= 2);
    if parent_id.is_some() {
        flags |= flag::PARENT_ID;
    }
    b.reserve(encoded_message_len(m));
    b.put_u8(m.kind.code());
    b.put_u8(flags);
    put_str8(b, "name", &m.name)?;
    b.put_u16(m.version.major);
    b.put_u16(m.version.minor);
    b.put_slice(m.id.as_bytes());
    b.put_slice(m.activity_id.as_bytes());
    b.put_u64(m.timestamp);
    put_str8(b, "sender", &m.sender)?;
    if let Some(r) = m.response_to {
        b.put_slice(r.as_bytes());
    }
    if let Some(key) = &m.key {
        if key.len() > u16::MAX as usize {
            return Err(EncodeError::TooLong {
                what: "key",
                len: key.len(),
                max: u16::MAX as usize,
            });
        }
        b.put_u16(key.len() as u16);
        b.put_slice(key);
    }
    if let Some(t) = m.expires_at {
        b.put_u64(t);
    }
    if let Some(t) = m.deliver_at {
        b.put_u64(t);
    }
    if let Some(p) = parent_id {
        b.put_slice(p.as_bytes());
    }
    b.put_u16(m.headers.len() as u16);
    for (k, v) in &m.headers {
        put_str8(b, "header name", k)?;
        put_str16(b, "header value", v)?;
    }
    b.put_u32(m.payload.len() as u32);
    b.put_slice(&m.payload);
    Ok(())
}
