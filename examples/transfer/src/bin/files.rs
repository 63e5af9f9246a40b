//! Answers `file.copy` with a stream: `file.copy.progress` replies as the
//! copy goes, then `file.copied`.

use std::time::Duration;

use courier_client::Incoming;
use courier_example_transfer::{connect, stop_requested, FileCopy, Progress};

/// Progress replies per copy.
const STEPS: u64 = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = connect("files").await?;
    client
        .on("file.copy", |msg: Incoming| async move {
            let copy: FileCopy = msg.json()?;
            let step = copy.bytes.div_ceil(STEPS).max(1);
            let mut copied = 0;
            while copied + step < copy.bytes {
                copied += step;
                tokio::time::sleep(Duration::from_millis(20)).await;
                msg.reply_progress(
                    "file.copy.progress",
                    &Progress {
                        copied,
                        of: copy.bytes,
                    },
                )
                .await?;
            }
            msg.reply(
                "file.copied",
                &Progress {
                    copied: copy.bytes,
                    of: copy.bytes,
                },
            )
            .await
        })
        .await?;
    println!("files ready");
    stop_requested().await;
    client.shutdown().await;
    Ok(())
}
