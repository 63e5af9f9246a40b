//! Opening a log: recovery of the segments, their indexes and the
//! durable marks, damage found on the way, or a fresh log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Damage, LogError};
use crate::format::{
    index_file_name, parse_segments_dir_entry, segment_file_name, SegmentsDirEntry,
};
use crate::fs::{FileSystem, LogFile, OpenMode, RealFs};
use crate::segment::{scan_segment, Damaged, ReadAhead, Segment};
use crate::{LogConfig, Seq};

use super::files::{read_snapshot, remove_if_present, write_index};
use super::*;

impl Log {
    /// Opens (or creates) the log in `config.dir` on the real file system.
    /// Returns what recovery found and did; damage never makes it fail,
    /// only invalid configuration or the OS refusing file operations.
    pub fn open(config: LogConfig) -> Result<(Log, Vec<Damage>), LogError> {
        Log::open_with(config, Arc::new(RealFs))
    }

    /// [`Log::open`] on a given file system (fault injection in tests).
    ///
    /// Reads only what it must: each sealed segment's index file (a sealed
    /// segment's records are checked when read, or by [`Log::verify`]), and
    /// all of the last segment, whose tail a crash may have torn.
    pub fn open_with(
        config: LogConfig,
        fs: Arc<dyn FileSystem>,
    ) -> Result<(Log, Vec<Damage>), LogError> {
        config.validate()?;
        let segments_dir = config.dir.join(SEGMENTS_DIR_NAME);
        let snapshot_path = config.dir.join(SNAPSHOT_FILE_NAME);
        let snapshot_tmp_path = config.dir.join(SNAPSHOT_TMP_FILE_NAME);
        fs.create_dir_all(&segments_dir)
            .map_err(|e| LogError::io("create the log directory", &segments_dir, e))?;
        // A snapshot write a crash cut short; the previous snapshot stands.
        remove_if_present(&*fs, &snapshot_tmp_path)?;

        let mut segment_seqs = BTreeSet::new();
        let mut index_seqs = BTreeSet::new();
        let names = fs
            .list_dir(&segments_dir)
            .map_err(|e| LogError::io("list", &segments_dir, e))?;
        for name in names {
            match parse_segments_dir_entry(&name) {
                Some(SegmentsDirEntry::Segment(seq)) => {
                    segment_seqs.insert(seq);
                }
                Some(SegmentsDirEntry::Index(seq)) => {
                    index_seqs.insert(seq);
                }
                // An index write a crash cut short; sealing writes it again.
                Some(SegmentsDirEntry::IndexTmp) => {
                    remove_if_present(&*fs, &segments_dir.join(&name))?
                }
                // Not ours: leave it alone.
                None => {}
            }
        }
        for &seq in index_seqs.difference(&segment_seqs) {
            // Left by a crash between removing a segment and its index.
            remove_if_present(&*fs, &segments_dir.join(index_file_name(seq)))?;
        }
        // What the directory proves durable besides the last segment's own
        // records: nothing it covers may be taken for a torn write.
        let mut mark = snapshot_mark(&*fs, &snapshot_path);

        // Whatever directory entries are here now must stay: a previous run
        // may have created a segment and died (or failed) before it fsynced
        // the directory, and records are about to be added to that segment.
        for dir in [&config.dir, &segments_dir] {
            fs.sync_dir(dir)
                .map_err(|e| LogError::io("fsync the directory", dir, e))?;
        }
        let mut metrics = LogMetrics {
            fsyncs: 2,
            ..LogMetrics::default()
        };
        let mut damage = Vec::new();
        let Some(&last_seq) = segment_seqs.last() else {
            let log = Log::create_fresh(
                config,
                fs,
                segments_dir,
                snapshot_path,
                snapshot_tmp_path,
                metrics,
            )?;
            return Ok((log, damage));
        };
        let mut firsts: Vec<Seq> = segment_seqs.iter().copied().collect();
        let mut sealed = Vec::with_capacity(firsts.len());
        let mut max_timestamp = 0;
        let mut last_seq = last_seq;
        for at in 0..firsts.len() - 1 {
            let (first, next_first) = (firsts[at], firsts[at + 1]);
            let segment = if at + 2 == firsts.len() && !index_seqs.contains(&first) {
                // The newest sealed segment has no index: its seal may not
                // have run before the crash.
                match finish_roll(
                    &*fs,
                    &segments_dir,
                    first,
                    next_first,
                    &config,
                    max_timestamp,
                    mark.as_ref(),
                )? {
                    RollEnd::Finished(segment, scan_damage) => {
                        damage.extend(scan_damage);
                        Some(segment)
                    }
                    RollEnd::Undone(removed) => {
                        metrics.fsyncs += 1;
                        damage.extend(removed);
                        firsts.pop();
                        last_seq = first;
                        break;
                    }
                    RollEnd::NotARoll => None,
                }
            } else {
                None
            };
            let segment = match segment {
                Some(segment) => segment,
                None => load_sealed(
                    &*fs,
                    &segments_dir,
                    first,
                    next_first,
                    &config,
                    max_timestamp,
                    &mut damage,
                )?,
            };
            max_timestamp = segment.max_timestamp;
            sealed.push(segment);
        }

        // The last segment: scanned whole, its torn tail cut off.
        let path = segments_dir.join(segment_file_name(last_seq));
        let mut active_file = fs
            .open(&path, OpenMode::Append)
            .map_err(|e| LogError::io("open", &path, e))?;
        if index_seqs.contains(&last_seq) {
            // Written by a roll that did not complete: an index describes
            // only a sealed segment. What it describes was fsynced first,
            // so it is a durable mark.
            let index_path = segments_dir.join(index_file_name(last_seq));
            if let Some(next_seq) = index_next_seq(&*fs, &index_path, last_seq) {
                let by_index = DurableMark {
                    next_seq,
                    proof: format!(
                        "its index file {} records seqs up to {}",
                        index_path.display(),
                        next_seq.saturating_sub(1)
                    ),
                };
                if mark.as_ref().is_none_or(|m| m.next_seq < next_seq) {
                    mark = Some(by_index);
                }
            }
            remove_if_present(&*fs, &index_path)?;
        }
        let file_len = active_file
            .size()
            .map_err(|e| LogError::io("read the size of", &path, e))?;
        let scanned = scan_segment(
            &*active_file,
            &path,
            last_seq,
            file_len,
            config.index_every_records,
            max_timestamp,
            true,
            None,
        )
        .map_err(|e| LogError::io("read", &path, e))?;
        let mut active = match mark {
            Some(mark) if scanned.segment.next_seq < mark.next_seq => {
                // Not a torn write: durable records are gone. Nothing is
                // cut; the segment is sealed as it is and a new one starts
                // at the mark, so no lost seq is issued again.
                let lost = scanned.segment.next_seq..mark.next_seq;
                metrics.records_lost += lost.end - lost.start;
                damage.extend(
                    scanned
                        .damage
                        .into_iter()
                        .filter(|d| !matches!(d, Damage::TornTail { .. })),
                );
                let (segment, file) = seal_short_segment(
                    &*fs,
                    &segments_dir,
                    &path,
                    scanned.segment,
                    file_len,
                    mark,
                    &mut damage,
                )?;
                active_file = file;
                metrics.fsyncs += 3;
                let active = Segment::empty(segment.next_seq, segment.max_timestamp);
                sealed.push(segment);
                active
            }
            _ => {
                if let Some(at) = scanned.torn_at {
                    active_file
                        .set_len(at)
                        .map_err(|e| LogError::io("truncate the torn tail of", &path, e))?;
                    // Durable before new records go after it, so a crash
                    // cannot bring the torn bytes back between them.
                    active_file
                        .sync_data()
                        .map_err(|e| LogError::io("fsync", &path, e))?;
                    metrics.torn_tails_truncated += 1;
                    metrics.fsyncs += 1;
                }
                damage.extend(scanned.damage);
                scanned.segment
            }
        };
        reconcile_boundaries(&segments_dir, &mut sealed, &mut active, &mut damage);
        metrics.records_lost += damage
            .iter()
            .map(|d| match d {
                Damage::MissingRecords { .. } => d.lost_seqs().end - d.lost_seqs().start,
                _ => 0,
            })
            .sum::<u64>();
        metrics.corrupt_records_found = damage
            .iter()
            .filter(|d| matches!(d, Damage::CorruptRecord { .. }))
            .count() as u64;

        let log = Log::from(Opened {
            config,
            fs,
            segments_dir,
            snapshot_path,
            snapshot_tmp_path,
            sealed,
            active,
            active_file,
            metrics,
        });
        Ok((log, damage))
    }

