//! Squares each `reading.taken` it is given and publishes
//! `reading.squared`. Run several: each reading goes to one of them.

use courier_client::Incoming;
use courier_example_sensor_pipeline::{connect, instance, stop_requested, Reading, Squared};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = connect("worker").await?;
    let by = instance("worker");
    let me = by.clone();
    client
        .on("reading.taken", move |msg: Incoming| {
            let by = by.clone();
            async move {
                let reading: Reading = msg.json()?;
                let squared = Squared {
                    squared: reading.value * reading.value,
                    reading,
                    by,
                };
                // Sent as part of handling the reading: same activity.
                msg.event("reading.squared").json(&squared)?.send().await?;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await?;
    println!("{me} squaring readings");
    stop_requested().await;
    client.shutdown().await;
    println!("{me} stopped");
    Ok(())
}
