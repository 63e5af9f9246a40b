//! Message names and subscription patterns.
//!
//! A name is one or more dot-separated segments of `[a-z0-9_-]`, at most
//! [`NAME_BYTES_MAX`] bytes in all. A pattern is a name whose segments may
//! also be `*` (exactly one segment) or, as the last segment only, `>`
//! (one or more remaining segments) — the NATS conventions users know.

use thiserror::Error;

/// Longest accepted message name or pattern, in bytes (DESIGN §2).
pub const NAME_BYTES_MAX: usize = 255;

/// Why a name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {len} bytes long; at most {NAME_BYTES_MAX} are allowed")]
    TooLong { len: usize },
    #[error("name {name:?} has an empty segment (two dots in a row, or a dot at an end)")]
    EmptySegment { name: String },
    #[error("name {name:?} has the character {ch:?} at byte {offset}; names use only a-z, 0-9, '.', '_' and '-'")]
    BadCharacter {
        name: String,
        ch: char,
        offset: usize,
    },
    #[error("pattern {pattern:?} uses '>' before its last segment; '>' matches the rest and must come last")]
    TailNotLast { pattern: String },
    #[error("pattern {pattern:?} mixes a wildcard with other characters in one segment; use '*' or '>' as a whole segment")]
    PartialWildcard { pattern: String },
}

const fn is_name_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')
}

/// What each byte may be in a name: 0 never, 1 inside a segment, 2 a dot.
const NAME_BYTE_CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        class[b] = if is_name_byte(b as u8) {
            1
        } else if b as u8 == b'.' {
            2
        } else {
            0
        };
        b += 1;
    }
    class
};

/// One pass without early exits for the valid case: every send is checked
/// by the SDK and again by the broker.
fn is_valid_name(bytes: &[u8]) -> bool {
    if bytes.is_empty() || bytes.len() > NAME_BYTES_MAX {
        return false;
    }
    // The start counts as a dot, so a leading dot is an empty segment.
    let mut after_dot = true;
    let mut valid = true;
    for &b in bytes {
        let class = NAME_BYTE_CLASS[usize::from(b)];
        valid &= class != 0 && !(after_dot && class == 2);
        after_dot = class == 2;
    }
    valid && !after_dot
}

fn check_common(text: &str) -> Result<(), NameError> {
    if text.is_empty() {
        return Err(NameError::Empty);
    }
    if text.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong { len: text.len() });
    }
    // Byte-wise rather than split: every send and delivery checks a name.
    let bytes = text.as_bytes();
    if bytes[0] == b'.'
        || bytes[bytes.len() - 1] == b'.'
        || bytes.windows(2).any(|pair| pair == b"..")
    {
        return Err(NameError::EmptySegment {
            name: printable(text),
        });
    }
    Ok(())
}

fn printable(text: &str) -> String {
    text.chars().take(80).collect()
}

fn bad_character(text: &str, offset: usize) -> NameError {
    let ch = text[offset..].chars().next().unwrap_or('\u{fffd}');
    NameError::BadCharacter {
        name: printable(text),
        ch,
        offset,
    }
}

/// Checks that `name` is a valid message name (no wildcards).
///
/// ```
/// assert!(courier_proto::validate_name("todo.create").is_ok());
/// assert!(courier_proto::validate_name("todo.*").is_err());
/// ```
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if is_valid_name(name.as_bytes()) {
        return Ok(());
    }
    name_error(name)
}

/// The check `is_valid_name` makes, step by step, naming what is wrong.
fn name_error(name: &str) -> Result<(), NameError> {
    check_common(name)?;
    for (offset, b) in name.bytes().enumerate() {
        if b != b'.' && !is_name_byte(b) {
            return Err(bad_character(name, offset));
        }
    }
    Ok(())
}

/// Checks that `pattern` is a valid subscription pattern.
///
/// ```
/// assert!(courier_proto::validate_pattern("todo.>").is_ok());
/// assert!(courier_proto::validate_pattern("todo.>.x").is_err());
/// ```
pub fn validate_pattern(pattern: &str) -> Result<(), NameError> {
    check_common(pattern)?;
    let segments: Vec<&str> = pattern.split('.').collect();
    let last = segments.len() - 1;
    let mut offset = 0;
    for (index, segment) in segments.iter().enumerate() {
        match *segment {
            "*" => {}
            ">" if index == last => {}
            ">" => {
                return Err(NameError::TailNotLast {
                    pattern: printable(pattern),
                })
            }
            _ => {
                for (i, b) in segment.bytes().enumerate() {
                    if b == b'*' || b == b'>' {
                        return Err(NameError::PartialWildcard {
                            pattern: printable(pattern),
                        });
                    }
                    if !is_name_byte(b) {
                        return Err(bad_character(pattern, offset + i));
                    }
                }
            }
        }
        offset += segment.len() + 1;
    }
    Ok(())
}

