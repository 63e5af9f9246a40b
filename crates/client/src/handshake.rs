//! The SDK's two lock-free handshakes between threads. Each is a pair of
//! flags: one side stores its flag and then loads the other's, and so does
//! the other side; a `SeqCst` fence between the store and the load, on both
//! sides, forbids both loads missing the other side's store (the one
//! outcome that would lose a wake-up). Fences rather than `SeqCst` loads
//! and stores because loom, which checks them (`loom_models` below, run by
//! `scripts/test.sh`), models fences fully and `SeqCst` accesses only as
//! acquire/release.

use crate::sync::{fence, AtomicBool, AtomicUsize, Ordering};

/// Callers that queued bytes for the connection's write loop, and the
/// connection's driver, which handles the frames it read before its write
/// loop looks for bytes, in the same poll.
///
/// **Guarantee:** a request is never lost: the caller either wakes the
/// write loop itself ([`WriteWake::request`] says so) or the driver, once
/// done reading, finds it ([`WriteWake::take_request`]).
pub(crate) struct WriteWake {
    /// Set with every write queued; the write loop clears it when it looks.
    requested: AtomicBool,
    /// The driver is handling frames it read. Its write loop is polled
    /// right after that, in the same poll, and looks at `requested`: a
    /// wake now would only make the running task reschedule itself, as a
    /// yield that also wakes an idle worker thread.
    reading: AtomicBool,
}

impl WriteWake {
    pub(crate) fn new() -> WriteWake {
        WriteWake {
            requested: AtomicBool::new(false),
            reading: AtomicBool::new(false),
        }
    }

    /// A caller queued bytes (and released the lock they are under):
    /// `true` if it must wake the write loop, `false` if the driver is
    /// reading and its write loop will see the request.
    pub(crate) fn request(&self) -> bool {
        // Release: the write loop that takes the request sees the bytes.
        self.requested.store(true, Ordering::Release);
        // Pairs with `stop_reading`'s: a caller that still sees `reading`
        // stored its request before the driver stopped reading, so the
        // write loop, which looks after that, takes it.
        fence(Ordering::SeqCst);
        !self.reading.load(Ordering::Relaxed)
    }

    /// The driver starts handling the frames it read.
    pub(crate) fn start_reading(&self) {
        self.reading.store(true, Ordering::Relaxed);
    }

    /// The driver is done handling frames; its write loop looks next.
    pub(crate) fn stop_reading(&self) {
        self.reading.store(false, Ordering::Relaxed);
        // Pairs with `request`'s.
        fence(Ordering::SeqCst);
    }

    /// The write loop: whether bytes were queued since it last looked
    /// (and forgets the request).
    pub(crate) fn take_request(&self) -> bool {
        self.requested.swap(false, Ordering::Acquire)
    }

    /// Whether the driver is handling frames, and so about to write anyway
    /// (a hint for a caller deciding to write itself; nothing waits on it).
    pub(crate) fn is_reading(&self) -> bool {
        self.reading.load(Ordering::Relaxed)
    }
}

/// Handlers running, and `Client::shutdown`, which waits until none is.
/// Only while `shutdown` waits does the last handler out notify it (a
/// notify per delivery showed in profiles).
///
/// **Guarantee:** `shutdown` either sees no handler running
/// ([`HandlersRunning::none_running`]) or the last one out sees it waiting
/// ([`HandlersRunning::finished`] says so) and notifies it.
pub(crate) struct HandlersRunning {
    /// Started and not finished.
    running: AtomicUsize,
    /// `shutdown` waits for the last one out.
    awaited: AtomicBool,
}

impl HandlersRunning {
    pub(crate) fn new() -> HandlersRunning {
        HandlersRunning {
            running: AtomicUsize::new(0),
            awaited: AtomicBool::new(false),
        }
    }

    /// A handler starts (or a delivery is queued for one).
    pub(crate) fn started(&self) {
        self.running.fetch_add(1, Ordering::AcqRel);
    }

    /// A handler finished (or a delivery queued for one was dropped):
    /// `true` if it was the last one running and `shutdown` waits, which
    /// the caller then notifies.
    pub(crate) fn finished(&self) -> bool {
        if self.running.fetch_sub(1, Ordering::AcqRel) != 1 {
            return false;
        }
        // Pairs with `await_last`'s.
        fence(Ordering::SeqCst);
        self.awaited.load(Ordering::Relaxed)
    }

    /// `shutdown` will wait: from now on the last handler out notifies it.
    pub(crate) fn await_last(&self) {
        self.awaited.store(true, Ordering::Relaxed);
        // Pairs with `finished`'s: either the last handler out sees
        // `awaited`, or its decrement comes first and `none_running`
        // (after this) sees it.
        fence(Ordering::SeqCst);
    }

    pub(crate) fn none_running(&self) -> bool {
        self.running.load(Ordering::Acquire) == 0
    }
}

/// Run with `RUSTFLAGS="--cfg courier_loom" cargo test -p courier-client --lib
/// loom_models` (as `scripts/test.sh` does, in a target directory of its
/// own). `tokio::sync::Notify`, which the real code wakes with, is stood in
/// for by a flag or a counter of notifications.
#[cfg(all(test, courier_loom))]
mod loom_models {
    use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    use super::*;

    #[test]
    fn a_queued_write_wakes_the_write_loop_or_is_taken_after_reading() {
        loom::model(|| {
            let wake = Arc::new(WriteWake::new());
            // The state's writer: bytes queued and not yet written.
            let queued = Arc::new(Mutex::new(0usize));
            // `writer_wake`'s permit.
            let woken = Arc::new(AtomicBool::new(false));
            let caller = {
                let (wake, queued, woken) = (wake.clone(), queued.clone(), woken.clone());
                thread::spawn(move || {
                    *queued.lock().unwrap() += 1;
                    if wake.request() {
                        woken.store(true, Ordering::SeqCst);
                    }
                })
            };
            // The driver: a pass of reading frames, then its write loop
            // looks. (Not two passes: loom lets the second look's swap read
            // the first's store rather than the caller's newer one, a read
            // that swap's atomicity rules out, and reports a lost request
            // that cannot happen.)
            wake.start_reading();
            wake.stop_reading();
            let mut written = 0;
            if wake.take_request() {
                written += std::mem::take(&mut *queued.lock().unwrap());
            }
            caller.join().unwrap();
            assert!(
                written == 1 || woken.load(Ordering::SeqCst),
                "the queued write was neither taken by the write loop nor woke it"
            );
        });
    }

    #[test]
    fn shutdown_sees_no_handler_running_or_the_last_one_out_notifies_it() {
        loom::model(|| {
            let handlers = Arc::new(HandlersRunning::new());
            // `handler_done`: `notify_waiters` wakes the waits registered
            // before it, so a count of the calls stands in for it.
            let notified = Arc::new(AtomicUsize::new(0));
            handlers.started();
            handlers.started();
            let running: Vec<_> = (0..2)
                .map(|_| {
                    let (handlers, notified) = (handlers.clone(), notified.clone());
                    thread::spawn(move || {
                        if handlers.finished() {
                            notified.fetch_add(1, Ordering::AcqRel);
                        }
                    })
                })
                .collect();
            // `shutdown`: registers its wait, then looks.
            handlers.await_last();
            let registered = notified.load(Ordering::Acquire);
            let none_running = handlers.none_running();
            for handler in running {
                handler.join().unwrap();
            }
            assert!(
                none_running || notified.load(Ordering::Acquire) > registered,
                "shutdown saw a handler running and the last one out did not notify it"
            );
        });
    }
}
