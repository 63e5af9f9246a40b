//! `courier bench --curves`: how the cost grows with the work, one table
//! per curve, each point a run of an existing workload at another size —
//! W7 against the backlog, W9 against idle connections, W10 against
//! subscriptions, W5b's pipelined publishing against publishers — with
//! the growth per unit fitted and judged flat, linear or superlinear.

use super::*;

/// A routing point that has not finished within this (or `--timeout`, if
/// shorter) is shown as not finished; the other curves go on.
const ROUTING_POINT_TIMEOUT: Duration = Duration::from_secs(90);
/// The backlog curve's events are small, so that 10⁷ fit on a disk.
const BACKLOG_BYTES: usize = SMALL_BYTES;
/// What one backlog event of [`BACKLOG_BYTES`] takes in the data
/// directory (measured: ~250 B with its record's framing and bookkeeping),
/// with room for a snapshot beside the log.
const DISK_BYTES_PER_EVENT: u64 = 400;
/// A curve is flat while its largest point costs at most this much more
/// than its smallest.
const FLAT_GROWTH: f64 = 0.10;
/// A curve is superlinear when the growth per unit up to its largest
/// point is more than this many times that up to the point before.
const SUPERLINEAR_FACTOR: f64 = 2.0;

/// The curves `--curves` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Curve {
    Backlog,
    Connections,
    Routing,
    Publishers,
}

impl Curve {
    const ALL: [Curve; 4] = [
        Curve::Backlog,
        Curve::Connections,
        Curve::Routing,
        Curve::Publishers,
    ];

    fn key(self) -> &'static str {
        match self {
            Curve::Backlog => "backlog",
            Curve::Connections => "connections",
            Curve::Routing => "routing",
            Curve::Publishers => "publishers",
        }
    }
}

/// The curves `--curves` picked, in their order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Curves(pub(super) Vec<Curve>);

/// `--curves`' value: `all`, or some of the curves, comma-separated.
pub(super) fn parse_curves(text: &str) -> Result<Curves, String> {
    let mut picked = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.to_ascii_lowercase().as_str() {
            "all" => picked.extend(Curve::ALL),
            named => match Curve::ALL.iter().find(|c| c.key() == named) {
                Some(&curve) => picked.push(curve),
                None => {
                    return Err(format!(
                        "unknown curve {part:?}; choose from backlog, connections, routing, publishers (comma-separated), or all"
                    ))
                }
            },
        }
    }
    if picked.is_empty() {
        return Err(
            "no curve named; write e.g. --curves backlog,routing, or --curves alone for all"
                .to_string(),
        );
    }
    picked.sort();
    picked.dedup();
    Ok(Curves(picked))
}

/// The sizes of each curve's points.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Sizes {
    pub(super) backlog: Vec<u64>,
    pub(super) connections: Vec<u64>,
    /// Services of the routing table, each with
    /// [`w10::PATTERNS_PER_SERVICE`] subscriptions.
    pub(super) services: Vec<u64>,
    pub(super) publishers: Vec<usize>,
}

impl Sizes {
    /// Full: backlog 10⁴–10⁷, connections 10²–10⁴, subscriptions
    /// 10²–10⁵, publishers 1–16; `--quick` three points of the first
    /// two up to 10⁵ and 10³, subscriptions up to 10³; `scale` multiplies
    /// the backlogs, connections and subscriptions.
    pub(super) fn new(quick: bool, scale: f64) -> Sizes {
        let scaled = |points: &[u64]| -> Vec<u64> {
            let mut out: Vec<u64> = points
                .iter()
                .map(|&p| ((p as f64 * scale).round() as u64).max(1))
                .collect();
            out.dedup();
            out
        };
        let (backlog, connections, subscriptions): (&[u64], &[u64], &[u64]) = if quick {
            (&[1_000, 10_000, 100_000], &[10, 100, 1_000], &[100, 1_000])
        } else {
            (
                &[10_000, 100_000, 1_000_000, 10_000_000],
                &[100, 1_000, 10_000],
                &[100, 1_000, 10_000, 100_000],
            )
        };
        let mut services: Vec<u64> = scaled(subscriptions)
            .into_iter()
            .map(|s| (s / w10::PATTERNS_PER_SERVICE).max(1))
            .collect();
        services.dedup();
        Sizes {
            backlog: scaled(backlog),
            connections: scaled(connections),
            services,
            publishers: vec![1, 2, 4, 8, 16],
        }
    }
}

