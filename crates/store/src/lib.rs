//! The storage interface behind Courier's delivery logic, and the in-memory
//! implementation used for transient runs and tests.
//!
//! Architecture invariant: the broker core reaches messages and its own
//! journal only through [`MessageStore`]; the durable log implements the
//! same trait, so the delivery rules never change with the storage engine.
#![forbid(unsafe_code)]

pub mod histogram;
mod log_store;
mod read_ahead;
mod upstream;

pub use courier_log::{
    verify_dir, Damage, DirLock, FsyncPolicy, LogConfig, PendingSync, Scrubber, SegmentRemoval,
    SnapshotWrite, VerifyProgress, VerifyReport,
};
pub use log_store::{LogStore, RECENT_BYTES_MAX, RECENT_MESSAGES_MAX};
pub use upstream::{AckHandle, Upstream};

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_proto::Message;
use thiserror::Error;

/// Position of a record (a message or a journal entry) in the store;
/// assigned on append, increasing, never reused for durable records.
pub type Seq = u64;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the disk is full: {0} — free space; sends are refused until then")]
    Full(String),
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Locked(String),
}

/// What a store reports of itself for `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageStats {
    /// Bytes of log on disk (0 in memory).
    pub log_bytes: u64,
    /// Segment files of the log (0 in memory).
    pub segments: u64,
    /// Seconds each `sync` took.
    pub sync_seconds: histogram::Histogram,
    /// Records each `sync` made durable (the size of a group commit).
    pub sync_batch_records: histogram::Histogram,
    /// Bytes free for the log on its file system, when known.
    pub disk_free_bytes: Option<u64>,
}

impl Default for StorageStats {
    fn default() -> Self {
        StorageStats {
            log_bytes: 0,
            segments: 0,
            sync_seconds: histogram::Histogram::new(&histogram::SECONDS_BUCKETS),
            sync_batch_records: histogram::Histogram::new(&histogram::BATCH_BUCKETS),
            disk_free_bytes: None,
        }
    }
}

/// A record read back during recovery, in log order.
#[derive(Debug, Clone)]
pub enum Replayed {
    Message(Arc<Message>),
    /// A delivery-state change the broker journaled; opaque to the store.
    State(Bytes),
}

/// A sync begun by [`MessageStore::start_sync`]: [`SyncJob::run`] is the
/// slow part (the fsync) and needs no access to the store, so it runs
/// while the store's owner goes on appending; the result goes back to
/// [`MessageStore::finish_sync`] of the same store.
#[derive(Debug)]
pub struct SyncJob {
    fsync: Option<PendingSync>,
    /// A backend's wait instead of an fsync ([`SyncJob::waiting`]).
    wait: Option<BackendWait>,
    covers: Seq,
    took: Option<Duration>,
}

/// What a [`BackendWait`] calls with its result, once.
pub type SyncDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// A replicated backend's wait for its acknowledgements. It blocks no
/// thread: [`BackendWait::start`] hands it a callback, which whatever
/// settles the last acknowledgement calls (a task of the backend's
/// client), so the records can be released from there without waking a
/// thread that waited.
pub struct BackendWait {
    start: Box<dyn FnOnce(SyncDone) + Send>,
    limit: Duration,
}

impl std::fmt::Debug for BackendWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendWait(limit {:?})", self.limit)
    }
}

impl BackendWait {
    /// How long the backend may take; a caller that waits longer treats
    /// the sync as failed.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Starts the wait: `done` is called once with its result, perhaps
    /// at once on this thread, never while the caller's locks are taken
    /// by the backend (so it may take them).
    pub fn start(self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        (self.start)(Box::new(done))
    }

    /// Waits on this thread, at most [`BackendWait::limit`].
    fn block(self) -> io::Result<()> {
        let limit = self.limit;
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.start(move |result| {
            // The receiver is gone only after the limit passed: that
            // result is already given up.
            let _ = sender.send(result);
        });
        match receiver.recv_timeout(limit) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the backend did not acknowledge the sync within {limit:?}"),
            )),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::other(
                "the backend dropped the sync without an answer",
            )),
        }
    }
}

