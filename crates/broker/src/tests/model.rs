//! A state-machine property test of delivery against a model.

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Send { key: u8 },
    Connect,
    Disconnect(usize),
    Ack(usize),
    Nack(usize),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4).prop_map(|key| Op::Send { key }),
        1 => Just(Op::Connect),
        1 => (0usize..8).prop_map(Op::Disconnect),
        4 => (0usize..32).prop_map(Op::Ack),
        1 => (0usize..32).prop_map(Op::Nack),
        1 => (0u16..300).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Against a simple model: every accepted message ends acked exactly
    /// once or dead-lettered; never two of one key in flight; each key's
    /// messages are first delivered in send order; nothing is invented.
    #[test]
    fn delivery_rules_hold(ops in proptest::collection::vec(op(), 1..200)) {
        let mut h = Harness::new();
        h.connect(1, "sender", 0);
        h.broker.subscribe(1000, 0, "jobs.run", 0, 0, StartFrom::New, h.now); // unknown conn: ignored
        let mut next_conn = 100;
        h.connect(next_conn, "worker", 3);
        h.broker.subscribe(next_conn, 0, "jobs.run", 100, 4, StartFrom::New, h.now);
        let mut live: Vec<ConnId> = vec![next_conn];
        let mut sent: Vec<(u8, Bytes)> = Vec::new();
        let mut in_flight: Vec<(ConnId, DeliveryId, Bytes)> = Vec::new();
        let mut acked: Vec<Bytes> = Vec::new();
        let mut first_delivery_order: HashMap<u8, Vec<Bytes>> = HashMap::new();
        let mut seen_first: std::collections::HashSet<Bytes> = Default::default();

        let mut absorb = |h: &mut Harness<MemoryStore>, in_flight: &mut Vec<(ConnId, DeliveryId, Bytes)>| -> Result<(), TestCaseError> {
            for a in h.actions() {
                if let Action::Deliver { conn, delivery, message, .. } = a {
                    // Deliveries the broker took back (deadline) are no longer in flight.
                    let held: Vec<DeliveryId> = h.broker.services.get("worker").map(|s| s.queue.in_flight.keys().copied().collect()).unwrap_or_default();
                    in_flight.retain(|f| held.contains(&f.1));
                    let key = message.key.clone().expect("keyed");
                    prop_assert!(!in_flight.iter().any(|(_, _, p)| p[..1] == key[..]), "two of key {:?} in flight", key);
                    in_flight.push((conn, delivery, message.payload.clone()));
                    if seen_first.insert(message.payload.clone()) {
                        first_delivery_order.entry(key[0]).or_default().push(message.payload.clone());
                    }
                }
            }
            Ok(())
        };

        for op in ops {
            match op {
                Op::Send { key } => {
                    let payload = Bytes::from(format!("{}{}", key as char, sent.len()));
                    let mut m = Message::new(Kind::Command, "jobs.run", payload.clone());
                    m.key = Some(Bytes::from(vec![key]));
                    m.payload = {
                        let mut p = vec![key];
                        p.extend_from_slice(&payload);
                        Bytes::from(p)
                    };
                    sent.push((key, m.payload.clone()));
                    h.send(1, sent.len() as u64, m);
                }
                Op::Connect => {
                    next_conn += 1;
                    h.connect(next_conn, "worker", 3);
                    h.subscribe(next_conn, "jobs.run");
                    live.push(next_conn);
                }
                Op::Disconnect(i) => {
                    if !live.is_empty() {
                        let conn = live.remove(i % live.len());
                        in_flight.retain(|(c, _, _)| *c != conn);
                        h.broker.disconnect(conn, h.now);
                    }
                }
                Op::Ack(i) => {
                    if !in_flight.is_empty() {
                        let (conn, d, p) = in_flight.remove(i % in_flight.len());
                        h.broker.ack(conn, d, h.now);
                        acked.push(p);
                    }
                }
                Op::Nack(i) => {
                    if !in_flight.is_empty() {
                        let (conn, d, _) = in_flight.remove(i % in_flight.len());
                        h.broker.nack(conn, d, 10, h.now);
                    }
                }
                Op::Advance(ms) => {
                    // Time passing makes held deliveries overdue: the model
                    // forgets them as the broker does.
                    h.advance(u64::from(ms));
                }
            }
            // Deliveries past their deadline were taken back by the broker.
            let overdue: Vec<DeliveryId> = in_flight.iter().map(|f| f.1).filter(|d| {
                h.broker.services.get("worker").is_some_and(|s| !s.queue.in_flight.contains_key(d))
            }).collect();
            in_flight.retain(|f| !overdue.contains(&f.1));
            absorb(&mut h, &mut in_flight)?;
            let counted = h.broker.services.get("worker").map_or(0, |s| s.queue.backlog_bytes());
            prop_assert_eq!(counted, h.broker.backlog_bytes_read("worker"), "backlog bytes as counted and as read");
        }
        // Settle: a fresh consumer acks everything until nothing is left.
        next_conn += 1;
        h.connect(next_conn, "worker", 1000);
        h.subscribe(next_conn, "jobs.run");
        for _ in 0..100 {
            let overdue: Vec<DeliveryId> = in_flight.iter().map(|f| f.1).filter(|d| {
                h.broker.services.get("worker").is_some_and(|s| !s.queue.in_flight.contains_key(d))
            }).collect();
            in_flight.retain(|f| !overdue.contains(&f.1));
            absorb(&mut h, &mut in_flight)?;
            for (conn, d, p) in std::mem::take(&mut in_flight) {
                h.broker.ack(conn, d, h.now);
                acked.push(p);
            }
            h.advance(100);
        }
        let dead: Vec<Bytes> = h.broker.dead_letters("worker").into_iter().filter_map(|(_, m)| m.map(|m| m.payload.clone())).collect();
        let mut done: Vec<Bytes> = acked.iter().chain(dead.iter()).cloned().collect();
        done.sort();
        let mut expected: Vec<Bytes> = sent.iter().map(|(_, p)| p.clone()).collect();
        expected.sort();
        prop_assert_eq!(done, expected, "every message acked exactly once or dead-lettered");
        for (key, order) in first_delivery_order {
            let sent_order: Vec<Bytes> = sent.iter().filter(|(k, _)| *k == key).map(|(_, p)| p.clone()).filter(|p| order.contains(p)).collect();
            prop_assert_eq!(order, sent_order, "key {} first-delivered out of order", key);
        }
        prop_assert_eq!(h.broker.store().len(), dead.len(), "only dead letters stay stored");
    }
}
