//! Warnings that would repeat: the first of a kind is said at once, the
//! rest are counted and summed up in one line a while later — so a damaged
//! range of a thousand messages, or a record tried again and again, costs
//! the operator's log two lines, not a thousand.

use std::collections::HashMap;

use crate::{Nanos, NANOS_PER_MS};

/// How long repeats of a kind are counted before their summary is said.
pub(crate) const REPEAT_SUMMARY_INTERVAL_MS: u64 = 10_000;
/// Kinds remembered at once; more say every pending summary and start over
/// (a bound on memory whatever is damaged).
pub(crate) const REPEAT_KINDS_MAX: usize = 1024;

struct Seen {
    /// What a repeat is, for its summary ("messages for audit that cannot
    /// be read: …").
    what: String,
    /// Repeats since the kind was last said or summed up.
    pending: u64,
    said_at: Nanos,
}

#[derive(Default)]
pub(crate) struct Repeats {
    seen: HashMap<String, Seen>,
}

impl Repeats {
    /// A warning of kind `key`. The first (or the first after a summary
    /// interval with none) comes back to be said; later ones are counted.
    /// Also returns summaries that had to be said early to stay bounded.
    /// The second value says whether this one was held back.
    pub(crate) fn say(
        &mut self,
        key: &str,
        line: String,
        what: impl FnOnce() -> String,
        now: Nanos,
    ) -> (Vec<String>, bool) {
        if let Some(seen) = self.seen.get_mut(key) {
            seen.pending += 1;
            return (Vec::new(), true);
        }
        let mut out = Vec::new();
        if self.seen.len() >= REPEAT_KINDS_MAX {
            out = self.summaries(u64::MAX);
            self.seen.clear();
        }
        self.seen.insert(
            key.to_string(),
            Seen {
                what: what(),
                pending: 0,
                said_at: now,
            },
        );
        out.push(line);
        (out, false)
    }

    /// One line per kind whose repeats were held back for the summary
    /// interval; kinds quiet for that long are forgotten (said again in
    /// full if they come back).
    pub(crate) fn summaries(&mut self, now: Nanos) -> Vec<String> {
        let interval = REPEAT_SUMMARY_INTERVAL_MS * NANOS_PER_MS;
        let mut out = Vec::new();
        self.seen.retain(|_, seen| {
            if now.saturating_sub(seen.said_at) < interval {
                return true;
            }
            if seen.pending == 0 {
                return false;
            }
            out.push(format!(
                "{} more {} (said once above)",
                seen.pending, seen.what
            ));
            seen.pending = 0;
            seen.said_at = now;
            true
        });
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000 * NANOS_PER_MS;

    #[test]
    fn the_first_is_said_the_rest_summed_up_once_per_interval() {
        let mut r = Repeats::default();
        let what = || "messages that cannot be read".to_string();
        assert_eq!(
            r.say("k", "first".into(), what, 0),
            (vec!["first".to_string()], false)
        );
        for i in 1..=8 {
            assert_eq!(r.say("k", "again".into(), what, i), (Vec::new(), true));
        }
        assert!(r.summaries(5 * S).is_empty(), "not before the interval");
        assert_eq!(
            r.summaries(10 * S),
            vec!["8 more messages that cannot be read (said once above)".to_string()]
        );
        assert!(r.summaries(15 * S).is_empty());
        assert!(r.say("k", "x".into(), what, 16 * S).1, "still counted");
        assert_eq!(r.summaries(20 * S).len(), 1);
        // Quiet for an interval: forgotten, and said in full again.
        assert!(r.summaries(31 * S).is_empty());
        assert_eq!(
            r.say("k", "back".into(), what, 32 * S),
            (vec!["back".to_string()], false)
        );
    }

    #[test]
    fn kinds_are_bounded() {
        let mut r = Repeats::default();
        for i in 0..REPEAT_KINDS_MAX {
            r.say(&i.to_string(), "l".into(), || "w".into(), 0);
            r.say(&i.to_string(), "l".into(), || "w".into(), 0);
        }
        let (lines, held) = r.say("new", "n".into(), || "w".into(), 0);
        assert!(!held);
        assert_eq!(
            lines.len(),
            REPEAT_KINDS_MAX + 1,
            "summaries, then the line"
        );
        assert_eq!(r.seen.len(), 1);
    }
}
