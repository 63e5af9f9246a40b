//! A replicated backend's syncs (`--backend nats://…`), which no thread
//! waits on.
//!
//! Such a sync is a wait for the backend's acknowledgements of the writes
//! already sent, not an fsync: there is nothing to run outside the lock,
//! so handing it to the group-commit thread (`group_commit.rs`) only cost
//! two thread wake-ups per batch on the path of every durable send. The
//! pass of the core that finds a sync wanted and none running starts one
//! under the core's lock ([`BackendSyncs::begin`]) and hands the backend
//! its callback once every lock is let go ([`BackendSyncs::start`]); the
//! backend's task that settles the last write calls it, and its pass
//! releases what became durable and starts the next sync if more waits.
//!
//! One runs at a time: each covers every record before it, so they finish
//! in order and the durable mark only moves up over records the backend
//! acknowledged. The timer's tick gives up a sync older than its limit
//! ([`BackendSyncs::give_up_overdue`]), failing the batches it covered as
//! a failed fsync does.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use courier_broker::{Action, Broker};
use courier_store::{BackendWait, SyncJob};

use crate::shared::{Commit, Shared, Store};

/// The sync taken by whoever comes first: the backend's callback, or the
/// tick that gives it up.
type JobSlot = Arc<Mutex<Option<SyncJob>>>;

fn take(slot: &JobSlot) -> Option<SyncJob> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

#[derive(Default)]
pub(crate) struct BackendSyncs {
    /// The sync running, if one is. Changed only under the core's lock.
    running: Mutex<Option<Running>>,
    /// The server, for the callbacks; set once it runs.
    shared: OnceLock<Weak<Shared>>,
}

struct Running {
    job: JobSlot,
    deadline: Instant,
    limit: Duration,
}

/// A sync begun under the core's lock, to start once the locks are let go.
pub(crate) struct Begun {
    job: JobSlot,
    wait: BackendWait,
}

impl BackendSyncs {
    pub(crate) fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }

    /// Whether the server's syncs go through here (a cluster backend's,
    /// once the server runs).
    pub(crate) fn attached(&self) -> bool {
        self.shared.get().is_some()
    }

    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Under the core's lock, after the pass took its actions: begins a
    /// sync if the core wants one and none runs. A store whose sync is not
    /// a backend's wait syncs in place, and what that released joins
    /// `actions`.
    pub(crate) fn begin(
        &self,
        core: &mut Broker<Store>,
        actions: &mut Vec<Action>,
    ) -> Option<Begun> {
        let mut running = self.running();
        if running.is_some() || !core.sync_wanted() {
            return None;
        }
        let Some(mut job) = core.start_sync() else {
            // Nothing was left to wait for (a batch that stored nothing, as
            // one answering a duplicate): what it held is released now.
            core.take_ready_actions(actions);
            return None;
        };
        let Some(wait) = job.take_backend_wait() else {
            let result = job.run();
            core.finish_sync(job, result);
            core.take_ready_actions(actions);
            return None;
        };
        let slot = Arc::new(Mutex::new(Some(job)));
        *running = Some(Running {
            job: Arc::clone(&slot),
            deadline: Instant::now() + wait.limit(),
            limit: wait.limit(),
        });
        Some(Begun { job: slot, wait })
    }

    /// With no lock held: hands the backend the callback that finishes
    /// `begun`. The callback may run at once on this thread; a pass that
    /// finishes a sync (`commit` is [`Commit::Committing`]) starts the
    /// next on a task instead, so that syncs settled already do not nest
    /// one callback in another.
    pub(crate) fn start(&self, begun: Begun, commit: Commit) {
        let Some(shared) = self.shared.get().cloned() else {
            return;
        };
        let Begun { job, wait } = begun;
        let finish = move |result: io::Result<()>| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            // Taken already: the tick gave the sync up.
            let Some(taken) = take(&job) else {
                return;
            };
            shared.run_core(
                |core, _now| {
                    core.finish_sync(taken, result);
                    let mut running = shared.backend_syncs.running();
                    if running.as_ref().is_some_and(|r| Arc::ptr_eq(&r.job, &job)) {
                        *running = None;
                    }
                },
                Commit::Committing,
            );
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if commit == Commit::Committing => {
                runtime.spawn(async move { wait.start(finish) });
            }
            _ => wait.start(finish),
        }
    }

    /// On the timer's tick, under the core's lock: a sync that outlived
    /// its limit fails.
    pub(crate) fn give_up_overdue(&self, core: &mut Broker<Store>) {
        let mut running = self.running();
        let Some(overdue) = running.as_ref().filter(|r| r.deadline <= Instant::now()) else {
            return;
        };
        // Taken already: its callback is about to finish it.
        let Some(job) = take(&overdue.job) else {
            return;
        };
        let gave_up = io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the backend did not acknowledge the sync within {:?}",
                overdue.limit
            ),
        );
        *running = None;
        core.finish_sync(job, Err(gave_up));
    }
}
