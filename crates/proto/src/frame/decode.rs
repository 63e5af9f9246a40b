//! The decoder: bytes in, frames and messages out, every length checked
//! before anything is allocated for it.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use uuid::Uuid;

use super::*;
use crate::envelope::{Kind, Message, Version};
use crate::{ErrorCode, SharedStr};

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
