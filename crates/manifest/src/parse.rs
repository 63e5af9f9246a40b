//! Parsing `courier.toml` into a [`Manifest`]: the raw TOML shapes and
//! the builder that checks names, patterns, limits and credentials.

use std::collections::BTreeMap;
use std::str::FromStr;

use courier_proto::validate_name;
use serde::Deserialize;
use toml::Spanned;

use crate::error::{certificate_subject_problem, ManifestError, ManifestErrorKind};
use crate::rule::{quoted, Location, NameRule};
use crate::token::TokenHash;
use crate::{
    CERTIFICATES_PER_SERVICE_MAX, MANIFEST_BYTES_MAX, RULES_PER_SERVICE_MAX, RULES_TOTAL_MAX,
    SERVICES_MAX, TOKENS_PER_SERVICE_MAX,
};

use crate::manifest::*;

// The raw shape of the file. `Spanned` keeps every value's byte range so
// errors can say line and column.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    #[serde(default)]
    pub(crate) services: BTreeMap<Spanned<String>, RawService>,
    #[serde(default)]
    pub(crate) admin: Option<Spanned<RawAdmin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    #[serde(default)]
    pub(crate) sends: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) publishes: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) receives: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) tokens: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) certificates: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) run: Option<String>,
    #[serde(default)]
    pub(crate) build: Option<String>,
    #[serde(default)]
    pub(crate) dir: Option<String>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) instances: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) http: Option<u16>,
    #[serde(default)]
    pub(crate) watch: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    #[serde(default)]
    pub(crate) tokens: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) certificates: Vec<Spanned<String>>,
}

/// Turns the raw shape into a [`Manifest`], collecting every error so the
/// one reported is the first in the file.
pub(crate) struct Builder<'t> {
    pub(crate) text: &'t str,
    pub(crate) errors: Vec<ManifestError>,
    pub(crate) rules_total: usize,
    pub(crate) tokens: BTreeMap<TokenHash, Identity>,
    pub(crate) certificates: BTreeMap<String, Identity>,
}

impl<'t> Builder<'t> {
    pub(crate) fn at(&self, span: std::ops::Range<usize>) -> Option<Location> {
        Some(Location::of_offset(self.text, span.start))
    }

    pub(crate) fn fail(&mut self, span: std::ops::Range<usize>, kind: ManifestErrorKind) {
        let location = self.at(span);
        self.errors.push(ManifestError::new(location, kind));
    }

    /// Checks a list's length against its limit; reports at the first
    /// entry past the limit and returns the entries within it.
    pub(crate) fn limit<'v>(
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

    pub(crate) fn rules(&mut self, values: &[Spanned<String>], field: String) -> Vec<NameRule> {
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

    pub(crate) fn tokens(
        &mut self,
        values: &[Spanned<String>],
        owner: &Identity,
    ) -> Vec<TokenHash> {
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

    pub(crate) fn certificates(
        &mut self,
        values: &[Spanned<String>],
        owner: &Identity,
    ) -> Vec<String> {
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

    pub(crate) fn admin(&mut self, raw: Option<&Spanned<RawAdmin>>) -> AdminSpec {
        match raw {
            None => AdminSpec::default(),
            Some(raw) => AdminSpec {
                tokens: self.tokens(&raw.get_ref().tokens, &Identity::Admin),
                certificates: self.certificates(&raw.get_ref().certificates, &Identity::Admin),
            },
        }
    }

    pub(crate) fn service(
        &mut self,
        name: &Spanned<String>,
        raw: &RawService,
    ) -> Option<ServiceSpec> {
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

impl FromStr for Manifest {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Manifest::parse(s)
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
}
