//! `courier verify`: an offline scrub of a broker's data directory. Reads
//! every record, index and the snapshot, writes nothing, and prints one
//! JSON line per finding (damage, or a note about what the next start
//! repairs without loss), then a summary; progress goes to stderr.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use courier_store::{Damage, DirLock};
use serde_json::json;

/// Exit code when damage was found (the run itself succeeded).
pub const EXIT_DAMAGE_FOUND: u8 = 7;
/// Logs this big get a progress line per segment on stderr.
const PROGRESS_BYTES_MIN: u64 = 256 * 1024 * 1024;

#[derive(Args)]
pub struct VerifyArgs {
    /// The broker's data directory (as given to `courier serve`).
    #[arg(long, default_value = "./courier-data")]
    data_dir: PathBuf,
}

/// Damage was found; the findings are on stdout.
#[derive(Debug)]
pub struct DamageFound {
    count: usize,
    dir: String,
}

impl std::fmt::Display for DamageFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} damaged ranges found in {}; each is a line on stdout with its file, byte offset and seqs (docs/STORAGE.md §8 says what each means and what to do)",
            self.count, self.dir
        )
    }
}

impl std::error::Error for DamageFound {}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let dir = args.data_dir.join("log");
    // Held to the end: a broker cannot start on the directory meanwhile.
    let _lock = DirLock::shared(&dir)
        .with_context(|| format!("cannot verify {}", args.data_dir.display()))?;
    let report = courier_log_verify(&dir)?;
    for finding in &report.findings {
        crate::output::line(&finding_json(finding));
    }
    let damaged = report.damage().count();
    crate::output::line(&json!({
        "verified": dir.display().to_string(),
        "segments": report.segments,
        "records": report.records,
        "bytes": report.bytes,
        "damaged": damaged,
        "notes": report.findings.len() - damaged,
    }));
    if damaged > 0 {
        return Err(DamageFound {
            count: damaged,
            dir: args.data_dir.display().to_string(),
        }
        .into());
    }
    Ok(())
}

fn courier_log_verify(dir: &std::path::Path) -> anyhow::Result<courier_store::VerifyReport> {
    let mut announced = false;
    courier_store::verify_dir(dir, &mut |p| {
        if p.bytes_total < PROGRESS_BYTES_MIN {
            return;
        }
        if !announced {
            eprintln!(
                "courier verify: {} segments, {} MiB",
                p.segments_total,
                p.bytes_total >> 20
            );
            announced = true;
        }
        eprintln!(
            "courier verify: {}/{} segments, {}/{} MiB ({})",
            p.segments_done,
            p.segments_total,
            p.bytes_done >> 20,
            p.bytes_total >> 20,
            p.segment.display()
        );
    })
    .with_context(|| format!("cannot verify {}", dir.display()))
}

fn finding_json(d: &Damage) -> serde_json::Value {
    let kind = match d {
        Damage::TornTail { .. } => "torn_tail",
        Damage::DurableRecordsLost { .. } => "durable_records_lost",
        Damage::CorruptRecord { .. } => "corrupt_record",
        Damage::MissingRecords { .. } => "missing_records",
        Damage::IndexRebuilt { .. } => "index_damaged",
        Damage::SnapshotUnreadable { .. } => "snapshot_unreadable",
    };
    let seqs = d.unreadable_seqs();
    json!({
        "damage": d.is_harmful(),
        "kind": kind,
        "file": d.path().display().to_string(),
        "offset": d.offset(),
        "seqs": if seqs.is_empty() { json!(null) } else { json!([seqs.start, seqs.end]) },
        "message": d.to_string(),
    })
}
