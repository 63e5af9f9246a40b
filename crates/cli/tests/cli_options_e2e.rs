//! Each flag of send, publish, request and reply takes effect on a real
//! broker, as a receiver sees it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{json_lines, stderr, Broker, Proc};

const T: Duration = Duration::from_secs(10);

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// A receiver of `pattern` for `service`, ready once its subscription is.
fn receiver(broker: &Broker, pattern: &str, service: &str) -> Proc {
    // Created by a run that ends, so the spawned one starts subscribed.
    let out = broker.run(&[
        "subscribe",
        pattern,
        "--service",
        service,
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    broker.spawn(&["subscribe", pattern, "--service", service])
}

/// Each line of a child's stdout as JSON, as it comes.
fn json_lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    rx
}

fn ok(broker: &Broker, args: &[&str]) -> Vec<serde_json::Value> {
    let out = broker.run(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    json_lines(&out)
}

#[test]
fn headers_version_key_and_id_reach_the_receiver() {
    let broker = Broker::start();
    let todo = receiver(&broker, "todo.>", "todo");
    let id = "0190f3c4-7d2a-7c1e-9b1a-3f6d2e8a9c01";
    let acks = ok(
        &broker,
        &[
            "send",
            "todo.create",
            "--data",
            r#"{"text":"milk"}"#,
            "--header",
            "traceparent=00-abc-01",
            "--header",
            "x-empty=",
            "--version",
            "2.3",
            "--key",
            "user-7",
            "--id",
            id,
        ],
    );
    assert_eq!(acks[0]["id"], id, "the id given is the id sent");
    let got = todo.json_line(T);
    assert_eq!(got["id"], id);
    assert_eq!(got["version"], "2.3");
    assert_eq!(got["key"], "user-7");
    assert_eq!(got["headers"]["traceparent"], "00-abc-01");
    assert_eq!(got["headers"]["x-empty"], "");
    assert_eq!(
        got["headers"]["content-type"], "application/json",
        "JSON still marked as such"
    );
    assert_eq!(got["payload"]["text"], "milk");

    // A content-type of one's own replaces the JSON one.
    ok(
        &broker,
        &[
            "publish",
            "todo.exported",
            "--data",
            "[1]",
            "--header",
            "content-type=text/csv",
        ],
    );
    let got = todo.json_line(T);
    assert_eq!(
        got["headers"],
        serde_json::json!({"content-type": "text/csv"})
    );
}

#[test]
fn a_second_send_with_the_same_id_is_dropped_as_a_duplicate() {
    let broker = Broker::start();
    let out = broker.run(&[
        "subscribe",
        "pay.capture",
        "--service",
        "pay",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = "0190f3c4-7d2a-7c1e-9b1a-3f6d2e8a9c02";
    for attempt in ["1", "2"] {
        let acks = ok(
            &broker,
            &["send", "pay.capture", "--id", id, "--data", attempt],
        );
        assert_eq!(acks[0]["id"], id, "attempt {attempt} acknowledged");
    }
    ok(&broker, &["send", "pay.capture", "--data", "after"]);
    let got = ok(
        &broker,
        &[
            "subscribe",
            "pay.capture",
            "--service",
            "pay",
            "--idle-timeout",
            "1s",
        ],
    );
    let payloads: Vec<String> = got.iter().map(|d| d["payload"].to_string()).collect();
    assert_eq!(
        payloads.len(),
        2,
        "the duplicate is not delivered: {payloads:?}"
    );
    assert!(
        payloads.contains(&"1".to_string()),
        "the first one is: {payloads:?}"
    );
    assert!(payloads.contains(&"\"after\"".to_string()), "{payloads:?}");

    // --id names one message.
    let out = broker.run(&["send", "pay.capture", "--id", id, "--count", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--id names one message"),
        "{}",
        stderr(&out)
    );
    let out = broker.run(&["send", "pay.capture", "--id", "not-a-uuid"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is not a UUID"), "{}", stderr(&out));
}

#[test]
fn ttl_expires_a_waiting_message_and_delay_defers_one() {
    let broker = Broker::start();
    // The subscription exists; no instance is connected while these wait.
    let out = broker.run(&[
        "subscribe",
        "job.>",
        "--service",
        "jobs",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = now_nanos();
    ok(&broker, &["send", "job.short", "--ttl", "100ms"]);
    ok(&broker, &["send", "job.long", "--ttl", "1h"]);
    // The short one's time passes while it waits for an instance.
    std::thread::sleep(Duration::from_millis(400));
    let got = ok(
        &broker,
        &[
            "subscribe",
            "job.>",
            "--service",
            "jobs",
            "--idle-timeout",
            "1s",
        ],
    );
    let names: Vec<&str> = got.iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["job.long"], "the expired one is dropped");
    let expires = got[0]["expires_at"].as_u64().expect("expires_at");
    let hour = 3_600_000_000_000;
    assert!(expires >= before + hour && expires <= now_nanos() + hour);

    let jobs = broker.spawn(&["subscribe", "job.>", "--service", "jobs"]);
    let sent = Instant::now();
    ok(&broker, &["publish", "job.later", "--delay", "700ms"]);
    let got = jobs.json_line(T);
    assert_eq!(got["name"], "job.later");
    assert!(
        sent.elapsed() >= Duration::from_millis(700),
        "delivered after {:?}, before its delay",
        sent.elapsed()
    );
    assert!(got["deliver_at"].as_u64().expect("deliver_at") >= before + 700_000_000);
}

#[test]
fn request_takes_the_same_envelope_flags_and_a_payload_file() {
    let broker = Broker::start();
    // Commands go to every receiving service: `audit` sees the command as
    // sent, `calc` answers it.
    let audit = receiver(&broker, "calc.add", "audit");
    let calc = broker.spawn(&[
        "reply",
        "calc.add",
        "--service",
        "calc",
        "--outcome",
        "calc.added",
        "--echo",
    ]);
    calc.wait_stderr("replying to calc.add", T);
    let dir = common::tempdir::Dir::new("payload");
    let file = dir.path().join("numbers.json");
    std::fs::write(&file, br#"{"a":1,"b":2}"#).expect("write payload file");
    let id = "0190f3c4-7d2a-7c1e-9b1a-3f6d2e8a9c03";
    let replies = ok(
        &broker,
        &[
            "request",
            "calc.add",
            "--data",
            &format!("@{}", file.display()),
            "--key",
            "acct-1",
            "--header",
            "x-trace=t1",
            "--version",
            "1.4",
            "--id",
            id,
            "--ttl",
            "1m",
            "--delay",
            "200ms",
            "--timeout",
            "5s",
        ],
    );
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["name"], "calc.added");
    assert_eq!(replies[0]["response_to"], id);
    assert_eq!(replies[0]["payload"], serde_json::json!({"a": 1, "b": 2}));
    let seen = audit.json_line(T);
    assert_eq!(seen["id"], id);
    assert_eq!(seen["key"], "acct-1");
    assert_eq!(seen["version"], "1.4");
    assert_eq!(seen["headers"]["x-trace"], "t1");
    assert!(seen["expires_at"].is_u64() && seen["deliver_at"].is_u64());

    // A transient command gets its reply too.
    let replies = ok(
        &broker,
        &[
            "request",
            "calc.add",
            "--transient",
            "--data",
            "7",
            "--timeout",
            "5s",
        ],
    );
    assert_eq!(replies[0]["payload"], 7);
    assert!(audit.json_line(T)["payload"] == 7);

    // All of stdin is one request's payload.
    let mut child = broker
        .cli(&["request", "calc.add", "--data", "-", "--timeout", "5s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn request");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"line one\nline two\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("request output");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["payload"], "line one\nline two\n");
}

#[test]
fn data_comes_from_files_as_they_are_and_from_stdin_a_line_a_message() {
    let broker = Broker::start();
    let logs = receiver(&broker, "log.>", "logs");
    let dir = common::tempdir::Dir::new("payload");
    let file = dir.path().join("note.txt");
    std::fs::write(&file, "not {seq} json\n").expect("write");
    ok(
        &broker,
        &[
            "publish",
            "log.file",
            "--data",
            &format!("@{}", file.display()),
            "--count",
            "2",
        ],
    );
    for _ in 0..2 {
        assert_eq!(
            logs.json_line(T)["payload"],
            "not {seq} json\n",
            "a file's bytes, unchanged"
        );
    }

    let mut child = broker
        .cli(&["publish", "log.line", "--data", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn publish");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"first\r\n{\"n\":2}\n\nlast")
        .expect("write stdin");
    let out = child.wait_with_output().expect("publish output");
    assert!(out.status.success(), "{}", stderr(&out));
    let seqs: Vec<u64> = json_lines(&out)
        .iter()
        .map(|a| a["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [0, 1, 2, 3], "one message per line");
    let payloads: Vec<serde_json::Value> = (0..4)
        .map(|_| logs.json_line(T)["payload"].clone())
        .collect();
    assert_eq!(
        payloads,
        [
            serde_json::json!("first"),
            serde_json::json!({"n": 2}),
            serde_json::Value::Null,
            serde_json::json!("last")
        ]
    );

    // Lines go out as they come: each is acknowledged before the next is written.
    let mut child = broker
        .cli(&["publish", "log.tail", "--data", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn publish");
    let mut stdin = child.stdin.take().expect("stdin");
    let acks = json_lines_of(child.stdout.take().expect("stdout"));
    for line in ["one", "two"] {
        writeln!(stdin, "{line}").expect("write a line");
        stdin.flush().expect("flush");
        let ack = acks
            .recv_timeout(T)
            .expect("acknowledged before stdin ends");
        assert!(ack["id"].is_string(), "{ack}");
        assert_eq!(logs.json_line(T)["payload"], line);
    }
    drop(stdin);
    assert!(child.wait().expect("wait publish").success());

    let out = broker.run(&["publish", "log.line", "--data", "-", "--count", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--data @/dev/stdin --count N"),
        "{}",
        stderr(&out)
    );
    let out = broker.run(&["publish", "log.line", "--data", "@/no/such/file"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read --data @/no/such/file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_reply_stream_ends_with_the_final_outcome() {
    let broker = Broker::start();
    let files = broker.spawn(&[
        "reply",
        "file.copy",
        "--service",
        "files",
        "--outcome",
        "file.copy.progress",
        "--final-outcome",
        "file.copy.done",
        "--stream",
        "3",
        "--data",
        r#"{"pct":50}"#,
    ]);
    files.wait_stderr("replying to file.copy", T);
    let replies = ok(&broker, &["request", "file.copy", "--timeout", "5s"]);
    let shape: Vec<(String, bool)> = replies
        .iter()
        .map(|r| {
            (
                r["name"].as_str().expect("name").to_string(),
                r["final"].as_bool().expect("final"),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("file.copy.progress".to_string(), false),
            ("file.copy.progress".to_string(), false),
            ("file.copy.done".to_string(), true)
        ]
    );
}

#[test]
fn completions_for_each_shell_name_the_subcommands() {
    let broker = Broker::start();
    for shell in ["bash", "zsh", "fish"] {
        let out = broker.run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).expect("utf-8");
        assert!(!script.trim().is_empty(), "{shell}: empty");
        for subcommand in ["publish", "subscribe", "dead-letters", "completions"] {
            assert!(
                script.contains(subcommand),
                "{shell} script lacks {subcommand}"
            );
        }
        if shell == "bash" {
            let dir = common::tempdir::Dir::new("completions");
            let path = dir.path().join("courier.bash");
            std::fs::write(&path, &script).expect("write script");
            let check = std::process::Command::new("bash")
                .arg("-n")
                .arg(&path)
                .output()
                .expect("run bash -n");
            assert!(check.status.success(), "bash -n: {}", stderr(&check));
        }
    }
    let out = broker.run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn subscribe_help_says_a_wildcard_receives_commands() {
    let broker = Broker::start();
    let out = broker.run(&["subscribe", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
    assert!(help.contains("A wildcard receives commands too"), "{help}");
    assert!(help.contains("non-intrusive tail"), "{help}");
}
