//! A failing disk: ENOSPC and EIO on writes and fsyncs, failures while
//! sealing a segment, a truncation that fails too, and crashes after them.

mod common;

use std::time::Duration;

use common::{append_n, body, expected_record, file_len, scan_all, Env};
use courier_log::{Clock, Damage, Fault, FaultOp, FsyncPolicy, LogError, RecordKind, Seq};

fn one_segment_env(seed: u64) -> Env {
    let mut env = Env::small(seed);
    env.config.segment_bytes_max = 1 << 20;
    env
}

#[test]
fn disk_full_on_write_fails_the_sync_and_the_log_recovers_when_space_returns() {
    let env = one_segment_env(1);
    let mut log = env.open_clean();
    append_n(&mut log, 5, 40);
    log.sync().expect("sync");
    let path = log.segments()[0].path.clone();
    let durable_len = file_len(&path);
    append_n(&mut log, 3, 40);
    env.fs.fail_nth(FaultOp::Write, 1, Fault::NoSpace);
    let err = log.sync().expect_err("disk full");
    assert!(matches!(err, LogError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("free disk space"), "{err}");
    // Nothing acknowledged: the unsynced records are gone, the partial
    // write cut off, the synced ones readable.
    assert_eq!(log.next_seq(), 6);
    assert_eq!(file_len(&path), durable_len);
    assert_eq!(log.read(6).expect("read"), None);
    assert_eq!(scan_all(&mut log, 1).expect("scan").len(), 5);
    let metrics = log.metrics();
    assert_eq!((metrics.write_errors, metrics.records_discarded), (1, 3));

    // Space is back: seqs 6.. are issued again, with the new contents.
    for seq in 6..=8 {
        assert_eq!(
            log.append(RecordKind::State, seq, &body(seq, 10, 9))
                .expect("append"),
            seq
        );
    }
    log.sync().expect("sync");
    drop(log);
    let mut log = env.open_clean();
    assert_eq!(log.next_seq(), 9);
    for seq in 1..=5 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    for seq in 6..=8 {
        assert_eq!(
            log.read(seq).expect("read").expect("present").body,
            body(seq, 10, 9)
        );
    }
}

#[test]
fn failed_fsync_discards_everything_since_the_last_successful_one() {
    let env = one_segment_env(2);
    let mut log = env.open_clean();
    append_n(&mut log, 5, 40);
    log.sync().expect("sync");
    let path = log.segments()[0].path.clone();
    let durable_len = file_len(&path);
    append_n(&mut log, 3, 40);
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    let err = log.sync().expect_err("EIO");
    assert!(matches!(err, LogError::Io { op: "fsync", .. }), "{err}");
    assert_eq!(
        log.next_seq(),
        6,
        "records after the last good fsync are not durable"
    );
    assert_eq!(file_len(&path), durable_len, "and are cut off the file");
    assert_eq!(log.read(7).expect("read"), None);
    assert_eq!(log.metrics().fsync_errors, 1);
    // Nothing new: a retry does not pretend the lost records were synced.
    log.sync().expect("nothing to sync");
    assert_eq!(log.next_seq(), 6);

    append_n(&mut log, 2, 12);
    log.sync().expect("sync");
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.next_seq(), 8);
    assert_eq!(log.read(7).expect("read"), Some(expected_record(7, 12)));
}

#[test]
fn failed_fsync_under_interval_policy_discards_records_written_since_the_last_fsync() {
    let mut env = one_segment_env(3);
    env.config.fsync = FsyncPolicy::Interval(Duration::from_millis(200));
    env.config.clock = Clock::manual();
    let mut log = env.open_clean();
    let base = log.metrics().fsyncs;
    append_n(&mut log, 4, 20);
    log.sync().expect("first sync fsyncs");
    append_n(&mut log, 4, 20);
    log.sync()
        .expect("written, not fsynced: inside the interval");
    assert_eq!(log.metrics().fsyncs - base, 1);
    env.config.clock.advance(Duration::from_millis(199));
    append_n(&mut log, 1, 20);
    log.sync().expect("still inside the interval");
    assert_eq!(log.metrics().fsyncs - base, 1);
    env.config.clock.advance(Duration::from_millis(1));
    append_n(&mut log, 4, 20);
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    log.sync().expect_err("fsync fails");
    assert_eq!(log.next_seq(), 5, "back to the last successful fsync");
    assert_eq!(scan_all(&mut log, 1).expect("scan").len(), 4);
}

