//! The processes of `courier up`: builds, the broker, every instance.
//!
//! Each process runs in a process group of its own, so a signal reaches a
//! `sh -c` command and everything it started, and Ctrl-C at the terminal
//! reaches only `courier up`, which then stops the services first (SIGINT
//! to each group, SIGKILL after a grace period) and the broker last.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::config::{App, StateDir};
use super::output::{Output, Prefix};
use super::UpArgs;

/// How long a process may take to stop after SIGINT before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long the broker may take to say it listens.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// First and longest wait before restarting a crashed process.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A process that ran this long before exiting starts the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// How often the status line and `--watch` look again.
const POLL: Duration = Duration::from_secs(1);

/// Directories never watched: build output and state, not sources.
const UNWATCHED: [&str; 5] = ["target", ".git", ".courier", "node_modules", "__pycache__"];

/// The backoff before restart number `restarts` (0-based).
pub fn backoff(restarts: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1u32.checked_shl(restarts.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX)
}

pub async fn run(app: App, state: StateDir, args: &UpArgs) -> anyhow::Result<()> {
    let _lock = Lock::acquire(&state, args)?;
    let signalled = stop_on_signal();

    let mut names: Vec<String> = vec!["broker".into(), "build".into()];
    for (service, spec) in &app.services {
        names.extend((1..=spec.instances).map(|i| format!("{service}.{i}")));
    }
    let out = Output::new(names.iter().map(String::as_str));

    let mut building = signalled.clone();
    tokio::select! {
        built = build_all(&app, app.services.keys().cloned().collect(), &out) => built?,
        _ = building.wait_for(|s| *s) => {
            out.say("stopped while building; nothing else was started");
            return Ok(());
        }
    }

    let mut broker = start_broker(&state, args, &out).await?;
    out.say(&format!(
        "console: http://{}/ (metrics at /metrics; the admin token is in {})",
        args.http,
        state.path.join("tokens.toml").display()
    ));

    let (halt_tx, halt_rx) = watch::channel(false);
    let mut restarts = BTreeMap::new();
    let mut running = BTreeMap::new();
    let mut instances = Vec::new();
    for (index, (service, spec)) in app.services.iter().enumerate() {
        let (restart_tx, restart_rx) = watch::channel(0u64);
        restarts.insert(service.clone(), restart_tx);
        let count = Arc::new(AtomicUsize::new(0));
        running.insert(service.clone(), count.clone());
        for n in 1..=spec.instances {
            let mut env: Vec<(String, String)> = spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            env.push(("COURIER_URL".into(), args.listen.to_string()));
            env.push(("COURIER_SERVICE".into(), service.clone()));
            env.push(("COURIER_INSTANCE".into(), n.to_string()));
            if let Some(token) = state.tokens.get(service) {
                env.push(("COURIER_TOKEN".into(), token.clone()));
            }
            if let Some(port) = spec.http_port {
                let port = u32::from(port) + n - 1;
                env.push(("PORT".into(), port.to_string()));
                out.say(&format!("{service}.{n} is at http://127.0.0.1:{port}/"));
            }
            let name = format!("{service}.{n}");
            let instance = Instance {
                prefix: out.prefix(&name, index),
                name,
                command: spec.run.clone(),
                dir: app.service_dir(spec),
                env,
                running: count.clone(),
            };
            instances.push(tokio::spawn(supervise(
                instance,
                out.clone(),
                halt_rx.clone(),
                restart_rx.clone(),
            )));
        }
    }
    let total: u32 = app.services.values().map(|s| s.instances).sum();
    out.say(&format!(
        "started {total} instance(s) of {} service(s); Ctrl-C stops everything",
        app.services.len()
    ));
    let status = tokio::spawn(show_status(
        app.manifest.clone(),
        app.services
            .iter()
            .map(|(k, v)| (k.clone(), v.instances))
            .collect(),
        running,
        args.listen.to_string(),
        state.admin_token().map(str::to_string),
        out.clone(),
        halt_rx.clone(),
    ));
    let watcher = args.watch.then(|| {
        tokio::spawn(watch_sources(
            app,
            restarts.clone(),
            out.clone(),
            halt_rx.clone(),
        ))
    });

    let mut signalled = signalled;
    let broker_died = tokio::select! {
        _ = signalled.wait_for(|s| *s) => None,
        status = broker.wait() => Some(status),
    };
    out.say("stopping: services first, then the broker");
    let _ = halt_tx.send(true);
    for instance in instances {
        let _ = instance.await;
    }
    status.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    drop(restarts);
    if let Some(status) = broker_died {
        let how = status.map_or_else(|e| e.to_string(), describe);
        bail!("the broker stopped by itself ({how}); its lines above say why — fix that and run courier up again");
    }
    stop_process(&mut broker).await;
    out.say("stopped: every service and the broker have exited");
    Ok(())
}

