//! Service contracts and authentication against a real broker process.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{json_lines, stderr, Broker};

struct Tokens {
    web: String,
    todo: String,
    admin: String,
}

fn token_pair(broker_or_none: Option<&Broker>) -> (String, String) {
    let out = match broker_or_none {
        Some(b) => b.run(&["token", "new"]),
        None => std::process::Command::new(common::courier_bin())
            .args(["token", "new"])
            .output()
            .expect("run"),
    };
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let token = lines.next().expect("token line").to_string();
    let hash = lines.next().expect("hash line").to_string();
    assert!(
        hash.starts_with("sha256:") && hash.len() == 7 + 64,
        "{hash}"
    );
    assert_ne!(token, hash);
    (token, hash)
}

fn write_manifest(path: &Path, web_hash: Option<&str>, todo_hash: &str, admin_hash: &str) {
    let web_tokens = web_hash.map(|h| format!("\"{h}\"")).unwrap_or_default();
    std::fs::write(
        path,
        format!(
            r#"[services.web]
sends = ["todos.list@1", "todo.create@1"]
receives = ["todo.created@1"]
tokens = [{web_tokens}]

[services.todo]
receives = ["todos.list@1", "todo.create@1"]
sends = ["todo.created@1"]
tokens = ["{todo_hash}"]

[admin]
tokens = ["{admin_hash}"]
"#
        ),
    )
    .expect("write manifest");
}

fn start_with_manifest(dir: &common::tempdir::Dir) -> (Broker, Tokens, std::path::PathBuf) {
    let (web, web_hash) = token_pair(None);
    let (todo, todo_hash) = token_pair(None);
    let (admin, admin_hash) = token_pair(None);
    let path = dir.path().join("courier.toml");
    write_manifest(&path, Some(&web_hash), &todo_hash, &admin_hash);
    let broker = Broker::start_with(&["--manifest", path.to_str().expect("utf-8 path")]);
    (broker, Tokens { web, todo, admin }, path)
}

