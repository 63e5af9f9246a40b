//! Recovery from damage on disk: torn tails, corrupt records in the middle
//! of the active or a sealed segment, damaged or missing index files and
//! segments, a damaged snapshot, and random bit flips anywhere.

mod common;

use std::io::Write;

use common::{append_n, expected_record, file_len, flip_bit, record_bytes, scan_all, Env};
use courier_log::{Damage, Log, LogError, RecordKind, Seq};
use proptest::prelude::*;

/// One segment big enough for every record of the test.
fn one_segment_env(seed: u64) -> Env {
    let mut env = Env::small(seed);
    env.config.segment_bytes_max = 1 << 20;
    env
}

fn active_path(log: &Log) -> std::path::PathBuf {
    log.segments().last().expect("active segment").path.clone()
}

#[test]
fn incomplete_record_at_the_end_is_a_torn_tail_and_is_truncated() {
    let env = one_segment_env(1);
    let mut log = env.open_clean();
    append_n(&mut log, 10, 40);
    log.sync().expect("sync");
    let path = active_path(&log);
    drop(log);
    let good_len = file_len(&path);
    // The first 30 bytes of a record a crash cut short.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    file.write_all(&[
        0, 0, 0, 57, 1, 2, 3, 4, 1, 0, 0, 0, 0, 0, 0, 0, 11, 0, 0, 0, 0, 0, 0, 0, 1, 9, 9, 9, 9, 9,
    ])
    .expect("write");
    drop(file);

    let (mut log, damage) = env.open();
    assert_eq!(
        damage,
        vec![Damage::TornTail {
            segment: path.clone(),
            offset: good_len,
            bytes_dropped: 30
        }]
    );
    assert!(
        damage[0].to_string().contains("dropped 30 bytes"),
        "{}",
        damage[0]
    );
    assert_eq!(file_len(&path), good_len);
    assert_eq!(log.metrics().torn_tails_truncated, 1);
    assert_eq!(log.next_seq(), 11);
    assert_eq!(scan_all(&mut log, 1).expect("scan").len(), 10);
    assert_eq!(
        log.append(RecordKind::Message, 11_000, b"next")
            .expect("append"),
        11
    );
    log.sync().expect("sync");
    drop(log);
    let mut log = env.open_clean();
    assert_eq!(
        &log.read(11).expect("read").expect("present").body[..],
        b"next"
    );
}

#[test]
fn whole_record_with_a_bad_checksum_at_the_end_is_a_torn_tail() {
    let env = one_segment_env(2);
    let mut log = env.open_clean();
    append_n(&mut log, 10, 40);
    log.sync().expect("sync");
    let path = active_path(&log);
    drop(log);
    let last_offset = 9 * record_bytes(40);
    flip_bit(&path, last_offset + 30, 3);
    let (mut log, damage) = env.open();
    assert_eq!(
        damage,
        vec![Damage::TornTail {
            segment: path.clone(),
            offset: last_offset,
            bytes_dropped: record_bytes(40)
        }]
    );
    assert_eq!(log.next_seq(), 10);
    assert_eq!(file_len(&path), last_offset);
    assert_eq!(log.read(9).expect("read"), Some(expected_record(9, 40)));
}

