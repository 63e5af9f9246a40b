use super::*;

fn config() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 3,
        failure_rate: None,
        window: Duration::from_secs(10),
        window_calls_min: 4,
        cool_down: Duration::from_secs(5),
        half_open_probes: 1,
    }
}

fn fail(b: &mut Breaker, now: Instant) {
    let permit = b.acquire(now).unwrap();
    b.record(permit, Outcome::Failure, now);
}

fn succeed(b: &mut Breaker, now: Instant) {
    let permit = b.acquire(now).unwrap();
    b.record(permit, Outcome::Success, now);
}

#[test]
fn failures_in_a_row_open_it_and_a_success_between_resets_the_count() {
    let t = Instant::now();
    let mut b = Breaker::new(config());
    fail(&mut b, t);
    fail(&mut b, t);
    succeed(&mut b, t);
    fail(&mut b, t);
    fail(&mut b, t);
    assert_eq!(b.state(t), BreakerState::Closed);
    fail(&mut b, t);
    assert_eq!(b.state(t), BreakerState::Open);
    assert_eq!(b.opened_total(), 1);
    let refused = b.acquire(t + Duration::from_secs(1)).unwrap_err();
    assert_eq!(refused.retry_in, Duration::from_secs(4));
    assert_eq!(b.rejected_total(), 1);
}

#[test]
fn after_the_cool_down_one_probe_goes_through_and_its_success_closes_it() {
    let t = Instant::now();
    let mut b = Breaker::new(config());
    (0..3).for_each(|_| fail(&mut b, t));
    let later = t + Duration::from_secs(5);
    assert_eq!(b.state(later), BreakerState::HalfOpen);
    let probe = b.acquire(later).unwrap();
    assert!(probe.is_probe());
    assert_eq!(
        b.acquire(later).unwrap_err().retry_in,
        Duration::ZERO,
        "one probe at a time"
    );
    b.record(probe, Outcome::Success, later);
    assert_eq!(b.state(later), BreakerState::Closed);
    succeed(&mut b, later);
}

#[test]
fn a_failed_probe_opens_it_for_another_cool_down() {
    let t = Instant::now();
    let mut b = Breaker::new(config());
    (0..3).for_each(|_| fail(&mut b, t));
    let later = t + Duration::from_secs(6);
    let probe = b.acquire(later).unwrap();
    b.record(probe, Outcome::Failure, later);
    assert_eq!(b.state(later), BreakerState::Open);
    assert_eq!(b.opened_total(), 2);
    assert_eq!(
        b.state(later + Duration::from_millis(4_999)),
        BreakerState::Open
    );
    assert_eq!(
        b.state(later + Duration::from_secs(5)),
        BreakerState::HalfOpen
    );
}

#[test]
fn a_released_probe_frees_its_slot() {
    let t = Instant::now();
    let mut b = Breaker::new(config());
    (0..3).for_each(|_| fail(&mut b, t));
    let later = t + Duration::from_secs(5);
    let probe = b.acquire(later).unwrap();
    b.release(probe);
    assert!(b.acquire(later).is_ok());
}

#[test]
fn outcomes_of_calls_from_before_a_transition_are_ignored() {
    let t = Instant::now();
    let mut b = Breaker::new(config());
    let slow = b.acquire(t).unwrap();
    (0..3).for_each(|_| fail(&mut b, t));
    let later = t + Duration::from_secs(5);
    let probe = b.acquire(later).unwrap();
    // The slow call of the closed breaker ends now: it is no probe.
    b.record(slow, Outcome::Success, later);
    assert_eq!(b.state(later), BreakerState::HalfOpen);
    b.record(probe, Outcome::Success, later);
    assert_eq!(b.state(later), BreakerState::Closed);
}

