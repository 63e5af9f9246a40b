//! How a client reaches the broker: `ClientOptions` (from code or the
//! environment), TLS, and connectors for transports other than TCP.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, Result};

/// How to reach the broker and behave on the way.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port` of the broker, or of several brokers (the nodes of a
    /// cluster) separated by commas: `10.0.0.1:7700,10.0.0.2:7700`
    /// (spaces around the commas are allowed). Each connection attempt,
    /// the first and every reconnect, tries them in turn, starting after
    /// the one connected to last (so a client whose broker died goes on
    /// to the next without waiting on the dead one first), each within
    /// the connect and handshake timeout; when every one fails, that
    /// counts as one failed attempt for the reconnect backoff. TLS checks
    /// each broker's certificate against that address's own host.
    /// [`Client::broker_address`](crate::Client::broker_address) tells
    /// which one the client is connected to.
    pub url: String,
    /// The service this client acts for. Empty: the one its token or
    /// client certificate belongs to (a broker with a manifest names it in
    /// WELCOME; see [`Client::service`](crate::Client::service)).
    pub service: String,
    /// This instance's name; the broker makes one up when empty.
    pub instance: String,
    /// Credentials for brokers that require them.
    pub token: Option<String>,
    /// `host:port` of the broker's HTTP port, where [`Client::discover`](crate::Client::discover)
    /// looks services up. `None`: the host of the address in `url` the
    /// client is connected to, with port 7780 (what `courier serve --http`
    /// listens on by default).
    pub http: Option<String>,
    /// TLS to the broker; `None` is plain TCP.
    pub tls: Option<ClientTls>,
    /// Deliveries this instance handles at once (flow control).
    pub max_in_flight: u32,
    /// Replies of a [`Client::request_stream`](crate::Client::request_stream) received and not yet taken
    /// by the application, at most (flow control of reply streams,
    /// PROTOCOL §8.8): the broker holds the rest back, and with them the
    /// responder. From 1 to 65 536.
    pub reply_window: u32,
    /// How long `send` waits for the broker's acknowledgement.
    pub send_timeout: Duration,
    /// How long `request` waits for a reply unless told otherwise.
    pub request_timeout: Duration,
    /// Ack deadline asked for this service's subscriptions; `None` keeps the broker's.
    pub ack_deadline: Option<Duration>,
    /// Deliveries of one message before it goes to the dead letters; `None` keeps the broker's.
    pub max_deliveries: Option<u32>,
    /// Retry delay when a handler returns an error.
    pub nack_delay: Duration,
    pub reconnect_delay_min: Duration,
    pub reconnect_delay_max: Duration,
    /// How long `shutdown` waits for running handlers.
    pub drain_timeout: Duration,
    /// Run handlers one at a time in delivery order, instead of each on its
    /// own task (up to `max_in_flight` at once).
    pub sequential: bool,
    /// `HOST:PORT` this instance serves on (its HTTP port, say), told to the
    /// broker on every (re)connect so the service registry, its lookups and
    /// its DNS name list it; `None` advertises nothing. See
    /// [`ClientOptions::advertise`].
    pub advertise: Option<String>,
}

impl ClientOptions {
    /// The broker addresses of [`ClientOptions::url`], in the order
    /// written; an empty entry (`a:1,,b:2`, or a trailing comma) is an
    /// error that says what to write.
    ///
    /// ```
    /// let opts = courier_client::ClientOptions::new("127.0.0.1:7701, 127.0.0.1:7702", "web");
    /// assert_eq!(opts.addresses()?, ["127.0.0.1:7701", "127.0.0.1:7702"]);
    /// # Ok::<(), courier_client::Error>(())
    /// ```
    pub fn addresses(&self) -> Result<Vec<String>> {
        parse_addresses(&self.url)
    }

    /// Options with defaults for everything but where and who.
    ///
    /// ```
    /// let opts = courier_client::ClientOptions::new("127.0.0.1:7700", "web");
    /// assert_eq!(opts.max_in_flight, 64);
    /// ```
    pub fn new(url: impl Into<String>, service: impl Into<String>) -> ClientOptions {
        ClientOptions {
            url: url.into(),
            service: service.into(),
            instance: String::new(),
            token: None,
            http: None,
            tls: None,
            max_in_flight: 64,
            reply_window: 64,
            send_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            ack_deadline: None,
            max_deliveries: None,
            nack_delay: Duration::from_secs(1),
            reconnect_delay_min: Duration::from_millis(50),
            reconnect_delay_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            sequential: false,
            advertise: None,
        }
    }

    /// Advertises where this instance serves, as `HOST:PORT` (e.g. the
    /// address its HTTP server listens on): the broker's registry then
    /// lists it with that address, and `NAME.service.courier` resolves to
    /// it. A host of `0.0.0.0` tells callers nothing; give the address
    /// they can reach.
    ///
    /// ```
    /// let opts = courier_client::ClientOptions::new("127.0.0.1:7700", "web")
    ///     .advertise("127.0.0.1:3000");
    /// assert_eq!(opts.advertise.as_deref(), Some("127.0.0.1:3000"));
    /// ```
    pub fn advertise(mut self, address: impl Into<String>) -> ClientOptions {
        self.advertise = Some(address.into());
        self
    }

