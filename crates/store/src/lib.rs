//! The storage interface behind Courier's delivery logic, and the in-memory
//! implementation used for transient runs and tests.
//!
//! Architecture invariant: the broker core reaches messages only through
//! [`MessageStore`]; the durable log implements the same trait, so the
//! delivery rules never change with the storage engine.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use courier_proto::Message;
use thiserror::Error;

/// Position of a message in the store; assigned on append, increasing.
pub type Seq = u64;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("storage is full: {0}")]
    Full(String),
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Where accepted messages live until every entitled service has acked them.
///
/// `append` may buffer; nothing appended counts as durable until `sync`
/// returns `Ok`. The broker calls `sync` once per batch of work (group
/// commit) and only then acknowledges the sends in that batch.
pub trait MessageStore: Send {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError>;
    fn get(&self, seq: Seq) -> Option<Arc<Message>>;
    /// The message is no longer needed by anyone.
    fn remove(&mut self, seq: Seq);
    /// Makes every append so far durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Messages held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps messages in a hash map; nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    messages: HashMap<Seq, Arc<Message>>,
    next_seq: Seq,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl MessageStore for MemoryStore {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        self.next_seq += 1;
        self.messages.insert(self.next_seq, message);
        Ok(self.next_seq)
    }

    fn get(&self, seq: Seq) -> Option<Arc<Message>> {
        self.messages.get(&seq).cloned()
    }

    fn remove(&mut self, seq: Seq) {
        self.messages.remove(&seq);
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn len(&self) -> usize {
        self.messages.len()
    }
}

/// Lets the server pick a storage engine at run time.
impl<T: MessageStore + ?Sized> MessageStore for Box<T> {
    fn append(&mut self, message: Arc<Message>) -> Result<Seq, StoreError> {
        (**self).append(message)
    }
    fn get(&self, seq: Seq) -> Option<Arc<Message>> {
        (**self).get(seq)
    }
    fn remove(&mut self, seq: Seq) {
        (**self).remove(seq)
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        (**self).sync()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::Kind;

    #[test]
    fn append_get_remove() {
        let mut store = MemoryStore::new();
        let a = store
            .append(Arc::new(Message::new(Kind::Event, "a", "1")))
            .expect("append");
        let b = store
            .append(Arc::new(Message::new(Kind::Event, "b", "2")))
            .expect("append");
        assert!(b > a);
        assert_eq!(store.get(a).map(|m| m.name.clone()), Some("a".to_string()));
        store.remove(a);
        assert!(store.get(a).is_none());
        assert_eq!(store.len(), 1);
    }
}
