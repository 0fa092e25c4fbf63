//! A real server on 127.0.0.1:0 with a temporary data dir, and helpers to talk to it.

use hoard::config::Config;
use hoard::proto::admin::admin_client::AdminClient;
use hoard::proto::bytestream::byte_stream_client::ByteStreamClient;
use hoard::proto::bytestream::{ReadRequest, WriteRequest};
use hoard::proto::health::health_client::HealthClient;
use hoard::proto::reapi::{
    self, action_cache_client::ActionCacheClient, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub struct TestServer {
    data_dir: std::path::PathBuf,
    /// Keeps the temporary dir alive for as long as the test needs it.
    _tmp: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<hoard::error::Result<()>>>,
    channel: Channel,
    addr: std::net::SocketAddr,
}

impl TestServer {
    /// A server on a fresh data dir with the default config.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server on a fresh data dir, with config changes.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            data_dir: tmp.path().join("data"),
            ..Config::default()
        };
        edit(&mut config);
        let mut server = Self::start_config(config).await;
        server._tmp = Some(tmp);
        server
    }

    /// A server on `config.data_dir` (which the caller keeps alive).
    pub async fn start_config(config: Config) -> Self {
        Self::start_inner(config, None).await
    }

    /// A server over a store the test opened itself (to move its clock, say); `config` gives
    /// the limits and the data dir it reports.
    pub async fn start_store(
        store: std::sync::Arc<dyn hoard::store::Store>,
        config: Config,
    ) -> Self {
        Self::start_inner(config, Some(store)).await
    }

    async fn start_inner(
        config: Config,
        store: Option<std::sync::Arc<dyn hoard::store::Store>>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let handle = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            match store {
                Some(store) => hoard::server::serve(listener, store, &config, shutdown).await,
                None => hoard::server::run(listener, &config, shutdown).await,
            }
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect to test server");
        TestServer {
            data_dir,
            _tmp: None,
            shutdown: Some(tx),
            handle: Some(handle),
            channel,
            addr,
        }
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

pub fn read_name(instance: &str, d: &reapi::Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!("{prefix}blobs/{}/{}", d.hash, d.size_bytes)
}

pub fn write_name(instance: &str, upload: &str, d: &reapi::Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!("{prefix}uploads/{upload}/blobs/{}/{}", d.hash, d.size_bytes)
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

/// Uploads `data` through ByteStream and returns its digest.
pub async fn upload(server: &TestServer, instance: &str, data: &[u8]) -> reapi::Digest {
    let d = digest_of(data);
    let name = write_name(instance, &uuid::Uuid::new_v4().to_string(), &d);
    let reqs = write_requests(&name, data, 0, 64 << 10);
    let resp = server
        .bytestream()
        .write(futures::stream::iter(reqs))
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
    server
        .data_dir()
        .join("cas")
        .join(&d.hash[..2])
        .join(&d.hash)
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
