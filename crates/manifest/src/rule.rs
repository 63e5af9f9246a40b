//! Name rules: `todo.create@1`, `todo.*`, `todo.>@2`.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use courier_proto::{pattern_matches, validate_name, validate_pattern, NameError};
use thiserror::Error;

/// Longest part of an offending value quoted back in an error message, in
/// characters: enough to recognise it, short enough for one line.
pub(crate) const QUOTED_CHARS_MAX: usize = 80;

/// A value quoted for an error message: escaped (control characters, NUL and
/// quotes become visible) and cut to [`QUOTED_CHARS_MAX`] characters.
pub(crate) fn quoted(text: &str) -> String {
    let mut cut: String = text.chars().take(QUOTED_CHARS_MAX).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

/// Where something was written in the manifest: 1-based line and column
/// (the column counts characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` in `text` (clamped to the text).
    pub(crate) fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.bytes().filter(|&b| b == b'\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One entry of a service's `sends`, `publishes` or `receives`: an exact
/// message name or a wildcard pattern (see [`courier_proto::validate_pattern`]),
/// optionally pinned to one major version.
///
/// Written `NAME`, `PATTERN`, `NAME@MAJOR` or `PATTERN@MAJOR`. A rule with a
/// major admits only messages of that major version (`todo.create@1` admits
/// 1.0 and 1.7, not 2.0); a rule without one admits every version.
///
/// Where the rule was written ([`NameRule::location`]) is not part of its
/// identity: equality, ordering and hashing look at `pattern` and `major`.
///
/// ```
/// use courier_manifest::NameRule;
/// let rule: NameRule = "todo.*@1".parse()?;
/// assert_eq!(rule.pattern, "todo.*");
/// assert_eq!(rule.major, Some(1));
/// assert!(rule.admits("todo.create", 1));
/// assert!(!rule.admits("todo.create", 2));
/// assert!(!rule.admits("todo.item.create", 1));
/// assert_eq!(rule.to_string(), "todo.*@1");
/// assert!("todo create@1".parse::<NameRule>().is_err());
/// # Ok::<(), courier_manifest::RuleError>(())
/// ```
#[derive(Debug, Clone)]
pub struct NameRule {
    /// An exact name or a pattern; always valid per `validate_pattern`.
    pub pattern: String,
    /// The one major version admitted, or `None` for every version.
    pub major: Option<u16>,
    pub(crate) location: Option<Location>,
}

/// Why a rule string was refused. The message quotes the whole rule and says
/// how to write it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RuleError {
    #[error("{rule} is not a valid message name or pattern: {source}")]
    Pattern {
        /// The rule as written, quoted.
        rule: String,
        source: NameError,
    },
    #[error(
        "{rule} has an invalid major version {major}: write NAME@MAJOR with MAJOR a whole \
         number from 0 to 65535, like \"todo.create@1\""
    )]
    Major {
        /// The rule as written, quoted.
        rule: String,
        /// The text after the `@`, quoted.
        major: String,
    },
}

impl NameRule {
    /// Parses `NAME`, `PATTERN`, `NAME@MAJOR` or `PATTERN@MAJOR`.
    pub fn parse(text: &str) -> Result<NameRule, RuleError> {
        let (pattern, major) = match text.split_once('@') {
            None => (text, None),
            Some((pattern, major)) => (pattern, Some(major)),
        };
        if let Err(source) = validate_pattern(pattern) {
            return Err(RuleError::Pattern {
                rule: quoted(text),
                source,
            });
        }
        let major = match major {
            None => None,
            Some(digits) => Some(parse_major(digits).ok_or_else(|| RuleError::Major {
                rule: quoted(text),
                major: quoted(digits),
            })?),
        };
        Ok(NameRule {
            pattern: pattern.to_string(),
            major,
            location: None,
        })
    }

    /// Where the rule was written, for rules read from a manifest.
    pub fn location(&self) -> Option<Location> {
        self.location
    }

    /// Whether the rule contains a wildcard (`*` or `>`).
    pub fn is_wildcard(&self) -> bool {
        courier_proto::is_wildcard(&self.pattern)
    }

    /// Whether a message called `name` at major version `major` falls under
    /// this rule. A `name` that is not a valid message name never does — a
    /// name with a space, a control character or a look-alike letter must
    /// not slip through a wildcard.
    pub fn admits(&self, name: &str, major: u16) -> bool {
        self.matches_name(name) && self.major.is_none_or(|m| m == major)
    }

