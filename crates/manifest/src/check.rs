//! `courier check`: does the application described by a manifest hang
//! together?

use std::collections::BTreeSet;
use std::fmt;

use courier_proto::is_wildcard;

use crate::manifest::Manifest;
use crate::pattern::{covers_segments, intersect_segments, join, overlap, segments};
use crate::rule::NameRule;

/// How bad a [`Problem`] is: errors make `courier check` fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One thing `courier check` found.
///
/// Displays as one line, `line 7: error: …` (or `error: …` without a
/// line); [`Problem::display_in`] puts the file first, compiler-style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
    /// The manifest line the problem is about (1-based), when there is one.
    pub line: Option<usize>,
}

impl Problem {
    fn new(severity: Severity, line: Option<usize>, message: String) -> Problem {
        Problem {
            severity,
            message,
            line,
        }
    }

    /// One line naming the file: `courier.toml:7: error: …`.
    ///
    /// ```
    /// use courier_manifest::{check, Manifest};
    /// let manifest = Manifest::parse("[services.web]\nsends = [\"todo.create\"]\ntokens = []\n")?;
    /// let problems = check(&manifest);
    /// assert_eq!(
    ///     problems[1].display_in("courier.toml").to_string(),
    ///     "courier.toml:2: error: service web sends todo.create, but no service receives it: \
    ///      add it to the receives of the service that handles it",
    /// );
    /// # Ok::<(), courier_manifest::ManifestError>(())
    /// ```
    pub fn display_in<'a>(&'a self, origin: &'a str) -> impl fmt::Display + 'a {
        struct In<'a>(&'a Problem, &'a str);
        impl fmt::Display for In<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let In(problem, origin) = self;
                match problem.line {
                    Some(line) => write!(f, "{origin}:{line}: ")?,
                    None => write!(f, "{origin}: ")?,
                }
                write!(f, "{}: {}", problem.severity, problem.message)
            }
        }
        In(self, origin)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}", self.severity, self.message)
    }
}

/// Whether any problem is an error (`courier check` then exits non-zero).
pub fn has_errors(problems: &[Problem]) -> bool {
    problems.iter().any(|p| p.severity == Severity::Error)
}

/// A rule in some service's lists, split into segments once.
struct Entry<'m> {
    service: &'m str,
    rule: &'m NameRule,
    segments: Vec<&'m str>,
    /// For sent rules: from `publishes` (an event).
    event: bool,
}

impl<'m> Entry<'m> {
    fn new(service: &'m str, rule: &'m NameRule, event: bool) -> Entry<'m> {
        Entry {
            service,
            rule,
            segments: segments(&rule.pattern),
            event,
        }
    }

    fn line(&self) -> Option<usize> {
        self.rule.location().map(|l| l.line)
    }
}

/// Whether majors (each `None` for "any") have a value in common.
fn majors_meet(majors: &[Option<u16>]) -> bool {
    let mut pinned = majors.iter().flatten();
    match pinned.next() {
        None => true,
        Some(first) => pinned.all(|m| m == first),
    }
}

fn names(services: &BTreeSet<&str>) -> String {
    services.iter().copied().collect::<Vec<_>>().join(", ")
}

