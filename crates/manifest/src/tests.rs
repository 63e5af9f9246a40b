//! Tests across the crate: parsing (good and every kind of bad, with line
//! and column), authorisation queries including bypass attempts,
//! subscription cutting (a proptest against brute force), and `check`.

use courier_proto::pattern_matches;
use proptest::prelude::*;

use crate::*;

/// The todo application's manifest, with real hashes of the tokens `crr_web`,
/// `crr_todo` and `crr_admin`.
fn todo_manifest_text() -> String {
    format!(
        r#"[services.web]
sends = ["todos.list@1", "todo.create@1"]
receives = ["todo.created@1"]
tokens = ["{web}"]
certificates = ["CN=web"]

[services.todo]
receives = ["todos.list@1", "todo.create@1"]
sends = ["todo.created@1"]
tokens = ["{todo}"]

[admin]
tokens = ["{admin}"]
"#,
        web = hash_token("crr_web"),
        todo = hash_token("crr_todo"),
        admin = hash_token("crr_admin"),
    )
}

fn todo_manifest() -> Manifest {
    Manifest::parse(&todo_manifest_text()).expect("the todo manifest is valid")
}

fn rules(texts: &[&str]) -> Vec<NameRule> {
    texts
        .iter()
        .map(|t| NameRule::parse(t).expect("valid rule"))
        .collect()
}

fn web() -> Identity {
    Identity::Service("web".into())
}

