//! Relayed keyed deliveries (docs/SCALE-OUT.md §5 "Other nodes'
//! instances"): the keyed lane's holder hands a service's keyed messages
//! to its instances on other nodes through one relay per node. A node
//! with instances of the service that does not hold the lane *pulls*:
//! every [`PULL_EVERY`] (and when its instances change) it tells the
//! holder, on [`pull_subject`], their patterns and how many deliveries
//! they take at once ([`Pull`]). The holder delivers on
//! [`deliver_subject`]; each delivery names the subject its outcome goes
//! back to ([`RelayHandle`]), which the receiving node's store uses as the
//! message's ack handle: `+ACK`, `-NAK` and `+WPI` reach the holder as
//! they would reach JetStream.
//!
//! A NAK of a keyed delivery takes the key back at the holder, with every
//! later delivery of it already on its way; the receiving node drops
//! those ([`GivenBack`]) until the holder starts the key again (the
//! key-start bit of the attempt, as on a version-4 connection).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::names::service_token;

/// How often a node with instances of a service pulls from the keyed
/// lane's holder, to say it is still there.
pub const PULL_EVERY: Duration = Duration::from_secs(2);
/// A relay whose node has not pulled for this long is closed once
/// nothing is out on it, or at once when its node is gone.
pub const RELAY_IDLE: Duration = Duration::from_secs(6);

/// The delivery's service.
pub const SERVICE_HEADER: &str = "Courier-Service";
/// The delivery's attempt, with bit 31 set at a key's start.
pub const ATTEMPT_HEADER: &str = "Courier-Attempt";
/// Where the delivery's outcome goes ([`RelayHandle`]).
pub const SETTLE_HEADER: &str = "Courier-Settle";

/// Where the holder of `service`'s keyed lane hears pulls.
pub fn pull_subject(service: &str) -> String {
    format!("courier.lane.{}.pull", service_token(service))
}

/// Where `node` takes relayed deliveries.
pub fn deliver_subject(node: &str) -> String {
    format!("courier.node.{node}.relay")
}

/// Every outcome of `node`'s relayed deliveries.
pub fn settled_subjects(node: &str) -> String {
    format!("courier.relayed.{node}.>")
}

/// What a pulling node says of its instances of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    pub node: String,
    /// The patterns its consuming instances subscribed.
    pub patterns: Vec<String>,
    /// How many deliveries they take at once, together.
    pub capacity: u32,
}

/// The holder's answer to a pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullAnswer {
    pub holder: String,
    /// The relay's number on its holder, unique to the holder's run.
    pub relay: u64,
}

/// A relayed delivery's ack handle: the subject its outcome goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayHandle {
    /// The holder's node id.
    pub holder: String,
    pub relay: u64,
    pub delivery: u64,
    /// The message's seq in `COURIER_MSGS` (names its dead letter).
    pub stream_seq: u64,
}

impl RelayHandle {
    pub fn subject(&self) -> String {
        format!(
            "courier.relayed.{}.{}.{}.{}",
            self.holder, self.relay, self.delivery, self.stream_seq
        )
    }

    pub fn parse(subject: &str) -> Option<RelayHandle> {
        let rest = subject.strip_prefix("courier.relayed.")?;
        let mut tokens = rest.rsplitn(4, '.');
        let stream_seq = tokens.next()?.parse().ok()?;
        let delivery = tokens.next()?.parse().ok()?;
        let relay = tokens.next()?.parse().ok()?;
        let holder = tokens.next().filter(|h| !h.is_empty())?.to_string();
        Some(RelayHandle {
            holder,
            relay,
            delivery,
            stream_seq,
        })
    }
}

/// An outcome the holder heard for a relayed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    Nak {
        delay_ms: u32,
    },
    /// Work in progress: nothing for the holder, which keeps the message
    /// alive on JetStream while it is out.
    InProgress,
    /// No instance on the relay's node takes the service any more: the
    /// holder closes the relay, and what is out on it goes back.
    Gone,
}

/// The body of [`Outcome::Gone`].
pub const GONE: &[u8] = b"-GONE";

impl Outcome {
    /// JetStream's ack bodies, as the receiving node's store sends them.
    pub fn parse(body: &[u8]) -> Option<Outcome> {
        let text = std::str::from_utf8(body).ok()?.trim();
        match text {
            "+ACK" => return Some(Outcome::Ack),
            "+WPI" => return Some(Outcome::InProgress),
            "-NAK" => return Some(Outcome::Nak { delay_ms: 0 }),
            "-GONE" => return Some(Outcome::Gone),
            _ => {}
        }
        #[derive(Deserialize)]
        struct Delay {
            delay: u64,
        }
        let delay: Delay = serde_json::from_str(text.strip_prefix("-NAK")?.trim()).ok()?;
        let delay_ms = u32::try_from(delay.delay / 1_000_000).unwrap_or(u32::MAX);
        Some(Outcome::Nak { delay_ms })
    }
}

/// The keys a node gave back to a relay's holder, whose deliveries still
/// on their way are stale until the holder starts the key again; and the
/// relays whose holder no longer leads their lane for this node.
#[derive(Debug, Default)]
pub struct GivenBack {
    keys: Mutex<HashSet<(String, u64, Bytes)>>,
    /// The last [`RETIRED_KEPT`] relays retired, oldest first.
    retired: Mutex<VecDeque<(String, u64)>>,
}

