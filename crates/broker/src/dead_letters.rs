//! Dead letters: listing, finding, reviving and purging them.

use super::*;

/// One page of a service's dead letters ([`Broker::dead_letters_page`]).
#[derive(Debug)]
pub struct DeadLetterPage {
    /// By id, with their messages (`None` if unreadable).
    pub letters: Vec<(DeadLetter, Option<Arc<Message>>)>,
    /// How many there are after `after` in all, the page's included.
    pub total_after: usize,
}

impl DeadLetterPage {
    /// The next page's `after`, if one follows.
    pub fn rest_after(&self) -> Option<Seq> {
        if self.total_after > self.letters.len() {
            self.letters.last().map(|(d, _)| d.seq)
        } else {
            None
        }
    }
}

impl<S: MessageStore> Broker<S> {
    /// The service's dead letters with their messages (`None` if
    /// unreadable): each one is a read from the store, so listings a
    /// caller pages through use [`Broker::dead_letters_page`].
    pub fn dead_letters(&mut self, service: &str) -> Vec<(DeadLetter, Option<Arc<Message>>)> {
        let letters: Vec<DeadLetter> = self
            .services
            .get(service)
            .map(|s| s.queue.dead_letters.to_vec())
            .unwrap_or_default();
        letters
            .into_iter()
            .map(|d| {
                let message = self.store.get(d.seq).ok().flatten();
                (d, message)
            })
            .collect()
    }

    /// One page of the service's dead letters by id: those whose id is
    /// larger than `after`, at most `limit`, with their messages, and how
    /// many there are after `after` in all. Only the page's messages are
    /// read from the store, so a page costs the broker `limit` reads
    /// however many dead letters there are.
    pub fn dead_letters_page(&mut self, service: &str, after: Seq, limit: usize) -> DeadLetterPage {
        let mut letters: Vec<&DeadLetter> = self
            .services
            .get(service)
            .map(|s| {
                s.queue
                    .dead_letters
                    .iter()
                    .filter(|d| d.seq > after)
                    .collect()
            })
            .unwrap_or_default();
        let total = letters.len();
        letters.sort_unstable_by_key(|d| d.seq);
        letters.truncate(limit);
        let page: Vec<DeadLetter> = letters.into_iter().cloned().collect();
        let letters = page
            .into_iter()
            .map(|d| {
                let message = self.store.get(d.seq).ok().flatten();
                (d, message)
            })
            .collect();
        DeadLetterPage {
            letters,
            total_after: total,
        }
    }

    /// How many dead letters the service holds; `None` for a service the
    /// broker does not know.
    pub fn dead_letter_count(&self, service: &str) -> Option<usize> {
        self.services
            .get(service)
            .map(|s| s.queue.dead_letters.len())
    }

    /// One dead letter of the service with its message (`None` inside if
    /// unreadable); `None` if the service has no such dead letter.
    pub fn find_dead_letter(
        &mut self,
        service: &str,
        seq: Seq,
    ) -> Option<(DeadLetter, Option<Arc<Message>>)> {
        let letter = self
            .services
            .get(service)?
            .queue
            .dead_letters
            .iter()
            .find(|d| d.seq == seq)?
            .clone();
        let message = self.store.get(seq).ok().flatten();
        Some((letter, message))
    }

    /// Puts a dead letter back in the service's queue, as a fresh message.
    pub fn revive(&mut self, service: &str, seq: Seq, now: Nanos) -> Result<(), String> {
        self.now = now;
        let (key, bytes) = match self.store.get(seq) {
            Ok(Some(m)) => (m.key.clone(), m.payload.len() as u64),
            Ok(None) => return Err(format!("message {seq} is no longer stored")),
            Err(e) => return Err(format!("message {seq} cannot be read: {e}")),
        };
        let svc = self
            .services
            .get_mut(service)
            .ok_or_else(|| format!("service {service} has no dead letters"))?;
        let position = svc
            .queue
            .dead_letters
            .iter()
            .position(|d| d.seq == seq)
            .ok_or_else(|| format!("service {service} has no dead letter {seq}"))?;
        svc.queue.dead_letters.remove(position);
        svc.queue.count_in(bytes);
        svc.queue.make_ready(Entry::new(seq, 0, key));
        self.journal(Op::Revived {
            service: service.to_string(),
            seq,
        });
        self.pump(service, now);
        Ok(())
    }

    /// Deletes the service's dead letters (all of them, or those listed).
    pub fn purge(&mut self, service: &str, only: Option<&[Seq]>) -> usize {
        let Some(svc) = self.services.get_mut(service) else {
            return 0;
        };
        let (gone, kept): (Vec<DeadLetter>, Vec<DeadLetter>) =
            std::mem::take(&mut svc.queue.dead_letters)
                .into_iter()
                .partition(|d| only.is_none_or(|list| list.contains(&d.seq)));
        svc.queue.dead_letters = kept;
        let seqs: Vec<Seq> = gone.iter().map(|d| d.seq).collect();
        for seq in &seqs {
            release(&mut self.store, &mut self.refs, *seq);
        }
        if !seqs.is_empty() {
            self.journal(Op::Purged {
                service: service.to_string(),
                seqs: seqs.clone(),
            });
        }
        seqs.len()
    }
}