#[test]
fn persistent_disk_full_keeps_reads_working_until_space_returns() {
    let env = Env::small(4);
    let mut log = env.open_clean();
    append_n(&mut log, 40, 40);
    log.sync().expect("sync");
    log.save_snapshot(20, b"old").expect("save");
    env.fs.fail_from(FaultOp::Write, 1, Fault::NoSpace);
    for _ in 0..5 {
        let next = log.next_seq();
        // Appends may roll a segment (which writes) or only buffer; the sync
        // must fail either way.
        let result = log
            .append(RecordKind::Message, 1, &[1; 200])
            .and_then(|_| log.sync());
        assert!(
            matches!(result, Err(LogError::NoSpace { .. })),
            "{result:?}"
        );
        assert_eq!(log.next_seq(), next);
    }
    assert!(matches!(
        log.save_snapshot(30, b"new"),
        Err(LogError::NoSpace { .. })
    ));
    assert!(!env.config.dir.join("snapshot.tmp").exists());
    for seq in 1..=40 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    assert_eq!(
        log.load_snapshot().expect("load"),
        Some((20, b"old".to_vec().into()))
    );

    env.fs.clear_faults();
    append_n(&mut log, 40, 40);
    log.sync().expect("sync");
    log.save_snapshot(70, b"new").expect("save");
    drop(log);
    let mut log = env.open_clean();
    assert_eq!(log.next_seq(), 81);
    assert_eq!(log.verify().expect("verify"), 80);
    assert_eq!(log.load_snapshot().expect("load").map(|s| s.0), Some(70));
}

/// Appends records of 40 body bytes (65 on disk) until the next one would
/// roll the 1 KiB segment; 15 fit.
fn fill_first_segment(log: &mut courier_log::Log) {
    append_n(log, 15, 40);
    assert_eq!(log.segments().len(), 1);
}

#[test]
fn failed_fsync_while_sealing_undoes_the_roll_and_discards_the_unsynced_records() {
    let env = Env::small(5);
    let mut log = env.open_clean();
    append_n(&mut log, 10, 40);
    log.sync().expect("sync");
    append_n(&mut log, 5, 40);
    // This append rolls the segment; the seal waits for the next sync.
    append_n(&mut log, 3, 40);
    assert_eq!(log.segments().len(), 2);
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    let err = log.sync().expect_err("the seal's fsync fails");
    assert!(matches!(err, LogError::Io { .. }), "{err}");
    assert_eq!(log.next_seq(), 11, "back to the last successful fsync");
    assert_eq!(log.segments().len(), 1, "the roll is undone");
    assert!(
        !log_files(&env).contains(&"00000000000000000016.log".to_string()),
        "the segment rolled to is removed"
    );
    append_n(&mut log, 10, 40);
    log.sync().expect("sync");
    assert_eq!(log.segments().len(), 2);
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.verify().expect("verify"), 20);
}

/// The file names in the segments directory.
fn log_files(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.segments_dir())
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect()
}

#[test]
fn failed_index_write_while_sealing_discards_only_the_new_segment_and_retries() {
    let env = Env::small(6);
    let mut log = env.open_clean();
    fill_first_segment(&mut log);
    log.sync().expect("sync");
    // The roll does no I/O but the new file's creation.
    log.append(RecordKind::Message, 16_000, &body(16, 40, 0))
        .expect("roll");
    // The sync writes record 16 (write 1); the seal needs no fsync of the
    // segment, all of it was durable, so its first write is the index.
    env.fs.fail_nth(FaultOp::Write, 2, Fault::NoSpace);
    let err = log.sync().expect_err("index write fails");
    assert!(matches!(err, LogError::NoSpace { .. }), "{err}");
    assert_eq!(
        log.next_seq(),
        16,
        "the sealed segment is durable; the new one's record is not"
    );
    assert_eq!(log.segments().len(), 2, "the seal is tried again");
    let leftovers: Vec<_> = log_files(&env)
        .into_iter()
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    append_n(&mut log, 5, 40);
    log.sync().expect("sync");
    assert!(log_files(&env).contains(&"00000000000000000001.idx".to_string()));
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.verify().expect("verify"), 20);
}

