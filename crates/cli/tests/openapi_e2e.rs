//! The HTTP port's OpenAPI document against a real `courier serve`: every
//! documented operation is called, and each real answer's status, content
//! type, `Courier-*` headers and JSON body are checked against what the
//! document says of it.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Broker;
use courier_client::{Client, ClientOptions};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 exchange. A `text/event-stream` answer never ends, so
/// only its head is read.
fn call(http: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let addr = http.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP port");
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = s.read(&mut buf).expect("read answer");
        assert!(n > 0, "the answer ended inside its head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut answer = Answer {
        status,
        headers,
        body: raw[head_end + 4..].to_vec(),
    };
    if answer
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"))
    {
        answer.body.clear();
        return answer;
    }
    s.read_to_end(&mut answer.body).expect("read body");
    if answer.header("transfer-encoding") == Some("chunked") {
        answer.body = dechunk(&answer.body);
    }
    answer
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(
            std::str::from_utf8(&rest[..line_end])
                .expect("ascii")
                .trim(),
            16,
        )
        .expect("hex chunk size");
        if size == 0 {
            return out;
        }
        let data = &rest[line_end + 2..];
        out.extend_from_slice(&data[..size]);
        rest = &data[size + 2..];
    }
}

/// A document's operation whose path template matches `path`.
fn template_of<'a>(doc: &'a Value, method: &str, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    let mut found: Vec<&str> = doc["paths"]
        .as_object()?
        .iter()
        .filter(|(_, item)| item.get(method).is_some())
        .map(|(template, _)| template.as_str())
        .filter(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(&segments)
                    .all(|(p, s)| p == s || (p.starts_with('{') && p.ends_with('}')))
        })
        .collect();
    // The most literal template wins (/v1/dead-letters/x/purge over /{id}).
    found.sort_by_key(|t| t.matches('{').count());
    found.first().copied()
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            resolve(doc, doc.pointer(pointer).expect("a $ref that resolves"))
        }
        None => schema,
    }
}

