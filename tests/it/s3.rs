//! The s3 backend against a real S3-compatible server on loopback: s3s-fs (S3 over a directory,
//! SigV4 checked), started inside the test. Several hoard nodes share one bucket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hoard::config::{Backend, Config, HumanDuration};
use hoard::proto::admin::InvalidateRequest;
use hoard::proto::reapi;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;

use crate::common::{
    batch_put, blob, digest_of, download, lookup_result, missing, read_name, take, update_result,
    upload, write_blob, write_name, TestServer,
};

const KEY_ID: &str = "hoard-test-key";
const SECRET: &str = "hoard-test-secret-0123456789";
const BUCKET: &str = "cache";

/// An s3s-fs server over a temporary directory, holding the bucket `cache`.
struct S3 {
    root: tempfile::TempDir,
    addr: SocketAddr,
    credentials: PathBuf,
    /// Accepts connections and owns them: aborting it closes every one ([`S3::vanish`]).
    accept: parking_lot::Mutex<tokio::task::JoinHandle<()>>,
    handler: Handler,
    /// While set, every request gets 503 Service Unavailable (an outage).
    down: Arc<AtomicBool>,
    /// While set, requests get no answer at all (a bucket that hangs).
    slow: Arc<AtomicBool>,
}

type Handler = Arc<dyn Fn(hyper::Request<hyper::body::Incoming>) -> ServiceFuture + Send + Sync>;
type ServiceFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<s3s::HttpResponse, s3s::HttpError>> + Send>,
>;

/// Serves `handler` on `listener`; the connections are the task's, so aborting it closes them.
fn serve(listener: tokio::net::TcpListener, handler: Handler) -> tokio::task::JoinHandle<()> {
    let service = hyper::service::service_fn(move |req| handler(req));
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((sock, _)) = listener.accept().await {
            // Else a response written in two pieces waits for the delayed ACK (~40 ms).
            let _ = sock.set_nodelay(true);
            let conn = http
                .serve_connection(TokioIo::new(sock), service.clone())
                .into_owned();
            conns.spawn(async move {
                let _ = conn.await;
            });
        }
    })
}

