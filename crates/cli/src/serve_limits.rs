//! `courier serve`'s limits on connections: the deadlines every connection
//! state has, and the cap on open connections, sized from the process's
//! open-files limit, which `serve` first raises as far as it may.

use std::time::Duration;

use clap::Args;
use courier_server::ServerConfig;

/// Descriptors kept for everything but connections: the log's segment,
/// index and snapshot files, the listener, the runtime's own, and the
/// refusals in progress. At least this many, or a sixteenth of the limit.
const DESCRIPTORS_RESERVED_MIN: u64 = 128;
/// Linux's default `nr_open`: what an "unlimited" hard limit is tried as.
const OPEN_FILES_UNLIMITED_TRY: u64 = 1 << 20;

#[derive(Args, Debug, Clone)]
pub struct ServeLimits {
    /// A new connection must complete its HELLO (and TLS handshake) within
    /// this time, whether it goes silent or shuts its write side.
    #[arg(long, default_value = "10s", value_parser = crate::args::parse_duration)]
    handshake_timeout: Duration,
    /// Once a frame has begun to arrive, all of it must arrive within this
    /// time, or the connection is closed.
    #[arg(long, default_value = "30s", value_parser = crate::args::parse_duration)]
    frame_timeout: Duration,
    /// A connection that sends nothing, not even a PING, for this long is
    /// closed (the SDK pings every 10 s).
    #[arg(long, default_value = "60s", value_parser = crate::args::parse_duration)]
    keepalive_timeout: Duration,
    /// Connections open at once; more are refused with
    /// `too_many_connections`. Default: the open-files limit (raised to the
    /// hard limit at start) less what the broker needs for itself.
    #[arg(long)]
    connections_max: Option<usize>,
    /// The background scrub's read rate over the log's sealed segments
    /// (e.g. 8MiB/s; 0 turns it off): damage is found before a read needs
    /// the record, reported once and counted in `courier metrics`.
    #[arg(long, default_value = "8MiB/s", value_parser = parse_rate)]
    scrub_rate: u64,
}

/// `8MiB/s`, `512KiB/s`, `0` …: bytes per second.
fn parse_rate(text: &str) -> Result<u64, String> {
    let size = text.trim().strip_suffix("/s").unwrap_or(text.trim());
    crate::serve::parse_size(size).map_err(|e| format!("{e} (a rate such as 8MiB/s, or 0 for off)"))
}

impl ServeLimits {
    /// Raises the open-files limit and sets the deadlines and the cap (and
    /// says what the cap is and why), and the scrub of the log in
    /// `log_dir` (none for a store in memory).
    pub fn apply(&self, config: &mut ServerConfig, log_dir: Option<std::path::PathBuf>) {
        config.scrub =
            log_dir
                .filter(|_| self.scrub_rate > 0)
                .map(|log_dir| courier_server::ScrubSettings {
                    log_dir,
                    bytes_per_sec: self.scrub_rate,
                    pass_interval_ms: courier_server::SCRUB_PASS_INTERVAL_MS_DEFAULT,
                });
        config.handshake_timeout_ms = millis(self.handshake_timeout);
        config.frame_timeout_ms = millis(self.frame_timeout);
        config.keepalive_timeout_ms = millis(self.keepalive_timeout);
        let open_files = raise_open_files_limit();
        config.connections_max = match (self.connections_max, open_files) {
            (Some(max), _) => max,
            (None, Some(limit)) => connections_max_for(limit),
            (None, None) => config.connections_max,
        };
        let limit = open_files.map_or("unknown".to_string(), |l| l.to_string());
        tracing::info!(
            "connections are capped at {} (open files limit {limit}); --connections-max changes it",
            config.connections_max
        );
        if let Some(limit) = open_files {
            if config.connections_max as u64 + DESCRIPTORS_RESERVED_MIN / 2 > limit {
                tracing::warn!(
                    "--connections-max {} leaves the broker few of its {limit} open files; it may fail to open its own files under load",
                    config.connections_max
                );
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The default cap for an open-files limit: what is left after the
/// broker's own descriptors.
fn connections_max_for(open_files: u64) -> usize {
    let reserved = DESCRIPTORS_RESERVED_MIN.max(open_files / 16);
    usize::try_from(open_files.saturating_sub(reserved))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Raises the soft open-files limit to the hard one; returns the limit
/// now in force (`None` if the platform does not say).
fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    let hard = before.maximum.unwrap_or(OPEN_FILES_UNLIMITED_TRY);
    if before.current.is_some_and(|soft| soft < hard) {
        let raised = Rlimit {
            current: Some(hard),
            maximum: before.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(
                "cannot raise the open-files limit from {:?} to {hard}: {e}",
                before.current
            );
        }
    }
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_rates_read_as_bytes_per_second() {
        assert_eq!(parse_rate("8MiB/s"), Ok(8 << 20));
        assert_eq!(parse_rate("500KB/s"), Ok(500_000));
        assert_eq!(parse_rate("0"), Ok(0));
        assert!(parse_rate("fast").is_err_and(|e| e.contains("8MiB/s")));
    }

    #[test]
    fn the_default_cap_leaves_room_for_the_brokers_own_files() {
        assert_eq!(connections_max_for(256), 128);
        assert_eq!(connections_max_for(1024), 896);
        assert_eq!(connections_max_for(1 << 20), (1 << 20) - (1 << 16));
        assert_eq!(connections_max_for(10), 1);
    }
}
