//! `hoard-bench`: a load generator for any REAPI v2 endpoint (hoard or another server).
//!
//! A binary of its own, so the server does not carry it: it uses the `hoard` library only for the
//! generated proto types, the size and duration parsers and [`hoard::client`]'s connect logic.
//!
//! - this file: command-line arguments and the order of a run (connect, ask Capabilities, set up
//!   the workload untimed, run the timed phase, report);
//! - [`runner`]: connections, the concurrent timed loop, CPU/RSS sampling of the server;
//! - [`workloads`]: what each workload does and verifies;
//! - [`stats`]: latencies, bytes and errors, and their summary;
//! - [`report`]: the human-readable and JSON output;
//! - [`data`]: deterministic pseudo-random blob contents;
//! - [`procfs`]: CPU time and memory of a local process from /proc;
//! - [`ceilings`]: the `ceilings` subcommand, which measures this machine's own limits instead.
//!
//! It only ever connects to the `--target` it is given (`ceilings`: only to itself on 127.0.0.1).

mod ceilings;
mod data;
mod procfs;
mod report;
mod runner;
mod stats;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use hoard::config::ByteSize;
use runner::{RunOptions, Runner};
use workloads::{
    ActionCache, BatchRead, BatchUpdate, Fill, FindMissing, Mix, ReadLarge, WriteLarge,
};

