//! The log's damage rules against real `courier serve` processes: the data
//! directory is damaged by hand between runs (torn writes, flipped bits in
//! a segment and in the snapshot), then the broker is started again. It
//! must start, report the damage on stderr (the `the log was damaged` warning
//! with the log's `Damage` sentence, or a recovery alert), and deliver
//! everything acknowledged that the damage did not hit, never a damaged
//! record with wrong contents.
//!
//! The layout of the files is docs/STORAGE.md's: `D/log/segments/<first
//! seq, 20 digits>.log`, records `length u32 | crc u32 | kind u8 | seq u64 |
//! timestamp u64 | body`, big-endian; `D/log/snapshot`, a 24-byte header,
//! the body and a crc. `courier serve` has no segment-size option and the
//! default segment is 64 MiB, so at test scale there is one segment, the
//! active one, and no index file: the index case is covered by the
//! snapshot case here (both are derived data rebuilt from the log) and by
//! `courier-log`'s own tests (`tests/damage.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{json_lines, stderr, tempdir, Broker, StderrLog};
use serde_json::Value;

/// The warning `courier serve` prints per `Damage` found when it opens the
/// log (crates/cli/src/main.rs).
const DAMAGE_WARNING: &str = "the log was damaged; see docs/STORAGE.md";
const READY_WAIT: Duration = Duration::from_secs(5);

fn listen() -> String {
    format!("127.0.0.1:{}", common::free_port())
}

fn start(dir: tempdir::Dir) -> (Broker, StderrLog) {
    Broker::start_watched(&listen(), dir)
}

fn ok(broker: &Broker, args: &[&str]) -> Vec<Value> {
    let out = broker.run(args);
    assert!(
        out.status.success(),
        "courier {args:?} failed: {}",
        stderr(&out)
    );
    json_lines(&out)
}

/// Every dead letter of `service`, read a page at a time: a page that has
/// more after it ends with a note naming the next page's `--after`.
fn all_dead_letters(broker: &Broker, service: &str) -> Vec<Value> {
    let mut letters = Vec::new();
    let mut after = "0".to_string();
    loop {
        let mut page = ok(
            broker,
            &[
                "dead-letters",
                "list",
                "--service",
                service,
                "--limit",
                "1000",
                "--after",
                &after,
            ],
        );
        match page.last().filter(|l| l["truncated"] == true) {
            Some(note) => {
                after = note["rest_after"].as_u64().expect("rest_after").to_string();
                page.pop();
                letters.extend(page);
            }
            None => {
                letters.extend(page);
                return letters;
            }
        }
    }
}

/// Creates the subscription of an offline service `audit` to `audit.>` and
/// publishes `{"n": 0}` … `{"n": count-1}`, each acknowledged by the broker.
fn offline_backlog(broker: &Broker, count: u64) {
    ok(
        broker,
        &[
            "subscribe",
            "audit.>",
            "--service",
            "audit",
            "--idle-timeout",
            "50ms",
        ],
    );
    let accepted = ok(
        broker,
        &[
            "publish",
            "audit.logged",
            "--data",
            r#"{"n":{seq}}"#,
            "--count",
            &count.to_string(),
        ],
    );
    assert_eq!(accepted.len() as u64, count, "every publish acknowledged");
}

/// Everything `service` is given on `audit.>` until it has been idle for
/// `idle`: the `n` of each payload, in delivery order (a payload without a
/// numeric `n` is a test failure: wrong contents were delivered).
fn drain(broker: &Broker, service: &str, idle: &str) -> Vec<u64> {
    ok(
        broker,
        &[
            "subscribe",
            "audit.>",
            "--service",
            service,
            "--idle-timeout",
            idle,
        ],
    )
    .iter()
    .map(|m| {
        m["payload"]["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("delivered with contents never sent: {m}"))
    })
    .collect()
}

/// One record of a segment file.
#[derive(Debug, Clone, Copy)]
struct RecordAt {
    offset: usize,
    /// Bytes the record occupies: 8 + length.
    size: usize,
    kind: u8,
    seq: u64,
}

const KIND_MESSAGE: u8 = 1;

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Walks a (whole, undamaged) segment by its length fields.
fn records(segment: &[u8]) -> Vec<RecordAt> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + 25 <= segment.len() {
        let size = 8 + u32_at(segment, offset) as usize;
        assert!(
            offset + size <= segment.len(),
            "record at {offset} runs past the end"
        );
        out.push(RecordAt {
            offset,
            size,
            kind: segment[offset + 8],
            seq: u64_at(segment, offset + 9),
        });
        offset += size;
    }
    assert_eq!(
        offset,
        segment.len(),
        "the segment ends with a whole record"
    );
    out
}

