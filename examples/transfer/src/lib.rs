//! The seeds' transfer example. A `transfer` command is answered by a reply
//! named after its outcome — `transfer.transferred`, `transfer.pending`,
//! `transfer.transaction-limit-exceeded`, `transfer.daily-limit-exceeded`,
//! `transfer.insufficient-funds`, `transfer.unknown-account`,
//! `transfer.unauthorized` or `transfer.internal-error` — so the broker's
//! metrics count outcomes per command (`courier_command_replies_total`).
//! A `file.copy` command is answered by a stream: `file.copy.progress`
//! replies, then a final `file.copied`.

use std::collections::BTreeMap;

use courier_client::{Client, ClientOptions};
use serde::{Deserialize, Serialize};

/// Payload of `transfer`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Transfer {
    pub from: String,
    pub to: String,
    /// In cents.
    pub amount: u64,
    /// Who asks; only an account's owner may move its money.
    pub by: String,
}

/// Every outcome a transfer can have, as its reply's name.
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

/// Above this a single transfer is refused.
pub const TRANSACTION_LIMIT: u64 = 100_000;
/// At most this much leaves an account per day.
pub const DAILY_LIMIT: u64 = 250_000;
/// From this amount a transfer waits for a second approval.
pub const REVIEW_FROM: u64 = 50_000;

/// One account: owner, balance and what left it today, in cents.
#[derive(Debug, Clone)]
pub struct Account {
    pub owner: String,
    pub balance: u64,
    pub sent_today: u64,
}

/// The bank's books: the pure decision, apart from the bus.
#[derive(Debug, Clone, Default)]
pub struct Books {
    pub accounts: BTreeMap<String, Account>,
}

impl Books {
    /// The demo's accounts.
    pub fn opening() -> Books {
        let mut accounts = BTreeMap::new();
        for (id, owner, balance) in [
            ("alice-1", "alice", 1_000_000),
            ("bob-1", "bob", 20_000),
            ("carol-1", "carol", 500_000),
        ] {
            accounts.insert(
                id.to_string(),
                Account {
                    owner: owner.to_string(),
                    balance,
                    sent_today: 0,
                },
            );
        }
        Books { accounts }
    }

    /// Decides a transfer and books it; returns the outcome's name.
    pub fn transfer(&mut self, t: &Transfer) -> &'static str {
        if t.from == t.to || t.amount == 0 {
            return "transfer.internal-error";
        }
        if !self.accounts.contains_key(&t.to) {
            return "transfer.unknown-account";
        }
        let Some(from) = self.accounts.get(&t.from) else {
            return "transfer.unknown-account";
        };
        if from.owner != t.by {
            return "transfer.unauthorized";
        }
        if t.amount > TRANSACTION_LIMIT {
            return "transfer.transaction-limit-exceeded";
        }
        if from.sent_today + t.amount > DAILY_LIMIT {
            return "transfer.daily-limit-exceeded";
        }
        if from.balance < t.amount {
            return "transfer.insufficient-funds";
        }
        let pending = t.amount >= REVIEW_FROM;
        if let Some(from) = self.accounts.get_mut(&t.from) {
            from.balance -= t.amount;
            from.sent_today += t.amount;
        }
        if pending {
            // Held until approved; the money has left the sender.
            return "transfer.pending";
        }
        if let Some(to) = self.accounts.get_mut(&t.to) {
            to.balance += t.amount;
        }
        "transfer.transferred"
    }
}

/// Payload of `file.copy`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileCopy {
    pub from: String,
    pub to: String,
    pub bytes: u64,
}

/// Payload of `file.copy.progress` and `file.copied`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub copied: u64,
    pub of: u64,
}

/// Connects as `service` with what `courier up` put in the environment.
pub async fn connect(service: &str) -> anyhow::Result<Client> {
    let mut opts = ClientOptions::from_env();
    opts.service = service.into();
    Ok(Client::connect(opts).await?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(from: &str, to: &str, amount: u64, by: &str) -> Transfer {
        Transfer {
            from: from.into(),
            to: to.into(),
            amount,
            by: by.into(),
        }
    }

    #[test]
    fn every_outcome_is_reachable_and_money_is_kept() {
        let mut books = Books::opening();
        let total = |b: &Books| b.accounts.values().map(|a| a.balance).sum::<u64>();
        let before = total(&books);
        assert_eq!(
            books.transfer(&t("alice-1", "bob-1", 1_000, "alice")),
            "transfer.transferred"
        );
        assert_eq!(total(&books), before);
        assert_eq!(
            books.transfer(&t("alice-1", "bob-1", 60_000, "alice")),
            "transfer.pending"
        );
        assert_eq!(
            books.transfer(&t("alice-1", "bob-1", 150_000, "alice")),
            "transfer.transaction-limit-exceeded"
        );
        assert_eq!(
            books.transfer(&t("alice-1", "bob-1", 99_000, "alice")),
            "transfer.pending"
        );
        assert_eq!(
            books.transfer(&t("alice-1", "bob-1", 99_000, "alice")),
            "transfer.daily-limit-exceeded"
        );
        assert_eq!(
            books.transfer(&t("bob-1", "alice-1", 30_000, "bob")),
            "transfer.insufficient-funds"
        );
        assert_eq!(
            books.transfer(&t("nobody", "alice-1", 1, "x")),
            "transfer.unknown-account"
        );
        assert_eq!(
            books.transfer(&t("carol-1", "alice-1", 1, "bob")),
            "transfer.unauthorized"
        );
        assert_eq!(
            books.transfer(&t("carol-1", "carol-1", 1, "carol")),
            "transfer.internal-error"
        );
    }
}
