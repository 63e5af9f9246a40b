//! Asks for a round of transfers (one of each outcome) and a file copy
//! every `TELLER_INTERVAL_MS` (default 2000), printing what came back.

use std::time::Duration;

use courier_example_transfer::{connect, stop_requested, FileCopy, Progress, Transfer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = connect("teller").await?;
    let interval = std::env::var("TELLER_INTERVAL_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(2000);
    let round = [
        ("alice-1", "bob-1", 1_000, "alice"),
        ("alice-1", "carol-1", 60_000, "alice"),
        ("alice-1", "bob-1", 150_000, "alice"),
        ("bob-1", "alice-1", 30_000, "bob"),
        ("nobody", "alice-1", 1, "x"),
        ("carol-1", "alice-1", 1, "bob"),
        ("carol-1", "carol-1", 1, "carol"),
    ];
    println!("teller sending a round of transfers every {interval} ms");
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(interval));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        for (from, to, amount, by) in round {
            let t = Transfer {
                from: from.into(),
                to: to.into(),
                amount,
                by: by.into(),
            };
            match client.request("transfer", &t).await {
                Ok(reply) => println!(
                    "transfer {amount} from {from} to {to} by {by}: {}",
                    reply.name()
                ),
                Err(e) => println!("transfer {amount} from {from} to {to}: no answer ({e})"),
            }
        }
        let copy = FileCopy {
            from: "report.pdf".into(),
            to: "archive/report.pdf".into(),
            bytes: 1_000_000,
        };
        match client.request_stream("file.copy", &copy).await {
            Ok(mut replies) => {
                let mut updates = 0;
                while let Some(reply) = replies.next_reply().await {
                    match reply {
                        Ok(r) if r.is_final() => {
                            let done: Progress = r.json()?;
                            println!(
                                "file.copy {} → {}: {} ({updates} progress replies, {} bytes)",
                                copy.from,
                                copy.to,
                                r.name(),
                                done.copied
                            );
                        }
                        Ok(_) => updates += 1,
                        Err(e) => println!("file.copy: {e}"),
                    }
                }
            }
            Err(e) => println!("file.copy: no answer ({e})"),
        }
    }
    client.shutdown().await;
    Ok(())
}
