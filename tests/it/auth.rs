//! Access control (`[auth]`): the grant matrix over real gRPC calls. Every refusal is checked
//! for its code, for a message that says what was wrong, and for storing nothing.

use hoard::auth::{hash_token, Access, AuthConfig, ClientCertConfig, Grant, TokenConfig};
use hoard::config::Config;
use hoard::proto::admin::{InvalidateRequest, ListNamespacesRequest, StatsRequest};
use hoard::proto::bytestream::QueryWriteStatusRequest;
use hoard::proto::health::HealthCheckRequest;
use hoard::proto::reapi::{
    self, batch_update_blobs_request, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    GetActionResultRequest, GetCapabilitiesRequest, UpdateActionResultRequest,
};
use hoard::proto::watch::{watch_client::WatchClient, WatchRequest};
use tonic::{Code, Status};

use crate::common::{
    blob, digest_of, failure, hoard_with, json, take, write_name, write_requests, TestServer,
};

const READER: &str = "reader-token-0123456789";
const CI: &str = "ci-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";
const CI_ADMIN: &str = "ci-admin-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const MAIN_WRITER: &str = "main-writer-token-0123456789";
const RELEASE_WRITER: &str = "release-writer-token-0123456789";

fn grants(list: &[&str]) -> Vec<Grant> {
    list.iter().map(|g| g.parse().expect("grant")).collect()
}

fn token(name: &str, secret: &str, list: &[&str]) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        hash: hash_token(secret),
        grants: grants(list),
    }
}

/// Tokens for every row of the matrix, anonymous callers getting `anonymous`.
fn auth_config(anonymous: Access) -> AuthConfig {
    AuthConfig {
        anonymous,
        tokens: vec![
            token("reader", READER, &["read:**"]),
            token("ci", CI, &["write:ci/**", "read:**"]),
            token("admin", ADMIN, &["admin:**"]),
            token("ci-admin", CI_ADMIN, &["admin:ci/**"]),
            token("alice", ALICE, &["write:dev/alice", "read:dev/**"]),
            token("main-writer", MAIN_WRITER, &["write:ci/main", "read:**"]),
            token("release-writer", RELEASE_WRITER, &["write:ci/release"]),
        ],
        client_certs: vec![ClientCertConfig {
            subject: "runner".into(),
            grants: grants(&["write:ci/**"]),
        }],
    }
}

async fn start(anonymous: Access) -> TestServer {
    TestServer::start_with(|c: &mut Config| {
        c.auth = Some(auth_config(anonymous));
        // dev/* reads ci/main after itself: a chain that crosses grants.
        c.namespaces.rules = vec![
            hoard::config::NamespaceRule {
                pattern: "dev/*".into(),
                ac_ttl: None,
                read: Some(vec!["ci/main".into()]),
                write: None,
            },
            // ci/release stores its results into ci/main.
            hoard::config::NamespaceRule {
                pattern: "ci/release".into(),
                ac_ttl: None,
                read: Some(vec!["ci/main".into()]),
                write: Some("ci/main".into()),
            },
        ];
    })
    .await
}

/// `message` with `authorization: <header>` when given.
fn req<T>(message: T, header: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(h) = header {
        r.metadata_mut()
            .insert("authorization", h.parse().expect("header value"));
    }
    r
}

fn bearer(secret: &str) -> Option<String> {
    Some(format!("Bearer {secret}"))
}

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, needles: &[&str]) {
    let status = result.expect_err("the call should have been refused");
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(
            status.message().contains(n),
            "message {:?} lacks {n:?}",
            status.message()
        );
    }
}

async fn find_missing(
    server: &TestServer,
    instance: &str,
    d: &reapi::Digest,
    header: Option<&str>,
) -> Result<Vec<reapi::Digest>, Status> {
    server
        .cas()
        .find_missing_blobs(req(
            FindMissingBlobsRequest {
                instance_name: instance.into(),
                blob_digests: vec![d.clone()],
                ..Default::default()
            },
            header,
        ))
        .await
        .map(|r| r.into_inner().missing_blob_digests)
}

/// Whether the blob is stored, asked with the admin token.
async fn stored(server: &TestServer, d: &reapi::Digest) -> bool {
    find_missing(server, "", d, bearer(ADMIN).as_deref())
        .await
        .expect("admin FindMissingBlobs")
        .is_empty()
}

