//! The `todo` service: keeps the todo list in SQLite, answers `todos.list`
//! and `todo.create`, and publishes `todo.created` through the outbox.
//!
//! Creating a todo is one SQLite transaction: the todo row and the
//! `todo.created` event in the outbox commit together. The relay running
//! in this process publishes the event once the broker accepts it, again
//! after a crash (same message id, so the broker drops the copy), and
//! never for a transaction that rolled back.

use anyhow::Context as _;
use courier_client::{Client, ClientOptions, Incoming};
use courier_example_todo::{
    init_logging, log_connection_changes, open_database, stop_requested, CreateTodo, Listing, Todo,
};
use courier_outbox::{Outbox, OutboxMessage, Relay};
use sqlx::{Row, SqlitePool};

/// Where the todos are kept unless TODO_DATABASE says otherwise.
const DEFAULT_DATABASE: &str = ".courier/todo.sqlite";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let mut opts = ClientOptions::from_env();
    opts.service = "todo".into();
    let bus = opts.url.clone();
    let db = open_database("TODO_DATABASE", DEFAULT_DATABASE).await?;
    // `command_id`: the `todo.create` that made the todo, so a redelivered
    // command (the sender retried, or we crashed before acking) creates
    // nothing twice and gets the same answer.
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS todos (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             command_id BLOB NOT NULL UNIQUE,
             text TEXT NOT NULL
         )",
    )
    .execute(&db)
    .await
    .context("cannot create the todos table")?;
    let client = Client::connect(opts).await?;
    log_connection_changes(&client, &bus);
    // Applies the outbox's schema before the first enqueue.
    let relay = Relay::sqlite(db.clone(), client.clone())
        .await
        .context("cannot set up the outbox")?;
    let relay = tokio::spawn(async move { relay.run().await });

    let d = db.clone();
    client
        .on("todos.list", move |msg: Incoming| {
            let db = d.clone();
            async move {
                let listing = Listing {
                    todos: list(&db).await?,
                };
                msg.reply("todos.listing", &listing).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
        .await?;

    let d = db.clone();
    client
        .on("todo.create", move |msg: Incoming| {
            let db = d.clone();
            async move {
                let create: CreateTodo = msg.json()?;
                let todo = create_once(&db, &msg, create).await?;
                msg.reply("todo.created", &todo).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
        .await?;

    println!("todo service ready");
    stop_requested().await;
    // Running handlers finish and their replies and acks go out; what was
    // not handled stays with the bus for the next instance, and what the
    // relay has not published stays in the outbox for the next start.
    relay.abort();
    client.shutdown().await;
    println!("todo service stopped (drained)");
    Ok(())
}

async fn list(db: &SqlitePool) -> anyhow::Result<Vec<Todo>> {
    let rows = sqlx::query("SELECT id, text FROM todos ORDER BY id")
        .fetch_all(db)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Todo {
                id: u64::try_from(row.try_get::<i64, _>("id")?)?,
                text: row.try_get("text")?,
            })
        })
        .collect()
}

/// Inserts the todo and enqueues its `todo.created` in one transaction,
/// unless this command made a todo before; returns the todo either way.
async fn create_once(
    db: &SqlitePool,
    command: &Incoming,
    create: CreateTodo,
) -> anyhow::Result<Todo> {
    let command_id = command.message().id;
    let mut tx = db.begin().await?;
    // The insert first: the transaction writes from its first statement.
    let inserted = sqlx::query(
        "INSERT INTO todos (command_id, text) VALUES ($1, $2) ON CONFLICT (command_id) DO NOTHING",
    )
    .bind(command_id.as_bytes().as_slice())
    .bind(&create.text)
    .execute(&mut *tx)
    .await?;
    let row = sqlx::query("SELECT id, text FROM todos WHERE command_id = $1")
        .bind(command_id.as_bytes().as_slice())
        .fetch_one(&mut *tx)
        .await?;
    let todo = Todo {
        id: u64::try_from(row.try_get::<i64, _>("id")?)?,
        text: row.try_get("text")?,
    };
    if inserted.rows_affected() == 1 {
        Outbox::enqueue(&mut tx, OutboxMessage::event("todo.created").json(&todo)?).await?;
    }
    tx.commit().await?;
    Ok(todo)
}
