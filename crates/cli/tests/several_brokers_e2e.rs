//! Client commands given several brokers (`--url a,b`, `COURIER_URL`),
//! against real `courier serve` processes: a dead address is passed
//! over, a subscriber whose broker is killed goes on at the other one,
//! and when none answers the error names each.
//!
//! The brokers are independent single nodes: what is tested is the
//! client's failover, not state they would share as a cluster.

mod common;

use std::time::Duration;

use common::{stderr, Broker};

const T: Duration = Duration::from_secs(10);

#[test]
fn a_dead_address_first_is_passed_over_for_the_live_one() {
    let live = Broker::start();
    let dead = format!("127.0.0.1:{}", common::free_port());
    let both = format!("{dead},{}", live.addr);
    // Through COURIER_URL: the broker answers (it refuses, nobody
    // receives the command), so it was reached.
    let out = live
        .cli(&["send", "todo.create", "--data", "{}"])
        .env("COURIER_URL", &both)
        .output()
        .expect("run courier");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no service receives todo.create"),
        "{}",
        stderr(&out)
    );
    // Through --url, with spaces around the comma.
    let out = live.run(&[
        "subscribe",
        "todo.create",
        "--service",
        "todo",
        "--idle-timeout",
        "100ms",
        "--url",
        &format!("{dead} , {}", live.addr),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = live.run(&["send", "todo.create", "--data", "{}", "--url", &both]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn when_no_broker_answers_the_error_names_each_address() {
    let first = format!("127.0.0.1:{}", common::free_port());
    let second = format!("127.0.0.1:{}", common::free_port());
    let out = std::process::Command::new(common::courier_bin())
        .args(["send", "x", "--url", &format!("{first},{second}")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "unreachable");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach a broker at {first} (")),
        "{err}"
    );
    assert!(err.contains(&format!(", {second} (")), "{err}");
    assert!(err.contains("is 'courier serve' running?"), "{err}");

    let out = std::process::Command::new(common::courier_bin())
        .args(["send", "x", "--url", &format!("{first},,{second}")])
        .output()
        .expect("run");
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("empty entry") && err.contains("127.0.0.1:7701,127.0.0.1:7702"),
        "{err}"
    );
}

#[test]
fn a_subscriber_whose_broker_is_killed_goes_on_receiving_from_the_other() {
    let mut first = Broker::start();
    let second = Broker::start();
    let both = format!("{},{}", first.addr, second.addr);
    // The second broker keeps what is sent for `todo` while the
    // subscriber is still connected to the first.
    let out = second.run(&[
        "subscribe",
        "todo.create",
        "--service",
        "todo",
        "--idle-timeout",
        "100ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let subscriber = first.spawn(&[
        "subscribe",
        "todo.create",
        "--service",
        "todo",
        "--url",
        &both,
    ]);
    first.wait_consumers("todo", 1, None);
    let out = first.run(&["send", "todo.create", "--data", r#"{"at":"first"}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(subscriber.json_line(T)["payload"]["at"], "first");

    // kill -9: no goodbye on the connection.
    let _ = first.child.kill();
    let _ = first.child.wait();
    subscriber.wait_stderr(
        &format!("courier: connection to {} lost; reconnecting…", first.addr),
        T,
    );
    subscriber.wait_stderr(
        &format!("courier: connection to {} restored", second.addr),
        T,
    );
    let out = second.run(&["send", "todo.create", "--data", r#"{"at":"second"}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    let delivered = subscriber.json_line(T);
    assert_eq!(delivered["payload"]["at"], "second");
    assert_eq!(delivered["name"], "todo.create");
}
