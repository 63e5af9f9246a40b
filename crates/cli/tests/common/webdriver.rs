//! Headless Chromium driven through chromedriver's W3C WebDriver HTTP
//! API: a few plain HTTP/1.1 calls with JSON bodies, enough for the
//! console's tests (open a page, find elements, click, read text, run a
//! script, take a screenshot).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How to get the browser when it is missing (scripts/test.sh does this).
const INSTALL: &str = "install Debian's chromium and chromium-driver packages \
    (apt-get install chromium chromium-driver; scripts/test.sh installs them)";

/// The W3C name of an element reference in JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: super::tempdir::Dir,
}

/// A failed WebDriver call: the command and what chromedriver said.
#[derive(Debug)]
pub struct DriverError(pub String);

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session
    /// with a fresh profile. Panics, saying how to install them, when
    /// either is missing or does not start.
    pub fn start() -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: the console's browser tests need it; {INSTALL}"
            );
        }
        let port = super::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}; {INSTALL}"));
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            _profile: super::tempdir::Dir::new("chromium-profile"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = browser
                .http("GET", "/status", None)
                .ok()
                .and_then(|v| v["value"]["ready"].as_bool());
            if ready == Some(true) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver on port {port} did not become ready within 20 s; {INSTALL}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = browser._profile.path().display().to_string();
        let args = [
            "--headless".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-quic".to_string(),
            "--no-first-run".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--window-size=1400,1000".to_string(),
            format!("--user-data-dir={profile}"),
        ];
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args }
                }
            }
        });
        let answer = browser
            .http("POST", "/session", Some(&capabilities))
            .unwrap_or_else(|e| panic!("no Chromium session: {}; {INSTALL}", e.0));
        browser.session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no Chromium session: {answer}; {INSTALL}"))
            .to_string();
        browser
    }

    /// One WebDriver call; the answer's JSON, or the error it reports.
    fn http(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, DriverError> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .map_err(|e| DriverError(format!("{method} {path}: connect: {e}")))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| DriverError(e.to_string()))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| DriverError(format!("{method} {path}: write: {e}")))?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader
            .read_line(&mut status_line)
            .map_err(|e| DriverError(format!("{method} {path}: read: {e}")))?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| DriverError(format!("{method} {path}: no status in {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .map_err(|e| DriverError(e.to_string()))?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut raw = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                reader
                    .read_line(&mut size)
                    .map_err(|e| DriverError(e.to_string()))?;
                let size = usize::from_str_radix(size.trim(), 16)
                    .map_err(|e| DriverError(format!("bad chunk size: {e}")))?;
                if size == 0 {
                    break;
                }
                let mut chunk = vec![0; size + 2];
                reader
                    .read_exact(&mut chunk)
                    .map_err(|e| DriverError(e.to_string()))?;
                raw.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = length {
            raw.resize(length, 0);
            reader
                .read_exact(&mut raw)
                .map_err(|e| DriverError(e.to_string()))?;
        } else {
            reader
                .read_to_end(&mut raw)
                .map_err(|e| DriverError(e.to_string()))?;
        }
        let value: Value = serde_json::from_slice(&raw).map_err(|e| {
            DriverError(format!(
                "{method} {path}: answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&raw)
            ))
        })?;
        if status >= 400 {
            return Err(DriverError(format!(
                "{method} {path}: {status}: {}",
                value["value"]["message"].as_str().unwrap_or("?")
            )));
        }
        Ok(value)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, DriverError> {
        let path = format!("/session/{}{path}", self.session);
        self.http(method, &path, body.as_ref())
            .map(|mut v| v["value"].take())
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })))
            .unwrap_or_else(|e| panic!("open {url}: {}", e.0));
    }

    /// Every element matching a CSS selector now.
    pub fn find_all(&self, css: &str) -> Vec<String> {
        self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e[ELEMENT_KEY].as_str().map(str::to_string))
        .collect()
    }

    /// The visible text of an element.
    pub fn text(&self, element: &str) -> Result<String, DriverError> {
        self.call("GET", &format!("/element/{element}/text"), None)
            .map(|v| v.as_str().unwrap_or_default().to_string())
    }

    /// Types `text` into an input element.
    pub fn type_into(&self, element: &str, text: &str) -> Result<(), DriverError> {
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .map(|_| ())
    }

    pub fn click(&self, element: &str) -> Result<(), DriverError> {
        self.call(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .map(|_| ())
    }

    /// Runs a script in the page; its return value.
    pub fn script(&self, script: &str, args: Value) -> Result<Value, DriverError> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Waits until `check` gives `Some`, polling; panics with `what`, the
    /// page's status line and a screenshot path after `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            if Instant::now() >= deadline {
                let shot = self.screenshot(&format!("failed-{}", slug(what)));
                let status = self.visible_text("#status");
                panic!(
                    "waited {timeout:?} for {what}; the page's status: {status:?}; screenshot: {}",
                    shot.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for an element matching `css` whose text contains `needle`.
    pub fn wait_text(&self, css: &str, needle: &str, timeout: Duration) -> String {
        self.wait_for(&format!("{css} showing {needle:?}"), timeout, |b| {
            b.find_all(css)
                .into_iter()
                .filter_map(|e| b.text(&e).ok())
                .find(|t| t.contains(needle))
        })
    }

    /// Clicks the first element matching `css`, waiting for it to exist.
    /// The page patches itself every poll; a click that lost its element
    /// to a redraw is tried again on the new one.
    pub fn click_css(&self, css: &str, timeout: Duration) {
        self.wait_for(&format!("a clickable {css}"), timeout, |b| {
            let element = b.find_all(css).into_iter().next()?;
            b.click(&element).ok()
        });
    }

    /// The text of the first element matching `css` ("" when none).
    pub fn visible_text(&self, css: &str) -> String {
        self.find_all(css)
            .first()
            .and_then(|e| self.text(e).ok())
            .unwrap_or_default()
    }

    /// Saves a PNG of the window under the screenshot directory; its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let dir = screenshot_dir();
        let path = dir.join(format!("{name}.png"));
        let encoded = self
            .call("GET", "/screenshot", None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        match encoded.and_then(|b64| base64_decode(&b64)) {
            Some(png) => {
                let _ = std::fs::create_dir_all(&dir);
                if let Err(e) = std::fs::write(&path, png) {
                    eprintln!("cannot save {}: {e}", path.display());
                }
            }
            None => eprintln!("no screenshot for {name}"),
        }
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.http("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Where screenshots go: `$CARGO_TARGET_DIR/console-screenshots` (or the
/// `target` directory beside the test binary).
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // …/target/debug/deps/console_e2e-… → …/target
            std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        })
        .unwrap_or_else(std::env::temp_dir);
    target.join("console-screenshots")
}

fn slug(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(60)
        .collect()
}

/// Standard base64 (with padding), as WebDriver sends screenshots.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let produced = chunk.len() * 6 / 8;
        for i in 0..produced {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}
