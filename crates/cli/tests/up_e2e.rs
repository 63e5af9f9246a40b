//! `courier up` on the examples, as a user runs it: real builds, a real
//! broker, real services and real traffic; Ctrl-C (SIGINT) and
//! `courier down` stop everything with nothing left running; a crashed
//! instance comes back; a second `courier up` and an inconsistent
//! application are refused with messages that say what to do.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{courier_bin, free_port, strip_ansi, tempdir};

/// Builds of the examples may be slow on a busy machine.
const STARTUP: Duration = Duration::from_secs(900);
const SOON: Duration = Duration::from_secs(60);

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// A running `courier up`, its output collected line by line.
struct Up {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    listen: String,
    http: String,
}

impl Up {
    fn start(dir: &Path, extra: &[&str]) -> Up {
        let listen = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(courier_bin())
            .arg("up")
            .arg(dir)
            .args(["--listen", &listen, "--http", &http])
            .args(extra)
            .env("COURIER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn courier up");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().expect("lines").push(strip_ansi(&line));
                }
            });
        }
        Up {
            child,
            lines,
            listen,
            http,
        }
    }

    fn text(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `times` lines contain `needle`.
    fn wait_for_n(&mut self, needle: &str, times: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(needle) < times {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "courier up exited ({status}) before {needle:?}:\n{}",
                    self.text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} (x{times}) within {timeout:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        self.wait_for_n(needle, 1, timeout);
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let tree = descendants(self.pid());
            let _ = Command::new("kill")
                .args(["-INT", &self.pid().to_string()])
                .status();
            if self.wait_exit(Duration::from_secs(30)).is_none() {
                let _ = self.child.kill();
                for (pid, _) in tree {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
    }
}

/// (pid, start time) of a live, non-zombie process.
fn process(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((pid, fields.get(19)?.parse().ok()?))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every process below `root`, as (pid, start time) so a reused pid is
/// not mistaken for a survivor.
fn descendants(root: u32) -> BTreeSet<(u32, u64)> {
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut found: BTreeSet<u32> = BTreeSet::from([root]);
    loop {
        let before = found.len();
        for &pid in &pids {
            if parent_of(pid).is_some_and(|p| found.contains(&p)) {
                found.insert(pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.remove(&root);
    found.into_iter().filter_map(process).collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Asserts that none of `tree` is still alive.
fn assert_no_survivors(tree: &BTreeSet<(u32, u64)>, output: &str) {
    let survivors: Vec<String> = tree
        .iter()
        .filter(|(pid, start)| process(*pid) == Some((*pid, *start)))
        .map(|(pid, _)| format!("{pid} ({})", comm(*pid)))
        .collect();
    assert!(
        survivors.is_empty(),
        "left running: {survivors:?}\n{output}"
    );
}

fn http(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

fn tokens(dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dir.join(".courier/tokens.toml")).expect("tokens.toml");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, token) = l.split_once(" = ")?;
            Some((
                name.trim_matches('"').into(),
                token.trim_matches('"').into(),
            ))
        })
        .collect()
}

#[test]
fn todo_app_serves_restarts_a_crashed_instance_is_exclusive_and_stops_with_down() {
    let dir = example("todo");
    let web = format!("127.0.0.1:{}", free_port());
    let web_port = web.rsplit(':').next().expect("port").to_string();
    let mut up = Up::start(&dir, &["--port", &format!("web={web_port}")]);
    up.wait_for("todo service ready", STARTUP);
    up.wait_for("todo web listening", SOON);
    up.wait_for("up: todo 1/1, web 1/1", SOON);
    let text = up.text();
    assert!(
        text.contains(&format!("console: http://{}/", up.http)),
        "{text}"
    );
    assert!(
        text.contains(&format!("web.1 is at http://127.0.0.1:{web_port}/")),
        "{text}"
    );
    assert!(
        text.contains("todo.1  | todo service ready"),
        "prefixed: {text}"
    );

    let created = http(
        &web,
        "POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntext=milk",
    );
    assert!(created.starts_with("HTTP/1.1 303"), "{created}");
    let page = http(
        &web,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(page.contains("<li>milk</li>"), "{page}");

    // The generated credentials are used but never shown.
    let tokens = tokens(&dir);
    assert!(tokens.len() >= 3, "web, todo and the admin: {tokens:?}");
    for (_, token) in &tokens {
        assert!(!up.text().contains(token.as_str()), "a token was printed");
    }

    // A second `courier up` in the same directory says what runs and how to stop it.
    let second = Command::new(courier_bin())
        .arg("up")
        .arg(&dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .output()
        .expect("second up");
    let refusal = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{refusal}");
    assert!(
        refusal.contains(&format!(
            "courier up is already running for {} (pid {})",
            dir.display(),
            up.pid()
        )) && refusal.contains("courier down"),
        "{refusal}"
    );

    // kill -9 of the todo service: said, and restarted.
    let todo = descendants(up.pid())
        .into_iter()
        .find(|(pid, _)| comm(*pid) == "todo-service")
        .expect("a todo-service process");
    let killed = Command::new("kill")
        .args(["-9", &todo.0.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    up.wait_for(
        "todo.1 exited (killed by signal 9, SIGKILL); restarting in",
        SOON,
    );
    up.wait_for_n("todo service ready", 2, SOON);
    let restarted = descendants(up.pid())
        .into_iter()
        .find(|(pid, _)| comm(*pid) == "todo-service")
        .expect("a new todo-service process");
    assert_ne!(restarted, todo);
    // Real traffic again: web keeps its connection, the new instance answers.
    let deadline = Instant::now() + SOON;
    loop {
        let created = http(
            &web,
            "POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 10\r\nConnection: close\r\n\r\ntext=bread",
        );
        if created.starts_with("HTTP/1.1 303") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "todo.create after the restart: {created}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let page = http(
        &web,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(page.contains("<li>bread</li>"), "{page}");

    // `courier down` stops it all.
    let tree = descendants(up.pid());
    let down = Command::new(courier_bin())
        .arg("down")
        .arg(&dir)
        .output()
        .expect("down");
    let said = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "{said}");
    assert!(
        said.contains("stopping courier up") && said.contains("stopped"),
        "{said}"
    );
    assert_eq!(up.wait_exit(SOON), Some(0), "{}", up.text());
    assert_no_survivors(&tree, &up.text());
    assert!(up
        .text()
        .contains("stopped: every service and the broker have exited"));

    let again = Command::new(courier_bin())
        .arg("down")
        .arg(&dir)
        .output()
        .expect("down again");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing is running"));
}

#[test]
fn sensor_pipeline_workers_compete_and_sigint_stops_services_first_then_the_broker() {
    let dir = example("sensor-pipeline");
    let mut up = Up::start(&dir, &["--scale", "worker=2"]);
    up.wait_for("up: app 1/1, sensor 1/1, worker 2/2", STARTUP);
    // Readings flow through both competing workers to the app.
    up.wait_for("(worker 1)", SOON);
    up.wait_for("(worker 2)", SOON);
    let text = up.text();
    assert!(text.contains("sensor.1 | published reading"), "{text}");
    assert!(text.contains("app.1    | reading "), "{text}");

    let tree = descendants(up.pid());
    assert!(tree.len() >= 5, "broker, sensor, 2 workers, app: {tree:?}");
    up.signal("-INT");
    assert_eq!(up.wait_exit(SOON), Some(0), "{}", up.text());
    assert_no_survivors(&tree, &up.text());

    let lines: Vec<String> = up.lines.lock().expect("lines").clone();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{}", lines.join("\n")))
    };
    let broker_stopped = at("broker   | courier: stopped");
    for service_stopped in [
        "worker 1 stopped",
        "worker 2 stopped",
        "app stopped",
        "sensor stopped",
    ] {
        assert!(
            at(service_stopped) < broker_stopped,
            "services first:\n{}",
            lines.join("\n")
        );
    }
    assert!(at("stopping: services first, then the broker") < at("worker 1 stopped"));
}

#[test]
fn transfer_outcomes_reach_the_teller_and_are_counted_in_the_metrics() {
    let dir = example("transfer");
    let mut up = Up::start(&dir, &[]);
    let outcomes = [
        "transfer.transferred",
        "transfer.pending",
        "transfer.transaction-limit-exceeded",
        "transfer.daily-limit-exceeded",
        "transfer.insufficient-funds",
        "transfer.unknown-account",
        "transfer.unauthorized",
        "transfer.internal-error",
    ];
    up.wait_for("teller ready", STARTUP);
    for outcome in outcomes {
        up.wait_for(&format!(": {outcome}"), SOON);
    }
    // A round may start before bank and files subscribed: a later one
    // gets the whole stream.
    up.wait_for("file.copy.progress: statements/round-", SOON);
    up.wait_for("file.copy.done: statements/round-", SOON);
    let text = up.text();
    let done = text
        .lines()
        .find(|l| l.contains("file.copy.done"))
        .expect("a done line");
    assert!(done.ends_with(" 4000000/4000000 bytes"), "{done}");

    let admin = tokens(&dir)
        .into_iter()
        .find(|(name, _)| name == "_admin")
        .expect("an admin token")
        .1;
    let metrics = http(
        &up.http,
        &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nConnection: close\r\n\r\n"),
    );
    for outcome in outcomes {
        let line =
            format!("courier_command_replies_total{{name=\"transfer\",outcome=\"{outcome}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {line:?} in the metrics:\n{metrics}"))
            .trim()
            .parse()
            .expect("a count");
        assert!(count >= 1, "{outcome}: {count}");
    }
    assert!(up.listen.starts_with("127.0.0.1:"));
    let tree = descendants(up.pid());
    up.signal("-INT");
    assert_eq!(up.wait_exit(SOON), Some(0), "{}", up.text());
    assert_no_survivors(&tree, &up.text());
}

#[test]
fn an_inconsistent_app_is_refused_with_its_problems_and_nothing_starts() {
    let dir = tempdir::Dir::new("up-inconsistent");
    std::fs::write(
        dir.path().join("courier.toml"),
        "[services.web]\nsends = [\"todo.create\"]\nrun = \"sleep 60\"\n",
    )
    .expect("write");
    let out = Command::new(courier_bin())
        .arg("up")
        .arg(dir.path())
        .output()
        .expect("up");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("is inconsistent, so nothing was started (1 problem(s)):"),
        "{said}"
    );
    assert!(said.contains("todo.create"), "the problem itself: {said}");
    assert!(said.contains("fix the errors above"), "{said}");
    assert!(
        !dir.path().join(".courier").exists(),
        "nothing prepared or started"
    );

    std::fs::write(
        dir.path().join("courier.toml"),
        "[services.web]\nrun = \"sleep 60\"\n",
    )
    .expect("write");
    let out = Command::new(courier_bin())
        .arg("up")
        .arg(dir.path())
        .args(["--scale", "wrker=2"])
        .output()
        .expect("up");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("runs no service wrker; its services with a run command are web"),
        "{said}"
    );

    let out = Command::new(courier_bin())
        .arg("up")
        .arg(dir.path().join("missing"))
        .output()
        .expect("up");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("does not exist; courier up needs the application's courier.toml"),
        "{said}"
    );
}

#[test]
fn print_compose_describes_every_service_port_and_variable_without_secrets() {
    let dir = tempdir::Dir::new("up-compose");
    let manifest = std::fs::read_to_string(example("todo").join("courier.toml")).expect("read");
    std::fs::write(dir.path().join("courier.toml"), manifest).expect("write");
    let out = Command::new(courier_bin())
        .arg("up")
        .arg(dir.path())
        .args(["--print-compose", "--scale", "todo=3"])
        .output()
        .expect("up --print-compose");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let compose: serde_json::Value = serde_json::from_str(&body).expect("the compose file parses");
    let services = compose["services"].as_object().expect("services");
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        ["broker", "todo", "web"],
        "{text}"
    );
    let broker = &services["broker"];
    assert_eq!(broker["image"], "courier:latest");
    assert_eq!(
        broker["ports"],
        serde_json::json!(["7700:7700", "7780:7780"])
    );
    let command: Vec<&str> = broker["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        command,
        [
            "serve",
            "--listen",
            "0.0.0.0:7700",
            "--http",
            "0.0.0.0:7780",
            "--manifest",
            "/etc/courier/courier.toml",
            "--data-dir",
            "/data"
        ]
    );
    assert!(broker["volumes"][0]
        .as_str()
        .is_some_and(|v| v.starts_with("./.courier/manifest.toml:")));

    let web = &services["web"];
    assert_eq!(web["ports"], serde_json::json!(["3000:3000"]));
    assert_eq!(web["deploy"]["replicas"], 1);
    assert_eq!(
        web["environment"],
        serde_json::json!({
            "COURIER_URL": "broker:7700",
            "COURIER_SERVICE": "web",
            "COURIER_TOKEN": "${COURIER_TOKEN_WEB}",
            "PORT": "3000",
        })
    );
    assert_eq!(web["command"][0], "sh");
    assert!(web["command"][2]
        .as_str()
        .is_some_and(|c| c.contains("todo-web")));
    assert_eq!(web["depends_on"], serde_json::json!(["broker"]));

    let todo = &services["todo"];
    assert_eq!(todo["deploy"]["replicas"], 3, "--scale applies");
    assert_eq!(
        todo["environment"]["COURIER_TOKEN"],
        "${COURIER_TOKEN_TODO}"
    );
    assert!(todo.get("ports").is_none());

    // The tokens are in compose.env, never in the file.
    let env = std::fs::read_to_string(dir.path().join(".courier/compose.env")).expect("env");
    let tokens = tokens(dir.path());
    for (name, token) in tokens.iter().filter(|(n, _)| n != "_admin") {
        assert!(
            env.contains(&format!("COURIER_TOKEN_{}={token}", name.to_uppercase())),
            "{env}"
        );
        assert!(!text.contains(token.as_str()));
    }
}

#[test]
fn watch_rebuilds_and_restarts_the_service_whose_files_changed() {
    let dir = tempdir::Dir::new("up-watch");
    std::fs::write(dir.path().join("version"), "1\n").expect("write");
    std::fs::write(dir.path().join("other"), "x\n").expect("write");
    std::fs::write(
        dir.path().join("courier.toml"),
        "[services.clock]\nbuild = \"echo building clock from $(cat version)\"\n\
         run = \"echo clock v$(cat version) running; exec sleep 600\"\nwatch = [\"version\"]\n\
         [services.still]\nrun = \"echo still running; exec sleep 600\"\nwatch = [\"other\"]\n",
    )
    .expect("write");
    let mut up = Up::start(dir.path(), &["--watch"]);
    up.wait_for("clock v1 running", SOON);
    up.wait_for("still running", SOON);
    up.wait_for("watching the services' files", SOON);
    std::fs::write(dir.path().join("version"), "2\n").expect("write");
    up.wait_for("building clock from 2", SOON);
    up.wait_for("clock.1: restarting with what changed", SOON);
    up.wait_for("clock v2 running", SOON);
    assert_eq!(up.count("still running"), 1, "only what changed restarts");
    let tree = descendants(up.pid());
    up.signal("-TERM");
    assert_eq!(up.wait_exit(SOON), Some(0), "{}", up.text());
    assert_no_survivors(&tree, &up.text());
}
