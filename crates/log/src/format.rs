//! Byte layouts of everything the log writes: records, sparse index files
//! and the snapshot (specified in `docs/STORAGE.md`). Pure functions: bytes
//! in, values out; no I/O.

use std::fmt;

use bytes::Bytes;

use crate::{Record, RecordKind, Seq, RECORD_BODY_BYTES_LIMIT};

/// `length:u32` + `crc32c:u32`: the part of a record its length does not count.
pub(crate) const RECORD_PREFIX_BYTES: usize = 8;
/// `kind:u8` + `seq:u64` + `timestamp:u64`: the smallest possible `length`.
pub(crate) const RECORD_FIELDS_BYTES: usize = 17;
/// Everything of a record but its body; also the smallest record.
pub(crate) const RECORD_HEADER_BYTES: usize = RECORD_PREFIX_BYTES + RECORD_FIELDS_BYTES;
/// The largest `length` field that is not damage.
const RECORD_LENGTH_LIMIT: u64 = RECORD_FIELDS_BYTES as u64 + RECORD_BODY_BYTES_LIMIT as u64;

/// Why bytes are not the record the reader expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Bad {
    /// The file (or the region searched) ends inside the record.
    Incomplete {
        need: u64,
        have: u64,
    },
    /// The length field cannot belong to a record.
    Length(u32),
    Checksum {
        stored: u32,
        computed: u32,
    },
    /// Checksum fine, kind unknown: written by a newer format, or damage the
    /// checksum did not catch.
    Kind(u8),
    /// Checksum fine, but not the sequence number that belongs here.
    Seq {
        found: Seq,
        expected: Seq,
    },
}

impl Bad {
    /// Damage a checksum caught (or bytes that end too early) — what a torn
    /// write leaves. A record whose checksum holds is never torn.
    pub(crate) fn is_torn_like(&self) -> bool {
        matches!(
            self,
            Bad::Incomplete { .. } | Bad::Length(_) | Bad::Checksum { .. }
        )
    }
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bad::Incomplete { need, have } => {
                write!(f, "the record needs {need} bytes but only {have} remain")
            }
            Bad::Length(length) => write!(f, "length field {length} cannot belong to a record"),
            Bad::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Bad::Kind(kind) => write!(f, "unknown record kind {kind}"),
            Bad::Seq { found, expected } => {
                write!(f, "found seq {found} where seq {expected} belongs")
            }
        }
    }
}

/// Total bytes of the record whose first 8 bytes are `prefix`, if its
/// length field is plausible.
pub(crate) fn record_total_len(prefix: &[u8]) -> Result<u64, Bad> {
    let length = be_u32(prefix, 0);
    if u64::from(length) < RECORD_FIELDS_BYTES as u64 || u64::from(length) > RECORD_LENGTH_LIMIT {
        return Err(Bad::Length(length));
    }
    Ok(RECORD_PREFIX_BYTES as u64 + u64::from(length))
}

/// Appends one encoded record to `out`. The caller has checked the body
/// against the limit, so the length fits its `u32`.
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    kind: RecordKind,
    seq: Seq,
    timestamp: u64,
    body: &[u8],
) {
    let start = out.len();
    let length = (RECORD_FIELDS_BYTES + body.len()) as u32;
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind as u8);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out[start + RECORD_PREFIX_BYTES..]);
    out[start + 4..start + RECORD_PREFIX_BYTES].copy_from_slice(&crc.to_be_bytes());
}

/// The header fields of a record whose checksum holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: RecordKind,
    pub(crate) seq: Seq,
    pub(crate) timestamp: u64,
    pub(crate) total_len: u64,
}