/// The one segment of a data directory (see the module comment).
fn only_segment(data_dir: &Path) -> PathBuf {
    let dir = data_dir.join("log").join("segments");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    assert_eq!(logs.len(), 1, "one segment at this scale: {logs:?}");
    assert!(
        !dir.join(
            logs[0]
                .with_extension("idx")
                .file_name()
                .expect("file name")
        )
        .exists(),
        "the active segment has no index file"
    );
    logs.remove(0)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn services(broker: &Broker) -> Vec<Value> {
    ok(broker, &["services"])
}

/// The listing of `name`, without its live instances.
fn service_state(listing: &[Value], name: &str) -> Value {
    let mut s = listing
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {listing:?}"))
        .clone();
    s.as_object_mut().expect("object").remove("instances");
    s
}

/// A torn write after the last acknowledged record — only a prefix of the
/// next record reached the disk before the machine died — is cut off at
/// start-up and reported; every acknowledged message is delivered.
#[test]
fn a_torn_write_after_the_last_record_is_dropped_reported_and_loses_nothing() {
    let (broker, _) = start(tempdir::Dir::new("torn-append"));
    offline_backlog(&broker, 5);
    let dir = broker.kill9();

    let path = only_segment(dir.path());
    let bytes = std::fs::read(&path).expect("read segment");
    let all = records(&bytes);
    let last = *all.last().expect("records");
    // The next record as a crash leaves it: a copy of the last one with the
    // next seq, of which only the first half reached the disk.
    let mut next = bytes[last.offset..last.offset + last.size].to_vec();
    next[9..17].copy_from_slice(&(last.seq + 1).to_be_bytes());
    next.truncate(last.size / 2);
    let mut torn = bytes.clone();
    torn.extend_from_slice(&next);
    std::fs::write(&path, &torn).expect("write torn segment");

    let (broker, log) = start(dir);
    let report = format!(
        "dropped {} bytes at byte {}, the remains of a write cut short by a crash",
        next.len(),
        bytes.len()
    );
    let line = log
        .wait_for(&[DAMAGE_WARNING, &report], READY_WAIT)
        .unwrap_or_else(|| panic!("no report {report:?} on stderr:\n{}", log.text()));
    assert!(line.contains("WARN"), "reported as a warning: {line}");
    assert!(line.contains(&path.display().to_string()), "{line}");
    assert_eq!(
        std::fs::read(&path).expect("read segment"),
        bytes,
        "exactly the torn bytes were cut off"
    );
    assert_eq!(
        drain(&broker, "audit", "1500ms"),
        vec![0, 1, 2, 3, 4],
        "every acknowledged message, once, in order"
    );

    // The repair was durable: the next start finds nothing to report.
    let (broker, log) = start(broker.kill9());
    // Damage is reported before recovery ends: once "recovered" is on
    // stderr, a report this start made would be there too.
    log.wait_for(&["recovered"], READY_WAIT)
        .unwrap_or_else(|| panic!("no recovery line on stderr:\n{}", log.text()));
    assert!(
        !log.text().contains(DAMAGE_WARNING),
        "repaired once, reported once:\n{}",
        log.text()
    );
    drop(broker);
}

/// The last record cut in the middle. With `--fsync always` this cannot
/// happen to an acknowledged record (it was fsynced before its
/// acknowledgement); it is what a torn write of an unacknowledged last
/// record looks like, and what a disk that lost an acknowledged tail would
/// leave. Either way: the broker starts, cuts the torn record off and says
/// so, delivers every message before the cut, and never delivers the cut
/// one (it is gone, not delivered with half its contents).
#[test]
fn a_last_record_cut_in_the_middle_is_dropped_reported_and_all_before_it_is_delivered() {
    let (broker, _) = start(tempdir::Dir::new("torn-cut"));
    offline_backlog(&broker, 5);
    let dir = broker.kill9();

    let path = only_segment(dir.path());
    let bytes = std::fs::read(&path).expect("read segment");
    let all = records(&bytes);
    let last = *all.last().expect("records");
    assert_eq!(
        (
            last.kind,
            all.iter().filter(|r| r.kind == KIND_MESSAGE).count()
        ),
        (KIND_MESSAGE, 5),
        "the last record is the last message, {{\"n\":4}}: {all:?}"
    );
    let cut = last.offset + last.size / 2;
    std::fs::write(&path, &bytes[..cut]).expect("cut segment");

    let (broker, log) = start(dir);
    let report = format!(
        "dropped {} bytes at byte {}, the remains of a write cut short by a crash",
        cut - last.offset,
        last.offset
    );
    log.wait_for(&[DAMAGE_WARNING, &report], READY_WAIT)
        .unwrap_or_else(|| panic!("no report {report:?} on stderr:\n{}", log.text()));
    assert_eq!(
        std::fs::metadata(&path).expect("segment").len(),
        last.offset as u64,
        "cut back to the end of the last whole record"
    );
    assert_eq!(drain(&broker, "audit", "1500ms"), vec![0, 1, 2, 3]);
    // The log goes on from there: a new message is delivered after them.
    ok(
        &broker,
        &["publish", "audit.logged", "--data", r#"{"n":5}"#],
    );
    assert_eq!(drain(&broker, "audit", "1s"), vec![5]);
}

/// Flips one bit in the payload `{"n":1}` of the second message record of
/// the only segment ("n" becomes "o": still valid JSON, so only the
/// checksum can tell). Returns the segment, the record hit and the
/// segment's bytes as written.
fn flip_a_bit_in_the_payload_of_n1(data_dir: &Path) -> (PathBuf, RecordAt, Vec<u8>) {
    let path = only_segment(data_dir);
    let mut bytes = std::fs::read(&path).expect("read segment");
    let all = records(&bytes);
    let hit = all
        .iter()
        .copied()
        .filter(|r| r.kind == KIND_MESSAGE)
        .nth(1)
        .unwrap_or_else(|| panic!("a second message record: {all:?}"));
    let record = &bytes[hit.offset..hit.offset + hit.size];
    let at = hit.offset
        + find(record, br#"{"n":1}"#)
            .expect("the payload {\"n\":1} is in the second message record")
        + 2;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write damaged segment");
    (path, hit, bytes)
}

/// One flipped bit in the payload of an early record of the active
/// segment: the checksum catches it, start-up reports it loudly (the log's
/// damage warning and the recovery alert), the damaged message is not
/// delivered with the wrong contents, and every message after it is.
#[test]
fn a_flipped_bit_in_an_early_record_is_reported_and_the_records_after_it_are_delivered() {
    let (broker, _) = start(tempdir::Dir::new("bitflip"));
    offline_backlog(&broker, 5);
    let dir = broker.kill9();

    let (path, hit, bytes) = flip_a_bit_in_the_payload_of_n1(dir.path());

    let (broker, log) = start(dir);
    let report = format!(
        "records {}..{} cannot be read and were kept on disk",
        hit.seq,
        hit.seq + 1
    );
    let line = log
        .wait_for(&[DAMAGE_WARNING, &report], READY_WAIT)
        .unwrap_or_else(|| panic!("no report {report:?} on stderr:\n{}", log.text()));
    assert!(
        line.contains(&format!("damaged bytes at byte {}", hit.offset))
            && line.contains("the disk may be failing"),
        "{line}"
    );
    log.wait_for(&["damaged and were skipped during recovery"], READY_WAIT)
        .unwrap_or_else(|| {
            panic!(
                "recovery does not say it skipped the damaged record:\n{}",
                log.text()
            )
        });
    assert_eq!(
        std::fs::read(&path).expect("read segment"),
        bytes,
        "nothing was deleted or rewritten"
    );
    assert_eq!(
        drain(&broker, "audit", "1500ms"),
        vec![0, 2, 3, 4],
        "the messages after the damaged one are delivered; the damaged one is not"
    );
}

/// A flipped bit in the snapshot (written by a graceful stop): start-up
/// ignores it, says so, rebuilds the state from the log, and the state is
/// what it was — subscriptions, backlogs, acks.
#[test]
fn a_flipped_bit_in_the_snapshot_is_reported_and_the_state_is_rebuilt_from_the_log() {
    let (broker, _) = start(tempdir::Dir::new("snapshot"));
    offline_backlog(&broker, 5);
    // worker takes two of the five and acks them; billing has its own.
    ok(
        &broker,
        &[
            "subscribe",
            "audit.>",
            "--service",
            "worker",
            "--idle-timeout",
            "50ms",
        ],
    );
    ok(
        &broker,
        &[
            "subscribe",
            "bill.*",
            "--service",
            "billing",
            "--idle-timeout",
            "50ms",
        ],
    );
    ok(
        &broker,
        &[
            "publish",
            "audit.logged",
            "--data",
            r#"{"n":{seq}}"#,
            "--count",
            "4",
        ],
    );
    ok(
        &broker,
        &[
            "send",
            "bill.charge",
            "--data",
            r#"{"cents":100}"#,
            "--count",
            "2",
        ],
    );
    let got = ok(
        &broker,
        &[
            "subscribe",
            "audit.>",
            "--service",
            "worker",
            "--count",
            "2",
            "--idle-timeout",
            "5s",
        ],
    );
    assert_eq!(got.len(), 2);
    let before = services(&broker);
    let (audit, worker, billing) = (
        service_state(&before, "audit"),
        service_state(&before, "worker"),
        service_state(&before, "billing"),
    );
    assert_eq!(
        (&audit["backlog"], &worker["backlog"], &billing["backlog"]),
        (&Value::from(9), &Value::from(2), &Value::from(2)),
        "{before:?}"
    );

    let (dir, code) = broker.terminate(Duration::from_secs(5));
    assert_eq!(code, Some(0), "a graceful stop");
    let snapshot = dir.path().join("log").join("snapshot");
    let mut bytes = std::fs::read(&snapshot)
        .unwrap_or_else(|e| panic!("a graceful stop saves a snapshot ({e})"));
    let body_len = u64_at(&bytes, 16) as usize;
    assert_eq!(bytes.len(), 24 + body_len + 4, "STORAGE.md §5 layout");
    let at = 24 + body_len / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&snapshot, &bytes).expect("write damaged snapshot");

    let (broker, log) = start(dir);
    let line = log
        .wait_for(
            &["snapshot ignored", "state must be rebuilt from the log"],
            READY_WAIT,
        )
        .unwrap_or_else(|| panic!("no snapshot report on stderr:\n{}", log.text()));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&snapshot.display().to_string()), "{line}");
    let after = services(&broker);
    for (name, was) in [("audit", audit), ("worker", worker), ("billing", billing)] {
        assert_eq!(
            service_state(&after, name),
            was,
            "{name} as before the stop; now {after:?}"
        );
    }
    // And the backlogs are the messages themselves: worker gets the two it
    // did not ack, audit all nine.
    let taken: Vec<u64> = got
        .iter()
        .map(|m| m["payload"]["n"].as_u64().expect("n"))
        .collect();
    let mut rest = drain(&broker, "worker", "1s");
    rest.sort_unstable();
    let owed: Vec<u64> = (0..4).filter(|n| !taken.contains(n)).collect();
    assert_eq!(rest, owed, "worker had acked {taken:?}");
    let mut audit_all = drain(&broker, "audit", "1s");
    audit_all.sort_unstable();
    assert_eq!(audit_all, vec![0, 0, 1, 1, 2, 2, 3, 3, 4]);
}