/// Checks that the application hangs together. Problems come in manifest
/// line order (those without a line first).
///
/// # Commands and events
///
/// A manifest lists what each service `sends` and `receives`, not whether a
/// name is a command (exactly one receiving service) or an event (any number
/// of them). The rule:
///
/// - a name in some service's optional `publishes` list is an **event**;
/// - every other sent name (in `sends`) is a **command**.
///
/// So a manifest of `sends` and `receives` only is read as
/// commands, and a name meant to fan out to several services is declared
/// where it is sent: `publishes = ["todo.created@1"]`, mirroring
/// `courier send` (commands) and `courier publish` (events). For
/// authorisation, `publishes` grants sending exactly like `sends`.
///
/// # What is checked
///
/// | problem | severity |
/// |---|---|
/// | a sent rule (command or event) that no receive rule overlaps | error |
/// | a sent rule `NAME@M` that receivers overlap, none at major `M` | error |
/// | a command (or, for a wildcard send, some names of it) that two or more services receive at a common major | error |
/// | a wildcard sent rule that no single receive rule covers (some names may have no receiver) | warning |
/// | a name in one service's `sends` that another service `publishes` (checked as an event) | warning |
/// | a receive rule no sent rule overlaps, or none at its major | warning |
/// | a service with neither tokens nor certificates (it cannot authenticate), unless `courier up` runs it | warning |
/// | a manifest without services | warning |
///
/// Wildcards are compared through pattern intersection
/// ([`intersect_patterns`](crate::intersect_patterns)), which is exact; two
/// places approximate, both documented in the messages' wording: "has no
/// receiver for some names" is reported when no *single* receive rule covers
/// a wildcard send (several rules together may, e.g. `a.*` and `a.*.>` cover
/// `a.>`), and a command conflict inside a wildcard send is skipped only when
/// a single `publishes` rule covers it.
///
/// A send without a major (`todo.create`) may carry any major, so it is
/// compatible with every receiver; a receive without one accepts every major.
///
/// ```
/// use courier_manifest::{check, has_errors, hash_token, Manifest};
/// let text = format!(
///     r#"
/// [services.web]
/// sends = ["todo.create@1"]
/// receives = ["todo.created@1"]
/// tokens = ["{web}"]
///
/// [services.todo]
/// receives = ["todo.create@1"]
/// publishes = ["todo.created@1"]
/// tokens = ["{todo}"]
///
/// [services.audit]
/// receives = ["todo.create@2", "todo.created@1"]
/// tokens = ["{audit}"]
/// "#,
///     web = hash_token("w"), todo = hash_token("t"), audit = hash_token("a"),
/// );
/// let problems = check(&Manifest::parse(&text)?);
/// let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
/// assert_eq!(lines, [
///     "line 13: warning: service audit receives todo.create@2, but no service sends it at \
///      major 2 (sent: web sends todo.create@1)",
/// ]);
/// assert!(!has_errors(&problems));
/// # Ok::<(), courier_manifest::ManifestError>(())
/// ```
pub fn check(manifest: &Manifest) -> Vec<Problem> {
    let mut problems = Vec::new();
    let services = manifest.services();
    if services.is_empty() {
        problems.push(Problem::new(
            Severity::Warning,
            None,
            "the manifest declares no services: add a [services.NAME] table for each".into(),
        ));
    }

    let mut sent: Vec<Entry<'_>> = Vec::new();
    let mut received: Vec<Entry<'_>> = Vec::new();
    for (name, spec) in services {
        // `courier up` makes a token for each service it runs.
        if spec.tokens.is_empty() && spec.certificates.is_empty() && spec.app.run.is_none() {
            problems.push(Problem::new(
                Severity::Warning,
                spec.location().map(|l| l.line),
                format!(
                    "service {name} has neither tokens nor certificates, so it cannot \
                     authenticate: add a token hash from `courier token new`"
                ),
            ));
        }
        sent.extend(spec.sends.iter().map(|r| Entry::new(name, r, false)));
        sent.extend(spec.publishes.iter().map(|r| Entry::new(name, r, true)));
        received.extend(spec.receives.iter().map(|r| Entry::new(name, r, false)));
    }
    let published: Vec<&Entry<'_>> = sent.iter().filter(|e| e.event).collect();

    for send in &sent {
        check_send(send, &received, &published, &mut problems);
    }
    for receive in &received {
        check_receive(receive, &sent, &mut problems);
    }

    problems.sort_by_key(|p| p.line.unwrap_or(0));
    problems
}

