//! Traffic counted per message name and service, for `/metrics` and the
//! console: what was sent and refused (by the sending service), delivered,
//! acked, nacked, redelivered, expired and dead-lettered (by the receiving
//! service), and per command name the latency from the command's
//! acceptance to its final reply with a count of replies per outcome.
//!
//! Label values are bounded: at most `names_max` distinct names are
//! counted under their own name; traffic of every name past the cap is
//! counted under [`OTHER`], and so are outcomes past `OUTCOMES_PER_NAME_MAX`
//! of one command name. Services are bounded by the manifest or by the
//! broker's connection limits, so they are not capped here.
//!
//! Cost on the hot path: the decoder gives the entries of a batch that
//! repeat a name one shared copy, so a send usually finds its name's slot
//! by comparing one pointer with the previous send's; otherwise one hash
//! lookup. A slot is a `u32` the broker keeps with each delivery in flight,
//! so acks and nacks count without looking the name up again.

use courier_proto::{ErrorCode, SharedStr};
use courier_store::histogram::{Histogram, SECONDS_BUCKETS};

use crate::{FastMap, Nanos};

/// The label value that stands for every name (or outcome) past the cap.
pub const OTHER: &str = "_other";

/// Distinct outcomes counted per command name; more are counted as [`OTHER`].
pub const OUTCOMES_PER_NAME_MAX: usize = 64;

/// Counters of one name for one service; they only ever go up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Accepted sends of this name by this service.
    pub sent: u64,
    /// Refused sends of this name by this service, per error code.
    pub refused: Vec<(ErrorCode, u64)>,
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub expired: u64,
    pub dead_lettered: u64,
}

impl Traffic {
    pub fn refuse(&mut self, code: ErrorCode) {
        self.refuse_many(code, 1);
    }

    fn refuse_many(&mut self, code: ErrorCode, count: u64) {
        match self.refused.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += count,
            None => self.refused.push((code, count)),
        }
    }

    /// Adds `other`'s counts (another node's, say).
    pub fn add(&mut self, other: &Traffic) {
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.redelivered += other.redelivered;
        self.acked += other.acked;
        self.nacked += other.nacked;
        self.expired += other.expired;
        self.dead_lettered += other.dead_lettered;
        for (code, count) in &other.refused {
            self.refuse_many(*code, *count);
        }
    }
}

/// Everything counted for one name.
#[derive(Debug, Clone)]
pub struct NameStats {
    pub name: SharedStr,
    pub by_service: Vec<(SharedStr, Traffic)>,
    /// For a command name: acceptance of a command → its final reply, in
    /// seconds.
    pub reply_latency: Histogram,
    /// For a command name: replies per outcome (the reply's name).
    pub outcomes: Vec<(SharedStr, u64)>,
}

impl NameStats {
    /// Adds what `other` counted of the same name (another node's part).
    pub fn add(&mut self, other: &NameStats) {
        for (service, traffic) in &other.by_service {
            let i = self.service_index(service);
            self.by_service[i].1.add(traffic);
        }
        self.reply_latency.add(&other.reply_latency);
        for (outcome, count) in &other.outcomes {
            match self.outcomes.iter_mut().find(|(o, _)| o == outcome) {
                Some((_, n)) => *n += count,
                None => self.outcomes.push((outcome.clone(), *count)),
            }
        }
    }

    fn service_index(&mut self, service: &SharedStr) -> usize {
        let found = self
            .by_service
            .iter()
            .position(|(s, _)| s.ptr_eq(service) || s == service);
        match found {
            Some(i) => i,
            None => {
                self.by_service.push((service.clone(), Traffic::default()));
                self.by_service.len() - 1
            }
        }
    }

    fn traffic(&mut self, service: &str) -> &mut Traffic {
        let index = match self.by_service.iter().position(|(s, _)| s == service) {
            Some(i) => i,
            None => {
                self.by_service
                    .push((SharedStr::from(service), Traffic::default()));
                self.by_service.len() - 1
            }
        };
        &mut self.by_service[index].1
    }
}

/// A name's place in [`TrafficStats`]; kept with deliveries in flight.
pub type Slot = u32;

/// A name's and a service's place in [`TrafficStats`], found once per send
/// and used when its outcome is known.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    slot: Slot,
    service: usize,
}

/// The per-name counters of the whole broker.
#[derive(Debug)]
pub struct TrafficStats {
    names_max: usize,
    slots: FastMap<SharedStr, Slot>,
    names: Vec<NameStats>,
    /// The slot of [`OTHER`], once some name was past the cap.
    other: Option<Slot>,
    /// The last name looked up, compared by pointer first.
    last: Option<(SharedStr, Slot)>,
    /// Sends (accepted or refused) of names past the cap.
    pub names_over_cap: u64,
    /// Where counts go when nothing is counted (`names_max` 0).
    discard: Traffic,
}

impl TrafficStats {
    /// Counts up to `names_max` names under their own name; 0 counts
    /// nothing (no per-name metrics at all).
    pub fn new(names_max: usize) -> TrafficStats {
        TrafficStats {
            names_max,
            slots: FastMap::default(),
            names: Vec::new(),
            other: None,
            last: None,
            names_over_cap: 0,
            discard: Traffic::default(),
        }
    }

