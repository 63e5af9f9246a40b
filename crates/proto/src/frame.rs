//! Frames: what travels on a Courier connection, and their binary codec.
//!
//! The layout is specified byte by byte in `docs/PROTOCOL.md`; keep the two
//! in step. Every integer is big-endian. A frame is
//! `length:u32 type:u8 body`, where `length` counts the type byte and the
//! body. The decoder checks `length` against the connection's limit before it
//! buffers or allocates anything for the frame.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;
use uuid::Uuid;

use crate::envelope::{Kind, Message, Version};
use crate::{ErrorCode, SharedStr};

/// The newest protocol version this crate speaks (sent in HELLO; a broker
/// answers in WELCOME with the version it speaks on the connection).
/// Version 2 added a message's `parent_id` (flag `0x80`); version 3 the
/// log seq of an accepted message in SEND_RESULT; version 4 pipelined
/// ordering keys (no new bytes but [`ATTEMPT_KEY_START`]).
pub const PROTOCOL_VERSION: u16 = 4;
/// The first version whose connections take a key's messages pipelined:
/// the broker may send a key's next messages before the earlier ones are
/// acked, and the client hands them to its handlers one at a time, in
/// order (`docs/PROTOCOL.md` §8.4).
pub const PIPELINED_KEYS_VERSION: u16 = 4;
/// Bit 31 of a DELIVER entry's `attempt` on a connection of version 4:
/// the delivery is the first of its key that the connection holds — the
/// broker has taken back every earlier delivery of that key to it. The
/// attempt number is the other 31 bits.
pub const ATTEMPT_KEY_START: u32 = 0x8000_0000;
/// The oldest protocol version this crate still speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// First four bytes of a HELLO body; lets a broker tell Courier from noise.
pub const HELLO_MAGIC: [u8; 4] = *b"CRR1";
/// Default upper bound of one frame, length prefix excluded.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 8 * 1024 * 1024;
/// The reference broker's default keepalive deadline: a connection on
/// which nothing arrives for this long is closed (`read_timeout`), so a
/// client pings an idle connection well within it.
pub const KEEPALIVE_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// An encoder closes a batch frame once it holds this many bytes, so one
/// large batch never delays the first message in it for long.
pub const BATCH_BYTES_TARGET: usize = 256 * 1024;
/// Most entries one batch frame may carry.
pub const BATCH_ENTRIES_MAX: u32 = 65_536;
/// Most headers on one message.
pub const HEADERS_MAX: usize = 64;

const LENGTH_PREFIX_BYTES: usize = 4;
/// Fixed part of an encoded message; used to bound batch counts before
/// allocating.
const MESSAGE_BYTES_MIN: usize = 1 + 1 + 1 + 4 + 16 + 16 + 8 + 1 + 2 + 4;

/// Frame type codes (the byte after the length prefix).
pub mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const SEND: u8 = 0x03;
    pub const SEND_RESULT: u8 = 0x04;
    pub const SUBSCRIBE: u8 = 0x05;
    pub const UNSUBSCRIBE: u8 = 0x06;
    pub const RESULT: u8 = 0x07;
    pub const DELIVER: u8 = 0x08;
    pub const ACK: u8 = 0x09;
    pub const NACK: u8 = 0x0A;
    pub const FLOW: u8 = 0x0B;
    pub const PING: u8 = 0x0C;
    pub const PONG: u8 = 0x0D;
    pub const ERROR: u8 = 0x0E;
    pub const DRAIN: u8 = 0x0F;
    pub const DRAINED: u8 = 0x10;
}

mod flag {
    pub const TRANSIENT: u8 = 0x01;
    pub const FINAL: u8 = 0x02;
    pub const RESPONSE_TO: u8 = 0x04;
    pub const KEY: u8 = 0x08;
    pub const EXPIRES_AT: u8 = 0x10;
    pub const DELIVER_AT: u8 = 0x20;
    /// Only in a SEND entry: answer this send only if it is refused.
    pub const QUIET: u8 = 0x40;
    /// From protocol version 2: the `parent_id` field is present.
    pub const PARENT_ID: u8 = 0x80;
    /// The flags a message may carry wherever it appears, in version 1.
    const V1: u8 = 0x3F;

    /// The flags a message may carry wherever it appears at `version`.
    pub fn allowed(version: u16) -> u8 {
        if version >= 2 {
            V1 | PARENT_ID
        } else {
            V1
        }
    }
}

