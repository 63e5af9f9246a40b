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

#[derive(Debug, Default)]
pub struct Registry {
    instances: BTreeMap<(String, String), Instance>,
    /// Grows by one for every visible change; watchers long-poll from it.
    index: u64,
    /// Every instance's deadline, soonest first: ticks and the next timer
    /// cost O(log n) per due instance, not a walk over all of them (10,000
    /// instances checked every 5 s are due 2,000 times a second).
    timers: BTreeSet<(Nanos, (String, String))>,
}

impl Registry {
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Forgets what the journal rebuilds; bus instances stay, their
    /// connections are live. The index never goes back.
    pub(crate) fn clear_durable(&mut self) {
        self.instances.retain(|_, i| i.spec.on_bus);
        let instances = &self.instances;
        self.timers.retain(|(_, key)| instances.contains_key(key));
    }

    /// Service names with at least one instance, sorted.
    pub fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.instances.keys().map(|(s, _)| s.clone()).collect();
        names.dedup();
        names
    }

    /// The instances of `service`, healthy ones only unless `all`.
    pub fn instances(&self, service: &str, all: bool) -> Vec<&Instance> {
        self.instances
            .range((service.to_string(), String::new())..)
            .take_while(|((s, _), _)| s == service)
            .map(|(_, i)| i)
            .filter(|i| all || i.health.is_healthy())
            .collect()
    }

    pub fn get(&self, service: &str, id: &str) -> Option<&Instance> {
        self.instances.get(&(service.to_string(), id.to_string()))
    }

    /// Whether the instance may receive new work: unknown instances may.
    pub fn is_routable(&self, service: &str, id: &str) -> bool {
        self.get(service, id).is_none_or(|i| i.health.is_healthy())
    }

    /// Adds or replaces an instance.
    pub fn register(
        &mut self,
        spec: InstanceSpec,
        now: Nanos,
        out: &mut Vec<RegistryAction>,
    ) -> Result<(), RegistryError> {
        validate(&spec)?;
        out.push(RegistryAction::Journal(RegistryOp::Register(spec.clone())));
        self.apply_register(spec, now);
        out.push(RegistryAction::Changed { index: self.index });
        Ok(())
    }

    pub fn deregister(
        &mut self,
        service: &str,
        id: &str,
        out: &mut Vec<RegistryAction>,
    ) -> Result<(), RegistryError> {
        if self.get(service, id).is_none() {
            return Err(RegistryError::Unknown {
                service: service.to_string(),
                id: id.to_string(),
            });
        }
        out.push(RegistryAction::Journal(RegistryOp::Deregister {
            service: service.to_string(),
            id: id.to_string(),
        }));
        self.apply_deregister(service, id);
        out.push(RegistryAction::Changed { index: self.index });
        Ok(())
    }

    /// A bus instance tells where it serves (its HTTP port, say): the
    /// address (and metadata, when given) of its own entry change. Held in
    /// memory like the entry itself; the instance says it again when it
    /// reconnects.
    pub fn advertise(
        &mut self,
        service: &str,
        id: &str,
        address: String,
        meta: Option<BTreeMap<String, String>>,
        out: &mut Vec<RegistryAction>,
    ) -> Result<(), RegistryError> {
        let key = (service.to_string(), id.to_string());
        let Some(instance) = self.instances.get_mut(&key) else {
            return Err(RegistryError::NotOnBus {
                service: service.to_string(),
                id: id.to_string(),
            });
        };
        if !instance.spec.on_bus {
            return Err(RegistryError::NotOnBus {
                service: service.to_string(),
                id: id.to_string(),
            });
        }
        let mut spec = instance.spec.clone();
        spec.address = address;
        if let Some(meta) = meta {
            spec.meta = meta;
        }
        validate(&spec)?;
        if spec == instance.spec {
            return Ok(());
        }
        self.index += 1;
        instance.spec = spec;
        instance.modify_index = self.index;
        out.push(RegistryAction::Changed { index: self.index });
        Ok(())
    }

    /// A TTL heartbeat: counts as one passing result.
    pub fn heartbeat(
        &mut self,
        service: &str,
        id: &str,
        now: Nanos,
        out: &mut Vec<RegistryAction>,
    ) -> Result<(), RegistryError> {
        let key = (service.to_string(), id.to_string());
        let Some(instance) = self.instances.get_mut(&key) else {
            return Err(RegistryError::Unknown {
                service: service.to_string(),
                id: id.to_string(),
            });
        };
        let Check::Ttl { ttl_ms } = instance.spec.check else {
            return Err(RegistryError::NotTtl {
                service: service.to_string(),
                id: id.to_string(),
            });
        };
        instance.last_heartbeat = now;
        instance.next_check = now + Nanos::from(ttl_ms) * MS;
        self.record(&key, Health::Passing, "heartbeat".to_string(), now, out);
        self.reschedule(&key);
        Ok(())
    }

    /// The result of a `RunCheck`. Results for instances gone meanwhile
    /// are ignored.
    pub fn check_result(
        &mut self,
        service: &str,
        id: &str,
        result: Health,
        output: String,
        now: Nanos,
        out: &mut Vec<RegistryAction>,
    ) {
        let key = (service.to_string(), id.to_string());
        self.record(&key, result, output, now, out);
    }

    /// A bus instance's connection closed: it leaves the registry.
    pub fn connection_closed(&mut self, service: &str, id: &str, out: &mut Vec<RegistryAction>) {
        if self.get(service, id).is_some_and(|i| i.spec.on_bus) {
            let _ = self.deregister(service, id, out);
        }
    }

    fn record(
        &mut self,
        key: &(String, String),
        result: Health,
        output: String,
        now: Nanos,
        out: &mut Vec<RegistryAction>,
    ) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        instance.last_output = output;
        let streak = &mut instance.raw_streak;
        if streak.0 == result {
            streak.1 = streak.1.saturating_add(1);
        } else {
            *streak = (result, 1);
        }
        let settled = streak.1 >= instance.spec.flap_threshold.max(1);
        if !settled || instance.health == result {
            return;
        }
        instance.health = result;
        instance.critical_since = (result == Health::Critical).then_some(now);
        self.reschedule(key);
        out.push(RegistryAction::Journal(RegistryOp::Health {
            service: key.0.clone(),
            id: key.1.clone(),
            health: result,
        }));
        self.index += 1;
        let index = self.index;
        if let Some(instance) = self.instances.get_mut(key) {
            instance.modify_index = index;
        }
        out.push(RegistryAction::Changed { index });
    }

    /// Advances time: due checks are asked for, TTLs that lapsed count as
    /// critical results, and instances critical too long are removed.
    pub fn tick(&mut self, now: Nanos, out: &mut Vec<RegistryAction>) {
        let mut due = Vec::new();
        while self.timers.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, key)) = self.timers.pop_first() {
                due.push(key);
            }
        }
        let mut lapsed = Vec::new();
        let mut expired = Vec::new();
        for key in &due {
            let Some(instance) = self.instances.get_mut(key) else {
                continue;
            };
            instance.timer = None;
            if let (Some(since), after) =
                (instance.critical_since, instance.spec.deregister_after_ms)
            {
                if after > 0 && now.saturating_sub(since) >= Nanos::from(after) * MS {
                    expired.push(key.clone());
                    continue;
                }
            }
            if instance.next_check > now {
                continue;
            }
            match &instance.spec.check {
                Check::None => instance.next_check = Nanos::MAX,
                Check::Ttl { ttl_ms } => {
                    instance.next_check = now + Nanos::from(*ttl_ms) * MS;
                    lapsed.push(key.clone());
                }
                check => {
                    instance.next_check = now + Nanos::from(instance.spec.interval_ms.max(1)) * MS;
                    out.push(RegistryAction::RunCheck {
                        service: key.0.clone(),
                        id: key.1.clone(),
                        check: check.clone(),
                    });
                }
            }
        }
        for key in lapsed {
            self.record(&key, Health::Critical, "TTL lapsed".to_string(), now, out);
        }
        for (service, id) in expired {
            let _ = self.deregister(&service, &id, out);
        }
        for key in &due {
            self.reschedule(key);
        }
    }

    /// When [`Registry::tick`] next has work.
    pub fn next_timer(&self) -> Option<Nanos> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Puts the instance's entry in [`Registry::timers`] at its deadline.
    fn reschedule(&mut self, key: &(String, String)) {
        let Some(instance) = self.instances.get_mut(key) else {
            return;
        };
        let deadline = instance.deadline();
        if instance.timer == deadline {
            return;
        }
        if let Some(old) = instance.timer.take() {
            self.timers.remove(&(old, key.clone()));
        }
        if let Some(at) = deadline {
            self.timers.insert((at, key.clone()));
        }
        instance.timer = deadline;
    }

    /// Forgets the instance's entry in [`Registry::timers`].
    fn unschedule(&mut self, key: &(String, String), timer: Option<Nanos>) {
        if let Some(at) = timer {
            self.timers.remove(&(at, key.clone()));
        }
    }

    // ---- durability --------------------------------------------------

    pub(crate) fn apply(&mut self, op: RegistryOp, now: Nanos) {
        match op {
            RegistryOp::Register(spec) => self.apply_register(spec, now),
            RegistryOp::Deregister { service, id } => self.apply_deregister(&service, &id),
            RegistryOp::Health {
                service,
                id,
                health,
            } => {
                self.index += 1;
                let index = self.index;
                let key = (service, id);
                if let Some(i) = self.instances.get_mut(&key) {
                    i.health = health;
                    i.raw_streak = (health, i.spec.flap_threshold);
                    i.critical_since = (health == Health::Critical).then_some(now);
                    i.modify_index = index;
                }
                self.reschedule(&key);
            }
        }
    }

    fn apply_register(&mut self, mut spec: InstanceSpec, now: Nanos) {
        self.index += 1;
        let key = (spec.service.clone(), spec.id.clone());
        // A check given to a connected instance stays with its connection.
        if self.instances.get(&key).is_some_and(|i| i.spec.on_bus) {
            spec.on_bus = true;
        }
        let instance = Instance::new(spec, self.index, now);
        if let Some(replaced) = self.instances.insert(key.clone(), instance) {
            self.unschedule(&key, replaced.timer);
        }
        self.reschedule(&key);
    }

    fn apply_deregister(&mut self, service: &str, id: &str) {
        self.index += 1;
        let key = (service.to_string(), id.to_string());
        if let Some(removed) = self.instances.remove(&key) {
            self.unschedule(&key, removed.timer);
        }
    }

    /// The snapshot section: every instance's spec and visible health.
    /// Bus instances are not saved: they come back when they connect.
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        w.u64(self.index);
        let durable = || self.instances.values().filter(|i| !i.spec.on_bus);
        w.u32(durable().count() as u32);
        for instance in durable() {
            write_spec(w, &instance.spec);
            w.u8(instance.health.code());
        }
    }

    pub(crate) fn read_snapshot(&mut self, r: &mut Reader, now: Nanos) -> Result<(), JournalError> {
        let index = r.u64()?;
        for _ in 0..r.u32()? {
            let spec = read_spec(r)?;
            let health = Health::from_code(r.u8()?)?;
            self.apply_register(spec.clone(), now);
            self.apply(
                RegistryOp::Health {
                    service: spec.service,
                    id: spec.id,
                    health,
                },
                now,
            );
        }
        self.index = self.index.max(index);
        Ok(())
    }
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

