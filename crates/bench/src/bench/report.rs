//! What is printed: the table or the JSON lines, one run's progress line,
//! and the settings after the table.

use super::*;
use serde_json::{Map, Value};

/// One line of progress, on stderr.
pub(super) fn progress(text: &str) {
    eprintln!("courier-bench: {text}");
}

/// The runs of one table row, per system.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Row {
    pub(super) workload: Workload,
    pub(super) metric: Metric,
    pub(super) target: Option<Target>,
    /// `runs[i]` is system `i`'s value per run, in run order.
    pub(super) runs: Vec<Vec<f64>>,
}

impl Row {
    pub(super) fn median(&self, systems: &[System], system: System) -> Option<f64> {
        let i = systems.iter().position(|s| *s == system)?;
        summarize(&self.runs[i]).map(|s| s.median)
    }

    /// The column the ratio and the target judge, and the column it is
    /// held against: Courier on the cluster against raw JetStream R3, else
    /// Courier against the other column (NATS, or Courier unobserved).
    pub(super) fn compared(systems: &[System]) -> Option<(System, System)> {
        if systems.contains(&System::CourierCluster) && systems.contains(&System::JetStreamR3) {
            return Some((System::CourierCluster, System::JetStreamR3));
        }
        let other = systems.iter().find(|s| **s != System::Courier)?;
        Some((System::Courier, *other))
    }

    /// The judged column's advantage over the other (see
    /// [`Row::compared`]), of the medians.
    pub(super) fn ratio(&self, systems: &[System]) -> Option<f64> {
        // Each side's share of its own W6: holding one side's against the
        // other's says nothing.
        if self.metric == Metric::ShareOfW6 {
            return None;
        }
        let (judged, other) = Row::compared(systems)?;
        ratio(
            self.metric,
            self.median(systems, judged)?,
            self.median(systems, other)?,
        )
    }

    /// The row's target; comparing Courier with itself unobserved, every
    /// figure's is "observing costs at most 5 %"; on the cluster, the
    /// durable rows' is `cluster::RATIO_MIN` of raw JetStream R3.
    pub(super) fn target(&self, systems: &[System]) -> Option<Target> {
        if systems.contains(&System::CourierUnobserved) {
            return Some(Target {
                min_ratio: Some(OBSERVED_RATIO_MIN),
                max_courier: None,
                min_courier: None,
            });
        }
        if systems.contains(&System::CourierCluster) {
            return cluster::target(self.workload, self.metric);
        }
        self.target
    }

    pub(super) fn met(&self, systems: &[System]) -> Option<bool> {
        let target = self.target(systems)?;
        if target.min_ratio.is_some() && systems.iter().all(|s| *s == System::Courier) {
            // Without a second column only the absolute part can be judged.
            let absolute = Target {
                min_ratio: None,
                ..target
            };
            return (absolute.max_courier.is_some() || absolute.min_courier.is_some())
                .then(|| absolute.met(self.median(systems, System::Courier), None))
                .flatten();
        }
        let judged = Row::compared(systems).map_or(System::Courier, |(judged, _)| judged);
        target.met(self.median(systems, judged), self.ratio(systems))
    }
}

/// Everything measured, per row and system.
#[derive(Clone, Debug)]
pub(super) struct Results {
    pub(super) systems: Vec<System>,
    pub(super) rows: Vec<Row>,
}

impl Results {
    pub(super) fn new(selected: &[Workload], systems: &[System]) -> Results {
        Results {
            systems: systems.to_vec(),
            rows: ROWS
                .iter()
                .filter(|(w, _, _)| selected.contains(w))
                // The twin rows only differ in their NATS column.
                .filter(|(w, _, _)| {
                    systems.contains(&System::Nats)
                        || !Workload::ALL.iter().any(|o| o.courier_twin() == Some(*w))
                })
                .filter(|(_, m, _)| *m != Metric::ShareOfW6 || selected.contains(&Workload::W6))
                .map(|&(workload, metric, target)| Row {
                    workload,
                    metric,
                    target,
                    runs: vec![Vec::new(); systems.len()],
                })
                .collect(),
        }
    }