/// The same allocator as the server's (`src/main.rs`): the client's own CPU use stays as it was
/// when the load generator was a subcommand of the server binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hoard-bench",
    version,
    about = "Load-test a REAPI endpoint (hoard or another server); see hoard's README \"Load generator\""
)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn main() -> ExitCode {
    match bench(Cli::parse().bench) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("hoard-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Arguments of `hoard-bench`; the options before the workload apply to every workload.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The REAPI endpoint, grpc://HOST:PORT (or http://HOST:PORT), grpcs://HOST:PORT for TLS.
    /// Required.
    #[arg(long, global = true)]
    pub target: Option<String>,
    #[command(flatten)]
    pub connect: hoard::client::ConnectOptions,
    /// Instance name sent with every request.
    #[arg(long, global = true, default_value = "")]
    pub instance: String,
    /// Concurrent tasks issuing requests.
    #[arg(long, global = true, default_value_t = 1)]
    pub concurrency: usize,
    /// gRPC connections the tasks share (HTTP/2 multiplexes the tasks over them, as Bazel does).
    #[arg(long, global = true, default_value_t = 1)]
    pub connections: usize,
    /// How long the timed phase runs, e.g. 10s, 500ms, 2m [default: 10s unless --count].
    #[arg(long, global = true, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many iterations in total (a write, a batch, an Update+Get pair, an
    /// action); with --duration, whichever comes first.
    #[arg(long, global = true)]
    pub count: Option<u64>,
    /// PID of a local server process: report its CPU time and memory during the timed phase.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seed of the generated data [default: random]. Reusing a seed against the same server
    /// makes the "new" blobs and actions already stored.
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Longest wait for any one RPC; a slower RPC counts as failed.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "5m")]
    pub timeout: Duration,
    #[command(subcommand)]
    pub workload: WorkloadArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum WorkloadArgs {
    /// ByteStream Write of new large blobs, generated while they are sent.
    WriteLarge {
        /// Size of each blob.
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
        /// Bytes per WriteRequest.
        #[arg(long, default_value = "1MiB")]
        chunk_size: ByteSize,
    },
    /// ByteStream Read of one large blob (uploaded once, untimed), re-hashing every byte.
    ReadLarge {
        /// Size of the blob.
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
        /// Bytes per WriteRequest of the untimed upload.
        #[arg(long, default_value = "1MiB")]
        chunk_size: ByteSize,
    },
    /// BatchUpdateBlobs of new small blobs.
    BatchUpdate {
        /// Blobs per batch.
        #[arg(long, default_value_t = 100)]
        blobs: usize,
        /// Size of each blob.
        #[arg(long, default_value = "10KiB")]
        blob_size: ByteSize,
    },
    /// Fill a server: each step stores `--blobs` new small blobs of a Bazel-like size mix
    /// (100 B to 16 KiB, half under 1 KiB), numbered so `--count C` stores the same C x blobs
    /// for one seed; in batches within the server's limit.
    Fill {
        /// Small blobs per step.
        #[arg(long, default_value_t = 1000)]
        blobs: usize,
        /// Every this many steps, also store one large (file-backed) blob; 0 for none.
        #[arg(long, default_value_t = 0)]
        large_every: u64,
        /// Largest large blob (sizes are log-uniform from 64 KiB + 1 up to this).
        #[arg(long, default_value = "1MiB")]
        large_max: ByteSize,
    },
    /// BatchReadBlobs of small blobs (uploaded once, untimed), comparing every byte.
    BatchRead {
        /// Blobs per batch.
        #[arg(long, default_value_t = 100)]
        blobs: usize,
        /// Size of each blob.
        #[arg(long, default_value = "10KiB")]
        blob_size: ByteSize,
        /// Upload nothing: each call reads blobs drawn at random from the first N small blobs
        /// a `fill` run with the same --seed stored (their sizes are the fill's, not
        /// --blob-size), so reads land all over a large store instead of on one hot set.
        #[arg(long)]
        from_fill: Option<u64>,
    },
    /// FindMissingBlobs of present and absent digests; the answer must be the absent ones.
    FindMissing {
        /// Digests per call.
        #[arg(long, default_value_t = 1000)]
        digests: usize,
        /// Share of the digests that are stored (in set-up).
        #[arg(long, default_value_t = 0.5, value_parser = parse_fraction)]
        present_fraction: f64,
        /// Size of the stored blobs.
        #[arg(long, default_value = "1KiB")]
        blob_size: ByteSize,
        /// Upload nothing: the present digests are drawn at random from the first N small
        /// blobs a `fill` run with the same --seed stored (64 different lists, taken in turn).
        #[arg(long)]
        from_fill: Option<u64>,
    },
    /// UpdateActionResult then GetActionResult of a new action, comparing the result read back.
    Ac {
        /// Output files per result (stored in set-up).
        #[arg(long, default_value_t = 3)]
        outputs: usize,
        /// Size of each output file.
        #[arg(long, default_value = "1KiB")]
        output_size: ByteSize,
        /// Store N results in set-up; each step is then one GetActionResult of one of them,
        /// drawn at random (a hit, compared with what was stored): the cost of a lookup alone.
        #[arg(long)]
        hits: Option<u64>,
    },
    /// A Bazel-like mix of cache hits (GetActionResult + Reads) and misses (GetActionResult,
    /// FindMissingBlobs, BatchUpdateBlobs, Write, UpdateActionResult).
    Mix {
        /// Share of actions that are cache hits.
        #[arg(long, default_value_t = 0.7, value_parser = parse_fraction)]
        hit_ratio: f64,
        /// Actions stored in set-up for the hits to read.
        #[arg(long, default_value_t = 50)]
        pool: u64,
        /// Small outputs per action (BatchUpdateBlobs).
        #[arg(long, default_value_t = 3)]
        outputs: usize,
        /// Size of each small output.
        #[arg(long, default_value = "16KiB")]
        output_size: ByteSize,
        /// One more output per action sent with ByteStream; 0 for none.
        #[arg(long, default_value = "1MiB")]
        large_output_size: ByteSize,
        /// Digests per FindMissingBlobs call on a miss.
        #[arg(long, default_value_t = 20)]
        find_missing: usize,
    },
    /// No server: measure this machine's ceilings (single-core SHA-256, disk write with and
    /// without fdatasync, page-cache read, loopback TCP, memcpy) to compare a cache's figures to.
    Ceilings {
        /// Directory to write the temporary file in (put it on the disk of hoard's data dir).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Bytes each measurement moves.
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
    },
}