/// The same flipped bit after a graceful stop, whose snapshot already holds
/// the damaged message in audit's backlog: the broker reports the damage at
/// start-up and again each time it tries to deliver that message, keeps it
/// (it is not deleted or skipped silently: it stays in the backlog), and
/// delivers everything after it.
#[test]
fn a_flipped_bit_in_a_record_the_snapshot_covers_is_reported_kept_and_not_delivered() {
    let (broker, _) = start(tempdir::Dir::new("bitflip-snapshot"));
    offline_backlog(&broker, 5);
    let (dir, code) = broker.terminate(Duration::from_secs(5));
    assert_eq!(code, Some(0), "a graceful stop");
    assert!(dir.path().join("log").join("snapshot").exists());
    let (_, hit, _) = flip_a_bit_in_the_payload_of_n1(dir.path());

    let (broker, log) = start(dir);
    let report = format!(
        "records {}..{} cannot be read and were kept on disk",
        hit.seq,
        hit.seq + 1
    );
    log.wait_for(&[DAMAGE_WARNING, &report], READY_WAIT)
        .unwrap_or_else(|| panic!("no report {report:?} on stderr:\n{}", log.text()));
    assert_eq!(
        service_state(&services(&broker), "audit")["backlog"],
        5,
        "the damaged message is still in the backlog the snapshot saved"
    );
    assert_eq!(
        drain(&broker, "audit", "1500ms"),
        vec![0, 2, 3, 4],
        "the messages after the damaged one are delivered; the damaged one is not"
    );
    let unreadable = format!("message {} for audit cannot be read", hit.seq);
    let line = log
        .wait_for(&[&unreadable], READY_WAIT)
        .unwrap_or_else(|| panic!("no {unreadable:?} on stderr:\n{}", log.text()));
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(
        service_state(&services(&broker), "audit")["backlog"],
        1,
        "kept, not dropped: an operator can still restore it"
    );
}

