//! What a message sent over HTTP carries in its headers, and how the
//! broker's refusals read as HTTP answers.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::Response;
use courier_client::{Error as ClientError, ErrorCode, MessageBuilder};
use uuid::Uuid;

use super::insert;
use crate::http::problem;

/// The envelope headers of a message: one list for both operations.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // described; read from the HeaderMap by `envelope`
pub(crate) struct EnvelopeHeaders {
    /// Partition key: messages with the same key are delivered in order.
    #[param(
        nullable = false,
        rename = "Courier-Key",
        pattern = r"^[\x20-\x7e]*$",
        max_length = 255
    )]
    courier_key: Option<String>,
    /// The message's id (a UUID); a retry with the same id is deduplicated.
    #[param(nullable = false, rename = "Courier-Id", format = "uuid")]
    courier_id: Option<String>,
    /// Time to live, such as 30s or 1500ms (the document asks for 1s or
    /// more: a shorter one may run out before the broker has the message).
    #[param(
        nullable = false,
        rename = "Courier-TTL",
        pattern = r"^([1-9][0-9]{0,5}(s|m)|[1-9][0-9]{3,5}(ms)?)$"
    )]
    courier_ttl: Option<String>,
    /// Deliver no sooner than this, such as 5s.
    #[param(
        nullable = false,
        rename = "Courier-Delay",
        pattern = r"^[0-9]{1,6}(ms|s|m)?$"
    )]
    courier_delay: Option<String>,
    /// The payload's schema version, MAJOR.MINOR.
    #[param(
        nullable = false,
        rename = "Courier-Version",
        pattern = r"^[0-9]{1,4}(\.[0-9]{1,4})?$"
    )]
    courier_version: Option<String>,
    /// true: at most once, memory only.
    #[param(nullable = false, rename = "Courier-Transient")]
    courier_transient: Option<bool>,
}

/// The refusals every send over HTTP may meet alike (a message, a
/// request, a reply), described once for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // described; answered by `refusal` and `Gateway::client`
pub(crate) enum SendRefusals {
    #[response(
        status = 401,
        description = "No token, or one the manifest does not list",
        content_type = "application/problem+json"
    )]
    Unauthorized(crate::openapi::Problem),
    #[response(
        status = 403,
        description = "Not allowed: by the manifest, an admin token, or a non-loopback caller without a manifest",
        content_type = "application/problem+json",
        headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))
    )]
    Forbidden(crate::openapi::Problem),
    #[response(
        status = 413,
        description = "The payload is over the broker's limit",
        content_type = "application/problem+json",
        headers(("Courier-Error" = String, description = "payload_too_large"))
    )]
    PayloadTooLarge(crate::openapi::Problem),
    #[response(
        status = 502,
        description = "Another refusal by the broker",
        content_type = "application/problem+json",
        headers(("Courier-Error" = String, description = "The broker's error code"))
    )]
    BadGateway(crate::openapi::Problem),
    #[response(
        status = 503,
        description = "The broker cannot take it now (disk failing, shutting down, connection lost)",
        content_type = "application/problem+json",
        headers(("Courier-Error" = String, description = "The broker's error code, when it refused"))
    )]
    Unavailable(crate::openapi::Problem),
}

/// The envelope options of a message from its HTTP headers.
pub(super) fn envelope(
    mut builder: MessageBuilder,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<MessageBuilder, Box<Response>> {
    let text = |name: &str| -> Result<Option<&str>, Box<Response>> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v.to_str().map(Some).map_err(|_| {
                Box::new(problem(
                    StatusCode::BAD_REQUEST,
                    &format!("header {name} must be visible ASCII"),
                ))
            }),
        }
    };
    let bad = |detail: String| Box::new(problem(StatusCode::BAD_REQUEST, &detail));
    if let Some(content_type) = text("content-type")? {
        builder = builder.header("content-type", content_type);
    }
    if let Some(key) = text("courier-key")? {
        builder = builder.key(key.as_bytes().to_vec());
    }
    if let Some(id) = text("courier-id")? {
        let id = Uuid::parse_str(id).map_err(|_| {
            bad(format!(
                "Courier-Id must be a UUID, such as {}",
                Uuid::now_v7()
            ))
        })?;
        builder = builder.id(id);
    }
    if let Some(ttl) = text("courier-ttl")? {
        let ttl = parse_duration(ttl)
            .ok_or_else(|| bad("Courier-TTL takes a duration, such as 30s or 500ms".into()))?;
        builder = builder.ttl(ttl);
    }
    if let Some(delay) = text("courier-delay")? {
        let delay = parse_duration(delay)
            .ok_or_else(|| bad("Courier-Delay takes a duration, such as 30s or 500ms".into()))?;
        builder = builder.deliver_after(delay);
    }
    if let Some(version) = text("courier-version")? {
        let version = version
            .parse()
            .map_err(|_| bad("Courier-Version takes MAJOR.MINOR, such as 1.0".into()))?;
        builder = builder.version(version);
    }
    if let Some(transient) = text("courier-transient")? {
        match transient {
            "true" | "1" => builder = builder.transient(),
            "false" | "0" => {}
            _ => return Err(bad("Courier-Transient takes true or false".into())),
        }
    }
    Ok(builder.payload(body))
}

/// Events are named in the past tense (`todo.created`), as the bus's own
/// CLI tells them from commands.
pub(super) fn is_event_name(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    last.ends_with("ed")
}

/// `500ms`, `5s`, `2m`, or a bare number of milliseconds.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "ms"),
    };
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

/// A broker refusal as problem+json, carrying the broker's code and reason.
pub(super) fn refusal(error: &ClientError) -> Response {
    let (status, code) = match error {
        ClientError::Refused { code, .. } => (status_of(*code), Some(*code)),
        ClientError::Name(_) | ClientError::Encode(_) => (StatusCode::BAD_REQUEST, None),
        ClientError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, None),
        _ => (StatusCode::SERVICE_UNAVAILABLE, None),
    };
    let mut response = problem(status, &error.to_string());
    if let Some(code) = code {
        insert(
            response.headers_mut(),
            HeaderName::from_static("courier-error"),
            code.as_str(),
        );
    }
    response
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::FORBIDDEN,
        ErrorCode::PayloadTooLarge | ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited | ErrorCode::StreamFull => StatusCode::TOO_MANY_REQUESTS,
        // A reply to a requester that no longer awaits replies.
        ErrorCode::UnknownRequest => StatusCode::GONE,
        ErrorCode::NoReceiver => StatusCode::NOT_FOUND,
        ErrorCode::InvalidName
        | ErrorCode::InvalidMessage
        | ErrorCode::InvalidPattern
        | ErrorCode::Expired => StatusCode::BAD_REQUEST,
        ErrorCode::StorageFailed | ErrorCode::ShuttingDown | ErrorCode::TooManyConnections => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_GATEWAY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_bare_milliseconds() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5h"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn past_tense_names_are_events() {
        assert!(is_event_name("todo.created"));
        assert!(!is_event_name("todo.create"));
    }
}
