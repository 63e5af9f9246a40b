//! The broker's own commands (`courier.*`), asked as a request and
//! answered with one reply; `courier metrics` and `courier services`.

use courier_client::http as http_get;

use crate::conn::{self, Broker, Conn};
use crate::{output, registry};

/// Sends a `courier.*` command to the broker and returns its reply's payload.
pub(crate) async fn admin_request(
    admin: &Broker,
    name: &str,
    args: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    Ok(admin_request_named(admin, name, args).await?.1)
}

/// Like [`admin_request`], with the reply's name (its outcome).
pub(crate) async fn admin_request_named(
    admin: &Broker,
    name: &str,
    args: serde_json::Value,
) -> anyhow::Result<(String, serde_json::Value)> {
    let client = connect_admin(admin).await?;
    let reply = client.command(name).json(&args)?.request().await;
    client.shutdown().await;
    let reply = reply?;
    Ok((reply.name().to_string(), reply.json()?))
}

/// A connection for the broker's own commands.
pub(crate) async fn connect_admin(admin: &Broker) -> anyhow::Result<courier_client::Client> {
    conn::connect(
        &Conn::admin(admin),
        conn::Settings::default(),
        &conn::Deadline::after(None),
    )
    .await
}

/// `courier metrics`: the broker's counters as one JSON object, or with
/// `prometheus` the text of its HTTP port's `/metrics`.
pub(crate) async fn metrics(admin: &Broker, prometheus: bool, http: &str) -> anyhow::Result<()> {
    if prometheus {
        let text = http_get::get(http, "/metrics", admin.token.as_deref()).await?;
        print!("{text}");
        return Ok(());
    }
    output::line(&admin_request(admin, "courier.metrics", serde_json::json!({})).await?);
    Ok(())
}

/// `courier services`: every service, one JSON line each; with a name,
/// `--all` or `--json`, the registry's instances from the HTTP port.
pub(crate) async fn services(
    admin: &Broker,
    name: Option<&str>,
    all: bool,
    json: bool,
    http: &str,
) -> anyhow::Result<()> {
    if name.is_some() || json || all {
        return registry::show(name, all, json, http, admin.token.as_deref()).await;
    }
    let client = connect_admin(admin).await?;
    let reply = client
        .command("courier.services.list")
        .json(&serde_json::json!({}))?
        .request()
        .await;
    client.shutdown().await;
    let reply = reply?;
    let listing: serde_json::Value = reply.json()?;
    // On a cluster, nodes that did not answer in time.
    if let Some((_, nodes)) = reply
        .message()
        .headers
        .iter()
        .find(|(key, _)| key == "courier-partial")
    {
        eprintln!(
            "courier: node(s) {nodes} did not answer in time: their instances are missing below; ask again, or through another node"
        );
    }
    for service in listing.as_array().into_iter().flatten() {
        output::line(service);
    }
    Ok(())
}
