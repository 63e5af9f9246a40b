//! Courier's wire vocabulary: the message envelope, names and patterns,
//! frames and their codec, and the error-code table.
//!
//! Architecture invariant: this crate does no I/O and knows nothing of
//! tokio; it turns bytes into values and back, so every transport (TCP,
//! TLS, a fuzzer) shares one codec.
#![forbid(unsafe_code)]

mod envelope;
mod error_code;
mod frame;
mod id;
mod name;
pub mod pattern_index;
mod shared_str;

pub use envelope::{
    Kind, Message, Version, VersionParseError, REPLY_WINDOW_HEADER, REPLY_WINDOW_MAX,
};
pub use error_code::ErrorCode;
pub use frame::KEEPALIVE_TIMEOUT_MS_DEFAULT;
pub use frame::{
    decode_body, decode_body_as, decode_frame, decode_frame_as, decode_message, delivery_frame_len,
    encode_message, encoded_message_len, frame_type, send_frame_len, Credentials, DecodeError,
    Delivery, EncodeError, ErrorFrame, Frame, FrameWriter, Hello, Nack, OpResult, SendEntry,
    SendOutcome, StartFrom, Subscribe, Welcome, ATTEMPT_KEY_START, BATCH_BYTES_TARGET,
    BATCH_ENTRIES_MAX, FRAME_BYTES_MAX_DEFAULT, HEADERS_MAX, HELLO_MAGIC, PIPELINED_KEYS_VERSION,
    PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};
pub use id::new_id;
pub use name::{
    is_wildcard, pattern_matches, validate_name, validate_pattern, NameError, NAME_BYTES_MAX,
};
pub use shared_str::SharedStr;
