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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use courier_broker::Action;
    use courier_proto::{Credentials, ErrorFrame, Hello, OpResult, Welcome};
    use courier_store::MemoryStore;

    use super::*;
    use crate::BrokerConfig;

    fn connected_core() -> Broker<Store> {
        let mut core: Broker<Store> =
            Broker::new(BrokerConfig::default(), Box::new(MemoryStore::new()));
        core.connect(1, "web", "web-1", 16);
        core
    }

    #[test]
    fn a_frame_only_the_broker_sends_is_refused_and_named() {
        let mut core = connected_core();
        let frames = [
            Frame::Hello(Hello {
                version: 1,
                service: "web".to_string(),
                instance: String::new(),
                max_in_flight: 1,
                credentials: Credentials::None,
            }),
            Frame::Welcome(Welcome {
                version: 1,
                connection_id: 1,
                frame_bytes_max: 1024,
                broker: "courier".to_string(),
                service: None,
            }),
            Frame::SendResult(Vec::new()),
            Frame::Result(OpResult {
                request: 1,
                code: ErrorCode::MalformedFrame,
                reason: String::new(),
            }),
            Frame::Deliver(Vec::new()),
            Frame::Error(ErrorFrame {
                code: ErrorCode::MalformedFrame,
                message: String::new(),
            }),
            Frame::Drained,
        ];
        for frame in frames {
            let name = frame_name(&frame);
            match apply(&mut core, 1, frame, 0) {
                Err(ReadError::Decode(code, message)) => {
                    assert_eq!(code, ErrorCode::MalformedFrame, "{name}");
                    assert!(message.starts_with(name), "{message}");
                }
                _ => panic!("{name} from a client was taken"),
            }
        }
    }

    #[test]
    fn a_ping_is_answered_with_its_nonce_on_its_connection() {
        let mut core = connected_core();
        assert!(apply(&mut core, 1, Frame::Ping(42), 0).is_ok());
        let mut actions = Vec::new();
        core.take_actions(&mut actions);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Pong { conn: 1, nonce: 42 })),
            "{actions:?}"
        );
    }

    #[test]
    fn every_frame_has_its_own_name() {
        let names = [
            frame_name(&Frame::Drain),
            frame_name(&Frame::Drained),
            frame_name(&Frame::Ping(0)),
            frame_name(&Frame::Pong(0)),
            frame_name(&Frame::Ack(Vec::new())),
            frame_name(&Frame::Nack(Vec::new())),
            frame_name(&Frame::Send(Vec::new())),
            frame_name(&Frame::SendResult(Vec::new())),
            frame_name(&Frame::Deliver(Vec::new())),
            frame_name(&Frame::Flow { max_in_flight: 0 }),
        ];
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
    }
}
