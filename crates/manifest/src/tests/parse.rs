//! Parsing: good manifests, and every kind of bad one with its line and
//! column.

use super::*;

#[test]
fn parses_the_todo_manifest() {
    let m = todo_manifest();
    assert_eq!(m.services().keys().collect::<Vec<_>>(), ["todo", "web"]);
    let web = m.service("web").expect("web");
    assert_eq!(web.sends, rules(&["todos.list@1", "todo.create@1"]));
    assert_eq!(web.receives, rules(&["todo.created@1"]));
    assert!(web.publishes.is_empty());
    assert_eq!(web.tokens, [TokenHash::of("crr_web")]);
    assert_eq!(web.certificates, ["CN=web"]);
    assert_eq!(
        web.location(),
        Some(Location {
            line: 1,
            column: 11
        })
    );
    assert_eq!(
        web.sends[1].location(),
        Some(Location {
            line: 2,
            column: 26
        })
    );
    let todo = m.service("todo").expect("todo");
    assert_eq!(todo.receives, rules(&["todos.list@1", "todo.create@1"]));
    assert!(todo.certificates.is_empty());
    assert_eq!(m.admin().tokens, [TokenHash::of("crr_admin")]);
    assert!(m.admin().certificates.is_empty());
}

#[test]
fn every_key_is_optional() {
    let m = Manifest::parse("").expect("empty");
    assert!(m.services().is_empty());
    assert_eq!(m.admin(), &AdminSpec::default());
    let m = Manifest::parse("[services.idle]\n").expect("a bare service");
    assert_eq!(m.service("idle").map(|s| s.sends.len()), Some(0));
    // Inline and dotted forms are the same TOML.
    let m = Manifest::parse("services = { web = { sends = [\"a\"] } }\n").expect("inline");
    assert_eq!(
        m.service("web").map(|s| s.sends.clone()),
        Some(rules(&["a"]))
    );
    let m = Manifest::parse("services.web.receives = [\"a.>@3\"]\n").expect("dotted");
    assert_eq!(
        m.service("web").map(|s| s.receives.clone()),
        Some(rules(&["a.>@3"]))
    );
}

#[test]
fn the_brief_example_error_format() {
    let text = "[services.web]\ntokens = []\nsends = [\"todo create@1\"]\n";
    let err = Manifest::parse(text)
        .expect_err("space")
        .with_origin("courier.toml");
    assert_eq!(
        err.to_string(),
        "courier.toml:3:10: \"todo create@1\" is not a valid message name or pattern: name \
         \"todo create\" has the character ' ' at byte 4; names use only a-z, 0-9, '.', '_' \
         and '-'"
    );
    assert_eq!(
        err.location(),
        Some(Location {
            line: 3,
            column: 10
        })
    );
    assert!(matches!(err.kind(), ManifestErrorKind::Rule(_)));
}

#[test]
fn refuses_toml_and_shape_errors_with_line_and_column() {
    assert_refused("[services.web\n", "1:14", "");
    assert_refused("a = [\n", "1:6", "unclosed array");
    assert_refused(
        "bogus = 1\n",
        "1:1",
        "unknown field `bogus`, expected `services` or `admin`",
    );
    assert_refused(
        "[services.web]\nsends = []\nsendz = [\"a\"]\n",
        "3:1",
        "unknown field `sendz`, expected one of `sends`, `publishes`, `receives`, `tokens`, `certificates`",
    );
    assert_refused("[admin]\nsends = [\"a\"]\n", "2:1", "unknown field `sends`");
    assert_refused(
        "[services.web]\nsends = \"a\"\n",
        "2:9",
        "expected a sequence",
    );
    assert_refused(
        "[services.web]\nsends = [1]\n",
        "2:10",
        "invalid type: integer `1`",
    );
    assert_refused("[services]\nweb = 3\n", "2:7", "invalid type: integer `3`");
    assert_refused("[[services]]\n", "1:1", "expected a map");
    assert_refused(
        "[services.web]\nsends = [\"a\"]\n[services.web]\n",
        "3:11",
        "duplicate key",
    );
    // Column counts characters: the `é` in the comment is one column.
    assert_refused("# é\n[services.web] # é\nsends = [2]\n", "3:10", "integer");
}

