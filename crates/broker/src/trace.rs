//! Trace records: what the core did with each message it accepted, for
//! the activity traces the network edge keeps (`courier trace`).
//!
//! Observability must not cost the hot path, so the core only appends
//! compact records to a `Vec` while tracing is on — a reference count on
//! the message it already holds, the names it already shares — and the
//! network edge takes them under the lock it holds anyway
//! ([`crate::Broker::take_traces`]). Encoding, indexing, sampling and
//! disk writes all happen elsewhere, off the broker's lock.
//!
//! Deliveries that need an ack are identified by the message's store
//! `seq` (what the queues hold), not its id: the edge learns which seq is
//! which message from the `Accepted` record.

use std::sync::Arc;

use courier_proto::{Message, SharedStr};
use courier_store::Seq;

use crate::Nanos;

/// One thing the core did, in the order it did it.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceRecord {
    /// The broker accepted `message` (its `timestamp` is when).
    Accepted {
        message: Arc<Message>,
        /// Its place in the store; 0 when it is not stored (transient
        /// messages, replies, events nobody receives).
        seq: Seq,
        /// The services chosen to receive it (a reply's: the requester).
        receivers: Arc<[String]>,
    },
    /// Handed to an instance of `service`.
    Delivered {
        message: Arc<Message>,
        /// 0 for deliveries that take no ack (replies, transient messages).
        seq: Seq,
        service: SharedStr,
        instance: SharedStr,
        attempt: u32,
        at: Nanos,
    },
    /// What became of a delivery that takes an ack, by the message's seq.
    Settled {
        seq: Seq,
        service: SharedStr,
        outcome: Outcome,
        at: Nanos,
    },
}

/// The end of one delivery attempt of a stored message to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    /// The receiver asked for a retry after `delay_ms`.
    Nacked {
        delay_ms: u32,
    },
    /// Taken back for another attempt without an answer (the ack
    /// deadline passed, the receiver disconnected).
    Released {
        reason: &'static str,
    },
    /// Given up after its last attempt; now in the service's dead letters.
    DeadLettered {
        reason: &'static str,
    },
    /// Dropped undelivered: its `expires_at` passed.
    Expired,
}

impl Outcome {
    /// The word traces show for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Nacked { .. } => "nacked",
            Outcome::Released { .. } => "released",
            Outcome::DeadLettered { .. } => "dead_lettered",
            Outcome::Expired => "expired",
        }
    }
}
