//! `hoard watch`: prints the server's watch stream, one JSON object per line, for hooks on CI
//! runners (`hoard watch ... | while read -r event; do ...; done`).
//!
//! It runs until the stream ends. The server ends it when the watcher falls behind, when it shuts
//! down, or when the start point is no longer retained; then `hoard watch` prints one line to
//! stderr naming the `--start-after` to go on from, and its exit status says what to do next.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;

use crate::client;
use crate::proto::watch::{watch_client::WatchClient, Event, EventKind, WatchRequest};
use crate::service::watch::{OLDEST_AVAILABLE_TRAILER, RESUME_AFTER_TRAILER, START_AFTER_HEADER};

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// A running hoard, http://HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS).
    #[arg(
        long,
        value_name = "URL",
        env = "HOARD_SERVER",
        default_value = "http://127.0.0.1:9092"
    )]
    pub server: String,
    #[command(flatten)]
    pub connect: client::ConnectOptions,
    /// Instance names to watch; `*` matches any run of characters, including `/` [default: all].
    #[arg(
        long,
        value_name = "PATTERN",
        default_value = "",
        hide_default_value = true
    )]
    pub namespace: String,
    /// The last sequence already handled: print the events after it. 0 starts with the oldest
    /// event the server still has.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub start_after: u64,
    /// Start with the next new event instead.
    #[arg(long, conflicts_with = "start_after")]
    pub from_now: bool,
    /// Event kinds, comma-separated: action-invalidated, namespace-invalidated,
    /// namespace-dropped, action-result-stored [default: all but action-result-stored].
    #[arg(long, value_name = "KINDS", value_delimiter = ',', value_parser = parse_kind)]
    pub kinds: Vec<EventKind>,
}

fn parse_kind(s: &str) -> Result<EventKind, String> {
    let normalized = s.trim().to_ascii_uppercase().replace('-', "_");
    match EventKind::from_str_name(&normalized) {
        Some(kind) if kind != EventKind::Unspecified => Ok(kind),
        _ => Err(format!(
            "{s:?} is not an event kind; use action-invalidated, namespace-invalidated, \
             namespace-dropped or action-result-stored"
        )),
    }
}

/// Exit status when the watch ended or could not connect: run again with `--start-after` set to
/// the last sequence printed (or the one named on stderr); nothing is lost.
pub const EXIT_RESUME: u8 = 1;
/// Exit status for a request the server or the flags refuse (clap's usage errors are 2 too).
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the start point is no longer retained: rebuild what depends on the events,
/// then start again from the sequence named on stderr.
pub const EXIT_RESYNC: u8 = 3;

/// Why the watch stopped: the exit status and the one line for stderr.
struct Stop(u8, String);

/// Runs `hoard watch` until the stream ends; prints its own error line.
pub fn main(args: WatchArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Stop(EXIT_RESUME, format!("cannot start the async runtime: {e}")))
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop(code, message)) => {
            eprintln!("hoard: {message}");
            ExitCode::from(code)
        }
    }
}

/// One event as a JSON line: the proto's field names, numbers as numbers, the kind by name.
pub fn event_json(event: &Event) -> Result<String, String> {
    super::json(event)
}

fn trailer(status: &tonic::Status, key: &str) -> Option<u64> {
    status.metadata().get(key)?.to_str().ok()?.parse().ok()
}

