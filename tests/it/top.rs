//! The server's own figures in Admin `Stats` (fields 50+), `hoard stats --server`'s table of
//! lookups per namespace, and `hoard top` run in a real terminal (tmux).

use std::process::Output;
use std::time::{Duration, Instant};

use hoard::proto::admin::{NamespaceStats, StatsResponse};
use hoard::proto::reapi::{self, FindMissingBlobsRequest, GetActionResultRequest};

use crate::common::{
    batch_put, digest_of, hoard, json, lookup_result, stats, stdout, succeeded, update_result,
    TestServer,
};
use crate::metrics::scrape;

async fn find_missing(server: &TestServer, instance: &str, digests: &[reapi::Digest]) {
    server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: digests.to_vec(),
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs");
}

/// Two namespaces' worth of hits and misses; returns the number of calls made and how many of
/// them failed (as Stats counts them).
async fn scripted_traffic(server: &TestServer) -> (u64, u64) {
    let result = reapi::ActionResult::default();
    let (a1, a2) = (digest_of(b"top action 1"), digest_of(b"top action 2"));
    // ci/main: 4 AC lookups, 3 hits. team/dev: 2 lookups, 0 hits.
    update_result(server, "ci/main", &a1, &result)
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(lookup_result(server, "ci/main", &a1).await.is_some());
    }
    assert!(lookup_result(server, "ci/main", &a2).await.is_none());
    assert!(lookup_result(server, "team/dev", &a1).await.is_none());
    assert!(lookup_result(server, "team/dev", &a2).await.is_none());
    // CAS: ci/main asks about 2 (1 present), team/dev about 3 (2 present, one the empty blob).
    let stored: &[u8] = b"top stored blob";
    batch_put(server, "", &[stored]).await;
    let (present, absent) = (digest_of(stored), digest_of(b"top absent"));
    find_missing(server, "ci/main", &[present.clone(), absent.clone()]).await;
    find_missing(server, "team/dev", &[present, absent, digest_of(b"")]).await;
    // A refused request: counted as a call and an error, never as a lookup.
    let bad = server
        .ac()
        .get_action_result(GetActionResultRequest {
            instance_name: "ci/main".into(),
            action_digest: None,
            ..Default::default()
        })
        .await
        .expect_err("no action digest");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // 1 update, 6 lookups, 1 batch, 2 FindMissingBlobs, 1 refused.
    (11, 1)
}

fn ns(name: &str, ac: (u64, u64), cas: (u64, u64)) -> NamespaceStats {
    NamespaceStats {
        namespace: name.into(),
        ac_lookups: ac.0,
        ac_hits: ac.1,
        cas_lookups: cas.0,
        cas_found: cas.1,
    }
}

