//! The `courier` CLI against a real broker process, as users run it —
//! or, with `COURIER_E2E_BACKEND=cluster`, against two nodes on a
//! three-server NATS cluster (`cluster_common::bus`).

mod cluster_common;
mod common;

use std::time::Duration;

use cluster_common::bus::Bus;
use common::{json_lines, stderr};

const T: Duration = Duration::from_secs(10);

#[test]
fn serve_prints_its_address_and_send_without_receiver_is_refused() {
    let broker = Bus::start_blocking();
    let out = broker.run(&["send", "todo.create", "--data", "{}"]);
    assert_eq!(out.status.code(), Some(4), "refusal exit code");
    let err = stderr(&out);
    assert!(err.contains("no service receives todo.create"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");
}

#[test]
fn unreachable_broker_names_the_fix() {
    let port = common::free_port();
    let out = std::process::Command::new(common::courier_bin())
        .args(["send", "x", "--url", &format!("127.0.0.1:{port}")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach broker at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("is 'courier serve' running?"), "{err}");
}

#[test]
fn request_gets_a_stream_of_replies_ending_with_the_final_one() {
    let broker = Bus::start_blocking();
    let responder = broker.spawn(&[
        "reply",
        "file.copy",
        "--service",
        "files",
        "--outcome",
        "file.copy.progress",
        "--echo",
        "--stream",
        "3",
    ]);
    responder.wait_stderr("replying to file.copy", T);
    let out = broker.run(&[
        "request",
        "file.copy",
        "--data",
        r#"{"from":"a.csv"}"#,
        "--service",
        "web",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let replies = json_lines(&out);
    assert_eq!(replies.len(), 3);
    let finals: Vec<bool> = replies
        .iter()
        .map(|r| r["final"].as_bool().expect("final flag"))
        .collect();
    assert_eq!(finals, vec![false, false, true]);
    for r in &replies {
        assert_eq!(r["name"], "file.copy.progress");
        assert_eq!(r["sender"], "files", "sender is set by the broker");
        assert_eq!(
            r["payload"]["from"], "a.csv",
            "echoed payload decoded as JSON"
        );
        for field in [
            "version",
            "id",
            "timestamp",
            "activity_id",
            "response_to",
            "key",
            "headers",
        ] {
            assert!(r.get(field).is_some(), "field {field} in {r}");
        }
        assert!(r["timestamp"].as_u64().expect("timestamp") > 1_600_000_000_000_000_000);
        assert_eq!(r["response_to"], replies[0]["response_to"]);
        assert_eq!(
            r["activity_id"], replies[0]["activity_id"],
            "the activity carries into replies"
        );
    }
}

#[test]
fn request_times_out_with_its_own_exit_code() {
    let broker = Bus::start_blocking();
    // A service that receives the command but never replies.
    let silent = broker.spawn(&["subscribe", "todo.create", "--service", "todo"]);
    broker.wait_consumers("todo", 1);
    let started = std::time::Instant::now();
    let out = broker.run(&["request", "todo.create", "--timeout", "500ms"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("no reply within"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    let delivered = silent.json_line(T);
    assert_eq!(delivered["name"], "todo.create");
    assert_eq!(delivered["attempt"], 1);
}

#[test]
fn events_fan_out_to_services_and_wildcards_match_segments() {
    let broker = Bus::start_blocking();
    // Create the subscriptions; they stay after the subscriber exits.
    for (pattern, service) in [("todo.*", "audit"), ("todo.>", "mail")] {
        let out = broker.run(&[
            "subscribe",
            pattern,
            "--service",
            service,
            "--idle-timeout",
            "100ms",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = broker.run(&[
        "publish",
        "todo.created",
        "--data",
        r#"{"n":{seq}}"#,
        "--count",
        "3",
        "--key",
        "k",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let acks = json_lines(&out);
    assert_eq!(
        acks.iter()
            .map(|a| a["seq"].as_u64().expect("seq"))
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(acks
        .iter()
        .all(|a| a["id"].as_str().is_some_and(|id| id.len() == 36)));
    let out = broker.run(&["publish", "todo.item.done", "--data", "plain text"]);
    assert!(out.status.success());

    let audit = json_lines(&broker.run(&[
        "subscribe",
        "todo.*",
        "--service",
        "audit",
        "--idle-timeout",
        "500ms",
    ]));
    let mail = json_lines(&broker.run(&[
        "subscribe",
        "todo.>",
        "--service",
        "mail",
        "--idle-timeout",
        "500ms",
    ]));
    assert_eq!(
        audit
            .iter()
            .map(|m| m["payload"]["n"].as_u64().expect("n"))
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(mail.len(), 4, "todo.> also matches todo.item.done");
    assert!(
        mail.iter()
            .any(|m| m["payload"] == "plain text" && m["key"].is_null()),
        "{mail:?}"
    );
    assert_eq!(audit[0]["key"], "k");
    assert_eq!(audit[0]["sender"], "cli");
    assert_eq!(audit[0]["attempt"], 1);

    // Unsubscribed, a service no longer gets anything.
    assert!(broker
        .run(&["unsubscribe", "todo.*", "--service", "audit"])
        .status
        .success());
    broker.run(&["publish", "todo.created"]);
    let after = json_lines(&broker.run(&[
        "subscribe",
        "todo.*",
        "--service",
        "audit",
        "--idle-timeout",
        "300ms",
    ]));
    assert!(after.is_empty(), "{after:?}");
}

#[test]
fn commands_wait_for_a_service_with_no_instance_and_compete_when_many() {
    let broker = Bus::start_blocking();
    assert!(broker
        .run(&[
            "subscribe",
            "job.run",
            "--service",
            "worker",
            "--idle-timeout",
            "100ms"
        ])
        .status
        .success());
    let out = broker.run(&[
        "send",
        "job.run",
        "--data",
        r#"{"job":{seq}}"#,
        "--count",
        "20",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = broker.spawn(&[
        "subscribe",
        "job.run",
        "--service",
        "worker",
        "--idle-timeout",
        "1s",
    ]);
    let b = broker.spawn(&[
        "subscribe",
        "job.run",
        "--service",
        "worker",
        "--idle-timeout",
        "1s",
    ]);
    let mut jobs = Vec::new();
    for p in [&a, &b] {
        while let Ok(line) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.json_line(Duration::from_secs(3))
        })) {
            jobs.push(line["payload"]["job"].as_u64().expect("job"));
        }
    }
    jobs.sort_unstable();
    assert_eq!(
        jobs,
        (0..20).collect::<Vec<_>>(),
        "each command delivered to exactly one instance"
    );
}

#[test]
fn receiver_killed_mid_handling_its_command_goes_to_another_instance() {
    let broker = Bus::start_blocking();
    let mut slow = broker.spawn(&[
        "reply",
        "report.build",
        "--service",
        "reports",
        "--outcome",
        "report.built",
        "--data",
        r#"{"by":"slow"}"#,
        "--delay",
        "60s",
    ]);
    slow.wait_stderr("replying to", T);
    let mut requester = broker.spawn(&[
        "request",
        "report.build",
        "--service",
        "web",
        "--timeout",
        "30s",
    ]);
    slow.wait_stderr("received report.build", T);
    slow.kill9();
    let fast = broker.spawn(&[
        "reply",
        "report.build",
        "--service",
        "reports",
        "--outcome",
        "report.built",
        "--data",
        r#"{"by":"fast"}"#,
    ]);
    fast.wait_stderr("replying to", T);
    let reply = requester.json_line(T);
    assert_eq!(reply["payload"]["by"], "fast");
    assert_eq!(reply["final"], true);
    assert_eq!(requester.wait_exit(T), Some(0));
}

#[test]
fn transient_publish_reaches_only_connected_instances() {
    let broker = Bus::start_blocking();
    assert!(broker
        .run(&[
            "subscribe",
            "tick",
            "--service",
            "clock",
            "--idle-timeout",
            "100ms"
        ])
        .status
        .success());
    assert!(broker
        .run(&["publish", "tick", "--transient", "--data", "lost"])
        .status
        .success());
    let listener = broker.spawn(&["subscribe", "tick", "--service", "clock"]);
    assert!(
        listener.no_line(Duration::from_millis(500)),
        "nothing waited for a transient message"
    );
    broker.wait_consumers("clock", 1);
    assert!(broker
        .run(&["publish", "tick", "--transient", "--data", "seen"])
        .status
        .success());
    assert_eq!(listener.json_line(T)["payload"], "seen");
}
