//! The manifest decides who sends and receives what.

use super::*;

fn manifest() -> Arc<courier_manifest::Manifest> {
    let text = format!(
        r#"
[services.web]
sends = ["todos.list@1", "todo.create@1"]
receives = ["todo.created@1"]
tokens = ["{web}"]

[services.todo]
receives = ["todos.list@1", "todo.create@1"]
sends = ["todo.created@1"]
tokens = ["{todo}"]

[services.ops]
sends = ["todo.secret@1"]
receives = ["todo.created@1"]
tokens = ["{ops}"]

[admin]
tokens = ["{admin}"]
"#,
        web = courier_manifest::hash_token("web-token"),
        todo = courier_manifest::hash_token("todo-token"),
        ops = courier_manifest::hash_token("ops-token"),
        admin = courier_manifest::hash_token("admin-token"),
    );
    Arc::new(courier_manifest::Manifest::parse(&text).expect("valid manifest"))
}

fn op_results(actions: &[Action]) -> Vec<(u64, ErrorCode, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::OpResult {
                request,
                code,
                reason,
                ..
            } => Some((*request, *code, reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_manifest_decides_who_sends_and_receives_what() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.connect(3, "ops", 0);
    // A wildcard subscription is cut down to what todo may receive.
    h.broker
        .subscribe(2, 7, "todo.>", 0, 0, StartFrom::New, h.now);
    h.broker
        .subscribe(2, 8, "billing.>", 0, 0, StartFrom::New, h.now);
    let ops = op_results(&h.actions());
    assert_eq!(ops[0].1, ErrorCode::Unauthorized, "{ops:?}");
    assert!(
        ops[0].2.contains("todo") && ops[0].2.contains("billing.>"),
        "{ops:?}"
    );
    assert_eq!(ops[1].1, ErrorCode::Ok);

    h.send(1, 1, command("todo.create", "ok"));
    h.send(1, 2, command("todo.delete", "no"));
    let mut v2 = command("todo.create", "v2");
    v2.version = courier_proto::Version::new(2, 0);
    h.send(1, 3, v2);
    // ops may send todo.secret, but nobody may receive it, even via todo.>.
    h.send(3, 4, command("todo.secret", "s"));
    let actions = h.actions();
    assert_eq!(refusal(&actions, 1).0, ErrorCode::Ok);
    let (code, reason) = refusal(&actions, 2);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(
        reason.contains("service web may not send todo.delete"),
        "{reason}"
    );
    assert!(
        reason.contains("todo.create@1"),
        "the rule is named: {reason}"
    );
    let (code, reason) = refusal(&actions, 3);
    assert_eq!(code, ErrorCode::Unauthorized, "{reason}");
    assert!(reason.contains("major version 2"), "{reason}");
    let (code, reason) = refusal(&actions, 4);
    assert_eq!(code, ErrorCode::NoReceiver, "{reason}");
    let delivered: Vec<Bytes> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { message, .. } => Some(message.payload.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![Bytes::from_static(b"ok")]);
}

#[test]
fn only_a_service_that_received_the_command_may_reply_to_it() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    h.connect(2, "todo", 0);
    h.connect(3, "ops", 0);
    h.subscribe(2, "todo.create");
    let cmd = command("todo.create", "x");
    let id = cmd.id;
    h.send(1, 1, cmd);
    h.actions();
    let mut forged = Message::new(Kind::Reply, "todo.created", "forged");
    forged.response_to = Some(id);
    h.send(3, 2, forged);
    let (code, reason) = refusal(&h.actions(), 2);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(reason.contains("service ops may not reply"), "{reason}");
    let mut real = Message::new(Kind::Reply, "todo.created", "real");
    real.response_to = Some(id);
    h.send(2, 3, real);
    let actions = h.actions();
    assert_eq!(refusal(&actions, 3).0, ErrorCode::Ok);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Deliver { conn: 1, .. })));
}

#[test]
fn broker_commands_need_the_admin_identity_under_a_manifest() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    h.broker
        .connect_as(9, "admin", "admin-1", 0, true)
        .expect("admin connects");
    let mut list = command("courier.services.list", "");
    h.send(1, 1, list.clone());
    let (code, reason) = refusal(&h.actions(), 1);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(reason.contains("only the admin identity"), "{reason}");
    list.id = Uuid::now_v7();
    h.send(9, 2, list);
    let actions = h.actions();
    assert_eq!(refusal(&actions, 2).0, ErrorCode::Ok);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Deliver { conn: 9, .. })));
}

#[test]
fn any_connection_may_advertise_where_its_own_instance_serves() {
    let mut h = Harness::new();
    h.broker.set_manifest(Some(manifest()));
    h.connect(1, "web", 0);
    let index = h.broker.registry().index();
    h.send(
        1,
        1,
        command(
            "courier.registry.advertise",
            r#"{"address": "127.0.0.1:3000", "meta": {"zone": "a"}}"#,
        ),
    );
    let actions = h.actions();
    assert_eq!(refusal(&actions, 1).0, ErrorCode::Ok);
    let reply = actions
        .iter()
        .find_map(|a| match a {
            Action::Deliver {
                conn: 1, message, ..
            } => Some(message.clone()),
            _ => None,
        })
        .expect("the broker answers");
    assert_eq!(reply.name, "courier.registry.advertised");
    let entry = h.broker.registry().get("web", "web-1").expect("registered");
    assert_eq!(entry.spec.address, "127.0.0.1:3000");
    assert_eq!(entry.spec.meta["zone"], "a");
    assert!(
        h.broker.registry().index() > index,
        "watchers see the change"
    );

    h.send(
        1,
        2,
        command("courier.registry.advertise", r#"{"address": "localhost"}"#),
    );
    let (code, reason) = refusal(&h.actions(), 2);
    assert_eq!(code, ErrorCode::InvalidMessage);
    assert!(reason.contains("HOST:PORT"), "{reason}");
    h.send(1, 3, command("courier.registry.advertise", "{}"));
    let (code, reason) = refusal(&h.actions(), 3);
    assert_eq!(code, ErrorCode::InvalidMessage);
    assert!(reason.contains("address"), "{reason}");
    // The exception is this one command: the others stay the admin's.
    h.send(1, 4, command("courier.services.list", ""));
    assert_eq!(refusal(&h.actions(), 4).0, ErrorCode::Unauthorized);

    h.broker.disconnect(1, h.now);
    assert!(h.broker.registry().get("web", "web-1").is_none());
}
