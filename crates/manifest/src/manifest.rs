//! The manifest as values: services, the admin role, identities, and why
//! something is denied. Parsing is `parse.rs`; the questions the broker
//! asks are `authorisation.rs`; authentication by credentials is here.

use std::collections::BTreeMap;
use std::fmt;

use courier_proto::NameError;
use thiserror::Error;

use crate::rule::{Location, NameRule};
use crate::token::{TokenHash, TOKEN_BYTES_MAX};

/// Most rules quoted in one [`Denial`] message; the rest are counted.
pub const DENIAL_RULES_SHOWN_MAX: usize = 16;

/// The name of the admin role's table; no service may take it.
pub(crate) const ADMIN: &str = "admin";

/// A parsed, validated `courier.toml`: who may send and receive what, and
/// which credentials identify whom.
///
/// Built only by [`Manifest::parse`] (or [`Manifest::parse_bytes`]), so every
/// manifest upholds what parsing checks: valid names and patterns, limits,
/// and every credential naming exactly one identity. Read it through
/// [`Manifest::services`] and [`Manifest::admin`].
///
/// ```
/// use courier_manifest::{hash_token, Identity, Manifest};
/// let text = format!(
///     r#"
/// [services.web]
/// sends = ["todos.list@1", "todo.create@1"]
/// receives = ["todo.created@1"]
/// tokens = ["{web}"]
/// certificates = ["CN=web"]
///
/// [services.todo]
/// receives = ["todos.list@1", "todo.create@1"]
/// sends = ["todo.created@1"]
/// tokens = ["{todo}"]
///
/// [admin]
/// tokens = ["{admin}"]
/// "#,
///     web = hash_token("crr_web"),
///     todo = hash_token("crr_todo"),
///     admin = hash_token("crr_admin"),
/// );
/// let manifest = Manifest::parse(&text)?;
///
/// assert_eq!(manifest.authenticate_token("crr_web"), Some(Identity::Service("web".into())));
/// assert_eq!(manifest.authenticate_token("crr_admin"), Some(Identity::Admin));
/// assert_eq!(manifest.authenticate_token("crr_guess"), None);
/// assert_eq!(manifest.authenticate_certificate("CN=web"), Some(Identity::Service("web".into())));
///
/// assert!(manifest.may_send("web", "todo.create", 1).is_ok());
/// assert_eq!(
///     manifest.may_send("web", "todo.delete", 1).unwrap_err().to_string(),
///     r#"service web may not send todo.delete: its sends are ["todos.list@1", "todo.create@1"]"#,
/// );
/// assert!(manifest.may_receive("todo", "todo.create", 1).is_ok());
/// assert!(manifest.may_receive("todo", "todo.create", 2).is_err());
/// assert_eq!(manifest.allowed_receive_patterns("todo", "todo.*"), ["todo.create"]);
/// # Ok::<(), courier_manifest::ManifestError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub(crate) services: BTreeMap<String, ServiceSpec>,
    pub(crate) admin: AdminSpec,
    /// Every token hash with whom it identifies; unique hashes.
    pub(crate) tokens: Vec<(TokenHash, Identity)>,
    /// Every certificate subject with whom it identifies.
    pub(crate) certificates: BTreeMap<String, Identity>,
}

/// One service's entry, `[services.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Names the service may send (`sends = [...]`). For `courier check`
    /// these are commands, unless some service publishes the name.
    pub sends: Vec<NameRule>,
    /// Names the service may send as events (`publishes = [...]`,
    /// optional). For authorisation the same as `sends`; for
    /// `courier check` they may have any number of receiving services.
    pub publishes: Vec<NameRule>,
    /// Names the service may receive (`receives = [...]`).
    pub receives: Vec<NameRule>,
    /// Hashes of the tokens that identify the service.
    pub tokens: Vec<TokenHash>,
    /// Client-certificate subjects that identify the service, compared
    /// exactly (`"CN=web"`).
    pub certificates: Vec<String>,
    /// How `courier up` builds and runs the service; the broker ignores it.
    pub app: AppSpec,
    pub(crate) location: Option<Location>,
}

/// The part of a service's entry that `courier up` reads: how to build and
/// run it. All optional: a service without `run` is one `courier up`
/// does not start (it runs elsewhere and connects on its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppSpec {
    /// Shell command that starts one instance (`run = "…"`).
    pub run: Option<String>,
    /// Shell command run once before any instance starts (`build = "…"`).
    pub build: Option<String>,
    /// Working directory of both, relative to the manifest's directory
    /// (`dir = "…"`, default: that directory).
    pub dir: Option<String>,
    /// Extra environment of every instance (`[services.NAME.env]`).
    pub env: BTreeMap<String, String>,
    /// How many instances `courier up` starts (`instances = N`, default 1).
    pub instances: u32,
    /// What `courier up --watch` watches, relative to `dir` (`watch =
    /// [...]`, default: all of `dir`); a change rebuilds and restarts.
    pub watch: Vec<String>,
    /// The HTTP port the first instance serves on (`http = PORT`); the
    /// n-th instance gets PORT + n − 1, in `PORT` and the advertised
    /// address.
    pub http: Option<u16>,
}

/// Most instances of one service `courier up` starts.
pub const INSTANCES_MAX: u32 = 256;

impl ServiceSpec {
    /// Where the service's name was written.
    pub fn location(&self) -> Option<Location> {
        self.location
    }

