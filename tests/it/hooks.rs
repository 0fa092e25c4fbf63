//! VCS webhooks against real servers: GitHub and GitLab deliveries in the shapes their public
//! documentation gives (signed here as the forges sign them), refusals that change nothing,
//! replays applied once, and a real `git push` into a bare repository whose `post-receive`
//! hook runs `hoard hook git`. Each action is checked by what a client sees (hits, misses) and
//! by the watch event a watcher receives, with its reason.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hoard::auth::{hash_token, Access, AuthConfig, TokenConfig};
use hoard::config::Config;
use hoard::hooks::{HookOn, HookRule};
use hoard::proto::reapi::{self, ActionResult};
use hoard::proto::watch::{watch_client::WatchClient, Event, EventKind, WatchRequest};
use serde_json::{json, Value};

use crate::common::{digest_of, lookup_result, take, update_result, TestServer};

const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITLAB_TOKEN: &str = "gitlab-webhook-token";
const HOOKS_TOKEN: &str = "hooks-admin-token-0123456789";
const WRITER_TOKEN: &str = "writer-token-0123456789";

fn action() -> reapi::Digest {
    digest_of(b"hooks test action")
}

async fn put(server: &TestServer, namespace: &str) {
    let result = ActionResult {
        exit_code: 3,
        ..Default::default()
    };
    update_result(server, namespace, &action(), &result)
        .await
        .expect("UpdateActionResult");
}

async fn hit(server: &TestServer, namespace: &str) -> bool {
    lookup_result(server, namespace, &action()).await.is_some()
}

fn rule(on: HookOn, branches: &str, paths: &[&str]) -> HookRule {
    HookRule {
        on,
        branches: Some(branches.into()),
        tags: None,
        paths: paths.iter().map(|p| p.to_string()).collect(),
        invalidate: None,
        prune: None,
    }
}

/// The example rules: a toolchain change on main invalidates every CI namespace; a
/// deleted branch's namespace is pruned; a tag push invalidates its release namespace.
fn rules() -> Vec<HookRule> {
    let toolchain = HookRule {
        invalidate: Some("ci/**".into()),
        ..rule(
            HookOn::Push,
            "main",
            &[
                ".bazelversion",
                "MODULE.bazel",
                "WORKSPACE",
                "toolchains/**",
            ],
        )
    };
    let deleted = HookRule {
        prune: Some("ci/branches/{branch}".into()),
        ..rule(HookOn::Delete, "**", &[])
    };
    let tagged = HookRule {
        tags: Some("v*".into()),
        branches: None,
        invalidate: Some("release/{tag}".into()),
        ..rule(HookOn::Push, "", &[])
    };
    vec![toolchain, deleted, tagged]
}

/// A server with `[hooks]`: both forges' secrets in files, the rules above, `ci/branches/keep`
/// protected.
async fn start(dir: &Path, edit: impl FnOnce(&mut Config)) -> TestServer {
    let github = dir.join("github-secret");
    std::fs::write(&github, format!("{GITHUB_SECRET}\n")).unwrap();
    let gitlab = dir.join("gitlab-token");
    std::fs::write(&gitlab, GITLAB_TOKEN).unwrap();
    TestServer::start_with(|c| {
        c.hooks.github_secret_file = Some(github);
        c.hooks.gitlab_token_file = Some(gitlab);
        c.hooks.rules = rules();
        c.namespaces.protected = vec!["ci/branches/keep".into()];
        edit(c);
    })
    .await
}

async fn watch(server: &TestServer) -> tonic::Streaming<Event> {
    WatchClient::connect(server.url())
        .await
        .unwrap()
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().http1_only().build().unwrap()
}

/// POSTs `body` to `path` with `headers`: the status and the JSON reply.
async fn post(
    server: &TestServer,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, Value) {
    let mut request = http()
        .post(format!("{}{path}", server.url()))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        request = request.header(*k, v);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, value)
}

fn signature(secret: &str, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body.as_bytes()).as_ref())
    )
}

fn github_headers(event: &str, delivery: &str, body: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-github-event", event.into()),
        ("x-github-delivery", delivery.into()),
        ("x-hub-signature-256", signature(GITHUB_SECRET, body)),
        ("user-agent", "GitHub-Hookshot/044aadd".into()),
    ]
}