/// `courier down`: asks the `courier up` holding the lock to stop, and
/// waits until it has.
pub async fn down(manifest: &Path) -> anyhow::Result<()> {
    let path = StateDir::for_manifest(manifest).join("up.lock");
    let shown = manifest.display();
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("courier: nothing is running for {shown} (courier up never ran there)");
            return Ok(());
        }
        Err(e) => return Err(e).context(format!("cannot open {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => {
            eprintln!("courier: nothing is running for {shown}");
            return Ok(());
        }
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).context(format!("cannot lock {}", path.display()))
        }
    }
    let holder = std::fs::read_to_string(&path).unwrap_or_default();
    let pid = holder
        .lines()
        .find_map(|l| l.strip_prefix("pid = "))
        .and_then(|p| p.trim().parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
        .with_context(|| format!("{} names no process; is it damaged?", path.display()))?;
    eprintln!(
        "courier: stopping courier up (pid {}) for {shown}…",
        pid.as_raw_nonzero()
    );
    rustix::process::kill_process(pid, rustix::process::Signal::INT)
        .with_context(|| format!("cannot signal pid {}", pid.as_raw_nonzero()))?;
    let deadline = Instant::now() + STOP_GRACE * 3;
    while Instant::now() < deadline {
        if file.try_lock().is_ok() {
            eprintln!("courier: stopped");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "courier up (pid {}) is still running after {}s; stop it with kill -9 {}",
        pid.as_raw_nonzero(),
        (STOP_GRACE * 3).as_secs(),
        pid.as_raw_nonzero()
    )
}

/// One `courier up` per directory: an exclusive lock on `.courier/up.lock`
/// (released by the OS however the process ends), naming its holder.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn acquire(state: &StateDir, args: &UpArgs) -> anyhow::Result<Lock> {
        let path = state.lock_path();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let pid = holder
                    .lines()
                    .find_map(|l| l.strip_prefix("pid = "))
                    .unwrap_or("?");
                let dir = args.dir.display();
                bail!(
                    "courier up is already running for {dir} (pid {pid}); stop it with \
                     `courier down {dir}` (or Ctrl-C in its terminal) before starting it again"
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).context(format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)?;
        write!(
            file,
            "pid = {}\nlisten = {}\nhttp = {}\n",
            std::process::id(),
            args.listen,
            args.http
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Lock { _file: file })
    }
}

/// Becomes true on SIGINT (Ctrl-C) or SIGTERM.
fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                let _ = tx.send(true);
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("courier: cannot watch for Ctrl-C ({e}); stop with courier down");
            }
        }
        // Keeps the channel open, so waiting receivers see the value.
        std::future::pending::<()>().await;
    });
    rx
}

/// `sh -c COMMAND` in `dir`, in a process group of its own.
fn spawn_process(
    command: &str,
    dir: &Path,
    env: &[(String, String)],
    prefix: &Prefix,
) -> std::io::Result<Child> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward(stdout, prefix.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward(stderr, prefix.clone()));
    }
    Ok(child)
}

/// Copies a process's lines to the terminal under its prefix.
async fn forward(stream: impl AsyncRead + Unpin, prefix: Prefix) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                prefix.line(text.trim_end_matches('\n'));
            }
        }
    }
}

fn signal_group(child_pid: Option<u32>, signal: rustix::process::Signal) -> bool {
    let Some(pid) = child_pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    rustix::process::kill_process_group(pid, signal).is_ok()
}

fn group_alive(child_pid: Option<u32>) -> bool {
    child_pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok())
}

/// SIGINT to the process's group; SIGKILL to what is left after the
/// grace period. Returns once the whole group is gone.
async fn stop_process(child: &mut Child) {
    let pid = child.id();
    signal_group(pid, rustix::process::Signal::INT);
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    // The shell may be gone while what it started still drains.
    while group_alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(pid, rustix::process::Signal::KILL);
    let _ = child.wait().await;
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(9)) => "killed by signal 9, SIGKILL".to_string(),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown status".to_string(),
    }
}

