//! The broker's journal: every delivery-state change that must survive a
//! crash, as records in the store's log, in order with the messages.
//!
//! Recovery is a replay: messages are routed again to the services
//! subscribed at that point of the log, and each journal entry is applied
//! where it stood. The layout of each entry is specified in
//! `docs/STORAGE.md` ("Journal entries"); keep the two in step.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::Nanos;
use courier_store::Seq;

/// One change of delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Subscribe {
        service: String,
        pattern: String,
        ack_deadline_ms: u32,
        max_deliveries: u32,
        /// Where history replay started for this subscription (0: none).
        from_seq: Seq,
    },
    Unsubscribe {
        service: String,
        pattern: String,
    },
    /// A delivery attempt began (attempt counts survive restarts).
    Delivered {
        service: String,
        seq: Seq,
    },
    Acked {
        service: String,
        seq: Seq,
    },
    /// Retry not before `until`.
    Nacked {
        service: String,
        seq: Seq,
        until: Nanos,
    },
    DeadLettered {
        service: String,
        seq: Seq,
        attempts: u32,
        reason: String,
        at: Nanos,
    },
    /// A dead letter goes back to the queue.
    Revived {
        service: String,
        seq: Seq,
    },
    /// Dead letters deleted for good.
    Purged {
        service: String,
        seqs: Vec<Seq>,
    },
    /// An operator paused the service's subscription to `pattern`: its
    /// messages wait until it is resumed.
    Paused {
        service: String,
        pattern: String,
    },
    Resumed {
        service: String,
        pattern: String,
    },
}

mod tag {
    pub const SUBSCRIBE: u8 = 1;
    pub const UNSUBSCRIBE: u8 = 2;
    pub const DELIVERED: u8 = 3;
    pub const ACKED: u8 = 4;
    pub const NACKED: u8 = 5;
    pub const DEAD_LETTERED: u8 = 6;
    pub const REVIVED: u8 = 7;
    pub const PURGED: u8 = 8;
    pub const PAUSED: u8 = 9;
    pub const RESUMED: u8 = 10;
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JournalError {
    #[error("journal entry ends early at byte {offset}")]
    Truncated { offset: usize },
    #[error("unknown journal entry tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("journal text at byte {offset} is not UTF-8")]
    Utf8 { offset: usize },
    #[error("snapshot does not start with the magic \"CRSN\" version 1")]
    BadSnapshot,
}

pub(crate) struct Writer(pub BytesMut);

impl Writer {
    pub fn new() -> Writer {
        // Room for the common entries (a tag, a service name, a seq)
        // without growing.
        Writer(BytesMut::with_capacity(64))
    }
    pub fn u8(&mut self, v: u8) {
        self.0.put_u8(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.put_u32(v);
    }
    pub fn u64(&mut self, v: u64) {
        self.0.put_u64(v);
    }
    pub fn bytes(&mut self, v: &[u8]) {
        // Journal strings are names (≤ 255 bytes) and reasons (bounded by
        // their producers); u32 keeps the format free of a silent cut.
        self.0.put_u32(v.len() as u32);
        self.0.put_slice(v);
    }
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
}

pub(crate) struct Reader {
    buf: Bytes,
    start_len: usize,
}

impl Reader {
    pub fn new(buf: Bytes) -> Reader {
        let start_len = buf.len();
        Reader { buf, start_len }
    }
    fn offset(&self) -> usize {
        self.start_len - self.buf.len()
    }
    fn need(&self, n: usize) -> Result<(), JournalError> {
        if self.buf.remaining() < n {
            return Err(JournalError::Truncated {
                offset: self.offset(),
            });
        }
        Ok(())
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn u8(&mut self) -> Result<u8, JournalError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    pub fn u32(&mut self) -> Result<u32, JournalError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    pub fn u64(&mut self) -> Result<u64, JournalError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    pub fn bytes(&mut self) -> Result<Bytes, JournalError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }
    /// A length-prefixed 16-byte id, copied out: slicing the shared buffer
    /// for each of a million ids made a snapshot slow to load.
    pub fn id(&mut self) -> Result<[u8; 16], JournalError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        if len != 16 {
            return Err(JournalError::BadSnapshot);
        }
        let mut id = [0u8; 16];
        self.buf.copy_to_slice(&mut id);
        Ok(id)
    }
    pub fn str(&mut self) -> Result<String, JournalError> {
        let offset = self.offset();
        let raw = self.bytes()?;
        String::from_utf8(raw.to_vec()).map_err(|_| JournalError::Utf8 { offset })
    }
}

impl Op {
    /// Changes beyond delivery bookkeeping: losing one in a failed sync
    /// means the state in memory no longer matches the disk.
    pub fn is_structural(&self) -> bool {
        !matches!(
            self,
            Op::Delivered { .. } | Op::Acked { .. } | Op::Nacked { .. }
        )
    }