    /// Whether `name` falls under the pattern, whatever its version.
    pub fn matches_name(&self, name: &str) -> bool {
        validate_name(name).is_ok() && pattern_matches(&self.pattern, name)
    }
}

/// A major version: plain ASCII digits (no sign, no spaces) that fit a u16.
fn parse_major(digits: &str) -> Option<u16> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl FromStr for NameRule {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NameRule::parse(s)
    }
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.major {
            Some(major) => write!(f, "{}@{major}", self.pattern),
            None => f.write_str(&self.pattern),
        }
    }
}

impl PartialEq for NameRule {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern && self.major == other.major
    }
}

impl Eq for NameRule {}

impl Hash for NameRule {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pattern.hash(state);
        self.major.hash(state);
    }
}

impl PartialOrd for NameRule {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NameRule {
    fn cmp(&self, other: &Self) -> Ordering {
        (&self.pattern, self.major).cmp(&(&other.pattern, other.major))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms() {
        let cases: &[(&str, &str, Option<u16>)] = &[
            ("todo.create", "todo.create", None),
            ("todo.create@1", "todo.create", Some(1)),
            ("todo.*", "todo.*", None),
            ("todo.>@2", "todo.>", Some(2)),
            (">", ">", None),
            ("a@0", "a", Some(0)),
            ("a@65535", "a", Some(65535)),
            ("a@007", "a", Some(7)),
        ];
        for &(text, pattern, major) in cases {
            let rule = NameRule::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (rule.pattern.as_str(), rule.major),
                (pattern, major),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_bad_rules() {
        for bad in [
            "",
            "@1",
            "todo create@1",
            "todo.create@",
            "todo.create@v1",
            "todo.create@1.0",
            "todo.create@-1",
            "todo.create@+1",
            "todo.create@ 1",
            "todo.create@65536",
            "todo.create@1@2",
            "todo.>.x",
            "todo.cre*",
            "Todo.create",
            "todo.create\0",
            "t\u{043e}do.create",
            "todo..create",
            "todo.create@١", // Arabic-Indic digit one
        ] {
            assert!(NameRule::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn error_messages_quote_the_rule_and_say_what_to_do() {
        let err = NameRule::parse("todo create@1").expect_err("a space");
        assert_eq!(
            err.to_string(),
            "\"todo create@1\" is not a valid message name or pattern: name \"todo create\" \
             has the character ' ' at byte 4; names use only a-z, 0-9, '.', '_' and '-'"
        );
        let err = NameRule::parse("todo.create@v1").expect_err("a letter");
        assert_eq!(
            err.to_string(),
            "\"todo.create@v1\" has an invalid major version \"v1\": write NAME@MAJOR with \
             MAJOR a whole number from 0 to 65535, like \"todo.create@1\""
        );
        // Control characters are escaped in the message, and long values cut.
        let err = NameRule::parse("a\u{1b}[2J").expect_err("escape");
        assert!(err.to_string().starts_with("\"a\\u{1b}[2J\""), "{err}");
        let err = NameRule::parse(&"A".repeat(1000)).expect_err("long");
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn admits_checks_name_validity_before_matching() {
        let everything = NameRule::parse(">").expect("valid");
        assert!(everything.admits("todo.create", 9));
        for bad in [
            "todo. create",
            "todo.create\0",
            "todo.\u{0441}reate",
            "",
            "todo.*",
            "a\nb",
        ] {
            assert!(!everything.admits(bad, 1), "{bad:?}");
        }
        let star = NameRule::parse("todo.*").expect("valid");
        // A space inside a segment would match `*` if the name were not checked.
        assert!(!star.admits("todo.x y", 1));
    }

    #[test]
    fn location() {
        let text = "ab\ncdé f\n";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 3),
            Location { line: 2, column: 1 }
        );
        // `é` is two bytes, one column.
        assert_eq!(
            Location::of_offset(text, 7),
            Location { line: 2, column: 4 }
        );
        // Inside `é`: rounds down to its start.
        assert_eq!(
            Location::of_offset(text, 6),
            Location { line: 2, column: 3 }
        );
        assert_eq!(
            Location::of_offset(text, 999),
            Location { line: 3, column: 1 }
        );
    }
}
