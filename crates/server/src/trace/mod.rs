//! Activity traces: what happened to every message of an activity, kept
//! for `courier trace`, `GET /v1/activities` and the broker commands
//! `courier.trace.get` / `courier.trace.find`.
//!
//! The broker core records compact [`TraceRecord`]s while it works; the
//! connection that holds the core's lock takes them with everything else
//! and hands them here in one channel send per batch
//! ([`Tracer::submit`]); which activities are traced the core decides
//! as it goes (`courier_broker::TraceSampler`), so skipped ones cost no
//! record. A thread of its own ("courier-trace") encodes, indexes
//! (`index.rs`) and writes them to a log of their own
//! (`<data-dir>/trace/`, on `courier-log`, no fsync), so none of that
//! costs the broker's lock. At start-up the log is read back within the
//! retention.
//!
//! The thread does not wake for every batch: after a round it sleeps
//! `COALESCE_INTERVAL` and takes what gathered meanwhile in one go, so a
//! request/reply workload does not pay a thread wake-up (a context
//! switch on a small machine) per message. A query first waits for the
//! thread to take everything submitted before it ([`Tracer::settle`]),
//! so a trace is complete as soon as its replies have left. Nor does it
//! sleep while `TRACE_QUEUE_WAKE_BYTES` of messages or
//! `TRACE_QUEUE_WAKE_BATCHES` batches wait: a burst is
//! taken as it comes.
//!
//! Bounds: the queue to the thread holds at most `TRACE_QUEUE_BATCHES`
//! batches and `TRACE_QUEUE_BYTES_MAX` of the messages they pin (past
//! either, a batch is dropped and counted); the index at most
//! `bytes_max` (`index.rs` says what a record costs); the log about
//! `bytes_max` too (whole segments are removed, oldest first, past the
//! size or the retention).

mod index;
mod merge;
mod record;
mod tree;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use courier_broker::{ActivityFilter, Nanos, TraceQuery, TraceRecord};
use courier_log::{FsyncPolicy, Log, LogConfig, LogError, RecordKind};
use serde_json::{json, Value};
use tracing::{info, warn};
use uuid::Uuid;

pub(crate) use index::TRACE_RATE_DEFAULT;
use index::{IndexConfig, IndexStats, TraceIndex, Written};

/// Batches waiting for the trace thread; past it a batch is dropped.
/// Room for a full coalescing interval of one batch per core call at
/// well over a million calls a second.
const TRACE_QUEUE_BATCHES: usize = 16 * 1024;
/// Bytes of messages the waiting batches may pin (their payloads share
/// the messages' memory); past it a batch is dropped.
const TRACE_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes of queued messages past which the thread stops sleeping between
/// rounds (a submit that crosses it wakes the thread): a burst is taken
/// as it comes instead of pinning a coalescing interval's worth.
const TRACE_QUEUE_WAKE_BYTES: usize = 4 * 1024 * 1024;
/// Waiting batches past which the thread stops sleeping between rounds
/// (a submit that crosses it wakes the thread): many small batches fill
/// the queue's slots long before its bytes.
const TRACE_QUEUE_WAKE_BATCHES: usize = TRACE_QUEUE_BATCHES / 4;
/// Batches the thread takes in one go (one lock of the index, one write).
const BATCHES_PER_ROUND_MAX: usize = 4096;
/// How long the thread lets batches gather after a round before it takes
/// them: what spares a wake-up per batch. Queries do not see the
/// staleness (they wake the thread and wait for it, see `settle`), so
/// it is long: each round is a wake-up on a core the broker may want
/// (measured on two cores: at 10 ms, request/reply's p99.9 was 0.85× an
/// untraced broker's; at 100 ms 0.97–1.02×), and a burst wakes the
/// thread anyway.
const COALESCE_INTERVAL: Duration = Duration::from_millis(100);
/// The longest a query waits for the thread to take what was submitted
/// before it (the thread is stuck on a slow disk, say); then it answers
/// from what the index has.
const SETTLE_WAIT_MAX: Duration = Duration::from_secs(1);
/// How often the thread wakes without work: retention runs on time too.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// The largest trace record on disk: a message's metadata and at most
/// `record::TRACE_PAYLOAD_BYTES_MAX` of payload, with room to spare.
const RECORD_BYTES_MAX: u32 = 1024 * 1024;

