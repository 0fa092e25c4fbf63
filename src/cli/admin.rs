//! `hoard stats`, `hoard gc` and `hoard verify`: one report each, from a running server (over
//! the Admin service) or from a stopped data dir (opened directly). Both paths end in the store's
//! own report types, so they print the same thing.
//!
//! Exit status: 0 when the command did its work; 1 when `verify` found corrupt blobs (it removed
//! them, and the report lists them); 2 when the command could not run (bad flags, no server, data
//! dir in use, a store error). 2 is also what clap uses for usage errors.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::client;
use crate::config::{ByteSize, Config};
use crate::error::Error;
use crate::proto::admin::{
    admin_client::AdminClient, GcRequest, NamespaceStats, StatsRequest, StatsResponse,
    VerifyRequest,
};
use crate::store::sled::SledStore;
use crate::store::{GcReport, Housekeeping, StoreStats, VerifyReport};

/// Where `--server` points when neither it nor `HOARD_SERVER` is given: `hoard serve`'s default.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:9092";

/// Exit status of a `verify` that found (and removed) corrupt blobs.
pub const EXIT_CORRUPT: u8 = 1;
/// Exit status of a command that could not run.
pub const EXIT_FAILED: u8 = 2;

/// The operations subcommands, flattened into `hoard`'s own.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Print what the cache holds: sizes, counts, evictions and hit rates.
    Stats(Source),
    /// Evict least-recently-used blobs now.
    ///
    /// Never evicts a blob used within storage.min_retention; also drops expired action results.
    Gc {
        /// Evict until the stored bytes are at most this, e.g. 50GiB or 0 [default: the low
        /// watermark, storage.low_watermark percent of storage.max_size].
        #[arg(long, value_name = "SIZE")]
        target: Option<ByteSize>,
        #[command(flatten)]
        source: Source,
    },
    /// Re-hash every stored blob and remove the corrupt ones; exits 1 if there were any.
    ///
    /// Also removes data no index entry names (left by a crash). Slow: it reads the whole store.
    Verify(Source),
}

/// Which store to ask: a running server, or a stopped data dir.
#[derive(Debug, Args)]
pub struct Source {
    /// A running hoard, http://HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS);
    /// HOARD_SERVER counts only without --data-dir and --config [env: HOARD_SERVER=]
    /// [default: http://127.0.0.1:9092]
    #[arg(long, value_name = "URL", conflicts_with_all = ["data_dir", "config"])]
    pub server: Option<String>,
    #[command(flatten)]
    pub connect: client::ConnectOptions,
    /// Open this data dir directly instead; hoard must not be running on it.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// With a stopped data dir: the server's config file, for its `[storage]` settings (and its
    /// data_dir when --data-dir is not given).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What to do, once the source is known.
#[derive(Clone, Copy, Debug)]
enum Operation {
    Stats,
    Gc(Option<u64>),
    Verify,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Stats => "stats",
            Operation::Gc(_) => "gc",
            Operation::Verify => "verify",
        }
    }
}

enum Report {
    /// The store's figures; from a server, also its own (`None` from a data dir).
    Stats(StoreStats, Option<Box<ServerFigures>>),
    Gc(GcReport),
    Verify(VerifyReport),
}

/// Where the report comes from.
enum Target {
    /// A tonic URI (`http://HOST:PORT`).
    Server(String),
    /// A stopped data dir, with the config it is opened with.
    DataDir(Box<Config>),
}

