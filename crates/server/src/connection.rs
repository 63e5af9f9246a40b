//! One connection's life after accept: the handshake (HELLO → WELCOME),
//! then reading frames against its deadlines until it closes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use courier_broker::ConnId;
use courier_proto::{
    decode_frame, decode_frame_as, ErrorCode, Frame, Welcome, PROTOCOL_VERSION,
    PROTOCOL_VERSION_MIN,
};
use futures_util::FutureExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::{debug, info};

use crate::accept::HandshakeSlot;
use crate::inbound::{apply, frame_name};
use crate::outbox::{close, run_writer};
use crate::{auth, console, wall_nanos, Outbox, Shared};

/// How a connection's reader takes what arrives.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reads {
    /// As it comes: a socket's client batches its own writes, and a read
    /// costs a system call.
    Socket,
    /// Gathered: once bytes are there, the tasks already runnable go first
    /// and the read takes what they wrote too. An in-process client (the
    /// HTTP gateway) writes each of its callers' frames as that caller
    /// runs, one small write each; read one at a time they would cost a
    /// core lock and a write to each recipient apiece, where gathered they
    /// share one.
    Gathered,
}

/// Handshake and life of one connection over any byte stream.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_stream<R, W>(
    shared: &Shared,
    slot: HandshakeSlot<'_>,
    mut reader: R,
    writer: W,
    peer: SocketAddr,
    subject: Option<String>,
    deadline: tokio::time::Instant,
    reads: Reads,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let outbox = Outbox::new(
        shared.timer_wake.clone(),
        shared.config.pause_bytes / 4,
        shared.config.frame_bytes_max,
    );
    let writer_task = tokio::spawn(run_writer(writer, outbox.clone()));
    let mut buf = BytesMut::with_capacity(HANDSHAKE_READ_BYTES);
    let hello = match tokio::time::timeout_at(deadline, read_frame(&mut reader, &mut buf)).await {
        Err(_) => {
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(
                ErrorCode::HandshakeTimeout,
                format!("no HELLO within {} ms", shared.config.handshake_timeout_ms),
            );
            close(&outbox, writer_task).await;
            return;
        }
        // Closed, or only the write side shut: a HELLO that has not
        // arrived by now never will. (`read_frame` sets no deadline.)
        Ok(Err(ReadError::Closed | ReadError::TimedOut(_))) => {
            close(&outbox, writer_task).await;
            return;
        }
        Ok(Err(ReadError::Decode(code, message))) => {
            shared.core().metrics_mut().frames_rejected += 1;
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(code, message);
            close(&outbox, writer_task).await;
            return;
        }
        Ok(Ok(Frame::Hello(hello))) => hello,
        Ok(Ok(other)) => {
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(
                ErrorCode::HandshakeRequired,
                format!("the first frame must be HELLO, not {}", frame_name(&other)),
            );
            close(&outbox, writer_task).await;
            return;
        }
    };
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&hello.version) {
        shared.core().metrics_mut().handshakes_refused += 1;
        outbox.fail(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this broker speaks versions {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION}",
                hello.version
            ),
        );
        close(&outbox, writer_task).await;
        return;
    }
    // The version both ends speak: what the connection's frames are
    // written and read as from WELCOME on (a version-1 client never sees
    // flag 0x80, and sending it stays malformed).
    let version = hello.version.min(PROTOCOL_VERSION);
    outbox.lock().writer.set_version(version);
    let identity = {
        let core = shared.core();
        auth::authenticate(
            core.manifest().map(|m| m.as_ref()),
            &hello,
            subject.as_deref(),
        )
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err((code, reason)) => {
            info!(%peer, %reason, "handshake refused");
            shared.core().metrics_mut().handshakes_refused += 1;
            outbox.fail(code, reason);
            close(&outbox, writer_task).await;
            return;
        }
    };
    drop(slot);
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let instance = if hello.instance.is_empty() {
        format!("{}-{conn}", identity.service)
    } else {
        hello.instance.clone()
    };
    shared
        .credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(conn, (hello.credentials.clone(), subject));
    shared.peers().insert(
        conn,
        console::Peer {
            addr: peer,
            connected_at: wall_nanos(),
        },
    );
    shared.outboxes().insert(conn, outbox.clone());
    // WELCOME and the broker's first actions (parked replies) leave in
    // that order: both happen under the core lock.
    let mut refused = None;
    shared.with_core(|core, _now| {
        if let Err(reason) = core.may_connect(&identity.service) {
            refused = Some(reason);
            return;
        }
        outbox.push(&Frame::Welcome(Welcome {
            version,
            connection_id: conn,
            frame_bytes_max: shared.config.frame_bytes_max,
            broker: format!("courier {}", env!("CARGO_PKG_VERSION")),
            // A client that left the name to its credentials (or the admin,
            // whatever name it gave) learns it here; one whose name stands
            // gets the WELCOME it always got.
            service: (identity.service != hello.service).then(|| identity.service.clone()),
        }));
        if let Err(reason) = core.connect_as(
            conn,
            &identity.service,
            &instance,
            hello.max_in_flight,
            identity.admin,
        ) {
            refused = Some(reason);
        } else if version >= courier_proto::PIPELINED_KEYS_VERSION {
            core.set_pipelined_keys(conn, true);
        }
    });
    if let Some(reason) = refused {
        info!(%peer, %reason, "connection refused");
        shared.outboxes().remove(&conn);
        shared.peers().remove(&conn);
        shared
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
        outbox.fail(ErrorCode::TooManyConnections, reason);
        close(&outbox, writer_task).await;
        return;
    }
    debug!(conn, %peer, service = %identity.service, %instance, "connected");

    let end = read_loop(shared, conn, version, reads, &mut reader, &mut buf).await;
    match end {
        ReadError::Closed => debug!(conn, "disconnected"),
        ReadError::Decode(code, message) => {
            info!(conn, %peer, %code, %message, "closing connection after a bad frame");
            shared.core().metrics_mut().frames_rejected += 1;
            outbox.fail(code, message);
        }
        ReadError::TimedOut(timeout) => {
            let message = match timeout {
                Timeout::Frame => format!(
                    "a frame began more than {} ms ago and has not arrived whole; closing",
                    shared.config.frame_timeout_ms
                ),
                Timeout::Keepalive => format!(
                    "nothing arrived for {} ms; a client must send something (a PING will do) more often than that",
                    shared.config.keepalive_timeout_ms
                ),
            };
            info!(conn, %peer, %message, "closing connection");
            {
                let mut core = shared.core();
                let metrics = core.metrics_mut();
                match timeout {
                    Timeout::Frame => metrics.frame_timeouts += 1,
                    Timeout::Keepalive => metrics.keepalive_timeouts += 1,
                }
            }
            outbox.fail(ErrorCode::ReadTimeout, message);
        }
    }
    shared.with_core_deferred_for(conn, |core, now| core.disconnect(conn, now));
    shared.outboxes().remove(&conn);
    outbox.gone.store(true, Ordering::Relaxed);
    shared
        .credentials
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&conn);
    shared.peers().remove(&conn);
    close(&outbox, writer_task).await;
}

