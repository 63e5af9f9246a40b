//! `courier tail`: the broker's live tail over the bus — the broker's
//! `courier.tail` command, answered with a reply per accepted message for
//! as long as the command's connection lives.

use std::time::Duration;

use clap::Args;

use crate::admin::connect_admin;
use crate::conn::Broker;
use crate::output;

#[derive(Args)]
pub struct TailArgs {
    /// Names to show (`todo.*`, `todo.>`); every name when absent.
    pattern: Option<String>,
    /// Only messages this service sent or is to receive.
    #[arg(long)]
    service: Option<String>,
    /// Only commands, replies or events.
    #[arg(long, value_parser = ["command", "reply", "event"])]
    kind: Option<String>,
    /// Include each message's payload.
    #[arg(long)]
    payload: bool,
    #[command(flatten)]
    admin: Broker,
}

/// A tail runs until interrupted; the request's own deadline is only a
/// bound the SDK needs.
const TAIL_FOR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let client = connect_admin(&args.admin).await?;
    let filter = serde_json::json!({
        "pattern": args.pattern,
        "service": args.service,
        "kind": args.kind,
        "payload": args.payload,
    });
    let mut replies = client
        .command("courier.tail")
        .json(&filter)?
        .timeout(TAIL_FOR)
        .request_stream()
        .await?;
    loop {
        tokio::select! {
            reply = replies.next_reply() => {
                let Some(reply) = reply else { break };
                let reply = reply?;
                let body: serde_json::Value = reply.json()?;
                match reply.name() {
                    "courier.tail.line" => output::line(&body),
                    "courier.tail.started" => eprintln!(
                        "courier: tailing {} (Ctrl-C to stop)",
                        body["pattern"].as_str().unwrap_or(">")
                    ),
                    "courier.tail.dropped" => eprintln!(
                        "courier: the tail fell behind; {} message(s) not shown",
                        body["dropped"]
                    ),
                    other => eprintln!("courier: unexpected reply {other} to courier.tail"),
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.shutdown().await;
    Ok(())
}