/// Whether a validated `name` matches a validated `pattern`.
///
/// ```
/// use courier_proto::pattern_matches;
/// assert!(pattern_matches("todo.*", "todo.create"));
/// assert!(!pattern_matches("todo.*", "todo.item.create"));
/// assert!(pattern_matches("todo.>", "todo.item.create"));
/// assert!(!pattern_matches("todo.>", "todo"));
/// ```
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    // Most subscriptions name one message: a plain comparison, without
    // splitting both strings on every routed message.
    if !pattern.bytes().any(|b| b == b'*' || b == b'>') {
        return pattern == name;
    }
    let mut names = name.split('.');
    for segment in pattern.split('.') {
        match segment {
            ">" => return names.next().is_some(),
            "*" => {
                if names.next().is_none() {
                    return false;
                }
            }
            literal => {
                if names.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    names.next().is_none()
}

/// Whether `pattern` contains a wildcard segment.
pub fn is_wildcard(pattern: &str) -> bool {
    pattern.split('.').any(|s| s == "*" || s == ">")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "todo.create", "file.copy.in-progress", "a_b.c-d.9"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert!(matches!(
            validate_name("Todo.create"),
            Err(NameError::BadCharacter {
                ch: 'T',
                offset: 0,
                ..
            })
        ));
        assert!(matches!(
            validate_name("todo create"),
            Err(NameError::BadCharacter {
                ch: ' ',
                offset: 4,
                ..
            })
        ));
        assert!(matches!(
            validate_name("todo\0"),
            Err(NameError::BadCharacter { ch: '\0', .. })
        ));
        // A Cyrillic 'о' that looks like a Latin 'o'.
        assert!(matches!(
            validate_name("t\u{043e}do"),
            Err(NameError::BadCharacter {
                ch: '\u{043e}',
                offset: 1,
                ..
            })
        ));
        assert!(matches!(
            validate_name("a..b"),
            Err(NameError::EmptySegment { .. })
        ));
        assert!(matches!(
            validate_name(".a"),
            Err(NameError::EmptySegment { .. })
        ));
        assert_eq!(
            validate_name(&"a".repeat(256)),
            Err(NameError::TooLong { len: 256 })
        );
        assert_eq!(validate_name(&"a".repeat(255)), Ok(()));
        assert!(validate_name("a.*").is_err());
    }

    /// The one-pass check and the step-by-step one agree on every string
    /// of up to five characters from an alphabet of each kind of byte.
    #[test]
    fn the_fast_check_agrees_with_the_detailed_one() {
        let alphabet = ['a', 'z', '0', '_', '-', '.', '*', '>', 'A', ' ', '\0', 'é'];
        let mut names = vec![String::new()];
        let mut checked = 0;
        for _ in 0..5 {
            let mut longer = Vec::new();
            for name in &names {
                for c in alphabet {
                    let mut n = name.clone();
                    n.push(c);
                    longer.push(n);
                }
            }
            for name in &longer {
                assert_eq!(
                    is_valid_name(name.as_bytes()),
                    name_error(name).is_ok(),
                    "{name:?}"
                );
                checked += 1;
            }
            names = longer;
        }
        assert_eq!(checked, 12 + 144 + 1728 + 20736 + 248832);
        assert!(!is_valid_name(b""));
        assert!(!is_valid_name("a".repeat(256).as_bytes()));
    }

    #[test]
    fn patterns() {
        for ok in ["todo.*", "todo.>", "*.created", ">", "*", "a.*.c"] {
            assert_eq!(validate_pattern(ok), Ok(()), "{ok}");
        }
        assert!(matches!(
            validate_pattern("a.>.b"),
            Err(NameError::TailNotLast { .. })
        ));
        assert!(matches!(
            validate_pattern("a.b*"),
            Err(NameError::PartialWildcard { .. })
        ));
    }

    #[test]
    fn matching() {
        let cases = [
            ("todo.create", "todo.create", true),
            ("todo.create", "todo.created", false),
            ("todo.*", "todo.create", true),
            ("todo.*", "todo", false),
            ("todo.*", "todo.a.b", false),
            ("*.created", "todo.created", true),
            ("todo.>", "todo.a", true),
            ("todo.>", "todo.a.b.c", true),
            ("todo.>", "todo", false),
            (">", "anything.at.all", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                pattern_matches(pattern, name),
                expected,
                "{pattern} vs {name}"
            );
        }
    }
}
