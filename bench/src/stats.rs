//! What the workers record (latencies, bytes, errors per operation kind) and the summary made of
//! it at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// How many error messages are kept (the count covers them all).
const KEPT_ERRORS: usize = 5;

/// One worker's record; merged into one at the end.
#[derive(Default)]
pub struct Recorder {
    kinds: BTreeMap<&'static str, KindRecord>,
    error_count: u64,
    first_errors: Vec<String>,
}

#[derive(Default)]
struct KindRecord {
    /// Latencies of successful operations, in nanoseconds.
    latencies: Vec<u64>,
    errors: u64,
    bytes: u64,
}

impl Recorder {
    /// A successful operation that moved `bytes` payload bytes.
    pub fn ok(&mut self, kind: &'static str, latency: Duration, bytes: u64) {
        let k = self.kinds.entry(kind).or_default();
        k.latencies
            .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
        k.bytes += bytes;
    }

    /// A failed operation (transport error, error status, timeout or wrong data).
    pub fn error(&mut self, kind: &'static str, message: String) {
        self.kinds.entry(kind).or_default().errors += 1;
        self.error_count += 1;
        if self.first_errors.len() < KEPT_ERRORS {
            self.first_errors.push(format!("{kind}: {message}"));
        }
    }

    pub fn error_count(&self) -> u64 {
        self.error_count
    }

    pub fn first_errors(&self) -> &[String] {
        &self.first_errors
    }

    pub fn merge(&mut self, other: Recorder) {
        for (kind, rec) in other.kinds {
            let k = self.kinds.entry(kind).or_default();
            k.latencies.extend(rec.latencies);
            k.errors += rec.errors;
            k.bytes += rec.bytes;
        }
        self.error_count += other.error_count;
        for e in other.first_errors {
            if self.first_errors.len() < KEPT_ERRORS {
                self.first_errors.push(e);
            }
        }
    }

    /// Per-kind and total figures over a timed phase of `elapsed`.
    pub fn summarize(self, elapsed: Duration) -> (Vec<KindSummary>, KindSummary) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mut all = KindRecord::default();
        let mut kinds = Vec::new();
        for (name, mut rec) in self.kinds {
            kinds.push(summarize_kind(name, &mut rec, secs));
            all.latencies.extend(rec.latencies);
            all.errors += rec.errors;
            all.bytes += rec.bytes;
        }
        let total = summarize_kind("all", &mut all, secs);
        (kinds, total)
    }
}

/// Figures for one kind of operation (or all of them).
#[derive(Clone, Debug, Serialize)]
pub struct KindSummary {
    pub kind: String,
    pub ok: u64,
    pub errors: u64,
    /// Completed operations (ok and failed) per second of the timed phase.
    pub ops_per_sec: f64,
    pub bytes: u64,
    /// Payload bytes of successful operations per second, in 10^6 bytes.
    pub mb_per_sec: f64,
    /// Latencies of successful operations, in milliseconds.
    pub latency_ms: Option<Latency>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

fn summarize_kind(name: &str, rec: &mut KindRecord, secs: f64) -> KindSummary {
    rec.latencies.sort_unstable();
    let ok = rec.latencies.len() as u64;
    KindSummary {
        kind: name.to_string(),
        ok,
        errors: rec.errors,
        ops_per_sec: (ok + rec.errors) as f64 / secs,
        bytes: rec.bytes,
        mb_per_sec: rec.bytes as f64 / 1e6 / secs,
        latency_ms: latency(&rec.latencies),
    }
}

/// Mean and percentiles of sorted nanosecond latencies, in milliseconds.
fn latency(sorted: &[u64]) -> Option<Latency> {
    let max = *sorted.last()?;
    let ms = |ns: u64| ns as f64 / 1e6;
    let sum: u128 = sorted.iter().map(|&n| u128::from(n)).sum();
    Some(Latency {
        mean: sum as f64 / sorted.len() as f64 / 1e6,
        p50: ms(percentile(sorted, 50.0)),
        p90: ms(percentile(sorted, 90.0)),
        p99: ms(percentile(sorted, 99.0)),
        max: ms(max),
    })
}

/// Nearest-rank percentile of a sorted, non-empty slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        let v = [10, 20, 30];
        assert_eq!(percentile(&v, 50.0), 20);
        assert_eq!(percentile(&v, 90.0), 30);
    }

    #[test]
    fn summaries_count_ops_bytes_and_errors() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for ms in 1..=10 {
            a.ok("read", Duration::from_millis(ms), 1_000_000);
        }
        b.ok("write", Duration::from_millis(4), 2_000_000);
        for i in 0..7 {
            b.error("write", format!("boom {i}"));
        }
        a.merge(b);
        assert_eq!(a.error_count(), 7);
        assert_eq!(a.first_errors().len(), KEPT_ERRORS);
        assert_eq!(a.first_errors()[0], "write: boom 0");

        let (kinds, total) = a.summarize(Duration::from_secs(2));
        assert_eq!(kinds.len(), 2);
        let read = &kinds[0];
        assert_eq!((read.kind.as_str(), read.ok, read.errors), ("read", 10, 0));
        assert_eq!(read.ops_per_sec, 5.0);
        assert_eq!(read.mb_per_sec, 5.0);
        let lat = read.latency_ms.clone().unwrap();
        assert_eq!((lat.p50, lat.p90, lat.max), (5.0, 9.0, 10.0));
        assert!((lat.mean - 5.5).abs() < 1e-9);
        let write = &kinds[1];
        assert_eq!((write.ok, write.errors), (1, 7));
        assert_eq!(write.ops_per_sec, 4.0);
        assert_eq!((total.ok, total.errors, total.bytes), (11, 7, 12_000_000));
        assert_eq!(total.ops_per_sec, 9.0);
    }

    #[test]
    fn no_successes_means_no_latency() {
        let mut r = Recorder::default();
        r.error("x", "down".into());
        let (kinds, total) = r.summarize(Duration::from_secs(1));
        assert_eq!(kinds[0].latency_ms, None);
        assert_eq!(total.latency_ms, None);
    }
}
