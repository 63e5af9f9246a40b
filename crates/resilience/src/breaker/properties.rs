use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    /// Ends the outstanding call at this index (mod their number).
    Finish(usize, bool),
    Release(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Acquire),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Finish(i, ok)),
        1 => any::<usize>().prop_map(Op::Release),
        2 => (0u64..3_000).prop_map(Op::Advance),
    ]
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    (0u32..5, prop::option::of(0.1f64..1.0), 1u32..6, 1u32..4).prop_map(
        |(consecutive, rate, calls_min, probes)| BreakerConfig {
            consecutive_failures: consecutive,
            failure_rate: rate,
            window: Duration::from_secs(5),
            window_calls_min: calls_min,
            cool_down: Duration::from_secs(1),
            half_open_probes: probes,
        },
    )
}

#[derive(Debug, Clone)]
enum SetOp {
    /// Asks with every key, the list rotated this far.
    Acquire(usize),
    Finish(usize, bool),
    Release(usize),
    Advance(u64),
}

fn set_op() -> impl Strategy<Value = SetOp> {
    prop_oneof![
        4 => (0usize..3).prop_map(SetOp::Acquire),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| SetOp::Finish(i, ok)),
        1 => any::<usize>().prop_map(SetOp::Release),
        2 => (0u64..3_000).prop_map(SetOp::Advance),
    ]
}

proptest! {
    /// Whatever happens to a set of endpoints' breakers: a call goes
    /// to the first candidate whose breaker is not open (a closed one,
    /// or a half-open one with a probe free), never past a closed one;
    /// it is refused only when none is closed, and then told to wait
    /// the shortest of the waits; the set's openings are its breakers'.
    #[test]
    fn a_set_picks_the_first_endpoint_its_breaker_lets_through(
        config in config(),
        ops in prop::collection::vec(set_op(), 1..200),
    ) {
        const KEYS: [&str; 3] = ["a", "b", "c"];
        let start = Instant::now();
        let mut now = start;
        let mut set = BreakerSet::new(config);
        let mut out: Vec<(&str, Permit)> = Vec::new();
        for op in ops {
            match op {
                SetOp::Acquire(rotation) => {
                    let candidates: Vec<&str> =
                        (0..3).map(|i| KEYS[(i + rotation) % 3]).collect();
                    let states: Vec<BreakerState> = candidates
                        .iter()
                        .map(|k| set.state(k, now).unwrap_or(BreakerState::Closed))
                        .collect();
                    match set.acquire(&candidates, now) {
                        Ok((at, permit)) => {
                            prop_assert!(
                                states[..at].iter().all(|s| *s != BreakerState::Closed),
                                "went past a closed breaker: {:?}, took {}", states, at
                            );
                            prop_assert_ne!(states[at], BreakerState::Open);
                            prop_assert_eq!(permit.is_probe(), states[at] == BreakerState::HalfOpen);
                            out.push((candidates[at], permit));
                        }
                        Err(refused) => {
                            prop_assert!(states.iter().all(|s| *s != BreakerState::Closed), "{:?}", states);
                            let any_half_open = states.contains(&BreakerState::HalfOpen);
                            prop_assert_eq!(refused.retry_in == Duration::ZERO, any_half_open);
                        }
                    }
                }
                SetOp::Finish(i, ok) if !out.is_empty() => {
                    let (key, permit) = out.remove(i % out.len());
                    let outcome = if ok { Outcome::Success } else { Outcome::Failure };
                    set.record(key, permit, outcome, now);
                }
                SetOp::Release(i) if !out.is_empty() => {
                    let (key, permit) = out.remove(i % out.len());
                    set.release(key, permit);
                }
                SetOp::Advance(ms) => now += Duration::from_millis(ms),
                SetOp::Finish(..) | SetOp::Release(_) => {}
            }
            let opened: u64 = set.breakers().map(|(_, b)| b.opened_total()).sum();
            prop_assert_eq!(set.opened_total(), opened);
            let rejected: u64 = set.breakers().map(|(_, b)| b.rejected_total()).sum();
            prop_assert_eq!(set.rejected_total(), rejected);
        }
    }

}

