//! Checkpoints, which keep recovery short: the snapshot of the broker's
//! state (its format, written and read back) and the steps that save it
//! and let the store drop what it no longer needs.

use bytes::Bytes;
use courier_store::{MessageStore, RemovalJob, Seq, SnapshotJob, StoreError};

use uuid::Uuid;

use crate::dedup::fingerprint;
use crate::journal::{JournalError, Reader, Writer};
use crate::queue::{DeadLetter, Entry};
use crate::{Broker, Nanos, ReplyRoute, Service};

const SNAPSHOT_MAGIC: &[u8; 4] = b"CRSN";
/// 6: each service's backlog bytes (payload bytes of its waiting
/// messages) after its dead letters; older snapshots are counted from
/// the messages once, at recovery.
/// 5: the service registry follows the reply routes, as a section tagged
/// `RGST` (its instances and their visible health; `registry.rs`).
/// 4: each service's paused patterns after its patterns. 3: queue entries
/// in runs of consecutive seqs (a count after each), and the dedup
/// window's ids in buckets by timestamp after those without one. Versions
/// 4, 3, 2 (fingerprints with their times only) and 1 (whole ids) still
/// load.
const SNAPSHOT_VERSION: u32 = 6;
const REGISTRY_SECTION: &[u8; 4] = b"RGST";

impl<S: MessageStore> Broker<S> {
    /// Saves a snapshot of the state, then lets the store drop records that
    /// neither the snapshot nor any live message needs. Returns bytes freed.
    /// All in place; the network edge runs the same steps with the disk
    /// work outside its lock: [`Broker::begin_checkpoint`],
    /// [`SnapshotJob::write`], [`Broker::checkpoint_ready`],
    /// [`SnapshotJob::install`], [`Broker::finish_checkpoint`],
    /// [`RemovalJob::run`].
    pub fn checkpoint(&mut self, now: Nanos) -> Result<u64, StoreError> {
        if !self.store.persistent()
            || self.upstream
            || self.store.next_seq() == self.checkpointed_at
        {
            return Ok(0);
        }
        while self.backfills_pending() {
            self.continue_backfills(now);
        }
        self.store.sync()?;
        self.dirty = false;
        let Some(mut snapshot) = self.begin_checkpoint(now)? else {
            return Ok(0);
        };
        snapshot.write()?;
        self.checkpoint_ready(&snapshot)?;
        let covers = snapshot.covers();
        snapshot.install()?;
        self.finish_checkpoint(covers, now)?.run()
    }

    /// A checkpoint's first step, under whatever guards the broker: the
    /// state as of the last record appended, encoded. `None` if nothing
    /// was appended since the last checkpoint (or nothing survives a
    /// restart), or while a history replay is unfinished (its progress is
    /// in no snapshot). Write the job without the broker, then
    /// [`Broker::checkpoint_ready`]. One checkpoint at a time.
    pub fn begin_checkpoint(&mut self, now: Nanos) -> Result<Option<SnapshotJob>, StoreError> {
        self.now = now;
        if !self.store.persistent()
            || self.upstream
            || self.store.next_seq() == self.checkpointed_at
            || self.backfills_pending()
        {
            return Ok(None);
        }
        let covers = self.store.next_seq().saturating_sub(1);
        let state = self.snapshot_bytes().freeze();
        self.store.start_snapshot(covers, state).map(Some)
    }

    /// Whether a written snapshot may be installed: the records it covers
    /// are durable (usually the group commit made them so meanwhile; if
    /// not, they are fsynced here), and none was thrown away since it
    /// began. On error, drop the job: the snapshot in place stays.
    pub fn checkpoint_ready(&mut self, snapshot: &SnapshotJob) -> Result<(), StoreError> {
        self.store.snapshot_ready(snapshot)
    }

    /// A checkpoint's last step, once its snapshot covering `covers` is in
    /// place: the store lets go of the records nothing needs any more, and
    /// the job it returns deletes their files, to run without the broker.
    pub fn finish_checkpoint(&mut self, covers: Seq, now: Nanos) -> Result<RemovalJob, StoreError> {
        self.now = now;
        self.checkpointed_at = self.checkpointed_at.max(covers + 1);
        let oldest_live = self.refs.oldest().unwrap_or(covers + 1);
        let before = oldest_live.min(covers + 1);
        let retention = self.config.longest_retention();
        let mut removal = self
            .store
            .start_compact(before, self.wall(now).saturating_sub(retention))?;
        let cap = self.config.retention_bytes_max;
        if cap > 0 && self.store.len() as u64 > cap {
            // Over the size cap: give up retained history (never messages
            // still owed to a service, nor records the snapshot needs).
            removal.then(self.store.start_compact(before, u64::MAX)?);
        }
        self.checkpointed_bytes = self.store.len() as u64;
        Ok(removal)
    }

