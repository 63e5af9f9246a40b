//! Applying a client's frame to the broker core.

use courier_broker::{Broker, ConnId, Nanos};
use courier_proto::{ErrorCode, Frame};

use crate::connection::ReadError;
use crate::Store;

/// Applies one client frame; an error when the frame is not one a client
/// may send. The connection then closes with an ERROR, sent like one for a
/// malformed frame: after the answers to the frames before it.
pub(crate) fn apply(
    core: &mut Broker<Store>,
    conn: ConnId,
    frame: Frame,
    now: Nanos,
) -> Result<(), ReadError> {
    match frame {
        Frame::Send(entries) => {
            for entry in entries {
                if entry.quiet {
                    core.send_quiet(conn, entry.seq, entry.message, now);
                } else {
                    core.send(conn, entry.seq, entry.message, now);
                }
            }
        }
        Frame::Subscribe(s) => core.subscribe(
            conn,
            s.request,
            &s.pattern,
            s.ack_deadline_ms,
            s.max_deliveries,
            s.start,
            now,
        ),
        Frame::Unsubscribe { request, pattern } => core.unsubscribe(conn, request, &pattern),
        Frame::Ack(ids) => {
            for id in ids {
                core.ack(conn, id, now);
            }
        }
        Frame::Nack(entries) => {
            for n in entries {
                core.nack(conn, n.delivery, n.delay_ms, now);
            }
        }
        Frame::Flow { max_in_flight } => core.flow(conn, max_in_flight, now),
        Frame::Ping(nonce) => core.ping(conn, nonce),
        Frame::Pong(_) => {}
        Frame::Drain => core.drain(conn),
        other @ (Frame::Hello(_)
        | Frame::Welcome(_)
        | Frame::SendResult(_)
        | Frame::Result(_)
        | Frame::Deliver(_)
        | Frame::Error(_)
        | Frame::Drained) => {
            return Err(ReadError::Decode(
                ErrorCode::MalformedFrame,
                format!(
                    "{} is not a frame a client may send after the handshake",
                    frame_name(&other)
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "HELLO",
        Frame::Welcome(_) => "WELCOME",
        Frame::Send(_) => "SEND",
        Frame::SendResult(_) => "SEND_RESULT",
        Frame::Subscribe(_) => "SUBSCRIBE",
        Frame::Unsubscribe { .. } => "UNSUBSCRIBE",
        Frame::Result(_) => "RESULT",
        Frame::Deliver(_) => "DELIVER",
        Frame::Ack(_) => "ACK",
        Frame::Nack(_) => "NACK",
        Frame::Flow { .. } => "FLOW",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::Error(_) => "ERROR",
        Frame::Drain => "DRAIN",
        Frame::Drained => "DRAINED",
    }
}
