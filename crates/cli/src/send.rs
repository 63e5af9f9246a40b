//! `send`, `publish` and `request`: one message or many, with the
//! envelope's options.

use std::collections::VecDeque;
use std::io::BufRead as _;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use courier_client::proto::Version;
use courier_client::{Client, Error as ClientError, MessageBuilder};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::args::parse_duration;
use crate::conn::{self, Conn, Deadline, Settings};
use crate::{output, UsageError};

/// What a message carries besides its name, shared by send, publish and
/// request.
#[derive(Args, Clone)]
pub struct MessageArgs {
    /// Message name, e.g. todo.create.
    pub name: String,
    /// Payload: text (with --count, `{seq}` becomes the index); @FILE for a
    /// file's bytes; - for stdin (send/publish: one message per line;
    /// request: all of stdin).
    #[arg(long, default_value = "", value_name = "TEXT|@FILE|-")]
    pub data: String,
    /// Ordering key: same key ⇒ handled in order, one at a time per service.
    #[arg(long)]
    pub key: Option<String>,
    /// Dropped undelivered when not delivered within DUR (e.g. 30s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Not delivered before DUR has passed (deferred delivery).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// A header, NAME=VALUE (repeatable); a content-type given here
    /// replaces the one set for JSON payloads.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// The message's id, its dedup key: sent again with the same id within
    /// the broker's dedup window (2 minutes), it is accepted and dropped, so
    /// a retry is safe. One message only.
    #[arg(long, value_name = "UUID", value_parser = parse_id)]
    pub id: Option<Uuid>,
    /// The contract version, MAJOR.MINOR (default 1.0).
    #[arg(long, value_name = "MAJOR.MINOR", value_parser = parse_version)]
    pub version: Option<Version>,
    /// At most once, in memory only.
    #[arg(long)]
    pub transient: bool,
}

#[derive(Args, Clone)]
pub struct SendArgs {
    #[command(flatten)]
    pub message: MessageArgs,
    /// Send this many messages (default 1; not with --data -).
    #[arg(long)]
    pub count: Option<u64>,
    /// Give up after DUR in all, the broker's absence included: exit 3 if
    /// the broker is unreachable then, else 5, saying how many were
    /// acknowledged. Without it, each message waits up to 30s for its
    /// acknowledgement, across reconnects.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Clone)]
pub struct RequestArgs {
    #[command(flatten)]
    pub message: MessageArgs,
    /// How long to wait for the final reply (e.g. 500ms, 5s, 2m): exit 5,
    /// or 3 if the broker is unreachable then.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub conn: Conn,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "{text:?} is not NAME=VALUE (e.g. --header traceparent=00-…)"
        )),
    }
}

fn parse_id(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text.trim()).map_err(|e| {
        format!("{text:?} is not a UUID ({e}); write e.g. 0190f3c4-7d2a-7c1e-9b1a-3f6d2e8a9c01 (uuidgen makes one)")
    })
}

fn parse_version(text: &str) -> Result<Version, String> {
    text.trim().parse().map_err(|e| format!("{e}"))
}

/// Where `--data` takes the payload from.
enum Data {
    Text(String),
    File(Bytes),
    Stdin,
}

impl Data {
    fn from_arg(data: &str) -> anyhow::Result<Data> {
        if data == "-" {
            return Ok(Data::Stdin);
        }
        match data.strip_prefix('@') {
            Some(path) => {
                let bytes = std::fs::read(path).with_context(|| {
                    format!("cannot read --data @{path}; name a readable file, or pass text without the @")
                })?;
                Ok(Data::File(Bytes::from(bytes)))
            }
            None => Ok(Data::Text(data.to_string())),
        }
    }
}

impl MessageArgs {
    /// Sets everything but the payload's content on `builder`.
    fn apply(&self, builder: MessageBuilder, payload: Bytes) -> MessageBuilder {
        let own_content_type = self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
        let mut builder = if own_content_type {
            builder.payload(payload)
        } else {
            output::with_payload_bytes(builder, payload)
        };
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        if let Some(key) = &self.key {
            builder = builder.key(Bytes::from(key.clone().into_bytes()));
        }
        if let Some(ttl) = self.ttl {
            builder = builder.ttl(ttl);
        }
        if let Some(delay) = self.delay {
            builder = builder.deliver_after(delay);
        }
        if let Some(version) = self.version {
            builder = builder.version(version);
        }
        if let Some(id) = self.id {
            builder = builder.id(id);
        }
        if self.transient {
            builder = builder.transient();
        }
        builder
    }
}

