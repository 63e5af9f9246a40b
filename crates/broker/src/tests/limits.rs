//! Send rates, connection caps, old snapshot versions and the route cache.

use super::*;

fn harness_with_send_rate(per_service: u32) -> Harness {
    let mut h = Harness::new();
    h.broker = Broker::new(
        Config {
            send_rate_per_service: per_service,
            ..Config::default()
        },
        MemoryStore::new(),
    );
    h
}

#[test]
fn a_service_over_its_send_rate_is_refused_and_recovers() {
    let mut h = harness_with_send_rate(10);
    h.connect(1, "chatty", 0);
    h.connect(2, "quiet", 0);
    for i in 0..12 {
        h.send(1, i, event("noise.made", "x"));
    }
    h.send(2, 100, event("calm.note", "x"));
    let r = results(&h.actions());
    assert_eq!(
        r.iter().filter(|(_, c)| c.is_ok()).count(),
        11,
        "10 for chatty (its burst) and quiet's one: {r:?}"
    );
    assert_eq!(
        r.iter()
            .filter(|(_, c)| *c == ErrorCode::RateLimited)
            .count(),
        2
    );
    assert_eq!(h.broker.metrics().rate_limited, 2);
    h.advance(500);
    for i in 0..6 {
        h.send(1, 200 + i, event("noise.made", "x"));
    }
    let r = results(&h.actions());
    assert_eq!(
        r.iter().filter(|(_, c)| c.is_ok()).count(),
        5,
        "half a second refills half the rate: {r:?}"
    );
}

#[test]
fn instances_of_a_service_share_its_send_rate() {
    let mut h = harness_with_send_rate(10);
    h.connect(1, "chatty", 0);
    h.connect(2, "chatty", 0);
    for i in 0..12 {
        h.send(1 + i % 2, i, event("noise.made", "x"));
    }
    let r = results(&h.actions());
    assert_eq!(r.iter().filter(|(_, c)| c.is_ok()).count(), 10, "{r:?}");
    assert_eq!(
        r.iter()
            .filter(|(_, c)| *c == ErrorCode::RateLimited)
            .count(),
        2
    );
    // A refused send takes no token.
    h.advance(100);
    h.send(1, 50, event("Bad Name", "x"));
    h.send(2, 51, event("noise.made", "x"));
    let r = results(&h.actions());
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r.iter().filter(|(_, c)| c.is_ok()).count(), 1, "{r:?}");
    assert!(r.iter().any(|(_, c)| *c == ErrorCode::InvalidName), "{r:?}");
}

#[test]
fn connections_per_service_are_capped() {
    let mut h = Harness::new();
    h.broker = Broker::new(
        Config {
            connections_per_service_max: 2,
            ..Config::default()
        },
        MemoryStore::new(),
    );
    assert!(h.broker.connect_as(1, "web", "a", 0, false).is_ok());
    assert!(h.broker.connect_as(2, "web", "b", 0, false).is_ok());
    let refused = h.broker.connect_as(3, "web", "c", 0, false);
    assert!(
        refused
            .as_ref()
            .is_err_and(|r| r.contains("already has 2 connections")),
        "{refused:?}"
    );
    assert!(
        h.broker.connect_as(4, "todo", "a", 0, false).is_ok(),
        "other services are not affected"
    );
    h.broker.disconnect(1, h.now);
    assert!(h.broker.connect_as(5, "web", "d", 0, false).is_ok());
    assert_eq!(h.broker.metrics().connections_refused, 1);
}

#[test]
fn a_version_1_snapshot_with_whole_dedup_ids_still_loads_and_still_deduplicates() {
    let id = Uuid::now_v7();
    let mut v1 = Vec::new();
    v1.extend_from_slice(b"CRSN");
    v1.extend_from_slice(&1u32.to_be_bytes()); // version 1
    v1.extend_from_slice(&0u32.to_be_bytes()); // no services
    v1.extend_from_slice(&1u32.to_be_bytes()); // one dedup id …
    v1.extend_from_slice(&16u32.to_be_bytes());
    v1.extend_from_slice(id.as_bytes());
    v1.extend_from_slice(&(1_000 * MS).to_be_bytes()); // … remembered at 1 s
    v1.extend_from_slice(&0u32.to_be_bytes()); // no reply routes
    let mut h = Harness::new();
    h.broker
        .restore_snapshot(Bytes::from(v1))
        .expect("a version 1 snapshot loads");
    h.connect(1, "sender", 10);
    let mut m = Message::new(Kind::Event, "thing.happened", "x");
    m.id = id;
    h.send(1, 1, m);
    assert_eq!(h.broker.metrics().duplicates, 1, "the old id still counts");
}