#[test]
fn tokens_decide_who_connects_and_the_manifest_what_they_send_and_receive() {
    let dir = common::tempdir::Dir::new("manifest");
    let (broker, t, _) = start_with_manifest(&dir);

    let out = broker.run(&["send", "todo.create", "--service", "web"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("requires credentials"),
        "{}",
        stderr(&out)
    );

    let out = broker.run(&[
        "send",
        "todo.create",
        "--service",
        "todo",
        "--token",
        &t.web,
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("belongs to service web"),
        "{}",
        stderr(&out)
    );

    // todo asks for everything under todo.; it gets only what it may receive.
    let todo = broker.spawn(&[
        "subscribe",
        "todo.>",
        "--service",
        "todo",
        "--token",
        &t.todo,
    ]);
    std::thread::sleep(Duration::from_millis(400));
    let out = broker.run(&[
        "send",
        "todo.create",
        "--service",
        "web",
        "--token",
        &t.web,
        "--data",
        r#"{"text":"milk"}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = todo.json_line(Duration::from_secs(10));
    assert_eq!(got["name"], "todo.create");
    assert_eq!(got["sender"], "web", "sender comes from the token");

    let out = broker.run(&["send", "todo.delete", "--service", "web", "--token", &t.web]);
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert!(
        err.contains("service web may not send todo.delete") && err.contains("todo.create@1"),
        "{err}"
    );

    // todo may not publish what only web receives under another name.
    let out = broker.run(&[
        "publish",
        "todo.deleted",
        "--service",
        "todo",
        "--token",
        &t.todo,
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // Broker commands: admin only.
    let out = broker.run(&["services", "--token", &t.web]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("only the admin"), "{}", stderr(&out));
    let out = broker.run(&["services", "--token", &t.admin]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(json_lines(&out).iter().any(|s| s["name"] == "todo"));
}

#[test]
fn a_reloaded_manifest_revokes_tokens_and_a_bad_one_is_refused() {
    let dir = common::tempdir::Dir::new("reload");
    let (broker, t, path) = start_with_manifest(&dir);
    let todo = broker.spawn(&[
        "subscribe",
        "todo.create",
        "--service",
        "todo",
        "--token",
        &t.todo,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let send = |broker: &Broker| {
        broker.run(&["send", "todo.create", "--service", "web", "--token", &t.web])
    };
    assert!(send(&broker).status.success());
    drop(todo);

    // A manifest with a syntax error is refused; the old one stays.
    std::fs::write(&path, "[services.web\nsends = [").expect("write");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        send(&broker).status.success(),
        "the previous manifest stays in force"
    );

    // web's token removed: refused from now on.
    let todo_hash = courier_manifest::hash_token(&t.todo);
    let admin_hash = courier_manifest::hash_token(&t.admin);
    write_manifest(&path, None, &todo_hash, &admin_hash);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = send(&broker);
        if out.status.code() == Some(4) && stderr(&out).contains("not in the manifest") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web's token still accepted: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_public_address_without_authentication_is_refused_unless_insecure() {
    let out = std::process::Command::new(common::courier_bin())
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--in-memory",
            "--http",
            "off",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--insecure") && stderr(&out).contains("--manifest"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_reports_one_line_per_problem() {
    let dir = common::tempdir::Dir::new("check");
    let good = dir.path().join("good.toml");
    write_manifest(
        &good,
        Some(&courier_manifest::hash_token("a")),
        &courier_manifest::hash_token("b"),
        &courier_manifest::hash_token("c"),
    );
    let run = |p: &Path| {
        std::process::Command::new(common::courier_bin())
            .arg("check")
            .arg(p)
            .output()
            .expect("run")
    };
    assert!(run(&good).status.success(), "{}", stderr(&run(&good)));
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[services.web]\nsends = [\"todo.create@1\", \"todo.purge@1\"]\n",
    )
    .expect("write");
    let out = run(&bad);
    assert!(!out.status.success());
    let problems = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(problems.lines().count() >= 2, "{problems}");
    assert!(problems.contains("todo.purge"), "{problems}");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[services.web]\nsends = [\"todo create@1\"]\n").expect("write");
    let out = run(&broken);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("broken.toml:2:"),
        "line and column: {}",
        stderr(&out)
    );
}

/// Set for the child of the test below, which reads its options from the
/// environment (set per process, so no other test's environment changes).
const FROM_ENV_CHILD: &str = "COURIER_TEST_FROM_ENV_CHILD";

#[test]
fn sdk_options_from_env_take_the_service_from_the_token() {
    if std::env::var_os(FROM_ENV_CHILD).is_some() {
        send_with_options_from_env();
        return;
    }
    let dir = common::tempdir::Dir::new("manifest");
    let (broker, t, _) = start_with_manifest(&dir);
    // The subscription exists once this returns; the next one receives.
    let todo_args = [
        "subscribe",
        "todo.create",
        "--service",
        "todo",
        "--token",
        &t.todo,
    ];
    let out = broker.run(&[&todo_args[..], &["--idle-timeout", "50ms"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let todo = broker.spawn(&todo_args);
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "sdk_options_from_env_take_the_service_from_the_token",
            "--exact",
            "--nocapture",
        ])
        .env(FROM_ENV_CHILD, "1")
        .env("COURIER_URL", &broker.addr)
        .env("COURIER_TOKEN", &t.web)
        .env_remove("COURIER_SERVICE")
        .output()
        .expect("run the child");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("from_env: sent as the token's service"),
        "{said}"
    );
    let got = todo.json_line(Duration::from_secs(10));
    assert_eq!(got["name"], "todo.create");
    assert_eq!(got["sender"], "web", "the service the token belongs to");
}

/// The child: what a service started with `COURIER_TOKEN` and no
/// `COURIER_SERVICE` does.
fn send_with_options_from_env() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let opts = courier_client::ClientOptions::from_env();
        assert_eq!(opts.service, "", "the broker decides");
        let client = courier_client::Client::connect(opts)
            .await
            .expect("connects with the token alone");
        client
            .send("todo.create", &serde_json::json!({"text": "milk"}))
            .await
            .expect("web may send todo.create");
        client.shutdown().await;
    });
    println!("from_env: sent as the token's service");
}