    /// A directory without segments: start one. If a snapshot is there, the
    /// segments it summarised were removed by hand; start after it so no seq
    /// it covers is issued again.
    pub(crate) fn create_fresh(
        config: LogConfig,
        fs: Arc<dyn FileSystem>,
        segments_dir: PathBuf,
        snapshot_path: PathBuf,
        snapshot_tmp_path: PathBuf,
        metrics: LogMetrics,
    ) -> Result<Log, LogError> {
        let first_seq = match read_snapshot(&*fs, &snapshot_path) {
            Ok(Some((covers, _))) => covers.saturating_add(1).max(1),
            Ok(None) | Err(_) => 1,
        };
        let path = segments_dir.join(segment_file_name(first_seq));
        let active_file = fs
            .open(&path, OpenMode::Create)
            .map_err(|e| LogError::io("create", &path, e))?;
        fs.sync_dir(&segments_dir)
            .map_err(|e| LogError::io("fsync the directory", &segments_dir, e))?;
        Ok(Log::from(Opened {
            config,
            fs,
            segments_dir,
            snapshot_path,
            snapshot_tmp_path,
            sealed: Vec::new(),
            active: Segment::empty(first_seq, 0),
            active_file,
            metrics: LogMetrics {
                fsyncs: metrics.fsyncs + 1,
                ..metrics
            },
        }))
    }
}

