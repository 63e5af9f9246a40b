//! The service registry: which instances of which services exist, where
//! they listen, and whether their checks pass.
//!
//! Sans-I/O like the rest of the broker: every input carries the time,
//! every output is a [`RegistryAction`]. The edge runs the checks it is
//! told to (`RunCheck`), reports their results (`check_result`), writes
//! the journal entries it is handed (`Journal`) and wakes watchers when the
//! change index moves (`Changed`).
//!
//! Health has three states. A check's raw result only moves the visible
//! state after `flap_threshold` consecutive results agree, so a check
//! that alternates never changes what lookups see. An instance critical for
//! `deregister_after` is removed. A TTL check passes on each heartbeat and
//! counts as one critical result per TTL without one.

use std::collections::{BTreeMap, BTreeSet};

use crate::journal::{JournalError, Reader, Writer};
use crate::Nanos;

mod broker_side;
mod table;

const MS: Nanos = 1_000_000;

/// A visible (or raw) health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
    fn code(self) -> u8 {
        match self {
            Health::Passing => 0,
            Health::Warning => 1,
            Health::Critical => 2,
        }
    }
    fn from_code(code: u8) -> Result<Health, JournalError> {
        match code {
            0 => Ok(Health::Passing),
            1 => Ok(Health::Warning),
            2 => Ok(Health::Critical),
            tag => Err(JournalError::UnknownTag { tag }),
        }
    }
    /// Healthy instances are those lookups and routing use by default.
    pub fn is_healthy(self) -> bool {
        self != Health::Critical
    }
}

/// How the broker learns whether an instance is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// No check of its own: a bus instance is passing while connected.
    None,
    /// `GET url`: 2xx passes, 429 warns, anything else (or no answer
    /// within `timeout_ms`) is critical.
    Http { url: String, timeout_ms: u32 },
    /// A TCP connect to `address` within `timeout_ms`.
    Tcp { address: String, timeout_ms: u32 },
    /// Passes while heartbeats come at least every `ttl_ms`.
    Ttl { ttl_ms: u32 },
}

impl Check {
    fn code(&self) -> u8 {
        match self {
            Check::None => 0,
            Check::Http { .. } => 1,
            Check::Tcp { .. } => 2,
            Check::Ttl { .. } => 3,
        }
    }

    /// Parses the CLI and HTTP form: `http://…`, `https://…`, `tcp://HOST:PORT`
    /// or `ttl:30s`.
    pub fn parse(text: &str, timeout_ms: u32) -> Result<Check, String> {
        if text.starts_with("http://") || text.starts_with("https://") {
            return Ok(Check::Http {
                url: text.to_string(),
                timeout_ms,
            });
        }
        if let Some(address) = text.strip_prefix("tcp://") {
            if !address.contains(':') {
                return Err(format!(
                    "check {text:?} names no port: write tcp://HOST:PORT"
                ));
            }
            return Ok(Check::Tcp {
                address: address.to_string(),
                timeout_ms,
            });
        }
        if let Some(ttl) = text.strip_prefix("ttl:") {
            let ttl = humantime::parse_duration(ttl)
                .map_err(|e| format!("check {text:?}: {e}; write for example ttl:30s"))?;
            let ttl_ms = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX).max(1);
            return Ok(Check::Ttl { ttl_ms });
        }
        Err(format!(
            "check {text:?} is not understood: write http://…, tcp://HOST:PORT or ttl:30s"
        ))
    }

    pub fn describe(&self) -> String {
        match self {
            Check::None => "connection".to_string(),
            Check::Http { url, .. } => url.clone(),
            Check::Tcp { address, .. } => format!("tcp://{address}"),
            Check::Ttl { ttl_ms } => format!("ttl:{}ms", ttl_ms),
        }
    }
}

/// What an instance is registered with: everything durable about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    pub service: String,
    pub id: String,
    /// `HOST:PORT` it serves on (empty when it advertises none).
    pub address: String,
    pub meta: BTreeMap<String, String>,
    pub check: Check,
    pub interval_ms: u32,
    /// Consecutive agreeing results a state change needs (at least 1).
    pub flap_threshold: u32,
    /// Removed after being critical this long (0: never).
    pub deregister_after_ms: u32,
    /// Registered by a bus connection: removed when it closes.
    pub on_bus: bool,
}

