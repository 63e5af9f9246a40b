//! Client commands while the broker is away: what they say, how long they
//! wait, and that nothing acknowledged is lost.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{json_lines, stderr, Broker};

const T: Duration = Duration::from_secs(20);

/// A client whose stdout the test reads at its own pace: while the test
/// does not read, the pipe fills and the command waits in its next write,
/// which holds a `--count` publish partway through.
struct Paced {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line so far.
    said: Vec<String>,
}

impl Paced {
    fn start(broker: &Broker, args: &[&str]) -> Paced {
        let mut child = broker
            .cli(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn courier");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Paced {
            child,
            stdout,
            stderr: rx,
            said: Vec::new(),
        }
    }

    /// The `seq` of the next acknowledgement line.
    fn next_seq(&mut self) -> Option<u64> {
        let line = self.stdout.next()?.expect("read stdout");
        let ack: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        Some(ack["seq"].as_u64().expect("seq"))
    }

    /// Waits for a stderr line equal to `expected`.
    fn wait_said(&mut self, expected: &str) {
        let deadline = std::time::Instant::now() + T;
        while !self.said.iter().any(|l| l == expected) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.said.push(line),
                Err(_) => panic!("no stderr line {expected:?} in {T:?}; got {:?}", self.said),
            }
        }
    }

    /// Reads the rest of stdout on a thread, so the command can go on.
    fn drain_stdout(self) -> (Child, mpsc::Receiver<String>, Vec<String>, Draining) {
        let mut stdout = self.stdout;
        let seqs = std::thread::spawn(move || {
            let mut seqs = Vec::new();
            for line in stdout.by_ref() {
                let line = line.expect("read stdout");
                let ack: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
                seqs.push(ack["seq"].as_u64().expect("seq"));
            }
            seqs
        });
        (self.child, self.stderr, self.said, Draining(seqs))
    }
}

struct Draining(std::thread::JoinHandle<Vec<u64>>);

