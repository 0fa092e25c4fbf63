//! `batch-update`, `batch-read` and `find-missing`: the CAS's batch calls with small blobs.

use std::collections::HashSet;

use bytes::Bytes;

use super::fill::FillBlobs;
use super::{batch_read_verified, batch_update, find_missing_verified, key, Env, Worker, Workload};
use crate::data::{mix, Family, MIN_DISTINCT_SIZE};
use hoard::proto::reapi::Digest;

/// Refuses batches the server says it would refuse.
fn check_batch(env: &Env, blobs: usize, blob_size: u64) -> Result<(), String> {
    check_size(blob_size)?;
    let total = blobs as u64 * blob_size;
    if env.max_batch != 0 && total > env.max_batch {
        return Err(format!(
            "a batch of {blobs} x {blob_size} bytes ({total} bytes) exceeds the server's \
             max_batch_total_size_bytes ({})",
            env.max_batch
        ));
    }
    Ok(())
}

/// Refuses blob sizes too small for distinct blobs.
pub fn check_size(blob_size: u64) -> Result<(), String> {
    if blob_size < MIN_DISTINCT_SIZE {
        return Err(format!(
            "blob size {blob_size}: use at least {MIN_DISTINCT_SIZE} bytes so that blobs differ"
        ));
    }
    Ok(())
}

/// Each step stores `blobs` new blobs in one BatchUpdateBlobs.
pub struct BatchUpdate {
    family: Family,
    blobs: usize,
}

impl BatchUpdate {
    pub fn setup(env: &Env, blobs: usize, blob_size: u64) -> Result<Self, String> {
        check_batch(env, blobs, blob_size)?;
        Ok(BatchUpdate {
            family: Family::new(env.seed, blob_size),
            blobs,
        })
    }
}

impl Workload for BatchUpdate {
    async fn step(&self, w: &mut Worker, i: u64) {
        let first = i * self.blobs as u64;
        let blobs = (first..first + self.blobs as u64)
            .map(|m| (self.family.digest(m), self.family.bytes(m)))
            .collect();
        let fut = batch_update(w.conn.cas.clone(), w.instance.clone(), blobs);
        w.op("BatchUpdateBlobs", fut).await;
    }
}

/// Stores `blobs` blobs in set-up; each step reads them all in one BatchReadBlobs and compares
/// every byte. With `from_fill`, stores nothing: each step reads `blobs` blobs drawn at random
/// from a fill's.
pub struct BatchRead {
    source: ReadSource,
}

enum ReadSource {
    Stored(Vec<(Digest, Bytes)>),
    Fill {
        fill: FillBlobs,
        blobs: usize,
        stored: u64,
        salt: u64,
    },
}

impl BatchRead {
    pub async fn setup(
        env: &Env,
        w: &mut Worker,
        blobs: usize,
        blob_size: u64,
        from_fill: Option<u64>,
    ) -> Result<Self, String> {
        if let Some(stored) = from_fill {
            if stored == 0 {
                return Err("--from-fill must be at least 1".into());
            }
            // The fill's sizes stay below 16 KiB each.
            check_batch(env, blobs, 16 << 10)?;
            return Ok(BatchRead {
                source: ReadSource::Fill {
                    fill: FillBlobs::new(env.seed, 0),
                    blobs,
                    stored,
                    salt: mix(env.seed ^ 0x0BA7_C4ED),
                },
            });
        }
        check_batch(env, blobs, blob_size)?;
        let family = Family::new(env.seed, blob_size);
        let expected: Vec<(Digest, Bytes)> = (0..blobs as u64)
            .map(|m| (family.digest(m), family.bytes(m)))
            .collect();
        w.upload_all(env, expected.clone()).await;
        w.check("uploading the blobs to read")?;
        Ok(BatchRead {
            source: ReadSource::Stored(expected),
        })
    }
}

