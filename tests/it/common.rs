//! A real server on 127.0.0.1:0 with a temporary data dir, and helpers to talk to it: one copy
//! each of the clients, resource names, CLI runs and waiting that the test modules share.

use std::fmt::Debug;
use std::future::Future;
use std::process::{Command, Output};
use std::time::Duration;

use hoard::config::Config;
use hoard::proto::admin::admin_client::AdminClient;
use hoard::proto::bytestream::byte_stream_client::ByteStreamClient;
use hoard::proto::bytestream::{ReadRequest, WriteRequest, WriteResponse};
use hoard::proto::health::{health_client::HealthClient, HealthCheckRequest};
use hoard::proto::reapi::{
    self, action_cache_client::ActionCacheClient, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient, FindMissingBlobsRequest,
};
use hoard::proto::watch::Event;
use hoard::resource_name::ResourceName;
use hoard::store::sled::{Options, SledStore};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The default config on a fresh temporary data dir, which lives as long as the `TempDir`.
pub fn temp_config() -> (tempfile::TempDir, Config) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: tmp.path().join("data"),
        ..Config::default()
    };
    (tmp, config)
}

pub struct TestServer {
    data_dir: std::path::PathBuf,
    /// Keeps the temporary dir alive for as long as the test needs it.
    _tmp: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<hoard::error::Result<()>>>,
    channel: Channel,
    addr: std::net::SocketAddr,
    /// The plaintext ops port (servers started from a config; not over a hand-made store).
    ops: Option<std::net::SocketAddr>,
}

impl TestServer {
    /// A server on a fresh data dir with the default config.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server on a fresh data dir, with config changes.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let (tmp, mut config) = temp_config();
        edit(&mut config);
        let mut server = Self::start_config(config).await;
        server._tmp = Some(tmp);
        server
    }

    /// A server on `config.data_dir` (which the caller keeps alive).
    pub async fn start_config(config: Config) -> Self {
        Self::start_inner(config, None, None).await
    }

    /// A server on `config.data_dir` listening on `addr` (a restart on the address a replica
    /// or client already points to).
    pub async fn start_config_at(config: Config, addr: std::net::SocketAddr) -> Self {
        let listener = poll_until(Duration::from_secs(10), || async move {
            tokio::net::TcpListener::bind(addr).await
        })
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::start_inner(config, None, Some(listener)).await
    }

    /// A server over a store the test opened itself (to move its clock, say); `config` gives
    /// the limits and the data dir it reports.
    pub async fn start_store(store: impl Into<hoard::store::Stores>, config: Config) -> Self {
        Self::start_inner(config, Some(store.into()), None).await
    }

    async fn start_inner(
        config: Config,
        store: Option<hoard::store::Stores>,
        listener: Option<tokio::net::TcpListener>,
    ) -> Self {
        let listener = match listener {
            Some(listener) => listener,
            None => tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1:0"),
        };
        let addr = listener.local_addr().expect("local addr");
        let ops_listener = match store {
            Some(_) => None,
            None => Some(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind 127.0.0.1:0"),
            ),
        };
        let ops = ops_listener
            .as_ref()
            .map(|l| l.local_addr().expect("ops addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let tls = config.tls.is_some();
        let handle = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            match store {
                Some(store) => hoard::server::serve(listener, store, &config, shutdown).await,
                None => {
                    hoard::server::run_with_ops(listener, ops_listener, &config, shutdown).await
                }
            }
        });
        let endpoint = Channel::from_shared(format!("http://{addr}")).expect("uri");
        // A TLS server refuses this plaintext channel; TLS tests open their own.
        let channel = if tls {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.expect("connect to test server")
        };
        TestServer {
            data_dir,
            _tmp: None,
            shutdown: Some(tx),
            handle: Some(handle),
            channel,
            addr,
            ops,
        }
    }

    /// Starts a graceful shutdown without waiting for it ([`TestServer::stop`] waits).
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// The ops port's address.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        self.ops
            .expect("a server started from its config has an ops port")
    }

    /// Shuts down gracefully and waits until the store is flushed; returns the temp dir so the
    /// data can be opened again.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server result");
        }
        self._tmp.take()
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }

    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }

    pub fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel.clone())
    }

    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// The gRPC port's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The server's address as `http://127.0.0.1:PORT`, for clients in other processes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The client channel the typed clients above share.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

