//! Digest parsing (`src/digest.rs`): `Digest::parse`, `Digest::from_proto`, `parse_hex_hash`
//! and `check_function` never panic, and agree with each other and with the formatting.
//!
//! Input layout: bytes 0..8 are the size (i64, little-endian), 8..12 the digest function (i32,
//! little-endian), the rest the hash text (UTF-8). Shorter inputs are padded with zeros.
#![no_main]

use hoard::digest::{self, Digest};
use hoard::proto::reapi;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = [0u8; 12];
    let n = data.len().min(12);
    head[..n].copy_from_slice(&data[..n]);
    let size = i64::from_le_bytes(head[..8].try_into().unwrap());
    let function = i32::from_le_bytes(head[8..].try_into().unwrap());
    let Ok(hash) = std::str::from_utf8(&data[n..]) else {
        return;
    };

    let sha256 = function == 0 || function == reapi::digest_function::Value::Sha256 as i32;
    assert_eq!(
        digest::check_function(function).is_ok(),
        sha256,
        "{function}"
    );

    let parsed = Digest::parse(hash, size);
    let proto = reapi::Digest {
        hash: hash.to_string(),
        size_bytes: size,
    };
    let from_proto = Digest::from_proto(Some(&proto), "fuzz");
    assert_eq!(parsed.is_ok(), from_proto.is_ok(), "{hash:?}/{size}");
    let hex = digest::parse_hex_hash(hash);
    match parsed {
        Ok(d) => {
            assert_eq!(from_proto.ok(), Some(d));
            assert_eq!(hex, Some(d.hash));
            assert_eq!(d.size, size as u64);
            assert!(size >= 0);
            assert_eq!(d.hex(), hash, "a parsed hash formats back as it came");
            assert_eq!(d.to_string(), format!("{hash}/{size}"));
            assert_eq!(d.to_proto(), proto);
            assert_eq!(d.is_empty_blob(), d == Digest::empty());
        }
        // Refused only for a bad hash or a negative size.
        Err(_) => assert!(hex.is_none() || size < 0, "{hash:?}/{size}"),
    }
});
