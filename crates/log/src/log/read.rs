//! Reads, scans and time lookups, and the damage they find.

use std::ops::ControlFlow;
use std::path::PathBuf;

use crate::error::{Damage, LogError};
use crate::format::{check_record, decode_record, segment_file_name, Bad};
use crate::fs::{FileSystem, LogFile, OpenMode};
use crate::segment::{decode_at, find_resync, Damaged};
use crate::{Record, Seq};

use super::*;

impl Log {
    /// Reads the record `seq`, checking its checksum. `None` if it was
    /// removed or never written; [`LogError::Corrupt`] if it is damaged.
    pub fn read(&mut self, seq: Seq) -> Result<Option<Record>, LogError> {
        if seq < self.first_seq() || seq >= self.next_seq() {
            return Ok(None);
        }
        let pos = self.position_of(seq);
        if let Some(damaged) = self.segment(pos).damaged_containing(seq) {
            return Err(self.corrupt_error(pos, damaged));
        }
        // Read ahead no further than the records this walk can visit.
        let segment = self.segment(pos);
        let fill_end = segment
            .entry_after(segment.start_for(seq).0)
            .map_or(u64::MAX, |entry| entry.offset);
        let mut found = None;
        self.walk_segment(pos, seq, fill_end, &mut |record| {
            found = Some(record);
            ControlFlow::Break(())
        })?;
        match found {
            Some(record) if record.seq == seq => Ok(Some(record)),
            _ => Err(LogError::Bug {
                reason: format!("seq {seq} belongs to a segment but was not found in it"),
            }),
        }
    }

