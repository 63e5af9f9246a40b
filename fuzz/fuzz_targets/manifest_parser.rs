//! Fuzzes the manifest parser: arbitrary bytes must never panic, a refusal
//! must be one line that points inside the input, and every manifest that
//! parses must answer the broker's questions consistently with itself.
//!
//! Properties checked for each accepted manifest:
//! 1. `check` runs and prints one line per problem;
//! 2. every exact rule of a service's `sends`/`publishes` is allowed by
//!    `may_send`, and of its `receives` by `may_receive`, at the rule's major;
//! 3. a `>` subscription is cut to valid patterns, each inside one of the
//!    service's `receives` patterns (never wider than the manifest);
//! 4. every listed certificate subject and token hash identifies exactly
//!    the service (or admin) that lists it.
#![no_main]

use courier_manifest::{check, pattern_covers, Identity, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let manifest = match Manifest::parse_bytes(data) {
        Ok(manifest) => manifest,
        Err(err) => {
            let message = err.to_string();
            assert!(!message.contains('\n'), "multi-line error: {message:?}");
            if let Some(at) = err.location() {
                let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
                assert!(
                    at.line >= 1 && at.line <= lines,
                    "{at} outside {lines} lines"
                );
                assert!(at.column >= 1, "{at}");
            }
            return;
        }
    };

    for problem in check(&manifest) {
        assert!(!problem.to_string().contains('\n'), "{problem:?}");
    }

    for (name, spec) in manifest.services() {
        for rule in spec.send_rules().filter(|r| !r.is_wildcard()) {
            let major = rule.major.unwrap_or(0);
            assert_eq!(
                manifest.may_send(name, &rule.pattern, major),
                Ok(()),
                "{name} {rule}"
            );
        }
        for rule in spec.receives.iter().filter(|r| !r.is_wildcard()) {
            let major = rule.major.unwrap_or(0);
            assert_eq!(
                manifest.may_receive(name, &rule.pattern, major),
                Ok(()),
                "{name} {rule}"
            );
        }
        for pattern in manifest.allowed_receive_patterns(name, ">") {
            assert!(
                courier_proto::validate_pattern(&pattern).is_ok(),
                "{pattern}"
            );
            assert!(
                spec.receives
                    .iter()
                    .any(|r| pattern_covers(&r.pattern, &pattern)),
                "{pattern} is wider than {name}'s receives"
            );
        }
        let me = Some(Identity::Service(name.clone()));
        for subject in &spec.certificates {
            assert_eq!(manifest.authenticate_certificate(subject), me);
        }
    }
    for subject in &manifest.admin().certificates {
        assert_eq!(
            manifest.authenticate_certificate(subject),
            Some(Identity::Admin)
        );
    }
});