/// Checks `bytes` (exactly one whole record, or the start of the bytes at
/// that offset) without copying the body.
pub(crate) fn check_record(bytes: &[u8]) -> Result<Header, Bad> {
    if bytes.len() < RECORD_PREFIX_BYTES {
        return Err(Bad::Incomplete {
            need: RECORD_PREFIX_BYTES as u64,
            have: bytes.len() as u64,
        });
    }
    let total_len = record_total_len(bytes)?;
    if (bytes.len() as u64) < total_len {
        return Err(Bad::Incomplete {
            need: total_len,
            have: bytes.len() as u64,
        });
    }
    // total_len fits in usize: it is at most bytes.len().
    let record = &bytes[..total_len as usize];
    let stored = be_u32(record, 4);
    let computed = crc32c::crc32c(&record[RECORD_PREFIX_BYTES..]);
    if stored != computed {
        return Err(Bad::Checksum { stored, computed });
    }
    let kind_byte = record[RECORD_PREFIX_BYTES];
    let kind = RecordKind::from_u8(kind_byte).ok_or(Bad::Kind(kind_byte))?;
    Ok(Header {
        kind,
        seq: be_u64(record, 9),
        timestamp: be_u64(record, 17),
        total_len,
    })
}

/// Decodes one whole record (exactly its bytes), keeping the buffer as the
/// body's storage.
pub(crate) fn decode_record(bytes: Vec<u8>) -> Result<(Record, u64), Bad> {
    let header = check_record(&bytes)?;
    let body = Bytes::from(bytes).slice(RECORD_HEADER_BYTES..header.total_len as usize);
    Ok((
        Record {
            seq: header.seq,
            timestamp: header.timestamp,
            kind: header.kind,
            body,
        },
        header.total_len,
    ))
}

/// Cheap plausibility test used while resynchronising after damage: could
/// a record start at `bytes` (at least [`RECORD_HEADER_BYTES`] long) with a
/// seq in `seqs`? The checksum is checked afterwards, only for candidates.
pub(crate) fn plausible_header(bytes: &[u8], seqs: &std::ops::Range<Seq>) -> Option<u64> {
    let total_len = record_total_len(bytes).ok()?;
    RecordKind::from_u8(bytes[RECORD_PREFIX_BYTES])?;
    let seq = be_u64(bytes, 9);
    seqs.contains(&seq).then_some(total_len)
}

pub(crate) fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut buf = [0; 4];
    buf.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(buf)
}

pub(crate) fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut buf = [0; 8];
    buf.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(buf)
}

// ---------------------------------------------------------------------------
// Sparse index files (`<first_seq>.idx`), written when a segment is sealed.

pub(crate) const INDEX_MAGIC: &[u8; 4] = b"CLIX";
pub(crate) const INDEX_VERSION: u32 = 1;
/// magic, version, first_seq, next_seq, segment_bytes, first_timestamp,
/// last_timestamp, max_timestamp, entry_count.
pub(crate) const INDEX_HEADER_BYTES: usize = 4 + 4 + 8 * 6 + 4;
pub(crate) const INDEX_ENTRY_BYTES: usize = 24;
pub(crate) const INDEX_TRAILER_BYTES: usize = 4;

/// A sparse index entry: the record `seq` starts at `offset` of its segment;
/// `max_timestamp` is the largest timestamp of any record up to and
/// including it (across segments), which makes time lookups a binary search
/// even if timestamps go backwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) seq: Seq,
    pub(crate) offset: u64,
    pub(crate) max_timestamp: u64,
}

/// The contents of an index file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IndexFile {
    pub(crate) first_seq: Seq,
    pub(crate) next_seq: Seq,
    pub(crate) segment_bytes: u64,
    pub(crate) first_timestamp: u64,
    pub(crate) last_timestamp: u64,
    pub(crate) max_timestamp: u64,
    pub(crate) entries: Vec<IndexEntry>,
}

