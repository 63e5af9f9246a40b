//! Policies' snapshots in the Prometheus text format.

use super::*;

/// Policies' snapshots in the Prometheus text format, for a service's
/// `/metrics`: breaker state (one series per state, 1 for the current),
/// calls by outcome, rejections by reason, retries, timeouts, fallbacks,
/// breaker openings and outstanding calls, each labelled with the policy;
/// and for calls spread over a service's endpoints, each endpoint's
/// breaker state, openings and rejections labelled with the policy and the
/// endpoint (at most [`ENDPOINT_SERIES_MAX`] endpoints per policy, open
/// ones first), with the number of endpoints in each state.
pub fn prometheus_text(snapshots: &[PolicySnapshot]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, samples: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
    let label = |s: &PolicySnapshot| format!("policy=\"{}\"", escape(&s.policy));
    family(
        "courier_call_breaker_state",
        "gauge",
        "1 for the circuit breaker's current state",
        &mut snapshots.iter().flat_map(|s| {
            let current = s.breaker;
            let policy = label(s);
            current.into_iter().flat_map(move |current| {
                let policy = policy.clone();
                [
                    BreakerState::Closed,
                    BreakerState::Open,
                    BreakerState::HalfOpen,
                ]
                .into_iter()
                .map(move |state| {
                    (
                        format!("{policy},state=\"{}\"", state.as_str()),
                        u64::from(state == current),
                    )
                })
            })
        }),
    );
    family(
        "courier_call_breaker_opened_total",
        "counter",
        "Times the circuit breaker opened",
        &mut snapshots
            .iter()
            .filter(|s| s.breaker.is_some())
            .map(|s| (label(s), s.breaker_opened)),
    );
    family(
        "courier_call_calls_total",
        "counter",
        "Calls made, by outcome",
        &mut snapshots.iter().flat_map(|s| {
            [("succeeded", s.succeeded), ("failed", s.failed)]
                .map(|(outcome, n)| (format!("{},outcome=\"{outcome}\"", label(s)), n))
        }),
    );
    family(
        "courier_call_rejections_total",
        "counter",
        "Calls refused at once, by reason",
        &mut snapshots.iter().flat_map(|s| {
            [
                ("breaker_open", s.rejected_open),
                ("bulkhead_full", s.rejected_full),
            ]
            .map(|(reason, n)| (format!("{},reason=\"{reason}\"", label(s)), n))
        }),
    );
    family(
        "courier_call_retries_total",
        "counter",
        "Attempts after a first one",
        &mut snapshots.iter().map(|s| (label(s), s.retried)),
    );
    family(
        "courier_call_timeouts_total",
        "counter",
        "Attempts that ran out of time",
        &mut snapshots.iter().map(|s| (label(s), s.timed_out)),
    );
    family(
        "courier_call_fallbacks_total",
        "counter",
        "Failed calls answered by a fallback",
        &mut snapshots.iter().map(|s| (label(s), s.fallbacks)),
    );
    family(
        "courier_call_outstanding",
        "gauge",
        "Calls under way",
        &mut snapshots.iter().map(|s| (label(s), s.outstanding)),
    );
    let spread = || snapshots.iter().filter(|s| s.breaker.is_some());
    family(
        "courier_call_endpoint_breakers",
        "gauge",
        "Endpoints whose circuit breaker is in each state",
        &mut spread().flat_map(|s| {
            let counts = s.endpoint_states;
            [
                (BreakerState::Closed, counts.closed),
                (BreakerState::Open, counts.open),
                (BreakerState::HalfOpen, counts.half_open),
            ]
            .map(|(state, n)| (format!("{},state=\"{}\"", label(s), state.as_str()), n))
        }),
    );
    let endpoint_label = |s: &PolicySnapshot, e: &EndpointBreaker| {
        format!("{},endpoint=\"{}\"", label(s), escape(&e.endpoint))
    };
    family(
        "courier_call_endpoint_breaker_state",
        "gauge",
        "1 for an endpoint's circuit breaker's current state",
        &mut spread().flat_map(|s| {
            s.endpoints.iter().flat_map(move |e| {
                let endpoint = endpoint_label(s, e);
                [
                    BreakerState::Closed,
                    BreakerState::Open,
                    BreakerState::HalfOpen,
                ]
                .map(|state| {
                    (
                        format!("{endpoint},state=\"{}\"", state.as_str()),
                        u64::from(state == e.state),
                    )
                })
            })
        }),
    );
    family(
        "courier_call_endpoint_breaker_opened_total",
        "counter",
        "Times an endpoint's circuit breaker opened",
        &mut spread().flat_map(|s| {
            s.endpoints
                .iter()
                .map(move |e| (endpoint_label(s, e), e.opened))
        }),
    );
    family(
        "courier_call_endpoint_rejections_total",
        "counter",
        "Calls an endpoint's open circuit breaker turned away (to another endpoint, or refused)",
        &mut spread().flat_map(|s| {
            s.endpoints
                .iter()
                .map(move |e| (endpoint_label(s, e), e.rejected))
        }),
    );
    out
}

pub(crate) fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
