//! Accepting connections: the connection cap and the handshake cap, the
//! refusals past them, TLS or plain TCP, and in-process connections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use courier_proto::{ErrorCode, ErrorFrame, Frame, FrameWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::connection::serve_stream;
use crate::{now_nanos, tls, ServerConfig, Shared};

/// Connections being refused (over the cap) at once; past it, a new one
/// is closed without its ERROR frame rather than hold another descriptor.
pub(crate) const REFUSALS_MAX: usize = 64;

/// How long a refused connection is kept to read what the client sent,
/// so closing does not reset the connection before the ERROR is read.
pub(crate) const REFUSAL_LINGER_MS: u64 = 1_000;

/// Counts a connection as "in its handshake" until dropped.
pub(crate) struct HandshakeSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One of [`ServerConfig::connections_max`] places, held by a connection
/// from accept to close; the `connections_open` gauge follows.
pub(crate) struct ConnectionSlot {
    pub(crate) shared: Arc<Shared>,
}

impl ConnectionSlot {
    pub(crate) fn take(shared: &Arc<Shared>) -> Option<ConnectionSlot> {
        let open = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open > shared.config.connections_max {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        shared.core().metrics_mut().connections_open = open as u64;
        Some(ConnectionSlot {
            shared: shared.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let open = self.shared.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        self.shared.core().metrics_mut().connections_open = open as u64;
    }
}

/// A connection over the cap: told so with an ERROR frame (plain TCP; a
/// TLS client could not read a plaintext frame, so it is only closed), and
/// closed. Said once a second at most, and at most `REFUSALS_MAX` are
/// being told at once: a flood must hold neither descriptors nor the log.
pub(crate) fn refuse_over_cap(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    shared.core().metrics_mut().connections_over_cap += 1;
    let second = now_nanos() / 1_000_000_000;
    if shared.connections_warned_at.swap(second, Ordering::Relaxed) != second {
        warn!(%peer, max = shared.config.connections_max, "the broker holds its maximum of connections; refusing new ones (--connections-max)");
    }
    if shared.tls.is_some() {
        return;
    }
    if shared.refusals.fetch_add(1, Ordering::Relaxed) >= REFUSALS_MAX {
        shared.refusals.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let shared = shared.clone();
    let message = format!(
        "the broker holds its maximum of {} connections; retry later, or raise courier serve --connections-max (and the open-files limit)",
        shared.config.connections_max
    );
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(REFUSAL_LINGER_MS);
        tell_and_close(stream, ErrorCode::TooManyConnections, message, deadline).await;
        shared.refusals.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Writes one ERROR frame to a plain-TCP connection that has sent nothing
/// the broker will read, and closes it. What the client sends first (its
/// HELLO) is read and dropped — closing with unread bytes would reset the
/// connection before the client read the ERROR: the broker waits for it
/// until `deadline`, then takes what else is there and closes.
pub(crate) async fn tell_and_close(
    mut stream: TcpStream,
    code: ErrorCode,
    message: String,
    deadline: tokio::time::Instant,
) {
    /// What is read and discarded before closing.
    const DISCARD_BYTES_MAX: usize = 64 * 1024;
    let mut out = FrameWriter::new();
    let _ = out.push(&Frame::Error(ErrorFrame { code, message }));
    let mut scratch = vec![0u8; 4096];
    let mut discarded = 0;
    let written = tokio::time::timeout_at(deadline, stream.write_all(&out.take())).await;
    if !matches!(written, Ok(Ok(()))) || stream.shutdown().await.is_err() {
        return;
    }
    match tokio::time::timeout_at(deadline, stream.read(&mut scratch)).await {
        Ok(Ok(n)) if n > 0 => discarded += n,
        _ => return,
    }
    while discarded < DISCARD_BYTES_MAX {
        match stream.try_read(&mut scratch) {
            Ok(n) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    _place: ConnectionSlot,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let slot = HandshakeSlot(&shared.handshakes);
    if shared.handshakes.fetch_add(1, Ordering::Relaxed) >= shared.config.handshakes_max {
        // Unauthenticated connections cost memory and a task each; past the
        // cap they are dropped before a byte is read. Said once a second at
        // most: a flood must not flood the log too.
        shared.core().metrics_mut().handshakes_refused += 1;
        let second = now_nanos() / 1_000_000_000;
        if shared.cap_warned_at.swap(second, Ordering::Relaxed) != second {
            warn!(%peer, max = shared.config.handshakes_max, "too many connections in their handshake; dropping new ones");
        }
        return;
    }
    // The TLS handshake and HELLO share one deadline.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(shared.config.handshake_timeout_ms);
    let Some(acceptor) = shared.tls.clone() else {
        // Plain TCP keeps TcpStream's own owned halves: reader and writer
        // task never contend for a lock.
        let (reader, writer) = stream.into_split();
        serve_stream(&shared, slot, reader, writer, peer, None, deadline).await;
        return;
    };
    let Some(stream) = refuse_plaintext(&shared.config, stream, peer, deadline).await else {
        return;
    };
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Err(_) => {
            info!(%peer, "TLS handshake not finished within the handshake timeout; closing");
            return;
        }
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Ok(Ok(stream)) => stream,
    };
    // rustls has verified the chain against --tls-client-ca by now.
    let subject = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        None => None,
        Some(leaf) => match tls::certificate_subject(leaf) {
            Ok(subject) => Some(subject),
            Err(e) => {
                info!(%peer, error = %e, "client certificate subject unreadable; closing");
                return;
            }
        },
    };
    // A TLS session is one state machine for both directions, so its halves
    // share a lock (`tokio::io::split`); only the TLS path pays for that.
    let (reader, writer) = tokio::io::split(stream);
    serve_stream(&shared, slot, reader, writer, peer, subject, deadline).await;
}

/// Room in each direction of an in-process connection's pipe before its
/// writer waits for the reader.
pub(crate) const IN_PROCESS_PIPE_BYTES: usize = 256 * 1024;

/// A bus connection from inside the broker's process (the HTTP gateway's):
/// an in-memory pipe whose far end is served as an accepted socket is —
/// handshake, authentication, manifest rules, limits and dedup are the
/// bus's own — without a trip through the kernel's loopback. It holds one
/// of the `connections_max` places, as any connection does.
pub(crate) fn connect_in_process(
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> std::io::Result<tokio::io::DuplexStream> {
    let Some(place) = ConnectionSlot::take(shared) else {
        shared.core().metrics_mut().connections_over_cap += 1;
        return Err(std::io::Error::other(format!(
            "the broker holds its maximum of {} connections; retry later, or raise courier serve --connections-max",
            shared.config.connections_max
        )));
    };
    let (ours, theirs) = tokio::io::duplex(IN_PROCESS_PIPE_BYTES);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _place = place;
        shared.handshakes.fetch_add(1, Ordering::Relaxed);
        let slot = HandshakeSlot(&shared.handshakes);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(shared.config.handshake_timeout_ms);
        let (reader, writer) = tokio::io::split(theirs);
        serve_stream(&shared, slot, reader, writer, peer, None, deadline).await;
    });
    Ok(ours)
}

/// A TLS client starts with a handshake record (`0x16`). Anything else is
/// most likely a Courier client without TLS: it gets a plaintext ERROR
/// frame saying so (rather than TLS alert bytes it cannot read), and the
/// connection closes. `None` when the connection is done with.
pub(crate) async fn refuse_plaintext(
    config: &ServerConfig,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<TcpStream> {
    /// The first byte of every TLS handshake record.
    const TLS_HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1..)) if first[0] == TLS_HANDSHAKE => return Some(stream),
        Ok(Ok(1..)) => {}
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
    }
    info!(%peer, "a client spoke plain TCP to the TLS listener; refusing");
    let message = format!(
        "this broker requires TLS on {}: connect with --tls-ca CA.pem (or COURIER_TLS_CA; ClientOptions::tls in the SDK)",
        config.listen
    );
    tell_and_close(stream, ErrorCode::HandshakeRequired, message, deadline).await;
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use bytes::BytesMut;
    use courier_proto::{decode_frame, FRAME_BYTES_MAX_DEFAULT};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback sockets: (client, server).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    async fn frames_until_closed(stream: &mut TcpStream) -> Vec<Frame> {
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut frames = Vec::new();
        while let Some(frame) = decode_frame(&mut buf, FRAME_BYTES_MAX_DEFAULT).unwrap() {
            frames.push(frame);
        }
        assert!(buf.is_empty(), "the last frame was cut short");
        frames
    }

    fn deadline() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_refused_client_reads_its_error_and_then_a_clean_close() {
        let (mut client, server) = pair().await;
        // What the client sent first is read and dropped, so closing does
        // not reset the connection before the ERROR is read.
        client.write_all(b"a HELLO nobody reads").await.unwrap();
        let refusing = tokio::spawn(tell_and_close(
            server,
            ErrorCode::TooManyConnections,
            "full".to_string(),
            deadline(),
        ));
        let frames = frames_until_closed(&mut client).await;
        refusing.await.unwrap();
        assert_eq!(
            frames,
            vec![Frame::Error(ErrorFrame {
                code: ErrorCode::TooManyConnections,
                message: "full".to_string(),
            })]
        );
    }

    #[tokio::test]
    async fn plain_tcp_to_the_tls_listener_is_told_to_use_tls() {
        let config = ServerConfig::default();
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));

        let (mut client, server) = pair().await;
        client.write_all(&[0, 0, 0, 1, 0x0C]).await.unwrap();
        let refusing = tokio::spawn(async move {
            refuse_plaintext(&config, server, peer, deadline())
                .await
                .is_none()
        });
        let frames = frames_until_closed(&mut client).await;
        assert!(refusing.await.unwrap(), "the plaintext stream was kept");
        match &frames[..] {
            [Frame::Error(e)] => {
                assert_eq!(e.code, ErrorCode::HandshakeRequired);
                assert!(e.message.contains("--tls-ca"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }

        let config = ServerConfig::default();
        let (mut client, server) = pair().await;
        client.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        let kept = refuse_plaintext(&config, server, peer, deadline()).await;
        assert!(kept.is_some(), "a TLS handshake was refused");
    }

    #[test]
    fn a_handshake_slot_is_given_back_when_dropped() {
        let handshakes = std::sync::atomic::AtomicUsize::new(1);
        drop(HandshakeSlot(&handshakes));
        assert_eq!(handshakes.load(Ordering::Relaxed), 0);
    }
}
