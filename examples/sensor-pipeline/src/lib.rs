//! The seeds' sensor pipeline: `sensor` publishes readings as events,
//! `worker` instances (competing: each reading goes to one of them) square
//! them and publish the results, and `app` prints the results. No service
//! names another; each knows only message names.

use courier_client::{Client, ClientOptions};
use serde::{Deserialize, Serialize};

/// Payload of `reading.taken`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reading {
    pub sensor: String,
    pub number: u64,
    pub value: i64,
}

/// Payload of `reading.squared`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Squared {
    pub reading: Reading,
    pub squared: i64,
    /// The worker instance that did it (its `COURIER_INSTANCE`).
    pub by: String,
}

/// Connects as `service` with what `courier up` (or the caller) put in the
/// environment: `COURIER_URL`, `COURIER_TOKEN`.
pub async fn connect(service: &str) -> anyhow::Result<Client> {
    let mut opts = ClientOptions::from_env();
    opts.service = service.into();
    Ok(Client::connect(opts).await?)
}

/// This process's instance name, e.g. `worker.2`.
pub fn instance(service: &str) -> String {
    std::env::var("COURIER_INSTANCE")
        .unwrap_or_else(|_| format!("{service}.{}", std::process::id()))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn stop_requested() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
