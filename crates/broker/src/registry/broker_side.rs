//! The broker's side of the registry: its inputs journaled, its actions
//! turned into the broker's.

use super::*;
use crate::Nanos;

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
        if result.is_ok() && self.upstream {
            // The node that runs the checks keeps the TTL: it must hear it.
            self.store
                .upstream(courier_store::Upstream::RegistryHeartbeat {
                    service: service.to_string(),
                    id: id.to_string(),
                });
        }
        result
    }

    /// A replicated backend's registry entry changed (any node's change,
    /// this one's too): see [`Registry::apply_replicated`]. A record that
    /// does not decode is reported and changes nothing.
    pub fn registry_replicated(
        &mut self,
        service: &str,
        id: &str,
        record: Option<bytes::Bytes>,
        now: Nanos,
    ) {
        self.now = self.now.max(now);
        let record = match record.map(decode_record).transpose() {
            Ok(record) => record,
            Err(e) => {
                self.alerts.push(format!(
                    "the cluster's registry entry for instance {id:?} of {service:?} cannot be read ({e}); it is left as it was here"
                ));
                return;
            }
        };
        let healthy_before = self.registry.get(service, id).map(|i| i.health);
        if self.registry.apply_replicated(service, id, record, now)
            && self.registry.get(service, id).map(|i| i.health) != healthy_before
        {
            // A recovered instance takes work again at once.
            self.pump(service, now);
        }
    }

    /// A TTL heartbeat that passed on another node (or this one, heard
    /// back): counts here as one taken here.
    pub fn registry_heard_heartbeat(&mut self, service: &str, id: &str, now: Nanos) {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        if self.registry.heartbeat(service, id, now, &mut out).is_ok() {
            self.registry_actions(out);
        }
    }

    /// Whether this node runs the registry's checks (the one that leads
    /// the registry on a cluster): [`Registry::set_checks_here`].
    pub fn set_registry_checks_here(&mut self, here: bool, now: Nanos) {
        self.now = self.now.max(now);
        self.registry.set_checks_here(here, now);
    }

    /// On a replicated backend, the entry of instance `id` of `service` as
    /// it now is here goes to the backend, for every node. A change of a
    /// bus connection's entry (`on_bus`) is not waited for; a registered
    /// instance's is, like a journal entry: what answers it waits until
    /// the backend has it.
    pub(crate) fn replicate_registry_entry(&mut self, service: &str, id: &str, on_bus: bool) {
        if !self.upstream {
            return;
        }
        let instance = self.registry.get(service, id);
        let on_bus = on_bus || instance.is_some_and(|i| i.spec.on_bus);
        let record = instance.map(encode_record);
        if !on_bus {
            self.dirty = true;
        }
        self.store.upstream(courier_store::Upstream::Registry {
            service: service.to_string(),
            id: id.to_string(),
            on_bus,
            record,
        });
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
        if self.registry.register(spec, now, &mut out).is_ok() {
            self.replicate_registry_entry(service, instance, true);
        }
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
        let changed = out
            .iter()
            .any(|action| matches!(action, RegistryAction::Changed { .. }));
        self.registry_actions(out);
        if changed {
            self.replicate_registry_entry(service, instance, true);
        }
        result
    }

    pub(crate) fn deregister_bus_instance(&mut self, service: &str, instance: &str) {
        let mut out = Vec::new();
        self.registry.connection_closed(service, instance, &mut out);
        if !out.is_empty() {
            self.replicate_registry_entry(service, instance, true);
        }
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
