//! The console's reads: services, names, topology and dead letters. Each
//! holds the core's lock only to copy state out, and builds its JSON after.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use courier_broker::stats::{NameStats, Traffic};
use courier_broker::{
    dead_letter_json, DeadLetterFound, DeadLetterQuery, InstanceInfo, SubscriptionGauges,
    SYSTEM_PREFIX,
};
use courier_proto::ErrorCode;
use courier_store::histogram::Histogram;
use serde_json::{json, Value};

use crate::http::seconds;
use crate::{wall_nanos, ConnId, FastMap, Nanos, Shared};

use super::*;

/// `GET /v1/services`: every service the broker knows (subscribed or
/// connected), its subscriptions and whether each is paused, its queue,
/// and its connected instances.
#[utoipa::path(
    get,
    path = "/v1/services",
    tag = "console",
    responses(
        (status = 200, description = "Every service the broker knows, its subscriptions, queue and instances", body = crate::openapi::ServicesListing),
        AdminRefusals,
    ),
)]
pub(crate) async fn services(State(shared): State<Arc<Shared>>) -> Response {
    let now = wall_nanos();
    // On a cluster: every node's instances, each naming its node.
    if let Some(edge) = &shared.cluster {
        let gauges = shared.core().subscription_gauges(now);
        let mut page = services_json(&gauges, &[], &FastMap::default(), now);
        let node = edge.node.node.as_str();
        let here = crate::cluster_edge::views::local_instances(&shared, node);
        crate::cluster_edge::views::add_instances(&mut page, here);
        return json_answer(
            crate::cluster_edge::views::services_everywhere(&edge.node, page).await,
        );
    }
    let (gauges, instances) = {
        let mut core = shared.core();
        (core.subscription_gauges(now), core.instances())
    };
    let peers: FastMap<ConnId, Peer> = shared
        .peers()
        .iter()
        .map(|(conn, peer)| (*conn, *peer))
        .collect();
    json_answer(services_json(&gauges, &instances, &peers, now))
}

pub(crate) fn services_json(
    gauges: &[SubscriptionGauges],
    instances: &[InstanceInfo],
    peers: &FastMap<ConnId, Peer>,
    now: Nanos,
) -> Value {
    let services: Vec<Value> = gauges
        .iter()
        .map(|g| {
            let patterns: Vec<Value> = g
                .patterns
                .iter()
                .map(|p| json!({"pattern": p, "paused": g.paused.contains(p)}))
                .collect();
            let instances: Vec<Value> = instances
                .iter()
                .filter(|i| i.service == g.service)
                .map(|i| instance_json(i, peers.get(&i.conn)))
                .collect();
            json!({
                "name": g.service,
                "patterns": patterns,
                "paused": g.paused,
                "instances": instances,
                "backlog": g.backlog,
                "backlog_bytes": g.backlog_bytes,
                "in_flight": g.in_flight,
                "dead_letters": g.dead_letters,
                "oldest_unacked_seconds": g.oldest_unacked_age.map(seconds),
                "consumers": g.consumers,
                "consumers_paused": g.consumers_paused,
            })
        })
        .collect();
    json!({ "at": now, "services": services })
}

pub(crate) fn instance_json(i: &InstanceInfo, peer: Option<&Peer>) -> Value {
    json!({
        "instance": i.instance,
        "connection": i.conn,
        "peer": peer.map(|p| p.addr.to_string()),
        "connected_at": peer.map(|p| p.connected_at),
        "in_flight": i.in_flight,
        "max_in_flight": i.max_in_flight,
        "consumes": i.patterns,
        "draining": i.draining,
        "backpressure": i.paused,
    })
}

/// What `/v1/names` and `/v1/topology` read: the traffic counters.
pub(crate) fn traffic_copy(shared: &Shared) -> (Vec<NameStats>, usize, u64) {
    let core = shared.core();
    let traffic = core.traffic();
    (
        traffic.names().to_vec(),
        traffic.names_max(),
        traffic.names_over_cap,
    )
}