async fn batch_update(
    server: &TestServer,
    instance: &str,
    data: &[u8],
    header: Option<&str>,
) -> Result<(), Status> {
    let resp = server
        .cas()
        .batch_update_blobs(req(
            BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(digest_of(data)),
                    data: data.to_vec().into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            header,
        ))
        .await?
        .into_inner();
    let code = resp.responses[0].status.as_ref().map_or(0, |s| s.code);
    assert_eq!(code, 0, "{resp:?}");
    Ok(())
}

async fn bytestream_write(
    server: &TestServer,
    instance: &str,
    data: &[u8],
    upload: &str,
    header: Option<&str>,
) -> Result<(), Status> {
    let name = write_name(instance, upload, &digest_of(data));
    let requests = write_requests(&name, data, 0, 64 << 10);
    server
        .bytestream()
        .write(req(futures::stream::iter(requests), header))
        .await
        .map(|_| ())
}

fn action_and_result(seed: u64) -> (reapi::Digest, reapi::ActionResult) {
    let action = digest_of(&blob(100, seed));
    let result = reapi::ActionResult {
        exit_code: seed as i32,
        ..Default::default()
    };
    (action, result)
}

async fn update_result(
    server: &TestServer,
    instance: &str,
    action: &reapi::Digest,
    result: &reapi::ActionResult,
    header: Option<&str>,
) -> Result<(), Status> {
    server
        .ac()
        .update_action_result(req(
            UpdateActionResultRequest {
                instance_name: instance.into(),
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                ..Default::default()
            },
            header,
        ))
        .await
        .map(|_| ())
}