impl WorkloadArgs {
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadArgs::WriteLarge { .. } => "write-large",
            WorkloadArgs::ReadLarge { .. } => "read-large",
            WorkloadArgs::BatchUpdate { .. } => "batch-update",
            WorkloadArgs::BatchRead { .. } => "batch-read",
            WorkloadArgs::Fill { .. } => "fill",
            WorkloadArgs::FindMissing { .. } => "find-missing",
            WorkloadArgs::Ac { .. } => "ac",
            WorkloadArgs::Mix { .. } => "mix",
            WorkloadArgs::Ceilings { .. } => "ceilings",
        }
    }

    /// The workload's parameters, for the report.
    pub fn params(&self) -> String {
        match self {
            WorkloadArgs::WriteLarge { size, chunk_size }
            | WorkloadArgs::ReadLarge { size, chunk_size } => {
                format!("size={size} chunk-size={chunk_size}")
            }
            WorkloadArgs::BatchUpdate { blobs, blob_size }
            | WorkloadArgs::BatchRead {
                blobs,
                blob_size,
                from_fill: None,
            } => {
                format!("blobs={blobs} blob-size={blob_size}")
            }
            WorkloadArgs::BatchRead {
                blobs,
                from_fill: Some(n),
                ..
            } => format!("blobs={blobs} from-fill={n}"),
            WorkloadArgs::Fill {
                blobs,
                large_every,
                large_max,
            } => format!("blobs={blobs} large-every={large_every} large-max={large_max}"),
            WorkloadArgs::FindMissing {
                digests,
                present_fraction,
                blob_size,
                from_fill,
            } => {
                let mut p = format!(
                    "digests={digests} present-fraction={present_fraction} blob-size={blob_size}"
                );
                if let Some(n) = from_fill {
                    p.push_str(&format!(" from-fill={n}"));
                }
                p
            }
            WorkloadArgs::Ac {
                outputs,
                output_size,
                hits,
            } => {
                let mut p = format!("outputs={outputs} output-size={output_size}");
                if let Some(n) = hits {
                    p.push_str(&format!(" hits={n}"));
                }
                p
            }
            WorkloadArgs::Mix {
                hit_ratio,
                pool,
                outputs,
                output_size,
                large_output_size,
                find_missing,
            } => format!(
                "hit-ratio={hit_ratio} pool={pool} outputs={outputs} output-size={output_size} \
                 large-output-size={large_output_size} find-missing={find_missing}"
            ),
            WorkloadArgs::Ceilings { dir, size } => format!("size={size} dir={}", dir.display()),
        }
    }
}

