//! The connection driver: handshake, reading, writing, reconnecting.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use courier_proto::{
    decode_frame, decode_frame_as, Credentials, ErrorCode, Frame, Hello, Kind, Subscribe,
    FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use crate::handler::{self, Delivered, Handler, Incoming};
use crate::{
    BoxRead, BoxWrite, Client, ClientOptions, ClientTls, ConnectionEvent, Connector, Error, Inner,
    Reply, Result, State,
};

/// Biggest frame we accept from the broker.
const INBOUND_FRAME_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// A handshake that takes longer than this failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The client pings an idle connection this often (a sixth of the
/// broker's default keepalive deadline, which closes a connection on
/// which nothing arrives) …
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// … and gives it up when nothing at all arrived for this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The ALPN protocol offered: the Courier protocol, version 1 (the
/// broker's `courier_server::ALPN`).
const ALPN: &[u8] = b"courier/1";
/// The broker command that sets where this instance serves (PROTOCOL §8.7).
const ADVERTISE_COMMAND: &str = "courier.registry.advertise";
/// How long an advertisement waits for the broker's answer.
const ADVERTISE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Established {
    reader: Reader,
    writer: Writer,
    /// The plain socket once more (a second descriptor), for writes from
    /// the caller's thread (see `State::direct`); `None` with TLS.
    direct: Option<std::net::TcpStream>,
    buf: BytesMut,
    pub frame_bytes_max: u32,
    /// The protocol version the broker speaks on this connection.
    pub version: u16,
    /// The service the broker authenticated this connection as: named in
    /// WELCOME when it is not the one HELLO asked for, else that one.
    pub service: String,
}

/// The read half of a connection. Plain TCP keeps `TcpStream`'s owned
/// halves (no lock between reader and writer); a TLS session is one state
/// machine for both directions, so its halves share `tokio::io::split`'s
/// lock. An enum rather than a `Box<dyn …>`: no allocation or virtual call
/// on the plain path.
enum Reader {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
    Other(BoxRead),
}

