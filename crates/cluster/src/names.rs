//! The names of Courier's JetStream objects and subjects (docs/SCALE-OUT.md
//! §2), and node ids.

use std::fmt;

/// The message log: durable sends of every kind.
pub const MESSAGES_STREAM: &str = "COURIER_MSGS";
/// Messages waiting for their `deliver_at`.
pub const DEFERRED_STREAM: &str = "COURIER_DEFERRED";
/// Dead letters, one subject per service and stream seq.
pub const DEAD_STREAM: &str = "COURIER_DEAD";
/// Replies that found no instance of the requesting service.
pub const PARKED_STREAM: &str = "COURIER_PARKED";

/// Subject prefix of `COURIER_MSGS`.
pub const MESSAGES_SUBJECTS: &str = "courier.m.>";
pub const DEFERRED_SUBJECTS: &str = "courier.d.>";
pub const DEAD_SUBJECTS: &str = "courier.dl.>";
pub const PARKED_SUBJECTS: &str = "courier.p.>";

/// The subscription table: `<service>` → patterns and settings.
pub const SERVICES_BUCKET: &str = "courier_services";
/// Connected instances: `<service>.<node id>.<conn id>`.
pub const INSTANCES_BUCKET: &str = "courier_instances";
/// Live nodes: `<node id>`, put by each node while it runs.
pub const NODES_BUCKET: &str = "courier_nodes";
/// Leases: `keyed.<service>`, `scheduler`, `reclaimer`.
pub const LEASES_BUCKET: &str = "courier_leases";
/// Reply routes: `<command id, 32 hex>`.
pub const ROUTES_BUCKET: &str = "courier_routes";
/// The service registry: `i.<service>.<id, hex>` for registered instances,
/// `b.<node id>.<service>.<id, hex>` for bus connections to that node.
pub const REGISTRY_BUCKET: &str = "courier_registry";
/// Core NATS subject of TTL heartbeats, heard by every node.
pub const REGISTRY_HEARTBEATS: &str = "courier.registry.heartbeat";

/// The lease of the node that purges the log below every consumer's floor.
pub const RECLAIMER_LEASE: &str = "reclaimer";
/// The lease of the node that releases deferred messages.
pub const SCHEDULER_LEASE: &str = "scheduler";
/// The lease of the node that runs the registry's checks.
pub const REGISTRY_LEASE: &str = "registry";

/// The lease key of service `service`'s keyed lane.
pub fn keyed_lane_lease(service: &str) -> String {
    format!("keyed.{service}")
}

/// What stands for `.` in a service's token: never part of a Courier name
/// (lower-case letters, digits, `_`, `-` and dots), allowed in NATS
/// subject tokens and in consumer names.
pub const SERVICE_DOT: char = '~';

/// A service name as one NATS subject token and a valid consumer name
/// part: its dots become [`SERVICE_DOT`]. Service names may have dots
/// (`billing.eu`); as subject tokens they would split, and service `a`'s
/// filter `courier.m.r.a.>` would take service `a.b`'s replays.
pub fn service_token(service: &str) -> String {
    service.replace('.', &SERVICE_DOT.to_string())
}

/// The longest node id: it is a subject token and part of KV keys, and a
/// bound keeps every subject built from it short.
pub const NODE_ID_BYTES_MAX: usize = 64;

/// A node's name among the nodes of one cluster: one NATS subject token
/// (`[A-Za-z0-9_-]`), so that `courier.node.<id>.…` and the KV keys that
/// hold it stay well formed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(String);

/// Why a text is not a node id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeIdError {
    #[error("a node id must not be empty")]
    Empty,
    #[error("node id `{0}` is longer than {NODE_ID_BYTES_MAX} bytes; choose a shorter one")]
    TooLong(String),
    #[error(
        "node id `{id}` has `{bad}`, which cannot be part of a NATS subject token; use letters, digits, `-` and `_` only"
    )]
    BadCharacter { id: String, bad: char },
}

impl NodeId {
    pub fn new(id: &str) -> Result<NodeId, NodeIdError> {
        if id.is_empty() {
            return Err(NodeIdError::Empty);
        }
        if id.len() > NODE_ID_BYTES_MAX {
            return Err(NodeIdError::TooLong(id.to_string()));
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(NodeIdError::BadCharacter {
                id: id.to_string(),
                bad,
            });
        }
        Ok(NodeId(id.to_string()))
    }

    /// `<hostname>-<8 random hex>`, new at every start: a node that
    /// restarts is a new node, so nothing of its former life (leases,
    /// instances) is mistaken for its own.
    pub fn generate() -> NodeId {
        NodeId::from_host(&hostname())
    }

    fn from_host(host: &str) -> NodeId {
        let random = courier_proto::new_id();
        let tail = &random.as_bytes()[12..];
        let mut id: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(NODE_ID_BYTES_MAX - 9)
            .collect();
        if id.is_empty() {
            id.push_str("node");
        }
        id.push('-');
        for byte in tail {
            id.push_str(&format!("{byte:02x}"));
        }
        NodeId(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The machine's host name (Linux), else `$HOSTNAME`, else empty.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn a_service_is_one_token() {
        assert_eq!(service_token("billing.eu.west"), "billing~eu~west");
        assert_eq!(service_token("todo"), "todo");
        assert_ne!(service_token("a.b"), service_token("a_b"));
        assert_ne!(service_token("a.b"), service_token("a-b"));
    }

    #[test]
    fn node_ids_are_one_subject_token() {
        assert!(NodeId::new("a").is_ok());
        assert!(NodeId::new("host-1_b").is_ok());
        assert_eq!(NodeId::new(""), Err(NodeIdError::Empty));
        assert!(matches!(
            NodeId::new("a.b"),
            Err(NodeIdError::BadCharacter { bad: '.', .. })
        ));
        assert!(matches!(
            NodeId::new("a*"),
            Err(NodeIdError::BadCharacter { bad: '*', .. })
        ));
        assert!(matches!(
            NodeId::new(&"x".repeat(65)),
            Err(NodeIdError::TooLong(_))
        ));
    }

    #[test]
    fn generated_ids_are_valid_and_differ() {
        let a = NodeId::from_host("Web.Example.com");
        let b = NodeId::from_host("Web.Example.com");
        assert!(a.as_str().starts_with("web-example-com-"), "{a}");
        assert_eq!(a.as_str().len(), "web-example-com-".len() + 8);
        assert!(NodeId::new(a.as_str()).is_ok());
        assert_ne!(a, b);
        let unnamed = NodeId::from_host("");
        assert!(unnamed.as_str().starts_with("node-"), "{unnamed}");
        let long = NodeId::from_host(&"h".repeat(200));
        assert!(NodeId::new(long.as_str()).is_ok());
        assert!(NodeId::new(NodeId::generate().as_str()).is_ok());
    }
}
