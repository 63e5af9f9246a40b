//! A replicated backend's syncs (`backend_sync.rs`), on a store whose
//! syncs are waits the test answers itself: one runs at a time, an
//! acknowledgement waits for its sync, and a sync the backend never
//! answers fails at its limit.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use courier_proto::{
    decode_frame, ErrorCode, Frame, Kind, Message, SendOutcome, FRAME_BYTES_MAX_DEFAULT,
};
use courier_store::{MemoryStore, MessageStore, Replayed, Seq, StoreError, SyncDone, SyncJob};

use crate::{Outbox, Server, ServerConfig, Store};

/// The callbacks of the syncs started, in order, for the test to call.
type Started = Arc<Mutex<Vec<SyncDone>>>;

/// A [`MemoryStore`] that calls itself persistent and whose syncs wait
/// for the test, as a cluster backend's wait for its acknowledgements.
struct AcknowledgedStore {
    inner: MemoryStore,
    started: Started,
    limit: Duration,
    unsynced: bool,
    discards: u64,
}

impl MessageStore for AcknowledgedStore {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        self.unsynced = true;
        self.inner.append(message)
    }
    fn journal(&mut self, entry: &[u8]) -> Result<Seq, StoreError> {
        self.unsynced = true;
        self.inner.journal(entry)
    }
    fn get(&mut self, seq: Seq) -> Result<Option<Arc<Message>>, StoreError> {
        self.inner.get(seq)
    }
    fn remove(&mut self, seq: Seq) {
        self.inner.remove(seq)
    }
    /// The broker's look whether a failed store works again (on its
    /// tick): it does.
    fn sync(&mut self) -> Result<(), StoreError> {
        self.unsynced = false;
        Ok(())
    }
    fn start_sync(&mut self) -> Result<Option<SyncJob>, StoreError> {
        if !std::mem::take(&mut self.unsynced) {
            return Ok(None);
        }
        let started = Arc::clone(&self.started);
        Ok(Some(SyncJob::acknowledged(
            self.inner.next_seq(),
            self.limit,
            move |done| started.lock().expect("started").push(done),
        )))
    }
    fn finish_sync(&mut self, _job: SyncJob, result: io::Result<()>) -> Result<(), StoreError> {
        result.map_err(|e| {
            // As the cluster's store: writes not acknowledged are lost.
            self.discards += 1;
            StoreError::Io(e.to_string())
        })
    }
    fn discards(&self) -> u64 {
        self.discards
    }
    fn persistent(&self) -> bool {
        true
    }
    fn replay_chunk(&mut self, after: Seq, max: usize) -> Result<Vec<(Seq, Replayed)>, StoreError> {
        self.inner.replay_chunk(after, max)
    }
    fn save_snapshot(&mut self, covers: Seq, state: &[u8]) -> Result<(), StoreError> {
        self.inner.save_snapshot(covers, state)
    }
    fn load_snapshot(&mut self) -> Result<Option<(Seq, Bytes)>, StoreError> {
        self.inner.load_snapshot()
    }
    fn scan_messages(
        &mut self,
        from: Seq,
        f: &mut dyn FnMut(Seq, Arc<Message>),
    ) -> Result<(), StoreError> {
        self.inner.scan_messages(from, f)
    }
    fn seq_at_time(&mut self, timestamp: u64) -> Result<Seq, StoreError> {
        self.inner.seq_at_time(timestamp)
    }
    fn next_seq(&self) -> Seq {
        self.inner.next_seq()
    }
    fn compact(&mut self, before: Seq, older_than: u64) -> Result<u64, StoreError> {
        self.inner.compact(before, older_than)
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn lost_records(&self) -> Vec<Range<Seq>> {
        Vec::new()
    }
}

fn event() -> Message {
    Message::new(Kind::Event, "thing.happened", Bytes::from_static(b"{}"))
}

struct Harness {
    shared: Arc<crate::Shared>,
    started: Started,
    outbox: Arc<Outbox>,
}

const CONN: u64 = 7;