    /// Files one run's measurements; those of unselected rows are dropped.
    pub(super) fn record(&mut self, system: System, measured: &[Measurement]) {
        let Some(s) = self.systems.iter().position(|x| *x == system) else {
            return;
        };
        let mut filed = Vec::new();
        for &(workload, metric, value) in measured {
            filed.push((workload, metric, value));
            if system == System::Courier {
                if let Some(twin) = workload.courier_twin() {
                    filed.push((twin, metric, value));
                }
            }
        }
        for (workload, metric, value) in filed {
            if let Some(row) = self
                .rows
                .iter_mut()
                .find(|r| r.workload == workload && r.metric == metric)
            {
                row.runs[s].push(value);
            }
            if metric == Metric::Throughput && matches!(workload, Workload::W8a | Workload::W8b) {
                self.file_share_of_w6(s, workload);
            }
        }
    }

    /// Files W8's latest run of system `s` as a share of the W6 run of
    /// the same index (W6 runs first: workloads run in their order).
    fn file_share_of_w6(&mut self, s: usize, workload: Workload) {
        let run = |w: Workload| {
            self.rows
                .iter()
                .find(|r| r.workload == w && r.metric == Metric::Throughput)
                .map(|r| &r.runs[s])
        };
        let Some(ordered) = run(workload) else {
            return;
        };
        let Some(&latest) = ordered.last() else {
            return;
        };
        let index = ordered.len() - 1;
        let Some(&unordered) = run(Workload::W6).and_then(|w6| w6.get(index)) else {
            return;
        };
        if unordered <= 0.0 {
            return;
        }
        if let Some(row) = self
            .rows
            .iter_mut()
            .find(|r| r.workload == workload && r.metric == Metric::ShareOfW6)
        {
            row.runs[s].push(100.0 * latest / unordered);
        }
    }

    /// A Markdown table (aligned, so it reads in a terminal too).
    pub(super) fn table(&self) -> String {
        let mut header = vec!["workload".to_string(), "metric".to_string()];
        let single = self.systems.len() == 1;
        for system in &self.systems {
            header.push(format!("{} (median)", system.title()));
            header.push(if single {
                "spread".to_string()
            } else {
                format!("{} spread", system.title())
            });
        }
        let compared = self.systems.len() > 1;
        if compared {
            header.push("ratio".to_string());
        }
        header.push("unit".to_string());
        header.push("target".to_string());
        header.push("met".to_string());
        let mut lines = vec![header];
        for row in &self.rows {
            let mut cells = vec![row.workload.id().to_string(), row.metric.name().to_string()];
            for runs in &row.runs {
                match summarize(runs) {
                    Some(s) if runs.len() > 1 => {
                        cells.push(format_value(s.median));
                        cells.push(format!("{}–{}", format_value(s.min), format_value(s.max)));
                    }
                    Some(s) => {
                        cells.push(format_value(s.median));
                        cells.push("— (1 run)".to_string());
                    }
                    None => {
                        cells.push("—".to_string());
                        cells.push("—".to_string());
                    }
                }
            }
            if compared {
                cells.push(
                    row.ratio(&self.systems)
                        .map_or_else(|| "—".to_string(), ratio_text),
                );
            }
            cells.push(row.metric.unit().to_string());
            cells.push(
                row.target(&self.systems)
                    .map_or_else(String::new, |t| t.text(row.metric.unit())),
            );
            cells.push(match row.met(&self.systems) {
                Some(true) => "yes".to_string(),
                Some(false) => "NO".to_string(),
                None => String::new(),
            });
            lines.push(cells);
        }
        let columns = lines[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        // Text columns left, figures (and the ratio) right.
        let figures = columns - 3;
        let right = |c: usize| c >= 2 && c < figures;
        let mut out = String::new();
        for (i, cells) in lines.iter().enumerate() {
            out.push('|');
            for (c, cell) in cells.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                if right(c) && i > 0 {
                    let _ = write!(out, " {}{cell} |", " ".repeat(pad));
                } else {
                    let _ = write!(out, " {cell}{} |", " ".repeat(pad));
                }
            }
            out.push('\n');
            if i == 0 {
                out.push('|');
                for (c, w) in widths.iter().enumerate() {
                    let dashes = "-".repeat(*w);
                    if right(c) {
                        let _ = write!(out, " {}: |", &dashes[1..]);
                    } else {
                        let _ = write!(out, " {dashes} |");
                    }
                }
                out.push('\n');
            }
        }
        out
    }