proptest! {
    /// Whatever happens: an open breaker refuses everything until its
    /// cool-down is over; a half-open one has at most its probes out;
    /// only a failure opens it, only a probe's success closes it, never
    /// straight from open; and failures in a row open a closed one.
    #[test]
    fn transitions_follow_the_rules(config in config(), ops in prop::collection::vec(op(), 1..200)) {
        let start = Instant::now();
        let mut now = start;
        let mut b = Breaker::new(config.clone());
        let mut out: Vec<(Permit, u64)> = Vec::new();
        let mut epoch = 0u64;
        let mut state = b.state(now);
        let mut open_until = None;
        let mut probes_out = 0u32;
        let mut in_a_row = 0u32;
        for op in ops {
            let before = state;
            let mut finished = None;
            match op {
                Op::Acquire => match b.acquire(now) {
                    Ok(permit) => {
                        if let Some(until) = open_until {
                            prop_assert!(now >= until, "a call let through while open");
                        }
                        prop_assert_eq!(permit.is_probe(), before != BreakerState::Closed);
                        if permit.is_probe() {
                            probes_out += 1;
                            prop_assert!(probes_out <= config.half_open_probes);
                        }
                        out.push((permit, epoch));
                    }
                    Err(refused) => {
                        prop_assert_ne!(before, BreakerState::Closed, "a closed breaker refused");
                        if before == BreakerState::HalfOpen {
                            prop_assert_eq!(probes_out, config.half_open_probes.max(1));
                        }
                        prop_assert!(now + refused.retry_in >= open_until.unwrap_or(now));
                    }
                },
                Op::Finish(i, ok) if !out.is_empty() => {
                    let (permit, granted) = out.remove(i % out.len());
                    let current = granted == epoch;
                    if current && permit.is_probe() {
                        probes_out -= 1;
                    }
                    finished = Some((ok, current, permit.is_probe()));
                    b.record(permit, if ok { Outcome::Success } else { Outcome::Failure }, now);
                }
                Op::Release(i) if !out.is_empty() => {
                    let (permit, granted) = out.remove(i % out.len());
                    if granted == epoch && permit.is_probe() {
                        probes_out -= 1;
                    }
                    b.release(permit);
                }
                Op::Advance(ms) => now += Duration::from_millis(ms),
                Op::Finish(..) | Op::Release(_) => {}
            }
            state = b.state(now);
            if let Some((ok, current, _)) = finished {
                if current && before == BreakerState::Closed {
                    in_a_row = if ok { 0 } else { in_a_row + 1 };
                }
            }
            if state != before {
                match (before, state) {
                    (BreakerState::Closed, BreakerState::Open) => {
                        prop_assert!(matches!(finished, Some((false, true, false))));
                    }
                    (BreakerState::HalfOpen, BreakerState::Open) => {
                        prop_assert!(matches!(finished, Some((false, true, true))));
                    }
                    (BreakerState::HalfOpen, BreakerState::Closed) => {
                        prop_assert!(matches!(finished, Some((true, true, true))));
                    }
                    (BreakerState::Open, BreakerState::HalfOpen) => {
                        prop_assert!(now >= open_until.unwrap_or(now));
                    }
                    (from, to) => prop_assert!(false, "{:?} -> {:?}", from, to),
                }
                open_until = (state == BreakerState::Open).then(|| now + config.cool_down);
                // Calls let through before a change count for nothing after it.
                epoch += 1;
                probes_out = 0;
                in_a_row = 0;
            }
            if config.consecutive_failures > 0 && state == BreakerState::Closed {
                prop_assert!(in_a_row < config.consecutive_failures, "{} failures in a row and still closed", in_a_row);
            }
        }
    }
}