/// An admin's `courier.dead-letters.*` command on a backend that keeps the
/// dead letters itself ([`Broker::delivers_upstream`]): its arguments,
/// already checked; the edge reads or changes the backend's dead letters
/// and hands the outcome back with [`Broker::dead_letters_answered`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterQuery {
    List {
        service: String,
        after: Seq,
        limit: usize,
    },
    Show {
        service: String,
        id: Seq,
    },
    /// Delivered again to the service, as a new message (attempts start
    /// over), and no longer a dead letter.
    Replay {
        service: String,
        id: Seq,
    },
    /// One dead letter, or all of the service's.
    Purge {
        service: String,
        id: Option<Seq>,
    },
}

impl DeadLetterQuery {
    /// The command that asked.
    pub fn command(&self) -> &'static str {
        match self {
            DeadLetterQuery::List { .. } => "courier.dead-letters.list",
            DeadLetterQuery::Show { .. } => "courier.dead-letters.show",
            DeadLetterQuery::Replay { .. } => "courier.dead-letters.replay",
            DeadLetterQuery::Purge { .. } => "courier.dead-letters.purge",
        }
    }

    pub fn service(&self) -> &str {
        match self {
            DeadLetterQuery::List { service, .. }
            | DeadLetterQuery::Show { service, .. }
            | DeadLetterQuery::Replay { service, .. }
            | DeadLetterQuery::Purge { service, .. } => service,
        }
    }
}

/// What a `courier.dead-letters.*` command found or did: the same
/// answers on one broker and on a backend.
#[derive(Debug)]
pub enum DeadLetterFound {
    /// A page of at most `limit` (the limit asked for: the note of a cut
    /// page names it).
    Listing {
        page: DeadLetterPage,
        limit: usize,
    },
    Letter(DeadLetter, Option<Arc<Message>>),
    Replayed {
        service: String,
        id: Seq,
    },
    Purged {
        service: String,
        purged: usize,
    },
}

impl DeadLetterFound {
    /// The reply's name and JSON body.
    pub(crate) fn answer(&self) -> (&'static str, serde_json::Value) {
        use serde_json::json;
        match self {
            DeadLetterFound::Listing { page, limit } => {
                let mut letters: Vec<serde_json::Value> = page
                    .letters
                    .iter()
                    .map(|(d, m)| admin::dead_letter_json(d, m.as_ref(), false))
                    .collect();
                if let Some(rest_after) = page.rest_after() {
                    letters.push(json!({
                        "truncated": true,
                        "shown": page.letters.len(),
                        "total": page.total_after,
                        "reason": format!("a page holds at most {limit} (limit)"),
                        "rest_after": rest_after,
                    }));
                }
                ("courier.dead-letters.listing", json!(letters))
            }
            DeadLetterFound::Letter(d, m) => (
                "courier.dead-letter",
                admin::dead_letter_json(d, m.as_ref(), true),
            ),
            DeadLetterFound::Replayed { service, id } => (
                "courier.dead-letters.replayed",
                json!({"service": service, "id": id}),
            ),
            DeadLetterFound::Purged { service, purged } => (
                "courier.dead-letters.purged",
                json!({"service": service, "purged": purged}),
            ),
        }
    }
}

/// The edge's outcome of an [`Action::DeadLetterQuery`], for
/// [`Broker::dead_letters_answered`].
#[derive(Debug)]
pub struct DeadLetterAnswer {
    pub conn: ConnId,
    /// The command's send, answered now.
    pub seq: u64,
    pub quiet: bool,
    /// The command's id and activity, which the reply carries.
    pub request: Uuid,
    pub activity_id: Uuid,
    pub command: &'static str,
    /// What was found or done, or why the command is refused.
    pub found: Result<DeadLetterFound, (ErrorCode, String)>,
}

impl<S: MessageStore> Broker<S> {
    /// Answers a `courier.dead-letters.*` command the edge carried out
    /// ([`Action::DeadLetterQuery`]): the reply, then the command's send
    /// result — or the send's refusal, as on one broker.
    pub fn dead_letters_answered(&mut self, answer: DeadLetterAnswer, now: Nanos) {
        self.now = now;
        let DeadLetterAnswer {
            conn,
            seq,
            quiet,
            request,
            activity_id,
            command,
            found,
        } = answer;
        let replied = found.and_then(|found| {
            let (outcome, body) = found.answer();
            let reply = self.admin_reply(request, activity_id, command, outcome, body, now)?;
            self.deliver_untracked(conn, Arc::new(reply));
            Ok(())
        });
        let (code, reason) = match replied {
            Ok(()) => (ErrorCode::Ok, String::new()),
            Err(refusal) => refusal,
        };
        self.forwarded_reply_answer(conn, seq, quiet, code, reason);
    }
}
