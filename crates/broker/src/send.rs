//! Accepting a send: admission checks, authorization, limits, dedup and
//! durability, answered with a send result.

use super::*;

impl<S: MessageStore> Broker<S> {
    /// A message from `conn`, which numbered it `seq`; answered with a
    /// send result whether accepted or refused.
    pub fn send(&mut self, conn: ConnId, seq: u64, message: impl Into<Arc<Message>>, now: Nanos) {
        self.accept_send(conn, seq, message.into(), false, now);
    }

    /// A QUIET send (PROTOCOL §5.3): answered only if refused, so an
    /// accepted one costs no send result.
    pub fn send_quiet(
        &mut self,
        conn: ConnId,
        seq: u64,
        message: impl Into<Arc<Message>>,
        now: Nanos,
    ) {
        self.accept_send(conn, seq, message.into(), true, now);
    }

    pub(crate) fn accept_send(
        &mut self,
        conn: ConnId,
        seq: u64,
        mut message: Arc<Message>,
        quiet: bool,
        now: Nanos,
    ) {
        self.now = now;
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (sender, admin) = (c.service.clone(), c.admin);
        let checked = self
            .check(&message, now)
            .and_then(|()| self.check_delivery_size(&message, &sender));
        // Only a send that passed the checks takes a token.
        let rate = self.config.send_rate_per_service;
        let has_token = checked.is_err() || rate == 0 || c.send_bucket.take(rate, now);
        if let Err(refusal) = checked {
            self.metrics.refused += 1;
            self.traffic.refused(&message.name, &sender, refusal.0);
            return self.send_result(conn, seq, refusal.0, refusal.1);
        }
        if !has_token {
            self.metrics.refused += 1;
            self.metrics.rate_limited += 1;
            self.traffic
                .refused(&message.name, &sender, ErrorCode::RateLimited);
            let rate = self.config.send_rate_per_service;
            return self.send_result(
                conn,
                seq,
                ErrorCode::RateLimited,
                format!("service {sender} is over its send rate of {rate}/s; retry later (the SDK's send_timeout covers it)"),
            );
        }
        if let Err(reason) = self.authorize_send(&sender, admin, &message) {
            self.metrics.refused += 1;
            self.metrics.unauthorized += 1;
            self.traffic
                .refused(&message.name, &sender, ErrorCode::Unauthorized);
            return self.send_result(conn, seq, ErrorCode::Unauthorized, reason);
        }
        self.dedup.expire(self.wall(now));
        if self.dedup.contains(&message.id) {
            self.metrics.duplicates += 1;
            // "Accepted" says durable: the answer waits for a sync, which
            // covers the first copy if it is still on its way to the disk.
            self.dirty |= self.store.persistent();
            if !quiet {
                self.send_result(conn, seq, ErrorCode::Ok, "duplicate".to_string());
            }
            return;
        }
        if self.degraded
            && !message.transient
            && message.kind != Kind::Reply
            && !message.name.starts_with(SYSTEM_PREFIX)
        {
            self.metrics.refused += 1;
            self.traffic
                .refused(&message.name, &sender, ErrorCode::StorageFailed);
            return self.send_result(
                conn,
                seq,
                ErrorCode::StorageFailed,
                "the broker's disk is failing (full or erroring; see its log): durable messages are refused until it works again — retry later".to_string(),
            );
        }
        let id = message.id;
        let counted = self.traffic.locate(&message.name, &sender);
        // Not shared yet (it was just decoded): no copy is made.
        let stamped = Arc::make_mut(&mut message);
        stamped.timestamp = self.wall(now);
        stamped.sender = sender;
        // Where the log holds it, once routed (0: it holds none).
        let mut log_seq: Seq = 0;
        let outcome = match message.kind {
            Kind::Command if message.name.starts_with(SYSTEM_PREFIX) => {
                let answered = self.system_command(conn, seq, quiet, &message, now);
                if answered.is_ok() {
                    self.tap(&message, Arc::from([]));
                }
                answered
            }
            _ if message.name.starts_with(SYSTEM_PREFIX) => Err((
                ErrorCode::InvalidName,
                format!(
                    "{}: names under {SYSTEM_PREFIX} are reserved for the broker",
                    message.name
                ),
            )),
            Kind::Reply => self.route_reply(conn, seq, quiet, message, now),
            Kind::Command | Kind::Event => self.route(conn, message, now).map(|stored| {
                log_seq = stored;
                ReplyFate::Delivered
            }),
        };
        match outcome {
            // Answered when it goes out to the requester (streams.rs).
            Ok(ReplyFate::Held) => {}
            Ok(ReplyFate::Discarded(reason)) => {
                self.accepted_id(id, now);
                self.metrics.accepted += 1;
                if !quiet {
                    self.send_result(conn, seq, ErrorCode::Ok, reason);
                }
            }
            Ok(ReplyFate::Delivered) => {
                // Only accepted ids count for dedup: a refused send retried
                // with the same id must be tried again, not dropped.
                self.accepted_id(id, now);
                self.metrics.accepted += 1;
                self.traffic.at(counted).sent += 1;
                if quiet {
                    return;
                }
                let result = Action::SendResult {
                    conn,
                    seq,
                    code: ErrorCode::Ok,
                    reason: String::new(),
                    log_seq,
                };
                self.unsynced.push(result);
            }
            Err((code, reason)) => {
                self.metrics.refused += 1;
                self.traffic.at(counted).refuse(code);
                self.send_result(conn, seq, code, reason);
            }
        }
    }

