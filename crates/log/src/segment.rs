//! One segment in memory (its sparse index and known damage), the buffered
//! reader, the full scan open uses for the active segment (and for sealed
//! segments whose index is lost), and the resynchronisation that finds the
//! next intact record after damage.

use std::io;
use std::ops::Range;
use std::path::Path;

use crate::error::Damage;
use crate::format::{
    check_record, decode_record, plausible_header, record_total_len, Bad, IndexEntry, IndexFile,
    RECORD_HEADER_BYTES, RECORD_PREFIX_BYTES,
};
use crate::fs::{read_exact_at, LogFile};
use crate::{Record, Seq};

/// Bytes one buffered read fetches: many small records per system call
/// when scanning, without holding much memory.
pub(crate) const READAHEAD_BYTES: usize = 256 * 1024;
/// Bytes read per step while searching for the next intact record.
pub(crate) const RESYNC_WINDOW_BYTES: usize = 1024 * 1024;

/// A byte range of a segment that does not decode as the records that
/// belong there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Damaged {
    pub(crate) offset: u64,
    /// Where the next intact record (or the segment's end) starts.
    pub(crate) end_offset: u64,
    /// Sequence numbers whose records are lost in the range (may be empty).
    pub(crate) seqs: Range<Seq>,
    pub(crate) reason: String,
}

/// What the log knows about one segment file without reading it again.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    pub(crate) first_seq: Seq,
    /// One past the last seq the segment holds (records or damaged seqs).
    pub(crate) next_seq: Seq,
    /// Bytes of the segment that hold records or known damage.
    pub(crate) bytes: u64,
    /// Intact records, counted to place index entries.
    pub(crate) records: u64,
    pub(crate) first_timestamp: u64,
    pub(crate) last_timestamp: u64,
    /// Largest timestamp of any record up to this segment's end, earlier
    /// segments included; never decreases from segment to segment.
    pub(crate) max_timestamp: u64,
    pub(crate) index: Vec<IndexEntry>,
    /// Sorted by offset, not overlapping.
    pub(crate) damaged: Vec<Damaged>,
    pub(crate) sealed: bool,
    /// Size of the segment's `.idx` file once sealed.
    pub(crate) index_bytes: u64,
}

impl Segment {
    pub(crate) fn empty(first_seq: Seq, max_timestamp: u64) -> Segment {
        Segment {
            first_seq,
            next_seq: first_seq,
            bytes: 0,
            records: 0,
            first_timestamp: 0,
            last_timestamp: 0,
            max_timestamp,
            index: Vec::new(),
            damaged: Vec::new(),
            sealed: false,
            index_bytes: 0,
        }
    }

    /// Takes a sealed segment's state from its index file.
    pub(crate) fn from_index(
        index: IndexFile,
        earlier_max_timestamp: u64,
        index_bytes: u64,
    ) -> Segment {
        let entries = index
            .entries
            .into_iter()
            .map(|entry| IndexEntry {
                max_timestamp: entry.max_timestamp.max(earlier_max_timestamp),
                ..entry
            })
            .collect::<Vec<_>>();
        Segment {
            first_seq: index.first_seq,
            next_seq: index.next_seq,
            bytes: index.segment_bytes,
            // Only the active segment places new index entries.
            records: entries.len() as u64,
            first_timestamp: index.first_timestamp,
            last_timestamp: index.last_timestamp,
            max_timestamp: index.max_timestamp.max(earlier_max_timestamp),
            index: entries,
            damaged: Vec::new(),
            sealed: true,
            index_bytes,
        }
    }

    pub(crate) fn to_index(&self) -> IndexFile {
        IndexFile {
            first_seq: self.first_seq,
            next_seq: self.next_seq,
            segment_bytes: self.bytes,
            first_timestamp: self.first_timestamp,
            last_timestamp: self.last_timestamp,
            max_timestamp: self.max_timestamp,
            entries: self.index.clone(),
        }
    }

    /// Accounts for an intact record at `offset` (the segment's end).
    pub(crate) fn push_record(
        &mut self,
        offset: u64,
        len: u64,
        seq: Seq,
        timestamp: u64,
        index_every: u32,
    ) {
        if self.records == 0 {
            self.first_timestamp = timestamp;
        }
        self.last_timestamp = timestamp;
        self.max_timestamp = self.max_timestamp.max(timestamp);
        if self.records.is_multiple_of(u64::from(index_every)) {
            self.index.push(IndexEntry {
                seq,
                offset,
                max_timestamp: self.max_timestamp,
            });
        }
        self.records += 1;
        self.next_seq = seq + 1;
        self.bytes = offset + len;
    }

