//! The manifest: parsing `courier.toml`, and the questions the broker asks.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use courier_proto::{validate_name, validate_pattern, NameError};
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::error::{certificate_subject_problem, ManifestError, ManifestErrorKind};
use crate::pattern::{covers_segments, intersect_segments, join, segments};
use crate::rule::{quoted, Location, NameRule};
use crate::token::{TokenHash, TOKEN_BYTES_MAX};
use crate::{
    CERTIFICATES_PER_SERVICE_MAX, MANIFEST_BYTES_MAX, RULES_PER_SERVICE_MAX, RULES_TOTAL_MAX,
    SERVICES_MAX, TOKENS_PER_SERVICE_MAX,
};

/// Most rules quoted in one [`Denial`] message; the rest are counted.
pub const DENIAL_RULES_SHOWN_MAX: usize = 16;

/// The name of the admin role's table; no service may take it.
const ADMIN: &str = "admin";

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
    services: BTreeMap<String, ServiceSpec>,
    admin: AdminSpec,
    /// Every token hash with whom it identifies; unique hashes.
    tokens: Vec<(TokenHash, Identity)>,
    /// Every certificate subject with whom it identifies.
    certificates: BTreeMap<String, Identity>,
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
    location: Option<Location>,
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
    fn of<'a>(rules: impl Iterator<Item = &'a NameRule>) -> RuleList {
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

// The raw shape of the file. `Spanned` keeps every value's byte range so
// errors can say line and column.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
    #[serde(default)]
    admin: Option<Spanned<RawAdmin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    sends: Vec<Spanned<String>>,
    #[serde(default)]
    publishes: Vec<Spanned<String>>,
    #[serde(default)]
    receives: Vec<Spanned<String>>,
    #[serde(default)]
    tokens: Vec<Spanned<String>>,
    #[serde(default)]
    certificates: Vec<Spanned<String>>,
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    build: Option<String>,
    #[serde(default)]
    dir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    instances: Option<Spanned<u32>>,
    #[serde(default)]
    http: Option<u16>,
    #[serde(default)]
    watch: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default)]
    tokens: Vec<Spanned<String>>,
    #[serde(default)]
    certificates: Vec<Spanned<String>>,
}

/// Turns the raw shape into a [`Manifest`], collecting every error so the
/// one reported is the first in the file.
struct Builder<'t> {
    text: &'t str,
    errors: Vec<ManifestError>,
    rules_total: usize,
    tokens: BTreeMap<TokenHash, Identity>,
    certificates: BTreeMap<String, Identity>,
}

impl<'t> Builder<'t> {
    fn at(&self, span: std::ops::Range<usize>) -> Option<Location> {
        Some(Location::of_offset(self.text, span.start))
    }

    fn fail(&mut self, span: std::ops::Range<usize>, kind: ManifestErrorKind) {
        let location = self.at(span);
        self.errors.push(ManifestError::new(location, kind));
    }

