//! The I/O edge of a Courier node on a NATS JetStream cluster
//! (docs/SCALE-OUT.md): the connection to several servers, the streams
//! and KV buckets every node needs (created or checked at start), the
//! durability check, leases, the node registry, the broker core's store
//! on the cluster ([`store::ClusterStore`]), the fetch loops that feed it
//! ([`fetch`]) and the subscription table ([`services`]).
//!
//! A node starts by [`connect`]ing, running [`durability::check`] and
//! [`provision`], then [`nodes::register`]ing itself.

pub mod ack_subject;
mod connect;
pub mod consumers;
pub mod dead_letters;
pub mod durability;
pub mod fetch;
pub mod in_progress;
pub mod lease;
pub mod model;
pub mod names;
pub mod nodes;
pub mod parked;
mod provision;
pub mod reclaim;
pub mod relay;
pub mod replay;
pub mod service_registry;
pub mod services;
pub mod store;

pub use connect::{
    connect, Auth, Backend, BackendError, ConnectError, Connection, Credentials, CredentialsError,
    CONNECT_TIMEOUT, JETSTREAM_TIMEOUT,
};
pub use names::{NodeId, NodeIdError};
pub use provision::{provision, Difference, Mismatch, ProvisionError, Provisioned, Settings};
