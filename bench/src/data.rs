//! Deterministic pseudo-random blob contents, computable at any offset without state.
//!
//! Byte `o` of the stream with seed `s` depends only on `(s, o)`, so a blob of any size can be
//! generated chunk by chunk (for hashing in a first pass, then again for streaming) without ever
//! being held in memory, and with any chunk size.
//!
//! A [`Family`] is a set of blobs of one size that share everything but their last
//! [`TAIL_LEN`] bytes. The SHA-256 state after the shared prefix is computed once (the "first
//! pass"), so the digest of each further member costs one clone and one 64-byte block. Every
//! member is a distinct blob the server must receive, hash and store in full; only the client
//! saves work.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use hoard::proto::reapi::Digest;

/// Members of a [`Family`] differ in this many final bytes (one SHA-256 block).
pub const TAIL_LEN: u64 = 64;

/// Smallest blob size for which members are (with overwhelming probability) all distinct:
/// smaller blobs have too few possible contents.
pub const MIN_DISTINCT_SIZE: u64 = 8;

/// Size of the pieces the prefix is generated and hashed in.
const PIECE: u64 = 1 << 20;

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a fast, well-mixing bijection on u64.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic random number generator (SplitMix64) for workload decisions.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(mix(seed ^ 0x0DDB_1A5E_5BAD_5EED))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); `n` must be above 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Fills `buf` with the bytes of stream `seed` starting at byte `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let key = mix(seed);
    let word = |i: u64| mix(key.wrapping_add(i.wrapping_mul(GAMMA))).to_le_bytes();
    let mut pos = offset;
    let mut out = buf;
    // Unaligned head: the rest of the word `offset` falls in.
    let skip = (pos % 8) as usize;
    if skip != 0 && !out.is_empty() {
        let w = word(pos / 8);
        let n = (8 - skip).min(out.len());
        out[..n].copy_from_slice(&w[skip..skip + n]);
        out = &mut out[n..];
        pos += n as u64;
    }
    // Aligned body, a word at a time.
    let mut i = pos / 8;
    let mut words = out.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&word(i));
        i += 1;
    }
    let rest = words.into_remainder();
    if !rest.is_empty() {
        let n = rest.len();
        rest.copy_from_slice(&word(i)[..n]);
    }
}

/// Blobs of one size that share all but their last [`TAIL_LEN`] bytes; see the module docs.
#[derive(Clone)]
pub struct Family {
    seed: u64,
    size: u64,
    /// Where the per-member tail starts.
    split: u64,
    /// SHA-256 state after `[0, split)`.
    prefix: Sha256,
}

impl Family {
    /// Generates and hashes the shared prefix: CPU-bound, about `size` bytes of work.
    pub fn new(seed: u64, size: u64) -> Self {
        let split = size.saturating_sub(TAIL_LEN);
        let mut prefix = Sha256::new();
        let mut buf = vec![0u8; PIECE.min(split) as usize];
        let mut at = 0;
        while at < split {
            let n = PIECE.min(split - at) as usize;
            fill(seed, at, &mut buf[..n]);
            prefix.update(&buf[..n]);
            at += n as u64;
        }
        Family {
            seed,
            size,
            split,
            prefix,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn tail_seed(&self, member: u64) -> u64 {
        mix(self.seed ^ mix(member.wrapping_add(1)))
    }

    /// The digest of member `member`.
    pub fn digest(&self, member: u64) -> Digest {
        let mut hasher = self.prefix.clone();
        let mut tail = [0u8; TAIL_LEN as usize];
        let tail = &mut tail[..(self.size - self.split) as usize];
        self.fill(member, self.split, tail);
        hasher.update(&*tail);
        Digest {
            hash: hex::encode(hasher.finalize()),
            size_bytes: self.size as i64,
        }
    }

    /// Fills `buf` with the bytes of member `member` from `offset` (which must lie in the blob).
    pub fn fill(&self, member: u64, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        debug_assert!(end <= self.size, "range beyond the blob");
        if offset < self.split {
            let n = (self.split.min(end) - offset) as usize;
            fill(self.seed, offset, &mut buf[..n]);
        }
        if end > self.split {
            let start = offset.max(self.split);
            let from = (start - offset) as usize;
            fill(self.tail_seed(member), start, &mut buf[from..]);
        }
    }

    /// `len` bytes of member `member` from `offset`, clamped to the blob's end.
    pub fn chunk(&self, member: u64, offset: u64, len: u64) -> Bytes {
        let len = len.min(self.size.saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        self.fill(member, offset, &mut buf);
        buf.into()
    }

    /// The whole of member `member`; only for blobs that fit in memory comfortably.
    pub fn bytes(&self, member: u64) -> Bytes {
        self.chunk(member, 0, self.size)
    }
}

/// The SHA-256 digest of `data`.
pub fn digest_of(data: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        fill(seed, 0, &mut v);
        v
    }

    #[test]
    fn fill_at_any_offset_matches_the_whole_stream() {
        let whole = stream(7, 300);
        for offset in 0..20usize {
            for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 17, 100] {
                let mut part = vec![0u8; len];
                fill(7, offset as u64, &mut part);
                assert_eq!(
                    part,
                    whole[offset..offset + len],
                    "offset {offset} len {len}"
                );
            }
        }
    }

    #[test]
    fn streams_are_deterministic_and_seed_dependent() {
        assert_eq!(stream(1, 1000), stream(1, 1000));
        assert_ne!(stream(1, 1000), stream(2, 1000));
        // Not trivially compressible: all byte values show up.
        let data = stream(3, 1 << 16);
        let mut seen = [false; 256];
        for b in data {
            seen[b as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn family_digest_is_sha256_of_the_concatenated_chunks() {
        for size in [0u64, 1, 63, 64, 65, 1000, PIECE + 777, 3 * PIECE] {
            let family = Family::new(42, size);
            for member in [0u64, 1, 99] {
                let mut hasher = Sha256::new();
                let mut whole = Vec::new();
                let mut at = 0;
                while at < size {
                    let chunk = family.chunk(member, at, 333_333);
                    hasher.update(&chunk);
                    whole.extend_from_slice(&chunk);
                    at += chunk.len() as u64;
                }
                assert_eq!(whole.len() as u64, size);
                let expected = Digest {
                    hash: hex::encode(hasher.finalize()),
                    size_bytes: size as i64,
                };
                assert_eq!(
                    family.digest(member),
                    expected,
                    "size {size} member {member}"
                );
                assert_eq!(digest_of(&family.bytes(member)), expected);
            }
        }
    }

    #[test]
    fn family_members_are_distinct_blobs() {
        for size in [MIN_DISTINCT_SIZE, 64, 65, 10 << 10] {
            let family = Family::new(5, size);
            let digests: std::collections::HashSet<String> =
                (0..200).map(|m| family.digest(m).hash).collect();
            assert_eq!(digests.len(), 200, "size {size}");
        }
        assert_ne!(Family::new(1, 100).digest(0), Family::new(2, 100).digest(0));
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(9);
        let mut b = Rng::new(9);
        for _ in 0..1000 {
            let x = a.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert_eq!(x, b.next_f64());
            assert!(a.below(7) < 7);
            b.below(7);
        }
    }
}
