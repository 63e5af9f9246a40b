//! Messages sent while handling name their cause and continue its trace.

use super::*;

/// Forwards each delivered message whole to a channel and acks.
async fn envelopes(
    client: &Client,
    pattern: &str,
) -> mpsc::Receiver<courier_client::proto::Message> {
    let (tx, rx) = mpsc::channel(100);
    client
        .on(pattern, move |msg: Incoming| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(msg.message().clone()).await;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe");
    rx
}

async fn next(
    rx: &mut mpsc::Receiver<courier_client::proto::Message>,
) -> courier_client::proto::Message {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("a delivery in time")
        .expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_handling_name_their_cause_and_continue_its_trace() {
    use courier_client::TraceParent;
    let broker = Bus::start().await;
    // todo: todo.create → publishes todo.created (plain client), replies.
    let todo = client(&broker, "todo").await;
    todo.on("todo.create", |msg: Incoming| async move {
        msg.client().publish("todo.created", &"milk").await?;
        msg.reply("todo.done", &"ok").await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");
    // audit: todo.created → command mail.send through the Incoming; and,
    // built but not sent, messages whose builder changes what the handled
    // message gave them: (handled event, own traceparent, own id, other
    // activity).
    let audit = client(&broker, "audit").await;
    type Built = (
        courier_client::proto::Message,
        courier_client::proto::Message,
        courier_client::proto::Message,
        courier_client::proto::Message,
    );
    let built: Arc<Mutex<Vec<Built>>> = Arc::default();
    let kept = built.clone();
    audit
        .on("todo.created", move |msg: Incoming| {
            let kept = kept.clone();
            async move {
                let own_trace = msg
                    .command("mail.send")
                    .header("traceparent", OWN_TRACE)
                    .message()
                    .clone();
                let own_id = msg
                    .command("mail.send")
                    .id(uuid::Uuid::now_v7())
                    .message()
                    .clone();
                let elsewhere = msg
                    .command("mail.send")
                    .activity(uuid::Uuid::now_v7())
                    .message()
                    .clone();
                kept.lock().expect("lock").push((
                    msg.message().clone(),
                    own_trace,
                    own_id,
                    elsewhere,
                ));
                msg.command("mail.send").json(&"hi")?.send().await?;
                Ok::<(), courier_client::Error>(())
            }
        })
        .await
        .expect("subscribe");
    let mail = client(&broker, "mail").await;
    let mut mails = envelopes(&mail, "mail.send").await;
    let watcher = client(&broker, "watcher").await;
    let mut created = envelopes(&watcher, "todo.created").await;

    let web = client(&broker, "web").await;
    let builder = web.command("todo.create").json(&"milk").expect("json");
    let command = builder.message().clone();
    assert_eq!(command.parent_id, None, "a new activity has no parent");
    assert_eq!(
        command.header("traceparent"),
        None,
        "its trace is its activity"
    );
    let reply = builder.timeout(T).request().await.expect("reply");
    let event = next(&mut created).await;
    let mailed = next(&mut mails).await;

    let trace_of = |m: &courier_client::proto::Message| {
        TraceParent::parse(m.header("traceparent").expect("a traceparent"))
            .expect("a valid traceparent")
    };
    for (m, parent) in [
        (reply.message(), command.id),
        (&event, command.id),
        (&mailed, event.id),
    ] {
        assert_eq!(m.activity_id, command.activity_id, "{}", m.name);
        assert_eq!(m.parent_id, Some(parent), "{}'s cause", m.name);
        let trace = trace_of(m);
        assert_eq!(
            trace.trace_id,
            *command.activity_id.as_bytes(),
            "{}: one trace, named by the activity",
            m.name
        );
        assert_eq!(trace.span_id, m.id.as_bytes()[8..], "{}'s own span", m.name);
        assert_eq!(trace.flags, 1);
    }

    // A traceparent the sender brings is continued, not replaced.
    let upstream = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    web.command("todo.create")
        .header("traceparent", upstream)
        .json(&"bread")
        .expect("json")
        .timeout(T)
        .request()
        .await
        .expect("reply");
    let event = next(&mut created).await;
    let mailed = next(&mut mails).await;
    for m in [&event, &mailed] {
        let trace = trace_of(m);
        assert_eq!(trace.to_header()[3..35], upstream[3..35], "{}", m.name);
        assert_eq!(trace.span_id, m.id.as_bytes()[8..]);
    }

    let built = built.lock().expect("lock").clone();
    assert_eq!(built.len(), 2, "one set built per todo.created");
    for (handled, own_trace, own_id, elsewhere) in &built {
        let headers = |m: &courier_client::proto::Message| {
            m.headers
                .iter()
                .filter(|(k, _)| k == "traceparent")
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            headers(own_trace),
            [OWN_TRACE],
            "a traceparent the handler sets is the one it carries"
        );
        assert_eq!(own_trace.parent_id, Some(handled.id));
        let trace = trace_of(own_id);
        assert_eq!(
            trace.span_id,
            own_id.id.as_bytes()[8..],
            "the span follows an id given to the builder"
        );
        assert_eq!(trace.trace_id, trace_of(handled).trace_id);
        assert_eq!(own_id.parent_id, Some(handled.id));
        assert_ne!(elsewhere.activity_id, handled.activity_id);
        assert_eq!(
            (elsewhere.parent_id, headers(elsewhere).len()),
            (None, 0),
            "a message of another activity does not follow from the handled one"
        );
    }
}

const OWN_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
