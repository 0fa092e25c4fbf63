//! `hoard hook git`: a git server's `post-receive` hook. Reads git's `old new ref` lines from
//! stdin, lists each update's changed paths with git itself (`git diff --name-only old new`;
//! for a new ref, the files of its commits no other ref has), and POSTs them to the server's
//! `/hooks/git`, where `[[hooks.rule]]` decides what to invalidate or prune.
//!
//! A push is never refused by this hook (post-receive runs after the refs moved); what it
//! prints reaches the pusher as `remote:` lines. A post that fails for the network or a 5xx
//! is retried with the same delivery id, which the server applies once.

use std::io::BufRead;
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::client::ConnectOptions;
use crate::hooks::{is_null, GitPush, GitUpdate};

#[derive(Subcommand)]
pub enum HookCommand {
    /// For a git server's post-receive hook: send the pushed ref updates (stdin: `old new ref`
    /// lines) and their changed paths to the server's /hooks/git. Exit status: 0 applied, 1
    /// refused by the server, 2 could not run or reach it.
    Git(GitArgs),
}

#[derive(Args)]
pub struct GitArgs {
    /// A running hoard, http://HOST:PORT, grpc://HOST:PORT, or https:// / grpcs:// (TLS).
    #[arg(
        long,
        value_name = "URL",
        env = "HOARD_SERVER",
        default_value = "http://127.0.0.1:9092"
    )]
    pub server: String,
    #[command(flatten)]
    pub connect: ConnectOptions,
    /// The repository's name in events [default: the repository directory's name].
    #[arg(long, value_name = "NAME")]
    pub repository: Option<String>,
    /// Who pushed, for events [default: $GL_USERNAME, else $USER, else $LOGNAME].
    #[arg(long, value_name = "NAME")]
    pub pusher: Option<String>,
}

pub fn main(command: HookCommand) -> ExitCode {
    let HookCommand::Git(args) = command;
    match git(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("hoard hook git: {message}");
            ExitCode::from(2)
        }
    }
}

fn git(args: GitArgs) -> Result<ExitCode, String> {
    let mut lines = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let fields: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        match <[String; 3]>::try_from(fields) {
            Ok(update) => lines.push(update),
            Err(fields) if fields.is_empty() => {}
            Err(_) => {
                return Err(format!(
                    "stdin line {line:?} is not `old new ref` (run as git's post-receive hook)"
                ))
            }
        }
    }
    let pushed: Vec<String> = lines.iter().map(|[_, _, r]| r.clone()).collect();
    let updates = lines
        .into_iter()
        .map(|[before, after, reference]| GitUpdate {
            paths: changed_paths(&before, &after, &reference, &pushed),
            reference,
            before,
            after,
        })
        .collect();
    let push = GitPush {
        delivery: uuid::Uuid::new_v4().to_string(),
        repository: args.repository.clone().unwrap_or_else(repository_name),
        pusher: args
            .pusher
            .clone()
            .or_else(|| std::env::var("GL_USERNAME").ok())
            .or_else(|| std::env::var("USER").ok())
            .or_else(|| std::env::var("LOGNAME").ok())
            .unwrap_or_default(),
        updates,
    };
    let body = serde_json::to_vec(&push).map_err(|e| format!("encoding the delivery: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(post(&args, body))
}

/// The paths `after` changed against `before`; for a new ref, those of its commits that no
/// ref outside this push reaches (in post-receive every pushed ref already points at its new
/// commit, so they are all left out). Renames count as a delete and an add (both paths);
/// paths are taken byte for byte (`-z`, no quoting). `None` when git cannot tell (the server
/// then assumes every `paths` rule matches).
fn changed_paths(
    before: &str,
    after: &str,
    reference: &str,
    pushed: &[String],
) -> Option<Vec<String>> {
    match list_paths(before, after, pushed) {
        Ok(paths) => Some(paths),
        Err(why) => {
            eprintln!("hoard hook git: {why}; sending {reference} with its paths unknown");
            None
        }
    }
}

fn list_paths(before: &str, after: &str, pushed: &[String]) -> Result<Vec<String>, String> {
    if is_null(after) {
        return Ok(Vec::new());
    }
    let out = if is_null(before) {
        let refs = run_git(&["for-each-ref", "--format=%(refname)"], "")?;
        let negated: String = String::from_utf8_lossy(&refs)
            .lines()
            .filter(|r| !r.is_empty() && !pushed.iter().any(|p| p == r))
            .map(|r| format!("^{r}\n"))
            .collect();
        let log = [
            "log",
            "--no-renames",
            "--no-color",
            "--format=",
            "--name-only",
            "-z",
        ];
        run_git(&[&log[..], &[after, "--stdin"]].concat(), &negated)?
    } else {
        let diff = ["diff", "--no-renames", "--no-color", "--name-only", "-z"];
        run_git(&[&diff[..], &[before, after]].concat(), "")?
    };
    let mut paths: Vec<String> = out
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).trim_matches('\n').to_string())
        .filter(|p| !p.is_empty())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    Ok(paths)
}