    /// Reads what the `courier` CLI reads: `COURIER_URL` (default
    /// `127.0.0.1:7700`; several brokers separated by commas, e.g.
    /// `127.0.0.1:7701,127.0.0.1:7702`, see [`ClientOptions::url`]),
    /// `COURIER_TOKEN` when set, `COURIER_HTTP` (the
    /// HTTP port, for discovery) when set, and with
    /// `COURIER_TLS_CA` set, TLS trusting that CA, with the client
    /// certificate of `COURIER_TLS_CERT` and `COURIER_TLS_KEY` when both are
    /// set. The service is `COURIER_SERVICE`; without it, a token or a
    /// client certificate decides (the service stays empty and the broker
    /// takes it from the credentials), and without those it is `cli`.
    /// `COURIER_ADVERTISE` (`HOST:PORT`), when set, is the address
    /// advertised (see [`ClientOptions::advertise`]).
    pub fn from_env() -> ClientOptions {
        ClientOptions::from_vars(|name| std::env::var_os(name))
    }

    /// [`ClientOptions::from_env`] with the variables looked up by `var`.
    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> ClientOptions {
        let text = |name: &str| var(name).map(|v| v.to_string_lossy().into_owned());
        let url = text("COURIER_URL").unwrap_or_else(|| "127.0.0.1:7700".to_string());
        let token = text("COURIER_TOKEN");
        let cert = var("COURIER_TLS_CERT");
        let key = var("COURIER_TLS_KEY");
        let service = match text("COURIER_SERVICE") {
            Some(service) => service,
            None if token.is_some() || (cert.is_some() && key.is_some()) => String::new(),
            None => "cli".to_string(),
        };
        let mut opts = ClientOptions::new(url, service);
        opts.token = token;
        opts.http = text("COURIER_HTTP");
        opts.advertise = text("COURIER_ADVERTISE").filter(|a| !a.trim().is_empty());
        opts.tls = var("COURIER_TLS_CA").map(|ca| {
            let mut tls = ClientTls::new(ca);
            if let (Some(cert), Some(key)) = (cert, key) {
                tls.client_cert = Some((cert.into(), key.into()));
            }
            tls
        });
        opts
    }
}

/// TLS to the broker (rustls, TLS 1.3). PEM files are read at each
/// (re)connect, so renewed certificates are picked up without a restart.
///
/// ```
/// let mut opts = courier_client::ClientOptions::new("127.0.0.1:7700", "web");
/// opts.tls = Some(courier_client::ClientTls::new("certs/ca.pem")
///     .with_client_cert("certs/web.pem", "certs/web-key.pem"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate(s) that sign the broker's certificate; the only ones
    /// trusted.
    pub ca: std::path::PathBuf,
    /// Client certificate chain and its private key, for brokers that
    /// authenticate by certificate (mTLS).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The name the broker's certificate must carry; by default the host of
    /// [`ClientOptions::url`].
    pub server_name: Option<String>,
}

impl ClientTls {
    /// Trusts the CA in `ca`; no client certificate.
    pub fn new(ca: impl Into<std::path::PathBuf>) -> ClientTls {
        ClientTls {
            ca: ca.into(),
            client_cert: None,
            server_name: None,
        }
    }