#[test]
fn a_version_2_snapshot_with_timed_fingerprints_still_loads_and_still_deduplicates() {
    let id = Uuid::now_v7();
    let mut v2 = Vec::new();
    v2.extend_from_slice(b"CRSN");
    v2.extend_from_slice(&2u32.to_be_bytes()); // version 2
    v2.extend_from_slice(&0u32.to_be_bytes()); // no services
    v2.extend_from_slice(&1u32.to_be_bytes()); // one dedup fingerprint …
    v2.extend_from_slice(&crate::dedup::fingerprint(&id).to_be_bytes());
    v2.extend_from_slice(&(1_000 * MS).to_be_bytes()); // … remembered at 1 s
    v2.extend_from_slice(&0u32.to_be_bytes()); // no reply routes
    let mut h = Harness::new();
    h.broker
        .restore_snapshot(Bytes::from(v2))
        .expect("a version 2 snapshot loads");
    h.connect(1, "sender", 10);
    let mut m = Message::new(Kind::Event, "thing.happened", "x");
    m.id = id;
    h.send(1, 1, m);
    assert_eq!(h.broker.metrics().duplicates, 1, "the old id still counts");
}

#[test]
fn cached_routes_follow_every_subscription_change() {
    let mut h = Harness::new();
    h.connect(1, "sender", 100);
    h.connect(2, "audit", 100);
    h.connect(3, "billing", 100);
    h.subscribe(2, "order.placed");
    let receivers = |h: &mut Harness| -> Vec<ConnId> {
        let mut conns: Vec<ConnId> = h.deliveries().into_iter().map(|d| d.0).collect();
        conns.sort_unstable();
        conns
    };
    h.send(1, 1, Message::new(Kind::Event, "order.placed", "1"));
    assert_eq!(receivers(&mut h), vec![2]);
    h.subscribe(3, "order.*");
    h.send(1, 2, Message::new(Kind::Event, "order.placed", "2"));
    assert_eq!(
        receivers(&mut h),
        vec![2, 3],
        "a new subscriber is routed to"
    );
    h.broker.unsubscribe(2, 7, "order.placed");
    h.send(1, 3, Message::new(Kind::Event, "order.placed", "3"));
    assert_eq!(receivers(&mut h), vec![3], "an unsubscribed service is not");
}

#[test]
fn transient_messages_for_a_paused_receiver_are_dropped_and_counted_apart() {
    let mut h = Harness::new();
    h.connect(1, "sender", 100);
    h.connect(2, "ticker", 100);
    h.subscribe(2, "tick");
    h.actions();
    let mut tick = Message::new(Kind::Event, "tick", "1");
    tick.transient = true;
    h.broker.set_paused(2, true, h.now);
    h.send(1, 1, tick.clone());
    assert!(
        h.deliveries().is_empty(),
        "nothing goes to a paused receiver"
    );
    assert_eq!(h.broker.metrics().transient_dropped_paused, 1);
    assert_eq!(h.broker.metrics().dropped_unrouted, 0);
    h.broker.set_paused(2, false, h.now);
    tick.id = Uuid::now_v7();
    h.send(1, 2, tick);
    assert_eq!(h.deliveries().len(), 1, "delivered again once resumed");
    assert_eq!(h.broker.metrics().transient_dropped_paused, 1);
}

#[test]
fn send_bucket_refills_exactly_at_its_rate_up_to_one_second() {
    const MS: Nanos = 1_000_000;
    let start = 5_000 * MS;
    let bucket = SendBucket::new(10);
    // Full at first: a second's worth at once, then nothing.
    assert_eq!((0..12).filter(|_| bucket.take(10, start)).count(), 10);
    // 10/s: a token each 100 ms, not before.
    assert!(!bucket.take(10, start + 99 * MS));
    assert!(bucket.take(10, start + 100 * MS));
    assert!(!bucket.take(10, start + 150 * MS));
    assert!(bucket.take(10, start + 200 * MS));
    // A long pause refills one second's worth, no more (and no overflow).
    let later = start + 3_600_000 * MS;
    assert_eq!((0..12).filter(|_| bucket.take(10, later)).count(), 10);
    // The highest rate fits: a full second of it, then a token per ns.
    let fastest = SendBucket::new(u32::MAX);
    assert!(fastest.take(u32::MAX, u64::MAX));
    assert!(fastest.take(u32::MAX, 0));
}