/// Runs every build command once (services sharing a command and
/// directory share the run), showing progress; fails naming the service.
async fn build_all(app: &App, services: Vec<String>, out: &Output) -> anyhow::Result<()> {
    let mut builds: Vec<(String, PathBuf, Vec<String>)> = Vec::new();
    for service in services {
        let Some(spec) = app.services.get(&service) else {
            continue;
        };
        let Some(build) = &spec.build else { continue };
        let dir = app.service_dir(spec);
        match builds.iter_mut().find(|(b, d, _)| b == build && *d == dir) {
            Some((_, _, names)) => names.push(service),
            None => builds.push((build.clone(), dir, vec![service])),
        }
    }
    let prefix = out.prefix("build", 5);
    for (command, dir, names) in builds {
        let who = names.join(", ");
        out.say(&format!("building {who}: {command} (in {})", dir.display()));
        let started = Instant::now();
        let mut child = spawn_process(&command, &dir, &[], &prefix).with_context(|| {
            format!(
                "cannot run the build of {who} in {}; check its dir in courier.toml",
                dir.display()
            )
        })?;
        // Long builds show they are alive.
        let mut ticker = tokio::time::interval(Duration::from_secs(15));
        ticker.tick().await;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status?,
                _ = ticker.tick() => out.say(&format!(
                    "still building {who} ({}s)…",
                    started.elapsed().as_secs()
                )),
            }
        };
        if !status.success() {
            bail!(
                "the build of {who} failed ({}): `{command}`; fix the errors above, then run courier up again",
                describe(status)
            );
        }
        out.say(&format!(
            "built {who} in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

async fn start_broker(state: &StateDir, args: &UpArgs, out: &Output) -> anyhow::Result<Child> {
    let exe =
        std::env::current_exe().context("cannot find the courier binary to run the broker")?;
    let prefix = out.prefix("broker", 4);
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--listen")
        .arg(args.listen.to_string())
        .arg("--http")
        .arg(args.http.to_string())
        .arg("--manifest")
        .arg(state.broker_manifest_path())
        .arg("--data-dir")
        .arg(state.data_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start the broker")?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward(stderr, prefix.clone()));
    }
    let stdout = child.stdout.take().context("the broker's output")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = async {
        while let Ok(Some(line)) = lines.next_line().await {
            prefix.line(&line);
            if line.starts_with("courier listening on") {
                return true;
            }
        }
        false
    };
    match tokio::time::timeout(BROKER_START_TIMEOUT, ready).await {
        Ok(true) => {}
        Ok(false) => {
            let status = child.wait().await.map(describe).unwrap_or_default();
            bail!(
                "the broker did not start ({status}); its lines above say why — if {} or {} is \
                 taken (another broker?), pick free ones with --listen and --http",
                args.listen,
                args.http
            );
        }
        Err(_) => {
            stop_process(&mut child).await;
            bail!(
                "the broker did not say it listens within {}s; its lines above say why",
                BROKER_START_TIMEOUT.as_secs()
            );
        }
    }
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            prefix.line(&line);
        }
    });
    Ok(child)
}

struct Instance {
    name: String,
    command: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
    prefix: Prefix,
    /// Running processes of the instance's service.
    running: Arc<AtomicUsize>,
}

enum Ended {
    Exited(std::io::Result<ExitStatus>),
    Halt,
    Restart,
}

