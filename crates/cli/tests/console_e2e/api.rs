//! The JSON API over plain HTTP, its errors, and `courier pause`/`resume`.

use super::*;

#[test]
fn the_api_reports_services_names_and_topology_of_real_traffic() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("the HTTP port is on");
    let responder = broker.spawn(&[
        "reply",
        "todo.create",
        "--service",
        "todo",
        "--outcome",
        "todo.created",
        "--echo",
    ]);
    responder.wait_stderr("replying to todo.create", T);
    let _web = Requester::start(&broker);
    let names = wait_json(&http, "/v1/names", "three replies counted", |v| {
        v["names"].as_array().is_some_and(|names| {
            names.iter().any(|n| {
                n["name"] == "todo.create" && n["reply_latency"]["count"].as_u64().unwrap_or(0) >= 3
            })
        })
    });
    let create = names["names"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "todo.create"))
        .expect("todo.create");
    assert!(create["totals"]["sent"].as_u64() >= Some(3), "{create}");
    assert_eq!(create["outcomes"][0]["outcome"], "todo.created");
    let p50 = create["reply_latency"]["p50"].as_f64().expect("p50");
    let p99 = create["reply_latency"]["p99"].as_f64().expect("p99");
    assert!(0.0 < p50 && p50 <= p99 && p99 < 30.0, "{create}");

    let services = get_json(&http, "/v1/services");
    let todo = service(&services, "todo").expect("todo is listed");
    assert_eq!(
        todo["patterns"],
        json!([{"pattern": "todo.create", "paused": false}])
    );
    let instance = &todo["instances"][0];
    assert!(
        instance["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{instance}"
    );
    assert!(instance["connected_at"].as_u64().is_some_and(|t| t > 0));
    assert_eq!(instance["consumes"], json!(["todo.create"]));
    let web = service(&services, "web").expect("the requester is listed");
    assert_eq!(web["instances"].as_array().map(Vec::len), Some(1), "{web}");
    assert_eq!(web["instances"][0]["consumes"], json!([]));

    let topology = get_json(&http, "/v1/topology");
    let edges = topology["edges"].as_array().expect("edges");
    let edge = |from: &str, to: &str, name: &str| {
        edges
            .iter()
            .find(|e| e["from"] == from && e["to"] == to && e["name"] == name)
    };
    assert!(
        edge("web", "todo", "todo.create").is_some_and(|e| e["count"].as_u64() >= Some(3)),
        "{topology}"
    );
    assert!(edge("todo", "web", "todo.created").is_some(), "{topology}");
    assert_eq!(topology["services"], json!(["todo", "web"]));
}

#[test]
fn every_api_error_is_a_problem_document() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    assert_problem(
        call(&http, "GET", "/v1/no-such-thing", &[], ""),
        404,
        "no endpoint /v1/no-such-thing",
    );
    assert_problem(
        call(&http, "GET", "/v1/dead-letters/nobody", &[], ""),
        404,
        "knows no service nobody",
    );
    assert_problem(
        call(
            &http,
            "GET",
            "/v1/dead-letters/nobody/not-a-number",
            &[],
            "",
        ),
        400,
        "is not a dead letter id",
    );
    assert_problem(
        call(&http, "DELETE", "/v1/services", &[], ""),
        405,
        "answers GET",
    );
    let json_header = [("Content-Type", "application/json")];
    assert_problem(
        call(&http, "POST", "/v1/subscriptions/audit/pause", &[], "{}"),
        415,
        "Content-Type: application/json",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &[
                ("Content-Type", "application/json"),
                ("Origin", "http://elsewhere.example"),
            ],
            "{}",
        ),
        403,
        "console's own page",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &json_header,
            "{\"pattern\": 7}",
        ),
        400,
        "\"pattern\" is a string",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &json_header,
            "{not json",
        ),
        400,
        "not JSON",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/pause",
            &json_header,
            "{}",
        ),
        404,
        "service audit has no subscriptions",
    );
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/subscriptions/audit/resume",
            &json_header,
            r#"{"pattern": "user.*"}"#,
        ),
        404,
        "its subscriptions: audit.*",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/dead-letters/audit/9/replay",
            &json_header,
            "{}",
        ),
        404,
        "has no dead letter 9",
    );
    // The page and its files are served, with a policy that loads nothing
    // from elsewhere.
    let (status, content_type, page) = call(&http, "GET", "/", &[], "");
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/html; charset=utf-8")
    );
    assert!(page.contains("/assets/app.js"), "{page}");
    for asset in ["app.js", "api.js", "charts.js", "console.css", "icon.svg"] {
        assert_eq!(
            call(&http, "GET", &format!("/assets/{asset}"), &[], "").0,
            200,
            "{asset}"
        );
    }
    assert!(!page.contains("http://") && !page.contains("https://"));
}

