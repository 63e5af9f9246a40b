//! The `web` service: serves the todo page and its form over HTTP, and
//! gets the data from the `todo` service over Courier.

use std::net::SocketAddr;

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use courier_client::{Client, ClientOptions};
use courier_example_todo::{init_logging, CreateTodo, Listing, Todo};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let mut opts = ClientOptions::from_env();
    opts.service = "web".into();
    let client = Client::connect(opts).await?;
    let listen: SocketAddr = std::env::var("TODO_WEB_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3000".into())
        .parse()?;
    let app = Router::new()
        .route("/", get(index))
        .route("/todos", post(create))
        .with_state(client.clone());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("todo web listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    client.shutdown().await;
    Ok(())
}

/// The broker or the todo service failed us: say so as a page.
fn unavailable(error: courier_client::Error) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html(format!(
            "<p>The todo service is not available: {}</p>",
            escape(&error.to_string())
        )),
    )
        .into_response()
}

async fn index(State(client): State<Client>) -> Response {
    let listing: Listing = match client
        .request("todos.list", &())
        .await
        .and_then(|r| r.json())
    {
        Ok(listing) => listing,
        Err(e) => return unavailable(e),
    };
    let items: String = listing
        .todos
        .iter()
        .map(|t| format!("<li>{}</li>", escape(&t.text)))
        .collect();
    Html(format!(
        "<!doctype html><html><head><title>Todos</title></head><body>\
         <h1>Todos</h1><ul id=\"todos\">{items}</ul>\
         <form method=\"post\" action=\"/todos\"><input name=\"text\" autofocus>\
         <button type=\"submit\">Add</button></form></body></html>"
    ))
    .into_response()
}

async fn create(State(client): State<Client>, Form(form): Form<CreateTodo>) -> Response {
    match client
        .request("todo.create", &form)
        .await
        .and_then(|r| r.json::<Todo>())
    {
        Ok(_) => Redirect::to("/").into_response(),
        Err(e) => unavailable(e),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