async fn run(args: WatchArgs) -> Result<(), Stop> {
    let usage = |message: String| Stop(EXIT_USAGE, message);
    let server = client::Server::parse_with(&args.server, &args.connect).map_err(usage)?;
    let channel = server
        .connect()
        .await
        .map_err(|e| Stop(EXIT_RESUME, format!("{e}; is hoard serving there?")))?;
    let request = WatchRequest {
        namespace_pattern: args.namespace,
        start_after: args.start_after,
        from_now: args.from_now,
        kinds: args.kinds.iter().map(|k| *k as i32).collect(),
    };
    let response = WatchClient::new(channel)
        .watch(request)
        .await
        .map_err(|s| ended(&s, None))?;
    // Until an event arrives, the place to resume from is where the stream began.
    let mut last = response
        .metadata()
        .get(START_AFTER_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut stream = response.into_inner();
    let stdout = std::io::stdout();
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                let line = event_json(&event).map_err(|e| {
                    let hint = resume_hint(last);
                    Stop(EXIT_RESUME, format!("event {}: {e}{hint}", event.sequence))
                })?;
                let mut out = stdout.lock();
                // Flushed per line: a hook reading the pipe acts on each event as it comes.
                writeln!(out, "{line}")
                    .and_then(|_| out.flush())
                    .map_err(|e| {
                        let hint = resume_hint(last);
                        Stop(EXIT_RESUME, format!("cannot write to stdout: {e}{hint}"))
                    })?;
                last = Some(event.sequence);
            }
            Ok(None) => {
                let hint = resume_hint(last);
                return Err(Stop(
                    EXIT_RESUME,
                    format!("the server ended the watch{hint}"),
                ));
            }
            Err(status) => return Err(ended(&status, last)),
        }
    }
}

fn resume_hint(last: Option<u64>) -> String {
    match last {
        Some(n) => format!("; resume with --start-after {n}"),
        None => String::new(),
    }
}

/// How a status that ended the watch is reported, with where to go on from.
fn ended(status: &tonic::Status, last: Option<u64>) -> Stop {
    let message = client::status_text(status);
    let code = status.code();
    if let Some(oldest) = trailer(status, OLDEST_AVAILABLE_TRAILER) {
        let from = oldest.saturating_sub(1);
        return Stop(
            EXIT_RESYNC,
            format!(
                "watch refused ({code:?}): {message}; after resyncing, use --start-after {from}"
            ),
        );
    }
    if code == tonic::Code::InvalidArgument {
        return Stop(EXIT_USAGE, format!("watch refused ({code:?}): {message}"));
    }
    // The server's resume point covers events it skipped for the filters; ours only what we
    // printed.
    let hint = resume_hint(trailer(status, RESUME_AFTER_TRAILER).or(last));
    Stop(
        EXIT_RESUME,
        format!("watch ended ({code:?}): {message}{hint}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_in_either_spelling() {
        assert_eq!(
            parse_kind("action-result-stored").unwrap(),
            EventKind::ActionResultStored
        );
        assert_eq!(
            parse_kind("NAMESPACE_DROPPED").unwrap(),
            EventKind::NamespaceDropped
        );
        assert!(parse_kind("event-kind-unspecified").is_err());
        assert!(parse_kind("stored").is_err());
    }

    #[test]
    fn events_print_as_one_json_line() {
        let event = Event {
            sequence: 7,
            kind: EventKind::ActionInvalidated as i32,
            namespace: "ci/main".into(),
            action_digest: Some(crate::digest::Digest::of(b"x").to_proto()),
            reason: "flaky".into(),
            time_unix_ms: 1,
            epoch: 0,
            caller: "ci-bot".into(),
            upstream_sequence: 0,
        };
        let line = event_json(&event).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["kind"], "ACTION_INVALIDATED");
        assert_eq!(v["action_digest"]["size_bytes"], 1);
        assert_eq!(v["caller"], "ci-bot");
    }

    #[test]
    fn an_event_line_has_every_field_with_sorted_keys() {
        let event = Event {
            sequence: 9,
            kind: EventKind::NamespaceInvalidated as i32,
            namespace: "ci/main".into(),
            action_digest: None,
            reason: "r".into(),
            time_unix_ms: 2,
            epoch: 4,
            caller: "anonymous".into(),
            upstream_sequence: 3,
        };
        assert_eq!(
            event_json(&event).unwrap(),
            r#"{"action_digest":null,"caller":"anonymous","epoch":4,"kind":"NAMESPACE_INVALIDATED","namespace":"ci/main","reason":"r","sequence":9,"time_unix_ms":2,"upstream_sequence":3}"#
        );
        let unknown = Event { kind: 99, ..event };
        assert!(event_json(&unknown)
            .unwrap()
            .contains(r#""kind":"EVENT_KIND_UNSPECIFIED""#));
    }
}