    /// The slot counting `name`, made on first use ([`OTHER`]'s past the cap).
    pub fn slot(&mut self, name: &SharedStr) -> Slot {
        if self.names_max == 0 {
            return Slot::MAX;
        }
        if let Some((last, slot)) = &self.last {
            if last.ptr_eq(name) || last == name {
                return *slot;
            }
        }
        let slot = match self.slots.get(name.as_str()) {
            Some(slot) => *slot,
            None if self.slots.len() < self.names_max => {
                let slot = self.push(name.clone());
                self.slots.insert(name.clone(), slot);
                slot
            }
            None => match self.other {
                Some(slot) => slot,
                None => {
                    let slot = self.push(SharedStr::from(OTHER));
                    self.other = Some(slot);
                    slot
                }
            },
        };
        self.last = Some((name.clone(), slot));
        slot
    }

    fn push(&mut self, name: SharedStr) -> Slot {
        self.names.push(NameStats {
            name,
            by_service: Vec::new(),
            reply_latency: Histogram::new(&SECONDS_BUCKETS),
            outcomes: Vec::new(),
        });
        Slot::try_from(self.names.len() - 1).unwrap_or(Slot::MAX)
    }

    /// Where `name` sent by `service` is counted; see [`TrafficStats::at`].
    pub fn locate(&mut self, name: &SharedStr, service: &SharedStr) -> Counted {
        let slot = self.slot(name);
        if Some(slot) == self.other {
            self.names_over_cap += 1;
        }
        let service = self
            .names
            .get_mut(slot as usize)
            .map_or(0, |n| n.service_index(service));
        Counted { slot, service }
    }

    /// The counters [`TrafficStats::locate`] found.
    pub fn at(&mut self, counted: Counted) -> &mut Traffic {
        match self
            .names
            .get_mut(counted.slot as usize)
            .and_then(|n| n.by_service.get_mut(counted.service))
        {
            Some((_, traffic)) => traffic,
            None => &mut self.discard,
        }
    }

    /// The counters of `slot` for `service`.
    pub fn traffic(&mut self, slot: Slot, service: &str) -> Option<&mut Traffic> {
        self.names
            .get_mut(slot as usize)
            .map(|n| n.traffic(service))
    }

    /// A send refused before it was looked at further (checks, rate,
    /// authorisation, a failing disk).
    pub fn refused(&mut self, name: &SharedStr, service: &SharedStr, code: ErrorCode) {
        let counted = self.locate(name, service);
        self.at(counted).refuse(code);
    }

    /// A final reply to a command of `command`'s slot arrived `latency`
    /// after the command was accepted.
    pub fn final_reply(&mut self, command: Slot, latency: Nanos) {
        if let Some(n) = self.names.get_mut(command as usize) {
            n.reply_latency.observe(latency as f64 / 1e9);
        }
    }

    /// A reply named `outcome` answered a command of `command`'s slot.
    pub fn outcome(&mut self, command: Slot, outcome: &SharedStr) {
        let Some(n) = self.names.get_mut(command as usize) else {
            return;
        };
        if let Some((_, count)) = n.outcomes.iter_mut().find(|(o, _)| o == outcome) {
            *count += 1;
            return;
        }
        if n.outcomes.len() < OUTCOMES_PER_NAME_MAX {
            n.outcomes.push((outcome.clone(), 1));
        } else if let Some((_, count)) = n.outcomes.iter_mut().find(|(o, _)| o == OTHER) {
            *count += 1;
        } else {
            n.outcomes.push((SharedStr::from(OTHER), 1));
        }
    }

    /// Every name counted, in the order first seen.
    pub fn names(&self) -> &[NameStats] {
        &self.names
    }

    pub fn names_max(&self) -> usize {
        self.names_max
    }
}

/// Joins another node's counts into `names`: a name both counted adds
/// up, a name only `other` counted is appended (in its order).
pub fn add_names(names: &mut Vec<NameStats>, other: &[NameStats]) {
    for theirs in other {
        match names.iter_mut().find(|n| n.name == theirs.name) {
            Some(ours) => ours.add(theirs),
            None => names.push(theirs.clone()),
        }
    }
}

/// Whether two shared strings are the same allocation (cheaper than
/// comparing text when the decoder shared one copy across a batch).
trait PtrEq {
    fn ptr_eq(&self, other: &Self) -> bool;
}