/// Exit code within `T`, then every stderr line.
fn finish(
    mut child: Child,
    errors: mpsc::Receiver<String>,
    mut said: Vec<String>,
) -> (Option<i32>, Vec<String>) {
    let deadline = std::time::Instant::now() + T;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command did not exit within {T:?}; it said {said:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    said.extend(errors.iter());
    (code, said)
}

#[test]
fn publish_rides_out_a_broker_crash_says_so_and_loses_nothing() {
    const N: u64 = 10_000;
    let broker = Broker::start();
    let addr = broker.addr.clone();
    let out = broker.run(&[
        "subscribe",
        "tick",
        "--service",
        "audit",
        "--idle-timeout",
        "100ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut publisher = Paced::start(
        &broker,
        &[
            "publish",
            "tick",
            "--data",
            "{seq}",
            "--count",
            &N.to_string(),
        ],
    );
    let mut seqs: Vec<u64> = (0..100)
        .map(|_| publisher.next_seq().expect("an acknowledgement"))
        .collect();

    // Halfway: the publisher waits on its full stdout pipe.
    let data_dir = broker.kill9();
    let lost = format!("courier: connection to {addr} lost; reconnecting…");
    publisher.wait_said(&lost);
    // It goes on sending into the outage.
    let (child, errors, said, draining) = publisher.drain_stdout();
    let broker = Broker::start_on(&addr, data_dir);
    let (code, said) = finish(child, errors, said);
    seqs.extend(draining.0.join().expect("stdout reader"));
    assert_eq!(code, Some(0), "{said:?}");
    let restored = format!("courier: connection to {addr} restored");
    assert_eq!(
        said.iter().filter(|l| **l == lost).count(),
        1,
        "lost said once: {said:?}"
    );
    assert_eq!(
        said.iter().filter(|l| **l == restored).count(),
        1,
        "restored said once: {said:?}"
    );
    assert_eq!(said.len(), 2, "nothing else on stderr: {said:?}");
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..N).collect::<Vec<_>>(),
        "every message acknowledged once"
    );

    // What was acknowledged is there for the subscriber, all of it.
    let out = broker.run(&[
        "subscribe",
        "tick",
        "--service",
        "audit",
        "--idle-timeout",
        "2s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got: BTreeSet<u64> = json_lines(&out)
        .iter()
        .map(|d| d["payload"].as_u64().expect("numeric payload"))
        .collect();
    assert_eq!(got.len() as u64, N, "every acknowledged event delivered");
    assert_eq!(got.last(), Some(&(N - 1)));
}

#[test]
fn publish_with_a_timeout_gives_up_while_the_broker_is_down_and_says_how_far_it_got() {
    const N: u64 = 5_000;
    let broker = Broker::start();
    let addr = broker.addr.clone();
    let mut publisher = Paced::start(
        &broker,
        &[
            "publish",
            "tick",
            "--count",
            &N.to_string(),
            "--timeout",
            "6s",
        ],
    );
    let mut seqs: Vec<u64> = (0..100)
        .map(|_| publisher.next_seq().expect("an acknowledgement"))
        .collect();
    let _data_dir = broker.kill9();
    publisher.wait_said(&format!(
        "courier: connection to {addr} lost; reconnecting…"
    ));
    let (child, errors, said, draining) = publisher.drain_stdout();
    let (code, said) = finish(child, errors, said);
    seqs.extend(draining.0.join().expect("stdout reader"));
    assert_eq!(code, Some(3), "unreachable at the timeout: {said:?}");
    let expected = format!(
        "courier: the broker at {addr} is unreachable; gave up after 6s (--timeout); {} of {N} acknowledged",
        seqs.len()
    );
    assert!(said.contains(&expected), "{expected:?} in {said:?}");
    assert!(seqs.len() < N as usize);
}

#[test]
fn request_waiting_for_a_reply_when_the_broker_goes_is_unreachable_not_slow() {
    let broker = Broker::start();
    // The subscription exists before the request; the spawned one receives.
    let out = broker.run(&[
        "subscribe",
        "calc.add",
        "--service",
        "calc",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let silent = broker.spawn(&["subscribe", "calc.add", "--service", "calc"]);
    let requester = broker.spawn(&["request", "calc.add", "--timeout", "2s"]);
    // The command reached its receiver; now the broker goes.
    assert_eq!(silent.json_line(T)["name"], "calc.add");
    let _data_dir = broker.kill9();
    let mut requester = requester;
    requester.wait_stderr("lost; reconnecting…", T);
    requester.wait_stderr(
        "is unreachable; no answer within 2s; 0 replies received, none final",
        T,
    );
    assert_eq!(requester.wait_exit(T), Some(3));
}

#[test]
fn subscribe_with_a_timeout_says_how_many_it_received() {
    let broker = Broker::start();
    let out = broker.run(&[
        "subscribe",
        "todo.*",
        "--service",
        "audit",
        "--idle-timeout",
        "100ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = broker.run(&["publish", "todo.created", "--data", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = broker.run(&[
        "subscribe",
        "todo.*",
        "--service",
        "audit",
        "--count",
        "2",
        "--timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(json_lines(&out).len(), 1);
    assert!(
        stderr(&out).contains("gave up after 1s (--timeout); 1 of 2 deliveries received"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn timeouts_too_long_to_represent_are_refused_and_long_ones_work() {
    let broker = Broker::start();
    let out = broker.run(&["publish", "x", "--timeout", "99999999999999999999999s"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is too long a duration"),
        "{}",
        stderr(&out)
    );
    let out = broker.run(&["subscribe", "x", "--service", "s", "--idle-timeout", "50ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Centuries: no deadline in practice, and no panic.
    for args in [
        &["publish", "x", "--timeout", "10000000000d"][..],
        &["send", "x", "--timeout", "10000000000d"][..],
        &[
            "send",
            "x",
            "--ttl",
            "500000000000y",
            "--delay",
            "500000000000y",
        ][..],
        &[
            "subscribe",
            "x",
            "--idle-timeout",
            "200ms",
            "--timeout",
            "500000000000y",
        ][..],
    ] {
        let out = broker.run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}
