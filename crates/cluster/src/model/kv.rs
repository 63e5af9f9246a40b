//! The model's KV buckets (history 1): revisions from the bucket's own
//! sequence, compare-and-set writes, delete markers and keys that age out.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{JetStreamModel, Millis, ModelError};

#[derive(Clone, Debug)]
struct KvRecord {
    revision: u64,
    /// `None`: a delete marker.
    value: Option<Bytes>,
    written_at: Millis,
}

/// A KV bucket with history 1: the last record of each key.
#[derive(Clone, Debug)]
pub(super) struct Bucket {
    /// 0: no max age.
    max_age: Millis,
    /// The bucket's stream sequence: every write takes the next.
    last_revision: u64,
    records: BTreeMap<String, KvRecord>,
}

impl Bucket {
    /// Stores `value` (`None`: a delete marker) under the bucket's next
    /// revision, which it returns.
    fn write(&mut self, key: &str, value: Option<Bytes>, now: Millis) -> u64 {
        self.last_revision += 1;
        let revision = self.last_revision;
        self.records.insert(
            key.to_string(),
            KvRecord {
                revision,
                value,
                written_at: now,
            },
        );
        revision
    }
}

impl JetStreamModel {
    /// Creates a bucket (history 1); `max_age` 0: keys never age out.
    pub fn add_bucket(&mut self, name: &str, max_age: Millis) {
        self.buckets.entry(name.to_string()).or_insert(Bucket {
            max_age,
            last_revision: 0,
            records: BTreeMap::new(),
        });
    }

    fn bucket(&mut self, name: &str, now: Millis) -> Result<&mut Bucket, ModelError> {
        let b = self
            .buckets
            .get_mut(name)
            .ok_or_else(|| ModelError::UnknownBucket(name.to_string()))?;
        if b.max_age > 0 {
            let max_age = b.max_age;
            b.records
                .retain(|_, r| r.written_at.saturating_add(max_age) > now);
        }
        Ok(b)
    }

    /// The key's live value and revision.
    pub fn kv_get(
        &mut self,
        bucket: &str,
        key: &str,
        now: Millis,
    ) -> Result<Option<(Bytes, u64)>, ModelError> {
        let b = self.bucket(bucket, now)?;
        Ok(b.records
            .get(key)
            .and_then(|r| r.value.clone().map(|v| (v, r.revision))))
    }

    /// Writes when the key's last revision (a delete marker's too; 0 when
    /// nothing is stored) is `expected`.
    pub fn kv_update(
        &mut self,
        bucket: &str,
        key: &str,
        value: Bytes,
        expected: u64,
        now: Millis,
    ) -> Result<u64, ModelError> {
        let b = self.bucket(bucket, now)?;
        let actual = b.records.get(key).map_or(0, |r| r.revision);
        if actual != expected {
            return Err(ModelError::WrongRevision {
                key: key.to_string(),
                expected,
                actual,
            });
        }
        Ok(b.write(key, Some(value), now))
    }

    /// Writes only if the key holds no live value (absent, deleted or
    /// aged out).
    pub fn kv_create(
        &mut self,
        bucket: &str,
        key: &str,
        value: Bytes,
        now: Millis,
    ) -> Result<u64, ModelError> {
        let b = self.bucket(bucket, now)?;
        let expected = match b.records.get(key) {
            Some(KvRecord {
                value: None,
                revision,
                ..
            }) => *revision,
            Some(live) => {
                return Err(ModelError::WrongRevision {
                    key: key.to_string(),
                    expected: 0,
                    actual: live.revision,
                })
            }
            None => 0,
        };
        self.kv_update(bucket, key, value, expected, now)
    }

    /// Writes unconditionally.
    pub fn kv_put(
        &mut self,
        bucket: &str,
        key: &str,
        value: Bytes,
        now: Millis,
    ) -> Result<u64, ModelError> {
        let b = self.bucket(bucket, now)?;
        let expected = b.records.get(key).map_or(0, |r| r.revision);
        self.kv_update(bucket, key, value, expected, now)
    }

    /// Leaves a delete marker, if the key's revision is `expected` (when
    /// given).
    pub fn kv_delete(
        &mut self,
        bucket: &str,
        key: &str,
        expected: Option<u64>,
        now: Millis,
    ) -> Result<(), ModelError> {
        let b = self.bucket(bucket, now)?;
        let actual = b.records.get(key).map_or(0, |r| r.revision);
        if let Some(expected) = expected.filter(|e| *e != actual) {
            return Err(ModelError::WrongRevision {
                key: key.to_string(),
                expected,
                actual,
            });
        }
        b.write(key, None, now);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn kv_writes_are_compare_and_set_by_revision_and_keys_age_out() {
        let mut m = JetStreamModel::new();
        m.add_bucket("courier_leases", 10_000);
        let b = "courier_leases";
        let r1 = m.kv_create(b, "scheduler", "a".into(), 0).unwrap();
        assert!(matches!(
            m.kv_create(b, "scheduler", "b".into(), 1),
            Err(ModelError::WrongRevision { .. })
        ));
        let r2 = m.kv_update(b, "scheduler", "a".into(), r1, 3_000).unwrap();
        assert_eq!(
            m.kv_update(b, "scheduler", "a".into(), r1, 3_001),
            Err(ModelError::WrongRevision {
                key: "scheduler".into(),
                expected: r1,
                actual: r2
            })
        );
        assert_eq!(
            m.kv_get(b, "scheduler", 12_999).unwrap(),
            Some(("a".into(), r2))
        );
        assert_eq!(m.kv_get(b, "scheduler", 13_000).unwrap(), None, "aged out");
        // Gone: a stale holder cannot renew; anyone may create.
        assert!(m.kv_update(b, "scheduler", "a".into(), r2, 13_000).is_err());
        let r3 = m.kv_create(b, "scheduler", "b".into(), 13_000).unwrap();
        m.kv_delete(b, "scheduler", Some(r3), 13_001).unwrap();
        assert_eq!(m.kv_get(b, "scheduler", 13_002).unwrap(), None);
        let r4 = m.kv_create(b, "scheduler", "a".into(), 13_002).unwrap();
        assert!(r4 > r3);
        assert!(m.kv_delete(b, "scheduler", Some(r3), 13_003).is_err());
    }
}
