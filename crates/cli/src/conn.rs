//! How client commands reach the broker, say when it goes away, and give
//! up at their `--timeout`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use courier_client::{Client, ClientOptions, ConnectionEvent, Error as ClientError};

/// The broker to talk to and the credentials to show it: what every
/// command that connects takes, whether it acts as a service ([`Conn`]) or
/// asks the broker's own commands (`courier dead-letters`, `pause`, …).
#[derive(Args, Clone)]
pub struct Broker {
    /// Broker address, HOST:PORT; or several, separated by commas
    /// (127.0.0.1:7701,127.0.0.1:7702): each (re)connect tries them in
    /// turn, from the one after the broker connected to last.
    #[arg(long, env = "COURIER_URL", default_value = "127.0.0.1:7700")]
    pub url: String,
    /// Credentials, for brokers that require them.
    #[arg(long, env = "COURIER_TOKEN")]
    pub token: Option<String>,
    /// Connect with TLS, trusting this CA certificate (PEM).
    #[arg(long, env = "COURIER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that authenticate by certificate.
    #[arg(long, env = "COURIER_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "COURIER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Broker {
    /// TLS when `--tls-ca` is given (clap pairs `--tls-cert` with
    /// `--tls-key` and with `--tls-ca`).
    pub fn client_tls(&self) -> Option<courier_client::ClientTls> {
        let ca = self.tls_ca.clone()?;
        let tls = courier_client::ClientTls::new(ca);
        Some(match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => tls.with_client_cert(cert, key),
            _ => tls,
        })
    }
}

/// A client command's connection: the broker, and the service it acts as.
#[derive(Args, Clone)]
pub struct Conn {
    #[command(flatten)]
    pub broker: Broker,
    /// The service to act as (default: the token's or client certificate's
    /// service, else `cli`).
    #[arg(long, env = "COURIER_SERVICE")]
    pub service: Option<String>,
}

impl Conn {
    /// The connection of a command for the broker itself. It has no
    /// `--service` (where it takes one, that names the service acted on),
    /// so only `COURIER_SERVICE` names the service it connects as.
    pub fn admin(broker: &Broker) -> Conn {
        Conn {
            broker: broker.clone(),
            service: std::env::var("COURIER_SERVICE").ok(),
        }
    }

    /// With a token and no explicit service, the token decides (an empty
    /// name in HELLO); without either, `cli`.
    pub fn service_name(&self) -> String {
        // A client certificate decides like a token does.
        match (
            &self.service,
            self.broker.token.is_some() || self.broker.tls_cert.is_some(),
        ) {
            (Some(s), _) => s.clone(),
            (None, true) => String::new(),
            (None, false) => "cli".to_string(),
        }
    }

    /// The SDK's options for this connection: address, service,
    /// credentials and TLS.
    pub fn options(&self) -> ClientOptions {
        let mut opts = ClientOptions::new(self.broker.url.clone(), self.service_name());
        opts.token = self.broker.token.clone();
        opts.tls = self.broker.client_tls();
        opts
    }
}

/// When a command stops waiting: `--timeout` after it started, or never.
#[derive(Clone, Copy)]
pub struct Deadline {
    timeout: Option<Duration>,
    at: Option<tokio::time::Instant>,
}

impl Deadline {
    /// From now; a timeout too far to represent (centuries) is no deadline.
    pub fn after(timeout: Option<Duration>) -> Deadline {
        Deadline {
            timeout,
            at: timeout.and_then(|t| tokio::time::Instant::now().checked_add(t)),
        }
    }