/// How traces are kept (`courier serve --trace-*`).
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// How long an activity is kept after its first message.
    pub retention_ms: u64,
    /// The most bytes the index holds in memory, and about the most its
    /// log holds on disk.
    pub bytes_max: u64,
    /// Accepted messages a second traced whole; above it activities are
    /// sampled by a hash of their id. 0: no sampling.
    pub rate: u32,
    /// Keep payloads (at most 16 KiB of each) in traces.
    pub payloads: bool,
    /// Where the trace log lives; `None`: in memory only.
    pub dir: Option<PathBuf>,
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings {
            retention_ms: 3_600_000,
            bytes_max: 64 * 1024 * 1024,
            rate: TRACE_RATE_DEFAULT,
            payloads: false,
            dir: None,
        }
    }
}

/// What `/metrics` shows of the traces.
#[derive(Debug, Clone, Default)]
pub(crate) struct TraceGauges {
    pub stats: IndexStats,
    pub activities: usize,
    pub memory_bytes: usize,
    pub memory_bytes_max: usize,
    pub disk_bytes: u64,
    pub batches_dropped: u64,
    pub records_dropped: u64,
    pub disk_errors: u64,
}

#[derive(Default)]
struct Counters {
    batches_dropped: AtomicU64,
    records_dropped: AtomicU64,
    disk_errors: AtomicU64,
    disk_bytes: AtomicU64,
}

struct Batch {
    records: Vec<TraceRecord>,
    bytes: usize,
}

/// How far the trace thread got: batches submitted and taken into the
/// index, so a query can wait for what was submitted before it.
#[derive(Default)]
struct Progress {
    submitted: AtomicU64,
    applied: Mutex<u64>,
    applied_changed: Condvar,
}

/// The network edge's handle on the traces; cheap to clone.
#[derive(Clone)]
pub(crate) struct Tracer {
    sender: SyncSender<Batch>,
    index: Arc<Mutex<TraceIndex>>,
    queued_bytes: Arc<AtomicUsize>,
    queued_batches: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    progress: Arc<Progress>,
    /// The trace thread, to wait for when stopping (tests).
    #[cfg(test)]
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// The same thread, to wake early for a query or a burst.
    waker: std::thread::Thread,
}

