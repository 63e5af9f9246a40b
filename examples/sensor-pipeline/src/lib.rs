//! The sensor pipeline (a whole application for `courier up`): `sensor`
//! publishes `reading.taken`, each reading goes to one of the competing
//! `worker` instances, which publishes `reading.squared`, which `app`
//! logs. Each service names only messages, never another service.

use serde::{Deserialize, Serialize};

/// `reading.taken`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reading {
    /// Counts up from 1 per sensor run.
    pub seq: u64,
    pub value: i64,
}

/// `reading.squared`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Squared {
    pub seq: u64,
    pub value: i64,
    pub square: i64,
    /// Which worker instance did it (`COURIER_INSTANCE`), to show that
    /// instances share the work.
    pub worker: String,
}

/// The client from the environment `courier up` sets (`COURIER_URL`,
/// `COURIER_TOKEN`), as `service`.
pub fn options(service: &str) -> courier_client::ClientOptions {
    let mut opts = courier_client::ClientOptions::from_env();
    opts.service = service.into();
    opts
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
