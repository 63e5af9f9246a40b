use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::task::{Context, Poll};

use super::*;

#[derive(Debug, thiserror::Error)]
#[error("down")]
struct Down;

fn breaker() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 2,
        failure_rate: None,
        cool_down: Duration::from_secs(1),
        ..BreakerConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn idempotent_calls_are_retried_and_others_are_not() {
    let policy = Policy::builder("p").retries(3).build();
    let tries = AtomicU32::new(0);
    let flaky = || async {
        if tries.fetch_add(1, Ordering::Relaxed) < 2 {
            Err(Down)
        } else {
            Ok(42)
        }
    };
    assert_eq!(policy.call_idempotent(flaky).await.unwrap(), 42);
    assert_eq!(tries.load(Ordering::Relaxed), 3);
    tries.store(0, Ordering::Relaxed);
    assert!(matches!(policy.call(flaky).await, Err(Error::Failed(_))));
    assert_eq!(
        tries.load(Ordering::Relaxed),
        1,
        "not idempotent: one attempt"
    );
    let s = policy.snapshot();
    assert_eq!((s.calls, s.succeeded, s.failed, s.retried), (2, 1, 1, 2));
}

#[tokio::test(start_paused = true)]
async fn an_attempt_past_the_timeout_fails_with_timeout() {
    let policy = Policy::builder("p")
        .timeout(Duration::from_millis(100))
        .build();
    let slow = || async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, Down>(())
    };
    let started = Instant::now();
    assert!(matches!(policy.call(slow).await, Err(Error::Timeout(_))));
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(policy.snapshot().timed_out, 1);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_fails_fast_and_a_probe_closes_it() {
    let policy = Policy::builder("p").retries(5).breaker(breaker()).build();
    let tries = AtomicU32::new(0);
    let down = || async {
        tries.fetch_add(1, Ordering::Relaxed);
        Err::<(), _>(Down)
    };
    // The retries stop at the rejection once the breaker opened.
    assert!(matches!(
        policy.call_idempotent(down).await,
        Err(Error::Open { .. })
    ));
    assert_eq!(tries.load(Ordering::Relaxed), 2);
    assert_eq!(policy.breaker_state(), Some(BreakerState::Open));
    assert!(matches!(policy.call(down).await, Err(Error::Open { .. })));
    assert_eq!(tries.load(Ordering::Relaxed), 2, "not called while open");

    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(policy.breaker_state(), Some(BreakerState::HalfOpen));
    policy.call(|| async { Ok::<_, Down>(()) }).await.unwrap();
    assert_eq!(policy.breaker_state(), Some(BreakerState::Closed));
    let s = policy.snapshot();
    assert_eq!((s.breaker_opened, s.rejected_open), (1, 2));
    let text = prometheus_text(&[s]);
    assert!(
        text.contains("courier_call_breaker_state{policy=\"p\",state=\"closed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("courier_call_rejections_total{policy=\"p\",reason=\"breaker_open\"} 2"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn spread_calls_go_around_an_endpoint_whose_breaker_is_open() {
    use crate::{Balance, Balancer};

    let policy = Policy::builder("p").retries(0).breaker(breaker()).build();
    for balance in [Balance::RoundRobin, Balance::PowerOfTwoChoices] {
        let balancer = Balancer::new(balance);
        let listed: Arc<[&'static str]> = Arc::from(vec!["up", "down"]);
        let endpoints = || listed.clone();
        let spread = Spread {
            service: "svc",
            balancer: &balancer,
            endpoints: &endpoints,
            key: |e: &&'static str| e,
        };
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let call = || {
            policy.call_spread(Idempotency::NotIdempotent, &spread, |e| {
                let down = down.load(Ordering::Relaxed);
                async move {
                    if e == "down" && down {
                        Err(Down)
                    } else {
                        Ok(e)
                    }
                }
            })
        };
        let mut failed = 0;
        while policy.endpoint_breaker_state("down") != Some(BreakerState::Open) {
            if call().await.is_err() {
                failed += 1;
            }
            assert!(failed <= 2, "{balance:?}: open after 2 failures");
        }
        assert_eq!(
            policy.endpoint_breaker_state("up"),
            Some(BreakerState::Closed)
        );
        assert_eq!(
            policy.breaker_state(),
            Some(BreakerState::Closed),
            "up still takes calls"
        );
        for _ in 0..10 {
            assert_eq!(call().await.unwrap(), "up", "{balance:?}");
        }

        // The probe after the cool-down goes to the endpoint that was
        // down, and closes its breaker.
        down.store(false, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Two choices pick at random: a few calls may go to up first.
        let mut reached = false;
        for _ in 0..64 {
            if call().await.unwrap() == "down" {
                reached = true;
                break;
            }
        }
        assert!(
            reached,
            "{balance:?}: the probe went to the endpoint that was down"
        );
        assert_eq!(
            policy.endpoint_breaker_state("down"),
            Some(BreakerState::Closed)
        );
    }
    let s = policy.snapshot();
    assert_eq!(s.breaker_opened, 2);
    assert!(s.endpoints.iter().all(|e| e.state == BreakerState::Closed));
    assert!(
        s.endpoints
            .iter()
            .any(|e| e.endpoint == "down" && e.rejected >= 5),
        "round robin alone turned away half of its 10 calls: {:?}",
        s.endpoints
    );
    assert_eq!(s.rejected_open, 0, "no call was refused: up took them");
    let text = prometheus_text(&[s]);
    assert!(
        text.contains("courier_call_endpoint_breaker_state{policy=\"p\",endpoint=\"down\",state=\"closed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("courier_call_endpoint_breakers{policy=\"p\",state=\"closed\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("courier_call_endpoint_rejections_total{policy=\"p\",endpoint=\"down\"}"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_spread_call_fails_fast_only_when_every_endpoint_is_open() {
    use crate::{Balance, Balancer};

    let policy = Policy::builder("p").retries(0).breaker(breaker()).build();
    let balancer = Balancer::new(Balance::RoundRobin);
    let listed: Arc<[&'static str]> = Arc::from(vec!["a", "b"]);
    let endpoints = || listed.clone();
    let spread = Spread {
        service: "svc",
        balancer: &balancer,
        endpoints: &endpoints,
        key: |e: &&'static str| e,
    };
    let tries = AtomicU32::new(0);
    let call = || {
        policy.call_spread(Idempotency::NotIdempotent, &spread, |_| async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(Down)
        })
    };
    for _ in 0..4 {
        assert!(matches!(call().await, Err(Error::Failed(_))));
    }
    assert_eq!(policy.breaker_state(), Some(BreakerState::Open));
    assert!(matches!(call().await, Err(Error::Open { .. })));
    assert_eq!(
        tries.load(Ordering::Relaxed),
        4,
        "not called once all are open"
    );
    let s = policy.snapshot();
    assert_eq!((s.rejected_open, s.breaker_opened), (1, 2));
    assert_eq!(s.endpoint_states.open, 2);

    let nothing: Arc<[&'static str]> = Arc::from(Vec::new());
    let none = || nothing.clone();
    let empty = Spread {
        endpoints: &none,
        ..spread
    };
    let refused = policy
        .call_spread(Idempotency::NotIdempotent, &empty, |_| async {
            Ok::<_, Down>(())
        })
        .await;
    assert!(
        matches!(refused, Err(Error::NoEndpoints(ref s)) if s == "svc"),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_bulkhead_refuses_at_once_and_a_fallback_answers() {
    let policy = Policy::builder("p").bulkhead(1).build();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let holder = policy.clone();
    let busy = tokio::spawn(async move {
        let mut released = Some(released);
        holder
            .call(|| {
                let released = released.take();
                async move {
                    match released {
                        Some(released) => released.await.map_err(|_| Down),
                        None => Err(Down),
                    }
                }
            })
            .await
    });
    while policy.snapshot().outstanding < 1 {
        tokio::task::yield_now().await;
    }
    let refused = policy.call(|| async { Ok::<_, Down>(1) }).await;
    assert!(matches!(refused, Err(Error::Full { max: 1, .. })));
    let answered = policy
        .call_with_fallback(
            Idempotency::NotIdempotent,
            || async { Ok::<_, Down>(1) },
            |e| {
                assert!(e.is_rejection());
                Ok(0)
            },
        )
        .await;
    assert_eq!(answered.unwrap(), 0);
    release.send(()).unwrap();
    busy.await.unwrap().unwrap();
    let s = policy.snapshot();
    assert_eq!((s.rejected_full, s.fallbacks, s.outstanding), (2, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn as_a_tower_layer_it_retries_cloned_requests() {
    use tower_layer::Layer;
    use tower_service::Service;

    #[derive(Clone)]
    struct Echo(Arc<AtomicU32>);
    impl Service<String> for Echo {
        type Response = String;
        type Error = Down;
        type Future = Pin<Box<dyn Future<Output = Result<String, Down>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Down>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: String) -> Self::Future {
            let first = self.0.fetch_add(1, Ordering::Relaxed) == 0;
            Box::pin(async move {
                if first {
                    Err(Down)
                } else {
                    Ok(request)
                }
            })
        }
    }
    let calls = Arc::new(AtomicU32::new(0));
    let policy = Policy::builder("p").build();
    let mut service = policy
        .layer(Idempotency::Idempotent)
        .layer(Echo(calls.clone()));
    let answer = service.call("hello".to_string()).await.unwrap();
    assert_eq!(answer, "hello");
    assert_eq!(calls.load(Ordering::Relaxed), 2);
}