#[test]
fn failed_directory_fsync_while_sealing_is_retried_before_sync_succeeds() {
    let env = Env::small(7);
    let mut log = env.open_clean();
    fill_first_segment(&mut log);
    log.sync().expect("sync");
    log.append(RecordKind::Message, 16_000, &body(16, 40, 0))
        .expect("roll");
    // The seal: index fsync (1), directory fsync after its rename, which
    // also covers the new segment's entry (2).
    env.fs.fail_nth(FaultOp::Sync, 2, Fault::Io);
    let err = log.sync().expect_err("dir fsync fails");
    assert!(matches!(err, LogError::Io { .. }), "{err}");
    assert_eq!(log.next_seq(), 16);
    assert_eq!(log.segments().len(), 2, "the new segment stays active");
    // The directory fsync fails again: the new segment's records are not
    // claimed durable.
    append_n(&mut log, 3, 40);
    env.fs.fail_nth(FaultOp::Sync, 2, Fault::Io);
    assert!(log.sync().is_err());
    assert_eq!(log.next_seq(), 16);
    append_n(&mut log, 3, 40);
    let syncs_before = env.fs.counts().syncs;
    log.sync().expect("sync");
    assert_eq!(
        env.fs.counts().syncs - syncs_before,
        3,
        "the index, the directory, then the segment"
    );
    drop(log);
    env.fs.crash().expect("crash");
    let mut log = env.open_clean();
    assert_eq!(log.next_seq(), 19);
    assert_eq!(log.verify().expect("verify"), 18);
}

