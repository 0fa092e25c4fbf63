//! Provenance of action results: `hoard provenance` and the Admin service's GetProvenance name
//! who stored the result an instance would be served, through which instance name, when, and
//! under which epoch; watch events name who stored or invalidated. Without authentication every
//! caller is `anonymous` (the writer name is recorded all the same).

use std::time::{SystemTime, UNIX_EPOCH};

use hoard::config::{Config, NamespaceRule};
use hoard::proto::admin::{GetProvenanceRequest, GetProvenanceResponse, InvalidateRequest};
use hoard::proto::reapi::{self, ActionResult};
use hoard::proto::watch::{watch_client::WatchClient, EventKind, WatchRequest};
use serde_json::Value;

use crate::common::{
    digest_of, failure, hoard, json, lookup_result, stdout, succeeded, take, temp_config,
    update_result, TestServer,
};

fn action(i: u64) -> reapi::Digest {
    digest_of(format!("provenance test action {i}").as_bytes())
}

/// `HASH/SIZE`, as the CLI takes digests.
fn arg(d: &reapi::Digest) -> String {
    format!("{}/{}", d.hash, d.size_bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// dev/alice reads itself, then ci/main; ci/release reads ci/main and writes there too.
fn rules(c: &mut Config) {
    c.namespaces.rules = vec![
        NamespaceRule {
            pattern: "dev/*".into(),
            ac_ttl: None,
            read: Some(vec!["ci/main".into()]),
            write: None,
        },
        NamespaceRule {
            pattern: "ci/release".into(),
            ac_ttl: None,
            read: Some(vec!["ci/main".into()]),
            write: Some("ci/main".into()),
        },
    ];
}

/// Stores a result that references no blobs (so it is served as stored), tagged by exit code.
async fn put(server: &TestServer, instance: &str, action: &reapi::Digest, tag: i32) {
    let result = ActionResult {
        exit_code: tag,
        ..Default::default()
    };
    update_result(server, instance, action, &result)
        .await
        .expect("UpdateActionResult");
}

async fn provenance(
    server: &TestServer,
    instance: &str,
    action: Option<reapi::Digest>,
) -> Result<GetProvenanceResponse, tonic::Status> {
    server
        .admin()
        .get_provenance(GetProvenanceRequest {
            instance_name: instance.into(),
            action_digest: action,
        })
        .await
        .map(|r| r.into_inner())
}

/// `hoard provenance` against `server`.
async fn cli(
    server: &TestServer,
    instance: &str,
    action: &reapi::Digest,
    json: bool,
) -> std::process::Output {
    let (url, action) = (server.url(), arg(action));
    let mut args = vec![
        "provenance",
        "--server",
        &url,
        "--instance",
        instance,
        &action,
    ];
    if json {
        args.push("--json");
    }
    hoard(&args).await
}

#[tokio::test]
async fn hoard_provenance_names_who_stored_each_result_and_through_which_instance() {
    let server = TestServer::start_with(rules).await;
    let before = now();
    put(&server, "ci/main", &action(1), 1).await;
    put(&server, "dev/alice", &action(2), 2).await;
    put(&server, "ci/release", &action(3), 3).await;
    let after = now();

    // dev/alice is served ci/main's result for action 1: the provenance says so.
    let out = cli(&server, "dev/alice", &action(1), true).await;
    let found: Value = json(succeeded(&out));
    assert_eq!(
        (&found["namespace"], &found["instance_name"]),
        (&"ci/main".into(), &"ci/main".into())
    );
    assert_eq!(
        (&found["writer"], &found["epoch"]),
        (&"anonymous".into(), &0.into())
    );
    let at = found["stored_at_unix_secs"].as_u64().unwrap();
    assert!(
        (before..=after).contains(&at),
        "stored at {at}, outside [{before}, {after}]"
    );

    // Its own result, in its own namespace.
    let found: Value = json(succeeded(
        &cli(&server, "dev/alice", &action(2), true).await,
    ));
    assert_eq!(
        (&found["namespace"], &found["instance_name"]),
        (&"dev/alice".into(), &"dev/alice".into())
    );

    // Written through ci/release, stored in ci/main: both names are kept.
    let out = cli(&server, "ci/main", &action(3), false).await;
    let text = stdout(succeeded(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "writer:    anonymous",
            "namespace: ci/main",
            "epoch:     0",
            "instance:  ci/release"
        ],
        "{text}"
    );
    assert!(
        lines[4].starts_with("stored at: 20") && lines[4].ends_with(" UTC"),
        "{text}"
    );

    // ci/main does not read dev/alice: no visible result, exit 1, the action named.
    let out = cli(&server, "ci/main", &action(2), false).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&action(2).hash), "{stderr}");
    assert!(stdout(&out).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_invalidated_result_has_no_provenance_and_its_successor_the_new_epoch() {
    let server = TestServer::start_with(rules).await;
    let mut watcher = WatchClient::connect(server.url()).await.unwrap();
    let mut stream = watcher
        .watch(WatchRequest {
            kinds: vec![
                EventKind::ActionResultStored as i32,
                EventKind::NamespaceInvalidated as i32,
                EventKind::ActionInvalidated as i32,
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    put(&server, "ci/main", &action(1), 1).await;
    assert_eq!(
        provenance(&server, "dev/alice", Some(action(1)))
            .await
            .unwrap()
            .epoch,
        0
    );
    server
        .admin()
        .invalidate(InvalidateRequest {
            namespace: Some("ci/main".into()),
            reason: "poisoned by a bad runner".into(),
            ..Default::default()
        })
        .await
        .expect("Invalidate");
    let gone = provenance(&server, "dev/alice", Some(action(1)))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    assert!(
        gone.message().contains(&action(1).hash) && gone.message().contains("\"ci/main\""),
        "{}",
        gone.message()
    );

    put(&server, "ci/main", &action(1), 11).await;
    let found = provenance(&server, "dev/alice", Some(action(1)))
        .await
        .unwrap();
    assert_eq!((found.namespace.as_str(), found.epoch), ("ci/main", 1));
    assert_eq!(
        lookup_result(&server, "dev/alice", &action(1))
            .await
            .unwrap()
            .exit_code,
        11
    );
    server
        .admin()
        .invalidate(InvalidateRequest {
            namespace: Some("ci/main".into()),
            action_digests: vec![action(1)],
            reason: "still poisoned".into(),
            ..Default::default()
        })
        .await
        .expect("Invalidate actions");

    // Who did it is on every event: the writer of stored results, the invalidator otherwise.
    let events = take(&mut stream, 4).await;
    let seen: Vec<(EventKind, &str)> = events
        .iter()
        .map(|e| (e.kind(), e.caller.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (EventKind::ActionResultStored, "anonymous"),
            (EventKind::NamespaceInvalidated, "anonymous"),
            (EventKind::ActionResultStored, "anonymous"),
            (EventKind::ActionInvalidated, "anonymous"),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    let unknown = provenance(&server, "", Some(action(9))).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(
        unknown.message().contains("no visible action result"),
        "{unknown:?}"
    );

    let bad_instance = provenance(&server, "a/../b", Some(action(9)))
        .await
        .unwrap_err();
    assert_eq!(bad_instance.code(), tonic::Code::InvalidArgument);
    assert!(
        bad_instance.message().contains("instance_name"),
        "{bad_instance:?}"
    );

    let missing = provenance(&server, "", None).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(missing.message().contains("action_digest"), "{missing:?}");

    let malformed = reapi::Digest {
        hash: "xyz".into(),
        size_bytes: 3,
    };
    let bad_digest = provenance(&server, "", Some(malformed)).await.unwrap_err();
    assert_eq!(bad_digest.code(), tonic::Code::InvalidArgument);
    assert!(
        bad_digest.message().contains("action_digest"),
        "{bad_digest:?}"
    );

    // The CLI: a malformed digest is a usage error, an unreachable server "could not run".
    let out = hoard(&["provenance", "--instance", "", "abc/1"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = hoard(&[
        "provenance",
        "--server",
        "http://127.0.0.1:1",
        "--instance",
        "",
        &arg(&action(9)),
    ])
    .await;
    assert!(failure(&out).contains("127.0.0.1:1"));
    server.stop().await;
}

#[tokio::test]
async fn provenance_survives_a_restart() {
    let (_tmp, mut config) = temp_config();
    rules(&mut config);
    let server = TestServer::start_config(config.clone()).await;
    put(&server, "dev/bob", &action(1), 1).await;
    let stored = provenance(&server, "dev/bob", Some(action(1)))
        .await
        .unwrap();
    server.stop().await;

    let server = TestServer::start_config(config).await;
    let again = provenance(&server, "dev/bob", Some(action(1)))
        .await
        .unwrap();
    assert_eq!(again, stored);
    assert_eq!(
        lookup_result(&server, "dev/bob", &action(1))
            .await
            .unwrap()
            .exit_code,
        1
    );
    server.stop().await;
}