    /// Where a walk to `seq` starts: the last index entry at or before it,
    /// or the segment's start.
    pub(crate) fn start_for(&self, seq: Seq) -> (u64, Seq) {
        let after = self.index.partition_point(|entry| entry.seq <= seq);
        match after.checked_sub(1).and_then(|i| self.index.get(i)) {
            Some(entry) => (entry.offset, entry.seq),
            None => (0, self.first_seq),
        }
    }

    /// The first index entry strictly after `offset`: a known-good place to
    /// resume after damage.
    pub(crate) fn entry_after(&self, offset: u64) -> Option<IndexEntry> {
        let at = self.index.partition_point(|entry| entry.offset <= offset);
        self.index.get(at).copied()
    }

    pub(crate) fn damaged_containing(&self, seq: Seq) -> Option<&Damaged> {
        self.damaged.iter().find(|d| d.seqs.contains(&seq))
    }

    pub(crate) fn damaged_at(&self, offset: u64) -> Option<&Damaged> {
        self.damaged.iter().find(|d| d.offset == offset)
    }

    pub(crate) fn add_damaged(&mut self, damaged: Damaged) {
        let at = self.damaged.partition_point(|d| d.offset < damaged.offset);
        self.damaged.insert(at, damaged);
    }
}

/// A read-ahead buffer over one segment file at a time (`key` is the
/// segment's first seq). Segment bytes below what the log has written never
/// change, except by truncation, after which the owner invalidates it.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    key: Option<Seq>,
    start: u64,
    buf: Vec<u8>,
}

impl ReadAhead {
    pub(crate) fn invalidate(&mut self, key: Seq) {
        if self.key == Some(key) {
            self.key = None;
        }
    }

    /// Fills `out` with the bytes at `offset`, reading ahead up to
    /// `fill_end` (at most [`READAHEAD_BYTES`]): a scan reads ahead to the
    /// segment's end, a point read only to the next index entry.
    pub(crate) fn read(
        &mut self,
        key: Seq,
        file: &dyn LogFile,
        fill_end: u64,
        offset: u64,
        out: &mut [u8],
    ) -> io::Result<()> {
        let len = out.len() as u64;
        if self.key == Some(key)
            && offset >= self.start
            && offset + len <= self.start + self.buf.len() as u64
        {
            let at = (offset - self.start) as usize;
            out.copy_from_slice(&self.buf[at..at + out.len()]);
            return Ok(());
        }
        if out.len() >= READAHEAD_BYTES {
            // A big record: read it straight into its own buffer.
            return read_exact_at(file, offset, out);
        }
        let fill = fill_end
            .saturating_sub(offset)
            .clamp(len, READAHEAD_BYTES as u64) as usize;
        self.key = None;
        self.buf.resize(fill, 0);
        read_exact_at(file, offset, &mut self.buf)?;
        self.key = Some(key);
        self.start = offset;
        out.copy_from_slice(&self.buf[..out.len()]);
        Ok(())
    }
}

/// Decodes the record at `offset` of a segment file whose meaningful bytes
/// end at `file_end`, reading ahead up to `fill_end`. Outer error: the OS
/// failed; inner: the bytes are bad.
pub(crate) fn decode_at(
    readahead: &mut ReadAhead,
    key: Seq,
    file: &dyn LogFile,
    file_end: u64,
    fill_end: u64,
    offset: u64,
) -> io::Result<Result<(Record, u64), Bad>> {
    let have = file_end.saturating_sub(offset);
    if have < RECORD_PREFIX_BYTES as u64 {
        return Ok(Err(Bad::Incomplete {
            need: RECORD_PREFIX_BYTES as u64,
            have,
        }));
    }
    let mut prefix = [0; RECORD_PREFIX_BYTES];
    match readahead.read(key, file, fill_end.min(file_end), offset, &mut prefix) {
        Ok(()) => {}
        // The file is shorter than the log believed: damage, not an I/O fault.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err(Bad::Incomplete {
                need: RECORD_PREFIX_BYTES as u64,
                have: 0,
            }))
        }
        Err(e) => return Err(e),
    }
    let total = match record_total_len(&prefix) {
        Ok(total) => total,
        Err(bad) => return Ok(Err(bad)),
    };
    if total > have {
        return Ok(Err(Bad::Incomplete { need: total, have }));
    }
    // total ≤ have, and have is bounded by a segment's size.
    let mut bytes = vec![0; total as usize];
    match readahead.read(key, file, fill_end.min(file_end), offset, &mut bytes) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(Err(Bad::Incomplete {
                need: total,
                have: 0,
            }))
        }
        Err(e) => return Err(e),
    }
    Ok(decode_record(bytes))
}

