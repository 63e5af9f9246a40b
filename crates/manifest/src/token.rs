//! Tokens and their hashes.
//!
//! A token is a secret a service presents when it connects. The manifest
//! holds only its SHA-256 hash, written `sha256:<64 hex digits>`, so a leaked
//! manifest does not leak credentials. Tokens made by [`generate_token`] carry
//! 256 bits from the operating system's random source, so a plain (unsalted,
//! fast) hash is enough: there is nothing to guess.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// What every token made by [`generate_token`] starts with, so a token in a
/// log or a paste is recognisable as a Courier secret (secret scanners key
/// on such prefixes).
pub const TOKEN_PREFIX: &str = "crr_";

/// Random bytes in a token made by [`generate_token`].
pub const TOKEN_RANDOM_BYTES: usize = 32;

/// Longest token [`crate::Manifest::authenticate_token`] hashes, in bytes;
/// longer ones are refused unhashed. Generated tokens are 68 bytes.
pub const TOKEN_BYTES_MAX: usize = 1024;

/// How a token hash is written in the manifest: this prefix, then the
/// digest in hex.
pub const TOKEN_HASH_PREFIX: &str = "sha256:";

const DIGEST_BYTES: usize = 32;

/// The SHA-256 hash of a token, as listed in a manifest's `tokens`.
///
/// Parsed from and displayed as `sha256:<64 hex digits>` (either case is
/// accepted; lower case is written).
///
/// ```
/// use courier_manifest::TokenHash;
/// let hash = TokenHash::of("crr_example");
/// let written = hash.to_string();
/// assert!(written.starts_with("sha256:"));
/// assert_eq!(written.parse::<TokenHash>()?, hash);
/// assert!(hash.matches("crr_example"));
/// assert!(!hash.matches("crr_other"));
/// # Ok::<(), courier_manifest::TokenHashError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash([u8; DIGEST_BYTES]);

/// Why a `tokens` entry is not a token hash. The messages never repeat the
/// entry: it may be a secret pasted into the wrong place.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenHashError {
    #[error(
        "this looks like a token, not its hash: list the \"sha256:…\" line that \
         `courier token new` printed under it, and treat this token as leaked"
    )]
    LooksLikeToken,
    #[error(
        "a token hash must start with \"sha256:\" followed by 64 hex digits, as \
         printed by `courier token new`"
    )]
    MissingPrefix,
    #[error("a token hash has 64 hex digits after \"sha256:\"; this one has {found} characters")]
    WrongLength { found: usize },
    #[error("a token hash has only hex digits (0-9, a-f) after \"sha256:\"; character {position} is not one")]
    NotHex { position: usize },
    #[error(
        "this is the hash of the empty token, which would admit a client that sends no \
         token: generate one with `courier token new`"
    )]
    EmptyToken,
}

impl TokenHash {
    /// Hashes `token`.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `token` hashes to this hash, compared in constant time.
    pub fn matches(&self, token: &str) -> bool {
        self.ct_eq(&TokenHash::of(token))
    }

    /// Constant-time equality: the time taken does not depend on where the
    /// two hashes first differ.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// Parses `sha256:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<TokenHash, TokenHashError> {
        let Some(hex) = text.strip_prefix(TOKEN_HASH_PREFIX) else {
            return Err(if text.starts_with(TOKEN_PREFIX) {
                TokenHashError::LooksLikeToken
            } else {
                TokenHashError::MissingPrefix
            });
        };
        let found = hex.chars().count();
        if found != DIGEST_BYTES * 2 {
            return Err(TokenHashError::WrongLength { found });
        }
        if let Some(index) = hex.chars().position(|c| !c.is_ascii_hexdigit()) {
            return Err(TokenHashError::NotHex {
                position: index + 1,
            });
        }
        // Now exactly 64 ASCII hex digits, so 32 pairs.
        let mut digest = [0u8; DIGEST_BYTES];
        for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            *byte = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
        }
        let hash = TokenHash(digest);
        if hash == TokenHash::of("") {
            return Err(TokenHashError::EmptyToken);
        }
        Ok(hash)
    }
}

/// The value of an ASCII hex digit (checked by the caller; anything else is 0).
fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

