//! Frames: what travels on a Courier connection, and their binary codec.
//!
//! The layout is specified byte by byte in `docs/PROTOCOL.md`; keep the two
//! in step. Every integer is big-endian. A frame is
//! `length:u32 type:u8 body`, where `length` counts the type byte and the
//! body. The decoder checks `length` against the connection's limit before it
//! buffers or allocates anything for the frame.

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

mod decode;
#[cfg(test)]
mod tests;
mod types;
mod writer;

pub use decode::{decode_body, decode_body_as, decode_frame, decode_frame_as, decode_message};
pub use types::{
    Credentials, DecodeError, Delivery, EncodeError, ErrorFrame, Frame, Hello, Nack, OpResult,
    SendEntry, SendOutcome, StartFrom, Subscribe, Welcome,
};
pub use writer::{
    delivery_frame_len, encode_message, encoded_message_len, send_frame_len, FrameWriter,
};
