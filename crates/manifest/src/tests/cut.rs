//! Subscription cutting: a proptest against brute force.

use super::*;

fn pattern_strategy() -> impl Strategy<Value = String> {
    let segment = prop_oneof![Just("a"), Just("b"), Just("*")];
    (prop::collection::vec(segment, 1..4), any::<bool>()).prop_map(|(segments, tail)| {
        let mut p = segments.join(".");
        if tail {
            p.push_str(".>");
        }
        p
    })
}

fn rule_strategy() -> impl Strategy<Value = String> {
    (pattern_strategy(), prop::option::of(1u16..3)).prop_map(|(p, major)| match major {
        Some(m) => format!("{p}@{m}"),
        None => p,
    })
}

/// Every name of 1 to 5 segments over {a, b, c} (`c` appears in no
/// pattern, so it stands for every other literal).
fn names_to_try() -> Vec<String> {
    let mut out = Vec::new();
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
                out.push(name.clone());
                next.push(name);
            }
        }
        layer = next;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A name matches some returned pattern iff it matches the requested
    /// pattern and one of the allowed ones; with versions, the cut rules
    /// admit exactly what `may_receive` and the request both admit.
    #[test]
    fn cut_is_exact(
        requested in pattern_strategy(),
        allowed in prop::collection::btree_set(rule_strategy(), 1..5),
    ) {
        let list: Vec<String> = allowed.iter().map(|r| format!("{r:?}")).collect();
        let text = format!("[services.s]\nreceives = [{}]\n", list.join(", "));
        let m = Manifest::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let allowed_rules = rules(&allowed.iter().map(String::as_str).collect::<Vec<_>>());
        let patterns = m.allowed_receive_patterns("s", &requested);
        let cut = m.cut_subscription("s", &requested).unwrap_or_default();
        for p in &patterns {
            prop_assert!(courier_proto::validate_pattern(p).is_ok());
        }
        for name in names_to_try() {
            let wanted = pattern_matches(&requested, &name);
            let expected = wanted && allowed_rules.iter().any(|r| pattern_matches(&r.pattern, &name));
            let got = patterns.iter().any(|p| pattern_matches(p, &name));
            prop_assert_eq!(got, expected, "{} within {:?} gave {:?}; name {}", requested, allowed, patterns, name);
            for major in 0..4u16 {
                let expected = wanted && m.may_receive("s", &name, major).is_ok();
                let got = cut.iter().any(|r| r.admits(&name, major));
                prop_assert_eq!(got, expected, "{} within {:?} gave {:?}; {}@{}", requested, allowed, cut, name, major);
            }
        }
        // Narrowest: no returned pattern covers another.
        for (i, a) in patterns.iter().enumerate() {
            for (j, b) in patterns.iter().enumerate() {
                prop_assert!(i == j || !pattern_covers(a, b), "{} covers {} in {:?}", a, b, patterns);
            }
        }
    }
}
