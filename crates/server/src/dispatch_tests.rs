//! A pass of the core encodes its frames without the core's lock
//! (`Shared::run_core`): the next pass can change the state meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_proto::FRAME_BYTES_MAX_DEFAULT;

use crate::{Outbox, Server, ServerConfig, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_encoded_without_the_cores_lock() {
    let config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        trace: None,
        ..ServerConfig::default()
    };
    let store: Store = Box::new(courier_store::MemoryStore::new());
    let server = Server::bind(config, store).await.expect("binds");
    let shared = Arc::clone(&server.shared);
    let conn = 7;
    let outbox = Outbox::new(Arc::clone(&shared.timer_wake), 0, FRAME_BYTES_MAX_DEFAULT);
    shared.outboxes().insert(conn, Arc::clone(&outbox));
    shared.with_core(|core, _| core.connect(conn, "svc", "svc-1", 0));
    // The connection's writer has its outbox: a pass encoding for it waits.
    let writer_holds = outbox.lock();
    let pass = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || shared.with_core(|core, _| core.drain(conn)))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.dispatching.try_lock().is_ok() {
        assert!(Instant::now() < deadline, "the pass never began encoding");
        std::thread::yield_now();
    }
    // It lets go of the core's lock right after taking the dispatch lock.
    while shared.core.try_lock().is_err() {
        assert!(
            Instant::now() < deadline,
            "the core's lock is held while a pass encodes"
        );
        std::thread::yield_now();
    }
    drop(writer_holds);
    pass.join().expect("the pass ends");
    assert!(!outbox.lock().writer.is_empty(), "its DRAINED was encoded");
}
