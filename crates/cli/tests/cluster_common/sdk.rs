//! The Rust SDK against the nodes, as a user's services use it.

use std::time::{Duration, Instant};

use courier_client::{Client, ClientOptions, ErrorCode};
use uuid::Uuid;

use crate::common::Broker;

/// Options for `service` on `node`, reconnecting quickly.
pub fn opts(node: &Broker, service: &str) -> ClientOptions {
    let mut o = ClientOptions::new(node.addr.clone(), service);
    o.reconnect_delay_max = Duration::from_millis(200);
    o
}

pub async fn connect(o: ClientOptions) -> Client {
    let addr = o.url.clone();
    Client::connect(o)
        .await
        .unwrap_or_else(|e| panic!("connect to the node at {addr}: {e}"))
}

/// Sends a command through `client` until its node routes it: a
/// subscription made on the other node reaches this one by the cluster's
/// watch, a moment after the subscriber's RESULT.
pub async fn send_when_routed(client: &Client, name: &str, payload: &serde_json::Value) -> Uuid {
    let deadline = Instant::now() + super::ROUTED_WITHIN;
    loop {
        match client.send(name, payload).await {
            Ok(id) => return id,
            Err(e) if e.code() == Some(ErrorCode::NoReceiver) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("send {name}: {e}"),
        }
    }
}

/// Sends `per_key` events `ledger.entry` for each of `keys` keys
/// (`k0`, `k1`, …; payload the index), pipelined, index by index across
/// the keys, and waits until every one is accepted.
pub async fn publish_keyed(client: &Client, keys: usize, per_key: usize) {
    let mut accepted = Vec::with_capacity(keys * per_key);
    for index in 0..per_key {
        for key in 0..keys {
            let sent = client
                .event("ledger.entry")
                .key(format!("k{key}"))
                .json(&index)
                .expect("payload")
                .enqueue()
                .expect("queued");
            accepted.push(sent);
        }
    }
    for sent in accepted {
        sent.wait().await.expect("accepted");
    }
}
