//! The dedup window: the ids of accepted messages, each remembered for at
//! least the window after it was accepted, at most `capacity` of them.
//!
//! One hash set of a million fingerprints cost 36 MiB, and every send
//! probed it at a random place: a cache miss per message, the largest
//! single cost of a transient send. Ids are UUID v7, whose first 48 bits
//! are the sender's clock in milliseconds, so an id sent now belongs with
//! the other ids of this moment. The window therefore keeps buckets by the
//! id's own timestamp ([`BUCKET_MS`] each): the bucket being filled is a
//! small hash set that stays in cache; once the clock has moved past it,
//! it is sealed into a sorted array (8 bytes an id) searched by bisection,
//! and whole buckets expire at once. Ids that carry no v7 timestamp close
//! to the broker's clock (other versions, skewed clocks, retries from long
//! ago) go to a plain expiring map instead, so nothing is forgotten early.
//!
//! An id is kept as its 64-bit fingerprint (`fingerprint`), as before.

use std::collections::{BTreeSet, HashSet, VecDeque};

use uuid::Uuid;

use crate::expiring::ExpiringMap;
use crate::Nanos;

const NANOS_PER_MS: u64 = 1_000_000;
/// Id timestamps per bucket. Small enough that the bucket being filled
/// stays in cache at a million sends a second.
pub(crate) const BUCKET_MS: u64 = 32;
/// How far an id's timestamp may be from the broker's clock, either way,
/// and still go to the buckets. Ids further off go to the plain map.
pub(crate) const SKEW_MS: u64 = 5_000;
/// A bucket is sealed once the clock is this far past its end: late ids of
/// the same moment still find it open.
const SEAL_AFTER_MS: u64 = 2 * BUCKET_MS;
/// A sealed bucket is sealed again once its late ids are this fraction of
/// it (one in 8): merging them in costs, per late id, 8 ids' worth of
/// copying.
const RESEAL_FRACTION: usize = 8;

type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

#[derive(Default)]
struct Bucket {
    open: FastSet<u64>,
    /// Sorted.
    sealed: Vec<u64>,
}

impl Bucket {
    fn contains(&self, fp: u64) -> bool {
        self.open.contains(&fp) || self.sealed.binary_search(&fp).is_ok()
    }

    fn len(&self) -> usize {
        self.open.len() + self.sealed.len()
    }

    /// Moves the open set into the sorted array, and frees the set.
    ///
    /// A bucket sealed before and reopened by late ids (a broker behind
    /// its senders gets ids stamped long ago; they wait for
    /// [`RESEAL_FRACTION`]) merges them into the array, linear in its
    /// size, rather than sorting it all again.
    fn seal(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let mut open: Vec<u64> = std::mem::take(&mut self.open).into_iter().collect();
        open.sort_unstable();
        if self.sealed.is_empty() {
            self.sealed = open;
            return;
        }
        self.sealed = merge_sorted(&self.sealed, &open);
    }
}

/// The union of two sorted arrays without duplicates, sorted.
fn merge_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        match x.cmp(&y) {
            std::cmp::Ordering::Less => {
                merged.push(x);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                merged.push(y);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                merged.push(x);
                i += 1;
                j += 1;
            }
        }
    }
    merged.extend_from_slice(&a[i..]);
    merged.extend_from_slice(&b[j..]);
    merged
}

pub(crate) struct DedupWindow {
    window_ms: u64,
    capacity: usize,
    /// `buckets[i]` holds ids stamped in `[first_ms + i·BUCKET_MS, + BUCKET_MS)`.
    first_ms: u64,
    buckets: VecDeque<Bucket>,
    in_buckets: usize,
    /// Starts (ms) of the buckets whose open set is not empty, oldest first.
    unsealed: BTreeSet<u64>,
    /// Ids without a usable timestamp, expiring by their acceptance time.
    others: ExpiringMap<u64, ()>,
}

/// The id's v7 timestamp in unix milliseconds, if it is a v7 id.
fn v7_millis(id: &Uuid) -> Option<u64> {
    let b = id.as_bytes();
    if b[6] >> 4 != 7 {
        return None;
    }
    Some(u64::from_be_bytes([
        0, 0, b[0], b[1], b[2], b[3], b[4], b[5],
    ]))
}

