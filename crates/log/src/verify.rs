//! Reading every record of a log to find damage before a read does: the
//! offline scrub behind `courier verify` ([`verify_dir`]: every file of a
//! directory, read only), and the background scrub a broker runs over its
//! sealed segments at a bounded rate ([`Scrubber`]).
//!
//! Neither writes anything: damage is reported, and repaired (where that
//! is possible) by the next [`crate::Log::open`].

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Damage, LogError};
use crate::format::{
    index_file_name, parse_segments_dir_entry, segment_file_name, SegmentsDirEntry,
};
use crate::fs::{FileSystem, LogFile, OpenMode, RealFs};
use crate::log::{
    check_snapshot, index_next_seq, read_index, reconcile_boundaries, snapshot_mark, DurableMark,
};
use crate::segment::{scan_segment, Segment};
use crate::{Clock, Seq, INDEX_EVERY_RECORDS_DEFAULT};

const SEGMENTS_DIR_NAME: &str = "segments";
const SNAPSHOT_FILE_NAME: &str = "snapshot";

/// Where a verification stands, after each segment.
#[derive(Debug, Clone)]
pub struct VerifyProgress {
    /// The segment just checked.
    pub segment: PathBuf,
    pub segments_done: usize,
    pub segments_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What [`verify_dir`] found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Everything found, in file order: harm to durable data
    /// ([`Damage::is_harmful`]) and what is not (a torn tail the next open
    /// cuts, an index the next open rebuilds).
    pub findings: Vec<Damage>,
    pub segments: usize,
    /// Intact records read.
    pub records: u64,
    /// Bytes of segment files read.
    pub bytes: u64,
}

impl VerifyReport {
    /// The findings that are harm to durable data.
    pub fn damage(&self) -> impl Iterator<Item = &Damage> {
        self.findings.iter().filter(|d| d.is_harmful())
    }

    pub fn is_clean(&self) -> bool {
        self.damage().next().is_none()
    }
}

/// The segments of a log directory, by first seq.
fn list_segments(
    fs: &dyn FileSystem,
    segments_dir: &Path,
) -> Result<(Vec<Seq>, BTreeSet<Seq>), LogError> {
    let names = fs
        .list_dir(segments_dir)
        .map_err(|e| LogError::io("list", segments_dir, e))?;
    let mut segments = BTreeSet::new();
    let mut indexes = BTreeSet::new();
    for name in names {
        match parse_segments_dir_entry(&name) {
            Some(SegmentsDirEntry::Segment(seq)) => {
                segments.insert(seq);
            }
            Some(SegmentsDirEntry::Index(seq)) => {
                indexes.insert(seq);
            }
            _ => {}
        }
    }
    Ok((segments.into_iter().collect(), indexes))
}

