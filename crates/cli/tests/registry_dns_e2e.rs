//! The registry's DNS (`courier serve --dns`) asked with `dig`, as users
//! do: the todo example's instances by SRV and A, over UDP and TCP, an
//! instance killed with `kill -9` gone within its check interval, and
//! NXDOMAIN for a name no service has.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, wait_for, Broker};

const T: Duration = Duration::from_secs(20);

/// `dig` must be there: a DNS test that skips would pass without asking.
fn dig_installed() {
    let found = Command::new("dig")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "dig is missing: run scripts/test.sh (it installs Debian's dnsutils), or apt-get install dnsutils"
    );
}

/// `dig @127.0.0.1 -p PORT NAME TYPE` with `flags`; its whole output.
fn dig(port: u16, name: &str, record_type: &str, flags: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string()])
        .args(["+time=2", "+tries=1"])
        .args(flags)
        .args([name, record_type])
        .output()
        .expect("run dig");
    assert!(
        out.status.success(),
        "dig {name} {record_type} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `+short` SRV answer as sorted `(port, target)` pairs.
fn srv(port: u16, name: &str, flags: &[&str]) -> Vec<(u16, String)> {
    let mut all = vec!["+short"];
    all.extend_from_slice(flags);
    let mut records: Vec<(u16, String)> = dig(port, name, "SRV", &all)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_priority, _weight, port, target] => {
                    Some((port.parse().ok()?, target.to_string()))
                }
                _ => None,
            }
        })
        .collect();
    records.sort();
    records
}

/// The todo example's binaries, built into the same target dir.
fn todo_bin(name: &str) -> PathBuf {
    let status = Command::new(env!("CARGO"))
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
    Path::new(common::courier_bin()).with_file_name(name)
}

/// A child process killed (SIGKILL) when dropped, also when a test fails.
struct KilledOnDrop(Child);

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

fn todo_instance(bin: &Path, broker: &Broker, advertise: &str) -> KilledOnDrop {
    KilledOnDrop(
        Command::new(bin)
            .env("COURIER_URL", &broker.addr)
            .env("COURIER_ADVERTISE", advertise)
            // Its own database, in the test's temporary directory.
            .env(
                "TODO_DATABASE",
                broker
                    .data_dir
                    .path()
                    .join(format!("todo-{}.sqlite", advertise.replace(':', "-"))),
            )
            .env("COURIER_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start todo-service"),
    )
}

#[test]
fn dig_finds_the_running_todo_instances_and_loses_a_killed_one() {
    dig_installed();
    let dns = free_port();
    let broker = Broker::start_with(&["--dns", &format!("127.0.0.1:{dns}")]);
    let bin = todo_bin("todo-service");
    let (first, second) = (free_port(), free_port());
    let mut todo_a = todo_instance(&bin, &broker, &format!("127.0.0.1:{first}"));
    let _todo_b = todo_instance(&bin, &broker, &format!("127.0.0.1:{second}"));

    let target = "7f000001.addr.courier.".to_string();
    let both = {
        let mut both = vec![(first, target.clone()), (second, target.clone())];
        both.sort();
        both
    };
    wait_for("dig lists both todo instances", T, || {
        (srv(dns, "todo.service.courier", &[]) == both).then_some(())
    });
    assert_eq!(
        srv(dns, "todo.service.courier", &["+tcp"]),
        both,
        "over TCP"
    );
    let full = dig(dns, "todo.service.courier", "SRV", &[]);
    assert!(full.contains("status: NOERROR"), "{full}");
    assert!(
        full.contains("7f000001.addr.courier.\t0\tIN\tA\t127.0.0.1"),
        "the targets' addresses come along: {full}"
    );
    let a = dig(dns, "todo.service.courier", "A", &["+short"]);
    assert_eq!(a.trim(), "127.0.0.1", "one A record per address");
    let target_a = dig(dns, &target, "A", &["+short"]);
    assert_eq!(target_a.trim(), "127.0.0.1", "the SRV target resolves");

    // kill -9: the connection closes with the process, and so the
    // instance leaves at once — well within a check interval (5 s).
    todo_a.kill9();
    let killed = Instant::now();
    wait_for("the killed instance leaves the SRV answer", T, || {
        (srv(dns, "todo.service.courier", &[]) == vec![(second, target.clone())]).then_some(())
    });
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "gone after {took:?}");

    let unknown = dig(dns, "nothing-here.service.courier", "SRV", &[]);
    assert!(unknown.contains("status: NXDOMAIN"), "{unknown}");
    let other_type = dig(dns, "todo.service.courier", "MX", &[]);
    assert!(
        other_type.contains("status: NOERROR") && other_type.contains("ANSWER: 0"),
        "{other_type}"
    );
}

#[test]
fn a_checked_instance_killed_with_kill_9_leaves_dns_within_its_check_interval() {
    dig_installed();
    let dns = free_port();
    let broker = Broker::start_with(&["--dns", &format!("127.0.0.1:{dns}")]);
    // todo-web advertises the address it listens on by itself.
    let mut web = KilledOnDrop(
        Command::new(todo_bin("todo-web"))
            .env("COURIER_URL", &broker.addr)
            .env("TODO_WEB_LISTEN", "127.0.0.1:0")
            .env_remove("COURIER_ADVERTISE")
            .env("COURIER_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start todo-web"),
    );
    let web_port: u16 = {
        use std::io::BufRead;
        let stdout = web.0.stdout.take().expect("stdout");
        let line = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("listening on"))
            .expect("todo-web prints where it listens");
        line.rsplit(':')
            .next()
            .expect("a port")
            .parse()
            .expect("a port")
    };
    wait_for("dig finds todo-web at the port it listens on", T, || {
        (srv(dns, "web.service.courier", &[])
            == vec![(web_port, "7f000001.addr.courier.".to_string())])
        .then_some(())
    });

    // An instance off the bus, registered with a TCP check every second:
    // another courier broker stands in for a database.
    let db = Broker::start();
    let db_port: u16 = db
        .addr
        .rsplit(':')
        .next()
        .expect("port")
        .parse()
        .expect("port");
    let http = broker
        .http
        .as_deref()
        .expect("an HTTP port")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let interval = Duration::from_secs(1);
    let out = broker
        .cli(&[
            "register",
            "db",
            "--address",
            &db.addr,
            "--check",
            &format!("tcp://{}", db.addr),
            "--interval",
            "1s",
            "--flap-threshold",
            "1",
        ])
        .env("COURIER_HTTP", &http)
        .output()
        .expect("run courier register");
    assert!(out.status.success(), "{}", common::stderr(&out));
    wait_for("the checked instance passes and is in DNS", T, || {
        (srv(dns, "db.service.courier", &[])
            == vec![(db_port, "7f000001.addr.courier.".to_string())])
        .then_some(())
    });
    drop(db); // kill -9
    let killed = Instant::now();
    wait_for("the killed instance leaves DNS", T, || {
        srv(dns, "db.service.courier", &[]).is_empty().then_some(())
    });
    let took = killed.elapsed();
    // One interval until the check that fails, plus scheduling slack.
    assert!(
        took < interval + Duration::from_millis(700),
        "gone after {took:?}, within its check interval of {interval:?}"
    );
    // Still registered (critical), so the name exists: NOERROR, no answer.
    let empty = dig(dns, "db.service.courier", "SRV", &[]);
    assert!(
        empty.contains("status: NOERROR") && empty.contains("ANSWER: 0"),
        "{empty}"
    );
    web.kill9();
}