impl SyncJob {
    /// A job with nothing to run (stores whose records need no fsync, and
    /// tests that decide themselves when a sync completes): finishing it
    /// `Ok` makes the records below `covers` durable.
    pub fn marker(covers: Seq) -> SyncJob {
        SyncJob {
            fsync: None,
            wait: None,
            covers,
            took: None,
        }
    }

    /// A job whose slow part is a replicated backend acknowledging every
    /// record below `covers`: `start` is given the callback to call with
    /// the result once, and the backend is expected to call it within
    /// `limit` ([`BackendWait`]).
    pub fn acknowledged(
        covers: Seq,
        limit: Duration,
        start: impl FnOnce(SyncDone) + Send + 'static,
    ) -> SyncJob {
        SyncJob {
            fsync: None,
            wait: Some(BackendWait {
                start: Box::new(start),
                limit,
            }),
            covers,
            took: None,
        }
    }

    /// The backend's wait, for a caller that would rather be called back
    /// than block in [`SyncJob::run`]; the job is then finished with the
    /// result the callback gets.
    pub fn take_backend_wait(&mut self) -> Option<BackendWait> {
        self.wait.take()
    }

    /// Every record below this seq is durable once the job finished `Ok`.
    pub fn covers(&self) -> Seq {
        self.covers
    }

    /// Runs the fsync (blocking); hand the result to `finish_sync`.
    pub fn run(&mut self) -> io::Result<()> {
        let started = Instant::now();
        let result = match (&mut self.fsync, self.wait.take()) {
            (Some(fsync), _) => fsync.run(),
            (None, Some(wait)) => wait.block(),
            (None, None) => Ok(()),
        };
        self.took = Some(started.elapsed());
        result
    }
}

/// A snapshot being saved outside whatever guards the store
/// ([`MessageStore::start_snapshot`]): [`SnapshotJob::write`] is the slow
/// part and needs no access to the store; [`MessageStore::snapshot_ready`]
/// (with the store) says whether it may be put in place, and
/// [`SnapshotJob::install`] (without it) does so.
#[derive(Debug)]
pub struct SnapshotJob {
    write: Option<SnapshotWrite>,
    covers: Seq,
}

impl SnapshotJob {
    /// A snapshot already saved (stores that save in place).
    pub fn saved(covers: Seq) -> SnapshotJob {
        SnapshotJob {
            write: None,
            covers,
        }
    }

    /// The last record the snapshot covers.
    pub fn covers(&self) -> Seq {
        self.covers
    }

    /// Writes the snapshot's temporary file and fsyncs it (blocking).
    pub fn write(&mut self) -> Result<(), StoreError> {
        match &mut self.write {
            Some(write) => write.write().map_err(log_store::store_error),
            None => Ok(()),
        }
    }

    /// Puts the written snapshot in place (rename, directory fsync), once
    /// [`MessageStore::snapshot_ready`] returned `Ok` for it.
    pub fn install(self) -> Result<(), StoreError> {
        match self.write {
            Some(write) => write.install().map_err(log_store::store_error),
            None => Ok(()),
        }
    }
}

/// Old records the store let go of ([`MessageStore::start_compact`]), to
/// delete outside whatever guards it.
#[derive(Debug, Default)]
pub struct RemovalJob {
    removals: Vec<SegmentRemoval>,
    /// Bytes freed in place already.
    freed: u64,
}

impl RemovalJob {
    /// Nothing left to delete: `freed` bytes were freed in place.
    pub fn done(freed: u64) -> RemovalJob {
        RemovalJob {
            removals: Vec::new(),
            freed,
        }
    }

    pub fn of(removal: SegmentRemoval) -> RemovalJob {
        RemovalJob {
            removals: vec![removal],
            freed: 0,
        }
    }

    /// Files waiting to be deleted.
    pub fn is_empty(&self) -> bool {
        self.removals.iter().all(SegmentRemoval::is_empty)
    }

