//! `courier register|deregister|heartbeat|watch` and `courier services
//! NAME`: the service registry through the broker's HTTP port.

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use courier_client::http as http_get;

use crate::output;

/// The broker's HTTP port, where the registry answers.
#[derive(Args, Clone)]
pub struct HttpPort {
    /// The broker's HTTP port.
    #[arg(long, env = "COURIER_HTTP", default_value = "127.0.0.1:7780")]
    pub http: String,
    /// A token of the broker's manifest, when it has one: an `[admin]`
    /// token for changes; a service's token is enough for lookups (`watch`).
    #[arg(long, env = "COURIER_TOKEN")]
    pub token: Option<String>,
}

#[derive(Args)]
pub struct RegisterArgs {
    /// The service's name (a DNS label: letters, digits, '-', '_').
    name: String,
    /// Where the instance serves.
    #[arg(long, value_name = "HOST:PORT")]
    address: String,
    /// How to check it: http://…, tcp://HOST:PORT or ttl:30s (default:
    /// none, always passing).
    #[arg(long)]
    check: Option<String>,
    /// How often the check runs.
    #[arg(long, default_value = "5s")]
    interval: String,
    /// How long a check may take.
    #[arg(long, default_value = "2s")]
    timeout: String,
    /// Metadata, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// The instance id (default: one is made up and printed).
    #[arg(long)]
    id: Option<String>,
    /// Consecutive agreeing results before the state changes.
    #[arg(long, default_value_t = 2)]
    flap_threshold: u32,
    /// Removed after being critical this long (`0s`: never).
    #[arg(long, default_value = "1m")]
    deregister_after: String,
    #[command(flatten)]
    port: HttpPort,
}

#[derive(Args)]
pub struct InstanceArgs {
    name: String,
    id: String,
    #[command(flatten)]
    port: HttpPort,
}

#[derive(Args)]
pub struct WatchArgs {
    name: String,
    /// Every instance with its state, not only healthy ones.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    port: HttpPort,
}

pub async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let mut meta = serde_json::Map::new();
    for pair in &args.meta {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--meta {pair:?} needs KEY=VALUE");
        };
        meta.insert(k.to_string(), Value::String(v.to_string()));
    }
    let body = json!({
        "address": args.address,
        "check": args.check,
        "interval": args.interval,
        "timeout": args.timeout,
        "meta": meta,
        "id": args.id,
        "flap_threshold": args.flap_threshold,
        "deregister_after": args.deregister_after,
    });
    let answer = http_get::request(
        "POST",
        &args.port.http,
        &format!("/v1/services/{}", args.name),
        args.port.token.as_deref(),
        Some(&body.to_string()),
    )
    .await?;
    let answer: Value = serde_json::from_str(&answer).context("the broker's answer is not JSON")?;
    println!("{}", answer["id"].as_str().unwrap_or_default());
    Ok(())
}

pub async fn deregister(args: InstanceArgs) -> anyhow::Result<()> {
    http_get::request(
        "DELETE",
        &args.port.http,
        &format!("/v1/services/{}/{}", args.name, args.id),
        args.port.token.as_deref(),
        None,
    )
    .await?;
    Ok(())
}

pub async fn heartbeat(args: InstanceArgs) -> anyhow::Result<()> {
    http_get::request(
        "POST",
        &args.port.http,
        &format!("/v1/services/{}/{}/heartbeat", args.name, args.id),
        args.port.token.as_deref(),
        None,
    )
    .await?;
    Ok(())
}

/// Prints the instances now, then one JSON line each time they change.
pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let all = if args.all { "&all=1" } else { "" };
    let mut last: Option<Value> = None;
    let mut index: Option<u64> = None;
    loop {
        let path = match index {
            None => format!("/v1/services/{}?x=1{all}", args.name),
            Some(i) => format!("/v1/services/{}?index={i}&wait=60s{all}", args.name),
        };
        let answer = http_get::get(&args.port.http, &path, args.port.token.as_deref()).await?;
        let answer: Value =
            serde_json::from_str(&answer).context("the broker's answer is not JSON")?;
        index = answer["index"].as_u64();
        // The index moves with every service's changes; only this one's
        // instances changing is news here.
        let instances = answer["instances"].clone();
        if last.as_ref() != Some(&instances) {
            output::line(&answer);
            last = Some(instances);
        }
    }
}

/// `courier services NAME`: its instances, a table or `--json`.
pub async fn show(
    name: Option<&str>,
    all: bool,
    as_json: bool,
    http: &str,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let Some(name) = name else {
        let answer = http_get::get(http, "/v1/registry", token).await?;
        let answer: Value =
            serde_json::from_str(&answer).context("the broker's answer is not JSON")?;
        output::line(&answer);
        return Ok(());
    };
    let path = format!("/v1/services/{name}{}", if all { "?all=1" } else { "" });
    let answer = http_get::get(http, &path, token).await?;
    let answer: Value = serde_json::from_str(&answer).context("the broker's answer is not JSON")?;
    if as_json {
        output::line(&answer);
        return Ok(());
    }
    println!("{:<40} {:<24} {:<9} CHECK", "ID", "ADDRESS", "HEALTH");
    for i in answer["instances"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:<24} {:<9} {}",
            i["id"].as_str().unwrap_or_default(),
            i["address"].as_str().unwrap_or_default(),
            i["health"].as_str().unwrap_or_default(),
            i["check"].as_str().unwrap_or_default(),
        );
    }
    Ok(())
}
