//! The broker processes the bench starts, and their data directories.

use super::*;

// ---------------------------------------------------------------------------
// Broker processes and their data

/// A fresh directory under the system's temp dir, removed on drop.
pub(super) struct DataDir(PathBuf);

impl DataDir {
    pub(super) fn create() -> anyhow::Result<DataDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "courier-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Left by an earlier process that had our pid and was killed.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| {
            format!(
                "cannot create the data directory {}; point TMPDIR at a writable directory",
                path.display()
            )
        })?;
        Ok(DataDir(path))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }

    /// Bytes of all files under it.
    pub(super) fn size(&self) -> u64 {
        dir_bytes(&self.0)
    }
}

/// Bytes of all files under `dir`.
pub(super) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `127.0.0.1:<port>` with a port free right now.
pub(super) fn free_loopback_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot bind a loopback port to find a free one")?;
    Ok(listener.local_addr()?.to_string())
}

/// A server child process — the Courier broker or nats-server — and the
/// last lines of its stderr, to tell why it died; killed (SIGKILL) and
/// reaped on drop.
pub(super) struct ServerChild {
    /// How errors name it: "the broker", "nats-server".
    name: &'static str,
    child: Child,
    pub(super) spawned_at: Instant,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_closed: Arc<AtomicBool>,
}