impl S3 {
    async fn start() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket dir");
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs");
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(KEY_ID, SECRET));
        let s3s = builder.build();
        let down = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(AtomicBool::new(false));
        let (down_now, slow_now) = (down.clone(), slow.clone());
        let handler: Handler = Arc::new(move |req| {
            let s3s = s3s.clone();
            let down = down_now.load(Ordering::SeqCst);
            let slow = slow_now.load(Ordering::SeqCst);
            Box::pin(async move {
                if slow {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                if down {
                    let mut unavailable = hyper::Response::new(s3s::Body::empty());
                    *unavailable.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                    return Ok(unavailable);
                }
                hyper::service::Service::call(&s3s, req).await
            })
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let credentials = root.path().join("credentials");
        std::fs::write(
            &credentials,
            format!("[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"),
        )
        .expect("credentials file");
        S3 {
            root,
            addr,
            credentials,
            accept: parking_lot::Mutex::new(serve(listener, handler.clone())),
            handler,
            down,
            slow,
        }
    }

    /// The server goes away: open connections are closed, new ones refused.
    fn vanish(&self) {
        self.accept.lock().abort();
    }

    /// Back on the same address after [`S3::vanish`].
    async fn reappear(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the old address again");
        *self.accept.lock() = serve(listener, self.handler.clone());
    }

    /// A node's config on this bucket under `prefix`.
    fn config(&self, prefix: &str, data_dir: &Path) -> Config {
        let mut config = Config {
            data_dir: data_dir.to_path_buf(),
            ..Config::default()
        };
        let s3 = &mut config.storage.s3;
        config.storage.backend = Backend::S3;
        s3.bucket = BUCKET.into();
        s3.prefix = prefix.into();
        s3.endpoint = Some(format!("http://{}", self.addr));
        s3.allow_http = true;
        s3.credentials_file = Some(self.credentials.clone());
        s3.max_retries = 1;
        s3.retry_timeout = HumanDuration(Duration::from_secs(2));
        config
    }

    /// Where s3s-fs keeps the object `key` of the bucket.
    fn object(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// Every object key in the bucket under `prefix`.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let base = self.root.path().join(BUCKET);
        let mut out = Vec::new();
        let mut dirs = vec![base.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    let key = p
                        .strip_prefix(&base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    if key.starts_with(prefix) && !key.contains(".s3s") && !key.contains(".tmp") {
                        out.push(key);
                    }
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.accept.lock().abort();
    }
}

fn blob_key(prefix: &str, d: &reapi::Digest) -> String {
    format!("{prefix}/cas/{}/{}-{}", &d.hash[..2], d.hash, d.size_bytes)
}

async fn node(
    s3: &S3,
    prefix: &str,
    edit: impl FnOnce(&mut Config),
) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = s3.config(prefix, dir.path());
    edit(&mut config);
    (TestServer::start_config(config).await, dir)
}

fn result_with(outputs: &[&reapi::Digest]) -> reapi::ActionResult {
    reapi::ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(i, d)| reapi::OutputFile {
                path: format!("out/{i}"),
                digest: Some((*d).clone()),
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        ..Default::default()
    }
}

/// Invalidates the whole namespace `ns` through `server`.
async fn invalidate(server: &TestServer, ns: &str, why: &str) {
    server
        .admin()
        .invalidate(InvalidateRequest {
            namespace: Some(ns.into()),
            reason: why.into(),
            ..Default::default()
        })
        .await
        .expect("invalidate");
}

/// Writes the first `upto` bytes of `data` to `name` through `server` in 1 MiB messages, and
/// ends the stream without finish_write; the Write's answer.
async fn write_broken_off(
    server: &TestServer,
    name: &str,
    data: &[u8],
    upto: usize,
) -> Result<tonic::Response<hoard::proto::bytestream::WriteResponse>, tonic::Status> {
    let mut requests = crate::common::write_requests(name, &data[..upto], 0, 1 << 20);
    if let Some(last) = requests.last_mut() {
        last.finish_write = false;
    }
    server
        .bytestream()
        .write(futures::stream::iter(requests))
        .await
}

#[tokio::test]
async fn nodes_on_one_bucket_serve_each_others_blobs_and_results() {
    let s3 = S3::start().await;
    let (a, _da) = node(&s3, "team", |_| {}).await;
    let (b, _db) = node(&s3, "team", |_| {}).await;

    let small: Vec<Vec<u8>> = (0..20).map(|i| blob(100 + i * 37, i as u64)).collect();
    let refs: Vec<&[u8]> = small.iter().map(|b| b.as_slice()).collect();
    batch_put(&a, "", &refs).await;
    let digests: Vec<_> = small.iter().map(|b| digest_of(b)).collect();
    assert!(
        missing(&b, &digests).await.is_empty(),
        "node b sees node a's blobs"
    );
    let absent = digest_of(b"never stored");
    assert_eq!(
        missing(&b, std::slice::from_ref(&absent)).await,
        vec![absent.clone()]
    );
    let read = b
        .cas()
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: digests.clone(),
            ..Default::default()
        })
        .await
        .expect("BatchReadBlobs")
        .into_inner();
    for (r, want) in read.responses.iter().zip(&small) {
        assert_eq!(r.status.as_ref().map(|s| s.code), Some(0));
        assert_eq!(&r.data[..], &want[..]);
    }
    // The layout the README documents: a hash-prefix shard under the prefix.
    assert!(s3.object(&blob_key("team", &digests[0])).exists());

    // A large blob: a multipart upload through a, read back whole and in part through b.
    let large = blob(20 << 20, 7);
    let d = upload(&a, "", &large).await;
    assert_eq!(
        download(&b, &read_name("", &d), 0, 0).await.expect("read"),
        large
    );
    assert_eq!(
        download(&b, &read_name("", &d), 5 << 20, 1000)
            .await
            .expect("ranged read"),
        &large[5 << 20..(5 << 20) + 1000]
    );

    // An action result written through a is served by b, its outputs checked.
    let action = digest_of(b"action 1");
    let result = result_with(&[&digests[0], &d]);
    update_result(&a, "ci/main", &action, &result)
        .await
        .expect("update");
    let got = lookup_result(&b, "ci/main", &action)
        .await
        .expect("b has the result");
    assert_eq!(got.output_files, result.output_files);
    assert!(lookup_result(&b, "ci/other", &action).await.is_none());
}

