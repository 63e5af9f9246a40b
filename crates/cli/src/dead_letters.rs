//! `courier dead-letters`: list, show, replay and purge a service's dead
//! letters through the broker's `courier.dead-letters.*` commands.

use clap::{Args, Subcommand};

use crate::admin::admin_request;
use crate::conn::Broker;
use crate::output;

#[derive(Args, Clone)]
pub(crate) struct DeadLetterTarget {
    /// The service whose dead letters these are.
    #[arg(long)]
    pub(crate) service: String,
    #[command(flatten)]
    pub(crate) admin: Broker,
}

#[derive(Subcommand)]
pub(crate) enum DeadLetters {
    /// One JSON line per dead letter.
    List(DeadLetterTarget),
    /// One dead letter with its whole message.
    Show {
        id: u64,
        #[command(flatten)]
        target: DeadLetterTarget,
    },
    /// Puts a dead letter back in the service's queue.
    Replay {
        id: u64,
        #[command(flatten)]
        target: DeadLetterTarget,
    },
    /// Deletes the service's dead letters (or only --id).
    Purge {
        #[arg(long)]
        id: Option<u64>,
        #[command(flatten)]
        target: DeadLetterTarget,
    },
}

pub(crate) async fn run(action: DeadLetters) -> anyhow::Result<()> {
    use serde_json::json;
    match action {
        DeadLetters::List(t) => {
            let listing = admin_request(
                &t.admin,
                "courier.dead-letters.list",
                json!({"service": t.service}),
            )
            .await?;
            for letter in listing.as_array().into_iter().flatten() {
                output::line(letter);
            }
        }
        DeadLetters::Show { id, target: t } => {
            output::line(
                &admin_request(
                    &t.admin,
                    "courier.dead-letters.show",
                    json!({"service": t.service, "id": id}),
                )
                .await?,
            );
        }
        DeadLetters::Replay { id, target: t } => {
            output::line(
                &admin_request(
                    &t.admin,
                    "courier.dead-letters.replay",
                    json!({"service": t.service, "id": id}),
                )
                .await?,
            );
        }
        DeadLetters::Purge { id, target: t } => {
            let mut args = json!({"service": t.service});
            if let Some(id) = id {
                args["id"] = json!(id);
            }
            output::line(&admin_request(&t.admin, "courier.dead-letters.purge", args).await?);
        }
    }
    Ok(())
}