#[test]
fn a_set_skips_endpoints_whose_breakers_are_open_and_refuses_only_when_all_are() {
    let t = Instant::now();
    let mut set = BreakerSet::new(config());
    for _ in 0..3 {
        let (at, permit) = set.acquire(&["a", "b"], t).unwrap();
        assert_eq!(at, 0);
        set.record("a", permit, Outcome::Failure, t);
    }
    assert_eq!(set.state("a", t), Some(BreakerState::Open));
    assert_eq!(set.state("b", t), None, "b has had no call yet");
    let (at, permit) = set.acquire(&["a", "b"], t).unwrap();
    assert_eq!(at, 1, "a's open breaker is skipped");
    set.record("b", permit, Outcome::Success, t);
    assert_eq!(set.rejected_total(), 1);
    assert_eq!(set.state_overall(t), Some(BreakerState::Closed));

    let later = t + Duration::from_secs(1);
    for _ in 0..3 {
        let (at, permit) = set.acquire(&["b", "a"], later).unwrap();
        assert_eq!(at, 0);
        set.record("b", permit, Outcome::Failure, later);
    }
    let refused = set.acquire(&["a", "b"], later).unwrap_err();
    assert_eq!(
        refused.retry_in,
        Duration::from_secs(4),
        "a's is the shorter wait"
    );
    assert_eq!(set.state_overall(later), Some(BreakerState::Open));
    assert_eq!(set.opened_total(), 2);

    // a's cool-down ends first: its probe goes to it, listed second.
    let a_cooled = t + Duration::from_secs(5);
    let (at, probe) = set.acquire(&["b", "a"], a_cooled).unwrap();
    assert_eq!(at, 1);
    assert!(probe.is_probe());
    set.record("a", probe, Outcome::Success, a_cooled);
    assert_eq!(set.state("a", a_cooled), Some(BreakerState::Closed));
    assert_eq!(
        set.counts(a_cooled),
        StateCounts {
            closed: 1,
            open: 1,
            half_open: 0
        }
    );
}

#[test]
fn a_set_drops_the_breakers_of_endpoints_no_longer_listed() {
    let t = Instant::now();
    let mut set = BreakerSet::new(config());
    let (_, stale) = set.acquire(&["a"], t).unwrap();
    let (_, permit) = set.acquire(&["b"], t).unwrap();
    set.record("b", permit, Outcome::Success, t);
    let (_, permit) = set.acquire(&["b"], t).unwrap();
    set.record("b", permit, Outcome::Success, t);
    assert_eq!(set.state("a", t), None, "a left the list");
    assert_eq!(set.breakers().count(), 1);
    // a is back with a new breaker: a permit of the old one counts
    // for nothing in it.
    let (_, fresh) = set.acquire(&["a", "b"], t).unwrap();
    set.record("a", stale, Outcome::Failure, t);
    set.release("a", fresh);
    for _ in 0..2 {
        let (_, permit) = set.acquire(&["a", "b"], t).unwrap();
        set.record("a", permit, Outcome::Failure, t);
    }
    assert_eq!(
        set.state("a", t),
        Some(BreakerState::Closed),
        "2 failures, not 3"
    );
}

#[test]
fn a_failure_rate_over_the_window_opens_it_once_enough_calls_were_seen() {
    let t = Instant::now();
    let mut b = Breaker::new(BreakerConfig {
        consecutive_failures: 0,
        failure_rate: Some(0.5),
        ..config()
    });
    fail(&mut b, t);
    fail(&mut b, t);
    succeed(&mut b, t);
    assert_eq!(
        b.state(t),
        BreakerState::Closed,
        "3 calls: below the minimum"
    );
    succeed(&mut b, t);
    succeed(&mut b, t);
    fail(&mut b, t);
    assert_eq!(b.state(t), BreakerState::Open, "3 of 6 failed");
}

#[test]
fn the_window_forgets_calls_older_than_its_span() {
    let t = Instant::now();
    let mut b = Breaker::new(BreakerConfig {
        consecutive_failures: 0,
        failure_rate: Some(0.5),
        ..config()
    });
    (0..3).for_each(|_| fail(&mut b, t));
    let later = t + Duration::from_secs(11);
    succeed(&mut b, later);
    succeed(&mut b, later);
    succeed(&mut b, later);
    fail(&mut b, later);
    assert_eq!(
        b.state(later),
        BreakerState::Closed,
        "1 of the last 4 failed; the 3 old failures are forgotten"
    );
}