#[tokio::test]
async fn refused_uploads_store_nothing_in_the_bucket() {
    let s3 = S3::start().await;
    let (a, _d) = node(&s3, "p", |_| {}).await;
    // A streamed upload big enough for a multipart upload, with a byte changed.
    let good = blob(12 << 20, 3);
    let d = digest_of(&good);
    let mut bad = good.clone();
    bad[9 << 20] ^= 1;
    let err = write_blob(&a, &write_name("", "u1", &d), &bad, 0, 1 << 20)
        .await
        .expect_err("a wrong upload is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // A batch blob whose bytes do not match.
    let resp = a
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(digest_of(b"the right bytes")),
                data: b"other bytes".to_vec().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    assert_eq!(
        resp.responses[0].status.as_ref().map(|s| s.code),
        Some(tonic::Code::InvalidArgument as i32)
    );
    assert_eq!(s3.keys("p/cas"), Vec::<String>::new(), "nothing stored");
    assert_eq!(missing(&a, std::slice::from_ref(&d)).await, vec![d]);
}

#[tokio::test]
async fn a_blob_lost_or_damaged_in_the_bucket_is_a_miss_never_a_dangling_hit() {
    let s3 = S3::start().await;
    let (a, _da) = node(&s3, "x", |_| {}).await;
    let out = blob(5000, 1);
    batch_put(&a, "", &[&out]).await;
    let d = digest_of(&out);
    let action = digest_of(b"action");
    update_result(&a, "", &action, &result_with(&[&d]))
        .await
        .expect("update");
    assert!(lookup_result(&a, "", &action).await.is_some());
    // Deleted behind hoard's back (a lifecycle rule, a hand): a node that has not seen it
    // lately finds the result incomplete and answers a miss.
    std::fs::remove_file(s3.object(&blob_key("x", &d))).expect("delete the object");
    let (b, _db) = node(&s3, "x", |_| {}).await;
    assert!(
        lookup_result(&b, "", &action).await.is_none(),
        "no dangling hit"
    );
    assert_eq!(missing(&b, std::slice::from_ref(&d)).await, vec![d.clone()]);
    // The client uploads it again through node a, which still remembers seeing it: the upload
    // is stored all the same, and the result is whole again everywhere.
    batch_put(&a, "", &[&out]).await;
    assert!(s3.object(&blob_key("x", &d)).exists(), "stored again");
    assert!(lookup_result(&b, "", &action).await.is_some());

    // Damaged in place: the read fails with NOT_FOUND and the object is deleted, so the next
    // upload stores it again.
    let other = blob(3000, 2);
    batch_put(&a, "", &[&other]).await;
    let od = digest_of(&other);
    let path = s3.object(&blob_key("x", &od));
    let mut bytes = std::fs::read(&path).expect("object");
    bytes[100] ^= 0xff;
    std::fs::write(&path, bytes).expect("damage");
    let err = download(&b, &read_name("", &od), 0, 0)
        .await
        .expect_err("damaged");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(!path.exists(), "the damaged object is deleted");
    batch_put(&b, "", &[&other]).await;
    assert_eq!(
        download(&a, &read_name("", &od), 0, 0).await.expect("read"),
        other
    );
}

#[tokio::test]
async fn namespace_epochs_live_in_the_bucket() {
    let s3 = S3::start().await;
    let (a, _da) = node(&s3, "n", |_| {}).await;
    let out = blob(700, 5);
    batch_put(&a, "", &[&out]).await;
    let action = digest_of(b"an action");
    update_result(&a, "ci/main", &action, &result_with(&[&digest_of(&out)]))
        .await
        .expect("update");
    invalidate(&a, "ci/main", "toolchain bump").await;
    assert!(lookup_result(&a, "ci/main", &action).await.is_none());
    // A node started afterwards reads the epoch from the bucket.
    let (c, _dc) = node(&s3, "n", |_| {}).await;
    assert!(lookup_result(&c, "ci/main", &action).await.is_none());
    update_result(&c, "ci/main", &action, &result_with(&[&digest_of(&out)]))
        .await
        .expect("update after the invalidation");
    assert!(lookup_result(&c, "ci/main", &action).await.is_some());
}

#[tokio::test]
async fn an_outage_of_the_bucket_answers_unavailable_with_a_message_and_passes() {
    let s3 = S3::start().await;
    let (a, _d) = node(&s3, "o", |_| {}).await;
    let stored = blob(2000, 9);
    batch_put(&a, "", &[&stored]).await;
    let ops = a.ops_addr();
    assert_eq!(crate::ops::http_get(ops, "/readyz").await.0, 200);
    s3.down.store(true, Ordering::SeqCst);
    // The background probe (every 2 s) turns /readyz to 503, saying why.
    let seen = std::time::Instant::now();
    loop {
        let (code, body) = crate::ops::http_get(ops, "/readyz").await;
        if code == 503 {
            assert!(body.starts_with("degraded: the object store"), "{body}");
            break;
        }
        assert!(
            seen.elapsed() < Duration::from_secs(10),
            "/readyz still {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = std::time::Instant::now();
    let err = a
        .cas()
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![digest_of(b"not seen by this node")],
            ..Default::default()
        })
        .await
        .expect_err("the bucket is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("object store"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded retries"
    );
    let err = a
        .ac()
        .get_action_result(reapi::GetActionResultRequest {
            action_digest: Some(digest_of(b"y")),
            ..Default::default()
        })
        .await
        .expect_err("the bucket is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let err = write_blob(&a, &write_name("", "u", &digest_of(b"new")), b"new", 0, 64)
        .await
        .expect_err("the bucket is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Back: the same node serves again, no restart, and says it is ready.
    s3.down.store(false, Ordering::SeqCst);
    let back = std::time::Instant::now();
    while crate::ops::http_get(ops, "/readyz").await.0 != 200 {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "/readyz stays 503"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        download(&a, &read_name("", &digest_of(&stored)), 0, 0)
            .await
            .expect("read after the outage"),
        stored
    );
}

/// Every bucket call of `node` fails with UNAVAILABLE naming the object store, within the
/// bounded timeouts and retries; `how` says which fault.
async fn every_call_fails_quickly(node: &TestServer, how: &str) {
    let started = std::time::Instant::now();
    let err = node
        .cas()
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![digest_of(format!("not seen: {how}").as_bytes())],
            ..Default::default()
        })
        .await
        .expect_err(how);
    assert_eq!(err.code(), tonic::Code::Unavailable, "{how}: {err:?}");
    assert!(err.message().contains("object store"), "{how}: {err:?}");
    let err = node
        .ac()
        .get_action_result(reapi::GetActionResultRequest {
            action_digest: Some(digest_of(how.as_bytes())),
            ..Default::default()
        })
        .await
        .expect_err(how);
    assert_eq!(err.code(), tonic::Code::Unavailable, "{how}: {err:?}");
    let data = format!("written while {how}");
    let codes: Vec<i32> = node
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(digest_of(data.as_bytes())),
                data: data.clone().into_bytes().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .expect("a batch answers per blob")
        .into_inner()
        .responses
        .iter()
        .map(|r| r.status.as_ref().map_or(0, |s| s.code))
        .collect();
    assert_eq!(codes, [tonic::Code::Unavailable as i32], "{how}");
    // Two tries of at most request_timeout (1 s) each, backoff, within retry_timeout (2 s).
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{how}: {:?} for three calls",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_bucket_that_hangs_or_vanishes_answers_unavailable_in_bounded_time_and_then_serves() {
    let s3 = S3::start().await;
    let (a, _d) = node(&s3, "h", |c| {
        c.storage.s3.request_timeout = HumanDuration(Duration::from_secs(1));
    })
    .await;
    let stored = blob(3000, 4);
    batch_put(&a, "", &[&stored]).await;

    s3.slow.store(true, Ordering::SeqCst);
    every_call_fails_quickly(&a, "the bucket does not answer").await;
    s3.slow.store(false, Ordering::SeqCst);
    assert_eq!(
        download(&a, &read_name("", &digest_of(&stored)), 0, 0)
            .await
            .expect("read once the bucket answers again"),
        stored
    );

    s3.vanish();
    every_call_fails_quickly(&a, "the bucket is gone").await;
    s3.reappear().await;
    assert_eq!(
        download(&a, &read_name("", &digest_of(&stored)), 0, 0)
            .await
            .expect("read once the bucket is back"),
        stored
    );
    // Nothing a refused write sent is in the bucket.
    for how in ["the bucket does not answer", "the bucket is gone"] {
        let data = format!("written while {how}");
        let key = blob_key("h", &digest_of(data.as_bytes()));
        assert!(!s3.object(&key).exists(), "{key} stored by a failed write");
    }
}

#[tokio::test]
async fn an_invalidation_through_one_node_is_honoured_by_the_others_within_the_refresh() {
    let s3 = S3::start().await;
    let refresh =
        |c: &mut Config| c.storage.s3.epoch_refresh = HumanDuration(Duration::from_millis(200));
    let (a, _da) = node(&s3, "r", refresh).await;
    let (b, _db) = node(&s3, "r", refresh).await;
    let out = blob(900, 4);
    batch_put(&a, "", &[&out]).await;
    let action = digest_of(b"cached action");
    update_result(&a, "ci/main", &action, &result_with(&[&digest_of(&out)]))
        .await
        .expect("update");
    assert!(lookup_result(&b, "ci/main", &action).await.is_some());
    invalidate(&a, "ci/main", "toolchain bump").await;
    let started = std::time::Instant::now();
    while lookup_result(&b, "ci/main", &action).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "node b still serves an invalidated result"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two invalidations through two nodes, the second from a node that has not seen the first
/// (its refresh is an hour away), must give two epochs, not one. (Truly simultaneous ones rely
/// on the bucket's conditional writes being atomic, as S3's are; s3s-fs checks, then writes.)
#[tokio::test]
async fn invalidations_through_two_nodes_from_stale_views_are_both_kept() {
    let s3 = S3::start().await;
    let stale =
        |c: &mut Config| c.storage.s3.epoch_refresh = HumanDuration(Duration::from_secs(3600));
    let (a, _da) = node(&s3, "c", stale).await;
    let (b, _db) = node(&s3, "c", stale).await;
    let out = blob(800, 6);
    batch_put(&a, "", &[&out]).await;
    let action = digest_of(b"between the two");
    for (server, why) in [(&a, "from a"), (&b, "from b")] {
        invalidate(server, "ci/main", why).await;
        if why == "from a" {
            // A result stored after the first invalidation, under its epoch...
            update_result(&a, "ci/main", &action, &result_with(&[&digest_of(&out)]))
                .await
                .expect("update");
            assert!(lookup_result(&a, "ci/main", &action).await.is_some());
        }
    }
    // ...is invisible after the second one, on every node.
    let (c, _dc) = node(&s3, "c", |_| {}).await;
    let listed = c
        .admin()
        .list_namespaces(hoard::proto::admin::ListNamespacesRequest::default())
        .await
        .expect("list")
        .into_inner();
    let main = listed
        .namespaces
        .iter()
        .find(|n| n.name == "ci/main")
        .expect("ci/main is listed");
    assert_eq!(main.epoch, 2, "two invalidations, two epochs: {main:?}");
    assert_eq!(main.reason.as_deref(), Some("from b"));
    assert!(lookup_result(&c, "ci/main", &action).await.is_none());
    assert!(lookup_result(&b, "ci/main", &action).await.is_none());
}

#[tokio::test]
async fn an_upload_broken_off_on_one_node_resumes_on_another() {
    use hoard::proto::bytestream::QueryWriteStatusRequest;
    let s3 = S3::start().await;
    let (a, _da) = node(&s3, "w", |_| {}).await;
    let (b, _db) = node(&s3, "w", |_| {}).await;
    let data = blob((20 << 20) + 12345, 11);
    let d = digest_of(&data);
    let name = write_name("", "resumed-upload", &d);
    // 12 MiB through node a, then the stream ends without finish_write.
    let broke = write_broken_off(&a, &name, &data, 12 << 20).await;
    assert!(broke.is_err(), "an unfinished write is not a success");
    // Node b knows how far it got: the bytes in saved parts (one 8 MiB part).
    let status = b
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .expect("QueryWriteStatus")
        .into_inner();
    assert_eq!(status.committed_size, 8 << 20);
    assert!(!status.complete);
    // A resume at the wrong offset is refused, saying where to resume.
    let err = write_blob(&b, &name, &data, 1 << 20, 1 << 20)
        .await
        .expect_err("wrong offset");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("resume at offset 8388608"),
        "{err:?}"
    );
    // The resume through node b completes the blob, readable through node a.
    let done = write_blob(&b, &name, &data, 8 << 20, 1 << 20)
        .await
        .expect("resumed write")
        .into_inner();
    assert_eq!(done.committed_size, data.len() as i64);
    assert_eq!(
        download(&a, &read_name("", &d), 0, 0).await.expect("read"),
        data
    );
    assert!(
        s3.keys("w/uploads").is_empty(),
        "the upload's state is gone"
    );
}

#[tokio::test]
async fn a_resumed_upload_with_wrong_bytes_stores_nothing() {
    let s3 = S3::start().await;
    let (a, _da) = node(&s3, "v", |_| {}).await;
    let (b, _db) = node(&s3, "v", |_| {}).await;
    let data = blob(17 << 20, 12);
    let d = digest_of(&data);
    let name = write_name("", "bad-resume", &d);
    let _ = write_broken_off(&a, &name, &data, 9 << 20).await;
    let mut bad = data.clone();
    bad[12 << 20] ^= 1;
    let err = write_blob(&b, &name, &bad, 8 << 20, 1 << 20)
        .await
        .expect_err("wrong bytes");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(s3.keys("v/cas"), Vec::<String>::new(), "nothing stored");
    assert!(s3.keys("v/uploads").is_empty(), "and nothing to resume");
}

/// Every kind of event, after `start_after`, on `server`.
async fn watch_all(
    server: &TestServer,
    start_after: u64,
) -> tonic::Streaming<hoard::proto::watch::Event> {
    use hoard::proto::watch::{watch_client::WatchClient, EventKind, WatchRequest};
    let request = WatchRequest {
        start_after,
        kinds: [
            EventKind::ActionInvalidated,
            EventKind::NamespaceInvalidated,
            EventKind::NamespaceDropped,
            EventKind::ActionResultStored,
        ]
        .iter()
        .map(|k| *k as i32)
        .collect(),
        ..Default::default()
    };
    WatchClient::new(server.channel())
        .watch(request)
        .await
        .expect("watch")
        .into_inner()
}

/// The watch log lives in the bucket: a watcher on one node sees what was done through every
/// node, with the same sequences a watcher on another node sees, and resumes on a third.
#[tokio::test]
async fn watchers_on_every_node_see_every_node_s_events_alike_and_resume_anywhere() {
    use hoard::proto::watch::EventKind;
    let s3 = S3::start().await;
    let fast =
        |c: &mut Config| c.storage.s3.epoch_refresh = HumanDuration(Duration::from_millis(200));
    let (a, _da) = node(&s3, "w", fast).await;
    let (b, _db) = node(&s3, "w", fast).await;
    let (c, _dc) = node(&s3, "w", fast).await;
    let mut on_a = watch_all(&a, 0).await;
    let mut on_c = watch_all(&c, 0).await;
    let out = blob(700, 9);
    batch_put(&b, "", &[&out]).await;
    let action = digest_of(b"watched action");
    update_result(&b, "ci/main", &action, &result_with(&[&digest_of(&out)]))
        .await
        .expect("update");
    invalidate(&c, "ci/main", "through c").await;
    invalidate(&a, "ci/main", "through a").await;
    let seen_a = take(&mut on_a, 3).await;
    let seen_c = take(&mut on_c, 3).await;
    assert_eq!(seen_a, seen_c, "one log, one order, on every node");
    let sequences: Vec<u64> = seen_a.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [1, 2, 3]);
    let stored = seen_a
        .iter()
        .find(|e| e.kind() == EventKind::ActionResultStored)
        .expect("b's stored result is seen on a");
    assert_eq!(stored.namespace, "ci/main");
    let reasons: Vec<&str> = seen_a
        .iter()
        .filter(|e| e.kind() == EventKind::NamespaceInvalidated)
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(
        reasons,
        ["through c", "through a"],
        "in the order they were made"
    );
    // A watcher that stopped after the first event on a resumes on b, even for events b has
    // not read yet (made through a a moment ago).
    invalidate(&a, "ci/other", "fresh").await;
    let mut on_b = watch_all(&b, seen_a[0].sequence).await;
    let rest: Vec<u64> = take(&mut on_b, 3)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(rest, [2, 3, 4]);
    // A node started afterwards has the whole log.
    let (d, _dd) = node(&s3, "w", fast).await;
    let mut on_d = watch_all(&d, 0).await;
    let all = take(&mut on_d, 4).await;
    assert_eq!(&all[..3], &seen_a[..]);
    assert!(s3.keys("w/events/").len() >= 3, "{:?}", s3.keys("w/"));
}

