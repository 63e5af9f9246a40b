//! Broker, both services and an HTTP client, each a real process or socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// The `courier` binary sits beside this package's binaries in the target
/// dir; built once per test run.
fn courier_bin() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "courier-cli", "--bin", "courier"])
                .status()
                .expect("cargo build courier");
            assert!(status.success());
            std::path::Path::new(env!("CARGO_BIN_EXE_todo-web")).with_file_name("courier")
        })
        .clone()
}

/// Starts a process and waits for a stdout line containing `ready`.
fn start(mut cmd: Command, ready: &str) -> Killed {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("a line").expect("read");
    assert!(first.contains(ready), "{first:?} should contain {ready:?}");
    std::thread::spawn(move || lines.for_each(drop));
    Killed(child)
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

#[test]
fn web_lists_and_creates_todos_through_the_todo_service() {
    let bus = free_addr();
    let web_addr = free_addr();
    let data = std::env::temp_dir().join(format!("courier-todo-e2e-{}", std::process::id()));
    let mut serve = Command::new(courier_bin());
    serve
        .args([
            "serve",
            "--listen",
            &bus,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .env("COURIER_LOG", "warn");
    let _broker = start(serve, &bus);

    let mut todo = Command::new(env!("CARGO_BIN_EXE_todo-service"));
    todo.env("COURIER_URL", &bus)
        .env("COURIER_LOG", "warn")
        .env("TODO_DATABASE", data.join("app/todo.sqlite"));
    let _todo = start(todo, "todo service ready");
    let mut web = Command::new(env!("CARGO_BIN_EXE_todo-web"));
    web.env("COURIER_URL", &bus)
        .env("TODO_WEB_LISTEN", &web_addr)
        .env("COURIER_LOG", "warn");
    let _web = start(web, "todo web listening");

    let page = http(
        &web_addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("<ul id=\"todos\"></ul>"),
        "empty list at first: {page}"
    );
    assert!(
        page.contains("<form method=\"post\" action=\"/todos\">"),
        "{page}"
    );

    for text in ["buy milk", "walk <the> dog"] {
        let body = format!(
            "text={}",
            text.replace(' ', "+")
                .replace('<', "%3C")
                .replace('>', "%3E")
        );
        let resp = http(
            &web_addr,
            &format!(
                "POST /todos HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(
            resp.starts_with("HTTP/1.1 303"),
            "redirect after create: {resp}"
        );
    }
    let page = http(
        &web_addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        page.contains("<li>buy milk</li><li>walk &lt;the&gt; dog</li>"),
        "{page}"
    );
    let _ = std::fs::remove_dir_all(&data);
}

/// A process whose stdout and stderr lines are kept as they come; killed
/// on drop if still running.
struct Watched {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Watched {
    /// Starts `cmd` and waits for a stdout line containing `ready`.
    fn start(mut cmd: Command, ready: &str) -> Watched {
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for pipe in [
            Box::new(stdout) as Box<dyn Read + Send>,
            Box::new(stderr) as Box<dyn Read + Send>,
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        let watched = Watched { child, lines };
        watched.wait_for(ready);
        watched
    }

    fn said(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// Waits (10 s at most) for a line containing `needle`.
    fn wait_for(&self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.said().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no line with {needle:?}; got:\n{}",
                self.said()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit code (within 10 s).
    fn terminate(&mut self) -> Option<i32> {
        self.send_sigterm();
        self.exit_code()
    }

    fn send_sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
    }

    /// The exit code, waited for 10 s at most.
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running 10 s after SIGTERM; it said:\n{}",
                self.said()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Broker, todo service and web, each a process, on fresh addresses.
struct App {
    bus: String,
    web_addr: String,
    data: std::path::PathBuf,
}

impl App {
    fn new(tag: &str) -> App {
        App {
            bus: free_addr(),
            web_addr: free_addr(),
            data: std::env::temp_dir()
                .join(format!("courier-todo-e2e-{tag}-{}", std::process::id())),
        }
    }

    fn broker(&self) -> Watched {
        let mut serve = Command::new(courier_bin());
        serve
            .args([
                "serve",
                "--listen",
                &self.bus,
                "--http",
                "off",
                "--data-dir",
            ])
            .arg(&self.data)
            .env("COURIER_LOG", "warn");
        Watched::start(serve, &self.bus)
    }

    fn todo(&self) -> Watched {
        let mut todo = Command::new(env!("CARGO_BIN_EXE_todo-service"));
        todo.env("COURIER_URL", &self.bus)
            .env("COURIER_LOG", "info")
            .env("TODO_DATABASE", self.data.join("app/todo.sqlite"));
        Watched::start(todo, "todo service ready")
    }

    fn web(&self, timeout_ms: u32) -> Watched {
        let mut web = Command::new(env!("CARGO_BIN_EXE_todo-web"));
        web.env("COURIER_URL", &self.bus)
            .env("TODO_WEB_LISTEN", &self.web_addr)
            .env("TODO_WEB_TIMEOUT_MS", timeout_ms.to_string())
            .env("COURIER_LOG", "info");
        Watched::start(web, "todo web listening")
    }

    fn get_page(&self) -> String {
        http(
            &self.web_addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

#[test]
fn the_page_tells_an_unreachable_bus_from_a_todo_service_that_does_not_answer() {
    let app = App::new("outage");
    let mut broker = app.broker();
    let mut todo = app.todo();
    let mut web = app.web(1_000);
    assert!(app.get_page().starts_with("HTTP/1.1 200"));

    // The todo service stops; its subscription stays, so requests wait for it.
    assert_eq!(todo.terminate(), Some(0), "{}", todo.said());
    let page = app.get_page();
    assert!(page.starts_with("HTTP/1.1 504"), "{page}");
    assert!(
        page.contains("The todo service did not answer within 1000 ms")
            && page.contains("The bus is up"),
        "{page}"
    );

    // Now the broker goes.
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    web.wait_for(&format!(
        "the bus (Courier broker at {}) is unreachable; reconnecting",
        app.bus
    ));
    let page = app.get_page();
    assert!(page.starts_with("HTTP/1.1 503"), "{page}");
    assert!(
        page.contains(&format!(
            "The bus is unreachable: the Courier broker at {} does not answer",
            app.bus
        )),
        "{page}"
    );
    assert!(!page.contains("todo service did not answer"), "{page}");

    // The broker is back: so is the page (the todo service too).
    let _broker = app.broker();
    web.wait_for(&format!("the bus (Courier broker at {}) is back", app.bus));
    let _todo = app.todo();
    let page = app.get_page();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert_eq!(web.terminate(), Some(0), "{}", web.said());
}

#[test]
fn both_services_drain_and_exit_cleanly_on_sigterm() {
    let app = App::new("drain");
    let _broker = app.broker();
    let mut todo = app.todo();
    let mut web = app.web(20_000);
    assert!(app.get_page().starts_with("HTTP/1.1 200"));

    assert_eq!(todo.terminate(), Some(0), "{}", todo.said());
    todo.wait_for("todo service stopped (drained)");

    // A page request waits in the web for the todo service …
    let web_addr = app.web_addr.clone();
    let page = std::thread::spawn(move || {
        http(
            &web_addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    });
    // … once its todos.list waits on the bus for the todo service.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(courier_bin())
            .args(["services", "--url", &app.bus])
            .output()
            .expect("courier services");
        let waiting = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            let s: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            s["name"] == "todo" && s["backlog"].as_u64().unwrap_or(0) >= 1
        });
        if waiting {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page's todos.list never waited for the todo service"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM now: the web takes no new requests but answers the one in.
    web.send_sigterm();
    let _todo = app.todo();
    let page = page.join().expect("page request");
    assert!(
        page.starts_with("HTTP/1.1 200"),
        "the request in flight is answered: {page}"
    );
    assert!(page.contains("<ul id=\"todos\">"), "{page}");
    assert_eq!(web.exit_code(), Some(0), "{}", web.said());
    web.wait_for("todo web stopped (drained)");
}