    /// Checks a list's length against its limit; reports at the first
    /// entry past the limit and returns the entries within it.
    fn limit<'v>(
        &mut self,
        values: &'v [Spanned<String>],
        max: usize,
        owner: &Identity,
        what: &'static str,
    ) -> &'v [Spanned<String>] {
        if values.len() <= max {
            return values;
        }
        self.fail(
            values[max].span(),
            ManifestErrorKind::TooMany {
                owner: owner.to_string(),
                what,
                count: values.len(),
                max,
            },
        );
        &values[..max]
    }

    fn rules(&mut self, values: &[Spanned<String>], field: String) -> Vec<NameRule> {
        let mut rules: Vec<NameRule> = Vec::with_capacity(values.len());
        for value in values {
            self.rules_total += 1;
            if self.rules_total > RULES_TOTAL_MAX {
                self.fail(
                    value.span(),
                    ManifestErrorKind::TooMany {
                        owner: "the manifest".to_string(),
                        what: "rules in all (sends, publishes and receives)",
                        count: self.rules_total,
                        max: RULES_TOTAL_MAX,
                    },
                );
                break;
            }
            match NameRule::parse(value.get_ref()) {
                Ok(mut rule) => {
                    rule.location = self.at(value.span());
                    if rules.contains(&rule) {
                        self.fail(
                            value.span(),
                            ManifestErrorKind::DuplicateRule {
                                rule: quoted(value.get_ref()),
                                field: field.clone(),
                            },
                        );
                    } else {
                        rules.push(rule);
                    }
                }
                Err(e) => self.fail(value.span(), ManifestErrorKind::Rule(e)),
            }
        }
        rules
    }

    fn tokens(&mut self, values: &[Spanned<String>], owner: &Identity) -> Vec<TokenHash> {
        let values = self.limit(values, TOKENS_PER_SERVICE_MAX, owner, "tokens");
        let mut hashes = Vec::with_capacity(values.len());
        for value in values {
            let hash = match TokenHash::parse(value.get_ref()) {
                Ok(hash) => hash,
                Err(e) => {
                    self.fail(value.span(), ManifestErrorKind::TokenHash(e));
                    continue;
                }
            };
            match self.tokens.get(&hash) {
                Some(first) if first == owner => self.fail(
                    value.span(),
                    ManifestErrorKind::DuplicateCredential {
                        what: "token hash",
                        owner: owner.clone(),
                    },
                ),
                Some(first) => {
                    let kind = ManifestErrorKind::SharedCredential {
                        what: "token hash",
                        first: first.clone(),
                        second: owner.clone(),
                    };
                    self.fail(value.span(), kind);
                }
                None => {
                    self.tokens.insert(hash, owner.clone());
                    hashes.push(hash);
                }
            }
        }
        hashes
    }

    fn certificates(&mut self, values: &[Spanned<String>], owner: &Identity) -> Vec<String> {
        let values = self.limit(values, CERTIFICATES_PER_SERVICE_MAX, owner, "certificates");
        let mut subjects = Vec::with_capacity(values.len());
        for value in values {
            let subject = value.get_ref();
            if let Some(reason) = certificate_subject_problem(subject) {
                self.fail(
                    value.span(),
                    ManifestErrorKind::CertificateSubject {
                        subject: quoted(subject),
                        reason,
                    },
                );
                continue;
            }
            match self.certificates.get(subject) {
                Some(first) if first == owner => self.fail(
                    value.span(),
                    ManifestErrorKind::DuplicateCredential {
                        what: "certificate subject",
                        owner: owner.clone(),
                    },
                ),
                Some(first) => {
                    let kind = ManifestErrorKind::SharedCredential {
                        what: "certificate subject",
                        first: first.clone(),
                        second: owner.clone(),
                    };
                    self.fail(value.span(), kind);
                }
                None => {
                    self.certificates.insert(subject.clone(), owner.clone());
                    subjects.push(subject.clone());
                }
            }
        }
        subjects
    }

    fn admin(&mut self, raw: Option<&Spanned<RawAdmin>>) -> AdminSpec {
        match raw {
            None => AdminSpec::default(),
            Some(raw) => AdminSpec {
                tokens: self.tokens(&raw.get_ref().tokens, &Identity::Admin),
                certificates: self.certificates(&raw.get_ref().certificates, &Identity::Admin),
            },
        }
    }

    fn service(&mut self, name: &Spanned<String>, raw: &RawService) -> Option<ServiceSpec> {
        if let Err(source) = validate_name(name.get_ref()) {
            self.fail(
                name.span(),
                ManifestErrorKind::ServiceName {
                    name: quoted(name.get_ref()),
                    source,
                },
            );
            return None;
        }
        if name.get_ref() == ADMIN {
            self.fail(name.span(), ManifestErrorKind::ReservedServiceName);
            return None;
        }
        let owner = Identity::Service(name.get_ref().clone());
        let rules_count = raw.sends.len() + raw.publishes.len() + raw.receives.len();
        if rules_count > RULES_PER_SERVICE_MAX {
            self.fail(
                name.span(),
                ManifestErrorKind::TooMany {
                    owner: owner.to_string(),
                    what: "rules (sends, publishes and receives)",
                    count: rules_count,
                    max: RULES_PER_SERVICE_MAX,
                },
            );
            return None;
        }
        let field = |list: &str| format!("services.{}.{list}", name.get_ref());
        let instances = match &raw.instances {
            None => 1,
            Some(n) if (1..=INSTANCES_MAX).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                self.fail(
                    n.span(),
                    ManifestErrorKind::Toml {
                        message: format!(
                            "services.{}.instances is {}; it must be 1 to {INSTANCES_MAX}",
                            name.get_ref(),
                            n.get_ref()
                        ),
                    },
                );
                return None;
            }
        };
        Some(ServiceSpec {
            sends: self.rules(&raw.sends, field("sends")),
            publishes: self.rules(&raw.publishes, field("publishes")),
            receives: self.rules(&raw.receives, field("receives")),
            tokens: self.tokens(&raw.tokens, &owner),
            certificates: self.certificates(&raw.certificates, &owner),
            app: AppSpec {
                run: raw.run.clone(),
                build: raw.build.clone(),
                dir: raw.dir.clone(),
                env: raw.env.clone(),
                instances,
                http: raw.http,
                watch: raw.watch.clone(),
            },
            location: self.at(name.span()),
        })
    }
}