/// A tiered node on the bucket: a sled fast tier in `dir`.
fn tiered_config(s3: &S3, prefix: &str, dir: &Path, write_behind: bool) -> Config {
    let mut config = s3.config(prefix, dir);
    config.storage.backend = Backend::Tiered;
    config.storage.tiered.write_behind = write_behind;
    config
}

async fn stats(server: &TestServer) -> hoard::proto::admin::StatsResponse {
    server
        .admin()
        .stats(hoard::proto::admin::StatsRequest::default())
        .await
        .expect("stats")
        .into_inner()
}

#[tokio::test]
async fn a_tiered_node_fills_its_fast_tier_from_the_bucket_and_serves_it_through_an_outage() {
    let s3 = S3::start().await;
    let (a, _da) = node(&s3, "t", |_| {}).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let b = TestServer::start_config(tiered_config(&s3, "t", dir.path(), false)).await;
    let small = blob(3000, 1);
    let large = blob(3 << 20, 2);
    batch_put(&a, "", &[&small]).await;
    let large_d = upload(&a, "", &large).await;
    assert_eq!(stats(&b).await.blobs, 0, "b's fast tier starts empty");
    // Read through b: from the bucket, and into b's fast tier.
    for (data, d) in [(&small, digest_of(&small)), (&large, large_d.clone())] {
        assert_eq!(
            &download(&b, &read_name("", &d), 0, 0).await.expect("read"),
            data
        );
    }
    assert_eq!(stats(&b).await.blobs, 2, "both reads filled the fast tier");
    // A write through b is in the bucket before it is acknowledged, and in b's fast tier.
    let written = blob(5000, 3);
    batch_put(&b, "", &[&written]).await;
    assert!(s3.object(&blob_key("t", &digest_of(&written))).exists());
    assert_eq!(stats(&b).await.blobs, 3);
    // The bucket goes away: what b holds is still served; the rest answers UNAVAILABLE.
    s3.down.store(true, Ordering::SeqCst);
    for (data, d) in [(&small, digest_of(&small)), (&large, large_d)] {
        assert_eq!(
            &download(&b, &read_name("", &d), 0, 0)
                .await
                .expect("fast hit"),
            data
        );
    }
    let err = download(&b, &read_name("", &digest_of(b"never stored")), 0, 0)
        .await
        .expect_err("a miss needs the bucket");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let err = write_blob(&b, &write_name("", "u", &digest_of(b"new")), b"new", 0, 64)
        .await
        .expect_err("write-through needs the bucket");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    s3.down.store(false, Ordering::SeqCst);
    assert_eq!(stats(&b).await.write_behind_queue, None);
}