/// The log's records, read from every segment of a data directory (the
/// active one may end in a torn record, which is left out).
fn segment_files(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join("log").join("segments");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs
}

/// The seq the snapshot says it covers (STORAGE.md §5: bytes 8..16).
fn snapshot_covers(data_dir: &Path) -> u64 {
    let bytes = std::fs::read(data_dir.join("log").join("snapshot"))
        .unwrap_or_else(|e| panic!("a graceful stop saves a snapshot ({e})"));
    u64_at(&bytes, 8)
}

/// A seed from the clock, printed so a failure replays with
/// `COURIER_DAMAGE_SEED`.
fn damage_seed() -> u64 {
    let seed = std::env::var("COURIER_DAMAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("COURIER_DAMAGE_SEED={seed}");
    seed
}

/// Acknowledged events, a graceful stop (its snapshot covers every one of
/// them), then the segment cut at a random offset inside records that
/// snapshot covers: durable records are gone. That is not a torn write:
/// start-up reports it as an error naming the lost seqs and what to do,
/// never as "nothing to do"; the broker serves what remains (the events
/// before the cut, in order), puts the lost ones in the service's dead
/// letters (unreadable), counts them in its metrics, and numbers new
/// records above everything the snapshot covered, so no lost seq is ever
/// issued again — also after a second restart.
#[test]
fn records_cut_from_what_the_snapshot_covers_are_reported_lost_and_their_seqs_never_reissued() {
    const EVENTS: u64 = 3000;
    let seed = damage_seed();
    let (broker, _) = start(tempdir::Dir::new("lost-durable"));
    offline_backlog(&broker, EVENTS);
    let (dir, code) = broker.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0), "a graceful stop");
    let covers = snapshot_covers(dir.path());

    let path = only_segment(dir.path());
    let bytes = std::fs::read(&path).expect("read segment");
    let messages: Vec<RecordAt> = records(&bytes)
        .into_iter()
        .filter(|r| r.kind == KIND_MESSAGE)
        .collect();
    assert_eq!(messages.len() as u64, EVENTS);
    assert!(
        messages.last().expect("messages").seq <= covers,
        "the snapshot covers every acknowledged event"
    );
    // Cut inside one of the newer half of the records, at any byte of it.
    let hit = messages[(EVENTS / 2 + seed % (EVENTS / 2)) as usize];
    let cut = hit.offset + 1 + (seed / EVENTS) as usize % (hit.size - 1);
    std::fs::write(&path, &bytes[..cut]).expect("cut segment");
    let kept = messages.iter().filter(|m| m.seq < hit.seq).count() as u64;
    let lost = EVENTS - kept;

    let (broker, log) = start(dir);
    let range = format!("records {}..{}", hit.seq, covers + 1);
    let line = log
        .wait_for(&[&range, "lost"], READY_WAIT)
        .unwrap_or_else(|| panic!("no report of {range} lost on stderr:\n{}", log.text()));
    assert!(line.contains("ERROR"), "reported as an error: {line}");
    assert!(
        line.contains(&path.display().to_string()) && line.contains("restore"),
        "names the file and the fix: {line}"
    );
    for wrong in ["never durable", "nothing to do"] {
        assert!(
            !log.text().contains(wrong),
            "durable records lost are not a harmless torn write:\n{}",
            log.text()
        );
    }
    assert_eq!(
        drain(&broker, "audit", "1500ms"),
        (0..kept).collect::<Vec<_>>(),
        "every event before the cut, once, in order"
    );
    let letters = all_dead_letters(&broker, "audit");
    assert_eq!(
        letters.len() as u64,
        lost,
        "the lost events are accounted for"
    );
    for letter in &letters {
        let seq = letter["id"].as_u64().expect("id");
        assert!((hit.seq..=covers).contains(&seq), "{letter}");
        assert_eq!(letter["unreadable"], true, "{letter}");
    }
    let metrics = ok(&broker, &["metrics"]);
    assert_eq!(
        metrics[0]["records_lost"],
        covers + 1 - hit.seq,
        "{metrics:?}"
    );

    // New events: delivered, and numbered above what the snapshot covered.
    ok(
        &broker,
        &[
            "publish",
            "audit.logged",
            "--data",
            r#"{"n":9000{seq}}"#,
            "--count",
            "3",
        ],
    );
    assert_eq!(drain(&broker, "audit", "1s"), vec![90000, 90001, 90002]);
    let dir = broker.kill9();
    let segments = segment_files(dir.path());
    let newest = segments.last().expect("segments");
    assert_eq!(
        newest.file_name().and_then(|n| n.to_str()),
        Some(format!("{:020}.log", covers + 1).as_str()),
        "the log goes on after the last seq the snapshot covered: {segments:?}"
    );
    let after: Vec<RecordAt> = records(&std::fs::read(newest).expect("read segment"));
    assert!(
        after.iter().all(|r| r.seq > covers) && after.len() >= 3,
        "no seq the snapshot covered is issued again: {after:?}"
    );

    // The hole stays reported, and nothing is counted twice.
    let (broker, log) = start(dir);
    log.wait_for(&[&range], READY_WAIT)
        .unwrap_or_else(|| panic!("no report of {range} after a restart:\n{}", log.text()));
    let letters = all_dead_letters(&broker, "audit");
    assert_eq!(letters.len() as u64, lost);
    assert_eq!(drain(&broker, "audit", "1s"), Vec::<u64>::new());
}

