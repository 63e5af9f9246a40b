//! The broker's services by name, with their timers kept in order, so
//! that [`Broker::next_timer`](crate::Broker::next_timer), asked after
//! every pass of the core, reads the earliest without walking every
//! service's queue (with a thousand services that walk was a cost of every
//! pass).
//!
//! Reading goes through `Deref` to the map. Changing a service goes only
//! through [`Services::get_mut`] and the other methods here, each of which
//! notes the service as touched; [`Services::settle`] then reads the
//! timers of the touched ones again. No queue can change unnoticed: the
//! map itself is never handed out mutably.

use std::collections::BTreeSet;
use std::ops::Deref;

use crate::{Config, FastMap, Nanos, Service};

#[derive(Default)]
pub(crate) struct Services {
    map: FastMap<String, Service>,
    /// Services handed out mutably since the last [`Services::settle`].
    touched: Vec<String>,
    /// Each service's earliest queue timer as last settled.
    timers: BTreeSet<(Nanos, String)>,
    /// Services with an unfinished history replay, as last settled.
    replaying: usize,
}

/// What [`Services::settle`] last read of a service (kept in the service).
#[derive(Default)]
pub(crate) struct Noted {
    /// In [`Services::touched`].
    touched: bool,
    timer: Option<Nanos>,
    replaying: bool,
}

impl Deref for Services {
    type Target = FastMap<String, Service>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl Services {
    fn touch(touched: &mut Vec<String>, name: &str, svc: &mut Service) {
        if !svc.noted.touched {
            svc.noted.touched = true;
            touched.push(name.to_string());
        }
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut Service> {
        let svc = self.map.get_mut(name)?;
        Self::touch(&mut self.touched, name, svc);
        Some(svc)
    }

    /// The service `name`, made if there is none.
    pub(crate) fn get_or_insert(&mut self, name: &str, config: &Config) -> &mut Service {
        if !self.map.contains_key(name) {
            self.map.insert(name.to_string(), Service::new(config));
        }
        self.get_mut(name).expect("inserted above")
    }

    pub(crate) fn insert(&mut self, name: String, svc: Service) -> Option<Service> {
        let replaced = self.remove(&name);
        self.map.insert(name.clone(), svc);
        self.get_mut(&name);
        replaced
    }

    pub(crate) fn remove(&mut self, name: &str) -> Option<Service> {
        let svc = self.map.remove(name)?;
        if let Some(at) = svc.noted.timer {
            self.timers.remove(&(at, name.to_string()));
        }
        if svc.noted.replaying {
            self.replaying -= 1;
        }
        Some(svc)
    }

    pub(crate) fn clear(&mut self) {
        *self = Services::default();
    }

    /// Reads again the timers and replays of the services touched since
    /// the last call.
    pub(crate) fn settle(&mut self) {
        for name in std::mem::take(&mut self.touched) {
            let Some(svc) = self.map.get_mut(&name) else {
                continue;
            };
            svc.noted.touched = false;
            let timer = svc.queue.next_timer();
            if timer != svc.noted.timer {
                if let Some(old) = svc.noted.timer {
                    self.timers.remove(&(old, name.clone()));
                }
                if let Some(new) = timer {
                    self.timers.insert((new, name.clone()));
                }
                svc.noted.timer = timer;
            }
            let replaying = !svc.waiting.is_empty();
            if replaying != svc.noted.replaying {
                svc.noted.replaying = replaying;
                if replaying {
                    self.replaying += 1;
                } else {
                    self.replaying -= 1;
                }
            }
        }
    }

    /// Whether some service has an unfinished history replay, and the
    /// earliest timer of any queue, as of the last [`Services::settle`].
    pub(crate) fn settled_timers(&self) -> (bool, Option<Nanos>) {
        (self.replaying > 0, self.timers.first().map(|(at, _)| *at))
    }
}
