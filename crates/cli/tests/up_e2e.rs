//! `courier up` on this example's courier.toml: the whole application from
//! one command, supervised, and stopped cleanly — real processes only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn courier_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_courier"))
}

/// Where cargo puts this build's binaries: the examples' are built there
/// (once per test run) beside `courier`.
fn bin_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet"])
                .args(["-p", "courier-example-todo"])
                .args(["-p", "courier-example-sensor-pipeline"])
                .args(["-p", "courier-example-transfer"])
                .status()
                .expect("cargo build the examples");
            assert!(status.success(), "the examples build");
            courier_bin().parent().expect("bin dir").to_path_buf()
        })
        .clone()
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// A copy of an example's courier.toml in a fresh directory.
fn app_dir(example_name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("courier-up-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(
        example(example_name).join("courier.toml"),
        dir.join("courier.toml"),
    )
    .expect("copy courier.toml");
    dir
}

/// `courier up` with its stdout lines on a channel; killed on drop.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(dir: &Path, bus: &str, http: &str, web: &str) -> Up {
        Up::start_with(dir, bus, http, web, &[])
    }

    fn start_with(dir: &Path, bus: &str, http: &str, web: &str, extra: &[&str]) -> Up {
        let mut command = Command::new(courier_bin());
        command
            .arg("up")
            .arg(dir)
            .args(["--no-build", "--listen", bus, "--http", http])
            .args(extra)
            .env("TODO_BIN_DIR", bin_dir())
            .env("SENSOR_BIN_DIR", bin_dir())
            .env("TRANSFER_BIN_DIR", bin_dir())
            .env("TELLER_INTERVAL_MS", "300")
            .env("NO_COLOR", "1")
            .env("COURIER_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // No address: todo-web listens where `courier up` says (HOST:PORT).
        if web.is_empty() {
            command.env_remove("TODO_WEB_LISTEN");
        } else {
            command.env("TODO_WEB_LISTEN", web);
        }
        let mut child = command.spawn().expect("spawn courier up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Up {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line containing every needle.
    fn wait_line(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + T;
        if let Some(line) = self
            .seen
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().all(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needles:?} within {T:?}; courier up printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect web");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

fn create(web: &str, text: &str) -> String {
    let body = format!("text={}", text.replace(' ', "+"));
    http(
        web,
        &format!(
            "POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn page(web: &str) -> String {
    http(
        web,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
}

/// Pids of live processes of the application in `dir` (started there, or
/// naming it) whose command line contains `needle`. Other tests run the
/// same binaries from directories of their own.
fn processes_with(dir: &Path, needle: &str) -> Vec<u32> {
    let dir = std::fs::canonicalize(dir).expect("app dir");
    let dir_text = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let cmdline = String::from_utf8_lossy(&c);
                    cmdline.contains(needle)
                        && (cmdline.contains(&dir_text)
                            || std::fs::read_link(format!("/proc/{pid}/cwd"))
                                .is_ok_and(|cwd| cwd == dir))
                })
                .unwrap_or(false)
        })
        .filter(|pid| {
            // Zombies are gone already, only not yet reaped by a parent.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn courier_up_runs_the_todo_app_restarts_a_crash_and_stops_everything_on_sigint() {
    let dir = app_dir("todo", "todo");
    let (bus, http_port, web) = (free_addr(), free_addr(), free_addr());
    let mut up = Up::start(&dir, &bus, &http_port, &web);
    let running = up.wait_line(&["courier up:", "running"]);
    assert!(
        running.contains("todo ×1") && running.contains("web ×1"),
        "{running}"
    );
    assert!(
        running.contains(&format!("console at http://{http_port}/")),
        "the console URL is printed: {running}"
    );
    up.wait_line(&["web.1", "todo web listening on"]);
    up.wait_line(&["todo.1", "todo service ready"]);
    // Which services are up, as the broker sees them.
    up.wait_line(&["courier up: up: stats 1/1, todo 1/1, web 1/1"]);

    // End to end: web → broker → todo and back, with generated tokens.
    let created = create(&web, "buy milk");
    assert!(created.starts_with("HTTP/1.1 303"), "{created}");
    assert!(page(&web).contains("<li>buy milk</li>"));
    let token = token_of(&dir, "todo");
    assert!(
        !up.seen.iter().any(|l| l.contains(&token)),
        "a token is never printed"
    );

    // A second courier up in the same directory is refused, clearly.
    let second = Command::new(courier_bin())
        .arg("up")
        .arg(&dir)
        .args(["--no-build", "--listen", &free_addr(), "--http", "off"])
        .output()
        .expect("second courier up");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("already running") && stderr.contains("courier down"),
        "{stderr}"
    );

    // A crashed service is restarted, and the application works again.
    let service = bin_dir().join("todo-service").display().to_string();
    let pids = processes_with(&dir, &service);
    assert_eq!(pids.len(), 1, "one todo instance: {pids:?}");
    let _ = Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status();
    up.wait_line(&["todo.1", "was killed", "restarting in"]);
    up.wait_line(&["todo.1", "todo service ready"]);
    let deadline = Instant::now() + T;
    loop {
        if create(&web, "after the crash").starts_with("HTTP/1.1 303") {
            break;
        }
        assert!(Instant::now() < deadline, "todo never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(page(&web).contains("<li>after the crash</li>"));

    // Ctrl-C: services first, broker last, exit 0, nothing left behind.
    let _ = Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status();
    up.wait_line(&["courier up: stopped"]);
    let status = up.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status}");
    let web_bin = bin_dir().join("todo-web").display().to_string();
    let stats_bin = bin_dir().join("todo-stats").display().to_string();
    let data = dir.join(".courier").display().to_string();
    for needle in [&service, &web_bin, &stats_bin, &data] {
        assert_eq!(
            processes_with(&dir, needle),
            Vec::<u32>::new(),
            "left running: {needle}"
        );
    }
    assert!(
        !dir.join(".courier/up.pid").exists(),
        "the lock is released"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The count on the page (from the stats service), if it answered.
fn todos_counted(page: &str) -> Option<u64> {
    let after = page.split("<p id=\"stats\">").nth(1)?;
    after.split(" todos created").next()?.trim().parse().ok()
}

/// Kills (SIGKILL) the one running instance of `binary` in the app of `dir`.
fn kill9_one(dir: &Path, binary: &str) {
    let path = bin_dir().join(binary).display().to_string();
    let pids = processes_with(dir, &path);
    assert_eq!(pids.len(), 1, "one {binary} instance: {pids:?}");
    let _ = Command::new("kill")
        .args(["-9", &pids[0].to_string()])
        .status();
}

#[test]
fn stats_counts_each_created_todo_once_while_stats_and_todo_are_killed() {
    let dir = app_dir("todo", "stats");
    let (bus, web) = (free_addr(), free_addr());
    let mut up = Up::start(&dir, &bus, "off", &web);
    up.wait_line(&["courier up:", "running"]);
    up.wait_line(&["stats.1", "stats service ready"]);
    up.wait_line(&["todo.1", "todo service ready"]);
    up.wait_line(&["web.1", "todo web listening on"]);

    // Todos go in one after the other while stats (twice) and todo (once)
    // are killed mid-stream; a create that fails while todo restarts is
    // retried, as a user would.
    const TODOS: u32 = 40;
    for i in 0..TODOS {
        match i {
            10 | 25 => kill9_one(&dir, "todo-stats"),
            18 => kill9_one(&dir, "todo-service"),
            _ => {}
        }
        let deadline = Instant::now() + T;
        while !create(&web, &format!("todo {i}")).starts_with("HTTP/1.1 303") {
            assert!(Instant::now() < deadline, "todo {i} was never created");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    up.wait_line(&["stats.1", "was killed", "restarting in"]);
    up.wait_line(&["todo.1", "was killed", "restarting in"]);

    // Every todo listed is counted, once: the count reaches the list's
    // length and stays there.
    let deadline = Instant::now() + T;
    let (listed, counted) = loop {
        let page = page(&web);
        let listed = page.matches("<li>").count() as u64;
        let counted = todos_counted(&page);
        if counted == Some(listed) || Instant::now() > deadline {
            break (listed, counted);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(listed >= u64::from(TODOS), "{listed} todos listed");
    assert_eq!(counted, Some(listed), "todos counted by stats");
    // Late redeliveries (an unacked event's deadline) would show as more.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(todos_counted(&page(&web)), Some(listed), "counted again");

    let _ = Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status();
    assert_eq!(up.child.wait().expect("wait").code(), Some(0));
    assert_nothing_left(&dir, &["todo-service", "todo-stats", "todo-web"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn courier_down_stops_a_running_courier_up_and_an_inconsistent_app_is_refused() {
    let dir = app_dir("todo", "down");
    let (bus, web) = (free_addr(), free_addr());
    let mut up = Up::start(&dir, &bus, "off", &web);
    up.wait_line(&["courier up:", "running"]);
    let down = Command::new(courier_bin())
        .arg("down")
        .arg(&dir)
        .output()
        .expect("courier down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(up.child.wait().expect("wait").code(), Some(0));
    let again = Command::new(courier_bin())
        .arg("down")
        .arg(&dir)
        .output()
        .expect("courier down");
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing runs"));

    // web sends todo.create, and nobody receives it any more.
    let text = std::fs::read_to_string(dir.join("courier.toml")).expect("read");
    let broken = text.replace(
        "receives = [\"todos.list\", \"todo.create\"]",
        "receives = [\"todos.list\"]",
    );
    assert_ne!(text, broken);
    std::fs::write(dir.join("courier.toml"), broken).expect("write");
    let refused = Command::new(courier_bin())
        .arg("up")
        .arg(&dir)
        .args(["--no-build", "--listen", &free_addr(), "--http", "off"])
        .output()
        .expect("courier up");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("todo.create") && stderr.contains("fix the errors above"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_sensor_pipeline_spreads_readings_over_competing_workers_and_scales() {
    let dir = app_dir("sensor-pipeline", "sensor");
    let (bus, web) = (free_addr(), free_addr());
    let mut up = Up::start(&dir, &bus, "off", &web);
    let running = up.wait_line(&["courier up:", "running"]);
    assert!(
        running.contains("app ×1")
            && running.contains("sensor ×1")
            && running.contains("worker ×3"),
        "{running}"
    );
    // Results arrive at the app, squared by more than one worker: each
    // reading went to one of the three.
    let mut workers = std::collections::BTreeSet::new();
    let deadline = Instant::now() + T;
    while workers.len() < 2 {
        assert!(Instant::now() < deadline, "results from {workers:?} only");
        let line = up.wait_line(&["app.1", "squared is"]);
        let by = line
            .rsplit("(by ")
            .next()
            .and_then(|rest| rest.strip_suffix(')'))
            .expect("the worker named")
            .to_string();
        let (value, squared) = {
            let after = line.split(": ").nth(1).expect("value");
            let mut words = after.split_whitespace();
            let value: i64 = words.next().expect("value").parse().expect("number");
            let squared: i64 = words.nth(2).expect("squared").parse().expect("number");
            (value, squared)
        };
        assert_eq!(value * value, squared, "{line}");
        workers.insert(by);
        up.seen.retain(|l| l != &line);
    }
    assert!(
        workers.iter().all(|w| w.starts_with("worker.")),
        "{workers:?}"
    );
    let _ = Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status();
    assert_eq!(up.child.wait().expect("wait").code(), Some(0));
    assert_nothing_left(&dir, &["sensor", "sensor-worker", "sensor-app"]);

    // --scale overrides instances.
    let mut scaled = Command::new(courier_bin())
        .arg("up")
        .arg(&dir)
        .args(["--no-build", "--listen", &free_addr(), "--http", "off"])
        .args(["--scale", "worker=1"])
        .env("SENSOR_BIN_DIR", bin_dir())
        .stdout(Stdio::piped())
        .spawn()
        .expect("courier up --scale");
    let mut lines = BufReader::new(scaled.stdout.take().expect("stdout")).lines();
    let running = lines
        .find_map(|l| l.ok().filter(|l| l.contains("running")))
        .expect("a running line");
    assert!(running.contains("worker ×1"), "{running}");
    let _ = Command::new("kill")
        .args(["-INT", &scaled.id().to_string()])
        .status();
    std::thread::spawn(move || lines.for_each(drop));
    assert_eq!(scaled.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A token `courier up` made, from `.courier/tokens.toml`.
fn token_of(dir: &Path, who: &str) -> String {
    let tokens = std::fs::read_to_string(dir.join(".courier/tokens.toml")).expect("tokens");
    tokens
        .lines()
        .find(|l| l.starts_with(&format!("\"{who}\"")))
        .and_then(|l| l.split('"').nth(3))
        .unwrap_or_else(|| panic!("no token of {who}"))
        .to_string()
}

/// `GET /metrics` from the broker's HTTP port, as the admin.
fn metrics(http: &str, admin_token: &str) -> String {
    let page = self::http(
        http,
        &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin_token}\r\nConnection: close\r\n\r\n"),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    page
}

#[test]
fn transfers_answer_with_their_outcomes_counted_in_the_metrics_and_a_copy_streams_progress() {
    let dir = app_dir("transfer", "transfer");
    let (bus, http_port, web) = (free_addr(), free_addr(), free_addr());
    let mut up = Up::start(&dir, &bus, &http_port, &web);
    let running = up.wait_line(&["courier up:", "running"]);
    assert!(
        running.contains("bank ×1")
            && running.contains("files ×1")
            && running.contains("teller ×1"),
        "{running}"
    );
    for outcome in [
        "transfer.transferred",
        "transfer.pending",
        "transfer.transaction-limit-exceeded",
        "transfer.insufficient-funds",
        "transfer.unknown-account",
        "transfer.unauthorized",
        "transfer.internal-error",
    ] {
        up.wait_line(&["teller.1", &format!(": {outcome}")]);
    }
    // alice's daily limit runs out over the rounds.
    up.wait_line(&["teller.1", ": transfer.daily-limit-exceeded"]);
    let copied = up.wait_line(&["teller.1", "file.copy", "file.copied"]);
    assert!(
        copied.contains("(9 progress replies, 1000000 bytes)"),
        "{copied}"
    );

    // The broker counts each outcome of the transfer command.
    let page = metrics(&http_port, &token_of(&dir, "admin"));
    for outcome in courier_example_outcomes() {
        let series =
            format!("courier_command_replies_total{{name=\"transfer\",outcome=\"{outcome}\"}}");
        let count = page
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"));
        assert!(count >= 1.0, "{series} {count}");
    }
    let _ = Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status();
    assert_eq!(up.child.wait().expect("wait").code(), Some(0));
    assert_nothing_left(&dir, &["bank", "files", "teller"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// No process of the application (its binaries, its broker) outlived
/// courier up.
fn assert_nothing_left(dir: &Path, binaries: &[&str]) {
    let data = dir.join(".courier").display().to_string();
    let mut needles: Vec<String> = binaries
        .iter()
        .map(|b| bin_dir().join(b).display().to_string())
        .collect();
    needles.push(data);
    for needle in &needles {
        assert_eq!(
            processes_with(dir, needle),
            Vec::<u32>::new(),
            "left running: {needle}"
        );
    }
}

/// The outcomes the teller's rounds reach.
fn courier_example_outcomes() -> [&'static str; 8] {
    [
        "transfer.transferred",
        "transfer.pending",
        "transfer.transaction-limit-exceeded",
        "transfer.daily-limit-exceeded",
        "transfer.insufficient-funds",
        "transfer.unknown-account",
        "transfer.unauthorized",
        "transfer.internal-error",
    ]
}

#[test]
fn print_compose_writes_every_service_port_and_variable_and_no_token() {
    let dir = app_dir("todo", "compose");
    let out = Command::new(courier_bin())
        .arg("up")
        .arg(&dir)
        .args(["--print-compose", "--scale", "todo=2"])
        .output()
        .expect("courier up --print-compose");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    // Read as YAML by a YAML parser (PyYAML, which scripts/test.sh installs).
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let parsed = python.wait_with_output().expect("python3 ran");
    assert!(parsed.status.success(), "not YAML:\n{text}");
    let compose: serde_json::Value = serde_json::from_slice(&parsed.stdout).expect("json");
    let services = compose["services"].as_object().expect("services");
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        ["broker", "stats", "todo", "web"],
        "{text}"
    );
    let broker = &services["broker"];
    assert_eq!(
        broker["ports"],
        serde_json::json!(["7700:7700", "7780:7780"])
    );
    assert!(broker["command"]
        .as_array()
        .expect("command")
        .contains(&serde_json::json!("/etc/courier/manifest.toml")));
    for (name, replicas) in [("web", 1), ("todo", 2)] {
        let s = &services[name];
        assert_eq!(s["environment"]["COURIER_URL"], "broker:7700", "{name}");
        assert_eq!(s["environment"]["COURIER_SERVICE"], name);
        assert_eq!(s["deploy"]["replicas"], replicas, "{name}");
        assert_eq!(s["depends_on"], serde_json::json!(["broker"]));
        let command = s["command"][2].as_str().expect("command");
        assert!(
            command.contains("$${TODO_BIN_DIR"),
            "compose must not interpolate: {command}"
        );
        let env_file = s["env_file"][0].as_str().expect("env_file");
        let secret = std::fs::read_to_string(dir.join(env_file)).expect("env file");
        let token = token_of(&dir, name);
        assert_eq!(secret.trim(), format!("COURIER_TOKEN={token}"));
        assert!(!text.contains(&token), "no token in the compose file");
    }
    assert_eq!(services["web"]["environment"]["PORT"], "3000");
    assert_eq!(services["web"]["environment"]["HOST"], "0.0.0.0");
    assert_eq!(services["web"]["ports"], serde_json::json!(["3000:3000"]));
    // The replica advertises its own address: run the command's shell as
    // the container would (compose turns $$ into $), with `run` replaced
    // by a print of what it would see.
    let web_command = services["web"]["command"][2].as_str().expect("command");
    let (prefix, run) = web_command
        .split_once("exec ")
        .expect("the prefix runs before `run`");
    assert!(run.contains("todo-web"), "{web_command}");
    let shell = format!("{}echo \"$COURIER_ADVERTISE\"", prefix.replace("$$", "$"));
    let seen = Command::new("sh")
        .args(["-c", &shell])
        .env("PORT", "3000")
        .env_remove("COURIER_ADVERTISE")
        .output()
        .expect("sh");
    let advertised = String::from_utf8_lossy(&seen.stdout).trim().to_string();
    let (ip, port) = advertised.rsplit_once(':').expect("IP:PORT advertised");
    assert_eq!(port, "3000");
    assert!(
        ip.parse::<std::net::IpAddr>().is_ok(),
        "advertised {advertised:?}"
    );
    assert!(
        !services["stats"]["environment"]
            .as_object()
            .expect("environment")
            .contains_key("HOST"),
        "stats has no http port"
    );
    assert!(
        dir.join(".courier/manifest.toml").exists(),
        "the broker's manifest is written"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn watch_restarts_the_services_whose_files_changed() {
    let dir = app_dir("todo", "watch");
    let (bus, web) = (free_addr(), free_addr());
    let mut up = Up::start_with(&dir, &bus, "off", &web, &["--watch"]);
    up.wait_line(&["courier up:", "running"]);
    up.wait_line(&["todo.1", "todo service ready"]);
    up.wait_line(&["web.1", "todo web listening"]);
    up.seen.clear();
    // Both services run from the application's directory: a new file
    // there is a change to both.
    std::fs::write(dir.join("notes.txt"), "changed").expect("write");
    up.wait_line(&["todo.1", "restarting: its files changed"]);
    up.wait_line(&["web.1", "restarting: its files changed"]);
    up.wait_line(&["todo.1", "todo service ready"]);
    up.wait_line(&["web.1", "todo web listening"]);
    let created = create(&web, "after a change");
    assert!(created.starts_with("HTTP/1.1 303"), "{created}");
    let _ = Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status();
    assert_eq!(up.child.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `courier services NAME --json` against `courier up`'s broker: the
/// addresses of NAME's healthy instances, sorted.
fn registered_addresses(http: &str, token: &str, name: &str) -> Vec<String> {
    let out = Command::new(courier_bin())
        .args(["services", name, "--json", "--http", http])
        .env("COURIER_TOKEN", token)
        .output()
        .expect("run courier services");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut addresses: Vec<String> = listed["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str().map(str::to_string))
        .collect();
    addresses.sort();
    addresses
}

#[test]
fn a_service_with_an_http_port_is_registered_at_it_unless_its_env_says_otherwise() {
    let dir = app_dir("todo", "advertise");
    let port = |addr: String| addr.rsplit_once(':').expect("HOST:PORT").1.to_string();
    let (todo_port, stats_port) = (port(free_addr()), port(free_addr()));
    let toml = std::fs::read_to_string(dir.join("courier.toml")).expect("read courier.toml");
    assert_eq!(
        toml.lines().rfind(|l| l.starts_with('[')),
        Some("[services.stats]"),
        "the example's last table is stats"
    );
    // todo declares a port; stats (the file's last table) one too, and
    // advertises an address of its own; web's two instances serve where
    // their PORT says (3000 + n - 1 moved to a free pair).
    let web_port: u16 = port(free_addr()).parse().expect("port");
    let toml = toml
        .replacen(
            "[services.todo]\n",
            &format!("[services.todo]\nhttp = {todo_port}\n"),
            1,
        )
        .replacen("http = 3000\n", &format!("http = {web_port}\n"), 1)
        + &format!("http = {stats_port}\nenv = {{ COURIER_ADVERTISE = \"127.0.0.1:4999\" }}\n");
    std::fs::write(dir.join("courier.toml"), toml).expect("write courier.toml");
    let (bus, http_port) = (free_addr(), free_addr());
    let mut up = Up::start_with(&dir, &bus, &http_port, "", &["--scale", "web=2"]);
    up.wait_line(&["courier up: up: stats 1/1, todo 1/1, web 2/2"]);
    let second_web = format!("127.0.0.1:{}", web_port + 1);
    up.wait_line(&["web.2", "todo web listening on", &second_web]);

    // A service's own token reads the registry.
    let token = token_of(&dir, "todo");
    let deadline = Instant::now() + T;
    let expected = (
        vec![format!("127.0.0.1:{todo_port}")],
        vec!["127.0.0.1:4999".to_string()],
        vec![format!("127.0.0.1:{web_port}"), second_web.clone()],
    );
    loop {
        let seen = (
            registered_addresses(&http_port, &token, "todo"),
            registered_addresses(&http_port, &token, "stats"),
            registered_addresses(&http_port, &token, "web"),
        );
        if seen == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registered (todo, stats, web): {seen:?}, not {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status();
    assert_eq!(up.child.wait().expect("wait").code(), Some(0));
    assert_nothing_left(&dir, &["todo-service", "todo-web", "todo-stats"]);
    let _ = std::fs::remove_dir_all(&dir);
}
