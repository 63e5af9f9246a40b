//! `courier`: the broker and the client tools in one binary.

mod output;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use courier_client::{Client, ClientOptions, Error as ClientError};
use courier_server::{Server, ServerConfig};
use tokio::sync::mpsc;

/// Exit codes, distinct per kind of failure so scripts can tell them apart.
mod exit {
    pub const FAILURE: u8 = 1;
    // 2 is clap's usage error.
    pub const UNREACHABLE: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const TIMEOUT: u8 = 5;
    pub const CANNOT_LISTEN: u8 = 6;
}

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Courier: commands, replies and events between services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Conn {
    /// Broker address.
    #[arg(long, env = "COURIER_URL", default_value = "127.0.0.1:7700")]
    url: String,
    /// The service to act as.
    #[arg(long, env = "COURIER_SERVICE", default_value = "cli")]
    service: String,
    /// Credentials, for brokers that require them.
    #[arg(long, env = "COURIER_TOKEN")]
    token: Option<String>,
}

#[derive(Args, Clone)]
struct SendArgs {
    /// Message name, e.g. todo.create.
    name: String,
    /// Payload (JSON, or any text); with --count, `{seq}` becomes the index.
    #[arg(long, default_value = "")]
    data: String,
    /// Ordering key.
    #[arg(long)]
    key: Option<String>,
    /// At most once, in memory only.
    #[arg(long)]
    transient: bool,
    /// Send this many messages.
    #[arg(long, default_value_t = 1)]
    count: u64,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the broker.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: SocketAddr,
        /// Where the broker keeps its data.
        #[arg(long, default_value = "./courier-data")]
        data_dir: PathBuf,
    },
    /// Sends a command; prints {"id", "seq"} per accepted message.
    Send(SendArgs),
    /// Publishes an event; prints {"id", "seq"} per accepted message.
    Publish(SendArgs),
    /// Sends a command and prints its replies, one JSON line each.
    Request {
        name: String,
        #[arg(long, default_value = "")]
        data: String,
        /// How long to wait for the final reply (e.g. 500ms, 5s, 2m).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        conn: Conn,
    },
    /// Acts as a responder: replies to every NAME command it receives.
    Reply {
        name: String,
        /// The reply's name, e.g. todo.created.
        #[arg(long)]
        outcome: String,
        /// Reply payload.
        #[arg(long, conflicts_with = "echo")]
        data: Option<String>,
        /// Reply with the command's own payload.
        #[arg(long)]
        echo: bool,
        /// Send N replies: N-1 marked non-final, then the final one.
        #[arg(long, default_value_t = 1)]
        stream: u32,
        /// Exit after answering this many commands.
        #[arg(long)]
        count: Option<u64>,
        /// Wait this long before replying (simulates a slow handler).
        #[arg(long, value_parser = parse_duration)]
        delay: Option<Duration>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Subscribes the service to PATTERN and prints each delivery, acking it.
    Subscribe {
        pattern: String,
        /// Exit after this many deliveries.
        #[arg(long)]
        count: Option<u64>,
        /// Exit after this long without a delivery (e.g. 2s).
        #[arg(long, value_parser = parse_duration)]
        idle_timeout: Option<Duration>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Removes the service's subscription to PATTERN.
    Unsubscribe {
        pattern: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `500ms`, `5s`, `2m`, `1h`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 500ms, 5s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?}; use ms, s, m or h"
            ))
        }
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("courier: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("courier: {}", one_line(&e));
            ExitCode::from(code)
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    if let Some(client) = e.downcast_ref::<ClientError>() {
        return client.to_string();
    }
    format!("{e:#}")
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(client) = e.downcast_ref::<ClientError>() {
        return match client {
            ClientError::Connect { .. } => exit::UNREACHABLE,
            ClientError::Refused { .. } => exit::REFUSED,
            ClientError::Timeout(_) => exit::TIMEOUT,
            _ => exit::FAILURE,
        };
    }
    if e.downcast_ref::<courier_server::ServerError>().is_some() {
        return exit::CANNOT_LISTEN;
    }
    exit::FAILURE
}