#[test]
fn a_write_that_cannot_be_undone_poisons_the_log_until_reopened() {
    let env = one_segment_env(8);
    let mut log = env.open_clean();
    append_n(&mut log, 5, 40);
    log.sync().expect("sync");
    append_n(&mut log, 3, 40);
    env.fs.fail_nth(FaultOp::Write, 1, Fault::Io);
    env.fs.fail_nth(FaultOp::Truncate, 1, Fault::Io);
    assert!(matches!(log.sync(), Err(LogError::Io { .. })));
    let err = log
        .append(RecordKind::Message, 1, b"x")
        .expect_err("poisoned");
    assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
    assert!(err.to_string().contains("reopen"), "{err}");
    assert!(matches!(log.sync(), Err(LogError::Poisoned { .. })));
    // Reads still work.
    for seq in 1..=5 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    drop(log);
    // Open cuts off what the failed write left: a torn record. Whole
    // records the failed write got to disk may come back (never acknowledged,
    // but intact): the log could not cut them off.
    let (mut log, damage) = env.open();
    assert!(
        damage.iter().all(|d| matches!(d, Damage::TornTail { .. })),
        "{damage:?}"
    );
    let next = log.next_seq();
    assert!((6..=9).contains(&next), "{next}");
    for seq in 1..next {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    append_n(&mut log, 2, 40);
    log.sync().expect("sync");
    assert_eq!(log.verify().expect("verify"), next + 1);
}

#[test]
fn write_fault_during_an_early_flush_fails_the_append() {
    let env = one_segment_env(9);
    let mut log = env.open_clean();
    append_n(&mut log, 3, 40);
    log.sync().expect("sync");
    env.fs.fail_nth(FaultOp::Write, 1, Fault::NoSpace);
    let big = vec![3u8; 300 * 1024];
    let mut error = None;
    for _ in 0..10 {
        if let Err(e) = log.append(RecordKind::Message, 1, &big) {
            error = Some(e);
            break;
        }
    }
    assert!(matches!(error, Some(LogError::NoSpace { .. })), "{error:?}");
    assert_eq!(log.next_seq(), 4, "the buffered records were never written");
    env.fs.clear_faults();
    log.append(RecordKind::Message, 1, &big).expect("append");
    log.sync().expect("sync");
    assert_eq!(log.read(4).expect("read").expect("present").body, big);
}

#[test]
fn crash_after_a_failed_fsync_does_not_bring_discarded_records_back() {
    let env = one_segment_env(10);
    let mut log = env.open_clean();
    append_n(&mut log, 5, 40);
    log.sync().expect("sync");
    append_n(&mut log, 3, 40);
    env.fs.fail_nth(FaultOp::Sync, 1, Fault::Io);
    log.sync().expect_err("fails");
    drop(log);
    env.fs.crash().expect("crash");
    let log = env.open_clean();
    assert_eq!(log.next_seq(), 6);
}

#[test]
fn crashes_keep_every_synced_record_and_only_tear_unsynced_tails() {
    for seed in 0..40u64 {
        let env = Env::small(seed);
        let mut log = env.open_clean();
        let mut synced: Seq = 0;
        let mut appended: Seq = 0;
        let mut bodies = Vec::new();
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for _ in 0..3 {
            for _ in 0..(rng % 30) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                appended += 1;
                bodies.push(body(appended, (rng % 100) as usize, 1));
                assert_eq!(
                    log.append(
                        RecordKind::Message,
                        appended,
                        &bodies[appended as usize - 1]
                    )
                    .expect("append"),
                    appended
                );
            }
            if rng % 2 == 0 {
                log.sync().expect("sync");
                synced = appended;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
        }
        drop(log);
        env.fs.crash().expect("crash");
        let (mut log, damage) = env.open();
        assert!(
            damage.iter().all(|d| matches!(d, Damage::TornTail { .. })),
            "seed {seed}: {damage:?}"
        );
        let next = log.next_seq();
        assert!(
            next > synced && next <= appended + 1,
            "seed {seed}: next {next}, synced {synced}"
        );
        let records = scan_all(&mut log, 1).expect("scan");
        assert_eq!(records.len() as Seq, next - 1);
        for record in records {
            assert_eq!(record.timestamp, record.seq, "seed {seed}");
            assert_eq!(record.body, bodies[record.seq as usize - 1], "seed {seed}");
        }
    }
}

#[test]
fn faulty_fs_crash_keeps_synced_bytes_tears_the_rest_and_forgets_unsynced_creations() {
    use courier_log::{FaultyFs, FileSystem, OpenMode, RealFs};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let mut torn_lengths = std::collections::BTreeSet::new();
    for seed in 0..50 {
        let fs = FaultyFs::new(Arc::new(RealFs), seed);
        let kept = dir.join(format!("kept-{seed}"));
        let mut file = fs.open(&kept, OpenMode::Create).expect("create");
        fs.sync_dir(&dir).expect("sync dir");
        file.append(&[1; 100]).expect("write");
        file.sync_data().expect("sync");
        file.append(&[2; 100]).expect("write");
        let vanishing = dir.join(format!("vanishing-{seed}"));
        let mut other = fs.open(&vanishing, OpenMode::Create).expect("create");
        other.append(&[3; 10]).expect("write");
        other.sync_data().expect("sync");
        drop((file, other));
        fs.crash().expect("crash");
        let len = file_len(&kept);
        assert!((100..=200).contains(&len), "{len}");
        torn_lengths.insert(len);
        assert!(!vanishing.exists(), "created without a directory fsync");
        // What survived a crash survives the next one.
        fs.crash().expect("crash");
        assert_eq!(file_len(&kept), len);
    }
    assert!(torn_lengths.len() > 10, "tear points vary with the seed");
}

#[test]
fn faulty_fs_injects_the_nth_fault_and_persistent_faults_until_cleared() {
    use courier_log::{FaultyFs, FileSystem, OpenMode, RealFs};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().expect("tempdir");
    let fs = FaultyFs::new(Arc::new(RealFs), 1);
    let mut file = fs
        .open(&tmp.path().join("f"), OpenMode::Create)
        .expect("create");
    fs.fail_nth(FaultOp::Write, 2, Fault::Io);
    file.append(b"a").expect("first write works");
    assert!(file.append(b"b").is_err());
    file.append(b"c").expect("one-shot");
    fs.fail_from(FaultOp::Sync, 1, Fault::NoSpace);
    for _ in 0..3 {
        let err = file.sync_data().expect_err("persistent");
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
    }
    assert_eq!(fs.pending_faults(), 1);
    fs.clear_faults();
    file.sync_data().expect("cleared");
    assert_eq!(fs.counts().writes, 3);
    assert_eq!(fs.counts().syncs, 4);
}