    /// Presents this client certificate (chain, leaf first) and key.
    pub fn with_client_cert(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> ClientTls {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }
}

/// The read half of a byte stream a [`Connector`] opens.
pub type BoxRead = Pin<Box<dyn tokio::io::AsyncRead + Send>>;
/// The write half of a byte stream a [`Connector`] opens.
pub type BoxWrite = Pin<Box<dyn tokio::io::AsyncWrite + Send>>;
/// What [`Connector`] returns: a new byte stream to the broker, or why not.
pub type Connecting = Pin<Box<dyn Future<Output = std::io::Result<(BoxRead, BoxWrite)>> + Send>>;

/// Opens byte streams to the broker other than a TCP socket: the broker's
/// own HTTP gateway, say, reaches its bus in memory. Called for the first
/// connection and for every reconnect; the protocol over the stream is
/// the same (HELLO, WELCOME, frames).
#[derive(Clone)]
pub struct Connector(pub(crate) Arc<dyn Fn() -> Connecting + Send + Sync>);

impl Connector {
    /// A connector that calls `open` for each connection.
    pub fn new(open: impl Fn() -> Connecting + Send + Sync + 'static) -> Connector {
        Connector(Arc::new(open))
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

/// `url` split at its commas, each address trimmed.
pub(crate) fn parse_addresses(url: &str) -> Result<Vec<String>> {
    let addresses: Vec<String> = url.split(',').map(|a| a.trim().to_string()).collect();
    if addresses.iter().any(String::is_empty) {
        return Err(Error::Options(format!(
            "the broker address {url:?} (COURIER_URL, --url or ClientOptions::url) has an empty entry; write HOST:PORT, or several separated by commas: 127.0.0.1:7701,127.0.0.1:7702"
        )));
    }
    Ok(addresses)
}

/// The order in which one connection attempt tries `count` addresses:
/// from the one after `last` (the address connected to last), round to
/// `last` itself; from the first when none was connected to yet.
pub(crate) fn rotation(count: usize, last: Option<usize>) -> impl Iterator<Item = usize> {
    let start = last.map_or(0, |last| last + 1);
    (0..count).map(move |k| (start + k) % count.max(1))
}

/// An advertised address must be `HOST:PORT`, as the registry holds it.
pub(crate) fn check_advertised(address: &str) -> Result<()> {
    let port = address
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port > 0 => Ok(()),
        _ => Err(Error::Options(format!(
            "advertised address {address:?} is not HOST:PORT (COURIER_ADVERTISE or ClientOptions::advertise); write for example 127.0.0.1:3000"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> ClientOptions {
        ClientOptions::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| std::ffi::OsString::from(v))
        })
    }

    #[test]
    fn from_env_lets_credentials_decide_the_service_unless_it_is_named() {
        let plain = from(&[]);
        assert_eq!(
            (plain.url.as_str(), plain.service.as_str()),
            ("127.0.0.1:7700", "cli")
        );
        assert_eq!(plain.token, None);

        let token = from(&[("COURIER_TOKEN", "crr_x"), ("COURIER_URL", "h:1")]);
        assert_eq!(token.service, "", "the broker takes it from the token");
        assert_eq!(
            (token.url.as_str(), token.token.as_deref()),
            ("h:1", Some("crr_x"))
        );

        let named = from(&[("COURIER_TOKEN", "crr_x"), ("COURIER_SERVICE", "web")]);
        assert_eq!(named.service, "web");

        let cert = from(&[
            ("COURIER_TLS_CA", "ca.pem"),
            ("COURIER_TLS_CERT", "web.pem"),
            ("COURIER_TLS_KEY", "web-key.pem"),
        ]);
        assert_eq!(cert.service, "");
        let tls = cert.tls.expect("tls");
        assert_eq!(
            tls.client_cert,
            Some(("web.pem".into(), "web-key.pem".into()))
        );

        let ca_only = from(&[("COURIER_TLS_CA", "ca.pem")]);
        assert_eq!(ca_only.service, "cli", "a CA alone authenticates nobody");
    }

    #[test]
    fn a_url_is_one_address_or_several_separated_by_commas() {
        assert_eq!(
            parse_addresses("127.0.0.1:7700").unwrap(),
            ["127.0.0.1:7700"]
        );
        assert_eq!(
            parse_addresses("a:1,b:2").unwrap(),
            ["a:1", "b:2"],
            "no spaces"
        );
        assert_eq!(
            parse_addresses(" a:1 ,  b:2,c:3 ").unwrap(),
            ["a:1", "b:2", "c:3"],
            "spaces around the commas"
        );
        assert_eq!(
            parse_addresses("[::1]:7700,[::1]:7701").unwrap(),
            ["[::1]:7700", "[::1]:7701"]
        );
        for bad in ["", " ", "a:1,", ",a:1", "a:1,,b:2", "a:1, ,b:2"] {
            let e = parse_addresses(bad).expect_err(bad).to_string();
            assert!(
                e.contains("empty entry") && e.contains("127.0.0.1:7701,127.0.0.1:7702"),
                "{bad:?}: {e}"
            );
        }
        let opts = from(&[("COURIER_URL", "h:1, h:2")]);
        assert_eq!(opts.addresses().unwrap(), ["h:1", "h:2"]);
    }

    #[test]
    fn each_attempt_starts_after_the_address_connected_to_last() {
        let order = |count, last| rotation(count, last).collect::<Vec<_>>();
        assert_eq!(order(1, None), [0]);
        assert_eq!(order(1, Some(0)), [0], "one address: always that one");
        assert_eq!(order(3, None), [0, 1, 2], "the first connect: as written");
        assert_eq!(order(3, Some(0)), [1, 2, 0], "the one that died comes last");
        assert_eq!(order(3, Some(1)), [2, 0, 1]);
        assert_eq!(order(3, Some(2)), [0, 1, 2], "round past the end");
        assert_eq!(order(0, None), Vec::<usize>::new());
    }

    #[test]
    fn the_advertised_address_comes_from_the_environment_and_must_be_host_port() {
        let opts = from(&[("COURIER_ADVERTISE", "127.0.0.1:3000")]);
        assert_eq!(opts.advertise.as_deref(), Some("127.0.0.1:3000"));
        assert_eq!(from(&[("COURIER_ADVERTISE", "")]).advertise, None);
        assert_eq!(from(&[]).advertise, None);
        assert!(check_advertised("127.0.0.1:3000").is_ok());
        assert!(check_advertised("[::1]:3000").is_ok());
        for bad in ["localhost", ":3000", "h:port", "h:0", "h:70000"] {
            let e = check_advertised(bad).expect_err(bad).to_string();
            assert!(
                e.contains("HOST:PORT") && e.contains("COURIER_ADVERTISE"),
                "{e}"
            );
        }
    }
}
