//! A browser's token, wherever it comes: `EventSource` and `WebSocket`
//! cannot set `Authorization`.

use std::collections::HashMap;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::http::problem;

/// The WebSocket subprotocol that carries a browser's token:
/// `courier.bearer.<token>`, echoed as the protocol chosen.
pub(crate) const BEARER_PROTOCOL: &str = "courier.bearer.";

/// The caller's headers with its token in `Authorization`, wherever it
/// came: a browser's EventSource and WebSocket cannot set that header, so
/// the token may come as `?access_token=` (RFC 6750 §2.3) or, on a
/// WebSocket, as the subprotocol `courier.bearer.<token>`. Moved into the
/// header, it is read in one place with the rest, and goes no further:
/// the query and the subprotocol are never logged or passed on. A token
/// sent two ways at once is refused (RFC 6750 §2).
pub(crate) fn with_browser_credentials(
    mut headers: HeaderMap,
    query: &HashMap<String, String>,
) -> Result<HeaderMap, Box<Response>> {
    let from_query = query.get("access_token").map(String::as_str);
    let from_protocol = bearer_protocol(&headers).map(|p| &p[BEARER_PROTOCOL.len()..]);
    let from_header = headers.contains_key(axum::http::header::AUTHORIZATION);
    let token = match (from_header, from_query, from_protocol) {
        (_, Some(_), Some(_)) | (true, Some(_), _) | (true, _, Some(_)) => {
            return Err(Box::new(problem(
                StatusCode::BAD_REQUEST,
                "send the token one way only: the Authorization header, ?access_token= or the courier.bearer.<token> subprotocol",
            )))
        }
        (_, Some(token), None) | (_, None, Some(token)) => token.trim().to_string(),
        (_, None, None) => return Ok(headers),
    };
    let value = axum::http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        Box::new(problem(
            StatusCode::UNAUTHORIZED,
            "the token is not one a manifest lists: tokens are visible ASCII",
        ))
    })?;
    headers.insert(axum::http::header::AUTHORIZATION, value);
    Ok(headers)
}

/// The `courier.bearer.<token>` subprotocol a WebSocket offers, if any.
pub(crate) fn bearer_protocol(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.starts_with(BEARER_PROTOCOL) && p.len() > BEARER_PROTOCOL.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browsers_token_moves_into_authorization_and_only_one_way_is_taken() {
        let query = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let authorization = |headers: &HeaderMap| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let from_query = with_browser_credentials(
            HeaderMap::new(),
            &query(&[("access_token", "crr_q"), ("pattern", "a.*")]),
        )
        .ok()
        .and_then(|h| authorization(&h));
        assert_eq!(from_query.as_deref(), Some("Bearer crr_q"));

        let mut offered = HeaderMap::new();
        offered.insert(
            axum::http::header::SEC_WEBSOCKET_PROTOCOL,
            "courier.v1, courier.bearer.crr_p".parse().expect("a value"),
        );
        assert_eq!(bearer_protocol(&offered), Some("courier.bearer.crr_p"));
        let from_protocol = with_browser_credentials(offered.clone(), &query(&[]))
            .ok()
            .and_then(|h| authorization(&h));
        assert_eq!(from_protocol.as_deref(), Some("Bearer crr_p"));

        let twice = with_browser_credentials(offered, &query(&[("access_token", "crr_q")]));
        assert_eq!(
            twice.err().map(|r| r.status()),
            Some(StatusCode::BAD_REQUEST)
        );
        let mut header = HeaderMap::new();
        header.insert(
            axum::http::header::AUTHORIZATION,
            "Bearer crr_h".parse().expect("a value"),
        );
        let both = with_browser_credentials(header.clone(), &query(&[("access_token", "crr_q")]));
        assert_eq!(
            both.err().map(|r| r.status()),
            Some(StatusCode::BAD_REQUEST)
        );
        let alone = with_browser_credentials(header, &query(&[]))
            .ok()
            .and_then(|h| authorization(&h));
        assert_eq!(alone.as_deref(), Some("Bearer crr_h"));
        let mut empty = HeaderMap::new();
        empty.insert(
            axum::http::header::SEC_WEBSOCKET_PROTOCOL,
            "courier.bearer.".parse().expect("a value"),
        );
        assert_eq!(bearer_protocol(&empty), None);
    }
}
