//! The workloads, the per-task [`Worker`] they run on, and the RPC helpers they share.
//!
//! Each workload has an untimed `setup` (uploading what the timed phase reads, hashing large
//! blobs) and a `step` the runner calls in a loop. A step is one iteration of the workload (one
//! write, one batch, one Update+Get pair, one action); it records every RPC it makes as one
//! operation through [`Worker::op`], which times it, applies the RPC timeout and counts failures.
//! Wrong data coming back (bad hash, wrong missing set, different action result) is a failure.

mod ac;
mod cas;
mod fill;
mod large;
mod mix;

pub use ac::ActionCache;
pub use cas::{BatchRead, BatchUpdate, FindMissing};
pub use fill::Fill;
pub use large::{ReadLarge, WriteLarge};
pub use mix::{Mix, MixParams};

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hoard::client::Connection;
use sha2::{Digest as _, Sha256};

use super::stats::Recorder;
use hoard::proto::bytestream::byte_stream_client::ByteStreamClient;
use hoard::proto::bytestream::{ReadRequest, WriteRequest};
use hoard::proto::reapi::{
    self, action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient, Digest,
};
use hoard::resource_name::ResourceName;

/// Largest gRPC message the bench decodes (BatchReadBlobs answers).
const MAX_MESSAGE: usize = 64 << 20;

/// Batch size used for set-up uploads when the server announces no limit.
const DEFAULT_BATCH: u64 = 2 << 20;

/// ByteStream chunk size of set-up uploads.
const SETUP_CHUNK: u64 = 1 << 20;

/// The generated clients on one connection; cheap to clone.
#[derive(Clone)]
pub struct Conn {
    pub cas: ContentAddressableStorageClient<Connection>,
    pub ac: ActionCacheClient<Connection>,
    pub bs: ByteStreamClient<Connection>,
}

impl Conn {
    pub fn new(channel: Connection) -> Self {
        Conn {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            ac: ActionCacheClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            bs: ByteStreamClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }
}

/// What a workload needs to know about the run and the server.
#[derive(Clone)]
pub struct Env {
    pub seed: u64,
    /// The server's `max_batch_total_size_bytes`; 0 when it announces no limit.
    pub max_batch: u64,
}

/// One concurrent task: a connection, the RPC timeout and its own record.
pub struct Worker {
    pub conn: Conn,
    pub instance: String,
    pub timeout: Duration,
    pub rec: Recorder,
}

impl Worker {
    pub fn new(conn: Conn, instance: String, timeout: Duration) -> Self {
        Worker {
            conn,
            instance,
            timeout,
            rec: Recorder::default(),
        }
    }

    /// Runs one operation: times it, bounds it by the timeout and records success (with the
    /// payload bytes it moved) or failure. Returns the operation's value on success.
    pub async fn op<T>(
        &mut self,
        kind: &'static str,
        fut: impl Future<Output = Result<(T, u64), String>>,
    ) -> Option<T> {
        let start = Instant::now();
        let result = tokio::time::timeout(self.timeout, fut).await;
        let latency = start.elapsed();
        match result {
            Ok(Ok((value, bytes))) => {
                self.rec.ok(kind, latency, bytes);
                Some(value)
            }
            Ok(Err(message)) => {
                self.rec.error(kind, message);
                None
            }
            Err(_) => {
                self.rec
                    .error(kind, format!("no answer within {:?}", self.timeout));
                None
            }
        }
    }

    /// For set-up: fails if any operation so far failed.
    pub fn check(&self, what: &str) -> Result<(), String> {
        match self.rec.first_errors().first() {
            None => Ok(()),
            Some(first) => Err(format!(
                "set-up failed ({what}): {} error(s), first: {first}",
                self.rec.error_count()
            )),
        }
    }

