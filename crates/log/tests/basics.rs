//! The log's ordinary behaviour: appends, reads, scans, time lookups,
//! rolling, removal, snapshots, fsync policies and what open reads.

mod common;

use std::ops::ControlFlow;
use std::time::Duration;

use common::{append_n, body, expected_record, file_len, scan_all, Env};
use courier_log::{FsyncPolicy, Log, LogConfig, LogError, RecordKind};

#[test]
fn fresh_log_starts_at_seq_1_and_round_trips_across_segments_and_reopen() {
    let env = Env::small(1);
    let mut log = env.open_clean();
    assert_eq!((log.first_seq(), log.next_seq()), (1, 1));
    assert_eq!(log.read(1).expect("read"), None);
    assert_eq!(log.read(0).expect("read"), None);

    let seqs = append_n(&mut log, 100, 40);
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    // Readable before sync: from the pending buffer or the written file.
    for seq in 1..=100 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    log.sync().expect("sync");
    for seq in 1..=100 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    assert_eq!(log.read(101).expect("read"), None);
    let all = scan_all(&mut log, 1).expect("scan");
    assert_eq!(
        all,
        (1..=100)
            .map(|s| expected_record(s, 40))
            .collect::<Vec<_>>()
    );

    let segments = log.segments();
    assert!(segments.len() > 5, "small segments roll: {segments:?}");
    for pair in segments.windows(2) {
        assert!(pair[0].sealed);
        assert_eq!(pair[0].last_seq + 1, pair[1].first_seq);
        assert!(pair[0].bytes <= env.config.segment_bytes_max);
        assert_eq!(pair[0].bytes, file_len(&pair[0].path));
    }
    assert!(!segments.last().expect("active").sealed);
    assert_eq!(segments.last().expect("active").last_seq, 100);

    drop(log);
    let mut log = env.open_clean();
    assert_eq!((log.first_seq(), log.next_seq()), (1, 101));
    assert_eq!(log.segments(), segments);
    assert_eq!(scan_all(&mut log, 1).expect("scan"), all);
    assert_eq!(log.append(RecordKind::State, 1, b"x").expect("append"), 101);
}

#[test]
fn sync_with_nothing_new_touches_nothing() {
    let env = Env::small(2);
    let mut log = env.open_clean();
    append_n(&mut log, 3, 10);
    log.sync().expect("sync");
    let (counts, metrics) = (env.fs.counts(), log.metrics());
    log.sync().expect("sync");
    log.sync().expect("sync");
    assert_eq!(env.fs.counts(), counts);
    assert_eq!(log.metrics(), metrics);
    assert_eq!(metrics.syncs, 1);
}