impl Harness {
    async fn new(limit: Duration) -> Harness {
        let config = ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            trace: None,
            ..ServerConfig::default()
        };
        let started = Started::default();
        let store: Store = Box::new(AcknowledgedStore {
            inner: MemoryStore::new(),
            started: Arc::clone(&started),
            limit,
            unsynced: false,
            discards: 0,
        });
        let server = Server::bind(config, store).await.expect("binds");
        let shared = Arc::clone(&server.shared);
        shared.backend_syncs.attach(&shared);
        let outbox = Outbox::new(Arc::clone(&shared.timer_wake), 0, FRAME_BYTES_MAX_DEFAULT);
        shared.outboxes().insert(CONN, Arc::clone(&outbox));
        shared.with_core(|core, _| core.connect(CONN, "svc", "svc-1", 0));
        Harness {
            shared,
            started,
            outbox,
        }
    }

    /// A durable event sent as the connection's send `seq`.
    fn send(&self, seq: u64) {
        self.send_message(seq, event());
    }

    fn send_message(&self, seq: u64, message: Message) {
        self.shared
            .with_core_deferred_for(CONN, |core, now| core.send(CONN, seq, message, now));
    }

    fn syncs_started(&self) -> usize {
        self.started.lock().expect("started").len()
    }

    /// Calls the callback of the `index`th sync started.
    fn answer(&self, index: usize, result: io::Result<()>) {
        let done = {
            let mut started = self.started.lock().expect("started");
            let placeholder: SyncDone = Box::new(|_| {});
            std::mem::replace(&mut started[index], placeholder)
        };
        done(result);
    }

    /// The send outcomes the connection was told so far.
    fn outcomes(&self) -> Vec<SendOutcome> {
        let mut bytes = self.outbox.lock().writer.take();
        let mut outcomes = Vec::new();
        while let Some(frame) = decode_frame(&mut bytes, FRAME_BYTES_MAX_DEFAULT).expect("decodes")
        {
            if let Frame::SendResult(results) = frame {
                outcomes.extend(results);
            }
        }
        outcomes
    }

    /// Waits (a task may start the next sync) until `count` syncs started.
    async fn until_started(&self, count: usize) {
        for _ in 0..500 {
            if self.syncs_started() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("{} syncs started, not {count}", self.syncs_started());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sync_runs_at_a_time_and_acknowledgements_wait_for_theirs() {
    let h = Harness::new(Duration::from_secs(60)).await;
    h.send(1);
    assert_eq!(h.syncs_started(), 1, "the send's pass starts a sync");
    assert!(
        h.outcomes().is_empty(),
        "acknowledged before its sync finished"
    );

    // Sends while it runs wait for the next sync, which waits for it.
    h.send(2);
    h.send(3);
    assert_eq!(
        h.syncs_started(),
        1,
        "a second sync started beside the first"
    );

    h.answer(0, Ok(()));
    let first: Vec<_> = h.outcomes().iter().map(|o| (o.seq, o.code)).collect();
    assert_eq!(
        first,
        vec![(1, ErrorCode::Ok)],
        "only the first sync's send is acknowledged"
    );
    h.until_started(2).await;
    assert!(
        h.outcomes().is_empty(),
        "the second sync's sends left before it finished"
    );

    h.answer(1, Ok(()));
    let second: Vec<_> = h.outcomes().iter().map(|o| (o.seq, o.code)).collect();
    assert_eq!(second, vec![(2, ErrorCode::Ok), (3, ErrorCode::Ok)]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        h.syncs_started(),
        2,
        "a sync started with nothing to wait for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_the_backend_never_answers_fails_at_its_limit_and_the_next_one_runs() {
    let h = Harness::new(Duration::ZERO).await;
    h.send(1);
    assert_eq!(h.syncs_started(), 1);
    // The timer's tick gives it up: the send is refused, not left waiting.
    h.shared
        .with_core_deferred(|core, _| h.shared.backend_syncs.give_up_overdue(core));
    let outcomes = h.outcomes();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0].seq, 1);
    assert_ne!(
        outcomes[0].code,
        ErrorCode::Ok,
        "acknowledged without the backend"
    );

    // The backend's late answer finds the sync given up: nothing happens.
    h.answer(0, Ok(()));
    assert!(h.outcomes().is_empty());

    // Once the broker's tick found the store working again, the next
    // send starts a sync of its own at once.
    h.shared.with_core_deferred(|core, now| core.tick(now));
    h.send(2);
    assert_eq!(h.syncs_started(), 2);
    h.answer(1, Ok(()));
    let outcomes: Vec<_> = h.outcomes().iter().map(|o| (o.seq, o.code)).collect();
    assert_eq!(outcomes, vec![(2, ErrorCode::Ok)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_stored_nothing_is_answered_in_its_own_pass() {
    let h = Harness::new(Duration::from_secs(60)).await;
    let first = event();
    h.send_message(1, first.clone());
    h.answer(0, Ok(()));
    assert_eq!(h.outcomes().len(), 1);
    // Sent again: the dedup window answers it, and nothing is stored.
    h.send_message(2, first);
    let again: Vec<_> = h.outcomes().iter().map(|o| o.seq).collect();
    assert_eq!(again, vec![2], "a duplicate waited for a later pass");
    assert_eq!(h.syncs_started(), 1, "a sync started with nothing stored");
}
