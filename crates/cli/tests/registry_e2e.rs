//! The service registry against real `courier` processes: instances
//! registered with the CLI, checked over HTTP, watched, killed with
//! `kill -9`, kept across a broker restart, and TTL heartbeats.

mod common;

use std::time::{Duration, Instant};

use common::{http_get, wait_for, Broker};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

fn port_of(http: &str) -> String {
    http.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

fn registry_cli(broker: &Broker, args: &[&str]) -> std::process::Output {
    let http = port_of(broker.http.as_deref().expect("an HTTP port"));
    broker
        .cli(args)
        .env("COURIER_HTTP", http)
        .output()
        .expect("run courier")
}

fn healthy_ids(broker: &Broker, name: &str) -> Vec<String> {
    let http = broker.http.as_deref().expect("an HTTP port");
    let (status, body) = http_get(http, &format!("/v1/services/{name}"), None);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    answer["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn a_checked_instance_appears_when_healthy_leaves_when_killed_and_survives_a_restart() {
    let registry = Broker::start();
    // The "todo" instance is itself a courier process: its /healthz is
    // what the check asks.
    let todo = Broker::start();
    let todo_http = port_of(todo.http.as_deref().expect("an HTTP port"));
    let http = port_of(registry.http.as_deref().expect("an HTTP port"));

    let mut watch = registry
        .cli(&["watch", "todo", "--http", &http])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn courier watch");
    let watched = common_lines(&mut watch);

    let out = registry_cli(
        &registry,
        &[
            "register",
            "todo",
            "--address",
            &todo_http,
            "--check",
            &format!("http://{todo_http}/healthz"),
            "--interval",
            "300ms",
            "--meta",
            "version=1",
        ],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("todo-"), "prints the instance id: {id:?}");

    wait_for("the instance passes its check", T, || {
        healthy_ids(&registry, "todo").contains(&id).then_some(())
    });
    let out = registry_cli(&registry, &["services", "todo", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["instances"][0]["meta"]["version"], "1");
    assert_eq!(listed["instances"][0]["health"], "passing");

    // kill -9: two failed checks 300 ms apart and it is gone.
    drop(todo);
    let killed = Instant::now();
    wait_for("the killed instance leaves the lookup", T, || {
        healthy_ids(&registry, "todo").is_empty().then_some(())
    });
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "gone after {took:?}, within a few check intervals"
    );
    let out = registry_cli(&registry, &["services", "todo", "--all", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["instances"][0]["health"], "critical", "{listed}");

    // The watch saw: nothing healthy, then the instance, then nothing, in
    // that order.
    let first = watched.recv_timeout(T).expect("first watch line");
    let counts: Vec<usize> = std::iter::once(first)
        .chain(std::iter::from_fn(|| {
            watched.recv_timeout(Duration::from_secs(5)).ok()
        }))
        .take(3)
        .map(|v| v["instances"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(counts, vec![0, 1, 0], "the watch's lines in order");
    let _ = watch.kill();
    let _ = watch.wait();

    // Registered instances are in the broker's log.
    let registry = registry.crash_and_restart();
    let out = registry_cli(&registry, &["services", "todo", "--all", "--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["instances"][0]["id"], id.as_str(), "{listed}");
}

#[test]
fn ttl_heartbeats_deregistration_and_clear_errors() {
    let registry = Broker::start();
    let out = registry_cli(
        &registry,
        &[
            "register",
            "db",
            "--address",
            "127.0.0.1:5432",
            "--check",
            "ttl:1s",
            "--flap-threshold",
            "1",
            "--id",
            "db-1",
        ],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "db-1");
    assert_eq!(healthy_ids(&registry, "db"), vec!["db-1".to_string()]);
    wait_for("the TTL lapses without heartbeats", T, || {
        healthy_ids(&registry, "db").is_empty().then_some(())
    });
    let out = registry_cli(&registry, &["heartbeat", "db", "db-1"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(healthy_ids(&registry, "db"), vec!["db-1".to_string()]);

    let out = registry_cli(&registry, &["heartbeat", "db", "db-9"]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("--all"),
        "{}",
        common::stderr(&out)
    );
    let out = registry_cli(
        &registry,
        &[
            "register",
            "db",
            "--address",
            "localhost",
            "--check",
            "ttl:1s",
        ],
    );
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("HOST:PORT"),
        "{}",
        common::stderr(&out)
    );

    let out = registry_cli(&registry, &["deregister", "db", "db-1"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let out = registry_cli(&registry, &["services", "db", "--all", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["instances"], serde_json::json!([]));
}

#[test]
fn bus_instances_register_themselves_and_leave_with_their_connection() {
    let registry = Broker::start();
    let mut sub = registry.spawn(&["subscribe", "todo.*", "--service", "todo"]);
    wait_for("the connected instance is registered", T, || {
        (healthy_ids(&registry, "todo").len() == 1).then_some(())
    });
    sub.kill9();
    wait_for("the closed connection's instance leaves", T, || {
        healthy_ids(&registry, "todo").is_empty().then_some(())
    });
}

/// The todo example's binaries, built into the same target dir.
fn todo_bin(name: &str) -> std::path::PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "courier-example-todo",
            "--bin",
            name,
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build of {name} failed");
    std::path::Path::new(common::courier_bin()).with_file_name(name)
}

fn instance_addresses(broker: &Broker, name: &str) -> Vec<String> {
    let http = broker.http.as_deref().expect("an HTTP port");
    let (status, body) = http_get(http, &format!("/v1/services/{name}"), None);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    let mut addresses: Vec<String> = answer["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["address"].as_str().expect("address").to_string())
        .collect();
    addresses.sort();
    addresses
}

#[test]
fn bus_instances_advertise_where_they_serve() {
    let registry = Broker::start();
    // todo-web advertises the address it listens on by itself ...
    let mut web = KilledOnDrop(
        std::process::Command::new(todo_bin("todo-web"))
            .env("COURIER_URL", &registry.addr)
            .env("TODO_WEB_LISTEN", "127.0.0.1:0")
            .env_remove("COURIER_ADVERTISE")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start todo-web"),
    );
    let listening = {
        use std::io::BufRead;
        let stdout = web.0.stdout.take().expect("stdout");
        let line = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("listening on"))
            .expect("todo-web prints where it listens");
        line.rsplit("http://")
            .next()
            .expect("an address")
            .to_string()
    };
    wait_for("todo-web's address is in the registry", T, || {
        (instance_addresses(&registry, "web") == vec![listening.clone()]).then_some(())
    });
    // ... and any SDK service advertises COURIER_ADVERTISE.
    let mut todo = KilledOnDrop(
        std::process::Command::new(todo_bin("todo-service"))
            .env("COURIER_URL", &registry.addr)
            .env("COURIER_ADVERTISE", "127.0.0.1:4001")
            // Its database in the test's temporary directory, not the
            // source tree.
            .env(
                "TODO_DATABASE",
                registry.data_dir.path().join("todo.sqlite"),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start todo-service"),
    );
    wait_for(
        "todo-service's advertised address is in the registry",
        T,
        || {
            (instance_addresses(&registry, "todo") == vec!["127.0.0.1:4001".to_string()])
                .then_some(())
        },
    );
    todo.kill9();
    wait_for("the killed instance leaves with its connection", T, || {
        instance_addresses(&registry, "todo")
            .is_empty()
            .then_some(())
    });
}

/// A child process killed (SIGKILL) when dropped, also when a test fails.
struct KilledOnDrop(std::process::Child);

impl KilledOnDrop {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The JSON lines a child prints, as they come.
fn common_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<Value> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn under_a_manifest_a_service_token_reads_the_registry_and_only_an_admin_changes_it() {
    let dir = common::tempdir::Dir::new("registry-manifest");
    let manifest = common::manifest_with_admin(
        &dir,
        "todo",
        "receives = [\"todo.create\"]",
        "crr_todo_secret",
        "crr_admin_secret",
    );
    let registry = Broker::start_with(&["--manifest", &manifest]);
    let http = registry.http.clone().expect("an HTTP port");
    let as_cli = |token: Option<&str>, args: &[&str]| {
        let mut cmd = registry.cli(args);
        cmd.env("COURIER_HTTP", port_of(&http));
        match token {
            Some(token) => cmd.env("COURIER_TOKEN", token),
            None => cmd.env_remove("COURIER_TOKEN"),
        };
        cmd.output().expect("run courier")
    };

    // Changes: an admin's token only.
    let db = [
        "register",
        "db",
        "--address",
        "127.0.0.1:5432",
        "--id",
        "db-1",
    ];
    let out = as_cli(Some("crr_todo_secret"), &db);
    assert!(!out.status.success(), "a service's token registered");
    assert!(
        common::stderr(&out).contains("[admin] token"),
        "{}",
        common::stderr(&out)
    );
    let out = as_cli(Some("crr_admin_secret"), &db);
    assert!(out.status.success(), "{}", common::stderr(&out));

    // Lookups: a service's token lists ...
    let out = as_cli(Some("crr_todo_secret"), &["services", "--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let listing: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listing["services"][0]["name"], "db", "{listing}");
    let out = as_cli(Some("crr_todo_secret"), &["services", "db", "--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["instances"][0]["id"], "db-1", "{listed}");

    // ... and long-polls: held until the registry changes.
    let index = listed["index"].as_u64().expect("an index");
    let poll = {
        let http = http.clone();
        std::thread::spawn(move || {
            http_get(
                &http,
                &format!("/v1/services/db?index={index}&wait=20s"),
                Some("crr_todo_secret"),
            )
        })
    };
    let out = as_cli(
        Some("crr_admin_secret"),
        &[
            "register",
            "db",
            "--address",
            "127.0.0.1:5433",
            "--id",
            "db-2",
        ],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let (status, body) = poll.join().expect("the long-poll");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert!(answer["index"].as_u64() > Some(index), "{answer}");
    assert_eq!(answer["instances"].as_array().map(Vec::len), Some(2));

    // A token the manifest does not list, or none: 401, for the lookups
    // and for `courier watch` alike.
    for path in ["/v1/registry", "/v1/services/db", "/v1/services/db?index=0"] {
        for token in [None, Some("crr_nobody")] {
            let (status, body) = http_get(&http, path, token);
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
            assert!(body.contains("Authorization: Bearer") || body.contains("no entry"));
        }
        let (status, body) = http_get(&http, path, Some("crr_admin_secret"));
        assert_eq!(status, 200, "{path} with the admin's token: {body}");
    }
    let out = as_cli(Some("crr_nobody"), &["watch", "db"]);
    assert!(!out.status.success(), "a watch with an unknown token ran");
    assert!(
        common::stderr(&out).contains("401"),
        "{}",
        common::stderr(&out)
    );
    // The rest of the port stays the admin's.
    let (status, body) = http_get(&http, "/metrics", Some("crr_todo_secret"));
    assert_eq!(status, 403, "{body}");
}