/// A `push` event as GitHub documents it (trimmed of fields nothing reads, but with several
/// that hoard ignores, as a real delivery has).
fn github_push(branch: &str, modified: &[&str]) -> String {
    json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "after": "76ae82c7b1a177c8d03f9e96e0adf2466113728f",
        "created": false,
        "deleted": false,
        "forced": false,
        "base_ref": null,
        "compare": "https://github.com/acme/app/compare/6113728f27ae...76ae82c7b1a1",
        "commits": [{
            "id": "76ae82c7b1a177c8d03f9e96e0adf2466113728f",
            "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433",
            "distinct": true,
            "message": "Bump the toolchain",
            "timestamp": "2026-12-07T10:00:00Z",
            "author": {"name": "Alice", "email": "alice@example.com", "username": "alice"},
            "added": [],
            "removed": [],
            "modified": modified,
        }],
        "head_commit": null,
        "repository": {"id": 1296269, "name": "app", "full_name": "acme/app", "private": true},
        "pusher": {"name": "alice", "email": "alice@example.com"},
        "sender": {"login": "alice", "id": 1, "type": "User"},
    })
    .to_string()
}

#[tokio::test]
async fn a_github_push_touching_the_toolchain_invalidates_and_others_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |_| {}).await;
    for ns in ["ci/main", "ci/branches/x", "dev/alice"] {
        put(&server, ns).await;
    }
    let mut events = watch(&server).await;

    // A push that touches no toolchain file: applied, but no rule matches.
    let body = github_push("main", &["src/main.rs"]);
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &github_headers("push", "d-1", &body),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["applied"], json!([]), "{reply}");
    assert!(hit(&server, "ci/main").await);

    // A wrong signature: 401, nothing changes (the same push, signed with another secret).
    let body = github_push("main", &[".bazelversion"]);
    let mut forged = github_headers("push", "d-2", &body);
    forged[2].1 = signature("guessed", &body);
    let (status, reply) = post(&server, "/hooks/github", &forged, &body).await;
    assert_eq!(status, 401, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("X-Hub-Signature-256"),
        "{reply}"
    );
    let (status, _) = post(&server, "/hooks/github", &forged[..2], &body).await;
    assert_eq!(status, 401);
    assert!(
        hit(&server, "ci/main").await,
        "a refused delivery changed nothing"
    );

    // Signed: every CI namespace is invalidated, dev/ is not.
    let headers = github_headers("push", "d-2", &body);
    let (status, reply) = post(&server, "/hooks/github", &headers, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["applied"][0]["rule"], 1, "{reply}");
    let seen = take(&mut events, 2).await;
    let mut names: Vec<&str> = seen.iter().map(|e| e.namespace.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ci/branches/x", "ci/main"]);
    for e in &seen {
        assert_eq!(e.kind(), EventKind::NamespaceInvalidated);
        assert_eq!(e.caller, "github");
        for part in [
            "github pushed branch main 6113728f..76ae82c7 in acme/app by alice",
            "changed .bazelversion",
            "hooks.rule 1 (invalidate \"ci/**\")",
        ] {
            assert!(e.reason.contains(part), "{part:?} in {:?}", e.reason);
        }
    }
    assert!(!hit(&server, "ci/main").await);
    assert!(!hit(&server, "ci/branches/x").await);
    assert!(hit(&server, "dev/alice").await);

    // Redelivered (GitHub's "Redeliver" keeps the delivery id): applied once. The same signed
    // body under another id (the id header is not signed) is a replay too.
    put(&server, "ci/main").await;
    let (status, reply) = post(&server, "/hooks/github", &headers, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["replayed"], true, "{reply}");
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &github_headers("push", "d-2b", &body),
        &body,
    )
    .await;
    assert_eq!((status, &reply["replayed"]), (200, &json!(true)), "{reply}");
    assert!(hit(&server, "ci/main").await, "a replay invalidated again");
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &headers[..1]
            .iter()
            .chain(&headers[2..])
            .cloned()
            .collect::<Vec<_>>(),
        &body,
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("X-GitHub-Delivery"),
        "{reply}"
    );

    // ping, on creating the webhook; events no rule is about are answered, not retried.
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &github_headers("ping", "d-3", "{}"),
        "{}",
    )
    .await;
    assert_eq!((status, reply), (200, json!({"pong": true})));
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &github_headers("issues", "d-4", "{}"),
        "{}",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        reply["ignored"].as_str().unwrap().contains("issues"),
        "{reply}"
    );

    // Signed, but not a push event's body: 400 naming what is wrong.
    let bad = "{\"before\": 1}";
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &github_headers("push", "d-5", bad),
        bad,
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("GitHub push event"),
        "{reply}"
    );

    // Deleting a branch prunes its namespace (GitHub also sends a push with deleted: true).
    put(&server, "ci/branches/x").await;
    put(&server, "ci/branches/keep").await;
    for (branch, id) in [("x", "d-6"), ("keep", "d-7")] {
        let body = json!({
            "ref": branch, "ref_type": "branch", "pusher_type": "user",
            "repository": {"full_name": "acme/app"}, "sender": {"login": "bob"},
        })
        .to_string();
        let (status, reply) = post(
            &server,
            "/hooks/github",
            &github_headers("delete", id, &body),
            &body,
        )
        .await;
        assert_eq!(status, 200, "{reply}");
    }
    // Durable before the reply.
    assert!(!hit(&server, "ci/branches/x").await);
    // GitHub's other report of the same deletion, a push with deleted: true, is its twin.
    put(&server, "ci/branches/x").await;
    let gone = json!({
        "ref": "refs/heads/x", "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "after": "0000000000000000000000000000000000000000", "deleted": true, "created": false,
        "forced": false, "commits": [], "repository": {"full_name": "acme/app"},
        "pusher": {"name": "bob"},
    })
    .to_string();
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &github_headers("push", "d-8", &gone),
        &gone,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["twins"], json!(["x"]), "{reply}");
    assert!(
        hit(&server, "ci/branches/x").await,
        "a deletion's twin pruned again"
    );
    // A signed create event's body resent as a delete (the event header is not signed).
    let created = json!({"ref": "x", "ref_type": "branch", "master_branch": "main",
        "pusher_type": "user", "repository": {"full_name": "acme/app"}})
    .to_string();
    let (status, _) = post(
        &server,
        "/hooks/github",
        &github_headers("delete", "d-9", &created),
        &created,
    )
    .await;
    assert_eq!(status, 400);
    assert!(hit(&server, "ci/branches/x").await);
    let dropped = take(&mut events, 1).await;
    assert_eq!(dropped[0].kind(), EventKind::NamespaceDropped);
    assert_eq!(dropped[0].namespace, "ci/branches/x");
    assert!(
        dropped[0].reason.contains("github deleted branch x in acme/app by bob: hooks.rule 2 (prune \"ci/branches/{branch}\")"),
        "{:?}",
        dropped[0].reason
    );
    assert!(
        hit(&server, "ci/branches/keep").await,
        "protected namespaces are never pruned"
    );
}