/// Credentials presented in HELLO. Room for tokens now; certificates are
/// taken from the TLS session, not from the frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Credentials {
    #[default]
    None,
    Token(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub service: String,
    pub instance: String,
    /// How many unacknowledged deliveries this connection takes at once.
    pub max_in_flight: u32,
    pub credentials: Credentials,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub connection_id: u64,
    pub frame_bytes_max: u32,
    pub broker: String,
    /// The service the connection authenticated as, when that is not the
    /// one HELLO named (HELLO left it empty for the credentials to decide,
    /// or the credentials are the admin's). Absent otherwise, and from
    /// brokers that predate the field, so a client whose name stands sees
    /// WELCOME unchanged.
    pub service: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendEntry {
    /// Chosen by the client; echoed in the matching [`SendOutcome`].
    pub seq: u64,
    /// Shared from the moment it is decoded: the broker stores and
    /// delivers this same allocation, and a message is ~250 bytes that
    /// would otherwise be copied at every step.
    pub message: Arc<Message>,
    /// The sender wants a [`SendOutcome`] only for a refusal (flag `0x40`
    /// of the message in this entry): fire-and-forget sends that cost the
    /// broker no answer and the client no bookkeeping when all goes well.
    pub quiet: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    pub seq: u64,
    pub code: ErrorCode,
    pub reason: String,
    /// From protocol version 3: where the broker's log holds the accepted
    /// message (its seq there); 0 when it holds none (transient, a reply,
    /// a duplicate, a refusal) or on older versions.
    pub log_seq: u64,
}

/// Where a new subscription starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// Only messages accepted from now on (also called "end").
    #[default]
    New,
    /// Every retained event.
    Beginning,
    /// Retained events accepted at or after this time (unix ns).
    Time(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub request: u64,
    pub pattern: String,
    /// 0 keeps the service's current (or the broker's default) deadline.
    pub ack_deadline_ms: u32,
    /// 0 keeps the service's current (or the broker's default) limit.
    pub max_deliveries: u32,
    /// Only used when the subscription is new for the service.
    pub start: StartFrom,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpResult {
    pub request: u64,
    pub code: ErrorCode,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Names this delivery in ACK and NACK; unique per connection.
    pub delivery: u64,
    /// 1 on the first delivery, counting up on each redelivery.
    pub attempt: u32,
    pub message: Message,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nack {
    pub delivery: u64,
    pub delay_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Send(Vec<SendEntry>),
    SendResult(Vec<SendOutcome>),
    Subscribe(Subscribe),
    Unsubscribe { request: u64, pattern: String },
    Result(OpResult),
    Deliver(Vec<Delivery>),
    Ack(Vec<u64>),
    Nack(Vec<Nack>),
    Flow { max_in_flight: u32 },
    Ping(u64),
    Pong(u64),
    Error(ErrorFrame),
    Drain,
    Drained,
}

/// Why bytes could not be decoded into a frame. Offsets count from the
/// frame's type byte.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("frame length is 0; a frame has at least its type byte")]
    EmptyFrame,
    #[error("unknown frame type 0x{frame_type:02x}")]
    UnknownFrameType { frame_type: u8 },
    #[error("frame ends early at byte {offset}: need {need} more bytes, have {have}")]
    UnexpectedEof {
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("frame has {extra} bytes left over after its body ends at byte {offset}")]
    TrailingBytes { offset: usize, extra: usize },
    #[error("text at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("unknown message kind {code} at byte {offset}")]
    UnknownKind { offset: usize, code: u8 },
    #[error("unknown message flags 0x{flags:02x} at byte {offset}")]
    UnknownFlags { offset: usize, flags: u8 },
    #[error("unknown subscription start {code} at byte {offset}")]
    UnknownStart { offset: usize, code: u8 },
    #[error(
        "subscription start {code} carries a start_time; it must be 0 unless start is 2 (time)"
    )]
    StrayStartTime { code: u8 },
    #[error("unknown credentials kind {code} at byte {offset}")]
    UnknownCredentials { offset: usize, code: u8 },
    #[error("HELLO does not start with the magic bytes \"CRR1\"; is this a Courier client?")]
    BadMagic,
    #[error("batch frame has 0 entries; send no frame instead")]
    EmptyBatch,
    #[error("batch claims {count} entries; at most {max} fit in this frame")]
    TooManyEntries { count: u32, max: u64 },
    #[error("message has {count} headers; at most {HEADERS_MAX} are allowed")]
    TooManyHeaders { count: usize },
}

impl DecodeError {
    /// The wire code an ERROR frame carries for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("{what} is {len} bytes; at most {max} fit")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("message has {count} headers; at most {HEADERS_MAX} are allowed")]
    TooManyHeaders { count: usize },
    #[error("frame of {len} bytes exceeds the receiver's limit of {max} bytes")]
    FrameTooLarge { len: usize, max: u32 },
}

/// Decodes one frame from the front of `src`, if a whole one is there.
///
/// Returns `Ok(None)` when more bytes are needed. A frame whose length
/// prefix exceeds `frame_bytes_max` is refused before anything is buffered
/// for it, so a hostile length cannot make the caller allocate.
///
/// ```
/// use bytes::BytesMut;
/// use courier_proto::{decode_frame, Frame, FrameWriter, FRAME_BYTES_MAX_DEFAULT};
/// let mut w = FrameWriter::new();
/// w.push(&Frame::Ping(7)).unwrap();
/// let mut buf = BytesMut::from(&w.take()[..]);
/// assert_eq!(decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).unwrap(), Some(Frame::Ping(7)));
/// ```
pub fn decode_frame(
    src: &mut BytesMut,
    frame_bytes_max: u32,
) -> Result<Option<Frame>, DecodeError> {
    decode_frame_as(src, frame_bytes_max, PROTOCOL_VERSION)
}

