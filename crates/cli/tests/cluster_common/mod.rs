//! Two `courier serve --backend nats://…` nodes, `a` and `b`, on a real
//! three-server NATS JetStream cluster (`sync_interval: always`), for the
//! end-to-end tests of scale-out (docs/SCALE-OUT.md §19). A test file
//! declares `mod common;` before `mod cluster_common;`.

#![allow(dead_code)] // each test file uses its own part

// The three-server cluster harness of courier-cluster's own tests.
pub mod bus;
#[path = "../../../cluster/tests/common/mod.rs"]
pub mod nats;
pub mod sdk;

use std::time::{Duration, Instant};

use crate::common::{stderr, tempdir, Broker, Proc, StderrLog};
use nats::{NatsCluster, Sync};

/// How long a node may take to route a subscription made elsewhere.
pub const ROUTED_WITHIN: Duration = Duration::from_secs(30);

/// The cluster and two Courier nodes on it, `a` and `b`.
pub struct Nodes {
    pub a: Broker,
    pub b: Broker,
    /// Each node's stderr at level `info`, by node id, when started
    /// watched (the latest start of a node replaces its log).
    pub logs: std::collections::BTreeMap<String, StderrLog>,
    /// Declared after the nodes: the servers stop after them.
    pub cluster: NatsCluster,
    secrets: tempdir::Dir,
    watched: bool,
}

fn node_flags(cluster: &NatsCluster, secrets: &std::path::Path, id: &str) -> Vec<String> {
    [
        "--backend".to_string(),
        cluster.backend_text(),
        "--nats-user".to_string(),
        nats::COURIER_USER.to_string(),
        "--nats-password-file".to_string(),
        secrets.join("nats.pass").display().to_string(),
        "--nats-system-user".to_string(),
        nats::SYSTEM_USER.to_string(),
        "--nats-system-password-file".to_string(),
        secrets.join("sys.pass").display().to_string(),
        "--node-id".to_string(),
        id.to_string(),
    ]
    .to_vec()
}

impl Nodes {
    /// The cluster and nodes `a` and `b`; the nodes log warnings to the
    /// test's stderr.
    pub async fn start() -> Nodes {
        Nodes::start_as(false).await
    }

    /// [`Nodes::start`] with each node's stderr collected at level `info`
    /// in [`Nodes::logs`], for a failure to show what the nodes said.
    pub async fn start_watched() -> Nodes {
        Nodes::start_as(true).await
    }

    async fn start_as(watched: bool) -> Nodes {
        let cluster = NatsCluster::start([Sync::Always; 3]).await;
        let secrets = tempdir::Dir::new("secrets");
        std::fs::write(secrets.path().join("nats.pass"), nats::COURIER_PASSWORD).expect("write");
        std::fs::write(secrets.path().join("sys.pass"), nats::SYSTEM_PASSWORD).expect("write");
        let mut logs = std::collections::BTreeMap::new();
        let mut start = |id: &str| {
            let listen = format!("127.0.0.1:{}", crate::common::free_port());
            let (node, log) = start_node(&cluster, &secrets, id, &listen, watched);
            if let Some(log) = log {
                logs.insert(id.to_string(), log);
            }
            node
        };
        let a = start("a");
        let b = start("b");
        Nodes {
            a,
            b,
            logs,
            cluster,
            secrets,
            watched,
        }
    }

    /// Starts node `id` again with the flags it first had (on a new
    /// client port); the caller puts it in place of the dead one.
    pub fn start_node(&mut self, id: &str) -> Broker {
        let listen = format!("127.0.0.1:{}", crate::common::free_port());
        self.start_node_on(id, &listen)
    }

    /// [`Nodes::start_node`] on the client address `listen`: the one a
    /// dead node had, so that clients given it find the node back.
    pub fn start_node_on(&mut self, id: &str, listen: &str) -> Broker {
        let (node, log) = start_node(&self.cluster, &self.secrets, id, listen, self.watched);
        if let Some(log) = log {
            self.logs.insert(id.to_string(), log);
        }
        node
    }

    /// Another node `id` on the cluster, with `extra` flags besides the
    /// cluster's (e.g. `--manifest`); not watched.
    pub fn start_node_with(&self, id: &str, extra: &[&str]) -> Broker {
        let listen = format!("127.0.0.1:{}", crate::common::free_port());
        let mut flags = node_flags(&self.cluster, self.secrets.path(), id);
        flags.extend(extra.iter().map(|flag| flag.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Broker::start_on_with(&listen, tempdir::Dir::new("node"), &flags)
    }

    /// The last `lines` lines of every watched node's stderr, for a
    /// failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        self.logs
            .iter()
            .map(|(id, log)| {
                let all = log.lines();
                let tail = &all[all.len().saturating_sub(lines)..];
                format!("--- node {id} ---\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn start_node(
    cluster: &NatsCluster,
    secrets: &tempdir::Dir,
    id: &str,
    listen: &str,
    watched: bool,
) -> (Broker, Option<StderrLog>) {
    let flags = node_flags(cluster, secrets.path(), id);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    if watched {
        let (node, log) = Broker::start_watched_with(listen, tempdir::Dir::new("node"), &flags);
        (node, Some(log))
    } else {
        (
            Broker::start_on_with(listen, tempdir::Dir::new("node"), &flags),
            None,
        )
    }
}

/// Sends through `node` until it is accepted: a subscription made on the
/// other node reaches this one's routing by the cluster's watch, a moment
/// after the subscriber's RESULT.
pub fn send_when_routed(node: &Broker, args: &[&str]) -> std::process::Output {
    let deadline = Instant::now() + ROUTED_WITHIN;
    loop {
        let out = node.run(args);
        if out.status.success() || Instant::now() > deadline {
            return out;
        }
        assert!(
            stderr(&out).contains("no_receiver"),
            "refused for another reason than routing: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Publishes probe events through `node` until `subscriber` has one: its
/// subscription is then in force cluster-wide. Returns once one arrived
/// (the subscriber may yet see more probes).
pub fn until_received(node: &Broker, subscriber: &Proc, name: &str) {
    let deadline = Instant::now() + ROUTED_WITHIN;
    loop {
        assert!(Instant::now() < deadline, "no probe of {name} arrived");
        let out = node.run(&["publish", name, "--data", "probe"]);
        assert!(out.status.success(), "{}", stderr(&out));
        if !subscriber.no_line(Duration::from_millis(300)) {
            return;
        }
    }
}
