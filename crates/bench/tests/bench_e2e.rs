//! `courier-bench` end to end: it starts its own brokers, prints one JSON
//! object per figure, and leaves no process or data directory behind; and
//! `courier bench` runs it.

use std::path::PathBuf;
use std::process::Command;

/// The `courier` binary the bench measures: cargo builds it beside
/// courier-bench (`cargo test --workspace` builds both).
fn courier_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_courier-bench")).with_file_name("courier");
    assert!(
        path.is_file(),
        "no courier binary at {}: run the tests with `cargo test --workspace`, or build it first with `cargo build -p courier-cli`",
        path.display()
    );
    path
}

/// `courier-bench`, measuring the `courier` beside it.
fn courier_bench() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier-bench"));
    cmd.env_remove("COURIER_URL")
        .env_remove("COURIER_SERVICE")
        .env("COURIER_BENCH_COURIER", courier_binary());
    cmd
}

/// Data directories the bench process `pid` left in the temp dir.
fn leftover_dirs(pid: u32) -> Vec<String> {
    let prefix = format!("courier-bench-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes still running with a data directory of the bench process
/// `pid` whose command line also contains `marker`.
fn leftover_processes(pid: u32, marker: &str) -> Vec<String> {
    let needle = format!("courier-bench-{pid}-");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle) && cmdline.contains(marker))
        .collect()
}

/// `courier serve` brokers the bench process `pid` left running.
fn leftover_brokers(pid: u32) -> Vec<String> {
    leftover_processes(pid, " serve ")
}

/// nats-server processes the bench process `pid` left running (their
/// config lives in one of its data directories).
fn leftover_nats_servers(pid: u32) -> Vec<String> {
    leftover_processes(pid, "nats-server")
}

/// Runs `command` to its end; its pid (to look for leftovers by) and its
/// output.
fn run_to_end(mut command: Command) -> (u32, std::process::Output) {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn courier bench");
    let pid = child.id();
    (pid, child.wait_with_output().expect("courier bench runs"))
}

/// Runs `courier-bench <args>` to its end; its pid and its output.
fn run_bench(args: &[&str]) -> (u32, std::process::Output) {
    let mut command = courier_bench();
    command.args(args);
    run_to_end(command)
}

/// What a run that must succeed printed: its pid, stdout and stderr.
struct Ran {
    pid: u32,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// The objects `--json` printed.
    fn rows(&self) -> Vec<serde_json::Value> {
        json_lines(&self.stdout)
    }

    /// Fails if the run left a data directory, a broker or a nats-server
    /// behind.
    fn left_nothing(&self) {
        assert_eq!(leftover_dirs(self.pid), Vec::<String>::new());
        assert_eq!(leftover_brokers(self.pid), Vec::<String>::new());
        assert_eq!(leftover_nats_servers(self.pid), Vec::<String>::new());
    }
}

/// Runs `command`, which must succeed.
fn run_ok(command: Command) -> Ran {
    let (pid, out) = run_to_end(command);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "courier bench failed: {stderr}");
    Ran {
        pid,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    }
}

/// Runs `courier-bench <args>`, which must succeed.
fn bench_ok(args: &[&str]) -> Ran {
    let mut command = courier_bench();
    command.args(args);
    run_ok(command)
}

