//! `check`: what it finds and warns about, and its speed at the limits.

use super::*;

/// `check` of `body` with a token added to every service, as lines.
fn check_lines(body: &str) -> Vec<String> {
    let mut text = String::new();
    for line in body.lines() {
        text.push_str(line);
        text.push('\n');
        if let Some(name) = line
            .strip_prefix("[services.")
            .and_then(|l| l.strip_suffix(']'))
        {
            text.push_str(&format!("tokens = [\"{}\"]\n", hash_token(name)));
        }
    }
    let m = Manifest::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    check(&m).iter().map(ToString::to_string).collect()
}

#[test]
fn check_accepts_the_todo_manifest() {
    assert_eq!(check(&todo_manifest()), []);
}

#[test]
fn check_finds_sends_without_receiver() {
    assert_eq!(
        check_lines("[services.web]\nsends = [\"todo.create@1\", \"todo.*\"]\n"),
        [
            "line 3: error: service web sends todo.create@1, but no service receives it: add \
             it to the receives of the service that handles it",
            "line 3: error: service web sends todo.*, but no service receives any name \
             matching it: add it to the receives of the service that handles it",
        ]
    );
    // Events too.
    assert_eq!(
        check_lines("[services.todo]\npublishes = [\"todo.created\"]\n"),
        [
            "line 3: error: service todo publishes todo.created, but no service receives it: add \
          it to the receives of the service that handles it"
        ]
    );
}

#[test]
fn check_finds_commands_with_two_receivers() {
    let body = "[services.web]\nsends = [\"todo.create@1\"]\n\
                [services.todo]\nreceives = [\"todo.create@1\"]\n\
                [services.audit]\nreceives = [\"todo.*\"]\n";
    assert_eq!(
        check_lines(body),
        [
            "line 3: error: todo.create is a command (service web sends todo.create@1) received \
          by 2 services: audit, todo; a command has exactly one receiving service: keep it in \
          one service's receives, or, if it is an event, list it under web's publishes"
        ]
    );
    // As an event, the same fan-out is fine.
    let body = "[services.web]\npublishes = [\"todo.create@1\"]\n\
                [services.todo]\nreceives = [\"todo.create@1\"]\n\
                [services.audit]\nreceives = [\"todo.*\"]\n";
    assert_eq!(check_lines(body), Vec::<String>::new());
    // Receivers at different majors never share a message: no conflict.
    let body = "[services.web]\nsends = [\"todo.create\"]\n\
                [services.todo]\nreceives = [\"todo.create@1\"]\n\
                [services.todo2]\nreceives = [\"todo.create@2\"]\n";
    assert_eq!(check_lines(body), Vec::<String>::new());
    // Two rules of one service are one receiver.
    let body = "[services.web]\nsends = [\"todo.create\"]\n\
                [services.todo]\nreceives = [\"todo.create\", \"todo.*\"]\n";
    assert_eq!(check_lines(body), Vec::<String>::new());
}

#[test]
fn check_finds_wildcard_command_conflicts() {
    let body = "[services.web]\nsends = [\"todo.>\"]\n\
                [services.todo]\nreceives = [\"todo.>\"]\n\
                [services.audit]\nreceives = [\"*.deleted\"]\n";
    assert_eq!(
        check_lines(body),
        [
            "line 3: error: todo.deleted is a command (service web sends todo.>) received by 2 \
          services: audit, todo; a command has exactly one receiving service: keep it in one \
          service's receives, or, if it is an event, list it under web's publishes"
        ]
    );
    let body = "[services.web]\nsends = [\"todo.>\"]\n\
                [services.todo]\nreceives = [\"todo.>\"]\n\
                [services.audit]\nreceives = [\"*.*.deleted\"]\n";
    assert!(check_lines(body)[0].contains("names matching todo.*.deleted are commands"));
    // Declared as an event by a publisher: not a command conflict.
    let body = "[services.web]\nsends = [\"todo.>\"]\n\
                [services.todo]\nreceives = [\"todo.>\"]\npublishes = [\"todo.deleted\"]\n\
                [services.audit]\nreceives = [\"*.deleted\"]\n";
    assert_eq!(check_lines(body), Vec::<String>::new());
}

#[test]
fn check_finds_incompatible_versions() {
    let body = "[services.web]\nsends = [\"todo.create@2\"]\n\
                [services.todo]\nreceives = [\"todo.create@1\"]\n";
    assert_eq!(
        check_lines(body),
        [
            "line 3: error: service web sends todo.create@2, but no receiver accepts major 2 \
             (todo receives todo.create@1): send a major they accept, or add todo.create@2 to \
             a receiver",
            "line 6: warning: service todo receives todo.create@1, but no service sends it at \
             major 1 (sent: web sends todo.create@2)",
        ]
    );
    // A receiver without a major accepts every major; a send without one
    // may carry any.
    let body = "[services.web]\nsends = [\"todo.create@2\", \"todo.list\"]\n\
                [services.todo]\nreceives = [\"todo.create\", \"todo.list@3\"]\n";
    assert_eq!(check_lines(body), Vec::<String>::new());
}

#[test]
fn check_warns_about_receives_nobody_sends() {
    let body = "[services.web]\nsends = [\"a\"]\n\
                [services.todo]\nreceives = [\"a\", \"b\", \"c.*\"]\n";
    assert_eq!(
        check_lines(body),
        [
            "line 6: warning: service todo receives b, but no service sends it",
            "line 6: warning: service todo receives c.*, but no service sends any name \
             matching it",
        ]
    );
}