// ---- the broker's side ----------------------------------------------

impl<S: crate::MessageStore> crate::Broker<S> {
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Checks the edge must run now (asked for by [`crate::Broker::tick`]).
    pub fn take_registry_checks(&mut self) -> Vec<(String, String, Check)> {
        std::mem::take(&mut self.registry_checks)
    }

    pub fn registry_register(
        &mut self,
        spec: InstanceSpec,
        now: Nanos,
    ) -> Result<(), RegistryError> {
        let mut out = Vec::new();
        let result = self.registry.register(spec, now, &mut out);
        self.registry_actions(out);
        result
    }

    pub fn registry_deregister(&mut self, service: &str, id: &str) -> Result<(), RegistryError> {
        let mut out = Vec::new();
        let result = self.registry.deregister(service, id, &mut out);
        self.registry_actions(out);
        result
    }

    pub fn registry_heartbeat(
        &mut self,
        service: &str,
        id: &str,
        now: Nanos,
    ) -> Result<(), RegistryError> {
        let mut out = Vec::new();
        let result = self.registry.heartbeat(service, id, now, &mut out);
        self.registry_actions(out);
        result
    }

    pub fn registry_check_result(
        &mut self,
        service: &str,
        id: &str,
        result: Health,
        output: String,
        now: Nanos,
    ) {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        self.registry
            .check_result(service, id, result, output, now, &mut out);
        self.registry_actions(out);
    }