impl FromStr for TokenHash {
    type Err = TokenHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TokenHash::parse(s)
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(TOKEN_HASH_PREFIX.len() + 2 * DIGEST_BYTES);
        out.push_str(TOKEN_HASH_PREFIX);
        push_hex(&mut out, &self.0);
        f.write_str(&out)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

/// The operating system's random source failed; no token was made.
#[derive(Debug, Error)]
#[error("could not read random bytes from the operating system to make a token: {0}")]
pub struct TokenError(getrandom::Error);

/// Makes a new token: [`TOKEN_PREFIX`] and [`TOKEN_RANDOM_BYTES`] random
/// bytes from the operating system, in lower-case hex (68 characters).
///
/// ```
/// let token = courier_manifest::generate_token()?;
/// assert!(token.starts_with("crr_"));
/// assert_eq!(token.len(), 68);
/// assert_ne!(token, courier_manifest::generate_token()?);
/// # Ok::<(), courier_manifest::TokenError>(())
/// ```
pub fn generate_token() -> Result<String, TokenError> {
    let mut random = [0u8; TOKEN_RANDOM_BYTES];
    getrandom::fill(&mut random).map_err(TokenError)?;
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 2 * TOKEN_RANDOM_BYTES);
    token.push_str(TOKEN_PREFIX);
    push_hex(&mut token, &random);
    Ok(token)
}

/// The line to list in a manifest's `tokens` for `token`:
/// `sha256:<64 hex digits>`.
///
/// ```
/// assert_eq!(
///     courier_manifest::hash_token("abc"),
///     "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
/// );
/// ```
pub fn hash_token(token: &str) -> String {
    TokenHash::of(token).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let hash = TokenHash::of("crr_x");
        assert_eq!(TokenHash::parse(&hash.to_string()), Ok(hash));
        let upper = hash
            .to_string()
            .to_uppercase()
            .replacen("SHA256:", "sha256:", 1);
        assert_eq!(TokenHash::parse(&upper), Ok(hash));
    }

    #[test]
    fn refuses_what_is_not_a_hash() {
        let good = hash_token("crr_x");
        let digits = &good[TOKEN_HASH_PREFIX.len()..];
        assert_eq!(TokenHash::parse(digits), Err(TokenHashError::MissingPrefix));
        assert_eq!(
            TokenHash::parse(&format!("SHA256:{digits}")),
            Err(TokenHashError::MissingPrefix)
        );
        assert_eq!(
            TokenHash::parse(&format!("sha1:{digits}")),
            Err(TokenHashError::MissingPrefix)
        );
        assert_eq!(
            TokenHash::parse("crr_0123"),
            Err(TokenHashError::LooksLikeToken)
        );
        assert_eq!(
            TokenHash::parse(&good[..good.len() - 1]),
            Err(TokenHashError::WrongLength { found: 63 })
        );
        assert_eq!(
            TokenHash::parse(&format!("{good} ")),
            Err(TokenHashError::WrongLength { found: 65 })
        );
        let mut bad = good.clone();
        bad.replace_range(10..11, "g");
        assert_eq!(
            TokenHash::parse(&bad),
            Err(TokenHashError::NotHex { position: 4 })
        );
        // A multi-byte character keeps 64 characters but not 64 bytes.
        let mut bad = good.clone();
        bad.replace_range(10..11, "é");
        assert!(TokenHash::parse(&bad).is_err());
        assert_eq!(
            TokenHash::parse(&hash_token("")),
            Err(TokenHashError::EmptyToken)
        );
    }

    #[test]
    fn errors_never_repeat_the_value() {
        let token = "crr_0123456789abcdef";
        let err = TokenHash::parse(token).expect_err("a token");
        assert!(!err.to_string().contains("0123456789"), "{err}");
    }

    #[test]
    fn generated_tokens_are_distinct_hex() {
        let a = generate_token().expect("os random");
        let b = generate_token().expect("os random");
        assert_ne!(a, b);
        let digits = a.strip_prefix(TOKEN_PREFIX).expect("prefix");
        assert_eq!(digits.len(), 64);
        assert!(digits
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(TokenHash::parse(&hash_token(&a)).is_ok_and(|h| h.matches(&a)));
    }
}