fn check_send(
    send: &Entry<'_>,
    received: &[Entry<'_>],
    published: &[&Entry<'_>],
    problems: &mut Vec<Problem>,
) {
    let (who, rule, line) = (send.service, send.rule, send.line());
    let verb = if send.event { "publishes" } else { "sends" };
    let wildcard = rule.is_wildcard();

    // Receive rules that share names with the sent rule, with the shared part.
    let overlapping: Vec<(&Entry<'_>, Vec<&str>)> = received
        .iter()
        .filter(|r| overlap(&send.segments, &r.segments))
        .filter_map(|r| Some((r, intersect_segments(&send.segments, &r.segments)?)))
        .collect();
    if overlapping.is_empty() {
        let what = if wildcard {
            "no service receives any name matching it"
        } else {
            "no service receives it"
        };
        problems.push(Problem::new(
            Severity::Error,
            line,
            format!(
                "service {who} {verb} {rule}, but {what}: add it to the receives of the \
                 service that handles it"
            ),
        ));
        return;
    }

    let compatible: Vec<&(&Entry<'_>, Vec<&str>)> = overlapping
        .iter()
        .filter(|(r, _)| majors_meet(&[rule.major, r.rule.major]))
        .collect();
    if compatible.is_empty() {
        let major = rule.major.unwrap_or_default();
        let receivers: Vec<String> = overlapping
            .iter()
            .map(|(r, _)| format!("{} receives {}", r.service, r.rule))
            .collect();
        problems.push(Problem::new(
            Severity::Error,
            line,
            format!(
                "service {who} {verb} {rule}, but no receiver accepts major {major} ({}): \
                 send a major they accept, or add {}@{major} to a receiver",
                receivers.join("; "),
                rule.pattern,
            ),
        ));
        return;
    }

    if wildcard
        && !compatible
            .iter()
            .any(|(r, _)| covers_segments(&r.segments, &send.segments))
    {
        let parts: BTreeSet<String> = compatible.iter().map(|(_, both)| join(both)).collect();
        problems.push(Problem::new(
            Severity::Warning,
            line,
            format!(
                "service {who} {verb} {rule}, but no single receive rule covers it, so some \
                 names may have no receiver (received: {})",
                parts.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }

    if send.event {
        return;
    }

    // A command. Is it an event after all, because someone publishes it?
    if !wildcard {
        let publishers: BTreeSet<&str> = published
            .iter()
            .filter(|p| covers_segments(&p.segments, &send.segments))
            .map(|p| p.service)
            .collect();
        if !publishers.is_empty() {
            problems.push(Problem::new(
                Severity::Warning,
                line,
                format!(
                    "service {who} sends {rule}, which {} publishes as an event; it is checked \
                     as an event: move it to {who}'s publishes to say so",
                    names(&publishers)
                ),
            ));
            return;
        }
    }

    // Names two services both receive at a common major (outside what a
    // single publishes rule declares an event). All services sharing the
    // first such set of names are reported, in one problem per sent rule.
    let mut conflict: Option<(Vec<&str>, BTreeSet<&str>)> = None;
    for (i, (a, a_part)) in compatible.iter().enumerate() {
        for (b, _) in &compatible[i + 1..] {
            if a.service == b.service || !majors_meet(&[rule.major, a.rule.major, b.rule.major]) {
                continue;
            }
            let Some(shared) = intersect_segments(a_part, &b.segments) else {
                continue;
            };
            if published
                .iter()
                .any(|p| covers_segments(&p.segments, &shared))
            {
                continue;
            }
            match &mut conflict {
                None => conflict = Some((shared, [a.service, b.service].into_iter().collect())),
                Some((first, services)) if *first == shared => {
                    services.insert(a.service);
                    services.insert(b.service);
                }
                Some(_) => {}
            }
        }
    }
    if let Some((shared, receivers)) = conflict {
        problems.push(command_conflict(
            who,
            rule,
            &join(&shared),
            &receivers,
            line,
        ));
    }
}

fn command_conflict(
    who: &str,
    rule: &NameRule,
    names_matching: &str,
    receivers: &BTreeSet<&str>,
    line: Option<usize>,
) -> Problem {
    let what = if is_wildcard(names_matching) {
        format!("names matching {names_matching} are commands")
    } else {
        format!("{names_matching} is a command")
    };
    Problem::new(
        Severity::Error,
        line,
        format!(
            "{what} (service {who} sends {rule}) received by {} services: {}; a command has \
             exactly one receiving service: keep it in one service's receives, or, if it is an \
             event, list it under {who}'s publishes",
            receivers.len(),
            names(receivers)
        ),
    )
}

fn check_receive(receive: &Entry<'_>, sent: &[Entry<'_>], problems: &mut Vec<Problem>) {
    let (who, rule, line) = (receive.service, receive.rule, receive.line());
    let senders: Vec<&Entry<'_>> = sent
        .iter()
        .filter(|s| overlap(&s.segments, &receive.segments))
        .collect();
    if senders.is_empty() {
        problems.push(Problem::new(
            Severity::Warning,
            line,
            format!(
                "service {who} receives {rule}, but no service sends {}",
                if rule.is_wildcard() {
                    "any name matching it"
                } else {
                    "it"
                }
            ),
        ));
        return;
    }
    let Some(major) = rule.major else {
        return;
    };
    if senders
        .iter()
        .any(|s| majors_meet(&[s.rule.major, Some(major)]))
    {
        return;
    }
    let listed: Vec<String> = senders
        .iter()
        .map(|s| {
            let verb = if s.event { "publishes" } else { "sends" };
            format!("{} {verb} {}", s.service, s.rule)
        })
        .collect();
    problems.push(Problem::new(
        Severity::Warning,
        line,
        format!(
            "service {who} receives {rule}, but no service sends it at major {major} (sent: {})",
            listed.join("; ")
        ),
    ));
}
