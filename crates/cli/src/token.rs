//! `courier token`: tokens for courier.toml, and the secret a service's
//! webhooks are signed with.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Prints a fresh token (first line) and the `sha256:…` line for courier.toml (second).
    New,
    /// Prints the secret the HTTP gateway signs a service's webhooks with
    /// (`Courier-Signature`, see the README), from the broker's webhook key.
    #[command(name = "webhook-secret")]
    WebhookSecret {
        /// The service whose requests name the webhooks (without a
        /// manifest: http).
        #[arg(long)]
        service: String,
        /// The broker's --data-dir, which holds its webhook.key.
        #[arg(long, default_value = "./courier-data")]
        data_dir: PathBuf,
        /// The broker's --webhook-key, if it was given one.
        #[arg(long, value_name = "FILE")]
        webhook_key: Option<PathBuf>,
    },
}

pub(crate) fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New => {
            let token = courier_manifest::generate_token()
                .context("cannot read random bytes from the OS")?;
            println!("{token}");
            println!("{}", courier_manifest::hash_token(&token));
            Ok(())
        }
        TokenCommand::WebhookSecret {
            service,
            data_dir,
            webhook_key,
        } => {
            let path = webhook_key.unwrap_or_else(|| data_dir.join("webhook.key"));
            let key = courier_server::WebhookKey::load(&path)?;
            println!("{}", key.secret(&service));
            Ok(())
        }
    }
}
