//! Courier's network edge: accepts TCP connections, speaks the frame
//! protocol, and feeds the sans-I/O [`courier_broker::Broker`].
//!
//! Architecture invariant: this is the only crate that opens sockets. The
//! broker core sits behind one mutex; a connection's reader decodes every
//! frame it has, applies them all under one lock (one group commit), and
//! encodes the resulting actions into each target connection's outbox. A
//! per-connection writer task turns an outbox into one `write` call, so
//! under load many frames share a syscall.
#![forbid(unsafe_code)]

mod accept;
mod auth;
mod backend_sync;
#[cfg(test)]
mod backend_sync_tests;
mod background;
mod clock;
mod cluster_dead_letters;
mod cluster_edge;
mod config;
mod connection;
mod console;
mod core_lock;
#[cfg(test)]
mod dispatch_tests;
mod dns;
mod gateway;
mod group_commit;
mod http;
mod inbound;
mod metrics_text;
mod openapi;
mod outbox;
mod registry;
mod server;
mod shared;
mod tail;
#[cfg(test)]
mod test_support;
mod tls;
mod trace;

pub use auth::{load_manifest, ADMIN_SERVICE};
pub use cluster_edge::ClusterNode;
pub use gateway::webhook::{webhook_signature, WebhookKey, WebhookKeyError};
pub use tls::{certificate_subject, TlsSettings, ALPN};
pub use trace::TraceSettings;

pub use config::{
    ScrubSettings, ServerConfig, ServerError, CONNECTIONS_MAX_DEFAULT, FRAME_TIMEOUT_MS_DEFAULT,
    KEEPALIVE_TIMEOUT_MS_DEFAULT, SCRUB_BYTES_PER_SEC_DEFAULT, SCRUB_PASS_INTERVAL_MS_DEFAULT,
};
pub use server::{Server, ServerHandle};

pub(crate) use accept::connect_in_process;
pub(crate) use clock::wall_nanos;
pub(crate) use outbox::Outbox;
pub(crate) use server::AbortOnDrop;
pub(crate) use shared::{Shared, Store};

use courier_broker::{ConnId, FastMap, Nanos};

pub use courier_broker::{Config as BrokerConfig, RetentionRule};
