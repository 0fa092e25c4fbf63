//! Remote Asset API (Fetch, Push) against a real server: multi-URI pushes, exact qualifier
//! sets, expiry, content that must be (and stay) in the CAS, bad input, namespaces.

use std::time::Duration;

use hoard::config::NamespaceRule;
use hoard::proto::admin::{GcRequest, InvalidateRequest, VerifyRequest};
use hoard::proto::asset::{
    fetch_client::FetchClient, push_client::PushClient, FetchBlobRequest, FetchBlobResponse,
    FetchDirectoryRequest, PushBlobRequest, PushDirectoryRequest, Qualifier,
};
use hoard::proto::reapi::{self, Directory, DirectoryNode, FileNode};
use prost::Message;
use prost_types::Timestamp;

use crate::common::{
    batch_put, blob, blob_path, digest_of, missing, start_with_clock, upload, TestServer,
};

const HOUR: Duration = Duration::from_secs(3600);

fn fetch(server: &TestServer) -> FetchClient<tonic::transport::Channel> {
    FetchClient::new(server.channel())
}

fn push(server: &TestServer) -> PushClient<tonic::transport::Channel> {
    PushClient::new(server.channel())
}

fn q(pairs: &[(&str, &str)]) -> Vec<Qualifier> {
    pairs
        .iter()
        .map(|(n, v)| Qualifier {
            name: n.to_string(),
            value: v.to_string(),
        })
        .collect()
}