enum Writer {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
    Other(BoxWrite),
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Reader::Plain(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Tls(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Other(r) => r.as_mut().poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Tls(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Other(w) => w.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_flush(cx),
            Writer::Tls(w) => Pin::new(w).poll_flush(cx),
            Writer::Other(w) => w.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Plain(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Tls(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Other(w) => w.as_mut().poll_shutdown(cx),
        }
    }
}

/// A rustls client set-up from the PEM files of `tls` (read now, so
/// renewed files count at the next reconnect).
fn tls_connector(tls: &ClientTls) -> std::result::Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates = |path: &std::path::Path, what: &str| {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{what} {} holds no PEM CERTIFICATE block",
                path.display()
            ));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&tls.ca, "the TLS CA file")? {
        roots.add(cert).map_err(|e| {
            format!(
                "the TLS CA file {} holds an unusable certificate: {e}",
                tls.ca.display()
            )
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    let mut config = match &tls.client_cert {
        Some((cert, key)) => {
            let chain = certificates(cert, "the client certificate file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key do not match: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The name the broker's certificate must carry: the override, else the
/// host part of `host:port` (an IP address or a DNS name).
fn server_name(
    opts: &ClientOptions,
    tls: &ClientTls,
) -> std::result::Result<ServerName<'static>, String> {
    let host = match &tls.server_name {
        Some(name) => name.as_str(),
        None => opts
            .url
            .rsplit_once(':')
            .map_or(opts.url.as_str(), |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']'),
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a name a TLS certificate can carry: {e}"))
}

/// Why a TLS session failed, in words that point at the fix.
fn tls_failure(addr: &str, e: &std::io::Error) -> String {
    let hint = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => {
            "; the broker's certificate is not signed by the trusted CA (--tls-ca / COURIER_TLS_CA) or does not name this host".to_string()
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            "; is the broker listening with TLS (courier serve --tls-cert --tls-key)?".to_string()
        }
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "; the broker refused the TLS session ({alert:?}): is this client certificate (--tls-cert) signed by the broker's --tls-client-ca?"
        ),
        _ => String::new(),
    };
    format!("TLS session with {addr} failed: {e}{hint}")
}

/// Connects and completes HELLO/WELCOME: through `connector` when there
/// is one, else over TCP (and TLS) to `opts.url`.
pub(crate) async fn establish(
    opts: &ClientOptions,
    connector: Option<&Connector>,
) -> Result<Established> {
    let connect_error = |source| Error::Connect {
        addr: opts.url.clone(),
        source,
    };
    if let Some(connector) = connector {
        let (reader, writer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, (connector.0)())
            .await
            .map_err(|_| {
                connect_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(connect_error)?;
        return handshake(opts, Reader::Other(reader), Writer::Other(writer), None).await;
    }
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&opts.url))
        .await
        .map_err(|_| {
            connect_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        })?
        .map_err(connect_error)?;
    let _ = stream.set_nodelay(true);
    let mut direct = None;
    let (reader, writer) = match &opts.tls {
        None => {
            // A second descriptor of the same socket, non-blocking like the
            // first: tokio keeps the first registered, the client writes a
            // lone request through the second without waking a worker.
            let socket = stream.into_std().map_err(connect_error)?;
            direct = socket.try_clone().ok();
            let stream = TcpStream::from_std(socket).map_err(connect_error)?;
            let (reader, writer) = stream.into_split();
            (Reader::Plain(reader), Writer::Plain(writer))
        }
        Some(tls) => {
            let setup_error = |message: String| {
                connect_error(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    message,
                ))
            };
            let connector = tls_connector(tls).map_err(setup_error)?;
            let name = server_name(opts, tls).map_err(setup_error)?;
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
                .await
                .map_err(|_| Error::Closed("no TLS handshake with the broker within 10 s".into()))?
                .map_err(|e| Error::Closed(tls_failure(&opts.url, &e)))?;
            let (reader, writer) = tokio::io::split(stream);
            (Reader::Tls(reader), Writer::Tls(writer))
        }
    };
    handshake(opts, reader, writer, direct).await
}

/// HELLO, then the broker's WELCOME (or its refusal).
async fn handshake(
    opts: &ClientOptions,
    mut reader: Reader,
    mut writer: Writer,
    direct: Option<std::net::TcpStream>,
) -> Result<Established> {
    let is_tls = matches!(reader, Reader::Tls(_));
    let connect_error = |source| Error::Connect {
        addr: opts.url.clone(),
        source,
    };
    // Errors on an established TLS session (a refused client certificate
    // arrives as an alert after the client's side of the handshake).
    let session_error = |e: std::io::Error| {
        if is_tls {
            Error::Closed(tls_failure(&opts.url, &e))
        } else {
            connect_error(e)
        }
    };
    let mut out = courier_proto::FrameWriter::new();
    out.push(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        service: opts.service.clone(),
        instance: opts.instance.clone(),
        max_in_flight: opts.max_in_flight,
        credentials: opts
            .token
            .clone()
            .map(Credentials::Token)
            .unwrap_or_default(),
    }))?;
    writer.write_all(&out.take()).await.map_err(session_error)?;
    writer.flush().await.map_err(session_error)?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match decode_frame(&mut buf, INBOUND_FRAME_BYTES_MAX) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => {
                    // A TLS record (alert 0x15 or handshake 0x16, version 3.x).
                    let hint = if !is_tls && matches!(buf.get(..2), Some([0x15 | 0x16, 0x03])) {
                        "; it looks like TLS: pass --tls-ca (COURIER_TLS_CA)"
                    } else {
                        ""
                    };
                    return Err(Error::Closed(format!("broker sent a bad frame: {e}{hint}")));
                }
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) => {
                    return Err(Error::Closed(if is_tls {
                        "broker closed the connection during the handshake (did it refuse this client certificate?)".into()
                    } else {
                        "broker closed the connection during the handshake".into()
                    }))
                }
                Ok(_) => {}
                Err(e) => return Err(session_error(e)),
            }
        }
    })
    .await
    .map_err(|_| Error::Closed("no WELCOME from the broker within 10 s".into()))??;
    match welcome {
        Frame::Welcome(w) => Ok(Established {
            reader,
            writer,
            direct,
            buf,
            frame_bytes_max: if w.frame_bytes_max == 0 {
                FRAME_BYTES_MAX_DEFAULT
            } else {
                w.frame_bytes_max
            },
            // A broker of version 1 gets messages without parent_id.
            version: w.version.min(PROTOCOL_VERSION),
            service: w.service.unwrap_or_else(|| opts.service.clone()),
        }),
        Frame::Error(e) => Err(Error::Refused {
            code: e.code,
            reason: e.message,
        }),
        other => Err(Error::Closed(format!("expected WELCOME, got {other:?}"))),
    }
}