#[tokio::test]
async fn stats_counts_lookups_per_namespace_calls_and_latency_exactly() {
    // Two labelled names; the third becomes `other`, as on /metrics.
    let server = TestServer::start_with(|c| c.telemetry.max_namespace_labels = 2).await;
    let (calls, errors) = scripted_traffic(&server).await;
    let before = stats(&server).await;
    assert_eq!(
        before.namespaces,
        [
            ns("ci/main", (4, 3), (2, 1)),
            ns("team/dev", (2, 0), (3, 2))
        ]
    );
    assert_eq!(
        before.requests, calls,
        "Stats is counted once it has answered"
    );
    assert_eq!(before.request_errors, errors);
    assert_eq!(
        before.latency_cumulative.len(),
        before.latency_bounds_secs.len() + 1
    );
    assert_eq!(before.latency_cumulative.last(), Some(&calls));
    assert!(
        before.latency_cumulative.windows(2).all(|w| w[0] <= w[1]),
        "cumulative: {:?}",
        before.latency_cumulative
    );
    assert_eq!(before.server_version, env!("CARGO_PKG_VERSION"));
    // The scripted calls' bodies: a batch upload and an UpdateActionResult at least.
    assert!(
        before.bytes_received.is_some_and(|n| n > 100),
        "{:?}",
        before.bytes_received
    );
    assert!(
        before.bytes_sent.is_some_and(|n| n > 0),
        "{:?}",
        before.bytes_sent
    );

    // Past the cap: `other`, added to the same map as the names before it.
    assert!(lookup_result(&server, "third", &digest_of(b"x"))
        .await
        .is_none());
    let after = stats(&server).await;
    assert_eq!(after.namespaces.len(), 3, "{:?}", after.namespaces);
    assert_eq!(after.namespaces[1], ns("other", (1, 0), (0, 0)));
    // The Stats call before and the lookup: 2 more calls.
    assert_eq!(after.requests, calls + 2);

    // The same numbers as /metrics (summed over namespace_rule).
    let m = scrape(&server).await;
    let sum = |name: &str, namespace: &str| -> u64 {
        m.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name && l.get("namespace").map(String::as_str) == Some(namespace)
            })
            .map(|(_, _, v)| *v as u64)
            .sum()
    };
    for n in &after.namespaces {
        assert_eq!(
            sum("hoard_ac_lookups_total", &n.namespace),
            n.ac_lookups,
            "{n:?}"
        );
        assert_eq!(sum("hoard_ac_hits_total", &n.namespace), n.ac_hits, "{n:?}");
        assert_eq!(
            sum("hoard_cas_lookups_total", &n.namespace),
            n.cas_lookups,
            "{n:?}"
        );
        assert_eq!(
            sum("hoard_cas_found_total", &n.namespace),
            n.cas_found,
            "{n:?}"
        );
    }
}

#[tokio::test]
async fn cli_stats_prints_hit_rates_per_namespace_only_from_a_server() {
    let server = TestServer::start().await;
    scripted_traffic(&server).await;
    let url = server.url();

    let out = hoard(&["stats", "--server", &url]).await;
    let text = stdout(succeeded(&out));
    let row = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row: {text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(text.contains("per namespace (since start):"), "{text}");
    // namespace, AC lookups, AC hits, CAS lookups, CAS found.
    assert_eq!(row("ci/main"), ["ci/main", "4", "75.0%", "2", "50.0%"]);
    assert_eq!(row("team/dev"), ["team/dev", "2", "0.0%", "3", "66.7%"]);
    assert!(
        text.contains("11 answered since start, 1 failed (9.1%)"),
        "{text}"
    );

    let out = hoard(&["stats", "--server", &url, "--json"]).await;
    let reply: serde_json::Value = json(succeeded(&out));
    assert_eq!(reply["blobs"], 1, "the store's fields stay: {reply}");
    assert_eq!(reply["namespaces"][0]["namespace"], "ci/main", "{reply}");
    assert_eq!(reply["namespaces"][0]["ac_hits"], 3, "{reply}");
    assert_eq!(reply["namespaces"][1]["cas_found"], 2, "{reply}");
    assert_eq!(reply["request_errors"], 1, "{reply}");
    assert!(
        reply["bytes_received"].as_u64().is_some_and(|n| n > 0),
        "{reply}"
    );

    // A stopped data dir has no server figures: said in text, absent in JSON.
    let dir = server.data_dir().to_str().unwrap().to_string();
    let _tmp = server.stop().await;
    let out = hoard(&["stats", "--data-dir", &dir]).await;
    let text = stdout(succeeded(&out));
    assert!(
        text.contains("per namespace   only a running server counts them (--server)"),
        "{text}"
    );
    let out = hoard(&["stats", "--data-dir", &dir, "--json"]).await;
    let reply: serde_json::Value = json(succeeded(&out));
    assert!(reply.get("namespaces").is_none(), "{reply}");
    assert_eq!(reply["blobs"], 1, "{reply}");
}

/// `tmux -S SOCKET ARGS`, off the async runtime (the test server runs on it).
async fn tmux(socket: &std::path::Path, args: &[&str]) -> Output {
    let mut command = std::process::Command::new("tmux");
    command.arg("-S").arg(socket).args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run tmux"))
        .await
        .expect("join")
}

/// The private tmux server of one test, killed when the test ends however it ends.
struct TmuxServer(std::path::PathBuf);

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.0)
            .arg("kill-server")
            .output();
    }
}