#[test]
fn oversized_body_is_refused_and_a_record_larger_than_a_segment_gets_one_alone() {
    let mut env = Env::small(3);
    env.config.record_bytes_max = 2000;
    let mut log = env.open_clean();
    let err = log
        .append(RecordKind::Message, 1, &[0; 2001])
        .expect_err("too large");
    assert!(
        matches!(
            err,
            LogError::RecordTooLarge {
                len: 2001,
                max: 2000
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("raise the limit"));
    assert_eq!(log.next_seq(), 1);

    append_n(&mut log, 2, 10);
    let big = body(3, 1500, 0);
    assert_eq!(
        log.append(RecordKind::Message, 3000, &big).expect("append"),
        3
    );
    append_n(&mut log, 1, 10);
    log.sync().expect("sync");
    let segments = log.segments();
    assert_eq!(segments.len(), 3, "{segments:?}");
    assert_eq!((segments[1].first_seq, segments[1].last_seq), (3, 3));
    assert_eq!(log.read(3).expect("read").expect("present").body, big);
}

#[test]
fn scan_starts_anywhere_and_stops_when_asked() {
    let env = Env::small(4);
    let mut log = env.open_clean();
    append_n(&mut log, 50, 30);
    log.sync().expect("sync");
    for from in [0, 1, 7, 13, 49, 50] {
        let got = scan_all(&mut log, from).expect("scan");
        let want: Vec<_> = (from.max(1)..=50).map(|s| expected_record(s, 30)).collect();
        assert_eq!(got, want, "from {from}");
    }
    assert!(scan_all(&mut log, 51).expect("scan").is_empty());
    let mut seen = Vec::new();
    log.scan(10, &mut |record| {
        seen.push(record.seq);
        if seen.len() == 5 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .expect("scan");
    assert_eq!(seen, vec![10, 11, 12, 13, 14]);
}

#[test]
fn seq_at_time_finds_the_first_record_at_or_after_a_time() {
    let env = Env::small(5);
    let mut log = env.open_clean();
    assert_eq!(log.seq_at_time(0).expect("lookup"), 1);
    append_n(&mut log, 80, 20); // timestamps 1000, 2000, …, 80000
    for (t, want) in [
        (0, 1),
        (1000, 1),
        (1001, 2),
        (40_000, 40),
        (40_500, 41),
        (80_000, 80),
        (80_001, 81),
    ] {
        assert_eq!(log.seq_at_time(t).expect("lookup"), want, "t = {t}");
    }
    log.sync().expect("sync");
    drop(log);
    let mut log = env.open_clean();
    assert_eq!(log.seq_at_time(33_333).expect("lookup"), 34);
    // After removing old segments, times before them map to the first seq.
    log.remove_segments_before(30).expect("remove");
    let first = log.first_seq();
    assert!(first > 1);
    assert_eq!(log.seq_at_time(0).expect("lookup"), first);
}

#[test]
fn seq_at_time_is_exact_when_timestamps_go_backwards() {
    let env = Env::small(6);
    let mut log = env.open_clean();
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    let mut stamps = Vec::new();
    for _ in 0..120 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let t = rng % 1000;
        stamps.push(t);
        log.append(RecordKind::State, t, &body(t, 20, 1))
            .expect("append");
    }
    log.sync().expect("sync");
    for _ in 0..2 {
        for t in (0..1001).step_by(7) {
            let want = stamps
                .iter()
                .position(|&s| s >= t)
                .map_or(121, |i| i as u64 + 1);
            assert_eq!(log.seq_at_time(t).expect("lookup"), want, "t = {t}");
        }
        drop(log);
        log = env.open_clean();
    }
}

#[test]
fn remove_segments_before_deletes_only_whole_sealed_segments() {
    let env = Env::small(7);
    let mut log = env.open_clean();
    append_n(&mut log, 100, 40);
    log.sync().expect("sync");
    let segments = log.segments();
    let cut = segments[3].first_seq + 1;
    let index_bytes: u64 = segments[..3]
        .iter()
        .map(|s| file_len(&s.path.with_extension("idx")))
        .sum();
    let freed = log.remove_segments_before(cut).expect("remove");
    assert_eq!(
        freed,
        segments[..3].iter().map(|s| s.bytes).sum::<u64>() + index_bytes
    );
    assert_eq!(log.first_seq(), segments[3].first_seq);
    for removed in &segments[..3] {
        assert!(!removed.path.exists());
        assert!(!removed.path.with_extension("idx").exists());
    }
    assert_eq!(log.read(1).expect("read"), None);
    assert_eq!(log.read(cut).expect("read"), Some(expected_record(cut, 40)));
    assert_eq!(
        scan_all(&mut log, 1).expect("scan").len() as u64,
        101 - segments[3].first_seq
    );
    assert_eq!(log.remove_segments_before(cut).expect("remove again"), 0);

    // Everything sealed goes; the active segment never does.
    log.remove_segments_before(u64::MAX)
        .expect("remove all sealed");
    let left = log.segments();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].last_seq, 100);
    assert_eq!(log.read(100).expect("read"), Some(expected_record(100, 40)));
    drop(log);
    let mut log = env.open_clean();
    assert_eq!((log.first_seq(), log.next_seq()), (left[0].first_seq, 101));
    assert_eq!(
        log.append(RecordKind::Message, 1, b"z").expect("append"),
        101
    );
}

#[test]
fn snapshot_round_trips_replaces_and_survives_reopen() {
    let env = Env::small(8);
    let mut log = env.open_clean();
    assert_eq!(log.load_snapshot().expect("load"), None);
    assert!(log.take_damage().is_empty());
    append_n(&mut log, 30, 10);
    log.sync().expect("sync");
    log.save_snapshot(10, b"state at ten").expect("save");
    assert_eq!(
        log.load_snapshot().expect("load"),
        Some((10, b"state at ten".to_vec().into()))
    );
    log.save_snapshot(20, b"state at twenty").expect("save");
    let err = log
        .save_snapshot(31, b"ahead")
        .expect_err("ahead of the log");
    assert!(
        matches!(
            err,
            LogError::SnapshotAhead {
                covers: 31,
                next_seq: 31
            }
        ),
        "{err}"
    );
    drop(log);
    let mut log = env.open_clean();
    assert_eq!(
        log.load_snapshot().expect("load"),
        Some((20, b"state at twenty".to_vec().into()))
    );
    assert!(!env.config.dir.join("snapshot.tmp").exists());
    log.save_snapshot(0, b"")
        .expect("empty snapshot covering nothing");
    assert_eq!(
        log.load_snapshot().expect("load"),
        Some((0, Vec::new().into()))
    );
}

#[test]
fn snapshot_makes_the_records_it_covers_durable_first() {
    let env = Env::small(9);
    let mut log = env.open_clean();
    append_n(&mut log, 5, 10);
    log.sync().expect("sync");
    append_n(&mut log, 5, 10); // not synced
    log.save_snapshot(8, b"covers 8").expect("save");
    drop(log);
    env.fs.crash().expect("crash");
    let (mut log, damage) = env.open();
    assert!(damage.is_empty(), "{damage:?}");
    assert_eq!(
        log.next_seq(),
        11,
        "records a snapshot covers survive a crash"
    );
    assert_eq!(log.load_snapshot().expect("load").map(|s| s.0), Some(8));
}

#[test]
fn a_log_whose_segments_were_all_deleted_starts_after_its_snapshot() {
    let env = Env::small(10);
    let mut log = env.open_clean();
    append_n(&mut log, 20, 10);
    log.save_snapshot(20, b"all").expect("save");
    drop(log);
    std::fs::remove_dir_all(env.segments_dir()).expect("delete segments");
    let mut log = env.open_clean();
    assert_eq!(
        log.next_seq(),
        21,
        "seqs a snapshot covers are never issued again"
    );
    assert_eq!(
        log.append(RecordKind::Message, 1, b"a").expect("append"),
        21
    );
}

#[test]
fn fsync_policies_decide_when_sync_fsyncs() {
    for (policy, fsyncs_expected) in [
        (FsyncPolicy::Never, [0, 0, 0]),
        (FsyncPolicy::Always, [1, 2, 3]),
        (FsyncPolicy::Interval(Duration::ZERO), [1, 2, 3]),
        // The first sync fsyncs; the next ones fall inside the hour.
        (FsyncPolicy::Interval(Duration::from_secs(3600)), [1, 1, 1]),
    ] {
        let mut env = Env::small(11);
        env.config.segment_bytes_max = 1 << 20;
        env.config.fsync = policy;
        let mut log = env.open_clean();
        let base = log.metrics().fsyncs;
        for expected in fsyncs_expected {
            append_n(&mut log, 2, 10);
            log.sync().expect("sync");
            assert_eq!(log.metrics().fsyncs - base, expected, "{policy:?}");
        }
        assert_eq!(
            log.metrics().bytes_written,
            6 * 35,
            "{policy:?}: every sync writes"
        );
    }
}

#[test]
fn open_reads_index_files_not_sealed_segment_bodies() {
    let mut env = Env::small(12);
    env.config.segment_bytes_max = 64 * 1024;
    env.config.index_every_records = 64;
    let mut log = env.open_clean();
    append_n(&mut log, 4000, 100);
    log.sync().expect("sync");
    let segments = log.segments();
    let sealed_bytes: u64 = segments.iter().filter(|s| s.sealed).map(|s| s.bytes).sum();
    let active_bytes = segments.last().expect("active").bytes;
    drop(log);
    let before = env.fs.counts().bytes_read;
    let mut log = env.open_clean();
    let read_at_open = env.fs.counts().bytes_read - before;
    assert!(segments.len() > 5);
    assert!(
        read_at_open < active_bytes + sealed_bytes / 20,
        "open read {read_at_open} bytes; sealed segments hold {sealed_bytes}"
    );
    // A lookup decodes at most index_every_records records.
    let before = env.fs.counts().bytes_read;
    assert_eq!(
        log.read(2500).expect("read"),
        Some(expected_record(2500, 100))
    );
    // Only the records between two index entries: 64 × 125 bytes.
    assert!(
        env.fs.counts().bytes_read - before <= 64 * 125,
        "{}",
        env.fs.counts().bytes_read - before
    );
}

#[test]
fn appends_beyond_the_buffer_limit_are_written_before_sync() {
    let mut env = Env::small(13);
    env.config.segment_bytes_max = 64 << 20;
    let mut log = env.open_clean();
    let big = vec![7u8; 64 * 1024];
    for _ in 0..40 {
        log.append(RecordKind::Message, 1, &big).expect("append");
    }
    assert!(
        log.metrics().bytes_written >= 1 << 20,
        "pending stays bounded"
    );
    log.sync().expect("sync");
    assert_eq!(log.metrics().bytes_written, 40 * (25 + 64 * 1024));
    for seq in 1..=40 {
        assert_eq!(
            log.read(seq).expect("read").expect("present").body.len(),
            64 * 1024
        );
    }
}

#[test]
fn invalid_configuration_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::new(tmp.path());
    config.segment_bytes_max = 10;
    let err = Log::open(config).expect_err("too small");
    assert!(matches!(err, LogError::InvalidConfig { .. }));
    assert!(err.to_string().contains("segment_bytes_max"), "{err}");
    let mut config = LogConfig::new(tmp.path());
    config.index_every_records = 0;
    assert!(matches!(
        Log::open(config),
        Err(LogError::InvalidConfig { .. })
    ));
    let mut config = LogConfig::new(tmp.path());
    config.record_bytes_max = u32::MAX;
    assert!(matches!(
        Log::open(config),
        Err(LogError::InvalidConfig { .. })
    ));
}