/// Keeps one instance running until halted: restarts it with backoff
/// when it exits, and at once when `restart` ticks.
async fn supervise(
    instance: Instance,
    out: Output,
    mut halt: watch::Receiver<bool>,
    mut restart: watch::Receiver<u64>,
) {
    let name = &instance.name;
    let mut failures = 0u32;
    loop {
        if *halt.borrow() {
            return;
        }
        let mut child = match spawn_process(
            &instance.command,
            &instance.dir,
            &instance.env,
            &instance.prefix,
        ) {
            Ok(child) => child,
            Err(e) => {
                let delay = backoff(failures);
                failures += 1;
                out.say(&format!(
                    "{name}: cannot start `{}` in {} ({e}); check its run and dir in courier.toml; retrying in {delay:?}",
                    instance.command,
                    instance.dir.display()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = halt.wait_for(|h| *h) => return,
                }
            }
        };
        instance.running.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let ended = tokio::select! {
            status = child.wait() => Ended::Exited(status),
            _ = halt.wait_for(|h| *h) => Ended::Halt,
            _ = restart.changed() => Ended::Restart,
        };
        match ended {
            Ended::Halt => {
                stop_process(&mut child).await;
                instance.running.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            Ended::Restart => {
                out.say(&format!("{name}: restarting with what changed"));
                stop_process(&mut child).await;
                instance.running.fetch_sub(1, Ordering::Relaxed);
                failures = 0;
            }
            Ended::Exited(status) => {
                instance.running.fetch_sub(1, Ordering::Relaxed);
                // What the shell started may outlive it.
                signal_group(child.id(), rustix::process::Signal::KILL);
                if started.elapsed() >= HEALTHY_RUN {
                    failures = 0;
                }
                let delay = backoff(failures);
                failures += 1;
                let how = status.map_or_else(|e| e.to_string(), describe);
                out.say(&format!(
                    "{name} exited ({how}); restarting in {:.1}s (restart {failures})",
                    delay.as_secs_f64()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = halt.wait_for(|h| *h) => return,
                }
            }
        }
    }
}

/// Prints which services are up whenever that changes: for a service that
/// receives, its instances subscribed at the broker; for one that only
/// sends, its running processes.
async fn show_status(
    manifest: courier_manifest::Manifest,
    wanted: BTreeMap<String, u32>,
    running: BTreeMap<String, Arc<AtomicUsize>>,
    url: String,
    admin_token: Option<String>,
    out: Output,
    halt: watch::Receiver<bool>,
) {
    let mut opts = courier_client::ClientOptions::new(url, "");
    opts.token = admin_token;
    let client = courier_client::Client::connect(opts).await.ok();
    let mut last = String::new();
    let mut ticker = tokio::time::interval(POLL);
    while !*halt.borrow() {
        ticker.tick().await;
        let mut subscribed: BTreeMap<String, u64> = BTreeMap::new();
        if let Some(client) = &client {
            let listing = async {
                client
                    .command("courier.services.list")
                    .json(&serde_json::json!({}))?
                    .request()
                    .await?
                    .json::<serde_json::Value>()
            };
            if let Ok(serde_json::Value::Array(services)) = listing.await {
                for s in services {
                    if let (Some(name), Some(n)) = (
                        s["name"].as_str(),
                        s["instances"].as_array().map(|i| i.len() as u64),
                    ) {
                        subscribed.insert(name.to_string(), n);
                    }
                }
            }
        }
        let parts: Vec<String> = wanted
            .iter()
            .map(|(name, want)| {
                let receives = manifest
                    .services()
                    .get(name)
                    .is_some_and(|s| !s.receives.is_empty());
                let up = if receives {
                    subscribed.get(name).copied().unwrap_or(0)
                } else {
                    running
                        .get(name)
                        .map_or(0, |r| r.load(Ordering::Relaxed) as u64)
                };
                format!("{name} {up}/{want}")
            })
            .collect();
        let line = format!("up: {}", parts.join(", "));
        if line != last {
            out.say(&line);
            last = line;
        }
    }
}

/// The newest modification time and the number of files under `paths`.
fn fingerprint(paths: &[PathBuf]) -> (Option<SystemTime>, usize, Option<PathBuf>) {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut count = 0;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(&path) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !UNWATCHED.iter().any(|u| name == *u) {
                    stack.push(entry.path());
                }
            }
        } else {
            count += 1;
            if let Ok(modified) = meta.modified() {
                if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                    newest = Some((modified, path));
                }
            }
        }
    }
    let (time, path) = newest.map_or((None, None), |(t, p)| (Some(t), Some(p)));
    (time, count, path)
}

/// `--watch`: rebuilds a service and restarts its instances when a file
/// under its watch paths changes; a failed build keeps the old processes.
async fn watch_sources(
    app: App,
    restarts: BTreeMap<String, watch::Sender<u64>>,
    out: Output,
    halt: watch::Receiver<bool>,
) {
    let watched: Vec<(String, Vec<PathBuf>)> = app
        .services
        .iter()
        .map(|(name, spec)| {
            let dir = app.service_dir(spec);
            let paths = if spec.watch.is_empty() {
                vec![dir]
            } else {
                spec.watch.iter().map(|w| dir.join(w)).collect()
            };
            (name.clone(), paths)
        })
        .collect();
    let mut seen: BTreeMap<String, (Option<SystemTime>, usize)> = BTreeMap::new();
    for (name, paths) in &watched {
        let (time, count, _) = fingerprint(paths);
        seen.insert(name.clone(), (time, count));
    }
    out.say("watching the services' files; a change rebuilds and restarts that service");
    while !*halt.borrow() {
        tokio::time::sleep(POLL).await;
        for (name, paths) in &watched {
            let (time, count, newest) = fingerprint(paths);
            if seen.get(name) == Some(&(time, count)) {
                continue;
            }
            seen.insert(name.clone(), (time, count));
            let what = newest.map_or_else(|| "a file".to_string(), |p| p.display().to_string());
            out.say(&format!("{name}: {what} changed"));
            if let Err(e) = build_all(&app, vec![name.clone()], &out).await {
                out.say(&format!("{e:#}; {name} keeps running what it ran"));
                continue;
            }
            if let Some(restart) = restarts.get(name) {
                restart.send_modify(|n| *n += 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_up_to_ten() {
        let waits: Vec<u128> = (0..7).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