/// What opening found or made on disk; the rest of a [`Log`] starts the
/// same however it was opened: everything written is durable, nothing is
/// pending, sealing or failed.
struct Opened {
    config: LogConfig,
    fs: Arc<dyn FileSystem>,
    segments_dir: PathBuf,
    snapshot_path: PathBuf,
    snapshot_tmp_path: PathBuf,
    sealed: Vec<Segment>,
    active: Segment,
    active_file: Box<dyn LogFile>,
    metrics: LogMetrics,
}

impl From<Opened> for Log {
    fn from(opened: Opened) -> Log {
        let mark = Mark::of(&opened.active);
        Log {
            config: opened.config,
            fs: opened.fs,
            segments_dir: opened.segments_dir,
            snapshot_path: opened.snapshot_path,
            snapshot_tmp_path: opened.snapshot_tmp_path,
            sealed: opened.sealed,
            active: opened.active,
            active_file: opened.active_file,
            pending: Vec::new(),
            written: mark,
            durable: mark,
            seal: Arc::default(),
            sealing: None,
            last_fsync: None,
            gate: Arc::default(),
            sync_in_flight: false,
            rollbacks: 0,
            poisoned: None,
            reader: None,
            readahead: ReadAhead::default(),
            damage: Vec::new(),
            metrics: opened.metrics,
        }
    }
}