#[test]
fn under_a_manifest_the_api_needs_an_admin_token_and_the_page_does_not() {
    let dir = common::tempdir::Dir::new("console-manifest");
    let manifest = dir.path().join("courier.toml");
    std::fs::write(
        &manifest,
        format!(
            "[services.web]\nsends = [\"todo.create\"]\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            courier_manifest::hash_token("crr_web_secret"),
            courier_manifest::hash_token("crr_admin_secret")
        ),
    )
    .expect("write manifest");
    let broker = Broker::start_with(&["--manifest", manifest.to_str().expect("utf-8 path")]);
    let http = broker.http.clone().expect("http");
    assert_eq!(call(&http, "GET", "/", &[], "").0, 200);
    assert_eq!(call(&http, "GET", "/assets/app.js", &[], "").0, 200);
    assert_problem(
        call(&http, "GET", "/v1/services", &[], ""),
        401,
        "Authorization: Bearer",
    );
    assert_problem(
        call(
            &http,
            "POST",
            "/v1/dead-letters/web/purge",
            &[("Content-Type", "application/json")],
            "{}",
        ),
        401,
        "Authorization: Bearer",
    );
    assert_problem(
        call(
            &http,
            "GET",
            "/v1/names",
            &[("Authorization", "Bearer crr_web_secret")],
            "",
        ),
        403,
        "belongs to service web",
    );
    let (status, _, body) = call(
        &http,
        "GET",
        "/v1/topology",
        &[("Authorization", "Bearer crr_admin_secret")],
        "",
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn courier_pause_holds_a_subscription_across_a_restart_and_resume_lets_it_go() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let out = broker.run(&["pause", "audit.*", "--service", "audit"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        common::json_lines(&out),
        vec![json!({"service": "audit", "patterns": ["audit.*"], "paused": ["audit.*"]})]
    );
    let out = broker.run(&[
        "publish",
        "audit.seen",
        "--service",
        "web",
        "--count",
        "3",
        "--data",
        "{\"n\":{seq}}",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let metrics = common::json_lines(&broker.run(&["services"]));
    let audit = metrics
        .iter()
        .find(|s| s["name"] == "audit")
        .expect("audit listed");
    assert_eq!(audit["paused"], json!(["audit.*"]));
    assert_eq!(audit["backlog"], 3);
    let (_, _, text) = call(&http, "GET", "/metrics", &[], "");
    assert!(
        text.contains(r#"courier_subscription_paused{service="audit",pattern="audit.*"} 1"#),
        "{text}"
    );

    // Paused still after a crash: a consumer gets nothing.
    let broker = broker.crash_and_restart();
    let http = broker.http.clone().expect("http");
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--idle-timeout",
        "300ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(
        common::json_lines(&out).is_empty(),
        "nothing delivered while paused"
    );
    let services = get_json(&http, "/v1/services");
    let audit = service(&services, "audit").expect("audit");
    assert_eq!(
        audit["patterns"],
        json!([{"pattern": "audit.*", "paused": true}])
    );
    assert_eq!(audit["backlog"], 3);

    let out = broker.run(&["resume", "--service", "audit"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(common::json_lines(&out)[0]["paused"], json!([]));
    let got = common::json_lines(&broker.run(&[
        "subscribe",
        "audit.*",
        "--service",
        "audit",
        "--count",
        "3",
        "--idle-timeout",
        "10s",
    ]));
    let ns: Vec<&Value> = got.iter().map(|m| &m["payload"]["n"]).collect();
    assert_eq!(
        ns,
        [&json!(0), &json!(1), &json!(2)],
        "delivered in order after resume"
    );
    let out = broker.run(&["pause", "nothing.*", "--service", "audit"]);
    assert_eq!(out.status.code(), Some(4), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("not subscribed to nothing.*"),
        "{}",
        common::stderr(&out)
    );
}
