//! Sends the broker has not answered yet, by sequence number.

use std::collections::VecDeque;

/// A map from send sequence numbers to what waits for their answer.
///
/// Sequence numbers are handed out in increasing order and mostly answered
/// in that order, so a ring of slots indexed from the oldest unanswered one
/// does what a `BTreeMap` did at a fraction of the cost per send (which was
/// the largest single cost of a pipelined publisher).
pub(crate) struct PendingSends<T> {
    /// The sequence number of `slots[0]`.
    base: u64,
    /// `None`: answered (or timed out) while an older one still waits.
    slots: VecDeque<Option<T>>,
}

impl<T> PendingSends<T> {
    pub fn new() -> Self {
        PendingSends {
            base: 0,
            slots: VecDeque::new(),
        }
    }

    /// Files `value` under `seq`, which must be above every seq filed
    /// before (a smaller one is ignored: it would be a caller's bug).
    pub fn insert(&mut self, seq: u64, value: T) {
        if self.slots.is_empty() {
            self.base = seq;
        }
        let Some(index) = seq.checked_sub(self.base) else {
            return;
        };
        let index = index as usize;
        if index < self.slots.len() {
            return;
        }
        while self.slots.len() < index {
            self.slots.push_back(None);
        }
        self.slots.push_back(Some(value));
    }

    pub fn remove(&mut self, seq: u64) -> Option<T> {
        let index = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let value = self.slots.get_mut(index)?.take()?;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(value)
    }

    /// Waiting sends, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter_map(move |(i, v)| v.as_ref().map(|v| (base + i as u64, v)))
    }

    /// Takes every waiting send out, oldest first.
    pub fn take(&mut self) -> Vec<(u64, T)> {
        let base = self.base;
        let slots = std::mem::take(&mut self.slots);
        slots
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (base + i as u64, v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn answers_in_any_order_leave_the_rest_in_order() {
        let mut p = PendingSends::new();
        for seq in 5..10 {
            p.insert(seq, seq * 10);
        }
        assert_eq!(p.remove(7), Some(70));
        assert_eq!(p.remove(7), None);
        assert_eq!(p.remove(5), Some(50));
        assert_eq!(p.remove(4), None);
        assert_eq!(p.remove(100), None);
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            vec![(6, &60), (8, &80), (9, &90)]
        );
        assert_eq!(p.take(), vec![(6, 60), (8, 80), (9, 90)]);
        assert_eq!(p.iter().count(), 0);
        p.insert(20, 200);
        assert_eq!(p.remove(20), Some(200));
    }

    proptest::proptest! {
        #[test]
        fn behaves_like_an_ordered_map(ops in proptest::collection::vec((proptest::bool::ANY, 0u64..40), 0..200)) {
            let mut p = PendingSends::new();
            let mut model = BTreeMap::new();
            let mut next = 1u64;
            for (is_insert, pick) in ops {
                if is_insert {
                    p.insert(next, next);
                    model.insert(next, next);
                    next += 1 + pick % 3;
                } else {
                    let seq = pick.min(next);
                    proptest::prop_assert_eq!(p.remove(seq), model.remove(&seq));
                }
                let listed: Vec<(u64, u64)> = p.iter().map(|(s, v)| (s, *v)).collect();
                let expected: Vec<(u64, u64)> = model.iter().map(|(s, v)| (*s, *v)).collect();
                proptest::prop_assert_eq!(listed, expected);
            }
        }
    }
}