#[test]
fn corrupt_record_in_the_middle_of_the_active_segment_is_kept_reported_and_loud() {
    let env = one_segment_env(3);
    let mut log = env.open_clean();
    append_n(&mut log, 20, 40);
    log.sync().expect("sync");
    let path = active_path(&log);
    drop(log);
    let len_before = file_len(&path);
    let bad_offset = 7 * record_bytes(40);
    flip_bit(&path, bad_offset + 30, 0); // a body byte of record 8

    for round in 0..2u64 {
        let (mut log, damage) = env.open();
        assert_eq!(damage.len(), 1, "{damage:?}");
        let Damage::CorruptRecord {
            segment,
            offset,
            bytes,
            seqs,
            reason,
        } = &damage[0]
        else {
            panic!("expected a corrupt record: {damage:?}");
        };
        assert_eq!(
            (segment, *offset, *bytes, seqs.clone()),
            (&path, bad_offset, record_bytes(40), 8..9)
        );
        assert!(reason.contains("checksum"), "{reason}");
        assert!(damage[0].to_string().contains("restore those records"));
        assert_eq!(log.metrics().corrupt_records_found, 1);
        assert!(file_len(&path) >= len_before, "nothing truncated");

        let err = log.read(8).expect_err("damaged record is loud");
        assert!(
            matches!(&err, LogError::Corrupt { seq: 8, resume_seq: 9, offset, .. } if *offset == bad_offset),
            "{err}"
        );
        assert!(
            err.to_string().contains("continue reading at seq 9"),
            "{err}"
        );
        for seq in (1..=20).filter(|&s| s != 8) {
            assert_eq!(
                log.read(seq).expect("intact"),
                Some(expected_record(seq, 40)),
                "seq {seq}"
            );
        }
        let err = scan_all(&mut log, 1).expect_err("scan reaching damage fails");
        assert!(matches!(err, LogError::Corrupt { seq: 8, .. }));
        assert_eq!(
            scan_all(&mut log, 9).expect("scan after").len() as u64,
            12 + round
        );
        assert_eq!(log.verify().expect("verify"), 19 + round);
        // The log goes on after the damage.
        assert_eq!(
            log.append(RecordKind::Message, 21_000, b"after")
                .expect("append"),
            21 + round
        );
        log.sync().expect("sync");
    }
}

#[test]
fn damaged_length_fields_are_resynchronised_past() {
    // Top bit: a length no record can have. Bit 0: a length a little off.
    for (byte, bit) in [(0, 7), (3, 0), (2, 1)] {
        let env = one_segment_env(4);
        let mut log = env.open_clean();
        append_n(&mut log, 20, 40);
        log.sync().expect("sync");
        let path = active_path(&log);
        drop(log);
        flip_bit(&path, 4 * record_bytes(40) + byte, bit); // record 5's length
        let (mut log, damage) = env.open();
        assert!(
            matches!(&damage[..], [Damage::CorruptRecord { seqs, .. }] if *seqs == (5..6)),
            "byte {byte} bit {bit}: {damage:?}"
        );
        assert!(matches!(log.read(5), Err(LogError::Corrupt { .. })));
        for seq in (1..=20).filter(|&s| s != 5) {
            assert_eq!(
                log.read(seq).expect("intact"),
                Some(expected_record(seq, 40))
            );
        }
    }
}

/// Appends 100 records of 40 body bytes in segments of 1 KiB (15 records
/// each), syncs, and returns the segments.
fn sealed_setup(env: &Env) -> Vec<courier_log::SegmentInfo> {
    let mut log = env.open_clean();
    append_n(&mut log, 100, 40);
    log.sync().expect("sync");
    log.segments()
}

#[test]
fn corrupt_record_in_a_sealed_segment_is_found_by_read_and_by_verify() {
    let env = Env::small(5);
    let segments = sealed_setup(&env);
    let target = &segments[2];
    let bad_seq = target.first_seq + 5; // mid-way between index entries (every 4)
    let bad_offset = 5 * record_bytes(40);
    flip_bit(&target.path, bad_offset + 28, 6);

    // Open reads only the index of a sealed segment: the damage is found later.
    let mut log = env.open_clean();
    let err = log.read(bad_seq).expect_err("loud");
    assert!(
        matches!(err, LogError::Corrupt { seq, resume_seq, .. } if seq == bad_seq && resume_seq == bad_seq + 1),
        "{err}"
    );
    let damage = log.take_damage();
    assert!(
        matches!(&damage[..], [Damage::CorruptRecord { segment, offset, seqs, .. }]
            if *segment == target.path && *offset == bad_offset && *seqs == (bad_seq..bad_seq + 1)),
        "{damage:?}"
    );
    for seq in (1..=100).filter(|&s| s != bad_seq) {
        assert_eq!(
            log.read(seq).expect("intact"),
            Some(expected_record(seq, 40)),
            "seq {seq}"
        );
    }
    assert_eq!(log.verify().expect("verify"), 99);
    assert!(log.take_damage().is_empty(), "each damage is reported once");
    drop(log);

    // A fresh open finds it with verify (a scrub).
    let mut log = env.open_clean();
    assert_eq!(log.verify().expect("verify"), 99);
    assert_eq!(log.take_damage().len(), 1);
    assert_eq!(log.metrics().corrupt_records_found, 1);
    // The record right after the damage, read first, is found by resync.
    drop(log);
    let mut log = env.open_clean();
    assert_eq!(
        log.read(bad_seq + 1).expect("intact"),
        Some(expected_record(bad_seq + 1, 40))
    );
}