    pub fn encode(&self) -> BytesMut {
        let mut w = Writer::new();
        match self {
            Op::Subscribe {
                service,
                pattern,
                ack_deadline_ms,
                max_deliveries,
                from_seq,
            } => {
                w.u8(tag::SUBSCRIBE);
                w.str(service);
                w.str(pattern);
                w.u32(*ack_deadline_ms);
                w.u32(*max_deliveries);
                w.u64(*from_seq);
            }
            Op::Unsubscribe { service, pattern } => {
                w.u8(tag::UNSUBSCRIBE);
                w.str(service);
                w.str(pattern);
            }
            Op::Delivered { service, seq } => {
                w.u8(tag::DELIVERED);
                w.str(service);
                w.u64(*seq);
            }
            Op::Acked { service, seq } => {
                w.u8(tag::ACKED);
                w.str(service);
                w.u64(*seq);
            }
            Op::Nacked {
                service,
                seq,
                until,
            } => {
                w.u8(tag::NACKED);
                w.str(service);
                w.u64(*seq);
                w.u64(*until);
            }
            Op::DeadLettered {
                service,
                seq,
                attempts,
                reason,
                at,
            } => {
                w.u8(tag::DEAD_LETTERED);
                w.str(service);
                w.u64(*seq);
                w.u32(*attempts);
                w.str(reason);
                w.u64(*at);
            }
            Op::Revived { service, seq } => {
                w.u8(tag::REVIVED);
                w.str(service);
                w.u64(*seq);
            }
            Op::Purged { service, seqs } => {
                w.u8(tag::PURGED);
                w.str(service);
                w.u32(seqs.len() as u32);
                for s in seqs {
                    w.u64(*s);
                }
            }
            Op::Paused { service, pattern } => {
                w.u8(tag::PAUSED);
                w.str(service);
                w.str(pattern);
            }
            Op::Resumed { service, pattern } => {
                w.u8(tag::RESUMED);
                w.str(service);
                w.str(pattern);
            }
        }
        w.0
    }

    pub fn decode(bytes: Bytes) -> Result<Op, JournalError> {
        let mut r = Reader::new(bytes);
        let op = match r.u8()? {
            tag::SUBSCRIBE => Op::Subscribe {
                service: r.str()?,
                pattern: r.str()?,
                ack_deadline_ms: r.u32()?,
                max_deliveries: r.u32()?,
                from_seq: r.u64()?,
            },
            tag::UNSUBSCRIBE => Op::Unsubscribe {
                service: r.str()?,
                pattern: r.str()?,
            },
            tag::DELIVERED => Op::Delivered {
                service: r.str()?,
                seq: r.u64()?,
            },
            tag::ACKED => Op::Acked {
                service: r.str()?,
                seq: r.u64()?,
            },
            tag::NACKED => Op::Nacked {
                service: r.str()?,
                seq: r.u64()?,
                until: r.u64()?,
            },
            tag::DEAD_LETTERED => Op::DeadLettered {
                service: r.str()?,
                seq: r.u64()?,
                attempts: r.u32()?,
                reason: r.str()?,
                at: r.u64()?,
            },
            tag::REVIVED => Op::Revived {
                service: r.str()?,
                seq: r.u64()?,
            },
            tag::PURGED => {
                let service = r.str()?;
                let count = r.u32()? as usize;
                let mut seqs = Vec::with_capacity(count.min(r.buf.remaining() / 8));
                for _ in 0..count {
                    seqs.push(r.u64()?);
                }
                Op::Purged { service, seqs }
            }
            tag::PAUSED => Op::Paused {
                service: r.str()?,
                pattern: r.str()?,
            },
            tag::RESUMED => Op::Resumed {
                service: r.str()?,
                pattern: r.str()?,
            },
            tag => return Err(JournalError::UnknownTag { tag }),
        };
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_roundtrips() {
        let ops = vec![
            Op::Subscribe {
                service: "todo".into(),
                pattern: "todo.*".into(),
                ack_deadline_ms: 30_000,
                max_deliveries: 5,
                from_seq: 7,
            },
            Op::Unsubscribe {
                service: "todo".into(),
                pattern: "todo.*".into(),
            },
            Op::Delivered {
                service: "a".into(),
                seq: 1,
            },
            Op::Acked {
                service: "a".into(),
                seq: 1,
            },
            Op::Nacked {
                service: "a".into(),
                seq: 1,
                until: 99,
            },
            Op::DeadLettered {
                service: "a".into(),
                seq: 1,
                attempts: 5,
                reason: "nacked on attempt 5 of 5".into(),
                at: 3,
            },
            Op::Revived {
                service: "a".into(),
                seq: 1,
            },
            Op::Purged {
                service: "a".into(),
                seqs: vec![1, 2, 3],
            },
            Op::Paused {
                service: "audit".into(),
                pattern: "todo.*".into(),
            },
            Op::Resumed {
                service: "audit".into(),
                pattern: "todo.*".into(),
            },
        ];
        for op in ops {
            assert_eq!(Op::decode(op.encode().freeze()), Ok(op.clone()));
            let bytes = op.encode().freeze();
            for cut in 0..bytes.len() {
                assert!(
                    Op::decode(bytes.slice(..cut)).is_err(),
                    "{op:?} cut at {cut}"
                );
            }
        }
    }
}
