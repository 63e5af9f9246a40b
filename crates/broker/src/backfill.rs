//! History replay for a new subscription (`from` a seq, a time or the
//! beginning): the retained events in `[from, until)` that match its
//! pattern, `until` being its subscribe record.
//!
//! Reading and decoding the log is the slow part, so a live subscribe
//! reads at most [`BACKFILL_RECORDS_PER_PASS`] records per pass of the
//! core; the network edge lets go of the core's lock between passes, and
//! [`Broker::tick`] runs the next ([`Broker::next_timer`] is due at once
//! while one is unfinished). What it found goes into the queue in one
//! step at the end, exactly as a replay in one pass would have put it:
//! meanwhile the service's newly routed messages wait behind it, in
//! order, so history still comes before them. Recovery replays a
//! subscribe record in one pass; a checkpoint waits until none is
//! unfinished (its state is not in the snapshot).

use super::*;

/// Records (messages and journal entries) read per pass of the core.
pub const BACKFILL_RECORDS_PER_PASS: usize = 4096;

/// A retained event a replay will queue.
#[derive(Debug)]
struct Found {
    seq: Seq,
    key: Option<bytes::Bytes>,
    /// On broker time, as the queue's deferrals are.
    deliver_at: Option<Nanos>,
    rule: Option<usize>,
    bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Backfill {
    pattern: String,
    /// Where the next pass reads from.
    next: Seq,
    until: Seq,
    found: Vec<Found>,
}

/// What waits to enter a service's queue while a replay is unfinished.
#[derive(Debug)]
pub(crate) enum Waiting {
    Backfill(Backfill),
    /// A message routed meanwhile (counted in and referenced already),
    /// with its `deliver_at` on broker time.
    Routed(Entry, Option<Nanos>),
}

impl<S: MessageStore> Broker<S> {
    /// Begins the replay for a live subscribe and runs its first pass.
    pub(crate) fn start_backfill(
        &mut self,
        service: &str,
        pattern: &str,
        from: Seq,
        until: Seq,
        now: Nanos,
    ) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        svc.waiting.push_back(Waiting::Backfill(Backfill {
            pattern: pattern.to_string(),
            next: from,
            until,
            found: Vec::new(),
        }));
        if svc.waiting.len() == 1 {
            self.advance_backfill(service, BACKFILL_RECORDS_PER_PASS, now);
        }
    }

    /// The replay of a subscribe record at recovery: in one pass.
    pub(crate) fn backfill(
        &mut self,
        service: &str,
        pattern: &str,
        from: Seq,
        until: Seq,
        now: Nanos,
    ) {
        self.start_backfill(service, pattern, from, until, now);
        while self
            .services
            .get(service)
            .is_some_and(|s| !s.waiting.is_empty())
        {
            self.advance_backfill(service, usize::MAX, now);
        }
    }

    /// Whether a replay is unfinished (then [`Broker::tick`] goes on with it).
    pub fn backfills_pending(&self) -> bool {
        self.services.values().any(|s| !s.waiting.is_empty())
    }

    /// One pass of every unfinished replay.
    pub(crate) fn continue_backfills(&mut self, now: Nanos) {
        let mut pending: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| !s.waiting.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        pending.sort();
        for service in pending {
            self.advance_backfill(&service, BACKFILL_RECORDS_PER_PASS, now);
            self.pump(&service, now);
        }
    }

    /// Reads up to `max_records` more for the service's first replay; if
    /// it is done, queues what it found and what was routed after it.
    fn advance_backfill(&mut self, service: &str, max_records: usize, now: Nanos) {
        let wall_now = self.wall(now);
        let wall_offset = self.wall_offset;
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let Some(Waiting::Backfill(backfill)) = svc.waiting.front_mut() else {
            return;
        };
        let config = &self.config;
        let (pattern, until, found) = (&backfill.pattern, backfill.until, &mut backfill.found);
        let scanned = if backfill.next >= until {
            Ok(None)
        } else {
            self.store
                .scan_messages_chunk(backfill.next, max_records, &mut |seq, m| {
                    if seq < until
                        && m.kind == Kind::Event
                        && courier_proto::pattern_matches(pattern, &m.name)
                    {
                        let (max_age, _, rule) = config.retention_for(&m.name);
                        // Older than its retention: gone for replays, even
                        // if the log has not reclaimed its segment yet.
                        if wall_now.saturating_sub(m.timestamp) <= max_age {
                            found.push(Found {
                                seq,
                                key: m.key.clone(),
                                deliver_at: m.deliver_at.map(|at| {
                                    at.saturating_add_signed(wall_offset.saturating_neg())
                                }),
                                rule,
                                bytes: m.payload.len() as u64,
                            });
                        }
                    }
                })
        };
        match scanned {
            Ok(Some(next)) if next < until => {
                backfill.next = next;
                return;
            }
            Ok(_) => {}
            Err(e) => self
                .alerts
                .push(format!("history replay for {service} stopped early: {e}")),
        }
        let Some(Waiting::Backfill(done)) = svc.waiting.pop_front() else {
            return;
        };
        let found = self.keep_within_size_limits(done.found);
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let queued = svc.queue.seqs();
        for Found {
            seq,
            key,
            deliver_at,
            bytes,
            ..
        } in found
        {
            if queued.contains(&seq) {
                continue;
            }
            self.refs.add(seq);
            svc.queue.count_in(bytes);
            let entry = Entry::new(seq, 0, key);
            match deliver_at {
                Some(at) if at > now => svc.queue.defer(at, entry),
                _ => svc.queue.make_ready(entry),
            }
        }
        while let Some(Waiting::Routed(..)) = svc.waiting.front() {
            if let Some(Waiting::Routed(entry, deliver_at)) = svc.waiting.pop_front() {
                match deliver_at {
                    Some(at) if at > now => svc.queue.defer(at, entry),
                    _ => svc.queue.make_ready(entry),
                }
            }
        }
    }

    /// Size limits keep the newest events of each rule.
    fn keep_within_size_limits(&self, found: Vec<Found>) -> Vec<Found> {
        let mut used: HashMap<usize, u64> = HashMap::new();
        let mut keep = vec![true; found.len()];
        for (i, f) in found.iter().enumerate().rev() {
            let Some(rule) = f.rule else { continue };
            let max = self.config.retention_rules[rule].max_bytes;
            if max > 0 {
                let total = used.entry(rule).or_insert(0);
                *total += f.bytes;
                keep[i] = *total <= max;
            }
        }
        found
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(f, _)| f)
            .collect()
    }
}