    /// Whether the log grew enough since the last checkpoint that recovery
    /// would replay more than `checkpoint_log_bytes`: then a checkpoint is
    /// due now, not only on the timer.
    pub fn checkpoint_due(&self) -> bool {
        self.store.persistent()
            && !self.upstream
            && (self.store.len() as u64).saturating_sub(self.checkpointed_bytes)
                >= self.config.checkpoint_log_bytes
    }

    fn snapshot_bytes(&self) -> bytes::BytesMut {
        let mut w = Writer::new();
        // Sized up front so the buffer is not copied as it grows: about 40
        // bytes a run of waiting messages (a backlog of consecutive seqs is
        // one), at most 16 a dedup id.
        let runs: usize = self.services.values().map(|s| s.queue.runs().count()).sum();
        w.0.reserve(4096 + runs * 40 + self.dedup.len() * 16);
        w.0.extend_from_slice(SNAPSHOT_MAGIC);
        w.u32(SNAPSHOT_VERSION);
        // Services with nothing durable (senders only) are not saved.
        let mut names: Vec<&String> = self
            .services
            .iter()
            .filter(|(_, s)| !s.patterns.is_empty() || !s.queue.dead_letters.is_empty())
            .map(|(n, _)| n)
            .collect();
        names.sort();
        w.u32(names.len() as u32);
        for name in names {
            let svc = &self.services[name];
            w.str(name);
            w.u32(svc.ack_deadline_ms);
            w.u32(svc.max_deliveries);
            w.u32(svc.patterns.len() as u32);
            for p in &svc.patterns {
                w.str(p);
            }
            w.u32(svc.paused.len() as u32);
            for p in &svc.paused {
                w.str(p);
            }
            // Counted, then written straight from the queue: collecting a
            // large backlog first would double the snapshot's memory. Runs
            // of consecutive seqs are one record each.
            w.u32(svc.queue.runs().count() as u32);
            for (e, count, until) in svc.queue.runs() {
                w.u64(e.seq);
                w.u32(e.attempts);
                match e.key() {
                    Some(k) => {
                        w.u8(1);
                        w.bytes(k);
                    }
                    None => w.u8(0),
                }
                w.u64(until.unwrap_or(0));
                w.u32(count);
            }
            w.u32(svc.queue.dead_letters.len() as u32);
            for d in &svc.queue.dead_letters {
                w.u64(d.seq);
                w.u32(d.attempts);
                w.str(&d.reason);
                w.u64(d.at);
            }
            w.u64(svc.queue.backlog_bytes());
        }
        // Counted while written, then the count is patched in: collecting
        // a million ids first cost tens of MiB that the allocator kept.
        let count_at = w.0.len();
        w.u32(0);
        let mut count: u32 = 0;
        for (fp, t) in self.dedup.others() {
            w.u64(fp);
            w.u64(t);
            count += 1;
        }
        w.0[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
        let count_at = w.0.len();
        w.u32(0);
        let mut buckets: u32 = 0;
        for (start_ms, fps) in self.dedup.buckets() {
            w.u64(start_ms);
            let len_at = w.0.len();
            w.u32(0);
            let mut len: u32 = 0;
            for fp in fps {
                w.u64(fp);
                len += 1;
            }
            w.0[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            buckets += 1;
        }
        w.0[count_at..count_at + 4].copy_from_slice(&buckets.to_be_bytes());
        let count_at = w.0.len();
        w.u32(0);
        let mut count: u32 = 0;
        for (id, route, t) in self.reply_routes.iter() {
            count += 1;
            w.bytes(id.as_bytes());
            w.str(&route.service);
            w.u64(t);
            w.u32(route.receivers.len() as u32);
            for r in &route.receivers {
                w.str(r);
            }
        }
        w.0[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
        // The service registry, a tagged section of its own at the end.
        w.0.extend_from_slice(REGISTRY_SECTION);
        self.registry.write_snapshot(&mut w);
        w.0
    }

    pub(crate) fn restore_snapshot(&mut self, bytes: Bytes) -> Result<(), JournalError> {
        if bytes.len() < 8 || &bytes[..4] != SNAPSHOT_MAGIC {
            return Err(JournalError::BadSnapshot);
        }
        let mut r = Reader::new(bytes.slice(4..));
        let version = r.u32()?;
        if !(1..=SNAPSHOT_VERSION).contains(&version) {
            return Err(JournalError::BadSnapshot);
        }
        let services = r.u32()?;
        let mut uncounted = Vec::new();
        for _ in 0..services {
            let name = r.str()?;
            let ack_deadline_ms = r.u32()?;
            let max_deliveries = r.u32()?;
            let mut svc = Service::new(&self.config);
            svc.ack_deadline_ms = ack_deadline_ms;
            svc.max_deliveries = max_deliveries;
            for _ in 0..r.u32()? {
                svc.patterns.insert(r.str()?);
            }
            if version >= 4 {
                for _ in 0..r.u32()? {
                    let pattern = r.str()?;
                    if !svc.patterns.contains(&pattern) {
                        return Err(JournalError::BadSnapshot);
                    }
                    svc.paused.insert(pattern);
                }
            }
            let mut runs = Vec::new();
            for _ in 0..r.u32()? {
                let seq = r.u64()?;
                let attempts = r.u32()?;
                let key = if r.u8()? == 1 { Some(r.bytes()?) } else { None };
                let until = r.u64()?;
                let count = if version >= 3 { r.u32()? } else { 1 };
                if count == 0 || (count > 1 && (attempts > 0 || key.is_some() || until > 0)) {
                    return Err(JournalError::BadSnapshot);
                }
                runs.push((Entry::new(seq, attempts, key), count, until));
            }
            runs.sort_by_key(|(e, _, _)| e.seq);
            for (entry, count, until) in runs {
                for seq in entry.seq..entry.seq.saturating_add(u64::from(count)) {
                    self.refs.add(seq);
                }
                if count > 1 {
                    svc.queue.ready.push_back_run(entry.seq, count);
                } else if until > 0 {
                    svc.queue.defer_again(until, entry);
                } else {
                    svc.queue.make_ready(entry);
                }
            }
            for _ in 0..r.u32()? {
                let letter = DeadLetter {
                    seq: r.u64()?,
                    attempts: r.u32()?,
                    reason: r.str()?,
                    at: r.u64()?,
                };
                self.refs.add(letter.seq);
                svc.queue.dead_letters.push(letter);
            }
            if version >= 6 {
                svc.queue.bytes = r.u64()?;
            } else {
                uncounted.push(name.clone());
            }
            for pattern in &svc.patterns {
                self.subscribers.insert(pattern, &name);
            }
            if let Some(replaced) = self.services.insert(name.clone(), svc) {
                for pattern in &replaced.patterns {
                    self.subscribers.remove(pattern, &name);
                }
            }
            self.routes_changed();
        }
        let ids = r.u32()?;
        self.dedup.reserve_others(ids as usize);
        for _ in 0..ids {
            let id = if version == 1 {
                fingerprint(&Uuid::from_bytes(r.id()?))
            } else {
                r.u64()?
            };
            let t = r.u64()?;
            self.dedup.restore_other(id, t);
        }
        if version >= 3 {
            for _ in 0..r.u32()? {
                let start_ms = r.u64()?;
                let len = r.u32()?;
                let mut fps = Vec::with_capacity(len.min(1 << 20) as usize);
                for _ in 0..len {
                    fps.push(r.u64()?);
                }
                self.dedup.restore_bucket(start_ms, fps);
            }
        }
        for _ in 0..r.u32()? {
            let id = Uuid::from_bytes(r.id()?);
            let service = r.str()?;
            let t = r.u64()?;
            let mut receivers = Vec::new();
            for _ in 0..r.u32()? {
                receivers.push(r.str()?);
            }
            let route = ReplyRoute {
                service,
                conn: 0,
                receivers,
                stream: None,
                command: crate::stats::Slot::MAX,
                accepted_at: 0,
            };
            self.reply_routes.insert(id, route, t);
        }
        if version >= 5 {
            if r.magic()? != *REGISTRY_SECTION {
                return Err(JournalError::BadSnapshot);
            }
            let now = self.now;
            self.registry.read_snapshot(&mut r, now)?;
        }
        if !r.is_empty() {
            return Err(JournalError::BadSnapshot);
        }
        for name in uncounted {
            self.recount_backlog_bytes(&name);
        }
        Ok(())
    }
}