/// The fast tier never claims a blob the bucket lost: with the bucket's word too old to
/// trust, GetActionResult on the very node whose fast tier holds the output misses.
#[tokio::test]
async fn the_fast_tier_never_claims_a_blob_the_bucket_lost() {
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = tiered_config(&s3, "l", dir.path(), false);
    config.storage.s3.existence_cache_age = HumanDuration(Duration::from_millis(300));
    let a = TestServer::start_config(config).await;
    let out = blob(4000, 7);
    batch_put(&a, "", &[&out]).await;
    let d = digest_of(&out);
    let action = digest_of(b"tiered action");
    update_result(&a, "", &action, &result_with(&[&d]))
        .await
        .expect("update");
    assert!(lookup_result(&a, "", &action).await.is_some());
    std::fs::remove_file(s3.object(&blob_key("l", &d))).expect("delete the object");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        stats(&a).await.blobs,
        1,
        "the fast tier still has the bytes"
    );
    assert!(
        lookup_result(&a, "", &action).await.is_none(),
        "a miss, never a hit with an output no other node can serve"
    );
    assert_eq!(missing(&a, std::slice::from_ref(&d)).await, vec![d.clone()]);
    // The client uploads it again: whole everywhere.
    batch_put(&a, "", &[&out]).await;
    assert!(s3.object(&blob_key("l", &d)).exists());
    assert!(lookup_result(&a, "", &action).await.is_some());
}

