//! Real `courier` processes for end-to-end tests.
#![allow(dead_code)] // each test file uses a different part

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod webdriver;

/// A HELLO frame of the current protocol version from `service` (no
/// credentials), for tests that speak the protocol byte by byte.
pub fn hello_frame(service: &str) -> Vec<u8> {
    hello_frame_of_version(service, courier_client::proto::PROTOCOL_VERSION)
}

/// [`hello_frame`] asking for protocol `version`.
pub fn hello_frame_of_version(service: &str, version: u16) -> Vec<u8> {
    use courier_client::proto::{Credentials, Frame, FrameWriter, Hello};
    let mut w = FrameWriter::new();
    w.push(&Frame::Hello(Hello {
        version,
        service: service.into(),
        instance: String::new(),
        max_in_flight: 0,
        credentials: Credentials::None,
    }))
    .expect("encode");
    w.take().to_vec()
}

/// `courier token new`: a new token and its hash (`sha256:…`), as a
/// manifest names it.
pub fn token_pair() -> (String, String) {
    let out = Command::new(courier_bin())
        .args(["token", "new"])
        .output()
        .expect("run courier token new");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let token = lines.next().expect("a token line").to_string();
    let hash = lines.next().expect("a hash line").to_string();
    assert!(
        hash.starts_with("sha256:") && hash.len() == 7 + 64,
        "{hash}"
    );
    assert_ne!(token, hash);
    (token, hash)
}

pub fn courier_bin() -> &'static str {
    env!("CARGO_BIN_EXE_courier")
}

/// A broker process; killed with SIGKILL on drop.
pub struct Broker {
    pub child: Child,
    pub addr: String,
    pub data_dir: tempdir::Dir,
    /// The HTTP port (`http://…/`), unless started with `--http off`.
    pub http: Option<String>,
}

/// `serve` flags for the HTTP port: a free one, unless the test chose.
fn http_flags(extra: &[&str]) -> Vec<&'static str> {
    if extra.contains(&"--http") {
        Vec::new()
    } else {
        vec!["--http", "127.0.0.1:0"]
    }
}

/// The HTTP line that follows the ready line, when the port is on.
fn http_line(extra: &[&str], lines: &mut std::io::Lines<BufReader<ChildStdout>>) -> Option<String> {
    let off = extra.windows(2).any(|w| w[0] == "--http" && w[1] == "off");
    if off {
        return None;
    }
    let line = lines.next()?.ok()?;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(str::to_string);
    assert!(
        url.is_some(),
        "the line after the ready line names the HTTP port: {line:?}"
    );
    url
}

pub mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            // Tests of one binary run in parallel and the clock's
            // resolution can give two of them the same instant: the counter
            // keeps their directories apart.
            static CREATED: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "courier-test-{tag}-{}-{}-{}",
                std::process::id(),
                CREATED.fetch_add(1, Ordering::Relaxed),
                uuid_like()
            ));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Dir(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn uuid_like() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }
}

