//! What a store whose backend keeps delivery state hears from the core.
//!
//! On one machine the core *is* the delivery state: it queues every
//! accepted message for its receivers and journals what becomes of each
//! delivery. On a replicated backend (docs/SCALE-OUT.md) the backend's
//! consumers hold that state, shared by every node: a node's core delivers
//! only what its edge fetched, and tells the store how each fetched
//! message ended ([`Upstream`]) instead of journaling it.

use crate::Seq;

/// An opaque token the backend settles a fetched message by (on NATS
/// JetStream, the message's ack subject).
pub type AckHandle = String;

/// A delivery-state change for the backend to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The fetched message held at `seq` was handled (or expired unread):
    /// it is done for its service.
    Ack {
        seq: Seq,
    },
    /// Deliver it again, no sooner than `delay_ms` from now, to any
    /// instance of its service on any node.
    Nak {
        seq: Seq,
        delay_ms: u64,
    },
    /// Its attempts ran out: keep it as one of `service`'s dead letters,
    /// then settle it as done.
    DeadLetter {
        service: String,
        seq: Seq,
        attempts: u32,
        reason: String,
        /// Wall time, unix ns.
        at: u64,
    },
    /// `service` receives `pattern` from now on (idempotent). `history`
    /// other than `New`: a pattern new to the service first replays the
    /// retained events it matches (from the beginning or a time).
    Subscribe {
        service: String,
        pattern: String,
        ack_deadline_ms: u32,
        max_deliveries: u32,
        history: courier_proto::StartFrom,
    },
    Unsubscribe {
        service: String,
        pattern: String,
    },
    /// `whole`: every pattern of the service pauses (or resumes) with
    /// this change; its other patterns' changes follow.
    Pause {
        service: String,
        pattern: String,
        whole: bool,
    },
    Resume {
        service: String,
        pattern: String,
        whole: bool,
    },
    /// The registry's entry for instance `id` of `service` is now `record`
    /// (the core's encoding of the instance and its health; `None`: it
    /// left the registry). `on_bus`: the entry of a bus connection to this
    /// node, which leaves with the node; nothing waits for its write (a
    /// removal removes either kind of entry).
    Registry {
        service: String,
        id: String,
        on_bus: bool,
        record: Option<bytes::Bytes>,
    },
    /// A TTL heartbeat for instance `id` of `service` passed on this node:
    /// every node hears of it, the one running the checks too.
    RegistryHeartbeat {
        service: String,
        id: String,
    },
}
