//! `courier bench --only clients`: the Python and TypeScript clients'
//! pipelined publish and consume rates beside the Rust SDK's.
//!
//! Each run of each client gets a broker of its own, started as every
//! bench broker is (this binary, `serve --fsync always`, a fresh data
//! directory), and runs the same three workloads with the same message
//! count and size: quiet transient publishes then one flush; durable
//! publishes to a subscribed service with up to [`CLIENT_WINDOW`]
//! awaiting acceptance; and that backlog consumed (acked) with
//! [`CLIENT_MAX_IN_FLIGHT`] deliveries outstanding. The Python and
//! TypeScript sides are the clients' own bench scripts
//! (`clients/python/bench.py`, `clients/typescript/bench.mjs`) run with
//! `--json` against that broker; the Rust side runs in this process.
//! Runs interleave client by client, so a change in the machine's load
//! falls on all three columns.

use super::courier::{connect, publish_pipelined, subscribe_offline};
use super::process::{BrokerProcess, DataDir};
use super::*;

/// Messages per workload, and `--quick`'s share of them.
const CLIENT_MESSAGES: u64 = 200_000;
const CLIENT_PAYLOAD_BYTES: usize = 100;
/// Durable sends awaiting acceptance at once (the scripts' default).
const CLIENT_WINDOW: usize = 10_000;
/// Deliveries the consumer takes at once (the scripts' default).
const CLIENT_MAX_IN_FLIGHT: u32 = 4096;
/// The target: quiet publishes a second from one Python process.
const PYTHON_PUBLISH_GOAL: f64 = 100_000.0;

const WORKLOADS: [(&str, &str); 3] = [
    ("publish_quiet", "publish, transient quiet sends, one flush"),
    (
        "publish_durable",
        "publish, durable, pipelined (to a subscribed service)",
    ),
    ("consume_durable", "consume that backlog, acked"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Rust,
    Python,
    TypeScript,
}

impl Side {
    const ALL: [Side; 3] = [Side::Rust, Side::Python, Side::TypeScript];

    fn title(self) -> &'static str {
        match self {
            Side::Rust => "Rust SDK",
            Side::Python => "Python",
            Side::TypeScript => "TypeScript",
        }
    }
}

/// One workload's run: messages, wall seconds, the client's CPU seconds.
#[derive(Clone, Copy, Debug)]
struct Figure {
    count: u64,
    seconds: f64,
    cpu_seconds: f64,
}

/// How to run a client's bench script, or what to install first.
enum Runner {
    Ready(Command),
    Missing(String),
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients")
}

