//! The frames and their parts as values, and the codec's errors.

use std::sync::Arc;

use thiserror::Error;

use super::HEADERS_MAX;
use crate::envelope::Message;
use crate::ErrorCode;

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
