//! The offline scrub (`verify_dir`) and the background one (`Scrubber`):
//! every kind of damage found with its file, offset and seqs, nothing
//! written, each range reported once, and the read rate bounded.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{append_n, flip_bit, record_bytes, Env};
use courier_log::{verify_dir, Clock, Damage, Scrubber};

/// Every file under `dir` with its bytes.
fn snapshot_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in [dir.to_path_buf(), dir.join("segments")] {
        for entry in std::fs::read_dir(&sub).expect("list") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                out.insert(
                    path.display().to_string(),
                    std::fs::read(&path).expect("read"),
                );
            }
        }
    }
    out
}

/// 100 records of 40 bytes in 1 KiB segments (15 each), synced, with a
/// snapshot covering the first 98.
fn setup(seed: u64) -> (Env, Vec<courier_log::SegmentInfo>) {
    let env = Env::small(seed);
    let mut log = env.open_clean();
    append_n(&mut log, 100, 40);
    log.sync().expect("sync");
    log.save_snapshot(98, b"state").expect("snapshot");
    let segments = log.segments();
    assert!(segments.len() > 4, "{segments:?}");
    (env, segments)
}

#[test]
fn a_clean_log_verifies_clean_and_every_record_is_read() {
    let (env, segments) = setup(1);
    let mut progress = Vec::new();
    let report = verify_dir(&env.config.dir, &mut |p| progress.push(p.clone())).expect("verify");
    assert!(report.is_clean(), "{:?}", report.findings);
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.records, 100);
    assert_eq!(report.segments, segments.len());
    assert_eq!(progress.len(), segments.len());
    let last = progress.last().expect("progress");
    assert_eq!(last.bytes_done, last.bytes_total);
}

#[test]
fn every_damaged_range_is_reported_with_its_file_offset_and_seqs_and_nothing_is_written() {
    let (env, segments) = setup(2);
    // A flipped bit in a sealed segment's third record.
    let target = &segments[1];
    let bad_seq = target.first_seq + 2;
    flip_bit(&target.path, 2 * record_bytes(40) + 30, 3);
    // A damaged index of another sealed segment.
    let index = segments[2].path.with_extension("idx");
    flip_bit(&index, 20, 1);
    // The active segment cut inside records the snapshot covers.
    let active = segments.last().expect("active");
    assert!(active.first_seq <= 94);
    let keep = (94 - active.first_seq) * record_bytes(40) + 7;
    let bytes = std::fs::read(&active.path).expect("read");
    std::fs::write(&active.path, &bytes[..keep as usize]).expect("cut");
    let before = snapshot_of(&env.config.dir);

    let report = verify_dir(&env.config.dir, &mut |_| {}).expect("verify");
    assert_eq!(
        snapshot_of(&env.config.dir),
        before,
        "verify writes nothing"
    );
    let harmful: Vec<&Damage> = report.damage().collect();
    assert_eq!(harmful.len(), 2, "{:#?}", report.findings);
    assert!(
        matches!(harmful[0], Damage::CorruptRecord { segment, offset, seqs, .. }
            if *segment == target.path && *offset == 2 * record_bytes(40) && *seqs == (bad_seq..bad_seq + 1)),
        "{}",
        harmful[0]
    );
    assert!(
        matches!(harmful[1], Damage::DurableRecordsLost { segment, seqs, .. }
            if *segment == active.path && *seqs == (94..99)),
        "{}",
        harmful[1]
    );
    assert!(
        report
            .findings
            .iter()
            .any(|d| matches!(d, Damage::IndexRebuilt { index: i, .. } if *i == index)),
        "{:#?}",
        report.findings
    );
    assert!(!report.is_clean());
}

#[test]
fn a_torn_tail_past_every_mark_is_a_note_not_damage() {
    let (env, segments) = setup(3);
    let active = segments.last().expect("active");
    let bytes = std::fs::read(&active.path).expect("read");
    std::fs::write(&active.path, &bytes[..bytes.len() - 5]).expect("tear");
    let report = verify_dir(&env.config.dir, &mut |_| {}).expect("verify");
    assert!(report.is_clean(), "{:?}", report.findings);
    assert!(
        matches!(&report.findings[..], [Damage::TornTail { .. }]),
        "{:?}",
        report.findings
    );
}

#[test]
fn a_directory_without_a_log_is_refused_with_what_to_pass() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let error = verify_dir(tmp.path(), &mut |_| {}).expect_err("no log");
    assert!(error.to_string().contains("DATA_DIR/log"), "{error}");
}

#[test]
fn the_scrubber_reports_each_range_once_and_keeps_to_its_rate() {
    let (env, segments) = setup(4);
    let target = &segments[3];
    flip_bit(&target.path, record_bytes(40) + 30, 0);
    let sealed_bytes: u64 = segments[..segments.len() - 1].iter().map(|s| s.bytes).sum();
    let rate = 20 * 1024;
    let clock = Clock::manual();
    let mut scrubber = Scrubber::new(&env.config.dir, rate).with_clock(clock.clone());
    let mut found = Vec::new();
    let mut read = 0;
    let total = scrubber
        .pass(&mut |d| found.push(d), &mut |bytes| read += bytes)
        .expect("pass");
    let took = clock.elapsed_manually();
    assert!(
        total >= sealed_bytes && read == total,
        "{total} {read} {sealed_bytes}"
    );
    let due = total as f64 / rate as f64;
    assert!(
        took.as_secs_f64() >= 0.99 * due && took.as_secs_f64() <= due + 0.01,
        "{total} bytes in {took:?} at {rate} B/s"
    );
    assert!(
        matches!(&found[..], [Damage::CorruptRecord { segment, seqs, .. }]
            if *segment == target.path && *seqs == (target.first_seq + 1..target.first_seq + 2)),
        "{found:?}"
    );
    found.clear();
    let mut scrubber_fast = scrubber;
    scrubber_fast
        .pass(&mut |d| found.push(d), &mut |_| {})
        .expect("pass");
    assert!(found.is_empty(), "reported once: {found:?}");
}
