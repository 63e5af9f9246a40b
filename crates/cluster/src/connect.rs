//! The backend address (`nats://h1:4222,h2:4222,h3:4222`) and the
//! connection to it: every server is tried at start, and a lost
//! connection is re-established to any of them, forever.

use std::time::Duration;

use async_nats::{jetstream, ServerAddr};

/// How long one attempt to reach a server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// JetStream API requests and publish acks wait this long. A Raft leader
/// election after a server died takes a few seconds; a request that
/// times out is an error the caller may retry (publishes carry their
/// `Nats-Msg-Id`, so a retry stores nothing twice).
pub const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// The servers of one NATS cluster, as given by `--backend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    servers: Vec<ServerAddr>,
}

/// Why a `--backend` value is not a list of NATS servers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("the backend names no server; give nats://host:port[,host:port…]")]
    Empty,
    #[error(
        "backend `{0}` does not start with nats:// or tls://; give nats://host:port[,host:port…]"
    )]
    Scheme(String),
    #[error("backend entry `{entry}` is not a server address ({why}); give host:port")]
    Address { entry: String, why: String },
}

impl Backend {
    /// `nats://h1:4222,h2:4222` or `nats://h1:4222,nats://h2:4222`; the
    /// first entry's scheme applies to entries without one.
    pub fn parse(text: &str) -> Result<Backend, BackendError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(BackendError::Empty);
        }
        let scheme = ["nats://", "tls://"]
            .into_iter()
            .find(|s| text.starts_with(s))
            .ok_or_else(|| BackendError::Scheme(text.to_string()))?;
        let mut servers = Vec::new();
        for entry in text.split(',').map(str::trim) {
            if entry.is_empty() || entry.ends_with("://") {
                continue;
            }
            let full = if entry.contains("://") {
                entry.to_string()
            } else {
                format!("{scheme}{entry}")
            };
            let addr: ServerAddr =
                full.parse()
                    .map_err(|e: std::io::Error| BackendError::Address {
                        entry: entry.to_string(),
                        why: e.to_string(),
                    })?;
            if addr.host().is_empty() {
                return Err(BackendError::Address {
                    entry: entry.to_string(),
                    why: "no host".to_string(),
                });
            }
            servers.push(addr);
        }
        if servers.is_empty() {
            return Err(BackendError::Empty);
        }
        Ok(Backend { servers })
    }

    pub fn servers(&self) -> &[ServerAddr] {
        &self.servers
    }
}

/// The account to log in as.
#[derive(Clone, Default)]
pub enum Auth {
    /// The servers ask for nothing.
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    /// A user JWT and the nkey seed that signs for it, as a NATS
    /// credentials file holds them (`nsc generate creds`): for servers
    /// whose accounts an operator's JWTs define.
    Credentials(Credentials),
}

/// A credentials file's text, checked to hold a JWT and a seed.
#[derive(Clone)]
pub struct Credentials(String);

#[derive(Debug, thiserror::Error)]
#[error("not a NATS credentials file ({0}): it must hold a user JWT and its nkey seed between the `-----BEGIN NATS USER JWT-----` and `-----BEGIN USER NKEY SEED-----` markers, as `nsc generate creds` writes them")]
pub struct CredentialsError(std::io::Error);

impl Auth {
    /// [`Auth::Credentials`] from a credentials file's text; refused if
    /// the text holds no JWT and seed.
    pub fn credentials(text: String) -> Result<Auth, CredentialsError> {
        async_nats::ConnectOptions::new()
            .credentials(&text)
            .map_err(CredentialsError)?;
        Ok(Auth::Credentials(Credentials(text)))
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("Auth::None"),
            Auth::UserPassword { user, .. } => write!(f, "Auth::UserPassword({user}, ****)"),
            Auth::Credentials(_) => f.write_str("Auth::Credentials(****)"),
        }
    }
}

/// A node's connection to the cluster: core NATS and its JetStream view.
#[derive(Clone, Debug)]
pub struct Connection {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to any NATS server of {servers}: {source}; check that the servers run and that the user and password (or credentials) are right")]
pub struct ConnectError {
    servers: String,
    #[source]
    source: async_nats::ConnectError,
}

/// Connects to one of the backend's servers; the client reconnects by
/// itself to any server of the list (and those the cluster announces)
/// after a loss, without limit. `name` shows in the servers' connection
/// lists (`courier node <id>`).
pub async fn connect(
    backend: &Backend,
    auth: &Auth,
    name: &str,
) -> Result<Connection, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the NATS connection; reconnecting")
                }
                other => tracing::debug!("NATS: {other}"),
            }
        });
    let failed = |source| ConnectError {
        servers: backend
            .servers()
            .iter()
            .map(|s| format!("{}:{}", s.host(), s.port()))
            .collect::<Vec<_>>()
            .join(","),
        source,
    };
    match auth {
        Auth::None => {}
        Auth::UserPassword { user, password } => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        Auth::Credentials(Credentials(text)) => {
            // Checked when the Auth was made; a failure here still names
            // the cause.
            options = options.credentials(text).map_err(|e| {
                failed(async_nats::ConnectError::with_source(
                    async_nats::ConnectErrorKind::Authentication,
                    e,
                ))
            })?;
        }
    }
    let client = options.connect(backend.servers()).await.map_err(failed)?;
    let mut jetstream = jetstream::new(client.clone());
    jetstream.set_timeout(JETSTREAM_TIMEOUT);
    Ok(Connection { client, jetstream })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails, which is its point
mod tests {
    use super::*;

    fn hosts(b: &Backend) -> Vec<String> {
        b.servers()
            .iter()
            .map(|s| format!("{}:{}", s.host(), s.port()))
            .collect()
    }

    #[test]
    fn credentials_must_hold_a_jwt_and_a_seed_and_never_show() {
        let e = Auth::credentials("courier-dev\n".to_string()).unwrap_err();
        assert!(e.to_string().contains("nsc generate creds"), "{e}");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let auth = Auth::credentials(text).unwrap();
        assert_eq!(format!("{auth:?}"), "Auth::Credentials(****)");
    }

    #[test]
    fn a_list_of_servers_shares_the_first_scheme() {
        let b = Backend::parse("nats://h1:4222,h2:4223, h3:4224").unwrap();
        assert_eq!(hosts(&b), ["h1:4222", "h2:4223", "h3:4224"]);
        let b = Backend::parse("nats://h1:4222,nats://h2:4222").unwrap();
        assert_eq!(hosts(&b), ["h1:4222", "h2:4222"]);
        let b = Backend::parse("tls://h1:4222,h2:4222").unwrap();
        assert!(b.servers().iter().all(|s| s.tls_required()));
    }

    #[test]
    fn bad_backends_name_the_fix() {
        assert_eq!(Backend::parse(""), Err(BackendError::Empty));
        assert_eq!(Backend::parse("nats://,"), Err(BackendError::Empty));
        let e = Backend::parse("h1:4222").unwrap_err();
        assert!(e.to_string().contains("nats://host:port"), "{e}");
        let e = Backend::parse("nats://h1:4222,h2:notaport").unwrap_err();
        assert!(
            matches!(&e, BackendError::Address { entry, .. } if entry == "h2:notaport"),
            "{e}"
        );
    }
}