fn lock(index: &Mutex<TraceIndex>) -> MutexGuard<'_, TraceIndex> {
    index
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Tracer {
    /// Reads back what the trace log holds within the retention, then
    /// starts the trace thread. A log that cannot be opened leaves traces
    /// in memory only (said in the log), never stops the broker.
    pub(crate) fn start(settings: &TraceSettings, now: Nanos) -> std::io::Result<Tracer> {
        Tracer::start_coalescing(settings, now, COALESCE_INTERVAL, false)
    }

    /// [`Tracer::start`] for a node of a cluster: deliveries of activities
    /// accepted on other nodes are kept too (their parts are merged on
    /// query, `cluster_edge/traces.rs`).
    pub(crate) fn start_on_cluster(
        settings: &TraceSettings,
        now: Nanos,
    ) -> std::io::Result<Tracer> {
        Tracer::start_coalescing(settings, now, COALESCE_INTERVAL, true)
    }

    /// [`Tracer::start`] with the thread's sleep between rounds given.
    fn start_coalescing(
        settings: &TraceSettings,
        now: Nanos,
        coalesce: Duration,
        on_cluster: bool,
    ) -> std::io::Result<Tracer> {
        let config = IndexConfig {
            retention_ns: settings.retention_ms.saturating_mul(1_000_000),
            bytes_max: usize::try_from(settings.bytes_max).unwrap_or(usize::MAX),
            payloads: settings.payloads,
            deliveries_of_unseen: on_cluster,
        };
        let mut index = TraceIndex::new(config);
        let counters = Arc::new(Counters::default());
        let disk = match &settings.dir {
            None => None,
            Some(dir) => match open_log(dir, settings.bytes_max) {
                Ok(mut log) => {
                    let loaded = reload(&mut log, &mut index, now);
                    if loaded > 0 {
                        info!(
                            records = loaded,
                            activities = index.activities(),
                            "activity traces read back"
                        );
                    }
                    Some(log)
                }
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "cannot open the trace log; activity traces are kept in memory only");
                    counters.disk_errors.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
        };
        let (sender, receiver) = sync_channel(TRACE_QUEUE_BATCHES);
        let index = Arc::new(Mutex::new(index));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let queued_batches = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Progress::default());
        let worker = Worker {
            receiver,
            index: index.clone(),
            queued_bytes: queued_bytes.clone(),
            queued_batches: queued_batches.clone(),
            coalesce,
            counters: counters.clone(),
            progress: progress.clone(),
            disk,
            written: Written::default(),
            trimmed_at: 0,
            retention_ns: settings.retention_ms.saturating_mul(1_000_000),
            bytes_max: settings.bytes_max,
        };
        let thread = std::thread::Builder::new()
            .name("courier-trace".into())
            .spawn(move || worker.run())?;
        let tracer = Tracer {
            sender,
            index,
            queued_bytes,
            queued_batches,
            counters,
            progress,
            waker: thread.thread().clone(),
            #[cfg(test)]
            thread: Arc::new(Mutex::new(Some(thread))),
        };
        Ok(tracer)
    }

    /// Hands a batch of the core's records to the trace thread; `bytes`
    /// is what they pin. Never blocks: a batch that does not fit the
    /// queue is dropped and counted.
    pub(crate) fn submit(&self, records: Vec<TraceRecord>, bytes: usize) {
        let queued = self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if queued < TRACE_QUEUE_WAKE_BYTES && queued + bytes >= TRACE_QUEUE_WAKE_BYTES {
            self.waker.unpark();
        }
        // Counted before the send: the thread may take the batch at once.
        let batches = self.queued_batches.fetch_add(1, Ordering::Relaxed) + 1;
        if batches == TRACE_QUEUE_WAKE_BATCHES {
            self.waker.unpark();
        }
        let dropped = if queued + bytes > TRACE_QUEUE_BYTES_MAX {
            Some(records)
        } else {
            match self.sender.try_send(Batch { records, bytes }) {
                Ok(()) => {
                    self.progress.submitted.fetch_add(1, Ordering::Release);
                    None
                }
                Err(TrySendError::Full(batch)) | Err(TrySendError::Disconnected(batch)) => {
                    Some(batch.records)
                }
            }
        };
        if let Some(records) = dropped {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.queued_batches.fetch_sub(1, Ordering::Relaxed);
            self.counters
                .batches_dropped
                .fetch_add(1, Ordering::Relaxed);
            self.counters
                .records_dropped
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
    }

    /// Waits until the trace thread has taken every batch submitted
    /// before the call into the index (waking it from its coalescing
    /// sleep), at most [`SETTLE_WAIT_MAX`]. Blocks: call it off the
    /// async runtime.
    fn settle(&self) {
        let target = self.progress.submitted.load(Ordering::Acquire);
        let applied = self
            .progress
            .applied
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *applied >= target {
            return;
        }
        self.waker.unpark();
        let _ =
            self.progress
                .applied_changed
                .wait_timeout_while(applied, SETTLE_WAIT_MAX, |applied| *applied < target);
    }

    /// One activity's causal tree, if it is traced.
    pub(crate) fn tree(&self, activity: &Uuid) -> Option<Value> {
        self.settle();
        lock(&self.index).tree(activity)
    }

    /// This node's part of an activity: its records, encoded, and how
    /// many were dropped for size.
    pub(crate) fn records(&self, activity: &Uuid) -> Option<(Vec<u8>, u32)> {
        self.settle();
        lock(&self.index)
            .records(activity)
            .map(|(bytes, dropped)| (bytes.to_vec(), dropped))
    }

    /// One activity's causal tree from several nodes' parts of it
    /// ([`Tracer::records`] on each); `None` if no node has any.
    pub(crate) fn tree_of_parts(activity: &Uuid, parts: Vec<(Vec<u8>, u32)>) -> Option<Value> {
        if parts.is_empty() {
            return None;
        }
        let dropped: u64 = parts.iter().map(|(_, dropped)| u64::from(*dropped)).sum();
        let records = merge::merge_records(
            parts
                .iter()
                .map(|(bytes, _)| record::decode_all(bytes))
                .collect(),
        );
        let mut tree = tree::build(*activity, &records);
        if dropped > 0 {
            tree["truncated"] = json!(true);
            tree["records_dropped"] = json!(dropped);
        }
        Some(tree)
    }

    /// Several nodes' listings ([`Tracer::find`] on each) as one.
    pub(crate) fn merge_listings(listings: &[Value], limit: usize) -> Value {
        merge::merge_listings(listings, limit)
    }

    /// Recent activities matching `filter`, newest first.
    pub(crate) fn find(&self, filter: &ActivityFilter) -> Value {
        self.settle();
        lock(&self.index).find(filter)
    }

    /// The answer to a broker command about traces: (reply name, body).
    pub(crate) fn answer(&self, query: &TraceQuery) -> (&'static str, Value) {
        match query {
            TraceQuery::Activity(id) => match self.tree(id) {
                Some(tree) => ("courier.trace.tree", tree),
                None => ("courier.trace.not-found", self.not_found(id)),
            },
            TraceQuery::Activities(filter) => ("courier.trace.activities", self.find(filter)),
        }
    }

    /// Why an activity has no trace, as a reply body.
    pub(crate) fn not_found(&self, id: &Uuid) -> Value {
        let retention_ms = lock(&self.index).config().retention_ns / 1_000_000;
        json!({
            "activity_id": id.to_string(),
            "reason": format!(
                "no trace of activity {id}: it started more than {} ago, was skipped by the sampler (see courier_trace_messages_skipped_total), or never reached this broker",
                humanize_ms(retention_ms)
            ),
        })
    }

    /// The index's counters, once it took what was submitted before the
    /// call (so they add up with the core's); blocks like [`Tracer::settle`].
    pub(crate) fn gauges(&self) -> TraceGauges {
        self.settle();
        let index = lock(&self.index);
        TraceGauges {
            stats: index.stats.clone(),
            activities: index.activities(),
            memory_bytes: index.memory_bytes(),
            memory_bytes_max: index.config().bytes_max,
            disk_bytes: self.counters.disk_bytes.load(Ordering::Relaxed),
            batches_dropped: self.counters.batches_dropped.load(Ordering::Relaxed),
            records_dropped: self.counters.records_dropped.load(Ordering::Relaxed),
            disk_errors: self.counters.disk_errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
impl Tracer {
    /// Stops the thread once it has written everything submitted (the
    /// last handle: no other clone may submit meanwhile).
    fn stop(self) {
        let Tracer {
            sender,
            thread,
            waker,
            ..
        } = self;
        drop(sender);
        // It may be sleeping between rounds.
        waker.unpark();
        let handle = thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

fn humanize_ms(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// The trace log: small segments (an eighth of the size cap) so removing
/// the oldest frees space in small steps; no fsync (traces are for
/// looking, and a kill -9 loses nothing the OS was handed).
fn open_log(dir: &std::path::Path, bytes_max: u64) -> Result<Log, LogError> {
    let mut config = LogConfig::new(dir);
    config.fsync = FsyncPolicy::Never;
    config.segment_bytes_max = (bytes_max / 8).clamp(
        courier_log::SEGMENT_BYTES_MIN.max(64 * 1024),
        courier_log::SEGMENT_BYTES_MAX_DEFAULT,
    );
    config.record_bytes_max = RECORD_BYTES_MAX;
    let (log, damage) = Log::open(config)?;
    for d in damage {
        warn!(damage = %d, "the trace log was damaged; the traces around it are incomplete");
    }
    Ok(log)
}

/// Reads the log's records within the retention into `index`; returns
/// how many it read. Damage is skipped (and said), never fatal.
fn reload(log: &mut Log, index: &mut TraceIndex, now: Nanos) -> u64 {
    let retention = index.config().retention_ns;
    let _ = trim(log, retention, index.config().bytes_max as u64, now);
    let mut from = log
        .seq_at_time(now.saturating_sub(retention))
        .unwrap_or_else(|_| log.first_seq());
    let mut loaded = 0;
    loop {
        let result = log.scan(from, &mut |record| {
            match index.load(&record.body, now) {
                Ok(()) => loaded += 1,
                Err(e) => {
                    warn!(seq = record.seq, error = %e, "a trace record does not decode; skipped")
                }
            }
            ControlFlow::Continue(())
        });
        match result {
            Ok(()) => break,
            Err(LogError::Corrupt { resume_seq, .. }) if resume_seq > from => {
                warn!(resume_seq, "damage in the trace log; reading on after it");
                from = resume_seq;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the trace log further; traces before the failure are kept");
                break;
            }
        }
    }
    index.evict(now);
    loaded
}

/// Removes whole sealed segments older than the retention, then the
/// oldest while the log is over `bytes_max`; returns the bytes left.
fn trim(log: &mut Log, retention_ns: Nanos, bytes_max: u64, now: Nanos) -> Result<u64, LogError> {
    let segments = log.segments();
    let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
    let cutoff = now.saturating_sub(retention_ns);
    let mut remove_before = None;
    for s in segments.iter().filter(|s| s.sealed) {
        let old = s.last_timestamp < cutoff;
        if !old && total <= bytes_max {
            break;
        }
        total -= s.bytes;
        remove_before = Some(s.last_seq + 1);
    }
    if let Some(seq) = remove_before {
        log.remove_segments_before(seq)?;
    }
    Ok(total)
}

/// The trace thread.
struct Worker {
    receiver: Receiver<Batch>,
    index: Arc<Mutex<TraceIndex>>,
    queued_bytes: Arc<AtomicUsize>,
    queued_batches: Arc<AtomicUsize>,
    /// How long it sleeps after a round ([`COALESCE_INTERVAL`]).
    coalesce: Duration,
    counters: Arc<Counters>,
    progress: Arc<Progress>,
    disk: Option<Log>,
    written: Written,
    /// When the log was last trimmed (unix ns).
    trimmed_at: Nanos,
    retention_ns: Nanos,
    bytes_max: u64,
}

/// The trace thread's nice value: above the broker's threads, so on a
/// small machine its rounds wait for a core the hot path leaves free
/// instead of taking one from a request in flight (measured: without it,
/// W4a's p99 was 0.5× of the unobserved broker's).
const TRACE_THREAD_NICE: i32 = 10;

impl Worker {
    fn run(mut self) {
        // Linux keeps nice values per thread: this lowers only this one.
        #[cfg(target_os = "linux")]
        if let Err(e) = rustix::process::setpriority_process(None, TRACE_THREAD_NICE) {
            warn!(error = %e, "cannot lower the trace thread's priority; it competes with the broker's threads");
        }
        loop {
            let first = match self.receiver.recv_timeout(HOUSEKEEPING_INTERVAL) {
                Ok(batch) => Some(batch),
                Err(RecvTimeoutError::Timeout) => None,
                // The server is gone.
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batches: Vec<Batch> = first.into_iter().collect();
            while batches.len() < BATCHES_PER_ROUND_MAX {
                match self.receiver.try_recv() {
                    Ok(batch) => batches.push(batch),
                    Err(_) => break,
                }
            }
            let now = crate::wall_nanos();
            {
                let shared = self.index.clone();
                let mut index = lock(&shared);
                for batch in &batches {
                    for record in &batch.records {
                        index.apply(record, &mut self.written);
                    }
                }
                index.evict(now);
                // Written before the lock is let go: whatever a query can
                // see is in the log (handed to the OS), so a kill -9 right
                // after loses none of it.
                self.write(now);
            }
            let pinned: usize = batches.iter().map(|b| b.bytes).sum();
            let taken = batches.len() as u64;
            // The messages are let go outside the index's lock.
            drop(batches);
            self.queued_bytes.fetch_sub(pinned, Ordering::Relaxed);
            self.queued_batches
                .fetch_sub(taken as usize, Ordering::Relaxed);
            {
                let mut applied = self
                    .progress
                    .applied
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                *applied += taken;
            }
            self.progress.applied_changed.notify_all();
            if taken > 0
                && self.queued_bytes.load(Ordering::Relaxed) < TRACE_QUEUE_WAKE_BYTES
                && self.queued_batches.load(Ordering::Relaxed) < TRACE_QUEUE_WAKE_BATCHES
            {
                // Let the next batches gather; a query waiting for them
                // unparks the thread early.
                std::thread::park_timeout(self.coalesce);
            }
        }
    }

    /// Appends this round's records to the log and hands them to the OS;
    /// trims the log about once a second. A failing disk leaves traces in
    /// memory only, said once.
    fn write(&mut self, now: Nanos) {
        let Some(log) = self.disk.as_mut() else {
            self.written.clear();
            return;
        };
        let mut result = Ok(());
        for (at, accepted, range) in &self.written.records {
            let kind = if *accepted {
                RecordKind::Message
            } else {
                RecordKind::State
            };
            if let Err(e) = log.append(kind, *at, &self.written.bytes[range.clone()]) {
                result = Err(e);
                break;
            }
        }
        self.written.clear();
        let result = result.and_then(|()| log.sync()).and_then(|()| {
            if now >= self.trimmed_at + HOUSEKEEPING_INTERVAL.as_nanos() as u64 {
                self.trimmed_at = now;
                let left = trim(log, self.retention_ns, self.bytes_max, now)?;
                self.counters.disk_bytes.store(left, Ordering::Relaxed);
            }
            Ok(())
        });
        if let Err(e) = result {
            warn!(error = %e, "the trace log failed; activity traces are kept in memory only from now on");
            self.counters.disk_errors.fetch_add(1, Ordering::Relaxed);
            self.disk = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_broker::{ActivityFilter, Outcome};
    use courier_proto::{Kind, Message, SharedStr};

    fn settings(dir: &std::path::Path) -> TraceSettings {
        TraceSettings {
            dir: Some(dir.to_path_buf()),
            ..TraceSettings::default()
        }
    }

    fn records(at: Nanos) -> (Uuid, Vec<TraceRecord>) {
        let mut m = Message::new(Kind::Command, "job.run", "{}");
        m.timestamp = at;
        m.sender = "cron".into();
        let m = Arc::new(m);
        let records = vec![
            TraceRecord::Accepted {
                message: m.clone(),
                seq: 5,
                receivers: Arc::from(["worker".to_string()]),
            },
            TraceRecord::Delivered {
                message: m.clone(),
                seq: 5,
                service: SharedStr::from("worker"),
                instance: SharedStr::from("worker-1"),
                attempt: 1,
                at: at + 1_000,
            },
            TraceRecord::Settled {
                seq: 5,
                service: SharedStr::from("worker"),
                outcome: Outcome::Acked,
                at: at + 2_000,
            },
        ];
        (m.activity_id, records)
    }

    #[test]
    fn traces_on_disk_are_read_back_within_the_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::wall_nanos();
        let tracer = Tracer::start(&settings(dir.path()), now).expect("starts");
        let (fresh, batch) = records(now);
        tracer.submit(batch, 0);
        let (stale, batch) = records(now - 2 * 3_600_000_000_000);
        tracer.submit(batch, 0);
        tracer.stop();

        let again = Tracer::start(&settings(dir.path()), now + 1).expect("starts again");
        let tree = again.tree(&fresh).expect("read back");
        assert_eq!(tree["roots"][0]["deliveries"][0]["outcome"], "acked");
        assert_eq!(tree["roots"][0]["deliveries"][0]["instance"], "worker-1");
        assert!(again.tree(&stale).is_none(), "older than the retention");
        let listing = again.find(&ActivityFilter {
            name: Some("job.*".into()),
            outcome: None,
            since: None,
            limit: 10,
        });
        assert_eq!(listing["activities"].as_array().map(Vec::len), Some(1));
        // An ack after the restart still finds its message by seq.
        again.submit(
            vec![TraceRecord::Settled {
                seq: 5,
                service: SharedStr::from("audit"),
                outcome: Outcome::Expired,
                at: now + 5,
            }],
            0,
        );
        again.stop_and_check(&fresh);
    }

    impl Tracer {
        fn stop_and_check(self, activity: &Uuid) {
            let index = self.index.clone();
            self.stop();
            let tree = lock(&index).tree(activity).expect("still there");
            assert_eq!(tree["roots"][0]["deliveries"][1]["outcome"], "expired");
        }
    }

    /// Waits (at most 10 s) until fewer than `limit` batches wait.
    fn drains_below(tracer: &Tracer, limit: usize) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if tracer.queued_batches.load(Ordering::Relaxed) < limit {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn many_waiting_batches_wake_the_thread_from_its_sleep() {
        let sleeps_an_hour = Duration::from_secs(3600);
        let tracer = Tracer::start_coalescing(&TraceSettings::default(), 0, sleeps_an_hour, false)
            .expect("starts");
        let now = crate::wall_nanos();
        // The first round is taken at once; then the thread sleeps.
        tracer.submit(records(now).1, 1);
        assert!(drains_below(&tracer, 1));
        // Up to the mark (topped up should the thread wake early and take
        // some: a park may return spuriously); reaching it wakes the thread.
        let mut submitted = 0;
        while tracer.queued_batches.load(Ordering::Relaxed) < TRACE_QUEUE_WAKE_BATCHES
            && submitted < 4 * TRACE_QUEUE_WAKE_BATCHES
        {
            tracer.submit(records(now).1, 1);
            submitted += 1;
        }
        // Taken without a query and long before the hour is up (batches
        // that come in during that round may wait for the next one).
        assert!(
            drains_below(&tracer, TRACE_QUEUE_WAKE_BATCHES),
            "{} batches still wait",
            tracer.queued_batches.load(Ordering::Relaxed)
        );
        // Not stopped: joining would wait for a thread that may sleep the hour.
    }

    #[test]
    fn a_full_queue_drops_whole_batches_and_counts_them() {
        let tracer = Tracer::start(&TraceSettings::default(), crate::wall_nanos()).expect("starts");
        let (_, batch) = records(crate::wall_nanos());
        let count = batch.len() as u64;
        tracer.submit(batch, TRACE_QUEUE_BYTES_MAX + 1);
        let gauges = tracer.gauges();
        assert_eq!((gauges.batches_dropped, gauges.records_dropped), (1, count));
        assert_eq!(tracer.queued_bytes.load(Ordering::Relaxed), 0);
        tracer.stop();
    }
}