/// Write-behind: acknowledged while the bucket is down, queued durably (across a restart),
/// counted in stats and metrics, uploaded once the bucket is back; queued blobs count as
/// present on their node, which can serve them.
#[tokio::test]
async fn write_behind_acknowledges_first_and_uploads_after_an_outage_and_a_restart() {
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = TestServer::start_config(tiered_config(&s3, "b", dir.path(), true)).await;
    assert_eq!(stats(&a).await.write_behind_queue, Some(0), "serving");
    s3.down.store(true, Ordering::SeqCst);
    let blobs: Vec<Vec<u8>> = (0..5).map(|i| blob(2000 + i, 40 + i as u64)).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    batch_put(&a, "", &refs).await;
    let big = blob(2 << 20, 50);
    let big_d = upload(&a, "", &big).await;
    let mut digests: Vec<reapi::Digest> = blobs.iter().map(|b| digest_of(b)).collect();
    digests.push(big_d.clone());
    assert_eq!(stats(&a).await.write_behind_queue, Some(6));
    assert_eq!(
        missing(&a, &digests).await,
        vec![],
        "queued blobs are present here"
    );
    assert_eq!(
        download(&a, &read_name("", &big_d), 0, 0)
            .await
            .expect("served"),
        big
    );
    let (_, metrics) = crate::ops::http_get(a.ops_addr(), "/metrics").await;
    assert!(metrics.contains("hoard_write_behind_queue 6"), "{metrics}");
    assert!(s3.keys("b/cas").is_empty(), "nothing reached the bucket");
    // Restart while queued; the queue is still there.
    let _ = a.stop().await;
    s3.down.store(false, Ordering::SeqCst);
    let a = TestServer::start_config(tiered_config(&s3, "b", dir.path(), true)).await;
    let started = std::time::Instant::now();
    while stats(&a).await.write_behind_queue != Some(0) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the queue does not drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every acknowledged blob is readable through another node.
    let (other, _do) = node(&s3, "b", |_| {}).await;
    assert_eq!(missing(&other, &digests).await, vec![]);
    assert_eq!(
        download(&other, &read_name("", &big_d), 0, 0)
            .await
            .expect("read through another node"),
        big
    );
}