/// Runs one workload. Fails when set-up fails or any timed operation failed (after reporting).
fn bench(args: BenchArgs) -> Result<(), String> {
    if let WorkloadArgs::Ceilings { dir, size } = &args.workload {
        return ceilings::main(dir, size.0, args.json);
    }
    let options = RunOptions::from_args(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let report = runtime.block_on(run(&args, options))?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    match report.error_count {
        0 => Ok(()),
        n => Err(format!("{n} operation(s) failed")),
    }
}

async fn run(args: &BenchArgs, options: RunOptions) -> Result<report::Report, String> {
    let runner = Runner::connect(options).await?;
    let env = runner.env().await?;
    let mut w = runner.setup_worker();
    let setup_start = Instant::now();
    let name = args.workload.name();
    eprintln!(
        "hoard-bench {name}: setting up against {} (seed {})",
        runner.options().target,
        env.seed
    );
    let phase = match args.workload.clone() {
        WorkloadArgs::WriteLarge { size, chunk_size } => {
            let wl = WriteLarge::setup(&env, size.0, chunk_size.0).await?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::ReadLarge { size, chunk_size } => {
            let wl = ReadLarge::setup(&env, &mut w, size.0, chunk_size.0).await?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::BatchUpdate { blobs, blob_size } => {
            let wl = BatchUpdate::setup(&env, blobs, blob_size.0)?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::BatchRead {
            blobs,
            blob_size,
            from_fill,
        } => {
            let wl = BatchRead::setup(&env, &mut w, blobs, blob_size.0, from_fill).await?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::Fill {
            blobs,
            large_every,
            large_max,
        } => {
            let wl = Fill::setup(&env, blobs, large_every, large_max.0)?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::FindMissing {
            digests,
            present_fraction,
            blob_size,
            from_fill,
        } => {
            let wl = FindMissing::setup(
                &env,
                &mut w,
                digests,
                present_fraction,
                blob_size.0,
                from_fill,
            )
            .await?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::Ac {
            outputs,
            output_size,
            hits,
        } => {
            let wl = ActionCache::setup(&env, &mut w, outputs, output_size.0, hits).await?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::Mix {
            hit_ratio,
            pool,
            outputs,
            output_size,
            large_output_size,
            find_missing,
        } => {
            let params = workloads::MixParams {
                hit_ratio,
                pool,
                outputs,
                output_size: output_size.0,
                large_output_size: large_output_size.0,
                find_missing,
            };
            let wl = Mix::setup(&env, &mut w, params).await?;
            runner.timed(wl, setup_start).await
        }
        WorkloadArgs::Ceilings { .. } => return Err("ceilings runs without a target".into()),
    };
    Ok(report::Report::new(
        name,
        args.workload.params(),
        runner.options(),
        &env,
        phase,
    ))
}

/// Parses durations such as `10s`, `500ms`, `1.5s`, `2m`, `1h`, `250us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<hoard::config::HumanDuration>().map(|d| d.0)
}

/// Parses a number in [0, 1].
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a number between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration(" 3 s "), Ok(Duration::from_secs(3)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1e400s").is_err());
    }

    #[test]
    fn fractions_parse() {
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("-0.1").is_err());
        assert!(parse_fraction("half").is_err());
    }

    #[test]
    fn cli_parses_options_before_and_after_the_workload() {
        let cli = Cli::try_parse_from([
            "bench",
            "--target",
            "grpc://127.0.0.1:1",
            "write-large",
            "--size",
            "1GiB",
            "--concurrency",
            "4",
            "--duration",
            "3s",
        ])
        .unwrap();
        assert_eq!(cli.bench.concurrency, 4);
        assert_eq!(cli.bench.duration, Some(Duration::from_secs(3)));
        assert!(matches!(
            cli.bench.workload,
            WorkloadArgs::WriteLarge { size: ByteSize(s), chunk_size: ByteSize(c) }
                if s == 1 << 30 && c == 1 << 20
        ));
        let cli = Cli::try_parse_from(["bench", "find-missing", "--digests", "10"]).unwrap();
        assert!(cli.bench.target.is_none());
        assert!(matches!(
            cli.bench.workload,
            WorkloadArgs::FindMissing {
                digests: 10,
                from_fill: None,
                ..
            }
        ));
        let cli = Cli::try_parse_from([
            "bench",
            "--count",
            "1000",
            "fill",
            "--blobs",
            "500",
            "--large-every",
            "2",
        ])
        .unwrap();
        assert_eq!(cli.bench.count, Some(1000));
        assert!(matches!(
            cli.bench.workload,
            WorkloadArgs::Fill { blobs: 500, large_every: 2, large_max: ByteSize(m) } if m == 1 << 20
        ));
        let cli = Cli::try_parse_from(["bench", "find-missing", "--from-fill", "1000000"]).unwrap();
        assert!(matches!(
            cli.bench.workload,
            WorkloadArgs::FindMissing {
                from_fill: Some(1_000_000),
                ..
            }
        ));
        let cli = Cli::try_parse_from(["bench", "ac", "--hits", "500"]).unwrap();
        assert!(matches!(
            cli.bench.workload,
            WorkloadArgs::Ac {
                hits: Some(500),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["bench", "mix", "--hit-ratio", "2"]).is_err());
        let cli =
            Cli::try_parse_from(["bench", "ceilings", "--dir", "/tmp", "--size", "2MiB"]).unwrap();
        assert!(cli.bench.target.is_none());
        assert!(matches!(
            &cli.bench.workload,
            WorkloadArgs::Ceilings { dir, size: ByteSize(s) } if dir == &PathBuf::from("/tmp") && *s == 2 << 20
        ));
    }
}
