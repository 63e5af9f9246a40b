//! Helpers shared by the integration tests: temporary log directories, a
//! fault-injecting file system over them, and deterministic record bodies.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use courier_log::{Damage, FaultyFs, Log, LogConfig, RealFs, Record, RecordKind, Seq};

/// A temporary directory holding one log, the configuration for it and a
/// fault-injecting file system over the real one.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub config: LogConfig,
    pub fs: FaultyFs,
}

impl Env {
    /// Small segments (so rolling is frequent) and a dense index.
    pub fn small(seed: u64) -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut config = LogConfig::new(tmp.path().join("log"));
        config.segment_bytes_max = 1024;
        config.index_every_records = 4;
        Env {
            tmp,
            config,
            fs: FaultyFs::new(Arc::new(RealFs), seed),
        }
    }

    pub fn open(&self) -> (Log, Vec<Damage>) {
        Log::open_with(self.config.clone(), Arc::new(self.fs.clone())).expect("open")
    }

    /// Opens and asserts open found nothing wrong.
    pub fn open_clean(&self) -> Log {
        let (log, damage) = self.open();
        assert!(damage.is_empty(), "unexpected damage: {damage:#?}");
        log
    }

    pub fn segments_dir(&self) -> PathBuf {
        self.config.dir.join("segments")
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.config.dir.join("snapshot")
    }
}

/// A body whose bytes depend on `seq` and `salt`, so a record read back can
/// be told apart from any other.
pub fn body(seq: Seq, len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (seq as u8)
                .wrapping_mul(31)
                .wrapping_add(i as u8)
                .wrapping_add(salt)
        })
        .collect()
}

/// Appends `count` records of `len` body bytes, timestamp = 1000 × seq.
pub fn append_n(log: &mut Log, count: usize, len: usize) -> Vec<Seq> {
    (0..count)
        .map(|_| {
            let seq = log.next_seq();
            log.append(RecordKind::Message, seq * 1000, &body(seq, len, 0))
                .expect("append")
        })
        .collect()
}

pub fn expected_record(seq: Seq, len: usize) -> Record {
    Record {
        seq,
        timestamp: seq * 1000,
        kind: RecordKind::Message,
        body: body(seq, len, 0).into(),
    }
}

/// Every record from `from` on, as a scan delivers them.
pub fn scan_all(log: &mut Log, from: Seq) -> Result<Vec<Record>, courier_log::LogError> {
    let mut out = Vec::new();
    log.scan(from, &mut |record| {
        out.push(record);
        std::ops::ControlFlow::Continue(())
    })?;
    Ok(out)
}

pub fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let mut bytes = std::fs::read(path).expect("read file to damage");
    bytes[offset as usize] ^= 1 << bit;
    std::fs::write(path, bytes).expect("write damaged file");
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").len()
}

/// Bytes a record with a body of `len` bytes takes on disk.
pub fn record_bytes(len: usize) -> u64 {
    25 + len as u64
}