/// The objects `--json` printed, one per line of stdout.
fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// The (workload, metric) of each row.
fn row_ids(rows: &[serde_json::Value]) -> Vec<(String, String)> {
    rows.iter()
        .map(|v| {
            (
                v["workload"].as_str().unwrap_or_default().to_string(),
                v["metric"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Owned (workload, metric) pairs, to compare with [`row_ids`].
fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(w, m)| (w.to_string(), m.to_string()))
        .collect()
}

#[test]
fn quick_json_run_prints_one_object_per_figure_and_cleans_up() {
    let ran = bench_ok(&["--quick", "--runs", "1", "--only", "W5a,W5b,W6", "--json"]);
    let rows = ran.rows();
    for v in &rows {
        for field in ["workload", "metric", "unit"] {
            assert!(v[field].is_string(), "{field} missing in {v}");
        }
        assert!(v["higher_is_better"].is_boolean(), "{v}");
        let median = v["courier"].as_f64().expect("courier is a number");
        assert!(median > 0.0, "{v}");
        let runs = v["runs"].as_array().expect("runs is an array");
        assert_eq!(runs.len(), 1, "{v}");
        assert!(
            runs.iter()
                .all(|r| r["courier"].as_f64().is_some_and(|x| x > 0.0)),
            "{v}"
        );
    }
    let expected = [
        ("W5a", "throughput"),
        ("W5a", "latency p50"),
        ("W5a", "latency p99"),
        ("W5b", "throughput"),
        ("W6", "throughput"),
    ];
    assert_eq!(row_ids(&rows), pairs(&expected), "{}", ran.stdout);
    // Progress and the settings go to stderr in --json mode.
    for said in [
        "W6 run 1/1",
        "Machine: nproc",
        "Command: ",
        "--http 127.0.0.1:0",
    ] {
        assert!(ran.stderr.contains(said), "{}", ran.stderr);
    }
    ran.left_nothing();
}

#[test]
fn observability_off_starts_brokers_without_the_http_port_name_metrics_or_traces() {
    let ran = bench_ok(&[
        "--quick",
        "--runs",
        "1",
        "--only",
        "W5b",
        "--json",
        "--observability",
        "off",
    ]);
    assert!(
        ran.stderr
            .contains("--http off --metrics-names-max 0 --trace off"),
        "the settings name the flags: {}",
        ran.stderr
    );
    let rows = ran.rows();
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["courier"].as_f64().is_some_and(|x| x > 0.0));
    ran.left_nothing();
}

#[test]
fn observability_compare_runs_both_sides_and_judges_the_ratio() {
    let ran = bench_ok(&[
        "--quick",
        "--runs",
        "1",
        "--only",
        "W5b",
        "--json",
        "--observability",
        "compare",
    ]);
    assert!(
        ran.stderr
            .contains("(observed), or --http off --metrics-names-max 0 --trace off (unobserved)"),
        "the settings name both sides' flags: {}",
        ran.stderr
    );
    let rows = ran.rows();
    assert_eq!(rows.len(), 1);
    let (observed, unobserved) = (
        rows[0]["courier"].as_f64().expect("observed"),
        rows[0]["courier_unobserved"].as_f64().expect("unobserved"),
    );
    let ratio = rows[0]["ratio"].as_f64().expect("ratio");
    assert!((ratio - observed / unobserved).abs() < 0.01, "{}", rows[0]);
    assert_eq!(rows[0]["met"], serde_json::json!(ratio >= 0.95));
    ran.left_nothing();
}

#[test]
fn metrics_scrape_times_the_metrics_page_of_a_broker_with_many_names() {
    let ran = bench_ok(&["--metrics-scrape", "--quick"]);
    let stdout = &ran.stdout;
    assert!(
        stdout.contains("counted 500 names from 50 services")
            && stdout.contains("(500 of them courier_messages_sent_total)"),
        "{stdout}"
    );
    let p99 = stdout
        .split("p99 ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no p99 figure: {stdout}"));
    assert!(p99 > 0.0, "{stdout}");
    ran.left_nothing();
}

#[test]
fn ids_compares_courier_s_generator_with_the_plain_ways_row_by_row() {
    let ran = bench_ok(&["--ids", "--quick"]);
    let stdout = &ran.stdout;
    for generator in [
        "courier new_id (ChaCha12 pool)",
        "uuid Uuid::now_v7 (OS per id)",
        "pool refilled from the OS",
    ] {
        let row = stdout
            .lines()
            .find(|line| line.starts_with(&format!("| {generator} |")))
            .unwrap_or_else(|| panic!("no row for {generator}: {stdout}"));
        let nanos: f64 = row
            .split('|')
            .nth(4)
            .and_then(|cell| cell.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ns per id in {row:?}"));
        assert!(nanos > 0.0, "{row}");
    }
}

#[test]
fn only_registry_prints_the_registrys_three_figures_with_their_goals() {
    let ran = bench_ok(&["--only", "registry", "--quick"]);
    let stdout = &ran.stdout;
    for (figure, goal) in [
        ("(a) registry change → watcher", "goal p99 ≤ 100 ms"),
        ("(b) DNS over UDP", "goal ≥ 20000 queries/s with p99 ≤ 1 ms"),
        (
            "(c) 500 instances with a TCP check every 5s (500 passing)",
            "goal ≤ 5 %",
        ),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(figure))
            .unwrap_or_else(|| panic!("no line {figure:?}: {stdout}"));
        assert!(
            line.contains(goal) && line.contains("not judged (--quick)"),
            "{line}"
        );
    }
    let rate = stdout
        .split(" queries/s, p50")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no DNS rate: {stdout}"));
    assert!(rate > 0.0, "{stdout}");
    ran.left_nothing();
}

/// Runs W7 with `--timeout 150ms` and `extra` flags: it must stop with
/// the error as its last line, print no table and leave nothing behind.
fn w7_times_out(extra: &[&str]) {
    let mut args = vec![
        "--quick",
        "--runs",
        "1",
        "--only",
        "W7",
        "--timeout",
        "150ms",
    ];
    args.extend_from_slice(extra);
    let (pid, out) = run_bench(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "courier-bench: W7 run 1/1 (Courier) did not finish within 150ms (--timeout)"
        ),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no table after a failure");
    assert_eq!(leftover_dirs(pid), Vec::<String>::new());
    assert_eq!(leftover_brokers(pid), Vec::<String>::new());
}

#[test]
fn a_run_over_its_timeout_stops_with_a_clear_error_and_cleans_up() {
    w7_times_out(&[]);
}

#[test]
fn the_gateway_workload_compares_http_with_the_native_protocol_and_cleans_up() {
    let ran = bench_ok(&["--quick", "--runs", "1", "--only", "W-HTTP-a", "--json"]);
    let (stdout, rows) = (&ran.stdout, ran.rows());
    assert_eq!(rows.len(), 7, "{stdout}");
    for row in &rows {
        assert_eq!(row["workload"], "W-HTTP-a", "{row}");
        assert!(row["native"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        assert!(row["gateway"].as_f64().is_some_and(|v| v > 0.0), "{row}");
    }
    let verdicts: Vec<&serde_json::Value> = rows.iter().filter(|r| r["met"].is_boolean()).collect();
    assert_eq!(
        verdicts.len(),
        2,
        "throughput share and added p50: {stdout}"
    );
    ran.left_nothing();
}

#[test]
fn an_unknown_workload_is_a_usage_error_naming_the_valid_ones() {
    let out = courier_bench()
        .args(["--only", "W5a,W99"])
        .output()
        .expect("run courier-bench");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("W99") && stderr.contains("W5a, W5b, W6, W7a, W7b"),
        "{stderr}"
    );
}

/// `courier bench …` runs the courier-bench beside it with the same
/// arguments, in the same process, measuring that `courier`.
#[test]
fn courier_bench_subcommand_runs_the_bench_program_beside_it() {
    let out = Command::new(courier_binary())
        .args(["bench", "--only", "W5a,W99"])
        .env_remove("COURIER_BENCH_COURIER")
        .output()
        .expect("run courier bench");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error from courier-bench"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown workload \"W99\""), "{stderr}");

    let help = Command::new(courier_binary())
        .args(["bench", "--help"])
        .output()
        .expect("run courier bench --help");
    let stdout = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success(),
        "{}",
        String::from_utf8_lossy(&help.stderr)
    );
    assert!(
        stdout.contains("Usage: courier-bench") && stdout.contains("--against"),
        "{stdout}"
    );

    let mut command = Command::new(courier_binary());
    command
        .args(["bench", "--quick", "--runs", "1", "--only", "W5b", "--json"])
        .env_remove("COURIER_BENCH_COURIER");
    let ran = run_ok(command);
    let rows = ran.rows();
    assert_eq!(rows.len(), 1, "{}", ran.stderr);
    assert!(rows[0]["courier"].as_f64().is_some_and(|x| x > 0.0));
    assert!(
        ran.stderr.contains("courier-bench: W5b run 1/1"),
        "{}",
        ran.stderr
    );
    ran.left_nothing();
}

