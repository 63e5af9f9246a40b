//! Subscription patterns indexed by their segments, so that the holders
//! of the patterns a message name matches are found without testing every
//! pattern: a route then costs the name's segments and the matches, not
//! the size of the table (100,000 subscriptions scanned one by one made a
//! route take milliseconds).
//!
//! A trie over segments: a literal segment is a child in a hash map, `*`
//! the one wildcard child, and a pattern ends either at a node (the name
//! must end there too) or in its `>` set (one or more segments more). A
//! lookup follows the name's segment through the literal child and the
//! `*` child, and collects the `>` sets on the way.
//!
//! It agrees with [`crate::pattern_matches`] on every pattern, valid
//! or not (the proptest below checks it against that linear rule): a
//! pattern with neither `*` nor `>` in it is compared whole, as a string;
//! a `>` segment ends the pattern wherever it stands; other segments,
//! `todo*` or empty ones included, are compared as literals.

use std::hash::Hash;

/// foldhash: the table's keys are segments and holders, hashed per lookup.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Patterns → the holders (services) that subscribed to them.
pub struct PatternIndex<K> {
    root: Node<K>,
    /// (pattern, holder) pairs held.
    len: usize,
}

struct Node<K> {
    literal: FastMap<Box<str>, Node<K>>,
    star: Option<Box<Node<K>>>,
    /// Holders of patterns that end here, each with how many of its
    /// patterns do (two different patterns can end at one place:
    /// `a.>` and the invalid `a.>.b` both match what `a.>` does).
    end: FastMap<K, u32>,
    /// Holders of patterns whose `>` stands here, counted the same way.
    tail: FastMap<K, u32>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            literal: FastMap::default(),
            star: None,
            end: FastMap::default(),
            tail: FastMap::default(),
        }
    }
}

impl<K> Default for PatternIndex<K> {
    fn default() -> Self {
        PatternIndex {
            root: Node::default(),
            len: 0,
        }
    }
}

/// One step down the trie for one segment of a pattern.
#[derive(Clone, Copy)]
enum Step<'a> {
    Literal(&'a str),
    Star,
    /// `>`: the pattern ends here, wanting one or more segments more.
    Tail,
}

/// A pattern's steps, read as [`crate::pattern_matches`] reads it.
fn steps(pattern: &str) -> impl Iterator<Item = Step<'_>> {
    let wild = pattern.bytes().any(|b| b == b'*' || b == b'>');
    let mut ended = false;
    pattern.split('.').map_while(move |segment| {
        if ended {
            return None;
        }
        Some(match segment {
            ">" if wild => {
                ended = true;
                Step::Tail
            }
            "*" if wild => Step::Star,
            literal => Step::Literal(literal),
        })
    })
}

/// The first segment of a non-empty rest of a name, and what follows it
/// (`None`: no segment left). `"a."` is `"a"` then `""`, as `split` has it.
fn first_segment(rest: &str) -> (&str, Option<&str>) {
    match rest.split_once('.') {
        Some((segment, more)) => (segment, Some(more)),
        None => (rest, None),
    }
}

impl<K: Eq + Hash + Clone> PatternIndex<K> {
    /// Records that `holder` subscribed to `pattern`. The caller keeps the
    /// pairs a set: each pair is inserted once and removed once.
    pub fn insert(&mut self, pattern: &str, holder: &K) {
        let mut node = &mut self.root;
        let mut tail = false;
        for step in steps(pattern) {
            node = match step {
                Step::Literal(segment) => node.literal.entry(segment.into()).or_default(),
                Step::Star => node.star.get_or_insert_with(Default::default).as_mut(),
                Step::Tail => {
                    tail = true;
                    break;
                }
            };
        }
        let holders = if tail { &mut node.tail } else { &mut node.end };
        *holders.entry(holder.clone()).or_insert(0) += 1;
        self.len += 1;
    }

