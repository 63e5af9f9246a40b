//! The disk-fault rules at the broker level: the broker core
//! (`courier-broker`) on the durable log's store (`LogStore`) over a
//! fault-injecting file system (`FaultyFs` on a temporary directory). No
//! sockets, no clock: every step is driven by hand, so each run replays.
//!
//! What is proven here:
//! - ENOSPC or EIO on a write or an fsync: the send is refused with
//!   `StorageFailed` and a reason that says what happened, never
//!   acknowledged, never delivered; the operator is alerted; earlier
//!   messages are still delivered; once the disk works again a new send and
//!   the refused one retried with the same id are accepted and delivered
//!   exactly once; a crash afterwards loses nothing acknowledged and
//!   invents nothing refused.
//! - A disk that stays full refuses every send, each time, and the broker
//!   recovers when space returns.
//! - Records the snapshot covers cut from the log (not by a crash): the
//!   entries that named them become dead letters, and nothing kept by seq —
//!   backlog, acks, dedup — ever attaches to another message: new messages
//!   get new seqs.
//! - Crashes with torn tails at random points (seeded): every acknowledged
//!   send survives recovery; the only unacknowledged messages that may
//!   appear are those of the batch in progress at the crash, and one that
//!   did not survive never appears later.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use courier_broker::{Action, Broker, Config, ConnId, DeliveryId, Nanos, StartFrom};
use courier_log::{Damage, Fault, FaultOp, FaultyFs, Log, LogConfig, RealFs};
use courier_proto::{ErrorCode, Kind, Message};
use courier_store::{LogStore, MessageStore};

mod crashes;
mod group_commit;
mod lost_records;
mod refused_writes;

const MS: Nanos = 1_000_000;
/// 2026-11-24T12:00:00Z: a plausible wall-clock time for every input.
const START: Nanos = 1_795_521_600_000_000_000;

/// A log directory on a disk that fails on command and crashes on demand.
struct Disk {
    _tmp: tempfile::TempDir,
    config: LogConfig,
    fs: FaultyFs,
}

impl Disk {
    fn new(seed: u64) -> Disk {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = LogConfig::new(tmp.path().join("log"));
        Disk {
            _tmp: tmp,
            config,
            fs: FaultyFs::new(Arc::new(RealFs), seed),
        }
    }

    /// Opens the log and starts a broker on it, recovered: what a process
    /// start does. Returns the damage the log's open reported too.
    fn start(&self, now: Nanos) -> (Node, Vec<Damage>) {
        let (log, damage) =
            Log::open_with(self.config.clone(), Arc::new(self.fs.clone())).expect("open the log");
        let mut broker = Broker::new(Config::default(), LogStore::with_open_damage(log, &damage));
        broker.recover(now).expect("recover");
        let alerts = broker.take_alerts();
        (
            Node {
                broker,
                now,
                alerts,
            },
            damage,
        )
    }

    /// The machine dies: unsynced bytes keep a random prefix (a torn
    /// write), files whose directory was not synced vanish. The broker (and
    /// its log) must be dropped first.
    fn crash(&self, node: Node) {
        drop(node);
        self.fs.crash().expect("simulate a crash");
    }
}

/// One broker process, driven by hand.
struct Node {
    broker: Broker<LogStore>,
    now: Nanos,
    /// Every alert the broker raised so far, for the operator's log.
    alerts: Vec<String>,
}

impl Node {
    fn connect(&mut self, conn: ConnId, service: &str, max_in_flight: u32) {
        self.broker
            .connect(conn, service, &format!("{service}-{conn}"), max_in_flight);
    }

    fn subscribe(&mut self, conn: ConnId, pattern: &str) {
        self.broker
            .subscribe(conn, conn, pattern, 0, 0, StartFrom::New, self.now);
    }

    fn send(&mut self, conn: ConnId, seq: u64, message: Message) {
        self.now += MS;
        self.broker.send(conn, seq, message, self.now);
    }

    fn ack(&mut self, conn: ConnId, delivery: DeliveryId) {
        self.now += MS;
        self.broker.ack(conn, delivery, self.now);
    }

    /// The end of a batch as `courier serve` ends it: what needs no fsync
    /// is released, the rest waits for one run outside (see `commit`).
    fn take_ready(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.broker.take_ready_actions(&mut out);
        self.alerts.extend(self.broker.take_alerts());
        out
    }

    /// The end of a batch: the broker syncs, then releases what it decided.
    fn take(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.broker.take_actions(&mut out);
        self.alerts.extend(self.broker.take_alerts());
        out
    }
}

fn command(payload: &str) -> Message {
    Message::new(Kind::Command, "job.run", payload.to_string())
}

fn text(payload: &Bytes) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// (client seq, code, reason) of every send result.
fn results(actions: &[Action]) -> Vec<(u64, ErrorCode, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendResult {
                seq, code, reason, ..
            } => Some((*seq, *code, reason.clone())),
            _ => None,
        })
        .collect()
}

/// (conn, delivery, attempt, payload) of every delivery.
fn deliveries(actions: &[Action]) -> Vec<(ConnId, DeliveryId, u32, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver {
                conn,
                delivery,
                attempt,
                message,
                ..
            } => Some((*conn, *delivery, *attempt, text(&message.payload))),
            _ => None,
        })
        .collect()
}

fn payloads_to(actions: &[Action], conn: ConnId) -> Vec<String> {
    deliveries(actions)
        .into_iter()
        .filter(|d| d.0 == conn)
        .map(|d| d.3)
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

const WEB: ConnId = 1;
const WORK: ConnId = 2;
const AUDIT: ConnId = 3;

/// A broker with two services on `job.>`: `work` connected, `audit`
/// subscribed but offline (its backlog holds every accepted message). Two
/// early commands are accepted; `work` acked `early-1` and holds `early-2`.
/// Returns the delivery id of `early-2` at `work`.
fn busy(node: &mut Node) -> DeliveryId {
    node.connect(WEB, "web", 0);
    node.connect(WORK, "work", 0);
    node.connect(AUDIT, "audit", 0);
    node.subscribe(WORK, "job.>");
    node.subscribe(AUDIT, "job.>");
    let actions = node.take();
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::OpResult { code, .. } if code.is_ok()))
            .count(),
        2,
        "both subscriptions are durable: {actions:?}"
    );
    node.broker.disconnect(AUDIT, node.now);
    node.send(WEB, 1, command("early-1"));
    node.send(WEB, 2, command("early-2"));
    let actions = node.take();
    let codes: Vec<(u64, ErrorCode)> = results(&actions).into_iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(codes, vec![(1, ErrorCode::Ok), (2, ErrorCode::Ok)]);
    let d = deliveries(&actions);
    assert_eq!(
        d.iter().map(|x| x.3.as_str()).collect::<Vec<_>>(),
        vec!["early-1", "early-2"],
        "{d:?}"
    );
    node.ack(WORK, d[0].1);
    let actions = node.take();
    assert!(deliveries(&actions).is_empty(), "{actions:?}");
    d[1].1
}

// ---- crashes at random points ------------------------------------------