/// `GET /v1/names`: per message name its counters (since the broker
/// started), reply-latency percentiles and outcomes. Rates are the page's
/// to derive, by diffing two answers over their `at`.
#[utoipa::path(
    get,
    path = "/v1/names",
    tag = "console",
    responses(
        (status = 200, description = "Per message name: counters, reply latency, outcomes", body = crate::openapi::NamesListing),
        AdminRefusals,
    ),
)]
pub(crate) async fn names(State(shared): State<Arc<Shared>>) -> Response {
    let now = wall_nanos();
    let (names, names_max, over_cap, partial) = traffic_everywhere(&shared).await;
    let names: Vec<Value> = names.iter().map(name_json).collect();
    let mut page = json!({
        "at": now,
        "names": names,
        "names_max": names_max,
        "names_over_cap": over_cap,
    });
    if !partial.is_empty() {
        page["partial"] = json!(partial);
    }
    json_answer(page)
}

/// This node's traffic counters ([`traffic_copy`]) and, on a cluster,
/// every other node's added, with the nodes that gave none.
async fn traffic_everywhere(shared: &Shared) -> (Vec<NameStats>, usize, u64, Vec<String>) {
    let (names, names_max, over_cap) = traffic_copy(shared);
    match &shared.cluster {
        Some(edge) => {
            let (names, over_cap, partial) =
                crate::cluster_edge::names::names_everywhere(&edge.node, names, over_cap).await;
            (names, names_max, over_cap, partial)
        }
        None => (names, names_max, over_cap, Vec::new()),
    }
}

pub(crate) fn refused_total(t: &Traffic) -> u64 {
    t.refused.iter().map(|(_, n)| n).sum()
}

pub(crate) fn counters_json(t: &Traffic) -> Value {
    json!({
        "sent": t.sent,
        "delivered": t.delivered,
        "acked": t.acked,
        "nacked": t.nacked,
        "redelivered": t.redelivered,
        "expired": t.expired,
        "dead_lettered": t.dead_lettered,
        "refused": refused_total(t),
    })
}

pub(crate) fn name_json(n: &NameStats) -> Value {
    let mut total = Traffic::default();
    let mut services = Vec::with_capacity(n.by_service.len());
    for (service, t) in &n.by_service {
        total.add(t);
        let mut counters = counters_json(t);
        counters["service"] = json!(service.as_str());
        counters["refused_by_reason"] = Value::Object(
            t.refused
                .iter()
                .map(|(code, n)| (code.as_str().to_string(), json!(n)))
                .collect(),
        );
        services.push(counters);
    }
    let latency = (n.reply_latency.count > 0).then(|| latency_json(&n.reply_latency));
    let outcomes: Vec<Value> = n
        .outcomes
        .iter()
        .map(|(outcome, count)| json!({"outcome": outcome.as_str(), "count": count}))
        .collect();
    json!({
        "name": n.name.as_str(),
        "totals": counters_json(&total),
        "services": services,
        "reply_latency": latency,
        "outcomes": outcomes,
    })
}

pub(crate) fn latency_json(h: &Histogram) -> Value {
    let buckets: Vec<Value> = h
        .cumulative()
        .into_iter()
        .map(|(le, n)| {
            json!([
                if le.is_finite() {
                    json!(le)
                } else {
                    json!("+Inf")
                },
                n
            ])
        })
        .collect();
    json!({
        "count": h.count,
        "sum_seconds": h.sum,
        "p50": quantile(h, 0.5),
        "p90": quantile(h, 0.9),
        "p99": quantile(h, 0.99),
        "buckets": buckets,
    })
}

/// The `q` quantile in seconds, interpolated linearly inside its bucket as
/// Prometheus's `histogram_quantile` does; past the last bound, that bound.
pub(crate) fn quantile(h: &Histogram, q: f64) -> Option<f64> {
    if h.count == 0 {
        return None;
    }
    let rank = q * h.count as f64;
    let mut below_bound = 0.0;
    let mut below_count = 0u64;
    for (le, cumulative) in h.cumulative() {
        if cumulative as f64 >= rank && cumulative > below_count {
            if !le.is_finite() {
                return Some(below_bound);
            }
            let share = (rank - below_count as f64) / (cumulative - below_count) as f64;
            return Some(below_bound + (le - below_bound) * share.clamp(0.0, 1.0));
        }
        if le.is_finite() {
            below_bound = le;
        }
        below_count = cumulative;
    }
    Some(below_bound)
}