#[test]
fn check_warns_about_partly_received_wildcard_sends() {
    let body = "[services.web]\nsends = [\"todo.*\"]\n\
                [services.todo]\nreceives = [\"todo.create\", \"todo.list\"]\n";
    assert_eq!(
        check_lines(body),
        [
            "line 3: warning: service web sends todo.*, but no single receive rule covers it, so \
          some names may have no receiver (received: todo.create, todo.list)"
        ]
    );
}

#[test]
fn check_warns_about_a_name_both_sent_and_published() {
    let body = "[services.web]\nsends = [\"todo.created\"]\n\
                [services.todo]\npublishes = [\"todo.created\"]\n\
                [services.audit]\nreceives = [\"todo.created\"]\n\
                [services.log]\nreceives = [\"todo.created\"]\n";
    assert_eq!(
        check_lines(body),
        [
            "line 3: warning: service web sends todo.created, which todo publishes as an event; \
          it is checked as an event: move it to web's publishes to say so"
        ]
    );
}

#[test]
fn check_warns_about_services_without_credentials_and_empty_manifests() {
    let m = Manifest::parse("[services.web]\n").expect("valid");
    let problems = check(&m);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].severity, Severity::Warning);
    assert_eq!(problems[0].line, Some(1));
    assert_eq!(
        problems[0].display_in("courier.toml").to_string(),
        "courier.toml:1: warning: service web has neither tokens nor certificates, so it \
         cannot authenticate: add a token hash from `courier token new`"
    );
    assert!(!has_errors(&problems));
    let problems = check(&Manifest::parse("").expect("valid"));
    assert_eq!(
        problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["warning: the manifest declares no services: add a [services.NAME] table for each"]
    );
    assert_eq!(
        problems[0].display_in("courier.toml").to_string(),
        "courier.toml: warning: the manifest declares no services: add a [services.NAME] \
         table for each"
    );
}

#[test]
fn check_is_fast_at_the_limits() {
    // 16 services, each sending 256 wildcard commands and receiving 256
    // overlapping patterns: 8192 rules, the most a manifest may hold.
    let mut text = String::new();
    for s in 0..16 {
        let sends: Vec<String> = (0..256).map(|i| format!("\"s{s}.c{i}.>\"")).collect();
        let receives: Vec<String> = (0..256).map(|i| format!("\"*.c{i}.*\"")).collect();
        text.push_str(&format!(
            "[services.s{s}]\nsends = [{}]\nreceives = [{}]\n",
            sends.join(","),
            receives.join(",")
        ));
    }
    let m = Manifest::parse(&text).expect("valid");
    let started = std::time::Instant::now();
    let problems = check(&m);
    assert!(has_errors(&problems));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn fuzz_seed_manifests_are_valid() {
    for (name, text) in [
        (
            "todo",
            include_str!("../../../../fuzz/corpus/manifest_parser/todo.toml"),
        ),
        (
            "wildcards",
            include_str!("../../../../fuzz/corpus/manifest_parser/wildcards.toml"),
        ),
        (
            "inline",
            include_str!("../../../../fuzz/corpus/manifest_parser/inline.toml"),
        ),
    ] {
        let m = Manifest::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!m.services().is_empty(), "{name}");
    }
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for text in [
        format!("a = {}", "[".repeat(100_000)),
        format!("a = {}1{}", "[".repeat(50_000), "]".repeat(50_000)),
        format!("a = {}", "{ b = ".repeat(50_000)),
        format!(
            "[services.web]\nsends = {}\"a\"{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        ),
        format!("{}= 1\n", "a.".repeat(100_000)),
    ] {
        let err = Manifest::parse(&text).expect_err("refused");
        assert!(err.location().is_some(), "{err}");
    }
}

#[test]
fn how_courier_up_runs_a_service_is_read_and_ignored_by_the_rules() {
    let text = r#"[services.worker]
receives = ["reading.taken"]
run = "exec ./worker"
build = "cargo build"
dir = "services/worker"
instances = 4
http = 8080
env = { RUST_LOG = "info" }

[services.sensor]
publishes = ["reading.taken"]
tokens = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
"#;
    let manifest = Manifest::parse(text).expect("valid");
    let worker = manifest.service("worker").expect("worker");
    assert_eq!(worker.app.run.as_deref(), Some("exec ./worker"));
    assert_eq!(worker.app.build.as_deref(), Some("cargo build"));
    assert_eq!(worker.app.dir.as_deref(), Some("services/worker"));
    assert_eq!((worker.app.instances, worker.app.http), (4, Some(8080)));
    assert_eq!(
        worker.app.env.get("RUST_LOG").map(String::as_str),
        Some("info")
    );
    let sensor = manifest.service("sensor").expect("sensor");
    assert_eq!(
        sensor.app,
        AppSpec {
            instances: 1,
            ..AppSpec::default()
        }
    );
    // A service courier up runs gets its token from courier up.
    assert!(
        check(&manifest)
            .iter()
            .all(|p| !p.to_string().contains("neither tokens")),
        "{:?}",
        check(&manifest)
    );
    assert_refused(
        &text.replace("instances = 4", "instances = 0"),
        "6:13",
        "instances is 0; it must be 1 to 256",
    );
}
