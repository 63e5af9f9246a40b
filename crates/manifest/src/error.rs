//! Why a manifest was refused, and where.

use std::fmt;

use courier_proto::NameError;
use thiserror::Error;

use crate::rule::{Location, RuleError};
use crate::token::TokenHashError;
use crate::{
    Identity, CERTIFICATES_PER_SERVICE_MAX, CERTIFICATE_SUBJECT_BYTES_MAX, MANIFEST_BYTES_MAX,
};

/// A manifest that was refused: what is wrong, where (1-based line and
/// column of the offending value, when known) and, once the caller names the
/// file with [`ManifestError::with_origin`], in which file.
///
/// Displays as one line: `courier.toml:3:12: "todo create@1" is not a valid
/// message name or pattern: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    origin: Option<String>,
    location: Option<Location>,
    kind: ManifestErrorKind,
}

/// What is wrong with a refused manifest. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ManifestErrorKind {
    #[error(
        "the manifest is {bytes} bytes; at most {MANIFEST_BYTES_MAX} are allowed: \
         is this the right file?"
    )]
    TooLarge { bytes: usize },
    #[error("the manifest is not valid UTF-8 here; save it as UTF-8")]
    NotUtf8,
    /// TOML syntax, a value of the wrong type, an unknown or duplicate key.
    #[error("{message}")]
    Toml { message: String },
    #[error("{name} is not a valid service name: {source}; service names follow the rules for message names")]
    ServiceName { name: String, source: NameError },
    #[error("\"admin\" is reserved for the [admin] table; give the service another name")]
    ReservedServiceName,
    #[error("{0}")]
    Rule(RuleError),
    #[error("{rule} is listed twice in {field}; remove one")]
    DuplicateRule { rule: String, field: String },
    #[error("in a `tokens` list: {0}")]
    TokenHash(TokenHashError),
    #[error(
        "{subject} is not a certificate subject: {reason}; write the subject's distinguished \
         name as the broker shows it, like \"CN=web\" (subjects are compared exactly)"
    )]
    CertificateSubject {
        subject: String,
        reason: &'static str,
    },
    #[error("this {what} is listed twice for {owner}; remove one")]
    DuplicateCredential { what: &'static str, owner: Identity },
    #[error(
        "this {what} is already listed for {first}; a credential identifies exactly one \
         service or the admin, so give {second} its own"
    )]
    SharedCredential {
        what: &'static str,
        first: Identity,
        second: Identity,
    },
    #[error("{owner} lists {count} {what}; at most {max} are allowed")]
    TooMany {
        owner: String,
        what: &'static str,
        count: usize,
        max: usize,
    },
}

impl ManifestError {
    pub(crate) fn new(location: Option<Location>, kind: ManifestErrorKind) -> ManifestError {
        ManifestError {
            origin: None,
            location,
            kind,
        }
    }

    /// Names the file (or other source) the manifest came from, for the
    /// message: `courier.toml:3:12: …`.
    ///
    /// ```
    /// use courier_manifest::Manifest;
    /// let err = Manifest::parse("[services.web]\nsendz = []\n").unwrap_err();
    /// assert_eq!(
    ///     err.with_origin("courier.toml").to_string(),
    ///     "courier.toml:2:1: unknown field `sendz`, expected one of `sends`, `publishes`, \
    ///      `receives`, `tokens`, `certificates`, `run`, `build`, `dir`, `env`, `instances`, \
    ///      `http`, `watch`",
    /// );
    /// ```
    #[must_use]
    pub fn with_origin(mut self, origin: impl Into<String>) -> ManifestError {
        self.origin = Some(origin.into());
        self
    }

    /// Line and column of the offending value, when known.
    pub fn location(&self) -> Option<Location> {
        self.location
    }

    /// What is wrong.
    pub fn kind(&self) -> &ManifestErrorKind {
        &self.kind
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.origin, self.location) {
            (Some(origin), Some(at)) => write!(f, "{origin}:{at}: ")?,
            (Some(origin), None) => write!(f, "{origin}: ")?,
            (None, Some(at)) => write!(f, "{at}: ")?,
            (None, None) => {}
        }
        write!(f, "{}", self.kind)
    }
}

// The kind is part of the message already, so it is not also a `source`
// (an error chain would print it twice).
impl std::error::Error for ManifestError {}

/// Why a certificate subject is refused, or `None` when it is acceptable.
pub(crate) fn certificate_subject_problem(subject: &str) -> Option<&'static str> {
    if subject.is_empty() {
        return Some("it is empty");
    }
    if subject.len() > CERTIFICATE_SUBJECT_BYTES_MAX {
        return Some("it is longer than 1024 bytes");
    }
    if subject.chars().any(char::is_control) {
        return Some("it contains a control character");
    }
    if subject.trim() != subject {
        return Some("it starts or ends with white space");
    }
    if !subject.contains('=') {
        return Some("it is not a distinguished name (no `=`)");
    }
    None
}

const _: () = assert!(
    CERTIFICATE_SUBJECT_BYTES_MAX == 1024,
    "update the message above"
);
const _: () = assert!(CERTIFICATES_PER_SERVICE_MAX > 0);
