//! `hoard invalidate`, `hoard namespaces` and `hoard prune-namespaces`: invalidation on a running
//! server, over the Admin service. There is no `--data-dir` mode: an invalidation must reach the
//! server's watchers, and only the server publishes events.
//!
//! Exit status as for `hoard stats|gc|verify`: 0 when the command did its work (also when a
//! pattern matched no namespace: "nothing to invalidate" is not a failure for a CI step), 2 when
//! it could not run (bad flags, no server, a refused request).

use std::process::ExitCode;

use crate::client::Connection;
use clap::{ArgGroup, Args, Subcommand};

use crate::cli::admin::{count, duration, DEFAULT_SERVER, EXIT_FAILED};
use crate::client;
use crate::config::HumanDuration;
use crate::digest::Digest;
use crate::proto::admin::{
    admin_client::AdminClient, InvalidateRequest, InvalidateResponse, ListNamespacesRequest,
    ListNamespacesResponse, PruneNamespacesRequest, PruneNamespacesResponse,
};

/// The invalidation subcommands, flattened into `hoard`'s own.
#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// Invalidate action results: some actions of one namespace, a whole namespace, or every
    /// namespace matching a pattern.
    ///
    /// A whole namespace is invalidated by bumping its epoch: every result stored in it so far
    /// becomes invisible at once, whatever its size; the space is reclaimed later. Watchers
    /// receive one event per namespace (or per action) with the reason.
    Invalidate(InvalidateArgs),
    /// List the namespaces the server knows: epoch, last use, last invalidation.
    Namespaces(NamespacesArgs),
    /// Delete namespaces unused for a while, with their action results.
    PruneNamespaces(PruneArgs),
}

