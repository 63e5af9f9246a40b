//! `courier verify` and the broker's background scrub against a data
//! directory damaged by hand: every damaged range found with its file,
//! offset and seqs, nothing written, exit codes that say clean or damaged,
//! and the directory's lock respected both ways.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::{courier_bin, free_port, json_lines, stderr, tempdir, Broker};
use courier_log::{Log, LogConfig};
use courier_proto::{Kind, Message};
use courier_store::{LogStore, MessageStore};
use serde_json::Value;

/// A data directory whose log holds `count` events in 4 KiB segments (so
/// most are sealed, with index files), written as a broker writes them.
fn data_dir_with_segments(count: usize) -> (tempdir::Dir, Vec<PathBuf>) {
    let dir = tempdir::Dir::new("verify");
    let mut config = LogConfig::new(dir.path().join("log"));
    config.segment_bytes_max = 4096;
    let (log, damage) = Log::open(config).expect("open the log");
    assert!(damage.is_empty());
    let mut store = LogStore::new(log);
    for i in 0..count {
        let mut m = Message::new(Kind::Event, "audit.logged", format!("{{\"n\":{i}}}"));
        m.timestamp = 1_795_521_600_000_000_000 + i as u64;
        store.append(Arc::new(m)).expect("append");
    }
    store.sync().expect("sync");
    let segments = store
        .log()
        .segments()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    drop(store);
    (dir, segments)
}

fn verify(data_dir: &Path) -> Output {
    Command::new(courier_bin())
        .args(["verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("run courier verify")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in [dir.join("log"), dir.join("log").join("segments")] {
        for entry in std::fs::read_dir(sub).expect("list") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                let bytes = std::fs::read(&path).expect("read");
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Flips one bit in the payload of the second record of `segment`;
/// returns that record's offset.
fn flip_in_second_record(segment: &Path) -> u64 {
    let mut bytes = std::fs::read(segment).expect("read segment");
    let first_len = 8 + u32::from_be_bytes(bytes[0..4].try_into().expect("4")) as usize;
    let second_len =
        8 + u32::from_be_bytes(bytes[first_len..first_len + 4].try_into().expect("4")) as usize;
    bytes[first_len + second_len - 3] ^= 0x04;
    std::fs::write(segment, &bytes).expect("write");
    first_len as u64
}

fn first_seq(segment: &Path) -> u64 {
    segment
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("a segment's name is its first seq")
}

#[test]
fn verify_reads_everything_reports_each_damaged_range_and_writes_nothing() {
    let (dir, segments) = data_dir_with_segments(400);
    assert!(segments.len() > 5, "{segments:?}");

    let out = verify(dir.path());
    assert!(out.status.success(), "a clean log: {}", stderr(&out));
    let lines = json_lines(&out);
    let summary = lines.last().expect("a summary line");
    assert_eq!(
        (&summary["records"], &summary["damaged"]),
        (&Value::from(400), &Value::from(0)),
        "{lines:?}"
    );

    let target = &segments[2];
    let offset = flip_in_second_record(target);
    let bad_seq = first_seq(target) + 1;
    let before = files(dir.path());
    let out = verify(dir.path());
    assert_eq!(out.status.code(), Some(7), "damage found: {}", stderr(&out));
    assert!(
        stderr(&out).contains("1 damaged ranges found"),
        "{}",
        stderr(&out)
    );
    let lines = json_lines(&out);
    let damaged: Vec<&Value> = lines.iter().filter(|l| l["damage"] == true).collect();
    assert_eq!(damaged.len(), 1, "{lines:?}");
    let finding = damaged[0];
    assert_eq!(finding["kind"], "corrupt_record");
    assert_eq!(finding["file"], target.display().to_string());
    assert_eq!(finding["offset"], offset);
    assert_eq!(finding["seqs"], serde_json::json!([bad_seq, bad_seq + 1]));
    assert_eq!(files(dir.path()), before, "verify writes nothing");
}

#[test]
fn verify_refuses_while_a_broker_holds_the_directory_and_a_second_broker_too() {
    let (dir, _) = data_dir_with_segments(50);
    let listen = format!("127.0.0.1:{}", free_port());
    let broker = Broker::start_on(&listen, dir);
    let out = verify(broker.data_dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("holds the lock") && stderr(&out).contains("stop it first"),
        "{}",
        stderr(&out)
    );
    let second = Command::new(courier_bin())
        .args([
            "serve",
            "--http",
            "off",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--data-dir")
        .arg(broker.data_dir.path())
        .output()
        .expect("run a second courier serve");
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("holds the lock"),
        "{}",
        stderr(&second)
    );

    let dir = broker.kill9();
    let out = verify(dir.path());
    assert!(out.status.success(), "free again: {}", stderr(&out));
}

#[test]
fn the_background_scrub_finds_damage_in_a_sealed_segment_once_and_counts_it() {
    let (dir, segments) = data_dir_with_segments(400);
    let target = &segments[3];
    flip_in_second_record(target);
    let bad_seq = first_seq(target) + 1;
    let (broker, log) = Broker::start_watched_with(
        &format!("127.0.0.1:{}", free_port()),
        dir,
        &["--scrub-rate", "1MiB/s"],
    );
    let found = "the background scrub found damage";
    let line = log
        .wait_for(&[found], Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no scrub report:\n{}", log.text()));
    assert!(
        line.contains(&target.display().to_string())
            && line.contains(&format!("records {bad_seq}..{}", bad_seq + 1)),
        "{line}"
    );
    let metrics = common::wait_until("a scrub pass finished", Duration::from_secs(20), || {
        let out = broker.run(&["metrics"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let m = json_lines(&out).remove(0);
        if m["scrub_passes"].as_u64() >= Some(1) {
            Ok(m)
        } else {
            Err(m)
        }
    });
    assert_eq!(metrics["scrub_damage_found"], 1, "{metrics}");
    assert!(
        metrics["scrub_bytes"].as_u64() > Some(4096 * 5),
        "{metrics}"
    );
    assert_eq!(
        log.lines().iter().filter(|l| l.contains(found)).count(),
        1,
        "reported once"
    );
}