/// `GET /v1/topology`: who talks to whom, as observed. For each message
/// name, an edge from every service that sent it to every service it was
/// delivered to; `count` is what the sender sent of it (each message goes
/// to every receiving service once), `errors` the receiver's nacks and
/// dead letters of it plus the sender's refused sends of it.
#[utoipa::path(
    get,
    path = "/v1/topology",
    tag = "console",
    responses(
        (status = 200, description = "Who sent what to whom", body = crate::openapi::Topology),
        AdminRefusals,
    ),
)]
pub(crate) async fn topology(State(shared): State<Arc<Shared>>) -> Response {
    let now = wall_nanos();
    let (names, _, _, partial) = traffic_everywhere(&shared).await;
    let known: Vec<String> = shared
        .core()
        .services()
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mut page = topology_json(&names, known, now);
    if !partial.is_empty() {
        page["partial"] = json!(partial);
    }
    json_answer(page)
}

pub(crate) fn topology_json(names: &[NameStats], mut services: Vec<String>, now: Nanos) -> Value {
    let mut edges = Vec::new();
    for n in names.iter().filter(|n| !n.name.starts_with(SYSTEM_PREFIX)) {
        let receivers: Vec<(&str, &Traffic)> = n
            .by_service
            .iter()
            .filter(|(_, t)| t.delivered > 0)
            .map(|(s, t)| (s.as_str(), t))
            .collect();
        for (sender, sent) in n.by_service.iter().filter(|(_, t)| t.sent > 0) {
            for (receiver, got) in &receivers {
                edges.push(json!({
                    "from": sender.as_str(),
                    "to": receiver,
                    "name": n.name.as_str(),
                    "count": sent.sent,
                    "errors": got.nacked + got.dead_lettered + refused_total(sent),
                }));
                for s in [sender.as_str(), receiver] {
                    if !services.iter().any(|known| known == s) {
                        services.push(s.to_string());
                    }
                }
            }
        }
    }
    services.sort();
    json!({ "at": now, "services": services, "edges": edges })
}

/// `GET /v1/dead-letters/{service}`: a page of dead letters by id (at
/// most `DEAD_LETTERS_LISTED_MAX`, `?after=ID&limit=N`) and how many there
/// are. The core's lock is held for the page only: it reads each listed
/// message from the log.
#[utoipa::path(
    get,
    path = "/v1/dead-letters/{service}",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
        ("after" = Option<u64>, Query, description = "Only dead letters whose id is larger (default 0); the previous page's rest_after"),
        ("limit" = Option<u32>, Query, description = "At most this many (default and most 500)", minimum = 1, maximum = 500),
    ),
    responses(
        (status = 200, description = "A page of dead letters by id, how many there are, and where the next page starts", body = crate::openapi::DeadLetters),
        (status = 400, description = "after or limit is not a number in range", body = crate::openapi::Problem, content_type = "application/problem+json"),
        AdminRefusals,
        (status = 404, description = "No such service", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn dead_letters(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let after =
        match query.get("after").map(|a| a.parse::<u64>()) {
            None => 0,
            // Ids are seqs, which stay within the document's int64.
            Some(Ok(after)) if after <= i64::MAX as u64 => after,
            Some(_) => return problem(
                StatusCode::BAD_REQUEST,
                "after must be a dead letter id (a whole number); the previous page's rest_after",
            ),
        };
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => DEAD_LETTERS_LISTED_MAX,
        Some(Ok(limit)) if (1..=DEAD_LETTERS_LISTED_MAX).contains(&limit) => limit,
        Some(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("limit must be a whole number from 1 to {DEAD_LETTERS_LISTED_MAX}"),
            )
        }
    };
    if shared.cluster.is_some() {
        return match cluster_page(&shared, &service, after, limit).await {
            Ok(page) => json_answer(page),
            Err(refusal) => refusal,
        };
    }
    let (total, page) = {
        let mut core = shared.core();
        let Some(total) = core.dead_letter_count(&service) else {
            return unknown_service(&service);
        };
        (total, core.dead_letters_page(&service, after, limit))
    };
    let rest_after = page.rest_after();
    let letters: Vec<Value> = page
        .letters
        .iter()
        .map(|(d, m)| dead_letter_json(d, m.as_ref(), false))
        .collect();
    json_answer(dead_letters_json(&service, total, &letters, rest_after))
}

fn dead_letters_json(
    service: &str,
    total: usize,
    letters: &[Value],
    rest_after: Option<u64>,
) -> Value {
    json!({
        "service": service,
        "total": total,
        "listed_max": DEAD_LETTERS_LISTED_MAX,
        "dead_letters": letters,
        "rest_after": rest_after,
    })
}

