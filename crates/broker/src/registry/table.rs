//! The registry's instances, their health and their timers.

use super::*;

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

    pub(super) fn record(
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

    /// Whether this registry runs the checks (see [`Registry`]).
    pub fn checks_here(&self) -> bool {
        self.checks_here
    }

    /// This registry starts or stops running the checks. One that starts
    /// checks every instance at once and gives each TTL a whole period
    /// from now: whatever ran them before may have stopped long ago, and
    /// a heartbeat it took is not known here.
    pub fn set_checks_here(&mut self, here: bool, now: Nanos) {
        if self.checks_here == here {
            return;
        }
        self.checks_here = here;
        if !here {
            return;
        }
        let keys: Vec<(String, String)> = self.instances.keys().cloned().collect();
        for key in keys {
            if let Some(instance) = self.instances.get_mut(&key) {
                match instance.spec.check {
                    Check::None => {}
                    Check::Ttl { ttl_ms } => {
                        instance.next_check = now + Nanos::from(ttl_ms) * MS;
                    }
                    _ => instance.next_check = now,
                }
                if instance.critical_since.is_some() {
                    instance.critical_since = Some(now);
                }
            }
            self.reschedule(&key);
        }
    }

    /// The backend says instance `id` of `service` is now `record`
    /// (`None`: it left), as whichever node changed it wrote it. Applied
    /// as a recovery applies the journal: nothing is written back. Its
    /// own changes come back this way too; one that matches what is
    /// here changes nothing. Whether anything visible changed.
    pub fn apply_replicated(
        &mut self,
        service: &str,
        id: &str,
        record: Option<(InstanceSpec, Health)>,
        now: Nanos,
    ) -> bool {
        let key = (service.to_string(), id.to_string());
        match record {
            None => {
                if !self.instances.contains_key(&key) {
                    return false;
                }
                self.apply_deregister(service, id);
                true
            }
            Some((spec, health)) => {
                let same_spec = match self.instances.get(&key) {
                    Some(here) if here.spec == spec && here.health == health => return false,
                    Some(here) => here.spec == spec,
                    None => false,
                };
                if !same_spec {
                    self.apply_register(spec, now);
                }
                let (service, id) = key;
                self.apply(
                    RegistryOp::Health {
                        service,
                        id,
                        health,
                    },
                    now,
                );
                true
            }
        }
    }

    /// Advances time: due checks are asked for, TTLs that lapsed count as
    /// critical results, and instances critical too long are removed.
    /// Nothing, where another runs the checks ([`Registry::set_checks_here`]).
    pub fn tick(&mut self, now: Nanos, out: &mut Vec<RegistryAction>) {
        if !self.checks_here {
            return;
        }
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
        if !self.checks_here {
            return None;
        }
        self.timers.first().map(|(at, _)| *at)
    }

    /// Puts the instance's entry in [`Registry::timers`] at its deadline.
    pub(super) fn reschedule(&mut self, key: &(String, String)) {
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
    pub(super) fn unschedule(&mut self, key: &(String, String), timer: Option<Nanos>) {
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

    pub(super) fn apply_register(&mut self, mut spec: InstanceSpec, now: Nanos) {
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

    pub(super) fn apply_deregister(&mut self, service: &str, id: &str) {
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
