//! A proptest state-machine test: random operations (appends, syncs, reads,
//! scans, time lookups, segment removal, snapshots, injected disk faults,
//! crashes and reopens) run against the log and against a model that is a
//! plain vector of records. Segments are tiny, so rolling is frequent.
//!
//! Invariants checked: every record synced before a crash is present and
//! byte-identical after reopen; no record is ever invented; unsynced records
//! are either absent or intact (a prefix of what was appended); seqs go on
//! without gaps, and a durable seq is never issued again.

mod common;

use std::ops::ControlFlow;

use common::Env;
use courier_log::{Damage, Fault, FaultOp, Log, LogError, Record, RecordKind, Seq};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append {
        state: bool,
        len: usize,
        ts_step: u64,
        salt: u8,
    },
    Sync,
    Read(u64),
    Scan {
        from: u64,
        take: usize,
    },
    SeqAtTime(u64),
    RemoveBefore(u64),
    SaveSnapshot {
        covers: u64,
        len: usize,
    },
    LoadSnapshot,
    Fault {
        op: FaultOp,
        fault: Fault,
        nth: u64,
    },
    Crash,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (any::<bool>(), prop_oneof![9 => 0usize..120, 1 => 400usize..1200], 0u64..3, any::<u8>())
            .prop_map(|(state, len, ts_step, salt)| Op::Append { state, len, ts_step, salt }),
        8 => Just(Op::Sync),
        6 => any::<u64>().prop_map(Op::Read),
        3 => (any::<u64>(), 1usize..50).prop_map(|(from, take)| Op::Scan { from, take }),
        3 => any::<u64>().prop_map(Op::SeqAtTime),
        2 => any::<u64>().prop_map(Op::RemoveBefore),
        2 => (any::<u64>(), 0usize..300).prop_map(|(covers, len)| Op::SaveSnapshot { covers, len }),
        1 => Just(Op::LoadSnapshot),
        3 => (
            prop_oneof![Just(FaultOp::Write), Just(FaultOp::Sync)],
            prop_oneof![Just(Fault::NoSpace), Just(Fault::Io)],
            1u64..4,
        )
            .prop_map(|(op, fault, nth)| Op::Fault { op, fault, nth }),
        3 => Just(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

/// What the log must hold.
struct Model {
    /// `records[i].seq == first_seq + i`.
    records: Vec<Record>,
    first_seq: Seq,
    /// Every seq below this was acknowledged by a successful sync.
    durable_next: Seq,
    last_timestamp: u64,
    /// The snapshot the log may hold: more than one after a failed save.
    snapshots: Vec<Option<(Seq, Vec<u8>)>>,
}

impl Model {
    fn next_seq(&self) -> Seq {
        self.first_seq + self.records.len() as Seq
    }

    fn get(&self, seq: Seq) -> Option<&Record> {
        seq.checked_sub(self.first_seq)
            .and_then(|i| self.records.get(usize::try_from(i).ok()?))
    }

    /// The log discarded everything from `next` on.
    fn truncate(&mut self, next: Seq) {
        assert!(
            next >= self.durable_next,
            "a durable record was discarded: next {next}, durable up to {}",
            self.durable_next
        );
        assert!(
            next <= self.next_seq(),
            "the log invented records: next {next}, model {}",
            self.next_seq()
        );
        self.records.truncate((next - self.first_seq) as usize);
    }
}

struct Harness {
    env: Env,
    log: Option<Log>,
    model: Model,
}

impl Harness {
    fn log(&mut self) -> &mut Log {
        self.log.as_mut().expect("log is open")
    }

    /// An error is only acceptable while an injected fault is armed (or just
    /// fired: the caller checks `armed` from before the operation).
    fn check_error(&mut self, armed: bool, what: &str, error: &LogError) {
        assert!(armed, "{what} failed without an injected fault: {error}");
        if matches!(error, LogError::Poisoned { .. }) {
            self.reopen(false);
        }
    }

    /// The log's seqs and every record it holds match the model.
    fn check_all(&mut self) {
        let log = self.log.as_mut().expect("log is open");
        assert_eq!(log.first_seq(), self.model.first_seq);
        assert_eq!(log.next_seq(), self.model.next_seq());
        let mut got = Vec::new();
        log.scan(0, &mut |record| {
            got.push(record);
            ControlFlow::Continue(())
        })
        .expect("scan");
        assert_eq!(got, self.model.records);
    }

    fn reopen(&mut self, crash: bool) {
        self.log = None;
        if crash {
            self.env.fs.crash().expect("crash");
        }
        // A restarted machine: the disk works again.
        self.env.fs.clear_faults();
        let (log, damage) = self.env.open();
        for d in &damage {
            assert!(
                crash && matches!(d, Damage::TornTail { .. }),
                "after {} open reported {d}",
                if crash { "a crash" } else { "a clean close" }
            );
        }
        self.model.truncate(log.next_seq());
        // What open found is on disk, and stays.
        self.model.durable_next = log.next_seq();
        self.log = Some(log);
        self.check_all();
    }

    fn apply(&mut self, op: &Op) {
        let armed = self.env.fs.pending_faults() > 0;
        match *op {
            Op::Append {
                state,
                len,
                ts_step,
                salt,
            } => {
                let kind = if state {
                    RecordKind::State
                } else {
                    RecordKind::Message
                };
                let timestamp = self.model.last_timestamp + ts_step;
                let seq = self.model.next_seq();
                let body = common::body(seq, len, salt);
                match self.log().append(kind, timestamp, &body) {
                    Ok(got) => {
                        assert_eq!(got, seq, "seqs go on without gaps");
                        self.model.last_timestamp = timestamp;
                        self.model.records.push(Record {
                            seq,
                            timestamp,
                            kind,
                            body: body.into(),
                        });
                    }
                    Err(e) => {
                        let next = self.log().next_seq();
                        self.model.truncate(next);
                        self.check_error(armed, "append", &e);
                    }
                }
            }
            Op::Sync => match self.log().sync() {
                Ok(()) => self.model.durable_next = self.model.next_seq(),
                Err(e) => {
                    let next = self.log().next_seq();
                    self.model.truncate(next);
                    self.check_error(armed, "sync", &e);
                }
            },
            Op::Read(pick) => {
                let seq = self.model.first_seq.saturating_sub(1)
                    + pick % (self.model.records.len() as u64 + 3);
                let got = self.log().read(seq).expect("read");
                assert_eq!(got.as_ref(), self.model.get(seq), "read {seq}");
            }
            Op::Scan { from, take } => {
                let from = from % (self.model.next_seq() + 2);
                let mut got = Vec::new();
                self.log()
                    .scan(from, &mut |record| {
                        got.push(record);
                        if got.len() == take {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    })
                    .expect("scan");
                let want: Vec<_> = self
                    .model
                    .records
                    .iter()
                    .filter(|r| r.seq >= from)
                    .take(take)
                    .cloned()
                    .collect();
                assert_eq!(got, want, "scan from {from}");
            }
            Op::SeqAtTime(pick) => {
                let t = pick % (self.model.last_timestamp + 3);
                let want = self
                    .model
                    .records
                    .iter()
                    .find(|r| r.timestamp >= t)
                    .map_or(self.model.next_seq(), |r| r.seq);
                assert_eq!(
                    self.log().seq_at_time(t).expect("seq_at_time"),
                    want,
                    "t = {t}"
                );
            }
            Op::RemoveBefore(pick) => {
                let seq = pick % (self.model.next_seq() + 2);
                let old_first = self.model.first_seq;
                let result = self.log().remove_segments_before(seq);
                let new_first = self.log().first_seq();
                assert!(new_first >= old_first);
                if new_first > old_first {
                    assert!(
                        new_first <= seq,
                        "removed a segment holding seq {seq} or later"
                    );
                }
                match result {
                    Ok(freed) => assert_eq!(freed > 0, new_first > old_first),
                    Err(e) => self.check_error(armed, "remove_segments_before", &e),
                }
                let removed = (new_first - old_first) as usize;
                self.model
                    .records
                    .drain(..removed.min(self.model.records.len()));
                self.model.first_seq = new_first;
            }
            Op::SaveSnapshot { covers, len } => {
                let covers = covers % self.model.next_seq();
                let bytes = common::body(covers, len, 3);
                match self.log().save_snapshot(covers, &bytes) {
                    Ok(()) => {
                        // The records a snapshot covers are durable once it is saved.
                        self.model.durable_next = self.model.durable_next.max(covers + 1);
                        self.model.snapshots = vec![Some((covers, bytes))];
                    }
                    Err(e) => {
                        let next = self.log().next_seq();
                        self.model.truncate(next);
                        self.model.snapshots.push(Some((covers, bytes)));
                        self.check_error(armed, "save_snapshot", &e);
                    }
                }
            }
            Op::LoadSnapshot => {
                let got = self
                    .log()
                    .load_snapshot()
                    .expect("load")
                    .map(|(covers, bytes)| (covers, bytes.to_vec()));
                assert!(self.model.snapshots.contains(&got), "snapshot {got:?}");
                assert!(self.log().take_damage().is_empty());
                self.model.snapshots = vec![got];
            }
            Op::Fault { op, fault, nth } => {
                // One fault at a time, so undoing a failure never fails too.
                if !armed {
                    self.env.fs.fail_nth(op, nth, fault);
                }
            }
            Op::Crash => self.reopen(true),
            Op::Reopen => self.reopen(false),
        }
        let log = self.log.as_ref().expect("log is open");
        assert_eq!(log.next_seq(), self.model.next_seq(), "after {op:?}");
        assert_eq!(log.first_seq(), self.model.first_seq, "after {op:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_a_vector_of_records(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..120)) {
        let mut env = Env::small(seed);
        env.config.segment_bytes_max = 512;
        env.config.index_every_records = 3;
        env.config.record_bytes_max = 4096;
        let log = env.open_clean();
        let mut harness = Harness {
            env,
            log: Some(log),
            model: Model {
                records: Vec::new(),
                first_seq: 1,
                durable_next: 1,
                last_timestamp: 0,
                snapshots: vec![None],
            },
        };
        for op in &ops {
            harness.apply(op);
        }
        harness.check_all();
        harness.reopen(true);
        let log = harness.log();
        log.verify().expect("verify");
        prop_assert!(log.take_damage().is_empty());
    }
}
