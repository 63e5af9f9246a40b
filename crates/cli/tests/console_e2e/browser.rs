//! The page in headless Chromium, clicked as a person would.

use super::*;

#[test]
fn screenshots_decode_from_base64() {
    assert_eq!(base64_decode("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
    assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
    assert_eq!(base64_decode("YWJj").as_deref(), Some(&b"abc"[..]));
    assert_eq!(base64_decode("!!"), None);
}

fn open_console(browser: &Browser, http: &str, view: &str) {
    browser.goto(http);
    browser.wait_text("#status", "Updated", T);
    browser.click_css(&format!("a[data-view-link='{view}']"), T);
    browser.wait_for(&format!("the {view} view"), T, |b| {
        let shown = b
            .script(
                "return !document.querySelector(arguments[0]).hidden",
                json!([format!("[data-view='{view}']")]),
            )
            .ok()?;
        shown.as_bool().filter(|s| *s)
    });
}

#[test]
fn the_console_shows_services_instances_topology_and_rates_of_real_traffic() {
    let _one = one_browser();
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
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
    let out = broker.run(&[
        "subscribe",
        "todo.requested",
        "--service",
        "audit",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let _audit = broker.spawn(&["subscribe", "todo.requested", "--service", "audit"]);
    let _web = Requester::start(&broker);
    let browser = Browser::start();

    open_console(&browser, &http, "services");
    let todo = browser.wait_text("[data-test=service][data-service=todo]", "todo.create", T);
    assert!(
        todo.contains("127.0.0.1:"),
        "the instance's address: {todo}"
    );
    browser.wait_text(
        "[data-test=service][data-service=web] [data-test=instance]",
        "127.0.0.1:",
        T,
    );
    browser.screenshot("services");

    browser.click_css("a[data-view-link=topology]", T);
    browser.wait_for("the edge web → todo", T, |b| {
        b.find_all("[data-test=edge][data-from=web][data-to=todo]")
            .into_iter()
            .next()
    });
    browser.wait_for("todo.create flowing at a rate above zero", T, |b| {
        let row = b
            .visible_text("[data-test=flow][data-from=web][data-to=todo][data-name='todo.create']");
        (row.contains("/s") && !row.contains(" 0/s")).then_some(row)
    });
    browser.wait_for("the edge label names todo.create", T, |b| {
        let named = b
            .script(
                "return [...document.querySelectorAll('[data-test=edge-label][data-from=web][data-to=todo] text')].map(t => t.textContent).join('|')",
                json!([]),
            )
            .ok()?;
        named.as_str().filter(|t| t.contains("todo.create")).map(str::to_string)
    });
    browser.screenshot("topology");

    browser.click_css("a[data-view-link=names]", T);
    let row = browser.wait_text(
        "[data-test=name-row][data-name='todo.create']",
        "todo.created",
        T,
    );
    assert!(
        row.contains("ms") || row.contains("µs"),
        "latency shown: {row}"
    );
    browser.wait_for("a send rate above zero", T, |b| {
        let rate =
            b.visible_text("[data-test=name-row][data-name='todo.create'] [data-test=sent-rate]");
        (rate.ends_with("/s") && rate != "0/s").then_some(rate)
    });
    browser.screenshot("names");

    // The tail and the traces: live on a broker that serves them, a clear
    // notice on one that does not.
    browser.click_css("a[data-view-link=tail]", T);
    browser.click_css("[data-test=tail-start]", T);
    let tail = browser.wait_for("the tail's lines or its notice", T, |b| {
        let state = b
            .script(
                "return document.getElementById('tail-state').dataset.state || ''",
                json!([]),
            )
            .ok()?;
        match state.as_str()? {
            "unavailable" => Some(b.visible_text("[data-test=tail-state]")),
            _ => b
                .find_all("[data-test=tail-line][data-name='todo.create']")
                .first()
                .map(|_| "live".to_string()),
        }
    });
    assert_eq!(tail, "live", "the tail shows the traffic");
    browser.screenshot("tail");
    browser.click_css("a[data-view-link=traces]", T);
    let name_field = browser
        .find_all("#trace-form input[name=name]")
        .into_iter()
        .next()
        .expect("the trace search's name field");
    browser
        .type_into(&name_field, "todo.create")
        .expect("type the name");
    browser.click_css("[data-test=trace-search]", T);
    let traces = browser.wait_for("the traces' list or their notice", T, |b| {
        let state = b
            .script(
                "return document.getElementById('trace-state').dataset.state || ''",
                json!([]),
            )
            .ok()?;
        if state.as_str()? == "unavailable" {
            return Some(b.visible_text("[data-test=trace-state]"));
        }
        b.find_all("[data-test=trace]")
            .first()
            .map(|_| "listed".to_string())
    });
    assert_eq!(traces, "listed", "the traffic's activities are listed");
    browser.click_css("[data-test=trace]", T);
    browser.wait_for("an activity's timeline with its message", T, |b| {
        b.find_all("[data-test=trace-timeline] [data-test=trace-node][data-name='todo.create']")
            .into_iter()
            .next()
    });
    browser.screenshot("traces");
    eprintln!("screenshots in {}", screenshot_dir().display());
}

#[test]
fn a_dead_letter_is_inspected_and_replayed_from_the_console_and_delivered() {
    let _one = one_browser();
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    // A mailer that fails every delivery; after two it is a dead letter.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut opts = ClientOptions::new(broker.addr.clone(), "mailer");
        opts.max_deliveries = Some(2);
        opts.nack_delay = Duration::ZERO;
        let failing = Client::connect(opts).await.expect("mailer connects");
        failing
            .on("mail.send", |_msg| async {
                Err::<(), std::io::Error>(std::io::Error::other("the mail server is down"))
            })
            .await
            .expect("subscribe");
        let out = broker.run(&["send", "mail.send", "--data", r#"{"to":"ada@example.com"}"#]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        wait_json(&http, "/v1/services", "a dead letter", |v| {
            service(v, "mailer").is_some_and(|m| m["dead_letters"] == 1)
        });
        failing.shutdown().await;
    });

    let browser = Browser::start();
    open_console(&browser, &http, "dead-letters");
    browser.click_css("[data-test=dead-letter-service][data-service=mailer]", T);
    let row = browser.wait_text("[data-test=dead-letter]", "mail.send", T);
    assert!(row.contains("nacked on attempt 2 of 2"), "{row}");
    browser.click_css("[data-test=dead-letter] [data-test=inspect]", T);
    browser.wait_text("[data-test=dead-letter-payload]", "ada@example.com", T);
    browser.screenshot("dead-letter");

    // A healthy mailer is waiting; replay hands it the message.
    let consumer = broker.spawn(&[
        "subscribe",
        "mail.send",
        "--service",
        "mailer",
        "--count",
        "1",
    ]);
    browser.click_css("[data-test=dead-letter] [data-test=replay]", T);
    let delivered = consumer.json_line(T);
    assert_eq!(delivered["payload"]["to"], "ada@example.com");
    browser.wait_text(
        "[data-test=dead-letter-detail]",
        "back in mailer's queue",
        T,
    );
    browser.wait_text("[data-test=dead-letter-services]", "No dead letters", T);
    browser.screenshot("dead-letter-replayed");
    let services = get_json(&http, "/v1/services");
    assert_eq!(
        service(&services, "mailer").expect("mailer")["dead_letters"],
        0
    );
}

#[test]
fn a_subscription_paused_with_a_click_backs_up_and_drains_when_resumed() {
    let _one = one_browser();
    let broker = Broker::start();
    let http = broker.http.clone().expect("http");
    let consumer = broker.spawn(&["subscribe", "audit.*", "--service", "audit"]);
    // Live once a first event comes through.
    let deadline = std::time::Instant::now() + T;
    loop {
        let out = broker.run(&["publish", "audit.ready", "--service", "web"]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        if !consumer.no_line(Duration::from_millis(300)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer never got an event"
        );
    }
    while !consumer.no_line(Duration::from_millis(200)) {}

    let browser = Browser::start();
    open_console(&browser, &http, "subscriptions");
    browser.click_css(
        "[data-test=subscription][data-service=audit] [data-test=pause][data-pattern='audit.*']",
        T,
    );
    browser.wait_text(
        "[data-test=subscription][data-service=audit] [data-test=pattern][data-pattern='audit.*']",
        "paused",
        T,
    );
    let out = broker.run(&["publish", "audit.seen", "--service", "web", "--count", "5"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    browser.wait_for("a backlog of 5 on the page", T, |b| {
        let backlog =
            b.visible_text("[data-test=subscription][data-service=audit] [data-test=backlog]");
        (backlog == "5").then_some(())
    });
    let services = get_json(&http, "/v1/services");
    let audit = service(&services, "audit").expect("audit");
    assert_eq!(
        (audit["backlog"].as_u64(), audit["in_flight"].as_u64()),
        (Some(5), Some(0))
    );
    assert!(
        consumer.no_line(Duration::from_millis(300)),
        "nothing delivered while paused"
    );
    browser.screenshot("subscription-paused");

    browser.click_css(
        "[data-test=subscription][data-service=audit] [data-test=resume][data-pattern='audit.*']",
        T,
    );
    for _ in 0..5 {
        assert_eq!(consumer.json_line(T)["name"], "audit.seen");
    }
    browser.wait_for("the backlog drained on the page", T, |b| {
        let backlog =
            b.visible_text("[data-test=subscription][data-service=audit] [data-test=backlog]");
        (backlog == "0").then_some(())
    });
    browser.wait_text(
        "[data-test=subscription][data-service=audit] [data-test=pattern][data-pattern='audit.*']",
        "active",
        T,
    );
    browser.screenshot("subscription-resumed");
}

#[test]
fn the_page_asks_for_an_admin_token_and_keeps_it_for_the_tab() {
    let _one = one_browser();
    let dir = common::tempdir::Dir::new("console-token");
    let manifest = dir.path().join("courier.toml");
    std::fs::write(
        &manifest,
        format!(
            "[services.audit]\nreceives = [\"audit.*\"]\ntokens = [\"{}\"]\n\n[admin]\ntokens = [\"{}\"]\n",
            courier_manifest::hash_token("crr_audit_secret"),
            courier_manifest::hash_token("crr_admin_secret")
        ),
    )
    .expect("write manifest");
    let broker = Broker::start_with(&["--manifest", manifest.to_str().expect("utf-8 path")]);
    let http = broker.http.clone().expect("http");
    let out = broker.run(&[
        "subscribe",
        "audit.*",
        "--token",
        "crr_audit_secret",
        "--idle-timeout",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let browser = Browser::start();
    browser.goto(&http);
    let input = browser.wait_for("the token dialog", T, |b| {
        let open = b
            .script(
                "return document.getElementById('token-dialog').open",
                json!([]),
            )
            .ok()?;
        open.as_bool()
            .filter(|o| *o)
            .and_then(|_| b.find_all("#token-input").into_iter().next())
    });
    browser.screenshot("token-dialog");
    browser
        .type_into(&input, "crr_admin_secret")
        .expect("type the token");
    browser.click_css("[data-test=token-save]", T);
    browser.wait_text("[data-test=service][data-service=audit]", "audit.*", T);
    // Kept for the tab: a reload asks no more.
    browser.goto(&http);
    browser.wait_text("[data-test=service][data-service=audit]", "audit.*", T);
    let open = browser
        .script(
            "return document.getElementById('token-dialog').open",
            json!([]),
        )
        .expect("script");
    assert_eq!(open, json!(false));
}
