//! `app`: logs every squared reading.

use courier_client::{Client, Incoming};
use courier_example_sensor_pipeline::{options, stop_requested, Squared};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect(options("app")).await?;
    client
        .on("reading.squared", |msg: Incoming| async move {
            let squared: Squared = msg.json()?;
            println!(
                "reading {}: {}² = {} (worker {})",
                squared.seq, squared.value, squared.square, squared.worker
            );
            Ok::<(), courier_client::Error>(())
        })
        .await?;
    println!("app ready");
    stop_requested().await;
    client.shutdown().await;
    println!("app stopped (drained)");
    Ok(())
}