/// Queues a SUBSCRIBE and returns where its RESULT will arrive.
pub(crate) fn push_subscribe(
    inner: &Inner,
    state: &mut State,
    pattern: &str,
    start: courier_proto::StartFrom,
) -> oneshot::Receiver<Result<()>> {
    state.next_op += 1;
    let request = state.next_op;
    let (tx, rx) = oneshot::channel();
    state.pending_ops.insert(request, tx);
    let _ = state.writer.push(&Frame::Subscribe(Subscribe {
        request,
        pattern: pattern.to_string(),
        ack_deadline_ms: inner
            .opts
            .ack_deadline
            .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32),
        max_deliveries: inner.opts.max_deliveries.unwrap_or(0),
        start,
    }));
    rx
}

/// A new connection is up: subscribe again and re-send what was not yet
/// acknowledged (same ids, so the broker's dedup makes it safe).
pub(crate) fn on_connected(inner: &Arc<Inner>, established: &mut Established) {
    let mut state = inner.lock();
    state.generation += 1;
    state.connected = true;
    // The broker took back every delivery of the last connection.
    state.key_lines.clear();
    if state.generation > 1 {
        state.emit(ConnectionEvent::Restored);
    }
    state.direct = established.direct.take();
    state.writing = false;
    state.frame_bytes_max = established.frame_bytes_max;
    state.writer = courier_proto::FrameWriter::with_frame_bytes_max(established.frame_bytes_max);
    state.writer.set_version(established.version);
    let patterns: Vec<(String, courier_proto::StartFrom)> = state
        .subscriptions
        .iter()
        .map(|s| (s.pattern.clone(), s.start))
        .collect();
    for (pattern, start) in patterns {
        // Nobody awaits a re-subscription; a refusal is logged when it arrives.
        drop(push_subscribe(inner, &mut state, &pattern, start));
    }
    let state_now = &mut *state;
    for (seq, pending) in state_now.pending_sends.iter() {
        let _ = state_now.writer.push_send(seq, &pending.message);
    }
    if state.shut_down {
        let _ = state.writer.push(&Frame::Drain);
    }
    drop(state);
    inner.wake_writer();
    advertise(inner);
}

/// Tells the broker where this instance serves, on every connection (the
/// registry forgets a bus instance when its connection closes). A broker
/// that predates the command refuses it; the bus works all the same.
fn advertise(inner: &Arc<Inner>) {
    let Some(address) = inner.opts.advertise.clone() else {
        return;
    };
    let client = Client {
        inner: inner.clone(),
    };
    tokio::spawn(async move {
        let sent = match client
            .command(ADVERTISE_COMMAND)
            .timeout(ADVERTISE_TIMEOUT)
            .json(&serde_json::json!({ "address": address }))
        {
            Ok(command) => command.request().await.map(|_| ()),
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => debug!(%address, "address advertised"),
            Err(Error::Shutdown) => {}
            Err(error) => {
                warn!(%address, %error, "the broker did not take the advertised address; the registry lists this instance without it")
            }
        }
    });
}