#[test]
fn real_file_system_log_works_and_leaves_unknown_files_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = LogConfig::new(tmp.path().join("data"));
    let (mut log, damage) = Log::open(config.clone()).expect("open");
    assert!(damage.is_empty());
    std::fs::write(config.dir.join("segments").join("README.txt"), "mine").expect("write");
    log.append(RecordKind::State, 5, b"hello").expect("append");
    log.sync().expect("sync");
    drop(log);
    let (mut log, damage) = Log::open(config.clone()).expect("reopen");
    assert!(damage.is_empty());
    assert_eq!(
        &log.read(1).expect("read").expect("present").body[..],
        b"hello"
    );
    assert!(config.dir.join("segments").join("README.txt").exists());
    assert!(config
        .dir
        .join("segments")
        .join("00000000000000000001.log")
        .exists());
}

#[test]
fn segment_info_reports_timestamps() {
    let env = Env::small(14);
    let mut log = env.open_clean();
    let empty = log.segments();
    assert_eq!(
        (empty[0].first_seq, empty[0].last_seq, empty[0].bytes),
        (1, 0, 0)
    );
    append_n(&mut log, 40, 40);
    log.sync().expect("sync");
    for segment in log.segments() {
        assert_eq!(segment.first_timestamp, segment.first_seq * 1000);
        assert_eq!(segment.last_timestamp, segment.last_seq * 1000);
    }
}

