//! The one table of numeric error codes on the wire. A retired code is
//! never reused; new codes are appended.

use std::fmt;

macro_rules! error_codes {
    ($($name:ident = $code:literal, $text:literal;)*) => {
        /// A numeric wire code, carried in SEND_RESULT, RESULT and ERROR frames.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($name,)*
            /// A code this build does not know (sent by a newer peer).
            Unknown(u16),
        }

        impl ErrorCode {
            pub fn as_u16(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $code,)*
                    ErrorCode::Unknown(code) => code,
                }
            }

            pub fn from_u16(code: u16) -> ErrorCode {
                match code {
                    $($code => ErrorCode::$name,)*
                    other => ErrorCode::Unknown(other),
                }
            }

            /// A short, stable, machine-friendly name (`no_receiver`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                    ErrorCode::Unknown(_) => "unknown",
                }
            }

            /// Every known code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];
        }
    };
}

error_codes! {
    Ok = 0, "ok";
    MalformedFrame = 1, "malformed_frame";
    FrameTooLarge = 2, "frame_too_large";
    UnsupportedVersion = 3, "unsupported_version";
    HandshakeRequired = 4, "handshake_required";
    InvalidName = 5, "invalid_name";
    NoReceiver = 6, "no_receiver";
    Expired = 7, "expired";
    UnknownDelivery = 8, "unknown_delivery";
    StorageFailed = 9, "storage_failed";
    Unauthorized = 10, "unauthorized";
    InvalidPattern = 11, "invalid_pattern";
    UnknownRequest = 12, "unknown_request";
    PayloadTooLarge = 13, "payload_too_large";
    Internal = 14, "internal";
    RateLimited = 15, "rate_limited";
    ShuttingDown = 16, "shutting_down";
    InvalidMessage = 17, "invalid_message";
    HandshakeTimeout = 18, "handshake_timeout";
    SlowConsumer = 19, "slow_consumer";
    NotSubscribed = 20, "not_subscribed";
    TooManyConnections = 21, "too_many_connections";
    ReadTimeout = 22, "read_timeout";
    StreamFull = 23, "stream_full";
    AckDeadlinePassed = 24, "ack_deadline_passed";
}

impl ErrorCode {
    pub fn is_ok(self) -> bool {
        self == ErrorCode::Ok
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_roundtrip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_u16()), "duplicate code {code}");
            assert_eq!(ErrorCode::from_u16(code.as_u16()), *code);
        }
        assert_eq!(ErrorCode::from_u16(9999), ErrorCode::Unknown(9999));
    }
}