async fn get_result(
    server: &TestServer,
    instance: &str,
    action: &reapi::Digest,
    header: Option<&str>,
) -> Result<reapi::ActionResult, Status> {
    server
        .ac()
        .get_action_result(req(
            GetActionResultRequest {
                instance_name: instance.into(),
                action_digest: Some(action.clone()),
                ..Default::default()
            },
            header,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn update_enabled(server: &TestServer, instance: &str, header: Option<&str>) -> bool {
    server
        .capabilities()
        .get_capabilities(req(
            GetCapabilitiesRequest {
                instance_name: instance.into(),
            },
            header,
        ))
        .await
        .expect("GetCapabilities")
        .into_inner()
        .cache_capabilities
        .and_then(|c| c.action_cache_update_capabilities)
        .is_some_and(|u| u.update_enabled)
}

/// Every kind of write, refused for `header` in `instance` with PERMISSION_DENIED, storing
/// nothing.
async fn writes_denied(server: &TestServer, instance: &str, header: Option<&str>, seed: u64) {
    let data = blob(1000, seed);
    assert_status(
        batch_update(server, instance, &data, header).await,
        Code::PermissionDenied,
        &[instance, "write"],
    );
    assert!(!stored(server, &digest_of(&data)).await);

    // Large enough to be a file upload; refused before its first byte is kept.
    let large = blob(300_000, seed + 1);
    assert_status(
        bytestream_write(server, instance, &large, "u-denied", header).await,
        Code::PermissionDenied,
        &[instance, "write"],
    );
    assert!(!stored(server, &digest_of(&large)).await);
    let progress = server
        .bytestream()
        .query_write_status(req(
            QueryWriteStatusRequest {
                resource_name: write_name(instance, "u-denied", &digest_of(&large)),
            },
            bearer(ADMIN).as_deref(),
        ))
        .await;
    assert_status(progress, Code::NotFound, &[]);

    let (action, result) = action_and_result(seed + 2);
    assert_status(
        update_result(server, instance, &action, &result, header).await,
        Code::PermissionDenied,
        &[instance, "write"],
    );
    assert_status(
        get_result(server, instance, &action, bearer(ADMIN).as_deref()).await,
        Code::NotFound,
        &[],
    );
}

/// Every kind of write, accepted for `header` in `instance`, and there afterwards.
async fn writes_allowed(server: &TestServer, instance: &str, header: Option<&str>, seed: u64) {
    let data = blob(1000, seed);
    batch_update(server, instance, &data, header)
        .await
        .expect("BatchUpdateBlobs");
    assert!(stored(server, &digest_of(&data)).await);
    let large = blob(300_000, seed + 1);
    bytestream_write(server, instance, &large, "u-ok", header)
        .await
        .expect("ByteStream Write");
    assert!(stored(server, &digest_of(&large)).await);
    let (action, result) = action_and_result(seed + 2);
    update_result(server, instance, &action, &result, header)
        .await
        .expect("UpdateActionResult");
    let got = get_result(server, instance, &action, header)
        .await
        .expect("GetActionResult");
    assert_eq!(got.exit_code, result.exit_code);
}

async fn reads_allowed(server: &TestServer, instance: &str, header: Option<&str>) {
    let d = digest_of(&blob(10, 999));
    find_missing(server, instance, &d, header)
        .await
        .expect("FindMissingBlobs");
    let (action, _) = action_and_result(12345);
    assert_status(
        get_result(server, instance, &action, header).await,
        Code::NotFound,
        &["no action result"],
    );
}

async fn stats(server: &TestServer, header: Option<&str>) -> Result<(), Status> {
    server
        .admin()
        .stats(req(StatsRequest {}, header))
        .await
        .map(|_| ())
}

async fn invalidate(
    server: &TestServer,
    namespace: Option<&str>,
    pattern: &str,
    header: Option<&str>,
) -> Result<(), Status> {
    server
        .admin()
        .invalidate(req(
            InvalidateRequest {
                namespace: namespace.map(Into::into),
                namespace_pattern: pattern.into(),
                reason: "test".into(),
                ..Default::default()
            },
            header,
        ))
        .await
        .map(|_| ())
}

async fn watch(server: &TestServer, pattern: &str, header: Option<&str>) -> Result<(), Status> {
    WatchClient::new(server.channel())
        .watch(req(
            WatchRequest {
                namespace_pattern: pattern.into(),
                from_now: true,
                ..Default::default()
            },
            header,
        ))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn anonymous_none_needs_credentials_for_everything_but_health() {
    let server = start(Access::None).await;
    let d = digest_of(&blob(10, 1));
    assert_status(
        find_missing(&server, "", &d, None).await,
        Code::Unauthenticated,
        &["no credentials", "Bearer"],
    );
    let data = blob(1000, 2);
    assert_status(
        batch_update(&server, "ci/main", &data, None).await,
        Code::Unauthenticated,
        &[],
    );
    assert!(!stored(&server, &digest_of(&data)).await);
    let large = blob(300_000, 3);
    assert_status(
        bytestream_write(&server, "ci/main", &large, "u1", None).await,
        Code::Unauthenticated,
        &[],
    );
    assert!(!stored(&server, &digest_of(&large)).await);
    assert_status(stats(&server, None).await, Code::Unauthenticated, &[]);
    assert_status(watch(&server, "", None).await, Code::Unauthenticated, &[]);
    let caps = server
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest::default())
        .await;
    assert_status(caps, Code::Unauthenticated, &[]);

    // Health stays open on both ports.
    let health = server
        .health()
        .check(HealthCheckRequest::default())
        .await
        .expect("health without credentials");
    assert_eq!(health.into_inner().status, 1);
    let mut ops = tokio::net::TcpStream::connect(server.ops_addr())
        .await
        .expect("ops port");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    ops.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("ops request");
    let mut reply = String::new();
    ops.read_to_string(&mut reply).await.expect("ops reply");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // With a token the same calls work.
    reads_allowed(&server, "", bearer(READER).as_deref()).await;
    server.stop().await;
}

#[tokio::test]
async fn anonymous_read_reads_but_never_writes() {
    let server = start(Access::Read).await;
    reads_allowed(&server, "ci/main", None).await;
    writes_denied(&server, "ci/main", None, 10).await;
    assert!(!update_enabled(&server, "ci/main", None).await);
    assert_status(
        stats(&server, None).await,
        Code::PermissionDenied,
        &["anonymous", "admin"],
    );
    watch(&server, "", None).await.expect("anonymous watch");
    server.stop().await;
}

#[tokio::test]
async fn anonymous_write_writes_but_does_not_administer() {
    let server = start(Access::Write).await;
    writes_allowed(&server, "dev/bob", None, 20).await;
    assert!(update_enabled(&server, "dev/bob", None).await);
    assert_status(
        invalidate(&server, Some("dev/bob"), "", None).await,
        Code::PermissionDenied,
        &["dev/bob", "admin"],
    );
    assert_status(stats(&server, None).await, Code::PermissionDenied, &[]);
    server.stop().await;
}

#[tokio::test]
async fn token_grants_decide_per_namespace() {
    let server = start(Access::None).await;
    let reader = bearer(READER);
    let ci = bearer(CI);
    // Read only.
    reads_allowed(&server, "ci/main", reader.as_deref()).await;
    writes_denied(&server, "ci/main", reader.as_deref(), 30).await;
    // Write on ci/** only.
    writes_allowed(&server, "ci/main", ci.as_deref(), 40).await;
    writes_denied(&server, "dev/alice", ci.as_deref(), 50).await;
    assert_status(
        invalidate(&server, Some("ci/main"), "", ci.as_deref()).await,
        Code::PermissionDenied,
        &["ci/main", "admin"],
    );
    // Admin.
    let admin = bearer(ADMIN);
    stats(&server, admin.as_deref()).await.expect("admin stats");
    invalidate(&server, None, "*", admin.as_deref())
        .await
        .expect("admin invalidates everything");
    // Basic credentials carry the same token.
    let basic = format!(
        "Basic {}",
        base64_encode(&format!("anyone:{ADMIN}")).as_str()
    );
    stats(&server, Some(&basic)).await.expect("Basic admin");
    server.stop().await;
}

fn base64_encode(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn pattern_invalidation_needs_admin_over_the_whole_pattern() {
    let server = start(Access::None).await;
    let ci_admin = bearer(CI_ADMIN);
    let (action, result) = action_and_result(60);
    update_result(&server, "ci/main", &action, &result, ci_admin.as_deref())
        .await
        .expect("ci-admin writes ci/main");
    invalidate(&server, None, "ci/*", ci_admin.as_deref())
        .await
        .expect("admin over ci/** covers ci/*");
    assert_status(
        invalidate(&server, None, "*", ci_admin.as_deref()).await,
        Code::PermissionDenied,
        &["every namespace", "admin"],
    );
    assert_status(
        invalidate(&server, None, "c*", ci_admin.as_deref()).await,
        Code::PermissionDenied,
        &["c*"],
    );
    assert_status(
        stats(&server, ci_admin.as_deref()).await,
        Code::PermissionDenied,
        &["every namespace"],
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_unauthenticated_even_where_anonymous_may_read() {
    let server = start(Access::Read).await;
    let d = digest_of(&blob(10, 70));
    let secret = "not-a-known-token-42";
    let wrong = format!("Bearer {secret}");
    let status = find_missing(&server, "", &d, Some(&wrong))
        .await
        .expect_err("wrong token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("unknown token"), "{status:?}");
    assert!(!status.message().contains(secret), "the token is echoed");
    for (header, needle) in [
        ("Bearer", "no token"),
        ("Bearer  ", "no token"),
        ("Digest abc", "unknown authorization scheme"),
        ("Basic %%%", "base64"),
        ("token-without-scheme", "unknown authorization scheme"),
    ] {
        assert_status(
            find_missing(&server, "", &d, Some(header)).await,
            Code::Unauthenticated,
            &[needle],
        );
    }
    // And nothing a wrong token sends is stored.
    let data = blob(1000, 71);
    assert_status(
        batch_update(&server, "", &data, Some(&wrong)).await,
        Code::Unauthenticated,
        &[],
    );
    assert!(!stored(&server, &digest_of(&data)).await);
    server.stop().await;
}

#[tokio::test]
async fn capabilities_tell_each_caller_whether_it_may_update() {
    let server = start(Access::Read).await;
    assert!(!update_enabled(&server, "ci/main", None).await);
    assert!(!update_enabled(&server, "ci/main", bearer(READER).as_deref()).await);
    assert!(update_enabled(&server, "ci/main", bearer(CI).as_deref()).await);
    assert!(!update_enabled(&server, "dev/alice", bearer(CI).as_deref()).await);
    assert!(update_enabled(&server, "dev/alice", bearer(ALICE).as_deref()).await);
    assert!(update_enabled(&server, "", bearer(ADMIN).as_deref()).await);
    server.stop().await;
}

#[tokio::test]
async fn read_chains_skip_namespaces_the_caller_may_not_read() {
    let server = start(Access::None).await;
    let (action, result) = action_and_result(80);
    update_result(&server, "ci/main", &action, &result, bearer(CI).as_deref())
        .await
        .expect("ci writes ci/main");
    // dev/alice reads ci/main after itself: a caller who may read ci/main gets the hit...
    get_result(&server, "dev/alice", &action, bearer(READER).as_deref())
        .await
        .expect("reader sees ci/main through dev/alice's chain");
    // ...alice, who may read only dev/**, does not.
    assert_status(
        get_result(&server, "dev/alice", &action, bearer(ALICE).as_deref()).await,
        Code::NotFound,
        &[],
    );
    assert_status(
        get_result(&server, "ci/main", &action, bearer(ALICE).as_deref()).await,
        Code::PermissionDenied,
        &["ci/main", "read"],
    );
    // Namespace listings show only what the caller may read.
    let listed = server
        .admin()
        .list_namespaces(req(
            ListNamespacesRequest::default(),
            bearer(ALICE).as_deref(),
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.namespaces.iter().all(|n| n.name.starts_with("dev/")),
        "{listed:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn watch_needs_read_over_what_it_streams() {
    let server = start(Access::None).await;
    let alice = bearer(ALICE);
    assert_status(
        watch(&server, "", alice.as_deref()).await,
        Code::PermissionDenied,
        &["read"],
    );
    assert_status(
        watch(&server, "ci/*", alice.as_deref()).await,
        Code::PermissionDenied,
        &["ci/*"],
    );
    watch(&server, "dev/*", alice.as_deref())
        .await
        .expect("alice watches dev/*");
    server.stop().await;
}

#[tokio::test]
async fn oversize_metadata_is_refused() {
    let server = start(Access::Read).await;
    let d = digest_of(&blob(10, 90));
    let mut r = tonic::Request::new(FindMissingBlobsRequest {
        blob_digests: vec![d.clone()],
        ..Default::default()
    });
    r.metadata_mut()
        .insert("x-padding", "p".repeat(20 << 10).parse().expect("value"));
    let status = server
        .cas()
        .find_missing_blobs(r)
        .await
        .expect_err("oversize metadata");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limits.max_metadata_size"),
        "{status:?}"
    );
    // Far above it the transport's own cap (4x the bound) refuses the header block before
    // anything of ours sees it. A client that splits it into 16 KiB CONTINUATION frames has its
    // connection ended with ENHANCE_YOUR_CALM (RESOURCE_EXHAUSTED to gRPC clients); one that
    // sends it in one frame (the server accepts frames of up to 1 MiB) gets HTTP 431 on that
    // stream, which gRPC clients report as UNKNOWN. Either way nothing is served and the
    // server serves on.
    let mut r = tonic::Request::new(FindMissingBlobsRequest::default());
    r.metadata_mut()
        .insert("x-padding", "p".repeat(200 << 10).parse().expect("value"));
    let far = server
        .cas()
        .find_missing_blobs(r)
        .await
        .expect_err("far above");
    assert!(
        far.code() == Code::ResourceExhausted
            || (far.code() == Code::Unknown && far.message().contains("431")),
        "{far:?}"
    );
    // Within the bound the same call works.
    find_missing(&server, "", &d, None)
        .await
        .expect("small metadata");
    server.stop().await;
}

#[tokio::test]
async fn without_an_auth_section_everything_is_open() {
    let server = TestServer::start().await;
    writes_allowed(&server, "ci/main", None, 100).await;
    stats(&server, None).await.expect("stats");
    assert!(update_enabled(&server, "ci/main", None).await);
    server.stop().await;
}

#[tokio::test]
async fn provenance_and_events_name_the_token_that_wrote() {
    let server = start(Access::None).await;
    let mut events = WatchClient::new(server.channel())
        .watch(req(
            WatchRequest {
                from_now: true,
                kinds: vec![
                    hoard::proto::watch::EventKind::ActionResultStored as i32,
                    hoard::proto::watch::EventKind::NamespaceInvalidated as i32,
                ],
                ..Default::default()
            },
            bearer(READER).as_deref(),
        ))
        .await
        .expect("watch")
        .into_inner();
    let (ci_action, ci_result) = action_and_result(110);
    let (alice_action, alice_result) = action_and_result(111);
    update_result(
        &server,
        "ci/main",
        &ci_action,
        &ci_result,
        bearer(CI).as_deref(),
    )
    .await
    .expect("ci writes ci/main");
    update_result(
        &server,
        "dev/alice",
        &alice_action,
        &alice_result,
        bearer(ALICE).as_deref(),
    )
    .await
    .expect("alice writes dev/alice");

    // `hoard provenance`, authenticated by HOARD_TOKEN, names the right writer for each; dev/alice
    // reads ci/main too, so its chain finds CI's result there.
    let url = server.url();
    for (instance, action, writer, namespace) in [
        ("ci/main", &ci_action, "ci", "ci/main"),
        ("dev/alice", &alice_action, "alice", "dev/alice"),
        ("dev/alice", &ci_action, "ci", "ci/main"),
    ] {
        let digest = format!("{}/{}", action.hash, action.size_bytes);
        let out = hoard_with(
            &[
                "provenance",
                "--server",
                &url,
                "--instance",
                instance,
                &digest,
                "--json",
            ],
            &[("HOARD_TOKEN", READER)],
        )
        .await;
        let got: serde_json::Value = json(&out);
        assert_eq!(got["writer"], writer, "{instance} {got}");
        assert_eq!(got["namespace"], namespace, "{instance} {got}");
    }
    // Without the token the command is refused, and says why.
    let digest = format!("{}/{}", ci_action.hash, ci_action.size_bytes);
    let out = hoard_with(
        &[
            "provenance",
            "--server",
            &url,
            "--instance",
            "ci/main",
            &digest,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        failure(&out).contains("no credentials"),
        "{}",
        failure(&out)
    );

    // The watch stream named the writers, and then who invalidated.
    invalidate(&server, Some("ci/main"), "", bearer(ADMIN).as_deref())
        .await
        .expect("admin invalidates");
    let seen = take(&mut events, 3).await;
    let callers: Vec<(&str, &str)> = seen
        .iter()
        .map(|e| (e.namespace.as_str(), e.caller.as_str()))
        .collect();
    assert_eq!(
        callers,
        [
            ("ci/main", "ci"),
            ("dev/alice", "alice"),
            ("ci/main", "admin")
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn the_cli_sends_its_token() {
    let server = start(Access::None).await;
    let url = server.url();
    let out = hoard_with(&["stats", "--server", &url], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(failure(&out).contains("UNAUTHENTICATED") || failure(&out).contains("credentials"));
    let out = hoard_with(&["stats", "--server", &url], &[("HOARD_TOKEN", READER)]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(failure(&out).contains("admin"), "{}", failure(&out));
    let out = hoard_with(&["stats", "--server", &url, "--token", ADMIN], &[]).await;
    assert!(out.status.success(), "{}", failure(&out));
    let out = hoard_with(
        &[
            "invalidate",
            "--server",
            &url,
            "--namespace",
            "ci/main",
            "--reason",
            "t",
        ],
        &[("HOARD_TOKEN", CI_ADMIN)],
    )
    .await;
    assert!(out.status.success(), "{}", failure(&out));
    server.stop().await;
}

/// Every read call, for a caller without read on the instance: PERMISSION_DENIED naming it.
#[tokio::test]
async fn every_read_call_needs_read_on_the_instance() {
    use hoard::proto::admin::GetProvenanceRequest;
    use hoard::proto::bytestream::ReadRequest;
    let server = start(Access::None).await;
    let data = blob(1000, 120);
    let d = digest_of(&data);
    batch_update(&server, "ci/main", &data, bearer(CI).as_deref())
        .await
        .expect("ci stores a blob");
    let alice = bearer(ALICE);
    let h = alice.as_deref();
    let denied = &["\"ci/main\"", "read", "alice"];
    assert_status(
        find_missing(&server, "ci/main", &d, h).await,
        Code::PermissionDenied,
        denied,
    );
    let read = server
        .cas()
        .batch_read_blobs(req(
            reapi::BatchReadBlobsRequest {
                instance_name: "ci/main".into(),
                digests: vec![d.clone()],
                ..Default::default()
            },
            h,
        ))
        .await;
    assert_status(read, Code::PermissionDenied, denied);
    let tree = server
        .cas()
        .get_tree(req(
            reapi::GetTreeRequest {
                instance_name: "ci/main".into(),
                root_digest: Some(d.clone()),
                ..Default::default()
            },
            h,
        ))
        .await;
    assert_status(tree.map(|_| ()), Code::PermissionDenied, denied);
    let stream = server
        .bytestream()
        .read(req(
            ReadRequest {
                resource_name: crate::common::read_name("ci/main", &d),
                ..Default::default()
            },
            h,
        ))
        .await;
    assert_status(stream.map(|_| ()), Code::PermissionDenied, denied);
    let (action, result) = action_and_result(121);
    update_result(&server, "ci/main", &action, &result, bearer(CI).as_deref())
        .await
        .expect("ci stores a result");
    assert_status(
        get_result(&server, "ci/main", &action, h).await,
        Code::PermissionDenied,
        denied,
    );
    let provenance = |instance: &str, header: Option<String>| {
        let mut admin = server.admin();
        let request = req(
            GetProvenanceRequest {
                instance_name: instance.into(),
                action_digest: Some(action.clone()),
            },
            header.as_deref(),
        );
        async move { admin.get_provenance(request).await.map(|r| r.into_inner()) }
    };
    assert_status(
        provenance("ci/main", alice.clone()).await,
        Code::PermissionDenied,
        denied,
    );
    // Through dev/alice's chain, ci/main is skipped for alice (and not named as looked in)...
    let hidden = provenance("dev/alice", alice.clone())
        .await
        .expect_err("hidden");
    assert_eq!(hidden.code(), Code::NotFound);
    assert!(!hidden.message().contains("ci/main"), "{hidden:?}");
    // ...and found for a reader.
    let found = provenance("dev/alice", bearer(READER))
        .await
        .expect("reader");
    assert_eq!(
        (found.writer.as_str(), found.namespace.as_str()),
        ("ci", "ci/main")
    );
    // Upload progress needs write.
    let progress = server
        .bytestream()
        .query_write_status(req(
            QueryWriteStatusRequest {
                resource_name: write_name("ci/main", "u1", &d),
            },
            bearer(READER).as_deref(),
        ))
        .await;
    assert_status(progress, Code::PermissionDenied, &["\"ci/main\"", "write"]);
    server.stop().await;
}

/// Every admin call, for a caller with write but not admin.
#[tokio::test]
async fn every_admin_call_needs_admin() {
    use hoard::proto::admin::{GcRequest, PruneNamespacesRequest, VerifyRequest};
    let server = start(Access::None).await;
    let ci = bearer(CI);
    let h = ci.as_deref();
    let everything = &["\"ci\"", "every namespace", "admin"];
    assert_status(stats(&server, h).await, Code::PermissionDenied, everything);
    let gc = server.admin().gc(req(GcRequest::default(), h)).await;
    assert_status(gc, Code::PermissionDenied, everything);
    let verify = server.admin().verify(req(VerifyRequest {}, h)).await;
    assert_status(verify, Code::PermissionDenied, everything);
    let prune = |pattern: &str| {
        let mut admin = server.admin();
        let request = req(
            PruneNamespacesRequest {
                idle_seconds: 60,
                dry_run: true,
                namespace_pattern: pattern.into(),
                ..Default::default()
            },
            h,
        );
        async move { admin.prune_namespaces(request).await.map(|_| ()) }
    };
    assert_status(prune("").await, Code::PermissionDenied, everything);
    assert_status(
        prune("ci/*").await,
        Code::PermissionDenied,
        &["ci/*", "admin"],
    );
    // A pattern too long is refused for what it is, before any grant is looked at.
    assert_status(
        prune(&"a*".repeat(10_000)).await,
        Code::InvalidArgument,
        &["namespace_pattern", "bytes long"],
    );
    assert_status(
        watch(&server, &"a*".repeat(10_000), h).await,
        Code::InvalidArgument,
        &["namespace_pattern"],
    );
    assert_status(
        invalidate(&server, Some("ci/main"), "", h).await,
        Code::PermissionDenied,
        &["\"ci/main\"", "admin"],
    );
    server.stop().await;
}

/// An instance whose results go to another namespace: uploading its blobs needs the same
/// grant as storing its results, so a build with uploads never half-works.
#[tokio::test]
async fn uploads_need_write_where_the_instance_writes() {
    let server = start(Access::None).await;
    let main_writer = bearer(MAIN_WRITER);
    assert!(update_enabled(&server, "ci/release", main_writer.as_deref()).await);
    writes_allowed(&server, "ci/release", main_writer.as_deref(), 130).await;
    let large = blob(300_000, 135);
    let name = write_name("ci/release", "u-progress", &digest_of(&large));
    let progress = server
        .bytestream()
        .query_write_status(req(
            QueryWriteStatusRequest {
                resource_name: name,
            },
            main_writer.as_deref(),
        ))
        .await;
    assert_status(progress, Code::NotFound, &["no resumable upload"]);
    // Write on ci/release itself is not enough: its results go to ci/main, so such a token
    // could not store them, and may not upload through it either.
    let release_writer = bearer(RELEASE_WRITER);
    assert!(!update_enabled(&server, "ci/release", release_writer.as_deref()).await);
    writes_denied(&server, "ci/release", release_writer.as_deref(), 140).await;
    let progress = server
        .bytestream()
        .query_write_status(req(
            QueryWriteStatusRequest {
                resource_name: write_name("ci/release", "u1", &digest_of(&large)),
            },
            release_writer.as_deref(),
        ))
        .await;
    assert_status(
        progress,
        Code::PermissionDenied,
        &["\"ci/main\"", "ci/release"],
    );
    server.stop().await;
}

#[tokio::test]
async fn assets_need_read_to_fetch_and_write_where_they_are_stored_to_push() {
    use hoard::proto::asset::{
        fetch_client::FetchClient, push_client::PushClient, FetchBlobRequest, PushBlobRequest,
    };
    let server = start(Access::None).await;
    let data = blob(100, 77);
    let d = digest_of(&data);
    server
        .cas()
        .batch_update_blobs(req(
            BatchUpdateBlobsRequest {
                instance_name: "ci/main".into(),
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: data.into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            bearer(CI).as_deref(),
        ))
        .await
        .expect("upload");
    let push = |instance: &str, header: Option<String>| {
        let mut client = PushClient::new(server.channel());
        let r = req(
            PushBlobRequest {
                instance_name: instance.into(),
                uris: vec!["urn:tool".into()],
                blob_digest: Some(d.clone()),
                ..Default::default()
            },
            header.as_deref(),
        );
        async move { client.push_blob(r).await }
    };
    let fetch = |instance: &str, header: Option<String>| {
        let mut client = FetchClient::new(server.channel());
        let r = req(
            FetchBlobRequest {
                instance_name: instance.into(),
                uris: vec!["urn:tool".into()],
                ..Default::default()
            },
            header.as_deref(),
        );
        async move { client.fetch_blob(r).await.map(|r| r.into_inner()) }
    };
    assert_status(push("ci/main", None).await, Code::Unauthenticated, &[]);
    assert_status(
        push("ci/main", bearer(READER)).await,
        Code::PermissionDenied,
        &["ci/main", "write"],
    );
    // Alice may write dev/alice only.
    assert_status(
        push("ci/main", bearer(ALICE)).await,
        Code::PermissionDenied,
        &["ci/main"],
    );
    assert_status(
        fetch("ci/main", bearer(READER)).await,
        Code::NotFound,
        &["urn:tool"],
    );
    push("ci/main", bearer(CI))
        .await
        .expect("CI may push to ci/main");
    let hit = fetch("ci/main", bearer(READER)).await.expect("fetch");
    assert_eq!(hit.blob_digest, Some(d.clone()));
    // dev/alice reads itself, then ci/main: a reader of both finds it through the chain,
    // Alice (who may not read ci/main) does not.
    let via_chain = fetch("dev/alice", bearer(CI)).await.expect("fetch");
    assert_eq!(via_chain.blob_digest, Some(d.clone()));
    assert_status(
        fetch("dev/alice", bearer(ALICE)).await,
        Code::NotFound,
        &["dev/alice"],
    );
    assert_status(fetch("ci/main", None).await, Code::Unauthenticated, &[]);
    assert_status(
        fetch("ci/main", bearer(RELEASE_WRITER)).await,
        Code::PermissionDenied,
        &["read"],
    );
    // The probe BuildStream sends at start: INVALID_ARGUMENT for anyone who is authenticated.
    let mut client = PushClient::new(server.channel());
    let probe = client
        .push_blob(req(PushBlobRequest::default(), bearer(READER).as_deref()))
        .await;
    assert_status(probe, Code::InvalidArgument, &["uris"]);
}
