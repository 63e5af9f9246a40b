//! `courier`: the broker and the client tools in one binary. The command
//! line is `args.rs`; each command lives in a module of its own.

mod admin;
mod allocator;
mod args;
mod bench;
#[cfg(feature = "dev-certs")]
mod certs;
#[cfg(not(feature = "dev-certs"))]
#[path = "certs_absent.rs"]
mod certs;
mod check;
mod conn;
mod dead_letters;
mod outbox;
mod output;
mod pause;
mod registry;
mod reply;
mod send;
mod serve;
mod serve_cluster;
mod serve_limits;
mod subscribe;
mod tail;
mod token;
mod trace;
mod up;
mod verify;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};
use courier_client::Error as ClientError;

use args::{Cli, Command};

/// Exit codes, distinct per kind of failure so scripts can tell them apart.
mod exit {
    pub const FAILURE: u8 = 1;
    /// clap's code for a bad command line; also [`super::UsageError`].
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const TIMEOUT: u8 = 5;
    pub const CANNOT_LISTEN: u8 = 6;
}

/// Flags that clap accepts one by one but not together.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("courier: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            eprintln!("courier: {}", one_line(&e));
            ExitCode::from(code)
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    if let Some(client) = e.downcast_ref::<ClientError>() {
        return client.to_string();
    }
    format!("{e:#}")
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<verify::DamageFound>().is_some() {
        return verify::EXIT_DAMAGE_FOUND;
    }
    if e.downcast_ref::<UsageError>().is_some() {
        return exit::USAGE;
    }
    if let Some(gave_up) = e.downcast_ref::<conn::GaveUp>() {
        return if gave_up.unreachable {
            exit::UNREACHABLE
        } else {
            exit::TIMEOUT
        };
    }
    if let Some(client) = e.downcast_ref::<ClientError>() {
        return match client {
            ClientError::Connect { .. } => exit::UNREACHABLE,
            // Of several brokers, one that answered and refused says more
            // than the others' absence.
            ClientError::Unreachable { .. } if client.code().is_some() => exit::REFUSED,
            ClientError::Unreachable { .. } => exit::UNREACHABLE,
            ClientError::Refused { .. } => exit::REFUSED,
            ClientError::Timeout(_) => exit::TIMEOUT,
            _ => exit::FAILURE,
        };
    }
    if e.downcast_ref::<courier_server::ServerError>().is_some() {
        return exit::CANNOT_LISTEN;
    }
    exit::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::serve(*args).await,
        Command::Send(args) => send::send(args, false).await,
        Command::Publish(args) => send::send(args, true).await,
        Command::Request(args) => send::request(args).await,
        Command::Reply(args) => reply::reply(args).await,
        Command::Subscribe(args) => subscribe::subscribe(args).await,
        Command::Unsubscribe { pattern, conn } => subscribe::unsubscribe(&pattern, &conn).await,
        Command::DeadLetters(action) => dead_letters::run(action).await,
        Command::Pause(args) => pause::run(args, true).await,
        Command::Resume(args) => pause::run(args, false).await,
        Command::Token(command) => token::run(command),
        Command::Check { manifest } => check::check(&manifest),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "courier",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Verify(args) => verify::run(args),
        Command::Up(args) => up::up(args).await,
        Command::Down(args) => up::down(args).await,
        Command::DevCerts {
            dir,
            services,
            force,
        } => certs::dev_certs(&dir, services, force),
        Command::Metrics {
            admin,
            prometheus,
            http,
        } => admin::metrics(&admin, prometheus, &http).await,
        Command::Bench(args) => bench::run(args),
        Command::Tail(args) => tail::run(args).await,
        Command::OutboxRelay(args) => outbox::run(args).await,
        Command::Trace(args) => trace::run(args).await,
        Command::Register(args) => registry::register(args).await,
        Command::Deregister(args) => registry::deregister(args).await,
        Command::Heartbeat(args) => registry::heartbeat(args).await,
        Command::Watch(args) => registry::watch(args).await,
        Command::Services {
            name,
            all,
            json,
            http,
            admin,
        } => admin::services(&admin, name.as_deref(), all, json, &http).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_client::ErrorCode;

    #[test]
    fn refused_and_unreachable_have_distinct_exit_codes() {
        let refused = anyhow::Error::new(ClientError::Refused {
            code: ErrorCode::NoReceiver,
            reason: "x".into(),
        });
        let unreachable = anyhow::Error::new(ClientError::Connect {
            addr: "a".into(),
            source: std::io::Error::other("x"),
        });
        assert_eq!(exit_code(&refused), exit::REFUSED);
        assert_eq!(exit_code(&unreachable), exit::UNREACHABLE);
        let connect = |addr: &str| ClientError::Connect {
            addr: addr.into(),
            source: std::io::Error::other("x"),
        };
        let none_there = anyhow::Error::new(ClientError::Unreachable {
            failures: vec![
                ("a:1".into(), connect("a:1")),
                ("b:2".into(), connect("b:2")),
            ],
        });
        assert_eq!(exit_code(&none_there), exit::UNREACHABLE);
        let one_refused = anyhow::Error::new(ClientError::Unreachable {
            failures: vec![
                ("a:1".into(), connect("a:1")),
                (
                    "b:2".into(),
                    ClientError::Refused {
                        code: ErrorCode::Unauthorized,
                        reason: "x".into(),
                    },
                ),
            ],
        });
        assert_eq!(exit_code(&one_refused), exit::REFUSED);
    }
}
