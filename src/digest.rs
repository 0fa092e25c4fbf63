//! Content digests: parsing and validating what clients send, and hashing what they upload.
//!
//! hoard supports SHA-256 only (the REAPI default). A digest is a hash plus a size; both must match
//! the bytes for a blob to be accepted.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::proto::reapi;

/// Length of a SHA-256 hash in bytes.
pub const HASH_LEN: usize = 32;

/// A validated SHA-256 digest: the raw hash and the blob size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub hash: [u8; HASH_LEN],
    pub size: u64,
}

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest {
            hash: Sha256::digest(data).into(),
            size: data.len() as u64,
        }
    }

    /// The empty blob, which every CAS holds without being told.
    pub const fn empty() -> Self {
        Digest {
            hash: EMPTY_SHA256,
            size: 0,
        }
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && self.hash == EMPTY_SHA256
    }

    /// Parses a lower-case hex hash and a size, as found in resource names and proto digests.
    pub fn parse(hash_hex: &str, size: i64) -> Result<Self> {
        if hash_hex.len() != HASH_LEN * 2 {
            return Err(Error::InvalidArgument(format!(
                "digest hash {} is {} characters long; a SHA-256 hash is 64 lower-case hex characters",
                crate::error::echo(hash_hex),
                hash_hex.len()
            )));
        }
        let Some(hash) = decode_hex(hash_hex.as_bytes()) else {
            return Err(Error::InvalidArgument(format!(
                "digest hash {} is not lower-case hex",
                crate::error::echo(hash_hex)
            )));
        };
        if size < 0 {
            return Err(Error::InvalidArgument(format!(
                "digest {hash_hex}/{size} has a negative size"
            )));
        }
        Ok(Digest {
            hash,
            size: size as u64,
        })
    }

    /// Validates a digest from a request; `what` names the field for the error message.
    pub fn from_proto(d: Option<&reapi::Digest>, what: &str) -> Result<Self> {
        let d = d.ok_or_else(|| Error::InvalidArgument(format!("{what} is missing")))?;
        Digest::parse(&d.hash, d.size_bytes)
            .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))
    }

    pub fn to_proto(self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hex(),
            size_bytes: self.size as i64,
        }
    }

    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(HASH_LEN * 2);
        for b in self.hash {
            out.push(DIGITS[(b >> 4) as usize] as char);
            out.push(DIGITS[(b & 0xf) as usize] as char);
        }
        out
    }
}

/// SHA-256 of no bytes.
const EMPTY_SHA256: [u8; HASH_LEN] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Value of each byte as a lower-case hex digit, or `INVALID`. A table instead of a match: on
/// random hashes, "digit or letter?" branches mispredict about every other character.
const INVALID: u8 = 0xff;
const HEX_VALUES: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Parses a 64-character lowercase hex SHA-256 (as in blob file names).
pub fn parse_hex_hash(text: &str) -> Option<[u8; HASH_LEN]> {
    decode_hex(text.as_bytes())
}

/// Decodes exactly 64 lower-case hex characters, from bytes not known to be text (a field of an
/// undecoded message). Hot: FindMissingBlobs parses thousands per call.
pub fn decode_hex(text: &[u8]) -> Option<[u8; HASH_LEN]> {
    if text.len() != HASH_LEN * 2 {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (hi, lo) = (HEX_VALUES[pair[0] as usize], HEX_VALUES[pair[1] as usize]);
        bad |= hi | lo; // any INVALID sets the high bit
        *o = (hi << 4) | (lo & 0xf);
    }
    (bad & 0x80 == 0).then_some(out)
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks that a request's `digest_function` is one we serve. UNKNOWN (0) means "the default",
/// which for 64-hex-character hashes is SHA-256.
pub fn check_function(digest_function: i32) -> Result<()> {
    use reapi::digest_function::Value;
    match Value::try_from(digest_function) {
        Ok(Value::Unknown) | Ok(Value::Sha256) => Ok(()),
        Ok(other) => Err(Error::InvalidArgument(format!(
            "digest function {} is not supported; this server supports SHA256",
            other.as_str_name()
        ))),
        Err(_) => Err(Error::InvalidArgument(format!(
            "digest function {digest_function} is unknown; this server supports SHA256"
        ))),
    }
}

/// Hashes a blob as it streams in and checks it against the digest the client promised.
/// Every CAS write passes through one of these exactly once before the blob becomes visible.
pub struct Verifier {
    expected: Digest,
    hasher: Sha256,
    seen: u64,
}

impl Verifier {
    pub fn new(expected: Digest) -> Self {
        Verifier {
            expected,
            hasher: Sha256::new(),
            seen: 0,
        }
    }

    /// Feeds the next bytes; fails as soon as more bytes arrive than the digest's size.
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        self.seen += data.len() as u64;
        if self.seen > self.expected.size {
            return Err(Error::InvalidArgument(format!(
                "blob {} received {} bytes, more than its declared size",
                self.expected, self.seen
            )));
        }
        self.hasher.update(data);
        Ok(())
    }

    /// Bytes fed so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Succeeds only if exactly the declared bytes arrived and they hash to the declared hash.
    pub fn finish(self) -> Result<()> {
        if self.seen != self.expected.size {
            return Err(Error::InvalidArgument(format!(
                "blob {} received {} bytes, but its digest says {}",
                self.expected, self.seen, self.expected.size
            )));
        }
        let actual: [u8; HASH_LEN] = self.hasher.finalize().into();
        if actual != self.expected.hash {
            return Err(Error::InvalidArgument(format!(
                "blob {} does not match its digest: the data hashes to {}",
                self.expected,
                hex::encode(actual)
            )));
        }
        Ok(())
    }
}

