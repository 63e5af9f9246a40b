//! The bus an end-to-end test talks to: one `courier serve` with its
//! embedded store, or — with `COURIER_E2E_BACKEND=cluster` — nodes `a`
//! and `b` on a three-server NATS JetStream cluster, each client started
//! on one of them in turn (docs/SCALE-OUT.md: the same semantics on a
//! cluster). The test command runs the suites that use it both ways.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::Nodes;
use crate::common::{courier_bin, http_get, metric, spawn_client, wait_for, Broker, Proc};

pub enum Bus {
    One(Broker),
    /// `next` picks the node the next client starts on.
    Cluster {
        nodes: Box<Nodes>,
        next: AtomicUsize,
    },
}

impl Bus {
    pub fn on_cluster() -> bool {
        std::env::var("COURIER_E2E_BACKEND").is_ok_and(|b| b == "cluster")
    }

    pub async fn start() -> Bus {
        Bus::start_with(&[]).await
    }

    /// With extra `serve` flags (on a cluster: for both nodes).
    pub async fn start_with(extra: &[&str]) -> Bus {
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

    /// [`Bus::start`] outside a runtime.
    pub fn start_blocking() -> Bus {
        if !Bus::on_cluster() {
            return Bus::One(Broker::start());
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(Bus::start())
    }

    /// Where a client connects: the broker, or both nodes, starting with
    /// each in turn (a client moves to the other when one is gone).
    pub fn addr(&self) -> String {
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

    /// A `courier` client command against the bus.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(courier_bin());
        command
            .args(args)
            .env("COURIER_URL", self.addr())
            .env_remove("COURIER_SERVICE");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cli(args).output().expect("run courier")
    }

    /// Starts a long-running client command with its stdout piped.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        spawn_client(self.cli(args))
    }

    /// Waits until `service` has at least `n` consuming instances on the
    /// bus, as `/metrics` says; on a cluster, on both nodes together, and
    /// once both nodes know the service (a subscription reaches the node
    /// it was not made on by the cluster's watch, a moment later).
    pub fn wait_consumers(&self, service: &str, n: u64) {
        let nodes = match self {
            Bus::One(broker) => return broker.wait_consumers(service, n, None),
            Bus::Cluster { nodes, .. } => nodes,
        };
        let series = format!("courier_subscription_consumers{{service=\"{service}\"}}");
        let relay = format!("courier_keyed_relay{{service=\"{service}\",");
        wait_for(
            &format!("{n} consumer(s) of {service}, each node's reached by its keyed lane"),
            Duration::from_secs(10),
            || {
                let mut consumers = 0.0;
                let mut nodes_consuming = 0;
                let mut relays = 0;
                for node in [&nodes.a, &nodes.b] {
                    let http = node.http.as_deref().expect("the node's HTTP port");
                    let (status, body) = http_get(http, "/metrics", None);
                    assert_eq!(status, 200, "/metrics: {body}");
                    let here = metric(&body, &series)?;
                    consumers += here;
                    nodes_consuming += usize::from(here > 0.0);
                    relays += body.lines().filter(|l| l.starts_with(&relay)).count();
                }
                // The keyed lane's holder relays to every other node with
                // consumers: until it does, their keys all go elsewhere.
                (consumers >= n as f64 && relays + 1 >= nodes_consuming).then_some(())
            },
        );
    }

    /// `kill -9` and start again on the same addresses: the broker, or
    /// both nodes (the cluster keeps the state).
    pub async fn crash_and_restart(self) -> Bus {
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
                    let status = Command::new("kill")
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
