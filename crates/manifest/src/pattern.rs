//! Intersection and containment of subscription patterns.
//!
//! A pattern is a sequence of segments, each a literal, `*` (exactly one
//! segment) or, last only, `>` (one or more segments). The set of names two
//! such patterns both match is itself described by *one* pattern, or is
//! empty — so cutting a subscription down to what a manifest allows never has
//! to over-approximate:
//!
//! | position `i` in `a` | in `b`    | the intersection has at `i`                |
//! |---------------------|-----------|--------------------------------------------|
//! | literal `x`         | literal `x` | `x`                                      |
//! | literal `x`         | literal `y` | nothing: empty                           |
//! | `*`                 | `s`       | `s` (a literal or `*`)                     |
//! | `>`                 | `>`       | `>`, and stop                              |
//! | `>`                 | `s…` (rest of `b`, not `>`) | the rest of `b`, and stop |
//! | `>`                 | (`b` ended) | nothing: `>` needs one more segment      |
//! | (`a` ended)         | (`b` ended) | stop                                     |
//! | (`a` ended)         | anything  | nothing: the lengths differ                |
//!
//! (and symmetrically). One more case makes it empty: a result longer than
//! [`NAME_BYTES_MAX`] can only match names longer than that, and no valid name
//! is, so it is reported as empty.

use courier_proto::{validate_pattern, NAME_BYTES_MAX};

const TAIL: &str = ">";
const ONE: &str = "*";

/// The segments of a validated pattern.
pub(crate) fn segments(pattern: &str) -> Vec<&str> {
    pattern.split('.').collect()
}

/// Joins segments back into a pattern.
pub(crate) fn join(segments: &[&str]) -> String {
    segments.join(".")
}

/// The byte length of the pattern the segments spell.
fn joined_len(segments: &[&str]) -> usize {
    segments.iter().map(|s| s.len()).sum::<usize>() + segments.len().saturating_sub(1)
}

/// Whether some valid name matches both validated patterns: the same answer
/// as `intersect_segments(a, b).is_some()`, without allocating (`check`
/// asks it for every pair of a sent and a received rule).
pub(crate) fn overlap(a: &[&str], b: &[&str]) -> bool {
    let mut len = 0;
    let mut i = 0;
    loop {
        let segment = match (a.get(i).copied(), b.get(i).copied()) {
            (None, None) => break,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(TAIL), Some(TAIL)) => TAIL,
            (Some(TAIL), Some(_)) => {
                len += joined_len(&b[i..]) + usize::from(i > 0);
                break;
            }
            (Some(_), Some(TAIL)) => {
                len += joined_len(&a[i..]) + usize::from(i > 0);
                break;
            }
            (Some(ONE), Some(other)) | (Some(other), Some(ONE)) => other,
            (Some(x), Some(y)) => {
                if x != y {
                    return false;
                }
                x
            }
        };
        len += segment.len() + usize::from(i > 0);
        i += 1;
        if segment == TAIL {
            break;
        }
    }
    len <= NAME_BYTES_MAX
}