#[tokio::test]
async fn gitlab_push_and_tag_events_need_the_token_and_unlisted_commits_count_as_matching() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |_| {}).await;
    for ns in ["ci/main", "release/v2.0", "release/v1.0"] {
        put(&server, ns).await;
    }
    let mut events = watch(&server).await;
    let push = |reference: &str, kind: &str, modified: &[&str], total: usize| {
        json!({
            "object_kind": kind, "event_name": kind,
            "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
            "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "ref": reference, "ref_protected": true,
            "checkout_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "user_id": 4, "user_name": "John Smith", "user_username": "jsmith",
            "project_id": 15,
            "project": {"id": 15, "name": "app", "path_with_namespace": "group/app"},
            "commits": [{"id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "message": "m",
                          "added": [], "modified": modified, "removed": []}],
            "total_commits_count": total,
        })
        .to_string()
    };
    let headers = |event: &str, token: &str, uuid: &str| {
        vec![
            ("x-gitlab-event", event.to_string()),
            ("x-gitlab-token", token.to_string()),
            ("x-gitlab-event-uuid", uuid.to_string()),
        ]
    };

    let body = push("refs/heads/main", "push", &["WORKSPACE"], 1);
    let (status, reply) = post(
        &server,
        "/hooks/gitlab",
        &headers("Push Hook", "wrong", "u-1"),
        &body,
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    assert!(
        hit(&server, "ci/main").await,
        "a refused delivery changed nothing"
    );

    let (status, reply) = post(
        &server,
        "/hooks/gitlab",
        &headers("Push Hook", GITLAB_TOKEN, "u-1"),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let e = &take(&mut events, 1).await[0];
    assert_eq!(
        (e.namespace.as_str(), e.caller.as_str()),
        ("ci/main", "gitlab")
    );
    assert!(e.reason.contains("gitlab pushed branch main 95790bf8..da156088 in group/app by jsmith, changed WORKSPACE"), "{}", e.reason);

    // 25 commits of which GitLab lists one: the paths are not known, so the rule applies.
    put(&server, "ci/main").await;
    let body = push("refs/heads/main", "push", &["README.md"], 25);
    let (status, reply) = post(
        &server,
        "/hooks/gitlab",
        &headers("Push Hook", GITLAB_TOKEN, "u-2"),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let e = &take(&mut events, 1).await[0];
    assert!(
        e.reason
            .contains("not known in full (GitLab lists at most 20 commits): assumed to match"),
        "{}",
        e.reason
    );

    // A tag push invalidates its release namespace only.
    let body = push("refs/tags/v2.0", "tag_push", &[], 1);
    let (status, reply) = post(
        &server,
        "/hooks/gitlab",
        &headers("Tag Push Hook", GITLAB_TOKEN, "u-3"),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let e = &take(&mut events, 1).await[0];
    assert_eq!(e.namespace, "release/v2.0");
    assert!(e.reason.contains("gitlab pushed tag v2.0"), "{}", e.reason);
    assert!(!hit(&server, "release/v2.0").await);
    assert!(hit(&server, "release/v1.0").await);
}

#[tokio::test]
async fn bad_requests_get_clear_http_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |_| {}).await;
    let body = github_push("main", &[".bazelversion"]);
    let headers = github_headers("push", "e-1", &body);
    let client = http();
    let url = |p: &str| format!("{}{p}", server.url());

    let r = client.get(url("/hooks/github")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = client
        .post(url("/hooks/bitbucket"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("/hooks/github, /hooks/gitlab or /hooks/git"));
    // GitHub's other content type: refused, saying which to choose.
    let mut form = client
        .post(url("/hooks/github"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.clone());
    for (k, v) in &headers {
        form = form.header(*k, v);
    }
    let r = form.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert!(r.text().await.unwrap().contains("application/json"));
    // Over 25 MiB.
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(26 << 20));
    let (status, reply) = post(
        &server,
        "/hooks/github",
        &github_headers("push", "e-2", &huge),
        &huge,
    )
    .await;
    assert_eq!(status, 413, "{reply}");
    // HTTP/1.1 elsewhere on the gRPC port: a hint, not a hang.
    let r = client.get(url("/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.text().await.unwrap().contains("gRPC over HTTP/2"));
    // git deliveries need an id; a malformed one changes nothing.
    let (status, reply) = post(
        &server,
        "/hooks/git",
        &[],
        "{\"delivery\":\"\",\"updates\":[]}",
    )
    .await;
    assert_eq!(status, 400, "{reply}");

    // No [hooks]: the endpoints say so.
    let plain = TestServer::start().await;
    let (status, reply) = post(&plain, "/hooks/github", &headers, &body).await;
    assert_eq!(status, 404, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("[hooks]"),
        "{reply}"
    );
}

fn git(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "Dana")
        .env("GIT_AUTHOR_EMAIL", "dana@example.com")
        .env("GIT_COMMITTER_NAME", "Dana")
        .env("GIT_COMMITTER_EMAIL", "dana@example.com")
        .env("RUST_LOG", "off")
        .env("USER", "dana")
        .env_remove("HOARD_TOKEN")
        .env_remove("HOARD_SERVER");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("run git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    out
}

/// Commits `file` (with `text`) in `work` and pushes main; git's stderr (the hook's `remote:`
/// lines) is returned.
async fn commit_and_push(work: &Path, file: &str, text: &str, token: Option<&str>) -> String {
    let work = work.to_path_buf();
    let (file, text, token) = (
        file.to_string(),
        text.to_string(),
        token.map(str::to_string),
    );
    tokio::task::spawn_blocking(move || {
        std::fs::write(work.join(&file), text).unwrap();
        git(&work, &["add", &file], &[]);
        git(
            &work,
            &["commit", "-q", "-m", &format!("change {file}")],
            &[],
        );
        let env: Vec<(&str, &str)> = token.iter().map(|t| ("HOARD_TOKEN", t.as_str())).collect();
        let out = git(&work, &["push", "-q", "origin", "main"], &env);
        String::from_utf8_lossy(&out.stderr).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_real_git_push_through_post_receive_invalidates_and_a_deleted_branch_is_pruned() {
    if Command::new("git").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "git is required under CI");
        eprintln!("SKIPPED: no git");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |c| {
        c.auth = Some(AuthConfig {
            anonymous: Access::Write,
            tokens: vec![
                TokenConfig {
                    name: "git-hooks".into(),
                    hash: hash_token(HOOKS_TOKEN),
                    grants: vec!["admin:ci/**".parse().unwrap()],
                },
                TokenConfig {
                    name: "writer".into(),
                    hash: hash_token(WRITER_TOKEN),
                    grants: vec!["write:**".parse().unwrap()],
                },
            ],
            client_certs: vec![],
        });
    })
    .await;
    for ns in ["ci/main", "ci/branches/feature", "dev/alice"] {
        put(&server, ns).await;
    }
    let mut events = watch(&server).await;

    let origin = dir.path().join("app.git");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(
        dir.path(),
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            origin.to_str().unwrap(),
        ],
        &[],
    );
    let hook = origin.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nexec {} hook git --server {}\n",
            env!("CARGO_BIN_EXE_hoard"),
            server.url()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    git(&work, &["init", "-q", "-b", "main"], &[]);
    git(
        &work,
        &["remote", "add", "origin", origin.to_str().unwrap()],
        &[],
    );

    // The first push creates main (the branch HEAD names) with a .bazelversion: every CI
    // namespace is invalidated, by the hook's token.
    let said = commit_and_push(&work, ".bazelversion", "4.2.3\n", Some(HOOKS_TOKEN)).await;
    assert!(
        said.contains("remote: hoard: hooks.rule 1: invalidated \"ci/**\": 2 namespace(s)"),
        "{said}"
    );
    let seen = take(&mut events, 2).await;
    for e in &seen {
        assert_eq!(e.kind(), EventKind::NamespaceInvalidated);
        assert_eq!(e.caller, "git-hooks");
        assert!(
            e.reason.starts_with("git pushed branch main at "),
            "{}",
            e.reason
        );
        assert!(e.reason.contains("in app by dana, "), "{}", e.reason);
        assert!(
            e.reason.contains("changed .bazelversion: hooks.rule 1"),
            "{}",
            e.reason
        );
    }
    assert!(!hit(&server, "ci/main").await);
    assert!(hit(&server, "dev/alice").await);

    // A push that does not touch the toolchain changes nothing.
    put(&server, "ci/main").await;
    put(&server, "ci/branches/feature").await;
    let said = commit_and_push(&work, "README.md", "hello\n", Some(HOOKS_TOKEN)).await;
    assert!(
        said.contains("remote: hoard: no [[hooks.rule]] matched this push"),
        "{said}"
    );
    assert!(hit(&server, "ci/main").await);

    // Changing .bazelversion again (an update, diffed by git): invalidated again.
    let said = commit_and_push(&work, ".bazelversion", "4.2.4\n", Some(HOOKS_TOKEN)).await;
    assert!(said.contains("hooks.rule 1: invalidated"), "{said}");
    let seen = take(&mut events, 2).await;
    assert!(
        seen[0].reason.contains(" changed .bazelversion"),
        "{}",
        seen[0].reason
    );
    assert!(!hit(&server, "ci/main").await);
    put(&server, "ci/main").await;

    // Without a token (anonymous callers may write, not administer), or with one that may only
    // write: the push goes through, the hook is refused, nothing is invalidated.
    let said = commit_and_push(&work, ".bazelversion", "5.0.0\n", None).await;
    assert!(
        said.contains("refused the delivery (401 Unauthorized)"),
        "{said}"
    );
    let said = commit_and_push(&work, ".bazelversion", "5.0.1\n", Some(WRITER_TOKEN)).await;
    assert!(
        said.contains("refused the delivery (403 Forbidden)"),
        "{said}"
    );
    assert!(hit(&server, "ci/main").await);

    // A branch pushed, then deleted: its namespace is pruned.
    let w = work.clone();
    let said = tokio::task::spawn_blocking(move || {
        let env = [("HOARD_TOKEN", HOOKS_TOKEN)];
        git(&w, &["push", "-q", "origin", "main:feature"], &env);
        let out = git(&w, &["push", "-q", "origin", "--delete", "feature"], &env);
        String::from_utf8_lossy(&out.stderr).into_owned()
    })
    .await
    .unwrap();
    assert!(
        said.contains("hooks.rule 2: pruned \"ci/branches/feature\": 1 namespace(s)"),
        "{said}"
    );
    // The next event is the prune: the pushes before it announced nothing.
    let e = &take(&mut events, 1).await[0];
    assert_eq!(e.kind(), EventKind::NamespaceDropped);
    assert_eq!(e.namespace, "ci/branches/feature");
    assert!(
        e.reason.starts_with("git deleted branch feature (was "),
        "{}",
        e.reason
    );
    assert!(
        e.reason.contains(") in app by dana: hooks.rule 2"),
        "{}",
        e.reason
    );
    assert!(!hit(&server, "ci/branches/feature").await);
    assert!(hit(&server, "ci/main").await);
    // Nothing else arrived meanwhile.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.message())
            .await
            .is_err()
    );
}
