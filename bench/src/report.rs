//! The end-of-run report, as text for people or one JSON object for scripts.

use std::fmt::Write as _;

use serde::Serialize;

use super::procfs::Usage;
use super::runner::{Phase, RunOptions};
use super::stats::KindSummary;
use super::workloads::Env;

#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: String,
    pub params: String,
    pub target: String,
    pub instance: String,
    pub concurrency: usize,
    pub connections: usize,
    pub seed: u64,
    pub duration_limit_secs: Option<f64>,
    pub count_limit: Option<u64>,
    /// The server's announced batch limit (0: none announced).
    pub server_max_batch_bytes: u64,
    pub setup_secs: f64,
    /// Wall-clock time of the timed phase; rates are per second of it.
    pub elapsed_secs: f64,
    /// Workload steps run (a step may make several RPCs, e.g. `ac` and `mix`).
    pub iterations: u64,
    /// Every RPC of the timed phase.
    pub total: KindSummary,
    /// Per RPC kind.
    pub kinds: Vec<KindSummary>,
    pub error_count: u64,
    pub first_errors: Vec<String>,
    pub server: Option<ServerReport>,
    /// Why server figures are missing though --server-pid was given.
    pub server_error: Option<String>,
    /// This process's CPU time during the timed phase.
    pub client_cpu_secs: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ServerReport {
    #[serde(flatten)]
    pub usage: Usage,
    /// Server CPU per RPC, in milliseconds.
    pub cpu_ms_per_op: Option<f64>,
    /// Server CPU per GiB of payload moved, in seconds.
    pub cpu_secs_per_gib: Option<f64>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl Report {
    pub fn new(
        workload: &str,
        params: String,
        options: &RunOptions,
        env: &Env,
        phase: Phase,
    ) -> Report {
        let error_count = phase.rec.error_count();
        let first_errors = phase.rec.first_errors().to_vec();
        let (kinds, total) = phase.rec.summarize(phase.elapsed);
        let ops = total.ok + total.errors;
        let (server, server_error) = match phase.server {
            None => (None, None),
            Some(Err(e)) => (None, Some(e)),
            Some(Ok(usage)) => {
                let cpu = usage.cpu_secs;
                let report = ServerReport {
                    cpu_ms_per_op: (ops > 0).then(|| cpu * 1e3 / ops as f64),
                    cpu_secs_per_gib: (total.bytes > 0).then(|| cpu / (total.bytes as f64 / GIB)),
                    usage,
                };
                (Some(report), None)
            }
        };
        Report {
            workload: workload.to_string(),
            params,
            target: options.target.clone(),
            instance: options.instance.clone(),
            concurrency: options.concurrency,
            connections: options.connections,
            seed: options.seed,
            duration_limit_secs: options.duration.map(|d| d.as_secs_f64()),
            count_limit: options.count,
            server_max_batch_bytes: env.max_batch,
            setup_secs: phase.setup.as_secs_f64(),
            elapsed_secs: phase.elapsed.as_secs_f64(),
            iterations: phase.iterations,
            total,
            kinds,
            error_count,
            first_errors,
            server,
            server_error,
            client_cpu_secs: phase.client_cpu_secs,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "hoard-bench {} ({}) against {}{}",
            self.workload,
            self.params,
            self.target,
            if self.instance.is_empty() {
                String::new()
            } else {
                format!(", instance {:?}", self.instance)
            }
        )?;
        writeln!(
            out,
            "concurrency {} on {} connection(s), seed {}, set-up {:.1} s",
            self.concurrency, self.connections, self.seed, self.setup_secs
        )?;
        writeln!(
            out,
            "timed phase: {:.2} s, {} iteration(s), {} RPC(s): {} ok, {} failed",
            self.elapsed_secs,
            self.iterations,
            self.total.ok + self.total.errors,
            self.total.ok,
            self.total.errors
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "{:<22} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "rpc", "ok", "failed", "ops/s", "MB/s", "mean", "p50", "p90", "p99", "max"
        )?;
        let mut rows: Vec<&KindSummary> = self.kinds.iter().collect();
        if self.kinds.len() > 1 {
            rows.push(&self.total);
        }
        for k in rows {
            let lat = |f: fn(&super::stats::Latency) -> f64| {
                k.latency_ms
                    .as_ref()
                    .map_or("-".to_string(), |l| fmt_ms(f(l)))
            };
            writeln!(
                out,
                "{:<22} {:>8} {:>6} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                k.kind,
                k.ok,
                k.errors,
                k.ops_per_sec,
                if k.bytes > 0 {
                    format!("{:.1}", k.mb_per_sec)
                } else {
                    "-".to_string()
                },
                lat(|l| l.mean),
                lat(|l| l.p50),
                lat(|l| l.p90),
                lat(|l| l.p99),
                lat(|l| l.max),
            )?;
        }
        writeln!(out)?;
        if self.total.bytes > 0 {
            writeln!(
                out,
                "payload moved: {} ({:.1} MB/s)",
                fmt_bytes(self.total.bytes),
                self.total.mb_per_sec
            )?;
        }
        if let Some(s) = &self.server {
            let u = &s.usage;
            write!(
                out,
                "server pid {}: CPU {:.2} s (user {:.2}, system {:.2})",
                u.pid, u.cpu_secs, u.user_secs, u.system_secs
            )?;
            if let Some(ms) = s.cpu_ms_per_op {
                write!(out, ", {} per RPC", fmt_ms(ms))?;
            }
            if let Some(per_gib) = s.cpu_secs_per_gib {
                write!(out, ", {per_gib:.2} s per GiB")?;
            }
            writeln!(out)?;
            let mem = |b: Option<u64>| b.map_or("unknown".to_string(), fmt_bytes);
            writeln!(
                out,
                "server memory: peak RSS {} (VmHWM, whole life), largest sampled RSS {}",
                mem(u.peak_rss_bytes),
                mem(u.max_sampled_rss_bytes)
            )?;
            if let (Some(r), Some(w)) = (u.disk_read_bytes, u.disk_write_bytes) {
                writeln!(
                    out,
                    "server disk I/O: read {}, written {}",
                    fmt_bytes(r),
                    fmt_bytes(w)
                )?;
            }
        }
        if let Some(e) = &self.server_error {
            writeln!(out, "server figures unavailable: {e}")?;
        }
        if let Some(c) = self.client_cpu_secs {
            writeln!(out, "bench CPU (this process): {c:.2} s")?;
        }
        if self.error_count == 0 {
            writeln!(out, "errors: none (all data verified)")?;
        } else {
            writeln!(
                out,
                "errors: {} (first {}):",
                self.error_count,
                self.first_errors.len()
            )?;
            for e in &self.first_errors {
                writeln!(out, "  {e}")?;
            }
        }
        Ok(())
    }
}

/// A latency in milliseconds, in a readable unit.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}µs", ms * 1e3)
    } else if ms < 1e3 {
        format!("{ms:.2}ms")
    } else {
        format!("{:.2}s", ms / 1e3)
    }
}

pub fn fmt_bytes(b: u64) -> String {
    format!("{:.2}", hoard::config::ByteSize(b).human())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(fmt_ms(0.0421), "42µs");
        assert_eq!(fmt_ms(3.456), "3.46ms");
        assert_eq!(fmt_ms(1520.0), "1.52s");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(1 << 30), "1.00 GiB");
    }
}