/// A free loopback port (racy in theory; fine for tests on one machine).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(
            &format!("127.0.0.1:{}", free_port()),
            tempdir::Dir::new("broker"),
        )
    }

    /// Starts a broker with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Broker {
        Broker::start_full(
            &format!("127.0.0.1:{}", free_port()),
            tempdir::Dir::new("broker"),
            extra,
        )
    }

    /// Starts `courier serve` and waits for its ready line.
    pub fn start_on(listen: &str, data_dir: tempdir::Dir) -> Broker {
        Broker::start_full(listen, data_dir, &[])
    }

    /// Starts a broker with extra `serve` flags that logs everything, at
    /// trace level, to `log`.
    pub fn start_logging_to(log: &std::path::Path, extra: &[&str]) -> Broker {
        let file = std::fs::File::create(log).expect("create the log file");
        Broker::start_logging(
            &format!("127.0.0.1:{}", free_port()),
            tempdir::Dir::new("broker"),
            extra,
            "trace",
            Stdio::from(file),
        )
    }

    /// A broker whose allocator gives freed pages back to the OS at once
    /// (jemalloc's `dirty_decay_ms:0`; the build's default keeps them
    /// about a second): its RSS is then what it holds, not also the
    /// buffers a burst freed a moment ago — for tests that bound it.
    pub fn start_freeing_at_once() -> Broker {
        let level = std::env::var("COURIER_E2E_LOG").unwrap_or_else(|_| "warn".to_string());
        Broker::start_logging_env(
            &format!("127.0.0.1:{}", free_port()),
            tempdir::Dir::new("broker"),
            &[],
            &level,
            Stdio::inherit(),
            &[("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")],
        )
    }

    /// [`Broker::start_on`] with extra `serve` flags.
    pub fn start_on_with(listen: &str, data_dir: tempdir::Dir, extra: &[&str]) -> Broker {
        Broker::start_full(listen, data_dir, extra)
    }

    /// Logs to the test's stderr at level `warn`, or as
    /// `COURIER_E2E_LOG` says (e.g. `info`, for a failure to look into).
    fn start_full(listen: &str, data_dir: tempdir::Dir, extra: &[&str]) -> Broker {
        let level = std::env::var("COURIER_E2E_LOG").unwrap_or_else(|_| "warn".to_string());
        Broker::start_logging(listen, data_dir, extra, &level, Stdio::inherit())
    }

    fn start_logging(
        listen: &str,
        data_dir: tempdir::Dir,
        extra: &[&str],
        level: &str,
        stderr: Stdio,
    ) -> Broker {
        Broker::start_logging_env(listen, data_dir, extra, level, stderr, &[])
    }

    fn start_logging_env(
        listen: &str,
        data_dir: tempdir::Dir,
        extra: &[&str],
        level: &str,
        stderr: Stdio,
        envs: &[(&str, &str)],
    ) -> Broker {
        let mut child = Command::new(courier_bin())
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir.path())
            .args(http_flags(extra))
            .args(extra)
            .env("COURIER_LOG", level)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn courier serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next().expect("ready line").expect("read ready line");
        assert!(
            ready.contains(listen),
            "ready line {ready:?} names the address {listen}"
        );
        let http = http_line(extra, &mut lines);
        // Keep draining stdout so a later line never meets a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Broker {
            child,
            addr: listen.to_string(),
            data_dir,
            http,
        }
    }

    /// `kill -9`, then start again on the same address and data dir.
    pub fn crash_and_restart(mut self) -> Broker {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data_dir = std::mem::replace(&mut self.data_dir, tempdir::Dir::new("moved"));
        Broker::start_on(&self.addr, data_dir)
    }

    /// A `courier` client command against this broker.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(courier_bin());
        cmd.args(args)
            .env("COURIER_URL", &self.addr)
            .env_remove("COURIER_SERVICE");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cli(args).output().expect("run courier")
    }

    /// Starts a long-running client command with its stdout piped.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        spawn_client(self.cli(args))
    }
}

/// Starts a long-running client command with its stdout and stderr piped.
pub fn spawn_client(mut command: Command) -> Proc {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || forward_lines(stdout, tx));
    let stderr = child.stderr.take().expect("stderr");
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || forward_lines(stderr, etx));
    Proc {
        child,
        lines: rx,
        errors: erx,
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines<R: Read>(from: R, to: mpsc::Sender<String>) {
    for line in BufReader::new(from).lines() {
        let Ok(line) = line else { return };
        if to.send(line).is_err() {
            return;
        }
    }
}

/// A running client process; SIGKILLed on drop.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    errors: mpsc::Receiver<String>,
}

impl Proc {
    /// The next stdout line, parsed as JSON.
    pub fn json_line(&self, timeout: Duration) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(timeout)
            .expect("a line on stdout in time");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("line {line:?} is not JSON: {e}"))
    }

    /// Every stdout line still to come, as JSON, until the process's
    /// stdout closes (call after it exited or was killed).
    pub fn rest(&self, timeout: Duration) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        loop {
            match self.lines.recv_timeout(timeout) {
                Ok(line) => out.push(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("line {line:?} is not JSON: {e}")),
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("stdout still open after {timeout:?}")
                }
            }
        }
    }

    /// The next stdout line as JSON, if one comes within `wait`.
    pub fn try_json_line(&self, wait: Duration) -> Option<serde_json::Value> {
        let line = self.lines.recv_timeout(wait).ok()?;
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("line {line:?} is not JSON: {e}")),
        )
    }

    pub fn no_line(&self, wait: Duration) -> bool {
        self.lines.recv_timeout(wait).is_err()
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.errors.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => continue,
                Err(_) => panic!("no stderr line containing {needle:?} within {timeout:?}"),
            }
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unused)]
pub type Lines = ChildStdout;

/// Parses every stdout line of a finished command as JSON.
pub fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?} is not JSON: {e}")))
        .collect()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A broker's stderr, collected line by line as it comes (ANSI colour
/// codes removed), for tests that check what it reports.
#[derive(Clone, Default)]
pub struct StderrLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl StderrLog {
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits until a line contains every one of `needles`; returns it.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(line);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

impl Broker {
    /// Like [`Broker::start_on`] at log level `info`, with stderr collected
    /// instead of inherited.
    pub fn start_watched(listen: &str, data_dir: tempdir::Dir) -> (Broker, StderrLog) {
        Broker::start_watched_with(listen, data_dir, &[])
    }