impl ServerChild {
    /// Takes over `child`, spawned at `spawned_at` with its stderr piped: a
    /// thread keeps the last lines of that stderr, showing each line to
    /// `on_line` first.
    pub(super) fn new(
        name: &'static str,
        mut child: Child,
        spawned_at: Instant,
        mut on_line: impl FnMut(&str) + Send + 'static,
    ) -> ServerChild {
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_closed = Arc::new(AtomicBool::new(false));
        if let Some(stderr) = child.stderr.take() {
            let (tail, closed) = (stderr_tail.clone(), stderr_closed.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    on_line(&line);
                    let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                closed.store(true, Ordering::Release);
            });
        } else {
            stderr_closed.store(true, Ordering::Release);
        }
        ServerChild {
            name,
            child,
            spawned_at,
            stderr_tail,
            stderr_closed,
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn rss_mib(&self) -> anyhow::Result<f64> {
        rss_mib(self.pid())
    }

    /// Whether the process has exited (and is reaped).
    pub(super) fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// `kill -9` and reap.
    pub(super) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(super) fn stderr_lines(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub(super) fn stderr_note(&self) -> String {
        let lines = self.stderr_lines();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends: {}", lines.join(" | "))
        }
    }

    /// Once the process is gone: its exit status and the end of its stderr.
    pub(super) async fn exit_report(&mut self) -> String {
        let mut status: Option<ExitStatus> = None;
        for _ in 0..200 {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..100 {
            if self.stderr_closed.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = status.map_or_else(|| "still running".to_string(), |s| s.to_string());
        format!(" ({status}){}", self.stderr_note())
    }

    /// Runs `work`, but stops it as soon as the process exits: a dead
    /// server fails the run at once, not at a client timeout.
    pub(super) async fn watch<T>(
        &mut self,
        work: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        let why = self.exit_report().await;
                        bail!("{} exited in the middle of the run{why}", self.name);
                    }
                }
            }
        };
        self.explain(result).await
    }

    /// Adds the process's fate to an error if it died meanwhile.
    pub(super) async fn explain<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Ok(Some(_)) = self.child.try_wait() {
                    let why = self.exit_report().await;
                    Err(e.context(format!("{} died{why}", self.name)))
                } else {
                    Err(e)
                }
            }
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Whether the brokers the bench starts observe their traffic (the
/// default: the HTTP port on a port of its own, per-name metrics,
/// activity traces) or not (`--observability off`: none of these;
/// `traces-off`: no activity traces); set once, before the first broker
/// starts.
static OBSERVABILITY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

pub(super) fn set_observability(observability: super::Observability) {
    OBSERVABILITY.store(observability as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Set while the brokers started are the unobserved side of
/// `--observability compare`.
static UNOBSERVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Brokers started from now on are for `system`: the unobserved side of
/// a comparison gets `--observability off`'s flags, any other the bench's
/// `--observability`.
pub(super) fn observe_as(system: super::System) {
    UNOBSERVED.store(
        system == super::System::CourierUnobserved,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The observability flags of the brokers of a run with these systems.
pub(super) fn flags_described(systems: &[super::System]) -> String {
    let restore = UNOBSERVED.load(std::sync::atomic::Ordering::Relaxed);
    let mut described = Vec::new();
    for &system in systems {
        if system == super::System::Nats {
            continue;
        }
        observe_as(system);
        described.push(observability_flags().join(" "));
    }
    UNOBSERVED.store(restore, std::sync::atomic::Ordering::Relaxed);
    described.join(" (observed), or ")
        + if described.len() > 1 {
            " (unobserved)"
        } else {
            ""
        }
}

/// The `serve` flags for the bench's `--observability`.
pub(super) fn observability_flags() -> &'static [&'static str] {
    let unobserved = UNOBSERVED.load(std::sync::atomic::Ordering::Relaxed);
    match OBSERVABILITY.load(std::sync::atomic::Ordering::Relaxed) {
        _ if unobserved => &[
            "--http",
            "off",
            "--metrics-names-max",
            "0",
            "--trace",
            "off",
        ],
        x if x == super::Observability::Off as u8 => &[
            "--http",
            "off",
            "--metrics-names-max",
            "0",
            "--trace",
            "off",
        ],
        x if x == super::Observability::TracesOff as u8 => {
            &["--http", "127.0.0.1:0", "--trace", "off"]
        }
        _ => &["--http", "127.0.0.1:0"],
    }
}

/// A `courier serve` child process; killed (SIGKILL) and reaped on drop.
pub(super) struct BrokerProcess {
    pub(super) server: ServerChild,
    pub(super) addr: String,
    /// The `courier` binary it runs.
    exe: PathBuf,
    /// The first stdout line and when it was read; `None` at EOF.
    ready: Option<oneshot::Receiver<Option<(Instant, String)>>>,
    /// Its HTTP port, from the line after the ready line (none with
    /// `--http off`).
    http: Arc<std::sync::OnceLock<String>>,
    /// Whether it was started with an HTTP port.
    serves_http: bool,
}

/// The broker core's lock since the broker started, from `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct LockTotals {
    pub(super) takings: f64,
    pub(super) waited_seconds: f64,
    pub(super) held_seconds: f64,
}

impl LockTotals {
    /// Reads the three `courier_core_lock_*` counters of a metrics page.
    fn parse(page: &str) -> Option<LockTotals> {
        // `name{} 1.5` (the empty label set the server writes) or `name 1.5`.
        let value = |name: &str| {
            page.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?;
                let rest = rest.strip_prefix("{}").unwrap_or(rest);
                rest.strip_prefix(' ')?.trim().parse().ok()
            })
        };
        Some(LockTotals {
            takings: value("courier_core_lock_takings_total")?,
            waited_seconds: value("courier_core_lock_wait_seconds_total")?,
            held_seconds: value("courier_core_lock_held_seconds_total")?,
        })
    }

    /// What the lock did between `self` and `later`, `wall` apart: held and
    /// waited for as shares of one CPU, and takings a second.
    pub(super) fn describe_until(&self, later: &LockTotals, wall: Duration) -> String {
        let seconds = wall.as_secs_f64().max(1e-9);
        format!(
            "held {:.0} % of one CPU, waited for {:.1} %, taken {:.0} times a second",
            100.0 * (later.held_seconds - self.held_seconds) / seconds,
            100.0 * (later.waited_seconds - self.waited_seconds) / seconds,
            (later.takings - self.takings) / seconds
        )
    }
}

impl BrokerProcess {
    /// Spawns `exe serve` on `addr` with its log in `dir` and `extra`
    /// flags; does not wait.
    pub(super) fn spawn(
        exe: &Path,
        addr: &str,
        dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<BrokerProcess> {
        BrokerProcess::spawn_on(exe, addr, dir, &["--fsync", FSYNC], extra)
    }

    /// [`BrokerProcess::spawn`] with `store` for the store's flags in
    /// place of `--fsync` (a cluster node takes `--backend nats://…`,
    /// which refuses `--fsync`).
    pub(super) fn spawn_on(
        exe: &Path,
        addr: &str,
        dir: &Path,
        store: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<BrokerProcess> {
        let spawned_at = Instant::now();
        let mut child = Command::new(exe)
            .args(["serve", "--listen", addr])
            .args(store)
            .args(observability_flags())
            .args(extra)
            .arg("--data-dir")
            .arg(dir)
            .env("COURIER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the broker {} serve", exe.display()))?;
        let (tx, rx) = oneshot::channel();
        let http = Arc::new(std::sync::OnceLock::new());
        if let Some(stdout) = child.stdout.take() {
            let http = http.clone();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let first = lines.next().and_then(Result::ok);
                let _ = tx.send(first.map(|line| (Instant::now(), line)));
                // "courier http on http://ADDR/ (…)", printed right after.
                if let Some(Ok(line)) = lines.next() {
                    if let Some(addr) = line
                        .strip_prefix("courier http on http://")
                        .and_then(|rest| rest.split('/').next())
                    {
                        let _ = http.set(addr.to_string());
                    }
                }
                // Keep draining, so a later line never meets a full pipe.
                lines.for_each(drop);
            });
        }
        Ok(BrokerProcess {
            server: ServerChild::new("the broker", child, spawned_at, |_| {}),
            addr: addr.to_string(),
            exe: exe.to_path_buf(),
            ready: Some(rx),
            http,
            serves_http: observability_flags()
                .windows(2)
                .any(|flag| flag[0] == "--http" && flag[1] != "off"),
        })
    }

    /// Spawns a broker on a fresh port and waits until it is ready.
    pub(super) async fn start(
        exe: &Path,
        dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<BrokerProcess> {
        let mut broker = BrokerProcess::spawn(exe, &free_loopback_addr()?, dir, extra)?;
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// Waits for the ready line; returns the time since spawning.
    pub(super) async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
        let Some(rx) = self.ready.take() else {
            return Err(anyhow!("internal: the ready line was already awaited"));
        };
        match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(Some((at, line)))) => {
                if !line.starts_with("courier listening on") {
                    bail!(
                        "the broker's first line was {line:?}, not `courier listening on …`; is {} the courier binary?",
                        self.exe.display()
                    );
                }
                Ok(at.duration_since(self.server.spawned_at))
            }
            Ok(_) => {
                let why = self.server.exit_report().await;
                bail!("the broker exited before it was ready{why}")
            }
            Err(_) => bail!(
                "the broker printed no ready line within {} s{}",
                READY_TIMEOUT.as_secs(),
                self.server.stderr_note()
            ),
        }
    }

    pub(super) fn rss_mib(&self) -> anyhow::Result<f64> {
        self.server.rss_mib()
    }

    /// The core lock's counters now; `None` without an HTTP port or when
    /// the page cannot be read (the figure is for information only).
    pub(super) async fn lock_totals(&self) -> Option<LockTotals> {
        // The port's line follows the ready line: it may be a moment behind.
        let deadline = Instant::now() + Duration::from_secs(1);
        let http = loop {
            match self.http.get() {
                Some(http) => break http,
                None if self.serves_http && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                None => return None,
            }
        };
        let page = courier_client::http::get(http, "/metrics", None)
            .await
            .ok()?;
        LockTotals::parse(&page)
    }

    /// `kill -9` and reap.
    pub(super) fn kill9(&mut self) {
        self.server.kill9();
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

    /// The broker's own `recovered …` log line, if it printed one.
    pub(super) fn recovery_line(&self) -> Option<String> {
        self.server
            .stderr_lines()
            .into_iter()
            .find(|l| l.contains("recovered"))
            .map(|l| match l.find("recovered") {
                Some(i) => l[i..].to_string(),
                None => l,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_lock_counters_are_read_off_a_metrics_page_and_compared() {
        let page = |takings: u64, waited: f64, held: f64| {
            format!(
                "# TYPE courier_core_lock_takings counter\n\
                 courier_core_lock_takings_total{{}} {takings}\n\
                 courier_core_lock_takings_created 1.7e9\n\
                 courier_core_lock_wait_seconds_total {waited}\n\
                 courier_core_lock_held_seconds_total {held}\n"
            )
        };
        let before = LockTotals::parse(&page(1_000, 0.5, 2.0)).expect("counters");
        assert_eq!(before.takings, 1_000.0);
        let after = LockTotals::parse(&page(21_000, 0.52, 2.4)).expect("counters");
        assert_eq!(
            before.describe_until(&after, Duration::from_secs(2)),
            "held 20 % of one CPU, waited for 1.0 %, taken 10000 times a second"
        );
        assert_eq!(
            LockTotals::parse("courier_up 1\n"),
            None,
            "a broker without them"
        );
    }

    #[tokio::test]
    async fn a_broker_that_exits_before_its_ready_line_is_reported_with_its_stderr() {
        let dir = DataDir::create().expect("data dir");
        let path = dir.path().to_path_buf();
        // `sh serve --listen …` fails at once: there is no script `serve`.
        let err = BrokerProcess::start(Path::new("/bin/sh"), dir.path(), &[])
            .await
            .err()
            .expect("not a broker");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("the broker exited before it was ready (exit status: "),
            "{msg}"
        );
        assert!(
            msg.contains("its stderr ends: ") && msg.contains("serve"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        drop(dir);
        assert!(!path.exists(), "the data dir is removed on drop");
    }
}
