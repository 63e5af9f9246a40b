//! `courier-bench`: Courier's workloads against a broker it starts itself,
//! alone or beside nats-server (`--against nats`). `courier bench …` runs
//! this program with the same arguments.
//!
//! A program of its own so that the `courier` binary does not carry the
//! NATS client, the HTTP load generator or the pip step that installs
//! nats-server: the bench starts `courier serve` as a child process and
//! talks to it as any application does.

mod bench;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "courier-bench",
    version,
    about = "Measures Courier's publish, consume, request and restart figures against brokers it starts itself; prints a table (or --json lines)"
)]
struct Cli {
    #[command(flatten)]
    bench: bench::BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("courier-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench::run(cli.bench)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
