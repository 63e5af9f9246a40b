//! `courier up [DIR]`: the whole application of a `courier.toml` from one
//! command — checked, built, the broker and every service instance
//! started, supervised, and stopped together; `courier down [DIR]` stops
//! it from elsewhere.

mod compose;
mod state;
mod supervisor;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::sync;

use state::{Lock, StateDir};
use supervisor::{Prefixer, Spec};

/// How long the broker may take to print its ready line.
const BROKER_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The application's directory (with its courier.toml), or the
    /// manifest file itself.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Run N instances of SERVICE instead of its `instances`, e.g.
    /// `--scale worker=4`; repeat for more services.
    #[arg(long, value_name = "SERVICE=N", value_parser = parse_scale)]
    scale: Vec<(String, u32)>,
    /// The broker's bus address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: String,
    /// The broker's HTTP port (console, metrics), or `off`.
    #[arg(long, default_value = "127.0.0.1:7780")]
    http: String,
    /// Skip the services' build commands.
    #[arg(long)]
    no_build: bool,
    /// Rebuild and restart a service when its files change (its `watch`
    /// paths, default its whole `dir`, polled every second).
    #[arg(long)]
    watch: bool,
    /// Print the application as a docker-compose file instead of running
    /// it (each service's token goes to `.courier/SERVICE.env`).
    #[arg(long)]
    print_compose: bool,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The application's directory, as given to `courier up`.
    #[arg(default_value = ".")]
    dir: PathBuf,
}

fn parse_scale(text: &str) -> Result<(String, u32), String> {
    let (service, n) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not SERVICE=N (e.g. worker=4)"))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{n:?} is not a number of instances"))?;
    if n > courier_manifest::INSTANCES_MAX {
        return Err(format!(
            "{n} instances of {service}: at most {} are started",
            courier_manifest::INSTANCES_MAX
        ));
    }
    Ok((service.to_string(), n))
}

