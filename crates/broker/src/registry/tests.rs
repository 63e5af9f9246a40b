use super::*;

const S: Nanos = 1_000_000_000;

fn spec(id: &str, check: Check, flap: u32, dereg_ms: u32) -> InstanceSpec {
    InstanceSpec {
        service: "todo".into(),
        id: id.into(),
        address: "127.0.0.1:8080".into(),
        meta: BTreeMap::from([("version".into(), "1".into())]),
        check,
        interval_ms: 5_000,
        flap_threshold: flap,
        deregister_after_ms: dereg_ms,
        on_bus: false,
    }
}

fn http() -> Check {
    Check::Http {
        url: "http://127.0.0.1:8080/health".into(),
        timeout_ms: 1000,
    }
}

fn result(r: &mut Registry, h: Health, now: Nanos) -> Vec<RegistryAction> {
    let mut out = Vec::new();
    r.check_result("todo", "a", h, String::new(), now, &mut out);
    out
}

#[test]
fn a_checked_instance_is_hidden_until_its_check_passes() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    r.register(spec("a", http(), 2, 0), 0, &mut out).unwrap();
    assert!(r.instances("todo", false).is_empty());
    assert_eq!(r.instances("todo", true).len(), 1);
    out.clear();
    r.tick(0, &mut out);
    assert!(matches!(out[0], RegistryAction::RunCheck { .. }));
    result(&mut r, Health::Passing, S);
    assert!(r.instances("todo", false).is_empty(), "one pass of two");
    let out = result(&mut r, Health::Passing, 2 * S);
    assert_eq!(r.instances("todo", false).len(), 1);
    assert!(out.iter().any(|a| matches!(
        a,
        RegistryAction::Journal(RegistryOp::Health {
            health: Health::Passing,
            ..
        })
    )));
}

#[test]
fn an_alternating_check_never_changes_the_visible_state() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    r.register(spec("a", http(), 3, 0), 0, &mut out).unwrap();
    for t in 1..4 {
        result(&mut r, Health::Passing, t * S);
    }
    let index = r.index();
    for t in 4..100 {
        let h = if t % 2 == 0 {
            Health::Critical
        } else {
            Health::Passing
        };
        assert!(result(&mut r, h, t * S).is_empty());
    }
    assert_eq!(r.index(), index);
    assert_eq!(r.get("todo", "a").unwrap().health, Health::Passing);
    for t in 100..103 {
        result(&mut r, Health::Critical, t * S);
    }
    assert_eq!(r.get("todo", "a").unwrap().health, Health::Critical);
    assert!(!r.is_routable("todo", "a"));
}

#[test]
fn critical_for_the_configured_time_deregisters() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    r.register(spec("a", http(), 1, 30_000), 0, &mut out)
        .unwrap();
    result(&mut r, Health::Passing, S);
    result(&mut r, Health::Critical, 10 * S);
    out.clear();
    r.tick(39 * S, &mut out);
    assert!(r.get("todo", "a").is_some());
    assert_eq!(r.next_timer(), Some(40 * S));
    r.tick(40 * S, &mut out);
    assert!(r.get("todo", "a").is_none());
    assert!(out
        .iter()
        .any(|a| matches!(a, RegistryAction::Journal(RegistryOp::Deregister { .. }))));
}

#[test]
fn a_ttl_check_lapses_without_heartbeats() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    r.register(spec("a", Check::Ttl { ttl_ms: 30_000 }, 1, 0), 0, &mut out)
        .unwrap();
    assert_eq!(r.instances("todo", false).len(), 1);
    r.tick(29 * S, &mut out);
    r.heartbeat("todo", "a", 29 * S, &mut out).unwrap();
    r.tick(58 * S, &mut out);
    assert_eq!(r.get("todo", "a").unwrap().health, Health::Passing);
    r.tick(59 * S, &mut out);
    assert_eq!(r.get("todo", "a").unwrap().health, Health::Critical);
    r.heartbeat("todo", "a", 60 * S, &mut out).unwrap();
    assert_eq!(r.get("todo", "a").unwrap().health, Health::Passing);
    let err = {
        r.register(spec("b", http(), 1, 0), 0, &mut out).unwrap();
        r.heartbeat("todo", "b", 0, &mut out).unwrap_err()
    };
    assert!(matches!(err, RegistryError::NotTtl { .. }));
}