/// Reads every file of the log in `dir` — the snapshot, every segment
/// whole (every record's checksum), every index — and reports every
/// damaged range with its file, byte offset and seqs, as
/// [`crate::Log::open`] and reads would, including records lost before a
/// durable mark. Writes nothing. `progress` is called after each segment.
///
/// The caller keeps a broker from using the directory meanwhile
/// ([`crate::DirLock::shared`]); otherwise a write in progress may be
/// reported as a torn tail.
pub fn verify_dir(
    dir: &Path,
    progress: &mut dyn FnMut(&VerifyProgress),
) -> Result<VerifyReport, LogError> {
    let fs = RealFs;
    let segments_dir = dir.join(SEGMENTS_DIR_NAME);
    if !segments_dir.is_dir() {
        return Err(LogError::InvalidConfig {
            reason: format!(
                "{} holds no log (no {SEGMENTS_DIR_NAME} directory); point at the log's directory, e.g. DATA_DIR/log",
                dir.display()
            ),
        });
    }
    let mut report = VerifyReport::default();
    let snapshot_path = dir.join(SNAPSHOT_FILE_NAME);
    if let Err((offset, reason)) = check_snapshot(&fs, &snapshot_path) {
        report.findings.push(Damage::SnapshotUnreadable {
            path: snapshot_path.clone(),
            offset,
            reason,
        });
    }
    let (firsts, indexes) = list_segments(&fs, &segments_dir)?;
    let sizes: Vec<u64> = firsts
        .iter()
        .map(|&first| {
            let path = segments_dir.join(segment_file_name(first));
            std::fs::metadata(&path)
                .map(|m| m.len())
                .map_err(|e| LogError::io("read the size of", &path, e))
        })
        .collect::<Result<_, _>>()?;
    let bytes_total: u64 = sizes.iter().sum();
    let mut sealed: Vec<Segment> = Vec::with_capacity(firsts.len());
    let mut last: Option<Segment> = None;
    let mut max_timestamp = 0;
    for (i, (&first, &size)) in firsts.iter().zip(&sizes).enumerate() {
        let is_last = i + 1 == firsts.len();
        let path = segments_dir.join(segment_file_name(first));
        let file = fs
            .open(&path, OpenMode::Read)
            .map_err(|e| LogError::io("open", &path, e))?;
        let next_first = firsts.get(i + 1).copied();
        let scanned = scan_segment(
            &*file,
            &path,
            first,
            size,
            INDEX_EVERY_RECORDS_DEFAULT,
            max_timestamp,
            is_last,
            next_first,
        )
        .map_err(|e| LogError::io("read", &path, e))?;
        let index_path = segments_dir.join(index_file_name(first));
        let mut findings = scanned.damage;
        if is_last {
            // The durable marks decide whether a short tail is torn or lost.
            let mut mark = snapshot_mark(&fs, &snapshot_path);
            if indexes.contains(&first) {
                if let Some(next_seq) = index_next_seq(&fs, &index_path, first) {
                    if mark.as_ref().is_none_or(|m| m.next_seq < next_seq) {
                        mark = Some(DurableMark {
                            next_seq,
                            proof: format!(
                                "its index file {} records seqs up to {}",
                                index_path.display(),
                                next_seq.saturating_sub(1)
                            ),
                        });
                    }
                }
            }
            if let Some(mark) = mark.filter(|m| scanned.segment.next_seq < m.next_seq) {
                findings.retain(|d| !matches!(d, Damage::TornTail { .. }));
                findings.push(Damage::DurableRecordsLost {
                    segment: path.clone(),
                    offset: scanned.segment.bytes,
                    bytes: size - scanned.segment.bytes,
                    seqs: scanned.segment.next_seq..mark.next_seq,
                    mark: mark.proof,
                });
            }
        } else if let Err((offset, reason)) = read_index(&fs, &index_path, first, size) {
            findings.push(Damage::IndexRebuilt {
                index: index_path,
                offset,
                reason: format!("{reason}; the next start rebuilds it"),
            });
        }
        report.findings.extend(findings);
        report.records += scanned.segment.records;
        report.bytes += size;
        max_timestamp = scanned.segment.max_timestamp;
        if is_last {
            last = Some(scanned.segment);
        } else {
            sealed.push(scanned.segment);
        }
        progress(&VerifyProgress {
            segment: path,
            segments_done: i + 1,
            segments_total: firsts.len(),
            bytes_done: report.bytes,
            bytes_total,
        });
    }
    report.segments = firsts.len();
    if let Some(mut last) = last {
        reconcile_boundaries(&segments_dir, &mut sealed, &mut last, &mut report.findings);
    }
    Ok(report)
}

/// A segment file read no faster than a rate: sleeps in `read_at` (on the
/// caller's thread) so the bytes read stay within `bytes_per_sec`.
struct Throttled {
    file: Box<dyn LogFile>,
    bytes_per_sec: u64,
    clock: Clock,
    started: Instant,
    read: std::cell::Cell<u64>,
}

