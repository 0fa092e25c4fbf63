//! Namespace policy: read chains (a branch reads itself, then main) and write targets, through
//! the REAPI services of a real server.

use hoard::config::{Config, NamespaceRule};
use hoard::proto::reapi::{
    self, ActionResult, GetActionResultRequest, GetCapabilitiesRequest, OutputFile,
};

use crate::common::update_result as update;
use crate::common::{
    batch_put, blob, digest_of, lookup_result, missing, stats, write_blob, write_name, TestServer,
};

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

/// `ci/ma\u{456}n` (a Cyrillic і) looks like `ci/main` but is another string: were it
/// accepted, it would be a namespace of its own that a grant on `ci/main` does not cover. Every
/// service refuses it, naming the character, and nothing is stored under it.
#[tokio::test]
async fn a_look_alike_instance_name_is_refused_and_stores_nothing() {
    let server = TestServer::start().await;
    let look_alike = "ci/ma\u{0456}n";
    let refused = |what: &str, e: tonic::Status| {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
        assert!(e.message().contains("U+0456"), "{what}: {}", e.message());
    };
    let out = blob(100, 7);
    batch_put(&server, "", &[&out]).await;
    let action = digest_of(b"look-alike action");
    let e = update(&server, look_alike, &action, &result(&digest_of(&out), 0))
        .await
        .expect_err("UpdateActionResult with a look-alike name");
    refused("UpdateActionResult", e);
    let e = server
        .ac()
        .get_action_result(GetActionResultRequest {
            instance_name: look_alike.into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .expect_err("GetActionResult with a look-alike name");
    refused("GetActionResult", e);

    let data = blob(1000, 8);
    let d = digest_of(&data);
    let name = write_name(look_alike, "u-1", &d);
    let e = write_blob(&server, &name, &data, 0, 1000)
        .await
        .expect_err("ByteStream Write with a look-alike name");
    refused("ByteStream Write", e);

    // Nothing stored anywhere: the one blob is the one put before, and no action result.
    assert_eq!(missing(&server, std::slice::from_ref(&d)).await, [d]);
    let s = stats(&server).await;
    assert_eq!((s.blobs, s.action_results), (1, 0));
    server.stop().await;
}