/// The stdout of `git ARGS` (paths unquoted), given `stdin`; why not, if it fails.
fn run_git(args: &[&str], stdin: &str) -> Result<Vec<u8>, String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("git")
        .args(["-c", "core.quotePath=false"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git ({e})"))?;
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("git {} failed ({e})", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "git {} failed ({}): {}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// The repository directory's name without `.git` (hooks run in the repository).
fn repository_name() -> String {
    let dir = std::env::current_dir().unwrap_or_default();
    let dir = match dir.file_name().and_then(|n| n.to_str()) {
        // A non-bare repository runs hooks in its work tree's top, or in .git.
        Some(".git") => dir.parent().map(|p| p.to_path_buf()).unwrap_or(dir),
        _ => dir,
    };
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_suffix(".git").unwrap_or(name).to_string()
}

fn http_client(connect: &ConnectOptions) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder()
        .connect_timeout(crate::client::CONNECT_TIMEOUT)
        // A push waits for this hook: 3 tries of at most 15 s each.
        .timeout(Duration::from_secs(15))
        .http1_only();
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: cannot read: {e}", path.display()))
    };
    let builder = match &connect.tls_ca {
        Some(path) => {
            let pem = read("--tls-ca", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
            builder.tls_certs_only(certs)
        }
        None => builder,
    };
    let builder = match (&connect.tls_client_cert, &connect.tls_client_key) {
        (Some(cert), Some(key)) => {
            let mut pem = read("--tls-client-cert", cert)?;
            pem.push(b'\n');
            pem.extend(read("--tls-client-key", key)?);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("--tls-client-cert {}: {e}", cert.display()))?;
            builder.identity(identity)
        }
        (None, None) => builder,
        _ => return Err("--tls-client-cert and --tls-client-key go together".into()),
    };
    builder
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

async fn post(args: &GitArgs, body: Vec<u8>) -> Result<ExitCode, String> {
    let base = crate::client::endpoint_uri(&args.server)?;
    let url = format!("{}/hooks/git", base.trim_end_matches('/'));
    let client = http_client(&args.connect)?;
    let mut last_error = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
        }
        let mut request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(token) = &args.connect.token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                last_error = format!("POST {url}: {}", crate::client::error_chain(&e));
                continue;
            }
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let reply: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if status.is_server_error() {
            last_error = format!("POST {url}: {status}: {}", message(&reply, &text));
            continue;
        }
        if !status.is_success() {
            eprintln!(
                "hoard hook git: the server refused the delivery ({status}): {}",
                message(&reply, &text)
            );
            return Ok(ExitCode::from(1));
        }
        report(&reply);
        return Ok(ExitCode::SUCCESS);
    }
    Err(last_error)
}

fn message<'a>(reply: &'a serde_json::Value, text: &'a str) -> &'a str {
    reply
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or(text.trim())
}

/// One line per action, as the pusher sees them (`remote: ...`).
fn report(reply: &serde_json::Value) {
    let replayed = reply.get("replayed").and_then(|r| r.as_bool()) == Some(true);
    let applied = reply.get("applied").and_then(|a| a.as_array());
    let Some(applied) = applied.filter(|a| !a.is_empty()) else {
        eprintln!("hoard: no [[hooks.rule]] matched this push");
        return;
    };
    for a in applied {
        let action = a.get("action").and_then(|v| v.as_str()).unwrap_or("");
        let pattern = a.get("pattern").and_then(|v| v.as_str()).unwrap_or("");
        let rule = a.get("rule").and_then(|v| v.as_u64()).unwrap_or(0);
        let names: Vec<&str> = a
            .get("namespaces")
            .and_then(|v| v.as_array())
            .map(|ns| ns.iter().filter_map(|n| n.get("name")?.as_str()).collect())
            .unwrap_or_default();
        let done = match action {
            "prune" => "pruned",
            _ => "invalidated",
        };
        let again = if replayed { " (already, earlier)" } else { "" };
        eprintln!(
            "hoard: hooks.rule {rule}: {done} {pattern:?}: {} namespace(s){again}{}",
            names.len(),
            if names.is_empty() {
                String::new()
            } else {
                format!(": {}", names.join(", "))
            }
        );
    }
}
