//! Answers `transfer` with its outcome.

use std::sync::{Arc, Mutex};

use courier_client::Incoming;
use courier_example_transfer::{connect, stop_requested, Books, Transfer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = connect("bank").await?;
    let books = Arc::new(Mutex::new(Books::opening()));
    client
        .on("transfer", move |msg: Incoming| {
            let books = books.clone();
            async move {
                let outcome = match msg.json::<Transfer>() {
                    Ok(t) => books
                        .lock()
                        .map(|mut b| b.transfer(&t))
                        .unwrap_or("transfer.internal-error"),
                    Err(_) => "transfer.internal-error",
                };
                // The outcome is the reply's name; the payload says nothing more.
                msg.reply(outcome, &()).await
            }
        })
        .await?;
    println!("bank ready");
    stop_requested().await;
    client.shutdown().await;
    Ok(())
}
