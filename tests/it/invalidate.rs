//! Invalidation through the Admin service and `hoard invalidate|namespaces|prune-namespaces`,
//! against real servers: what becomes a miss (and what stays a hit), refusals that name the
//! field, the watch events with their reasons and order, and pruning on a store clock the test
//! moves forward (instead of waiting 14 days).

use std::time::Duration;

use hoard::proto::admin::{
    InvalidateRequest, InvalidateResponse, ListNamespacesRequest, NamespaceInfo,
    PruneNamespacesRequest, PruneNamespacesResponse,
};
use hoard::proto::reapi::{self, ActionResult};
use hoard::proto::watch::{watch_client::WatchClient, EventKind, WatchRequest};
use serde_json::Value;

use crate::common::{
    digest_of, failure, hoard, json, lookup_result, start_with_clock, stdout, succeeded, take,
    update_result, TestServer,
};

const DAY: Duration = Duration::from_secs(86_400);

fn action(i: u64) -> reapi::Digest {
    digest_of(format!("invalidate test action {i}").as_bytes())
}

/// Stores an action result (empty: it references no blobs, so it is served as stored).
async fn put(server: &TestServer, namespace: &str, action: &reapi::Digest) {
    let result = ActionResult {
        exit_code: 7,
        ..Default::default()
    };
    update_result(server, namespace, action, &result)
        .await
        .expect("UpdateActionResult");
}

/// Whether GetActionResult finds a result (a miss is NOT_FOUND; anything else fails the test).
async fn hit(server: &TestServer, namespace: &str, action: &reapi::Digest) -> bool {
    match lookup_result(server, namespace, action).await {
        Some(r) => {
            assert_eq!(r.exit_code, 7);
            true
        }
        None => false,
    }
}

fn whole(namespace: &str, reason: &str) -> InvalidateRequest {
    InvalidateRequest {
        namespace: Some(namespace.into()),
        reason: reason.into(),
        ..Default::default()
    }
}

fn pattern(pattern: &str, reason: &str) -> InvalidateRequest {
    InvalidateRequest {
        namespace_pattern: pattern.into(),
        reason: reason.into(),
        ..Default::default()
    }
}

fn actions(namespace: &str, digests: &[reapi::Digest], reason: &str) -> InvalidateRequest {
    InvalidateRequest {
        action_digests: digests.to_vec(),
        ..whole(namespace, reason)
    }
}

async fn invalidate(server: &TestServer, request: InvalidateRequest) -> InvalidateResponse {
    server
        .admin()
        .invalidate(request)
        .await
        .expect("Invalidate")
        .into_inner()
}

async fn list(server: &TestServer, pattern: &str) -> Vec<NamespaceInfo> {
    server
        .admin()
        .list_namespaces(ListNamespacesRequest {
            namespace_pattern: pattern.into(),
        })
        .await
        .expect("ListNamespaces")
        .into_inner()
        .namespaces
}

async fn prune(server: &TestServer, idle: Duration, dry_run: bool) -> PruneNamespacesResponse {
    server
        .admin()
        .prune_namespaces(PruneNamespacesRequest {
            idle_seconds: idle.as_secs(),
            dry_run,
            ..Default::default()
        })
        .await
        .expect("PruneNamespaces")
        .into_inner()
}

fn names<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    names.into_iter().map(String::as_str).collect()
}

#[tokio::test]
async fn invalidating_one_action_leaves_the_others() {
    let server = TestServer::start().await;
    let (a, b) = (action(1), action(2));
    put(&server, "ci/main", &a).await;
    put(&server, "ci/main", &b).await;
    put(&server, "ci/other", &a).await;

    let reply = invalidate(
        &server,
        actions("ci/main", std::slice::from_ref(&a), "flaky"),
    )
    .await;
    assert_eq!(reply.namespaces.len(), 1);
    let done = &reply.namespaces[0];
    assert_eq!(
        (done.name.as_str(), done.epoch, done.removed),
        ("ci/main", 0, 1)
    );
    assert_eq!(done.event_sequences.len(), 1);

    assert!(!hit(&server, "ci/main", &a).await);
    assert!(hit(&server, "ci/main", &b).await);
    assert!(
        hit(&server, "ci/other", &a).await,
        "same action, other namespace"
    );

    // Listing an action twice, or one without a result, is not an error; each gets its event.
    let reply = invalidate(
        &server,
        actions("ci/main", &[a.clone(), a.clone(), action(3)], "x"),
    )
    .await;
    assert_eq!(reply.namespaces[0].removed, 0);
    assert_eq!(
        reply.namespaces[0].event_sequences.len(),
        2,
        "duplicates count once"
    );

    // Stored again, it is a hit again.
    put(&server, "ci/main", &a).await;
    assert!(hit(&server, "ci/main", &a).await);
}

