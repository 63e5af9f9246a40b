//! `bank`: decides each `transfer` and replies with its outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use courier_client::{Client, Incoming};
use courier_example_transfer::{
    options, stop_requested, Outcome, Transfer, DAILY_LIMIT, REVIEW_ABOVE, TRANSACTION_LIMIT,
};

struct Account {
    pin: &'static str,
    balance: u64,
    sent_today: u64,
    /// The ledger entry cannot be read: every transfer fails inside.
    ledger_damaged: bool,
}

fn accounts() -> HashMap<&'static str, Account> {
    let account = |pin, balance, sent_today, ledger_damaged| Account {
        pin,
        balance,
        sent_today,
        ledger_damaged,
    };
    HashMap::from([
        ("alice", account("1111", 1_000, 0, false)),
        ("bob", account("2222", 1_000, 0, false)),
        ("carol", account("3333", 50_000, 0, false)),
        ("dave", account("4444", 100_000, 5_000, false)),
        ("erin", account("5555", 1_000, 0, true)),
    ])
}

/// The outcome of one transfer, applied to the accounts.
fn decide(accounts: &mut HashMap<&'static str, Account>, t: &Transfer) -> (&'static str, String) {
    let (Some(from), true) = (
        accounts.get(t.from.as_str()),
        accounts.contains_key(t.to.as_str()),
    ) else {
        return (
            "transfer.unknown-account",
            format!("no account {} or {}", t.from, t.to),
        );
    };
    if from.pin != t.pin {
        return ("transfer.unauthorized", format!("wrong PIN for {}", t.from));
    }
    if from.ledger_damaged {
        return (
            "transfer.internal-error",
            format!("the ledger entry of {} cannot be read", t.from),
        );
    }
    if t.amount > TRANSACTION_LIMIT {
        return (
            "transfer.transaction-limit-exceeded",
            format!(
                "{} is over the limit of {TRANSACTION_LIMIT} per transfer",
                t.amount
            ),
        );
    }
    if from.sent_today + t.amount > DAILY_LIMIT {
        return (
            "transfer.daily-limit-exceeded",
            format!(
                "{} sent {} today; {} more passes {DAILY_LIMIT}",
                t.from, from.sent_today, t.amount
            ),
        );
    }
    if from.balance < t.amount {
        return (
            "transfer.insufficient-funds",
            format!("{} has {}, not {}", t.from, from.balance, t.amount),
        );
    }
    if t.amount > REVIEW_ABOVE {
        return (
            "transfer.pending",
            format!("{} is held for review (over {REVIEW_ABOVE})", t.amount),
        );
    }
    if let Some(from) = accounts.get_mut(t.from.as_str()) {
        from.balance -= t.amount;
        from.sent_today += t.amount;
    }
    if let Some(to) = accounts.get_mut(t.to.as_str()) {
        to.balance += t.amount;
    }
    (
        "transfer.transferred",
        format!("{} moved from {} to {}", t.amount, t.from, t.to),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect(options("bank")).await?;
    let accounts = Arc::new(Mutex::new(accounts()));
    client
        .on("transfer", move |msg: Incoming| {
            let accounts = accounts.clone();
            async move {
                let transfer: Transfer = msg.json()?;
                let (outcome, detail) = match accounts.lock() {
                    Ok(mut accounts) => decide(&mut accounts, &transfer),
                    Err(_) => (
                        "transfer.internal-error",
                        "the bank's books are locked".into(),
                    ),
                };
                println!("{outcome}: {detail}");
                msg.reply(outcome, &Outcome { detail }).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
        .await?;
    println!("bank ready");
    stop_requested().await;
    client.shutdown().await;
    println!("bank stopped (drained)");
    Ok(())
}
