//! `fill`: stores many distinct blobs of a Bazel-like size mix, to put a server at a given blob
//! count (1 million for issue 4) quickly and reproducibly.
//!
//! Small blob `n` of seed `s` is fully determined by `(s, n)`: its size comes from a
//! [`SIZE_MIX`] draw and its content is a pseudo-random stream of its own (so, unlike a
//! [`crate::data::Family`], every byte differs between blobs and the client hashes each
//! whole). Step `i` stores small blobs `i × blobs .. (i + 1) × blobs`, in as many BatchUpdateBlobs
//! calls as the server's batch limit needs; so `--count C fill --blobs B` with one seed always
//! stores the same `C × B` small blobs, and `find-missing --from-fill N` can ask about them
//! without uploading anything. Every `large_every`-th step also stores one large blob of its
//! own numbering (file-backed in hoard), sized log-uniformly between 64 KiB + 1 and `large_max`.

use bytes::Bytes;

use super::{Env, Worker, Workload};
use crate::data::{digest_of, fill, mix, Rng};
use hoard::proto::reapi::Digest;

/// Small-blob sizes: (share, smallest, largest), sizes log-uniform within a class. About half
/// are under 1 KiB and 85% under 4 KiB, as in Bazel's CAS (sources, small outputs, directory
/// and action protos); the mean is about 2.3 KB.
pub const SIZE_MIX: [(f64, u64, u64); 3] = [
    (0.50, 100, 1024),
    (0.35, 1024, 4096),
    (0.15, 4096, 16 << 10),
];

/// Smallest large blob: one byte above hoard's default inline threshold.
pub const LARGE_MIN: u64 = (64 << 10) + 1;

const SMALL_SALT: u64 = 0xF111_5A11_B10B_0001;
const LARGE_SALT: u64 = 0xF111_1A26_EB10_B002;

/// Log-uniform in [lo, hi] from `x` in [0, 1).
fn log_uniform(lo: u64, hi: u64, x: f64) -> u64 {
    let v = (lo as f64) * ((hi as f64) / (lo as f64)).powf(x);
    (v as u64).clamp(lo, hi)
}

/// The blobs `fill` stores for one seed.
#[derive(Clone, Debug)]
pub struct FillBlobs {
    small_key: u64,
    large_key: u64,
    large_max: u64,
}

impl FillBlobs {
    pub fn new(seed: u64, large_max: u64) -> Self {
        FillBlobs {
            small_key: mix(seed ^ SMALL_SALT),
            large_key: mix(seed ^ LARGE_SALT),
            large_max: large_max.max(LARGE_MIN),
        }
    }

    fn blob_seed(key: u64, n: u64) -> u64 {
        key ^ mix(n.wrapping_add(1))
    }

    /// Size of small blob `n`.
    pub fn small_size(&self, n: u64) -> u64 {
        let mut rng = Rng::new(Self::blob_seed(self.small_key, n));
        let mut class = rng.next_f64();
        let x = rng.next_f64();
        for (share, lo, hi) in SIZE_MIX {
            if class < share {
                return log_uniform(lo, hi, x);
            }
            class -= share;
        }
        let (_, lo, hi) = SIZE_MIX[SIZE_MIX.len() - 1];
        log_uniform(lo, hi, x)
    }

    /// Small blob `n` and its digest.
    pub fn small(&self, n: u64) -> (Digest, Bytes) {
        Self::blob(Self::blob_seed(self.small_key, n), self.small_size(n))
    }

    /// Size of large blob `n`.
    pub fn large_size(&self, n: u64) -> u64 {
        let mut rng = Rng::new(Self::blob_seed(self.large_key, n));
        log_uniform(LARGE_MIN, self.large_max, rng.next_f64())
    }

    /// Large blob `n` and its digest (held in memory: keep `large_max` modest).
    pub fn large(&self, n: u64) -> (Digest, Bytes) {
        Self::blob(Self::blob_seed(self.large_key, n), self.large_size(n))
    }

    fn blob(seed: u64, size: u64) -> (Digest, Bytes) {
        // The content stream is another function of the seed than the size draw.
        let mut data = vec![0u8; size as usize];
        fill(mix(seed), 0, &mut data);
        (digest_of(&data), data.into())
    }
}