/// One column of a curve's table.
struct Figure {
    header: &'static str,
    key: &'static str,
    /// The growth per unit is judged and shown as `slope × factor` in
    /// `slope_unit`; not judged without.
    slope: Option<(f64, &'static str)>,
}

/// A curve's table as it fills.
struct Table {
    curve: Curve,
    title: String,
    x_header: &'static str,
    x_unit: &'static str,
    figures: Vec<Figure>,
    /// Per point its size, and its figures, or why it did not finish.
    points: Vec<(u64, Result<Vec<f64>, String>)>,
}

/// What the points of one figure say about its growth.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Verdict {
    NotJudged(&'static str),
    Flat,
    Linear(f64),
    Superlinear(f64, f64),
}

impl Verdict {
    fn word(&self) -> &'static str {
        match self {
            Verdict::NotJudged(_) => "not judged",
            Verdict::Flat => "flat",
            Verdict::Linear(_) => "linear",
            Verdict::Superlinear(..) => "SUPERLINEAR",
        }
    }
}

/// The growth of `points` (size, cost; sizes rising), by the rule
/// [`RULE`] states.
pub(super) fn judge(points: &[(f64, f64)]) -> Verdict {
    let (Some(&(x1, y1)), Some(&(xn, yn))) = (points.first(), points.last()) else {
        return Verdict::NotJudged("no point finished");
    };
    if points.len() < 2 || xn <= x1 {
        return Verdict::NotJudged("fewer than 2 points finished");
    }
    if yn <= y1 * (1.0 + FLAT_GROWTH) {
        return Verdict::Flat;
    }
    let slope = (yn - y1) / (xn - x1);
    if points.len() >= 3 {
        let (xm, ym) = points[points.len() - 2];
        let below = (ym - y1) / (xm - x1);
        if ym - y1 > y1.abs() * FLAT_GROWTH && slope > below * SUPERLINEAR_FACTOR {
            return Verdict::Superlinear(slope, slope / below);
        }
    }
    Verdict::Linear(slope)
}

/// The rule [`judge`] applies, as printed.
const RULE: &str = "flat: the largest point costs at most 10 % more than the smallest; SUPERLINEAR: the growth per unit from the smallest point to the largest is over 2× that from the smallest to the second-largest (when that growth is itself over 10 %); else linear. The slope is the growth per unit from the smallest point to the largest.";

impl Table {
    fn verdicts(&self) -> Vec<(usize, Verdict)> {
        self.figures
            .iter()
            .enumerate()
            .filter(|(_, f)| f.slope.is_some())
            .map(|(i, _)| {
                let points: Vec<(f64, f64)> = self
                    .points
                    .iter()
                    .filter_map(|(x, v)| Some((*x as f64, *v.as_ref().ok()?.get(i)?)))
                    .collect();
                (i, judge(&points))
            })
            .collect()
    }

    fn verdict_text(&self, i: usize, verdict: &Verdict) -> String {
        let figure = &self.figures[i];
        let (factor, unit) = figure.slope.unwrap_or((1.0, ""));
        let slope = |s: f64| format!("{} {unit}", slope_text(s * factor));
        let how = match verdict {
            Verdict::NotJudged(why) => format!("not judged ({why})"),
            Verdict::Flat => "flat".to_string(),
            Verdict::Linear(s) => format!("linear, {}", slope(*s)),
            Verdict::Superlinear(s, times) => format!(
                "SUPERLINEAR, {} over the whole range, {times:.1}× that up to the second-largest point",
                slope(*s)
            ),
        };
        format!("- {}: {how}", figure.header)
    }

    fn text(&self) -> String {
        let mut out = format!("{}\n\n| {} |", self.title, self.x_header);
        for f in &self.figures {
            let _ = write!(out, " {} |", f.header);
        }
        out.push_str("\n| ---: |");
        for _ in &self.figures {
            out.push_str(" ---: |");
        }
        out.push('\n');
        for (x, values) in &self.points {
            let _ = write!(out, "| {} |", thousands(*x));
            match values {
                Ok(values) => {
                    for v in values {
                        let _ = write!(out, " {} |", format_value(*v));
                    }
                }
                Err(_) => {
                    out.push_str(" did not finish |");
                    for _ in 1..self.figures.len() {
                        out.push_str(" |");
                    }
                }
            }
            out.push('\n');
        }
        out.push('\n');
        for (x, values) in &self.points {
            if let Err(why) = values {
                let _ = writeln!(
                    out,
                    "- {} {}: did not finish: {why}",
                    thousands(*x),
                    self.x_unit
                );
            }
        }
        for (i, verdict) in self.verdicts() {
            out.push_str(&self.verdict_text(i, &verdict));
            out.push('\n');
        }
        out
    }