#[test]
fn refuses_bad_service_names() {
    assert_refused(
        "[services.\"to do\"]\n",
        "1:11",
        "\"to do\" is not a valid service name: name \"to do\" has the character ' '",
    );
    assert_refused("[services.Web]\n", "1:11", "not a valid service name");
    assert_refused("[services.\"web\\u0000\"]\n", "1:11", "\"web\\0\"");
    assert_refused("[services.\"w\u{0435}b\"]\n", "1:11", "'\u{0435}'"); // Cyrillic е
    assert_refused("[services.\"web.*\"]\n", "1:11", "not a valid service name");
    assert_refused("[services.\"\"]\n", "1:11", "name is empty");
    assert_refused("[services.admin]\n", "1:11", "\"admin\" is reserved");
}

#[test]
fn refuses_bad_rules() {
    for (rule, contains) in [
        ("todo.create@", "invalid major version \"\""),
        ("todo.create@v1", "invalid major version \"v1\""),
        ("todo.create@65536", "invalid major version \"65536\""),
        ("todo.create@1@2", "invalid major version \"1@2\""),
        ("todo.>.x", "'>' before its last segment"),
        ("todo.cre*", "mixes a wildcard"),
        ("@1", "name is empty"),
        ("todo\\u0000", "'\\0'"),
        ("todo\\tcreate", "'\\t'"),
        ("t\u{043e}do", "'\u{043e}'"),
    ] {
        let text = format!("[services.web]\nreceives = [\"ok\", \"{rule}\"]\n");
        assert_refused(&text, "2:19", contains);
    }
    assert_refused(
        "[services.web]\nsends = [\"a@1\", \"b\", \"a@1\"]\n",
        "2:22",
        "\"a@1\" is listed twice in services.web.sends; remove one",
    );
    // Not duplicates: other majors, or another list.
    Manifest::parse("[services.web]\nsends = [\"a@1\", \"a@2\", \"a\"]\nreceives = [\"a@1\"]\n")
        .expect("distinct rules");
}

#[test]
fn refuses_bad_credentials() {
    let web = hash_token("crr_web");
    assert_refused(
        "[services.web]\ntokens = [\"md5:abc\"]\n",
        "2:11",
        "a token hash must start with \"sha256:\"",
    );
    let pasted = "crr_0123456789abcdef0123456789abcdef";
    let message = refusal(&format!("[services.web]\ntokens = [\"{pasted}\"]\n"));
    assert!(message.starts_with("2:11: "), "{message}");
    assert!(
        message.contains("looks like a token, not its hash"),
        "{message}"
    );
    assert!(
        !message.contains("0123456789"),
        "the secret is echoed: {message}"
    );
    assert_refused(
        &format!("[services.web]\ntokens = [\"{}\"]\n", &web[..70]),
        "2:11",
        "this one has 63 characters",
    );
    assert_refused(
        &format!("[services.web]\ntokens = [\"{}\"]\n", hash_token("")),
        "2:11",
        "hash of the empty token",
    );
    assert_refused(
        &format!("[services.web]\ntokens = [\"{web}\", \"{web}\"]\n"),
        "2:86",
        "this token hash is listed twice for service web",
    );
    assert_refused(
        &format!("[services.web]\ntokens = [\"{web}\"]\n[services.todo]\ntokens = [\"{web}\"]\n"),
        "4:11",
        "already listed for service web; a credential identifies exactly one service or the \
         admin, so give service todo its own",
    );
    assert_refused(
        &format!("[services.web]\ntokens = [\"{web}\"]\n[admin]\ntokens = [\"{web}\"]\n"),
        "4:11",
        "already listed for service web",
    );
    // Reported at the later one in the file, whichever table comes first.
    assert_refused(
        &format!("[admin]\ntokens = [\"{web}\"]\n[services.web]\ntokens = [\"{web}\"]\n"),
        "4:11",
        "already listed for",
    );
    for (subject, reason) in [
        ("", "it is empty"),
        ("web", "not a distinguished name"),
        (" CN=web", "white space"),
        ("CN=web\\n", "control character"),
        ("CN=web\\u0000", "control character"),
    ] {
        assert_refused(
            &format!("[services.web]\ncertificates = [\"{subject}\"]\n"),
            "2:17",
            reason,
        );
    }
    assert_refused(
        &format!(
            "[services.web]\ncertificates = [\"CN={}\"]\n",
            "a".repeat(1100)
        ),
        "2:17",
        "longer than 1024 bytes",
    );
    assert_refused(
        "[services.web]\ncertificates = [\"CN=x\"]\n[services.todo]\ncertificates = [\"CN=x\"]\n",
        "4:17",
        "this certificate subject is already listed for service web",
    );
}