#[test]
fn zeroed_bytes_in_a_sealed_segment_lose_only_the_records_they_touch() {
    let env = Env::small(6);
    let segments = sealed_setup(&env);
    let target = &segments[1];
    // Zero from the middle of the segment's record 2 to the middle of record 5.
    let mut bytes = std::fs::read(&target.path).expect("read");
    let (from, to) = (2 * record_bytes(40) + 10, 5 * record_bytes(40) + 10);
    bytes[from as usize..to as usize].fill(0);
    std::fs::write(&target.path, bytes).expect("write");

    let mut log = env.open_clean();
    assert_eq!(log.verify().expect("verify"), 96);
    let damage = log.take_damage();
    let lost = target.first_seq + 2..target.first_seq + 6;
    // Reported as adjacent ranges: the search for the next intact record
    // stops at the next index entry, and that record is damaged too.
    let mut reported = Vec::new();
    for d in &damage {
        match d {
            Damage::CorruptRecord { seqs, segment, .. } if *segment == target.path => {
                reported.extend(seqs.clone())
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(reported, lost.clone().collect::<Vec<_>>(), "{damage:?}");
    for seq in 1..=100 {
        let read = log.read(seq);
        if lost.contains(&seq) {
            assert!(matches!(read, Err(LogError::Corrupt { .. })), "seq {seq}");
        } else {
            assert_eq!(
                read.expect("intact"),
                Some(expected_record(seq, 40)),
                "seq {seq}"
            );
        }
    }
}

#[test]
fn damaged_index_is_rebuilt_from_its_segment() {
    let env = Env::small(7);
    let segments = sealed_setup(&env);
    let index = segments[1].path.with_extension("idx");
    flip_bit(&index, 70, 2);
    let (mut log, damage) = env.open();
    assert!(
        matches!(&damage[..], [Damage::IndexRebuilt { index: path, .. }] if *path == index),
        "{damage:?}"
    );
    assert!(damage[0].to_string().contains("no data lost"));
    for seq in 1..=100 {
        assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 40)));
    }
    assert_eq!(log.seq_at_time(20_500).expect("lookup"), 21);
    drop(log);
    env.open_clean(); // the rebuilt index was written back

    std::fs::remove_file(&index).expect("remove index");
    let (mut log, damage) = env.open();
    assert!(
        matches!(&damage[..], [Damage::IndexRebuilt { offset: 0, reason, .. }] if reason.contains("missing")),
        "{damage:?}"
    );
    assert_eq!(log.verify().expect("verify"), 100);
}

#[test]
fn damaged_snapshot_is_reported_and_ignored() {
    let env = Env::small(8);
    let mut log = env.open_clean();
    append_n(&mut log, 10, 10);
    log.save_snapshot(10, b"the state of things").expect("save");
    drop(log);
    flip_bit(&env.snapshot_path(), 30, 1);
    let mut log = env.open_clean(); // open does not read the snapshot
    assert_eq!(log.load_snapshot().expect("no error"), None);
    let damage = log.take_damage();
    assert!(
        matches!(&damage[..], [Damage::SnapshotUnreadable { path, .. }] if *path == env.snapshot_path()),
        "{damage:?}"
    );
    assert!(damage[0].to_string().contains("snapshot ignored"));

    // Cut short, and garbage: the same.
    for contents in [vec![1, 2, 3], vec![0xff; 100]] {
        std::fs::write(env.snapshot_path(), contents).expect("write");
        assert_eq!(log.load_snapshot().expect("no error"), None);
        assert_eq!(log.take_damage().len(), 1);
    }
    // A new snapshot replaces the damaged one.
    log.save_snapshot(5, b"fresh").expect("save");
    assert_eq!(
        log.load_snapshot().expect("load"),
        Some((5, b"fresh".to_vec().into()))
    );
}