/// How many retired relays a node remembers: a service's holder changes
/// rarely, and a relay's deliveries still on their way arrive within
/// moments of its retirement.
const RETIRED_KEPT: usize = 256;

/// What to do with a relayed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Hand it to the core.
    Take,
    /// Its key was given back and has not started again: the holder took
    /// the key's later deliveries back with it; drop it.
    Stale,
    /// Its relay was retired: give it back to its holder (`-NAK`), which
    /// no longer leads the lane and returns it to the backend for the
    /// next holder.
    Retired,
}

impl GivenBack {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashSet<(String, u64, Bytes)>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn retired(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, u64)>> {
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This node NAKed a delivery of `key` it took through `handle`'s relay.
    pub fn given_back(&self, handle: &RelayHandle, key: &Bytes) {
        self.keys()
            .insert((handle.holder.clone(), handle.relay, key.clone()));
    }

    /// Whether a delivery that came through `handle`'s relay may be
    /// handled: not one of a retired relay, nor of a key given back
    /// unless it starts the key.
    pub fn admit(&self, handle: &RelayHandle, key: Option<&Bytes>, key_start: bool) -> Admission {
        if self
            .retired()
            .iter()
            .any(|(holder, relay)| *holder == handle.holder && *relay == handle.relay)
        {
            return Admission::Retired;
        }
        let Some(key) = key else {
            return Admission::Take;
        };
        let entry = (handle.holder.clone(), handle.relay, key.clone());
        let mut keys = self.keys();
        if key_start {
            keys.remove(&entry);
            return Admission::Take;
        }
        if keys.contains(&entry) {
            Admission::Stale
        } else {
            Admission::Take
        }
    }

    /// Another node took the lane (or this node's pull is answered by
    /// another relay): nothing of `holder`'s `relay` is handled here any
    /// more, and its keys are forgotten.
    pub fn retire_relay(&self, holder: &str, relay: u64) {
        self.keys()
            .retain(|(h, r, _)| !(h == holder && *r == relay));
        let mut retired = self.retired();
        if retired.len() == RETIRED_KEPT {
            retired.pop_front();
        }
        retired.push_back((holder.to_string(), relay));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_reads_back_as_written() {
        let handle = RelayHandle {
            holder: "n-abc".to_string(),
            relay: 7,
            delivery: 12,
            stream_seq: 99,
        };
        assert_eq!(RelayHandle::parse(&handle.subject()), Some(handle));
        assert_eq!(RelayHandle::parse("$JS.ACK.x.y.1.2.3.4.5"), None);
        assert_eq!(RelayHandle::parse("courier.relayed.1.2.3"), None);
    }

    #[test]
    fn ack_bodies_read_as_outcomes() {
        assert_eq!(Outcome::parse(b"+ACK"), Some(Outcome::Ack));
        assert_eq!(Outcome::parse(b"+WPI"), Some(Outcome::InProgress));
        assert_eq!(Outcome::parse(b"-NAK"), Some(Outcome::Nak { delay_ms: 0 }));
        assert_eq!(
            Outcome::parse(b"-NAK {\"delay\": 250000000}"),
            Some(Outcome::Nak { delay_ms: 250 })
        );
        assert_eq!(Outcome::parse(GONE), Some(Outcome::Gone));
        assert_eq!(Outcome::parse(b"+TERM"), None);
    }

    #[test]
    fn a_key_given_back_is_stale_until_it_starts_again() {
        let given_back = GivenBack::default();
        let handle = RelayHandle {
            holder: "h".to_string(),
            relay: 1,
            delivery: 1,
            stream_seq: 1,
        };
        let key = Bytes::from_static(b"k");
        let take = |key_start| given_back.admit(&handle, Some(&key), key_start);
        assert_eq!(take(false), Admission::Take);
        given_back.given_back(&handle, &key);
        assert_eq!(take(false), Admission::Stale);
        assert_eq!(
            given_back.admit(&handle, None, false),
            Admission::Take,
            "unkeyed"
        );
        assert_eq!(take(true), Admission::Take);
        assert_eq!(take(false), Admission::Take);
    }

    #[test]
    fn nothing_of_a_retired_relay_is_taken_and_the_oldest_retirement_goes_first() {
        let given_back = GivenBack::default();
        let handle = |holder: &str, relay| RelayHandle {
            holder: holder.to_string(),
            relay,
            delivery: 1,
            stream_seq: 1,
        };
        let key = Bytes::from_static(b"k");
        given_back.given_back(&handle("a", 1), &key);
        given_back.retire_relay("a", 1);
        for key_start in [false, true] {
            assert_eq!(
                given_back.admit(&handle("a", 1), Some(&key), key_start),
                Admission::Retired
            );
        }
        assert_eq!(
            given_back.admit(&handle("a", 1), None, false),
            Admission::Retired
        );
        assert_eq!(
            given_back.admit(&handle("a", 2), Some(&key), false),
            Admission::Take
        );
        assert_eq!(
            given_back.admit(&handle("b", 1), Some(&key), false),
            Admission::Take
        );

        for relay in 2..=RETIRED_KEPT as u64 {
            given_back.retire_relay("a", relay);
        }
        assert_eq!(
            given_back.admit(&handle("a", 1), None, false),
            Admission::Retired
        );
        given_back.retire_relay("b", 1);
        assert_eq!(
            given_back.admit(&handle("a", 1), None, false),
            Admission::Take
        );
        assert_eq!(
            given_back.admit(&handle("b", 1), None, false),
            Admission::Retired
        );
    }
}
