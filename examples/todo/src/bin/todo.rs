//! The `todo` service: keeps the todo list, answers `todos.list` and
//! `todo.create`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use courier_client::{Client, ClientOptions, Incoming};
use courier_example_todo::{
    init_logging, log_connection_changes, stop_requested, CreateTodo, Listing, Todo,
};
use uuid::Uuid;

#[derive(Default)]
struct Store {
    todos: Vec<Todo>,
    /// Commands already executed, so a redelivered `todo.create` (the
    /// sender retried, or we crashed before acking) creates nothing twice.
    done: HashMap<Uuid, Todo>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let mut opts = ClientOptions::from_env();
    opts.service = "todo".into();
    let bus = opts.url.clone();
    let client = Client::connect(opts).await?;
    log_connection_changes(&client, &bus);
    let store = Arc::new(Mutex::new(Store::default()));

    let s = store.clone();
    client
        .on("todos.list", move |msg: Incoming| {
            let listing = Listing {
                todos: s.lock().map(|s| s.todos.clone()).unwrap_or_default(),
            };
            async move { msg.reply("todos.listing", &listing).await }
        })
        .await?;

    let s = store.clone();
    client
        .on("todo.create", move |msg: Incoming| {
            let s = s.clone();
            async move {
                let create: CreateTodo = msg.json()?;
                let todo = {
                    let mut store = s
                        .lock()
                        .map_err(|_| anyhow::anyhow!("store lock poisoned"))?;
                    if let Some(existing) = store.done.get(&msg.message().id) {
                        existing.clone()
                    } else {
                        let todo = Todo {
                            id: store.todos.len() as u64 + 1,
                            text: create.text,
                        };
                        store.todos.push(todo.clone());
                        store.done.insert(msg.message().id, todo.clone());
                        todo
                    }
                };
                msg.reply("todo.created", &todo).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
        .await?;

    println!("todo service ready");
    stop_requested().await;
    // Running handlers finish and their replies and acks go out; what was
    // not handled stays with the bus for the next instance.
    client.shutdown().await;
    println!("todo service stopped (drained)");
    Ok(())
}