/// The intersection of two validated patterns, as segments: the names both
/// match are exactly the names the result matches. `None` when no valid name
/// matches both. See the module documentation for the rules.
pub(crate) fn intersect_segments<'a>(a: &[&'a str], b: &[&'a str]) -> Option<Vec<&'a str>> {
    let mut out: Vec<&'a str> = Vec::with_capacity(a.len().max(b.len()));
    let mut i = 0;
    loop {
        match (a.get(i).copied(), b.get(i).copied()) {
            (None, None) => break,
            // One ended; the other needs at least one more segment.
            (None, Some(_)) | (Some(_), None) => return None,
            (Some(TAIL), Some(TAIL)) => {
                out.push(TAIL);
                break;
            }
            // `>` matches any non-empty rest, so the other rest (non-empty,
            // matching only non-empty sequences) is the intersection.
            (Some(TAIL), Some(_)) => {
                out.extend_from_slice(&b[i..]);
                break;
            }
            (Some(_), Some(TAIL)) => {
                out.extend_from_slice(&a[i..]);
                break;
            }
            (Some(ONE), Some(other)) | (Some(other), Some(ONE)) => out.push(other),
            (Some(x), Some(y)) => {
                if x != y {
                    return None;
                }
                out.push(x);
            }
        }
        i += 1;
    }
    // Every name the result matches is at least as long as the result (a
    // wildcard segment stands for at least one byte), and every result this
    // short is matched by some valid name (put `x` for each wildcard).
    (joined_len(&out) <= NAME_BYTES_MAX).then_some(out)
}

/// The pattern matching exactly the names that both `a` and `b` match, or
/// `None` when no valid name matches both (or either is not a valid pattern).
/// Exact names are patterns without wildcards.
///
/// ```
/// use courier_manifest::intersect_patterns;
/// assert_eq!(intersect_patterns("todo.>", "*.created").as_deref(), Some("todo.created"));
/// assert_eq!(intersect_patterns("todo.*", "todo.>").as_deref(), Some("todo.*"));
/// assert_eq!(intersect_patterns(">", "a.*.>").as_deref(), Some("a.*.>"));
/// assert_eq!(intersect_patterns("todo.*", "user.*"), None);
/// assert_eq!(intersect_patterns("todo.>", "todo"), None); // `>` needs a segment
/// ```
pub fn intersect_patterns(a: &str, b: &str) -> Option<String> {
    if validate_pattern(a).is_err() || validate_pattern(b).is_err() {
        return None;
    }
    intersect_segments(&segments(a), &segments(b)).map(|s| join(&s))
}

/// Whether every name that validated `inner` matches is also matched by
/// validated `outer`.
///
/// Patterns of this grammar are canonical (two different patterns match
/// different sets of unbounded names), so `inner ⊆ outer` exactly when their
/// intersection is `inner` itself.
pub(crate) fn covers_segments(outer: &[&str], inner: &[&str]) -> bool {
    intersect_segments(outer, inner).is_some_and(|i| i == inner)
}

/// Whether every name `inner` matches is also matched by `outer` (both
/// valid patterns; `false` otherwise).
///
/// ```
/// use courier_manifest::pattern_covers;
/// assert!(pattern_covers("todo.>", "todo.*"));
/// assert!(pattern_covers("todo.*", "todo.create"));
/// assert!(!pattern_covers("todo.*", "todo.>"));
/// ```
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    validate_pattern(outer).is_ok()
        && validate_pattern(inner).is_ok()
        && covers_segments(&segments(outer), &segments(inner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::pattern_matches;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("a.b", "a.b", Some("a.b")),
            ("a.b", "a.c", None),
            ("a.*", "a.b", Some("a.b")),
            ("*.b", "a.*", Some("a.b")),
            ("*.*", "*", None),
            ("a.>", "a", None),
            ("a.>", "a.b", Some("a.b")),
            ("a.>", "a.b.c", Some("a.b.c")),
            ("a.>", "*.b.>", Some("a.b.>")),
            ("a.>", "a.>", Some("a.>")),
            ("a.*", "a.>", Some("a.*")),
            (">", "*", Some("*")),
            (">", ">", Some(">")),
            ("*.>", "*", None),
            ("*.>", ">", Some("*.>")),
            ("a.*.c", "*.b.*", Some("a.b.c")),
            ("a.*.c", "*.b.d", None),
        ];
        for &(a, b, want) in cases {
            assert_eq!(intersect_patterns(a, b).as_deref(), want, "{a} ∩ {b}");
            assert_eq!(intersect_patterns(b, a).as_deref(), want, "{b} ∩ {a}");
        }
    }

    #[test]
    fn too_long_intersection_is_empty() {
        // Each side is valid (≤ 255 bytes), but a name matching both would
        // need 200 + 1 + 200 bytes.
        let left = format!("{}.*", "a".repeat(200));
        let right = format!("*.{}", "b".repeat(200));
        assert_eq!(intersect_patterns(&left, &right), None);
        assert!(!overlap(&segments(&left), &segments(&right)));
        // Through a tail: 200 + 1 + 100 bytes at least.
        let left = format!("{}.>", "a".repeat(200));
        let right = format!("*.{}", "b".repeat(100));
        assert_eq!(intersect_patterns(&left, &right), None);
        assert!(!overlap(&segments(&left), &segments(&right)));
        assert!(!overlap(&segments(&right), &segments(&left)));
        // At exactly 255 bytes it is still a valid name.
        let left = format!("{}.*", "a".repeat(127));
        let right = format!("*.{}", "b".repeat(127));
        let both = format!("{}.{}", "a".repeat(127), "b".repeat(127));
        assert_eq!(intersect_patterns(&left, &right), Some(both));
        assert!(overlap(&segments(&left), &segments(&right)));
        let left = format!("{}.>", "a".repeat(127));
        let right = format!("*.{}", "b".repeat(127));
        assert!(overlap(&segments(&left), &segments(&right)));
        assert!(overlap(&segments(&right), &segments(&left)));
    }

    #[test]
    fn invalid_patterns_intersect_nothing() {
        assert_eq!(intersect_patterns("a b", ">"), None);
        assert_eq!(intersect_patterns(">", "a.>.b"), None);
        assert_eq!(intersect_patterns("", ">"), None);
        assert!(!pattern_covers(">", "a\0"));
    }

    fn pattern() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("*".to_string()),
        ];
        (prop::collection::vec(segment, 1..4), any::<bool>()).prop_map(|(mut segs, tail)| {
            if tail {
                segs.push(">".to_string());
            }
            segs.join(".")
        })
    }

    /// Every name of 1 to 5 segments over {a, b, c}: longer than any pattern
    /// above by two segments and with a literal no pattern uses, so it
    /// tells every pair of these patterns apart.
    fn all_names() -> Vec<String> {
        let mut names = Vec::new();
        let mut layer = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for prefix in &layer {
                for s in ["a", "b", "c"] {
                    let name = if prefix.is_empty() {
                        s.to_string()
                    } else {
                        format!("{prefix}.{s}")
                    };
                    names.push(name.clone());
                    next.push(name);
                }
            }
            layer = next;
        }
        names
    }

    proptest! {
        #[test]
        fn intersection_is_exact(a in pattern(), b in pattern()) {
            let both = intersect_patterns(&a, &b);
            if let Some(p) = &both {
                prop_assert!(validate_pattern(p).is_ok(), "{p}");
            }
            for name in all_names() {
                let expected = pattern_matches(&a, &name) && pattern_matches(&b, &name);
                let got = both.as_deref().is_some_and(|p| pattern_matches(p, &name));
                prop_assert_eq!(got, expected, "{} ∩ {} = {:?} on {}", a, b, both, name);
            }
            prop_assert_eq!(overlap(&segments(&a), &segments(&b)), both.is_some());
        }

        #[test]
        fn covers_is_containment(a in pattern(), b in pattern()) {
            let contained = all_names()
                .iter()
                .all(|n| !pattern_matches(&b, n) || pattern_matches(&a, n));
            prop_assert_eq!(pattern_covers(&a, &b), contained, "{} ⊇ {}", a, b);
        }
    }
}