    /// Forgets `holder`'s subscription to `pattern`; whether it was held
    /// (patterns that end at the same place are not told apart).
    /// Nodes left with nothing below them go, so the trie stays the size
    /// of what it holds.
    pub fn remove(&mut self, pattern: &str, holder: &K) -> bool {
        let removed = Self::remove_below(&mut self.root, steps(pattern), holder);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_below<'p>(
        node: &mut Node<K>,
        mut steps: impl Iterator<Item = Step<'p>>,
        holder: &K,
    ) -> bool {
        match steps.next() {
            None => release(&mut node.end, holder),
            Some(Step::Tail) => release(&mut node.tail, holder),
            Some(Step::Star) => {
                let Some(child) = node.star.as_deref_mut() else {
                    return false;
                };
                let removed = Self::remove_below(child, steps, holder);
                if child.is_empty() {
                    node.star = None;
                }
                removed
            }
            Some(Step::Literal(segment)) => {
                let Some(child) = node.literal.get_mut(segment) else {
                    return false;
                };
                let removed = Self::remove_below(child, steps, holder);
                if child.is_empty() {
                    node.literal.remove(segment);
                }
                removed
            }
        }
    }

    pub fn clear(&mut self) {
        *self = PatternIndex::default();
    }

    /// (pattern, holder) pairs held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no pattern.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends to `out` the holders of the patterns `name` matches: a
    /// holder once per matching pattern, in no particular order. Visits
    /// only the branches the name's segments lead to.
    pub fn matching_into<'a>(&'a self, name: &str, out: &mut Vec<&'a K>) {
        self.root.collect(Some(name), out);
    }

    /// Whether `name` matches any pattern held; stops at the first.
    pub fn matches_any(&self, name: &str) -> bool {
        self.root.any(Some(name))
    }

    /// The holders of the patterns `name` matches, sorted, each once.
    #[cfg(test)]
    pub fn matching(&self, name: &str) -> Vec<&K>
    where
        K: Ord,
    {
        let mut out = Vec::new();
        self.matching_into(name, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl<K: Eq + Hash> Node<K> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.end.is_empty()
            && self.tail.is_empty()
    }

    /// Whether a pattern here or below matches `rest` (as in `collect`).
    fn any(&self, rest: Option<&str>) -> bool {
        let Some(rest) = rest else {
            return !self.end.is_empty();
        };
        if !self.tail.is_empty() {
            return true;
        }
        let (segment, more) = first_segment(rest);
        self.literal.get(segment).is_some_and(|c| c.any(more))
            || self.star.as_ref().is_some_and(|c| c.any(more))
    }

    /// `rest`: the name's segments not yet matched (`None`: none left).
    fn collect<'a>(&'a self, rest: Option<&str>, out: &mut Vec<&'a K>) {
        let Some(rest) = rest else {
            out.extend(self.end.keys());
            return;
        };
        // `>` wants one or more segments: there is at least one.
        out.extend(self.tail.keys());
        let (segment, more) = first_segment(rest);
        if let Some(child) = self.literal.get(segment) {
            child.collect(more, out);
        }
        if let Some(child) = &self.star {
            child.collect(more, out);
        }
    }
}

/// Patterns a connection's list is tested against one by one; past it,
/// they are indexed too. W10's services consume 100 patterns each, and a
/// delivery asks its connection whether it takes the name.
const CONN_PATTERNS_SCANNED_MAX: usize = 8;

/// A connection's patterns, in the order it subscribed to them; past
/// [`CONN_PATTERNS_SCANNED_MAX`], also in an index, so that whether it
/// takes a name (asked for every delivery) does not cost one test per
/// pattern. Few patterns, the usual case, cost no index.
#[derive(Default)]
pub struct PatternList {
    list: Vec<String>,
    index: Option<Box<PatternIndex<()>>>,
}

impl PatternList {
    /// Adds `pattern` unless it is there already; whether it was added.
    pub fn insert(&mut self, pattern: &str) -> bool {
        if self.list.iter().any(|p| p == pattern) {
            return false;
        }
        self.list.push(pattern.to_string());
        match &mut self.index {
            Some(index) => index.insert(pattern, &()),
            None if self.list.len() > CONN_PATTERNS_SCANNED_MAX => {
                let mut index = PatternIndex::default();
                for p in &self.list {
                    index.insert(p, &());
                }
                self.index = Some(Box::new(index));
            }
            None => {}
        }
        true
    }