pub(crate) fn encode_index(index: &IndexFile) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        INDEX_HEADER_BYTES + index.entries.len() * INDEX_ENTRY_BYTES + INDEX_TRAILER_BYTES,
    );
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_be_bytes());
    for value in [
        index.first_seq,
        index.next_seq,
        index.segment_bytes,
        index.first_timestamp,
        index.last_timestamp,
        index.max_timestamp,
    ] {
        out.extend_from_slice(&value.to_be_bytes());
    }
    out.extend_from_slice(&(index.entries.len() as u32).to_be_bytes());
    for entry in &index.entries {
        out.extend_from_slice(&entry.seq.to_be_bytes());
        out.extend_from_slice(&entry.offset.to_be_bytes());
        out.extend_from_slice(&entry.max_timestamp.to_be_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes and checks an index file against the segment it belongs to.
/// The error says where in the file the problem is and what it is.
pub(crate) fn decode_index(
    bytes: &[u8],
    first_seq: Seq,
    segment_bytes: u64,
) -> Result<IndexFile, (u64, String)> {
    let fail = |at: usize, why: String| Err((at as u64, why));
    if bytes.len() < INDEX_HEADER_BYTES + INDEX_TRAILER_BYTES {
        return fail(0, format!("index file is only {} bytes long", bytes.len()));
    }
    let body_len = bytes.len() - INDEX_TRAILER_BYTES;
    let stored = be_u32(bytes, body_len);
    let computed = crc32c::crc32c(&bytes[..body_len]);
    if stored != computed {
        return fail(
            body_len,
            format!("index checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
        );
    }
    if &bytes[0..4] != INDEX_MAGIC {
        return fail(0, "index file does not start with CLIX".to_string());
    }
    let version = be_u32(bytes, 4);
    if version != INDEX_VERSION {
        return fail(4, format!("index format version {version} is unknown"));
    }
    let index = IndexFile {
        first_seq: be_u64(bytes, 8),
        next_seq: be_u64(bytes, 16),
        segment_bytes: be_u64(bytes, 24),
        first_timestamp: be_u64(bytes, 32),
        last_timestamp: be_u64(bytes, 40),
        max_timestamp: be_u64(bytes, 48),
        entries: Vec::new(),
    };
    let count = be_u32(bytes, 56) as usize;
    if index.first_seq != first_seq {
        return fail(
            8,
            format!(
                "index is for the segment starting at seq {}, not {first_seq}",
                index.first_seq
            ),
        );
    }
    if index.segment_bytes != segment_bytes {
        return fail(
            24,
            format!(
                "index describes {} segment bytes but the segment has {segment_bytes}",
                index.segment_bytes
            ),
        );
    }
    if index.next_seq < index.first_seq {
        return fail(
            16,
            format!("index ends at seq {} before it starts", index.next_seq),
        );
    }
    // Checked before allocating: the count must match the file's length.
    if count.checked_mul(INDEX_ENTRY_BYTES) != Some(body_len - INDEX_HEADER_BYTES) {
        return fail(
            56,
            format!("index claims {count} entries, which do not fit its length"),
        );
    }
    let mut entries = Vec::with_capacity(count);
    let mut previous: Option<IndexEntry> = None;
    for i in 0..count {
        let at = INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES;
        let entry = IndexEntry {
            seq: be_u64(bytes, at),
            offset: be_u64(bytes, at + 8),
            max_timestamp: be_u64(bytes, at + 16),
        };
        let in_order = match previous {
            // Not necessarily offset 0: a segment whose first record is
            // damaged is indexed from its first valid record.
            None => entry.seq >= first_seq,
            Some(prev) => {
                entry.seq > prev.seq
                    && entry.offset >= prev.offset + RECORD_HEADER_BYTES as u64
                    && entry.max_timestamp >= prev.max_timestamp
            }
        };
        let in_segment = entry.seq < index.next_seq
            && entry.offset + RECORD_HEADER_BYTES as u64 <= segment_bytes;
        if !in_order || !in_segment {
            return fail(
                at,
                format!("index entry {i} is out of order or outside the segment"),
            );
        }
        entries.push(entry);
        previous = Some(entry);
    }
    Ok(IndexFile { entries, ..index })
}

// ---------------------------------------------------------------------------
// The snapshot file.

pub(crate) const SNAPSHOT_MAGIC: &[u8; 4] = b"CLSN";
pub(crate) const SNAPSHOT_VERSION: u32 = 1;
/// magic, version, covers, body_len.
pub(crate) const SNAPSHOT_HEADER_BYTES: usize = 4 + 4 + 8 + 8;
pub(crate) const SNAPSHOT_TRAILER_BYTES: usize = 4;

/// A snapshot file in its three parts — header, `body`, the checksum
/// trailer — so the body is written from the caller's buffer, not copied
/// next to a header first (a million dedup ids are 8 MiB of it).
pub(crate) struct SnapshotParts {
    pub header: [u8; SNAPSHOT_HEADER_BYTES],
    pub body: Bytes,
}

impl SnapshotParts {
    pub fn new(covers: Seq, body: Bytes) -> SnapshotParts {
        let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
        header[0..4].copy_from_slice(SNAPSHOT_MAGIC);
        header[4..8].copy_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        header[8..16].copy_from_slice(&covers.to_be_bytes());
        header[16..24].copy_from_slice(&(body.len() as u64).to_be_bytes());
        SnapshotParts { header, body }
    }

    /// The trailer: crc32c of header and body.
    pub fn trailer(&self) -> [u8; SNAPSHOT_TRAILER_BYTES] {
        crc32c::crc32c_append(crc32c::crc32c(&self.header), &self.body).to_be_bytes()
    }

    pub fn len(&self) -> usize {
        SNAPSHOT_HEADER_BYTES + self.body.len() + SNAPSHOT_TRAILER_BYTES
    }
}

#[cfg(test)]
pub(crate) fn encode_snapshot(covers: Seq, body: &[u8]) -> Vec<u8> {
    let parts = SnapshotParts::new(covers, Bytes::copy_from_slice(body));
    let mut out = Vec::with_capacity(parts.len());
    out.extend_from_slice(&parts.header);
    out.extend_from_slice(&parts.body);
    out.extend_from_slice(&parts.trailer());
    out
}

/// Decodes a snapshot file; the error says where and what.
/// `covers` and `body_len` from a snapshot's header, if its magic and
/// version are ours (the checksum is the caller's to check).
pub(crate) fn snapshot_header(header: &[u8; SNAPSHOT_HEADER_BYTES]) -> Option<(Seq, u64)> {
    if &header[0..4] != SNAPSHOT_MAGIC || be_u32(header, 4) != SNAPSHOT_VERSION {
        return None;
    }
    Some((be_u64(header, 8), be_u64(header, 16)))
}

pub(crate) fn decode_snapshot(bytes: Vec<u8>) -> Result<(Seq, Bytes), (u64, String)> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES + SNAPSHOT_TRAILER_BYTES {
        return Err((
            0,
            format!("snapshot file is only {} bytes long", bytes.len()),
        ));
    }
    let body_end = bytes.len() - SNAPSHOT_TRAILER_BYTES;
    let stored = be_u32(&bytes, body_end);
    let computed = crc32c::crc32c(&bytes[..body_end]);
    if stored != computed {
        return Err((
            body_end as u64,
            format!(
                "snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
        ));
    }
    if &bytes[0..4] != SNAPSHOT_MAGIC {
        return Err((0, "snapshot file does not start with CLSN".to_string()));
    }
    let version = be_u32(&bytes, 4);
    if version != SNAPSHOT_VERSION {
        return Err((4, format!("snapshot format version {version} is unknown")));
    }
    let covers = be_u64(&bytes, 8);
    let body_len = be_u64(&bytes, 16);
    if body_len != (body_end - SNAPSHOT_HEADER_BYTES) as u64 {
        return Err((
            16,
            format!("snapshot body length {body_len} does not match the file"),
        ));
    }
    let body = Bytes::from(bytes).slice(SNAPSHOT_HEADER_BYTES..body_end);
    Ok((covers, body))
}

// ---------------------------------------------------------------------------
// File names.

/// Digits of a segment's first seq in its file name: all of `u64::MAX`, so
/// names sort like the numbers.
const SEQ_DIGITS: usize = 20;

pub(crate) fn segment_file_name(first_seq: Seq) -> String {
    format!("{first_seq:0SEQ_DIGITS$}.log")
}

pub(crate) fn index_file_name(first_seq: Seq) -> String {
    format!("{first_seq:0SEQ_DIGITS$}.idx")
}

/// What a file in the segments directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SegmentsDirEntry {
    Segment(Seq),
    Index(Seq),
    /// `*.idx.tmp`: an index write a crash cut short.
    IndexTmp,
}

pub(crate) fn parse_segments_dir_entry(name: &str) -> Option<SegmentsDirEntry> {
    if name.ends_with(".idx.tmp") {
        return Some(SegmentsDirEntry::IndexTmp);
    }
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != SEQ_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: Seq = stem.parse().ok()?;
    match ext {
        "log" => Some(SegmentsDirEntry::Segment(seq)),
        "idx" => Some(SegmentsDirEntry::Index(seq)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_every_bit_flip_is_caught() {
        let mut buf = Vec::new();
        encode_record(&mut buf, RecordKind::State, 7, 1_700_000_000_000, b"hello");
        assert_eq!(buf.len(), RECORD_HEADER_BYTES + 5);
        let (record, len) = decode_record(buf.clone()).expect("decodes");
        assert_eq!(len, buf.len() as u64);
        assert_eq!(record.seq, 7);
        assert_eq!(record.kind, RecordKind::State);
        assert_eq!(record.timestamp, 1_700_000_000_000);
        assert_eq!(&record.body[..], b"hello");
        for bit in 0..buf.len() * 8 {
            let mut flipped = buf.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(flipped).is_err(), "bit {bit} flip not caught");
        }
    }

    #[test]
    fn record_layout_is_the_documented_one() {
        let mut buf = Vec::new();
        encode_record(&mut buf, RecordKind::Message, 1, 2, b"ab");
        // length = 17 + 2 = 19; kind 1; seq 1; timestamp 2; body "ab".
        assert_eq!(&buf[0..4], &[0, 0, 0, 19]);
        assert_eq!(buf[8], 1);
        assert_eq!(&buf[9..17], &1u64.to_be_bytes());
        assert_eq!(&buf[17..25], &2u64.to_be_bytes());
        assert_eq!(&buf[25..], b"ab");
        assert_eq!(be_u32(&buf, 4), crc32c::crc32c(&buf[8..]));
    }

    /// The example of `docs/STORAGE.md` §3.2, byte for byte.
    #[test]
    fn documented_example() {
        let mut buf = Vec::new();
        encode_record(
            &mut buf,
            RecordKind::Message,
            1,
            1_700_000_000_000_000_000,
            b"ab",
        );
        let hex: Vec<String> = buf.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "00 00 00 13 2e f8 53 4d 01 00 00 00 00 00 00 00 01 17 97 9c fe 36 2a 00 00 61 62"
        );
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn truncated_record_is_incomplete() {
        let mut buf = Vec::new();
        encode_record(&mut buf, RecordKind::Message, 1, 2, b"abc");
        for cut in 0..buf.len() {
            assert!(matches!(
                check_record(&buf[..cut]),
                Err(Bad::Incomplete { .. })
            ));
        }
    }

    fn sample_index() -> IndexFile {
        IndexFile {
            first_seq: 10,
            next_seq: 20,
            segment_bytes: 1000,
            first_timestamp: 5,
            last_timestamp: 9,
            max_timestamp: 9,
            entries: vec![
                IndexEntry {
                    seq: 10,
                    offset: 0,
                    max_timestamp: 5,
                },
                IndexEntry {
                    seq: 15,
                    offset: 500,
                    max_timestamp: 7,
                },
            ],
        }
    }

    #[test]
    fn index_round_trips_and_bit_flips_are_caught() {
        let index = sample_index();
        let bytes = encode_index(&index);
        assert_eq!(decode_index(&bytes, 10, 1000), Ok(index));
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_index(&flipped, 10, 1000).is_err(), "bit {bit}");
        }
        assert!(decode_index(&bytes, 11, 1000).is_err());
        assert!(decode_index(&bytes, 10, 999).is_err());
    }

    #[test]
    fn snapshot_round_trips_and_bit_flips_are_caught() {
        let bytes = encode_snapshot(42, b"state");
        let (covers, body) = decode_snapshot(bytes.clone()).expect("decodes");
        assert_eq!((covers, &body[..]), (42, &b"state"[..]));
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_snapshot(flipped).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn file_names_sort_like_seqs_and_parse_back() {
        assert_eq!(segment_file_name(1), "00000000000000000001.log");
        assert_eq!(
            parse_segments_dir_entry(&segment_file_name(u64::MAX)),
            Some(SegmentsDirEntry::Segment(u64::MAX))
        );
        assert_eq!(
            parse_segments_dir_entry(&index_file_name(12)),
            Some(SegmentsDirEntry::Index(12))
        );
        assert_eq!(
            parse_segments_dir_entry("00000000000000000012.idx.tmp"),
            Some(SegmentsDirEntry::IndexTmp)
        );
        assert_eq!(parse_segments_dir_entry("notes.txt"), None);
        assert_eq!(parse_segments_dir_entry("12.log"), None);
    }
}