/// Whether tmux runs here; without it the test can only skip, except under CI, where that is
/// a failure (`.ci/run` installs it).
fn tmux_or_skip() -> bool {
    let present = std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "tmux is not installed, and CI is set: the hoard top test must run (apt-get install \
             tmux)"
        );
        eprintln!("SKIPPED: tmux is not installed, so hoard top cannot be run in a terminal");
    }
    present
}

#[tokio::test]
async fn hoard_top_shows_namespaces_and_hit_rates_in_a_terminal_and_quits_on_q() {
    if !tmux_or_skip() {
        return;
    }
    let server = TestServer::start().await;
    scripted_traffic(&server).await;
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("tmux.sock");
    let status = tmp.path().join("status");
    let _tmux = TmuxServer(socket.clone());
    let command = format!(
        "env -u HOARD_SERVER -u HOARD_TOKEN RUST_LOG=off '{}' top --server '{}' --interval 500ms; \
         echo $? > '{}'",
        env!("CARGO_BIN_EXE_hoard"),
        server.url(),
        status.display()
    );
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "50",
            &command,
        ],
    )
    .await;
    assert!(started.status.success(), "tmux new-session: {started:?}");

    // Until both namespaces are on screen with a hit rate, and (after two replies) the rates.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut screen;
    let mut round = 0u64;
    loop {
        // Keep some traffic going, so the interval columns have something to show.
        let action = digest_of(format!("top load {round}").as_bytes());
        round += 1;
        lookup_result(&server, "ci/main", &action).await;
        let captured = tmux(&socket, &["capture-pane", "-p", "-t", "top"]).await;
        screen = String::from_utf8_lossy(&captured.stdout).into_owned();
        let has_row = |name: &str| {
            screen
                .lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains('%'))
        };
        // "requests N/s  errors": the rates line, drawn once two replies are in.
        if has_row("ci/main") && has_row("team/dev") && screen.contains("/s  errors ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hoard top never showed both namespaces with hit rates; last screen:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let main_row = screen
        .lines()
        .find(|l| l.trim_start().starts_with("ci/main"))
        .unwrap_or_default();
    assert!(main_row.contains('%'), "{main_row}");
    assert!(screen.contains("used "), "the size gauge: {screen}");
    assert!(
        screen.contains("bytes/s in ") && !screen.contains("bytes/s in n/a"),
        "bytes/s are counted: {screen}"
    );

    let sent = tmux(&socket, &["send-keys", "-t", "top", "q"]).await;
    assert!(sent.status.success(), "tmux send-keys: {sent:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Ok(code) = std::fs::read_to_string(&status) {
            if !code.trim().is_empty() {
                break code;
            }
        }
        assert!(
            Instant::now() < deadline,
            "hoard top did not exit within 10 s of q"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code.trim(), "0", "hoard top's exit status");
}

#[tokio::test]
async fn hoard_top_refuses_a_stdout_that_is_not_a_terminal() {
    let out = hoard(&["top", "--server", "127.0.0.1:1"]).await;
    let err = crate::common::one_line_failure(&out);
    assert!(
        err.contains("not one") && err.contains("hoard stats --json"),
        "{err}"
    );
    // Checked before the terminal: a bad interval is a usage error.
    let out = hoard(&["top", "--interval", "10ms"]).await;
    assert!(crate::common::one_line_failure(&out).contains("at least 100ms"));
}

/// Stats from a server whose figures are all zero still decode (a fresh server): the shape
/// `hoard top` relies on is there from the start.
#[tokio::test]
async fn a_fresh_server_reports_an_empty_but_complete_histogram() {
    let server = TestServer::start().await;
    let s: StatsResponse = stats(&server).await;
    assert!(s.namespaces.is_empty());
    assert_eq!(s.requests, 0);
    assert_eq!(s.latency_cumulative.len(), s.latency_bounds_secs.len() + 1);
    assert!(s.latency_cumulative.iter().all(|n| *n == 0));
}