impl Workload for BatchRead {
    async fn step(&self, w: &mut Worker, i: u64) {
        match &self.source {
            ReadSource::Stored(expected) => {
                let fut = batch_read_verified(w.conn.cas.clone(), w.instance.clone(), expected);
                w.op("BatchReadBlobs", fut).await;
            }
            ReadSource::Fill {
                fill,
                blobs,
                stored,
                salt,
            } => {
                let expected: Vec<(Digest, Bytes)> = (0..*blobs as u64)
                    .map(|j| fill.small(mix(salt ^ mix(i * *blobs as u64 + j + 1)) % stored))
                    .collect();
                let fut = batch_read_verified(w.conn.cas.clone(), w.instance.clone(), &expected);
                w.op("BatchReadBlobs", fut).await;
            }
        }
    }
}

/// Stores the present share of `digests` in set-up (or, with `from_fill`, takes it from blobs a
/// `fill` run with the same seed stored); each step asks FindMissingBlobs about all of them
/// (present and absent interleaved) and checks the answer is exactly the absent ones.
pub struct FindMissing {
    /// Digest lists the steps take in turn.
    lists: Vec<DigestList>,
}

/// The digests of one FindMissingBlobs call and the ones among them that are absent.
type DigestList = (Vec<Digest>, HashSet<(String, i64)>);

/// Digest lists `find-missing --from-fill` prepares, so steps ask about different blobs.
pub const FROM_FILL_LISTS: usize = 64;

impl FindMissing {
    /// `from_fill`: draw the present digests at random from the first `N` small blobs of
    /// `fill --seed` (same seed as this run), uploading nothing.
    pub async fn setup(
        env: &Env,
        w: &mut Worker,
        digests: usize,
        present_fraction: f64,
        blob_size: u64,
        from_fill: Option<u64>,
    ) -> Result<Self, String> {
        check_size(blob_size)?;
        let present_count = (digests as f64 * present_fraction).round() as usize;
        // Same size, another seed: blobs nobody uploads.
        let absent = Family::new(mix(env.seed ^ 0x00AB_5E17), blob_size);
        let (lists, present): (usize, Box<dyn Fn(u64) -> Digest>) = match from_fill {
            Some(0) => return Err("--from-fill must be at least 1".into()),
            Some(n) => {
                let fill = FillBlobs::new(env.seed, 0);
                let salt = mix(env.seed ^ 0x0F11_F1DE);
                // Member k of the present sequence is a random one of the first n blobs.
                let pick = move |k: u64| fill.small(mix(salt ^ mix(k + 1)) % n).0;
                (FROM_FILL_LISTS, Box::new(pick))
            }
            None => {
                let family = Family::new(env.seed, blob_size);
                let blobs = (0..present_count as u64)
                    .map(|m| (family.digest(m), family.bytes(m)))
                    .collect();
                w.upload_all(env, blobs).await;
                w.check("uploading the present blobs")?;
                (1, Box::new(move |k: u64| family.digest(k)))
            }
        };
        let (mut p, mut a) = (0u64, 0u64);
        let lists = (0..lists)
            .map(|_| {
                // Spread the present ones evenly among the absent ones.
                let mut list = Vec::with_capacity(digests);
                let mut absent_set = HashSet::new();
                let first_present = p;
                for k in 0..digests {
                    let want_present = (k + 1) * present_count / digests.max(1);
                    if ((p - first_present) as usize) < want_present {
                        list.push(present(p));
                        p += 1;
                    } else {
                        let d = absent.digest(a);
                        absent_set.insert(key(&d));
                        list.push(d);
                        a += 1;
                    }
                }
                (list, absent_set)
            })
            .collect();
        Ok(FindMissing { lists })
    }
}

impl Workload for FindMissing {
    async fn step(&self, w: &mut Worker, i: u64) {
        let (digests, absent) = &self.lists[i as usize % self.lists.len()];
        let fut = find_missing_verified(
            w.conn.cas.clone(),
            w.instance.clone(),
            digests.clone(),
            absent,
        );
        w.op("FindMissingBlobs", fut).await;
    }
}
