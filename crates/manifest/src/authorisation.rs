//! The questions the broker asks a manifest: may a service send or
//! receive a name, and what of a subscription it may have.

use courier_proto::{validate_name, validate_pattern};

use crate::pattern::{covers_segments, intersect_segments, join, segments};
use crate::rule::{quoted, NameRule};

use crate::manifest::*;

impl Manifest {
    pub(crate) fn spec(&self, service: &str) -> Result<&ServiceSpec, Denial> {
        self.services
            .get(service)
            .ok_or_else(|| Denial::UnknownService {
                service: quoted(service),
            })
    }

    /// Whether `service` may send a message called `name` at major version
    /// `major`: some rule of its `sends` or `publishes` admits both.
    ///
    /// A `name` that is not a valid message name is refused whatever the
    /// rules say (a wildcard rule must not admit `todo.x y`). The manifest
    /// does not govern replies (the broker routes a reply
    /// only back to the sender of the command it answers).
    pub fn may_send(&self, service: &str, name: &str, major: u16) -> Result<(), Denial> {
        let spec = self.spec(service)?;
        let lists = if spec.publishes.is_empty() {
            Lists::Sends
        } else {
            Lists::SendsAndPublishes
        };
        decide(service, Action::Send, lists, spec.send_rules(), name, major)
    }

    /// Whether a message called `name` at major version `major` may be
    /// delivered to `service`: some rule of its `receives` admits both.
    /// Check every delivery with it: subscription patterns
    /// ([`Manifest::allowed_receive_patterns`]) do not carry versions.
    pub fn may_receive(&self, service: &str, name: &str, major: u16) -> Result<(), Denial> {
        let spec = self.spec(service)?;
        decide(
            service,
            Action::Receive,
            Lists::Receives,
            spec.receives.iter(),
            name,
            major,
        )
    }

    /// Cuts the subscription `requested` (an exact name or a pattern) down
    /// to what `service` may receive: for each of its `receives`, the
    /// intersection of the two patterns, keeping the rule's major; then
    /// without duplicates and without rules that another one (at the same
    /// major, or at every major) already covers. Sorted.
    ///
    /// Exact: a name matches some returned pattern if and only if it
    /// matches `requested` and some `receives` pattern (see
    /// [`intersect_patterns`](crate::intersect_patterns)). Refused when the
    /// service is unknown, the pattern is invalid, or nothing is left.
    ///
    /// ```
    /// # use courier_manifest::{Manifest, NameRule};
    /// let manifest = Manifest::parse(
    ///     "[services.audit]\nreceives = [\"todo.*.done@1\", \"user.created\"]\n",
    /// )?;
    /// let rules = manifest.cut_subscription("audit", "todo.>").expect("some");
    /// assert_eq!(rules, ["todo.*.done@1".parse::<NameRule>()?]);
    /// assert!(manifest.cut_subscription("audit", "billing.>").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn cut_subscription(
        &self,
        service: &str,
        requested: &str,
    ) -> Result<Vec<NameRule>, Denial> {
        let spec = self.spec(service)?;
        if let Err(reason) = validate_pattern(requested) {
            return Err(Denial::InvalidPattern {
                pattern: quoted(requested),
                reason,
            });
        }
        let wanted = segments(requested);
        let mut cut: Vec<NameRule> = spec
            .receives
            .iter()
            .filter_map(|rule| {
                let both = intersect_segments(&wanted, &segments(&rule.pattern))?;
                Some(NameRule {
                    pattern: join(&both),
                    major: rule.major,
                    location: rule.location,
                })
            })
            .collect();
        cut.sort();
        cut.dedup();
        let covered = |inner: &NameRule| {
            cut.iter().any(|outer| {
                outer != inner
                    && outer.major.is_none_or(|m| Some(m) == inner.major)
                    && covers_segments(&segments(&outer.pattern), &segments(&inner.pattern))
            })
        };
        let narrowest: Vec<NameRule> = cut.iter().filter(|r| !covered(r)).cloned().collect();
        if narrowest.is_empty() {
            return Err(Denial::NothingToReceive {
                service: service.to_string(),
                pattern: requested.to_string(),
                rules: RuleList::of(spec.receives.iter()),
            });
        }
        Ok(narrowest)
    }

    /// The patterns to subscribe `service` to when it asks for `requested`:
    /// [`Manifest::cut_subscription`] without versions (and so possibly
    /// fewer patterns). Empty when the service is unknown, the pattern
    /// invalid, or nothing is allowed.
    ///
    /// Exact, never wider than the manifest: a valid name matches some
    /// returned pattern if and only if it matches `requested` and one of the
    /// service's `receives` patterns. Patterns carry no version, so a rule's
    /// major is enforced per delivery by [`Manifest::may_receive`].
    ///
    /// ```
    /// # use courier_manifest::Manifest;
    /// let manifest = Manifest::parse(
    ///     "[services.audit]\nreceives = [\"todo.created\", \"*.deleted\", \"user.>\"]\n",
    /// )?;
    /// assert_eq!(
    ///     manifest.allowed_receive_patterns("audit", ">"),
    ///     ["*.deleted", "todo.created", "user.>"],
    /// );
    /// assert_eq!(
    ///     manifest.allowed_receive_patterns("audit", "todo.*"),
    ///     ["todo.created", "todo.deleted"],
    /// );
    /// assert_eq!(manifest.allowed_receive_patterns("audit", "user.*.x"), ["user.*.x"]);
    /// assert_eq!(manifest.allowed_receive_patterns("audit", "billing.*"), ["billing.deleted"]);
    /// assert!(manifest.allowed_receive_patterns("audit", "billing.x.>").is_empty());
    /// # Ok::<(), courier_manifest::ManifestError>(())
    /// ```
    pub fn allowed_receive_patterns(&self, service: &str, requested: &str) -> Vec<String> {
        let Ok(rules) = self.cut_subscription(service, requested) else {
            return Vec::new();
        };
        let mut patterns: Vec<String> = rules.into_iter().map(|r| r.pattern).collect();
        patterns.sort();
        patterns.dedup();
        let split: Vec<Vec<&str>> = patterns.iter().map(|p| segments(p)).collect();
        let keep: Vec<bool> = split
            .iter()
            .enumerate()
            .map(|(i, inner)| {
                !split
                    .iter()
                    .enumerate()
                    .any(|(j, outer)| i != j && covers_segments(outer, inner))
            })
            .collect();
        patterns
            .into_iter()
            .zip(keep)
            .filter_map(|(p, keep)| keep.then_some(p))
            .collect()
    }
}

/// The common decision of `may_send` and `may_receive`.
pub(crate) fn decide<'a>(
    service: &str,
    action: Action,
    lists: Lists,
    rules: impl Iterator<Item = &'a NameRule> + Clone,
    name: &str,
    major: u16,
) -> Result<(), Denial> {
    if let Err(reason) = validate_name(name) {
        return Err(Denial::InvalidName {
            name: quoted(name),
            reason,
        });
    }
    if rules.clone().any(|rule| rule.admits(name, major)) {
        return Ok(());
    }
    let same_name: Vec<&NameRule> = rules.clone().filter(|r| r.matches_name(name)).collect();
    if same_name.is_empty() {
        return Err(Denial::NotListed {
            service: service.to_string(),
            action,
            name: name.to_string(),
            lists,
            rules: RuleList::of(rules),
        });
    }
    Err(Denial::WrongMajor {
        service: service.to_string(),
        action,
        name: name.to_string(),
        major,
        lists,
        rules: RuleList::of(same_name.into_iter()),
    })
}