    /// A bus connection arrived: its instance is registered, in memory
    /// only (after a restart it is back when it connects again).
    pub(crate) fn register_bus_instance(&mut self, service: &str, instance: &str, now: Nanos) {
        let spec = InstanceSpec {
            service: service.to_string(),
            id: instance.to_string(),
            address: String::new(),
            meta: BTreeMap::new(),
            check: Check::None,
            interval_ms: 0,
            flap_threshold: 1,
            deregister_after_ms: 0,
            on_bus: true,
        };
        let mut out = Vec::new();
        // A name the registry cannot hold (not a DNS label) is simply not
        // discoverable; the connection works all the same.
        let _ = self.registry.register(spec, now, &mut out);
    }

    /// `courier.registry.advertise` from a bus connection: its own entry.
    pub(crate) fn advertise_bus_instance(
        &mut self,
        service: &str,
        instance: &str,
        address: String,
        meta: Option<BTreeMap<String, String>>,
    ) -> Result<(), RegistryError> {
        let mut out = Vec::new();
        let result = self
            .registry
            .advertise(service, instance, address, meta, &mut out);
        self.registry_actions(out);
        result
    }

    pub(crate) fn deregister_bus_instance(&mut self, service: &str, instance: &str) {
        let mut out = Vec::new();
        self.registry.connection_closed(service, instance, &mut out);
    }

    pub(crate) fn registry_tick(&mut self, now: Nanos) {
        let mut out = Vec::new();
        self.registry.tick(now, &mut out);
        self.registry_actions(out);
    }

    fn registry_actions(&mut self, out: Vec<RegistryAction>) {
        for action in out {
            match action {
                RegistryAction::RunCheck { service, id, check } => {
                    self.registry_checks.push((service, id, check));
                }
                RegistryAction::Journal(op) => {
                    if let RegistryOp::Health { service, .. } = &op {
                        // A recovered instance takes work again at once.
                        let service = service.clone();
                        let now = self.now;
                        self.journal(crate::journal::Op::Registry(op));
                        self.pump(&service, now);
                        continue;
                    }
                    self.journal(crate::journal::Op::Registry(op));
                }
                RegistryAction::Changed { .. } => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