/// A page of the service's dead letters on a cluster, from
/// `COURIER_DEAD`; past the first page, a second look counts them all.
async fn cluster_page(
    shared: &Shared,
    service: &str,
    after: u64,
    limit: usize,
) -> Result<Value, Response> {
    let list = async |after, limit| {
        let query = DeadLetterQuery::List {
            service: service.to_string(),
            after,
            limit,
        };
        match on_cluster(shared, query).await {
            Some(Ok(DeadLetterFound::Listing { page, .. })) => Ok(page),
            Some(Err(refusal)) => Err(refusal),
            _ => Err(unexpected_answer(service)),
        }
    };
    let page = list(after, limit).await?;
    let total = if after == 0 {
        page.total_after
    } else {
        list(0, 1).await?.total_after
    };
    let letters: Vec<Value> = page
        .letters
        .iter()
        .map(|(d, m)| dead_letter_json(d, m.as_ref(), false))
        .collect();
    Ok(dead_letters_json(
        service,
        total,
        &letters,
        page.rest_after(),
    ))
}

/// On a cluster: `query` carried out on the cluster's dead letters
/// (`COURIER_DEAD`), or the answer that refuses it (an unknown service,
/// no such dead letter, a cluster that did not answer); `None` on one
/// broker, whose core has them.
pub(crate) async fn on_cluster(
    shared: &Shared,
    query: DeadLetterQuery,
) -> Option<Result<DeadLetterFound, Response>> {
    shared.cluster.as_ref()?;
    let (service, id) = match &query {
        DeadLetterQuery::List { service, .. } | DeadLetterQuery::Purge { service, .. } => {
            (service.clone(), None)
        }
        DeadLetterQuery::Show { service, id } | DeadLetterQuery::Replay { service, id } => {
            (service.clone(), Some(*id))
        }
    };
    if shared.core().dead_letter_count(&service).is_none() {
        return Some(Err(unknown_service(&service)));
    }
    Some(
        crate::cluster_dead_letters::for_console(shared, query)
            .await?
            .map_err(|(code, reason)| match (code, id) {
                (ErrorCode::InvalidMessage, Some(id)) => no_dead_letter(&service, id),
                _ => refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("the cluster did not answer for the dead letters of {service} ({reason}); retry once /readyz answers ready"),
                ),
            }),
    )
}

/// The cluster answered a dead-letter query with the wrong kind of
/// answer: never, but not a panic.
pub(crate) fn unexpected_answer(service: &str) -> Response {
    refuse(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("the cluster answered for the dead letters of {service} with something else; see the broker's log"),
    )
}

/// `GET /v1/dead-letters/{service}/{id}`: one, with its whole envelope
/// and payload.
#[utoipa::path(
    get,
    path = "/v1/dead-letters/{service}/{id}",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
        ("id" = u64, Path, description = "The dead letter's id"),
    ),
    responses(
        (status = 200, description = "One dead letter with its envelope and payload", body = crate::openapi::DeadLetter),
        (status = 400, description = "Not a dead letter id", body = crate::openapi::Problem, content_type = "application/problem+json"),
        AdminRefusals,
        (status = 404, description = "No such dead letter", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn dead_letter(
    State(shared): State<Arc<Shared>>,
    Path((service, id)): Path<(String, String)>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(refusal) => return refusal.into_response(),
    };
    let query = DeadLetterQuery::Show {
        service: service.clone(),
        id,
    };
    if let Some(found) = on_cluster(&shared, query).await {
        return match found {
            Ok(DeadLetterFound::Letter(d, m)) => {
                json_answer(dead_letter_json(&d, m.as_ref(), true))
            }
            Ok(_) => unexpected_answer(&service),
            Err(refusal) => refusal,
        };
    }
    let found = shared.core().find_dead_letter(&service, id);
    match found {
        Some((d, m)) => json_answer(dead_letter_json(&d, m.as_ref(), true)),
        None => no_dead_letter(&service, id),
    }
}

pub(crate) fn parse_id(id: &str) -> Result<u64, Refusal> {
    id.parse().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a dead letter id; ids are the numbers /v1/dead-letters/SERVICE lists"),
        )
    })
}

pub(crate) fn unknown_service(service: &str) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        &format!("the broker knows no service {service}; /v1/services lists those it knows"),
    )
}

pub(crate) fn no_dead_letter(service: &str, id: u64) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        &format!(
            "service {service} has no dead letter {id}; /v1/dead-letters/{service} lists them"
        ),
    )
}
