//! `courier up --print-compose`: the same application as a docker-compose
//! file — the broker from the `courier` image (the repository's
//! Dockerfile), each service built from a Dockerfile in its `dir`, with
//! its instances as replicas and its token in an env file of its own
//! under `.courier/` (the compose file itself holds no secret).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use courier_manifest::Manifest;

use super::state::StateDir;

/// The broker's ports inside the compose network.
const BUS_PORT: u16 = 7700;
const HTTP_PORT: u16 = 7780;

/// Shell run before a service's `run` in its container: sets
/// COURIER_ADVERTISE to the container's first address and its PORT.
const ADVERTISE_OWN_ADDRESS: &str = "address=$(hostname -i 2>/dev/null | cut -d' ' -f1); \
     [ -n \"$address\" ] && export COURIER_ADVERTISE=\"$address:$PORT\"; ";

/// A YAML scalar: a JSON string is one, with every character escaped as
/// YAML reads it back.
fn q(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The compose file's text; writes each service's env file (its token) on
/// the way.
pub fn render(
    manifest: &Manifest,
    tokens: &BTreeMap<String, String>,
    state: &StateDir,
    scale: &BTreeMap<&str, u32>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `courier up --print-compose` from courier.toml; save it beside that file.\n\
         # The broker runs the `courier` image (docker build -t courier . in Courier's repository);\n\
         # each service is built from a Dockerfile in its directory and runs its `run` command there.\n\
         # Tokens are in .courier/<service>.env, never in this file."
    );
    out.push_str("services:\n");
    out.push_str("  broker:\n");
    let _ = writeln!(out, "    image: {}", q("courier:latest"));
    let command = [
        "serve".to_string(),
        "--listen".to_string(),
        format!("0.0.0.0:{BUS_PORT}"),
        "--http".to_string(),
        format!("0.0.0.0:{HTTP_PORT}"),
        "--data-dir".to_string(),
        "/data".to_string(),
        "--manifest".to_string(),
        "/etc/courier/manifest.toml".to_string(),
    ];
    let _ = writeln!(out, "    command: [{}]", join(&command));
    let _ = writeln!(
        out,
        "    ports: [{}, {}]",
        q(&format!("{BUS_PORT}:{BUS_PORT}")),
        q(&format!("{HTTP_PORT}:{HTTP_PORT}"))
    );
    let _ = writeln!(
        out,
        "    volumes: [{}, {}]",
        q("courier-data:/data"),
        q("./.courier/manifest.toml:/etc/courier/manifest.toml:ro")
    );
    for (name, spec) in manifest.services() {
        let Some(run) = &spec.app.run else { continue };
        let token = tokens
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("internal: no token for {name}"))?;
        state.write_env_file(name, &format!("COURIER_TOKEN={token}\n"))?;
        let replicas = scale
            .get(name.as_str())
            .copied()
            .unwrap_or(spec.app.instances);
        let _ = writeln!(out, "  {}:", q(name));
        let _ = writeln!(
            out,
            "    build: {}",
            q(spec.app.dir.as_deref().unwrap_or("."))
        );
        let command = match spec.app.http {
            // Each replica advertises its own address in the compose
            // network, which only the container knows; a service's env
            // that sets one wins, as under `courier up`.
            Some(_) if !spec.app.env.contains_key(super::ADVERTISE) => {
                format!("{ADVERTISE_OWN_ADDRESS}{run}")
            }
            _ => run.clone(),
        };
        let _ = writeln!(
            out,
            "    command: [{}, {}, {}]",
            q("sh"),
            q("-c"),
            literal(&command)
        );
        out.push_str("    environment:\n");
        let _ = writeln!(
            out,
            "      COURIER_URL: {}",
            q(&format!("broker:{BUS_PORT}"))
        );
        let _ = writeln!(out, "      COURIER_SERVICE: {}", q(name));
        if let Some(port) = spec.app.http {
            let _ = writeln!(out, "      PORT: {}", q(&port.to_string()));
            // Reachable from the other containers and the published port.
            let _ = writeln!(out, "      HOST: {}", q("0.0.0.0"));
        }
        for (key, value) in &spec.app.env {
            let _ = writeln!(out, "      {}: {}", q(key), literal(value));
        }
        let _ = writeln!(
            out,
            "    env_file: [{}]",
            q(&format!(".courier/{name}.env"))
        );
        out.push_str("    depends_on: [\"broker\"]\n");
        out.push_str("    restart: \"unless-stopped\"\n");
        let _ = writeln!(out, "    deploy:\n      replicas: {replicas}");
        if let Some(port) = spec.app.http {
            // One published port can serve one replica only.
            if replicas == 1 {
                let _ = writeln!(out, "    ports: [{}]", q(&format!("{port}:{port}")));
            }
        }
    }
    out.push_str("volumes:\n  courier-data: {}\n");
    Ok(out)
}

/// A YAML scalar compose does not interpolate: its `$` are doubled, so
/// the shell in the container sees the command as written.
fn literal(text: &str) -> String {
    q(&text.replace('$', "$$"))
}

fn join(items: &[String]) -> String {
    items.iter().map(|i| q(i)).collect::<Vec<_>>().join(", ")
}