async fn connect(conn: &Conn) -> Result<Client, ClientError> {
    connect_with(conn, 0).await
}

/// `max_in_flight` 0 keeps the SDK's default. Handlers run one at a time,
/// so lines print in delivery order.
async fn connect_with(conn: &Conn, max_in_flight: u32) -> Result<Client, ClientError> {
    let mut opts = ClientOptions::new(conn.url.clone(), conn.service.clone());
    opts.token = conn.token.clone();
    if max_in_flight > 0 {
        opts.max_in_flight = max_in_flight;
    }
    opts.sequential = true;
    Client::connect(opts).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { listen, data_dir } => serve(listen, data_dir).await,
        Command::Send(args) => send(args, false).await,
        Command::Publish(args) => send(args, true).await,
        Command::Request {
            name,
            data,
            timeout,
            conn,
        } => request(name, data, timeout, conn).await,
        Command::Reply {
            name,
            outcome,
            data,
            echo,
            stream,
            count,
            delay,
            conn,
        } => reply(name, outcome, data, echo, stream, count, delay, conn).await,
        Command::Subscribe {
            pattern,
            count,
            idle_timeout,
            conn,
        } => subscribe(pattern, count, idle_timeout, conn).await,
        Command::Unsubscribe { pattern, conn } => {
            let client = connect(&conn).await?;
            client.unsubscribe(&pattern).await?;
            client.shutdown().await;
            Ok(())
        }
    }
}

async fn serve(listen: SocketAddr, data_dir: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let config = ServerConfig {
        listen,
        ..ServerConfig::default()
    };
    let server = Server::bind(config, Box::new(courier_store::MemoryStore::new())).await?;
    let addr = server.local_addr()?;
    println!(
        "courier listening on {addr} (store: memory, data dir: {})",
        data_dir.display()
    );
    tokio::select! {
        _ = server.run() => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("courier: interrupted; stopping");
            Ok(())
        }
    }
}

/// Sends kept in flight at once by `--count`; enough to fill batches.
const SEND_WINDOW: usize = 256;

