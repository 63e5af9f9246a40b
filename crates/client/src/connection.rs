//! The connection driver: handshake, reading, writing, reconnecting.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use courier_proto::{
    decode_frame, Credentials, ErrorCode, Frame, Hello, Kind, Subscribe, FRAME_BYTES_MAX_DEFAULT,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::handler::{self, Incoming};
use crate::{Client, ClientOptions, Error, Inner, Reply, Result, State};

/// Biggest frame we accept from the broker.
const INBOUND_FRAME_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// A handshake that takes longer than this failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The client pings an idle connection this often …
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// … and gives it up when nothing at all arrived for this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Established {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: BytesMut,
    pub frame_bytes_max: u32,
}

/// Connects and completes HELLO/WELCOME.
pub(crate) async fn establish(opts: &ClientOptions) -> Result<Established> {
    let connect_error = |source| Error::Connect {
        addr: opts.url.clone(),
        source,
    };
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
    let (mut reader, mut writer) = stream.into_split();
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
    writer.write_all(&out.take()).await.map_err(connect_error)?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match decode_frame(&mut buf, INBOUND_FRAME_BYTES_MAX) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => return Err(Error::Closed(format!("broker sent a bad frame: {e}"))),
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) => {
                    return Err(Error::Closed(
                        "broker closed the connection during the handshake".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(connect_error(e)),
            }
        }
    })
    .await
    .map_err(|_| Error::Closed("no WELCOME from the broker within 10 s".into()))??;
    match welcome {
        Frame::Welcome(w) => Ok(Established {
            reader,
            writer,
            buf,
            frame_bytes_max: if w.frame_bytes_max == 0 {
                FRAME_BYTES_MAX_DEFAULT
            } else {
                w.frame_bytes_max
            },
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
pub(crate) fn on_connected(inner: &Inner, established: &Established) {
    let mut state = inner.lock();
    state.generation += 1;
    state.connected = true;
    state.frame_bytes_max = established.frame_bytes_max;
    state.writer = courier_proto::FrameWriter::new();
    let patterns: Vec<(String, courier_proto::StartFrom)> = state
        .subscriptions
        .iter()
        .map(|s| (s.pattern.clone(), s.start))
        .collect();
    for (pattern, start) in patterns {
        // Nobody awaits a re-subscription; a refusal is logged when it arrives.
        drop(push_subscribe(inner, &mut state, &pattern, start));
    }
    let pending: Vec<(u64, courier_proto::Message)> = state
        .pending_sends
        .iter()
        .map(|(seq, p)| (*seq, p.message.clone()))
        .collect();
    for (seq, message) in pending {
        let _ = state.writer.push_send(seq, &message);
    }
    if state.shut_down {
        let _ = state.writer.push(&Frame::Drain);
    }
    drop(state);
    inner.wake_writer.notify_one();
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
                match establish(&inner.opts).await {
                    Ok(e) => {
                        on_connected(&inner, &e);
                        delay = inner.opts.reconnect_delay_min;
                        debug!(service = %inner.opts.service, "reconnected");
                        e
                    }
                    Err(error) => {
                        debug!(%error, ?delay, "reconnect failed");
                        let jitter = Duration::from_millis(
                            u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 50,
                        );
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
            ..
        } = established;
        let write = write_loop(&inner, writer);
        let read = read_loop(&inner, generation, &mut reader, &mut buf);
        let stopped = tokio::select! {
            end = read => { debug!(reason = %end.describe(), "connection read side ended"); false }
            end = write => { debug!(?end, "connection write side ended"); end.is_ok() }
        };
        {
            let mut state = inner.lock();
            state.connected = false;
            // Operations in flight on the dead connection will never be answered.
            for (_, tx) in state.pending_ops.drain() {
                let _ = tx.send(Err(Error::Closed("connection lost".into())));
            }
            if let Some(tx) = state.drained.take() {
                let _ = tx.send(());
            }
        }
        if stopped || *shutdown.borrow() {
            break;
        }
        warn!(service = %inner.opts.service, "connection to the broker lost; reconnecting");
    }
    let mut state = inner.lock();
    state.connected = false;
    for (_, pending) in std::mem::take(&mut state.pending_sends) {
        let _ = pending.done.send(Err(Error::Shutdown));
    }
    state.requests.clear();
}

/// Writes whatever the client queued; ends `Ok` on shutdown after the last flush.
async fn write_loop(inner: &Inner, mut writer: OwnedWriteHalf) -> std::io::Result<()> {
    let mut shutdown = inner.shutdown.subscribe();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        let bytes = inner.lock().writer.take();
        if !bytes.is_empty() {
            writer.write_all(&bytes).await?;
        }
        if *shutdown.borrow() {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        tokio::select! {
            _ = inner.wake_writer.notified() => {}
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

async fn read_loop(
    inner: &Arc<Inner>,
    generation: u64,
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
) -> ReadEnd {
    loop {
        loop {
            match decode_frame(buf, INBOUND_FRAME_BYTES_MAX) {
                Ok(Some(frame)) => {
                    if let Some(end) = handle_frame(inner, generation, frame) {
                        return end;
                    }
                }
                Ok(None) => break,
                Err(e) => return ReadEnd::BadFrame(e.to_string()),
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

fn handle_frame(inner: &Arc<Inner>, generation: u64, frame: Frame) -> Option<ReadEnd> {
    match frame {
        Frame::SendResult(outcomes) => {
            let mut state = inner.lock();
            for o in outcomes {
                if let Some(pending) = state.pending_sends.remove(&o.seq) {
                    let result = if o.code.is_ok() {
                        Ok(())
                    } else {
                        Err(Error::Refused {
                            code: o.code,
                            reason: o.reason,
                        })
                    };
                    let _ = pending.done.send(result);
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
            for d in deliveries {
                let message = Arc::new(d.message);
                if message.kind == Kind::Reply {
                    route_reply(inner, message);
                    continue;
                }
                let handler = {
                    let state = inner.lock();
                    state
                        .subscriptions
                        .iter()
                        .find(|s| courier_proto::pattern_matches(&s.pattern, &message.name))
                        .map(|s| s.handler.clone())
                };
                let Some(handler) = handler else {
                    // Subscribed by another instance of this service, not
                    // handled here: let the broker try elsewhere soon.
                    handler::settle(
                        inner,
                        generation,
                        d.delivery,
                        &message,
                        Some(inner.opts.nack_delay),
                    );
                    continue;
                };
                handler::spawn(
                    handler,
                    Incoming {
                        client: client.clone(),
                        generation,
                        delivery: d.delivery,
                        attempt: d.attempt,
                        message,
                        settled: Arc::new(AtomicBool::new(false)),
                    },
                );
            }
        }
        Frame::Drained => {
            if let Some(tx) = inner.lock().drained.take() {
                let _ = tx.send(());
            }
        }
        Frame::Ping(n) => {
            let _ = inner.lock().writer.push(&Frame::Pong(n));
            inner.wake_writer.notify_one();
        }
        Frame::Pong(_) => {}
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

fn route_reply(inner: &Inner, message: Arc<Message>) {
    let Some(command) = message.response_to else {
        return;
    };
    let mut state = inner.lock();
    let Some(tx) = state.requests.get(&command) else {
        debug!(%command, name = %message.name, "reply for a request nobody awaits; dropped");
        return;
    };
    let is_final = message.is_final;
    if tx.try_send(Ok(Reply { message })).is_err() {
        warn!(%command, "reply buffer full or request dropped; reply discarded");
    }
    if is_final {
        state.requests.remove(&command);
    }
}

use courier_proto::Message;
