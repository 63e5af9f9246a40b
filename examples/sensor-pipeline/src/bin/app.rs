//! Prints every `reading.squared` result.

use courier_client::Incoming;
use courier_example_sensor_pipeline::{connect, stop_requested, Squared};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = connect("app").await?;
    client
        .on("reading.squared", |msg: Incoming| async move {
            let s: Squared = msg.json()?;
            println!(
                "{} reading {}: {} squared is {} (by {})",
                s.reading.sensor, s.reading.number, s.reading.value, s.squared, s.by
            );
            Ok::<(), courier_client::Error>(())
        })
        .await?;
    println!("app printing results");
    stop_requested().await;
    client.shutdown().await;
    Ok(())
}
