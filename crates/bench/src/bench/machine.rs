//! The machine the bench runs on: CPU, load, stolen time, a process's RSS.

use super::*;

// ---------------------------------------------------------------------------
// The machine

pub(super) struct Machine {
    pub(super) nproc: usize,
    pub(super) cpu: String,
}

impl Machine {
    pub(super) fn detect() -> Machine {
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| cpu_model(&info))
            .unwrap_or_else(|| "unknown (no model name in /proc/cpuinfo)".to_string());
        Machine { nproc, cpu }
    }
}

/// The 1, 5 and 15 minute load averages, from /proc (Linux): other work on
/// the machine skews the figures, so they are printed with them.
pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The machine's CPU time so far, from the first line of /proc/stat
/// (Linux), in clock ticks: all of it, and what the hypervisor gave to
/// other guests ("steal"). On a VM, stolen time slows a run unevenly (the
/// latency tails most), so every run reports its share.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct CpuTimes {
    pub(super) total: u64,
    pub(super) steal: u64,
}

impl CpuTimes {
    pub(super) fn read() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`;
    /// guest time is already counted in user.
    pub(super) fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().next()?;
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let steal = *ticks.get(7)?;
        Some(CpuTimes {
            total: ticks.iter().sum(),
            steal,
        })
    }

    /// The ticks from `earlier` to these.
    pub(super) fn since(self, earlier: CpuTimes) -> Option<CpuTimes> {
        Some(CpuTimes {
            total: self.total.checked_sub(earlier.total)?,
            steal: self.steal.checked_sub(earlier.steal)?,
        })
    }

    /// The percentage of these ticks that was stolen.
    pub(super) fn steal_percent(self) -> Option<f64> {
        (self.total > 0).then(|| self.steal as f64 * 100.0 / self.total as f64)
    }

    /// The percentage of the CPU time since `earlier` that was stolen.
    pub(super) fn steal_percent_since(self, earlier: CpuTimes) -> Option<f64> {
        self.since(earlier)?.steal_percent()
    }
}

/// ", CPU steal 3.2 %" for a progress line; empty where /proc/stat is not.
pub(super) fn steal_text(earlier: Option<CpuTimes>, now: Option<CpuTimes>) -> String {
    match (earlier, now) {
        (Some(earlier), Some(now)) => now
            .steal_percent_since(earlier)
            .map_or_else(String::new, |p| format!(", CPU steal {p:.1} %")),
        _ => String::new(),
    }
}

/// The first `model name` of /proc/cpuinfo.
pub(super) fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_string())
    })
}

/// Resident memory of a process in MiB, from /proc (Linux).
pub(super) fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}; measuring RSS needs Linux's /proc"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS line in {path}"))?;
    Ok(kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_steal_comes_from_the_first_line_of_proc_stat() {
        let before = CpuTimes::parse(
            "cpu  1376099 0 291928 2720251 68097 0 42531 47586 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n",
        )
        .expect("parsed");
        assert_eq!(
            before,
            CpuTimes {
                total: 1376099 + 291928 + 2720251 + 68097 + 42531 + 47586,
                steal: 47586
            }
        );
        let after = CpuTimes {
            total: before.total + 1000,
            steal: before.steal + 250,
        };
        assert_eq!(after.steal_percent_since(before), Some(25.0));
        assert_eq!(before.steal_percent_since(before), None, "no time passed");
        assert_eq!(steal_text(Some(before), Some(after)), ", CPU steal 25.0 %");
        assert_eq!(steal_text(None, Some(after)), "");
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 3\n"), None, "no steal column");
    }

    #[test]
    fn cpu_model_comes_from_the_first_model_name() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("flags: x"), None);
    }
}