    fn json_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (x, values) in &self.points {
            let mut object = serde_json::Map::new();
            object.insert("curve".into(), json!(self.curve.key()));
            object.insert("x".into(), json!(x));
            object.insert("x_unit".into(), json!(self.x_unit));
            object.insert("finished".into(), json!(values.is_ok()));
            match values {
                Ok(values) => {
                    for (f, v) in self.figures.iter().zip(values) {
                        object.insert(f.key.into(), json!(round3(*v)));
                    }
                }
                Err(why) => {
                    object.insert("why".into(), json!(why));
                }
            }
            lines.push(Value::Object(object).to_string());
        }
        for (i, verdict) in self.verdicts() {
            let figure = &self.figures[i];
            let (factor, unit) = figure.slope.unwrap_or((1.0, ""));
            let slope = match verdict {
                Verdict::Linear(s) | Verdict::Superlinear(s, _) => json!(s * factor),
                Verdict::NotJudged(_) | Verdict::Flat => Value::Null,
            };
            lines.push(
                json!({
                    "curve": self.curve.key(),
                    "figure": figure.key,
                    "verdict": verdict.word(),
                    "slope": slope,
                    "slope_unit": unit,
                })
                .to_string(),
            );
        }
        lines
    }
}

/// Free bytes on the filesystem of `dir`, from `df` (None if it cannot
/// tell).
fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Fails unless the temp dir's filesystem has room for the largest backlog.
fn check_disk(largest: u64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir();
    let needed = largest * DISK_BYTES_PER_EVENT;
    match free_bytes(&dir) {
        Some(free) if free < needed => bail!(
            "the backlog curve writes up to {} events of {BACKLOG_BYTES} B, about {} in a data directory under {}, whose filesystem has {} free; point TMPDIR at a larger one, or run --quick",
            thousands(largest),
            bytes_text(needed),
            dir.display(),
            bytes_text(free)
        ),
        Some(_) => Ok(()),
        None => {
            progress(&format!(
                "cannot tell the free space under {} (no df?); the largest backlog needs about {}",
                dir.display(),
                bytes_text(needed)
            ));
            Ok(())
        }
    }
}

