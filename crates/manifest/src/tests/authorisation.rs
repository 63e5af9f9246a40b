//! The authorisation queries, including bypass attempts, and
//! authentication by token and certificate.

use super::*;

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