/// Parses `text`, expecting a refusal; returns `line:column: message`.
fn refusal(text: &str) -> String {
    match Manifest::parse(text) {
        Ok(m) => panic!("accepted: {text}\n{m:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_refused(text: &str, at: &str, contains: &str) {
    let message = refusal(text);
    assert!(
        message.starts_with(&format!("{at}: ")),
        "expected {at}, got: {message}\n--- for:\n{text}"
    );
    assert!(
        message.contains(contains),
        "expected {contains:?} in: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message:?}");
}

// ---------------------------------------------------------------- parsing

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

// ---------------------------------------------------------- authorisation

#[test]
fn may_send_and_receive() {
    let m = todo_manifest();
    assert_eq!(m.may_send("web", "todo.create", 1), Ok(()));
    assert_eq!(m.may_send("web", "todos.list", 1), Ok(()));
    assert_eq!(m.may_receive("web", "todo.created", 1), Ok(()));
    assert_eq!(m.may_receive("todo", "todo.create", 1), Ok(()));
    assert_eq!(
        m.may_send("web", "todo.delete", 1)
            .expect_err("not listed")
            .to_string(),
        "service web may not send todo.delete: its sends are [\"todos.list@1\", \"todo.create@1\"]"
    );
    assert_eq!(
        m.may_send("web", "todo.create", 2)
            .expect_err("major")
            .to_string(),
        "service web may not send todo.create at major version 2: its sends admit todo.create \
         only as [\"todo.create@1\"]"
    );
    assert_eq!(
        m.may_receive("web", "todo.create", 1)
            .expect_err("not listed")
            .to_string(),
        "service web may not receive todo.create: its receives are [\"todo.created@1\"]"
    );
    // Receiving is not sending and vice versa.
    assert!(m.may_send("todo", "todo.create", 1).is_err());
    assert!(m.may_receive("todo", "todo.created", 1).is_err());
    assert_eq!(
        m.may_send("billing", "todo.create", 1)
            .expect_err("unknown")
            .to_string(),
        "service \"billing\" is not in the manifest; add a [services.NAME] table for it"
    );
}

#[test]
fn publishes_grants_sending() {
    let m = Manifest::parse("[services.todo]\nsends = [\"a\"]\npublishes = [\"todo.created@1\"]\n")
        .expect("valid");
    assert_eq!(m.may_send("todo", "todo.created", 1), Ok(()));
    assert_eq!(
        m.may_send("todo", "b", 1).expect_err("denied").to_string(),
        "service todo may not send b: its sends and publishes are [\"a\", \"todo.created@1\"]"
    );
}

#[test]
fn wildcard_rules_and_majors() {
    let m = Manifest::parse(
        "[services.audit]\nreceives = [\"todo.*@1\", \"user.>\", \"billing.*.paid@2\"]\n",
    )
    .expect("valid");
    assert!(m.may_receive("audit", "todo.created", 1).is_ok());
    assert!(m.may_receive("audit", "todo.created", 2).is_err());
    assert!(m.may_receive("audit", "todo.item.created", 1).is_err());
    assert!(m.may_receive("audit", "todo", 1).is_err());
    assert!(m.may_receive("audit", "user.a", 0).is_ok());
    assert!(m.may_receive("audit", "user.a.b.c", 65535).is_ok());
    assert!(m.may_receive("audit", "user", 1).is_err());
    assert!(m.may_receive("audit", "billing.x.paid", 2).is_ok());
    assert!(m.may_receive("audit", "billing.x.paid", 1).is_err());
}

#[test]
fn bypass_attempts_with_odd_names_are_refused() {
    // A service allowed everything still may not send or receive names
    // that are not names.
    let m = Manifest::parse("[services.ops]\nsends = [\">\"]\nreceives = [\">\", \"todo.*\"]\n")
        .expect("valid");
    for name in [
        "todo.create ",
        " todo.create",
        "todo. create",
        "todo.x y",
        "todo.create\0",
        "todo\0.create",
        "todo.create\n",
        "todo.\u{7f}",
        "todo.create\u{200b}", // zero-width space
        "t\u{043e}do.create",  // Cyrillic о
        "todo.\u{0441}reate",  // Cyrillic с
        "todo.creat\u{0435}",  // Cyrillic е
        "ｔodo.create",        // full-width t
        "Todo.create",
        "todo..create",
        "todo.create.",
        ".todo",
        "",
        "todo.*",
        "todo.>",
        ">",
        "*",
    ] {
        let sent = m.may_send("ops", name, 1);
        assert!(
            matches!(sent, Err(Denial::InvalidName { .. })),
            "{name:?}: {sent:?}"
        );
        let received = m.may_receive("ops", name, 1);
        assert!(
            matches!(received, Err(Denial::InvalidName { .. })),
            "{name:?}: {received:?}"
        );
    }
    let err = m.may_send("ops", "todo.create\0", 1).expect_err("NUL");
    assert_eq!(
        err.to_string(),
        "\"todo.create\\0\" is not a valid message name: name \"todo.create\\0\" has the \
         character '\\0' at byte 11; names use only a-z, 0-9, '.', '_' and '-'"
    );
    let long = "a".repeat(NAME_LEN_OVER);
    assert!(m.may_send("ops", &long, 1).is_err());
}

const NAME_LEN_OVER: usize = courier_proto::NAME_BYTES_MAX + 1;

#[test]
fn service_names_are_compared_exactly() {
    let m = todo_manifest();
    for spoof in [
        "web ",
        " web",
        "WEB",
        "Web",
        "web\0",
        "w\u{0435}b",
        "web.x",
        "",
        "admin",
    ] {
        assert!(
            matches!(
                m.may_send(spoof, "todo.create", 1),
                Err(Denial::UnknownService { .. })
            ),
            "{spoof:?}"
        );
        assert!(
            m.allowed_receive_patterns(spoof, ">").is_empty(),
            "{spoof:?}"
        );
    }
}

#[test]
fn subscriptions_are_cut_to_what_is_allowed() {
    let m = todo_manifest();
    assert_eq!(m.allowed_receive_patterns("web", ">"), ["todo.created"]);
    assert_eq!(
        m.allowed_receive_patterns("web", "todo.*"),
        ["todo.created"]
    );
    assert_eq!(
        m.allowed_receive_patterns("web", "todo.created"),
        ["todo.created"]
    );
    assert!(m.allowed_receive_patterns("web", "todo.create").is_empty());
    assert!(m.allowed_receive_patterns("web", "todos.>").is_empty());
    assert!(m
        .allowed_receive_patterns("web", "todo.created.>")
        .is_empty());
    assert_eq!(
        m.allowed_receive_patterns("todo", "*.*"),
        ["todo.create", "todos.list"]
    );
    // Invalid patterns get nothing, even when a receives rule is `>`.
    let open = Manifest::parse("[services.ops]\nreceives = [\">\"]\n").expect("valid");
    for bad in [
        "todo. *",
        "todo.*\0",
        "todo.>.x",
        "t\u{043e}do.*",
        "",
        "todo*",
    ] {
        assert!(
            open.allowed_receive_patterns("ops", bad).is_empty(),
            "{bad:?}"
        );
        assert!(matches!(
            open.cut_subscription("ops", bad),
            Err(Denial::InvalidPattern { .. })
        ));
    }
    assert_eq!(open.allowed_receive_patterns("ops", "todo.*"), ["todo.*"]);

    let err = m.cut_subscription("web", "user.>").expect_err("nothing");
    assert_eq!(
        err.to_string(),
        "service web may not receive any name matching user.>: its receives are \
         [\"todo.created@1\"]"
    );
}

#[test]
fn subscription_cut_keeps_majors_and_drops_covered_rules() {
    let m = Manifest::parse(
        "[services.a]\nreceives = [\"x.*@1\", \"x.y@1\", \"x.y@2\", \"x.>\", \"z.q\"]\n",
    )
    .expect("valid");
    // `x.>` (every major) covers every `x.…` rule; `z.q` is outside `x.*`.
    assert_eq!(m.cut_subscription("a", "x.*"), Ok(rules(&["x.*"])));
    assert_eq!(m.allowed_receive_patterns("a", "x.*"), ["x.*"]);
    let m = Manifest::parse("[services.a]\nreceives = [\"x.*@1\", \"x.y@1\", \"x.y@2\"]\n")
        .expect("valid");
    // x.y@1 is covered by x.*@1; x.y@2 is not (another major).
    assert_eq!(m.cut_subscription("a", ">"), Ok(rules(&["x.*@1", "x.y@2"])));
    assert_eq!(m.allowed_receive_patterns("a", ">"), ["x.*"]);
}

#[test]
fn authenticate_tokens() {
    let m = todo_manifest();
    assert_eq!(m.authenticate_token("crr_web"), Some(web()));
    assert_eq!(
        m.authenticate_token("crr_todo"),
        Some(Identity::Service("todo".into()))
    );
    assert_eq!(m.authenticate_token("crr_admin"), Some(Identity::Admin));
    for wrong in [
        "",
        "crr_web ",
        " crr_web",
        "crr_web\n",
        "crr_web\0",
        "CRR_WEB",
        "crr_we",
        "web",
        "admin",
        "sha256:",
    ] {
        assert_eq!(m.authenticate_token(wrong), None, "{wrong:?}");
    }
    // The hash itself is not the token.
    assert_eq!(m.authenticate_token(&hash_token("crr_web")), None);
    let hex = &hash_token("crr_web")[TOKEN_HASH_PREFIX.len()..];
    assert_eq!(m.authenticate_token(hex), None);
    // Over-long tokens are not even hashed.
    let long = "x".repeat(TOKEN_BYTES_MAX + 1);
    assert_eq!(m.authenticate_token(&long), None);
}

#[test]
fn authenticate_certificates_exactly() {
    let m = todo_manifest();
    assert_eq!(m.authenticate_certificate("CN=web"), Some(web()));
    for wrong in [
        "CN=web,O=evil",
        "O=evil,CN=web",
        "CN=web ",
        " CN=web",
        "cn=web",
        "CN=WEB",
        "CN=we",
        "CN=web\0",
        "CN=w\u{0435}b",
        "CN=todo",
        "",
        "web",
    ] {
        assert_eq!(m.authenticate_certificate(wrong), None, "{wrong:?}");
    }
    let m = Manifest::parse("[admin]\ncertificates = [\"CN=ops,O=acme\"]\n").expect("valid");
    assert_eq!(
        m.authenticate_certificate("CN=ops,O=acme"),
        Some(Identity::Admin)
    );
    assert_eq!(m.authenticate_certificate("CN=ops"), None);
}

// ------------------------------------------- subscription cut, by proptest

fn pattern_strategy() -> impl Strategy<Value = String> {
    let segment = prop_oneof![Just("a"), Just("b"), Just("*")];
    (prop::collection::vec(segment, 1..4), any::<bool>()).prop_map(|(segments, tail)| {
        let mut p = segments.join(".");
        if tail {
            p.push_str(".>");
        }
        p
    })
}

fn rule_strategy() -> impl Strategy<Value = String> {
    (pattern_strategy(), prop::option::of(1u16..3)).prop_map(|(p, major)| match major {
        Some(m) => format!("{p}@{m}"),
        None => p,
    })
}

/// Every name of 1 to 5 segments over {a, b, c} (`c` appears in no
/// pattern, so it stands for every other literal).
fn names_to_try() -> Vec<String> {
    let mut out = Vec::new();
    let mut layer = vec![String::new()];
    for _ in 0..5 {
        let mut next = Vec::new();
        for prefix in &layer {
            for s in ["a", "b", "c"] {
                let name = if prefix.is_empty() {
                    s.to_string()
                } else {
                    format!("{prefix}.{s}")
                };
                out.push(name.clone());
                next.push(name);
            }
        }
        layer = next;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A name matches some returned pattern iff it matches the requested
    /// pattern and one of the allowed ones; with versions, the cut rules
    /// admit exactly what `may_receive` and the request both admit.
    #[test]
    fn cut_is_exact(
        requested in pattern_strategy(),
        allowed in prop::collection::btree_set(rule_strategy(), 1..5),
    ) {
        let list: Vec<String> = allowed.iter().map(|r| format!("{r:?}")).collect();
        let text = format!("[services.s]\nreceives = [{}]\n", list.join(", "));
        let m = Manifest::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let allowed_rules = rules(&allowed.iter().map(String::as_str).collect::<Vec<_>>());
        let patterns = m.allowed_receive_patterns("s", &requested);
        let cut = m.cut_subscription("s", &requested).unwrap_or_default();
        for p in &patterns {
            prop_assert!(courier_proto::validate_pattern(p).is_ok());
        }
        for name in names_to_try() {
            let wanted = pattern_matches(&requested, &name);
            let expected = wanted && allowed_rules.iter().any(|r| pattern_matches(&r.pattern, &name));
            let got = patterns.iter().any(|p| pattern_matches(p, &name));
            prop_assert_eq!(got, expected, "{} within {:?} gave {:?}; name {}", requested, allowed, patterns, name);
            for major in 0..4u16 {
                let expected = wanted && m.may_receive("s", &name, major).is_ok();
                let got = cut.iter().any(|r| r.admits(&name, major));
                prop_assert_eq!(got, expected, "{} within {:?} gave {:?}; {}@{}", requested, allowed, cut, name, major);
            }
        }
        // Narrowest: no returned pattern covers another.
        for (i, a) in patterns.iter().enumerate() {
            for (j, b) in patterns.iter().enumerate() {
                prop_assert!(i == j || !pattern_covers(a, b), "{} covers {} in {:?}", a, b, patterns);
            }
        }
    }
}

// ------------------------------------------------------------------ check

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
            include_str!("../../../fuzz/corpus/manifest_parser/todo.toml"),
        ),
        (
            "wildcards",
            include_str!("../../../fuzz/corpus/manifest_parser/wildcards.toml"),
        ),
        (
            "inline",
            include_str!("../../../fuzz/corpus/manifest_parser/inline.toml"),
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