#[test]
fn log_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Log>();
    assert_send::<LogError>();
}

/// Slow (writes 1 GiB): `cargo test -p courier-log --release -- --ignored`.
#[test]
#[ignore = "slow: writes 1 GiB to a temporary directory"]
fn open_is_fast_for_a_1_gib_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::new(tmp.path());
    config.fsync = FsyncPolicy::Never;
    let (mut log, _) = Log::open(config.clone()).expect("open");
    let record = vec![0x5a; 1000];
    let total = 1u64 << 30;
    let count = total / (25 + 1000);
    for i in 0..count {
        log.append(RecordKind::Message, i, &record).expect("append");
        if i % 1000 == 0 {
            log.sync().expect("sync");
        }
    }
    log.sync().expect("sync");
    drop(log);
    let started = std::time::Instant::now();
    let (mut log, damage) = Log::open(config).expect("reopen");
    let elapsed = started.elapsed();
    assert!(damage.is_empty());
    assert_eq!(log.next_seq(), count + 1);
    println!("opened a {count}-record, 1 GiB log in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "open took {elapsed:?}");
    let started = std::time::Instant::now();
    assert_eq!(log.seq_at_time(count / 2).expect("lookup"), count / 2 + 1);
    assert_eq!(
        log.read(count / 3)
            .expect("read")
            .expect("present")
            .body
            .len(),
        1000
    );
    println!("lookups took {:?}", started.elapsed());
}
