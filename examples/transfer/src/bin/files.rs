//! `files`: copies a file (pretend), answering `file.copy` with progress
//! replies and a final `file.copy.done`.

use std::time::Duration;

use courier_client::{Client, Incoming};
use courier_example_transfer::{options, stop_requested, FileCopy, Progress};

/// Progress replies per copy, the final one included.
const STEPS: u64 = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect(options("files")).await?;
    client
        .on("file.copy", |msg: Incoming| async move {
            let copy: FileCopy = msg.json()?;
            for step in 1..STEPS {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let progress = Progress {
                    path: copy.path.clone(),
                    copied: copy.bytes * step / STEPS,
                    bytes: copy.bytes,
                };
                msg.reply_progress("file.copy.progress", &progress).await?;
            }
            let done = Progress {
                path: copy.path.clone(),
                copied: copy.bytes,
                bytes: copy.bytes,
            };
            msg.reply("file.copy.done", &done).await?;
            println!("copied {} ({} bytes)", copy.path, copy.bytes);
            Ok::<(), anyhow::Error>(())
        })
        .await?;
    println!("files ready");
    stop_requested().await;
    client.shutdown().await;
    println!("files stopped (drained)");
    Ok(())
}
