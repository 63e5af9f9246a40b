//! TLS and client certificates against a real broker process:
//! `courier dev-certs`, `serve --tls-*`, and client `--tls-*` flags.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{json_lines, stderr, Broker};

const T: Duration = Duration::from_secs(10);

fn courier(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::courier_bin())
        .args(args)
        .env_remove("COURIER_TLS_CA")
        .env_remove("COURIER_TLS_CERT")
        .env_remove("COURIER_TLS_KEY")
        .output()
        .expect("run courier")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `courier dev-certs DIR`; returns DIR.
fn dev_certs(dir: &common::tempdir::Dir) -> PathBuf {
    let certs = dir.path().join("certs");
    let out = courier(&["dev-certs", path(&certs)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for name in [
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
        "web.pem",
        "web-key.pem",
        "todo.pem",
        "todo-key.pem",
        "admin.pem",
        "admin-key.pem",
    ] {
        let file = certs.join(name);
        assert!(file.is_file(), "{name} written");
        assert!(listed.contains(path(&file)), "{name} listed: {listed}");
    }
    assert!(stderr(&out).contains("--tls-client-ca"), "{}", stderr(&out));
    certs
}

struct Setup {
    broker: Broker,
    certs: PathBuf,
    todo_token: String,
    _dir: common::tempdir::Dir,
}

/// A broker with TLS, client certificates verified against the dev CA, and
/// a manifest: web by certificate, todo by certificate or token.
fn start() -> Setup {
    let dir = common::tempdir::Dir::new("tls");
    let certs = dev_certs(&dir);
    let (todo_token, todo_hash) = common::token_pair();
    let manifest = dir.path().join("courier.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"[services.web]
sends = ["todo.create@1"]
certificates = ["CN=web"]

[services.todo]
receives = ["todo.create@1"]
tokens = ["{todo_hash}"]
certificates = ["CN=todo"]

[admin]
certificates = ["CN=admin"]
"#
        ),
    )
    .expect("write manifest");
    let broker = Broker::start_with(&[
        "--manifest",
        path(&manifest),
        "--tls-cert",
        path(&certs.join("server.pem")),
        "--tls-key",
        path(&certs.join("server-key.pem")),
        "--tls-client-ca",
        path(&certs.join("ca.pem")),
    ]);
    Setup {
        broker,
        certs,
        todo_token,
        _dir: dir,
    }
}

/// `--tls-ca CA [--tls-cert NAME.pem --tls-key NAME-key.pem]`.
fn tls_args(ca_dir: &Path, cert_dir: &Path, cert: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--tls-ca".to_string(),
        path(&ca_dir.join("ca.pem")).to_string(),
    ];
    if let Some(name) = cert {
        args.push("--tls-cert".into());
        args.push(path(&cert_dir.join(format!("{name}.pem"))).to_string());
        args.push("--tls-key".into());
        args.push(path(&cert_dir.join(format!("{name}-key.pem"))).to_string());
    }
    args
}

fn with(args: &[&str], extra: &[String]) -> Vec<String> {
    args.iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .collect()
}

fn run(broker: &Broker, args: &[String]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    broker.run(&args)
}

#[test]
fn certificate_clients_request_and_reply_over_tls_alongside_token_clients() {
    let s = start();
    // The responder authenticates by token over TLS (no client certificate):
    // client certificates are optional.
    let responder_args = with(
        &[
            "reply",
            "todo.create",
            "--outcome",
            "todo.created",
            "--echo",
            "--token",
            &s.todo_token,
        ],
        &tls_args(&s.certs, &s.certs, None),
    );
    let responder_args: Vec<&str> = responder_args.iter().map(String::as_str).collect();
    let responder = s.broker.spawn(&responder_args);
    responder.wait_stderr("replying to todo.create", T);

    // The requester authenticates by its certificate (CN=web) alone.
    let out = run(
        &s.broker,
        &with(
            &["request", "todo.create", "--data", r#"{"text":"milk"}"#],
            &tls_args(&s.certs, &s.certs, Some("web")),
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let replies = json_lines(&out);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["name"], "todo.created");
    assert_eq!(replies[0]["sender"], "todo");
    assert_eq!(replies[0]["payload"]["text"], "milk");

    // The certificate, not a claim, decides who the sender is.
    let out = run(
        &s.broker,
        &with(
            &["send", "todo.create", "--service", "todo"],
            &tls_args(&s.certs, &s.certs, Some("web")),
        ),
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("client certificate belongs to service web"),
        "{}",
        stderr(&out)
    );

    // dev-certs does not overwrite a CA by accident.
    let again = courier(&["dev-certs", path(&s.certs)]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn plain_tcp_to_the_tls_port_is_refused_with_a_clear_error() {
    let s = start();
    let out = s
        .broker
        .run(&["send", "todo.create", "--token", &s.todo_token]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("requires TLS"), "{err}");
    assert!(err.contains("--tls-ca"), "{err}");
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let s = start();
    let other = common::tempdir::Dir::new("tls-other");
    let other_certs = dev_certs(&other);
    // Trusts the right CA, but presents web's certificate from another CA.
    let out = run(
        &s.broker,
        &with(
            &["send", "todo.create", "--data", "{}"],
            &tls_args(&s.certs, &other_certs, Some("web")),
        ),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("client certificate"), "{err}");
}

#[test]
fn a_client_trusting_the_wrong_ca_does_not_connect() {
    let s = start();
    let other = common::tempdir::Dir::new("tls-other");
    let other_certs = dev_certs(&other);
    let out = run(
        &s.broker,
        &with(
            &["send", "todo.create", "--token", &s.todo_token],
            &tls_args(&other_certs, &other_certs, None),
        ),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("TLS session"), "{err}");
    assert!(err.contains("not signed by the trusted CA"), "{err}");
}

#[test]
fn a_token_and_a_certificate_of_different_services_are_refused() {
    let s = start();
    let out = run(
        &s.broker,
        &with(
            &["send", "todo.create", "--token", &s.todo_token],
            &tls_args(&s.certs, &s.certs, Some("web")),
        ),
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("service todo's"), "{err}");
    assert!(err.contains("\"CN=web\" is service web's"), "{err}");
}

#[test]
fn a_tls_client_to_a_plain_broker_is_told_so() {
    let dir = common::tempdir::Dir::new("tls-plain");
    let certs = dev_certs(&dir);
    let broker = Broker::start();
    let out = run(
        &broker,
        &with(
            &["send", "todo.create", "--service", "web"],
            &tls_args(&certs, &certs, None),
        ),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is the broker listening with TLS"), "{err}");
}