    /// Every rule the service may send under: `sends`, then `publishes`.
    pub fn send_rules(&self) -> impl Iterator<Item = &NameRule> + Clone {
        self.sends.iter().chain(&self.publishes)
    }
}

/// The admin role, `[admin]`: credentials for operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminSpec {
    pub tokens: Vec<TokenHash>,
    pub certificates: Vec<String>,
}

/// Whom a credential identifies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A service, by its name in the manifest.
    Service(String),
    /// The admin role of `[admin]`.
    Admin,
}

impl Identity {
    /// The service's name, or `None` for the admin.
    pub fn service(&self) -> Option<&str> {
        match self {
            Identity::Service(name) => Some(name),
            Identity::Admin => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Service(name) => write!(f, "service {name}"),
            Identity::Admin => f.write_str("the admin"),
        }
    }
}

/// Sending or receiving, for [`Denial`] messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Send,
    Receive,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Send => "send",
            Action::Receive => "receive",
        })
    }
}

/// Which of a service's lists a [`Denial`] searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lists {
    /// `sends` (the service has no `publishes`).
    Sends,
    /// `sends` and `publishes`.
    SendsAndPublishes,
    /// `receives`.
    Receives,
}

impl fmt::Display for Lists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lists::Sends => "sends",
            Lists::SendsAndPublishes => "sends and publishes",
            Lists::Receives => "receives",
        })
    }
}

/// Rules quoted in a [`Denial`]: `["todos.list@1", "todo.create@1"]`, at
/// most [`DENIAL_RULES_SHOWN_MAX`] of them, then how many more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleList {
    pub shown: Vec<String>,
    pub more: usize,
}

impl RuleList {
    pub(crate) fn of<'a>(rules: impl Iterator<Item = &'a NameRule>) -> RuleList {
        let mut list = RuleList {
            shown: Vec::new(),
            more: 0,
        };
        for rule in rules {
            if list.shown.len() < DENIAL_RULES_SHOWN_MAX {
                list.shown.push(rule.to_string());
            } else {
                list.more += 1;
            }
        }
        list
    }
}

impl fmt::Display for RuleList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown)?;
        if self.more > 0 {
            write!(f, " and {} more", self.more)?;
        }
        Ok(())
    }
}

/// Why the manifest does not allow something. The message names the
/// service, what it tried, and the rules it has.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Denial {
    #[error("service {service} is not in the manifest; add a [services.NAME] table for it")]
    UnknownService {
        /// The name asked about, quoted.
        service: String,
    },
    #[error("{name} is not a valid message name: {reason}")]
    InvalidName {
        /// The name asked about, quoted.
        name: String,
        reason: NameError,
    },
    #[error("{pattern} is not a valid subscription pattern: {reason}")]
    InvalidPattern {
        /// The pattern asked about, quoted.
        pattern: String,
        reason: NameError,
    },
    #[error("service {service} may not {action} {name}: its {lists} are {rules}")]
    NotListed {
        service: String,
        action: Action,
        name: String,
        lists: Lists,
        rules: RuleList,
    },
    #[error(
        "service {service} may not {action} {name} at major version {major}: \
         its {lists} admit {name} only as {rules}"
    )]
    WrongMajor {
        service: String,
        action: Action,
        name: String,
        major: u16,
        lists: Lists,
        /// The rules that match the name, all at other majors.
        rules: RuleList,
    },
    #[error(
        "service {service} may not receive any name matching {pattern}: its receives are {rules}"
    )]
    NothingToReceive {
        service: String,
        pattern: String,
        rules: RuleList,
    },
}

impl Manifest {
    /// Every service, by name.
    pub fn services(&self) -> &BTreeMap<String, ServiceSpec> {
        &self.services
    }

    /// One service's entry.
    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.get(name)
    }

    /// The admin role's credentials.
    pub fn admin(&self) -> &AdminSpec {
        &self.admin
    }

    /// Who presents `token`: the service or admin whose `tokens` list its
    /// SHA-256 hash, or `None`.
    ///
    /// The hash is compared with every listed hash in constant time, without
    /// stopping at a match, so timing tells neither how much of a hash
    /// matched nor, beyond success, which entry. Tokens over
    /// [`TOKEN_BYTES_MAX`] are refused without hashing.
    pub fn authenticate_token(&self, token: &str) -> Option<Identity> {
        if token.len() > TOKEN_BYTES_MAX {
            return None;
        }
        let presented = TokenHash::of(token);
        let mut found: Option<&Identity> = None;
        for (hash, identity) in &self.tokens {
            // Non-short-circuiting `&` so every entry costs the same.
            if hash.ct_eq(&presented) & found.is_none() {
                found = Some(identity);
            }
        }
        found.cloned()
    }

    /// Who a client certificate with this subject is: the service or admin
    /// whose `certificates` list exactly this string, or `None`.
    ///
    /// Exact, byte for byte: no prefix or substring match, no case folding,
    /// no normalisation (`CN=web,O=evil` is not `CN=web`). The caller
    /// renders the verified certificate's subject the same way the manifest
    /// author wrote it (RFC 4514 form, like `CN=web`), and must have
    /// verified the certificate chain against the configured client CA
    /// first: this only maps a trusted subject to an identity.
    pub fn authenticate_certificate(&self, subject: &str) -> Option<Identity> {
        self.certificates.get(subject).cloned()
    }
}
