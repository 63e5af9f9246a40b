//! `sensor`: publishes a reading every `SENSOR_INTERVAL_MS` (default 500).

use std::time::Duration;

use anyhow::Context as _;
use courier_client::Client;
use courier_example_sensor_pipeline::{options, stop_requested, Reading};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let interval_ms: u64 = match std::env::var("SENSOR_INTERVAL_MS") {
        Ok(ms) => ms
            .parse()
            .context("SENSOR_INTERVAL_MS must be milliseconds, e.g. 500")?,
        Err(_) => 500,
    };
    let client = Client::connect(options("sensor")).await?;
    println!("sensor ready: a reading every {interval_ms} ms");
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {}
        }
        seq += 1;
        // A reading that wanders between -20 and 20.
        let value = (seq as i64 * 7) % 41 - 20;
        let reading = Reading { seq, value };
        match client.publish("reading.taken", &reading).await {
            Ok(_) => println!("published reading {seq}: {value}"),
            Err(e) => println!("reading {seq} not published: {e}"),
        }
    }
    client.shutdown().await;
    println!("sensor stopped");
    Ok(())
}