#[test]
fn against_nats_prints_both_columns_a_ratio_and_the_nats_settings() {
    let (rows, stderr) = both_sides_rows("W1a,W4a,W5a", "1");
    let ids = row_ids(&rows);
    for expected in pairs(&[
        ("W1a", "throughput"),
        ("W4a", "latency p50"),
        ("W4a", "latency p99.9"),
        ("W5a", "throughput"),
        ("W5a-always", "throughput"),
    ]) {
        assert!(ids.contains(&expected), "no {expected:?} row in {rows:?}");
    }
    for v in &rows {
        let (courier, nats) = (v["courier"].as_f64(), v["nats"].as_f64());
        let expected = if v["higher_is_better"] == true {
            courier.zip(nats).map(|(c, n)| c / n)
        } else {
            courier.zip(nats).map(|(c, n)| n / c)
        };
        let (ratio, expected) = (v["ratio"].as_f64().unwrap_or(0.0), expected.unwrap_or(0.0));
        assert!((ratio - expected).abs() <= 0.01 * expected + 0.001, "{v}");
    }
    let always = rows
        .iter()
        .find(|v| v["workload"] == "W5a-always" && v["metric"] == "throughput")
        .expect("W5a-always row");
    let default = rows
        .iter()
        .find(|v| v["workload"] == "W5a" && v["metric"] == "throughput")
        .expect("W5a row");
    assert_eq!(
        always["courier"], default["courier"],
        "the same Courier runs"
    );
    assert!(always["nats_side"]
        .as_str()
        .is_some_and(|s| s.contains("always")));
    assert!(stderr.contains("NATS server:"), "{stderr}");
    assert!(stderr.contains("W5a run 1/1 (NATS)"), "{stderr}");
    // W4 runs both sides at once, alternating, each with the whole count.
    assert!(
        stderr.contains("W4a run 1/1 (Courier and NATS, alternating in 10 slices)"),
        "{stderr}"
    );
    for side in ["Courier", "NATS"] {
        assert!(
            stderr.contains(&format!("  {side}: 1,000 requests in ")),
            "{stderr}"
        );
    }
}