    /// One JSON object per row: `workload`, `metric`, `unit`,
    /// `higher_is_better`, the median per system under its key
    /// (`courier`, `nats`), `ratio` (Courier's advantage; with NATS),
    /// `target` and `met`, and `runs`: one object per run with each
    /// system's value (`[{"courier": …, "nats": …}, …]`).
    pub(super) fn json_lines(&self) -> Vec<String> {
        let compared = self.systems.len() > 1;
        self.rows
            .iter()
            .map(|row| {
                let mut o = Map::new();
                o.insert("workload".into(), json!(row.workload.id()));
                o.insert("metric".into(), json!(row.metric.name()));
                o.insert("unit".into(), json!(row.metric.unit()));
                o.insert(
                    "higher_is_better".into(),
                    json!(row.metric.higher_is_better()),
                );
                for (system, runs) in self.systems.iter().zip(&row.runs) {
                    let median = summarize(runs).map(|s| round3(s.median));
                    o.insert(system.key().into(), json!(median));
                }
                if compared {
                    o.insert("ratio".into(), json!(row.ratio(&self.systems).map(round3)));
                    if self.systems.contains(&System::Nats) {
                        o.insert("nats_side".into(), json!(row.workload.nats_side()));
                    }
                }
                o.insert(
                    "target".into(),
                    json!(row.target(&self.systems).map(|t| t.text(row.metric.unit()))),
                );
                o.insert("met".into(), json!(row.met(&self.systems)));
                let count = row.runs.iter().map(Vec::len).max().unwrap_or(0);
                let runs: Vec<Value> = (0..count)
                    .map(|i| {
                        let mut run = Map::new();
                        for (system, values) in self.systems.iter().zip(&row.runs) {
                            run.insert(
                                system.key().into(),
                                json!(values.get(i).copied().map(round3)),
                            );
                        }
                        Value::Object(run)
                    })
                    .collect();
                o.insert("runs".into(), Value::Array(runs));
                Value::Object(o).to_string()
            })
            .collect()
    }
}

/// `1.24×`; a ratio far below 1 keeps a digit that is not 0 (`0.004×`).
pub(super) fn ratio_text(ratio: f64) -> String {
    if ratio > 0.0 && ratio < 0.095 {
        format!("{ratio:.3}×")
    } else {
        format!("{ratio:.2}×")
    }
}

