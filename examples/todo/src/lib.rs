//! The seeds' first example: a `web` service that serves an HTML page of
//! todos, and a `todo` service that keeps them. They never talk directly:
//! `web` asks with `todos.list` (reply `todos.listing`) and sends
//! `todo.create` (reply `todo.created`); Courier routes both ways.

use courier_client::{Client, ConnectionEvent};
use serde::{Deserialize, Serialize};

/// One todo item, as both services see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Todo {
    pub id: u64,
    pub text: String,
}

/// Payload of `todo.create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateTodo {
    pub text: String,
}

/// Payload of `todos.listing`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Listing {
    pub todos: Vec<Todo>,
}

pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on Ctrl-C or SIGTERM (what `kill`, systemd and container
/// runtimes send to stop a process).
pub async fn stop_requested() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No Ctrl-C handler here: only SIGTERM stops us.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch for SIGTERM; stop with Ctrl-C");
                ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// Logs when the connection to the bus is lost and when it is back (the
/// SDK reconnects by itself either way).
pub fn log_connection_changes(client: &Client, bus: &str) {
    let mut events = client.connection_events();
    let bus = bus.to_string();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                ConnectionEvent::Lost { reason } => {
                    tracing::warn!(%reason, "the bus (Courier broker at {bus}) is unreachable; reconnecting")
                }
                ConnectionEvent::Restored => {
                    tracing::info!("the bus (Courier broker at {bus}) is back")
                }
                _ => {}
            }
        }
    });
}