/// Runs connections until shutdown, reconnecting with backoff.
pub(crate) async fn drive(inner: Arc<Inner>, first: Established) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut next = Some(first);
    let mut delay = inner.opts.reconnect_delay_min;
    loop {
        let established = match next.take() {
            Some(e) => e,
            None => {
                if *shutdown.borrow() {
                    break;
                }
                match establish(&inner.opts, inner.connector.as_ref()).await {
                    Ok(mut e) => {
                        on_connected(&inner, &mut e);
                        delay = inner.opts.reconnect_delay_min;
                        debug!(service = %inner.service, "reconnected");
                        e
                    }
                    Err(error) => {
                        debug!(%error, ?delay, "reconnect failed");
                        let jitter = Duration::from_millis(
                            u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 50,
                        );
                        inner.lock().emit(ConnectionEvent::ReconnectFailed {
                            error: error.to_string(),
                            retry_in: delay + jitter,
                        });
                        tokio::select! {
                            _ = tokio::time::sleep(delay + jitter) => {}
                            _ = shutdown.changed() => {}
                        }
                        delay = (delay * 2).min(inner.opts.reconnect_delay_max);
                        continue;
                    }
                }
            }
        };
        let generation = inner.lock().generation;
        let Established {
            mut reader,
            writer,
            mut buf,
            version,
            ..
        } = established;
        let write = write_loop(&inner, writer);
        let read = read_loop(&inner, generation, version, &mut reader, &mut buf);
        // Read first: the write loop, polled after the reader in the same
        // poll, takes what the frames just handled queued (see `reading`).
        let (stopped, reason) = tokio::select! {
            biased;
            end = read => {
                let reason = end.describe();
                debug!(%reason, "connection read side ended");
                (false, reason)
            }
            end = write => {
                debug!(?end, "connection write side ended");
                let reason = match &end {
                    Ok(()) => "closed by this client".to_string(),
                    Err(e) => format!("write failed: {e}"),
                };
                (end.is_ok(), reason)
            }
        };
        {
            let mut state = inner.lock();
            state.connected = false;
            // Closed before tokio's descriptor of the socket is (the
            // connection's halves are dropped after this block).
            state.direct = None;
            // Operations in flight on the dead connection will never be answered.
            for (_, tx) in state.pending_ops.drain() {
                let _ = tx.send(Err(Error::Closed("connection lost".into())));
            }
            let state_now = &mut *state;
            for (_, command) in state_now.quiet_requests.drain() {
                if let Some(waiting) = state_now.requests.remove(&command) {
                    let _ = waiting.replies.try_send(Err(Error::Closed(
                        "lost while the transient request waited for its reply; a transient command is sent at most once, so it was not sent again: send it again, or make it durable to have it re-sent across reconnects".into(),
                    )));
                }
            }
            for (_, tx) in state.flushes.drain(..) {
                let _ = tx.send(Err(Error::Closed(
                    "connection lost before the broker answered the flush".into(),
                )));
            }
            // The broker ends a flow-controlled stream under way with its
            // requester's connection (PROTOCOL §8.8): so does the client,
            // saying so. One that has not started waits on, as any request.
            state.requests.retain(|_, waiting| {
                if !waiting.flow_controlled || waiting.received == 0 {
                    return true;
                }
                let _ = waiting.replies.try_send(Err(Error::Closed(
                    "connection lost during a flow-controlled reply stream; the broker ends such a stream with its requester's connection, so the replies after those received will not come: request again".into(),
                )));
                false
            });
            if let Some(tx) = state.drained.take() {
                let _ = tx.send(());
            }
        }
        // Quiet senders waiting for room must see the connection is gone.
        inner.writer_drained.notify_waiters();
        if stopped || *shutdown.borrow() {
            break;
        }
        warn!(service = %inner.service, %reason, "connection to the broker lost; reconnecting");
        inner.lock().emit(ConnectionEvent::Lost { reason });
    }
    let mut state = inner.lock();
    state.connected = false;
    // Ends every reader of the connection events.
    state.events = None;
    for (_, pending) in state.pending_sends.take() {
        let _ = pending.done.send(Err(Error::Shutdown));
    }
    for (_, tx) in state.flushes.drain(..) {
        let _ = tx.send(Err(Error::Shutdown));
    }
    state.requests.clear();
    state.quiet_requests.clear();
    drop(state);
    inner.writer_drained.notify_waiters();
}

/// Writes whatever the client queued; ends `Ok` on shutdown after the last flush.
async fn write_loop(inner: &Inner, mut writer: Writer) -> std::io::Result<()> {
    let mut shutdown = inner.shutdown.subscribe();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        let bytes = {
            let mut state = inner.lock();
            let bytes = state.writer.take();
            // No direct write may overtake these.
            state.writing = !bytes.is_empty();
            bytes
        };
        if !bytes.is_empty() {
            writer.write_all(&bytes).await?;
            // Free on TCP; TLS may hold encrypted bytes until flushed.
            writer.flush().await?;
            inner.lock().writing = false;
            inner.writer_drained.notify_waiters();
        }
        if *shutdown.borrow() {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        let notified = inner.writer_wake.notified();
        tokio::pin!(notified);
        let requested = std::future::poll_fn(|cx| {
            if inner.write_requested.swap(false, Ordering::SeqCst) {
                return Poll::Ready(());
            }
            std::future::Future::poll(notified.as_mut(), cx)
        });
        tokio::select! {
            _ = requested => {}
            _ = shutdown.changed() => {}
            _ = ping.tick() => {
                let _ = inner.lock().writer.push(&Frame::Ping(0));
            }
        }
    }
}

enum ReadEnd {
    Closed,
    Idle,
    BadFrame(String),
    BrokerError(ErrorCode, String),
}

impl ReadEnd {
    fn describe(&self) -> String {
        match self {
            ReadEnd::Closed => "closed by the broker".to_string(),
            ReadEnd::Idle => format!("nothing received for {IDLE_TIMEOUT:?}"),
            ReadEnd::BadFrame(e) => format!("bad frame from the broker: {e}"),
            ReadEnd::BrokerError(code, message) => format!("broker error {code}: {message}"),
        }
    }
}

