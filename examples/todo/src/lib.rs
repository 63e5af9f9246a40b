//! The seeds' first example: a `web` service that serves an HTML page of
//! todos, a `todo` service that keeps them, and a `stats` service that
//! counts them. They never talk directly: `web` asks with `todos.list`
//! (reply `todos.listing`), sends `todo.create` (reply `todo.created`) and
//! asks `stats.get` (reply `stats.counted`); Courier routes every way.
//!
//! `todo` keeps its todos in SQLite and publishes the event `todo.created`
//! through the transactional outbox (courier-outbox) in the transaction
//! that inserts the todo; `stats` counts those events through the inbox,
//! in its own SQLite database, so a redelivered event counts once.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use courier_client::{Client, ConnectionEvent};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

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

/// Payload of `stats.counted`, the reply to `stats.get`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Counted {
    /// `todo.created` events counted, each once.
    pub todos_created: u64,
}

/// Opens (creating it and its directory if missing) the SQLite database at
/// the path in `variable`, or at `default` (relative to the working
/// directory: under `courier up`, the application's `.courier/`).
///
/// One connection: SQLite has one writer anyway, and transactions that
/// queue for the connection never meet a busy database.
pub async fn open_database(variable: &str, default: &str) -> anyhow::Result<SqlitePool> {
    let path = PathBuf::from(std::env::var(variable).unwrap_or_else(|_| default.to_string()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create {} for the database; set {variable} to a writable path",
                dir.display()
            )
        })?;
    }
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot open the SQLite database {}; set {variable} to a writable path",
                path.display()
            )
        })
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