    /// Adds what `other` deletes, after this job's.
    pub fn then(&mut self, other: RemovalJob) {
        self.removals.extend(other.removals);
        self.freed += other.freed;
    }

    /// Deletes the files (blocking); returns the bytes freed.
    pub fn run(self) -> Result<u64, StoreError> {
        let mut freed = self.freed;
        for removal in self.removals {
            freed += removal.run().map_err(log_store::store_error)?;
        }
        Ok(freed)
    }
}

/// Where accepted messages and the broker's journal live.
///
/// `append` and `journal` may buffer; nothing counts as durable until
/// `sync` returns `Ok`. The broker calls `sync` once per batch of work
/// (group commit) and only then acknowledges the sends in that batch. A
/// failed `sync` means everything since the last successful one is gone: the
/// broker rebuilds its state from the store rather than assume otherwise.
pub trait MessageStore: Send {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError>;
    /// [`MessageStore::append`], saying whether the broker traces the
    /// message's activity. A store that other nodes deliver from carries
    /// the answer with the message, so that every node records the
    /// activities the accepting node's sampler picked and no others;
    /// a store read by one broker alone has nothing to carry.
    fn append_traced(&mut self, message: Arc<Message>, traced: bool) -> Result<Seq, StoreError> {
        let _ = traced;
        self.append(message)
    }
    /// Appends a journal record (a delivery-state change), in order with messages.
    fn journal(&mut self, entry: &[u8]) -> Result<Seq, StoreError>;
    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError>;
    /// No service needs the message any more; the store may reclaim it.
    fn remove(&mut self, seq: Seq);
    /// Makes every append and journal record so far durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Like `sync`, but leaves the fsync to the caller, to run without
    /// holding whatever guards the store while appends go on. `Ok(None)`:
    /// every record so far is durable already. One job at a time.
    fn start_sync(&mut self) -> Result<Option<SyncJob>, StoreError> {
        self.sync().map(|()| None)
    }
    /// Takes back a job of `start_sync` with what its `run` returned.
    /// `Ok`: every record below [`SyncJob::covers`] is durable. On error,
    /// nothing new is, and records may have been discarded
    /// ([`MessageStore::discards`] says).
    fn finish_sync(&mut self, job: SyncJob, result: io::Result<()>) -> Result<(), StoreError> {
        let _ = job;
        result.map_err(|e| StoreError::Io(e.to_string()))
    }
    /// Grows whenever records not yet durable were thrown away (a write or
    /// fsync failed): whatever waited for them to become durable must be
    /// told they did not, even if a later sync succeeds.
    fn discards(&self) -> u64 {
        0
    }
    /// Up to `max_records` records after `after`, in order; empty at the
    /// end (recovery reads the log in chunks of bounded size).
    fn replay_chunk(
        &mut self,
        after: Seq,
        max_records: usize,
    ) -> Result<Vec<(Seq, Replayed)>, StoreError>;
    /// Saves the broker's state as of record `covers` (inclusive).
    fn save_snapshot(&mut self, covers: Seq, state: &[u8]) -> Result<(), StoreError>;
    /// Like `save_snapshot`, but leaves the writing to the caller, to run
    /// without holding whatever guards the store (see [`SnapshotJob`]).
    /// One at a time.
    fn start_snapshot(&mut self, covers: Seq, state: Bytes) -> Result<SnapshotJob, StoreError> {
        self.save_snapshot(covers, &state)
            .map(|()| SnapshotJob::saved(covers))
    }
    /// Whether a written [`SnapshotJob`] may be put in place: the records
    /// it covers are made durable first if a sync has not made them so
    /// (then this fsyncs); an error if records it covers were thrown away
    /// since it began, or the fsync failed.
    fn snapshot_ready(&mut self, job: &SnapshotJob) -> Result<(), StoreError> {
        let _ = job;
        Ok(())
    }
    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError>;
    /// Messages with seq ≥ `from` (for replaying history to a new subscription).
    fn scan_messages(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError>;
    /// Like `scan_messages`, but stops after about `max_records` records
    /// (messages and journal entries alike), so a caller holding a lock
    /// can go on later from the seq returned; `None` at the end.
    fn scan_messages_chunk(
        &mut self,
        from: Seq,
        max_records: usize,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<Option<Seq>, StoreError> {
        let _ = max_records;
        self.scan_messages(from, f).map(|()| None)
    }
    /// The first seq accepted at or after `timestamp` (unix ns).
    fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, StoreError>;
    /// The seq the next append will get.
    fn next_seq(&self) -> Seq;
    /// Lets the store drop whatever only records before `seq` need, when
    /// they are also older than `older_than` (unix ns). Returns bytes freed.
    fn compact(&mut self, before: Seq, older_than: u64) -> Result<u64, StoreError>;
    /// Like `compact`, but leaves deleting files to the caller, to run
    /// without holding whatever guards the store ([`RemovalJob::run`]);
    /// the store stops reading them at once.
    fn start_compact(&mut self, before: Seq, older_than: u64) -> Result<RemovalJob, StoreError> {
        self.compact(before, older_than).map(RemovalJob::done)
    }
    /// Messages held (memory store) or bytes on disk (log), for metrics.
    fn len(&self) -> usize;
    /// Whether anything survives a restart (snapshots are pointless if not).
    fn persistent(&self) -> bool {
        true
    }
    /// Sizes, sync latencies and group-commit sizes, for `/metrics`.
    fn storage_stats(&self) -> StorageStats {
        StorageStats::default()
    }
    /// Damage and oddities found since the last call, for the operator.
    fn take_reports(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Seqs, in order, whose records were durable and are gone from the
    /// store for good (found when it was opened): whatever the broker
    /// holds by those seqs can never be delivered. Never reissued.
    fn lost_records(&self) -> Vec<Range<Seq>> {
        Vec::new()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the core keeps delivery state (queues, attempts, dead
    /// letters) for what is appended. `false` for a replicated backend
    /// whose consumers keep it: the core then queues nothing it appends,
    /// delivers what [`MessageStore::hold_fetched`] holds, and reports how
    /// each delivery ended through [`MessageStore::upstream`].
    fn keeps_deliveries(&self) -> bool {
        true
    }
    /// Keeps a message fetched from a replicated backend readable by the
    /// seq returned until `remove`; `handle` settles it upstream; `traced`:
    /// the node that accepted it traces its activity. Only stores that do
    /// not keep deliveries hold fetched messages.
    fn hold_fetched(
        &mut self,
        message: Arc<Message>,
        handle: AckHandle,
        traced: bool,
    ) -> Result<Seq, StoreError> {
        let _ = (message, handle, traced);
        Err(StoreError::Io(
            "this store is the log itself: it holds no fetched messages".to_string(),
        ))
    }
    /// The handle a fetched message held at `seq` settles by, while held.
    fn fetched_handle(&self, seq: Seq) -> Option<AckHandle> {
        let _ = seq;
        None
    }
    /// Whether the node that accepted the fetched message held at `seq`
    /// traces its activity (see [`MessageStore::append_traced`]).
    fn fetched_traced(&self, seq: Seq) -> bool {
        let _ = seq;
        false
    }
    /// A delivery-state change for a store that does not keep deliveries;
    /// whatever it must make durable is waited for by the next sync.
    fn upstream(&mut self, change: Upstream) {
        let _ = change;
    }
}

/// Keeps messages in memory; nothing survives the process, so journal
/// records are dropped and there is nothing to replay.
#[derive(Default)]
pub struct MemoryStore {
    messages: BTreeMap<Seq, Arc<Message>>,
    next_seq: Seq,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore {
            messages: BTreeMap::new(),
            next_seq: 1,
        }
    }
}

impl MessageStore for MemoryStore {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.messages.insert(seq, message);
        Ok(seq)
    }

    fn journal(&mut self, _entry: &[u8]) -> Result<Seq, StoreError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(seq)
    }

    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError> {
        Ok(self.messages.get(&seq).cloned())
    }

    fn remove(&mut self, seq: Seq) {
        self.messages.remove(&seq);
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn replay_chunk(
        &mut self,
        _after: Seq,
        _max_records: usize,
    ) -> Result<Vec<(Seq, Replayed)>, StoreError> {
        Ok(Vec::new())
    }

    fn save_snapshot(&mut self, _covers: Seq, _state: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError> {
        Ok(None)
    }

    fn scan_messages(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError> {
        for (seq, m) in self.messages.range(from..) {
            f(*seq, m.clone());
        }
        Ok(())
    }

    fn scan_messages_chunk(
        &mut self,
        from: Seq,
        max_records: usize,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<Option<Seq>, StoreError> {
        for (taken, (seq, m)) in self.messages.range(from..).enumerate() {
            if taken == max_records.max(1) {
                return Ok(Some(*seq));
            }
            f(*seq, m.clone());
        }
        Ok(None)
    }

    fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, StoreError> {
        Ok(self
            .messages
            .iter()
            .find(|(_, m)| m.timestamp >= timestamp)
            .map_or(self.next_seq, |(seq, _)| *seq))
    }

    fn next_seq(&self) -> Seq {
        self.next_seq
    }

    fn compact(&mut self, _before: Seq, _older_than: u64) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn len(&self) -> usize {
        self.messages.len()
    }

    fn persistent(&self) -> bool {
        false
    }
}

/// A log kept in memory that behaves like a durable one across a
/// simulated crash: [`MemoryLog::crash`] keeps only what was synced. For
/// deterministic crash-and-restart tests of the delivery rules, without
/// files.
#[derive(Clone, Default)]
pub struct MemoryLog {
    records: Vec<(Seq, Replayed)>,
    /// `records[..synced]` survived the last successful sync.
    synced: usize,
    /// `next_seq` as of the last successful sync: seqs are never reused,
    /// even when compaction removed every record.
    synced_next_seq: Seq,
    snapshot: Option<(Seq, Bytes)>,
    next_seq: Seq,
    /// The next this many syncs fail (fault injection).
    pub failing_syncs: u32,
    /// Failed syncs (see [`MessageStore::discards`]).
    discards: u64,
    /// `discards` when the job out was started.
    job_started_at: Option<u64>,
}

impl MemoryLog {
    pub fn new() -> MemoryLog {
        MemoryLog {
            next_seq: 1,
            synced_next_seq: 1,
            ..MemoryLog::default()
        }
    }

    /// What a restarted process would find: synced records only.
    pub fn crash(&self) -> MemoryLog {
        let records = self.records[..self.synced].to_vec();
        MemoryLog {
            synced: records.len(),
            records,
            snapshot: self.snapshot.clone(),
            next_seq: self.synced_next_seq,
            synced_next_seq: self.synced_next_seq,
            failing_syncs: 0,
            discards: 0,
            job_started_at: None,
        }
    }

    fn push(&mut self, record: Replayed) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.records.push((seq, record));
        seq
    }

    /// Records the last successful sync kept: what a crash now leaves.
    pub fn synced_next_seq(&self) -> Seq {
        self.synced_next_seq
    }

    /// As a real log does after a failed fsync: the unsynced tail is gone.
    fn fail_sync(&mut self) -> StoreError {
        self.failing_syncs -= 1;
        self.records.truncate(self.synced);
        self.next_seq = self.synced_next_seq;
        self.discards += 1;
        StoreError::Full("injected: no space left on device".into())
    }

    fn index_of(&self, seq: Seq) -> Option<usize> {
        self.records.binary_search_by_key(&seq, |(s, _)| *s).ok()
    }
}

impl MessageStore for MemoryLog {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        Ok(self.push(Replayed::Message(message)))
    }

    fn journal(&mut self, entry: &[u8]) -> Result<Seq, StoreError> {
        Ok(self.push(Replayed::State(Bytes::copy_from_slice(entry))))
    }

    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError> {
        Ok(self.index_of(seq).and_then(|i| match &self.records[i].1 {
            Replayed::Message(m) => Some(m.clone()),
            Replayed::State(_) => None,
        }))
    }

    fn remove(&mut self, _seq: Seq) {}

    fn sync(&mut self) -> Result<(), StoreError> {
        if self.failing_syncs > 0 {
            return Err(self.fail_sync());
        }
        self.synced = self.records.len();
        self.synced_next_seq = self.next_seq;
        Ok(())
    }

    /// A job that the test completes when it likes: records appended
    /// meanwhile stay unsynced.
    fn start_sync(&mut self) -> Result<Option<SyncJob>, StoreError> {
        if self.next_seq == self.synced_next_seq {
            return Ok(None);
        }
        self.job_started_at = Some(self.discards);
        Ok(Some(SyncJob::marker(self.next_seq)))
    }

    fn finish_sync(&mut self, job: SyncJob, result: io::Result<()>) -> Result<(), StoreError> {
        let started_at = self.job_started_at.take();
        if let Err(e) = result {
            self.failing_syncs += 1;
            let _ = self.fail_sync();
            return Err(StoreError::Io(e.to_string()));
        }
        if self.failing_syncs > 0 {
            return Err(self.fail_sync());
        }
        // A job begun before a failure covers records that are gone.
        if started_at != Some(self.discards) {
            return Err(StoreError::Io(
                "records the sync covered were discarded".into(),
            ));
        }
        if job.covers() > self.synced_next_seq {
            self.synced = self.records.partition_point(|(s, _)| *s < job.covers());
            self.synced_next_seq = job.covers();
        }
        Ok(())
    }

    fn discards(&self) -> u64 {
        self.discards
    }

    fn replay_chunk(
        &mut self,
        after: Seq,
        max_records: usize,
    ) -> Result<Vec<(Seq, Replayed)>, StoreError> {
        let start = self.records.partition_point(|(s, _)| *s <= after);
        Ok(self.records[start..]
            .iter()
            .take(max_records)
            .cloned()
            .collect())
    }

    fn save_snapshot(&mut self, covers: Seq, state: &[u8]) -> Result<(), StoreError> {
        // As the log does: never a snapshot of records a crash could take.
        if covers >= self.synced_next_seq {
            self.sync()?;
        }
        self.snapshot = Some((covers, Bytes::copy_from_slice(state)));
        Ok(())
    }

    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError> {
        Ok(self.snapshot.clone())
    }

    fn scan_messages(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError> {
        let start = self.records.partition_point(|(s, _)| *s < from);
        for (seq, record) in &self.records[start..] {
            if let Replayed::Message(m) = record {
                f(*seq, m.clone());
            }
        }
        Ok(())
    }

    fn scan_messages_chunk(
        &mut self,
        from: Seq,
        max_records: usize,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<Option<Seq>, StoreError> {
        let start = self.records.partition_point(|(s, _)| *s < from);
        let end = start.saturating_add(max_records.max(1));
        for (seq, record) in self.records.iter().take(end).skip(start) {
            if let Replayed::Message(m) = record {
                f(*seq, m.clone());
            }
        }
        Ok(self.records.get(end).map(|(seq, _)| *seq))
    }

    fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, StoreError> {
        Ok(self
            .records
            .iter()
            .find(|(_, r)| matches!(r, Replayed::Message(m) if m.timestamp >= timestamp))
            .map_or(self.next_seq, |(s, _)| *s))
    }

    fn next_seq(&self) -> Seq {
        self.next_seq
    }

    fn compact(&mut self, before: Seq, _older_than: u64) -> Result<u64, StoreError> {
        // Keeps everything unless covered by the snapshot: recovery never
        // needs records the snapshot already folded in.
        let covered = self.snapshot.as_ref().map_or(0, |(c, _)| *c);
        let cut = self
            .records
            .partition_point(|(s, _)| *s < before.min(covered + 1));
        let cut = cut.min(self.synced);
        self.records.drain(..cut);
        self.synced -= cut;
        Ok(cut as u64)
    }

    fn len(&self) -> usize {
        self.records.len()
    }
}

/// Lets the server pick a storage engine at run time.
impl<T: MessageStore + ?Sized> MessageStore for Box<T> {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        (**self).append(message)
    }
    fn append_traced(&mut self, message: Arc<Message>, traced: bool) -> Result<Seq, StoreError> {
        (**self).append_traced(message, traced)
    }
    fn journal(&mut self, entry: &[u8]) -> Result<Seq, StoreError> {
        (**self).journal(entry)
    }
    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError> {
        (**self).get(seq)
    }
    fn remove(&mut self, seq: Seq) {
        (**self).remove(seq)
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        (**self).sync()
    }
    fn start_sync(&mut self) -> Result<Option<SyncJob>, StoreError> {
        (**self).start_sync()
    }
    fn finish_sync(&mut self, job: SyncJob, result: io::Result<()>) -> Result<(), StoreError> {
        (**self).finish_sync(job, result)
    }
    fn discards(&self) -> u64 {
        (**self).discards()
    }
    fn replay_chunk(
        &mut self,
        after: Seq,
        max_records: usize,
    ) -> Result<Vec<(Seq, Replayed)>, StoreError> {
        (**self).replay_chunk(after, max_records)
    }
    fn save_snapshot(&mut self, covers: Seq, state: &[u8]) -> Result<(), StoreError> {
        (**self).save_snapshot(covers, state)
    }
    fn start_snapshot(&mut self, covers: Seq, state: Bytes) -> Result<SnapshotJob, StoreError> {
        (**self).start_snapshot(covers, state)
    }
    fn snapshot_ready(&mut self, job: &SnapshotJob) -> Result<(), StoreError> {
        (**self).snapshot_ready(job)
    }
    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError> {
        (**self).load_snapshot()
    }
    fn scan_messages(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError> {
        (**self).scan_messages(from, f)
    }
    fn scan_messages_chunk(
        &mut self,
        from: Seq,
        max_records: usize,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<Option<Seq>, StoreError> {
        (**self).scan_messages_chunk(from, max_records, f)
    }
    fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, StoreError> {
        (**self).seq_at_time(timestamp)
    }
    fn next_seq(&self) -> Seq {
        (**self).next_seq()
    }
    fn compact(&mut self, before: Seq, older_than: u64) -> Result<u64, StoreError> {
        (**self).compact(before, older_than)
    }
    fn start_compact(&mut self, before: Seq, older_than: u64) -> Result<RemovalJob, StoreError> {
        (**self).start_compact(before, older_than)
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn persistent(&self) -> bool {
        (**self).persistent()
    }
    fn take_reports(&mut self) -> Vec<String> {
        (**self).take_reports()
    }
    fn storage_stats(&self) -> StorageStats {
        (**self).storage_stats()
    }
    fn lost_records(&self) -> Vec<Range<Seq>> {
        (**self).lost_records()
    }
    fn keeps_deliveries(&self) -> bool {
        (**self).keeps_deliveries()
    }
    fn hold_fetched(
        &mut self,
        message: Arc<Message>,
        handle: AckHandle,
        traced: bool,
    ) -> Result<Seq, StoreError> {
        (**self).hold_fetched(message, handle, traced)
    }
    fn fetched_handle(&self, seq: Seq) -> Option<AckHandle> {
        (**self).fetched_handle(seq)
    }
    fn fetched_traced(&self, seq: Seq) -> bool {
        (**self).fetched_traced(seq)
    }
    fn upstream(&mut self, change: Upstream) {
        (**self).upstream(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Kind;

    #[test]
    fn append_get_remove() {
        let mut store = MemoryStore::new();
        let a = store
            .append(Arc::new(Message::new(Kind::Event, "a", "1")))
            .expect("append");
        let b = store
            .append(Arc::new(Message::new(Kind::Event, "b", "2")))
            .expect("append");
        assert!(b > a);
        assert_eq!(
            store.get(a).expect("read").map(|m| m.name.to_string()),
            Some("a".to_string())
        );
        store.remove(a);
        assert!(store.get(a).expect("read").is_none());
        assert_eq!(store.len(), 1);
    }
}
