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
    let broker = Broker::start();
    // todo: todo.create → publishes todo.created (plain client), replies.
    let todo = client(&broker, "todo").await;
    todo.on("todo.create", |msg: Incoming| async move {
        msg.client().publish("todo.created", &"milk").await?;
        msg.reply("todo.done", &"ok").await?;
        Ok::<(), courier_client::Error>(())
    })
    .await
    .expect("subscribe");
    // audit: todo.created → command mail.send through the Incoming.
    let audit = client(&broker, "audit").await;
    audit
        .on("todo.created", |msg: Incoming| async move {
            msg.command("mail.send").json(&"hi")?.send().await?;
            Ok::<(), courier_client::Error>(())
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
}