#[test]
fn on_a_current_thread_client_runtime_runs_finish_and_timeouts_still_clean_up() {
    let ran = bench_ok(&[
        "--against",
        "nats",
        "--client-runtime",
        "current-thread",
        "--quick",
        "--runs",
        "1",
        "--only",
        "W1a,W4a",
    ]);
    let stdout = &ran.stdout;
    assert!(
        stdout.contains("| W1a") && stdout.contains("| W4a"),
        "{stdout}"
    );
    assert!(stdout.contains("tokio current-thread runtime"), "{stdout}");
    assert!(stdout.contains("NATS (median)"), "{stdout}");
    ran.left_nothing();

    w7_times_out(&["--client-runtime", "current-thread"]);
}

/// Fan-out and competing consumers, with the publisher and every receiver
/// on one thread: once a lead ahead, the publisher waits to be woken by
/// the slowest of four services (W2) or by one service's four instances
/// (W3) — once or twice per run here (counted 2026-12-03) — and no event
/// may be lost (a lost one fails the run).
#[test]
fn fan_out_and_competing_consumers_finish_on_one_client_thread() {
    let ran = bench_ok(&[
        "--client-runtime",
        "current-thread",
        "--quick",
        "--runs",
        "1",
        "--only",
        "W2a,W2b,W3a,W3b",
        "--json",
    ]);
    let rows = ran.rows();
    for v in &rows {
        assert!(v["courier"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    }
    let workloads: Vec<String> = row_ids(&rows).into_iter().map(|(w, _)| w).collect();
    assert_eq!(workloads, ["W2a", "W2b", "W3a", "W3b"], "{}", ran.stdout);
    assert!(
        ran.stderr.contains("W2b run 1/1 (Courier): W2b throughput"),
        "{}",
        ran.stderr
    );
    ran.left_nothing();
}

/// The PostgreSQL the tests use (scripts/test.sh starts it and sets this).
fn test_postgres_url() -> String {
    std::env::var("COURIER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "COURIER_TEST_POSTGRES_URL is not set: run the tests through scripts/test.sh, \
             which installs and starts PostgreSQL 15 and sets it"
        )
    })
}

