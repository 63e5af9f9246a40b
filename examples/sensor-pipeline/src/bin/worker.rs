//! `worker`: squares each reading it gets and publishes the result. Run
//! several: they compete, each reading goes to one of them.

use courier_client::{Client, Incoming};
use courier_example_sensor_pipeline::{options, stop_requested, Reading, Squared};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let instance = std::env::var("COURIER_INSTANCE").unwrap_or_else(|_| "1".into());
    let client = Client::connect(options("worker")).await?;
    let me = instance.clone();
    client
        .on("reading.taken", move |msg: Incoming| {
            let me = me.clone();
            async move {
                let reading: Reading = msg.json()?;
                let square = reading.value.saturating_mul(reading.value);
                println!(
                    "squared reading {}: {} -> {square}",
                    reading.seq, reading.value
                );
                let result = Squared {
                    seq: reading.seq,
                    value: reading.value,
                    square,
                    worker: me,
                };
                msg.client().publish("reading.squared", &result).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
        .await?;
    println!("worker {instance} ready");
    stop_requested().await;
    client.shutdown().await;
    println!("worker {instance} stopped (drained)");
    Ok(())
}