/// The Python interpreter: `$COURIER_PYTHON` (scripts/test.sh sets it to
/// its virtualenv), else `python3`.
fn python_runner(script: &Path) -> Runner {
    let python = std::env::var("COURIER_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let probe = Command::new(&python)
        .args([
            "-c",
            "import sys; assert sys.version_info >= (3, 10), 'python 3.10 or newer'; import courier_client",
        ])
        .output();
    match probe {
        Err(_) => Runner::Missing(format!(
            "Python: no `{python}` to run; install Python 3.10 or newer (Debian: apt-get install python3 python3-venv), then `python3 -m pip install -e clients/python`"
        )),
        Ok(out) if !out.status.success() => {
            let why = String::from_utf8_lossy(&out.stderr);
            let why = why.lines().last().unwrap_or("").trim();
            Runner::Missing(format!(
                "Python: `{python}` cannot import the client ({why}); install it with `{python} -m pip install -e clients/python` (Python 3.10 or newer), or set COURIER_PYTHON to an interpreter that has it (scripts/test.sh makes one in $CARGO_TARGET_DIR/python-venv)"
            ))
        }
        Ok(_) if !script.exists() => Runner::Missing(format!(
            "Python: no bench script at {}; run the bench from a source checkout",
            script.display()
        )),
        Ok(_) => {
            let mut command = Command::new(python);
            command.arg(script);
            Runner::Ready(command)
        }
    }
}

/// Node 20 or newer, and the client built into `dist/`.
fn node_runner(script: &Path) -> Runner {
    let probe = Command::new("node")
        .args([
            "-e",
            "process.exit(Number(process.versions.node.split('.')[0]) >= 20 ? 0 : 1)",
        ])
        .output();
    let dir = script.parent().unwrap_or(Path::new("."));
    match probe {
        Err(_) => Runner::Missing(
            "TypeScript: no `node` to run; install Node.js 20 or newer with npm (https://nodejs.org; Debian: apt-get install nodejs npm), then `cd clients/typescript && npm ci && npm run build`".to_string(),
        ),
        Ok(out) if !out.status.success() => Runner::Missing(
            "TypeScript: `node` is older than 20; install Node.js 20 or newer (https://nodejs.org)".to_string(),
        ),
        Ok(_) if !script.exists() => Runner::Missing(format!(
            "TypeScript: no bench script at {}; run the bench from a source checkout",
            script.display()
        )),
        Ok(_) if !dir.join("dist/src/index.js").exists() || !dir.join("node_modules").exists() => {
            Runner::Missing(format!(
                "TypeScript: the client is not built; run `cd {} && npm ci && npm run build`",
                dir.display()
            ))
        }
        Ok(_) => {
            let mut command = Command::new("node");
            command.arg(script);
            Runner::Ready(command)
        }
    }
}

pub(super) async fn run(
    exe: &Path,
    quick: bool,
    scale: f64,
    runs: u32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let divisor = if quick { QUICK_DIVISOR } else { 1.0 };
    let count = ((CLIENT_MESSAGES as f64 / divisor * scale) as u64).max(MIN_MESSAGES);
    let dir = clients_dir();
    let mut runners = [
        (Side::Python, python_runner(&dir.join("python/bench.py"))),
        (
            Side::TypeScript,
            node_runner(&dir.join("typescript/bench.mjs")),
        ),
    ];
    let missing: Vec<String> = runners
        .iter()
        .filter_map(|(_, r)| match r {
            Runner::Missing(what) => Some(what.clone()),
            Runner::Ready(_) => None,
        })
        .collect();
    for what in &missing {
        progress(&format!("not run: {what}"));
    }
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build; for figures build with `cargo build --release -p courier-cli -p courier-bench`",
        );
    }
    let load_at_start = load_average();
    let mut figures: Vec<(Side, &str, Figure)> = Vec::new();
    for run in 1..=runs {
        for side in Side::ALL {
            let which = format!("{} run {run}/{runs}", side.title());
            let data = DataDir::create()?;
            let mut broker = BrokerProcess::start(exe, data.path(), &[]).await?;
            let addr = broker.addr.clone();
            progress(&format!(
                "{which}: {count} messages of {CLIENT_PAYLOAD_BYTES} B …"
            ));
            let work = async {
                match side {
                    Side::Rust => rust_side(&addr, count).await,
                    _ => {
                        let Some((_, Runner::Ready(command))) =
                            runners.iter_mut().find(|(s, _)| *s == side)
                        else {
                            return Ok(Vec::new());
                        };
                        script_side(command, &addr, count).await
                    }
                }
            };
            let measured = tokio::time::timeout(timeout, broker.watch(work))
                .await
                .map_err(|_| {
                    anyhow!(
                        "{which} did not finish within {} (--timeout)",
                        humantime::format_duration(timeout)
                    )
                })?
                .with_context(|| which.clone())?;
            for (workload, figure) in measured {
                let Some((name, _)) = WORKLOADS.iter().find(|(n, _)| *n == workload) else {
                    continue;
                };
                progress(&format!(
                    "{which}: {name} {:.0} msg/s",
                    figure.count as f64 / figure.seconds
                ));
                figures.push((side, name, figure));
            }
        }
    }
    println!(
        "{}",
        table(&figures, count, runs, &load_at_start, &load_average())
    );
    let python_quiet = median_rate(&figures, Side::Python, "publish_quiet");
    if let Some(rate) = python_quiet {
        println!(
            "goal: ≥ {PYTHON_PUBLISH_GOAL:.0} msg/s publish (quiet) from one Python process: {}",
            match (quick, rate >= PYTHON_PUBLISH_GOAL) {
                (true, _) => "not judged (--quick)",
                (false, true) => "met in the median of these runs",
                (false, false) => "NOT met in the median of these runs",
            }
        );
    }
    if !missing.is_empty() {
        bail!(
            "some clients were not measured; install what they need and run again:\n  {}",
            missing.join("\n  ")
        );
    }
    Ok(())
}

