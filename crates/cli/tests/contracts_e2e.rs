//! Service contracts and authentication against a real broker process.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use common::{json_lines, stderr, Broker};
use courier_client::proto::{
    decode_frame, Credentials, ErrorCode, Frame, FrameWriter, Hello, Kind, Message, Welcome,
    PROTOCOL_VERSION,
};
use courier_client::{Client, ClientOptions};

struct Tokens {
    web: String,
    todo: String,
    admin: String,
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
    let (web, web_hash) = common::token_pair();
    let (todo, todo_hash) = common::token_pair();
    let (admin, admin_hash) = common::token_pair();
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
    broker.wait_consumers("todo", 1, Some(&t.admin));
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

/// The WELCOME a raw client gets for a HELLO naming `service` (maybe
/// empty) with `token`.
fn welcome_for(broker: &Broker, service: &str, token: &str) -> Welcome {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(&broker.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut out = FrameWriter::new();
    out.push(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        service: service.into(),
        instance: String::new(),
        max_in_flight: 0,
        credentials: Credentials::Token(token.into()),
    }))
    .expect("encode");
    stream.write_all(&out.take()).expect("write HELLO");
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        match decode_frame(&mut buf, u32::MAX).expect("broker frames decode") {
            Some(Frame::Welcome(welcome)) => return welcome,
            Some(other) => panic!("expected WELCOME, got {other:?}"),
            None => {}
        }
        let n = stream.read(&mut chunk).expect("read WELCOME");
        assert!(n > 0, "the broker closed the connection instead of WELCOME");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_its_service_to_its_token_learns_it_from_welcome() {
    let dir = common::tempdir::Dir::new("identity");
    let (broker, t, _) = start_with_manifest(&dir);
    let (anonymous, named, admin, admin_named_cli) = tokio::task::block_in_place(|| {
        (
            welcome_for(&broker, "", &t.web),
            welcome_for(&broker, "web", &t.web),
            welcome_for(&broker, "", &t.admin),
            welcome_for(&broker, "cli", &t.admin),
        )
    });
    assert_eq!(anonymous.service.as_deref(), Some("web"));
    assert_eq!(
        named.service, None,
        "a client that named itself gets WELCOME without the field, as before it existed"
    );
    assert_eq!(admin.service.as_deref(), Some("admin"));
    assert_eq!(
        admin_named_cli.service.as_deref(),
        Some("admin"),
        "the admin's token decides whatever name HELLO gave"
    );

    let mut opts = ClientOptions::new(broker.addr.clone(), "");
    opts.token = Some(t.todo.clone());
    let client = Client::connect(opts).await.expect("connect with a token");
    assert_eq!(client.service(), "todo");
    client.shutdown().await;

    // The CLI's responder says whom it answers as, not an empty name.
    let responder = broker.spawn(&[
        "reply",
        "todo.create",
        "--outcome",
        "todo.created",
        "--token",
        &t.todo,
    ]);
    tokio::task::block_in_place(|| {
        responder.wait_stderr(
            "replying to todo.create as service todo",
            Duration::from_secs(10),
        )
    });
}

/// Sends, on a raw connection as `service`, a reply to `command`; returns
/// the broker's SEND_RESULT.
fn forge_reply(
    broker: &Broker,
    service: &str,
    token: Option<&str>,
    command: uuid::Uuid,
) -> (ErrorCode, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(&broker.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut forged = Message::new(Kind::Reply, "todo.created", "forged");
    forged.response_to = Some(command);
    let mut out = FrameWriter::new();
    out.push(&Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        service: service.into(),
        instance: String::new(),
        max_in_flight: 0,
        credentials: token
            .map(|t| Credentials::Token(t.into()))
            .unwrap_or_default(),
    }))
    .expect("encode");
    out.push_send(1, &forged).expect("encode");
    stream.write_all(&out.take()).expect("write");
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(frame) = decode_frame(&mut buf, u32::MAX).expect("broker frames decode") {
            match frame {
                Frame::Welcome(_) => {}
                Frame::SendResult(results) => {
                    let result = &results[0];
                    assert_eq!(result.seq, 1);
                    return (result.code, result.reason.clone());
                }
                other => panic!("expected WELCOME, then SEND_RESULT; got {other:?}"),
            }
        }
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "the broker closed the connection before answering");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `todo` receives todo.create and `web` asks it; while todo's handler
/// holds the command, `forger` (a service the command never went to)
/// replies to it and must be refused with 10; then todo's own reply
/// reaches web.
async fn only_the_receiver_may_reply(
    broker: &Broker,
    tokens: Option<&Tokens>,
    forger: &str,
    forger_token: Option<&str>,
) {
    let options = |service: &str, token: Option<&String>| {
        let mut opts = ClientOptions::new(broker.addr.clone(), service);
        opts.token = token.cloned();
        opts
    };
    let todo = Client::connect(options("todo", tokens.map(|t| &t.todo)))
        .await
        .expect("todo connects");
    let (delivered_tx, mut delivered) = tokio::sync::mpsc::channel(1);
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let held = release.clone();
    todo.on("todo.create", move |msg| {
        let (delivered_tx, held) = (delivered_tx.clone(), held.clone());
        async move {
            let _ = delivered_tx.send(msg.message().id).await;
            let _permit = held.acquire().await;
            msg.reply("todo.created", &"real").await
        }
    })
    .await
    .expect("todo subscribes");
    let web = Client::connect(options("web", tokens.map(|t| &t.web)))
        .await
        .expect("web connects");
    let mut replies = web
        .command("todo.create")
        .json(&"milk")
        .expect("json")
        .request_stream()
        .await
        .expect("the command is accepted");
    let command = tokio::time::timeout(Duration::from_secs(10), delivered.recv())
        .await
        .expect("todo gets the command")
        .expect("open");
    assert_eq!(command, replies.command_id());

    let (code, reason) =
        tokio::task::block_in_place(|| forge_reply(broker, forger, forger_token, command));
    assert_eq!(code, ErrorCode::Unauthorized, "{reason}");
    assert!(
        reason.contains(&format!("service {forger} may not reply")),
        "{reason}"
    );

    release.add_permits(1);
    let reply = replies
        .next_reply()
        .await
        .expect("a reply")
        .expect("todo's reply");
    assert_eq!(reply.payload().as_ref(), b"\"real\"");
    assert_eq!(reply.message().sender.as_str(), "todo");
    web.shutdown().await;
    todo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_from_a_service_the_command_never_reached_is_refused_without_a_manifest() {
    let broker = Broker::start_with(&["--in-memory"]);
    only_the_receiver_may_reply(&broker, None, "ops", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_from_a_service_the_command_never_reached_is_refused_under_a_manifest() {
    let dir = common::tempdir::Dir::new("forged-reply");
    let (broker, t, _) = start_with_manifest(&dir);
    // web sent the command but never received it: it may not answer it.
    only_the_receiver_may_reply(&broker, Some(&t), "web", Some(&t.web)).await;
}

#[test]
fn a_reloaded_manifest_revokes_tokens_and_a_bad_one_is_refused() {
    let dir = common::tempdir::Dir::new("reload");
    let (web, web_hash) = common::token_pair();
    let (todo, todo_hash) = common::token_pair();
    let (admin, admin_hash) = common::token_pair();
    let path = dir.path().join("courier.toml");
    write_manifest(&path, Some(&web_hash), &todo_hash, &admin_hash);
    let (broker, log) = Broker::start_watched_with(
        &format!("127.0.0.1:{}", common::free_port()),
        common::tempdir::Dir::new("reload-data"),
        &["--manifest", path.to_str().expect("utf-8 path")],
    );
    let t = Tokens { web, todo, admin };
    let todo = broker.spawn(&[
        "subscribe",
        "todo.create",
        "--service",
        "todo",
        "--token",
        &t.todo,
    ]);
    broker.wait_consumers("todo", 1, Some(&t.admin));
    let send = |broker: &Broker| {
        broker.run(&["send", "todo.create", "--service", "web", "--token", &t.web])
    };
    assert!(send(&broker).status.success());
    drop(todo);

    // A manifest with a syntax error is refused; the old one stays.
    std::fs::write(&path, "[services.web\nsends = [").expect("write");
    log.wait_for(&["manifest reload refused"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the bad manifest was never read:\n{}", log.text()));
    assert!(
        send(&broker).status.success(),
        "the previous manifest stays in force"
    );

    // web's token removed: refused from now on.
    let todo_hash = courier_manifest::hash_token(&t.todo);
    let admin_hash = courier_manifest::hash_token(&t.admin);
    write_manifest(&path, None, &todo_hash, &admin_hash);
    common::wait_until(
        "web's token refused once the manifest without it is read",
        Duration::from_secs(10),
        || {
            let out = send(&broker);
            match (out.status.code(), stderr(&out)) {
                (Some(4), said) if said.contains("not in the manifest") => Ok(()),
                (code, said) => Err(format!("exit {code:?}: {said}")),
            }
        },
    );
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

#[tokio::test]
async fn a_send_waiting_for_a_reconnect_the_manifest_refuses_fails_with_the_refusal() {
    let dir = common::tempdir::Dir::new("revoked");
    let (broker, t, path) = start_with_manifest(&dir);
    let mut opts = ClientOptions::new(broker.addr.clone(), "todo");
    opts.token = Some(t.todo.clone());
    let todo = Client::connect(opts).await.expect("todo connects");
    todo.on("todo.create", |msg| async move { msg.ack() })
        .await
        .expect("todo subscribes");
    let mut opts = ClientOptions::new(broker.addr.clone(), "web");
    opts.token = Some(t.web.clone());
    let web = Client::connect(opts).await.expect("web connects");
    web.send("todo.create", &serde_json::json!({"text": "milk"}))
        .await
        .expect("sent while allowed");

    // web's token removed: the broker closes web's connection and refuses
    // its reconnects. A send waiting for one is answered with that refusal,
    // not left waiting for a connection that will not come.
    let todo_hash = courier_manifest::hash_token(&t.todo);
    let admin_hash = courier_manifest::hash_token(&t.admin);
    write_manifest(&path, None, &todo_hash, &admin_hash);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            web.send("todo.create", &serde_json::json!({"text": "eggs"})),
        )
        .await
        .expect("a send under a refused identity is answered, not left waiting");
        match sent {
            // Sent before the broker read the new manifest.
            Ok(_) => {}
            Err(courier_client::Error::Refused { code, reason }) => {
                assert_eq!(
                    code,
                    courier_client::proto::ErrorCode::Unauthorized,
                    "{reason}"
                );
                break;
            }
            Err(other) => panic!("expected the broker's refusal, got {other}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new manifest was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    web.shutdown().await;
    todo.shutdown().await;
}