/// Verifies a whole in-memory blob against its digest.
pub fn verify(expected: Digest, data: &[u8]) -> Result<()> {
    let mut v = Verifier::new(expected);
    v.update(data)?;
    v.finish()
}

/// SHA-256 whose state can be saved between whole 64-byte blocks and picked up again, maybe
/// by another process: an upload resumed on another node (the s3 backend) goes on hashing
/// where the first node stopped, without reading back what it sent. `sha2`'s own hasher cannot
/// be saved, so this drives its block function directly.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumableSha256 {
    state: [u32; 8],
    /// Bytes hashed so far; always a multiple of 64 (see [`ResumableSha256::update_blocks`]).
    len: u64,
}

impl Default for ResumableSha256 {
    fn default() -> Self {
        ResumableSha256 {
            state: [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ],
            len: 0,
        }
    }
}

impl ResumableSha256 {
    /// Bytes hashed so far.
    pub fn hashed(&self) -> u64 {
        self.len
    }

    /// Hashes `data`, whose length must be a multiple of 64 (whole blocks), so the state
    /// stays savable. Returns false (and hashes nothing) if it is not.
    pub fn update_blocks(&mut self, data: &[u8]) -> bool {
        if !data.len().is_multiple_of(64) {
            return false;
        }
        self.compress(data);
        self.len += data.len() as u64;
        true
    }

    fn compress(&mut self, data: &[u8]) {
        let blocks: Vec<sha2::digest::generic_array::GenericArray<u8, _>> = data
            .chunks_exact(64)
            .map(sha2::digest::generic_array::GenericArray::clone_from_slice)
            .collect();
        sha2::compress256(&mut self.state, &blocks);
    }

    /// The hash of everything so far followed by `tail` (any length).
    pub fn finish(mut self, tail: &[u8]) -> [u8; HASH_LEN] {
        let whole = tail.len() - tail.len() % 64;
        self.compress(&tail[..whole]);
        let total_bits = (self.len + tail.len() as u64).wrapping_mul(8);
        let mut last = tail[whole..].to_vec();
        last.push(0x80);
        while last.len() % 64 != 56 {
            last.push(0);
        }
        last.extend_from_slice(&total_bits.to_be_bytes());
        self.compress(&last);
        let mut out = [0u8; HASH_LEN];
        for (o, word) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn resumable_sha256_matches_sha256_across_a_saved_state() {
        for len in [0usize, 1, 55, 56, 63, 64, 65, 119, 128, 1000, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let want: [u8; 32] = sha2::Sha256::digest(&data).into();
            let cut = len / 2 - (len / 2) % 64;
            let mut h = super::ResumableSha256::default();
            assert!(h.update_blocks(&data[..cut]));
            // Saved and picked up again, as by another node.
            let saved = serde_json::to_string(&h).unwrap();
            let back: super::ResumableSha256 = serde_json::from_str(&saved).unwrap();
            assert_eq!(back.hashed(), cut as u64);
            assert_eq!(back.finish(&data[cut..]), want, "len {len}");
        }
        let mut h = super::ResumableSha256::default();
        assert!(!h.update_blocks(&[0u8; 10]), "only whole blocks");
    }
    use super::*;

    #[test]
    fn empty_blob_digest_is_the_well_known_one() {
        assert_eq!(Digest::empty(), Digest::of(b""));
        assert_eq!(
            Digest::empty().hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(Digest::empty().is_empty_blob());
    }

    #[test]
    fn parse_rejects_bad_input() {
        let good = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(Digest::parse(good, 0).is_ok());
        assert!(Digest::parse(&good.to_uppercase(), 0).is_err());
        assert!(Digest::parse(&good[1..], 0).is_err());
        assert!(Digest::parse(good, -1).is_err());
        assert!(Digest::parse(&format!("{}g", &good[1..]), 0).is_err());
    }

    #[test]
    fn verifier_catches_wrong_size_and_hash() {
        let d = Digest::of(b"hello");
        assert!(verify(d, b"hello").is_ok());
        assert!(verify(d, b"hellO").is_err());
        assert!(verify(d, b"hell").is_err());
        assert!(verify(d, b"hello!").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}", n in proptest::num::i64::ANY) {
            let _ = Digest::parse(&s, n);
        }

        #[test]
        fn hex_round_trips(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let d = Digest::of(&data);
            proptest::prop_assert_eq!(Digest::parse(&d.hex(), d.size as i64).unwrap(), d);
        }
    }
}