/// Runs one subcommand and returns the process exit status; errors are printed as one line.
pub fn main(command: AdminCommand) -> ExitCode {
    match run(command) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("hoard: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(command: AdminCommand) -> Result<ExitCode, String> {
    let (operation, source) = match command {
        AdminCommand::Stats(source) => (Operation::Stats, source),
        AdminCommand::Gc { target, source } => (Operation::Gc(target.map(|t| t.0)), source),
        AdminCommand::Verify(source) => (Operation::Verify, source),
    };
    let target = resolve(&source, std::env::var("HOARD_SERVER").ok())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let report = runtime.block_on(async {
        match &target {
            Target::Server(uri) => over_grpc(uri, &source.connect, operation).await,
            Target::DataDir(config) => on_data_dir(config, operation).await,
        }
    })?;
    let text = if source.json {
        to_json(&report)?
    } else {
        render(&report, operation)
    };
    println!("{text}");
    Ok(match &report {
        Report::Verify(r) if !r.corrupt.is_empty() => ExitCode::from(EXIT_CORRUPT),
        _ => ExitCode::SUCCESS,
    })
}

/// `--data-dir`/`--config` select a stopped data dir; otherwise the server is `--server`, then
/// `HOARD_SERVER`, then the default. (Not clap's `env`: an exported `HOARD_SERVER` must not
/// conflict with an explicit `--data-dir`.)
fn resolve(source: &Source, env_server: Option<String>) -> Result<Target, String> {
    if source.data_dir.is_some() || source.config.is_some() {
        let mut config = match &source.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(dir) = &source.data_dir {
            config.data_dir = dir.clone();
        }
        return Ok(Target::DataDir(Box::new(config)));
    }
    let server = source
        .server
        .clone()
        .or(env_server.filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    client::endpoint_uri(server.trim()).map(Target::Server)
}

async fn over_grpc(
    uri: &str,
    connect: &client::ConnectOptions,
    operation: Operation,
) -> Result<Report, String> {
    let server = client::Server::parse_with(uri, connect)?;
    let channel = server.connect().await.map_err(|e| {
        format!("{e}; is hoard serving there? (for a stopped server, use --data-dir DIR)")
    })?;
    // A verify report lists every corrupt blob; allow far more than the default 4 MiB.
    let mut client = AdminClient::new(channel).max_decoding_message_size(256 << 20);
    let failed = |status: tonic::Status| describe_status(uri, operation, &status);
    Ok(match operation {
        Operation::Stats => {
            let reply = client
                .stats(StatsRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            let server = Box::new(ServerFigures::from(&reply));
            Report::Stats(reply.into(), Some(server))
        }
        Operation::Gc(target) => Report::Gc(
            client
                .gc(GcRequest {
                    target_bytes: target,
                })
                .await
                .map_err(failed)?
                .into_inner()
                .into(),
        ),
        Operation::Verify => Report::Verify(
            client
                .verify(VerifyRequest {})
                .await
                .map_err(failed)?
                .into_inner()
                .into(),
        ),
    })
}

fn describe_status(uri: &str, operation: Operation, status: &tonic::Status) -> String {
    let what = operation.name();
    match status.code() {
        tonic::Code::Unimplemented => format!(
            "{what}: the server at {uri} does not serve hoard.admin.v1.Admin (an older hoard, or \
             not hoard)"
        ),
        code => format!(
            "{what} failed on {uri}: {code:?}: {}",
            client::status_text(status)
        ),
    }
}

async fn on_data_dir(config: &Config, operation: Operation) -> Result<Report, String> {
    let dir = &config.data_dir;
    let tiered_in_memory = config.storage.backend == crate::config::Backend::Tiered
        && config.storage.tiered.fast == crate::config::FastTier::Memory;
    if config.storage.backend == crate::config::Backend::Memory || tiered_in_memory {
        return Err(format!(
            "the config keeps blobs in memory (storage.backend or storage.tiered.fast = \"memory\"): nothing is kept on disk; ask the \
             running server instead: hoard {} --server URL",
            operation.name()
        ));
    }
    if config.storage.backend == crate::config::Backend::S3 {
        return Err(format!(
            "the config says storage.backend = \"s3\": the data is in the bucket, not the data \
             dir; ask a running server instead: hoard {} --server URL",
            operation.name()
        ));
    }
    // SledStore::open creates what is missing: a mistyped path must not become a new, empty cache.
    if !dir.join("sled").is_dir() {
        return Err(format!(
            "{} is not a hoard data dir (it has no sled/ database)",
            dir.display()
        ));
    }
    let store = SledStore::from_config(config).map_err(|e| match e {
        Error::Unavailable(message) => format!(
            "{message}; ask that server instead: hoard {} --server URL",
            operation.name()
        ),
        e => e.to_string(),
    })?;
    let failed = |e: Error| format!("{} failed on {}: {e}", operation.name(), dir.display());
    let report = match operation {
        Operation::Stats => store.stats().await.map(|s| Report::Stats(s, None)),
        Operation::Gc(target) => gc(config, &store, target).await.map(Report::Gc),
        Operation::Verify => store.verify().await.map(Report::Verify),
    };
    // Flush even after a failure: closing cleanly is what tells the next start that no crash
    // cleanup is needed.
    let flushed = store.flush().await;
    let report = report.map_err(failed)?;
    flushed.map_err(|e| format!("flushing {}: {e}", dir.display()))?;
    Ok(report)
}

/// What the Admin service's gc does: dead action results first (the namespace policy judges
/// them), then eviction.
async fn gc(config: &Config, store: &SledStore, target: Option<u64>) -> Result<GcReport, Error> {
    let policy = std::sync::Arc::new(crate::namespace::Policy::new(&config.namespaces));
    let results =
        crate::namespace::ActionResults::open(std::sync::Arc::new(store.clone()), policy).await?;
    results.gc(store, target).await
}

fn to_json(report: &Report) -> Result<String, String> {
    match report {
        Report::Stats(store, server) => serde_json::to_string(&StatsJson { store, server }),
        Report::Gc(r) => serde_json::to_string(r),
        Report::Verify(r) => serde_json::to_string(r),
    }
    .map_err(|e| format!("cannot encode the report as JSON: {e}"))
}

fn render(report: &Report, operation: Operation) -> String {
    match (report, operation) {
        (Report::Stats(s, server), _) => {
            let mut text = render_stats(s);
            text += "\n";
            text += &match server {
                Some(server) => render_server(server),
                None => format!(
                    "{:<16}only a running server counts them (--server)",
                    "per namespace"
                ),
            };
            text
        }
        (Report::Gc(r), Operation::Gc(target)) => render_gc(r, target),
        (Report::Gc(r), _) => render_gc(r, None),
        (Report::Verify(r), _) => render_verify(r),
    }
}

fn render_stats(s: &StoreStats) -> String {
    let mut lines = Vec::new();
    let mut line = |label: &str, value: String| lines.push(format!("{label:<16}{value}"));
    line(
        "blobs",
        format!("{} ({})", count(s.blobs), size(s.blob_bytes)),
    );
    line(
        "action results",
        format!(
            "{} ({})",
            count(s.action_results),
            size(s.action_result_bytes)
        ),
    );
    let used = if s.max_size > 0 {
        format!(
            "{} of {} max ({})",
            size(s.used_bytes),
            size(s.max_size),
            percent(s.used_bytes, s.max_size)
        )
    } else {
        size(s.used_bytes)
    };
    line("used", used);
    line("on disk", size(s.disk_bytes));
    line(
        "min retention",
        format!(
            "{} (blobs used more recently are never evicted)",
            duration(s.min_retention_secs)
        ),
    );
    let mut evicted = format!(
        "{} blobs ({}) since start",
        count(s.evicted_blobs),
        size(s.evicted_bytes)
    );
    if let Some(age) = s.youngest_evicted_age_secs {
        evicted += &format!("; the most recently used had been idle {}", duration(age));
        if age < s.min_retention_secs.saturating_mul(2) {
            evicted += " (close to min retention: the cache is small for its traffic)";
        }
    }
    line("evicted", evicted);
    line(
        "expired results",
        format!(
            "{} action results since start",
            count(s.expired_action_results)
        ),
    );
    line("CAS lookups", lookups(s.cas_hits, s.cas_lookups));
    line("AC lookups", lookups(s.ac_hits, s.ac_lookups));
    // The reasons with a count, so "refused since start" says what for.
    let reasons: Vec<String> = crate::store::refused::Refusal::ALL
        .iter()
        .filter(|r| r.count_in(s) > 0)
        .map(|r| format!("{} {}", count(r.count_in(s)), r.label()))
        .collect();
    let refused = match reasons.as_slice() {
        [] => format!("{} refused since start", count(s.refused_writes)),
        _ => format!(
            "{} refused since start: {}",
            count(s.refused_writes),
            reasons.join(", ")
        ),
    };
    let writes = match &s.write_refusal {
        Some(why) => format!("REFUSED: {why} ({refused})"),
        None => format!("accepted ({refused})"),
    };
    line("writes", writes);
    if let Some(queued) = s.write_behind_queue {
        line(
            "write-behind",
            format!(
                "{} blobs acknowledged, not yet in the bucket",
                count(queued)
            ),
        );
    }
    if s.cleanup_pending {
        line(
            "crash clean-up",
            "pending: the last shutdown was unclean; a running server removes what the crash \
             left behind in the background"
                .into(),
        );
    }
    lines.join("\n")
}

/// What only a running server has (its metrics, Stats fields 50+): `--json` puts these keys
/// beside the store's, with the proto's names.
#[derive(Debug, serde::Serialize)]
struct ServerFigures {
    namespaces: Vec<NamespaceStats>,
    requests: u64,
    request_errors: u64,
    latency_bounds_secs: Vec<f64>,
    latency_cumulative: Vec<u64>,
    bytes_received: Option<u64>,
    bytes_sent: Option<u64>,
    server_version: String,
    uptime_secs: u64,
}

impl From<&StatsResponse> for ServerFigures {
    fn from(r: &StatsResponse) -> Self {
        ServerFigures {
            namespaces: r.namespaces.clone(),
            requests: r.requests,
            request_errors: r.request_errors,
            latency_bounds_secs: r.latency_bounds_secs.clone(),
            latency_cumulative: r.latency_cumulative.clone(),
            bytes_received: r.bytes_received,
            bytes_sent: r.bytes_sent,
            server_version: r.server_version.clone(),
            uptime_secs: r.uptime_secs,
        }
    }
}

/// `hoard stats --json`: one object, the store's fields and (from a server) the server's.
#[derive(serde::Serialize)]
struct StatsJson<'a> {
    #[serde(flatten)]
    store: &'a StoreStats,
    #[serde(flatten)]
    server: &'a Option<Box<ServerFigures>>,
}

/// The server's lines of `hoard stats`: calls, then a table of lookups per namespace.
fn render_server(s: &ServerFigures) -> String {
    let mut out = format!(
        "{:<16}{} answered since start, {} failed ({}); hoard {}, up {}\n",
        "requests",
        count(s.requests),
        count(s.request_errors),
        percent(s.request_errors, s.requests),
        s.server_version,
        duration(s.uptime_secs),
    );
    if s.namespaces.is_empty() {
        out += &format!("{:<16}no lookups since start", "per namespace");
        return out;
    }
    let width = s
        .namespaces
        .iter()
        .map(|n| n.namespace.len().max(2))
        .max()
        .unwrap_or(0)
        .max("namespace".len());
    out += &format!(
        "per namespace (since start):\n  {:<width$}  {:>12}  {:>8}  {:>12}  {:>9}",
        "namespace", "AC lookups", "AC hits", "CAS lookups", "CAS found"
    );
    for n in &s.namespaces {
        // The default instance is the empty name: shown as "" so the row is not blank.
        let name = if n.namespace.is_empty() {
            "\"\""
        } else {
            &n.namespace
        };
        out += &format!(
            "\n  {name:<width$}  {:>12}  {:>8}  {:>12}  {:>9}",
            count(n.ac_lookups),
            percent(n.ac_hits, n.ac_lookups),
            count(n.cas_lookups),
            percent(n.cas_found, n.cas_lookups),
        );
    }
    out
}

fn render_gc(r: &GcReport, target: Option<u64>) -> String {
    let target = match target {
        Some(t) => size(t),
        None => "the low watermark".to_string(),
    };
    let outcome = if r.reached_target {
        format!("reached the target ({target})")
    } else {
        format!(
            "did not reach the target ({target}): every remaining blob was used within \
             storage.min_retention"
        )
    };
    format!(
        "evicted {} blobs ({}), dropped {} expired action results\nused {} now; {outcome}",
        count(r.evicted_blobs),
        size(r.evicted_bytes),
        count(r.expired_action_results),
        size(r.used_bytes),
    )
}

fn render_verify(r: &VerifyReport) -> String {
    let mut out = format!(
        "checked {} blobs ({})\n",
        count(r.checked_blobs),
        size(r.checked_bytes)
    );
    if r.corrupt.is_empty() {
        out += "corrupt: none\n";
    } else {
        out += &format!(
            "corrupt: {} blobs, removed (clients will upload them again):\n",
            count(r.corrupt.len() as u64)
        );
        for digest in &r.corrupt {
            out += &format!("  {digest}\n");
        }
    }
    out += &format!(
        "orphans: {} removed ({})",
        count(r.orphans_removed),
        size(r.orphan_bytes_removed)
    );
    out
}

/// `1234567` as `1,234,567`.
pub(crate) fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `1.2 GiB`.
pub(crate) fn size(bytes: u64) -> String {
    ByteSize(bytes).human().to_string()
}

pub(crate) fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

fn lookups(hits: u64, total: u64) -> String {
    if total == 0 {
        return "none since start".into();
    }
    format!(
        "{} since start, {} hits",
        count(total),
        percent(hits, total)
    )
}

/// Seconds as their two largest units: `45s`, `3h`, `1h 30m`, `2d 4h`.
pub(crate) fn duration(secs: u64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let shown: Vec<String> = parts
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if shown.is_empty() {
        "0s".into()
    } else {
        shown.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_counts_and_durations_read_well() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(1_288_490_189), "1.2 GiB");
        assert_eq!(size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(3 * 3600), "3h");
        assert_eq!(duration(5400), "1h 30m");
        assert_eq!(duration(2 * 86_400 + 4 * 3600 + 59), "2d 4h");
        assert_eq!(duration(86_400 + 30), "1d");
        assert_eq!(percent(1, 8), "12.5%");
        assert_eq!(lookups(0, 0), "none since start");
        assert_eq!(lookups(923, 1000), "1,000 since start, 92.3% hits");
    }

    fn source(server: Option<&str>, data_dir: Option<&str>) -> Source {
        Source {
            server: server.map(Into::into),
            data_dir: data_dir.map(Into::into),
            config: None,
            json: false,
            connect: client::ConnectOptions::default(),
        }
    }

    #[test]
    fn the_source_is_the_flag_then_the_environment_then_the_default() {
        let server = |s: Source, env: Option<&str>| match resolve(&s, env.map(Into::into)) {
            Ok(Target::Server(uri)) => uri,
            Ok(Target::DataDir(_)) => "data dir".into(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(server(source(None, None), None), DEFAULT_SERVER);
        assert_eq!(
            server(source(None, None), Some("grpc://10.0.0.1:9092")),
            "http://10.0.0.1:9092"
        );
        assert_eq!(
            server(
                source(Some("cache:9092"), None),
                Some("grpc://10.0.0.1:9092")
            ),
            "http://cache:9092"
        );
        // An exported HOARD_SERVER does not override an explicit data dir.
        assert_eq!(
            server(
                source(None, Some("/srv/hoard")),
                Some("grpc://10.0.0.1:9092")
            ),
            "data dir"
        );
        assert_eq!(
            server(source(Some("grpcs://cache:443"), None), None),
            "https://cache:443"
        );
        assert!(server(source(Some("unix:///run/hoard"), None), None).starts_with("error"));
    }

    #[test]
    fn reports_render_for_humans() {
        let stats = render_stats(&StoreStats {
            blobs: 1200,
            blob_bytes: 3 << 30,
            used_bytes: 3 << 30,
            max_size: 10 << 30,
            cas_lookups: 8,
            cas_hits: 6,
            min_retention_secs: 3 * 3600,
            youngest_evicted_age_secs: Some(4 * 3600),
            write_refusal: Some("every blob is within min_retention".into()),
            refused_writes: 3,
            refused_cache_full: 2,
            refused_disk_full: 1,
            cleanup_pending: true,
            ..Default::default()
        });
        assert!(
            stats.contains("3 refused since start: 2 cache_full, 1 disk_full"),
            "{stats}"
        );
        assert!(stats.contains("1,200 (3.0 GiB)"), "{stats}");
        assert!(stats.contains("3.0 GiB of 10.0 GiB max (30.0%)"), "{stats}");
        assert!(stats.contains("75.0% hits"), "{stats}");
        assert!(stats.contains("close to min retention"), "{stats}");
        assert!(stats.contains("REFUSED: every blob"), "{stats}");
        assert!(stats.contains("crash clean-up  pending"), "{stats}");

        let server = render_server(&ServerFigures {
            namespaces: vec![
                NamespaceStats {
                    namespace: "ci/main".into(),
                    ac_lookups: 1000,
                    ac_hits: 923,
                    cas_lookups: 8,
                    cas_found: 2,
                },
                NamespaceStats {
                    namespace: String::new(),
                    ..Default::default()
                },
            ],
            requests: 2000,
            request_errors: 1,
            latency_bounds_secs: vec![],
            latency_cumulative: vec![],
            bytes_received: None,
            bytes_sent: None,
            server_version: "0.1.0".into(),
            uptime_secs: 5400,
        });
        assert!(
            server.contains("2,000 answered since start, 1 failed (0.1%); hoard 0.1.0, up 1h 30m"),
            "{server}"
        );
        let rows: Vec<&str> = server.lines().skip(3).collect();
        assert_eq!(
            rows,
            [
                "  ci/main           1,000     92.3%             8      25.0%",
                "  \"\"                    0         -             0          -",
            ],
            "{server}"
        );

        let gc = render_gc(&GcReport::default(), Some(0));
        assert!(gc.contains("did not reach the target (0 B)"), "{gc}");

        let verify = render_verify(&VerifyReport {
            corrupt: vec!["ab12/70000".into()],
            ..Default::default()
        });
        assert!(verify.contains("corrupt: 1 blobs"), "{verify}");
        assert!(verify.contains("\n  ab12/70000\n"), "{verify}");
    }
}
