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