    pub fn remove(&mut self, pattern: &str) {
        let before = self.list.len();
        self.list.retain(|p| p != pattern);
        if self.list.len() != before {
            if let Some(index) = &mut self.index {
                index.remove(pattern, &());
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.list.clone()
    }

    /// Whether `name` matches one of the patterns.
    pub fn matches(&self, name: &str) -> bool {
        match &self.index {
            Some(index) => index.matches_any(name),
            None => self.list.iter().any(|p| crate::pattern_matches(p, name)),
        }
    }
}

/// One pattern of `holder`'s fewer here; whether it had one.
fn release<K: Eq + Hash>(holders: &mut FastMap<K, u32>, holder: &K) -> bool {
    let Some(count) = holders.get_mut(holder) else {
        return false;
    };
    *count -= 1;
    if *count == 0 {
        holders.remove(holder);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern_matches;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn index(pairs: &[(&str, &str)]) -> PatternIndex<String> {
        let mut index = PatternIndex::default();
        for (pattern, holder) in pairs {
            index.insert(pattern, &holder.to_string());
        }
        index
    }

    fn matching(index: &PatternIndex<String>, name: &str) -> Vec<String> {
        index.matching(name).into_iter().cloned().collect()
    }

    #[test]
    fn literal_star_and_tail() {
        let index = index(&[
            ("todo.create", "exact"),
            ("todo.*", "star"),
            ("todo.>", "tail"),
            (">", "all"),
            ("*.create", "any-create"),
            ("*", "one"),
        ]);
        assert_eq!(
            matching(&index, "todo.create"),
            ["all", "any-create", "exact", "star", "tail"]
        );
        assert_eq!(matching(&index, "todo.item.create"), ["all", "tail"]);
        // `>` wants at least one more segment; `*` exactly one.
        assert_eq!(matching(&index, "todo"), ["all", "one"]);
        assert_eq!(matching(&index, "mail.create"), ["all", "any-create"]);
    }

    #[test]
    fn edge_cases_read_as_pattern_matches_reads_them() {
        let index = index(&[
            // Not valid patterns, but matched as the linear rule matches them.
            ("a.>.b", "tail-in-middle"),
            ("a.b*", "partial"),
            ("a..c", "empty-segment"),
            ("a.*.c", "star"),
            ("", "empty"),
        ]);
        assert_eq!(matching(&index, "a.x"), ["tail-in-middle"]);
        assert_eq!(matching(&index, "a.b*"), ["partial", "tail-in-middle"]);
        assert_eq!(matching(&index, "a.bc"), ["tail-in-middle"]);
        assert_eq!(
            matching(&index, "a..c"),
            ["empty-segment", "star", "tail-in-middle"]
        );
        assert_eq!(matching(&index, ""), ["empty"]);
        // Case matters.
        assert_eq!(matching(&index, "A.x"), Vec::<String>::new());
    }

    #[test]
    fn a_holder_is_kept_until_its_last_pattern_there_goes() {
        let mut index = index(&[("a.>", "s"), ("a.>.b", "s"), ("a.*", "t")]);
        assert_eq!(index.len(), 3);
        assert!(index.remove("a.>", &"s".to_string()));
        assert_eq!(matching(&index, "a.x"), ["s", "t"]);
        assert!(index.remove("a.>.b", &"s".to_string()));
        assert_eq!(matching(&index, "a.x"), ["t"]);
        assert!(!index.remove("a.>", &"s".to_string()));
        assert!(!index.remove("a.*", &"s".to_string()));
        assert!(index.remove("a.*", &"t".to_string()));
        assert_eq!(index.len(), 0);
        // Emptied branches are pruned.
        assert!(index.root.is_empty());
    }

    #[test]
    fn a_lookup_visits_only_the_names_branches() {
        // 100,000 patterns; a name reaches a handful of nodes. Guarded
        // against a scan creeping back in by timing a lot of lookups
        // loosely: a scan would take seconds here.
        let mut index = PatternIndex::default();
        for k in 0..1_000u32 {
            let service = format!("s{k:04}");
            for j in 0..100u32 {
                let last = if j.is_multiple_of(2) { "*" } else { ">" };
                index.insert(&format!("w.{service}.t{j:02}.{last}"), &service);
            }
        }
        assert_eq!(index.len(), 100_000);
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        for i in 0..10_000u32 {
            out.clear();
            index.matching_into(&format!("w.s0500.t{:02}.m{i}", i % 100), &mut out);
            assert_eq!(out, [&"s0500".to_string()]);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_connection_with_many_patterns_matches_through_an_index() {
        let pattern = |j: u32| format!("w.t{j:02}.{}", if j.is_multiple_of(2) { "*" } else { ">" });
        let mut list = PatternList::default();
        for j in 0..20 {
            assert!(list.insert(&pattern(j)));
        }
        assert!(!list.insert(&pattern(0)));
        assert!(list.index.is_some());
        assert!(list.matches("w.t03.a.b"));
        assert!(list.matches("w.t02.a"));
        assert!(!list.matches("w.t02.a.b"));
        assert!(!list.matches("w.t20.a"));
        list.remove(&pattern(3));
        assert!(!list.matches("w.t03.a.b"));
        for j in 0..20 {
            list.remove(&pattern(j));
        }
        assert!(list.is_empty());
        assert!(!list.matches("w.t02.a"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(String, u8),
        Remove(String, u8),
        Lookup(String),
    }

    /// Few segment values, so that `*`, `>` and literals overlap often.
    fn segment() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "", "*", ">", "a*"])
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 1..5).prop_map(|s| s.join("."))
    }

    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "", "c", "*", ">", "a*"]),
            1..6,
        )
        .prop_map(|s| s.join("."))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (text(), 0u8..4).prop_map(|(p, h)| Op::Insert(p, h)),
            1 => (text(), 0u8..4).prop_map(|(p, h)| Op::Remove(p, h)),
            3 => name().prop_map(Op::Lookup),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_matching_every_pattern(ops in prop::collection::vec(op(), 1..200)) {
            let mut index: PatternIndex<u8> = PatternIndex::default();
            // Each holder's patterns as a connection keeps them.
            let mut lists: Vec<PatternList> = (0..4).map(|_| PatternList::default()).collect();
            // The linear rule's table: (pattern, holder) pairs.
            let mut table: BTreeSet<(String, u8)> = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(pattern, holder) => {
                        let new = table.insert((pattern.clone(), holder));
                        if new {
                            index.insert(&pattern, &holder);
                        }
                        prop_assert_eq!(lists[usize::from(holder)].insert(&pattern), new);
                    }
                    Op::Remove(pattern, holder) => {
                        // As the broker does: only what it holds.
                        if table.remove(&(pattern.clone(), holder)) {
                            prop_assert!(index.remove(&pattern, &holder));
                        }
                        lists[usize::from(holder)].remove(&pattern);
                    }
                    Op::Lookup(name) => {
                        let expected: BTreeSet<u8> = table
                            .iter()
                            .filter(|(p, _)| pattern_matches(p, &name))
                            .map(|(_, h)| *h)
                            .collect();
                        let got: BTreeSet<u8> = index.matching(&name).into_iter().copied().collect();
                        for (holder, list) in lists.iter().enumerate() {
                            let holds = expected.contains(&(holder as u8));
                            prop_assert_eq!(list.matches(&name), holds, "holder {} name {:?}", holder, name);
                        }
                        prop_assert_eq!(index.matches_any(&name), !expected.is_empty());
                        prop_assert_eq!(got, expected, "name {:?}", name);
                    }
                }
                prop_assert_eq!(index.len(), table.len());
            }
            for (pattern, holder) in &table {
                prop_assert!(index.remove(pattern, holder));
            }
            prop_assert!(index.root.is_empty());
        }
    }
}