impl Manifest {
    /// Parses and validates the text of a `courier.toml`.
    ///
    /// Refuses, with the line and column of the offending value: text over
    /// [`MANIFEST_BYTES_MAX`]; TOML errors; unknown keys; invalid service
    /// names (the rules of message names; `admin` is reserved); invalid
    /// rules; malformed token hashes; certificate subjects that are not
    /// distinguished names; a rule listed twice in one list; a credential
    /// listed twice, or for two identities; more than [`SERVICES_MAX`]
    /// services, [`RULES_PER_SERVICE_MAX`] rules in a service,
    /// [`RULES_TOTAL_MAX`] rules in all, [`TOKENS_PER_SERVICE_MAX`] tokens
    /// or [`CERTIFICATES_PER_SERVICE_MAX`] certificates per service (or for
    /// the admin). When several values are wrong, the first in the file is
    /// reported.
    ///
    /// ```
    /// use courier_manifest::Manifest;
    /// let err = Manifest::parse("[services.web]\nsends = [\"todo create@1\"]\n").unwrap_err();
    /// assert_eq!(err.location().map(|l| (l.line, l.column)), Some((2, 10)));
    /// assert!(err.to_string().starts_with(
    ///     "2:10: \"todo create@1\" is not a valid message name or pattern: "
    /// ));
    /// ```
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        if text.len() > MANIFEST_BYTES_MAX {
            return Err(ManifestError::new(
                None,
                ManifestErrorKind::TooLarge { bytes: text.len() },
            ));
        }
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let location = e.span().map(|span| Location::of_offset(text, span.start));
            // One line per error: join any lines of the parser's message.
            let message = e.message().trim().lines().collect::<Vec<_>>().join("; ");
            ManifestError::new(location, ManifestErrorKind::Toml { message })
        })?;

        let mut builder = Builder {
            text,
            errors: Vec::new(),
            rules_total: 0,
            tokens: BTreeMap::new(),
            certificates: BTreeMap::new(),
        };

        // In file order, so a limit or a shared credential is reported at
        // the later entry.
        let mut entries: Vec<(&Spanned<String>, &RawService)> = raw.services.iter().collect();
        entries.sort_by_key(|(name, _)| name.span().start);
        if entries.len() > SERVICES_MAX {
            let name = entries[SERVICES_MAX].0;
            builder.fail(
                name.span(),
                ManifestErrorKind::TooMany {
                    owner: "the manifest".to_string(),
                    what: "services",
                    count: entries.len(),
                    max: SERVICES_MAX,
                },
            );
            entries.truncate(SERVICES_MAX);
        }
        let admin_start = raw.admin.as_ref().map_or(usize::MAX, |a| a.span().start);
        let mut admin = AdminSpec::default();
        let mut services = BTreeMap::new();
        let mut admin_done = false;
        for (name, raw_service) in entries {
            if !admin_done && admin_start < name.span().start {
                admin = builder.admin(raw.admin.as_ref());
                admin_done = true;
            }
            if let Some(spec) = builder.service(name, raw_service) {
                services.insert(name.get_ref().clone(), spec);
            }
        }
        if !admin_done {
            admin = builder.admin(raw.admin.as_ref());
        }

        if let Some(first) = builder.errors.into_iter().min_by_key(|e| e.location()) {
            return Err(first);
        }
        Ok(Manifest {
            services,
            admin,
            tokens: builder.tokens.into_iter().collect(),
            certificates: builder.certificates,
        })
    }

    /// Like [`Manifest::parse`], from bytes as read from a file: checks the
    /// size before anything else, then that the bytes are UTF-8 (reporting
    /// where they are not).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(ManifestError::new(
                None,
                ManifestErrorKind::TooLarge { bytes: bytes.len() },
            ));
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => Manifest::parse(text),
            Err(e) => {
                let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
                let location = Location::of_offset(valid, valid.len());
                Err(ManifestError::new(
                    Some(location),
                    ManifestErrorKind::NotUtf8,
                ))
            }
        }
    }

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

    fn spec(&self, service: &str) -> Result<&ServiceSpec, Denial> {
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

/// The common decision of `may_send` and `may_receive`.
fn decide<'a>(
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

impl FromStr for Manifest {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Manifest::parse(s)
    }
}
