//! The group-commit thread: fsyncs the log outside the broker's lock.
//!
//! Connections end their batches with [`Broker::take_ready_actions`]
//! (`Shared::with_core_deferred`): what must wait for the disk is held in
//! the core, and this thread is woken. It writes what was appended to the
//! OS under the lock ([`Broker::start_sync`]), runs the fdatasync without
//! it (first the seal of a segment the log rolled away from, if one
//! waits: its fdatasync, index file and directory fsync), and takes the
//! lock again to release what became durable
//! ([`Broker::finish_sync`]). Batches of every connection that arrive
//! during an fsync share the next one; transient traffic and routing never
//! wait for it.
//!
//! When the last fsync covered the batches of several connections, the
//! thread gathers before the next: it waits until as many connections
//! have a batch waiting again, at most as long as that fsync took
//! (capped at [`GATHER_MAX`]). Connections that each send one durable
//! message at a time are answered together by one fsync, come back at
//! about the same moment, and without the wait the first of them would
//! start an fsync that covers it alone (PostgreSQL's `commit_delay` and
//! `commit_siblings` do the same, fixed; here they follow the load). One
//! connection alone never waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use courier_broker::{ConnId, FastMap};

use tracing::warn;

use crate::Shared;

/// The longest the thread waits for connections to come back before an
/// fsync.
const GATHER_MAX: Duration = Duration::from_millis(1);

/// What woke the thread since it last started an fsync.
#[derive(Debug, Default)]
struct Wanted {
    woken: bool,
    /// Connections with a batch waiting for the disk (the value is unused).
    conns: FastMap<ConnId, ()>,
}

/// How the thread is woken.
#[derive(Debug, Default)]
pub(crate) struct Committer {
    wanted: Mutex<Wanted>,
    wake: Condvar,
    /// The thread runs; until then (or if it could not start) every batch
    /// syncs in place.
    running: AtomicBool,
}

impl Committer {
    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    fn wanted(&self) -> std::sync::MutexGuard<'_, Wanted> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something waits for the disk: a batch of `conn`'s, or of the broker's
    /// own (`None`: timers).
    pub(crate) fn wake(&self, conn: Option<ConnId>) {
        let mut wanted = self.wanted();
        wanted.woken = true;
        if let Some(conn) = conn {
            wanted.conns.insert(conn, ());
        }
        drop(wanted);
        self.wake.notify_one();
    }

    /// Waits until woken or `timeout` passed; returns whether woken.
    fn wait(&self, timeout: Duration) -> bool {
        let mut wanted = self.wanted();
        if !wanted.woken {
            wanted = self
                .wake
                .wait_timeout(wanted, timeout)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        std::mem::take(&mut wanted.woken)
    }

    /// Waits until `conns` connections have a batch waiting, or `until`.
    fn gather(&self, conns: usize, until: Instant) {
        let mut wanted = self.wanted();
        while wanted.conns.len() < conns {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                return;
            };
            wanted = self
                .wake
                .wait_timeout(wanted, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The connections waiting, counted and forgotten: the next fsync is
    /// theirs.
    fn take_round(&self) -> usize {
        let mut wanted = self.wanted();
        let conns = wanted.conns.len();
        wanted.conns.clear();
        conns
    }
}

/// Starts the thread; it ends when the server is gone. A cluster backend
/// needs none: its syncs wait on the network (`backend_sync.rs`).
pub(crate) fn start(shared: &Arc<Shared>) {
    if shared.cluster.is_some() {
        shared.backend_syncs.attach(shared);
        return;
    }
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
    // The connections the last fsync covered, and how long it took.
    let mut last_round = (0, Duration::ZERO);
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
        let (conns, took) = last_round;
        if conns > 1 {
            committer.gather(conns, Instant::now() + took.min(GATHER_MAX));
        }
        let conns = committer.take_round();
        let mut job = None;
        shared.with_core_committing(|core, _now| job = core.start_sync());
        if let Some(mut job) = job {
            let started = Instant::now();
            let result = job.run();
            shared.with_core_committing(|core, _now| core.finish_sync(job, result));
            last_round = (conns, started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gather_ends_when_enough_connections_wait_or_at_its_deadline() {
        let committer = Arc::new(Committer::default());
        let waker = Arc::clone(&committer);
        let sends = std::thread::spawn(move || {
            for conn in 1..=3 {
                std::thread::sleep(Duration::from_millis(5));
                waker.wake(Some(conn));
                // A connection's second batch is still one connection.
                waker.wake(Some(conn));
            }
        });
        let far = Instant::now() + Duration::from_secs(60);
        committer.gather(3, far);
        assert!(Instant::now() < far);
        // The third connection's second batch may come after the gather
        // ended: let it, so this round counts it and the next does not.
        sends.join().expect("the sending thread");
        assert_eq!(committer.take_round(), 3);
        // The timers' batches count no connection: a gather for two waits
        // out its deadline.
        committer.wake(None);
        let started = Instant::now();
        committer.gather(2, started + Duration::from_millis(20));
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(committer.take_round(), 0);
        assert!(committer.wait(Duration::ZERO), "the wake is kept");
    }
}