    /// Hands every record from `from` on to `f`, in seq order, until `f`
    /// breaks or the log ends. Stops with [`LogError::Corrupt`] at damage
    /// (whose `resume_seq` says where to go on) rather than skipping it.
    pub fn scan(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Record) -> ControlFlow<()>,
    ) -> Result<(), LogError> {
        let from = from.max(self.first_seq());
        if from >= self.next_seq() {
            return Ok(());
        }
        let mut pos = self.position_of(from);
        while pos <= self.sealed.len() {
            if self.walk_segment(pos, from, u64::MAX, f)? {
                return Ok(());
            }
            pos += 1;
        }
        Ok(())
    }

    /// The first seq whose timestamp is at least `timestamp`, or
    /// `next_seq()` if there is none. Exact whatever order timestamps came
    /// in: index entries carry the running maximum, so a binary search
    /// finds where to start and a short scan the record. If damage stands
    /// between, the first damaged seq is returned (starting a replay there
    /// errs on the side of too early).
    pub fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, LogError> {
        let count = self.sealed.len() + 1;
        let pos = partition_point(count, |pos| self.segment(pos).max_timestamp < timestamp);
        if pos == count {
            return Ok(self.next_seq());
        }
        let segment = self.segment(pos);
        let entries_before = segment
            .index
            .partition_point(|entry| entry.max_timestamp < timestamp);
        let start = match entries_before
            .checked_sub(1)
            .and_then(|i| segment.index.get(i))
        {
            Some(entry) => entry.seq,
            None => segment.first_seq,
        };
        let mut answer = None;
        let result = self.scan(start, &mut |record| {
            if record.timestamp >= timestamp {
                answer = Some(record.seq);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        match result {
            Ok(()) => Ok(answer.unwrap_or(self.next_seq())),
            Err(LogError::Corrupt { seq, .. }) => Ok(answer.unwrap_or(seq)),
            Err(e) => Err(e),
        }
    }

    /// Reads every record from `first_seq()` on, checking checksums, going
    /// on past damage. Returns the number of intact records; damage found
    /// for the first time is reported through [`Log::take_damage`].
    pub fn verify(&mut self) -> Result<u64, LogError> {
        let mut intact = 0;
        let mut from = self.first_seq();
        loop {
            match self.scan(from, &mut |_| {
                intact += 1;
                ControlFlow::Continue(())
            }) {
                Ok(()) => return Ok(intact),
                Err(LogError::Corrupt { resume_seq, .. }) if resume_seq > from => from = resume_seq,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn corrupt_error(&self, pos: usize, damaged: &Damaged) -> LogError {
        LogError::Corrupt {
            segment: self
                .segments_dir
                .join(segment_file_name(self.segment(pos).first_seq)),
            offset: damaged.offset,
            seq: damaged.seqs.start,
            resume_seq: damaged.seqs.end,
            reason: damaged.reason.clone(),
        }
    }

    /// Walks segment `pos` from the index entry at or before `from`, handing
    /// records from `from` on to `f`, reading ahead up to byte `fill_end`.
    /// `Ok(true)` if `f` broke off.
    pub(crate) fn walk_segment(
        &mut self,
        pos: usize,
        from: Seq,
        fill_end: u64,
        f: &mut dyn FnMut(Record) -> ControlFlow<()>,
    ) -> Result<bool, LogError> {
        let (mut offset, mut expected) = self.segment(pos).start_for(from);
        loop {
            let segment = self.segment(pos);
            if expected >= segment.next_seq {
                return Ok(false);
            }
            if let Some(damaged) = segment.damaged_at(offset) {
                if !damaged.seqs.is_empty() && damaged.seqs.end > from {
                    return Err(self.corrupt_error(pos, damaged));
                }
                if damaged.end_offset == offset && damaged.seqs.end <= expected {
                    return Err(LogError::Bug {
                        reason: format!("damaged range at byte {offset} makes no progress"),
                    });
                }
                offset = damaged.end_offset;
                expected = expected.max(damaged.seqs.end);
                continue;
            }
            match self.record_at(pos, offset, fill_end)? {
                Ok((record, len)) if record.seq == expected => {
                    offset += len;
                    expected += 1;
                    if record.seq >= from && f(record).is_break() {
                        return Ok(true);
                    }
                }
                Ok((record, _)) => {
                    let bad = Bad::Seq {
                        found: record.seq,
                        expected,
                    };
                    self.discover_damage(pos, offset, expected, bad)?;
                }
                Err(bad) => self.discover_damage(pos, offset, expected, bad)?,
            }
        }
    }

    /// The record at `offset` of segment `pos`, from the file or, for the
    /// active segment's unwritten tail, from the pending buffer.
    pub(crate) fn record_at(
        &mut self,
        pos: usize,
        offset: u64,
        fill_end: u64,
    ) -> Result<Result<(Record, u64), Bad>, LogError> {
        let is_active = pos == self.sealed.len();
        if is_active && offset >= self.written.bytes {
            let start = usize::try_from(offset - self.written.bytes).unwrap_or(usize::MAX);
            let Some(bytes) = self.pending.get(start..) else {
                return Ok(Err(Bad::Incomplete { need: 1, have: 0 }));
            };
            return Ok(match check_record(bytes) {
                Ok(header) => decode_record(bytes[..header.total_len as usize].to_vec()),
                Err(bad) => Err(bad),
            });
        }
        let (key, file_end) = {
            let segment = self.segment(pos);
            let end = if is_active {
                self.written.bytes
            } else {
                segment.bytes
            };
            (segment.first_seq, end)
        };
        // The path is only built when needed (a reader to open, an error to
        // report): reads are hot, and formatting a file name per record was
        // a third of a consuming broker's CPU.
        let segments_dir = &self.segments_dir;
        let path = || segments_dir.join(segment_file_name(key));
        let file = if is_active {
            &*self.active_file
        } else {
            open_reader(&*self.fs, &mut self.reader, key, &path)?
        };
        decode_at(&mut self.readahead, key, file, file_end, fill_end, offset)
            .map_err(|e| LogError::io("read", &path(), e))
    }

    /// A record that should be `expected` at `offset` is bad: find the next
    /// intact record (searching no further than the next index entry, a
    /// known-good record), remember the range between as damaged and report
    /// it. The walk that found it then meets the range and errs or skips it.
    pub(crate) fn discover_damage(
        &mut self,
        pos: usize,
        offset: u64,
        expected: Seq,
        bad: Bad,
    ) -> Result<(), LogError> {
        let is_active = pos == self.sealed.len();
        let (key, limit, limit_seq) = {
            let segment = self.segment(pos);
            let (end, end_seq) = if is_active {
                (self.written.bytes, self.written.next_seq)
            } else {
                (segment.bytes, segment.next_seq)
            };
            let (limit, limit_seq) = match segment.entry_after(offset) {
                Some(entry) if entry.offset <= end => (entry.offset, entry.seq),
                _ => (end, end_seq),
            };
            (segment.first_seq, limit, limit_seq.max(expected))
        };
        if is_active && offset >= self.written.bytes {
            return Err(LogError::Bug {
                reason: format!("appended record at byte {offset} does not decode: {bad}"),
            });
        }
        let path = self.segments_dir.join(segment_file_name(key));
        let found = {
            let file = if is_active {
                &*self.active_file
            } else {
                open_reader(&*self.fs, &mut self.reader, key, &|| path.clone())?
            };
            find_resync(file, offset + 1, limit, offset, expected, limit_seq)
                .map_err(|e| LogError::io("read", &path, e))?
        };
        let (end_offset, seqs_end) = found.unwrap_or((limit, limit_seq));
        let reason = bad.to_string();
        self.damage.push(Damage::CorruptRecord {
            segment: path,
            offset,
            bytes: end_offset - offset,
            seqs: expected..seqs_end,
            reason: reason.clone(),
        });
        self.metrics.corrupt_records_found += 1;
        self.segment_mut(pos).add_damaged(Damaged {
            offset,
            end_offset,
            seqs: expected..seqs_end,
            reason,
        });
        Ok(())
    }
}

/// `partition_point` over `0..count`.
pub(crate) fn partition_point(count: usize, mut pred: impl FnMut(usize) -> bool) -> usize {
    let (mut low, mut high) = (0, count);
    while low < high {
        let mid = low + (high - low) / 2;
        if pred(mid) {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    low
}

/// The cached handle on sealed segment `key`, opened if another one is
/// cached. A free function so callers can borrow other fields meanwhile.
pub(crate) fn open_reader<'a>(
    fs: &dyn FileSystem,
    cache: &'a mut Option<(Seq, Box<dyn LogFile>)>,
    key: Seq,
    path: &dyn Fn() -> PathBuf,
) -> Result<&'a dyn LogFile, LogError> {
    if cache.as_ref().is_none_or(|(cached, _)| *cached != key) {
        *cache = None;
        let path = path();
        let file = fs
            .open(&path, OpenMode::Read)
            .map_err(|e| LogError::io("open", &path, e))?;
        *cache = Some((key, file));
    }
    match cache {
        Some((_, file)) => Ok(&**file),
        None => Err(LogError::Bug {
            reason: "segment reader vanished".to_string(),
        }),
    }
}