/// The timer set says exactly what a walk over every instance would.
fn assert_timers_agree(r: &Registry) {
    let walked = r.instances.values().filter_map(Instance::deadline).min();
    assert_eq!(r.next_timer(), walked);
    let scheduled = r.instances.values().filter(|i| i.deadline().is_some());
    assert_eq!(r.timers.len(), scheduled.count());
    for (key, i) in &r.instances {
        assert_eq!(i.timer, i.deadline(), "{key:?}");
    }
}

#[test]
fn ticks_visit_only_due_instances_and_the_timers_stay_exact() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    for n in 0..60u32 {
        let check = match n % 3 {
            0 => http(),
            1 => Check::Ttl {
                ttl_ms: 2_000 + n * 10,
            },
            _ => Check::None,
        };
        let mut s = spec(&format!("i{n}"), check, 1 + n % 2, 5_000 * (n % 2));
        s.interval_ms = 1_000 + n * 37;
        r.register(s, Nanos::from(n) * MS, &mut out).unwrap();
        assert_timers_agree(&r);
    }
    let mut now = 0;
    for step in 0..400u64 {
        now += 97 * MS;
        out.clear();
        r.tick(now, &mut out);
        assert!(
            r.next_timer().is_none_or(|t| t > now),
            "nothing due is left behind"
        );
        for action in out.clone() {
            if let RegistryAction::RunCheck { service, id, .. } = action {
                let h = if (step / 60) % 2 == 0 {
                    Health::Passing
                } else {
                    Health::Critical
                };
                r.check_result(&service, &id, h, String::new(), now, &mut out);
            }
        }
        if step % 7 == 0 {
            let _ = r.heartbeat("todo", &format!("i{}", 1 + (step % 20) * 3), now, &mut out);
        }
        if step == 200 {
            r.deregister("todo", "i0", &mut out).unwrap();
        }
        assert_timers_agree(&r);
    }
    assert!(r.len() < 59, "critical instances were deregistered on time");
}

#[test]
fn bad_specs_are_refused_with_the_fix() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    let mut s = spec("a", Check::None, 1, 0);
    s.service = "todo.v1".into();
    let e = r.register(s, 0, &mut out).unwrap_err().to_string();
    assert!(e.contains("only letters"), "{e}");
    let mut s = spec("a", Check::None, 1, 0);
    s.address = "localhost".into();
    let e = r.register(s, 0, &mut out).unwrap_err().to_string();
    assert!(e.contains("HOST:PORT"), "{e}");
    assert!(Check::parse("ftp://x", 1).is_err());
    assert_eq!(
        Check::parse("ttl:30s", 1),
        Ok(Check::Ttl { ttl_ms: 30_000 })
    );
    assert!(r.is_empty());
}

#[test]
fn journal_replay_and_snapshot_rebuild_the_same_registry() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    r.register(spec("a", http(), 1, 0), 0, &mut out).unwrap();
    r.register(spec("b", Check::Ttl { ttl_ms: 1000 }, 1, 0), 0, &mut out)
        .unwrap();
    let mut bus = spec("c", Check::None, 1, 0);
    bus.on_bus = true;
    r.register(bus, 0, &mut out).unwrap();
    r.check_result("todo", "a", Health::Passing, String::new(), S, &mut out);
    r.deregister("todo", "b", &mut out).unwrap();

    let mut replayed = Registry::default();
    for action in &out {
        if let RegistryAction::Journal(op) = action {
            let mut w = Writer::new();
            op.encode_into(&mut w);
            let mut rd = Reader::new(w.0.freeze());
            let tag = rd.u8().unwrap();
            let decoded = RegistryOp::decode_after(tag, &mut rd).unwrap();
            assert_eq!(&decoded, op);
            assert!(rd.is_empty());
            replayed.apply(decoded, 5 * S);
        }
    }
    let names = |r: &Registry| -> Vec<(String, Health)> {
        r.instances("todo", true)
            .iter()
            .map(|i| (i.spec.id.clone(), i.health))
            .collect()
    };
    assert_eq!(names(&replayed), names(&r));

    let mut w = Writer::new();
    r.write_snapshot(&mut w);
    let mut loaded = Registry::default();
    loaded
        .read_snapshot(&mut Reader::new(w.0.freeze()), 5 * S)
        .unwrap();
    assert_eq!(names(&loaded), vec![("a".to_string(), Health::Passing)]);
    assert!(loaded.index() >= r.index());
    assert_eq!(loaded.len(), 1, "bus instances are not saved");
}