fn uris(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn push_blob(
    server: &TestServer,
    instance: &str,
    uris_: &[&str],
    qualifiers: &[(&str, &str)],
    digest: &reapi::Digest,
) -> Result<(), tonic::Status> {
    push(server)
        .push_blob(PushBlobRequest {
            instance_name: instance.into(),
            uris: uris(uris_),
            qualifiers: q(qualifiers),
            blob_digest: Some(digest.clone()),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn fetch_blob(
    server: &TestServer,
    instance: &str,
    uris_: &[&str],
    qualifiers: &[(&str, &str)],
) -> FetchBlobResponse {
    fetch(server)
        .fetch_blob(FetchBlobRequest {
            instance_name: instance.into(),
            uris: uris(uris_),
            qualifiers: q(qualifiers),
            ..Default::default()
        })
        .await
        .expect("FetchBlob")
        .into_inner()
}

/// The digest FetchBlob answered, or None if it answered NOT_FOUND (any other error fails the
/// test). A reply always has status OK and a digest.
async fn found(
    server: &TestServer,
    instance: &str,
    uris_: &[&str],
    qualifiers: &[(&str, &str)],
) -> Option<reapi::Digest> {
    let r = fetch(server)
        .fetch_blob(FetchBlobRequest {
            instance_name: instance.into(),
            uris: uris(uris_),
            qualifiers: q(qualifiers),
            ..Default::default()
        })
        .await;
    match r {
        Ok(r) => {
            let r = r.into_inner();
            assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
            Some(r.blob_digest.expect("a digest with OK"))
        }
        Err(e) if e.code() == tonic::Code::NotFound => None,
        Err(e) => panic!("FetchBlob: {e:?}"),
    }
}

#[tokio::test]
async fn a_blob_pushed_under_several_uris_is_found_by_each() {
    let server = TestServer::start().await;
    let data = blob(5000, 1);
    batch_put(&server, "", &[&data]).await;
    let d = digest_of(&data);
    let mirrors = ["https://a.example/x.tar.gz", "https://b.example/x.tar.gz"];
    push_blob(&server, "", &mirrors, &[("resource_type", "tar")], &d)
        .await
        .expect("PushBlob");
    for uri in mirrors {
        let r = fetch_blob(
            &server,
            "",
            &["https://other.example/y", uri],
            &[("resource_type", "tar")],
        )
        .await;
        assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
        assert_eq!(r.uri, uri, "the URI that matched");
        assert_eq!(r.blob_digest.as_ref(), Some(&d));
        assert_eq!(r.qualifiers, q(&[("resource_type", "tar")]));
        assert_eq!(
            r.digest_function,
            reapi::digest_function::Value::Sha256 as i32
        );
        assert!(r.expires_at.is_some_and(|t| t.seconds > 0), "{r:?}");
    }
    assert_eq!(
        found(
            &server,
            "",
            &["https://c.example/x.tar.gz"],
            &[("resource_type", "tar")]
        )
        .await,
        None
    );
}

#[tokio::test]
async fn qualifiers_match_as_an_exact_set_in_any_order() {
    let server = TestServer::start().await;
    let data = blob(100, 2);
    batch_put(&server, "", &[&data]).await;
    let d = digest_of(&data);
    let uri = ["https://example/src"];
    push_blob(
        &server,
        "",
        &uri,
        &[("vcs.commit", "abc"), ("vcs.branch", "main")],
        &d,
    )
    .await
    .unwrap();
    assert_eq!(
        found(
            &server,
            "",
            &uri,
            &[("vcs.branch", "main"), ("vcs.commit", "abc")]
        )
        .await,
        Some(d.clone())
    );
    assert_eq!(
        found(&server, "", &uri, &[("vcs.commit", "abc")]).await,
        None,
        "a subset"
    );
    assert_eq!(found(&server, "", &uri, &[]).await, None, "no qualifiers");
    assert_eq!(
        found(
            &server,
            "",
            &uri,
            &[("vcs.commit", "abc"), ("vcs.branch", "main"), ("x", "1")]
        )
        .await,
        None,
        "a superset"
    );
    assert_eq!(
        found(
            &server,
            "",
            &uri,
            &[("vcs.commit", "abd"), ("vcs.branch", "main")]
        )
        .await,
        None,
        "another value"
    );
}

#[tokio::test]
async fn a_push_of_content_not_in_the_cas_is_refused_naming_it_and_records_nothing() {
    let server = TestServer::start().await;
    let present = blob(100, 3);
    batch_put(&server, "", &[&present]).await;
    let present = digest_of(&present);
    let absent = digest_of(b"never uploaded");
    let e = push_blob(&server, "", &["urn:x"], &[], &absent)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&absent.hash), "{}", e.message());
    assert_eq!(found(&server, "", &["urn:x"], &[]).await, None);

    // A missing reference refuses the push just the same.
    let e = push(&server)
        .push_blob(PushBlobRequest {
            uris: uris(&["urn:y"]),
            blob_digest: Some(present.clone()),
            references_blobs: vec![absent.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&absent.hash), "{}", e.message());
    assert_eq!(found(&server, "", &["urn:y"], &[]).await, None);
}

/// A tree: root → sub/ → file, plus a file in the root. Returns (root, sub, files).
fn tree(seed: u64) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
    let f1 = blob(300, seed);
    let f2 = blob(400, seed + 1);
    let sub = Directory {
        files: vec![FileNode {
            name: "f2".into(),
            digest: Some(digest_of(&f2)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let root = Directory {
        files: vec![FileNode {
            name: "f1".into(),
            digest: Some(digest_of(&f1)),
            ..Default::default()
        }],
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: Some(digest_of(&sub)),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    (root, sub, vec![f1, f2])
}

#[tokio::test]
async fn directories_are_pushed_and_fetched_only_with_their_whole_tree() {
    let server = TestServer::start().await;
    let (root, sub, files) = tree(10);
    let root_d = digest_of(&root);
    // Everything but the file inside sub/.
    batch_put(&server, "", &[&root, &sub, &files[0]]).await;
    let request = PushDirectoryRequest {
        uris: uris(&["https://git.example/repo.git"]),
        qualifiers: q(&[("vcs.commit", "1234")]),
        root_directory_digest: Some(root_d.clone()),
        ..Default::default()
    };
    let e = push(&server)
        .push_directory(request.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&digest_of(&files[1]).hash),
        "{}",
        e.message()
    );

    batch_put(&server, "", &[&files[1]]).await;
    push(&server)
        .push_directory(request)
        .await
        .expect("PushDirectory");
    let r = fetch(&server)
        .fetch_directory(FetchDirectoryRequest {
            uris: uris(&["https://git.example/repo.git"]),
            qualifiers: q(&[("vcs.commit", "1234")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.map(|s| s.code), Some(0));
    assert_eq!(r.root_directory_digest, Some(root_d.clone()));
    // A directory asset is not a blob asset.
    assert_eq!(
        found(
            &server,
            "",
            &["https://git.example/repo.git"],
            &[("vcs.commit", "1234")]
        )
        .await,
        None
    );
}

#[tokio::test]
async fn requests_without_uris_and_other_bad_input_are_invalid_argument() {
    let server = TestServer::start().await;
    let data = blob(10, 4);
    batch_put(&server, "", &[&data]).await;
    let d = digest_of(&data);
    // BuildStream's probe at start: exactly INVALID_ARGUMENT.
    let e = fetch(&server)
        .fetch_blob(FetchBlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("uris"), "{}", e.message());
    let e = fetch(&server)
        .fetch_directory(FetchDirectoryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = push(&server)
        .push_blob(PushBlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = push(&server)
        .push_directory(PushDirectoryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    let cases: Vec<(&str, PushBlobRequest)> = vec![
        (
            "an empty URI",
            PushBlobRequest {
                uris: uris(&[""]),
                blob_digest: Some(d.clone()),
                ..Default::default()
            },
        ),
        (
            "a malformed digest",
            PushBlobRequest {
                uris: uris(&["urn:a"]),
                blob_digest: Some(reapi::Digest {
                    hash: "xyz".into(),
                    size_bytes: 3,
                }),
                ..Default::default()
            },
        ),
        (
            "no digest",
            PushBlobRequest {
                uris: uris(&["urn:a"]),
                ..Default::default()
            },
        ),
        (
            "a duplicate qualifier",
            PushBlobRequest {
                uris: uris(&["urn:a"]),
                qualifiers: q(&[("a", "1"), ("a", "2")]),
                blob_digest: Some(d.clone()),
                ..Default::default()
            },
        ),
        (
            "too many URIs",
            PushBlobRequest {
                uris: (0..1001).map(|i| format!("urn:{i}")).collect(),
                blob_digest: Some(d.clone()),
                ..Default::default()
            },
        ),
        (
            "a malformed reference",
            PushBlobRequest {
                uris: uris(&["urn:a"]),
                blob_digest: Some(d.clone()),
                references_blobs: vec![reapi::Digest {
                    hash: d.hash.clone(),
                    size_bytes: -1,
                }],
                ..Default::default()
            },
        ),
        (
            "an unsupported digest function",
            PushBlobRequest {
                uris: uris(&["urn:a"]),
                blob_digest: Some(d.clone()),
                digest_function: reapi::digest_function::Value::Md5 as i32,
                ..Default::default()
            },
        ),
    ];
    for (what, request) in cases {
        let e = push(&server).push_blob(request).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
    }
    assert_eq!(
        found(&server, "", &["urn:a"], &[]).await,
        None,
        "nothing was recorded"
    );
    let e = fetch(&server)
        .fetch_blob(FetchBlobRequest {
            uris: uris(&["urn:a"]),
            qualifiers: q(&[("a", "1"), ("a", "1")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

#[tokio::test]
async fn expired_and_too_old_assets_are_not_found() {
    let (server, store, _tmp) = start_with_clock(|_| {}).await;
    let data = blob(100, 5);
    batch_put(&server, "", &[&data]).await;
    let d = digest_of(&data);
    let now = hoard::store::ActionStore::clock(&store) as i64;
    push(&server)
        .push_blob(PushBlobRequest {
            uris: uris(&["urn:soon"]),
            blob_digest: Some(d.clone()),
            expire_at: Some(Timestamp {
                seconds: now + 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    push_blob(&server, "", &["urn:forever"], &[], &d)
        .await
        .unwrap();
    let r = fetch_blob(&server, "", &["urn:soon"], &[]).await;
    assert_eq!(
        r.expires_at.map(|t| t.seconds),
        Some(now + 3600),
        "expires_at is the push's"
    );

    // oldest_content_accepted after the push: Bazel's way of saying "not from the cache".
    let r = fetch(&server)
        .fetch_blob(FetchBlobRequest {
            uris: uris(&["urn:forever"]),
            oldest_content_accepted: Some(Timestamp {
                seconds: now + 10,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
    let r = fetch(&server)
        .fetch_blob(FetchBlobRequest {
            uris: uris(&["urn:forever"]),
            oldest_content_accepted: Some(Timestamp {
                seconds: now - 10,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.map(|s| s.code), Some(0));

    store.advance_clock(2 * HOUR);
    assert_eq!(
        found(&server, "", &["urn:soon"], &[]).await,
        None,
        "past expire_at"
    );
    assert_eq!(found(&server, "", &["urn:forever"], &[]).await, Some(d));
}

#[tokio::test]
async fn asset_content_outlives_retention_while_the_asset_lives() {
    let (server, store, _tmp) = start_with_clock(|_| {}).await;
    let kept = blob(2000, 6);
    let referenced = blob(3000, 7);
    let loose = blob(4000, 8);
    batch_put(&server, "", &[&kept, &referenced, &loose]).await;
    let (kept, referenced, loose) = (digest_of(&kept), digest_of(&referenced), digest_of(&loose));
    push(&server)
        .push_blob(PushBlobRequest {
            uris: uris(&["urn:kept"]),
            blob_digest: Some(kept.clone()),
            references_blobs: vec![referenced.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    // Far past min_retention (3h): only the asset's content is still counted as used.
    store.advance_clock(10 * HOUR);
    server
        .admin()
        .gc(GcRequest {
            target_bytes: Some(0),
        })
        .await
        .expect("Gc");
    assert_eq!(
        missing(&server, std::slice::from_ref(&loose)).await,
        vec![loose],
        "the loose blob was evicted"
    );
    assert_eq!(
        found(&server, "", &["urn:kept"], &[]).await,
        Some(kept.clone())
    );
    assert!(missing(&server, &[kept, referenced]).await.is_empty());
}

#[tokio::test]
async fn an_asset_whose_content_is_gone_is_not_found() {
    let server = TestServer::start().await;
    let large = blob(200_000, 9);
    let d = upload(&server, "", &large).await;
    push_blob(&server, "", &["urn:large"], &[], &d)
        .await
        .unwrap();
    assert_eq!(
        found(&server, "", &["urn:large"], &[]).await,
        Some(d.clone())
    );
    // Bit rot: verify removes the blob; the asset must not point at it any more.
    let path = blob_path(server.data_dir(), &d);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();
    server
        .admin()
        .verify(VerifyRequest {})
        .await
        .expect("Verify");
    assert_eq!(found(&server, "", &["urn:large"], &[]).await, None);
}

#[tokio::test]
async fn assets_follow_read_chains_write_targets_and_invalidation() {
    let server = TestServer::start_with(|c| {
        c.namespaces.rules = vec![NamespaceRule {
            pattern: "ci/branches/*".into(),
            ac_ttl: None,
            read: Some(vec!["ci/main".into()]),
            write: None,
        }];
    })
    .await;
    let (a, b) = (blob(100, 20), blob(100, 21));
    batch_put(&server, "", &[&a, &b]).await;
    let (a, b) = (digest_of(&a), digest_of(&b));
    push_blob(&server, "ci/main", &["urn:tool"], &[], &a)
        .await
        .unwrap();
    assert_eq!(
        found(&server, "ci/branches/x", &["urn:tool"], &[]).await,
        Some(a.clone()),
        "a branch reads main"
    );
    push_blob(&server, "ci/branches/x", &["urn:tool"], &[], &b)
        .await
        .unwrap();
    assert_eq!(
        found(&server, "ci/branches/x", &["urn:tool"], &[]).await,
        Some(b.clone()),
        "its own first"
    );
    assert_eq!(
        found(&server, "ci/main", &["urn:tool"], &[]).await,
        Some(a.clone()),
        "main unchanged"
    );
    assert_eq!(
        found(&server, "ci/branches/y", &["urn:tool"], &[]).await,
        Some(a)
    );

    server
        .admin()
        .invalidate(InvalidateRequest {
            namespace: Some("ci/main".into()),
            reason: "toolchain bump".into(),
            ..Default::default()
        })
        .await
        .expect("Invalidate");
    assert_eq!(found(&server, "ci/main", &["urn:tool"], &[]).await, None);
    assert_eq!(
        found(&server, "ci/branches/y", &["urn:tool"], &[]).await,
        None
    );
    assert_eq!(
        found(&server, "ci/branches/x", &["urn:tool"], &[]).await,
        Some(b)
    );
}

/// A loopback HTTP/1.1 origin: `GET /file` answers `body`, anything else 404. It keeps every
/// request's head, so tests can count downloads and see the headers sent.
struct Origin {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Origin {
    async fn start(body: Vec<u8>) -> Origin {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (body, seen) = (body.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let ok = head.starts_with("GET /file ");
                    seen.lock().unwrap().push(head);
                    let reply = if ok {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(&body);
                        r
                    } else {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    };
                    let _ = conn.write_all(&reply).await;
                });
            }
        });
        Origin { addr, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn downloads(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

fn sri(data: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
    )
}

async fn fetch_with(
    server: &TestServer,
    request: FetchBlobRequest,
) -> Result<FetchBlobResponse, tonic::Status> {
    fetch(server)
        .fetch_blob(request)
        .await
        .map(|r| r.into_inner())
}

/// The code of a FetchBlob outcome: a reply's (always OK) or the error's.
fn code_of(r: &Result<FetchBlobResponse, tonic::Status>) -> tonic::Code {
    match r {
        Ok(r) => tonic::Code::from_i32(r.status.as_ref().expect("a status").code),
        Err(e) => e.code(),
    }
}

async fn fetching_server(max_size: u64) -> TestServer {
    TestServer::start_with(|c| {
        c.asset.fetch.enabled = true;
        c.asset.fetch.allowed_hosts = vec!["127.0.0.1".into()];
        c.asset.fetch.max_size = hoard::config::ByteSize(max_size);
    })
    .await
}

#[tokio::test]
async fn a_miss_is_fetched_from_origin_checked_and_then_served_from_the_cache() {
    let body = blob(70_000, 30);
    let origin = Origin::start(body.clone()).await;
    let server = fetching_server(1 << 20).await;
    let request = FetchBlobRequest {
        uris: vec![origin.url("/missing"), origin.url("/file")],
        qualifiers: q(&[("checksum.sri", &sri(&body)), ("http_header:X-Token", "t1")]),
        ..Default::default()
    };
    let r = fetch_with(&server, request.clone()).await;
    assert_eq!(code_of(&r), tonic::Code::Ok, "{r:?}");
    let r = r.unwrap();
    assert_eq!(r.uri, origin.url("/file"), "the URI that worked");
    let d = digest_of(&body);
    assert_eq!(r.blob_digest.as_ref(), Some(&d));
    assert!(
        missing(&server, std::slice::from_ref(&d)).await.is_empty(),
        "the download is in the CAS"
    );
    assert_eq!(origin.downloads(), 2, "the 404 first, then the file");
    let heads = origin.requests.lock().unwrap().join("");
    assert!(
        heads.to_ascii_lowercase().contains("x-token: t1"),
        "{heads}"
    );

    // Again: from the cache, without asking the origin. Download headers (a rotated token)
    // are not part of what the asset is.
    let again = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![origin.url("/file")],
            qualifiers: q(&[("checksum.sri", &sri(&body)), ("http_header:X-Token", "t2")]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(again.blob_digest.as_ref(), Some(&d));
    assert_eq!(
        again.qualifiers,
        q(&[("checksum.sri", &sri(&body))]),
        "no header stored"
    );
    assert_eq!(origin.downloads(), 2);

    // oldest_content_accepted in the future (Bazel without a checksum): fetched anew.
    let fresh = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![origin.url("/file")],
            // A hit without oldest_content_accepted (just above).
            qualifiers: q(&[("checksum.sri", &sri(&body))]),
            oldest_content_accepted: Some(Timestamp {
                seconds: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64
                    + 3600,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code_of(&fresh), tonic::Code::Ok, "{fresh:?}");
    assert_eq!(origin.downloads(), 3);
}

#[tokio::test]
async fn origin_fetches_refuse_bad_checksums_hosts_sizes_and_qualifiers() {
    let body = blob(5000, 31);
    let origin = Origin::start(body.clone()).await;
    let server = fetching_server(4000).await;
    let wrong = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![origin.url("/file")],
            qualifiers: q(&[("checksum.sri", &sri(b"something else"))]),
            ..Default::default()
        },
    )
    .await;
    // 5000 bytes against a 4000-byte limit, before the checksum can even be judged.
    assert_eq!(code_of(&wrong), tonic::Code::ResourceExhausted, "{wrong:?}");

    let server = fetching_server(1 << 20).await;
    let wrong = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![origin.url("/file")],
            qualifiers: q(&[("checksum.sri", &sri(b"something else"))]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code_of(&wrong), tonic::Code::Aborted, "{wrong:?}");
    assert!(wrong.unwrap_err().message().contains("checksum mismatch"));
    assert!(
        !missing(&server, &[digest_of(&body)]).await.is_empty(),
        "nothing stored"
    );

    // A host not allowed is never downloaded from: the miss stays a miss, saying why.
    let elsewhere = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![format!("http://localhost:{}/file", origin.addr.port())],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(elsewhere.code(), tonic::Code::NotFound, "{elsewhere:?}");
    assert!(
        elsewhere.message().contains("allowed_hosts"),
        "{elsewhere:?}"
    );

    let gone = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![origin.url("/nothing")],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code_of(&gone), tonic::Code::NotFound, "{gone:?}");

    let e = fetch(&server)
        .fetch_blob(FetchBlobRequest {
            uris: vec![origin.url("/file")],
            qualifiers: q(&[("vcs.commit", "abc")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("\"vcs.commit\" not supported"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn with_asset_fetch_other_uris_still_miss_and_downloads_need_write_access() {
    let origin = Origin::start(b"payload".to_vec()).await;
    let server = TestServer::start_with(|c| {
        c.asset.fetch.enabled = true;
        c.asset.fetch.allowed_hosts = vec!["127.0.0.1".into()];
        c.namespaces.rules = vec![NamespaceRule {
            pattern: "view".into(),
            ac_ttl: None,
            read: None,
            write: Some("none".into()),
        }];
    })
    .await;
    // A BuildStream key with a qualifier no download could honour: just a miss.
    let e = fetch_with(
        &server,
        FetchBlobRequest {
            uris: uris(&["urn:fdc:buildstream.build:2020:artifact:p/e/k"]),
            qualifiers: q(&[("vcs.commit", "abc")]),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // A read-only instance cannot store what it would download.
    let e = fetch_with(
        &server,
        FetchBlobRequest {
            instance_name: "view".into(),
            uris: vec![origin.url("/file")],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(origin.downloads(), 0);
    // Headers that would change where the request goes are refused.
    let e = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![origin.url("/file")],
            qualifiers: q(&[("http_header:Host", "other.example")]),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(origin.downloads(), 0);
}

#[tokio::test]
async fn without_asset_fetch_nothing_is_downloaded() {
    let origin = Origin::start(b"x".to_vec()).await;
    let server = TestServer::start().await;
    let r = fetch_with(
        &server,
        FetchBlobRequest {
            uris: vec![origin.url("/file")],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code_of(&r), tonic::Code::NotFound, "{r:?}");
    assert_eq!(origin.downloads(), 0);
}