/// SIGKILL a tiered write-behind node during a write storm, first with the bucket down (so
/// acknowledged blobs exist only in the queue), then with it up (the queue draining while
/// writes go on). After each restart the queue drains, and every acknowledged blob is read
/// back byte for byte through another node.
#[tokio::test]
async fn sigkill_of_a_write_behind_node_loses_no_acknowledged_blob() {
    use crate::crash::Process;
    use std::collections::HashMap;
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config_file = dir.path().join("hoard.toml");
    std::fs::write(
        &config_file,
        format!(
            "[storage]\nbackend = \"tiered\"\n[storage.tiered]\nwrite_behind = true\n\
             [storage.s3]\nbucket = \"{BUCKET}\"\nprefix = \"k\"\nendpoint = \"http://{}\"\n\
             allow_http = true\ncredentials_file = \"{}\"\nmax_retries = 1\nretry_timeout = \"2s\"\n",
            s3.addr,
            s3.credentials.display()
        ),
    )
    .expect("config file");
    let data_dir = dir.path().join("data");
    let start = || {
        let mut command = Process::command(&data_dir);
        command.arg("--config").arg(&config_file);
        Process::start_command(command)
    };
    let acked: Arc<parking_lot::Mutex<HashMap<String, Vec<u8>>>> = Default::default();
    for (cycle, bucket_down) in [(0u64, true), (1, false)] {
        let server = start().await;
        // Serving (the namespace records are read at start) before the bucket goes away.
        hoard::proto::admin::admin_client::AdminClient::new(server.channel.clone())
            .stats(hoard::proto::admin::StatsRequest::default())
            .await
            .expect("stats");
        s3.down.store(bucket_down, Ordering::SeqCst);
        let storms: Vec<_> = (0..3)
            .map(|task| {
                let (channel, acked) = (server.channel.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut cas = reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(channel);
                    for i in 0u64.. {
                        let data = blob(1000 + (i as usize % 7) * 3000, cycle << 40 | task << 32 | i);
                        let d = digest_of(&data);
                        let request = reapi::BatchUpdateBlobsRequest {
                            requests: vec![reapi::batch_update_blobs_request::Request {
                                digest: Some(d.clone()),
                                data: data.clone().into(),
                                ..Default::default()
                            }],
                            ..Default::default()
                        };
                        if let Ok(reply) = cas.batch_update_blobs(request).await {
                            if reply.into_inner().responses.iter().all(|r| {
                                r.status.as_ref().is_none_or(|s| s.code == 0)
                            }) {
                                acked.lock().insert(d.hash.clone(), data);
                            }
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(800)).await;
        server.kill9();
        for storm in storms {
            storm.abort();
        }
        s3.down.store(false, Ordering::SeqCst);
        let server = start().await;
        let admin = hoard::proto::admin::admin_client::AdminClient::new(server.channel.clone());
        let started = std::time::Instant::now();
        loop {
            let stats = admin
                .clone()
                .stats(hoard::proto::admin::StatsRequest::default())
                .await
                .expect("stats")
                .into_inner();
            if stats.write_behind_queue == Some(0) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the queue does not drain: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server.terminate().await;
    }
    let acked = acked.lock().clone();
    assert!(
        acked.len() > 20,
        "the storm stored only {} blobs",
        acked.len()
    );
    let (other, _do) = node(&s3, "k", |_| {}).await;
    let other = &other;
    let checks = futures::stream::iter(acked.values().map(|data| async move {
        let d = digest_of(data);
        let got = download(other, &read_name("", &d), 0, 0)
            .await
            .unwrap_or_else(|e| panic!("acknowledged blob {} lost: {e}", d.hash));
        assert!(got == *data, "blob {} differs", d.hash);
    }));
    use futures::StreamExt as _;
    checks.buffer_unordered(16).collect::<Vec<()>>().await;
    eprintln!(
        "write-behind crash test: {} acknowledged blobs, all in the bucket",
        acked.len()
    );
}
