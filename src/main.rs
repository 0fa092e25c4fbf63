//! The `hoard` command line.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

/// mimalloc: a request allocates and frees many small strings and buffers (FindMissingBlobs
/// decodes one string per digest); glibc's allocator spent a quarter of that call's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use hoard::config::Config;

#[derive(Parser)]
#[command(
    name = "hoard",
    version,
    about = "A remote build cache for Bazel and other REAPI clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cache server until SIGINT or SIGTERM (SIGHUP reloads the TLS certificate).
    Serve {
        /// TOML config file; every field is optional (see deploy/hoard.toml).
        #[arg(long, env = "HOARD_CONFIG")]
        config: Option<PathBuf>,
        /// Address of the gRPC port [default: 127.0.0.1:9092].
        #[arg(long, env = "HOARD_LISTEN")]
        listen: Option<SocketAddr>,
        /// Directory for the database and blob files [default: ./hoard-data].
        #[arg(long, env = "HOARD_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Log lines as `text` or `json` [default: the config's log_format, else text].
        #[arg(long, env = "HOARD_LOG_FORMAT")]
        log_format: Option<hoard::config::LogFormat>,
    },
    /// Print a server's watch stream (invalidations, optionally stored results) as JSON lines.
    Watch(hoard::cli::watch::WatchArgs),
    /// `hoard stats`, `hoard gc`, `hoard verify` (see README "Operations: stats, gc, verify").
    #[command(flatten)]
    Admin(hoard::cli::admin::AdminCommand),
    /// `hoard invalidate`, `hoard namespaces`, `hoard prune-namespaces` (see README
    /// "Invalidation").
    #[command(flatten)]
    Namespaces(hoard::cli::invalidate::NamespaceCommand),
    /// `hoard token new`, `hoard token hash`: bearer tokens for `[[auth.token]]`.
    #[command(subcommand)]
    Token(hoard::cli::token::TokenCommand),
    /// Show who wrote the action result an instance would be served, when, and through which
    /// instance name (see README "Provenance").
    ///
    /// Searches the instance's read chain as GetActionResult would (epochs and TTL; the result's
    /// outputs are not checked), without renewing the result's last use. Exit status: 0 found,
    /// 1 no visible result, 2 could not run.
    Provenance(hoard::cli::provenance::ProvenanceArgs),
    /// Check a config file as `hoard serve --config FILE` would (every rule, and the files it
    /// names), print the effective settings; exit 0 if a server could start with it, else 1.
    CheckConfig(hoard::cli::check_config::CheckConfigArgs),
    /// `hoard hook git`: a git server's post-receive hook, sending pushes to /hooks/git (see
    /// README "VCS webhooks").
    #[command(subcommand)]
    Hook(hoard::cli::hook::HookCommand),
    /// A live view of a running server, redrawn every 2 s: calls/s, errors, p50/p99 latency,
    /// used vs max size, evictions, AC and CAS hit rates per namespace (q quits).
    Top(hoard::cli::top::TopArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server sets up its own logging once its config (log_format, OTLP) is read.
    if !matches!(cli.command, Command::Serve { .. }) {
        hoard::telemetry::init_cli_logging();
    }
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            log_format,
        } => serve(config, listen, data_dir, log_format),
        // Prints its own error: the exit status tells a supervisor to resume or to resync.
        Command::Watch(args) => return hoard::cli::watch::main(args),
        // These print their own errors: their exit status says more than success or failure.
        Command::Admin(command) => return hoard::cli::admin::main(command),
        Command::Namespaces(command) => return hoard::cli::invalidate::main(command),
        Command::Token(command) => return hoard::cli::token::main(command),
        Command::Provenance(args) => return hoard::cli::provenance::main(args),
        Command::Top(args) => return hoard::cli::top::main(args),
        Command::CheckConfig(args) => return hoard::cli::check_config::main(args),
        Command::Hook(command) => return hoard::cli::hook::main(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("hoard: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Opts the server out of transparent huge pages (a no-op where the kernel has none). The
/// allocator asks for huge pages on its large regions, and a 2 MiB page touched anywhere is
/// resident whole: at a million blobs that was a third of the server's memory (301 against
/// 208 MiB after a fill), for no measurable gain in the index lookups it could speed up
/// (BENCHMARKS.md, issue 14).
fn no_transparent_huge_pages() {
    // Process-wide despite the module's name (PR_SET_THP_DISABLE), and inherited by children.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// How often a worker thread may hand its freed memory back (see [`return_freed_memory`]).
const RETURN_FREED_EVERY: Duration = Duration::from_millis(100);

/// Run as a worker thread goes idle: frees this thread's empty allocator pages and lets
/// pages freed a while ago go back to the kernel. mimalloc does both only while the thread
/// that owns the pages allocates, so a server that goes quiet after a burst (a fill of a
/// million blobs) kept ~100 MiB of freed memory resident until the next burst; this gets
/// ~60 MiB of it back within seconds (BENCHMARKS.md, issue 14). At most every
/// [`RETURN_FREED_EVERY`] per thread: a busy worker parks thousands of times a second, and one
/// pass visits the thread's pages. Memory freed in a worker's last 100 ms before it goes
/// quiet, and the kernel's share of what a pass frees (mimalloc purges a second after the
/// free), wait for a later park: on an idle server, the sled store's upkeep tick (once a second)
/// provides it.
fn return_freed_memory() {
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    let now = Instant::now();
    let due = LAST.with(|last| {
        let due = last
            .get()
            .is_none_or(|at| now.duration_since(at) >= RETURN_FREED_EVERY);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        // SAFETY: mi_collect has no preconditions; it only walks the calling thread's heap
        // and the allocator's own arenas.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

fn serve(
    config_path: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log_format: Option<hoard::config::LogFormat>,
) -> Result<(), String> {
    let mut config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    if let Some(format) = log_format {
        config.log_format = format;
    }
    // Creating it would fail with only "File exists".
    if config.data_dir.exists() && !config.data_dir.is_dir() {
        return Err(format!(
            "data dir {} (data_dir, --data-dir) exists and is not a directory",
            config.data_dir.display()
        ));
    }
    hoard::connections::raise_open_file_limit();
    no_transparent_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(return_freed_memory)
        // Every large-blob transfer holds a blocking thread: leave room for all of them.
        .max_blocking_threads(hoard::store::sled::MAX_TRANSFERS + 512)
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    // Inside the runtime: the OTLP exporters' channels are bound to it.
    let tracing = runtime
        .block_on(async { hoard::telemetry::init_server(config.log_format, &config.telemetry) })?;
    let served = runtime.block_on(async {
        // Handlers go in before anything else, so an early SIGTERM still shuts down cleanly.
        let shutdown = shutdown_signal()?;
        // SIGHUP's default action ends the process, and a certificate rotation may send it
        // while the store is still opening. Once registered it no longer does; the server
        // reloads TLS on it (server.rs), or logs that there is nothing to reload.
        let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        hoard::server::run(listener, &config, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    // The spans still queued reach the collector; blocking, so off the runtime's workers.
    runtime.block_on(async {
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    });
    served
}

/// A future that completes on the first SIGINT or SIGTERM. The handlers are registered now.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| format!("cannot install the SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| format!("cannot install the SIGINT handler: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        // A second signal means "now": skip the drain and the grace period.
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            eprintln!("hoard: second signal, exiting without waiting for calls to finish");
            std::process::exit(130);
        });
    })
}
