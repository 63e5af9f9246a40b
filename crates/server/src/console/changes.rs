//! The console's changes (replay, purge, pause, resume): each runs
//! through `with_core`, so its deliveries leave at once and its journal
//! entry is synced before the answer.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use courier_broker::{Broker, DeadLetterFound, DeadLetterQuery, PauseError};
use serde_json::{json, Value};

use crate::{Nanos, Shared, Store};

use super::*;

/// Runs a change on the core through `with_core` (its deliveries leave,
/// its journal entry is synced); a 503 if that sync failed.
pub(crate) fn change<T>(
    shared: &Shared,
    f: impl FnOnce(&mut Broker<Store>, Nanos) -> T,
) -> Result<T, Refusal> {
    let mut outcome = None;
    let mut failures_before = 0;
    shared.with_core(|core, now| {
        failures_before = core.metrics().storage_failures;
        outcome = Some(f(core, now));
    });
    let failed = shared.core().metrics().storage_failures > failures_before;
    match outcome {
        Some(outcome) if !failed => Ok(outcome),
        _ => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker's disk failed while saving this change, so it may not have happened; see the broker's log, and retry once /readyz answers ready",
        )),
    }
}

/// `POST /v1/dead-letters/{service}/{id}/replay`: back into the service's
/// queue, delivered as a fresh message.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{service}/{id}/replay",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
        ("id" = u64, Path, description = "The dead letter's id"),
    ),
    request_body(content = Object, content_type = "application/json", description = "{}"),
    responses(
        (status = 200, description = "Back in the service's queue", body = crate::openapi::Replayed),
        (status = 400, description = "Not a dead letter id, or a body that is not a JSON object", body = crate::openapi::Problem, content_type = "application/problem+json"),
        AdminRefusals,
        (status = 404, description = "No such dead letter", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "It cannot be replayed now", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "A POST must be sent as Content-Type: application/json", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker's disk failed while saving the change", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn replay(
    State(shared): State<Arc<Shared>>,
    Path((service, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let id = match parse_id(&id).and_then(|id| no_fields(&body).map(|()| id)) {
        Ok(id) => id,
        Err(refusal) => return refusal.into_response(),
    };
    let query = DeadLetterQuery::Replay {
        service: service.clone(),
        id,
    };
    if let Some(found) = on_cluster(&shared, query).await {
        return match found {
            Ok(DeadLetterFound::Replayed { .. }) => {
                json_answer(json!({"service": service, "id": id, "replayed": true}))
            }
            Ok(_) => unexpected_answer(&service),
            Err(refusal) => refusal,
        };
    }
    let revived = change(&shared, |core, now| {
        core.find_dead_letter(&service, id)?;
        Some(core.revive(&service, id, now))
    });
    match revived {
        Err(refusal) => refusal.into_response(),
        Ok(None) => no_dead_letter(&service, id),
        Ok(Some(Err(reason))) => refuse(StatusCode::CONFLICT, &reason),
        Ok(Some(Ok(()))) => json_answer(json!({"service": service, "id": id, "replayed": true})),
    }
}

/// `POST /v1/dead-letters/{service}/purge`: deletes all of the service's
/// dead letters.
#[utoipa::path(
    post,
    path = "/v1/dead-letters/{service}/purge",
    tag = "console",
    params(
        ("service" = String, Path, description = "The service's name"),
    ),
    request_body(content = Object, content_type = "application/json", description = "{}"),
    responses(
        (status = 200, description = "All of the service's dead letters deleted", body = crate::openapi::Purged),
        (status = 400, description = "A body that is not a JSON object", body = crate::openapi::Problem, content_type = "application/problem+json"),
        AdminRefusals,
        (status = 404, description = "No such service", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 415, description = "A POST must be sent as Content-Type: application/json", body = crate::openapi::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The broker's disk failed while saving the change", body = crate::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn purge(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(refusal) = no_fields(&body) {
        return refusal.into_response();
    }
    let query = DeadLetterQuery::Purge {
        service: service.clone(),
        id: None,
    };
    if let Some(found) = on_cluster(&shared, query).await {
        return match found {
            Ok(DeadLetterFound::Purged { purged, .. }) => {
                json_answer(json!({"service": service, "purged": purged}))
            }
            Ok(_) => unexpected_answer(&service),
            Err(refusal) => refusal,
        };
    }
    let purged = change(&shared, |core, _| {
        core.dead_letter_count(&service)?;
        Some(core.purge(&service, None))
    });
    match purged {
        Err(refusal) => refusal.into_response(),
        Ok(None) => unknown_service(&service),
        Ok(Some(purged)) => json_answer(json!({"service": service, "purged": purged})),
    }
}

/// `pause` and `resume`: one route each, alike but for the path, the
/// answer's description and which way the change goes.
macro_rules! pause_route {
    ($name:ident, $path:tt, $done:tt, $pause:expr) => {
        #[utoipa::path(
            post,
            path = $path,
            tag = "console",
            params(
                ("service" = String, Path, description = "The service's name"),
            ),
            request_body(content = crate::openapi::PauseChange, content_type = "application/json"),
            responses(
                (status = 200, description = $done, body = crate::openapi::Paused),
                (status = 400, description = "A bad body", body = crate::openapi::Problem, content_type = "application/problem+json"),
                AdminRefusals,
                (status = 404, description = "No such service or subscription", body = crate::openapi::Problem, content_type = "application/problem+json"),
                (status = 415, description = "A POST must be sent as Content-Type: application/json", body = crate::openapi::Problem, content_type = "application/problem+json"),
                (status = 503, description = "The broker's disk failed while saving the change", body = crate::openapi::Problem, content_type = "application/problem+json"),
            ),
        )]
        pub(crate) async fn $name(
            State(shared): State<Arc<Shared>>,
            Path(service): Path<String>,
            body: Bytes,
        ) -> Response {
            pause_or_resume(&shared, &service, &body, $pause)
        }
    };
}

pause_route!(pause, "/v1/subscriptions/{service}/pause", "Paused", true);
pause_route!(
    resume,
    "/v1/subscriptions/{service}/resume",
    "Resumed",
    false
);

/// `POST /v1/subscriptions/{service}/pause|resume` with `{"pattern": P}`,
/// or `{}` for every subscription of the service.
pub(crate) fn pause_or_resume(
    shared: &Shared,
    service: &str,
    body: &[u8],
    pause: bool,
) -> Response {
    let pattern = match pattern_of(body) {
        Ok(pattern) => pattern,
        Err(refusal) => return refusal.into_response(),
    };
    let done = change(shared, |core, now| {
        let changed = if pause {
            core.pause_subscription(service, pattern.as_deref(), now)
        } else {
            core.resume_subscription(service, pattern.as_deref(), now)
        };
        changed.map(|patterns| (patterns, core.paused_patterns(service)))
    });
    match done {
        Err(refusal) => refusal.into_response(),
        Ok(Ok((patterns, paused))) => json_answer(json!({
            "service": service,
            "patterns": patterns,
            "paused": paused,
        })),
        Ok(Err(e @ PauseError::StorageFailing)) => {
            refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Ok(Err(e)) => refuse(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

/// The body of a change that takes no arguments: empty, or a JSON object.
pub(crate) fn no_fields(body: &[u8]) -> Result<(), Refusal> {
    if body.is_empty() {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(_)) => Ok(()),
        _ => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "the body must be empty or a JSON object, {} (this change takes no arguments)",
        )),
    }
}

/// The optional `pattern` of a pause or resume body.
pub(crate) fn pattern_of(body: &[u8]) -> Result<Option<String>, Refusal> {
    let bad = |detail: String| Refusal::new(StatusCode::BAD_REQUEST, detail);
    if body.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "the body is not JSON ({e}); send {{\"pattern\": \"todo.*\"}}, or {{}} for all of the service's subscriptions"
        ))
    })?;
    let Value::Object(fields) = value else {
        return Err(bad(
            "the body is a JSON object: {\"pattern\": \"todo.*\"}, or {} for all of the service's subscriptions".to_string(),
        ));
    };
    match fields.get("pattern") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(p)) => Ok(Some(p.clone())),
        Some(other) => Err(bad(format!(
            "\"pattern\" is a string such as \"todo.*\", not {other}"
        ))),
    }
}