/// Runs one point within `timeout` (`None`: it did not finish); its
/// broker and data directory go when it ends, also when it is stopped.
async fn within<T>(
    timeout: Duration,
    what: &str,
    point: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Option<T>> {
    progress(&format!("{what} …"));
    let started = Instant::now();
    match tokio::time::timeout(timeout, point).await {
        Ok(done) => {
            let done = done?;
            progress(&format!(
                "{what}: done in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            Ok(Some(done))
        }
        Err(_) => Ok(None),
    }
}

fn timed_out(what: &str, timeout: Duration) -> anyhow::Error {
    anyhow!(
        "{what} did not finish within {} (--timeout) and was stopped; a stuck broker or a slow disk? Try --quick, or raise --timeout",
        humantime::format_duration(timeout)
    )
}

async fn backlog_curve(
    exe: &Path,
    plan: &Plan,
    sizes: &[u64],
    timeout: Duration,
) -> anyhow::Result<Table> {
    check_disk(sizes.iter().copied().max().unwrap_or(0))?;
    let mut table = Table {
        curve: Curve::Backlog,
        title: format!(
            "Restart and memory against the backlog (W7 with durable events of {BACKLOG_BYTES} B for an offline consumer, written pipelined, then kill -9 and restart)"
        ),
        x_header: "backlog (events)",
        x_unit: "events",
        figures: vec![
            Figure {
                header: "spawn to ready line (ms)",
                key: "ready_line_ms",
                slope: Some((1000.0, "µs per event")),
            },
            Figure {
                header: "spawn to first use (ms)",
                key: "first_use_ms",
                slope: Some((1000.0, "µs per event")),
            },
            Figure {
                header: "RSS just written (MiB)",
                key: "rss_written_mib",
                slope: Some((1024.0 * 1024.0, "B per event")),
            },
            Figure {
                header: "RSS after restart (MiB)",
                key: "rss_restarted_mib",
                slope: Some((1024.0 * 1024.0, "B per event")),
            },
        ],
        points: Vec::new(),
    };
    for &count in sizes {
        let mut point = plan.clone();
        point.w7 = count;
        point.w7_bytes = BACKLOG_BYTES;
        let what = format!("backlog curve: {} events", thousands(count));
        let measured = within(timeout, &what, async {
            let mut courier = CourierSide::start(exe).await?;
            restart::run(&mut courier, &point).await
        })
        .await
        .with_context(|| what.clone())?
        .ok_or_else(|| timed_out(&what, timeout))?;
        let figure = |metric: Metric| {
            measured
                .iter()
                .find(|(_, m, _)| *m == metric)
                .map_or(f64::NAN, |(_, _, v)| *v)
        };
        table.points.push((
            count,
            Ok(vec![
                figure(Metric::ReadyLine),
                figure(Metric::FirstConnect),
                figure(Metric::RssWithBacklog),
                figure(Metric::RssAfterRestart),
            ]),
        ));
    }
    Ok(table)
}

async fn connections_curve(
    exe: &Path,
    plan: &Plan,
    sizes: &[u64],
    timeout: Duration,
) -> anyhow::Result<Table> {
    let mut table = Table {
        curve: Curve::Connections,
        title: format!(
            "Memory and latency against idle connections (W9: subscribed connections of {} services; W4a, {} requests of {TINY_BYTES} B one at a time, before they connect and while they are)",
            w9::SERVICES,
            thousands(plan.w4a)
        ),
        x_header: "idle connections",
        x_unit: "connections",
        figures: vec![
            Figure {
                header: "server RSS with them (MiB)",
                key: "rss_mib",
                slope: Some((1024.0, "KiB per connection")),
            },
            Figure {
                header: "RSS per connection (KiB)",
                key: "rss_per_connection_kib",
                slope: None,
            },
            Figure {
                header: "W4a p99 without them (µs)",
                key: "p99_without_us",
                slope: None,
            },
            Figure {
                header: "W4a p99 with them (µs)",
                key: "p99_with_us",
                slope: Some((1000.0, "ns per connection")),
            },
        ],
        points: Vec::new(),
    };
    for &connections in sizes {
        let mut point = plan.clone();
        point.w9_connections = connections;
        let what = format!("connections curve: {} idle", thousands(connections));
        let figures = within(timeout, &what, async {
            let max = w9::connections_max(connections).to_string();
            let mut courier = CourierSide::start_with(exe, &["--connections-max", &max]).await?;
            w9::measure(&mut courier, &point).await
        })
        .await
        .with_context(|| what.clone())?
        .ok_or_else(|| timed_out(&what, timeout))?;
        table.points.push((
            connections,
            Ok(vec![
                figures.rss_with_mib,
                figures.per_connection_kib(),
                figures.p99_before,
                figures.p99_with,
            ]),
        ));
    }
    Ok(table)
}

/// W10's events per routing point: W10's own.
fn routing_events(plan: &Plan) -> u64 {
    plan.w10.max(MIN_MESSAGES)
}

/// A slope with two significant digits however small (0.0028, not 0.00).
fn slope_text(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude >= 10.0 || magnitude == 0.0 || !v.is_finite() {
        return format_value(v);
    }
    let decimals = (1.0 - magnitude.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

async fn routing_curve(
    exe: &Path,
    plan: &Plan,
    services: &[u64],
    timeout: Duration,
) -> anyhow::Result<Table> {
    let limit = ROUTING_POINT_TIMEOUT.min(timeout);
    let events = routing_events(plan);
    let mut table = Table {
        curve: Curve::Routing,
        title: format!(
            "Routing against subscriptions (W10: services of {} wildcard subscriptions each, {} transient events of {TINY_BYTES} B each matching one subscription of one service, every name new)",
            w10::PATTERNS_PER_SERVICE,
            thousands(events)
        ),
        x_header: "subscriptions",
        x_unit: "subscriptions",
        figures: vec![
            Figure {
                header: "throughput (msg/s)",
                key: "msg_per_s",
                slope: None,
            },
            Figure {
                header: "µs per event",
                key: "us_per_event",
                slope: Some((1000.0, "ns per event per subscription")),
            },
        ],
        points: Vec::new(),
    };
    for &count in services {
        let mut point = plan.clone();
        point.w10_services = count;
        point.w10 = events;
        let subscriptions = count * w10::PATTERNS_PER_SERVICE;
        let what = format!("routing curve: {} subscriptions", thousands(subscriptions));
        // A table too big for the broker shows as a point that did not
        // finish, not as the end of the command: the curve says where the
        // cost went.
        let measured = within(limit, &what, async {
            let mut courier = CourierSide::start(exe).await?;
            w10::run(&mut courier, &point).await
        })
        .await;
        let values = match measured {
            Ok(Some(m)) => {
                let rate = m.first().map_or(f64::NAN, |(_, _, v)| *v);
                Ok(vec![rate, 1e6 / rate])
            }
            Ok(None) => Err(format!(
                "not within {}; stopped",
                humantime::format_duration(limit)
            )),
            Err(e) => Err(format!("{e:#}")),
        };
        if let Err(why) = &values {
            progress(&format!("{what}: did not finish: {why}"));
        }
        table.points.push((subscriptions, values));
    }
    Ok(table)
}

async fn publishers_curve(
    exe: &Path,
    plan: &Plan,
    sizes: &[usize],
    timeout: Duration,
) -> anyhow::Result<Table> {
    let mut table = Table {
        curve: Curve::Publishers,
        title: format!(
            "Durable publishing against publishers (W5b from each connection at once: {} events of {SMALL_BYTES} B shared among them, each connection pipelined with {WINDOW} unacknowledged, after {} warm-up)",
            thousands(plan.w5b),
            thousands(plan.w5b_warmup)
        ),
        x_header: "publishers",
        x_unit: "connections",
        figures: vec![
            Figure {
                header: "throughput (msg/s)",
                key: "msg_per_s",
                slope: None,
            },
            Figure {
                header: "per publisher (msg/s)",
                key: "msg_per_s_per_publisher",
                slope: None,
            },
            Figure {
                header: "µs per event",
                key: "us_per_event",
                slope: Some((1.0, "µs per event per publisher")),
            },
        ],
        points: Vec::new(),
    };
    for &publishers in sizes {
        let what = format!("publishers curve: {publishers}");
        let rate = within(timeout, &what, async {
            let mut courier = CourierSide::start(exe).await?;
            publish::pipelined_from(&mut courier, publishers, plan.w5b, plan.w5b_warmup).await
        })
        .await
        .with_context(|| what.clone())?
        .ok_or_else(|| timed_out(&what, timeout))?;
        table.points.push((
            publishers as u64,
            Ok(vec![rate, rate / publishers as f64, 1e6 / rate]),
        ));
    }
    Ok(table)
}

/// Runs the curves and prints each table (or JSON lines) as it is done.
pub(super) async fn run(
    exe: &Path,
    curves: &[Curve],
    quick: bool,
    scale: f64,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let plan = Plan::new(quick, scale).map_err(anyhow::Error::msg)?;
    let sizes = Sizes::new(quick, scale);
    if cfg!(debug_assertions) {
        progress(
            "this is a debug build; for figures build with `cargo build --release -p courier-cli -p courier-bench`",
        );
    }
    let load_at_start = load_average();
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let work = async {
        for &curve in curves {
            let table = match curve {
                Curve::Backlog => backlog_curve(exe, &plan, &sizes.backlog, timeout).await?,
                Curve::Connections => {
                    connections_curve(exe, &plan, &sizes.connections, timeout).await?
                }
                Curve::Routing => routing_curve(exe, &plan, &sizes.services, timeout).await?,
                Curve::Publishers => {
                    publishers_curve(exe, &plan, &sizes.publishers, timeout).await?
                }
            };
            if json {
                for line in table.json_lines() {
                    println!("{line}");
                }
            } else {
                println!("{}", table.text());
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        done = work => done.map_err(|e| anyhow!("{e:#}"))?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the brokers were stopped and their data directories removed"),
    }
    let machine = Machine::detect();
    let settings = [
        format!("Verdicts: {RULE}"),
        format!(
            "One run per point, each on a fresh broker (--fsync {FSYNC}); {date}, load {load_at_start} at the start, {} at the end; {} × {}; build: {}",
            load_average(),
            machine.nproc,
            machine.cpu,
            if cfg!(debug_assertions) {
                "debug (not for figures)"
            } else {
                "release"
            }
        ),
        format!("Command: {}", command_line(std::env::args())),
    ];
    for line in settings {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_follows_the_growth_per_unit() {
        assert_eq!(
            judge(&[(1.0, 10.0), (10.0, 10.5), (100.0, 10.9)]),
            Verdict::Flat
        );
        assert_eq!(judge(&[(1.0, 10.0), (16.0, 5.0)]), Verdict::Flat, "falling");
        let linear = [(10.0, 12.0), (100.0, 30.0), (1000.0, 210.0)];
        assert!(matches!(judge(&linear), Verdict::Linear(s) if (s - 0.2).abs() < 1e-9));
        let square = [(10.0, 100.0), (100.0, 10_000.0), (1000.0, 1_000_000.0)];
        assert!(matches!(judge(&square), Verdict::Superlinear(_, t) if t > 5.0));
        // A constant that hides the growth below the top is not called
        // superlinear: there is nothing to compare the top's growth with.
        let late = [(10.0, 100.0), (100.0, 101.0), (1000.0, 300.0)];
        assert!(matches!(judge(&late), Verdict::Linear(_)));
        assert!(matches!(judge(&[(1.0, 2.0)]), Verdict::NotJudged(_)));
        assert!(matches!(judge(&[]), Verdict::NotJudged(_)));
    }

    #[test]
    fn a_small_slope_keeps_two_significant_digits() {
        assert_eq!(slope_text(0.002_8), "0.0028");
        assert_eq!(slope_text(0.17), "0.17");
        assert_eq!(slope_text(9.57), "9.6");
        assert_eq!(slope_text(61.0), "61.0");
        assert_eq!(slope_text(0.0), "0.00");
    }

    #[test]
    fn sizes_follow_the_spec_and_shrink_with_quick_and_scale() {
        let full = Sizes::new(false, 1.0);
        assert_eq!(full.backlog, [10_000, 100_000, 1_000_000, 10_000_000]);
        assert_eq!(full.connections, [100, 1_000, 10_000]);
        assert_eq!(full.services, [1, 10, 100, 1_000]);
        assert_eq!(full.publishers, [1, 2, 4, 8, 16]);
        let quick = Sizes::new(true, 1.0);
        assert_eq!(quick.backlog.last(), Some(&100_000));
        assert_eq!(quick.services, [1, 10]);
        let tiny = Sizes::new(true, 0.1);
        assert_eq!(tiny.backlog, [100, 1_000, 10_000]);
        assert_eq!(tiny.services, [1]);
    }

    #[test]
    fn curves_parse_by_name_or_all() {
        assert_eq!(parse_curves("all"), Ok(Curves(Curve::ALL.to_vec())));
        assert_eq!(
            parse_curves("routing, Backlog,routing"),
            Ok(Curves(vec![Curve::Backlog, Curve::Routing]))
        );
        assert!(parse_curves("latency").is_err());
        assert!(parse_curves(",").is_err());
    }

    #[test]
    fn a_table_shows_unfinished_points_and_judges_the_rest() {
        let table = Table {
            curve: Curve::Routing,
            title: "t".into(),
            x_header: "subscriptions",
            x_unit: "subscriptions",
            figures: vec![Figure {
                header: "µs per event",
                key: "us_per_event",
                slope: Some((1000.0, "ns per event per subscription")),
            }],
            points: vec![
                (100, Ok(vec![3.0])),
                (1_000, Ok(vec![3.1])),
                (10_000, Err("not within 1m 30s; stopped".into())),
            ],
        };
        let text = table.text();
        assert!(text.contains("| 10,000 | did not finish |"), "{text}");
        assert!(
            text.contains("- 10,000 subscriptions: did not finish: not within 1m 30s; stopped"),
            "{text}"
        );
        assert!(text.contains("- µs per event: flat"), "{text}");
        let lines = table.json_lines();
        assert_eq!(lines.len(), 4);
        assert!(
            lines[2].contains("\"finished\":false") && lines[2].contains("\"why\":"),
            "{}",
            lines[2]
        );
        assert!(lines[3].contains("\"verdict\":\"flat\""), "{}", lines[3]);
    }
}