impl PtrEq for SharedStr {
    fn ptr_eq(&self, other: &SharedStr) -> bool {
        let (a, b) = (self.as_str(), other.as_str());
        std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_name_and_service() {
        let mut stats = TrafficStats::new(10);
        let name = SharedStr::from("todo.create");
        let (web, cli) = (SharedStr::from("web"), SharedStr::from("cli"));
        let counted = stats.locate(&name, &web);
        stats.at(counted).sent += 1;
        stats.at(counted).sent += 1;
        stats.refused(&name, &web, ErrorCode::Unauthorized);
        stats.refused(&name, &cli, ErrorCode::Unauthorized);
        let slot = stats.slot(&name);
        stats.traffic(slot, "todo").expect("slot").delivered += 1;
        let n = &stats.names()[0];
        assert_eq!(n.name, "todo.create");
        assert_eq!(n.by_service.len(), 3);
        assert_eq!(n.by_service[0].1.sent, 2);
        assert_eq!(
            n.by_service[0].1.refused,
            vec![(ErrorCode::Unauthorized, 1)]
        );
        assert_eq!(
            n.by_service[1].1.refused,
            vec![(ErrorCode::Unauthorized, 1)]
        );
        assert_eq!(n.by_service[2].1.delivered, 1);
    }

    #[test]
    fn two_nodes_counts_add_up_per_name_and_service() {
        let (create, done) = (SharedStr::from("todo.create"), SharedStr::from("todo.done"));
        let (web, todo) = (SharedStr::from("web"), SharedStr::from("todo"));
        let mut a = TrafficStats::new(10);
        let mut b = TrafficStats::new(10);
        let counted = a.locate(&create, &web);
        a.at(counted).sent += 2;
        a.refused(&create, &web, ErrorCode::Unauthorized);
        let slot = a.slot(&create);
        a.final_reply(slot, 300_000);
        a.outcome(slot, &done);
        let counted = b.locate(&create, &todo);
        b.at(counted).delivered += 1;
        b.refused(&create, &web, ErrorCode::Unauthorized);
        b.refused(&create, &web, ErrorCode::RateLimited);
        let slot = b.slot(&create);
        b.final_reply(slot, 2_000_000);
        b.outcome(slot, &done);
        let counted = b.locate(&done, &todo);
        b.at(counted).sent += 1;

        let mut names = a.names().to_vec();
        add_names(&mut names, b.names());
        let found: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(found, vec!["todo.create", "todo.done"]);
        let create = &names[0];
        assert_eq!(create.by_service.len(), 2);
        assert_eq!(create.by_service[0].0, "web");
        assert_eq!(create.by_service[0].1.sent, 2);
        assert_eq!(
            create.by_service[0].1.refused,
            vec![(ErrorCode::Unauthorized, 2), (ErrorCode::RateLimited, 1)]
        );
        assert_eq!(create.by_service[1].0, "todo");
        assert_eq!(create.by_service[1].1.delivered, 1);
        assert_eq!(create.reply_latency.count, 2);
        assert_eq!(create.outcomes, vec![(SharedStr::from("todo.done"), 2)]);
        assert_eq!(names[1].by_service[0].1.sent, 1);
    }

    #[test]
    fn a_cap_of_zero_counts_nothing() {
        let mut stats = TrafficStats::new(0);
        let counted = stats.locate(&SharedStr::from("a.b"), &SharedStr::from("svc"));
        stats.at(counted).sent += 1;
        let slot = stats.slot(&SharedStr::from("a.b"));
        assert_eq!(slot, Slot::MAX);
        stats.final_reply(slot, 1_000);
        assert!(stats.names().is_empty());
        assert_eq!(stats.names_over_cap, 0);
    }

    #[test]
    fn names_past_the_cap_are_counted_as_other() {
        let mut stats = TrafficStats::new(2);
        let svc = SharedStr::from("svc");
        for name in ["a.one", "a.two", "a.three", "a.four", "a.four", "a.one"] {
            let counted = stats.locate(&SharedStr::from(name), &svc);
            stats.at(counted).sent += 1;
        }
        let names: Vec<&str> = stats.names().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a.one", "a.two", OTHER]);
        assert_eq!(stats.names()[0].by_service[0].1.sent, 2);
        assert_eq!(stats.names()[2].by_service[0].1.sent, 3);
        assert_eq!(stats.names_over_cap, 3);
    }

    #[test]
    fn a_repeated_name_is_found_by_pointer_and_a_copy_by_text() {
        let mut stats = TrafficStats::new(10);
        let shared = SharedStr::from("x.y");
        let a = stats.slot(&shared);
        assert_eq!(stats.slot(&shared.clone()), a);
        assert_eq!(stats.slot(&SharedStr::from("x.y")), a);
        assert_ne!(stats.slot(&SharedStr::from("x.z")), a);
        assert_eq!(stats.slot(&SharedStr::from("x.y")), a);
    }

    #[test]
    fn outcomes_are_capped_per_name() {
        let mut stats = TrafficStats::new(10);
        let slot = stats.slot(&SharedStr::from("transfer"));
        for i in 0..OUTCOMES_PER_NAME_MAX + 5 {
            stats.outcome(slot, &SharedStr::from(format!("transfer.o{i}")));
        }
        stats.outcome(slot, &SharedStr::from("transfer.o0"));
        let outcomes = &stats.names()[0].outcomes;
        assert_eq!(outcomes.len(), OUTCOMES_PER_NAME_MAX + 1);
        assert_eq!(outcomes[0].1, 2);
        assert_eq!(outcomes.last(), Some(&(SharedStr::from(OTHER), 5)));
    }
}