pub(crate) enum ReadError {
    Closed,
    Decode(ErrorCode, String),
    TimedOut(Timeout),
}

/// Which deadline a connection missed.
#[derive(Clone, Copy)]
pub(crate) enum Timeout {
    /// A frame began and did not arrive whole in time.
    Frame,
    /// Nothing arrived in time.
    Keepalive,
}

/// Largest HELLO accepted: its fields (two names of at most 255 bytes, a
/// token of at most 65 535) with room to spare. Until a connection is
/// authenticated it may make the broker buffer no more than this.
pub(crate) const HELLO_BYTES_MAX: u32 = 70 * 1024;

/// What an unauthenticated connection's reads are sized by.
pub(crate) const HANDSHAKE_READ_BYTES: usize = 4 * 1024;

/// Reads the first frame (HELLO) with the handshake's small limits.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, ReadError> {
    loop {
        match decode_frame(buf, HELLO_BYTES_MAX) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(ReadError::Decode(e.code(), e.to_string())),
        }
        buf.reserve(HANDSHAKE_READ_BYTES);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

pub(crate) async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Shared,
    conn: ConnId,
    version: u16,
    reads: Reads,
    reader: &mut R,
    buf: &mut BytesMut,
) -> ReadError {
    let frame_timeout = Duration::from_millis(shared.config.frame_timeout_ms);
    let keepalive = Duration::from_millis(shared.config.keepalive_timeout_ms);
    let mut frames = Vec::new();
    // When bytes last arrived, and when the frame still incomplete in
    // `buf` began to (a monotonic clock: tokio's, so tests may pause it).
    let mut last_read = tokio::time::Instant::now();
    let mut partial_since: Option<tokio::time::Instant> = None;
    // One timer for the connection, moved only when a deadline comes
    // closer, and otherwise checked when it fires: resetting it per read
    // would cost a timer-wheel update per read.
    let timer = tokio::time::sleep_until(last_read + keepalive);
    tokio::pin!(timer);
    loop {
        let mut failure = None;
        loop {
            match decode_frame_as(buf, shared.config.frame_bytes_max, version) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    failure = Some(ReadError::Decode(e.code(), e.to_string()));
                    break;
                }
            }
        }
        let decoded_any = !frames.is_empty();
        if decoded_any {
            shared
                .frames_in
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
            // Everything decoded from this read is applied under one lock.
            shared.with_core_deferred_for(conn, |core, now| {
                for frame in frames.drain(..) {
                    if let Err(refused) = apply(core, conn, frame, now) {
                        failure = Some(refused);
                        break;
                    }
                }
            });
            frames.clear();
        }
        if let Some(failure) = failure {
            return failure;
        }
        partial_since = match partial_since {
            _ if buf.is_empty() => None,
            // What is left began in the read that completed the frames.
            _ if decoded_any => Some(last_read),
            Some(since) => Some(since),
            None => Some(last_read),
        };
        let (deadline, missed) = match partial_since {
            Some(since) => (since + frame_timeout, Timeout::Frame),
            None => (last_read + keepalive, Timeout::Keepalive),
        };
        if deadline < timer.deadline() {
            timer.as_mut().reset(deadline);
        }
        buf.reserve(shared.config.read_buffer_bytes);
        loop {
            tokio::select! {
                biased;
                read = reader.read_buf(buf) => match read {
                    Ok(0) | Err(_) => return ReadError::Closed,
                    Ok(_) => {
                        last_read = tokio::time::Instant::now();
                        break;
                    }
                },
                () = &mut timer => {
                    if tokio::time::Instant::now() >= deadline {
                        return ReadError::TimedOut(missed);
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
        if reads == Reads::Gathered {
            tokio::task::yield_now().await;
            // What the others wrote meanwhile; a close or an error is
            // read again, and answered, by the next wait.
            while buf.len() < buf.capacity() {
                match reader.read_buf(buf).now_or_never() {
                    Some(Ok(1..)) => {}
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use courier_proto::{Credentials, FrameWriter, Hello, PROTOCOL_VERSION};
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            service: "web".to_string(),
            instance: "web-1".to_string(),
            max_in_flight: 16,
            credentials: Credentials::Token("crr_x".to_string()),
        }
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut writer = FrameWriter::new();
        writer.push(frame).unwrap();
        writer.take().to_vec()
    }

    #[tokio::test]
    async fn a_hello_over_the_handshake_limit_is_refused_before_its_body_is_read() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01])
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        // The client stays connected and sends no more: a reader that
        // waited for the announced 4 GiB would never answer.
        let read = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut server, &mut buf))
            .await
            .expect("refused without waiting for the body");
        match read {
            Err(ReadError::Decode(code, message)) => {
                assert_eq!(code, ErrorCode::FrameTooLarge, "{message}");
            }
            _ => panic!("a 4 GiB HELLO was not refused as too large"),
        }
        assert!(
            buf.capacity() < HELLO_BYTES_MAX as usize,
            "{}",
            buf.capacity()
        );
        drop(client);
    }

    #[tokio::test]
    async fn a_hello_that_arrives_in_pieces_is_put_together() {
        let bytes = encoded(&Frame::Hello(hello()));
        let (mut client, mut server) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            read_frame(&mut server, &mut buf).await
        });
        for piece in bytes.chunks(3) {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        match reader.await.unwrap() {
            Ok(Frame::Hello(got)) => assert_eq!(got, hello()),
            Ok(other) => panic!("read {other:?}"),
            Err(_) => panic!("the HELLO was not read"),
        }
    }

    #[tokio::test]
    async fn a_connection_that_ends_inside_its_hello_is_closed() {
        let bytes = encoded(&Frame::Hello(hello()));
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        drop(client);
        let mut buf = BytesMut::new();
        assert!(matches!(
            read_frame(&mut server, &mut buf).await,
            Err(ReadError::Closed)
        ));
    }
}
