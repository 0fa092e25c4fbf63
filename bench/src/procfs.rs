//! Resource use of a local process (the server under test, or ourselves) from Linux's /proc.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// CPU time and disk traffic of a process at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub user_secs: f64,
    pub system_secs: f64,
    /// Bytes the process caused to be read from / written to storage (/proc/PID/io), if readable.
    pub io: Option<(u64, u64)>,
}

/// What a process used between two samples.
#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    pub pid: u32,
    pub cpu_secs: f64,
    pub user_secs: f64,
    pub system_secs: f64,
    pub disk_read_bytes: Option<u64>,
    pub disk_write_bytes: Option<u64>,
    /// Peak resident set size over the process's life (VmHWM), in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Largest resident set size seen while sampling during the timed phase, in bytes.
    pub max_sampled_rss_bytes: Option<u64>,
}

/// Clock ticks per second of /proc/PID/stat's times: `getconf CLK_TCK`, else Linux's usual 100.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Reads a process's CPU times and I/O counters.
pub fn sample(pid: u32, ticks: f64) -> Result<Sample, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let (user, system) = parse_stat(&stat).ok_or_else(|| format!("cannot parse {path}"))?;
    Ok(Sample {
        user_secs: user as f64 / ticks,
        system_secs: system as f64 / ticks,
        io: read_io(pid),
    })
}

/// utime and stime (in clock ticks) from the text of /proc/PID/stat.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    // The command name in parentheses may contain spaces; fields after it are space-separated,
    // starting with field 3 (state). utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

fn read_io(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("read_bytes:")?, field("write_bytes:")?))
}

/// A `Vm...:` line of /proc/PID/status, in bytes.
pub fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, key).map(|kib| kib * 1024)
}

fn parse_status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Usage {
    pub fn between(pid: u32, before: Sample, after: Sample, max_rss: Option<u64>) -> Usage {
        let user = after.user_secs - before.user_secs;
        let system = after.system_secs - before.system_secs;
        let io = before.io.zip(after.io);
        Usage {
            pid,
            cpu_secs: user + system,
            user_secs: user,
            system_secs: system,
            disk_read_bytes: io.map(|(b, a)| a.0.saturating_sub(b.0)),
            disk_write_bytes: io.map(|(b, a)| a.1.saturating_sub(b.1)),
            peak_rss_bytes: status_bytes(pid, "VmHWM"),
            max_sampled_rss_bytes: max_rss,
        }
    }
}

/// Samples a process's VmRSS every 100 ms in the background until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = status_bytes(pid, "VmRSS") {
                    m.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssSampler { stop, max, task }
    }

    /// Stops sampling; the largest VmRSS seen, if any was readable.
    pub async fn stop(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        Some(self.max.load(Ordering::Relaxed)).filter(|m| *m > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_command_name() {
        let stat = "1234 (my (weird) prog) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    250 75 0 0 20 0 8 0 12345 100000000 2000 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((250, 75)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_lines_in_kib() {
        let text = "Name:\thoard\nVmPeak:\t  200 kB\nVmHWM:\t    1536 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(1536));
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(1024));
        assert_eq!(parse_status_kib(text, "VmSwap"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let ticks = clock_ticks();
        assert!(ticks > 0.0);
        let s = sample(std::process::id(), ticks).unwrap();
        assert!(s.user_secs >= 0.0 && s.system_secs >= 0.0);
        assert!(status_bytes(std::process::id(), "VmRSS").unwrap() > 0);
    }
}
