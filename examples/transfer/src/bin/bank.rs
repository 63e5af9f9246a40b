//! `bank`: decides each `transfer` and replies with its outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use courier_client::{Client, Incoming};
use courier_example_transfer::{
    options, stop_requested, Outcome, Transfer, DAILY_LIMIT, REVIEW_ABOVE, TRANSACTION_LIMIT,
};

struct Account {
    pin: &'static str,
    balance: u64,
    /// Standing orders that go out every day, counted against the limit.
    standing_daily: u64,
    sent_today: u64,
    /// The day `sent_today` counts.
    day: u64,
    /// The ledger entry cannot be read: every transfer fails inside.
    ledger_damaged: bool,
}

fn accounts() -> HashMap<&'static str, Account> {
    let account = |pin, balance, standing_daily, ledger_damaged| Account {
        pin,
        balance,
        standing_daily,
        sent_today: 0,
        day: 0,
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

/// The outcome of one transfer on `day`, applied to the accounts.
fn decide(
    accounts: &mut HashMap<&'static str, Account>,
    t: &Transfer,
    day: u64,
) -> (&'static str, String) {
    if let Some(from) = accounts.get_mut(t.from.as_str()) {
        if from.day != day {
            from.day = day;
            from.sent_today = 0;
        }
    }
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
    if from.balance < t.amount {
        return (
            "transfer.insufficient-funds",
            format!("{} has {}, not {}", t.from, from.balance, t.amount),
        );
    }
    let today = from.standing_daily + from.sent_today;
    if today + t.amount > DAILY_LIMIT {
        return (
            "transfer.daily-limit-exceeded",
            format!(
                "{} sends {today} today; {} more passes {DAILY_LIMIT}",
                t.from, t.amount
            ),
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
    // How long the bank's day lasts: short in the example, so the daily
    // limits reset while you watch.
    let day_seconds: u64 = match std::env::var("BANK_DAY_SECONDS") {
        Ok(s) => s
            .parse()
            .context("BANK_DAY_SECONDS must be a number of seconds, e.g. 86400")?,
        Err(_) => 86_400,
    };
    let client = Client::connect(options("bank")).await?;
    let accounts = Arc::new(Mutex::new(accounts()));
    client
        .on("transfer", move |msg: Incoming| {
            let accounts = accounts.clone();
            async move {
                let transfer: Transfer = msg.json()?;
                let (outcome, detail) = match accounts.lock() {
                    Ok(mut accounts) => decide(&mut accounts, &transfer, today(day_seconds)),
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

/// The number of the current day, days being `day_seconds` long.
fn today(day_seconds: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    now / day_seconds.max(1)
}
