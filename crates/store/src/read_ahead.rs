//! Messages decoded from disk before the deliveries that will ask for them.
//!
//! A backlog is not read by one cursor: each ordering key, and each
//! service subscribed to the same names, moves through the log at its own
//! pace, so reads jump between a few positions. The cache therefore keeps
//! what it read until the message is removed (acknowledged everywhere) or
//! room is needed, rather than starting over at every jump: starting over
//! decoded the same records again for each position, hundreds of times per
//! message on a keyed backlog after a restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use courier_proto::Message;

use crate::Seq;

/// Messages decoded by one disk read at most: one scan serves the reads of
/// the messages after it, too.
pub const READ_AHEAD_MESSAGES: usize = 256;
/// At most this many messages are kept decoded from disk.
pub const READ_AHEAD_KEPT_MAX: usize = 8192;
/// At most this many bytes of messages are kept decoded from disk (large
/// payloads fill it before the message count does).
pub const READ_AHEAD_BYTES_MAX: usize = 64 << 20;

#[derive(Default)]
pub(crate) struct ReadAhead {
    messages: BTreeMap<Seq, (Arc<Message>, usize)>,
    bytes: usize,
}

impl ReadAhead {
    pub(crate) fn get(&self, seq: Seq) -> Option<&Arc<Message>> {
        self.messages.get(&seq).map(|(message, _)| message)
    }

    pub(crate) fn contains(&self, seq: Seq) -> bool {
        self.messages.contains_key(&seq)
    }

    /// Keeps `message` (of `size` bytes), then lets go of the messages
    /// furthest ahead until within bounds, never `seq` itself: readers
    /// move forward, so what lies furthest ahead is needed last. (A scan's
    /// messages go in from its last to its first, so when room is short
    /// the ones kept are those asked for first.)
    pub(crate) fn insert(&mut self, seq: Seq, message: Arc<Message>, size: usize) {
        if let Some((_, old)) = self.messages.insert(seq, (message, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.messages.len() > READ_AHEAD_KEPT_MAX || self.bytes > READ_AHEAD_BYTES_MAX {
            let furthest = self
                .messages
                .keys()
                .rev()
                .find(|&&kept| kept != seq)
                .copied();
            match furthest {
                Some(furthest) => self.remove(furthest),
                None => break,
            }
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
        for (_, (_, size)) in self.messages.split_off(&next) {
            self.bytes -= size;
        }
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
    fn room_is_made_by_letting_go_of_what_lies_furthest_ahead() {
        let mut cache = ReadAhead::default();
        for seq in 0..READ_AHEAD_KEPT_MAX as Seq {
            cache.insert(seq, message(), 1);
        }
        let beyond = READ_AHEAD_KEPT_MAX as Seq + 10;
        cache.insert(beyond, message(), 1);
        assert_eq!(cache.messages.len(), READ_AHEAD_KEPT_MAX);
        assert!(cache.contains(beyond), "the one just read stays");
        assert!(!cache.contains(beyond - 11));
        assert!(cache.contains(0));
        cache.insert(5_000_000, message(), 1);
        assert!(cache.contains(5_000_000) && !cache.contains(beyond));
        assert_eq!(cache.messages.len(), READ_AHEAD_KEPT_MAX);
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
        assert!(!cache.contains(3) && cache.contains(10));
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