/// `Inner::reading` for as long as it lives (cleared on every way out, or
/// writes queued after a lost connection would never wake the writer).
struct Reading<'a>(&'a Inner);

impl<'a> Reading<'a> {
    fn start(inner: &'a Inner) -> Reading<'a> {
        inner.reading.store(true, Ordering::SeqCst);
        Reading(inner)
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.reading.store(false, Ordering::SeqCst);
    }
}

/// `version`: the connection's protocol version, which frames are read as
/// (a version-2 broker's SEND_RESULT has no log seq).
async fn read_loop(
    inner: &Arc<Inner>,
    generation: u64,
    version: u16,
    reader: &mut Reader,
    buf: &mut BytesMut,
) -> ReadEnd {
    loop {
        {
            let _reading = Reading::start(inner);
            loop {
                match decode_frame_as(buf, INBOUND_FRAME_BYTES_MAX, version) {
                    Ok(Some(frame)) => {
                        if let Some(end) = handle_frame(inner, generation, version, frame) {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return ReadEnd::BadFrame(e.to_string()),
                }
            }
        }
        buf.reserve(64 * 1024);
        match tokio::time::timeout(IDLE_TIMEOUT, reader.read_buf(buf)).await {
            Err(_) => return ReadEnd::Idle,
            Ok(Ok(0)) | Ok(Err(_)) => return ReadEnd::Closed,
            Ok(Ok(_)) => {}
        }
    }
}

fn handle_frame(
    inner: &Arc<Inner>,
    generation: u64,
    version: u16,
    frame: Frame,
) -> Option<ReadEnd> {
    match frame {
        Frame::SendResult(outcomes) => {
            let mut state = inner.lock();
            for o in outcomes {
                if let Some(pending) = state.pending_sends.remove(o.seq) {
                    let result = if o.code.is_ok() {
                        Ok(o.log_seq)
                    } else {
                        Err(Error::Refused {
                            code: o.code,
                            reason: o.reason,
                        })
                    };
                    let _ = pending.done.send(result);
                } else if let Some(command) = state.quiet_requests.remove(&o.seq) {
                    // Only a refusal is answered; the request ends with it.
                    if let Some(waiting) = state.requests.remove(&command) {
                        let _ = waiting.replies.try_send(Err(Error::Refused {
                            code: o.code,
                            reason: o.reason,
                        }));
                    }
                } else if !o.code.is_ok() {
                    // A quiet send's refusal, or one whose waiter gave up.
                    warn!(code = %o.code, reason = %o.reason, "the broker refused a send nobody awaits");
                    state.unheard_refusals += 1;
                    state.last_unheard_refusal = Some((o.code, o.reason));
                }
            }
        }
        Frame::Result(r) => {
            let tx = inner.lock().pending_ops.remove(&r.request);
            let result = if r.code.is_ok() {
                Ok(())
            } else {
                Err(Error::Refused {
                    code: r.code,
                    reason: r.reason,
                })
            };
            match tx {
                Some(tx) => {
                    let _ = tx.send(result);
                }
                None => {
                    if let Err(e) = result {
                        warn!(error = %e, "re-subscription refused");
                    }
                }
            }
        }
        Frame::Deliver(deliveries) => {
            let client = Client {
                inner: inner.clone(),
            };
            // Deliveries in one frame mostly share a name: the last match is
            // reused without the lock and the pattern walk.
            let mut last: Option<(courier_proto::SharedStr, Handler)> = None;
            // Version 4: a key's deliveries come pipelined (PROTOCOL §8.4).
            let pipelined = version >= courier_proto::PIPELINED_KEYS_VERSION;
            for d in deliveries {
                if d.message.kind == Kind::Reply {
                    route_reply(inner, generation, d.delivery, Arc::new(d.message));
                    continue;
                }
                let key_start = pipelined && d.attempt & courier_proto::ATTEMPT_KEY_START != 0;
                let attempt = if pipelined {
                    d.attempt & !courier_proto::ATTEMPT_KEY_START
                } else {
                    d.attempt
                };
                let key = match &d.message.key {
                    Some(key) if pipelined && !d.message.transient => Some(key.clone()),
                    _ => None,
                };
                let known = matches!(&last, Some((name, _)) if *name == d.message.name);
                if !known {
                    let found = inner
                        .lock()
                        .subscriptions
                        .iter()
                        .find(|s| courier_proto::pattern_matches(&s.pattern, &d.message.name))
                        .map(|s| s.handler.clone());
                    match found {
                        Some(handler) => last = Some((d.message.name.clone(), handler)),
                        None => {
                            // Subscribed by another instance of this service,
                            // not handled here: let the broker try elsewhere soon.
                            handler::settle(
                                inner,
                                generation,
                                d.delivery,
                                &d.message,
                                Some(inner.opts.nack_delay),
                            );
                            if let Some(key) = &key {
                                handler::key_refused(inner, generation, key, key_start);
                            }
                            continue;
                        }
                    }
                }
                let Some((_, handler)) = &last else {
                    continue;
                };
                let incoming = Incoming {
                    client: client.clone(),
                    generation,
                    delivery: d.delivery,
                    attempt,
                    delivered: Delivered::new(d.message),
                    ticket: None,
                };
                match key {
                    Some(key) => handler::deliver_keyed(inner, handler, incoming, key, key_start),
                    None => handler::spawn(inner, handler, incoming),
                }
            }
        }
        Frame::Drained => {
            if let Some(tx) = inner.lock().drained.take() {
                let _ = tx.send(());
            }
        }
        Frame::Ping(n) => {
            let _ = inner.lock().writer.push(&Frame::Pong(n));
            inner.wake_writer();
        }
        Frame::Pong(nonce) => {
            let mut state = inner.lock();
            while state.flushes.front().is_some_and(|(n, _)| *n <= nonce) {
                if let Some((_, done)) = state.flushes.pop_front() {
                    let _ = done.send(Ok(()));
                }
            }
        }
        Frame::Error(e) => {
            warn!(code = %e.code, message = %e.message, "broker closed the connection");
            return Some(ReadEnd::BrokerError(e.code, e.message));
        }
        other => {
            return Some(ReadEnd::BadFrame(format!(
                "unexpected frame from the broker: {other:?}"
            )));
        }
    }
    None
}

fn route_reply(inner: &Inner, generation: u64, delivery: u64, message: Arc<Message>) {
    let Some(command) = message.response_to else {
        return;
    };
    let mut state = inner.lock();
    let Some(waiting) = state.requests.get_mut(&command) else {
        if !message.is_final {
            // Nobody reads this stream any more: if it is flow-controlled,
            // the NACK stops it (a broker ignores it otherwise).
            state.writer.push_nack(courier_proto::Nack {
                delivery,
                delay_ms: 0,
            });
            drop(state);
            inner.wake_writer();
        }
        debug!(%command, name = %message.name, "reply for a request nobody awaits; dropped");
        return;
    };
    // The last slot is kept for the error that ends the stream.
    if waiting.lost > 0 || waiting.replies.capacity() <= 1 {
        // Never skip a reply and go on: from here on the stream only counts.
        waiting.lost += 1;
        let lost = waiting.lost;
        if lost == 1 {
            warn!(%command, "reply buffer full; this reply and the rest of its stream are lost");
        }
        if message.is_final {
            if let Some(waiting) = state.requests.remove(&command) {
                if let Some(seq) = waiting.quiet_seq {
                    state.quiet_requests.remove(&seq);
                }
                let _ = waiting.replies.try_send(Err(Error::RepliesLost(lost)));
            }
        }
        return;
    }
    waiting.received += 1;
    // A final reply ends the request here, so its stream need not lock to
    // forget it when dropped.
    let replies = if message.is_final {
        state.requests.remove(&command).map(|waiting| {
            if let Some(seq) = waiting.quiet_seq {
                state.quiet_requests.remove(&seq);
            }
            waiting.replies
        })
    } else {
        Some(waiting.replies.clone())
    };
    // Unlocked before the requester is woken: it takes the lock next.
    drop(state);
    let Some(replies) = replies else {
        return;
    };
    let reply = Reply {
        message,
        delivery,
        generation,
    };
    if replies.try_send(Ok(reply)).is_err() {
        debug!(%command, "request dropped while its reply arrived");
    }
}

use courier_proto::Message;

#[cfg(test)]
mod tests {
    use super::*;

    /// Two PINGs may be lost (or the runtime late) before the broker's
    /// keepalive deadline cuts an idle connection.
    #[test]
    fn an_idle_connection_pings_well_within_the_brokers_keepalive_deadline() {
        let deadline = Duration::from_millis(courier_proto::KEEPALIVE_TIMEOUT_MS_DEFAULT);
        assert!(
            PING_INTERVAL * 3 <= deadline,
            "{PING_INTERVAL:?} vs {deadline:?}"
        );
    }
}