    /// [`Broker::start_watched`] with extra `serve` flags.
    pub fn start_watched_with(
        listen: &str,
        data_dir: tempdir::Dir,
        extra: &[&str],
    ) -> (Broker, StderrLog) {
        let mut child = Command::new(courier_bin())
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir.path())
            .args(http_flags(extra))
            .args(extra)
            .env("COURIER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn courier serve");
        let log = StderrLog::default();
        let stderr = child.stderr.take().expect("stderr");
        let lines = log.0.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                lines
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(strip_ansi(&line));
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = match lines.next() {
            Some(Ok(line)) => line,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                // The process is gone, so its stderr ends: every line it
                // wrote is in the log once the reader returns.
                let _ = stderr_reader.join();
                panic!(
                    "courier serve printed no ready line; its stderr:\n{}",
                    log.text()
                );
            }
        };
        assert!(
            ready.contains(listen),
            "ready line {ready:?} names the address {listen}"
        );
        let http = http_line(extra, &mut lines);
        std::thread::spawn(move || lines.for_each(drop));
        (
            Broker {
                child,
                addr: listen.to_string(),
                data_dir,
                http,
            },
            log,
        )
    }

    /// `kill -9`; hands back the data directory, for a restart on it.
    pub fn kill9(mut self) -> tempdir::Dir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.data_dir, tempdir::Dir::new("moved"))
    }

    /// SIGTERM (a graceful stop: the broker saves a snapshot), waits for the
    /// exit and hands back the data directory and the exit code.
    pub fn terminate(mut self, timeout: Duration) -> (tempdir::Dir, Option<i32>) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = std::time::Instant::now() + timeout;
        let code = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "courier serve did not stop within {timeout:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let dir = std::mem::replace(&mut self.data_dir, tempdir::Dir::new("moved"));
        (dir, code)
    }
}

/// Resident memory of a process in bytes, from /proc (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

/// One HTTP/1.1 exchange on a port (`http://host:port/`): the status,
/// the head and the body as it came (chunks not put together).
pub fn http_exchange(
    http: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use std::io::Write;
    let addr = http.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head.to_string(), body.to_string())
}

/// An HTTP call to the broker's port: (status, content type, body).
pub fn http_call(
    http: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let (status, head, body) = http_exchange(http, method, path, headers, body);
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body)
}

/// `GET path` on an HTTP port (`http://host:port/`) with an optional
/// bearer token: (status, body). Bodies sent chunked are put together.
pub fn http_get(http: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let (status, head, body) = http_exchange(http, "GET", path, &headers, "");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return (status, body);
    }
    let mut rest = body.as_str();
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return (status, out);
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// The value of an unlabelled sample (`name value` or `name{} value`)
/// in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix("{}").unwrap_or(rest);
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with
/// `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    wait_until(what, timeout, || check().ok_or("no"))
}

/// Polls `check` every 50 ms until it returns `Ok`, or panics after
/// `timeout` with `what` and the last `Err`: what was seen instead.
pub fn wait_until<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(found) => return found,
            Err(last) => assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within {timeout:?}; last seen: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_for`] for async tests: polls `check` every 50 ms without
/// blocking the runtime, until it returns `Some`, or panics with `what`
/// after `timeout`.
pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Broker {
    /// Waits until `service` has at least `n` consuming instances, as the
    /// broker's `/metrics` says (under a manifest, pass an admin token): the
    /// readiness signal for a subscriber started in another process.
    pub fn wait_consumers(&self, service: &str, n: u64, admin_token: Option<&str>) {
        let http = self
            .http
            .as_deref()
            .expect("wait_consumers needs the broker's HTTP port");
        let series = format!("courier_subscription_consumers{{service=\"{service}\"}}");
        wait_for(
            &format!("{n} consumer(s) of {service}"),
            Duration::from_secs(10),
            || {
                let (status, body) = http_get(http, "/metrics", admin_token);
                assert_eq!(status, 200, "/metrics: {body}");
                let consumers = metric(&body, &series).unwrap_or(0.0);
                (consumers >= n as f64).then_some(())
            },
        );
    }
}

/// Writes `courier.toml` into `dir`: service `service` with its `rules`
/// (TOML lines such as `sends = ["x.y"]`) and token `service_token`, and
/// an `[admin]` with `admin_token`. Returns its path, for `--manifest`.
pub fn manifest_with_admin(
    dir: &tempdir::Dir,
    service: &str,
    rules: &str,
    service_token: &str,
    admin_token: &str,
) -> String {
    let path = dir.path().join("courier.toml");
    std::fs::write(
        &path,
        format!(
            "[services.{service}]\n{rules}\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            courier_manifest::hash_token(service_token),
            courier_manifest::hash_token(admin_token),
        ),
    )
    .expect("write the manifest");
    path.to_str().expect("a UTF-8 path").to_string()
}
