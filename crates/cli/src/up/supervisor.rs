//! The processes of `courier up`: each in a process group of its own, its
//! output prefixed line by line, restarted with backoff when it exits while
//! the application runs, and stopped group by group (SIGTERM, then SIGKILL
//! after a grace period) when it ends.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// First wait before a restart; doubled per quick crash, up to the max.
const RESTART_DELAY_MIN: Duration = Duration::from_millis(500);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long is healthy again: its next crash waits
/// the shortest delay.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// How long a stopped process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How a process of the application is started.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `todo.1`: what its output lines are prefixed with.
    pub label: String,
    pub command: String,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
}

/// Output prefixes: padded to one width, coloured when writing to a
/// terminal (and `NO_COLOR` is unset).
#[derive(Clone)]
pub struct Prefixer {
    width: usize,
    colour: bool,
    next: Arc<AtomicUsize>,
}

const COLOURS: [u8; 6] = [36, 33, 32, 35, 34, 31];

impl Prefixer {
    pub fn new(labels: &[&str]) -> Prefixer {
        Prefixer {
            width: labels.iter().map(|l| l.chars().count()).max().unwrap_or(0),
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether output goes out without colours.
    pub fn plain(&self) -> bool {
        !self.colour
    }

    pub fn prefix(&self, label: &str) -> String {
        let padded = format!("{label:<width$} |", width = self.width);
        if self.colour {
            let colour = COLOURS[self.next.fetch_add(1, Ordering::Relaxed) % COLOURS.len()];
            format!("\x1b[{colour}m{padded}\x1b[0m")
        } else {
            padded
        }
    }
}

/// Copies `from` to stdout, each line after `prefix`.
pub fn forward(from: impl AsyncRead + Unpin + Send + 'static, prefix: String) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    println!("{prefix} {}", text.trim_end_matches(['\n', '\r']));
                }
            }
        }
    });
}

/// Starts `spec` in a process group of its own, its output forwarded.
pub fn spawn(spec: &Spec, prefix: &str) -> anyhow::Result<Child> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&spec.command)
        .current_dir(&spec.dir)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} ({:?} in {}); is sh on the PATH and the directory there?",
                spec.label,
                spec.command,
                spec.dir.display()
            )
        })?;
    if let Some(out) = child.stdout.take() {
        forward(out, prefix.to_string());
    }
    if let Some(err) = child.stderr.take() {
        forward(err, prefix.to_string());
    }
    Ok(child)
}

/// Sends `signal` to the process group led by `pid`.
pub async fn signal_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// SIGTERM to the child's group, SIGKILL after `STOP_GRACE`; waits for it.
pub async fn stop(child: &mut Child, label: &str, out: &Prefixer) {
    let Some(pid) = child.id() else {
        return;
    };
    signal_group(pid, "TERM").await;
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            println!(
                "{} did not stop within {}s of SIGTERM; killed",
                out.prefix(label),
                STOP_GRACE.as_secs()
            );
            signal_group(pid, "KILL").await;
            let _ = child.wait().await;
        }
    }
    // Whatever the shell left behind in its group goes too.
    signal_group(pid, "KILL").await;
}

/// Resolves once `stopping` is true (or its sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Runs one instance until `stopping` turns true: restarted with backoff
/// whenever it exits, and stopped gracefully at the end.
/// `restart` moving on (`courier up --watch` saw the service's files
/// change and rebuilt it) restarts the instance at once.
pub async fn supervise(
    spec: Spec,
    out: Prefixer,
    mut stopping: watch::Receiver<bool>,
    mut restart: watch::Receiver<u64>,
) {
    let prefix = out.prefix(&spec.label);
    let mut delay = RESTART_DELAY_MIN;
    let mut restarts = 0u32;
    loop {
        let started = Instant::now();
        let mut child = match spawn(&spec, &prefix) {
            Ok(child) => child,
            Err(e) => {
                println!("{prefix} {e:#}");
                return;
            }
        };
        restart.mark_unchanged();
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stopped(&mut stopping) => {
                stop(&mut child, &spec.label, &out).await;
                return;
            }
            Ok(()) = restart.changed() => {
                println!("{prefix} {} restarting: its files changed", spec.label);
                stop(&mut child, &spec.label, &out).await;
                delay = RESTART_DELAY_MIN;
                continue;
            }
        };
        let how = match status {
            Ok(s) => match s.code() {
                Some(code) => format!("exited with status {code}"),
                None => format!("was killed ({s})"),
            },
            Err(e) => format!("could not be waited for ({e})"),
        };
        if started.elapsed() >= HEALTHY_AFTER {
            delay = RESTART_DELAY_MIN;
        }
        restarts += 1;
        println!(
            "{prefix} {} {how}; restarting in {} (restart {restarts})",
            spec.label,
            humantime::format_duration(delay)
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stopping) => return,
        }
        delay = (delay * 2).min(RESTART_DELAY_MAX);
    }
}

/// How often [`show_status`] asks the broker.
const STATUS_POLL: Duration = Duration::from_secs(1);

/// The status line: each service's instances connected to the broker out
/// of those started, as the broker lists them (`courier.services.list`).
pub fn status_line(
    wanted: &std::collections::BTreeMap<String, u32>,
    listing: &serde_json::Value,
) -> String {
    let connected = |name: &str| {
        listing
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .and_then(|s| s["instances"].as_array())
            .map_or(0, Vec::len)
    };
    let parts: Vec<String> = wanted
        .iter()
        .map(|(name, n)| format!("{name} {}/{n}", connected(name)))
        .collect();
    format!("courier up: up: {}", parts.join(", "))
}

/// Prints which services are up, each time that changes, until `stop`.
pub async fn show_status(
    wanted: std::collections::BTreeMap<String, u32>,
    url: String,
    admin_token: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut opts = courier_client::ClientOptions::new(url, "");
    opts.token = admin_token;
    let Ok(client) = courier_client::Client::connect(opts).await else {
        return;
    };
    let mut shown = String::new();
    loop {
        let listing = async {
            client
                .command("courier.services.list")
                .json(&serde_json::json!({}))?
                .request()
                .await?
                .json::<serde_json::Value>()
        };
        if let Ok(listing) = listing.await {
            let line = status_line(&wanted, &listing);
            if line != shown {
                println!("{line}");
                shown = line;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_POLL) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_counts_connected_instances_out_of_those_started() {
        let wanted = [("todo".to_string(), 2), ("web".to_string(), 1)].into();
        let listing = serde_json::json!([
            {"name": "admin", "instances": ["admin-1"]},
            {"name": "todo", "instances": ["todo-3"], "patterns": ["todo.create"]},
        ]);
        assert_eq!(
            status_line(&wanted, &listing),
            "courier up: up: todo 1/2, web 0/1"
        );
    }
}
