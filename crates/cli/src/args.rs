//! The command line: `courier`'s commands and the value parsers they share.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use courier_client::StartFrom;

use crate::conn::{Broker, Conn};
use crate::dead_letters::DeadLetters;
use crate::serve::ServeArgs;
use crate::token::TokenCommand;
use crate::{bench, outbox, pause, registry, reply, send, subscribe, tail, trace, up, verify};

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Courier: commands, replies and events between services"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Runs the broker.
    Serve(Box<ServeArgs>),
    /// Sends a command; prints {"id", "seq"} per accepted message.
    Send(send::SendArgs),
    /// Publishes an event; prints {"id", "seq"} per accepted message.
    Publish(send::SendArgs),
    /// Sends a command and prints its replies, one JSON line each.
    Request(send::RequestArgs),
    /// Acts as a responder: replies to every NAME command it receives.
    Reply(reply::ReplyArgs),
    /// Receives for the service: subscribes it to PATTERN and prints each
    /// delivery (commands and events), acking it.
    ///
    /// The subscription belongs to the service (--service): it stays after
    /// this command exits, and messages wait for it until `courier
    /// unsubscribe`. A wildcard receives commands too, not only events:
    /// `subscribe '>' --service X` makes X a receiver of every command (as
    /// its manifest allows), beside each command's own receiver — X gets
    /// its own copy of each and acks it, its backlog grows while nothing
    /// reads it, and a command with no other receiver is accepted instead
    /// of refused. Watching traffic without becoming a receiver is for a
    /// non-intrusive tail, a separate command still to come.
    Subscribe(subscribe::SubscribeArgs),
    /// Removes the service's subscription to PATTERN.
    Unsubscribe {
        pattern: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Inspects, replays or purges a service's dead letters.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadLetters),
    /// Lists services: subscriptions, instances, backlog, dead letters.
    /// With NAME (or --json), the registry's instances of it (healthy
    /// ones; --all for every one with its state) from the HTTP port.
    Services {
        /// A service whose registered instances to list.
        name: Option<String>,
        /// Every instance with its state, not only healthy ones.
        #[arg(long)]
        all: bool,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// The broker's HTTP port (with NAME or --json).
        #[arg(long, env = "COURIER_HTTP", default_value = "127.0.0.1:7780")]
        http: String,
        #[command(flatten)]
        admin: Broker,
    },
    /// Pauses a service's subscription: its messages wait in the broker
    /// (the backlog grows) until `courier resume`.
    Pause(pause::PauseArgs),
    /// Resumes a paused subscription: what waited is delivered.
    Resume(pause::PauseArgs),
    /// Registers an instance off the bus (a database, an HTTP API) and
    /// prints its id.
    Register(registry::RegisterArgs),
    /// Removes a registered instance.
    Deregister(registry::InstanceArgs),
    /// Passes an instance's TTL check.
    Heartbeat(registry::InstanceArgs),
    /// Prints a service's instances, then one JSON line per change.
    Watch(registry::WatchArgs),
    /// Measures durable publish, consume and restart against a broker it
    /// starts itself; prints a table (or --json lines). Runs the
    /// courier-bench program (beside this one, or on the PATH) with these
    /// arguments: `courier bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench(bench::BenchArgs),
    /// Publishes a database's outbox (courier-outbox, PostgreSQL or
    /// SQLite) to the broker: rows leave the outbox only once the broker
    /// accepted them. Several relays may share one PostgreSQL database.
    #[command(name = "outbox-relay")]
    OutboxRelay(outbox::OutboxRelayArgs),
    /// Follows everything the broker accepts, replies included, as one JSON
    /// line per message, without receiving anything (admin only). A tail
    /// that cannot keep up skips lines and says how many on stderr.
    Tail(tail::TailArgs),
    /// Shows an activity's causal tree: each message under the one it was
    /// sent while handling, with every delivery, its timings and outcome
    /// (admin only). Without an id, lists recent activities.
    Trace(trace::TraceArgs),
    /// Prints the broker's counters as one JSON object, or with
    /// --prometheus every metric of its HTTP port's /metrics.
    Metrics {
        #[command(flatten)]
        admin: Broker,
        /// Print the Prometheus text of the broker's HTTP port instead.
        #[arg(long)]
        prometheus: bool,
        /// The broker's HTTP port (with --prometheus).
        #[arg(long, env = "COURIER_HTTP", default_value = "127.0.0.1:7780")]
        http: String,
    },
    /// Tokens for courier.toml.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Writes a development CA, a broker certificate for localhost and a
    /// client certificate (subject CN=NAME) per service into DIR.
    #[command(name = "dev-certs")]
    DevCerts {
        /// Where to write the PEM files.
        dir: PathBuf,
        /// A service to make a client certificate for (repeatable;
        /// default: web, todo, admin).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Reads a stopped broker's whole log (every record, index and the
    /// snapshot) and prints every damaged range; exit 7 if there is any.
    Verify(verify::VerifyArgs),
    /// Runs a whole application from its courier.toml: checks it, builds
    /// it, starts the broker and every service instance, restarts what
    /// crashes, and stops everything on Ctrl-C.
    Up(up::UpArgs),
    /// Stops the `courier up` running for a directory.
    Down(up::DownArgs),
    /// Validates an application's manifest; one line per problem.
    Check {
        /// The manifest, e.g. courier.toml.
        manifest: PathBuf,
    },
    /// Prints a shell completion script, e.g.
    /// `courier completions bash > /etc/bash_completion.d/courier`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `beginning`, `end`, or an RFC 3339 time such as `2026-11-24T12:00:00Z`.
pub(crate) fn parse_start(text: &str) -> Result<StartFrom, String> {
    match text {
        "beginning" => Ok(StartFrom::Beginning),
        "end" => Ok(StartFrom::New),
        time => {
            let at = humantime::parse_rfc3339_weak(time).map_err(|e| {
                format!("{time:?} is not beginning, end or an RFC 3339 time like 2026-11-24T12:00:00Z: {e}")
            })?;
            let nanos = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("{time:?} is before 1970"))?
                .as_nanos();
            Ok(StartFrom::Time(nanos.min(u128::from(u64::MAX)) as u64))
        }
    }
}

/// `500ms`, `5s`, `2m`, `1h`, `7d`, plain seconds, or what `humantime`
/// reads (`1h 30m`, `2days`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor = match unit {
        "ms" => Some(0.001),
        "" | "s" => Some(1.0),
        "m" => Some(60.0),
        "h" => Some(3600.0),
        "d" => Some(86_400.0),
        _ => None,
    };
    let simple = factor.zip(number.parse::<f64>().ok());
    let Some((factor, value)) = simple else {
        return humantime::parse_duration(text).map_err(|e| {
            format!("{text:?} is not a duration ({e}); write e.g. 500ms, 5s, 2m, 1h or 7d")
        });
    };
    Duration::try_from_secs_f64(value * factor).map_err(|_| {
        format!(
            "{text:?} is too long a duration; the longest is {} seconds (about 584 billion years)",
            u64::MAX
        )
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        // Long but representable: fine (a deadline that far is no deadline).
        assert_eq!(
            parse_duration("10000000000d"),
            Ok(Duration::from_secs(864_000_000_000_000))
        );
        // Beyond a Duration: a clear error, not a panic.
        for huge in [
            "99999999999999999999999s",
            "1e400",
            "9999999999999999999999999years",
        ] {
            let error = parse_duration(huge).expect_err(huge);
            assert!(error.contains(huge), "{error}");
        }
        let error = parse_duration("99999999999999999999999s").expect_err("too long");
        assert!(error.contains("too long"), "{error}");
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn client_and_admin_commands_take_the_same_connection_flags() {
        let flags = [
            "--url",
            "broker.example:7700",
            "--token",
            "crr_x",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "web.pem",
            "--tls-key",
            "web-key.pem",
        ];
        for command in [
            &["unsubscribe", "todo.*"][..],
            &["send", "todo.create"],
            &["pause", "--service", "todo"],
            &["dead-letters", "list", "--service", "todo"],
            &["metrics"],
            &["tail"],
        ] {
            let line = ["courier"].iter().chain(command).chain(&flags);
            if let Err(e) = Cli::try_parse_from(line) {
                panic!("{command:?}: {e}");
            }
        }
    }
}