#[test]
fn a_registry_that_does_not_run_the_checks_asks_for_none_until_it_does() {
    let mut r = Registry::default();
    r.set_checks_here(false, 0);
    let mut out = Vec::new();
    r.register(spec("a", http(), 1, 0), 0, &mut out).unwrap();
    r.register(spec("t", Check::Ttl { ttl_ms: 1_000 }, 1, 0), 0, &mut out)
        .unwrap();
    out.clear();
    r.tick(10 * S, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(r.next_timer(), None);
    assert_eq!(r.get("todo", "t").unwrap().health, Health::Passing);

    // Taking the checks over: every check at once, every TTL a whole
    // period from now (a heartbeat the last runner took is not known).
    r.set_checks_here(true, 20 * S);
    r.tick(20 * S, &mut out);
    let checks: Vec<&str> = out
        .iter()
        .filter_map(|a| match a {
            RegistryAction::RunCheck { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(checks, vec!["a"]);
    assert_eq!(r.get("todo", "t").unwrap().health, Health::Passing);
    out.clear();
    r.tick(21 * S, &mut out);
    assert_eq!(r.get("todo", "t").unwrap().health, Health::Critical);
}

#[test]
fn replicated_records_apply_once_and_change_only_what_differs() {
    let mut here = Registry::default();
    let mut there = Registry::default();
    let mut out = Vec::new();
    there
        .register(spec("a", Check::Ttl { ttl_ms: 1_000 }, 1, 0), 0, &mut out)
        .unwrap();
    let record = |r: &Registry| {
        let bytes = encode_record(r.get("todo", "a").unwrap());
        decode_record(bytes).unwrap()
    };
    assert!(here.apply_replicated("todo", "a", Some(record(&there)), S));
    assert_eq!(
        here.get("todo", "a").unwrap().spec,
        there.get("todo", "a").unwrap().spec
    );
    let index = here.index();
    // Its own write heard back, or the same one twice: nothing moves.
    assert!(!here.apply_replicated("todo", "a", Some(record(&there)), 2 * S));
    assert_eq!(here.index(), index);

    there.tick(2 * S, &mut out);
    assert_eq!(there.get("todo", "a").unwrap().health, Health::Critical);
    assert!(here.apply_replicated("todo", "a", Some(record(&there)), 3 * S));
    assert_eq!(here.get("todo", "a").unwrap().health, Health::Critical);
    assert!(here.instances("todo", false).is_empty());

    assert!(here.apply_replicated("todo", "a", None, 4 * S));
    assert!(here.get("todo", "a").is_none());
    assert!(!here.apply_replicated("todo", "a", None, 5 * S));
}

#[test]
fn a_record_that_is_cut_short_does_not_decode() {
    let mut r = Registry::default();
    let mut out = Vec::new();
    r.register(spec("a", http(), 2, 60_000), 0, &mut out)
        .unwrap();
    let bytes = encode_record(r.get("todo", "a").unwrap());
    assert_eq!(
        decode_record(bytes.clone()).unwrap(),
        (r.get("todo", "a").unwrap().spec.clone(), Health::Critical)
    );
    for cut in 0..bytes.len() {
        assert!(decode_record(bytes.slice(..cut)).is_err(), "cut at {cut}");
    }
}