/// Deterministic, incompressible-looking test data.
pub fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn digest_of(data: &[u8]) -> reapi::Digest {
    reapi::Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

/// `d` as the server's own digest type; test names are built only for well-formed digests.
pub fn digest(d: &reapi::Digest) -> hoard::digest::Digest {
    hoard::digest::Digest::from_proto(Some(d), "test digest").expect("a well-formed digest")
}

/// `{instance}/blobs/{hash}/{size}`, for ByteStream.Read.
pub fn read_name(instance: &str, d: &reapi::Digest) -> String {
    ResourceName::read(instance, digest(d)).to_string()
}

/// `{instance}/uploads/{upload}/blobs/{hash}/{size}`, for ByteStream.Write.
pub fn write_name(instance: &str, upload: &str, d: &reapi::Digest) -> String {
    ResourceName::write(instance, upload, digest(d)).to_string()
}

/// The WriteRequests that upload `data` in `chunk`-sized pieces starting at `offset`.
pub fn write_requests(name: &str, data: &[u8], offset: usize, chunk: usize) -> Vec<WriteRequest> {
    let mut reqs = Vec::new();
    let mut at = offset;
    loop {
        let end = data.len().min(at + chunk);
        reqs.push(WriteRequest {
            resource_name: if reqs.is_empty() {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: at as i64,
            finish_write: end == data.len(),
            data: data[at..end].to_vec().into(),
        });
        if end == data.len() {
            break;
        }
        at = end;
    }
    reqs
}

/// ByteStream.Write of `data` from `offset` in `chunk`-byte messages, the first naming `name`.
pub async fn write_blob(
    server: &TestServer,
    name: &str,
    data: &[u8],
    offset: usize,
    chunk: usize,
) -> Result<tonic::Response<WriteResponse>, tonic::Status> {
    write_blob_over(server.channel(), name, data, offset, chunk).await
}

/// [`write_blob`] over any channel (a server in another process, say).
pub async fn write_blob_over(
    channel: Channel,
    name: &str,
    data: &[u8],
    offset: usize,
    chunk: usize,
) -> Result<tonic::Response<WriteResponse>, tonic::Status> {
    let reqs = write_requests(name, data, offset, chunk);
    ByteStreamClient::new(channel)
        .write(futures::stream::iter(reqs))
        .await
}

/// Uploads `data` through ByteStream and returns its digest.
pub async fn upload(server: &TestServer, instance: &str, data: &[u8]) -> reapi::Digest {
    let d = digest_of(data);
    let name = write_name(instance, &uuid::Uuid::new_v4().to_string(), &d);
    let resp = write_blob(server, &name, data, 0, 64 << 10)
        .await
        .expect("upload")
        .into_inner();
    assert_eq!(resp.committed_size, data.len() as i64);
    d
}

/// Reads a whole blob through ByteStream.
pub async fn download(
    server: &TestServer,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    download_over(server.channel(), name, offset, limit).await
}

/// [`download`] over any channel (a server in another process, say).
pub async fn download_over(
    channel: Channel,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = ByteStreamClient::new(channel)
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(&msg.data);
    }
    Ok(out)
}

/// Stores blobs with one BatchUpdateBlobs call and asserts each was accepted.
pub async fn batch_put(server: &TestServer, instance: &str, blobs: &[&[u8]]) {
    let requests = blobs
        .iter()
        .map(|b| reapi::batch_update_blobs_request::Request {
            digest: Some(digest_of(b)),
            data: b.to_vec().into(),
            compressor: 0,
        })
        .collect();
    let resp = server
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests,
            digest_function: 0,
        })
        .await
        .expect("batch update")
        .into_inner();
    for r in resp.responses {
        assert_eq!(r.status.expect("status").code, 0, "blob {:?}", r.digest);
    }
}

/// UpdateActionResult of `result` for `action` in `instance`.
pub async fn update_result(
    server: &TestServer,
    instance: &str,
    action: &reapi::Digest,
    result: &reapi::ActionResult,
) -> Result<(), tonic::Status> {
    server
        .ac()
        .update_action_result(reapi::UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// GetActionResult: the result on a hit, `None` on NOT_FOUND; any other status fails the test.
pub async fn lookup_result(
    server: &TestServer,
    instance: &str,
    action: &reapi::Digest,
) -> Option<reapi::ActionResult> {
    let got = server
        .ac()
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await;
    match got {
        Ok(r) => Some(r.into_inner()),
        Err(e) if e.code() == tonic::Code::NotFound => None,
        Err(e) => panic!("GetActionResult in {instance:?}: {e}"),
    }
}

/// FindMissingBlobs in the default instance: the digests the server does not have.
pub async fn missing(server: &TestServer, digests: &[reapi::Digest]) -> Vec<reapi::Digest> {
    server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.to_vec(),
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner()
        .missing_blob_digests
}

/// The `hoard.Writes` health status (1 SERVING, 2 NOT_SERVING), or -1 if the check failed.
pub async fn writes_health(channel: &Channel) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "hoard.Writes".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// Whether `hoard.Writes` becomes `want` within 5 s.
pub async fn wait_writes_health(channel: &Channel, want: i32) -> bool {
    poll_until(Duration::from_secs(5), || async {
        match writes_health(channel).await {
            status if status == want => Ok(()),
            status => Err(status),
        }
    })
    .await
    .is_ok()
}

/// Polls `check` until it returns `Ok`, and returns what it holds; once `timeout` has passed,
/// fails the test with the last observation (the last `Err`). For whatever the server does in
/// the background: persisting, evicting, winding a stream down, changing its health.
pub async fn eventually<T, E, F, Fut>(timeout: Duration, check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    match poll_until(timeout, check).await {
        Ok(value) => value,
        Err(last) => panic!("still not so after {timeout:?}; last observed: {last:?}"),
    }
}

/// [`eventually`] without the failure: the last observation once `timeout` has passed, for a
/// test that must clean up before it fails or that asserts on the outcome itself. Each check
/// runs to its end; the pause between checks grows from 10 ms to 100 ms, so a quick change is
/// seen quickly and a slow one is not hammered.
pub async fn poll_until<T, E, F, Fut>(timeout: Duration, mut check: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(last) if started.elapsed() >= timeout => return Err(last),
            Err(_) => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The next `n` events of a watch stream, failing on an error or a 10 s stall.
pub async fn take(stream: &mut tonic::Streaming<Event>, n: usize) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} of {n} events", out.len()))
            .expect("watch stream failed")
            .expect("watch stream ended");
        out.push(event);
    }
    out
}