/// One instance as lookups see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub spec: InstanceSpec,
    pub health: Health,
    /// The check's last raw result and its output, for `?all=1`.
    pub last_output: String,
    /// The change index at which this instance last changed.
    pub modify_index: u64,
    raw_streak: (Health, u32),
    critical_since: Option<Nanos>,
    next_check: Nanos,
    /// This instance's entry in [`Registry::timers`], if any.
    timer: Option<Nanos>,
    last_heartbeat: Nanos,
}

impl Instance {
    fn new(spec: InstanceSpec, index: u64, now: Nanos) -> Instance {
        // An instance with a check of its own starts critical until it has
        // shown it works; one on the bus is alive by being connected.
        let health = match spec.check {
            Check::None | Check::Ttl { .. } => Health::Passing,
            _ => Health::Critical,
        };
        let mut instance = Instance {
            health,
            last_output: String::new(),
            modify_index: index,
            raw_streak: (health, 0),
            critical_since: (health == Health::Critical).then_some(now),
            next_check: now,
            timer: None,
            last_heartbeat: now,
            spec,
        };
        match instance.spec.check {
            Check::Ttl { ttl_ms } => instance.next_check = now + Nanos::from(ttl_ms) * MS,
            Check::None => instance.next_check = Nanos::MAX,
            _ => {}
        }
        instance
    }

    /// When [`Registry::tick`] next has work for this instance: its next
    /// check (or TTL) or its deregistration, whichever comes first.
    fn deadline(&self) -> Option<Nanos> {
        let check = Some(self.next_check).filter(|t| *t != Nanos::MAX);
        let deregister = match (self.critical_since, self.spec.deregister_after_ms) {
            (Some(since), after) if after > 0 => Some(since + Nanos::from(after) * MS),
            _ => None,
        };
        check.into_iter().chain(deregister).min()
    }
}

/// What the edge must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryAction {
    /// Run this check now and report with [`Registry::check_result`].
    RunCheck {
        service: String,
        id: String,
        check: Check,
    },
    /// Write this journal entry (already applied in memory).
    Journal(RegistryOp),
    /// The change index moved: wake watchers.
    Changed { index: u64 },
}

/// A durable registry change, as journal entries carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryOp {
    Register(InstanceSpec),
    Deregister {
        service: String,
        id: String,
    },
    Health {
        service: String,
        id: String,
        health: Health,
    },
}

/// Journal tags of the registry's entries: a range of their own, apart
/// from the delivery entries' small numbers.
pub(crate) mod tag {
    pub const REGISTER: u8 = 64;
    pub const DEREGISTER: u8 = 65;
    pub const HEALTH: u8 = 66;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "no instance {id:?} of service {service:?}: `courier services {service} --all` lists them"
    )]
    Unknown { service: String, id: String },
    #[error("instance {id:?} of {service:?} has no TTL check: only TTL checks take heartbeats")]
    NotTtl { service: String, id: String },
    #[error(
        "instance {id:?} of service {service:?} is not in the registry as a bus connection (a service name must be a DNS label: letters, digits, '-' and '_', at most 63)"
    )]
    NotOnBus { service: String, id: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug)]
pub struct Registry {
    instances: BTreeMap<(String, String), Instance>,
    /// Grows by one for every visible change; watchers long-poll from it.
    index: u64,
    /// Every instance's deadline, soonest first: ticks and the next timer
    /// cost O(log n) per due instance, not a walk over all of them (10,000
    /// instances checked every 5 s are due 2,000 times a second).
    timers: BTreeSet<(Nanos, (String, String))>,
    /// Whether this registry runs the checks, lapses TTLs and removes
    /// instances critical too long. One broker always does; of the nodes
    /// of a cluster only the one that leads the registry does, and the
    /// others take what it decides from the backend.
    checks_here: bool,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            instances: BTreeMap::new(),
            index: 0,
            timers: BTreeSet::new(),
            checks_here: true,
        }
    }
}

/// An instance as a replicated backend holds it: its spec and visible
/// health (the snapshot's form of one instance).
pub fn encode_record(instance: &Instance) -> bytes::Bytes {
    let mut w = Writer::new();
    write_spec(&mut w, &instance.spec);
    w.u8(instance.health.code());
    w.0.freeze()
}

/// The spec and health of an [`encode_record`]ed instance.
pub fn decode_record(bytes: bytes::Bytes) -> Result<(InstanceSpec, Health), JournalError> {
    let mut r = Reader::new(bytes);
    let spec = read_spec(&mut r)?;
    let health = Health::from_code(r.u8()?)?;
    Ok((spec, health))
}

