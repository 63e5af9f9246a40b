//! The Rust SDK against a real broker process — or, with
//! `COURIER_E2E_BACKEND=cluster`, against two Courier nodes on a real
//! three-server NATS JetStream cluster, each client on one of them in
//! turn (docs/SCALE-OUT.md: the same semantics on a cluster).

#[path = "../cluster_common/mod.rs"]
mod cluster_common;
#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::bus::Bus;
use courier_client::{Client, ClientOptions, ConnectionEvent, ErrorCode, Incoming};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

mod causation;
mod connection;
mod delivery;
mod requests;
mod sends;

fn opts(broker: &Bus, service: &str) -> ClientOptions {
    let mut o = ClientOptions::new(broker.addr(), service);
    o.reconnect_delay_max = Duration::from_millis(200);
    o
}

async fn client(broker: &Bus, service: &str) -> Client {
    Client::connect(opts(broker, service))
        .await
        .expect("connect")
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Todo {
    text: String,
}

/// Forwards each delivery's (name, attempt, payload) to a channel and acks.
async fn recorder(client: &Client, pattern: &str) -> mpsc::Receiver<(String, u32, Vec<u8>)> {
    let (tx, rx) = mpsc::channel(10_000);
    client
        .on(pattern, move |msg: Incoming| {
            let tx = tx.clone();
            async move {
                let _ = tx
                    .send((
                        msg.name().to_string(),
                        msg.attempt(),
                        msg.payload().to_vec(),
                    ))
                    .await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe");
    rx
}
