//! How many queues (and dead-letter lists) hold each stored message: the
//! last one to let go releases it, and the oldest held seq bounds what the
//! log may compact.
//!
//! A map from seq to count cost about 25 bytes a message in a backlog of a
//! million. Held seqs come in dense runs (a backlog is mostly every seq in
//! a stretch of the log), so counts are kept in pages of [`PAGE_SEQS`]
//! seqs: a page with many held seqs is an array of one-byte counts, a page
//! with few is a short sorted list. Counts from 255 up (a message held by
//! that many services) live in a side map.

use std::collections::BTreeMap;

use courier_store::Seq;

const PAGE_SEQS: u64 = 4096;
/// A sparse page becomes dense beyond this many held seqs (its list then
/// costs as much as the array), and a dense one sparse below a quarter of it.
const DENSE_FROM: usize = 1024;
const SPARSE_BELOW: usize = DENSE_FROM / 4;
/// A one-byte count at this value means: look in `large`.
const LARGE: u8 = u8::MAX;

#[derive(Debug)]
enum Page {
    /// Sorted by offset; counts ≥ 1.
    Sparse(Vec<(u16, u8)>),
    Dense {
        counts: Box<[u8]>,
        held: usize,
    },
}

impl Page {
    fn held(&self) -> usize {
        match self {
            Page::Sparse(list) => list.len(),
            Page::Dense { held, .. } => *held,
        }
    }

    fn get(&self, offset: u16) -> u8 {
        match self {
            Page::Sparse(list) => list
                .binary_search_by_key(&offset, |(o, _)| *o)
                .map(|i| list[i].1)
                .unwrap_or(0),
            Page::Dense { counts, .. } => counts[usize::from(offset)],
        }
    }

    /// Sets the count at `offset` (0 removes it).
    fn set(&mut self, offset: u16, count: u8) {
        match self {
            Page::Sparse(list) => match list.binary_search_by_key(&offset, |(o, _)| *o) {
                Ok(i) if count == 0 => {
                    list.remove(i);
                }
                Ok(i) => list[i].1 = count,
                Err(_) if count == 0 => {}
                Err(i) => list.insert(i, (offset, count)),
            },
            Page::Dense { counts, held } => {
                let slot = &mut counts[usize::from(offset)];
                match (*slot == 0, count == 0) {
                    (true, false) => *held += 1,
                    (false, true) => *held -= 1,
                    _ => {}
                }
                *slot = count;
            }
        }
        self.reshape();
    }

    fn reshape(&mut self) {
        match self {
            Page::Sparse(list) if list.len() > DENSE_FROM => {
                let mut counts = vec![0u8; PAGE_SEQS as usize].into_boxed_slice();
                for (offset, count) in list.iter() {
                    counts[usize::from(*offset)] = *count;
                }
                let held = list.len();
                *self = Page::Dense { counts, held };
            }
            Page::Dense { counts, held } if *held < SPARSE_BELOW => {
                let list = counts
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .map(|(o, c)| (o as u16, *c))
                    .collect();
                *self = Page::Sparse(list);
            }
            _ => {}
        }
    }

    fn first_held(&self) -> Option<u16> {
        match self {
            Page::Sparse(list) => list.first().map(|(o, _)| *o),
            Page::Dense { counts, .. } => counts.iter().position(|c| *c > 0).map(|o| o as u16),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct RefCounts {
    pages: BTreeMap<u64, Page>,
    /// Counts of `LARGE` and more.
    large: BTreeMap<Seq, u32>,
}

fn split(seq: Seq) -> (u64, u16) {
    (seq / PAGE_SEQS, (seq % PAGE_SEQS) as u16)
}

impl RefCounts {
    pub fn count(&self, seq: Seq) -> u32 {
        let (page, offset) = split(seq);
        match self.pages.get(&page).map_or(0, |p| p.get(offset)) {
            LARGE => self.large.get(&seq).copied().unwrap_or(u32::from(LARGE)),
            small => u32::from(small),
        }
    }

    fn set(&mut self, seq: Seq, count: u32) {
        let (page_no, offset) = split(seq);
        let small = if count >= u32::from(LARGE) {
            self.large.insert(seq, count);
            LARGE
        } else {
            self.large.remove(&seq);
            count as u8
        };
        let page = self
            .pages
            .entry(page_no)
            .or_insert_with(|| Page::Sparse(Vec::new()));
        page.set(offset, small);
        if page.held() == 0 {
            self.pages.remove(&page_no);
        }
    }

    /// One more holder of `seq`.
    pub fn add(&mut self, seq: Seq) {
        let count = self.count(seq);
        self.set(seq, count.saturating_add(1));
    }

    /// One holder fewer; `true` when it was the last.
    pub fn release(&mut self, seq: Seq) -> bool {
        match self.count(seq) {
            0 => false,
            count => {
                self.set(seq, count - 1);
                count == 1
            }
        }
    }

    /// The oldest seq anything holds.
    pub fn oldest(&self) -> Option<Seq> {
        let (page_no, page) = self.pages.first_key_value()?;
        page.first_held()
            .map(|offset| page_no * PAGE_SEQS + u64::from(offset))
    }

    pub fn clear(&mut self) {
        self.pages.clear();
        self.large.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_dense_backlog_costs_about_a_byte_a_message() {
        let mut refs = RefCounts::default();
        for seq in 1..=100_000 {
            refs.add(seq);
        }
        let dense = refs
            .pages
            .values()
            .filter(|p| matches!(p, Page::Dense { .. }))
            .count();
        assert!(dense >= 23, "{dense} dense pages");
        assert_eq!(refs.oldest(), Some(1));
        for seq in 1..=99_999 {
            assert!(refs.release(seq));
        }
        assert_eq!(refs.oldest(), Some(100_000));
        assert_eq!(refs.pages.len(), 1);
        assert!(matches!(refs.pages.values().next(), Some(Page::Sparse(l)) if l.len() == 1));
    }

    #[test]
    fn counts_past_a_byte_are_kept_whole() {
        let mut refs = RefCounts::default();
        for _ in 0..300 {
            refs.add(42);
        }
        assert_eq!(refs.count(42), 300);
        for _ in 0..299 {
            assert!(!refs.release(42));
        }
        assert!(refs.large.is_empty());
        assert!(refs.release(42), "the last holder releases it");
        assert!(!refs.release(42), "nothing left to release");
        assert_eq!(refs.oldest(), None);
    }

    proptest! {
        /// Against a plain map: the same counts, the same oldest seq, and
        /// `release` says true exactly when the last holder lets go.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((any::<bool>(), 0u64..20_000, 1usize..400), 1..60)) {
            let mut refs = RefCounts::default();
            let mut model: BTreeMap<Seq, u32> = BTreeMap::new();
            for (add, start, len) in ops {
                for seq in start..start + len as u64 {
                    if add {
                        refs.add(seq);
                        *model.entry(seq).or_insert(0) += 1;
                    } else {
                        let last = model.get(&seq) == Some(&1);
                        prop_assert_eq!(refs.release(seq), last);
                        if let Some(c) = model.get_mut(&seq) {
                            *c -= 1;
                            if *c == 0 {
                                model.remove(&seq);
                            }
                        }
                    }
                }
                prop_assert_eq!(refs.oldest(), model.keys().next().copied());
            }
            for (seq, count) in &model {
                prop_assert_eq!(refs.count(*seq), *count);
            }
        }
    }
}