/// A JSON Schema check of the keywords the document uses: type, required,
/// properties, items, oneOf/anyOf/allOf, minimum/maximum, format uuid.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            other => return Err(format!("{at}: a type of {other}")),
        };
        let fits = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !fits {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                return Err(format!("{at}: {n} < minimum {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                return Err(format!("{at}: {n} > maximum {max}"));
            }
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("uuid") {
        if let Some(text) = value.as_str() {
            uuid::Uuid::parse_str(text).map_err(|e| format!("{at}: {text:?} is no UUID: {e}"))?;
        }
    }
    if let Some(object) = value.as_object() {
        for key in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(key) {
                return Err(format!("{at}: required {key:?} is missing from {value}"));
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (key, property) in properties {
                if let Some(v) = object.get(key) {
                    validate(doc, property, v, &format!("{at}.{key}"))?;
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            validate(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    for all in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        validate(doc, all, value, at)?;
    }
    for keyword in ["oneOf", "anyOf"] {
        if let Some(choices) = schema.get(keyword).and_then(Value::as_array) {
            let errors: Vec<String> = choices
                .iter()
                .filter_map(|c| validate(doc, c, value, at).err())
                .collect();
            if errors.len() == choices.len() {
                return Err(format!("{at}: fits none of {keyword}: {errors:?}"));
            }
        }
    }
    Ok(())
}

/// Checks one real answer against the document; returns the operation it
/// exercised and whether a JSON body was validated.
fn conforms(doc: &Value, method: &str, path: &str, answer: &Answer) -> (String, bool) {
    let template = template_of(doc, method, path)
        .unwrap_or_else(|| panic!("{method} {path} is not in the document"));
    let operation = &doc["paths"][template][method];
    let response = &operation["responses"][answer.status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path}: status {} is not documented; the document has {:?} ({})",
        answer.status,
        operation["responses"]
            .as_object()
            .map(|r| r.keys().collect::<Vec<_>>()),
        String::from_utf8_lossy(&answer.body)
    );
    let content_type = answer.header("content-type").unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    let content = response["content"].as_object();
    let documented = content.and_then(|c| {
        c.get(content_type)
            .or_else(|| c.get(media))
            .or_else(|| c.get("*/*"))
    });
    let Some(documented) = documented else {
        panic!(
            "{method} {path} → {}: content type {content_type:?} is not documented ({:?})",
            answer.status,
            content.map(|c| c.keys().collect::<Vec<_>>())
        );
    };
    for name in response["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        // The reply's envelope headers go with a final reply only, not a
        // stream, and Courier-Error with a broker's refusal only: those
        // are checked where they are expected.
        let always =
            name.eq_ignore_ascii_case("location") || name.eq_ignore_ascii_case("x-courier-index");
        if always {
            assert!(
                answer.header(name).is_some(),
                "{method} {path} → {}: documented header {name} is missing",
                answer.status
            );
        }
    }
    let mut validated = false;
    let json_like = media == "application/json" || media == "application/problem+json";
    if json_like {
        let schema = &documented["schema"];
        let body = answer.json();
        if let Err(e) = validate(doc, schema, &body, "$") {
            panic!("{method} {path} → {}: {e}", answer.status);
        }
        validated = true;
    }
    if media == "application/x-ndjson" {
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        for line in text.lines() {
            let value: Value = serde_json::from_str(line).expect("a JSON line");
            if let Err(e) = validate(doc, &documented["schema"], &value, "$") {
                panic!("{method} {path} → {}: {e}", answer.status);
            }
            validated = true;
        }
    }
    (
        format!("{} {template}", method.to_ascii_uppercase()),
        validated,
    )
}

async fn connect(broker: &Broker, service: &str) -> Client {
    Client::connect(ClientOptions::new(&broker.addr, service))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_the_document_says() {
    let broker = Broker::start();
    let http = broker.http.clone().expect("an HTTP port");
    let calc = connect(&broker, "calc").await;
    calc.on("calc.add", |msg| async move {
        msg.reply("calc.added", &json!({"sum": 3})).await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");
    calc.on("calc.list", |msg| async move {
        msg.reply_progress("calc.item", &json!({"n": 1})).await?;
        msg.reply("calc.listed", &json!({"count": 1})).await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");
    // Never answers.
    calc.on("calc.hang", |_msg| async move {
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");

    tokio::task::spawn_blocking(move || {
        let (_, doc_text) = common::http_get(&http, "/v1/openapi.json", None);
        let doc: Value = serde_json::from_str(&doc_text).expect("the document is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let json_post = [("Content-Type", "application/json")];
        let mut covered = BTreeSet::new();
        let mut validated = 0;
        let mut check =
            |method: &str, path: &str, headers: &[(&str, &str)], body: &str, want: u16| {
                let answer = call(&http, &method.to_ascii_uppercase(), path, headers, body);
                assert_eq!(
                    answer.status,
                    want,
                    "{method} {path}: {}",
                    String::from_utf8_lossy(&answer.body)
                );
                let (operation, json) = conforms(&doc, method, path, &answer);
                covered.insert(operation);
                validated += usize::from(json);
                answer
            };

        check("get", "/healthz", &[], "", 200);
        check("get", "/readyz", &[], "", 200);
        check("get", "/metrics", &[], "", 200);
        check("get", "/v1/openapi.json", &[], "", 200);
        check("get", "/v1/tail?pattern=calc.*", &[], "", 200);
        check("get", "/v1/tail?kind=nonsense", &[], "", 400);

        // The gateway.
        let sent = check("post", "/v1/messages/calc.add", &json_post, "{}", 202);
        assert!(sent.json()["seq"].as_u64().is_some(), "{}", sent.json());
        let transient = check(
            "post",
            "/v1/messages/calc.add",
            &[("Courier-Transient", "true")],
            "{}",
            202,
        );
        assert!(transient.json()["seq"].is_null(), "{}", transient.json());
        check("post", "/v1/messages/ghost.do", &json_post, "{}", 404);
        let refused = check(
            "post",
            "/v1/messages/calc.add",
            &[("Courier-TTL", "soon")],
            "{}",
            400,
        );
        assert!(refused.header("courier-error").is_none());
        let reply = check(
            "post",
            "/v1/requests/calc.add?timeout=10s",
            &json_post,
            "{}",
            200,
        );
        assert_eq!(reply.header("courier-outcome"), Some("calc.added"));
        assert!(reply.header("courier-sender").is_some());
        let stream = check("post", "/v1/requests/calc.list?timeout=10s", &[], "", 200);
        assert_eq!(stream.header("content-type"), Some("application/x-ndjson"));
        check("post", "/v1/requests/calc.hang?timeout=100ms", &[], "", 504);
        check(
            "post",
            "/v1/requests/calc.add?timeout=forever",
            &[],
            "",
            400,
        );
        let unrouted = check("post", "/v1/requests/ghost.do", &[], "", 404);
        assert_eq!(unrouted.header("courier-error"), Some("no_receiver"));
        let pending = check(
            "post",
            "/v1/requests/calc.add",
            &[("Prefer", "respond-async")],
            "{}",
            202,
        );
        let location = pending.header("location").expect("a Location").to_string();
        let done = common::wait_for("the asynchronous request ends", T, || {
            let answer = check("get", &location, &[], "", 200);
            (answer.json()["status"] == "done").then_some(answer)
        });
        assert_eq!(done.json()["replies"][0]["name"], "calc.added");
        check("get", "/v1/requests/not-a-uuid", &[], "", 400);
        check(
            "get",
            &format!("/v1/requests/{}", uuid::Uuid::now_v7()),
            &[],
            "",
            404,
        );

        // Replies to commands delivered on a stream (answered in
        // gateway_streams_e2e): none is open here.
        check(
            "post",
            "/v1/replies/0190e0a0.1",
            &[("Courier-Outcome", "calc.added")],
            "{}",
            404,
        );
        check("post", "/v1/replies/0190e0a0.1", &json_post, "{}", 400);

        // The console.
        check("get", "/v1/services", &[], "", 200);
        check("get", "/v1/names", &[], "", 200);
        check("get", "/v1/topology", &[], "", 200);
        check("get", "/v1/dead-letters/calc", &[], "", 200);
        check("get", "/v1/dead-letters/calc?after=3&limit=2", &[], "", 200);
        check("get", "/v1/dead-letters/calc?limit=0", &[], "", 400);
        check("get", "/v1/dead-letters/calc?after=one", &[], "", 400);
        check("get", "/v1/dead-letters/ghost", &[], "", 404);
        check("get", "/v1/dead-letters/calc/1", &[], "", 404);
        check("get", "/v1/dead-letters/calc/one", &[], "", 400);
        check(
            "post",
            "/v1/dead-letters/calc/1/replay",
            &json_post,
            "{}",
            404,
        );
        check("post", "/v1/dead-letters/calc/1/replay", &[], "{}", 415);
        check("post", "/v1/dead-letters/calc/purge", &json_post, "{}", 200);
        check(
            "post",
            "/v1/subscriptions/calc/pause",
            &json_post,
            r#"{"pattern":"calc.add"}"#,
            200,
        );
        check(
            "post",
            "/v1/subscriptions/calc/resume",
            &json_post,
            "{}",
            200,
        );
        check(
            "post",
            "/v1/subscriptions/calc/pause",
            &json_post,
            "[]",
            400,
        );
        check(
            "post",
            "/v1/subscriptions/ghost/resume",
            &json_post,
            "{}",
            404,
        );

        // Activity traces: the request above started one.
        let listing = check("get", "/v1/activities?limit=5", &[], "", 200);
        let activity = listing.json()["activities"][0]["activity_id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| panic!("an activity id in {}", listing.json()));
        check("get", &format!("/v1/activities/{activity}"), &[], "", 200);
        check("get", "/v1/activities?colour=red", &[], "", 400);
        check("get", "/v1/activities/nope", &[], "", 400);

        // The registry.
        check("get", "/v1/registry", &[], "", 200);
        let registered = check(
            "post",
            "/v1/services/db",
            &json_post,
            r#"{"address":"127.0.0.1:5432","meta":{"zone":"a"}}"#,
            200,
        );
        let id = registered.json()["id"].as_str().expect("an id").to_string();
        check("post", "/v1/services/db", &json_post, "{}", 400);
        check("get", "/v1/services/db?all=1", &[], "", 200);
        check("get", "/v1/services/db?index=x", &[], "", 400);
        check(
            "post",
            &format!("/v1/services/db/{id}/heartbeat"),
            &[],
            "",
            409,
        );
        check("post", "/v1/services/db/ghost/heartbeat", &[], "", 404);
        check("delete", &format!("/v1/services/db/{id}"), &[], "", 200);
        check("delete", &format!("/v1/services/db/{id}"), &[], "", 404);

        // A method the document does not list is told 405 with the ones
        // it does, before any check of the body.
        for (method, path, allow) in [
            ("POST", "/v1/names", "GET, HEAD"),
            ("GET", "/v1/dead-letters/calc/purge", "POST"),
        ] {
            let answer = call(&http, method, path, &[], "");
            assert_eq!(answer.status, 405, "{method} {path}");
            assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
        }

        let documented: BTreeSet<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(template, item)| {
                item.as_object()
                    .into_iter()
                    .flatten()
                    .map(move |(method, _)| format!("{} {template}", method.to_ascii_uppercase()))
            })
            .collect();
        let missed: Vec<&String> = documented.difference(&covered).collect();
        assert!(missed.is_empty(), "operations never called: {missed:?}");
        assert!(documented.len() >= 24, "{documented:?}");
        assert!(validated >= 40, "only {validated} JSON bodies were checked");
    })
    .await
    .expect("join");
}

/// Under a manifest the registry's answers to each kind of token are
/// the documented ones: lookups take a service's token, changes an admin's.
#[test]
fn under_a_manifest_the_registrys_answers_to_each_token_are_documented() {
    let dir = common::tempdir::Dir::new("openapi-manifest");
    let manifest = common::manifest_with_admin(
        &dir,
        "web",
        "sends = [\"todo.create\"]",
        "crr_web_secret",
        "crr_admin_secret",
    );
    let broker = Broker::start_with(&["--manifest", &manifest]);
    let http = broker.http.clone().expect("an HTTP port");
    let (_, doc_text) = common::http_get(&http, "/v1/openapi.json", None);
    let doc: Value = serde_json::from_str(&doc_text).expect("the document is JSON");
    let bearer = |token: &str| format!("Bearer {token}");
    let (web, admin, nobody) = (
        bearer("crr_web_secret"),
        bearer("crr_admin_secret"),
        bearer("crr_nobody"),
    );
    let json_post = ("Content-Type", "application/json");
    let body = r#"{"address":"127.0.0.1:5432","id":"db-1"}"#;
    for (method, path, auth, body, want) in [
        ("post", "/v1/services/db", Some(&web), body, 403),
        ("post", "/v1/services/db", Some(&admin), body, 200),
        ("get", "/v1/registry", Some(&web), "", 200),
        ("get", "/v1/services/db", Some(&web), "", 200),
        (
            "get",
            "/v1/services/db?index=0&wait=1s",
            Some(&web),
            "",
            200,
        ),
        ("get", "/v1/registry", None, "", 401),
        ("get", "/v1/services/db", Some(&nobody), "", 401),
        (
            "post",
            "/v1/services/db/db-1/heartbeat",
            Some(&web),
            "",
            403,
        ),
        ("delete", "/v1/services/db/db-1", Some(&web), "", 403),
        ("delete", "/v1/services/db/db-1", Some(&admin), "", 200),
    ] {
        let mut headers = vec![json_post];
        if let Some(auth) = auth {
            headers.push(("Authorization", auth.as_str()));
        }
        let answer = call(&http, &method.to_ascii_uppercase(), path, &headers, body);
        assert_eq!(
            answer.status,
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let (_, validated) = conforms(&doc, method, path, &answer);
        assert!(validated, "{method} {path}: a JSON body was checked");
    }
}

#[test]
fn the_checker_refuses_what_the_document_does_not_say() {
    let doc = json!({
        "components": {"schemas": {"P": {"type": "object", "required": ["detail"],
            "properties": {"detail": {"type": "string"}, "n": {"type": ["integer", "null"], "minimum": 0}}}}}
    });
    let schema = json!({"$ref": "#/components/schemas/P"});
    assert!(validate(&doc, &schema, &json!({"detail": "x", "n": null}), "$").is_ok());
    assert!(validate(&doc, &schema, &json!({"n": 1}), "$").is_err());
    assert!(validate(&doc, &schema, &json!({"detail": 1}), "$").is_err());
    assert!(validate(&doc, &schema, &json!({"detail": "x", "n": -1}), "$").is_err());
    assert!(validate(&doc, &schema, &json!([]), "$").is_err());
}
