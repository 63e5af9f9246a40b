//! `courier bench`: runs the `courier-bench` program with the same
//! arguments. The bench lives in a crate of its own (`crates/bench`), so
//! this binary links neither the NATS client nor the bench's load
//! generators.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

/// The program's name, as cargo builds it beside `courier`.
const BENCH_PROGRAM: &str = "courier-bench";
/// What tells courier-bench which `courier` to measure: this one.
const COURIER_FOR_BENCH: &str = "COURIER_BENCH_COURIER";

/// Everything after `courier bench`, handed on as it is.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// courier-bench's arguments (`courier bench --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

/// Replaces this process with `courier-bench ARGS…` (the same pid, so a
/// caller that waits for or signals `courier bench` reaches the bench);
/// returns only if that cannot start.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe()
        .context("cannot find this program's own path, which courier-bench measures")?;
    let Some(program) = locate(&me) else {
        anyhow::bail!(
            "`courier bench` runs the {BENCH_PROGRAM} program, and there is none beside {} or on the PATH; \
             build it with `cargo build --release -p courier-bench` (it lands beside courier)",
            me.display()
        );
    };
    let mut command = std::process::Command::new(&program);
    command.args(&args.args);
    if std::env::var_os(COURIER_FOR_BENCH).is_none() {
        command.env(COURIER_FOR_BENCH, &me);
    }
    let error = command.exec();
    Err(anyhow::Error::new(error).context(format!("cannot run {}", program.display())))
}

/// courier-bench beside `me`, else the first on the PATH.
fn locate(me: &Path) -> Option<PathBuf> {
    let beside = me.parent().map(|dir| dir.join(BENCH_PROGRAM));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(BENCH_PROGRAM));
    beside.into_iter().chain(on_path).find(|p| p.is_file())
}