async fn send(args: SendArgs, event: bool) -> anyhow::Result<()> {
    let client = connect(&args.conn).await?;
    let mut window = VecDeque::new();
    let mut first_error = None;
    for seq in 0..args.count {
        let data = if args.count > 1 {
            args.data.replace("{seq}", &seq.to_string())
        } else {
            args.data.clone()
        };
        let mut builder = if event {
            client.event(&args.name)
        } else {
            client.command(&args.name)
        };
        builder = output::with_payload(builder, data);
        if let Some(key) = &args.key {
            builder = builder.key(Bytes::from(key.clone().into_bytes()));
        }
        if args.transient {
            builder = builder.transient();
        }
        window.push_back((seq, tokio::spawn(builder.enqueue()?.wait())));
        if window.len() >= SEND_WINDOW {
            if let Err(e) = settle_one(&mut window).await {
                first_error = Some(e);
                break;
            }
        }
    }
    while first_error.is_none() && !window.is_empty() {
        if let Err(e) = settle_one(&mut window).await {
            first_error = Some(e);
        }
    }
    client.shutdown().await;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn settle_one(
    window: &mut VecDeque<(
        u64,
        tokio::task::JoinHandle<courier_client::Result<uuid::Uuid>>,
    )>,
) -> anyhow::Result<()> {
    let Some((seq, handle)) = window.pop_front() else {
        return Ok(());
    };
    let id = handle.await.context("send task failed")??;
    output::line(&serde_json::json!({"id": id.to_string(), "seq": seq}));
    Ok(())
}

async fn request(name: String, data: String, timeout: Duration, conn: Conn) -> anyhow::Result<()> {
    let client = connect(&conn).await?;
    let builder = output::with_payload(client.command(&name), data).timeout(timeout);
    let mut replies = builder.request_stream().await?;
    let mut result = Ok(());
    while let Some(reply) = replies.next_reply().await {
        match reply {
            Ok(reply) => output::line(&output::envelope(reply.message(), None)),
            Err(ClientError::Timeout(t)) => {
                result = Err(anyhow::Error::new(ClientError::Timeout(t)));
                break;
            }
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
    }
    client.shutdown().await;
    result
}

#[allow(clippy::too_many_arguments)] // one per CLI flag
async fn reply(
    name: String,
    outcome: String,
    data: Option<String>,
    echo: bool,
    stream: u32,
    count: Option<u64>,
    delay: Option<Duration>,
    conn: Conn,
) -> anyhow::Result<()> {
    let client = connect(&conn).await?;
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1024);
    let data = Arc::new(data.unwrap_or_default());
    let outcome = Arc::new(outcome);
    let stream = stream.max(1);
    client
        .on(&name, move |msg| {
            let (data, outcome, done_tx) = (data.clone(), outcome.clone(), done_tx.clone());
            async move {
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                let payload = if echo {
                    msg.payload().clone()
                } else {
                    Bytes::from(data.as_bytes().to_vec())
                };
                for i in 1..=stream {
                    let builder = msg.reply_builder(&outcome, i == stream);
                    output::with_payload_bytes(builder, payload.clone())
                        .send()
                        .await?;
                }
                let _ = done_tx.send(()).await;
                Ok::<(), ClientError>(())
            }
        })
        .await?;
    eprintln!(
        "courier: replying to {name} as service {} (Ctrl-C to stop)",
        conn.service
    );
    let mut answered = 0u64;
    loop {
        tokio::select! {
            got = done_rx.recv() => {
                if got.is_none() { break; }
                answered += 1;
                if count.is_some_and(|c| answered >= c) { break; }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.shutdown().await;
    Ok(())
}

async fn subscribe(
    pattern: String,
    count: Option<u64>,
    idle: Option<Duration>,
    conn: Conn,
) -> anyhow::Result<()> {
    // Take no more at once than we will print, so the rest stays for others.
    let window = count.map_or(0, |c| c.clamp(1, 64) as u32);
    let client = connect_with(&conn, window).await?;
    let (tx, mut rx) = mpsc::channel::<()>(1024);
    let printed = Arc::new(AtomicU64::new(0));
    let limit = count.unwrap_or(u64::MAX);
    let seen = printed.clone();
    client
        .on(&pattern, move |msg| {
            let (tx, seen) = (tx.clone(), seen.clone());
            async move {
                // Past the count, hand deliveries back at once for others.
                if seen.fetch_add(1, Ordering::SeqCst) >= limit {
                    msg.nack(Duration::ZERO)?;
                    return Ok::<(), ClientError>(());
                }
                output::line(&output::envelope(msg.message(), Some(msg.attempt())));
                let _ = tx.send(()).await;
                Ok(())
            }
        })
        .await?;
    let mut received = 0u64;
    loop {
        if received >= limit {
            break;
        }
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, rx.recv()).await.ok().flatten(),
                None => rx.recv().await,
            }
        };
        tokio::select! {
            got = next => match got {
                Some(()) => received += 1,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_client::ErrorCode;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn refused_and_unreachable_have_distinct_exit_codes() {
        let refused = anyhow::Error::new(ClientError::Refused {
            code: ErrorCode::NoReceiver,
            reason: "x".into(),
        });
        let unreachable = anyhow::Error::new(ClientError::Connect {
            addr: "a".into(),
            source: std::io::Error::other("x"),
        });
        assert_eq!(exit_code(&refused), exit::REFUSED);
        assert_eq!(exit_code(&unreachable), exit::UNREACHABLE);
    }
}
