//! Connections to the target, the server's capabilities, and the timed phase: N tasks looping
//! over a workload's steps until the duration or count is reached, with the server's CPU time and
//! memory sampled around it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hoard::client::Connection;

use super::procfs::{self, RssSampler, Usage};
use super::stats::Recorder;
use super::workloads::{Conn, Env, Worker, Workload};
use super::BenchArgs;
use hoard::client::Server;
use hoard::proto::reapi::{
    capabilities_client::CapabilitiesClient, digest_function, GetCapabilitiesRequest,
};

/// How long the timed phase runs when neither --duration nor --count is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// The run-wide options, checked.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The target as given.
    pub target: String,
    /// The target, parsed: what connections are opened to.
    server: Server,
    pub instance: String,
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub server_pid: Option<u32>,
    pub seed: u64,
    pub timeout: Duration,
}

impl RunOptions {
    pub fn from_args(args: &BenchArgs) -> Result<Self, String> {
        let target = args
            .target
            .clone()
            .ok_or("--target grpc://HOST:PORT is required")?;
        let server = Server::parse_with(&target, &args.connect)?;
        if args.concurrency == 0 || args.connections == 0 {
            return Err("--concurrency and --connections must be at least 1".into());
        }
        if args.count == Some(0) {
            return Err("--count must be at least 1".into());
        }
        if args.duration == Some(Duration::ZERO) {
            return Err("--duration must be above 0".into());
        }
        let duration = match (args.duration, args.count) {
            (None, None) => Some(DEFAULT_DURATION),
            (d, _) => d,
        };
        let seed = args.seed.unwrap_or_else(random_seed);
        Ok(RunOptions {
            target,
            server,
            instance: args.instance.clone(),
            concurrency: args.concurrency,
            connections: args.connections.min(args.concurrency),
            duration,
            count: args.count,
            server_pid: args.server_pid,
            seed,
            timeout: args.timeout,
        })
    }
}

fn random_seed() -> u64 {
    let u = uuid::Uuid::new_v4().as_u128();
    (u as u64) ^ ((u >> 64) as u64)
}

/// What the timed phase produced.
pub struct Phase {
    pub setup: Duration,
    pub elapsed: Duration,
    pub iterations: u64,
    pub rec: Recorder,
    /// The server's resource use, when --server-pid was given (or why it is missing).
    pub server: Option<Result<Usage, String>>,
    /// Our own CPU time during the timed phase.
    pub client_cpu_secs: Option<f64>,
}

pub struct Runner {
    options: RunOptions,
    channels: Vec<Connection>,
}

impl Runner {
    /// Opens `--connections` connections to the target.
    pub async fn connect(options: RunOptions) -> Result<Self, String> {
        if let Some(pid) = options.server_pid {
            procfs::sample(pid, procfs::clock_ticks())
                .map_err(|e| format!("--server-pid {pid}: {e}"))?;
        }
        let mut channels = Vec::with_capacity(options.connections);
        for _ in 0..options.connections {
            channels.push(options.server.connect().await?);
        }
        Ok(Runner { options, channels })
    }

    pub fn options(&self) -> &RunOptions {
        &self.options
    }

    /// Asks GetCapabilities for the batch limit; refuses servers without SHA-256.
    pub async fn env(&self) -> Result<Env, String> {
        let mut env = Env {
            seed: self.options.seed,
            max_batch: 0,
        };
        let mut caps = CapabilitiesClient::new(self.channels[0].clone());
        let request = GetCapabilitiesRequest {
            instance_name: self.options.instance.clone(),
        };
        match tokio::time::timeout(self.options.timeout, caps.get_capabilities(request)).await {
            Ok(Ok(resp)) => match resp.into_inner().cache_capabilities {
                Some(c) => {
                    let sha256 = digest_function::Value::Sha256 as i32;
                    if !c.digest_functions.is_empty() && !c.digest_functions.contains(&sha256) {
                        return Err(format!(
                            "{} does not offer SHA-256 digests, the only ones hoard-bench makes",
                            self.options.target
                        ));
                    }
                    env.max_batch = u64::try_from(c.max_batch_total_size_bytes).unwrap_or(0);
                }
                None => eprintln!("warning: the server announces no cache capabilities"),
            },
            Ok(Err(s)) => eprintln!(
                "warning: GetCapabilities failed ({:?}: {}); assuming no batch size limit",
                s.code(),
                s.message()
            ),
            Err(_) => eprintln!("warning: GetCapabilities timed out; assuming no limits"),
        }
        Ok(env)
    }

    fn worker(&self, n: usize) -> Worker {
        let channel = self.channels[n % self.channels.len()].clone();
        Worker::new(
            Conn::new(channel),
            self.options.instance.clone(),
            self.options.timeout,
        )
    }

    /// A worker for untimed set-up work.
    pub fn setup_worker(&self) -> Worker {
        self.worker(0)
    }

    /// Runs the timed phase of `workload`; `setup_start` is when its set-up began.
    pub async fn timed<W: Workload>(&self, workload: W, setup_start: Instant) -> Phase {
        let setup = setup_start.elapsed();
        let o = &self.options;
        eprintln!(
            "set-up done in {:.1} s; timed phase: {} tasks on {} connection(s), {}",
            setup.as_secs_f64(),
            o.concurrency,
            o.connections,
            match (o.duration, o.count) {
                (Some(d), Some(c)) => format!("{c} iterations or {d:?}, whichever comes first"),
                (Some(d), None) => format!("{d:?}"),
                (None, Some(c)) => format!("{c} iterations"),
                (None, None) => String::new(),
            }
        );
        let workload = Arc::new(workload);
        let ticks = procfs::clock_ticks();
        let server_before = o.server_pid.map(|pid| procfs::sample(pid, ticks));
        let sampler = o.server_pid.map(RssSampler::start);
        let me = std::process::id();
        let client_before = procfs::sample(me, ticks).ok();

        let next = Arc::new(AtomicU64::new(0));
        let count = o.count.unwrap_or(u64::MAX);
        let start = Instant::now();
        let deadline = o.duration.map(|d| start + d);
        let tasks: Vec<_> = (0..o.concurrency)
            .map(|n| {
                let mut w = self.worker(n);
                let (workload, next) = (workload.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        workload.step(&mut w, i).await;
                    }
                    w.rec
                })
            })
            .collect();
        let mut rec = Recorder::default();
        for task in tasks {
            match task.await {
                Ok(r) => rec.merge(r),
                Err(e) => rec.error("task", format!("a worker task failed: {e}")),
            }
        }
        let elapsed = start.elapsed();

        let client_cpu_secs = client_before
            .zip(procfs::sample(me, ticks).ok())
            .map(|(b, a)| (a.user_secs + a.system_secs) - (b.user_secs + b.system_secs));
        let max_rss = match sampler {
            Some(s) => s.stop().await,
            None => None,
        };
        let server = o.server_pid.zip(server_before).map(|(pid, before)| {
            let before = before?;
            let after = procfs::sample(pid, ticks)?;
            Ok(Usage::between(pid, before, after, max_rss))
        });
        Phase {
            setup,
            elapsed,
            iterations: next.load(Ordering::Relaxed).min(count),
            rec,
            server,
            client_cpu_secs,
        }
    }
}
