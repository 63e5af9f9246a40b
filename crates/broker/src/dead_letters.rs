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