#[test]
fn missing_sealed_segment_is_reported_and_its_seqs_read_as_damaged() {
    let env = Env::small(9);
    let segments = sealed_setup(&env);
    std::fs::remove_file(&segments[2].path).expect("remove segment");
    std::fs::remove_file(segments[2].path.with_extension("idx")).expect("remove index");
    let (mut log, damage) = env.open();
    let missing = segments[2].first_seq..segments[3].first_seq;
    assert!(
        matches!(&damage[..], [Damage::MissingRecords { seqs, .. }] if *seqs == missing),
        "{damage:?}"
    );
    for seq in 1..=100 {
        let read = log.read(seq);
        if missing.contains(&seq) {
            assert!(matches!(read, Err(LogError::Corrupt { .. })), "seq {seq}");
        } else {
            assert_eq!(read.expect("intact"), Some(expected_record(seq, 40)));
        }
    }
    assert_eq!(
        log.verify().expect("verify"),
        100 - (missing.end - missing.start)
    );
}

#[test]
fn garbage_in_the_active_segment_never_fails_open() {
    for seed in 0..20u64 {
        let env = one_segment_env(10 + seed);
        let mut log = env.open_clean();
        append_n(&mut log, 5, 20);
        log.sync().expect("sync");
        let path = active_path(&log);
        drop(log);
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let garbage: Vec<u8> = (0..4000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        file.write_all(&garbage).expect("write");
        drop(file);
        let (mut log, damage) = env.open();
        assert!(!damage.is_empty());
        assert_eq!(log.next_seq(), 6, "seed {seed}: {damage:?}");
        for seq in 1..=5 {
            assert_eq!(log.read(seq).expect("read"), Some(expected_record(seq, 20)));
        }
        assert_eq!(log.append(RecordKind::State, 1, b"on").expect("append"), 6);
        log.sync().expect("sync");
    }
}

/// Where a random bit flip lands.
#[derive(Clone, Copy, Debug)]
enum Target {
    SealedSegment,
    Index,
    Snapshot,
    ActiveSegment,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// A single bit flip anywhere is detected and reported, costs at most
    /// the one record it hit, and every other synced record reads back
    /// byte-identical.
    #[test]
    fn random_bit_flip_is_detected_and_costs_at_most_one_record(
        target in prop_oneof![
            Just(Target::SealedSegment), Just(Target::Index), Just(Target::Snapshot), Just(Target::ActiveSegment)
        ],
        pick in any::<u64>(),
        position in any::<u64>(),
        bit in 0u8..8,
        lens in proptest::collection::vec(0usize..90, 60..120),
    ) {
        let env = Env::small(pick);
        let mut log = env.open_clean();
        let mut records = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            let seq = i as Seq + 1;
            let body = common::body(seq, *len, 7);
            let kind = if i % 3 == 0 { RecordKind::State } else { RecordKind::Message };
            log.append(kind, seq * 10, &body).expect("append");
            records.push(courier_log::Record { seq, timestamp: seq * 10, kind, body: body.into() });
        }
        log.save_snapshot(records.len() as Seq / 2, b"snapshot body").expect("save");
        log.sync().expect("sync");
        let segments = log.segments();
        drop(log);

        let sealed: Vec<_> = segments.iter().filter(|s| s.sealed).collect();
        prop_assume!(!sealed.is_empty());
        let path = match target {
            Target::SealedSegment => sealed[(pick % sealed.len() as u64) as usize].path.clone(),
            Target::Index => sealed[(pick % sealed.len() as u64) as usize].path.with_extension("idx"),
            Target::Snapshot => env.snapshot_path(),
            Target::ActiveSegment => segments.last().expect("active").path.clone(),
        };
        let len = file_len(&path);
        prop_assume!(len > 0);
        flip_bit(&path, position % len, bit);

        let (mut log, mut damage) = env.open();
        log.verify().expect("verify");
        damage.extend(log.take_damage());
        let snapshot = log.load_snapshot().expect("load snapshot");
        damage.extend(log.take_damage());
        prop_assert!(!damage.is_empty(), "a bit flip in {:?} went unnoticed", target);

        let mut lost = 0;
        for record in &records {
            match log.read(record.seq) {
                Ok(Some(read)) => prop_assert_eq!(&read, record),
                // A torn tail (the flip hit the active segment's last
                // record) or damage: must be reported, and cost one record.
                Ok(None) => {
                    let torn = matches!(damage[..], [Damage::TornTail { .. }]);
                    prop_assert!(torn, "record {} missing: {:?}", record.seq, damage);
                    prop_assert_eq!(record.seq, records.len() as Seq);
                    lost += 1;
                }
                Err(LogError::Corrupt { .. }) => lost += 1,
                Err(e) => return Err(TestCaseError::fail(format!("read {}: {e}", record.seq))),
            }
        }
        prop_assert!(lost <= 1, "a single bit flip cost {} records: {:?}", lost, damage);
        match target {
            Target::Snapshot => prop_assert_eq!(snapshot, None),
            _ => prop_assert!(snapshot.is_some()),
        }
        // The log goes on.
        let next = log.next_seq();
        prop_assert_eq!(log.append(RecordKind::Message, u64::MAX, b"on").expect("append"), next);
        log.sync().expect("sync");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Heavy damage everywhere (random bytes over random ranges of every
    /// file): open and verify never fail or panic, and no read ever returns
    /// a record that was not written with that seq.
    #[test]
    fn heavy_damage_never_fails_open_nor_invents_records(
        seed in any::<u64>(),
        hits in proptest::collection::vec((any::<u64>(), any::<u64>(), 1usize..200, any::<u8>()), 1..12),
    ) {
        let env = Env::small(seed);
        let mut log = env.open_clean();
        let mut records = Vec::new();
        for i in 0..150u64 {
            let seq = i + 1;
            let body = common::body(seq, (seed.wrapping_add(i * 7) % 80) as usize, 5);
            log.append(RecordKind::Message, seq, &body).expect("append");
            records.push(body);
        }
        log.save_snapshot(50, b"snap").expect("save");
        log.sync().expect("sync");
        drop(log);

        let mut files: Vec<_> = std::fs::read_dir(env.segments_dir())
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        files.push(env.snapshot_path());
        files.sort();
        for (file_pick, position, len, fill) in hits {
            let path = &files[(file_pick % files.len() as u64) as usize];
            let mut bytes = std::fs::read(path).expect("read");
            if bytes.is_empty() {
                continue;
            }
            let start = (position % bytes.len() as u64) as usize;
            let end = (start + len).min(bytes.len());
            for (i, byte) in bytes[start..end].iter_mut().enumerate() {
                *byte = fill.wrapping_add((i as u8).wrapping_mul(13));
            }
            std::fs::write(path, bytes).expect("write");
        }

        let (mut log, _damage) = env.open();
        let _ = log.verify().expect("verify");
        let _ = log.load_snapshot().expect("load snapshot");
        for seq in 0..=log.next_seq() + 1 {
            match log.read(seq) {
                Ok(Some(record)) => {
                    prop_assert_eq!(record.seq, seq);
                    prop_assert_eq!(&record.body[..], &records[seq as usize - 1][..]);
                }
                Ok(None) => prop_assert!(seq == 0 || seq >= log.next_seq() || seq < log.first_seq()),
                Err(LogError::Corrupt { seq: first, resume_seq, .. }) => {
                    prop_assert!(first <= seq && seq < resume_seq);
                }
                Err(e) => return Err(TestCaseError::fail(format!("read {seq}: {e}"))),
            }
        }
        let next = log.next_seq();
        prop_assert_eq!(log.append(RecordKind::State, 0, b"still works").expect("append"), next);
        log.sync().expect("sync");
    }
}

/// The active segment cut inside records the snapshot covers: not a torn
/// write (those records were durable) but lost records, reported with the
/// snapshot as the proof; nothing is cut, and the log goes on after the
/// snapshot, so none of the lost seqs is issued again, at this open or any
/// later one (where the gap is reported again, as missing records).
#[test]
fn records_the_snapshot_covers_cut_from_the_active_segment_are_lost_not_torn() {
    let env = one_segment_env(31);
    let mut log = env.open_clean();
    append_n(&mut log, 20, 40);
    log.save_snapshot(20, b"state").expect("snapshot");
    let path = active_path(&log);
    drop(log);
    // Inside record 13: 12 whole records stay.
    let kept = 12 * record_bytes(40);
    let cut = kept + 17;
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..cut as usize]).expect("cut");

    let (mut log, damage) = env.open();
    assert_eq!(
        damage,
        vec![Damage::DurableRecordsLost {
            segment: path.clone(),
            offset: kept,
            bytes: 17,
            seqs: 13..21,
            mark: format!(
                "the snapshot {} covers every record up to seq 20",
                env.snapshot_path().display()
            ),
        }]
    );
    let said = damage[0].to_string();
    assert!(
        said.contains("records 13..21 are lost") && said.contains("restore the segment"),
        "{said}"
    );
    assert!(damage[0].is_harmful());
    assert_eq!(file_len(&path), cut, "nothing cut");
    assert_eq!(log.metrics().records_lost, 8);
    assert_eq!(log.next_seq(), 21, "numbering goes on after the snapshot");
    for seq in 1..=12 {
        assert_eq!(
            log.read(seq).expect("intact"),
            Some(expected_record(seq, 40))
        );
    }
    for seq in 13..=20 {
        assert!(
            matches!(log.read(seq), Err(LogError::Corrupt { resume_seq: 21, .. })),
            "seq {seq}"
        );
    }
    let seq = log.next_seq();
    assert_eq!(
        log.append(RecordKind::Message, seq * 1000, &common::body(seq, 40, 0))
            .expect("append"),
        21
    );
    log.sync().expect("sync");
    drop(log);

    let (mut log, damage) = env.open();
    assert!(
        matches!(&damage[..], [Damage::MissingRecords { seqs, .. }] if *seqs == (13..21)),
        "{damage:?}"
    );
    assert!(damage[0].to_string().contains("lost"), "{}", damage[0]);
    assert_eq!(log.next_seq(), 22);
    assert_eq!(log.read(21).expect("intact"), Some(expected_record(21, 40)));
    assert!(matches!(log.read(13), Err(LogError::Corrupt { .. })));
    assert_eq!(file_len(&path), cut, "still nothing cut");
}

