//! A service's durable pull consumers on `COURIER_MSGS`
//! (docs/SCALE-OUT.md §4): their names, their filters from the service's
//! patterns, their settings, and creating or updating them.

use std::time::Duration;

use async_nats::jetstream::{
    consumer::{pull, AckPolicy, Consumer, DeliverPolicy},
    stream::{ConsumerError, Stream},
};

use courier_proto::StartFrom;

use crate::names::service_token;

/// Above the sum of all instances' `max_in_flight`: JetStream stops
/// delivering silently at this limit (`--nats-max-ack-pending`).
pub const MAX_ACK_PENDING_DEFAULT: i64 = 65_536;

/// Which of a service's two consumers (§5: keyed messages go through a
/// lane of their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Unkeyed,
    Keyed,
}

/// `svc-<service token>` or `svc-<service token>-keyed`.
pub fn consumer_name(service: &str, lane: Lane) -> String {
    match lane {
        Lane::Unkeyed => format!("svc-{}", service_token(service)),
        Lane::Keyed => format!("svc-{}-keyed", service_token(service)),
    }
}

/// Whether every name `narrow` matches, `wide` matches too (patterns of
/// PROTOCOL.md §8.2).
pub fn covers(wide: &str, narrow: &str) -> bool {
    let mut w = wide.split('.');
    let mut n = narrow.split('.');
    loop {
        match (w.next(), n.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The patterns a consumer filters on: those no other pattern of the
/// service covers, sorted, without repeats. JetStream refuses a consumer
/// whose filters include one covering another (`consumer subject filters
/// cannot overlap`, error 10138, on 2.15.1), while two that only overlap
/// (`a.*.c`, `a.b.*`) are accepted and a message matching both is
/// delivered once — checked in `tests/cluster_consumers.rs`.
pub fn effective_patterns<S: AsRef<str>>(patterns: &[S]) -> Vec<String> {
    let mut set: Vec<String> = patterns.iter().map(|p| p.as_ref().to_string()).collect();
    set.sort();
    set.dedup();
    let kept: Vec<String> = set
        .iter()
        .filter(|p| !set.iter().any(|q| q != *p && covers(q, p)))
        .cloned()
        .collect();
    kept
}

/// The consumer's `filter_subjects` for the service's patterns: per
/// effective pattern P, `courier.m.c.P` and `courier.m.e.P` (keyed lane:
/// `ck`, `ek`), and the service's replayed dead letters. Empty without
/// patterns (then the service has no consumer).
pub fn filter_subjects<S: AsRef<str>>(service: &str, patterns: &[S], lane: Lane) -> Vec<String> {
    if patterns.is_empty() {
        return Vec::new();
    }
    let (command, event) = match lane {
        Lane::Unkeyed => ("c", "e"),
        Lane::Keyed => ("ck", "ek"),
    };
    let mut filters = Vec::new();
    for pattern in effective_patterns(patterns) {
        filters.push(format!("courier.m.{command}.{pattern}"));
        filters.push(format!("courier.m.{event}.{pattern}"));
    }
    if lane == Lane::Unkeyed {
        filters.push(format!("courier.m.r.{}.>", service_token(service)));
    }
    filters
}

/// A service consumer's settings (§4's table).
pub fn consumer_config<S: AsRef<str>>(
    service: &str,
    patterns: &[S],
    lane: Lane,
    ack_wait: Duration,
    max_ack_pending: i64,
    replicas: usize,
) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(service, lane)),
        filter_subjects: filter_subjects(service, patterns, lane),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        // Courier counts attempts itself, to dead-letter durably (§7).
        max_deliver: -1,
        max_ack_pending,
        deliver_policy: DeliverPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The consumer that replays `pattern`'s retained events to `service`
/// (§4 "History replay"): `svc-<service token>-replay-<16 hex digits of
/// the pattern's FNV-1a hash>` (a consumer name takes no `.`, `*`, `>`).
pub fn replay_consumer_name(service: &str, pattern: &str) -> String {
    format!(
        "svc-{}-replay-{:016x}",
        service_token(service),
        pattern_hash(pattern)
    )
}

/// FNV-1a, 64 bits: stable across builds and machines, as a consumer's
/// name must be.
fn pattern_hash(pattern: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in pattern.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The consumer a pattern paused alone waits in (§4 "Pausing"):
/// `svc-<service token>-held-<hash>`, hashed as [`replay_consumer_name`].
pub fn held_consumer_name(service: &str, pattern: &str) -> String {
    format!(
        "svc-{}-held-{:016x}",
        service_token(service),
        pattern_hash(pattern)
    )
}

/// The held consumer's settings: the pattern's commands and events,
/// keyed or not, from `start_seq`; the rest as a service consumer's.
pub fn held_config(
    service: &str,
    pattern: &str,
    start_seq: u64,
    ack_wait: Duration,
    max_ack_pending: i64,
    replicas: usize,
) -> pull::Config {
    pull::Config {
        durable_name: Some(held_consumer_name(service, pattern)),
        filter_subjects: ["c", "e", "ck", "ek"]
            .iter()
            .map(|kind| format!("courier.m.{kind}.{pattern}"))
            .collect(),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending,
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: start_seq.max(1),
        },
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The replay consumer's settings: the pattern's events only, keyed or
/// not (commands are never replayed), from the beginning or `history`'s
/// time; the rest as a service consumer's. `Err` for `StartFrom::New`,
/// which replays nothing.
pub fn replay_config(
    service: &str,
    pattern: &str,
    history: StartFrom,
    ack_wait: Duration,
    max_ack_pending: i64,
    replicas: usize,
) -> Result<pull::Config, String> {
    let deliver_policy = match history {
        StartFrom::New => return Err("a subscription from new messages replays nothing".into()),
        StartFrom::Beginning => DeliverPolicy::All,
        StartFrom::Time(unix_ns) => DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::from_nanos(i128::from(unix_ns))
                .map_err(|e| format!("start time {unix_ns}: {e}"))?,
        },
    };
    Ok(pull::Config {
        durable_name: Some(replay_consumer_name(service, pattern)),
        filter_subjects: vec![
            format!("courier.m.e.{pattern}"),
            format!("courier.m.ek.{pattern}"),
        ],
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending,
        deliver_policy,
        num_replicas: replicas,
        ..Default::default()
    })
}

/// Creates the consumer, or updates its filters and settings when it
/// exists (JetStream keeps its position and its unacknowledged messages).
pub async fn ensure_consumer(
    messages: &Stream,
    config: pull::Config,
) -> Result<Consumer<pull::Config>, ConsumerError> {
    messages.create_consumer(config).await
}

/// A service's messages cluster-wide over both its consumers: not yet
/// delivered (`backlog`) and delivered but not acknowledged
/// (`in_flight`). A lane without a consumer (the service has no keyed
/// message, say) counts nothing.
pub async fn service_pending(
    js: &async_nats::jetstream::Context,
    service: &str,
) -> Result<ServicePending, String> {
    let messages = js
        .get_stream_no_info(crate::names::MESSAGES_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let mut pending = ServicePending::default();
    for lane in [Lane::Unkeyed, Lane::Keyed] {
        let name = consumer_name(service, lane);
        match messages.consumer_info(&name).await {
            Ok(info) => {
                pending.backlog += info.num_pending;
                pending.in_flight += info.num_ack_pending as u64;
                pending
                    .ack_pending
                    .push((name, info.num_ack_pending as u64));
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(format!("consumer {name}: {e}")),
        }
    }
    Ok(pending)
}

/// What a consumer holds delivered and unacknowledged, and its
/// `ack_wait`; `None` when it does not exist (nothing was fetched from
/// it). An error is an unanswered question, not a "none": a server or a
/// leader missing for a moment says nothing about what was delivered.
pub async fn unacknowledged(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<Option<(u32, std::time::Duration)>, String> {
    let messages = js
        .get_stream_no_info(crate::names::MESSAGES_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    match messages.consumer_info(name).await {
        Ok(info) => Ok(Some((
            u32::try_from(info.num_ack_pending).unwrap_or(u32::MAX),
            info.config.ack_wait,
        ))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(format!("consumer {name}: {e}")),
    }
}

pub(crate) fn is_not_found(e: &async_nats::jetstream::context::ConsumerInfoError) -> bool {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    match e.kind() {
        ConsumerInfoErrorKind::NotFound => true,
        ConsumerInfoErrorKind::JetStream(e) => {
            e.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND
        }
        _ => false,
    }
}

/// See [`service_pending`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePending {
    pub backlog: u64,
    pub in_flight: u64,
    /// Each existing consumer's `num_ack_pending`, by consumer name:
    /// JetStream stops delivering from one at its `max_ack_pending`.
    pub ack_pending: Vec<(String, u64)>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    #[test]
    fn covering_follows_the_pattern_rules() {
        assert!(covers("a.>", "a.b.c"));
        assert!(covers("a.>", "a.*"));
        assert!(covers("a.*", "a.b"));
        assert!(!covers("a.*", "a.>"));
        assert!(!covers("a.b", "a.*"));
        assert!(covers(">", "x"));
        assert!(!covers("a.*.c", "a.b.*") && !covers("a.b.*", "a.*.c"));
    }

    #[test]
    fn covered_patterns_go_overlapping_ones_stay() {
        assert_eq!(
            effective_patterns(&["todo.*", "todo.>", "audit.*.c", "audit.b.*", "x.y", "x.y"]),
            ["audit.*.c", "audit.b.*", "todo.>", "x.y"]
        );
        assert_eq!(effective_patterns(&[">", "a.*"]), [">"]);
        assert_eq!(effective_patterns(&["a.b", "a.c"]), ["a.b", "a.c"]);
        // Whatever is dropped, something kept covers it.
        let patterns = ["p.q.r", "p.*.r", "p.q.*", "s", "p.>", "m.*.o"];
        let kept = effective_patterns(&patterns);
        assert_eq!(kept, ["m.*.o", "p.>", "s"]);
        for p in patterns {
            assert!(kept.iter().any(|k| covers(k, p)), "{p} lost");
        }
    }

    #[test]
    fn filters_and_names_use_the_service_token() {
        assert_eq!(consumer_name("billing.eu", Lane::Unkeyed), "svc-billing~eu");
        assert_eq!(consumer_name("todo", Lane::Keyed), "svc-todo-keyed");
        assert_eq!(
            filter_subjects("billing.eu", &["inv.*"], Lane::Unkeyed),
            [
                "courier.m.c.inv.*",
                "courier.m.e.inv.*",
                "courier.m.r.billing~eu.>"
            ]
        );
        assert_eq!(
            filter_subjects("todo", &["todo.*"], Lane::Keyed),
            ["courier.m.ck.todo.*", "courier.m.ek.todo.*"]
        );
        assert!(filter_subjects::<&str>("todo", &[], Lane::Unkeyed).is_empty());
    }
}
