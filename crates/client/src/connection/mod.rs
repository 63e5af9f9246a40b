//! The connection driver: handshake, reading, writing, reconnecting.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use courier_proto::{decode_frame_as, ErrorCode, Frame, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::{Client, ConnectionEvent, Error, Inner, Result, State};

mod establish;
mod frames;

pub(crate) use establish::establish;
use establish::{Reader, Writer};
use frames::handle_frame;

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
    /// Which of the client's addresses this connection is to (`Inner::addresses`).
    pub address: usize,
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
    state.address = established.address;
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
                let last = inner.lock().address;
                let connecting = establish(
                    &inner.opts,
                    &inner.addresses,
                    Some(last),
                    inner.connector.as_ref(),
                );
                match connecting.await {
                    Ok(mut e) => {
                        on_connected(&inner, &mut e);
                        delay = inner.opts.reconnect_delay_min;
                        debug!(service = %inner.service, broker = %inner.address(e.address), "reconnected");
                        e
                    }
                    Err(error) => {
                        debug!(%error, ?delay, "reconnect failed");
                        if let Some(refusal) = identity_refusal(&error) {
                            fail_waiting(&inner, refusal);
                        }
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
        // poll, takes what the frames just handled queued (see `WriteWake`).
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
        let broker = inner.address(inner.lock().address);
        warn!(service = %inner.service, %broker, %reason, "connection to the broker lost; reconnecting");
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

/// Whether the broker refused the handshake for what this client is (its
/// credentials, name or protocol version), which trying again cannot
/// change until the broker's configuration does. Of several brokers, one
/// that refused is enough: the nodes of a cluster share a configuration.
fn identity_refusal(error: &Error) -> Option<&Error> {
    match error {
        Error::Refused {
            code: ErrorCode::Unauthorized | ErrorCode::InvalidName | ErrorCode::UnsupportedVersion,
            ..
        } => Some(error),
        Error::Unreachable { failures } => failures.iter().find_map(|(_, e)| identity_refusal(e)),
        _ => None,
    }
}

/// Answers everything waiting for a connection with `refusal`: sends to
/// be sent again, flushes and requests would otherwise wait for a
/// reconnect the broker refuses. The client keeps trying (the broker's
/// manifest may take it back); what comes later waits for that.
fn fail_waiting(inner: &Inner, refusal: &Error) {
    let refusal = || match refusal {
        Error::Refused { code, reason } => Error::Refused {
            code: *code,
            reason: reason.clone(),
        },
        other => Error::Closed(other.to_string()),
    };
    let mut state = inner.lock();
    for (_, pending) in state.pending_sends.take() {
        let _ = pending.done.send(Err(refusal()));
    }
    for (_, tx) in state.flushes.drain(..) {
        let _ = tx.send(Err(refusal()));
    }
    for (_, waiting) in state.requests.drain() {
        let _ = waiting.replies.try_send(Err(refusal()));
    }
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
            if inner.write_wake.take_request() {
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

/// The driver is reading (`WriteWake::start_reading`) for as long as this
/// lives: it stops on every way out, or writes queued after a lost
/// connection would never wake the writer.
struct Reading<'a>(&'a Inner);

impl<'a> Reading<'a> {
    fn start(inner: &'a Inner) -> Reading<'a> {
        inner.write_wake.start_reading();
        Reading(inner)
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.write_wake.stop_reading();
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
