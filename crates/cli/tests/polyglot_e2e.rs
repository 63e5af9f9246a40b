//! The polyglot todo application (examples/polyglot): the Rust `todo-web`,
//! the Python `todo-service` and the TypeScript `notifier`, each a real
//! process, against one real broker.
//!
//! Needs what `scripts/test.sh` prepares before the cargo tests: the
//! Python client installed in the virtualenv beside the build
//! (`$CARGO_TARGET_DIR/python-venv`, or `COURIER_PYTHON`), and the
//! notifier built (`npm ci && npm run build` in examples/polyglot/notifier).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Broker;

const READY_WITHIN: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python the test suite's virtualenv provides (with courier-client).
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("COURIER_PYTHON") {
        return PathBuf::from(python);
    }
    let target_dir = Path::new(common::courier_bin())
        .parent()
        .and_then(Path::parent)
        .expect("the courier binary sits in <target>/<profile>/");
    let python = target_dir.join("python-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh once (it makes the virtualenv and installs clients/python), or set COURIER_PYTHON to a python with courier-client installed",
        python.display()
    );
    python
}

/// `todo-web` from examples/todo, built into the same target dir.
fn todo_web() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "courier-example-todo",
            "--bin",
            "todo-web",
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build of todo-web failed");
    Path::new(common::courier_bin()).with_file_name("todo-web")
}

/// A process whose stdout lines arrive on a channel; killed on drop.
struct Service {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: &'static str,
}

impl Service {
    fn start(name: &'static str, mut cmd: Command) -> Service {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service { child, lines, name }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!(
                    "{} printed no line containing {needle:?} within {timeout:?}",
                    self.name
                ),
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect todo-web");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read answer");
    out
}

#[test]
fn rust_web_python_service_and_typescript_notifier_share_one_broker() {
    let notifier_js = repo_root().join("examples/polyglot/notifier/dist/notifier.js");
    assert!(
        notifier_js.exists(),
        "{} is missing: build the notifier first (cd examples/polyglot/notifier && npm ci && npm run build; scripts/test.sh does it)",
        notifier_js.display()
    );
    let web_bin = todo_web();
    let broker = Broker::start();
    let url = broker.addr.clone();

    let mut service = Command::new(python());
    service
        .args(["-m", "todo_service"])
        .env(
            "PYTHONPATH",
            repo_root().join("examples/polyglot/todo-service/src"),
        )
        .env("COURIER_URL", &url)
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let service = Service::start("todo-service (Python)", service);
    service.wait_line("todo service ready", READY_WITHIN);

    let mut notifier = Command::new("node");
    notifier.arg(&notifier_js).env("COURIER_URL", &url);
    let notifier = Service::start("notifier (TypeScript)", notifier);
    notifier.wait_line("notifier ready", READY_WITHIN);

    let web_addr = format!("127.0.0.1:{}", common::free_port());
    let mut web = Command::new(web_bin);
    web.env("COURIER_URL", &url)
        .env("TODO_WEB_LISTEN", &web_addr)
        .env("COURIER_LOG", "warn");
    let web = Service::start("todo-web (Rust)", web);
    web.wait_line("todo web listening", READY_WITHIN);

    let body = "text=buy+milk";
    let created = http(
        &web_addr,
        &format!(
            "POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(
        created.starts_with("HTTP/1.1 303"),
        "todo-web redirects once the Python service replied todo.created: {created}"
    );

    // The Python service stored it ...
    service.wait_line("stored todo 1: buy milk", READY_WITHIN);
    let page = http(
        &web_addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        page.contains("<li>buy milk</li>"),
        "the page lists what the Python service keeps: {page}"
    );

    // ... and the TypeScript notifier got the event it published.
    let line = notifier.wait_line("todo.created", READY_WITHIN);
    let event: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
    assert_eq!(event["id"], 1, "{line}");
    assert_eq!(event["text"], "buy milk", "{line}");
    // The services go first, so none of them logs a lost broker.
    drop((web, notifier, service));
    drop(broker);
}
