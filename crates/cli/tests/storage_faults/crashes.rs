//! Crashes with torn tails at random points (seeded).

use super::*;

/// xorshift64*: a seeded sequence, so a failing run replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the test knows about every message it ever sent.
#[derive(Default)]
struct Ledger {
    /// Every payload sent, by its name ("m17").
    sent: BTreeSet<String>,
    /// Sent but no send result taken yet: the batch in progress.
    pending: BTreeSet<String>,
    /// Acknowledged (SendResult Ok taken), or found durable after a crash:
    /// must be delivered until acked durably.
    owed: BTreeSet<String>,
    /// Acked by the consumer and the ack synced: must never come back.
    settled: BTreeSet<String>,
    /// Acked by the consumer, not synced yet: may come back after a crash
    /// (or not, if the ack's journal record reached the disk anyway).
    acked_unsynced: Vec<String>,
    /// In progress at a crash and not found afterwards: gone for good.
    lost: BTreeSet<String>,
    acknowledged: u64,
    survived_unacknowledged: u64,
    acks_survived: u64,
}

impl Ledger {
    /// The broker synced its store: the consumer's acks are durable now.
    fn synced(&mut self) {
        for p in std::mem::take(&mut self.acked_unsynced) {
            self.owed.remove(&p);
            self.settled.insert(p);
        }
    }
}

const SENDER: ConnId = 1;
const WORKER: ConnId = 2;

/// Books the send results of a batch and checks each of its deliveries
/// against the ledger; `held` tracks what the worker holds unacked.
fn absorb(
    actions: &[Action],
    ledger: &mut Ledger,
    held: &mut BTreeMap<DeliveryId, String>,
    context: &str,
) {
    for r in results(actions) {
        let payload = format!("m{}", r.0);
        assert!(
            ledger.pending.remove(&payload),
            "{context}: a result for {payload}, which is not in progress"
        );
        assert_eq!(r.1, ErrorCode::Ok, "{context}: {payload}: {}", r.2);
        ledger.owed.insert(payload);
        ledger.acknowledged += 1;
    }
    for (conn, delivery, _, payload) in deliveries(actions) {
        assert_eq!(conn, WORKER);
        let name = payload.split(':').next().unwrap_or_default().to_string();
        assert!(ledger.sent.contains(&name), "{context}: invented {name}");
        assert!(
            !ledger.settled.contains(&name),
            "{context}: {name} was acked durably, yet it came back"
        );
        assert!(
            !ledger.lost.contains(&name),
            "{context}: {name} was lost in a crash, yet it came back"
        );
        held.retain(|_, p| *p != name);
        held.insert(delivery, name);
    }
}