/// The same three workloads through the Rust SDK, in this process.
async fn rust_side(addr: &str, count: u64) -> anyhow::Result<Vec<(String, Figure)>> {
    let payload = Bytes::from(vec![b'x'; CLIENT_PAYLOAD_BYTES]);
    subscribe_offline(addr, "bench-sink", "bench.durable").await?;
    let publisher = connect(addr, "bench-pub", None).await?;
    let mut out = Vec::new();

    let cpu = process_cpu_seconds();
    let started = Instant::now();
    for i in 0..count {
        // Ready at once unless the connection's queue is full; one flush
        // at the end confirms them all, as the scripts do.
        publisher
            .event("bench.quiet")
            .payload(payload.clone())
            .transient()
            .send_quiet()
            .await
            .with_context(|| format!("quiet publish {} of {count} failed", i + 1))?;
    }
    publisher
        .flush()
        .await
        .context("the quiet publishes' flush failed")?;
    out.push(figure("publish_quiet", count, started, cpu));
    if publisher.unheard_refusals() > 0 {
        bail!(
            "the broker refused {} quiet sends: {:?}",
            publisher.unheard_refusals(),
            publisher.last_unheard_refusal()
        );
    }

    let cpu = process_cpu_seconds();
    let started = Instant::now();
    publish_pipelined(&publisher, "bench.durable", &payload, count, CLIENT_WINDOW).await?;
    out.push(figure("publish_durable", count, started, cpu));
    publisher.shutdown().await;

    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let sink = connect(addr, "bench-sink", Some(CLIENT_MAX_IN_FLIGHT)).await?;
    let cpu = process_cpu_seconds();
    let started = Instant::now();
    {
        let (received, done) = (received.clone(), done.clone());
        sink.on("bench.durable", move |_msg| {
            if received.fetch_add(1, Ordering::Relaxed) + 1 == count {
                done.notify_one();
            }
            async { Ok::<(), courier_client::Error>(()) }
        })
        .await
        .context("cannot subscribe the consumer")?;
    }
    if received.load(Ordering::Relaxed) < count {
        done.notified().await;
    }
    out.push(figure("consume_durable", count, started, cpu));
    sink.shutdown().await;
    Ok(out)
}

fn figure(workload: &str, count: u64, started: Instant, cpu_before: f64) -> (String, Figure) {
    (
        workload.to_string(),
        Figure {
            count,
            seconds: started.elapsed().as_secs_f64(),
            cpu_seconds: process_cpu_seconds() - cpu_before,
        },
    )
}

/// This process's user and system CPU time (Linux; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The fields after the command's closing parenthesis: utime and stime
    // are the 12th and 13th of them, in ticks of 1/100 s.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs a client's bench script against `addr` and reads its JSON lines.
