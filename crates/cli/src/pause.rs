//! `courier pause` and `courier resume`: hold a service's subscription
//! (its messages wait in the broker, the backlog grows) and let it go
//! again, through the broker's `courier.subscriptions.*` commands.

use clap::Args;
use serde_json::json;

use crate::admin::admin_request;
use crate::conn::Broker;
use crate::output;

#[derive(Args)]
pub struct PauseArgs {
    /// The subscription's pattern, as the service subscribed it (e.g.
    /// 'todo.*'); without it, every subscription of the service.
    pattern: Option<String>,
    /// The service whose subscription this is.
    #[arg(long)]
    service: String,
    #[command(flatten)]
    admin: Broker,
}

/// Pauses (`pause`) or resumes the subscription; prints the broker's
/// answer: the patterns it applied to and those now paused.
pub async fn run(args: PauseArgs, pause: bool) -> anyhow::Result<()> {
    let command = if pause {
        "courier.subscriptions.pause"
    } else {
        "courier.subscriptions.resume"
    };
    let mut body = json!({ "service": args.service });
    if let Some(pattern) = args.pattern {
        body["pattern"] = json!(pattern);
    }
    output::line(&admin_request(&args.admin, command, body).await?);
    Ok(())
}