impl LogFile for Throttled {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(offset, buf)?;
        let read = self.read.get() + n as u64;
        self.read.set(read);
        if self.bytes_per_sec > 0 {
            let due = Duration::from_secs_f64(read as f64 / self.bytes_per_sec as f64);
            let elapsed = self.clock.now().duration_since(self.started);
            if let Some(wait) = due.checked_sub(elapsed) {
                self.clock.sleep(wait);
            }
        }
        Ok(n)
    }
    fn append(&mut self, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::other("a scrub never writes"))
    }
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&mut self, _len: u64) -> io::Result<()> {
        Err(io::Error::other("a scrub never writes"))
    }
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
}

/// The background scrub: passes over a log's **sealed** segments (the
/// active one is scanned whole by every open), every record's checksum
/// checked, reading at most `bytes_per_sec`. Each damaged range is reported
/// once, however many passes meet it. Runs on the caller's thread, which it
/// blocks while it paces itself; it never writes.
pub struct Scrubber {
    segments_dir: PathBuf,
    bytes_per_sec: u64,
    clock: Clock,
    /// (segment's first seq, byte offset) of damage already reported.
    reported: HashSet<(Seq, u64)>,
}

impl Scrubber {
    /// `dir` is the log's directory (`LogConfig::dir`).
    pub fn new(dir: &Path, bytes_per_sec: u64) -> Scrubber {
        Scrubber {
            segments_dir: dir.join(SEGMENTS_DIR_NAME),
            bytes_per_sec,
            clock: Clock::system(),
            reported: HashSet::new(),
        }
    }

    /// Paces by `clock` instead of the system's (tests pass a manual one).
    pub fn with_clock(mut self, clock: Clock) -> Scrubber {
        self.clock = clock;
        self
    }

    /// One pass over the sealed segments there are now. `found` gets each
    /// damaged range not reported before; `read` the bytes of each segment
    /// once it is done. Returns the bytes read. A segment removed meanwhile
    /// (compaction) is skipped.
    pub fn pass(
        &mut self,
        found: &mut dyn FnMut(Damage),
        read: &mut dyn FnMut(u64),
    ) -> Result<u64, LogError> {
        let fs = RealFs;
        let (firsts, _) = list_segments(&fs, &self.segments_dir)?;
        let mut total = 0;
        // The last one is active; each sealed one ends where the next begins.
        for pair in firsts.windows(2) {
            let (first, next_first) = (pair[0], pair[1]);
            let path = self.segments_dir.join(segment_file_name(first));
            let file = match fs.open(&path, OpenMode::Read) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(LogError::io("open", &path, e)),
            };
            let size = file
                .size()
                .map_err(|e| LogError::io("read the size of", &path, e))?;
            let throttled = Throttled {
                file,
                bytes_per_sec: self.bytes_per_sec,
                clock: self.clock.clone(),
                started: self.clock.now(),
                read: std::cell::Cell::new(0),
            };
            let scanned = scan_segment(
                &throttled,
                &path,
                first,
                size,
                INDEX_EVERY_RECORDS_DEFAULT,
                0,
                false,
                Some(next_first),
            );
            let scanned = match scanned {
                Ok(scanned) => scanned,
                // Removed while being read: nothing to report.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(LogError::io("read", &path, e)),
            };
            let segment = scanned.segment;
            let mut damage = scanned.damage;
            // Ends before the next segment begins: records missing.
            if segment.next_seq < next_first {
                damage.push(Damage::MissingRecords {
                    segment: path.clone(),
                    offset: segment.bytes,
                    seqs: segment.next_seq..next_first,
                    reason: format!(
                        "the segment ends before seq {} but the next one starts at seq {next_first}",
                        segment.next_seq
                    ),
                });
            }
            for d in damage {
                if self.reported.insert((first, d.offset())) {
                    found(d);
                }
            }
            let bytes = throttled.read.get();
            total += bytes;
            read(bytes);
        }
        Ok(total)
    }
}