async fn script_side(
    command: &Command,
    addr: &str,
    count: u64,
) -> anyhow::Result<Vec<(String, Figure)>> {
    let mut command = tokio::process::Command::from(clone_command(command));
    command
        .args(["--url", addr, "--json", "--count"])
        .arg(count.to_string())
        .args(["--payload", &CLIENT_PAYLOAD_BYTES.to_string()])
        .args(["--window", &CLIENT_WINDOW.to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let shown = format!("{command:?}");
    let out = command
        .output()
        .await
        .with_context(|| format!("cannot run {shown}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(STDERR_TAIL_LINES).collect();
        bail!(
            "{shown} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    parse_lines(&stdout).with_context(|| format!("reading what {shown} printed"))
}

fn clone_command(command: &Command) -> Command {
    let mut copy = Command::new(command.get_program());
    copy.args(command.get_args());
    copy
}

/// The scripts' `--json` lines: `{"workload", "count", "seconds",
/// "cpu_seconds"}`; other lines are ignored.
fn parse_lines(text: &str) -> anyhow::Result<Vec<(String, Figure)>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON line: {line}"))?;
        let field = |name: &str| {
            value[name]
                .as_f64()
                .ok_or_else(|| anyhow!("no number {name:?} in {line}"))
        };
        let workload = value["workload"]
            .as_str()
            .ok_or_else(|| anyhow!("no \"workload\" in {line}"))?;
        out.push((
            workload.to_string(),
            Figure {
                count: field("count")? as u64,
                seconds: field("seconds")?,
                cpu_seconds: field("cpu_seconds").unwrap_or(0.0),
            },
        ));
    }
    let named: Vec<&str> = out.iter().map(|(w, _)| w.as_str()).collect();
    for (workload, _) in WORKLOADS {
        if !named.contains(&workload) {
            bail!("no {workload} figure among {named:?}");
        }
    }
    Ok(out)
}

fn rates(figures: &[(Side, &str, Figure)], side: Side, workload: &str) -> Vec<f64> {
    let mut rates: Vec<f64> = figures
        .iter()
        .filter(|(s, w, _)| *s == side && *w == workload)
        .map(|(_, _, f)| f.count as f64 / f.seconds.max(1e-9))
        .collect();
    rates.sort_by(f64::total_cmp);
    rates
}

fn median_rate(figures: &[(Side, &str, Figure)], side: Side, workload: &str) -> Option<f64> {
    let rates = rates(figures, side, workload);
    (!rates.is_empty()).then(|| rates[rates.len() / 2])
}

/// One row a workload, one column a client: the median rate, the spread
/// of the runs, and the client's CPU per message (median run's).
fn table(
    figures: &[(Side, &str, Figure)],
    count: u64,
    runs: u32,
    load_at_start: &str,
    load_at_end: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Clients, one process each, against a broker of their own per run (--fsync {FSYNC}): {count} messages of {CLIENT_PAYLOAD_BYTES} B per workload, durable window {CLIENT_WINDOW}, consumer max_in_flight {CLIENT_MAX_IN_FLIGHT}; median of {runs} run(s) [min–max], and the client's CPU per message"
    );
    let _ = write!(out, "{:<56}", "workload");
    for side in Side::ALL {
        let _ = write!(out, " | {:>34}", side.title());
    }
    out.push('\n');
    for (workload, label) in WORKLOADS {
        let _ = write!(out, "{label:<56}");
        for side in Side::ALL {
            let rates = rates(figures, side, workload);
            let cell = match (rates.first(), rates.last()) {
                (Some(min), Some(max)) => {
                    let median = rates[rates.len() / 2];
                    let mut cpu: Vec<f64> = figures
                        .iter()
                        .filter(|(s, w, _)| *s == side && *w == workload)
                        .map(|(_, _, f)| f.cpu_seconds / f.count.max(1) as f64 * 1e6)
                        .collect();
                    cpu.sort_by(f64::total_cmp);
                    format!(
                        "{} [{}–{}] {:.1} µs",
                        thousands(median),
                        thousands(*min),
                        thousands(*max),
                        cpu[cpu.len() / 2]
                    )
                }
                _ => "not run".to_string(),
            };
            let _ = write!(out, " | {cell:>34}");
        }
        out.push('\n');
    }
    let _ = write!(
        out,
        "load average: {load_at_start} at the start, {load_at_end} at the end"
    );
    out
}

/// 123456.7 → "123 k", 9876.5 → "9.9 k", below 1000 as it is.
fn thousands(rate: f64) -> String {
    if rate >= 100_000.0 {
        format!("{:.0} k", rate / 1000.0)
    } else if rate >= 1000.0 {
        format!("{:.1} k", rate / 1000.0)
    } else {
        format!("{rate:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_lines_are_read_and_a_missing_workload_is_an_error() {
        let text = r#"broker: something
{"client": "python", "workload": "publish_quiet", "count": 10, "seconds": 0.5, "cpu_seconds": 0.4}
{"client": "python", "workload": "publish_durable", "count": 10, "seconds": 1.0, "cpu_seconds": 0.2}
{"client": "python", "workload": "consume_durable", "count": 10, "seconds": 2.0}
"#;
        let read = parse_lines(text).expect("three figures");
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].0, "publish_quiet");
        assert_eq!(read[0].1.count, 10);
        assert!((read[1].1.seconds - 1.0).abs() < 1e-9);
        assert_eq!(read[2].1.cpu_seconds, 0.0);
        let short = parse_lines(text.lines().take(2).collect::<Vec<_>>().join("\n").as_str());
        assert!(short.is_err());
        assert!(parse_lines("{not json").is_err());
    }

    #[test]
    fn the_table_has_a_column_per_client_and_says_what_did_not_run() {
        let f = |count, seconds| Figure {
            count,
            seconds,
            cpu_seconds: seconds / 2.0,
        };
        let figures = vec![
            (Side::Rust, "publish_quiet", f(1000, 0.001)),
            (Side::Rust, "publish_quiet", f(1000, 0.002)),
            (Side::Python, "publish_quiet", f(1000, 0.01)),
        ];
        let text = table(&figures, 1000, 2, "1.00", "1.10");
        assert!(
            text.contains("Rust SDK") && text.contains("Python") && text.contains("TypeScript")
        );
        let quiet = text
            .lines()
            .find(|l| l.starts_with("publish, transient"))
            .expect("a row");
        assert!(quiet.contains("1000 k [500 k–1000 k]"), "{quiet}");
        assert!(quiet.contains("100 k [100 k–100 k]"), "{quiet}");
        assert!(quiet.contains("not run"), "{quiet}");
        assert!(text.contains("load average: 1.00 at the start, 1.10 at the end"));
        assert_eq!(
            median_rate(&figures, Side::Python, "publish_quiet"),
            Some(100_000.0)
        );
        assert_eq!(
            median_rate(&figures, Side::TypeScript, "publish_quiet"),
            None
        );
    }

    #[test]
    fn rates_read_as_thousands() {
        assert_eq!(thousands(123_456.7), "123 k");
        assert_eq!(thousands(9_876.5), "9.9 k");
        assert_eq!(thousands(999.0), "999");
    }
}
