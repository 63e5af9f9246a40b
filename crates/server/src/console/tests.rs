use courier_broker::stats::{NameStats, Traffic};
use courier_store::histogram::Histogram;
use serde_json::json;

use super::*;
use courier_proto::{ErrorCode, SharedStr};
use courier_store::histogram::SECONDS_BUCKETS;

#[test]
fn quantiles_interpolate_inside_their_bucket() {
    let mut h = Histogram::new(&SECONDS_BUCKETS);
    assert_eq!(quantile(&h, 0.5), None);
    // Four in (0.001, 0.0025], none elsewhere.
    for _ in 0..4 {
        h.observe(0.002);
    }
    let p50 = quantile(&h, 0.5).expect("p50");
    assert!((p50 - 0.00175).abs() < 1e-12, "{p50}");
    assert_eq!(quantile(&h, 1.0), Some(0.0025));
    // Past the last bound: the last bound, not infinity.
    h.observe(1000.0);
    assert_eq!(quantile(&h, 1.0), Some(60.0));
}

fn stats(name: &str, by_service: &[(&str, u64, u64, u64)]) -> NameStats {
    NameStats {
        name: SharedStr::from(name),
        by_service: by_service
            .iter()
            .map(|(service, sent, delivered, nacked)| {
                let mut t = Traffic {
                    sent: *sent,
                    delivered: *delivered,
                    nacked: *nacked,
                    ..Traffic::default()
                };
                if *sent > 0 {
                    t.refuse(ErrorCode::RateLimited);
                }
                (SharedStr::from(*service), t)
            })
            .collect(),
        reply_latency: Histogram::new(&SECONDS_BUCKETS),
        outcomes: Vec::new(),
    }
}

#[test]
fn topology_edges_go_from_senders_to_receivers_per_name() {
    let names = [
        stats("todo.create", &[("web", 5, 0, 0), ("todo", 0, 5, 2)]),
        stats("todo.created", &[("todo", 5, 0, 0), ("web", 0, 5, 0)]),
        stats("courier.services.list", &[("cli", 1, 0, 0)]),
    ];
    let t = topology_json(&names, vec!["audit".into()], 7);
    assert_eq!(t["services"], json!(["audit", "todo", "web"]));
    assert_eq!(
        t["edges"],
        json!([
            {"from": "web", "to": "todo", "name": "todo.create", "count": 5, "errors": 3},
            {"from": "todo", "to": "web", "name": "todo.created", "count": 5, "errors": 1},
        ])
    );
}

#[test]
fn a_change_without_arguments_takes_nothing_or_a_json_object() {
    assert!(no_fields(b"").is_ok());
    assert!(no_fields(b" {} ").is_ok());
    for bad in [&b"\x00"[..], b"[]", b"null", b"{"] {
        assert_eq!(
            no_fields(bad).expect_err("refused").status,
            StatusCode::BAD_REQUEST
        );
    }
}

#[test]
fn a_pause_body_names_one_pattern_or_none() {
    assert_eq!(pattern_of(b"").ok(), Some(None));
    assert_eq!(pattern_of(b"{}").ok(), Some(None));
    assert_eq!(
        pattern_of(br#"{"pattern":"todo.*"}"#).ok(),
        Some(Some("todo.*".to_string()))
    );
    for bad in [&b"{"[..], b"[]", br#"{"pattern":3}"#] {
        let refusal = pattern_of(bad).expect_err("refused");
        assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
    }
}
