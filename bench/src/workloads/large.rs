//! `write-large` and `read-large`: ByteStream transfers of large blobs, never held in memory.

use std::sync::Arc;

use super::{read_name, read_verified, write_chunks, write_name, Env, Worker, Workload};
use crate::data::Family;
use hoard::proto::reapi::Digest;

/// Hashes the prefix shared by a family of `size`-byte blobs, off the async threads.
async fn family(seed: u64, size: u64) -> Result<Arc<Family>, String> {
    tokio::task::spawn_blocking(move || Arc::new(Family::new(seed, size)))
        .await
        .map_err(|e| format!("hashing the test data failed: {e}"))
}

/// Streams member `member` of `family`, generating each chunk as it is sent.
async fn write_member(
    w: &mut Worker,
    kind: &'static str,
    family: &Arc<Family>,
    member: u64,
    chunk: u64,
) -> Option<()> {
    let digest = family.digest(member);
    let name = write_name(&w.instance, &digest);
    let f = family.clone();
    let fut = write_chunks(w.conn.bs.clone(), name, f.size(), chunk, move |offset| {
        f.chunk(member, offset, chunk)
    });
    w.op(kind, fut).await
}

/// Each step writes a new blob of the family (member = step index).
pub struct WriteLarge {
    family: Arc<Family>,
    chunk: u64,
}

impl WriteLarge {
    pub async fn setup(env: &Env, size: u64, chunk: u64) -> Result<Self, String> {
        Ok(WriteLarge {
            family: family(env.seed, size).await?,
            chunk,
        })
    }
}

impl Workload for WriteLarge {
    async fn step(&self, w: &mut Worker, i: u64) {
        write_member(w, "Write", &self.family, i, self.chunk).await;
    }
}

/// Uploads one blob in set-up, then each step reads it whole and checks its digest.
pub struct ReadLarge {
    digest: Digest,
}

impl ReadLarge {
    pub async fn setup(env: &Env, w: &mut Worker, size: u64, chunk: u64) -> Result<Self, String> {
        let family = family(env.seed, size).await?;
        write_member(w, "Write", &family, 0, chunk).await;
        w.check("uploading the blob to read")?;
        Ok(ReadLarge {
            digest: family.digest(0),
        })
    }
}

impl Workload for ReadLarge {
    async fn step(&self, w: &mut Worker, _i: u64) {
        let name = read_name(&w.instance, &self.digest);
        let fut = read_verified(w.conn.bs.clone(), name, &self.digest);
        w.op("Read", fut).await;
    }
}