fn validate(spec: &InstanceSpec) -> Result<(), RegistryError> {
    let bad = |what: String| Err(RegistryError::Invalid(what));
    if spec.service.is_empty() || spec.service.len() > 63 {
        return bad(format!(
            "service name {:?} must be 1 to 63 characters (it becomes a DNS label)",
            spec.service
        ));
    }
    if !spec
        .service
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad(format!(
            "service name {:?} may hold only letters, digits, '-' and '_' (it becomes a DNS label)",
            spec.service
        ));
    }
    if spec.id.is_empty() || spec.id.len() > 255 {
        return bad("instance id must be 1 to 255 bytes".to_string());
    }
    if !spec.address.is_empty() && !spec.address.contains(':') {
        return bad(format!(
            "address {:?} has no port: write HOST:PORT",
            spec.address
        ));
    }
    Ok(())
}

pub(crate) fn write_spec(w: &mut Writer, spec: &InstanceSpec) {
    w.str(&spec.service);
    w.str(&spec.id);
    w.str(&spec.address);
    w.u32(spec.meta.len() as u32);
    for (k, v) in &spec.meta {
        w.str(k);
        w.str(v);
    }
    w.u8(spec.check.code());
    match &spec.check {
        Check::None => {}
        Check::Http { url, timeout_ms } => {
            w.str(url);
            w.u32(*timeout_ms);
        }
        Check::Tcp {
            address,
            timeout_ms,
        } => {
            w.str(address);
            w.u32(*timeout_ms);
        }
        Check::Ttl { ttl_ms } => w.u32(*ttl_ms),
    }
    w.u32(spec.interval_ms);
    w.u32(spec.flap_threshold);
    w.u32(spec.deregister_after_ms);
    w.u8(u8::from(spec.on_bus));
}

pub(crate) fn read_spec(r: &mut Reader) -> Result<InstanceSpec, JournalError> {
    let service = r.str()?;
    let id = r.str()?;
    let address = r.str()?;
    let mut meta = BTreeMap::new();
    for _ in 0..r.u32()? {
        let k = r.str()?;
        meta.insert(k, r.str()?);
    }
    let check = match r.u8()? {
        0 => Check::None,
        1 => Check::Http {
            url: r.str()?,
            timeout_ms: r.u32()?,
        },
        2 => Check::Tcp {
            address: r.str()?,
            timeout_ms: r.u32()?,
        },
        3 => Check::Ttl { ttl_ms: r.u32()? },
        tag => return Err(JournalError::UnknownTag { tag }),
    };
    Ok(InstanceSpec {
        service,
        id,
        address,
        meta,
        check,
        interval_ms: r.u32()?,
        flap_threshold: r.u32()?,
        deregister_after_ms: r.u32()?,
        on_bus: r.u8()? == 1,
    })
}

impl RegistryOp {
    /// The service and id of the instance the change is about.
    pub fn instance(&self) -> (String, String) {
        match self {
            RegistryOp::Register(spec) => (spec.service.clone(), spec.id.clone()),
            RegistryOp::Deregister { service, id } | RegistryOp::Health { service, id, .. } => {
                (service.clone(), id.clone())
            }
        }
    }

    pub(crate) fn encode_into(&self, w: &mut Writer) {
        match self {
            RegistryOp::Register(spec) => {
                w.u8(tag::REGISTER);
                write_spec(w, spec);
            }
            RegistryOp::Deregister { service, id } => {
                w.u8(tag::DEREGISTER);
                w.str(service);
                w.str(id);
            }
            RegistryOp::Health {
                service,
                id,
                health,
            } => {
                w.u8(tag::HEALTH);
                w.str(service);
                w.str(id);
                w.u8(health.code());
            }
        }
    }

    /// Decodes the body after one of the registry's tags.
    pub(crate) fn decode_after(tag: u8, r: &mut Reader) -> Result<RegistryOp, JournalError> {
        Ok(match tag {
            tag::REGISTER => RegistryOp::Register(read_spec(r)?),
            tag::DEREGISTER => RegistryOp::Deregister {
                service: r.str()?,
                id: r.str()?,
            },
            tag::HEALTH => RegistryOp::Health {
                service: r.str()?,
                id: r.str()?,
                health: Health::from_code(r.u8()?)?,
            },
            tag => return Err(JournalError::UnknownTag { tag }),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
