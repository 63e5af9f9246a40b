//! Replies posted to webhooks: `POST /v1/requests/{name}` with
//! `Courier-Reply-To: https://…` is answered 202 at once, and each reply
//! of the command is POSTed to that URL as it comes, in order.
//!
//! Each POST carries the reply's payload as its body and its envelope in
//! headers (as a synchronous request's answer does), and is signed:
//! `Courier-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`,
//! keyed with the webhook secret of the service that sent the request
//! ([`WebhookKey::secret`]). A POST that fails (no connection, no
//! answer within [`ATTEMPT_TIMEOUT`], or a status other than 2xx) is tried
//! again after a delay that doubles from [`FIRST_RETRY`], [`ATTEMPTS`]
//! times in all; then that reply is given up, and the next one, if any, is
//! tried. `/metrics` counts posts delivered, retried and given up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, Request, StatusCode, Uri};
use axum::response::Response;
use courier_client::{Reply, ReplyStream};
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tracing::{debug, warn};

use crate::http::problem;

/// Posts of one reply, at most.
pub(crate) const ATTEMPTS: u32 = 6;
/// The wait before the second attempt; each later wait doubles
/// (0.25 s, 0.5 s, 1 s, 2 s, 4 s: a reply is given up about 8 s after its
/// first failure, plus the attempts' own time).
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(250);
/// How long one attempt may take, connecting included.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the webhook poster did, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct WebhookCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) given_up: AtomicU64,
}

impl WebhookCounters {
    /// (delivered, retried, given up)
    pub(crate) fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.given_up.load(Ordering::Relaxed),
        )
    }
}

/// The key the broker derives each service's webhook secret from: a
/// random string in a file the broker keeps (`<data-dir>/webhook.key`,
/// made on first start, readable by its owner only). `courier token
/// webhook-secret --service NAME` reads the same file, and prints what a
/// receiver verifies with. Replacing the file (and restarting) rotates
/// every service's secret.
#[derive(Clone)]
pub struct WebhookKey(String);

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookKey(…)")
    }
}

/// Why the webhook key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum WebhookKeyError {
    #[error("no webhook key at {0}: the broker makes it on its first start with that --data-dir; pass the broker's --data-dir (or --webhook-key FILE)")]
    Missing(std::path::PathBuf),
    #[error("cannot read the webhook key {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the webhook key {0} is empty: remove it, and the broker makes a new one on its next start"
    )]
    Empty(std::path::PathBuf),
    #[error("cannot make the webhook key {path}: {source}; check the directory's permissions, or pass --webhook-key FILE")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw random bytes for a webhook key: {0}")]
    Random(String),
}

impl WebhookKey {
    /// A key for this process only (a broker that keeps nothing on disk):
    /// its secrets change with every start.
    pub fn ephemeral() -> Result<WebhookKey, WebhookKeyError> {
        courier_manifest::generate_token()
            .map(WebhookKey)
            .map_err(|e| WebhookKeyError::Random(e.to_string()))
    }

    /// Reads the key at `path`.
    pub fn load(path: &std::path::Path) -> Result<WebhookKey, WebhookKeyError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(WebhookKeyError::Missing(path.to_path_buf()))
            }
            Err(source) => {
                return Err(WebhookKeyError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let key = text.trim();
        if key.is_empty() {
            return Err(WebhookKeyError::Empty(path.to_path_buf()));
        }
        Ok(WebhookKey(key.to_string()))
    }

    /// Reads the key at `path`, or makes one there if there is none.
    pub fn load_or_create(path: &std::path::Path) -> Result<WebhookKey, WebhookKeyError> {
        match WebhookKey::load(path) {
            Err(WebhookKeyError::Missing(_)) => {}
            other => return other,
        }
        let key = WebhookKey::ephemeral()?;
        let write = |source| WebhookKeyError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                use std::io::Write;
                writeln!(file, "{}", key.0)
                    .and_then(|()| file.sync_all())
                    .map_err(write)?;
                Ok(key)
            }
            // Made meanwhile by another process: that one counts.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => WebhookKey::load(path),
            Err(source) => Err(write(source)),
        }
    }

    /// The secret `service`'s webhooks are signed with: the hex
    /// HMAC-SHA256 of `courier-webhook:<service>`, keyed with this key.
    ///
    /// ```
    /// let key = courier_server::WebhookKey::ephemeral().expect("random bytes");
    /// assert_eq!(key.secret("todo").len(), 64);
    /// assert_ne!(key.secret("todo"), key.secret("web"));
    /// ```
    pub fn secret(&self, service: &str) -> String {
        let message = format!("courier-webhook:{service}");
        hex(&hmac_sha256(self.0.as_bytes(), message.as_bytes()))
    }
}

/// `Courier-Signature`'s value for `body` sent at `timestamp` (unix
/// seconds).
pub fn webhook_signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    format!(
        "t={timestamp},v1={}",
        hex(&hmac_sha256(secret.as_bytes(), &signed))
    )
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Where a request's replies go.
#[derive(Debug, Clone)]
pub(crate) struct ReplyTo {
    uri: Uri,
    host: String,
    port: u16,
    tls: bool,
}

