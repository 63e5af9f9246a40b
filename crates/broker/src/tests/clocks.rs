//! Broker time and wall time: inputs carry broker time, which never jumps;
//! the wall clock reaches the core only as an offset, for the times the
//! envelope means as wall time.

use super::*;

const HOUR: Nanos = 3_600_000 * MS;

fn delivered_timestamps(actions: &[Action]) -> Vec<Nanos> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { message, .. } => Some(message.timestamp),
            _ => None,
        })
        .collect()
}

#[test]
fn a_wall_clock_step_redelivers_nothing_and_delays_no_retry() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.broker
        .subscribe(2, 0, "todo.create", 100, 0, StartFrom::New, h.now);
    h.send(1, 1, command("todo.create", "a"));
    h.send(1, 2, command("todo.create", "b"));
    let first = h.deliveries();
    assert_eq!(first.len(), 2);

    // The wall clock jumps an hour ahead: no ack deadline has passed.
    h.broker.set_wall_offset(HOUR as i64);
    h.advance(50);
    assert!(h.deliveries().is_empty(), "a wall-clock step redelivered");
    h.broker.ack(2, first[0].1, h.now);

    // It jumps back two hours: a nack delay still ends on time.
    h.broker.set_wall_offset(-(HOUR as i64));
    h.broker.nack(2, first[1].1, 30, h.now);
    h.advance(29);
    assert!(h.deliveries().is_empty(), "the nack delay is held");
    h.advance(1);
    let retried = h.deliveries();
    assert_eq!(retried.len(), 1, "the retry waited for the wall clock");
    assert_eq!(retried[0].2, 2);

    // The deadline itself still holds, on broker time.
    h.advance(99);
    assert!(h.deliveries().is_empty());
    h.advance(1);
    assert_eq!(h.deliveries().len(), 1, "redelivered after its deadline");
}

#[test]
fn envelope_times_read_the_wall_clock() {
    let mut h = Harness::new();
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.subscribe(2, "todo.*");
    let wall_ahead = 10_000 * MS;
    h.broker.set_wall_offset(wall_ahead as i64);

    h.send(1, 1, command("todo.create", "x"));
    assert_eq!(
        delivered_timestamps(&h.actions()),
        vec![h.now + wall_ahead],
        "stamped with wall time"
    );

    // Still ahead of broker time, but behind the wall clock: expired.
    let mut stale = command("todo.create", "y");
    stale.expires_at = Some(h.now + wall_ahead / 2);
    h.send(1, 2, stale);
    assert_eq!(results(&h.actions()), vec![(2, ErrorCode::Expired)]);

    // Due 500 ms from now on the wall clock: 500 ms of broker time.
    let mut later = command("todo.remind", "z");
    later.deliver_at = Some(h.now + wall_ahead + 500 * MS);
    h.send(1, 3, later);
    assert_eq!(results(&h.actions()), vec![(3, ErrorCode::Ok)]);
    assert_eq!(h.broker.next_timer(), Some(h.now + 500 * MS));
    h.advance(499);
    assert!(h.deliveries().is_empty());
    h.advance(1);
    assert_eq!(h.deliveries().len(), 1);
}
