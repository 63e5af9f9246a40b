//! A connection's outbox (the frames the broker decided for it, not yet
//! written) and the task that writes it, one `write_all` per wake-up.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use courier_proto::{ErrorCode, ErrorFrame, Frame, FrameWriter};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::warn;

/// How long a closing connection may take to write what is left in its
/// outbox (its ERROR frame, say) before it is closed regardless: a peer
/// that stopped reading must not keep the descriptor.
pub(crate) const CLOSE_LINGER_MS: u64 = 5_000;

/// Bytes waiting to be written to one connection.
pub(crate) struct Outbox {
    pub(crate) state: Mutex<OutState>,
    pub(crate) wake: Notify,
    /// The timer task's wake-up: a paused connection whose outbox drained
    /// below `resume_below` is resumed at once, not at the next tick.
    pub(crate) timer_wake: Arc<Notify>,
    pub(crate) resume_below: usize,
    /// Set once the connection is gone (tails writing to it stop).
    pub(crate) gone: std::sync::atomic::AtomicBool,
}

pub(crate) struct OutState {
    pub(crate) writer: FrameWriter,
    /// Set when the connection must close once the outbox is flushed.
    pub(crate) closing: bool,
    /// Bytes the writer task took and has not finished writing: they count
    /// against the connection's limit as much as those still queued.
    pub(crate) writing: usize,
    /// The broker paused deliveries to this connection (outbox too full).
    pub(crate) paused: bool,
}

impl Outbox {
    /// An outbox whose frames keep to `frame_bytes_max`, the limit the
    /// broker announces in WELCOME.
    pub(crate) fn new(
        timer_wake: Arc<Notify>,
        resume_below: usize,
        frame_bytes_max: u32,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutState {
                writer: FrameWriter::with_frame_bytes_max(frame_bytes_max),
                closing: false,
                writing: 0,
                paused: false,
            }),
            wake: Notify::new(),
            timer_wake,
            resume_below,
            gone: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn push(&self, frame: &Frame) {
        let mut state = self.lock();
        if let Err(e) = state.writer.push(frame) {
            warn!(error = %e, "frame could not be encoded; dropped");
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Sends an ERROR frame, then closes the connection.
    pub(crate) fn fail(&self, code: ErrorCode, message: String) {
        let mut state = self.lock();
        let _ = state
            .writer
            .push(&Frame::Error(ErrorFrame { code, message }));
        state.closing = true;
        drop(state);
        self.wake.notify_one();
    }
}

/// Closes a connection: what its outbox still holds (an ERROR frame, say)
/// is written, then the socket is shut. A peer that does not read gets
/// `CLOSE_LINGER_MS`, then its writer is dropped, and the descriptor with it.
pub(crate) async fn close(outbox: &Outbox, mut writer_task: tokio::task::JoinHandle<()>) {
    outbox.lock().closing = true;
    outbox.wake.notify_one();
    let linger = Duration::from_millis(CLOSE_LINGER_MS);
    if tokio::time::timeout(linger, &mut writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
    }
}

pub(crate) async fn run_writer<W: AsyncWrite + Unpin>(mut writer: W, outbox: Arc<Outbox>) {
    loop {
        let (bytes, closing) = {
            let mut state = outbox.lock();
            let bytes = state.writer.take();
            state.writing = bytes.len();
            (bytes, state.closing)
        };
        // The flush is free on TCP; a TLS stream may still hold encrypted
        // bytes after `write_all` until flushed.
        if !bytes.is_empty()
            && (writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err())
        {
            return;
        }
        let resume = {
            let mut state = outbox.lock();
            state.writing = 0;
            state.paused && state.writer.len() <= outbox.resume_below
        };
        if resume {
            outbox.timer_wake.notify_one();
        }
        if closing {
            let _ = writer.shutdown().await;
            return;
        }
        outbox.wake.notified().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use bytes::BytesMut;
    use courier_proto::{decode_frame, FRAME_BYTES_MAX_DEFAULT};
    use tokio::io::AsyncReadExt;

    use super::*;

    /// Every frame the peer of a writer task receives, once it closes.
    async fn frames_until_closed(mut peer: tokio::io::DuplexStream) -> Vec<Frame> {
        let mut bytes = Vec::new();
        peer.read_to_end(&mut bytes).await.unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut frames = Vec::new();
        while let Some(frame) = decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).unwrap() {
            frames.push(frame);
        }
        assert!(buf.is_empty(), "the last frame was cut short");
        frames
    }

    fn error(code: ErrorCode, message: &str) -> Frame {
        Frame::Error(ErrorFrame {
            code,
            message: message.to_string(),
        })
    }

    #[tokio::test]
    async fn frames_leave_in_order_and_a_failure_ends_with_its_error_then_the_close() {
        let outbox = Outbox::new(Arc::new(Notify::new()), 0, FRAME_BYTES_MAX_DEFAULT);
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(run_writer(ours, outbox.clone()));
        outbox.push(&Frame::Ping(1));
        outbox.push(&Frame::Pong(2));
        outbox.fail(ErrorCode::MalformedFrame, "bad frame".to_string());
        assert_eq!(
            frames_until_closed(theirs).await,
            vec![
                Frame::Ping(1),
                Frame::Pong(2),
                error(ErrorCode::MalformedFrame, "bad frame")
            ]
        );
        writer.await.unwrap();
    }

    /// Whether `timer` was notified (a stored permit completes at once).
    async fn woken(timer: &Notify) -> bool {
        tokio::time::timeout(Duration::ZERO, timer.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_paused_outbox_that_drained_wakes_the_timer_and_an_unpaused_one_does_not() {
        for paused in [true, false] {
            let timer = Arc::new(Notify::new());
            let outbox = Outbox::new(timer.clone(), 1024, FRAME_BYTES_MAX_DEFAULT);
            outbox.lock().paused = paused;
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let writer = tokio::spawn(run_writer(ours, outbox.clone()));
            outbox.push(&Frame::Ping(1));
            outbox.fail(ErrorCode::SlowConsumer, "bye".to_string());
            frames_until_closed(theirs).await;
            writer.await.unwrap();
            assert_eq!(woken(&timer).await, paused, "paused: {paused}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_does_not_read_loses_its_connection_after_the_linger() {
        let outbox = Outbox::new(Arc::new(Notify::new()), 0, FRAME_BYTES_MAX_DEFAULT);
        // Room for 16 bytes, and the peer never reads: the writer blocks.
        let (ours, mut theirs) = tokio::io::duplex(16);
        let writer = tokio::spawn(run_writer(ours, outbox.clone()));
        outbox.push(&error(ErrorCode::ReadTimeout, &"x".repeat(1024)));
        let started = tokio::time::Instant::now();
        close(&outbox, writer).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(CLOSE_LINGER_MS)
                && waited < Duration::from_millis(CLOSE_LINGER_MS + 1_000),
            "close waited {waited:?}"
        );
        // The writer is gone: the peer reads what was written, then the end.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), theirs.read_to_end(&mut rest))
            .await
            .expect("the connection was dropped")
            .unwrap();
        assert!(rest.len() < 1024, "{} bytes arrived", rest.len());
    }
}