/// A sealed segment from its index, or, if that is missing or bad, from a
/// scan (reported, and the index written again).
pub(crate) fn load_sealed(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    first_seq: Seq,
    next_first_seq: Seq,
    config: &LogConfig,
    earlier_max_timestamp: u64,
    damage: &mut Vec<Damage>,
) -> Result<Segment, LogError> {
    let path = segments_dir.join(segment_file_name(first_seq));
    let file = fs
        .open(&path, OpenMode::Read)
        .map_err(|e| LogError::io("open", &path, e))?;
    let file_len = file
        .size()
        .map_err(|e| LogError::io("read the size of", &path, e))?;
    let index_path = segments_dir.join(index_file_name(first_seq));
    match read_index(fs, &index_path, first_seq, file_len) {
        Ok((index, index_bytes)) => Ok(Segment::from_index(
            index,
            earlier_max_timestamp,
            index_bytes,
        )),
        Err((offset, reason)) => {
            let scanned = scan_segment(
                &*file,
                &path,
                first_seq,
                file_len,
                config.index_every_records,
                earlier_max_timestamp,
                false,
                Some(next_first_seq),
            )
            .map_err(|e| LogError::io("read", &path, e))?;
            damage.push(Damage::IndexRebuilt {
                index: index_path,
                offset,
                reason,
            });
            damage.extend(scanned.damage);
            let mut segment = scanned.segment;
            segment.sealed = true;
            // Best effort: without it the next open scans this segment
            // again (and reports it again), which is slow, not wrong.
            if let Ok(index_bytes) = write_index(fs, segments_dir, &segment) {
                segment.index_bytes = index_bytes;
            }
            Ok(segment)
        }
    }
}

/// What open makes of a newest sealed segment without an index file.
pub(crate) enum RollEnd {
    /// It holds every record up to where the last segment begins: its
    /// seal had not run, and is run now (index written, the scan's damage
    /// returned).
    Finished(Segment, Vec<Damage>),
    /// It ends before the last segment begins (a torn tail, or records
    /// the crash took), and no durable mark reaches past its intact
    /// records: the roll had not finished, so no record after its end was
    /// ever durable. The last segment was removed (reported as a torn
    /// tail), and this one is the last segment now.
    Undone(Option<Damage>),
    /// A durable mark reaches past its intact records: records are lost,
    /// not a roll cut short; it is loaded as any sealed segment.
    NotARoll,
}

/// Finishes or undoes the roll away from segment `first_seq` (the newest
/// sealed one, which has no index file); see [`RollEnd`].
pub(crate) fn finish_roll(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    first_seq: Seq,
    next_first_seq: Seq,
    config: &LogConfig,
    earlier_max_timestamp: u64,
    mark: Option<&DurableMark>,
) -> Result<RollEnd, LogError> {
    let path = segments_dir.join(segment_file_name(first_seq));
    let mut file = fs
        .open(&path, OpenMode::Read)
        .map_err(|e| LogError::io("open", &path, e))?;
    let file_len = file
        .size()
        .map_err(|e| LogError::io("read the size of", &path, e))?;
    let scanned = scan_segment(
        &*file,
        &path,
        first_seq,
        file_len,
        config.index_every_records,
        earlier_max_timestamp,
        true,
        None,
    )
    .map_err(|e| LogError::io("read", &path, e))?;
    if scanned.torn_at.is_none() && scanned.segment.next_seq == next_first_seq {
        // The seal, as the roll would have run it: the segment durable
        // before an index says what it holds.
        file.sync_data()
            .map_err(|e| LogError::io("fsync", &path, e))?;
        let mut segment = scanned.segment;
        segment.sealed = true;
        // Best effort, as for a rebuilt index: without it the next open
        // scans this segment again.
        if let Ok(index_bytes) = write_index(fs, segments_dir, &segment) {
            segment.index_bytes = index_bytes;
        }
        return Ok(RollEnd::Finished(segment, scanned.damage));
    }
    if mark.is_some_and(|mark| mark.next_seq > scanned.segment.next_seq) {
        return Ok(RollEnd::NotARoll);
    }
    let rolled_to = segments_dir.join(segment_file_name(next_first_seq));
    let bytes = fs
        .open(&rolled_to, OpenMode::Read)
        .and_then(|file| file.size())
        .map_err(|e| LogError::io("read the size of", &rolled_to, e))?;
    remove_if_present(fs, &rolled_to)?;
    remove_if_present(fs, &segments_dir.join(index_file_name(next_first_seq)))?;
    fs.sync_dir(segments_dir)
        .map_err(|e| LogError::io("fsync the directory", segments_dir, e))?;
    Ok(RollEnd::Undone((bytes > 0).then_some(Damage::TornTail {
        segment: rolled_to,
        offset: 0,
        bytes_dropped: bytes,
    })))
}

