//! Disk work taken out of the log so its owner can run it without its own
//! lock: a snapshot written outside (`begin_snapshot`, `write`,
//! `snapshot_ready`, `install`) and old segments deleted outside
//! (`detach_segments_before`, `run`).

mod common;

use bytes::Bytes;
use common::{append_n, expected_record, file_len, scan_all, Env};
use courier_log::{Fault, FaultOp};

fn one_segment_env(seed: u64) -> Env {
    let mut env = Env::small(seed);
    env.config.segment_bytes_max = 1 << 20;
    env
}

#[test]
fn a_snapshot_written_outside_is_in_place_only_once_installed() {
    let env = one_segment_env(11);
    let mut log = env.open_clean();
    append_n(&mut log, 3, 40);
    let syncs_before = env.fs.counts().syncs;
    let mut snapshot = log
        .begin_snapshot(3, Bytes::from_static(b"state"))
        .expect("begin");
    assert_eq!(env.fs.counts().syncs, syncs_before, "begin does no I/O");
    // Appends go on while it is written; it covers none of them.
    append_n(&mut log, 2, 40);
    snapshot.write().expect("write");
    assert_eq!(log.load_snapshot().expect("load"), None, "not in place yet");
    // Nothing made records 1..=3 durable: being ready fsyncs them.
    log.snapshot_ready(&snapshot).expect("ready");
    snapshot.install().expect("install");
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    let (covers, state) = log.load_snapshot().expect("load").expect("a snapshot");
    assert_eq!((covers, &state[..]), (3, &b"state"[..]));
    assert!(
        log.next_seq() > 3,
        "the records it covers survived the crash"
    );
    for seq in 1..=3 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
}

#[test]
fn a_snapshot_of_records_a_sync_made_durable_needs_no_fsync_of_its_own() {
    let env = one_segment_env(12);
    let mut log = env.open_clean();
    append_n(&mut log, 3, 40);
    let mut snapshot = log
        .begin_snapshot(3, Bytes::from_static(b"state"))
        .expect("begin");
    append_n(&mut log, 2, 40);
    // The group commit's sync, outside the log too.
    let mut pending = log.begin_sync().expect("begin").expect("an fsync");
    let result = pending.run();
    log.finish_sync(pending, result).expect("finish");
    snapshot.write().expect("write");
    let syncs_before = env.fs.counts().syncs;
    log.snapshot_ready(&snapshot).expect("ready");
    assert_eq!(env.fs.counts().syncs, syncs_before, "ready did no I/O");
    snapshot.install().expect("install");
    assert_eq!(log.load_snapshot().expect("load").map(|(c, _)| c), Some(3));
}

#[test]
fn a_snapshot_whose_records_were_thrown_away_is_never_installed() {
    let env = one_segment_env(13);
    let mut log = env.open_clean();
    append_n(&mut log, 2, 40);
    log.save_snapshot(2, b"old").expect("save");
    append_n(&mut log, 3, 40);
    let mut snapshot = log
        .begin_snapshot(5, Bytes::from_static(b"new"))
        .expect("begin");
    // The fsync fails: records 3..=5 are discarded, their seqs reissued.
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    assert!(log.sync().is_err());
    assert_eq!(log.next_seq(), 3);
    append_n(&mut log, 3, 40);
    snapshot.write().expect("write");
    assert!(
        log.snapshot_ready(&snapshot).is_err(),
        "the state it holds is of records that are gone"
    );
    drop(snapshot);
    assert_eq!(
        log.load_snapshot().expect("load"),
        Some((2, bytes::Bytes::from_static(b"old")))
    );
}

#[test]
fn detached_segments_are_read_no_more_and_deleted_outside() {
    let env = Env::small(14);
    let mut log = env.open_clean();
    append_n(&mut log, 100, 40);
    log.sync().expect("sync");
    let segments = log.segments();
    let cut = segments[3].first_seq + 1;
    let index_bytes: u64 = segments[..3]
        .iter()
        .map(|s| file_len(&s.path.with_extension("idx")))
        .sum();
    let removal = log.detach_segments_before(cut);
    assert_eq!(removal.len(), 3);
    assert_eq!(log.first_seq(), segments[3].first_seq);
    assert_eq!(log.read(1).expect("read"), None);
    for detached in &segments[..3] {
        assert!(detached.path.exists(), "deleted by the job, not the log");
    }
    // The log goes on meanwhile.
    append_n(&mut log, 5, 40);
    log.sync().expect("sync");
    let freed = removal.run().expect("delete");
    assert_eq!(
        freed,
        segments[..3].iter().map(|s| s.bytes).sum::<u64>() + index_bytes
    );
    for removed in &segments[..3] {
        assert!(!removed.path.exists());
        assert!(!removed.path.with_extension("idx").exists());
    }
    assert!(log.detach_segments_before(cut).is_empty());
    drop(log);
    let mut log = env.open_clean();
    assert_eq!(
        (log.first_seq(), log.next_seq()),
        (segments[3].first_seq, 106)
    );
    assert_eq!(
        scan_all(&mut log, 1).expect("scan").len() as u64,
        106 - segments[3].first_seq
    );
}