/// The server to ask and the output format, common to the three commands.
#[derive(Debug, Args)]
pub struct Server {
    /// A running hoard, http://HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS).
    #[arg(long, value_name = "URL", env = "HOARD_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    #[command(flatten)]
    pub connect: client::ConnectOptions,
    /// Print the reply as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["namespace", "pattern"])))]
pub struct InvalidateArgs {
    /// One instance name, exactly ("" is the default instance).
    #[arg(long, value_name = "NAME")]
    pub namespace: Option<String>,
    /// Every namespace whose name matches; `*` matches any run of characters, including `/`
    /// (quote it: 'ci/branches/*').
    #[arg(long, value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Only this action's result (repeatable; needs --namespace) instead of the whole namespace.
    #[arg(long = "action", value_name = "HASH/SIZE", requires = "namespace", value_parser = parse_action)]
    pub actions: Vec<Digest>,
    /// Why: recorded with the namespace, logged by the server and sent to watchers.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    #[command(flatten)]
    pub server: Server,
}

#[derive(Debug, Args)]
pub struct NamespacesArgs {
    /// Only namespaces matching this (`*` matches any run of characters) [default: all].
    #[arg(long, value_name = "PATTERN")]
    pub pattern: Option<String>,
    #[command(flatten)]
    pub server: Server,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Drop namespaces nobody has read or written for this long: 14d, 12h, 90m.
    #[arg(long, value_name = "DURATION")]
    pub idle: HumanDuration,
    /// Only namespaces matching this (`*` matches any run of characters) [default: all].
    #[arg(long, value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Only list what would be dropped.
    #[arg(long)]
    pub dry_run: bool,
    /// Sent to watchers with each drop [default: "idle for DURATION"].
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    #[command(flatten)]
    pub server: Server,
}

/// `HASH/SIZE`, as `hoard verify` prints digests and ByteStream names them.
pub(crate) fn parse_action(s: &str) -> Result<Digest, String> {
    let (hash, size) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not an action digest; expected HASH/SIZE"))?;
    let size: i64 = size
        .parse()
        .map_err(|_| format!("{s:?}: the size {size:?} is not a number"))?;
    Digest::parse(hash, size).map_err(|e| e.to_string())
}

/// Runs one subcommand and returns the exit status; errors are printed as one line.
pub fn main(command: NamespaceCommand) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
        .and_then(|runtime| runtime.block_on(run(command)));
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hoard: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Runs the command; the text to print on success.
async fn run(command: NamespaceCommand) -> Result<String, String> {
    match command {
        NamespaceCommand::Invalidate(args) => {
            let (uri, mut client) = connect(&args.server).await?;
            let request = InvalidateRequest {
                namespace: args.namespace,
                namespace_pattern: args.pattern.clone().unwrap_or_default(),
                action_digests: args.actions.iter().map(|d| d.to_proto()).collect(),
                reason: args.reason,
            };
            let reply = client
                .invalidate(request)
                .await
                .map_err(|s| describe_status(&uri, "invalidate", &s))?
                .into_inner();
            Ok(if args.server.json {
                super::json(&reply)?
            } else {
                render_invalidate(&reply, args.pattern.as_deref())
            })
        }
        NamespaceCommand::Namespaces(args) => {
            let (uri, mut client) = connect(&args.server).await?;
            let reply = client
                .list_namespaces(ListNamespacesRequest {
                    namespace_pattern: args.pattern.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| describe_status(&uri, "namespaces", &s))?
                .into_inner();
            Ok(if args.server.json {
                super::json(&reply)?
            } else {
                render_list(&reply, args.pattern.as_deref())
            })
        }
        NamespaceCommand::PruneNamespaces(args) => {
            let idle = args.idle.0.as_secs();
            if idle == 0 {
                return Err(format!(
                    "--idle {:?} is under a second; give how long a namespace must have gone \
                     unused, e.g. 14d",
                    args.idle.0
                ));
            }
            let (uri, mut client) = connect(&args.server).await?;
            let reply = client
                .prune_namespaces(PruneNamespacesRequest {
                    idle_seconds: idle,
                    dry_run: args.dry_run,
                    namespace_pattern: args.pattern.clone().unwrap_or_default(),
                    reason: args.reason.unwrap_or_default(),
                })
                .await
                .map_err(|s| describe_status(&uri, "prune-namespaces", &s))?
                .into_inner();
            Ok(if args.server.json {
                super::json(&reply)?
            } else {
                render_prune(&reply, idle, args.pattern.as_deref())
            })
        }
    }
}

pub(crate) async fn connect(args: &Server) -> Result<(String, AdminClient<Connection>), String> {
    let server = client::Server::parse_with(&args.server, &args.connect)?;
    let uri = server.uri().to_string();
    let channel = server
        .connect()
        .await
        .map_err(|e| format!("{e}; is hoard serving there?"))?;
    // A listing of many namespaces can pass the default 4 MiB.
    Ok((
        uri,
        AdminClient::new(channel).max_decoding_message_size(256 << 20),
    ))
}

fn describe_status(uri: &str, what: &str, status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unimplemented => format!(
            "{what}: the server at {uri} does not serve invalidation (an older hoard, or not \
             hoard)"
        ),
        code => format!(
            "{what} failed on {uri}: {code:?}: {}",
            client::status_text(status)
        ),
    }
}

/// Instance names as typed, except the default instance, which would otherwise print as nothing.
pub(crate) fn shown(name: &str) -> &str {
    if name.is_empty() {
        "\"\""
    } else {
        name
    }
}

/// A reason with its control characters escaped, so a multi-line reason keeps one line per
/// namespace.
pub(crate) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// "event 7" or "events 7-9": sequences of one call are consecutive.
fn events(sequences: &[u64]) -> String {
    match sequences {
        [] => "no events".into(),
        [one] => format!("event {one}"),
        [first, .., last] => format!("events {first}-{last}"),
    }
}

fn render_invalidate(reply: &InvalidateResponse, pattern: Option<&str>) -> String {
    if reply.namespaces.is_empty() {
        return format!(
            "no namespace matches {:?}: nothing invalidated",
            pattern.unwrap_or_default()
        );
    }
    let lines: Vec<String> = reply
        .namespaces
        .iter()
        .map(|ns| {
            let name = shown(&ns.name);
            let sequences = events(&ns.event_sequences);
            if ns.epoch > 0 {
                format!("{name}: invalidated, now epoch {} ({sequences})", ns.epoch)
            } else {
                format!(
                    "{name}: {} actions invalidated, {} of them had a result ({sequences})",
                    count(ns.event_sequences.len() as u64),
                    count(ns.removed)
                )
            }
        })
        .collect();
    lines.join("\n")
}

fn render_list(reply: &ListNamespacesResponse, pattern: Option<&str>) -> String {
    if reply.namespaces.is_empty() {
        return match pattern {
            Some(p) => format!("no namespace matches {p:?}"),
            None => "no namespaces yet".into(),
        };
    }
    let now = reply.now_unix_secs;
    let ago = |t: u64| format!("{} ago", duration(now.saturating_sub(t)));
    let width = reply
        .namespaces
        .iter()
        .map(|ns| shown(&ns.name).len())
        .max()
        .unwrap_or(0);
    let lines: Vec<String> = reply
        .namespaces
        .iter()
        .map(|ns| {
            let mut line = format!(
                "{:<width$}  epoch {}  last used {}",
                shown(&ns.name),
                ns.epoch,
                ago(ns.last_used_unix_secs)
            );
            if let Some(at) = ns.invalidated_at_unix_secs {
                line += &format!("  invalidated {}", ago(at));
                if let Some(reason) = &ns.reason {
                    line += &format!(": {}", one_line(reason));
                }
            }
            line
        })
        .collect();
    lines.join("\n")
}

fn render_prune(reply: &PruneNamespacesResponse, idle: u64, pattern: Option<&str>) -> String {
    if reply.namespaces.is_empty() {
        let matching = pattern.map_or(String::new(), |p| format!(" matching {p:?}"));
        return format!(
            "no namespace{matching} has been idle for {}: nothing to drop",
            duration(idle)
        );
    }
    let now = reply.now_unix_secs;
    let lines: Vec<String> = reply
        .namespaces
        .iter()
        .map(|ns| {
            let idle_for = duration(now.saturating_sub(ns.last_used_unix_secs));
            let name = shown(&ns.name);
            if reply.dry_run {
                format!("{name}: would be dropped (idle {idle_for})")
            } else {
                format!(
                    "{name}: dropped (idle {idle_for}), {} action results removed (event {})",
                    count(ns.removed),
                    ns.event_sequence
                )
            }
        })
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::admin::{InvalidatedNamespace, NamespaceInfo, PrunedNamespace};

    #[test]
    fn actions_parse_as_hash_slash_size() {
        let hash = "ab".repeat(32);
        let d = parse_action(&format!("{hash}/142")).unwrap();
        assert_eq!((d.hex(), d.size), (hash.clone(), 142));
        for bad in [
            hash.clone(),
            format!("{hash}/x"),
            format!("{hash}/-1"),
            "xy/1".into(),
        ] {
            assert!(parse_action(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_print_as_json_with_the_proto_field_names() {
        let invalidated = InvalidateResponse {
            namespaces: vec![InvalidatedNamespace {
                name: "ci/a".into(),
                epoch: 3,
                removed: 0,
                event_sequences: vec![7, 8],
            }],
        };
        assert_eq!(
            crate::cli::json(&invalidated).unwrap(),
            r#"{"namespaces":[{"epoch":3,"event_sequences":[7,8],"name":"ci/a","removed":0}]}"#
        );
        let listed = ListNamespacesResponse {
            namespaces: vec![NamespaceInfo {
                name: String::new(),
                epoch: 1,
                last_used_unix_secs: 5,
                invalidated_at_unix_secs: None,
                reason: Some("r".into()),
            }],
            now_unix_secs: 9,
        };
        assert_eq!(
            crate::cli::json(&listed).unwrap(),
            r#"{"namespaces":[{"epoch":1,"invalidated_at_unix_secs":null,"last_used_unix_secs":5,"name":"","reason":"r"}],"now_unix_secs":9}"#
        );
        let pruned = PruneNamespacesResponse {
            namespaces: vec![PrunedNamespace {
                name: "b".into(),
                last_used_unix_secs: 1,
                removed: 2,
                event_sequence: 3,
            }],
            dry_run: true,
            reason: "idle for 14d".into(),
            now_unix_secs: 4,
        };
        assert_eq!(
            crate::cli::json(&pruned).unwrap(),
            r#"{"dry_run":true,"namespaces":[{"event_sequence":3,"last_used_unix_secs":1,"name":"b","removed":2}],"now_unix_secs":4,"reason":"idle for 14d"}"#
        );
    }

    #[test]
    fn replies_render_one_line_per_namespace() {
        let text = render_invalidate(
            &InvalidateResponse {
                namespaces: vec![
                    InvalidatedNamespace {
                        name: "ci/a".into(),
                        epoch: 3,
                        removed: 0,
                        event_sequences: vec![7],
                    },
                    InvalidatedNamespace {
                        name: String::new(),
                        epoch: 0,
                        removed: 1,
                        event_sequences: vec![8, 9],
                    },
                ],
            },
            None,
        );
        assert_eq!(
            text,
            "ci/a: invalidated, now epoch 3 (event 7)\n\
             \"\": 2 actions invalidated, 1 of them had a result (events 8-9)"
        );
        assert!(render_invalidate(&InvalidateResponse::default(), Some("x/*")).contains("x/*"));

        let list = render_list(
            &ListNamespacesResponse {
                namespaces: vec![NamespaceInfo {
                    name: "ci/main".into(),
                    epoch: 2,
                    last_used_unix_secs: 10_000,
                    invalidated_at_unix_secs: Some(10_000 - 3600),
                    reason: Some("toolchain bump".into()),
                }],
                now_unix_secs: 10_000 + 2 * 86_400,
            },
            None,
        );
        assert_eq!(
            list,
            "ci/main  epoch 2  last used 2d ago  invalidated 2d 1h ago: toolchain bump"
        );
        assert_eq!(one_line("gcc 14\nsee #12\t"), "gcc 14\\nsee #12\\t");

        let prune = PruneNamespacesResponse {
            namespaces: vec![PrunedNamespace {
                name: "ci/branches/x".into(),
                last_used_unix_secs: 0,
                removed: 12,
                event_sequence: 5,
            }],
            dry_run: false,
            reason: "idle for 14d".into(),
            now_unix_secs: 15 * 86_400,
        };
        assert_eq!(
            render_prune(&prune, 14 * 86_400, None),
            "ci/branches/x: dropped (idle 15d), 12 action results removed (event 5)"
        );
        assert!(
            render_prune(&PruneNamespacesResponse::default(), 60, Some("ci/*"))
                .contains("no namespace matching \"ci/*\" has been idle for 1m")
        );
    }
}
