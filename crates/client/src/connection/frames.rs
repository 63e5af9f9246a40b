//! What the broker's frames do to the client's state: acceptances,
//! results, deliveries to handlers, replies to waiting requests.

use std::sync::Arc;

use courier_proto::{Frame, Kind};
use tracing::{debug, warn};

use crate::handler::{self, Delivered, Handler, Incoming};
use crate::{Client, Error, Inner, Reply};
use courier_proto::Message;

use super::*;

pub(crate) fn handle_frame(
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
                    let found = inner.lock().subscriptions.handler_for(&d.message.name);
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

pub(crate) fn route_reply(inner: &Inner, generation: u64, delivery: u64, message: Arc<Message>) {
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