/// One line of a run's figures for the progress output.
pub(super) fn summary_line(measured: &[Measurement]) -> String {
    measured
        .iter()
        .map(|(w, m, v)| format!("{} {} {} {}", w.id(), m.name(), format_value(*v), m.unit()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The command line as typed, quoted where a shell would need it.
pub(super) fn command_line(args: impl IntoIterator<Item = String>) -> String {
    args.into_iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where, when and how the bench ran.
pub(super) struct When {
    pub(super) machine: Machine,
    pub(super) load: String,
    pub(super) date: String,
    pub(super) command: String,
}

/// What was run, how, where and when — printed after the table.
pub(super) fn settings_lines(
    args: &BenchArgs,
    plan: &Plan,
    selected: &[Workload],
    nats: Option<&nats::NatsInstall>,
    when: &When,
) -> Vec<String> {
    let When {
        machine,
        load,
        date,
        command,
    } = when;
    let mut lines = vec!["Workloads:".to_string()];
    for job in Job::for_selection(selected) {
        lines.push(format!("  {:<4} {}", job.label(), plan.describe(job)));
    }
    lines.push("Courier server:".to_string());
    lines.push(format!(
        "  courier serve --listen 127.0.0.1:<free port> --data-dir <fresh dir in {}> --fsync {FSYNC} {} (other flags at their defaults); a fresh broker and data dir per run; build: {}",
        std::env::temp_dir().display(),
        process::flags_described(if args.observability == Observability::Compare {
            &[System::Courier, System::CourierUnobserved]
        } else {
            &[System::Courier]
        }),
        if cfg!(debug_assertions) {
            "debug (not for figures)"
        } else {
            "release, jemalloc as the allocator (of the bench process too, so both sides' clients run on it)"
        }
    ));
    lines.push("Courier client:".to_string());
    lines.push(format!(
        "  courier-client SDK in the bench process, {}, one connection per publisher, subscriber, instance or requester; W1–W3 send transient events as quiet sends (the broker answers only refusals) with a flush every {} sends at 16 B and {} at 1 KiB, at most twice that past the last answered flush (about {} of encoded messages, at least {TRANSIENT_WINDOW_MIN}), and at most {} (16 B) or {} (1 KiB) ahead of the slowest receiving service (about {} of deliveries: half the broker's pause_bytes; past that it waits, woken by the receivers once they are within a quarter of it), W4 transient commands answered with a quiet transient reply; W5 publishes events no service subscribes to (kept in the log for --from replays, like a stream without consumers), W6 and W7 events for one subscribed service that is offline while they arrive; window {WINDOW} (W5–W7), consumer max_in_flight {MAX_IN_FLIGHT}, payloads {SMALL_BYTES} B (W5, W6) and {} (W7)",
        args.client_runtime.describe(machine.nproc),
        thousands(courier_transient::transient_window(W1_NAME, TINY_BYTES) as u64 / 2),
        thousands(courier_transient::transient_window(W1_NAME, LARGE_BYTES) as u64 / 2),
        bytes_text(TRANSIENT_WINDOW_BYTES as u64),
        thousands(courier_transient::transient_lead(W1_NAME, TINY_BYTES)),
        thousands(courier_transient::transient_lead(W1_NAME, LARGE_BYTES)),
        bytes_text(TRANSIENT_LEAD_BYTES as u64),
        bytes_text(LARGE_BYTES as u64)
    ));
    if let Some(nats) = nats {
        lines.extend(nats::settings(
            nats,
            &args.client_runtime.describe(machine.nproc),
        ));
        lines.push("Ratio: Courier's advantage over NATS, of the medians: Courier ÷ NATS where higher is better, NATS ÷ Courier where lower is better; above 1 means Courier leads. Target and met: Courier's goals, judged on the medians.".to_string());
        lines.push(format!(
            "Order: the runs interleave, Courier then NATS, run by run, one workload after the other; a W4 run sets up both sides at once and alternates between them in {} slices of its requests (the side second in one slice goes first in the next), so both meet the same share of the hypervisor's bursts of steal",
            w4::W4_SLICES
        ));
    }
    lines.push(format!(
        "Runs: {} per workload (median shown; spread = min–max); at most {} per run{}",
        args.runs,
        humantime::format_duration(args.timeout),
        if args.quick {
            "; --quick: message counts ÷ 20, W9's connections and W10's subscriptions ÷ 10"
        } else {
            ""
        }
    ));
    lines.push(format!(
        "Machine: nproc {}, CPU {}; load average (1, 5, 15 min) {load}",
        machine.nproc, machine.cpu
    ));
    lines.push(format!("Date: {date}"));
    lines.push(format!("Command: {command}"));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Results {
        let mut r = Results::new(&[Workload::W5a, Workload::W7b], &[System::Courier]);
        for (tput, p50) in [(1000.0, 400.0), (3000.0, 600.0), (2000.0, 500.0)] {
            r.record(
                System::Courier,
                &[
                    (Workload::W5a, Metric::Throughput, tput),
                    (Workload::W5a, Metric::LatencyP50, p50),
                    (Workload::W5a, Metric::LatencyP99, 900.0),
                    // Not selected: dropped.
                    (Workload::W7a, Metric::ReadyLine, 12.0),
                    (Workload::W7b, Metric::RssWithBacklog, 80.5),
                    (Workload::W7b, Metric::RssAfterRestart, 60.25),
                ],
            );
        }
        r
    }

    #[test]
    fn the_table_has_a_row_per_selected_metric_with_median_and_spread() {
        let table = sample().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + 5, "{table}");
        assert!(lines[0].starts_with("| workload | metric"), "{table}");
        assert!(lines[0].contains("Courier (median)") && lines[0].contains("spread"));
        assert!(
            lines[1].contains("---:"),
            "figures are right-aligned: {table}"
        );
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{table}");
        let tput = lines[2];
        assert!(tput.contains("W5a") && tput.contains("throughput"));
        assert!(tput.contains("2,000") && tput.contains("1,000–3,000") && tput.contains("msg/s"));
        assert!(
            lines[3].contains("500") && lines[3].contains("400–600") && lines[3].contains("µs")
        );
        assert!(!table.contains("W7a"));
        assert!(lines[5].contains("W7b") && lines[5].contains("80.5") && lines[5].contains("MiB"));
    }

    #[test]
    fn one_run_shows_no_spread() {
        let mut r = Results::new(&[Workload::W6], &[System::Courier]);
        r.record(
            System::Courier,
            &[(Workload::W6, Metric::Throughput, 12_345.0)],
        );
        let table = r.table();
        assert!(
            table.contains("12,345") && table.contains("— (1 run)"),
            "{table}"
        );
    }

    #[test]
    fn json_lines_carry_every_row_field() {
        let lines = sample().json_lines();
        assert_eq!(lines.len(), 5);
        let first: Value = serde_json::from_str(&lines[0]).expect("JSON");
        assert_eq!(first["workload"], "W5a");
        assert_eq!(first["metric"], "throughput");
        assert_eq!(first["unit"], "msg/s");
        assert_eq!(first["higher_is_better"], true);
        assert_eq!(first["courier"], 2000.0);
        assert_eq!(
            first["runs"],
            json!([{"courier": 1000.0}, {"courier": 3000.0}, {"courier": 2000.0}])
        );
        let p50: Value = serde_json::from_str(&lines[1]).expect("JSON");
        assert_eq!(p50["higher_is_better"], false);
        assert_eq!(p50["unit"], "µs");
        for line in &lines {
            let v: Value = serde_json::from_str(line).expect("JSON");
            assert!(v["courier"].as_f64().is_some_and(|x| x > 0.0), "{line}");
        }
    }

    #[test]
    fn comparing_with_itself_unobserved_judges_every_figure_by_the_five_percent_rule() {
        let selected = [Workload::W1a, Workload::W4a];
        let systems = [System::Courier, System::CourierUnobserved];
        let mut r = Results::new(&selected, &systems);
        r.record(
            System::Courier,
            &[
                (Workload::W1a, Metric::Throughput, 960.0),
                (Workload::W4a, Metric::LatencyP50, 110.0),
            ],
        );
        r.record(
            System::CourierUnobserved,
            &[
                (Workload::W1a, Metric::Throughput, 1000.0),
                (Workload::W4a, Metric::LatencyP50, 100.0),
            ],
        );
        let row = |w, m| {
            r.rows
                .iter()
                .find(|row| row.workload == w && row.metric == m)
                .expect("row")
        };
        let w1 = row(Workload::W1a, Metric::Throughput);
        assert_eq!(w1.ratio(&systems), Some(0.96));
        assert_eq!(w1.met(&systems), Some(true), "4 % slower observed");
        let w4 = row(Workload::W4a, Metric::LatencyP50);
        assert_eq!(w4.met(&systems), Some(false), "10 % slower observed");
        let table = r.table();
        assert!(table.contains("Courier unobserved (median)"), "{table}");
        assert!(table.contains("≥ 0.95×"), "{table}");
        let json = r.json_lines().join("\n");
        assert!(json.contains("\"courier_unobserved\":1000.0"), "{json}");
    }

    #[test]
    fn a_nats_column_adds_ratio_target_and_verdict_and_w5_fills_both_rows() {
        let selected = [Workload::W5a, Workload::W5aAlways, Workload::W7a];
        let mut r = Results::new(&selected, &[System::Courier, System::Nats]);
        for _ in 0..3 {
            r.record(
                System::Courier,
                &[
                    (Workload::W5a, Metric::Throughput, 5000.0),
                    (Workload::W7a, Metric::ReadyLine, 600.0),
                ],
            );
            r.record(
                System::Nats,
                &[
                    (Workload::W5a, Metric::Throughput, 10_000.0),
                    (Workload::W5aAlways, Metric::Throughput, 2500.0),
                    (Workload::W7a, Metric::ReadyLine, 300.0),
                ],
            );
        }
        let table = r.table();
        let row = |id: &str, metric: &str| {
            table
                .lines()
                .find(|l| l.starts_with(&format!("| {id} ")) && l.contains(metric))
                .unwrap_or_else(|| panic!("no {id} {metric} row in {table}"))
                .to_string()
        };
        assert!(table
            .lines()
            .next()
            .is_some_and(|h| h.contains("NATS (median)") && h.contains("ratio")));
        assert!(row("W5a", "throughput").contains("0.50×"), "{table}");
        let always = row("W5a-always", "throughput");
        assert!(
            always.contains("5,000") && always.contains("2.00×") && always.contains("yes"),
            "{table}"
        );
        // Restart: Courier is slower than NATS here, but the target is absolute.
        let restart = row("W7a", "ready line");
        assert!(
            restart.contains("0.50×") && restart.contains("yes"),
            "{table}"
        );
        let json: Vec<Value> = r
            .json_lines()
            .iter()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        let always = json
            .iter()
            .find(|v| v["workload"] == "W5a-always" && v["metric"] == "throughput")
            .expect("W5a-always row");
        assert_eq!(always["courier"], 5000.0);
        assert_eq!(always["nats"], 2500.0);
        assert_eq!(always["ratio"], 2.0);
        assert_eq!(always["met"], true);
        assert!(always["nats_side"]
            .as_str()
            .is_some_and(|s| s.contains("always")));
    }

    #[test]
    fn w8_rows_add_each_sides_share_of_its_own_w6_run_by_run() {
        let systems = [System::Courier, System::Nats];
        let mut r = Results::new(&[Workload::W6, Workload::W8a, Workload::W8b], &systems);
        for (courier, nats) in [(400.0, 100.0), (500.0, 120.0)] {
            r.record(
                System::Courier,
                &[(Workload::W6, Metric::Throughput, courier)],
            );
            r.record(System::Nats, &[(Workload::W6, Metric::Throughput, nats)]);
        }
        for (courier, nats) in [(300.0, 10.0), (300.0, 12.0)] {
            r.record(
                System::Courier,
                &[(Workload::W8a, Metric::Throughput, courier)],
            );
            r.record(System::Nats, &[(Workload::W8a, Metric::Throughput, nats)]);
        }
        let share = |w: Workload| {
            r.rows
                .iter()
                .find(|row| row.workload == w && row.metric == Metric::ShareOfW6)
                .expect("a share row")
        };
        let w8a = share(Workload::W8a);
        assert_eq!(w8a.runs, vec![vec![75.0, 60.0], vec![10.0, 10.0]]);
        assert_eq!(w8a.ratio(&systems), None);
        assert_eq!(
            w8a.met(&systems),
            Some(true),
            "67.5 % against at least 50 %"
        );
        assert_eq!(share(Workload::W8b).met(&systems), None, "W8b did not run");

        let without_w6 = Results::new(&[Workload::W8a], &systems);
        assert!(without_w6
            .rows
            .iter()
            .all(|row| row.metric != Metric::ShareOfW6));
    }

    #[test]
    fn ratios_far_below_one_keep_a_digit() {
        assert_eq!(ratio_text(1.236), "1.24×");
        assert_eq!(ratio_text(0.0037), "0.004×");
        assert_eq!(ratio_text(0.5), "0.50×");
    }

    #[test]
    fn command_lines_are_quoted_for_a_shell() {
        let line =
            command_line(["courier-bench", "--only", "W5a,W6", "a b", "it's"].map(String::from));
        assert_eq!(line, r"courier-bench --only W5a,W6 'a b' 'it'\''s'");
    }
}
