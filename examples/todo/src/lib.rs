//! The seeds' first example: a `web` service that serves an HTML page of
//! todos, and a `todo` service that keeps them. They never talk directly:
//! `web` asks with `todos.list` (reply `todos.listing`) and sends
//! `todo.create` (reply `todo.created`); Courier routes both ways.

use serde::{Deserialize, Serialize};

/// One todo item, as both services see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Todo {
    pub id: u64,
    pub text: String,
}

/// Payload of `todo.create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateTodo {
    pub text: String,
}

/// Payload of `todos.listing`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Listing {
    pub todos: Vec<Todo>,
}

pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