    /// Stores small in-memory blobs, in batches within the server's limit (set-up only).
    pub async fn upload_all(&mut self, env: &Env, blobs: Vec<(Digest, Bytes)>) {
        let limit = if env.max_batch == 0 {
            DEFAULT_BATCH
        } else {
            env.max_batch.min(DEFAULT_BATCH)
        };
        let mut batch: Vec<(Digest, Bytes)> = Vec::new();
        let mut total = 0u64;
        for (digest, data) in blobs {
            let size = data.len() as u64;
            if size > limit {
                let name = write_name(&self.instance, &digest);
                let fut = write_bytes(self.conn.bs.clone(), name, data, SETUP_CHUNK);
                self.op("Write", fut).await;
                continue;
            }
            if total + size > limit {
                let fut = batch_update(
                    self.conn.cas.clone(),
                    self.instance.clone(),
                    std::mem::take(&mut batch),
                );
                self.op("BatchUpdateBlobs", fut).await;
                total = 0;
            }
            total += size;
            batch.push((digest, data));
        }
        if !batch.is_empty() {
            let fut = batch_update(self.conn.cas.clone(), self.instance.clone(), batch);
            self.op("BatchUpdateBlobs", fut).await;
        }
    }
}

/// A workload's timed part.
pub trait Workload: Send + Sync + 'static {
    /// One iteration; `i` is unique across all workers of the run.
    fn step(&self, w: &mut Worker, i: u64) -> impl Future<Output = ()> + Send;
}

/// `(hash, size)`, for comparing digests as set members.
pub fn key(d: &Digest) -> (String, i64) {
    (d.hash.clone(), d.size_bytes)
}

fn show(d: &Digest) -> String {
    format!("{}/{}", d.hash, d.size_bytes)
}

fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// The read resource name of one of the load generator's own blobs.
pub fn read_name(instance: &str, d: &Digest) -> String {
    ResourceName::read(instance, own(d)).to_string()
}

/// A write resource name with a fresh upload id.
pub fn write_name(instance: &str, d: &Digest) -> String {
    ResourceName::write(instance, uuid::Uuid::new_v4().to_string(), own(d)).to_string()
}

/// A digest this program computed itself, as the server's type.
fn own(d: &Digest) -> hoard::digest::Digest {
    hoard::digest::Digest::from_proto(Some(d), "digest")
        .expect("the load generator's own digests are well formed")
}

/// ByteStream Write of a `size`-byte blob whose chunk at `offset` is `chunk_at(offset)`;
/// chunks are produced as the transport asks for them.
pub async fn write_chunks(
    mut bs: ByteStreamClient<Connection>,
    name: String,
    size: u64,
    chunk: u64,
    mut chunk_at: impl FnMut(u64) -> Bytes + Send + 'static,
) -> Result<((), u64), String> {
    let count = size.div_ceil(chunk).max(1);
    let first = name.clone();
    let requests = futures::stream::iter(0..count).map(move |k| {
        let offset = k * chunk;
        WriteRequest {
            resource_name: if k == 0 { first.clone() } else { String::new() },
            write_offset: offset as i64,
            finish_write: k + 1 == count,
            data: chunk_at(offset),
        }
    });
    let resp = bs
        .write(requests)
        .await
        .map_err(|s| format!("{name}: {}", status(s)))?
        .into_inner();
    if resp.committed_size != size as i64 {
        return Err(format!(
            "{name}: committed_size {} instead of {size}",
            resp.committed_size
        ));
    }
    Ok(((), size))
}

/// ByteStream Write of an in-memory blob.
pub async fn write_bytes(
    bs: ByteStreamClient<Connection>,
    name: String,
    data: Bytes,
    chunk: u64,
) -> Result<((), u64), String> {
    let size = data.len() as u64;
    write_chunks(bs, name, size, chunk, move |offset| {
        let end = (offset + chunk).min(size);
        data.slice(offset as usize..end as usize)
    })
    .await
}

