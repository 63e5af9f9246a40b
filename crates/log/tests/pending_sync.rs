//! A sync whose fdatasync runs outside the log (`begin_sync`, `run`,
//! `finish_sync`): records are durable only once it finished `Ok`, appends
//! may go on meanwhile, and a failure of the outside fsync is never
//! forgotten by a later fsync of the same file.

mod common;

use common::{append_n, expected_record, file_len, scan_all, Env};
use courier_log::{Fault, FaultOp, LogError};

fn one_segment_env(seed: u64) -> Env {
    let mut env = Env::small(seed);
    env.config.segment_bytes_max = 1 << 20;
    env
}

#[test]
fn records_are_durable_only_once_the_outside_fsync_ran() {
    let env = one_segment_env(1);
    let mut log = env.open_clean();
    append_n(&mut log, 3, 40);
    let syncs_before = env.fs.counts().syncs;
    let mut pending = log.begin_sync().expect("begin").expect("an fsync to run");
    assert_eq!(pending.covers(), 4);
    assert_eq!(
        env.fs.counts().syncs,
        syncs_before,
        "begin writes, it does not fsync"
    );
    // Appends go on while the fsync runs; they are not covered.
    append_n(&mut log, 2, 40);
    pending.run().expect("fsync");
    assert_eq!(env.fs.counts().syncs, syncs_before + 1);
    log.finish_sync(pending, Ok(())).expect("finish");
    drop(log);
    // A crash keeps what the fsync covered, whole; records 4 and 5 were
    // never written.
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.next_seq(), 4);
    for seq in 1..=3 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
}

#[test]
fn nothing_to_fsync_begins_nothing() {
    let env = one_segment_env(2);
    let mut log = env.open_clean();
    assert!(log.begin_sync().expect("begin").is_none());
    append_n(&mut log, 2, 40);
    log.sync().expect("sync");
    assert!(log.begin_sync().expect("begin").is_none());
}

#[test]
fn a_failed_outside_fsync_discards_everything_since_the_last_good_one() {
    let env = one_segment_env(3);
    let mut log = env.open_clean();
    append_n(&mut log, 5, 40);
    log.sync().expect("sync");
    let path = log.segments()[0].path.clone();
    let durable_len = file_len(&path);
    append_n(&mut log, 3, 40);
    let mut pending = log.begin_sync().expect("begin").expect("an fsync");
    append_n(&mut log, 2, 40);
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    let result = pending.run();
    assert!(result.is_err());
    let err = log.finish_sync(pending, result).expect_err("EIO");
    assert!(matches!(err, LogError::Io { op: "fsync", .. }), "{err}");
    assert_eq!(log.next_seq(), 6, "records 6..=10 were never durable");
    assert_eq!(file_len(&path), durable_len, "and are cut off the file");
    assert_eq!(scan_all(&mut log, 1).expect("scan").len(), 5);
}

#[test]
fn a_later_fsync_of_the_log_does_not_forget_an_outside_failure() {
    // After a failed fsync the OS may mark the unwritten pages clean, so a
    // second fsync says Ok without having written them: the log's own
    // fsync must fail too, until the failure has been dealt with.
    let env = one_segment_env(4);
    let mut log = env.open_clean();
    append_n(&mut log, 2, 40);
    log.sync().expect("sync");
    append_n(&mut log, 3, 40);
    let mut pending = log.begin_sync().expect("begin").expect("an fsync");
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    let result = pending.run();
    assert!(result.is_err());
    append_n(&mut log, 1, 40);
    assert!(
        log.sync().is_err(),
        "the outside failure is this fsync's too"
    );
    assert_eq!(log.next_seq(), 3);
    // The sync that failed finds its records gone already.
    assert!(log.finish_sync(pending, result).is_err());
    assert_eq!(log.next_seq(), 3);
    // And the log works again.
    append_n(&mut log, 2, 40);
    log.sync().expect("sync");
    assert_eq!(log.next_seq(), 5);
}

#[test]
fn a_sync_begun_before_records_were_discarded_does_not_vouch_for_them() {
    let env = one_segment_env(5);
    let mut log = env.open_clean();
    append_n(&mut log, 3, 40);
    let mut pending = log.begin_sync().expect("begin").expect("an fsync");
    pending.run().expect("fsync");
    // Meanwhile another fsync failed: everything since the last good one
    // was discarded, and the same seqs are issued again.
    append_n(&mut log, 1, 40);
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::NoSpace);
    assert!(log.sync().is_err());
    append_n(&mut log, 3, 40);
    assert!(
        log.finish_sync(pending, Ok(())).is_err(),
        "its Ok covers records that were thrown away"
    );
    log.sync().expect("sync");
    assert_eq!(log.next_seq(), 4);
}

#[test]
fn a_segment_sealed_while_the_fsync_runs_is_durable_whole() {
    let env = Env::small(6);
    let mut log = env.open_clean();
    append_n(&mut log, 3, 40);
    let mut pending = log.begin_sync().expect("begin").expect("an fsync");
    // 1 KiB segments: this seals the first one (fsyncing it) and goes on.
    append_n(&mut log, 30, 40);
    assert!(log.segments().len() > 1);
    pending.run().expect("fsync");
    log.finish_sync(pending, Ok(())).expect("finish");
    log.sync().expect("sync");
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.next_seq(), 34);
    assert_eq!(scan_all(&mut log, 1).expect("scan").len(), 33);
}

#[test]
fn one_sync_at_a_time() {
    let env = one_segment_env(7);
    let mut log = env.open_clean();
    append_n(&mut log, 1, 40);
    let pending = log.begin_sync().expect("begin").expect("an fsync");
    append_n(&mut log, 1, 40);
    assert!(matches!(log.begin_sync(), Err(LogError::Bug { .. })));
    log.finish_sync(pending, Ok(())).expect("finish");
}