#[tokio::test]
async fn a_namespace_bump_hides_all_its_results_at_once() {
    let server = TestServer::start().await;
    let stored: Vec<reapi::Digest> = (0..20).map(action).collect();
    for a in &stored {
        put(&server, "ci/main", a).await;
    }
    put(&server, "ci/other", &stored[0]).await;
    put(&server, "", &stored[0]).await;

    let reply = invalidate(&server, whole("ci/main", "toolchain bump")).await;
    assert_eq!(reply.namespaces.len(), 1);
    let epoch = reply.namespaces[0].epoch;
    assert!(epoch >= 1, "{reply:?}");
    for a in &stored {
        assert!(!hit(&server, "ci/main", a).await);
    }
    assert!(hit(&server, "ci/other", &stored[0]).await);
    assert!(hit(&server, "", &stored[0]).await);

    // Results stored after the bump are served, including for actions invalidated by it.
    put(&server, "ci/main", &stored[3]).await;
    put(&server, "ci/main", &action(100)).await;
    assert!(hit(&server, "ci/main", &stored[3]).await);
    assert!(hit(&server, "ci/main", &action(100)).await);
    assert!(!hit(&server, "ci/main", &stored[4]).await);

    let main = list(&server, "ci/main").await;
    assert_eq!(main.len(), 1);
    assert_eq!(main[0].epoch, epoch);
    assert_eq!(main[0].reason.as_deref(), Some("toolchain bump"));
    assert!(main[0].invalidated_at_unix_secs.is_some());

    // A second bump goes on counting; the default instance can be invalidated by name.
    let again = invalidate(&server, whole("ci/main", "again")).await;
    assert_eq!(again.namespaces[0].epoch, epoch + 1);
    invalidate(&server, whole("", "default too")).await;
    assert!(!hit(&server, "", &stored[0]).await);
    assert!(hit(&server, "ci/other", &stored[0]).await);
}

#[tokio::test]
async fn a_pattern_invalidates_every_matching_namespace_and_no_other() {
    let server = TestServer::start().await;
    let a = action(1);
    let all = [
        "ci/branches/a",
        "ci/branches/b/deep",
        "ci/main",
        "ci/branchesx",
        "dev",
    ];
    for ns in all {
        put(&server, ns, &a).await;
    }

    let reply = invalidate(&server, pattern("ci/branches/*", "toolchain bump")).await;
    let hit_names: Vec<&str> = reply.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(hit_names, ["ci/branches/a", "ci/branches/b/deep"]);
    for ns in &reply.namespaces {
        assert!(ns.epoch >= 1 && ns.event_sequences.len() == 1, "{ns:?}");
    }
    for ns in all {
        let matched = ns.starts_with("ci/branches/");
        assert_eq!(hit(&server, ns, &a).await, !matched, "{ns}");
    }

    // A pattern matching nothing invalidates nothing, and says so by an empty reply.
    let reply = invalidate(&server, pattern("nightly/*", "x")).await;
    assert!(reply.namespaces.is_empty());
    // ListNamespaces filters the same way.
    let listed = list(&server, "ci/*").await;
    assert_eq!(
        names(listed.iter().map(|n| &n.name)),
        [
            "ci/branches/a",
            "ci/branches/b/deep",
            "ci/branchesx",
            "ci/main"
        ]
    );
    assert_eq!(list(&server, "").await.len(), all.len());
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let good = action(1);
    let cases: Vec<(InvalidateRequest, &str)> = vec![
        (whole("ci/main", ""), "reason"),
        (whole("ci/main", "   "), "reason"),
        (whole("ci/main", &"r".repeat(1025)), "reason"),
        (
            InvalidateRequest {
                namespace_pattern: "ci/*".into(),
                ..whole("ci/main", "r")
            },
            "namespace_pattern",
        ),
        (
            InvalidateRequest {
                reason: "r".into(),
                ..Default::default()
            },
            "namespace_pattern",
        ),
        (
            InvalidateRequest {
                action_digests: vec![good.clone()],
                ..pattern("ci/*", "r")
            },
            "action_digests",
        ),
        (
            actions(
                "ci/main",
                &[
                    good.clone(),
                    reapi::Digest {
                        hash: "abc".into(),
                        size_bytes: 1,
                    },
                ],
                "r",
            ),
            "action_digests[1]",
        ),
        (
            actions(
                "ci/main",
                &[reapi::Digest {
                    hash: good.hash.clone(),
                    size_bytes: -1,
                }],
                "r",
            ),
            "action_digests[0]",
        ),
        (whole("ci/../main", "r"), "namespace"),
        (whole("ci/blobs", "r"), "namespace"),
        (pattern(&"x".repeat(257), "r"), "namespace_pattern"),
        (pattern("ci/\0*", "r"), "namespace_pattern"),
    ];
    for (i, (request, field)) in cases.into_iter().enumerate() {
        let err = server
            .admin()
            .invalidate(request)
            .await
            .expect_err(&format!("case {i} should be refused"));
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "case {i}: {err:?}"
        );
        assert!(
            err.message().contains(field),
            "case {i}: {:?} should name {field}",
            err.message()
        );
    }

    let prune = server
        .admin()
        .prune_namespaces(PruneNamespacesRequest::default())
        .await
        .expect_err("idle 0");
    assert_eq!(prune.code(), tonic::Code::InvalidArgument);
    assert!(prune.message().contains("idle_seconds"), "{prune:?}");
    let listing = server
        .admin()
        .list_namespaces(ListNamespacesRequest {
            namespace_pattern: "x".repeat(300),
        })
        .await
        .expect_err("long pattern");
    assert_eq!(listing.code(), tonic::Code::InvalidArgument);

    // Nothing was invalidated by the refused calls.
    assert!(list(&server, "").await.is_empty());
}