/// ByteStream Read of a whole blob, re-hashing what arrives and comparing it with `expected`.
pub async fn read_verified(
    mut bs: ByteStreamClient<Connection>,
    name: String,
    expected: &Digest,
) -> Result<((), u64), String> {
    let want = expected.size_bytes as u64;
    let mut stream = bs
        .read(ReadRequest {
            resource_name: name.clone(),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .map_err(|s| format!("{name}: {}", status(s)))?
        .into_inner();
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| format!("{name}: {}", status(s)))?
    {
        got += msg.data.len() as u64;
        if got > want {
            return Err(format!("{name}: more than {want} bytes sent"));
        }
        hasher.update(&msg.data);
    }
    if got != want {
        return Err(format!("{name}: {got} bytes instead of {want}"));
    }
    let hash = hex::encode(hasher.finalize());
    if hash != expected.hash {
        return Err(format!("{name}: data hashes to {hash}"));
    }
    Ok(((), got))
}

/// BatchUpdateBlobs; every blob must be answered once, with OK.
pub async fn batch_update(
    mut cas: ContentAddressableStorageClient<Connection>,
    instance: String,
    blobs: Vec<(Digest, Bytes)>,
) -> Result<((), u64), String> {
    let bytes = blobs.iter().map(|(_, b)| b.len() as u64).sum();
    let mut pending: HashSet<(String, i64)> = blobs.iter().map(|(d, _)| key(d)).collect();
    let requests = blobs
        .into_iter()
        .map(
            |(digest, data)| reapi::batch_update_blobs_request::Request {
                digest: Some(digest),
                data,
                compressor: 0,
            },
        )
        .collect();
    let resp = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: instance,
            requests,
            digest_function: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut failures = Vec::new();
    for r in &resp.responses {
        let Some(d) = &r.digest else {
            failures.push("an answer without a digest".to_string());
            continue;
        };
        if !pending.remove(&key(d)) {
            failures.push(format!("unexpected or repeated answer for {}", show(d)));
        }
        match &r.status {
            Some(s) if s.code != 0 => {
                failures.push(format!("{}: code {} {}", show(d), s.code, s.message))
            }
            _ => {}
        }
    }
    if !pending.is_empty() {
        failures.push(format!("{} blob(s) not answered", pending.len()));
    }
    match failures.first() {
        None => Ok(((), bytes)),
        Some(first) => Err(format!("{} problem(s), first: {first}", failures.len())),
    }
}

/// BatchReadBlobs of `expected`, comparing every byte that comes back.
pub async fn batch_read_verified(
    mut cas: ContentAddressableStorageClient<Connection>,
    instance: String,
    expected: &[(Digest, Bytes)],
) -> Result<((), u64), String> {
    let resp = cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            instance_name: instance,
            digests: expected.iter().map(|(d, _)| d.clone()).collect(),
            acceptable_compressors: Vec::new(),
            digest_function: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut pending: std::collections::HashMap<(String, i64), &Bytes> =
        expected.iter().map(|(d, b)| (key(d), b)).collect();
    let mut failures = Vec::new();
    let mut bytes = 0u64;
    for r in &resp.responses {
        let Some(d) = &r.digest else {
            failures.push("an answer without a digest".to_string());
            continue;
        };
        let Some(want) = pending.remove(&key(d)) else {
            failures.push(format!("unexpected or repeated answer for {}", show(d)));
            continue;
        };
        match &r.status {
            Some(s) if s.code != 0 => {
                failures.push(format!("{}: code {} {}", show(d), s.code, s.message))
            }
            _ if r.compressor != 0 => {
                failures.push(format!("{}: compressed though not asked", show(d)))
            }
            _ if r.data != *want => {
                failures.push(format!("{}: wrong data ({} bytes)", show(d), r.data.len()))
            }
            _ => bytes += r.data.len() as u64,
        }
    }
    if !pending.is_empty() {
        failures.push(format!("{} blob(s) not answered", pending.len()));
    }
    match failures.first() {
        None => Ok(((), bytes)),
        Some(first) => Err(format!("{} problem(s), first: {first}", failures.len())),
    }
}

/// FindMissingBlobs; the answer must be exactly `absent`.
pub async fn find_missing_verified(
    mut cas: ContentAddressableStorageClient<Connection>,
    instance: String,
    digests: Vec<Digest>,
    absent: &HashSet<(String, i64)>,
) -> Result<((), u64), String> {
    let asked = digests.len();
    let resp = cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: instance,
            blob_digests: digests,
            digest_function: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    let reported: HashSet<(String, i64)> = resp.missing_blob_digests.iter().map(key).collect();
    if reported == *absent {
        return Ok(((), 0));
    }
    let wrongly = reported.difference(absent).count();
    let unreported = absent.difference(&reported).count();
    Err(format!(
        "asked {asked}: {} reported missing, expected {}; {wrongly} present blob(s) reported \
         missing, {unreported} absent blob(s) not reported",
        reported.len(),
        absent.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names() {
        let d = Digest {
            hash: "ab".repeat(32),
            size_bytes: 5,
        };
        assert_eq!(read_name("", &d), format!("blobs/{}/5", "ab".repeat(32)));
        assert_eq!(
            read_name("ci/main", &d),
            format!("ci/main/blobs/{}/5", "ab".repeat(32))
        );
        let w = write_name("ci", &d);
        assert!(w.starts_with("ci/uploads/"), "{w}");
        assert!(w.ends_with(&format!("/blobs/{}/5", "ab".repeat(32))), "{w}");
        assert_ne!(write_name("", &d), write_name("", &d));
    }
}