    /// The manifest's word on a send; replies are checked against the
    /// command they answer instead (see `route_reply`).
    pub(crate) fn authorize_send(
        &self,
        sender: &str,
        admin: bool,
        m: &Message,
    ) -> Result<(), String> {
        let Some(manifest) = &self.manifest else {
            return Ok(());
        };
        if m.name.starts_with(SYSTEM_PREFIX) {
            // Any connection may say where it serves: it changes only its
            // own registry entry.
            return if admin || m.name.as_str() == ADVERTISE_COMMAND {
                Ok(())
            } else {
                Err(format!(
                    "{}: only the admin identity may use the broker's {SYSTEM_PREFIX}* commands",
                    m.name
                ))
            };
        }
        match m.kind {
            Kind::Reply => Ok(()),
            Kind::Command | Kind::Event => manifest
                .may_send(sender, &m.name, m.version.major)
                .map_err(|d| d.to_string()),
        }
    }

    /// A PING from `conn`: its PONG queues behind the answers to every
    /// earlier send, durable ones included (they wait for the fsync).
    pub fn ping(&mut self, conn: ConnId, nonce: u64) {
        let action = Action::Pong { conn, nonce };
        if self.unsynced.is_empty() {
            self.actions.push(action);
        } else {
            self.unsynced.push(action);
        }
    }

    /// Remembers an accepted send's id for dedup (and, on a backend, until
    /// its batch is stored: see `batch_ids`).
    fn accepted_id(&mut self, id: uuid::Uuid, now: Nanos) {
        self.dedup.insert(&id, self.wall(now));
        if self.upstream {
            self.batch_ids.push(id);
        }
    }

    pub(crate) fn send_result(&mut self, conn: ConnId, seq: u64, code: ErrorCode, reason: String) {
        // A refusal carries no durability promise, but it must not overtake
        // the acceptance of an earlier send on the same connection.
        let action = Action::SendResult {
            conn,
            seq,
            code,
            reason,
            log_seq: 0,
        };
        if self.unsynced.is_empty() {
            self.actions.push(action);
        } else {
            self.unsynced.push(action);
        }
    }

    pub(crate) fn check(&self, m: &Message, now: Nanos) -> Result<(), (ErrorCode, String)> {
        validate_name(&m.name).map_err(|e| (ErrorCode::InvalidName, e.to_string()))?;
        if m.expires_at.is_some_and(|t| t <= self.wall(now)) {
            return Err((
                ErrorCode::Expired,
                format!(
                    "{} expired before it was sent (expires_at is in the past)",
                    m.name
                ),
            ));
        }
        match (m.kind, m.response_to) {
            (Kind::Reply, None) => Err((
                ErrorCode::InvalidMessage,
                format!(
                    "reply {} has no response_to; a reply names the command it answers",
                    m.name
                ),
            )),
            (Kind::Command | Kind::Event, Some(_)) => Err((
                ErrorCode::InvalidMessage,
                format!(
                    "{} {} has a response_to; only replies answer commands",
                    m.kind.as_str(),
                    m.name
                ),
            )),
            (Kind::Command, None) if !m.headers.is_empty() => streams::requested_window(m)
                .map(|_| ())
                .map_err(|reason| (ErrorCode::InvalidMessage, reason)),
            _ => Ok(()),
        }
    }

    /// Refuses a message whose DELIVER frame would be longer than the frame
    /// limit: the broker never sends a frame above the limit it announced,
    /// so what it could not deliver it does not accept. What the broker
    /// adds to a sent message is the sender (the service name, in place of
    /// whatever the client put there) and 4 bytes of delivery fields.
    pub(crate) fn check_delivery_size(
        &self,
        m: &Message,
        sender: &str,
    ) -> Result<(), (ErrorCode, String)> {
        let max = self.config.frame_bytes_max as usize;
        let len = courier_proto::delivery_frame_len(m) - m.sender.len() + sender.len();
        if len <= max {
            return Ok(());
        }
        let over = len - max;
        Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "{} would be delivered as a DELIVER frame of {len} bytes, {over} byte(s) over the broker's frame limit of {max}: \
                 the broker adds the sender ({} bytes, the service name) and 4 bytes of delivery fields to what was sent; \
                 make the payload at least {over} byte(s) smaller",
                m.name,
                sender.len()
            ),
        ))
    }
}