/// [`decode_frame`] for a connection that speaks protocol `version`: what
/// that version does not define (a version-1 message with flag `0x80`) is
/// malformed, as it was in that version.
///
/// ```
/// use bytes::BytesMut;
/// use courier_proto::{decode_frame_as, FrameWriter, Kind, Message};
/// let mut m = Message::new(Kind::Event, "todo.created", "{}");
/// m.parent_id = Some(courier_proto::new_id());
/// let mut w = FrameWriter::new();
/// w.push_delivery(1, 1, &m).unwrap();
/// let bytes = w.take();
/// assert!(decode_frame_as(&mut bytes.clone(), 1 << 20, 2).is_ok());
/// assert!(decode_frame_as(&mut bytes.clone(), 1 << 20, 1).is_err());
/// ```
pub fn decode_frame_as(
    src: &mut BytesMut,
    frame_bytes_max: u32,
    version: u16,
) -> Result<Option<Frame>, DecodeError> {
    if src.len() < LENGTH_PREFIX_BYTES {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if len > frame_bytes_max {
        return Err(DecodeError::FrameTooLarge {
            len: u64::from(len),
            max: frame_bytes_max,
        });
    }
    let total = LENGTH_PREFIX_BYTES + len as usize;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    let mut frame = src.split_to(total).freeze();
    frame.advance(LENGTH_PREFIX_BYTES);
    decode_body_as(frame, version).map(Some)
}

/// Decodes a frame body (type byte first, no length prefix).
pub fn decode_body(body: Bytes) -> Result<Frame, DecodeError> {
    decode_body_as(body, PROTOCOL_VERSION)
}

/// [`decode_body`] at protocol `version` (see [`decode_frame_as`]).
pub fn decode_body_as(body: Bytes, version: u16) -> Result<Frame, DecodeError> {
    let mut r = Reader::new(body);
    r.flags_allowed = flag::allowed(version);
    r.version = version;
    let frame_type = r.u8()?;
    let frame = match frame_type {
        frame_type::HELLO => {
            let magic = r.bytes(4)?;
            if magic[..] != HELLO_MAGIC {
                return Err(DecodeError::BadMagic);
            }
            let version = r.u16()?;
            let service = r.str8()?;
            let instance = r.str8()?;
            let max_in_flight = r.u32()?;
            let offset = r.pos;
            let credentials = match r.u8()? {
                0 => Credentials::None,
                1 => Credentials::Token(r.str16()?),
                code => return Err(DecodeError::UnknownCredentials { offset, code }),
            };
            Frame::Hello(Hello {
                version,
                service,
                instance,
                max_in_flight,
                credentials,
            })
        }
        frame_type::WELCOME => Frame::Welcome(Welcome {
            version: r.u16()?,
            connection_id: r.u64()?,
            frame_bytes_max: r.u32()?,
            broker: r.str8()?,
            // The one optional trailing field: present iff bytes remain.
            service: if r.is_at_end() { None } else { Some(r.str8()?) },
        }),
        frame_type::SEND => {
            let count = r.count(8 + MESSAGE_BYTES_MIN)?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let seq = r.u64()?;
                let (message, flags) = r.message_with(flag::QUIET)?;
                entries.push(SendEntry {
                    seq,
                    message: Arc::new(message),
                    quiet: flags & flag::QUIET != 0,
                });
            }
            Frame::Send(entries)
        }
        frame_type::SEND_RESULT => {
            let with_log_seq = r.version >= 3;
            let count = r.count(8 + 2 + 2 + if with_log_seq { 8 } else { 0 })?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(SendOutcome {
                    seq: r.u64()?,
                    code: ErrorCode::from_u16(r.u16()?),
                    reason: r.str16()?,
                    log_seq: if with_log_seq { r.u64()? } else { 0 },
                });
            }
            Frame::SendResult(entries)
        }
        frame_type::SUBSCRIBE => {
            let request = r.u64()?;
            let pattern = r.str8()?;
            let ack_deadline_ms = r.u32()?;
            let max_deliveries = r.u32()?;
            let offset = r.pos;
            let code = r.u8()?;
            let time = r.u64()?;
            let start = match code {
                // One encoding per value: a stray time would be lost on
                // re-encoding (found by the fuzzer).
                0 | 1 if time != 0 => return Err(DecodeError::StrayStartTime { code }),
                0 => StartFrom::New,
                1 => StartFrom::Beginning,
                2 => StartFrom::Time(time),
                code => return Err(DecodeError::UnknownStart { offset, code }),
            };
            Frame::Subscribe(Subscribe {
                request,
                pattern,
                ack_deadline_ms,
                max_deliveries,
                start,
            })
        }
        frame_type::UNSUBSCRIBE => Frame::Unsubscribe {
            request: r.u64()?,
            pattern: r.str8()?,
        },
        frame_type::RESULT => Frame::Result(OpResult {
            request: r.u64()?,
            code: ErrorCode::from_u16(r.u16()?),
            reason: r.str16()?,
        }),
        frame_type::DELIVER => {
            let count = r.count(8 + 4 + MESSAGE_BYTES_MIN)?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let delivery = r.u64()?;
                let attempt = r.u32()?;
                let message = r.message()?;
                entries.push(Delivery {
                    delivery,
                    attempt,
                    message,
                });
            }
            Frame::Deliver(entries)
        }
        frame_type::ACK => {
            let count = r.count(8)?;
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                ids.push(r.u64()?);
            }
            Frame::Ack(ids)
        }
        frame_type::NACK => {
            let count = r.count(8 + 4)?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                entries.push(Nack {
                    delivery: r.u64()?,
                    delay_ms: r.u32()?,
                });
            }
            Frame::Nack(entries)
        }
        frame_type::FLOW => Frame::Flow {
            max_in_flight: r.u32()?,
        },
        frame_type::PING => Frame::Ping(r.u64()?),
        frame_type::PONG => Frame::Pong(r.u64()?),
        frame_type::ERROR => Frame::Error(ErrorFrame {
            code: ErrorCode::from_u16(r.u16()?),
            message: r.str16()?,
        }),
        frame_type::DRAIN => Frame::Drain,
        frame_type::DRAINED => Frame::Drained,
        other => return Err(DecodeError::UnknownFrameType { frame_type: other }),
    };
    let extra = r.buf.len() - r.pos;
    if extra != 0 {
        return Err(DecodeError::TrailingBytes {
            offset: r.pos,
            extra,
        });
    }
    Ok(frame)
}

/// Encodes one message alone, in the same layout it has inside SEND and
/// DELIVER entries (`docs/PROTOCOL.md` §4); the durable log stores this.
pub fn encode_message(message: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
    put_message(out, message)
}

/// Decodes one message encoded by [`encode_message`]; the payload and key
/// share `bytes` rather than being copied.
///
/// ```
/// use bytes::BytesMut;
/// use courier_proto::{decode_message, encode_message, Kind, Message};
/// let m = Message::new(Kind::Event, "todo.created", "{}");
/// let mut buf = BytesMut::new();
/// encode_message(&m, &mut buf).unwrap();
/// assert_eq!(decode_message(buf.freeze()).unwrap(), m);
/// ```
pub fn decode_message(bytes: Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader::new(bytes);
    let message = r.message()?;
    let extra = r.buf.len() - r.pos;
    if extra != 0 {
        return Err(DecodeError::TrailingBytes {
            offset: r.pos,
            extra,
        });
    }
    Ok(message)
}

struct Reader {
    buf: Bytes,
    pos: usize,
    /// The message flags the connection's protocol version defines.
    flags_allowed: u8,
    /// The connection's protocol version.
    version: u16,
    /// The name of the message decoded last: the entries of a batch mostly
    /// share one, so they share its one copy (see [`Reader::name8`]).
    last_name: SharedStr,
}

