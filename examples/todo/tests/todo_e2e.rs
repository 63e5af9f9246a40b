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

/// The `courier` binary sits beside this package's binaries in the target dir.
fn courier_bin() -> std::path::PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "courier-cli", "--bin", "courier"])
        .status()
        .expect("cargo build courier");
    assert!(status.success());
    std::path::Path::new(env!("CARGO_BIN_EXE_todo-web")).with_file_name("courier")
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
    todo.env("COURIER_URL", &bus).env("COURIER_LOG", "warn");
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