#[test]
fn refuses_what_exceeds_the_limits() {
    // Tokens: the first one past the limit is pointed at.
    let tokens: Vec<String> = (0..=TOKENS_PER_SERVICE_MAX)
        .map(|i| format!("\"{}\"", hash_token(&format!("t{i}"))))
        .collect();
    let text = format!("[services.web]\ntokens = [\n{}\n]\n", tokens.join(",\n"));
    assert_refused(
        &text,
        &format!("{}:1", 3 + TOKENS_PER_SERVICE_MAX),
        "service web lists 17 tokens; at most 16 are allowed",
    );
    let text = format!("[admin]\ntokens = [\n{}\n]\n", tokens.join(",\n"));
    assert_refused(&text, "19:1", "the admin lists 17 tokens");

    let subjects: Vec<String> = (0..=CERTIFICATES_PER_SERVICE_MAX)
        .map(|i| format!("\"CN=c{i}\""))
        .collect();
    let text = format!("[services.web]\ncertificates = [{}]\n", subjects.join(", "));
    assert!(refusal(&text).contains("lists 17 certificates; at most 16"));

    let many: Vec<String> = (0..=RULES_PER_SERVICE_MAX)
        .map(|i| format!("\"n{i}\""))
        .collect();
    let text = format!("[services.web]\nsends = [{}]\n", many.join(","));
    assert_refused(&text, "1:11", "service web lists 513 rules");

    let services: String = (0..=SERVICES_MAX)
        .map(|i| format!("[services.s{i}]\n"))
        .collect();
    assert_refused(
        &services,
        &format!("{}:11", SERVICES_MAX + 1),
        "the manifest lists 1025 services; at most 1024 are allowed",
    );

    // All rules together: 17 services of 500 rules pass 8192 in the 17th.
    let list: String = (0..500).map(|i| format!("\"n{i}\",")).collect();
    let text: String = (0..17)
        .map(|s| format!("[services.s{s:02}]\nreceives = [{list}]\n"))
        .collect();
    assert!(
        refusal(&text).contains("the manifest lists 8193 rules in all"),
        "{}",
        refusal(&text)
    );

    let big = " ".repeat(MANIFEST_BYTES_MAX + 1);
    assert_eq!(
        refusal(&big),
        format!(
            "the manifest is {} bytes; at most 1048576 are allowed: is this the right file?",
            MANIFEST_BYTES_MAX + 1
        )
    );
    let err = Manifest::parse_bytes(big.as_bytes()).expect_err("too large");
    assert!(matches!(err.kind(), ManifestErrorKind::TooLarge { .. }));
}

#[test]
fn refuses_bytes_that_are_not_utf8() {
    let err = Manifest::parse_bytes(b"[services.web]\nsends = [\"a\xff\"]\n").expect_err("latin-1");
    assert_eq!(
        err.with_origin("courier.toml").to_string(),
        "courier.toml:2:12: the manifest is not valid UTF-8 here; save it as UTF-8"
    );
    assert!(Manifest::parse_bytes(todo_manifest_text().as_bytes()).is_ok());
}

#[test]
fn reports_the_first_error_in_the_file() {
    let text = "[services.zz]\nsends = [\"A\"]\n[services.aa]\nsends = [\"B\"]\n";
    assert_refused(text, "2:10", "\"A\"");
    let text = "[services.web]\ncertificates = [\"x\"]\nsends = [\"B\"]\n";
    assert_refused(text, "2:17", "certificate subject");
}