/// The webhook a request names in `Courier-Reply-To`, checked: https://,
/// or http:// to a loopback address (for development and tests).
pub(crate) fn reply_to(headers: &HeaderMap) -> Result<Option<ReplyTo>, Box<Response>> {
    let Some(value) = headers.get("courier-reply-to") else {
        return Ok(None);
    };
    let bad = |detail: &str| Box::new(problem(StatusCode::BAD_REQUEST, detail));
    let text = value
        .to_str()
        .map_err(|_| bad("Courier-Reply-To must be visible ASCII: a URL"))?;
    let uri: Uri = text.parse().map_err(|_| {
        bad("Courier-Reply-To takes an absolute URL, such as https://hooks.example.com/courier")
    })?;
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(bad(
            "Courier-Reply-To takes an absolute URL, such as https://hooks.example.com/courier",
        ));
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = match scheme {
        "https" => true,
        "http" if is_loopback(&host) => false,
        _ => {
            return Err(bad(
                "Courier-Reply-To takes an https:// URL (http:// only to a loopback address, such as http://127.0.0.1:8080/hook, for development)",
            ))
        }
    };
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Some(ReplyTo {
        uri,
        host,
        port,
        tls,
    }))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Posts the replies of `stream` to `target` as they come, in order.
pub(crate) fn deliver(
    stream: ReplyStream,
    target: ReplyTo,
    secret: String,
    counters: Arc<WebhookCounters>,
) {
    tokio::spawn(async move {
        let mut stream = stream;
        let request = stream.command_id();
        while let Some(next) = stream.next_reply().await {
            let reply = match next {
                Ok(reply) => reply,
                Err(error) => {
                    debug!(%request, %error, "webhook request ended without its final reply");
                    return;
                }
            };
            post_with_retries(&target, &secret, &reply, request, &counters).await;
            if reply.is_final() {
                return;
            }
        }
    });
}

async fn post_with_retries(
    target: &ReplyTo,
    secret: &str,
    reply: &Reply,
    request: uuid::Uuid,
    counters: &WebhookCounters,
) {
    let mut delay = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        let outcome = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            post(target, secret, reply, request, attempt),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")));
        match outcome {
            Ok(()) => {
                counters.delivered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(error) if attempt < ATTEMPTS => {
                debug!(url = %target.uri, attempt, %error, ?delay, "webhook post failed; retrying");
                counters.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(error) => {
                warn!(url = %target.uri, %request, reply = %reply.message().id, %error,
                    "webhook post failed {ATTEMPTS} times; this reply is given up");
                counters.given_up.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One POST of a reply: `Ok` on a 2xx answer.
async fn post(
    target: &ReplyTo,
    secret: &str,
    reply: &Reply,
    request: uuid::Uuid,
    attempt: u32,
) -> Result<(), String> {
    let message = reply.message();
    let body = message.payload.clone();
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let content_type = super::requests::content_type(message);
    let path = target
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let authority = target
        .uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or(&target.host);
    let http_request = Request::post(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::USER_AGENT, "courier-gateway")
        .header(
            "courier-signature",
            webhook_signature(secret, timestamp, &body),
        )
        .header("courier-request", request.to_string())
        .header("courier-id", message.id.to_string())
        .header("courier-outcome", &*message.name)
        .header("courier-sender", &*message.sender)
        .header(
            "courier-final",
            if message.is_final { "true" } else { "false" },
        )
        .header("courier-attempt", attempt.to_string())
        .body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let status = if target.tls {
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| format!("not a host name for TLS: {e}"))?;
        let tls = tls_connector()?
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), http_request).await?
    } else {
        send(TokioIo::new(tcp), http_request).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

async fn send<S>(io: TokioIo<S>, request: Request<Full<bytes::Bytes>>) -> Result<StatusCode, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(connection);
    let answer = sender.send_request(request).await;
    driver.abort();
    answer
        .map(|answer| answer.status())
        .map_err(|e| format!("HTTP: {e}"))
}

/// The TLS client for https:// webhooks: the system's trusted roots,
/// read once.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<tokio_rustls::TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "no trusted root certificates found on this system for https:// webhooks"
                        .to_string(),
                );
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS set-up: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signatures_cover_the_timestamp_and_the_body() {
        let secret = WebhookKey("k".into()).secret("web");
        let signed = webhook_signature(&secret, 1_700_000_000, b"{}");
        assert!(signed.starts_with("t=1700000000,v1="));
        assert_ne!(signed, webhook_signature(&secret, 1_700_000_001, b"{}"));
        assert_ne!(signed, webhook_signature(&secret, 1_700_000_000, b"{ }"));
    }

    #[test]
    fn a_key_is_made_once_and_read_back_the_same() {
        let dir =
            std::env::temp_dir().join(format!("courier-webhook-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("webhook.key");
        assert!(matches!(
            WebhookKey::load(&path),
            Err(WebhookKeyError::Missing(_))
        ));
        let made = WebhookKey::load_or_create(&path).expect("made");
        let again = WebhookKey::load_or_create(&path).expect("read");
        assert_eq!(made.secret("todo"), again.secret("todo"));
        assert_eq!(
            made.secret("todo"),
            WebhookKey::load(&path).expect("read").secret("todo")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "\n").expect("write");
        assert!(matches!(
            WebhookKey::load(&path),
            Err(WebhookKeyError::Empty(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn webhooks_are_https_or_loopback_http() {
        let with = |url: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("courier-reply-to", url.parse().expect("a header value"));
            reply_to(&headers).map(|t| t.map(|t| (t.host, t.port, t.tls)))
        };
        assert_eq!(
            with("https://hooks.example.com/x").ok().flatten(),
            Some(("hooks.example.com".into(), 443, true))
        );
        assert_eq!(
            with("http://127.0.0.1:8080/hook").ok().flatten(),
            Some(("127.0.0.1".into(), 8080, false))
        );
        assert_eq!(
            with("http://[::1]:9/h").ok().flatten(),
            Some(("::1".into(), 9, false))
        );
        assert!(with("http://hooks.example.com/x").is_err());
        assert!(with("ftp://127.0.0.1/x").is_err());
        assert!(with("/relative").is_err());
    }
}
