//! Publishes a reading as a `reading.taken` event every
//! `SENSOR_INTERVAL_MS` (default 500), until stopped.

use std::time::Duration;

use courier_example_sensor_pipeline::{connect, instance, stop_requested, Reading};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = connect("sensor").await?;
    let name = instance("sensor");
    let interval = std::env::var("SENSOR_INTERVAL_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(500);
    println!("{name} publishing a reading every {interval} ms");
    let mut tick = tokio::time::interval(Duration::from_millis(interval));
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut number = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        number += 1;
        // A value that moves, in a small range: -9 … 9.
        let value = ((number * 7) % 19) as i64 - 9;
        let reading = Reading {
            sensor: name.clone(),
            number,
            value,
        };
        if let Err(e) = client.publish("reading.taken", &reading).await {
            eprintln!("{name}: reading {number} not published: {e}");
        }
    }
    client.shutdown().await;
    println!("{name} stopped after {number} readings");
    Ok(())
}
