//! OpenTelemetry spans (feature `otel`): each handler runs in a
//! `courier.handle` span whose parent is the handled message's
//! `traceparent`, and a message sent while a span is current carries
//! that span as its parent. Install `tracing_opentelemetry::layer()` in
//! the program's `tracing` subscriber to export them.
//!
//! ```no_run
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//! # fn provider() -> opentelemetry_sdk::trace::SdkTracerProvider { unimplemented!() }
//! let provider = provider(); // an SdkTracerProvider with your exporter
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("my-service")));
//! tracing::subscriber::set_global_default(subscriber).unwrap();
//! ```

use courier_proto::Message;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::TraceParent;

/// The span a handler of `message` runs in: a consumer span, child of
/// `trace` (the message's `traceparent`, or its activity's trace).
pub(crate) fn handler_span(message: &Message, trace: &TraceParent) -> tracing::Span {
    let span = tracing::info_span!(
        "courier.handle",
        otel.name = %format_args!("{} process", message.name),
        otel.kind = "consumer",
        messaging.system = "courier",
        messaging.operation = "process",
        messaging.destination.name = %message.name,
        messaging.message.id = %message.id,
        courier.activity_id = %message.activity_id,
        courier.sender = %message.sender,
    );
    let remote = SpanContext::new(
        TraceId::from_bytes(trace.trace_id),
        SpanId::from_bytes(trace.span_id),
        TraceFlags::new(trace.flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(remote));
    span
}

/// The current span's context, when it is an OpenTelemetry span: what a
/// message sent now names as its parent in `traceparent`.
pub(crate) fn current() -> Option<TraceParent> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opentelemetry::trace::{SpanKind, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;

    use crate::{Client, ClientOptions, Incoming, TraceParent};

    #[test]
    fn handlers_run_in_spans_that_continue_the_sender_s_trace() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        // One thread: the subscriber is this thread's, and so are the
        // broker, the clients and every handler.
        let _default = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let event = runtime.block_on(async {
            let config = courier_server::ServerConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                ..Default::default()
            };
            let server =
                courier_server::Server::bind(config, Box::new(courier_store::MemoryStore::new()))
                    .await
                    .expect("bind");
            let url = server.local_addr().expect("addr").to_string();
            tokio::spawn(server.run());
            let todo = Client::connect(ClientOptions::new(&url, "todo"))
                .await
                .expect("todo");
            todo.on("todo.create", |msg: Incoming| async move {
                msg.client().publish("todo.created", &"milk").await?;
                msg.reply("todo.done", &"ok").await?;
                Ok::<(), crate::Error>(())
            })
            .await
            .expect("subscribe");
            let audit = Client::connect(ClientOptions::new(&url, "audit"))
                .await
                .expect("audit");
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            audit
                .on("todo.created", move |msg: Incoming| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(msg.message().clone()).await;
                        Ok::<(), crate::Error>(())
                    }
                })
                .await
                .expect("subscribe");
            let web = Client::connect(ClientOptions::new(&url, "web"))
                .await
                .expect("web");
            web.request("todo.create", &"milk")
                .instrument(tracing::info_span!("web request"))
                .await
                .expect("reply");
            let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("the event in time")
                .expect("open");
            // The audit handler's span ends once it returns; shutdown
            // waits for running handlers.
            audit.shutdown().await;
            todo.shutdown().await;
            web.shutdown().await;
            event
        });
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().expect("spans");
        let find = |name: &str| {
            spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
                panic!(
                    "no span {name:?} among {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
        };
        let web = find("web request");
        let create = find("todo.create process");
        let created = find("todo.created process");
        assert_eq!(create.span_kind, SpanKind::Consumer);
        let trace = web.span_context.trace_id();
        assert_eq!(
            create.span_context.trace_id(),
            trace,
            "one trace from web on"
        );
        assert_eq!(created.span_context.trace_id(), trace);
        assert_eq!(
            create.parent_span_id,
            web.span_context.span_id(),
            "todo's handler under web's span"
        );
        assert_eq!(
            created.parent_span_id,
            create.span_context.span_id(),
            "audit's handler under todo's"
        );
        // The event carries the span that sent it.
        let header =
            TraceParent::parse(event.header("traceparent").expect("traceparent")).expect("valid");
        assert_eq!(header.trace_id, trace.to_bytes());
        assert_eq!(header.span_id, create.span_context.span_id().to_bytes());
        assert!(create
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "messaging.destination.name"
                && kv.value.as_str() == "todo.create"));
    }
}
