//! [`MessageStore`] on the durable embedded log (`courier-log`): messages
//! and journal entries are records of one log, so one fsync makes a batch
//! of both durable (group commit), and their order is the replay order.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::ops::{ControlFlow, Range};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use courier_log::{Damage, DirLock, Log, LogConfig, LogError, RecordKind};
use courier_proto::{decode_message, encode_message, Message};

use crate::histogram::{Histogram, BATCH_BUCKETS, SECONDS_BUCKETS};
use crate::read_ahead::{ReadAhead, READ_AHEAD_BYTES_MAX, READ_AHEAD_MESSAGES};
use crate::{
    MessageStore, RemovalJob, Replayed, Seq, SnapshotJob, StorageStats, StoreError, SyncJob,
};

/// Messages kept decoded in memory after append, so a delivery right after
/// a send does not read the disk. Bounds the cache's memory: at most this
/// many messages (their payloads included), and at most
/// [`RECENT_BYTES_MAX`] of them.
pub const RECENT_MESSAGES_MAX: usize = 4096;
/// The cache's bound in bytes, counted as each message's encoded length:
/// small messages reach [`RECENT_MESSAGES_MAX`] first (4,096 of 128 B are
/// under 1 MiB), large ones this (about 850 of 1 KiB, where 4,096 held
/// 5 MiB that a consumer keeping up never needs and one away never reads).
pub const RECENT_BYTES_MAX: usize = 1024 * 1024;

pub struct LogStore {
    log: Log,
    recent: HashMap<Seq, Arc<Message>>,
    recent_order: VecDeque<Seq>,
    /// What the messages in `recent` count for ([`cached_bytes`]).
    recent_bytes: usize,
    /// Messages decoded from disk before they are asked for.
    ahead: ReadAhead,
    /// Message records decoded from disk, ever.
    decoded_from_disk: u64,
    /// Journal records carry the newest message timestamp, so the log's
    /// time index stays non-decreasing without the store reading a clock.
    last_timestamp: u64,
    reports: Vec<String>,
    /// The log's next seq after the last good sync: what a sync makes
    /// durable is everything from here on.
    synced_next: Seq,
    sync_seconds: Histogram,
    sync_batch_records: Histogram,
    /// Seqs whose records the last open found gone from the disk.
    lost: Vec<Range<Seq>>,
    /// See [`MessageStore::discards`].
    discards: u64,
    /// The log's count of discarded records when last looked at.
    discarded_seen: u64,
    /// Held while the store is open (see [`LogStore::open`]).
    _lock: Option<DirLock>,
}

/// What a cached message counts for against [`RECENT_BYTES_MAX`].
fn cached_bytes(message: &Message) -> usize {
    courier_proto::encoded_message_len(message)
}

