//! The group-commit thread: fsyncs the log outside the broker's lock.
//!
//! Connections end their batches with [`Broker::take_ready_actions`]
//! (`Shared::with_core_deferred`): what must wait for the disk is held in
//! the core, and this thread is woken. It writes what was appended to the
//! OS under the lock ([`Broker::start_sync`]), runs the fdatasync without
//! it, and takes the lock again to release what became durable
//! ([`Broker::finish_sync`]). Batches of every connection that arrive
//! during an fsync share the next one; transient traffic and routing never
//! wait for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use tracing::warn;

use crate::Shared;

/// How the thread is woken.
#[derive(Debug, Default)]
pub(crate) struct Committer {
    wanted: Mutex<bool>,
    wake: Condvar,
    /// The thread runs; until then (or if it could not start) every batch
    /// syncs in place.
    running: AtomicBool,
}

impl Committer {
    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Something waits for the disk.
    pub(crate) fn wake(&self) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        *wanted = true;
        drop(wanted);
        self.wake.notify_one();
    }

    /// Waits until woken or `timeout` passed; returns whether woken.
    fn wait(&self, timeout: Duration) -> bool {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if !*wanted {
            wanted = self
                .wake
                .wait_timeout(wanted, timeout)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        std::mem::take(&mut *wanted)
    }
}

/// Starts the thread; it ends when the server is gone.
pub(crate) fn start(shared: &Arc<Shared>) {
    let committer = Arc::clone(&shared.committer);
    let weak = Arc::downgrade(shared);
    let spawned = std::thread::Builder::new()
        .name("courier-commit".to_string())
        .spawn(move || run(weak, committer));
    match spawned {
        Ok(_) => shared.committer.running.store(true, Ordering::Release),
        Err(e) => {
            warn!(error = %e, "cannot start the group-commit thread; each batch fsyncs under the broker's lock")
        }
    }
}

fn run(shared: Weak<Shared>, committer: Arc<Committer>) {
    /// How often an idle thread checks that the server still exists.
    const IDLE_CHECK: Duration = Duration::from_millis(200);
    loop {
        if !committer.wait(IDLE_CHECK) {
            if shared.strong_count() == 0 {
                return;
            }
            continue;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut job = None;
        shared.with_core_committing(|core, _now| job = core.start_sync());
        if let Some(mut job) = job {
            let result = job.run();
            shared.with_core_committing(|core, _now| core.finish_sync(job, result));
        }
    }
}