/// Scratch databases the bench process `pid` left on the test PostgreSQL.
fn leftover_databases(pid: u32) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&test_postgres_url())
            .await
            .expect("connect to COURIER_TEST_POSTGRES_URL");
        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE $1")
            .bind(format!("courier_bench_{pid}_%"))
            .fetch_all(&pool)
            .await
            .expect("list databases")
    })
}

#[test]
fn the_outbox_workload_times_the_relay_beside_direct_publishing_and_drops_its_database() {
    let ran = bench_ok(&[
        "--quick",
        "--runs",
        "1",
        "--only",
        "outbox",
        "--json",
        "--scale",
        "0.2",
        "--postgres-url",
        &test_postgres_url(),
    ]);
    let stdout = &ran.stdout;
    let rows: Vec<(String, String, f64, String)> = ran
        .rows()
        .iter()
        .map(|v| {
            (
                v["workload"].as_str().unwrap_or_default().to_string(),
                v["metric"].as_str().unwrap_or_default().to_string(),
                v["courier"].as_f64().unwrap_or(f64::NAN),
                v["target"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let metrics: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        metrics,
        [
            "relay, PostgreSQL → broker",
            "direct publish, SDK → broker",
            "commit → acceptance p50",
            "commit → acceptance p99",
            "direct send → acceptance p50",
            "direct send → acceptance p99",
        ],
        "{stdout}"
    );
    assert!(
        rows.iter().all(|r| r.0 == "outbox" && r.2 > 0.0),
        "{stdout}"
    );
    assert_eq!(rows[0].3, "≥ 20,000 msg/s");
    assert_eq!(rows[3].3, "≤ 5,000 µs");
    assert!(rows[2].2 <= rows[3].2, "p50 ≤ p99: {stdout}");
    assert!(rows[4].2 <= rows[5].2, "p50 ≤ p99: {stdout}");
    assert!(ran.stderr.contains("outbox filled with"), "{}", ran.stderr);
    assert_eq!(leftover_databases(ran.pid), Vec::<String>::new());
    ran.left_nothing();
}

#[test]
fn the_outbox_workload_without_postgresql_says_how_to_get_one() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let (pid, out) = run_bench(&[
        "--quick",
        "--runs",
        "1",
        "--only",
        "outbox",
        "--postgres-url",
        &format!("postgres://someone:secret@127.0.0.1:{port}/somewhere"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pg_ctlcluster 15 main start")
            && stderr.contains("CREATEDB")
            && stderr.contains("--postgres-url"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret"),
        "the password is not printed: {stderr}"
    );
    assert_eq!(leftover_dirs(pid), Vec::<String>::new());
    assert_eq!(leftover_brokers(pid), Vec::<String>::new());
}

/// The table row of `workload` in `--only clients`' output.
fn clients_row<'a>(stdout: &'a str, workload: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(workload))
        .unwrap_or_else(|| panic!("no row {workload:?}: {stdout}"))
}

#[test]
fn only_clients_puts_the_python_and_typescript_clients_beside_the_rust_sdk() {
    // scripts/test.sh builds both clients and names its Python in
    // COURIER_PYTHON first; without them, the bench must say what to
    // install, and still measure the rest.
    let (pid, out) = run_bench(&[
        "--only", "clients", "--quick", "--runs", "1", "--scale", "0.05",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("Rust SDK") && stdout.contains("Python") && stdout.contains("TypeScript"),
        "{stdout}"
    );
    assert!(stdout.contains("load average:"), "{stdout}");
    for workload in [
        "publish, transient quiet",
        "publish, durable",
        "consume that backlog",
    ] {
        let row = clients_row(&stdout, workload);
        let rust = row.split(" | ").nth(1).unwrap_or("");
        assert!(
            rust.contains(" k") || rust.trim().starts_with(char::is_numeric),
            "{row}"
        );
        if out.status.success() {
            assert!(!row.contains("not run"), "{row}");
        }
    }
    if out.status.success() {
        assert!(stdout.contains("goal: ≥ 100000 msg/s publish (quiet) from one Python process: not judged (--quick)"), "{stdout}");
    } else {
        assert!(
            stderr.contains("not measured") && stderr.contains("install"),
            "{stderr}"
        );
    }
    assert_eq!(leftover_brokers(pid), Vec::<String>::new());
    assert_eq!(leftover_dirs(pid), Vec::<String>::new());
}

#[test]
fn only_clients_names_what_to_install_when_a_client_cannot_run() {
    let out = courier_bench()
        .args([
            "--only", "clients", "--quick", "--runs", "1", "--scale", "0.02",
        ])
        .env("COURIER_PYTHON", "/nonexistent/python3")
        // No node on this PATH.
        .env("PATH", "/nonexistent")
        .output()
        .expect("run courier bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("Python: no `/nonexistent/python3` to run; install Python 3.10 or newer"),
        "{stderr}"
    );
    assert!(stderr.contains("pip install -e clients/python"), "{stderr}");
    assert!(
        stderr.contains("TypeScript: no `node` to run; install Node.js 20 or newer"),
        "{stderr}"
    );
    assert!(stderr.contains("npm ci && npm run build"), "{stderr}");
    // The Rust SDK was measured all the same; the others say not run.
    let row = clients_row(&stdout, "publish, durable");
    let cells: Vec<&str> = row.split(" | ").collect();
    assert_eq!(cells.len(), 4, "{row}");
    assert!(!cells[1].contains("not run"), "{row}");
    assert!(
        cells[2].contains("not run") && cells[3].contains("not run"),
        "{row}"
    );
}

/// The JSON rows of `--against nats` for `only`, each with both sides'
/// numbers and the ratio between them; and the progress on stderr.
fn both_sides_rows(only: &str, scale: &str) -> (Vec<serde_json::Value>, String) {
    let ran = bench_ok(&[
        "--against",
        "nats",
        "--quick",
        "--runs",
        "1",
        "--scale",
        scale,
        "--only",
        only,
        "--json",
    ]);
    let rows = ran.rows();
    for v in &rows {
        let courier = v["courier"].as_f64().expect("courier is a number");
        let nats = v["nats"].as_f64().expect("nats is a number");
        assert!(courier > 0.0 && nats > 0.0, "{v}");
        assert!(v["ratio"].as_f64().is_some_and(|r| r > 0.0), "{v}");
        assert!(v["nats_side"].is_string(), "{v}");
    }
    ran.left_nothing();
    (rows, ran.stderr)
}

#[test]
fn large_events_and_requests_under_load_print_both_sides() {
    let (rows, _) = both_sides_rows("W11,W12", "0.2");
    let expected = [
        ("W11", "throughput, MB/s"),
        ("W11", "share of the disk's write+fsync"),
        ("W11-always", "throughput, MB/s"),
        ("W11-always", "share of the disk's write+fsync"),
        ("W12", "latency p50"),
        ("W12", "latency p99"),
        ("W12", "W5b publishing beside it"),
    ];
    assert_eq!(row_ids(&rows), pairs(&expected));
    let w11 = &rows[0];
    let always = &rows[2];
    assert_eq!(w11["courier"], always["courier"], "the same Courier runs");
    assert_eq!(rows[1]["target"], "≥ 50.0 %");
}

#[test]
fn idle_connections_and_a_big_routing_table_print_both_sides() {
    // W9: 200 idle connections (2 instances of 100 services); W10: 20
    // services × 100 subscriptions and 2,000 events through them.
    let ran = bench_ok(&[
        "--against",
        "nats",
        "--quick",
        "--runs",
        "1",
        "--scale",
        "0.2",
        "--only",
        "W9,W10",
        "--json",
    ]);
    let rows = ran.rows();
    assert_eq!(
        row_ids(&rows),
        pairs(&[
            ("W9", "server RSS per idle connection"),
            ("W9", "W4a p99 before they connect"),
            ("W9", "W4a p99 with them connected"),
            ("W9", "W4a p99 with ÷ before"),
            ("W10", "throughput"),
        ]),
        "{}",
        ran.stderr
    );
    for v in &rows {
        let (courier, nats) = (v["courier"].as_f64(), v["nats"].as_f64());
        assert!(courier.is_some() && nats.is_some(), "{v}");
        if v["unit"] != "KiB" {
            // Memory of 200 connections can sit inside pages already mapped.
            assert!(
                courier.zip(nats).is_some_and(|(c, n)| c > 0.0 && n > 0.0),
                "{v}"
            );
        }
        assert!(v["nats_side"].is_string(), "{v}");
    }
    for line in [
        "idle connections subscribed: 200 of 200",
        "routing table: 2,000 subscriptions of 20 services",
        "W9 run 1/1 (NATS)",
        "W10 run 1/1 (Courier)",
    ] {
        assert!(ran.stderr.contains(line), "no {line:?} in {}", ran.stderr);
    }
    ran.left_nothing();
}

/// The rows of the markdown table under `title` in `stdout`, split into
/// cells.
fn table_rows(stdout: &str, title: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with(title))
        .skip(1)
        .skip_while(|l| l.is_empty())
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn curves_print_a_table_per_curve_with_its_verdicts_and_clean_up() {
    let ran = bench_ok(&["--curves", "--quick", "--scale", "0.1"]);
    let stdout = &ran.stdout;
    for (title, sizes, columns) in [
        (
            "Restart and memory against the backlog",
            vec!["100", "1,000", "10,000"],
            5,
        ),
        (
            "Memory and latency against idle connections",
            vec!["1", "10", "100"],
            5,
        ),
        ("Routing against subscriptions", vec!["100"], 3),
        (
            "Durable publishing against publishers",
            vec!["1", "2", "4", "8", "16"],
            4,
        ),
    ] {
        let rows = table_rows(stdout, title);
        let firsts: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(firsts, sizes, "{title}: {stdout}");
        for row in &rows {
            assert_eq!(row.len(), columns, "{title}: {row:?}");
            for cell in &row[1..] {
                assert!(
                    cell.replace(',', "").parse::<f64>().is_ok(),
                    "{title}: {row:?}"
                );
            }
        }
    }
    for verdict in [
        "- spawn to ready line (ms): ",
        "- RSS after restart (MiB): ",
        "- server RSS with them (MiB): ",
        "- W4a p99 with them (µs): ",
        "- µs per event: not judged (fewer than 2 points finished)",
    ] {
        assert!(stdout.contains(verdict), "no {verdict:?}: {stdout}");
    }
    assert!(stdout.contains("Verdicts: flat: "), "{stdout}");
    ran.left_nothing();

    let ran = bench_ok(&[
        "--curves",
        "publishers,routing",
        "--quick",
        "--scale",
        "0.1",
        "--json",
    ]);
    let rows = ran.rows();
    let points: Vec<(&str, u64)> = rows
        .iter()
        .filter(|v| v.get("x").is_some())
        .map(|v| {
            (
                v["curve"].as_str().unwrap_or_default(),
                v["x"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        points,
        [
            ("routing", 100),
            ("publishers", 1),
            ("publishers", 2),
            ("publishers", 4),
            ("publishers", 8),
            ("publishers", 16)
        ]
    );
    for v in rows.iter().filter(|v| v.get("x").is_some()) {
        assert_eq!(v["finished"], serde_json::json!(true), "{v}");
        assert!(v["us_per_event"].as_f64().is_some_and(|us| us > 0.0), "{v}");
    }
    let fits: Vec<&serde_json::Value> =
        rows.iter().filter(|v| v.get("verdict").is_some()).collect();
    assert_eq!(fits.len(), 2, "{rows:?}");
    assert!(ran.stderr.contains("Verdicts: "), "{}", ran.stderr);
    ran.left_nothing();
}

#[test]
fn backend_cluster_puts_courier_on_the_cluster_beside_single_node_courier_and_jetstream_r3() {
    let ran = bench_ok(&[
        "--backend",
        "cluster",
        "--only",
        "W1a,W2b,W3a,W4,W5,W6,W7,W8",
        "--quick",
        "--runs",
        "1",
        "--scale",
        "0.2",
    ]);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    let cells = |line: &str| -> Vec<String> {
        line.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let header = cells(lines.first().expect("a table"));
    let column = |title: &str| {
        header
            .iter()
            .position(|h| h == title)
            .unwrap_or_else(|| panic!("no {title:?} column in {header:?}"))
    };
    let columns = [
        column("Courier (median)"),
        column("Courier cluster (median)"),
        column("JetStream R3 (median)"),
    ];
    let ratio = column("ratio");
    let target = column("target");
    for workload in ["W5a", "W5b", "W6"] {
        let row = lines
            .iter()
            .map(|l| cells(l))
            .find(|c| c[0] == workload && c[1] == "throughput")
            .unwrap_or_else(|| panic!("no {workload} throughput row in\n{}", ran.stdout));
        for c in columns {
            let figure: f64 = row[c].replace(',', "").parse().unwrap_or(0.0);
            assert!(figure > 0.0, "{workload}: {:?} in {row:?}", row[c]);
        }
        assert!(row[ratio].ends_with('×'), "{row:?}");
        assert_eq!(row[target], "≥ 0.8×", "{row:?}");
    }
    // Beside the durable rows, W1–W8 on the cluster with their ratio and
    // no target.
    for (workload, metric) in [
        ("W1a", "throughput"),
        ("W2b", "throughput"),
        ("W3a", "throughput"),
        ("W4a", "latency p99"),
        ("W4b", "throughput"),
        ("W7a", "restart: spawn to ready line"),
        ("W7a", "restart: spawn to first use"),
        ("W7b", "RSS, backlog just written"),
        ("W7b", "RSS, backlog after restart"),
        ("W8a", "throughput"),
        ("W8b", "throughput"),
    ] {
        let row = lines
            .iter()
            .map(|l| cells(l))
            .find(|c| c[0] == workload && c[1] == metric)
            .unwrap_or_else(|| panic!("no {workload} {metric} row in\n{}", ran.stdout));
        for c in columns {
            let figure: f64 = row[c].replace(',', "").parse().unwrap_or(0.0);
            assert!(figure > 0.0, "{workload} {metric}: {:?} in {row:?}", row[c]);
        }
        assert!(row[ratio].ends_with('×'), "{row:?}");
        assert_eq!(row[target], "", "{row:?}");
    }
    // Each side's ordered drain as a share of its own W6: no ratio.
    for workload in ["W8a", "W8b"] {
        let row = lines
            .iter()
            .map(|l| cells(l))
            .find(|c| c[0] == workload && c[1] == "throughput ÷ W6's")
            .unwrap_or_else(|| panic!("no {workload} share row in\n{}", ran.stdout));
        for c in columns {
            let share: f64 = row[c].replace(',', "").parse().unwrap_or(0.0);
            assert!(share > 0.0, "{workload}: {:?} in {row:?}", row[c]);
        }
        assert_eq!(row[ratio], "—", "{row:?}");
    }
    for needed in [
        "Cluster:",
        "sync_interval: always",
        "num_replicas 3",
        "--node-id",
        "W7 (no target): ",
        "the nats-server leading it killed (kill -9)",
        "Where clients connect: ",
    ] {
        assert!(
            ran.stdout.contains(needed),
            "no {needed:?} in {}",
            ran.stdout
        );
    }
    for side in ["Courier", "Courier cluster", "JetStream R3"] {
        assert!(
            ran.stderr
                .contains(&format!("W6 run 1/1 ({side}): W6 throughput")),
            "{}",
            ran.stderr
        );
    }
    // W5's and W6's leaders are put where each column's clients enter.
    for placed in [
        "the stream COURIER_MSGS led from n",
        "the consumer svc-bench-consumer of COURIER_MSGS led from n",
        "the stream BENCH_W5_PUBLISHED led from n",
        "the stream BENCH_W6 led from n",
        "the consumer bench-consumer of BENCH_W6 led from n",
    ] {
        assert!(
            ran.stderr.contains(placed),
            "no {placed:?} in {}",
            ran.stderr
        );
    }
    assert!(
        ran.stderr.contains("leads the stream BENCH_W7")
            && ran.stderr.contains("the cluster placed an R3 stream again"),
        "{}",
        ran.stderr
    );
    ran.left_nothing();
}

#[test]
fn backend_cluster_refuses_workloads_it_does_not_run_and_a_lone_nats_flag() {
    let (_, out) = run_bench(&["--backend", "cluster", "--only", "W1a,W13-16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("W13-16 does not run with --backend cluster")
            && stderr.contains("W1a, W1b"),
        "{stderr}"
    );
    let (_, out) = run_bench(&["--nats", "nats://127.0.0.1:4222"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("add --backend cluster"),
        "{stderr}"
    );
}