/// Each step stores `blobs` new small blobs (and every `large_every`-th step one large blob).
pub struct Fill {
    env: Env,
    blobs: FillBlobs,
    per_step: u64,
    large_every: u64,
}

impl Fill {
    pub fn setup(
        env: &Env,
        per_step: usize,
        large_every: u64,
        large_max: u64,
    ) -> Result<Self, String> {
        if per_step == 0 {
            return Err("--blobs must be at least 1".into());
        }
        Ok(Fill {
            env: env.clone(),
            blobs: FillBlobs::new(env.seed, large_max),
            per_step: per_step as u64,
            large_every,
        })
    }

    /// What step `i` stores: its small blobs, then its large blob if it has one.
    pub fn step_blobs(&self, i: u64) -> Vec<(Digest, Bytes)> {
        let first = i * self.per_step;
        let mut blobs: Vec<(Digest, Bytes)> = (first..first + self.per_step)
            .map(|n| self.blobs.small(n))
            .collect();
        if self.large_every > 0 && i.is_multiple_of(self.large_every) {
            blobs.push(self.blobs.large(i / self.large_every));
        }
        blobs
    }
}

impl Workload for Fill {
    async fn step(&self, w: &mut Worker, i: u64) {
        let blobs = self.step_blobs(i);
        // Batches within the server's limit; a blob above it goes by ByteStream Write.
        w.upload_all(&self.env, blobs).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn small_sizes_follow_the_mix() {
        let f = FillBlobs::new(1, 1 << 20);
        let n = 20_000u64;
        let sizes: Vec<u64> = (0..n).map(|i| f.small_size(i)).collect();
        assert!(sizes.iter().all(|&s| (100..=16 << 10).contains(&s)));
        let share = |pred: &dyn Fn(u64) -> bool| {
            sizes.iter().filter(|&&s| pred(s)).count() as f64 / n as f64
        };
        let under_1k = share(&|s| s < 1024);
        let under_4k = share(&|s| s < 4096);
        assert!((0.47..0.53).contains(&under_1k), "{under_1k}");
        assert!((0.82..0.88).contains(&under_4k), "{under_4k}");
        let mean = sizes.iter().sum::<u64>() as f64 / n as f64;
        assert!((2100.0..2500.0).contains(&mean), "{mean}");
    }

    #[test]
    fn blobs_are_deterministic_distinct_and_match_their_digest() {
        let f = FillBlobs::new(7, 300 << 10);
        let g = FillBlobs::new(7, 300 << 10);
        let mut hashes = HashSet::new();
        for n in 0..500 {
            let (d, data) = f.small(n);
            assert_eq!(d, digest_of(&data));
            assert_eq!(d.size_bytes as u64, f.small_size(n));
            assert_eq!((d.clone(), data), g.small(n));
            assert!(hashes.insert(d.hash));
        }
        for n in 0..5 {
            let (d, data) = f.large(n);
            assert_eq!(d, digest_of(&data));
            assert!((LARGE_MIN..=300 << 10).contains(&(data.len() as u64)));
            assert!(hashes.insert(d.hash));
        }
        // Another seed, other blobs.
        assert_ne!(FillBlobs::new(8, 1 << 20).small(0), f.small(0));
    }

    #[test]
    fn steps_cover_consecutive_blobs_and_every_kth_large_one() {
        let env = Env {
            seed: 3,
            max_batch: 0,
        };
        let fill = Fill::setup(&env, 10, 2, 128 << 10).unwrap();
        let blobs = FillBlobs::new(3, 128 << 10);
        let s0 = fill.step_blobs(0);
        let s1 = fill.step_blobs(1);
        let s2 = fill.step_blobs(2);
        assert_eq!((s0.len(), s1.len(), s2.len()), (11, 10, 11));
        assert_eq!(
            s0[..10].to_vec(),
            (0..10).map(|n| blobs.small(n)).collect::<Vec<_>>()
        );
        assert_eq!(s1[0], blobs.small(10));
        assert_eq!(s0[10], blobs.large(0));
        assert_eq!(s2[10], blobs.large(1));
        assert!(Fill::setup(&env, 0, 0, 0).is_err());
        assert_eq!(Fill::setup(&env, 5, 0, 0).unwrap().step_blobs(0).len(), 5);
    }
}
