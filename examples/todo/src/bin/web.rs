//! The `web` service: serves the todo page and its form over HTTP, and
//! gets the data from the `todo` and `stats` services over Courier.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use courier_client::{Client, ClientOptions, Error, ErrorCode};
use courier_example_todo::{
    init_logging, log_connection_changes, stop_requested, Counted, CreateTodo, Listing, Todo,
};

/// How long the page waits for the count: it is shown without it rather
/// than late.
const STATS_TIMEOUT: Duration = Duration::from_millis(500);

/// What the handlers share.
#[derive(Clone)]
struct Web {
    client: Client,
    /// The broker's address, for telling users which bus is away.
    bus: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let mut opts = ClientOptions::from_env();
    opts.service = "web".into();
    // A page should not hang for the SDK's default 30 s.
    let timeout_ms = match std::env::var("TODO_WEB_TIMEOUT_MS") {
        Ok(ms) => ms
            .parse()
            .context("TODO_WEB_TIMEOUT_MS must be milliseconds, e.g. 5000")?,
        Err(_) => 5_000,
    };
    opts.request_timeout = Duration::from_millis(timeout_ms);
    let listen = listen_address()?;
    // Bound before connecting, so the registry learns the real port (also
    // when TODO_WEB_LISTEN asks for port 0); COURIER_ADVERTISE, when set,
    // says otherwise (an address behind a proxy, say).
    let listener = tokio::net::TcpListener::bind(listen).await?;
    if opts.advertise.is_none() {
        opts = opts.advertise(listener.local_addr()?.to_string());
    }
    let bus = opts.url.clone();
    let client = Client::connect(opts).await?;
    log_connection_changes(&client, &bus);
    let app = Router::new()
        .route("/", get(index))
        .route("/todos", post(create))
        .with_state(Web {
            client: client.clone(),
            bus,
        });
    println!("todo web listening on http://{}", listener.local_addr()?);
    // Stops taking connections, and answers the requests already in.
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_requested())
        .await?;
    client.shutdown().await;
    println!("todo web stopped (drained)");
    Ok(())
}

/// Says as a page who failed us: the bus (the broker) being unreachable
/// is not the todo service being stopped or slow.
fn unavailable(web: &Web, error: Error) -> Response {
    let (status, message) = if !web.client.is_connected() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "The bus is unreachable: the Courier broker at {} does not answer, so the todo service cannot be asked. This page works again once the broker is back.",
                web.bus
            ),
        )
    } else {
        match error {
            Error::Timeout(t) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "The todo service did not answer within {} ms: it may be stopped or busy. The bus is up.",
                    t.as_millis()
                ),
            ),
            Error::Refused {
                code: ErrorCode::NoReceiver,
                ..
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "No todo service has ever subscribed on the bus: start todo-service.".to_string(),
            ),
            other => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("The todo service could not be asked: {other}"),
            ),
        }
    };
    (
        status,
        Html(format!("<p class=\"error\">{}</p>", escape(&message))),
    )
        .into_response()
}

/// TODO_WEB_LISTEN when set; else HOST:PORT when PORT is set (`courier up`
/// sets both for each instance, 127.0.0.1; its compose file 0.0.0.0 for
/// each replica); else 127.0.0.1:3000.
fn listen_address() -> anyhow::Result<SocketAddr> {
    if let Ok(listen) = std::env::var("TODO_WEB_LISTEN") {
        return listen.parse().with_context(|| {
            format!("TODO_WEB_LISTEN={listen:?} is not IP:PORT, e.g. 127.0.0.1:3000")
        });
    }
    let Ok(port) = std::env::var("PORT") else {
        return Ok(SocketAddr::from(([127, 0, 0, 1], 3000)));
    };
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    format!("{host}:{port}").parse().with_context(|| {
        format!("HOST={host:?} PORT={port:?} is not an IP address and port, e.g. HOST=127.0.0.1 PORT=3000")
    })
}

async fn index(State(web): State<Web>) -> Response {
    // Without the bus nothing can be asked: say so at once.
    if !web.client.is_connected() {
        return unavailable(&web, Error::Closed("not connected".into()));
    }
    // Both asked at once; the count is a side note that may be missing.
    let (listing, counted) = tokio::join!(
        async {
            web.client
                .request("todos.list", &())
                .await
                .and_then(|r| r.json::<Listing>())
        },
        async {
            web.client
                .command("stats.get")
                .transient()
                .timeout(STATS_TIMEOUT)
                .request()
                .await
                .and_then(|r| r.json::<Counted>())
        }
    );
    let listing = match listing {
        Ok(listing) => listing,
        Err(e) => return unavailable(&web, e),
    };
    let items: String = listing
        .todos
        .iter()
        .map(|t| format!("<li>{}</li>", escape(&t.text)))
        .collect();
    let stats = match counted {
        Ok(c) => format!(
            "{} todos created (counted by the stats service)",
            c.todos_created
        ),
        Err(e) => escape(&format!("The stats service did not answer: {e}")),
    };
    Html(format!(
        "<!doctype html><html><head><title>Todos</title></head><body>\
         <h1>Todos</h1><ul id=\"todos\">{items}</ul>\
         <p id=\"stats\">{stats}</p>\
         <form method=\"post\" action=\"/todos\"><input name=\"text\" autofocus>\
         <button type=\"submit\">Add</button></form></body></html>"
    ))
    .into_response()
}

async fn create(State(web): State<Web>, Form(form): Form<CreateTodo>) -> Response {
    if !web.client.is_connected() {
        return unavailable(&web, Error::Closed("not connected".into()));
    }
    match web
        .client
        .request("todo.create", &form)
        .await
        .and_then(|r| r.json::<Todo>())
    {
        Ok(_) => Redirect::to("/").into_response(),
        Err(e) => unavailable(&web, e),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