#[test]
fn acknowledged_sends_survive_crashes_with_torn_tails_at_random_points() {
    const ITERATIONS: usize = 50;
    let seed: u64 = std::env::var("COURIER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    eprintln!("seed {seed} (COURIER_FAULT_SEED={seed} replays this run)");
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut disk = Disk::new(seed);
    // 3 MiB segments: small enough that sealing, index files, new segment
    // files and compaction are part of what crashes interrupt; larger than
    // the log's 1 MiB write buffer, which a big batch overflows so that its
    // records reach the file before their fsync (sealing fsyncs, so with
    // segments below 1 MiB no tail would ever tear).
    disk.config.segment_bytes_max = 3 * 1024 * 1024;
    let mut ledger = Ledger::default();
    let mut n = 0u64;
    let mut now = START;
    let mut torn_tails = 0;

    for iteration in 0..=ITERATIONS {
        let context = format!("seed {seed}, iteration {iteration}");
        let (mut node, damage) = disk.start(now);
        for d in &damage {
            assert!(
                matches!(d, Damage::TornTail { .. }),
                "{context}: a crash only ever tears the tail: {d}"
            );
            torn_tails += 1;
        }
        node.connect(SENDER, "producer", 0);
        node.connect(WORKER, "worker", 65_536);
        node.subscribe(WORKER, "load.>");
        let actions = node.take();

        // What was in progress at the crash either made it (a durable tail,
        // now owed like any acknowledged send) or is gone for good.
        let redelivered: BTreeSet<String> = deliveries(&actions)
            .into_iter()
            .map(|d| d.3.split(':').next().unwrap_or_default().to_string())
            .collect();
        // Acks not synced before the crash were journaled but may or may
        // not have reached the disk: a message either comes back or its
        // ack survived.
        for payload in std::mem::take(&mut ledger.acked_unsynced) {
            if !redelivered.contains(&payload) {
                ledger.acks_survived += 1;
                ledger.owed.remove(&payload);
                ledger.settled.insert(payload);
            }
        }
        for payload in std::mem::take(&mut ledger.pending) {
            if redelivered.contains(&payload) {
                ledger.survived_unacknowledged += 1;
                ledger.owed.insert(payload);
            } else {
                ledger.lost.insert(payload);
            }
        }
        let mut held = BTreeMap::new();
        absorb(&actions, &mut ledger, &mut held, &context);
        let missing: Vec<&String> = ledger
            .owed
            .iter()
            .filter(|p| !redelivered.contains(*p))
            .collect();
        assert!(
            missing.is_empty(),
            "{context}: acknowledged and not acked, but not delivered after recovery: {missing:?}"
        );
        if iteration == ITERATIONS {
            break;
        }

        // Work, then a crash at a random point of it: between batches, or
        // (half the time) in the middle of one whose sends are still in the
        // log's buffer or, past its 1 MiB, already written but not fsynced.
        let steps = 1 + rng.below(6);
        let crash_mid_batch = rng.below(2) == 0;
        for step in 0..=steps {
            let last = step == steps;
            match if last { 0 } else { rng.below(8) } {
                0..=3 if last && !crash_mid_batch => {}
                0..=3 => {
                    let big = rng.below(if last { 2 } else { 4 }) == 0;
                    let count = if big {
                        10 + rng.below(10)
                    } else {
                        1 + rng.below(8)
                    };
                    for _ in 0..count {
                        n += 1;
                        let name = format!("m{n}");
                        let pad = if big {
                            64 * 1024 + rng.below(48 * 1024)
                        } else {
                            rng.below(300)
                        };
                        let payload = format!("{name}:{}", "x".repeat(pad as usize));
                        ledger.sent.insert(name.clone());
                        ledger.pending.insert(name);
                        node.send(SENDER, n, Message::new(Kind::Event, "load.item", payload));
                    }
                    if !last && rng.below(4) != 0 {
                        let actions = node.take();
                        ledger.synced();
                        absorb(&actions, &mut ledger, &mut held, &context);
                    }
                }
                // The worker acks some of what it holds.
                4..=6 => {
                    let ids: Vec<DeliveryId> = held.keys().copied().collect();
                    for id in ids {
                        if rng.below(3) != 0 {
                            if let Some(p) = held.remove(&id) {
                                node.ack(WORKER, id);
                                ledger.acked_unsynced.push(p);
                            }
                        }
                    }
                    // Without a sync they may come back after the crash.
                    if rng.below(4) != 0 {
                        let actions = node.take();
                        ledger.synced();
                        absorb(&actions, &mut ledger, &mut held, &context);
                    }
                }
                _ => {
                    node.now += MS;
                    node.broker
                        .checkpoint(node.now)
                        .unwrap_or_else(|e| panic!("{context}: checkpoint: {e}"));
                    // A checkpoint syncs the store first.
                    ledger.synced();
                }
            }
        }
        assert!(
            node.alerts.is_empty(),
            "{context}: nothing went wrong, yet: {:?}",
            node.alerts
        );
        now = node.now + 1_000 * MS;
        disk.crash(node);
    }
    eprintln!(
        "{ITERATIONS} crashes: {} sends, {} acknowledged, {} unacknowledged survived, {} lost unacknowledged, {} acked durably ({} of them by acks not yet synced at a crash), {torn_tails} torn tails",
        ledger.sent.len(),
        ledger.acknowledged,
        ledger.survived_unacknowledged,
        ledger.lost.len(),
        ledger.settled.len(),
        ledger.acks_survived
    );
    assert!(
        torn_tails > 0 || std::env::var("COURIER_FAULT_SEED").is_ok(),
        "the default seed tears at least one tail, or this test proves less than it says"
    );
    assert!(ledger.acknowledged > 100, "the loop made progress");
}
