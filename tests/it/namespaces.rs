//! Namespace policy: read chains (a branch reads itself, then main) and write targets, through
//! the REAPI services of a real server.

use hoard::config::{Config, NamespaceRule};
use hoard::proto::reapi::{
    self, ActionResult, GetActionResultRequest, GetCapabilitiesRequest, OutputFile,
};

use crate::common::update_result as update;
use crate::common::{batch_put, blob, digest_of, lookup_result, TestServer};

fn rule(pattern: &str, read: &[&str], write: Option<&str>) -> NamespaceRule {
    NamespaceRule {
        pattern: pattern.into(),
        ac_ttl: None,
        read: Some(read.iter().map(|s| s.to_string()).collect()),
        write: write.map(String::from),
    }
}

/// ci/branches/* read themselves, then ci/main; ci/release-view reads ci/main and is read-only.
async fn ci_server() -> TestServer {
    TestServer::start_with(|c: &mut Config| {
        c.namespaces.rules = vec![
            rule("ci/branches/*", &["ci/main"], None),
            rule("ci/release-view", &["ci/main"], Some("none")),
        ];
    })
    .await
}

fn result(out: &reapi::Digest, exit_code: i32) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(out.clone()),
            ..Default::default()
        }],
        exit_code,
        ..Default::default()
    }
}

/// The exit code of the result served for `action` in `instance` (a tag telling which copy was
/// served), or None on NOT_FOUND.
async fn lookup(server: &TestServer, instance: &str, action: &reapi::Digest) -> Option<i32> {
    lookup_result(server, instance, action)
        .await
        .map(|r| r.exit_code)
}

#[tokio::test]
async fn a_branch_reads_main_and_writes_only_itself() {
    let server = ci_server().await;
    let out = blob(100, 1);
    batch_put(&server, "", &[&out]).await;
    let out = digest_of(&out);
    let (shared, own) = (digest_of(b"action shared"), digest_of(b"action own"));
    update(&server, "ci/main", &shared, &result(&out, 1))
        .await
        .unwrap();

    // The branch's first build gets main's results.
    assert_eq!(lookup(&server, "ci/branches/x", &shared).await, Some(1));
    // What the branch writes lands in the branch, never in main or another branch.
    update(&server, "ci/branches/x", &own, &result(&out, 2))
        .await
        .unwrap();
    assert_eq!(lookup(&server, "ci/branches/x", &own).await, Some(2));
    assert_eq!(lookup(&server, "ci/main", &own).await, None);
    assert_eq!(lookup(&server, "ci/branches/y", &own).await, None);
    // The branch's own result shadows main's.
    update(&server, "ci/branches/x", &shared, &result(&out, 3))
        .await
        .unwrap();
    assert_eq!(lookup(&server, "ci/branches/x", &shared).await, Some(3));
    assert_eq!(lookup(&server, "ci/main", &shared).await, Some(1));
    // Names matching no rule read only themselves.
    assert_eq!(lookup(&server, "dev", &shared).await, None);
    server.stop().await;
}

#[tokio::test]
async fn an_unservable_result_in_the_branch_does_not_hide_mains() {
    let server = ci_server().await;
    let out = blob(100, 2);
    batch_put(&server, "", &[&out]).await;
    let out = digest_of(&out);
    let gone = digest_of(&blob(100, 3)); // never uploaded
    let action = digest_of(b"action");
    update(&server, "ci/main", &action, &result(&out, 1))
        .await
        .unwrap();
    update(&server, "ci/branches/x", &action, &result(&gone, 2))
        .await
        .unwrap();
    assert_eq!(lookup(&server, "ci/branches/x", &action).await, Some(1));
    // With no servable copy anywhere, the miss says why for each namespace.
    let other = digest_of(b"other");
    update(&server, "ci/branches/x", &other, &result(&gone, 2))
        .await
        .unwrap();
    let err = server
        .ac()
        .get_action_result(GetActionResultRequest {
            instance_name: "ci/branches/x".into(),
            action_digest: Some(other.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("\"ci/main\""), "{}", err.message());
    assert!(
        err.message().contains("no longer in the CAS"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_read_only_namespace_refuses_updates_and_says_so_in_capabilities() {
    let server = ci_server().await;
    let out = blob(100, 4);
    batch_put(&server, "", &[&out]).await;
    let out = digest_of(&out);
    let action = digest_of(b"action");
    update(&server, "ci/main", &action, &result(&out, 1))
        .await
        .unwrap();
    assert_eq!(lookup(&server, "ci/release-view", &action).await, Some(1));
    let err = update(&server, "ci/release-view", &action, &result(&out, 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("read-only"), "{}", err.message());
    assert_eq!(lookup(&server, "ci/main", &action).await, Some(1));

    let update_enabled = |instance: &str| {
        let mut caps = server.capabilities();
        let instance = instance.to_string();
        async move {
            caps.get_capabilities(GetCapabilitiesRequest {
                instance_name: instance,
            })
            .await
            .unwrap()
            .into_inner()
            .cache_capabilities
            .unwrap()
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
        }
    };
    assert!(!update_enabled("ci/release-view").await);
    assert!(update_enabled("ci/branches/x").await);
    assert!(update_enabled("").await);
    server.stop().await;
}
