//! Browsers' credentials: a token as a query or a subprotocol, never logged.

use super::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Everything under `dir`, as bytes, with its path.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

async fn websocket(
    http: &str,
    protocol: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Option<String>,
    ),
    u16,
> {
    let url = format!("ws://{}/v1/ws?pattern=todo.*", addr_of(http));
    let mut request = url.into_client_request().expect("a request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        protocol.parse().expect("a header value"),
    );
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, response)) => Ok((
            socket,
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        )),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_send_the_token_as_a_query_or_a_subprotocol_and_it_is_never_logged() {
    let dir = common::tempdir::Dir::new("gateway-browser-credentials");
    let (web, web_hash) = token_pair();
    let (notifier, notifier_hash) = token_pair();
    let manifest = dir.path().join("courier.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"[services.web]
sends = ["todo.created@1"]
tokens = ["{web_hash}"]

[services.notifier]
receives = ["todo.created@1"]
tokens = ["{notifier_hash}"]
"#
        ),
    )
    .expect("write manifest");
    let log = dir.path().join("broker.log");
    let broker = Broker::start_logging_to(
        &log,
        &["--manifest", manifest.to_str().expect("utf-8 path")],
    );
    let http = broker.http.clone().expect("an HTTP port");

    // Server-Sent Events: ?access_token=.
    let sse = {
        let (http, notifier, web) = (http.clone(), notifier.clone(), web.clone());
        tokio::task::spawn_blocking(move || {
            for (query, headers, status) in [
                ("pattern=todo.*&access_token=crr_nope", vec![], 401),
                (
                    &*format!("pattern=todo.*&access_token={notifier}"),
                    vec![("Authorization", format!("Bearer {notifier}"))],
                    400,
                ),
            ] {
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                match Stream::open(&http, query, &headers) {
                    Ok(_) => panic!("{query} was taken"),
                    Err(refused) => {
                        assert_eq!(refused.status, status, "{query}: {}", refused.body)
                    }
                }
            }
            let mut stream = Stream::subscribed(
                &http,
                &format!("pattern=todo.*&access_token={notifier}"),
                &[],
            );
            let sent = post(
                &http,
                "/v1/messages/todo.created",
                &[("Authorization", &format!("Bearer {web}"))],
                r#"{"text":"milk"}"#,
            );
            assert_eq!(sent.status, 202, "{}", sent.body);
            let got = stream.delivery();
            assert_eq!(got.data["sender"], "web");
            let acked = ack(
                &http,
                got.id.as_deref().expect("id"),
                &[("Authorization", &format!("Bearer {notifier}"))],
            );
            assert_eq!(acked.status, 204, "{}", acked.body);
        })
    };
    sse.await.expect("the SSE checks");

    // WebSocket: the courier.bearer.<token> subprotocol, echoed.
    assert_eq!(
        websocket(&http, "courier.bearer.crr_nope").await.err(),
        Some(401)
    );
    let offered = format!("courier.bearer.{notifier}");
    let (_socket, chosen) = websocket(&http, &offered).await.expect("a WebSocket");
    assert_eq!(chosen.as_deref(), Some(offered.as_str()));
    let url = format!(
        "ws://{}/v1/ws?pattern=todo.*&access_token={notifier}",
        addr_of(&http)
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("a WebSocket with ?access_token=");

    // The token is nowhere in what the broker wrote: its log (at
    // trace level), its message log, its traces.
    let text = std::fs::read(&log).expect("the broker's log");
    assert!(!text.is_empty(), "the broker logged nothing at trace level");
    for token in [&notifier, &web] {
        assert!(!contains(&text, token), "a token is in the broker's log");
        for (path, bytes) in files_under(broker.data_dir.path()) {
            assert!(!contains(&bytes, token), "a token is in {}", path.display());
        }
    }
}