    /// Resolves at the deadline; never without one.
    pub async fn reached(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Why a command stopped at this deadline, with what it got done.
    pub fn gave_up(&self, conn: &Conn, connected: bool, progress: &str) -> anyhow::Error {
        let waited = match self.timeout {
            Some(t) => format!(
                "gave up after {} (--timeout)",
                humantime::format_duration(t)
            ),
            None => "gave up".to_string(),
        };
        anyhow::Error::new(GaveUp::new(&conn.broker.url, connected, &waited, progress))
    }
}

/// A client command stopped waiting before it was done.
#[derive(Debug)]
pub struct GaveUp {
    /// The broker was unreachable at that moment (exit 3); else it, or the
    /// receivers behind it, were too slow (exit 5).
    pub unreachable: bool,
    message: String,
}

impl GaveUp {
    /// `waited`: how long it waited and why it stopped, in words.
    fn new(url: &str, connected: bool, waited: &str, progress: &str) -> GaveUp {
        let addresses: Vec<&str> = url.split(',').map(str::trim).collect();
        let message = if connected {
            format!("{waited}; {progress}")
        } else if addresses.len() > 1 {
            format!(
                "no broker at {} is reachable; {waited}; {progress}",
                addresses.join(", ")
            )
        } else {
            format!("the broker at {url} is unreachable; {waited}; {progress}")
        };
        GaveUp {
            unreachable: !connected,
            message,
        }
    }
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GaveUp {}

/// How a command's client behaves.
#[derive(Clone, Copy, Default)]
pub struct Settings {
    /// Deliveries taken at once; 0 keeps the SDK's default.
    pub max_in_flight: u32,
    /// How long each send waits for its acknowledgement; `None` keeps the
    /// SDK's default.
    pub send_timeout: Option<Duration>,
}

/// Connects (within `deadline`), and prints to stderr, once each, when the
/// connection is lost and when it is back. Handlers run one at a time, so
/// lines print in delivery order.
pub async fn connect(
    conn: &Conn,
    settings: Settings,
    deadline: &Deadline,
) -> anyhow::Result<Client> {
    let mut opts = conn.options();
    if settings.max_in_flight > 0 {
        opts.max_in_flight = settings.max_in_flight;
    }
    if let Some(timeout) = settings.send_timeout {
        opts.send_timeout = timeout;
    }
    opts.sequential = true;
    let client = tokio::select! {
        client = Client::connect(opts) => client?,
        () = deadline.reached() => {
            return Err(deadline.gave_up(conn, false, "never connected"));
        }
    };
    let mut events = client.connection_events();
    // Of several brokers, the one connected to: the one lost is the one
    // last restored (read at the restore, not at the loss, which a quick
    // reconnect to the next broker may already have overtaken).
    let watched = client.clone();
    let mut address = client.broker_address();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                ConnectionEvent::Lost { .. } => {
                    eprintln!("courier: connection to {address} lost; reconnecting…")
                }
                ConnectionEvent::Restored => {
                    address = watched.broker_address();
                    eprintln!("courier: connection to {address} restored")
                }
                _ => {}
            }
        }
    });
    Ok(client)
}

/// An SDK timeout while the broker is away is the broker's absence (exit
/// 3), not a slow answer (exit 5).
pub fn timeout_while_away(
    error: ClientError,
    client: &Client,
    conn: &Conn,
    progress: &str,
) -> anyhow::Error {
    match error {
        ClientError::Timeout(t) if !client.is_connected() => {
            let waited = format!("no answer within {}", humantime::format_duration(t));
            anyhow::Error::new(GaveUp::new(&conn.broker.url, false, &waited, progress))
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(token: Option<&str>, tls_ca: Option<&str>) -> Broker {
        Broker {
            url: "broker.example:7700".to_string(),
            token: token.map(str::to_string),
            tls_ca: tls_ca.map(PathBuf::from),
            tls_cert: None,
            tls_key: None,
        }
    }

    #[test]
    fn options_carry_the_address_the_credentials_and_who_decides_the_service() {
        let named = Conn {
            broker: broker(Some("crr_x"), None),
            service: Some("web".to_string()),
        };
        let opts = named.options();
        assert_eq!(
            (
                opts.url.as_str(),
                opts.service.as_str(),
                opts.token.as_deref()
            ),
            ("broker.example:7700", "web", Some("crr_x"))
        );
        assert!(opts.tls.is_none());
        let by_token = Conn {
            broker: broker(Some("crr_x"), None),
            service: None,
        };
        assert_eq!(by_token.options().service, "", "the token decides");
        let anonymous = Conn {
            broker: broker(None, Some("ca.pem")),
            service: None,
        };
        let opts = anonymous.options();
        assert_eq!(opts.service, "cli");
        assert!(opts.tls.is_some(), "--tls-ca means TLS");
    }

    #[test]
    fn giving_up_names_the_broker_or_every_one_of_several() {
        let one = GaveUp::new(
            "127.0.0.1:7700",
            false,
            "gave up after 2s",
            "0 acknowledged",
        );
        assert_eq!(
            one.to_string(),
            "the broker at 127.0.0.1:7700 is unreachable; gave up after 2s; 0 acknowledged"
        );
        let several = GaveUp::new("a:1, b:2", false, "gave up after 2s", "0 acknowledged");
        assert_eq!(
            several.to_string(),
            "no broker at a:1, b:2 is reachable; gave up after 2s; 0 acknowledged"
        );
        assert!(several.unreachable);
    }
}