/// Sends kept in flight at once by `--count`; enough to fill batches.
const SEND_WINDOW: usize = 256;

/// Lines of stdin read ahead of the sends.
const STDIN_LINES_AHEAD_MAX: usize = SEND_WINDOW;

/// The payloads to send, in order, with their index (`seq`).
enum Payloads {
    /// `count` times the same data (text gets `{seq}` replaced when
    /// `count` > 1).
    Repeat { data: Data, count: u64, next: u64 },
    /// One per line of stdin, read as the sends go (a pipeline's lines go
    /// out as they come).
    Lines {
        lines: mpsc::Receiver<std::io::Result<Vec<u8>>>,
        next: u64,
    },
}

impl Payloads {
    fn from_args(args: &SendArgs) -> anyhow::Result<Payloads> {
        let count = args.count.unwrap_or(1);
        let usage = |text: String| anyhow::Error::new(UsageError(text));
        if args.message.id.is_some() && count != 1 {
            return Err(usage(format!(
                "--id names one message; --count {count} would send {count} with one id (the broker would drop all but the first); leave out --id or --count"
            )));
        }
        if args.message.data == "-" {
            if let Some(count) = args.count {
                return Err(usage(format!(
                    "--data - sends one message per line of stdin and takes no --count (here {count}); to send all of stdin as one payload N times, use --data @/dev/stdin --count N"
                )));
            }
            if args.message.id.is_some() {
                return Err(usage(
                    "--id names one message, and --data - sends one per line of stdin; use --data @/dev/stdin to send all of stdin as one message".to_string(),
                ));
            }
        }
        match Data::from_arg(&args.message.data)? {
            Data::Stdin => Ok(Payloads::Lines {
                lines: read_lines_of_stdin(),
                next: 0,
            }),
            data => Ok(Payloads::Repeat {
                data,
                count,
                next: 0,
            }),
        }
    }

    async fn next(&mut self) -> Option<anyhow::Result<(u64, Bytes)>> {
        match self {
            Payloads::Repeat { data, count, next } => {
                if *next >= *count {
                    return None;
                }
                let seq = *next;
                *next += 1;
                let payload = match data {
                    Data::Text(text) if *count > 1 => {
                        Bytes::from(text.replace("{seq}", &seq.to_string()).into_bytes())
                    }
                    Data::Text(text) => Bytes::from(text.clone().into_bytes()),
                    Data::File(bytes) => bytes.clone(),
                    Data::Stdin => Bytes::new(),
                };
                Some(Ok((seq, payload)))
            }
            Payloads::Lines { lines, next } => match lines.recv().await? {
                Ok(line) => {
                    let seq = *next;
                    *next += 1;
                    Some(Ok((seq, Bytes::from(line))))
                }
                Err(e) => Some(Err(anyhow::Error::new(e).context("cannot read stdin"))),
            },
        }
    }

    /// How many were acknowledged, out of how many.
    fn progress(&self, acknowledged: u64) -> String {
        match self {
            Payloads::Repeat { count, .. } => format!("{acknowledged} of {count} acknowledged"),
            Payloads::Lines { next, .. } => {
                format!("{acknowledged} of {next} lines read from stdin acknowledged")
            }
        }
    }
}

/// Lines of stdin without their `\n` (or `\r\n`), read on a thread of their
/// own (stdin has no portable non-blocking read), a bounded number ahead.
fn read_lines_of_stdin() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(STDIN_LINES_AHEAD_MAX);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    if tx.blocking_send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

type Window = VecDeque<(u64, JoinHandle<courier_client::Result<Uuid>>)>;

/// What the send loop does next.
enum Step {
    Settled(Result<courier_client::Result<Uuid>, tokio::task::JoinError>),
    Payload(Option<anyhow::Result<(u64, Bytes)>>),
    Deadline,
}