/// A torn write past the snapshot is still a torn tail: the mark decides.
#[test]
fn a_torn_tail_past_the_snapshot_is_still_torn() {
    let env = one_segment_env(32);
    let mut log = env.open_clean();
    append_n(&mut log, 20, 40);
    log.save_snapshot(10, b"state").expect("snapshot");
    let path = active_path(&log);
    drop(log);
    let cut = 15 * record_bytes(40) + 5;
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..cut as usize]).expect("cut");
    let (log, damage) = env.open();
    assert!(
        matches!(
            &damage[..],
            [Damage::TornTail {
                bytes_dropped: 5,
                ..
            }]
        ),
        "{damage:?}"
    );
    assert!(!damage[0].is_harmful());
    assert_eq!(log.next_seq(), 16);
}

/// A sealed segment's index is a durable mark too: when the newest
/// segment file is gone and the one before it was cut short, its index
/// (left on disk as by a roll that did not finish) proves records lost.
#[test]
fn an_index_file_proves_the_records_it_describes_durable() {
    let env = Env::small(33);
    let segments = sealed_setup(&env);
    let last_sealed = &segments[segments.len() - 2];
    let active = segments.last().expect("active");
    std::fs::remove_file(&active.path).expect("remove the active segment");
    let bytes = std::fs::read(&last_sealed.path).expect("read");
    std::fs::write(&last_sealed.path, &bytes[..bytes.len() - 3]).expect("cut");

    let (log, damage) = env.open();
    let lost = last_sealed.last_seq..active.first_seq;
    assert!(
        matches!(&damage[..], [Damage::DurableRecordsLost { seqs, mark, .. }]
            if *seqs == lost && mark.contains("index file")),
        "{damage:?}"
    );
    assert_eq!(log.next_seq(), active.first_seq);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever is cut from the end of the newest segment, and wherever the
    /// snapshot stands: a seq the snapshot covers is never issued again,
    /// and no seq ever reads back as a record other than the one first
    /// written with it — so nothing the broker keeps by seq (a backlog, an
    /// ack, a dead letter) can come to name another message. Records the
    /// snapshot covers that are gone are reported lost, never torn.
    #[test]
    fn a_covered_seq_is_never_issued_again_whatever_is_cut(
        seed in any::<u64>(),
        count in 1u64..60,
        covers_pick in any::<u64>(),
        cut_pick in any::<u64>(),
        more in 0u64..10,
        reopens in 1usize..3,
    ) {
        let mut env = Env::small(seed);
        env.config.segment_bytes_max = 700;
        env.config.index_every_records = 3;
        let mut log = env.open_clean();
        let written = append_n(&mut log, count as usize, 30);
        let covers = covers_pick % (count + 1);
        if covers > 0 {
            log.save_snapshot(covers, b"state").expect("snapshot");
        } else {
            log.sync().expect("sync");
        }
        let active = active_path(&log);
        let active_first = log.segments().last().expect("active").first_seq;
        drop(log);
        let len = file_len(&active);
        let cut = if len == 0 { 0 } else { cut_pick % (len + 1) };
        let bytes = std::fs::read(&active).expect("read");
        std::fs::write(&active, &bytes[..cut as usize]).expect("cut");
        let intact_next = active_first + cut / record_bytes(30);

        let mut issued: Vec<(Seq, u8)> = written.iter().map(|&s| (s, 0)).collect();
        for round in 0..reopens {
            let (mut log, damage) = env.open();
            prop_assert!(log.next_seq() > covers, "next {} covers {covers}", log.next_seq());
            if intact_next <= covers {
                let lost = intact_next..covers + 1;
                prop_assert!(
                    damage.iter().any(|d| d.is_harmful() && d.lost_seqs() == lost),
                    "records {lost:?} lost, reported as {damage:?}"
                );
                prop_assert!(
                    !damage.iter().any(|d| matches!(d, Damage::TornTail { .. })),
                    "{damage:?}"
                );
            }
            for &(seq, salt) in &issued {
                match log.read(seq) {
                    Ok(Some(record)) => prop_assert_eq!(
                        record.body.to_vec(),
                        common::body(seq, 30, salt),
                        "seq {} read back as another record", seq
                    ),
                    Ok(None) => prop_assert!(
                        seq >= log.next_seq() && seq > covers,
                        "seq {seq} vanished"
                    ),
                    Err(LogError::Corrupt { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("read {seq}: {e}"))),
                }
            }
            let salt = 1 + round as u8;
            for _ in 0..more {
                let seq = log.next_seq();
                if issued.iter().any(|&(s, _)| s == seq) {
                    prop_assert!(seq > covers, "seq {seq}, covered by the snapshot, issued again");
                }
                let got = log
                    .append(RecordKind::Message, seq * 1000, &common::body(seq, 30, salt))
                    .expect("append");
                prop_assert_eq!(got, seq);
                issued.retain(|&(s, _)| s != seq);
                issued.push((seq, salt));
            }
            log.sync().expect("sync");
        }
    }
}