#[tokio::test]
async fn watchers_see_every_invalidation_in_order_with_its_reason() {
    let (server, store, _tmp) = start_with_clock(|_| {}).await;
    let (a, b) = (action(1), action(2));
    for ns in ["ci/main", "ci/branches/x", "ci/branches/y", "old"] {
        put(&server, ns, &a).await;
    }
    let mut watcher = WatchClient::connect(server.url()).await.unwrap();
    // Empty kinds: the invalidation kinds only (the stores above are not sent).
    let mut stream = watcher
        .watch(WatchRequest {
            start_after: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let one = invalidate(
        &server,
        actions("ci/main", &[a.clone(), b.clone()], "flaky"),
    )
    .await;
    let two = invalidate(&server, whole("ci/main", "bump main")).await;
    let three = invalidate(&server, pattern("ci/branches/*", "bump branches")).await;
    store.advance_clock(15 * DAY);
    for ns in ["ci/main", "ci/branches/x", "ci/branches/y"] {
        put(&server, ns, &b).await; // used now: not idle
    }
    let four = prune(&server, 14 * DAY, false).await;
    assert_eq!(names(four.namespaces.iter().map(|n| &n.name)), ["old"]);
    assert_eq!(four.reason, "idle for 14d");

    let events = take(&mut stream, 6).await;
    let got: Vec<(EventKind, &str, &str)> = events
        .iter()
        .map(|e| (e.kind(), e.namespace.as_str(), e.reason.as_str()))
        .collect();
    use EventKind::*;
    assert_eq!(
        got,
        [
            (ActionInvalidated, "ci/main", "flaky"),
            (ActionInvalidated, "ci/main", "flaky"),
            (NamespaceInvalidated, "ci/main", "bump main"),
            (NamespaceInvalidated, "ci/branches/x", "bump branches"),
            (NamespaceInvalidated, "ci/branches/y", "bump branches"),
            (NamespaceDropped, "old", "idle for 14d"),
        ]
    );
    assert_eq!(events[0].action_digest.as_ref(), Some(&a));
    assert_eq!(events[1].action_digest.as_ref(), Some(&b));
    assert_eq!(events[2].epoch, two.namespaces[0].epoch);
    // The sequences in the replies are the ones watchers see.
    let replied: Vec<u64> = [&one, &two, &three]
        .iter()
        .flat_map(|r| r.namespaces.iter().flat_map(|n| n.event_sequences.clone()))
        .chain(four.namespaces.iter().map(|n| n.event_sequence))
        .collect();
    let seen: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(replied, seen);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

#[tokio::test]
async fn prune_drops_only_idle_namespaces_and_a_dry_run_nothing() {
    let (server, store, _tmp) = start_with_clock(|_| {}).await;
    let a = action(1);
    for ns in ["ci/branches/old", "ci/branches/stale", "ci/main", "dev"] {
        put(&server, ns, &a).await;
    }
    put(&server, "ci/branches/old", &action(2)).await;
    store.advance_clock(10 * DAY);
    assert!(hit(&server, "dev", &a).await); // a read counts as use
    store.advance_clock(5 * DAY);
    put(&server, "ci/main", &action(3)).await;
    // Now: ci/branches/* idle 15 days, dev 5 days, ci/main 0.

    let dry = prune(&server, 14 * DAY, true).await;
    assert!(dry.dry_run);
    assert_eq!(
        names(dry.namespaces.iter().map(|n| &n.name)),
        ["ci/branches/old", "ci/branches/stale"]
    );
    assert!(dry
        .namespaces
        .iter()
        .all(|n| n.removed == 0 && n.event_sequence == 0));
    // A dry run drops nothing (checked by listing: a lookup would count as a use).
    assert_eq!(list(&server, "").await.len(), 4);

    // A pattern narrows it.
    let one = server
        .admin()
        .prune_namespaces(PruneNamespacesRequest {
            idle_seconds: (14 * DAY).as_secs(),
            namespace_pattern: "*/old".into(),
            reason: "branch deleted".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names(one.namespaces.iter().map(|n| &n.name)),
        ["ci/branches/old"]
    );
    assert_eq!(one.namespaces[0].removed, 2);
    assert!(one.namespaces[0].event_sequence > 0);
    assert_eq!(one.reason, "branch deleted");
    assert!(!hit(&server, "ci/branches/old", &a).await);
    assert_eq!(
        list(&server, "ci/branches/*").await.len(),
        1,
        "stale is left"
    );

    let rest = prune(&server, 14 * DAY, false).await;
    assert_eq!(
        names(rest.namespaces.iter().map(|n| &n.name)),
        ["ci/branches/stale"]
    );
    assert!(!hit(&server, "ci/branches/stale", &a).await);
    assert!(hit(&server, "dev", &a).await);
    assert!(hit(&server, "ci/main", &a).await);
    assert_eq!(
        names(list(&server, "").await.iter().map(|n| &n.name)),
        ["ci/main", "dev"]
    );
    assert!(prune(&server, 14 * DAY, false).await.namespaces.is_empty());
}

#[tokio::test]
async fn cli_invalidates_lists_and_prunes_a_running_server() {
    let (server, store, _tmp) = start_with_clock(|_| {}).await;
    let url = server.url();
    let (a, b) = (action(1), action(2));
    for ns in ["ci/main", "ci/branches/x", "ci/branches/y"] {
        put(&server, ns, &a).await;
        put(&server, ns, &b).await;
    }

    let a_arg = format!("{}/{}", a.hash, a.size_bytes);
    let out = hoard(&[
        "invalidate",
        "--server",
        &url,
        "--namespace",
        "ci/main",
        "--action",
        &a_arg,
        "--reason",
        "flaky test",
        "--json",
    ])
    .await;
    let reply = json::<Value>(succeeded(&out));
    assert_eq!(reply["namespaces"][0]["name"], "ci/main");
    assert_eq!(reply["namespaces"][0]["removed"], 1);
    assert!(!hit(&server, "ci/main", &a).await);
    assert!(hit(&server, "ci/main", &b).await);

    let out = hoard(&[
        "invalidate",
        "--server",
        &url,
        "--pattern",
        "ci/branches/*",
        "--reason",
        "gcc 14",
    ])
    .await;
    let text = stdout(succeeded(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("ci/branches/x: invalidated, now epoch 1"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("ci/branches/y: invalidated, now epoch 1"),
        "{text}"
    );
    assert!(!hit(&server, "ci/branches/x", &b).await);

    let out = hoard(&["namespaces", "--server", &url, "--json"]).await;
    let listed = json::<Value>(succeeded(&out));
    let all = listed["namespaces"].as_array().unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0]["name"], "ci/branches/x");
    assert_eq!(all[0]["reason"], "gcc 14");
    assert_eq!(all[2]["name"], "ci/main");
    assert_eq!(all[2]["reason"], Value::Null);
    let out = hoard(&["namespaces", "--server", &url, "--pattern", "ci/main"]).await;
    let text = stdout(succeeded(&out));
    assert!(text.starts_with("ci/main  epoch 0  last used"), "{text}");

    store.advance_clock(15 * DAY);
    put(&server, "ci/main", &a).await;
    let out = hoard(&[
        "prune-namespaces",
        "--server",
        &url,
        "--idle",
        "14d",
        "--dry-run",
    ])
    .await;
    let text = stdout(succeeded(&out));
    assert!(
        text.contains("ci/branches/x: would be dropped (idle 15d)"),
        "{text}"
    );
    assert!(!text.contains("ci/main"), "{text}");
    let out = hoard(&[
        "prune-namespaces",
        "--server",
        &url,
        "--idle",
        "14d",
        "--pattern",
        "*/x",
        "--json",
    ])
    .await;
    let pruned = json::<Value>(succeeded(&out));
    assert_eq!(pruned["reason"], "idle for 14d");
    assert_eq!(pruned["namespaces"].as_array().unwrap().len(), 1);
    assert_eq!(pruned["namespaces"][0]["name"], "ci/branches/x");
    // At most its two results: reading one after the bump may already have reclaimed it.
    assert!(pruned["namespaces"][0]["removed"].as_u64().unwrap() <= 2);
    let out = hoard(&["prune-namespaces", "--server", &url, "--idle", "30d"]).await;
    assert!(
        stdout(succeeded(&out)).contains("nothing to drop"),
        "{out:?}"
    );

    // Refusals: flags (clap), the server's (one line naming the field), no server.
    let out = hoard(&["invalidate", "--server", &url, "--namespace", "ci/main"]).await;
    assert!(failure(&out).contains("--reason"), "{out:?}");
    let out = hoard(&[
        "invalidate",
        "--server",
        &url,
        "--pattern",
        "ci/*",
        "--action",
        &a_arg,
        "--reason",
        "r",
    ])
    .await;
    failure(&out);
    let out = hoard(&[
        "invalidate",
        "--server",
        &url,
        "--namespace",
        "ci/main",
        "--reason",
        "  ",
    ])
    .await;
    let err = failure(&out);
    assert!(
        err.contains("InvalidArgument") && err.contains("reason"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = hoard(&[
        "invalidate",
        "--server",
        &url,
        "--namespace",
        "a/../b",
        "--reason",
        "r",
    ])
    .await;
    assert!(failure(&out).contains("namespace"), "{out:?}");
    let out = hoard(&["prune-namespaces", "--server", &url, "--idle", "0s"]).await;
    assert!(failure(&out).contains("--idle"), "{out:?}");
    let out = hoard(&["namespaces", "--server", "127.0.0.1:1"]).await;
    assert!(failure(&out).contains("cannot connect"), "{out:?}");
}

#[tokio::test]
async fn idle_namespaces_are_pruned_on_a_schedule_and_protected_ones_stay() {
    let (server, store, _tmp) = start_with_clock(|c| {
        c.namespaces.prune_idle_after = hoard::config::HumanDuration(Duration::from_secs(60));
        c.namespaces.protected = vec!["ci/main".into(), "release/*".into()];
    })
    .await;
    let a = action(1);
    for ns in [
        "ci/main",
        "release/1.0",
        "ci/branches/gone",
        "ci/branches/busy",
    ] {
        put(&server, ns, &a).await;
    }
    let mut stream = WatchClient::connect(server.url())
        .await
        .unwrap()
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    store.advance_clock(2 * 60 * Duration::from_secs(1));
    // Used now: not idle.
    put(&server, "ci/branches/busy", &a).await;
    // The task checks every 60s / 16: within a few seconds the idle branch is gone.
    let dropped = take(&mut stream, 1).await;
    assert_eq!(dropped[0].kind(), EventKind::NamespaceDropped);
    assert_eq!(dropped[0].namespace, "ci/branches/gone");
    assert!(
        dropped[0].reason.contains("prune_idle_after"),
        "{:?}",
        dropped[0]
    );
    assert_eq!(lookup_result(&server, "ci/branches/gone", &a).await, None);
    for kept in ["ci/main", "release/1.0", "ci/branches/busy"] {
        assert!(lookup_result(&server, kept, &a).await.is_some(), "{kept}");
    }
    let left: Vec<String> = list(&server, "")
        .await
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert!(!left.contains(&"ci/branches/gone".to_string()), "{left:?}");
}
