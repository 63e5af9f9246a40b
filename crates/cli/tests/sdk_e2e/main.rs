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

use std::sync::atomic::{AtomicUsize, Ordering};

use cluster_common::Nodes;
use common::Broker;
use courier_client::{Client, ClientOptions, ConnectionEvent, ErrorCode, Incoming};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

mod causation;
mod connection;
mod delivery;
mod requests;
mod sends;

/// The bus the tests talk to.
enum Bus {
    /// One `courier serve` with its embedded store.
    One(Broker),
    /// Nodes `a` and `b` on a three-server cluster; `next` picks the
    /// node the next client starts on.
    Cluster {
        nodes: Box<Nodes>,
        next: AtomicUsize,
    },
}

impl Bus {
    fn on_cluster() -> bool {
        std::env::var("COURIER_E2E_BACKEND").is_ok_and(|b| b == "cluster")
    }

    async fn start() -> Bus {
        Bus::start_with(&[]).await
    }

    /// With extra `serve` flags (on a cluster: for both nodes).
    async fn start_with(extra: &[&str]) -> Bus {
        if !Bus::on_cluster() {
            return Bus::One(Broker::start_with(extra));
        }
        let mut nodes = Box::new(Nodes::start().await);
        if !extra.is_empty() {
            nodes.a = nodes.start_node_with("a", extra);
            nodes.b = nodes.start_node_with("b", extra);
        }
        Bus::Cluster {
            nodes,
            next: AtomicUsize::new(0),
        }
    }

    /// Where a client connects: the broker, or both nodes, starting with
    /// each in turn (the SDK moves to the other when one is gone).
    fn addr(&self) -> String {
        match self {
            Bus::One(broker) => broker.addr.clone(),
            Bus::Cluster { nodes, next } => {
                let (a, b) = (&nodes.a.addr, &nodes.b.addr);
                if next.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                    format!("{a},{b}")
                } else {
                    format!("{b},{a}")
                }
            }
        }
    }

    /// `kill -9` and start again on the same addresses: the broker, or
    /// both nodes (the cluster keeps the state).
    async fn crash_and_restart(self) -> Bus {
        match self {
            Bus::One(broker) => Bus::One(broker.crash_and_restart()),
            Bus::Cluster { mut nodes, next } => {
                // Both stopped before either dies: a client whose node
                // dies first must not reconnect to the other and then lose
                // that one too (one outage for every client, as with one
                // broker).
                let pids = [
                    nodes.a.child.id().to_string(),
                    nodes.b.child.id().to_string(),
                ];
                for signal in ["-STOP", "-KILL"] {
                    let status = std::process::Command::new("kill")
                        .arg(signal)
                        .args(&pids)
                        .status()
                        .expect("run kill");
                    assert!(status.success(), "kill {signal} {pids:?} failed");
                }
                for node in [&mut nodes.a, &mut nodes.b] {
                    let _ = node.child.wait();
                }
                let (a, b) = (nodes.a.addr.clone(), nodes.b.addr.clone());
                nodes.a = nodes.start_node_on("a", &a);
                nodes.b = nodes.start_node_on("b", &b);
                Bus::Cluster { nodes, next }
            }
        }
    }
}

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