// Inlined: called out of line, each returned its value through memory in
// a `Result`, and reading it back stalled on store forwarding — 15 % of a
// subscriber's samples were `message_with` alone (W1a profile).
impl Reader {
    fn new(buf: Bytes) -> Reader {
        Reader {
            buf,
            pos: 0,
            flags_allowed: flag::allowed(PROTOCOL_VERSION),
            version: PROTOCOL_VERSION,
            last_name: SharedStr::new(),
        }
    }

    fn is_at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    #[inline(always)]
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(self.eof(n));
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn eof(&self, need: usize) -> DecodeError {
        DecodeError::UnexpectedEof {
            offset: self.pos,
            need,
            have: self.buf.len() - self.pos,
        }
    }

    #[inline(always)]
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    #[inline(always)]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    #[inline(always)]
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    #[inline(always)]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    #[inline(always)]
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    #[inline(always)]
    fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        Ok(Uuid::from_bytes(self.array()?))
    }

    /// The next `len` bytes as text, borrowed from the frame: a `Bytes`
    /// slice first would cost a reference count taken and dropped on the
    /// shared read buffer.
    #[inline(always)]
    fn raw_str(&mut self, len: usize) -> Result<&str, DecodeError> {
        let offset = self.pos;
        self.need(len)?;
        self.pos += len;
        std::str::from_utf8(&self.buf[offset..offset + len])
            .map_err(|_| DecodeError::InvalidUtf8 { offset })
    }
    /// A message name: the previous message's copy when the bytes are the
    /// same (already checked as UTF-8 then), else a new one. A `String` per
    /// message was an allocation, a copy and a UTF-8 check per entry of a
    /// batch, and a free once it was delivered.
    #[inline(always)]
    fn name8(&mut self) -> Result<SharedStr, DecodeError> {
        let len = usize::from(self.u8()?);
        self.need(len)?;
        if !self.last_name.is_empty()
            && self.last_name.as_bytes() == &self.buf[self.pos..self.pos + len]
        {
            self.pos += len;
            return Ok(self.last_name.clone());
        }
        let name = SharedStr::from(self.raw_str(len)?);
        self.last_name = name.clone();
        Ok(name)
    }
    #[inline(always)]
    fn text(&mut self, len: usize) -> Result<String, DecodeError> {
        self.raw_str(len).map(str::to_owned)
    }
    #[inline(always)]
    fn str8(&mut self) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        self.text(len)
    }
    /// A short string straight into its shared form (the empty one, what
    /// clients send as the sender, allocates nothing).
    #[inline(always)]
    fn shared_str8(&mut self) -> Result<SharedStr, DecodeError> {
        let len = usize::from(self.u8()?);
        self.raw_str(len).map(SharedStr::from)
    }
    #[inline(always)]
    fn str16(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        self.text(len)
    }

    /// Reads a batch count and checks it against what the rest of the frame
    /// could possibly hold, so a lying count cannot make us allocate.
    fn count(&mut self, entry_bytes_min: usize) -> Result<usize, DecodeError> {
        let count = self.u32()?;
        if count == 0 {
            // The encoder never writes an empty batch; accepting one would
            // give two encodings of "nothing".
            return Err(DecodeError::EmptyBatch);
        }
        let fits = ((self.buf.len() - self.pos) / entry_bytes_min) as u64;
        let max = fits.min(u64::from(BATCH_ENTRIES_MAX));
        if u64::from(count) > max {
            return Err(DecodeError::TooManyEntries { count, max });
        }
        Ok(count as usize)
    }

    fn message(&mut self) -> Result<Message, DecodeError> {
        self.message_with(0).map(|(message, _)| message)
    }

    /// Decodes a message that may also carry the flags in `extra_flags`
    /// (those that only mean something where the message is, like QUIET
    /// in a SEND entry); returns its flags too.
    fn message_with(&mut self, extra_flags: u8) -> Result<(Message, u8), DecodeError> {
        let offset = self.pos;
        let code = self.u8()?;
        let kind = Kind::from_code(code).ok_or(DecodeError::UnknownKind { offset, code })?;
        let offset = self.pos;
        let flags = self.u8()?;
        if flags & !(self.flags_allowed | extra_flags) != 0 {
            return Err(DecodeError::UnknownFlags { offset, flags });
        }
        let name = self.name8()?;
        let version = Version::new(self.u16()?, self.u16()?);
        let id = self.uuid()?;
        let activity_id = self.uuid()?;
        let timestamp = self.u64()?;
        let sender = self.shared_str8()?;
        let response_to = if flags & flag::RESPONSE_TO != 0 {
            Some(self.uuid()?)
        } else {
            None
        };
        let key = if flags & flag::KEY != 0 {
            let len = self.u16()? as usize;
            Some(self.bytes(len)?)
        } else {
            None
        };
        let expires_at = if flags & flag::EXPIRES_AT != 0 {
            Some(self.u64()?)
        } else {
            None
        };
        let deliver_at = if flags & flag::DELIVER_AT != 0 {
            Some(self.u64()?)
        } else {
            None
        };
        let parent_id = if flags & flag::PARENT_ID != 0 {
            Some(self.uuid()?)
        } else {
            None
        };
        let header_count = self.u16()? as usize;
        if header_count > HEADERS_MAX {
            return Err(DecodeError::TooManyHeaders {
                count: header_count,
            });
        }
        let mut headers = Vec::with_capacity(header_count);
        for _ in 0..header_count {
            let k = self.str8()?;
            let v = self.str16()?;
            headers.push((k, v));
        }
        let payload_len = self.u32()? as usize;
        let payload = self.bytes(payload_len)?;
        let message = Message {
            kind,
            name,
            version,
            id,
            timestamp,
            activity_id,
            parent_id,
            response_to,
            sender,
            key,
            expires_at,
            deliver_at,
            transient: flags & flag::TRANSIENT != 0,
            is_final: flags & flag::FINAL != 0,
            headers,
            payload,
        };
        Ok((message, flags))
    }
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

