//! Durable subscriptions as Server-Sent Events: deliveries, acks, nacks,
//! reconnects, commands answered through the gateway.

use super::*;

#[test]
fn a_published_event_arrives_as_an_sse_delivery_and_an_ack_removes_it() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(&http, "pattern=todo.*&service=notifier", &[]);
    let answer = post(
        &http,
        "/v1/messages/todo.created",
        &[
            ("Content-Type", "application/json"),
            ("Courier-Key", "user-1"),
        ],
        r#"{"text":"milk"}"#,
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = answer.json()["id"].as_str().expect("an id").to_string();

    let got = stream.delivery();
    assert_eq!(got.data["id"], id.as_str());
    assert_eq!(got.data["name"], "todo.created");
    assert_eq!(got.data["kind"], "event");
    assert_eq!(got.data["key"], "user-1");
    assert_eq!(got.data["attempt"], 1);
    assert_eq!(got.data["encoding"], "utf-8");
    assert_eq!(got.data["payload"], r#"{"text":"milk"}"#);
    assert_eq!(got.data["headers"]["content-type"], "application/json");
    let delivery = got.id.expect("an event id");
    let acked = ack(&http, &delivery, &[]);
    assert_eq!(acked.status, 204, "{}", acked.body);
    let again = ack(&http, &delivery, &[]);
    assert_eq!(again.status, 404, "{}", again.body);
    assert_eq!(
        again.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    stream.close();

    // A second connection of the service gets what came after, and not
    // the acked event.
    let mut second = Stream::subscribed(&http, "pattern=todo.*&service=notifier", &[]);
    let later = publish(&http, "todo.updated", r#"{"n":2}"#);
    let got = second.delivery();
    assert_eq!(got.data["id"], later.as_str(), "{got:?}");
}

#[test]
fn binary_payloads_come_as_base64() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(&http, "pattern=blob.*&service=store", &[]);
    let addr = addr_of(&http);
    let mut s = TcpStream::connect(addr).expect("connect");
    let body = [0xffu8, 0x00, 0x01];
    write!(
        s,
        "POST /v1/messages/blob.stored HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: 3\r\n\r\n"
    )
    .expect("write");
    s.write_all(&body).expect("write body");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.0 202"), "{answer}");
    let got = stream.delivery();
    assert_eq!(got.data["encoding"], "base64");
    assert_eq!(got.data["payload"], "/wAB");
}

#[test]
fn an_unacked_delivery_comes_back_after_a_reconnect_with_last_event_id() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let query = "pattern=todo.*&service=notifier";
    let mut first = Stream::subscribed(&http, query, &[]);
    let a = publish(&http, "todo.created", r#"{"n":1}"#);
    let b = publish(&http, "todo.created", r#"{"n":2}"#);
    let got_a = first.delivery();
    let got_b = first.delivery();
    assert_eq!(got_a.data["id"], a.as_str());
    assert_eq!(got_b.data["id"], b.as_str());
    let acked = ack(&http, got_a.id.as_deref().expect("id"), &[]);
    assert_eq!(acked.status, 204, "{}", acked.body);
    let last = got_b.id.expect("id");
    first.close();

    let mut second = Stream::subscribed(&http, query, &[("Last-Event-ID", &last)]);
    let again = second.delivery();
    assert_eq!(again.data["id"], b.as_str(), "{again:?}");
    assert_eq!(again.data["attempt"], 2);
    let c = publish(&http, "todo.created", r#"{"n":3}"#);
    let next = second.delivery();
    // Not the acked one.
    assert_eq!(next.data["id"], c.as_str(), "{next:?}");
}

#[test]
fn max_in_flight_holds_back_deliveries_until_acked_and_a_nack_redelivers() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(
        &http,
        "pattern=todo.*&service=notifier&max_in_flight=1",
        &[],
    );
    let ids: Vec<String> = (0..3)
        .map(|n| publish(&http, "todo.created", &format!(r#"{{"n":{n}}}"#)))
        .collect();
    let first = stream.delivery();
    assert_eq!(first.data["id"], ids[0].as_str());
    assert!(
        stream.quiet_for(Duration::from_millis(700)),
        "a second delivery came while the first was unacked"
    );
    let nacked = post(
        &http,
        &format!("/v1/nacks/{}?delay=10ms", first.id.as_deref().expect("id")),
        &[],
        "",
    );
    assert_eq!(nacked.status, 204, "{}", nacked.body);
    // One at a time still: each comes after the one before was acked;
    // the nacked one again, with its attempt counted.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = stream.delivery();
        seen.push((
            got.data["id"].as_str().unwrap_or("").to_string(),
            got.data["attempt"].as_u64().unwrap_or(0),
        ));
        assert!(
            stream.quiet_for(Duration::from_millis(200)),
            "more than one delivery in flight: {seen:?}"
        );
        assert_eq!(ack(&http, got.id.as_deref().expect("id"), &[]).status, 204);
    }
    seen.sort();
    let mut expected = vec![
        (ids[0].clone(), 2),
        (ids[1].clone(), 1),
        (ids[2].clone(), 1),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    let bad = post(&http, "/v1/nacks/whatever?delay=soon", &[], "");
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[test]
fn with_auto_ack_a_delivery_is_acked_as_it_is_sent() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let query = "pattern=todo.*&service=notifier&ack=auto&max_in_flight=1";
    let mut stream = Stream::subscribed(&http, query, &[]);
    let a = publish(&http, "todo.created", r#"{"n":1}"#);
    let b = publish(&http, "todo.created", r#"{"n":2}"#);
    let got_a = stream.delivery();
    // With max_in_flight=1, b comes only because a was acked.
    let got_b = stream.delivery();
    assert_eq!(got_a.data["id"], a.as_str());
    assert_eq!(got_b.data["id"], b.as_str());
    let settled = ack(&http, got_a.id.as_deref().expect("id"), &[]);
    assert_eq!(settled.status, 404, "{}", settled.body);
    stream.close();
    let mut again = Stream::subscribed(&http, query, &[]);
    let c = publish(&http, "todo.created", r#"{"n":3}"#);
    assert_eq!(again.delivery().data["id"], c.as_str());
}

#[test]
fn bad_subscribe_queries_are_refused_with_the_fix() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    for (query, needle) in [
        ("service=notifier", "?pattern="),
        ("pattern=todo.*", "?service="),
        (
            "pattern=todo.*&service=notifier&max_in_flight=0",
            "max_in_flight",
        ),
        ("pattern=todo.*&service=notifier&ack=sometimes", "?ack="),
        ("pattern=Todo..*&service=notifier", "empty segment"),
    ] {
        let refused = match Stream::open(&http, query, &[]) {
            Ok(_) => panic!("{query} was taken"),
            Err(refused) => refused,
        };
        assert_eq!(refused.status, 400, "{query}: {}", refused.body);
        assert_eq!(
            refused.header("content-type").as_deref(),
            Some("application/problem+json")
        );
        let detail = refused.json()["detail"].as_str().unwrap_or("").to_string();
        assert!(detail.contains(needle), "{query}: {detail}");
    }
}

#[test]
fn under_a_manifest_subscribing_takes_the_service_token_and_its_rules() {
    let dir = common::tempdir::Dir::new("gateway-subscribe-manifest");
    let (broker, web, notifier) = manifest_broker(&dir);
    let http = broker.http.clone().expect("an HTTP port");
    let notifier_auth = format!("Bearer {notifier}");
    let web_auth = format!("Bearer {web}");
    let refusals = [
        (Vec::new(), "pattern=todo.*", 401),
        (
            vec![("Authorization", "Bearer nope")],
            "pattern=todo.*",
            401,
        ),
        (
            vec![("Authorization", notifier_auth.as_str())],
            "pattern=todo.*&service=web",
            403,
        ),
        // The manifest lets notifier receive todo.created only.
        (
            vec![("Authorization", notifier_auth.as_str())],
            "pattern=billing.*",
            403,
        ),
    ];
    for (headers, query, status) in refusals {
        let refused = match Stream::open(&http, query, &headers) {
            Ok(_) => panic!("{query} with {headers:?} was taken"),
            Err(refused) => refused,
        };
        assert_eq!(refused.status, status, "{query}: {}", refused.body);
        assert_eq!(
            refused.header("content-type").as_deref(),
            Some("application/problem+json"),
            "{query}"
        );
        assert!(refused.json()["detail"].is_string());
    }

    let auth = [("Authorization", notifier_auth.as_str())];
    let mut stream = Stream::subscribed(&http, "pattern=todo.*&service=notifier", &auth);
    let sent = post(
        &http,
        "/v1/messages/todo.created",
        &[("Authorization", &web_auth)],
        "{}",
    );
    assert_eq!(sent.status, 202, "{}", sent.body);
    let got = stream.delivery();
    assert_eq!(got.data["sender"], "web");
    let delivery = got.id.expect("id");
    // Only the subscriber's own token settles its deliveries.
    let foreign = ack(&http, &delivery, &[("Authorization", &web_auth)]);
    assert_eq!(foreign.status, 404, "{}", foreign.body);
    let own = ack(&http, &delivery, &auth);
    assert_eq!(own.status, 204, "{}", own.body);
}

#[test]
fn a_stream_that_goes_away_leaves_its_unacked_deliveries_to_the_next() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let query = "pattern=todo.*&service=notifier";
    let mut first = Stream::subscribed(&http, query, &[]);
    let a = publish(&http, "todo.created", "{}");
    assert_eq!(first.delivery().data["id"], a.as_str());
    first.close();
    // No Last-Event-ID: the gateway notices the closed stream by itself.
    let mut second = Stream::subscribed(&http, query, &[]);
    let again = second.delivery();
    assert_eq!(again.data["id"], a.as_str());
    assert_eq!(again.data["attempt"], 2);
}

#[test]
fn transient_events_arrive_with_nothing_to_settle() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(&http, "pattern=sensor.*&service=dashboard", &[]);
    let sent = post(
        &http,
        "/v1/messages/sensor.measured",
        &[("Courier-Transient", "true")],
        "21.5",
    );
    assert_eq!(sent.status, 202, "{}", sent.body);
    let got = stream.delivery();
    assert_eq!(got.data["transient"], true);
    assert_eq!(got.data["payload"], "21.5");
    let settled = ack(&http, got.id.as_deref().expect("id"), &[]);
    assert_eq!(settled.status, 404, "{}", settled.body);
}

/// `POST /v1/requests/{name}` on a thread of its own (it waits for the
/// reply), with the answer sent back when it comes.

#[test]
fn a_command_delivered_over_sse_is_answered_through_the_gateway() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let mut stream = Stream::subscribed(&http, "pattern=todo.create&service=todo", &[]);
    let answer = request_in_background(
        &http,
        "todo.create",
        &[("Content-Type", "application/json")],
        r#"{"text":"milk"}"#,
    );
    let got = stream.delivery();
    assert_eq!(got.data["kind"], "command");
    assert_eq!(got.data["payload"], r#"{"text":"milk"}"#);
    let delivery = got.id.expect("a delivery id");

    let unnamed = reply(&http, &delivery, &[], "{}");
    assert_eq!(unnamed.status, 400, "{}", unnamed.body);
    assert!(unnamed.body.contains("Courier-Outcome"), "{}", unnamed.body);
    // Nacked, it comes again, answered by its new delivery id only.
    let nacked = post(&http, &format!("/v1/nacks/{delivery}"), &[], "");
    assert_eq!(nacked.status, 204, "{}", nacked.body);
    let again = stream.delivery();
    assert_eq!(again.data["attempt"], 2);
    let stale = reply(
        &http,
        &delivery,
        &[("Courier-Outcome", "todo.created")],
        "{}",
    );
    assert_eq!(stale.status, 404, "{}", stale.body);
    let delivery = again.id.expect("a delivery id");
    let replied = reply(
        &http,
        &delivery,
        &[
            ("Courier-Outcome", "todo.created"),
            ("Content-Type", "application/json"),
        ],
        r#"{"id":7}"#,
    );
    assert_eq!(replied.status, 202, "{}", replied.body);
    let reply_id = replied.json()["id"].as_str().expect("an id").to_string();

    let answer = answer.recv_timeout(T).expect("the request's answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, r#"{"id":7}"#);
    assert_eq!(
        answer.header("courier-outcome").as_deref(),
        Some("todo.created")
    );
    assert_eq!(answer.header("courier-sender").as_deref(), Some("todo"));
    assert_eq!(
        answer.header("courier-id").as_deref(),
        Some(reply_id.as_str())
    );
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/json")
    );
    // The final reply acked the delivery, and ended what may be answered.
    let acked = ack(&http, &delivery, &[]);
    assert_eq!(acked.status, 404, "{}", acked.body);
    let again = reply(
        &http,
        &delivery,
        &[("Courier-Outcome", "todo.created")],
        "{}",
    );
    assert_eq!(again.status, 404, "{}", again.body);
    // An event is acked, never answered.
    let mut events = Stream::subscribed(&http, "pattern=todo.created&service=audit", &[]);
    publish(&http, "todo.created", "{}");
    let got = events.delivery();
    let not_a_command = reply(
        &http,
        got.id.as_deref().expect("id"),
        &[("Courier-Outcome", "todo.seen")],
        "{}",
    );
    assert_eq!(not_a_command.status, 404, "{}", not_a_command.body);
}

#[test]
fn a_stream_of_replies_over_sse_reaches_the_requester_as_ndjson() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    // With ?ack=auto the delivery is settled as it is sent, and still
    // answerable while the stream lasts.
    let mut stream =
        Stream::subscribed(&http, "pattern=report.build&service=reports&ack=auto", &[]);
    let answer = request_in_background(&http, "report.build", &[], "{}");
    let delivery = stream.delivery().id.expect("a delivery id");
    for (n, outcome, is_final) in [
        (1, "report.progressed", "false"),
        (2, "report.progressed", "false"),
        (3, "report.built", "true"),
    ] {
        let replied = reply(
            &http,
            &delivery,
            &[
                ("Courier-Outcome", outcome),
                ("Courier-Final", is_final),
                ("Content-Type", "application/json"),
            ],
            &format!(r#"{{"n":{n}}}"#),
        );
        assert_eq!(replied.status, 202, "{}", replied.body);
    }
    let answer = answer.recv_timeout(T).expect("the request's answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    let lines: Vec<serde_json::Value> = answer
        .body
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let seen: Vec<(String, bool, serde_json::Value)> = lines
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or("").to_string(),
                l["final"].as_bool().unwrap_or(true),
                l["payload"]["n"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("report.progressed".into(), false, 1.into()),
            ("report.progressed".into(), false, 2.into()),
            ("report.built".into(), true, 3.into()),
        ]
    );
    let bad = reply(
        &http,
        &delivery,
        &[
            ("Courier-Outcome", "report.built"),
            ("Courier-Final", "maybe"),
        ],
        "",
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
}