/// Searches offsets `start..limit` for the first whole record (ending by
/// `limit`) whose checksum holds and whose seq could follow damage that
/// began at `damage_start` where seq `expected` belonged: at least
/// `expected`, below `seq_end`, and no further past `expected` than the
/// skipped bytes could have held records. Cheap header checks come first,
/// so the search is linear in the bytes searched.
pub(crate) fn find_resync(
    file: &dyn LogFile,
    start: u64,
    limit: u64,
    damage_start: u64,
    expected: Seq,
    seq_end: Seq,
) -> io::Result<Option<(u64, Seq)>> {
    let header = RECORD_HEADER_BYTES as u64;
    let mut window = Vec::new();
    let mut window_start = start;
    while window_start + header <= limit {
        let window_len = (limit - window_start).min(RESYNC_WINDOW_BYTES as u64) as usize;
        window.resize(window_len, 0);
        match read_exact_at(file, window_start, &mut window) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let last = window_len - RECORD_HEADER_BYTES;
        for i in 0..=last {
            let candidate = window_start + i as u64;
            let skipped_records_max = (candidate - damage_start) / header;
            let seqs = expected..seq_end.min(expected.saturating_add(skipped_records_max + 1));
            let Some(total) = plausible_header(&window[i..i + RECORD_HEADER_BYTES], &seqs) else {
                continue;
            };
            if candidate + total > limit {
                continue;
            }
            // total ≤ limit − candidate, bounded by the segment's size.
            let mut record = vec![0; total as usize];
            read_exact_at(file, candidate, &mut record)?;
            if let Ok(found) = check_record(&record) {
                if seqs.contains(&found.seq) {
                    return Ok(Some((candidate, found.seq)));
                }
            }
        }
        if window_start + window_len as u64 >= limit {
            break;
        }
        window_start += last as u64 + 1;
    }
    Ok(None)
}

/// The result of scanning a whole segment file.
pub(crate) struct Scanned {
    pub(crate) segment: Segment,
    pub(crate) damage: Vec<Damage>,
    /// For the last segment: truncate the file here (a torn tail).
    pub(crate) torn_at: Option<u64>,
}

/// Reads a segment file from start to end, checking every record, building
/// its sparse index and finding damage. Only the last segment (`is_last`)
/// may have a torn tail; `seq_end` is the next segment's first seq, which
/// bounds what a sealed segment can hold.
#[allow(clippy::too_many_arguments)] // one call site per kind of segment; a struct would only rename them
pub(crate) fn scan_segment(
    file: &dyn LogFile,
    path: &Path,
    first_seq: Seq,
    file_len: u64,
    index_every: u32,
    earlier_max_timestamp: u64,
    is_last: bool,
    seq_end: Option<Seq>,
) -> io::Result<Scanned> {
    let mut segment = Segment::empty(first_seq, earlier_max_timestamp);
    let mut damage = Vec::new();
    let mut torn_at = None;
    let mut readahead = ReadAhead::default();
    let mut offset = 0;
    let mut expected = first_seq;
    while offset < file_len {
        let bad = match decode_at(&mut readahead, first_seq, file, file_len, file_len, offset)? {
            Ok((record, len)) if record.seq == expected => {
                segment.push_record(offset, len, record.seq, record.timestamp, index_every);
                offset += len;
                expected += 1;
                continue;
            }
            Ok((record, _)) => Bad::Seq {
                found: record.seq,
                expected,
            },
            Err(bad) => bad,
        };
        let seq_limit = seq_end.unwrap_or(Seq::MAX);
        match find_resync(file, offset + 1, file_len, offset, expected, seq_limit)? {
            Some((resume, resume_seq)) => {
                damage.push(Damage::CorruptRecord {
                    segment: path.to_path_buf(),
                    offset,
                    bytes: resume - offset,
                    seqs: expected..resume_seq,
                    reason: bad.to_string(),
                });
                segment.add_damaged(Damaged {
                    offset,
                    end_offset: resume,
                    seqs: expected..resume_seq,
                    reason: bad.to_string(),
                });
                offset = resume;
                expected = resume_seq;
            }
            None if is_last && bad.is_torn_like() => {
                damage.push(Damage::TornTail {
                    segment: path.to_path_buf(),
                    offset,
                    bytes_dropped: file_len - offset,
                });
                torn_at = Some(offset);
                break;
            }
            None => {
                // Damage up to the end, and nothing says where it ends: keep
                // the bytes (never truncate anything but a torn tail) and
                // count the seqs the next segment says are missing.
                let end = seq_end.unwrap_or(expected).max(expected);
                damage.push(Damage::CorruptRecord {
                    segment: path.to_path_buf(),
                    offset,
                    bytes: file_len - offset,
                    seqs: expected..end,
                    reason: bad.to_string(),
                });
                segment.add_damaged(Damaged {
                    offset,
                    end_offset: file_len,
                    seqs: expected..end,
                    reason: bad.to_string(),
                });
                offset = file_len;
                expected = end;
            }
        }
    }
    segment.next_seq = expected;
    segment.bytes = torn_at.unwrap_or(file_len);
    Ok(Scanned {
        segment,
        damage,
        torn_at,
    })
}
