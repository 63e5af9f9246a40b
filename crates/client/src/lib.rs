//! The Courier SDK for Rust services.
//!
//! A service embeds one [`Client`]. It sends commands ([`Client::send`]),
//! publishes events ([`Client::publish`]), asks and awaits replies
//! ([`Client::request`], [`Client::request_stream`]), and handles the
//! commands and events it receives ([`Client::on`]). The client reconnects
//! by itself after a broker restart (or, given several brokers in
//! [`ClientOptions::url`], to the next one), subscribes again, and re-sends
//! what was not yet acknowledged (safe: the broker drops duplicates by id).
//!
//! ```
//! use courier_client::{Client, ClientOptions};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Todo { text: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A broker in this process, on a free port (normally: `courier serve`).
//! # let config = courier_server::ServerConfig { listen: "127.0.0.1:0".parse()?, ..Default::default() };
//! # let server = courier_server::Server::bind(config, Box::new(courier_store::MemoryStore::new())).await?;
//! # let url = server.local_addr()?.to_string();
//! # tokio::spawn(server.run());
//! // The todo service: handles todo.create and replies todo.created.
//! let todo = Client::connect(ClientOptions::new(&url, "todo")).await?;
//! todo.on("todo.create", |msg| async move {
//!     let new: Todo = msg.json()?;
//!     msg.reply("todo.created", &new).await?;
//!     Ok::<(), courier_client::Error>(())
//! }).await?;
//!
//! // The web service: asks and awaits the reply.
//! let web = Client::connect(ClientOptions::new(&url, "web")).await?;
//! let reply = web.request("todo.create", &Todo { text: "milk".into() }).await?;
//! assert_eq!(reply.name(), "todo.created");
//! let created: Todo = reply.json()?;
//! assert_eq!(created.text, "milk");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod builder;
mod client;
mod connection;
mod discovery;
mod error;
mod events;
mod handler;
mod handshake;
pub mod http;
mod options;
#[cfg(feature = "otel")]
mod otel;
mod pending;
mod reply;
mod send;
mod state;
mod sync;
mod trace_context;

use courier_proto::Message;
use uuid::Uuid;

pub use courier_proto::{self as proto, ErrorCode, StartFrom};
pub use courier_resilience::{
    self as resilience, Backoff, Balance, BreakerConfig, BreakerState, Idempotency, Policy,
    PolicySnapshot,
};
pub use discovery::{Discovery, Endpoint, Endpoints};
pub use error::{Error, Result};
pub use events::{ConnectionEvent, ConnectionEvents};
pub use handler::{BoxError, Incoming};
pub use trace_context::{TraceParent, TRACEPARENT};

pub use builder::MessageBuilder;
pub use client::Client;
pub use options::{BoxRead, BoxWrite, ClientOptions, ClientTls, Connecting, Connector};
pub use reply::{PendingAck, Receipt, Reply, ReplyStream};
pub(crate) use state::{Inner, State};

/// Bytes of quiet sends that may wait for the socket before
/// [`MessageBuilder::send_quiet`] waits for room.
pub const QUIET_BUFFER_BYTES_MAX: usize = 1024 * 1024;

tokio::task_local! {
    /// The message being handled on this task.
    static HANDLING: Handling;
}

/// What a message sent while handling another inherits from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Handling {
    activity: Uuid,
    /// The handled message: the parent of everything sent now.
    message: Uuid,
    pub(crate) trace: TraceParent,
}

impl Handling {
    pub(crate) fn of(message: &Message) -> Handling {
        Handling {
            activity: message.activity_id,
            message: message.id,
            trace: TraceParent::of(message),
        }
    }

    /// Makes `message` a consequence of the handled one: same activity,
    /// the handled message as its parent, a child of its trace.
    pub(crate) fn mark(&self, message: &mut Message) {
        message.activity_id = self.activity;
        message.parent_id = Some(self.message);
        trace_context::set_traceparent(message, &self.trace.child(message.id));
        mark_current_span(message);
    }
}

/// With the `otel` feature, a message sent while an OpenTelemetry span is
/// current names that span as its sender in `traceparent` (a handler's
/// span, or the program's own, e.g. an HTTP request's).
fn mark_current_span(message: &mut Message) {
    #[cfg(feature = "otel")]
    if let Some(span) = otel::current() {
        trace_context::set_traceparent(message, &span);
    }
    #[cfg(not(feature = "otel"))]
    let _ = message;
}

/// The activity id a message sent now would carry: the one of the message
/// being handled, if this runs inside a handler.
pub fn current_activity() -> Option<Uuid> {
    HANDLING.try_with(|h| h.activity).ok()
}

/// The `parent_id` a message sent now would carry: the id of the message
/// being handled, if this runs inside a handler.
pub fn current_message() -> Option<Uuid> {
    HANDLING.try_with(|h| h.message).ok()
}