/// The last segment ends before `mark`: seals it as it is (no byte cut),
/// with an index of its intact records, reports the loss, and starts the
/// next segment at the mark. Returns the sealed segment (its lost seqs
/// read as damaged) and the new active file.
pub(crate) fn seal_short_segment(
    fs: &dyn FileSystem,
    segments_dir: &Path,
    path: &Path,
    mut segment: Segment,
    file_len: u64,
    mark: DurableMark,
    damage: &mut Vec<Damage>,
) -> Result<(Segment, Box<dyn LogFile>), LogError> {
    let intact_end = segment.bytes;
    let lost = segment.next_seq..mark.next_seq;
    damage.push(Damage::DurableRecordsLost {
        segment: path.to_path_buf(),
        offset: intact_end,
        bytes: file_len - intact_end,
        seqs: lost.clone(),
        mark: mark.proof.clone(),
    });
    // The index says where the intact records end; the next open finds
    // the lost seqs between this segment and the next and reports them
    // again, for as long as the segment is kept.
    segment.bytes = file_len;
    segment.sealed = true;
    segment.index_bytes = write_index(fs, segments_dir, &segment)?;
    segment.add_damaged(Damaged {
        offset: intact_end,
        end_offset: file_len,
        seqs: lost.clone(),
        reason: format!("records lost although {}", mark.proof),
    });
    segment.next_seq = mark.next_seq;
    let next_path = segments_dir.join(segment_file_name(mark.next_seq));
    let file = fs
        .open(&next_path, OpenMode::Create)
        .map_err(|e| LogError::io("create", &next_path, e))?;
    fs.sync_dir(segments_dir)
        .map_err(|e| LogError::io("fsync the directory", segments_dir, e))?;
    Ok((segment, file))
}

/// Each segment must end where the next begins. A gap means records are
/// missing; an overlap means two files claim the same seqs (the later one
/// wins). Both only happen when files were changed by hand or the disk
/// lost data; both are reported, and the missing seqs read as damaged.
pub(crate) fn reconcile_boundaries(
    segments_dir: &Path,
    sealed: &mut [Segment],
    active: &mut Segment,
    damage: &mut Vec<Damage>,
) {
    let mut next_firsts: Vec<Seq> = sealed.iter().skip(1).map(|s| s.first_seq).collect();
    next_firsts.push(active.first_seq);
    for (segment, next_first) in sealed.iter_mut().zip(next_firsts) {
        let path = segments_dir.join(segment_file_name(segment.first_seq));
        if segment.next_seq < next_first {
            let seqs = segment.next_seq..next_first;
            let reason = format!(
                "the segment ends before seq {} but the next one starts at seq {next_first}",
                segment.next_seq
            );
            damage.push(Damage::MissingRecords {
                segment: path,
                offset: segment.bytes,
                seqs: seqs.clone(),
                reason: reason.clone(),
            });
            segment.add_damaged(Damaged {
                offset: segment.bytes,
                end_offset: segment.bytes,
                seqs,
                reason,
            });
            segment.next_seq = next_first;
        } else if segment.next_seq > next_first {
            damage.push(Damage::MissingRecords {
                segment: path,
                offset: segment.bytes,
                seqs: next_first..segment.next_seq,
                reason: format!(
                    "the segment holds seqs up to {} but the next one starts at seq {next_first}; the next segment's records are used",
                    segment.next_seq - 1
                ),
            });
            segment.next_seq = next_first;
            segment.index.retain(|entry| entry.seq < next_first);
            segment.damaged.retain(|d| d.seqs.start < next_first);
            for damaged in &mut segment.damaged {
                damaged.seqs.end = damaged.seqs.end.min(next_first);
            }
        }
    }
}