pub(crate) fn store_error(e: LogError) -> StoreError {
    match e {
        LogError::NoSpace { .. } => StoreError::Full(e.to_string()),
        LogError::Corrupt { .. } => StoreError::Corrupt(e.to_string()),
        LogError::Locked { .. } => StoreError::Locked(e.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

impl LogStore {
    /// Opens (or creates) the log, holding its directory's lock for as
    /// long as the store lives (a second broker on the same directory is
    /// refused, [`StoreError::Locked`]); what recovery found damaged is
    /// returned for the operator's log, never hidden.
    pub fn open(config: LogConfig) -> Result<(LogStore, Vec<Damage>), StoreError> {
        let lock = DirLock::exclusive(&config.dir).map_err(store_error)?;
        let (log, damage) = Log::open(config).map_err(store_error)?;
        let mut store = LogStore::with_open_damage(log, &damage);
        store._lock = Some(lock);
        Ok((store, damage))
    }

    pub fn new(log: Log) -> LogStore {
        LogStore {
            log,
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            recent_bytes: 0,
            ahead: ReadAhead::default(),
            decoded_from_disk: 0,
            last_timestamp: 0,
            reports: Vec::new(),
            synced_next: 0,
            sync_seconds: Histogram::new(&SECONDS_BUCKETS),
            sync_batch_records: Histogram::new(&BATCH_BUCKETS),
            lost: Vec::new(),
            discards: 0,
            discarded_seen: 0,
            _lock: None,
        }
    }

    /// A store on a log just opened, told what the open found: records
    /// gone from the disk are [`MessageStore::lost_records`].
    pub fn with_open_damage(log: Log, damage: &[Damage]) -> LogStore {
        let mut store = LogStore::new(log);
        store.note_lost(damage);
        store
    }

    fn note_lost(&mut self, damage: &[Damage]) {
        self.lost = damage
            .iter()
            .map(Damage::lost_seqs)
            .filter(|seqs| !seqs.is_empty())
            .collect();
        self.lost.sort_by_key(|seqs| seqs.start);
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    /// After an error: counts records the log threw away, and if it left
    /// the log refusing writes (it could not cut a failed write back),
    /// reopens it: opening repairs the tail, and writes work again once
    /// the disk does.
    fn recover_from(&mut self, error: &LogError) {
        let discarded = self.log.metrics().records_discarded;
        if discarded != self.discarded_seen {
            self.discarded_seen = discarded;
            self.discards += 1;
        }
        if !matches!(error, LogError::Poisoned { .. }) {
            return;
        }
        self.discards += 1;
        let config = self.log.config().clone();
        let fs = self.log.file_system();
        match Log::open_with(config, fs) {
            Ok((log, damage)) => {
                self.log = log;
                self.discarded_seen = self.log.metrics().records_discarded;
                let next = self.log.next_seq();
                self.forget_recent_from(next);
                self.ahead.forget_from(next);
                self.reports
                    .push("the log was reopened after a write it could not undo".to_string());
                self.note_lost(&damage);
                for d in damage {
                    self.reports.push(d.to_string());
                }
            }
            Err(e) => self.reports.push(format!(
                "the log refuses writes and cannot be reopened yet: {e}"
            )),
        }
    }

    /// The outcome of a sync: after a failure, records since the last good
    /// sync are gone, and so are their seqs.
    /// Segments holding events younger than the retention stay.
    fn compactable_before(&self, before: Seq, older_than: u64) -> Seq {
        let young = self
            .log
            .segments()
            .iter()
            .find(|s| s.last_timestamp >= older_than)
            .map_or(before, |s| s.first_seq);
        before.min(young)
    }

    fn synced(&mut self, result: Result<(), LogError>) -> Result<(), StoreError> {
        let Err(e) = result else {
            return Ok(());
        };
        self.recover_from(&e);
        let next = self.log.next_seq();
        self.forget_recent_from(next);
        self.ahead.forget_from(next);
        Err(store_error(e))
    }

    fn remember(&mut self, seq: Seq, message: Arc<Message>) {
        let bytes = cached_bytes(&message);
        while self.recent_order.len() >= RECENT_MESSAGES_MAX
            || (self.recent_bytes + bytes > RECENT_BYTES_MAX && !self.recent_order.is_empty())
        {
            if let Some(old) = self.recent_order.pop_front() {
                self.forget_recent(old);
            }
        }
        self.recent_bytes += bytes;
        if let Some(replaced) = self.recent.insert(seq, message) {
            self.recent_bytes -= cached_bytes(&replaced);
        }
        self.recent_order.push_back(seq);
    }

    fn forget_recent(&mut self, seq: Seq) {
        if let Some(message) = self.recent.remove(&seq) {
            self.recent_bytes -= cached_bytes(&message);
        }
    }

    /// Drops the cached messages from `next` on (seqs the log will issue
    /// again).
    fn forget_recent_from(&mut self, next: Seq) {
        self.recent.retain(|s, _| *s < next);
        self.recent_order.retain(|s| *s < next);
        self.recent_bytes = self.recent.values().map(|m| cached_bytes(m)).sum();
    }

    fn decode(&mut self, seq: Seq, body: Bytes) -> Option<Arc<Message>> {
        self.decoded_from_disk += 1;
        match decode_message(body) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                self.reports.push(format!(
                    "message record {seq} passed its checksum but does not decode: {e}"
                ));
                None
            }
        }
    }
}

impl MessageStore for LogStore {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        let mut buf = BytesMut::with_capacity(courier_proto::encoded_message_len(&message));
        encode_message(&message, &mut buf)
            .map_err(|e| StoreError::Io(format!("cannot encode message: {e}")))?;
        self.last_timestamp = self.last_timestamp.max(message.timestamp);
        let seq = match self
            .log
            .append(RecordKind::Message, self.last_timestamp, &buf)
        {
            Ok(seq) => seq,
            Err(e) => {
                self.recover_from(&e);
                return Err(store_error(e));
            }
        };
        self.remember(seq, message);
        Ok(seq)
    }

    fn journal(&mut self, entry: &[u8]) -> Result<Seq, StoreError> {
        match self
            .log
            .append(RecordKind::State, self.last_timestamp, entry)
        {
            Ok(seq) => Ok(seq),
            Err(e) => {
                self.recover_from(&e);
                Err(store_error(e))
            }
        }
    }

    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError> {
        if let Some(m) = self.recent.get(&seq) {
            return Ok(Some(m.clone()));
        }
        if let Some(m) = self.ahead.get(seq) {
            return Ok(Some(m.clone()));
        }
        if seq < self.log.first_seq() || seq >= self.log.next_seq() {
            return Ok(None);
        }
        let mut bodies = Vec::new();
        let mut bytes = 0;
        let mut first = None;
        let (ahead, recent) = (&self.ahead, &self.recent);
        let scanned = self.log.scan(seq, &mut |record| {
            if first.is_none() {
                first = Some(record.seq);
            } else if ahead.contains(record.seq) || recent.contains_key(&record.seq) {
                // Read before, and what follows it too, most likely.
                return ControlFlow::Break(());
            }
            if record.kind == RecordKind::Message {
                bytes += record.body.len();
                bodies.push((record.seq, record.body));
            }
            if bodies.len() >= READ_AHEAD_MESSAGES || bytes >= READ_AHEAD_BYTES_MAX / 8 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if let Err(e) = scanned {
            if bodies.is_empty() {
                return Err(store_error(e));
            }
        }
        for (s, body) in bodies {
            let size = body.len();
            if let Some(m) = self.decode(s, body) {
                self.ahead.insert(s, m, size);
            }
        }
        if first != Some(seq) {
            // The scan started past `seq`: it is gone (compacted) or was
            // never a record of ours.
            return Ok(None);
        }
        Ok(self.ahead.get(seq).cloned())
    }

    fn remove(&mut self, seq: Seq) {
        // The log reclaims whole segments at compaction; only the cache
        // lets go now.
        // Its slot in `recent_order` goes stale and is dropped on eviction:
        // removing it here would cost a scan of the order per ack.
        self.forget_recent(seq);
        self.ahead.remove(seq);
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let records = self.log.next_seq().saturating_sub(self.synced_next);
        let started = Instant::now();
        let result = self.log.sync();
        if records > 0 {
            self.sync_seconds.observe(started.elapsed().as_secs_f64());
            self.sync_batch_records.observe(records as f64);
        }
        self.synced_next = self.log.next_seq();
        self.synced(result)
    }

    fn start_sync(&mut self) -> Result<Option<SyncJob>, StoreError> {
        match self.log.begin_sync() {
            Ok(Some(fsync)) => Ok(Some(SyncJob {
                covers: fsync.covers(),
                fsync: Some(fsync),
                wait: None,
                took: None,
            })),
            Ok(None) => {
                self.synced_next = self.log.next_seq();
                Ok(None)
            }
            Err(e) => self.synced(Err(e)).map(|()| None),
        }
    }

    fn finish_sync(&mut self, mut job: SyncJob, result: io::Result<()>) -> Result<(), StoreError> {
        let Some(fsync) = job.fsync.take() else {
            return result.map_err(|e| StoreError::Io(e.to_string()));
        };
        let records = job.covers.saturating_sub(self.synced_next);
        if let (Some(took), true) = (job.took, records > 0) {
            self.sync_seconds.observe(took.as_secs_f64());
            self.sync_batch_records.observe(records as f64);
        }
        let result = self.log.finish_sync(fsync, result);
        if result.is_ok() {
            self.synced_next = self.synced_next.max(job.covers);
        } else {
            self.synced_next = self.log.next_seq();
        }
        self.synced(result)
    }

    fn discards(&self) -> u64 {
        self.discards
    }

    fn replay_chunk(
        &mut self,
        after: Seq,
        max_records: usize,
    ) -> Result<Vec<(Seq, Replayed)>, StoreError> {
        let mut out = Vec::new();
        let mut from = after + 1;
        loop {
            let mut raw = Vec::new();
            let scanned = self.log.scan(from, &mut |record| {
                raw.push(record);
                if raw.len() >= max_records {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            for record in raw {
                from = record.seq + 1;
                match record.kind {
                    RecordKind::Message => {
                        if let Some(m) = self.decode(record.seq, record.body) {
                            out.push((record.seq, Replayed::Message(m)));
                        }
                    }
                    RecordKind::State => out.push((record.seq, Replayed::State(record.body))),
                }
            }
            match scanned {
                Ok(()) => return Ok(out),
                Err(e @ LogError::Corrupt { resume_seq, .. }) if resume_seq > from => {
                    // Reported loudly, then the replay goes on after it: the
                    // intact records that follow are not lost.
                    self.reports.push(format!(
                        "records {from}..{resume_seq} are damaged and were skipped during recovery: {e}"
                    ));
                    from = resume_seq;
                    if out.len() >= max_records {
                        return Ok(out);
                    }
                }
                Err(e) => return Err(store_error(e)),
            }
        }
    }

    fn save_snapshot(&mut self, covers: Seq, state: &[u8]) -> Result<(), StoreError> {
        // It fsyncs the records it covers first: a failure there discards.
        let result = self.log.save_snapshot(covers, state);
        self.synced(result)
    }

    fn start_snapshot(&mut self, covers: Seq, state: Bytes) -> Result<SnapshotJob, StoreError> {
        let write = self
            .log
            .begin_snapshot(covers, state)
            .map_err(store_error)?;
        Ok(SnapshotJob {
            write: Some(write),
            covers,
        })
    }

    fn snapshot_ready(&mut self, job: &SnapshotJob) -> Result<(), StoreError> {
        let Some(write) = &job.write else {
            return Ok(());
        };
        // It may fsync the records it covers: a failure there discards.
        let result = self.log.snapshot_ready(write);
        self.synced(result)
    }

    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError> {
        let snapshot = self.log.load_snapshot().map_err(store_error)?;
        for damage in self.log.take_damage() {
            self.reports.push(damage.to_string());
        }
        Ok(snapshot)
    }

    fn scan_messages(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError> {
        let mut undecodable = Vec::new();
        let start = from.max(self.log.first_seq());
        self.log
            .scan(start, &mut |record| {
                if record.kind == RecordKind::Message {
                    match decode_message(record.body) {
                        Ok(m) => f(record.seq, Arc::new(m)),
                        Err(e) => undecodable.push(format!(
                            "message record {} does not decode: {e}",
                            record.seq
                        )),
                    }
                }
                ControlFlow::Continue(())
            })
            .map_err(store_error)?;
        self.reports.append(&mut undecodable);
        Ok(())
    }

    fn scan_messages_chunk(
        &mut self,
        from: Seq,
        max_records: usize,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<Option<Seq>, StoreError> {
        let mut undecodable = Vec::new();
        let start = from.max(self.log.first_seq());
        let mut taken = 0;
        let mut resume = None;
        self.log
            .scan(start, &mut |record| {
                if taken == max_records.max(1) {
                    resume = Some(record.seq);
                    return ControlFlow::Break(());
                }
                taken += 1;
                if record.kind == RecordKind::Message {
                    match decode_message(record.body) {
                        Ok(m) => f(record.seq, Arc::new(m)),
                        Err(e) => undecodable.push(format!(
                            "message record {} does not decode: {e}",
                            record.seq
                        )),
                    }
                }
                ControlFlow::Continue(())
            })
            .map_err(store_error)?;
        self.reports.append(&mut undecodable);
        Ok(resume)
    }

    fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, StoreError> {
        self.log.seq_at_time(timestamp).map_err(store_error)
    }

    fn next_seq(&self) -> Seq {
        self.log.next_seq()
    }

    fn compact(&mut self, before: Seq, older_than: u64) -> Result<u64, StoreError> {
        let until = self.compactable_before(before, older_than);
        self.log.remove_segments_before(until).map_err(store_error)
    }

    fn start_compact(&mut self, before: Seq, older_than: u64) -> Result<RemovalJob, StoreError> {
        let until = self.compactable_before(before, older_than);
        Ok(RemovalJob::of(self.log.detach_segments_before(until)))
    }

    fn len(&self) -> usize {
        self.log.segments().iter().map(|s| s.bytes as usize).sum()
    }

    fn storage_stats(&self) -> StorageStats {
        let segments = self.log.segments();
        let disk_free_bytes = segments
            .first()
            .and_then(|s| s.path.parent())
            .and_then(|dir| rustix::fs::statvfs(dir).ok())
            .map(|fs| fs.f_bavail.saturating_mul(fs.f_frsize));
        StorageStats {
            log_bytes: segments.iter().map(|s| s.bytes).sum(),
            segments: segments.len() as u64,
            sync_seconds: self.sync_seconds.clone(),
            sync_batch_records: self.sync_batch_records.clone(),
            disk_free_bytes,
        }
    }

    fn take_reports(&mut self) -> Vec<String> {
        // Damage reads ran into since the last call: each range once.
        for damage in self.log.take_damage() {
            self.reports.push(damage.to_string());
        }
        std::mem::take(&mut self.reports)
    }

    fn lost_records(&self) -> Vec<Range<Seq>> {
        self.lost.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Kind;

    #[test]
    fn the_cache_of_recent_messages_holds_large_ones_up_to_its_byte_bound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, _) = LogStore::open(LogConfig::new(dir.path())).expect("open");
        let payload = vec![b'x'; 64 * 1024];
        let mut seqs = Vec::new();
        for _ in 0..100 {
            let message = Message::new(Kind::Event, "large", payload.clone());
            seqs.push(store.append(Arc::new(message)).expect("append"));
        }
        store.sync().expect("sync");
        assert!(
            store.recent_bytes <= RECENT_BYTES_MAX,
            "{} bytes cached",
            store.recent_bytes
        );
        let held = store.recent.len();
        assert!((10..=16).contains(&held), "{held} of 64 KiB cached");
        let summed: usize = store.recent.values().map(|m| cached_bytes(m)).sum();
        assert_eq!(store.recent_bytes, summed);

        // The newest come from memory, the oldest from the disk.
        let newest = *seqs.last().expect("appended");
        store.get(newest).expect("read").expect("present");
        assert_eq!(store.decoded_from_disk, 0);
        store.get(seqs[0]).expect("read").expect("present");
        assert!(store.decoded_from_disk > 0);

        // Acknowledged ones leave the count at once.
        store.remove(newest);
        let summed: usize = store.recent.values().map(|m| cached_bytes(m)).sum();
        assert_eq!(store.recent_bytes, summed);
        assert_eq!(store.recent.len(), held - 1);
    }

    #[test]
    fn one_message_over_the_byte_bound_is_still_cached_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mut store, _) = LogStore::open(LogConfig::new(dir.path())).expect("open");
        let small = Message::new(Kind::Event, "small", b"x".to_vec());
        store.append(Arc::new(small)).expect("append");
        let huge = Message::new(Kind::Event, "huge", vec![b'x'; RECENT_BYTES_MAX + 1]);
        let seq = store.append(Arc::new(huge)).expect("append");
        assert_eq!(store.recent.len(), 1);
        assert!(store.recent.contains_key(&seq));
    }

    /// A backlog of `keys` keys interleaved in the log, read back after a
    /// reopen by one cursor per key, each a different distance behind.
    fn decodes_for_cursors(keys: u64, per_key: u64) -> u64 {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (mut store, _) = LogStore::open(LogConfig::new(dir.path())).expect("open");
            for n in 0..keys * per_key {
                let message = Message::new(Kind::Event, "backlog", format!("{n}").into_bytes());
                store.append(Arc::new(message)).expect("append");
            }
            store.sync().expect("sync");
        }
        let (mut store, _) = LogStore::open(LogConfig::new(dir.path())).expect("reopen");
        let first = store.log.first_seq();
        // Round robin over the cursors, each reading its key's next
        // message and removing it (delivered and acknowledged), the later
        // keys starting further behind, as keys drain at their own pace.
        let mut next: Vec<u64> = vec![0; keys as usize];
        for round in 0..per_key + keys * 40 {
            for key in 0..keys {
                let started = round >= key * 40;
                let n = next[key as usize];
                if !started || n >= per_key {
                    continue;
                }
                let seq = first + n * keys + key;
                let message = store.get(seq).expect("read").expect("present");
                assert_eq!(
                    &message.payload[..],
                    format!("{}", n * keys + key).as_bytes()
                );
                store.remove(seq);
                next[key as usize] += 1;
            }
        }
        store.decoded_from_disk
    }

    #[test]
    fn messages_nobody_asks_for_do_not_crowd_out_the_reads_that_move_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let total = 20_000u64;
        {
            let (mut store, _) = LogStore::open(LogConfig::new(dir.path())).expect("open");
            for n in 0..total {
                let message = Message::new(Kind::Event, "backlog", format!("{n}").into_bytes());
                store.append(Arc::new(message)).expect("append");
            }
            store.sync().expect("sync");
        }
        let (mut store, _) = LogStore::open(LogConfig::new(dir.path())).expect("reopen");
        let first = store.log.first_seq();
        // One service takes the even ones; the odd ones wait for one that
        // is away: read ahead with the others, never asked for, never
        // removed.
        for n in (0..total).step_by(2) {
            let seq = first + n;
            store.get(seq).expect("read").expect("present");
            store.remove(seq);
        }
        assert!(
            store.decoded_from_disk <= total * 11 / 10,
            "{} decodes for {} records read",
            store.decoded_from_disk,
            total
        );
    }

    #[test]
    fn cursors_at_different_places_decode_each_message_about_once() {
        let (keys, per_key) = (3, 2000);
        let decoded = decodes_for_cursors(keys, per_key);
        // Each scan stops where an earlier one began, so a record is
        // decoded again only when room ran short; starting over at every
        // jump decoded each one dozens of times here.
        assert!(
            decoded <= keys * per_key * 11 / 10,
            "{decoded} decodes for {} messages",
            keys * per_key
        );
    }
}
