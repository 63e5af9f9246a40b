//! `teller`: asks for one transfer of each outcome and one file copy, then
//! pauses `TELLER_PAUSE_MS` (default 2000) and asks again.

use std::time::Duration;

use anyhow::Context as _;
use courier_client::Client;
use courier_example_transfer::{options, stop_requested, FileCopy, Progress, Transfer};

/// (from, to, amount, pin): one of each outcome, in the bank's order.
const SCRIPT: [(&str, &str, u64, &str); 9] = [
    ("alice", "bob", 100, "1111"),     // transferred
    ("bob", "alice", 100, "2222"),     // transferred (back)
    ("carol", "alice", 2_500, "3333"), // pending
    ("alice", "bob", 9_000, "1111"),   // transaction limit exceeded
    ("alice", "bob", 1_900, "1111"),   // insufficient funds
    ("dave", "bob", 1_500, "4444"),    // daily limit exceeded
    ("alice", "zed", 10, "1111"),      // unknown account
    ("bob", "alice", 10, "0000"),      // unauthorized
    ("erin", "bob", 10, "5555"),       // internal error
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pause_ms: u64 = match std::env::var("TELLER_PAUSE_MS") {
        Ok(ms) => ms
            .parse()
            .context("TELLER_PAUSE_MS must be milliseconds, e.g. 2000")?,
        Err(_) => 2_000,
    };
    let client = Client::connect(options("teller")).await?;
    println!("teller ready");
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut round = 0u64;
    loop {
        round += 1;
        tokio::select! {
            _ = &mut stop => break,
            _ = one_round(&client, round) => {}
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(pause_ms)) => {}
        }
    }
    client.shutdown().await;
    println!("teller stopped");
    Ok(())
}

async fn one_round(client: &Client, round: u64) {
    for (from, to, amount, pin) in SCRIPT {
        let transfer = Transfer {
            from: from.into(),
            to: to.into(),
            amount,
            pin: pin.into(),
        };
        match client.request("transfer", &transfer).await {
            Ok(reply) => println!("transfer {amount} {from} -> {to}: {}", reply.name()),
            Err(e) => println!("transfer {amount} {from} -> {to} not answered: {e}"),
        }
    }
    let copy = FileCopy {
        path: format!("statements/round-{round}.pdf"),
        bytes: 4_000_000,
    };
    let mut stream = match client.request_stream("file.copy", &copy).await {
        Ok(stream) => stream,
        Err(e) => {
            println!("file.copy not sent: {e}");
            return;
        }
    };
    while let Some(reply) = stream.next_reply().await {
        match reply.and_then(|r| Ok((r.name().to_string(), r.json::<Progress>()?))) {
            Ok((name, p)) => println!("{name}: {} {}/{} bytes", p.path, p.copied, p.bytes),
            Err(e) => {
                println!("file.copy failed: {e}");
                return;
            }
        }
    }
}