fn put_message(b: &mut BytesMut, m: &Message) -> Result<(), EncodeError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(kind: Kind) -> Message {
        let mut m = Message::new(kind, "todo.create", &b"{\"text\":\"milk\"}"[..]);
        m.sender = "web".into();
        m.timestamp = 42;
        m.key = Some(Bytes::from_static(b"user-1"));
        m.expires_at = Some(1_000);
        m.deliver_at = Some(500);
        m.response_to = Some(Uuid::now_v7());
        m.parent_id = Some(Uuid::now_v7());
        m.headers
            .push(("content-type".into(), "application/json".into()));
        m
    }

    fn roundtrip(frames: &[Frame]) -> Vec<Frame> {
        let mut w = FrameWriter::new();
        for f in frames {
            w.push(f).expect("encodes");
        }
        let mut buf = w.take();
        let mut out = Vec::new();
        while let Some(f) = decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).expect("decodes") {
            out.push(f);
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn a_batch_shares_one_copy_of_a_repeated_name() {
        let entry = |seq, name: &str| SendEntry {
            seq,
            quiet: true,
            message: Arc::new(Message::new(Kind::Event, name, "x")),
        };
        let frames = roundtrip(&[Frame::Send(vec![
            entry(1, "todo.created"),
            entry(2, "todo.created"),
            entry(3, "todo.deleted"),
            entry(4, "todo.deleted"),
        ])]);
        let [Frame::Send(entries)] = frames.as_slice() else {
            panic!("one SEND frame: {frames:?}");
        };
        let names: Vec<&str> = entries.iter().map(|e| e.message.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "todo.created",
                "todo.created",
                "todo.deleted",
                "todo.deleted"
            ]
        );
        let same_copy = |a: usize, b: usize| {
            entries[a].message.name.as_ptr() == entries[b].message.name.as_ptr()
        };
        assert!(same_copy(0, 1) && same_copy(2, 3));
        assert!(!same_copy(1, 2));
    }

    #[test]
    fn every_frame_roundtrips() {
        let frames = vec![
            Frame::Hello(Hello {
                version: 1,
                service: "web".into(),
                instance: "web-1".into(),
                max_in_flight: 64,
                credentials: Credentials::Token("secret".into()),
            }),
            Frame::Welcome(Welcome {
                version: 1,
                connection_id: 9,
                frame_bytes_max: 1024,
                broker: "courier".into(),
                service: None,
            }),
            Frame::Welcome(Welcome {
                version: 1,
                connection_id: 10,
                frame_bytes_max: 1024,
                broker: "courier".into(),
                service: Some("web".into()),
            }),
            Frame::Send(vec![
                SendEntry {
                    seq: 1,
                    message: Arc::new(sample(Kind::Command)),
                    quiet: false,
                },
                SendEntry {
                    seq: 2,
                    message: Arc::new(sample(Kind::Event)),
                    quiet: true,
                },
            ]),
            Frame::SendResult(vec![SendOutcome {
                seq: 1,
                code: ErrorCode::NoReceiver,
                reason: "no service receives todo.create".into(),
                log_seq: 0,
            }]),
            Frame::Subscribe(Subscribe {
                request: 3,
                pattern: "todo.*".into(),
                ack_deadline_ms: 100,
                max_deliveries: 4,
                start: StartFrom::Time(12),
            }),
            Frame::Unsubscribe {
                request: 4,
                pattern: "todo.>".into(),
            },
            Frame::Result(OpResult {
                request: 3,
                code: ErrorCode::Ok,
                reason: String::new(),
            }),
            Frame::Deliver(vec![Delivery {
                delivery: 5,
                attempt: 2,
                message: sample(Kind::Reply),
            }]),
            Frame::Ack(vec![5]),
            Frame::Nack(vec![Nack {
                delivery: 5,
                delay_ms: 10,
            }]),
            Frame::Flow { max_in_flight: 8 },
            Frame::Ping(1),
            Frame::Pong(1),
            Frame::Error(ErrorFrame {
                code: ErrorCode::MalformedFrame,
                message: "bad".into(),
            }),
            Frame::Drain,
            Frame::Drained,
        ];
        assert_eq!(roundtrip(&frames), frames);
    }

    #[test]
    fn welcome_names_the_service_only_when_it_carries_one() {
        // PROTOCOL.md §10.2: WELCOME without the service field, as a client
        // that named itself in HELLO gets it (and as older brokers sent it).
        let plain: &[u8] = &[
            0, 0, 0, 0x17, 0x02, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x80, 0, 0, 7, b'c', b'o', b'u',
            b'r', b'i', b'e', b'r',
        ];
        let welcome = |service: Option<&str>| {
            Frame::Welcome(Welcome {
                version: 1,
                connection_id: 1,
                frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
                broker: "courier".into(),
                service: service.map(str::to_string),
            })
        };
        let decode = |bytes: &[u8]| decode_frame(&mut BytesMut::from(bytes), u32::MAX);
        assert_eq!(decode(plain), Ok(Some(welcome(None))));
        let mut w = FrameWriter::new();
        w.push(&welcome(None)).expect("encodes");
        assert_eq!(&w.take()[..], plain);

        // The same with `service` appended: a str8 after `broker`.
        let mut named = plain.to_vec();
        named[3] += 4;
        named.extend_from_slice(&[3, b'w', b'e', b'b']);
        assert_eq!(decode(&named), Ok(Some(welcome(Some("web")))));
        w.push(&welcome(Some("web"))).expect("encodes");
        assert_eq!(&w.take()[..], &named[..]);

        // Nothing may follow it.
        let mut longer = named.clone();
        longer[3] += 1;
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(DecodeError::TrailingBytes {
                offset: 27,
                extra: 1
            })
        );
    }

    #[test]
    fn consecutive_entries_share_one_frame() {
        let mut w = FrameWriter::new();
        for i in 0..100 {
            w.push_send(i, &Message::new(Kind::Event, "a.b", "x"))
                .expect("encodes");
        }
        w.push_ack(1);
        w.push_ack(2);
        let mut buf = w.take();
        let first = decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT)
            .expect("ok")
            .expect("frame");
        match first {
            Frame::Send(entries) => assert_eq!(entries.len(), 100),
            other => panic!("expected one SEND of 100, got {other:?}"),
        }
        assert_eq!(
            decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).expect("ok"),
            Some(Frame::Ack(vec![1, 2]))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn unwritten_bytes_leave_first_and_nothing_merges_into_them() {
        let mut w = FrameWriter::new();
        w.push_send(1, &Message::new(Kind::Event, "a.b", "x"))
            .expect("encodes");
        w.push_send(2, &Message::new(Kind::Event, "a.b", "y"))
            .expect("encodes");
        let taken = w.take();
        // A direct write took the first 5 bytes only.
        w.push_unwritten(&taken[5..]);
        w.push_send(3, &Message::new(Kind::Event, "a.b", "z"))
            .expect("encodes");
        let mut wire = BytesMut::from(&taken[..5]);
        wire.extend_from_slice(&w.take());
        let seqs = |frame: Frame| match frame {
            Frame::Send(entries) => entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            other => panic!("expected SEND, got {other:?}"),
        };
        let first = decode_frame(&mut wire, FRAME_BYTES_MAX_DEFAULT)
            .expect("ok")
            .expect("frame");
        assert_eq!(seqs(first), [1, 2]);
        let second = decode_frame(&mut wire, FRAME_BYTES_MAX_DEFAULT)
            .expect("ok")
            .expect("frame");
        assert_eq!(
            seqs(second),
            [3],
            "a new frame, not merged into the put-back one"
        );
        assert!(wire.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        for len in [u32::MAX, (1u32 << 31) - 1, FRAME_BYTES_MAX_DEFAULT + 1] {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            assert!(matches!(
                decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT),
                Err(DecodeError::FrameTooLarge { .. })
            ));
            assert!(
                buf.capacity() < 1024,
                "must not reserve for a hostile length"
            );
        }
    }

    #[test]
    fn truncated_and_garbage_frames_are_errors_not_panics() {
        let mut w = FrameWriter::new();
        w.push_send(1, &sample(Kind::Command)).expect("encodes");
        let whole = w.take().freeze();
        // Every prefix of the body, re-framed with a matching length, must fail cleanly.
        for cut in 1..whole.len() - 4 {
            let body = whole.slice(4..4 + cut);
            assert!(decode_body(body).is_err(), "prefix of {cut} bytes decoded");
        }
        assert_eq!(
            decode_body(Bytes::from_static(&[0x7f])),
            Err(DecodeError::UnknownFrameType { frame_type: 0x7f })
        );
        let mut stray = vec![frame_type::SUBSCRIBE];
        stray.extend_from_slice(&[0; 8]); // request
        stray.extend_from_slice(&[1, b'a']); // pattern
        stray.extend_from_slice(&[0; 8]); // deadline, max deliveries
        stray.push(0); // start: new
        stray.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            decode_body(Bytes::from(stray)),
            Err(DecodeError::StrayStartTime { code: 0 }),
            "found by the fuzzer: a start time only goes with start 2"
        );
        assert_eq!(
            decode_body(Bytes::from_static(&[frame_type::ACK, 0, 0, 0, 0])),
            Err(DecodeError::EmptyBatch),
            "found by the fuzzer: an empty batch has no encoding"
        );
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut zero, 100), Err(DecodeError::EmptyFrame));
    }

    #[test]
    fn lying_batch_count_is_refused() {
        let mut body = BytesMut::new();
        body.put_u8(frame_type::ACK);
        body.put_u32(u32::MAX);
        body.put_u64(1);
        assert!(matches!(
            decode_body(body.freeze()),
            Err(DecodeError::TooManyEntries {
                count: u32::MAX,
                max: 1
            })
        ));
    }

    #[test]
    fn encoded_len_is_exact() {
        let m = sample(Kind::Command);
        let mut b = BytesMut::new();
        put_message(&mut b, &m).expect("encodes");
        assert_eq!(b.len(), encoded_message_len(&m));
        let plain = Message::new(Kind::Event, "x", "");
        let mut b = BytesMut::new();
        put_message(&mut b, &plain).expect("encodes");
        assert_eq!(b.len(), encoded_message_len(&plain));
    }

    /// A message whose DELIVER frame of one entry is exactly `len` long.
    fn message_delivered_as(len: usize) -> Message {
        let mut m = Message::new(Kind::Event, "a.b", "");
        m.sender = "svc".into();
        let fixed = delivery_frame_len(&m);
        m.payload = Bytes::from(vec![7u8; len - fixed]);
        assert_eq!(delivery_frame_len(&m), len);
        m
    }

    #[test]
    fn frame_lengths_of_one_message_are_what_the_writer_writes() {
        let m = sample(Kind::Reply);
        let mut w = FrameWriter::new();
        w.push_delivery(1, 1, &m).expect("encodes");
        let frame = w.take();
        assert_eq!(frame.len(), 4 + delivery_frame_len(&m));
        w.push_send(1, &m).expect("encodes");
        let frame = w.take();
        assert_eq!(frame.len(), 4 + send_frame_len(&m));
        assert_eq!(
            delivery_frame_len(&m) - send_frame_len(&m),
            4,
            "delivery id and attempt (12 bytes) take the place of seq (8)"
        );
    }

    #[test]
    fn a_frame_of_exactly_the_limit_is_written_and_one_byte_more_is_refused() {
        let limit = 1_000u32;
        let mut w = FrameWriter::with_frame_bytes_max(limit);
        w.push_ack(9);
        let fits = message_delivered_as(limit as usize);
        w.push_delivery(1, 1, &fits)
            .expect("exactly the limit fits");
        let over = message_delivered_as(limit as usize + 1);
        assert_eq!(
            w.push_delivery(2, 1, &over),
            Err(EncodeError::FrameTooLarge {
                len: limit as usize + 1,
                max: limit
            })
        );
        let mut buf = w.take();
        assert_eq!(
            decode_frame(&mut buf, limit).expect("ok"),
            Some(Frame::Ack(vec![9]))
        );
        let prefix = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        assert_eq!(prefix, limit, "the DELIVER frame is exactly the limit");
        match decode_frame(&mut buf, limit).expect("ok") {
            Some(Frame::Deliver(entries)) => {
                assert_eq!(entries.len(), 1, "the refused entry left nothing behind");
                assert_eq!(entries[0].message, fits);
            }
            other => panic!("expected one DELIVER, got {other:?}"),
        }
        assert!(buf.is_empty());
        let mut single = FrameWriter::with_frame_bytes_max(8);
        assert!(matches!(
            single.push(&Frame::Ping(1)),
            Err(EncodeError::FrameTooLarge { len: 9, max: 8 })
        ));
        assert!(single.is_empty());
    }

    #[test]
    fn an_entry_that_would_take_a_batch_over_the_limit_starts_the_next_frame() {
        let limit = 1_000u32;
        let mut w = FrameWriter::with_frame_bytes_max(limit);
        let small = message_delivered_as(300);
        let large = message_delivered_as(900);
        w.push_delivery(1, 1, &small).expect("encodes");
        w.push_delivery(2, 1, &small).expect("encodes");
        w.push_delivery(3, 1, &large).expect("encodes");
        w.push_delivery(4, 1, &small).expect("encodes");
        let mut buf = w.take();
        let mut batches = Vec::new();
        while buf.len() >= 4 {
            let prefix = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            assert!(prefix <= limit, "a frame of {prefix} bytes");
            match decode_frame(&mut buf, limit).expect("decodes") {
                Some(Frame::Deliver(entries)) => {
                    batches.push(entries.iter().map(|e| e.delivery).collect::<Vec<_>>())
                }
                other => panic!("expected DELIVER, got {other:?}"),
            }
        }
        assert!(buf.is_empty());
        assert_eq!(batches, vec![vec![1, 2], vec![3], vec![4]]);
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            0u8..3,
            "[a-z]{1,8}(\\.[a-z0-9_-]{1,8}){0,3}",
            any::<(u16, u16, u128, u128, u64)>(),
            proptest::option::of(any::<u128>()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            proptest::option::of(any::<u64>()),
            (
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u128>()),
            ),
            any::<(bool, bool)>(),
            proptest::collection::vec(("[a-z-]{1,10}", "\\PC{0,20}"), 0..4),
            proptest::collection::vec(any::<u8>(), 0..200),
        )
            .prop_map(
                |(
                    kind,
                    name,
                    (major, minor, id, activity, ts),
                    resp,
                    key,
                    exp,
                    (at, parent),
                    (tr, fin),
                    headers,
                    payload,
                )| {
                    Message {
                        kind: Kind::from_code(kind + 1).expect("1..=3"),
                        name: name.into(),
                        version: Version::new(major, minor),
                        id: Uuid::from_u128(id),
                        timestamp: ts,
                        activity_id: Uuid::from_u128(activity),
                        parent_id: parent.map(Uuid::from_u128),
                        response_to: resp.map(Uuid::from_u128),
                        sender: "svc".into(),
                        key: key.map(Bytes::from),
                        expires_at: exp,
                        deliver_at: at,
                        transient: tr,
                        is_final: fin,
                        headers,
                        payload: Bytes::from(payload),
                    }
                },
            )
    }

    /// Where a lone SEND entry's message starts: after length (4), type
    /// (1), count (4) and seq (8).
    const SEND_MESSAGE_AT: usize = 4 + 1 + 4 + 8;

    #[test]
    fn parent_id_is_flag_0x80_and_16_bytes_after_deliver_at() {
        let mut m = Message::new(Kind::Event, "a.b", "x");
        m.deliver_at = Some(7);
        let parent = Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        m.parent_id = Some(parent);
        let mut w = FrameWriter::new();
        w.push_send(1, &m).expect("encodes");
        let bytes = w.take();
        let message = &bytes[SEND_MESSAGE_AT..];
        assert_eq!(message[1], 0x80 | 0x20, "PARENT_ID and DELIVER_AT");
        // kind, flags, name "a.b", version, id, activity_id, timestamp,
        // empty sender, deliver_at: then the parent's 16 bytes.
        let parent_at = 1 + 1 + 4 + 4 + 16 + 16 + 8 + 1 + 8;
        assert_eq!(&message[parent_at..parent_at + 16], parent.as_bytes());
        assert_eq!(message.len(), encoded_message_len(&m));

        let frames = roundtrip(&[Frame::Send(vec![SendEntry {
            seq: 1,
            message: Arc::new(m.clone()),
            quiet: false,
        }])]);
        let [Frame::Send(entries)] = frames.as_slice() else {
            panic!("one SEND: {frames:?}");
        };
        assert_eq!(entries[0].message.parent_id, Some(parent));
        assert_eq!(*entries[0].message, m);

        let root = Message::new(Kind::Event, "a.b", "x");
        let mut w = FrameWriter::new();
        w.push_send(2, &root).expect("encodes");
        let bytes = w.take();
        assert_eq!(bytes[SEND_MESSAGE_AT + 1] & 0x80, 0, "no parent, no flag");
        let frames = roundtrip(&[Frame::Send(vec![SendEntry {
            seq: 2,
            message: Arc::new(root),
            quiet: false,
        }])]);
        let [Frame::Send(entries)] = frames.as_slice() else {
            panic!("one SEND: {frames:?}");
        };
        assert_eq!(entries[0].message.parent_id, None);
    }

    /// `docs/PROTOCOL.md` §10.5, byte for byte.
    #[test]
    fn the_documented_reply_with_its_parent_encodes_as_written() {
        let command = Uuid::parse_str("017f22e2-79b0-7cc3-98c4-dc0c0c07398f").expect("uuid");
        let mut m = Message::new(Kind::Reply, "todo.created", "ok");
        m.id = Uuid::parse_str("017f22e2-79b1-7cc3-98c4-dc0c0c073991").expect("uuid");
        m.activity_id = command;
        m.timestamp = 1_700_000_000_000_000_000;
        m.sender = "todo".into();
        m.response_to = Some(command);
        m.parent_id = Some(command);
        let mut w = FrameWriter::new();
        w.push_delivery(1, 1, &m).expect("encodes");
        let hex: Vec<String> = w.take().iter().map(|b| format!("{b:02x}")).collect();
        let documented = "00 00 00 79 08 00 00 00 01 00 00 00 00 00 00 00 \
             01 00 00 00 01 03 86 0c 74 6f 64 6f 2e 63 72 65 \
             61 74 65 64 00 01 00 00 01 7f 22 e2 79 b1 7c c3 \
             98 c4 dc 0c 0c 07 39 91 01 7f 22 e2 79 b0 7c c3 \
             98 c4 dc 0c 0c 07 39 8f 17 97 9c fe 36 2a 00 00 \
             04 74 6f 64 6f 01 7f 22 e2 79 b0 7c c3 98 c4 dc \
             0c 0c 07 39 8f 01 7f 22 e2 79 b0 7c c3 98 c4 dc \
             0c 0c 07 39 8f 00 00 00 00 00 02 6f 6b";
        assert_eq!(
            hex.join(" "),
            documented.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }

    #[test]
    fn a_version_1_writer_never_sets_the_parent_flag() {
        let m = sample(Kind::Command);
        assert!(m.parent_id.is_some());
        let mut w = FrameWriter::for_version(1);
        w.push_send(1, &m).expect("encodes");
        w.push_quiet_send(2, &m).expect("encodes");
        w.push_delivery(3, 1, &m).expect("encodes");
        let mut bytes = w.take();
        let whole = bytes.clone();
        let mut seen = 0;
        while let Some(frame) = decode_frame_as(&mut bytes, FRAME_BYTES_MAX_DEFAULT, 1)
            .expect("a version-1 reader takes what a version-1 writer wrote")
        {
            let messages: Vec<Message> = match frame {
                Frame::Send(entries) => entries.iter().map(|e| (*e.message).clone()).collect(),
                Frame::Deliver(entries) => entries.into_iter().map(|e| e.message).collect(),
                other => panic!("unexpected {other:?}"),
            };
            for got in messages {
                seen += 1;
                assert_eq!(got.parent_id, None);
                assert_eq!(
                    got,
                    Message {
                        parent_id: None,
                        ..m.clone()
                    }
                );
            }
        }
        assert_eq!(seen, 3);
        // The SEND entry's flags byte, and the whole message 16 bytes
        // shorter than at version 2.
        assert_eq!(whole[SEND_MESSAGE_AT + 1] & 0x80, 0);
        let mut v2 = FrameWriter::new();
        v2.push_send(1, &m).expect("encodes");
        assert_eq!(v2.take().len(), {
            let mut one = FrameWriter::for_version(1);
            one.push_send(1, &m).expect("encodes");
            one.take().len() + 16
        });
    }

    #[test]
    fn a_version_1_reader_refuses_the_parent_flag() {
        let mut m = Message::new(Kind::Event, "a.b", "x");
        m.parent_id = Some(Uuid::now_v7());
        let mut w = FrameWriter::new();
        w.push_delivery(1, 1, &m).expect("encodes");
        let bytes = w.take();
        match decode_frame_as(&mut bytes.clone(), FRAME_BYTES_MAX_DEFAULT, 1) {
            Err(DecodeError::UnknownFlags { flags, .. }) => assert_eq!(flags, 0x80),
            other => panic!("bit 7 must stay malformed at version 1, got {other:?}"),
        }
        assert!(decode_frame_as(&mut bytes.clone(), FRAME_BYTES_MAX_DEFAULT, 2).is_ok());
    }

    #[test]
    fn quiet_is_a_send_entry_flag_and_malformed_anywhere_else() {
        let message = sample(Kind::Event);
        let mut w = FrameWriter::new();
        w.push_quiet_send(7, &message).expect("encodes");
        let mut buf = w.take();
        // kind and flags follow length (4), type (1), count (4) and seq (8).
        let flags_at = 4 + 1 + 4 + 8 + 1;
        assert_eq!(buf[flags_at] & 0x40, 0x40, "the wire flag is 0x40");
        let quiet_entry = buf.clone();
        match decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT) {
            Ok(Some(Frame::Send(entries))) => {
                assert_eq!(entries.len(), 1);
                assert!(entries[0].quiet);
                assert_eq!(*entries[0].message, message);
            }
            other => panic!("expected one SEND entry, got {other:?}"),
        }

        // The same message bytes in a DELIVER entry (delivery + attempt
        // take the place of seq, 4 bytes longer) are refused.
        let mut deliver = BytesMut::new();
        let body = &quiet_entry[4 + 1 + 4 + 8..];
        deliver.put_u32((1 + 4 + 12 + body.len()) as u32);
        deliver.put_u8(frame_type::DELIVER);
        deliver.put_u32(1);
        deliver.put_u64(1);
        deliver.put_u32(1);
        deliver.put_slice(body);
        match decode_frame(&mut deliver, FRAME_BYTES_MAX_DEFAULT) {
            Err(DecodeError::UnknownFlags { flags, .. }) => assert_eq!(flags & 0x40, 0x40),
            other => panic!("QUIET in a delivery must be malformed, got {other:?}"),
        }
        assert!(matches!(
            decode_message(Bytes::copy_from_slice(body)),
            Err(DecodeError::UnknownFlags { .. })
        ));
    }

    proptest! {
        #[test]
        fn messages_roundtrip(messages in proptest::collection::vec(arb_message(), 1..20)) {
            let frame = Frame::Deliver(messages.into_iter().enumerate().map(|(i, message)| Delivery {
                delivery: i as u64,
                attempt: 1,
                message,
            }).collect());
            prop_assert_eq!(roundtrip(std::slice::from_ref(&frame)), vec![frame]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_frame(&mut buf, 4096) {}
        }
    }
}