/// The dedup window's key for a message id: 64 bits instead of 128.
///
/// In one hash set a million ids cost about 36 MiB as fingerprints and
/// 61 MiB as whole ids; sealed buckets hold 8 bytes a fingerprint. The price is a false "duplicate" when two different ids
/// share a fingerprint: for random ids, at most one chance in 2^64 divided
/// by the ids in the window (about 5·10^-14 per message with a million).
/// Ids that differ in only one half never collide: each half goes through
/// a bijection before they are combined. The function is fixed (no random
/// key), because snapshots store fingerprints.
pub(crate) fn fingerprint(id: &uuid::Uuid) -> u64 {
    let (high, low) = id.as_u64_pair();
    mix(high ^ mix(low))
}

/// MurmurHash3's 64-bit finaliser: a bijection that spreads every bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl DedupWindow {
    pub fn new(window_ms: u64, capacity: usize) -> DedupWindow {
        DedupWindow {
            window_ms,
            capacity,
            first_ms: 0,
            buckets: VecDeque::new(),
            in_buckets: 0,
            unsealed: BTreeSet::new(),
            others: ExpiringMap::new(window_ms * NANOS_PER_MS, capacity),
        }
    }

    pub fn len(&self) -> usize {
        self.in_buckets + self.others.len()
    }

    /// The bucket start for an id accepted at `accepted`, if it goes to the
    /// buckets: a v7 id stamped within `SKEW_MS` of the acceptance.
    fn bucket_for(id: &Uuid, accepted: Nanos) -> Option<u64> {
        let stamped = v7_millis(id)?;
        let accepted_ms = accepted / NANOS_PER_MS;
        (stamped + SKEW_MS >= accepted_ms && stamped <= accepted_ms + SKEW_MS)
            .then_some(stamped - stamped % BUCKET_MS)
    }

    fn bucket(&self, start_ms: u64) -> Option<&Bucket> {
        let index = start_ms.checked_sub(self.first_ms)? / BUCKET_MS;
        self.buckets.get(usize::try_from(index).ok()?)
    }

    /// Whether `id` was accepted within the window. Each id has one place:
    /// where its timestamp puts it, or the plain map.
    pub fn contains(&self, id: &Uuid) -> bool {
        let fp = fingerprint(id);
        if let Some(stamped) = v7_millis(id) {
            if let Some(bucket) = self.bucket(stamped - stamped % BUCKET_MS) {
                if bucket.contains(fp) {
                    return true;
                }
            }
        }
        self.others.len() > 0 && self.others.contains(&fp)
    }

    /// Remembers `id`, accepted at `accepted`.
    pub fn insert(&mut self, id: &Uuid, accepted: Nanos) {
        let fp = fingerprint(id);
        let in_bucket = match Self::bucket_for(id, accepted) {
            Some(start_ms) => self.insert_in_bucket(start_ms, fp),
            None => false,
        };
        if !in_bucket {
            self.others.insert(fp, (), accepted);
        }
        self.evict_over_capacity();
    }

    /// Forgets `id`: its acceptance was withdrawn (the backend refused to
    /// store it), so a resend with the same id is a new send, not a
    /// duplicate to acknowledge.
    pub fn remove(&mut self, id: &Uuid) {
        let fp = fingerprint(id);
        if let Some(stamped) = v7_millis(id) {
            let start_ms = stamped - stamped % BUCKET_MS;
            let index = start_ms
                .checked_sub(self.first_ms)
                .and_then(|d| usize::try_from(d / BUCKET_MS).ok());
            if let Some(bucket) = index.and_then(|i| self.buckets.get_mut(i)) {
                if bucket.open.remove(&fp) {
                    self.in_buckets -= 1;
                    return;
                }
                if let Ok(at) = bucket.sealed.binary_search(&fp) {
                    bucket.sealed.remove(at);
                    self.in_buckets -= 1;
                    return;
                }
            }
        }
        self.others.remove(&fp);
    }

    /// `false` if the bucket is too far from the others (the clock jumped):
    /// the buckets never span much more than the window.
    fn insert_in_bucket(&mut self, start_ms: u64, fp: u64) -> bool {
        if self.buckets.is_empty() {
            self.first_ms = start_ms;
        }
        let last_ms = self.first_ms + (self.buckets.len() as u64).saturating_sub(1) * BUCKET_MS;
        let span_ms = last_ms.max(start_ms) - self.first_ms.min(start_ms);
        if span_ms > self.window_ms + 2 * SKEW_MS + 2 * BUCKET_MS {
            return false;
        }
        while start_ms < self.first_ms {
            self.buckets.push_front(Bucket::default());
            self.first_ms -= BUCKET_MS;
        }
        let Ok(index) = usize::try_from((start_ms - self.first_ms) / BUCKET_MS) else {
            return false;
        };
        while self.buckets.len() <= index {
            self.buckets.push_back(Bucket::default());
        }
        let bucket = &mut self.buckets[index];
        if bucket.sealed.binary_search(&fp).is_ok() {
            return true;
        }
        if bucket.open.insert(fp) {
            self.in_buckets += 1;
            // A new bucket is sealed once the clock has left it. Late ids
            // (a sender's clock behind, or a broker behind its senders)
            // wait in a sealed bucket's open set until they are a
            // fraction of it: sealing it again for each one sorted the
            // whole bucket on every send, which kept a broker that had
            // fallen behind from catching up.
            let reseal_at = (bucket.sealed.len() / RESEAL_FRACTION).max(1);
            if bucket.open.len() == reseal_at {
                self.unsealed.insert(start_ms);
            }
        }
        true
    }

    /// At capacity the oldest ids go first: a whole bucket, or the plain
    /// map's oldest entry, whichever is older.
    fn evict_over_capacity(&mut self) {
        while self.len() > self.capacity {
            let bucket_ms = (self.in_buckets > 0).then_some(self.first_ms);
            let other_ns = self.others.oldest();
            let from_buckets = match (bucket_ms, other_ns) {
                (Some(ms), Some(ns)) => ms * NANOS_PER_MS <= ns,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if from_buckets {
                self.drop_front_bucket();
            } else if !self.others.forget_oldest() {
                return;
            }
        }
    }

    fn drop_front_bucket(&mut self) {
        if let Some(bucket) = self.buckets.pop_front() {
            self.in_buckets -= bucket.len();
            self.unsealed.remove(&self.first_ms);
            self.first_ms += BUCKET_MS;
        }
    }

    /// Forgets what is past the window at `now`, and seals the buckets the
    /// clock has left behind. Cheap when there is nothing to do: called on
    /// every send.
    pub fn expire(&mut self, now: Nanos) {
        let now_ms = now / NANOS_PER_MS;
        // Every id in a bucket was accepted at most SKEW_MS after the
        // bucket's end, so it has had its window once the clock passes this.
        while !self.buckets.is_empty()
            && self.first_ms + BUCKET_MS + SKEW_MS + self.window_ms <= now_ms
        {
            self.drop_front_bucket();
        }
        while let Some(&start_ms) = self.unsealed.first() {
            if start_ms + BUCKET_MS + SEAL_AFTER_MS > now_ms {
                break;
            }
            self.unsealed.pop_first();
            let index = start_ms.checked_sub(self.first_ms).map(|d| d / BUCKET_MS);
            if let Some(bucket) = index
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| self.buckets.get_mut(i))
            {
                bucket.seal();
            }
        }
        while self.buckets.front().is_some_and(|b| b.len() == 0) {
            self.buckets.pop_front();
            self.first_ms += BUCKET_MS;
        }
        self.others.expire(now);
    }

    pub fn clear(&mut self) {
        self.buckets.clear();
        self.in_buckets = 0;
        self.unsealed.clear();
        self.others.clear();
    }

    /// The plain map's entries with their acceptance times, oldest first
    /// (for snapshots).
    pub fn others(&self) -> impl Iterator<Item = (u64, Nanos)> + '_ {
        self.others.iter().map(|(fp, (), t)| (*fp, t))
    }

    /// The buckets' ids: the bucket start (ms) and its fingerprints (for
    /// snapshots).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, impl Iterator<Item = u64> + '_)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() > 0)
            .map(|(i, b)| {
                let start_ms = self.first_ms + i as u64 * BUCKET_MS;
                (
                    start_ms,
                    b.sealed.iter().copied().chain(b.open.iter().copied()),
                )
            })
    }

    /// Restores a plain-map entry from a snapshot.
    pub fn restore_other(&mut self, fp: u64, accepted: Nanos) {
        self.others.insert(fp, (), accepted);
        self.evict_over_capacity();
    }

    /// Restores a bucket from a snapshot, sealed at once (a restart should
    /// not need the open sets' memory even for a moment).
    pub fn restore_bucket(&mut self, start_ms: u64, mut fps: Vec<u64>) {
        let start_ms = start_ms - start_ms % BUCKET_MS;
        fps.sort_unstable();
        fps.dedup();
        let Some(first) = fps.first().copied() else {
            return;
        };
        // Placed like a live id, which also checks the span; then the rest
        // joins it sealed.
        if !self.insert_in_bucket(start_ms, first) {
            for fp in fps {
                self.others.insert(fp, (), start_ms * NANOS_PER_MS);
            }
            self.evict_over_capacity();
            return;
        }
        let index = ((start_ms - self.first_ms) / BUCKET_MS) as usize;
        let bucket = &mut self.buckets[index];
        bucket.seal();
        self.unsealed.remove(&start_ms);
        self.in_buckets -= bucket.len();
        if bucket.sealed.is_empty() {
            bucket.sealed = fps;
        } else {
            bucket.sealed.extend(fps);
            bucket.sealed.sort_unstable();
            bucket.sealed.dedup();
        }
        self.in_buckets += bucket.len();
        self.evict_over_capacity();
    }

    /// Room for `additional` more plain-map entries.
    pub fn reserve_others(&mut self, additional: usize) {
        self.others.reserve(additional);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fingerprints_differ_for_ids_that_differ_in_one_half() {
        use std::collections::HashSet;
        let mut seen = HashSet::new();
        for i in 0..1000u64 {
            assert!(seen.insert(fingerprint(&uuid::Uuid::from_u64_pair(7, i))));
            assert!(seen.insert(fingerprint(&uuid::Uuid::from_u64_pair(i + 1000, 7))));
        }
        // Swapped halves are different ids and get different fingerprints.
        assert_ne!(
            fingerprint(&uuid::Uuid::from_u64_pair(1, 2)),
            fingerprint(&uuid::Uuid::from_u64_pair(2, 1))
        );
    }

    const MS: Nanos = NANOS_PER_MS;

    /// A v7 id stamped `millis`, distinct per `n`.
    fn v7(millis: u64, n: u64) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        bytes[6] = 0x70;
        bytes[8..].copy_from_slice(&(n | 1 << 63).to_be_bytes());
        let id = Uuid::from_bytes(bytes);
        assert_eq!(id.get_version_num(), 7);
        id
    }

    #[test]
    fn ids_of_this_moment_go_to_buckets_and_are_found_before_and_after_sealing() {
        let now = 1_700_000_000_000 * MS;
        let mut w = DedupWindow::new(120_000, 1_000_000);
        for n in 0..1000 {
            w.insert(&v7(now / MS, n), now);
        }
        assert_eq!(w.in_buckets, 1000);
        assert_eq!(w.others.len(), 0);
        assert!(w.contains(&v7(now / MS, 7)));
        assert!(!w.contains(&v7(now / MS, 1000)));
        w.expire(now + 200 * MS);
        assert!(w.unsealed.is_empty(), "sealed once the clock moved on");
        assert!(w.buckets.iter().all(|b| b.open.is_empty()));
        assert!(w.contains(&v7(now / MS, 999)));
        assert!(!w.contains(&v7(now / MS, 1001)));
        // A late retry of the same id into a sealed bucket is still a duplicate.
        w.insert(&v7(now / MS, 5), now + 200 * MS);
        assert_eq!(w.len(), 1000);
    }

    #[test]
    fn late_ids_are_sealed_in_by_the_eighth_not_one_by_one() {
        let mut w = DedupWindow::new(60_000, 1_000_000);
        let at = 1_000_000u64;
        for n in 0..8_000 {
            w.insert(&v7(at, n), at * NANOS_PER_MS);
        }
        let later = (at + 1_000) * NANOS_PER_MS;
        w.expire(later);
        assert_eq!(w.buckets[0].sealed.len(), 8_000);
        // Late ids, each followed by the expire of the send after it.
        for n in 8_000..8_999 {
            w.insert(&v7(at, n), later);
            w.expire(later);
        }
        assert_eq!(w.buckets[0].open.len(), 999, "waiting for the 1,000th");
        w.insert(&v7(at, 8_999), later);
        w.expire(later);
        assert_eq!(w.buckets[0].sealed.len(), 9_000, "sealed in at 1,000");
        assert!(w.buckets[0].open.is_empty());
        w.insert(&v7(at, 9_000), later);
        w.expire(later);
        assert_eq!(w.buckets[0].open.len(), 1, "waits for 1,125");
        for n in 0..=9_000 {
            assert!(w.contains(&v7(at, n)), "{n}");
        }
        assert_eq!(w.len(), 9_001);
    }

    #[test]
    fn late_ids_reopen_a_sealed_bucket_and_are_merged_into_it_in_order() {
        let now = 1_700_000_000_000 * MS;
        let mut w = DedupWindow::new(120_000, 1_000_000);
        for n in (0..1000).step_by(2) {
            w.insert(&v7(now / MS, n), now);
        }
        w.expire(now + 200 * MS);
        for round in 1..=3u64 {
            // Late ids of the same moment, sealed again each pass.
            for n in (1..1000).step_by(2).filter(|n| n % 3 == round - 1) {
                w.insert(&v7(now / MS, n), now + (200 + round) * MS);
            }
            w.expire(now + (200 + round) * MS);
        }
        let sealed = &w
            .buckets
            .iter()
            .find(|b| !b.sealed.is_empty())
            .expect("a bucket")
            .sealed;
        assert!(
            sealed.windows(2).all(|p| p[0] < p[1]),
            "sorted, no duplicates"
        );
        assert_eq!(sealed.len(), 1000);
        assert!((0..1000).all(|n| w.contains(&v7(now / MS, n))));
        assert!(!w.contains(&v7(now / MS, 1000)));
        assert_eq!(merge_sorted(&[1, 3, 5], &[2, 3, 6]), vec![1, 2, 3, 5, 6]);
        assert_eq!(merge_sorted(&[], &[4]), vec![4]);
    }

    #[test]
    fn the_timestamp_read_is_the_one_uuid_writes() {
        let id = Uuid::now_v7();
        let (secs, nanos) = id.get_timestamp().expect("v7").to_unix();
        assert_eq!(
            v7_millis(&id),
            Some(secs * 1000 + u64::from(nanos) / 1_000_000)
        );
        assert_eq!(v7_millis(&Uuid::new_v4()), None);
    }

    #[test]
    fn skewed_and_non_v7_ids_go_to_the_plain_map() {
        let now = 1_700_000_000_000 * MS;
        let mut w = DedupWindow::new(120_000, 1_000_000);
        let old = v7(now / MS - 60_000, 1);
        let random = Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef);
        w.insert(&old, now);
        w.insert(&random, now);
        assert_eq!(w.others.len(), 2);
        assert!(w.contains(&old) && w.contains(&random));
        w.expire(now + 120_000 * MS);
        assert!(!w.contains(&old) && !w.contains(&random));
    }

    #[test]
    fn capacity_forgets_the_oldest_bucket_first() {
        let now = 1_700_000_000_000 * MS;
        let mut w = DedupWindow::new(120_000, 10);
        for n in 0..6 {
            w.insert(&v7(now / MS, n), now);
        }
        for n in 0..6 {
            w.insert(&v7(now / MS + 100, n), now + 100 * MS);
        }
        assert!(w.len() <= 10);
        assert!(!w.contains(&v7(now / MS, 0)), "the older bucket went");
        assert!(w.contains(&v7(now / MS + 100, 5)));
    }

    #[test]
    fn buckets_survive_a_snapshot_sealed() {
        let now = 1_700_000_000_000 * MS;
        let mut w = DedupWindow::new(120_000, 1_000_000);
        for n in 0..300 {
            w.insert(&v7(now / MS + n, n), now + n * MS);
        }
        let old = v7(now / MS - 60_000, 1);
        w.insert(&old, now);
        let mut copy = DedupWindow::new(120_000, 1_000_000);
        for (fp, t) in w.others() {
            copy.restore_other(fp, t);
        }
        for (start_ms, fps) in w.buckets() {
            copy.restore_bucket(start_ms, fps.collect());
        }
        assert_eq!(copy.len(), w.len());
        assert!(copy.unsealed.is_empty(), "restored sealed");
        assert!((0..300).all(|n| copy.contains(&v7(now / MS + n, n))));
        assert!(copy.contains(&old));
        assert!(!copy.contains(&v7(now / MS + 3, 4)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Advance the clock by this many ms.
        Tick(u64),
        /// Accept id `n`, stamped this many ms off the clock (v7), or
        /// without a timestamp.
        Insert { n: u64, offset_ms: i64, v7: bool },
        /// Ask for id `n`.
        Ask(u64),
        /// Withdraw id `n`'s acceptance.
        Remove(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..2_000).prop_map(Op::Tick),
            (0u64..64, -8_000i64..8_000, any::<bool>()).prop_map(|(n, offset_ms, v7)| Op::Insert {
                n,
                offset_ms,
                v7
            }),
            (0u64..64).prop_map(Op::Ask),
            (0u64..64).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Against a model that knows each id's acceptance time: an id
        /// accepted less than the window ago is found, one never accepted
        /// is not, and one accepted long enough ago is forgotten.
        #[test]
        fn remembers_for_the_window_and_forgets_after(ops in proptest::collection::vec(op(), 1..300)) {
            const WINDOW_MS: u64 = 10_000;
            let mut w = DedupWindow::new(WINDOW_MS, 1_000_000);
            let mut now = 1_700_000_000_000 * MS;
            // id number → (the id, accepted at)
            let mut model: std::collections::HashMap<u64, (Uuid, Nanos)> = Default::default();
            for op in ops {
                match op {
                    Op::Tick(ms) => now += ms * MS,
                    Op::Insert { n, offset_ms, v7: stamped } => {
                        w.expire(now);
                        let id = model.get(&n).map(|(id, _)| *id).unwrap_or_else(|| if stamped {
                            v7((now / MS).saturating_add_signed(offset_ms), n)
                        } else {
                            Uuid::from_u64_pair(n, 0x8000_0000_0000_0000 | n)
                        });
                        if !w.contains(&id) {
                            w.insert(&id, now);
                            model.insert(n, (id, now));
                        }
                    }
                    Op::Remove(n) => {
                        if let Some((id, _)) = model.remove(&n) {
                            let before = w.len();
                            let held = w.contains(&id);
                            w.remove(&id);
                            prop_assert!(!w.contains(&id), "still held after its removal");
                            prop_assert_eq!(w.len(), before - usize::from(held));
                        }
                    }
                    Op::Ask(n) => {
                        w.expire(now);
                        match model.get(&n) {
                            None => {
                                let stranger = v7(now / MS, n);
                                prop_assert!(!w.contains(&stranger));
                            }
                            Some((id, accepted)) => {
                                let age_ms = (now - accepted) / MS;
                                if age_ms < WINDOW_MS {
                                    prop_assert!(w.contains(id), "forgotten after {age_ms} ms");
                                } else if age_ms > WINDOW_MS + 2 * SKEW_MS + BUCKET_MS {
                                    prop_assert!(!w.contains(id), "still held after {age_ms} ms");
                                    model.remove(&n);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
