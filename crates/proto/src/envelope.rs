//! The message envelope of DESIGN §2.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use thiserror::Error;
use uuid::Uuid;

use crate::SharedStr;

/// What a message is for; it decides how the broker routes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Imperative; handled by one instance of each receiving service.
    /// Refused when no service receives its name.
    Command,
    /// A fact; delivered to one instance of every subscribed service.
    Event,
    /// An answer to a command, routed to the requester by `response_to`.
    Reply,
}

impl Kind {
    pub fn code(self) -> u8 {
        match self {
            Kind::Command => 1,
            Kind::Event => 2,
            Kind::Reply => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Kind> {
        match code {
            1 => Some(Kind::Command),
            2 => Some(Kind::Event),
            3 => Some(Kind::Reply),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Event => "event",
            Kind::Reply => "reply",
        }
    }
}

/// A contract version, `MAJOR.MINOR`. A receiver of `1.x` accepts `1.y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    pub const fn new(major: u16, minor: u16) -> Version {
        Version { major, minor }
    }
}

impl Default for Version {
    fn default() -> Self {
        Version::new(1, 0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("version {0:?} is not MAJOR.MINOR (for example 1.2)")]
pub struct VersionParseError(pub String);

impl FromStr for Version {
    type Err = VersionParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || VersionParseError(text.to_string());
        let (major, minor) = match text.split_once('.') {
            Some((major, minor)) => (major, minor),
            None => (text, "0"),
        };
        Ok(Version {
            major: major.parse().map_err(|_| err())?,
            minor: minor.parse().map_err(|_| err())?,
        })
    }
}

/// The command header that asks for a flow-controlled reply stream
/// (`docs/PROTOCOL.md` §8.8); its value is the window, in replies, as
/// decimal digits.
pub const REPLY_WINDOW_HEADER: &str = "courier-reply-window";
/// The largest reply window a request may ask for.
pub const REPLY_WINDOW_MAX: u32 = 65_536;

/// One message on the bus: the envelope of DESIGN §2 plus its payload.
///
/// `timestamp` and `sender` are set by the broker when it accepts the
/// message; whatever a client puts there is overwritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub name: SharedStr,
    pub version: Version,
    /// Unique per message (UUID v7); the broker's dedup key.
    pub id: Uuid,
    /// Unix nanoseconds at which the broker accepted the message.
    pub timestamp: u64,
    pub activity_id: Uuid,
    /// The message that was being handled when this one was sent (its
    /// cause); `None` for a message that starts an activity. Carried on
    /// the wire from protocol version 2 (flag `0x80`).
    pub parent_id: Option<Uuid>,
    /// The command a reply answers.
    pub response_to: Option<Uuid>,
    /// The authenticated service that sent the message (shared: the
    /// broker stamps every message of a connection with one copy).
    pub sender: SharedStr,
    /// Ordering key: same key ⇒ in order, one at a time per receiving service.
    pub key: Option<Bytes>,
    /// Unix nanoseconds after which the message is dropped undelivered.
    pub expires_at: Option<u64>,
    /// Unix nanoseconds before which the message is not delivered.
    pub deliver_at: Option<u64>,
    /// At most once, in memory only.
    pub transient: bool,
    /// On a reply: no more replies follow.
    pub is_final: bool,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Message {
    /// Gives the payload and the key allocations of their own. A decoded
    /// message's bytes are slices of the connection's read buffer (64 KiB
    /// at a time); one kept for long — in a queue, parked, held — would
    /// keep that whole buffer alive.
    pub fn detach(&mut self) {
        self.payload = Bytes::copy_from_slice(&self.payload);
        if let Some(key) = &mut self.key {
            *key = Bytes::copy_from_slice(key);
        }
    }

    /// A message with a fresh id, version 1.0 and no options set. It
    /// starts a new activity, named after it: its `activity_id` is its own
    /// id (unique as any fresh id, at half the random bits per message);
    /// messages sent while handling it inherit that activity instead.
    ///
    /// ```
    /// use courier_proto::{Kind, Message};
    /// let m = Message::new(Kind::Command, "todo.create", "{}");
    /// assert_eq!(m.name, "todo.create");
    /// assert_eq!(m.id.get_version_num(), 7);
    /// assert_eq!(m.activity_id, m.id);
    /// ```
    pub fn new(kind: Kind, name: impl Into<SharedStr>, payload: impl Into<Bytes>) -> Message {
        let id = crate::id::new_id();
        let activity_id = id;
        Message {
            kind,
            name: name.into(),
            version: Version::default(),
            id,
            timestamp: 0,
            activity_id,
            parent_id: None,
            response_to: None,
            sender: SharedStr::new(),
            key: None,
            expires_at: None,
            deliver_at: None,
            transient: false,
            is_final: kind == Kind::Reply,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
