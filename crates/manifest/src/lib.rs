//! Courier's service manifest, `courier.toml`: who may send and receive
//! which message names, and which credentials identify whom.
//!
//! - [`Manifest::parse`] reads and validates the file; a refusal says the
//!   line and column of the offending value and what to do.
//! - [`Manifest::may_send`], [`Manifest::may_receive`],
//!   [`Manifest::allowed_receive_patterns`], [`Manifest::authenticate_token`]
//!   and [`Manifest::authenticate_certificate`] are the broker's questions.
//! - [`check`] is `courier check`: does the application hang together?
//! - [`generate_token`] and [`hash_token`] are `courier token new`.
//!
//! Architecture invariant: a pure library — no I/O (callers pass in the
//! file's contents), no tokio, no clock. The only thing it reads from the
//! outside world is the operating system's random source, in
//! [`generate_token`].
//!
//! # The file
//!
//! ```toml
//! [services.web]
//! sends = ["todos.list@1", "todo.create@1"]   # names it may send (commands)
//! receives = ["todo.created@1"]               # names it may receive
//! tokens = ["sha256:…"]                       # hashes of its tokens
//! certificates = ["CN=web"]                   # client-certificate subjects
//!
//! [services.todo]
//! receives = ["todos.list@1", "todo.create@1"]
//! publishes = ["todo.created@1"]              # optional: names it sends as events
//! tokens = ["sha256:…"]
//!
//! [admin]                                     # optional: the operations role
//! tokens = ["sha256:…"]
//! certificates = ["CN=ops"]
//! ```
//!
//! Every key is optional; any other key is refused. A rule is an exact name
//! or a wildcard pattern (`todo.*`: one segment, `todo.>`: one or more),
//! optionally pinned to a major version with `@MAJOR` (a message at
//! version `1.7` falls under `todo.create@1`). Service names follow the
//! rules for message names; `admin` is reserved.
//!
//! `publishes` is this crate's addition: the file does not otherwise say
//! whether a name is a command (exactly one receiving service) or an event
//! (any number). For authorisation `publishes` is the same as `sends`; for
//! [`check`] a published name is an event and every other sent name a
//! command. See [`check`].
//!
//! # Example
//!
//! ```
//! use courier_manifest::{generate_token, hash_token, Identity, Manifest};
//!
//! let token = generate_token()?;                  // give to the service
//! let text = format!("[services.web]\nsends = [\"todo.>@1\"]\ntokens = [\"{}\"]\n", hash_token(&token));
//! let manifest = Manifest::parse(&text)?;
//!
//! assert_eq!(manifest.authenticate_token(&token), Some(Identity::Service("web".into())));
//! assert!(manifest.may_send("web", "todo.item.create", 1).is_ok());
//! assert_eq!(
//!     manifest.may_send("web", "todo.create", 2).unwrap_err().to_string(),
//!     "service web may not send todo.create at major version 2: its sends admit \
//!      todo.create only as [\"todo.>@1\"]",
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod authorisation;
mod check;
mod error;
mod manifest;
mod parse;
mod pattern;
mod rule;
mod token;

#[cfg(test)]
mod tests;

mod handshake;

pub use check::{check, has_errors, Problem, Severity};
pub use error::{ManifestError, ManifestErrorKind};
pub use handshake::{authenticate, Authenticated, ADMIN_SERVICE};
pub use manifest::{
    Action, AdminSpec, AppSpec, Denial, Identity, Lists, Manifest, RuleList, ServiceSpec,
    DENIAL_RULES_SHOWN_MAX, INSTANCES_MAX,
};
pub use pattern::{intersect_patterns, pattern_covers};
pub use rule::{Location, NameRule, RuleError};
pub use token::{
    generate_token, hash_token, TokenError, TokenHash, TokenHashError, TOKEN_BYTES_MAX,
    TOKEN_HASH_PREFIX, TOKEN_PREFIX, TOKEN_RANDOM_BYTES,
};

/// Largest manifest accepted, in bytes; checked before parsing. A
/// thousand services with a dozen rules each fit in a tenth of it.
pub const MANIFEST_BYTES_MAX: usize = 1024 * 1024;

/// Most services in one manifest.
pub const SERVICES_MAX: usize = 1024;

/// Most rules (`sends`, `publishes` and `receives` together) of one service.
pub const RULES_PER_SERVICE_MAX: usize = 512;

/// Most rules in one manifest, all services together. It bounds [`check`],
/// which compares every sent rule with every received rule.
pub const RULES_TOTAL_MAX: usize = 8192;

/// Most token hashes per service (and for the admin): enough to rotate
/// tokens one instance at a time.
pub const TOKENS_PER_SERVICE_MAX: usize = 16;

/// Most certificate subjects per service (and for the admin).
pub const CERTIFICATES_PER_SERVICE_MAX: usize = 16;

/// Longest certificate subject, in bytes.
pub const CERTIFICATE_SUBJECT_BYTES_MAX: usize = 1024;
