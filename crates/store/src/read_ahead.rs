//! Messages decoded from disk before the deliveries that will ask for them.
//!
//! A backlog is not read by one cursor: each ordering key, and each
//! service subscribed to the same names, moves through the log at its own
//! pace, so reads jump between a few positions. The cache therefore keeps
//! what it read until the message is removed (acknowledged everywhere) or
//! room is needed, rather than starting over at every jump: starting over
//! decoded the same records again for each position, hundreds of times per
//! message on a keyed backlog after a restart.
//!
//! Room is made by letting go of what was read longest ago: a message read
//! ahead that nobody asks for (it waits for a service that is away) ages
//! out, where letting go of what lies furthest ahead would keep it for
//! ever and leave no room for the reads that move on.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use courier_proto::Message;

use crate::Seq;

/// Messages decoded by one disk read at most: one scan serves the reads of
/// the messages after it, too.
pub const READ_AHEAD_MESSAGES: usize = 256;
/// At most this many messages are kept decoded from disk.
pub const READ_AHEAD_KEPT_MAX: usize = 4096;
/// At most this many bytes of messages are kept decoded from disk (large
/// payloads fill it before the message count does).
pub const READ_AHEAD_BYTES_MAX: usize = 16 << 20;

#[derive(Default)]
pub(crate) struct ReadAhead {
    messages: HashMap<Seq, (Arc<Message>, usize)>,
    /// Seqs in the order they were read; some may have been removed since
    /// (skipped when met, dropped when they outnumber the kept ones).
    order: VecDeque<Seq>,
    bytes: usize,
}

impl ReadAhead {
    pub(crate) fn get(&self, seq: Seq) -> Option<&Arc<Message>> {
        self.messages.get(&seq).map(|(message, _)| message)
    }

    pub(crate) fn contains(&self, seq: Seq) -> bool {
        self.messages.contains_key(&seq)
    }

    /// Keeps `message` (of `size` bytes), then lets go of what was read
    /// longest ago until within bounds, never `seq` itself.
    pub(crate) fn insert(&mut self, seq: Seq, message: Arc<Message>, size: usize) {
        match self.messages.insert(seq, (message, size)) {
            Some((_, old)) => self.bytes -= old,
            None => self.order.push_back(seq),
        }
        self.bytes += size;
        while self.messages.len() > READ_AHEAD_KEPT_MAX || self.bytes > READ_AHEAD_BYTES_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if oldest == seq {
                self.order.push_back(seq);
                if self.messages.len() == 1 {
                    break;
                }
                continue;
            }
            if let Some((_, size)) = self.messages.remove(&oldest) {
                self.bytes -= size;
            }
        }
        if self.order.len() > 2 * self.messages.len() + 64 {
            let messages = &self.messages;
            self.order.retain(|s| messages.contains_key(s));
        }
    }

    pub(crate) fn remove(&mut self, seq: Seq) {
        if let Some((_, size)) = self.messages.remove(&seq) {
            self.bytes -= size;
        }
    }

    /// Forgets every message from `next` on: their seqs were cut from the
    /// log and may be issued again.
    pub(crate) fn forget_from(&mut self, next: Seq) {
        let bytes = &mut self.bytes;
        self.messages.retain(|&seq, (_, size)| {
            let keep = seq < next;
            if !keep {
                *bytes -= *size;
            }
            keep
        });
        self.order.retain(|&seq| seq < next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Kind;

    fn message() -> Arc<Message> {
        Arc::new(Message::new(Kind::Event, "a", &b""[..]))
    }

    #[test]
    fn room_is_made_by_letting_go_of_what_was_read_longest_ago() {
        let mut cache = ReadAhead::default();
        // Read long ago and never asked for (a service that is away).
        for seq in 0..100 {
            cache.insert(seq, message(), 1);
        }
        for seq in 1000..1000 + READ_AHEAD_KEPT_MAX as Seq {
            cache.insert(seq, message(), 1);
        }
        assert_eq!(cache.messages.len(), READ_AHEAD_KEPT_MAX);
        assert!(!cache.contains(99), "the oldest reads went first");
        assert!(cache.contains(1000) && cache.contains(999 + READ_AHEAD_KEPT_MAX as Seq));
        // Removed ones leave stale places in the order: skipped, and the
        // order does not grow without bound.
        for seq in 1000..1000 + READ_AHEAD_KEPT_MAX as Seq {
            cache.remove(seq);
        }
        for seq in 10_000..10_000 + 4 * READ_AHEAD_KEPT_MAX as Seq {
            cache.insert(seq, message(), 1);
        }
        assert_eq!(cache.messages.len(), READ_AHEAD_KEPT_MAX);
        assert!(cache.order.len() <= 2 * READ_AHEAD_KEPT_MAX + 64);
        assert!(cache.contains(10_000 + 4 * READ_AHEAD_KEPT_MAX as Seq - 1));
    }

    #[test]
    fn bytes_bound_the_cache_too() {
        let mut cache = ReadAhead::default();
        let big = READ_AHEAD_BYTES_MAX / 4;
        for seq in 0..4 {
            cache.insert(seq, message(), big);
        }
        assert_eq!(cache.messages.len(), 4);
        cache.insert(10, message(), big);
        assert_eq!(cache.messages.len(), 4);
        assert!(!cache.contains(0) && cache.contains(10));
        cache.insert(20, message(), READ_AHEAD_BYTES_MAX * 2);
        assert!(
            cache.contains(20),
            "one message larger than the bound is still served"
        );
        assert_eq!(cache.messages.len(), 1);
        cache.remove(20);
        assert_eq!((cache.messages.len(), cache.bytes), (0, 0));
    }

    #[test]
    fn seqs_cut_from_the_log_are_forgotten() {
        let mut cache = ReadAhead::default();
        for seq in 0..10 {
            cache.insert(seq, message(), 5);
        }
        cache.forget_from(6);
        assert_eq!((cache.messages.len(), cache.bytes), (6, 30));
        assert!(cache.get(5).is_some() && cache.get(6).is_none());
    }
}