/// `send` (a command) or `publish` (an event): prints `{"id", "seq"}` per
/// acknowledged message, in order.
pub async fn send(args: SendArgs, event: bool) -> anyhow::Result<()> {
    let mut payloads = Payloads::from_args(&args)?;
    let deadline = Deadline::after(args.timeout);
    let settings = Settings {
        send_timeout: args.timeout,
        ..Settings::default()
    };
    let client = conn::connect(&args.conn, settings, &deadline).await?;
    let mut window = Window::new();
    let mut acknowledged = 0u64;
    let mut all_queued = false;
    // One timer for the whole run, not one per message.
    let deadline_reached = deadline.reached();
    tokio::pin!(deadline_reached);
    let outcome = loop {
        if all_queued && window.is_empty() {
            break Ok(());
        }
        let room = !all_queued && window.len() < SEND_WINDOW;
        let waiting = !window.is_empty();
        let front = window.front_mut().map(|(_, handle)| handle);
        let step = tokio::select! {
            biased;
            () = &mut deadline_reached => Step::Deadline,
            settled = async move {
                match front {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            }, if waiting => Step::Settled(settled),
            payload = payloads.next(), if room => Step::Payload(payload),
        };
        match step {
            Step::Settled(settled) => {
                let Some((seq, _)) = window.pop_front() else {
                    continue;
                };
                match settled.context("send task failed")? {
                    Ok(id) => {
                        acknowledged += 1;
                        output::line(&serde_json::json!({"id": id.to_string(), "seq": seq}));
                    }
                    Err(e) => {
                        let progress = payloads.progress(acknowledged);
                        break Err(conn::timeout_while_away(e, &client, &args.conn, &progress));
                    }
                }
            }
            Step::Payload(None) => all_queued = true,
            Step::Payload(Some(payload)) => {
                let (seq, payload) = payload?;
                let builder = if event {
                    client.event(&args.message.name)
                } else {
                    client.command(&args.message.name)
                };
                let pending = args.message.apply(builder, payload).enqueue()?;
                window.push_back((seq, tokio::spawn(pending.wait())));
            }
            Step::Deadline => {
                // Count what was answered but not yet printed.
                while let Some((seq, handle)) = window.pop_front() {
                    if !handle.is_finished() {
                        continue;
                    }
                    if let Ok(Ok(id)) = handle.await {
                        acknowledged += 1;
                        output::line(&serde_json::json!({"id": id.to_string(), "seq": seq}));
                    }
                }
                let progress = payloads.progress(acknowledged);
                break Err(deadline.gave_up(&args.conn, client.is_connected(), &progress));
            }
        }
    };
    finish(&client, outcome.is_ok()).await;
    outcome
}

/// Closes the connection; after a failure, without waiting long for a
/// broker that may not answer.
async fn finish(client: &Client, succeeded: bool) {
    if succeeded {
        client.shutdown().await;
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
    }
}

/// `request`: prints the replies, one JSON line each, until the final one.
pub async fn request(args: RequestArgs) -> anyhow::Result<()> {
    let payload = match Data::from_arg(&args.message.data)? {
        Data::Text(text) => Bytes::from(text.into_bytes()),
        Data::File(bytes) => bytes,
        Data::Stdin => {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut all)
                .context("cannot read stdin for --data -")?;
            Bytes::from(all)
        }
    };
    let deadline = Deadline::after(Some(args.timeout));
    let client = conn::connect(&args.conn, Settings::default(), &deadline).await?;
    let builder = args
        .message
        .apply(client.command(&args.message.name), payload)
        .timeout(args.timeout);
    let mut received = 0u64;
    let progress = |received: u64| format!("{received} replies received, none final");
    let result = match builder.request_stream().await {
        Err(e) => Err(conn::timeout_while_away(
            e,
            &client,
            &args.conn,
            &progress(received),
        )),
        Ok(mut replies) => loop {
            match replies.next_reply().await {
                None => break Ok(()),
                Some(Ok(reply)) => {
                    received += 1;
                    output::line(&output::envelope(reply.message(), None));
                }
                Some(Err(e @ ClientError::Timeout(_))) => {
                    break Err(conn::timeout_while_away(
                        e,
                        &client,
                        &args.conn,
                        &progress(received),
                    ))
                }
                Some(Err(e)) => break Err(e.into()),
            }
        },
    };
    finish(&client, result.is_ok()).await;
    result
}
