//! Transfers (a whole application for `courier up`): `teller` asks `bank`
//! to move money with the `transfer` command and hears back one of its
//! outcomes, each a reply of its own name:
//!
//! | reply | when |
//! |---|---|
//! | `transfer.transferred` | the money moved |
//! | `transfer.pending` | above [`REVIEW_ABOVE`]: held for review |
//! | `transfer.transaction-limit-exceeded` | above [`TRANSACTION_LIMIT`] |
//! | `transfer.insufficient-funds` | the balance is too small |
//! | `transfer.daily-limit-exceeded` | the sender's day would pass [`DAILY_LIMIT`] |
//! | `transfer.unknown-account` | no such account |
//! | `transfer.unauthorized` | the PIN is wrong |
//! | `transfer.internal-error` | the bank failed (its ledger) |
//!
//! `file.copy` (to `files`) answers with `file.copy.progress` replies and
//! a final `file.copy.done`.

use serde::{Deserialize, Serialize};

/// Largest single transfer.
pub const TRANSACTION_LIMIT: u64 = 5_000;
/// Most one account may send in a day.
pub const DAILY_LIMIT: u64 = 6_000;
/// Transfers above this wait for a person's review.
pub const REVIEW_ABOVE: u64 = 2_000;

/// Every outcome of `transfer`, as the replies are named.
pub const OUTCOMES: [&str; 8] = [
    "transfer.transferred",
    "transfer.pending",
    "transfer.transaction-limit-exceeded",
    "transfer.daily-limit-exceeded",
    "transfer.insufficient-funds",
    "transfer.unknown-account",
    "transfer.unauthorized",
    "transfer.internal-error",
];

/// `transfer`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    pub from: String,
    pub to: String,
    pub amount: u64,
    pub pin: String,
}

/// Every outcome's payload: what happened, in words.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub detail: String,
}

/// `file.copy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileCopy {
    pub path: String,
    pub bytes: u64,
}

/// `file.copy.progress` and `file.copy.done`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub path: String,
    pub copied: u64,
    pub bytes: u64,
}

/// The client from the environment `courier up` sets, as `service`.
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