/// Twenty records zeroed in one stretch (one damaged range) under a
/// backlog the snapshot saved: the broker warns about that range once,
/// sets the twenty messages aside (still in the backlog, not tried again
/// and again), counts the repeats in its metrics and sums them up in one
/// line — and delivers everything around the damage.
#[test]
fn a_damaged_range_is_warned_about_once_then_summed_up_and_counted() {
    let (broker, _) = start(tempdir::Dir::new("damaged-range"));
    offline_backlog(&broker, 40);
    let (dir, code) = broker.terminate(Duration::from_secs(5));
    assert_eq!(code, Some(0), "a graceful stop");
    let path = only_segment(dir.path());
    let mut bytes = std::fs::read(&path).expect("read segment");
    let messages: Vec<RecordAt> = records(&bytes)
        .into_iter()
        .filter(|r| r.kind == KIND_MESSAGE)
        .collect();
    let (from, to) = (messages[10], messages[29]);
    bytes[from.offset..to.offset + to.size].fill(0);
    std::fs::write(&path, &bytes).expect("write damaged segment");

    let (broker, log) = start(dir);
    let mut delivered = drain(&broker, "audit", "1500ms");
    delivered.sort_unstable();
    let around: Vec<u64> = (0..10).chain(30..40).collect();
    assert_eq!(delivered, around);
    let warned = "for audit cannot be read";
    let summary = "19 more messages for audit cannot be read";
    log.wait_for(&[summary], Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no summary {summary:?}:\n{}", log.text()));
    let lines: Vec<String> = log
        .lines()
        .into_iter()
        .filter(|l| l.contains(warned) && !l.contains(summary))
        .collect();
    assert_eq!(lines.len(), 1, "one warning for the range: {lines:#?}");
    assert!(
        lines[0].contains(&format!("records {}..{}", from.seq, to.seq + 1)),
        "{}",
        lines[0]
    );
    let metrics = ok(&broker, &["metrics"]);
    assert_eq!(metrics[0]["unreadable_messages"], 20, "{metrics:?}");
    assert_eq!(metrics[0]["damage_warnings_repeated"], 19, "{metrics:?}");
    assert_eq!(
        service_state(&services(&broker), "audit")["backlog"],
        20,
        "kept, not dropped: an operator can still restore them"
    );
}
