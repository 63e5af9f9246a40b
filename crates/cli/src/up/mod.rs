//! `courier up`: the whole application from its `courier.toml` — check,
//! build, the broker, every service instance — and `courier down`.
//!
//! - [`config`]: the manifest's services, `--scale`/`--port`, the state
//!   kept in `.courier/` beside the file (tokens, the broker's manifest,
//!   its data, the lock).
//! - [`supervisor`]: the processes, each in its own process group:
//!   started, restarted with backoff, stopped services first, broker last.
//! - [`output`]: prefixed, coloured lines (`todo.1 | …`).
//! - [`compose`]: the same application as a docker-compose file.

mod compose;
mod config;
mod output;
mod supervisor;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

pub use config::StateDir;

/// `courier up`.
#[derive(Args)]
pub struct UpArgs {
    /// The application's directory (holding courier.toml), or the file.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Where the broker listens for services.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// The broker's HTTP port: the console, /metrics, /healthz.
    #[arg(long, default_value = "127.0.0.1:7780")]
    pub http: SocketAddr,
    /// Run this many instances of a service instead of its `instances`:
    /// SERVICE=N (repeatable).
    #[arg(long = "scale", value_name = "SERVICE=N", value_parser = config::parse_scale)]
    pub scale: Vec<(String, u32)>,
    /// Advertise this HTTP port for a service instead of its `http_port`:
    /// SERVICE=PORT (repeatable).
    #[arg(long = "port", value_name = "SERVICE=PORT", value_parser = config::parse_port)]
    pub ports: Vec<(String, u16)>,
    /// Rebuild and restart a service when a file under its `watch` paths
    /// (default: its directory) changes.
    #[arg(long)]
    pub watch: bool,
    /// Print a docker-compose file for the application instead of running
    /// it (tokens go to .courier/compose.env, not into the file).
    #[arg(long)]
    pub print_compose: bool,
}

/// `courier down`.
#[derive(Args)]
pub struct DownArgs {
    /// The application's directory (holding courier.toml), or the file.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let app = config::App::load(&args.dir, &args.scale, &args.ports)?;
    let state = StateDir::prepare(&app)?;
    if args.print_compose {
        print!("{}", compose::render(&app, &state)?);
        return Ok(());
    }
    supervisor::run(app, state, &args).await
}

pub async fn down(args: DownArgs) -> anyhow::Result<()> {
    let manifest = config::manifest_path(&args.dir)?;
    supervisor::down(&manifest).await
}