/// A server over a sled store the test also holds (to move its clock), on a fresh data dir
/// with `edit` applied to the config.
pub async fn start_with_clock(
    edit: impl FnOnce(&mut Config),
) -> (TestServer, SledStore, tempfile::TempDir) {
    let (tmp, mut config) = temp_config();
    edit(&mut config);
    let store = SledStore::open_with(&config.data_dir, Options::from_config(&config))
        .expect("open the store");
    let server = TestServer::start_store(std::sync::Arc::new(store.clone()), config).await;
    (server, store, tmp)
}

/// The `hoard` binary, for a test to add arguments to.
pub fn hoard_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hoard"))
}

/// Runs `hoard ARGS` (HOARD_SERVER unset, logs off) off the async runtime, so an in-process
/// test server keeps serving meanwhile.
pub async fn hoard(args: &[&str]) -> Output {
    hoard_with(args, &[]).await
}

/// [`hoard`] with `env` set.
pub async fn hoard_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = hoard_command();
    command
        .args(args)
        .env_remove("HOARD_SERVER")
        .env_remove("HOARD_TOKEN")
        .env("RUST_LOG", "off");
    for (k, v) in env {
        command.env(k, v);
    }
    tokio::task::spawn_blocking(move || command.output().expect("run hoard"))
        .await
        .expect("join")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `out`, after asserting the command succeeded.
pub fn succeeded(out: &Output) -> &Output {
    assert!(out.status.success(), "{out:?}");
    out
}

/// The one JSON object a `--json` command printed.
pub fn json<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    let text = stdout(out);
    assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The error of a failed command; asserts exit status 2 and no panic.
pub fn failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// [`failure`] that also asserts the error is one line (ours, not clap's usage text).
pub fn one_line_failure(out: &Output) -> String {
    let stderr = failure(out);
    assert_eq!(stderr.lines().count(), 1, "one-line error, got: {stderr}");
    stderr
}

/// A small tmpfs, unmounted on drop. `None` where mounting is not allowed (not root).
pub struct SmallDisk {
    pub path: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(size: &str) -> Option<Self> {
        let tmp = tempfile::tempdir().ok()?;
        let path = tmp.path().join("disk");
        std::fs::create_dir(&path).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { path, _tmp: tmp })
    }
}

impl SmallDisk {
    /// Mounts one, or says why the test cannot run and returns `None`; where
    /// HOARD_REQUIRE_DISK_FULL_TEST is set (CI, as root), not being able to is a failure.
    pub fn mount_or_skip(size: &str) -> Option<Self> {
        let disk = Self::mount(size);
        if disk.is_none() {
            assert!(
                std::env::var_os("HOARD_REQUIRE_DISK_FULL_TEST").is_none(),
                "cannot mount a tmpfs, and HOARD_REQUIRE_DISK_FULL_TEST is set"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        }
        disk
    }
}

/// Where a large blob's file lives in a server's data dir.
pub fn blob_file(server: &TestServer, d: &reapi::Digest) -> std::path::PathBuf {
    blob_path(server.data_dir(), d)
}

/// Where a large blob's file lives in `data_dir` (a stopped server's, say).
pub fn blob_path(data_dir: &std::path::Path, d: &reapi::Digest) -> std::path::PathBuf {
    data_dir.join("cas").join(&d.hash[..2]).join(&d.hash)
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// Writes `name` in `dir` until the disk is full, as another process filling the disk would;
/// returns its path.
pub fn fill_disk(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xAAu8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    // Whatever is smaller than a chunk.
    while f.write_all(&[0u8; 512]).is_ok() {}
    let _ = f.sync_all();
    path
}

/// The server's `hoard stats` figures, over the Admin service.
pub async fn stats(server: &TestServer) -> hoard::proto::admin::StatsResponse {
    server
        .admin()
        .stats(hoard::proto::admin::StatsRequest {})
        .await
        .expect("Stats")
        .into_inner()
}
