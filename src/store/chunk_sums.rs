//! Per-chunk checksums of blob files: an XXH3-64 of every [`SUM_CHUNK`] bytes, recorded while
//! the blob is written and checked on every read, whole or ranged.
//!
//! A checksum of the whole file can only be checked by reading all of it, so a ranged read
//! (Bazel's resumed downloads, clients reading a blob in parts) could serve a flipped byte.
//! With one checksum per chunk, a read of any range reads the chunks that cover it, checks
//! each before any of its bytes are sent, and a damaged chunk ends the read instead.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Bytes covered by one checksum: the unit reads are aligned to. 8 bytes of checksum per MiB.
pub const SUM_CHUNK: u64 = 1 << 20;

/// Collects the checksums of a blob's chunks as its bytes arrive, in any pieces.
#[derive(Default)]
pub struct ChunkSums {
    done: Vec<u64>,
    current: Xxh3,
    in_current: u64,
}

impl ChunkSums {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = ((SUM_CHUNK - self.in_current) as usize).min(data.len());
            self.current.update(&data[..n]);
            self.in_current += n as u64;
            data = &data[n..];
            if self.in_current == SUM_CHUNK {
                self.done.push(self.current.digest());
                self.current.reset();
                self.in_current = 0;
            }
        }
    }

    /// The checksums, the last one covering a partial chunk if the size is not a multiple.
    pub fn finish(mut self) -> Vec<u64> {
        if self.in_current > 0 {
            self.done.push(self.current.digest());
        }
        self.done
    }
}

/// The checksums of a whole blob held in memory.
pub fn of(data: &[u8]) -> Vec<u64> {
    data.chunks(SUM_CHUNK as usize).map(xxh3_64).collect()
}

/// How many checksums a blob of `size` bytes has.
pub fn count(size: u64) -> usize {
    size.div_ceil(SUM_CHUNK) as usize
}

/// Whether chunk `index` of a blob has the bytes `chunk`.
pub fn matches(sums: &[u64], index: usize, chunk: &[u8]) -> bool {
    sums.get(index) == Some(&xxh3_64(chunk))
}

#[cfg(test)]
mod tests {
    use super::{count, matches, of, ChunkSums, SUM_CHUNK};

    #[test]
    fn pieces_of_any_size_give_the_sums_of_whole_chunks() {
        let data: Vec<u8> = (0..(3 * SUM_CHUNK + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut sums = ChunkSums::new();
        for piece in data.chunks(77_777) {
            sums.update(piece);
        }
        let sums = sums.finish();
        assert_eq!(sums, of(&data));
        assert_eq!(sums.len(), count(data.len() as u64));
        assert!(matches(&sums, 3, &data[3 * SUM_CHUNK as usize..]));
        assert!(!matches(&sums, 2, &data[3 * SUM_CHUNK as usize..]));
    }
}