/// The application's directory and manifest file.
fn locate(given: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (dir, file) = if given.is_file() {
        let dir = given.parent().unwrap_or(Path::new(".")).to_path_buf();
        (dir, given.to_path_buf())
    } else {
        (given.to_path_buf(), given.join("courier.toml"))
    };
    if !file.is_file() {
        bail!(
            "no courier.toml in {}; write one (see the README's `courier up` section) or name the application's directory",
            dir.display()
        );
    }
    let dir =
        std::fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    Ok((dir, file))
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    // Listened for from the start: a Ctrl-C while starting stops what has
    // started, instead of killing courier up and orphaning it.
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let (app_dir, manifest_path) = locate(&args.dir)?;
    let (manifest, _) =
        courier_server::load_manifest(&manifest_path).map_err(|e| anyhow::anyhow!(e))?;
    let problems = courier_manifest::check(&manifest);
    let origin = manifest_path.display().to_string();
    // On stderr: stdout may be the compose file (--print-compose).
    for p in &problems {
        eprintln!("{}", p.display_in(&origin));
    }
    if courier_manifest::has_errors(&problems) {
        bail!(
            "{origin}: {} problem(s); fix the errors above, then run courier up again",
            problems.len()
        );
    }
    for (service, _) in &args.scale {
        if manifest.service(service).is_none() {
            bail!(
                "--scale names {service}, which {origin} does not list; its services: {}",
                manifest
                    .services()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let state = StateDir::open(&app_dir)?;
    let scale: BTreeMap<&str, u32> = args.scale.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    if args.print_compose {
        let tokens = state.tokens(&manifest)?;
        state.write_manifest(&manifest, &tokens)?;
        print!("{}", compose::render(&manifest, &tokens, &state, &scale)?);
        return Ok(());
    }
    let _lock = Lock::take(&state, &app_dir)?;
    let tokens = state.tokens(&manifest)?;
    let broker_manifest = state.write_manifest(&manifest, &tokens)?;

    if !args.no_build {
        build_all(&manifest, &app_dir).await?;
    }
    let specs = instance_specs(&manifest, &app_dir, &scale, &tokens, &args.listen)?;
    let mut labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
    labels.push("broker");
    let out = Prefixer::new(&labels);

    let (mut broker, console, broker_prefix) =
        start_broker(&args, &state, &broker_manifest, &out).await?;

    let (stop_tx, stop_rx) = sync::watch::channel(false);
    let mut running = tokio::task::JoinSet::new();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut restarts: BTreeMap<String, sync::watch::Sender<u64>> = BTreeMap::new();
    for spec in specs {
        let service = spec
            .label
            .rsplit_once('.')
            .map_or(spec.label.clone(), |(s, _)| s.to_string());
        let restart = restarts
            .entry(service.clone())
            .or_insert_with(|| sync::watch::channel(0).0)
            .subscribe();
        *counts.entry(service).or_default() += 1;
        running.spawn(supervisor::supervise(
            spec,
            out.clone(),
            stop_rx.clone(),
            restart,
        ));
    }
    if args.watch {
        let watched: Vec<Watched> = manifest
            .services()
            .iter()
            .filter_map(|(name, spec)| {
                let restart = restarts.remove(name)?;
                let dir = service_dir(&app_dir, &spec.app);
                let roots = if spec.app.watch.is_empty() {
                    vec![dir.clone()]
                } else {
                    spec.app.watch.iter().map(|p| dir.join(p)).collect()
                };
                let build = spec.app.build.clone().filter(|_| !args.no_build);
                Some(Watched {
                    name: name.clone(),
                    roots,
                    build,
                    dir,
                    restart,
                })
            })
            .collect();
        eprintln!(
            "courier up: watching {} service(s) for changes",
            watched.len()
        );
        tokio::spawn(watch_and_restart(watched, stop_rx.clone()));
    }
    let started: Vec<String> = counts.iter().map(|(s, n)| format!("{s} ×{n}")).collect();
    println!(
        "courier up: {} running on the broker at {}{}; Ctrl-C stops everything",
        if started.is_empty() {
            "no service".to_string()
        } else {
            started.join(", ")
        },
        args.listen,
        console
            .map(|c| format!(
                ", console at {c} (its admin token is `admin` in {})",
                state.tokens_path().display()
            ))
            .unwrap_or_default()
    );

    tokio::spawn(supervisor::show_status(
        counts.clone(),
        args.listen.clone(),
        tokens.get("admin").cloned(),
        stop_rx.clone(),
    ));

    let broker_gone = tokio::select! {
        _ = interrupt.recv() => false,
        _ = terminate.recv() => false,
        status = broker.wait() => {
            println!("{broker_prefix} the broker stopped ({}); stopping the services", status.map_or_else(|e| e.to_string(), |s| s.to_string()));
            true
        }
    };
    println!("courier up: stopping the services, then the broker …");
    let _ = stop_tx.send(true);
    while running.join_next().await.is_some() {}
    if !broker_gone {
        supervisor::stop(&mut broker, "broker", &out).await;
    }
    println!("courier up: stopped");
    if broker_gone {
        bail!("the broker stopped on its own; its last lines are above");
    }
    Ok(())
}

/// Where a service's commands run: its `dir`, relative to the application.
fn service_dir(app_dir: &Path, app: &courier_manifest::AppSpec) -> PathBuf {
    match &app.dir {
        Some(dir) => app_dir.join(dir),
        None => app_dir.to_path_buf(),
    }
}

/// Runs each distinct build command once, before anything starts.
async fn build_all(manifest: &courier_manifest::Manifest, app_dir: &Path) -> anyhow::Result<()> {
    let mut built: Vec<(String, PathBuf)> = Vec::new();
    for (name, spec) in manifest.services() {
        let Some(build) = &spec.app.build else {
            continue;
        };
        let dir = service_dir(app_dir, &spec.app);
        if built.contains(&(build.clone(), dir.clone())) {
            continue;
        }
        eprintln!("courier up: building {name}: {build}");
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(build)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .status()
            .await
            .with_context(|| format!("cannot run the build of {name} in {}", dir.display()))?;
        if !status.success() {
            bail!(
                "the build of {name} ({build:?} in {}) failed ({status}); fix it and run courier up again, or pass --no-build",
                dir.display()
            );
        }
        built.push((build.clone(), dir));
    }
    Ok(())
}

/// The variable an SDK service reads the address it advertises from.
pub(crate) const ADVERTISE: &str = "COURIER_ADVERTISE";

/// Every instance to start: its command, directory and environment.
fn instance_specs(
    manifest: &courier_manifest::Manifest,
    app_dir: &Path,
    scale: &BTreeMap<&str, u32>,
    tokens: &BTreeMap<String, String>,
    listen: &str,
) -> anyhow::Result<Vec<Spec>> {
    let mut specs = Vec::new();
    for (name, spec) in manifest.services() {
        let Some(run) = &spec.app.run else { continue };
        let instances = scale
            .get(name.as_str())
            .copied()
            .unwrap_or(spec.app.instances);
        let token = tokens
            .get(name)
            .with_context(|| format!("internal: no token for {name}"))?;
        for i in 1..=instances {
            let mut env = vec![
                ("COURIER_URL".to_string(), listen.to_string()),
                ("COURIER_SERVICE".to_string(), name.clone()),
                ("COURIER_TOKEN".to_string(), token.clone()),
                ("COURIER_INSTANCE".to_string(), format!("{name}.{i}")),
            ];
            if let Some(port) = spec.app.http {
                let port = u32::from(port) + i - 1;
                env.push(("PORT".to_string(), port.to_string()));
                // Not a HOST the user's shell may export.
                env.push(("HOST".to_string(), "127.0.0.1".to_string()));
                // So the registry and its DNS list where the instance
                // serves; the service's own env may say otherwise (an
                // address behind a proxy, say).
                if !spec.app.env.contains_key(ADVERTISE) {
                    env.push((ADVERTISE.to_string(), format!("127.0.0.1:{port}")));
                }
            }
            env.extend(spec.app.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            specs.push(Spec {
                label: format!("{name}.{i}"),
                command: run.clone(),
                dir: service_dir(app_dir, &spec.app),
                env,
            });
        }
    }
    Ok(specs)
}

/// Starts the broker in a process group of its own, like every service,
/// and waits for its ready line(s); returns it with the console's URL and
/// its output prefix.
async fn start_broker(
    args: &UpArgs,
    state: &StateDir,
    broker_manifest: &Path,
    out: &Prefixer,
) -> anyhow::Result<(tokio::process::Child, Option<String>, String)> {
    let exe = std::env::current_exe()
        .context("cannot find this program's own path, which courier up starts as the broker")?;
    let mut broker = tokio::process::Command::new(exe)
        .args(["serve", "--listen", &args.listen, "--http", &args.http])
        .arg("--data-dir")
        .arg(state.data_dir())
        .arg("--manifest")
        .arg(broker_manifest)
        .envs(out.plain().then_some(("NO_COLOR", "1")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the broker")?;
    let broker_prefix = out.prefix("broker");
    if let Some(err) = broker.stderr.take() {
        supervisor::forward(err, broker_prefix.clone());
    }
    let stdout = broker
        .stdout
        .take()
        .context("internal: the broker's stdout is not piped")?;
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let wanted = if args.http == "off" { 1 } else { 2 };
    let mut ready = Vec::new();
    let _ = tokio::time::timeout(BROKER_READY_TIMEOUT, async {
        while ready.len() < wanted {
            match lines_rx.recv().await {
                Some(line) => ready.push(line),
                None => return,
            }
        }
    })
    .await;
    let later_prefix = broker_prefix.clone();
    tokio::spawn(async move {
        while let Some(line) = lines_rx.recv().await {
            println!("{later_prefix} {line}");
        }
    });
    if ready.len() < wanted {
        let _ = broker.kill().await;
        bail!(
            "the broker did not start (its output is above, prefixed broker); is {} or {} in use by another broker? Pass --listen / --http",
            args.listen,
            args.http
        );
    }
    for line in &ready {
        println!("{broker_prefix} {line}");
    }
    let console = ready
        .get(1)
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .map(str::to_string);
    Ok((broker, console, broker_prefix))
}

pub async fn down(args: DownArgs) -> anyhow::Result<()> {
    let (app_dir, _) = locate(&args.dir)?;
    let lock = app_dir.join(".courier").join("up.pid");
    let Some(pid) = state::running_pid(&lock) else {
        eprintln!("courier down: nothing runs for {}", app_dir.display());
        return Ok(());
    };
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    eprintln!("courier down: asked courier up (pid {pid}) to stop …");
    let deadline = std::time::Instant::now() + supervisor::STOP_GRACE * 3;
    // Done once courier up has let go of its lock (or is gone: a zombie
    // waiting for its parent counts as gone).
    while lock.exists() && state::running_pid(&lock).is_some() {
        if std::time::Instant::now() > deadline {
            bail!(
                "courier up (pid {pid}) is still running after {}s; `kill -9 {pid}` ends it (its services then need stopping by hand)",
                (supervisor::STOP_GRACE * 3).as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("courier down: stopped");
    Ok(())
}

/// A service `--watch` looks after.
struct Watched {
    name: String,
    roots: Vec<PathBuf>,
    build: Option<String>,
    dir: PathBuf,
    restart: sync::watch::Sender<u64>,
}

/// Polls each service's files; on a change, rebuilds it (if it has a
/// build) and restarts its instances. A failed build leaves the running
/// instances alone and says so.
async fn watch_and_restart(watched: Vec<Watched>, mut stopping: sync::watch::Receiver<bool>) {
    let fingerprint =
        |roots: Vec<PathBuf>| tokio::task::spawn_blocking(move || watch::fingerprint(&roots));
    let mut last = Vec::with_capacity(watched.len());
    for w in &watched {
        last.push(fingerprint(w.roots.clone()).await.unwrap_or(0));
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(watch::POLL) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        for (w, seen) in watched.iter().zip(last.iter_mut()) {
            let now = fingerprint(w.roots.clone()).await.unwrap_or(0);
            if now == *seen {
                continue;
            }
            *seen = now;
            if let Some(build) = &w.build {
                eprintln!(
                    "courier up: {}'s files changed; rebuilding: {build}",
                    w.name
                );
                let built = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(build)
                    .current_dir(&w.dir)
                    .stdin(Stdio::null())
                    .status()
                    .await;
                match built {
                    Ok(status) if status.success() => {}
                    Ok(status) => {
                        eprintln!("courier up: the build of {} failed ({status}); its running instances stay as they are", w.name);
                        continue;
                    }
                    Err(e) => {
                        eprintln!("courier up: cannot run the build of {}: {e}", w.name);
                        continue;
                    }
                }
            }
            w.restart.send_modify(|generation| *generation += 1);
        }
    }
}
