//! ByteStream resource names, as REAPI defines them:
//!
//! - read:  `{instance}/blobs/{hash}/{size}` or `{instance}/compressed-blobs/{compressor}/{hash}/{size}`
//! - write: `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/{metadata}...]` (or `compressed-blobs`)
//!
//! An optional digest-function segment may follow `blobs/` (`blobs/sha256/{hash}/{size}`). The
//! instance may contain slashes; it ends at the first reserved segment, which the instance itself
//! may not contain (see [`crate::namespace`]).

use crate::digest::Digest;
use crate::error::{echo, Error, Result};
use crate::namespace;

/// How the bytes of a ByteStream transfer are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Identity,
    Zstd,
    Deflate,
    Brotli,
}

impl Compression {
    fn parse(s: &str, whole: &str) -> Result<Self> {
        Ok(match s {
            "identity" => Compression::Identity,
            "zstd" => Compression::Zstd,
            "deflate" => Compression::Deflate,
            "brotli" => Compression::Brotli,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "resource name {} names an unknown compressor {}",
                    echo(whole),
                    echo(s)
                )))
            }
        })
    }
}

/// A parsed ByteStream resource name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceName {
    pub instance: String,
    pub digest: Digest,
    pub compression: Compression,
    /// The client's upload id; present for writes only.
    pub upload_id: Option<String>,
}

/// Digest-function names that may appear after `blobs/`. Only sha256 is served; the others are
/// recognised so the error can say so instead of "malformed".
const DIGEST_FUNCTION_SEGMENTS: &[&str] = &[
    "sha256",
    "sha1",
    "md5",
    "vso",
    "sha384",
    "sha512",
    "murmur3",
    "sha256tree",
    "blake3",
];

impl ResourceName {
    /// Parses a name given to `ByteStream.Read`.
    pub fn parse_read(name: &str) -> Result<Self> {
        let segments: Vec<&str> = name.split('/').collect();
        let at = segments
            .iter()
            .position(|s| *s == "blobs" || *s == "compressed-blobs")
            .ok_or_else(|| malformed(name, "it has no 'blobs' or 'compressed-blobs' segment"))?;
        let instance = instance_of(&segments[..at], name)?;
        let (digest, compression, rest) = parse_blob_part(&segments[at..], name)?;
        if !rest.is_empty() {
            return Err(malformed(name, "it has extra segments after the size"));
        }
        Ok(ResourceName {
            instance,
            digest,
            compression,
            upload_id: None,
        })
    }

    /// Parses a name given to `ByteStream.Write` or `QueryWriteStatus`.
    pub fn parse_write(name: &str) -> Result<Self> {
        let segments: Vec<&str> = name.split('/').collect();
        let at = segments
            .iter()
            .position(|s| *s == "uploads")
            .ok_or_else(|| malformed(name, "it has no 'uploads' segment"))?;
        let instance = instance_of(&segments[..at], name)?;
        let upload_id = match segments.get(at + 1) {
            Some(id) if valid_upload_id(id) => id.to_string(),
            Some(id) => {
                return Err(malformed(
                    name,
                    &format!(
                        "upload id {} must be 1 to 128 characters of [A-Za-z0-9_-]",
                        echo(id)
                    ),
                ))
            }
            None => return Err(malformed(name, "it ends after 'uploads'")),
        };
        let blob = &segments[at + 2..];
        match blob.first() {
            Some(&"blobs") | Some(&"compressed-blobs") => {}
            _ => {
                return Err(malformed(
                    name,
                    "'uploads/{uuid}/' must be followed by 'blobs' or 'compressed-blobs'",
                ))
            }
        }
        // Anything after the size is optional client metadata, which we ignore.
        let (digest, compression, _metadata) = parse_blob_part(blob, name)?;
        Ok(ResourceName {
            instance,
            digest,
            compression,
            upload_id: Some(upload_id),
        })
    }
}

fn malformed(name: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("malformed resource name {}: {why}", echo(name)))
}

fn instance_of(segments: &[&str], name: &str) -> Result<String> {
    let instance = segments.join("/");
    namespace::validate(&instance)
        .map_err(|e| Error::InvalidArgument(format!("resource name {}: {e}", echo(name))))?;
    Ok(instance)
}

fn valid_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses `blobs/[fn/]{hash}/{size}` or `compressed-blobs/{compressor}/[fn/]{hash}/{size}` and
/// returns the segments after the size.
fn parse_blob_part<'a>(
    segments: &'a [&'a str],
    name: &str,
) -> Result<(Digest, Compression, &'a [&'a str])> {
    let (compression, mut rest) = match segments {
        ["blobs", rest @ ..] => (Compression::Identity, rest),
        ["compressed-blobs", compressor, rest @ ..] => {
            (Compression::parse(compressor, name)?, rest)
        }
        _ => return Err(malformed(name, "it does not name a blob")),
    };
    if let Some(first) = rest.first() {
        if DIGEST_FUNCTION_SEGMENTS.contains(first) {
            if *first != "sha256" {
                return Err(Error::InvalidArgument(format!(
                    "resource name {} uses digest function {}; this server supports sha256",
                    echo(name),
                    echo(first)
                )));
            }
            rest = &rest[1..];
        }
    }
    let [hash, size, tail @ ..] = rest else {
        return Err(malformed(
            name,
            "expected '{hash}/{size}' after the blob kind",
        ));
    };
    let size: i64 = size
        .parse()
        .map_err(|_| malformed(name, &format!("size {} is not a number", echo(size))))?;
    let digest = Digest::parse(hash, size)
        .map_err(|e| Error::InvalidArgument(format!("resource name {}: {e}", echo(name))))?;
    Ok((digest, compression, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_reads() {
        let r = ResourceName::parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.instance, "");
        assert_eq!(r.digest.size, 0);
        let r = ResourceName::parse_read(&format!("ci/main/blobs/{H}/5")).unwrap();
        assert_eq!(r.instance, "ci/main");
        let r = ResourceName::parse_read(&format!("x/compressed-blobs/zstd/{H}/5")).unwrap();
        assert_eq!(r.compression, Compression::Zstd);
        let r = ResourceName::parse_read(&format!("x/blobs/sha256/{H}/5")).unwrap();
        assert_eq!(r.digest.size, 5);
    }

    #[test]
    fn parses_writes_with_metadata() {
        let r = ResourceName::parse_write(&format!("ci/b/uploads/abc-123/blobs/{H}/7/some/meta"))
            .unwrap();
        assert_eq!(r.instance, "ci/b");
        assert_eq!(r.upload_id.as_deref(), Some("abc-123"));
        assert_eq!(r.digest.size, 7);
    }

    #[test]
    fn rejects_malformed() {
        for n in [
            "".to_string(),
            format!("blobs/{H}"),
            format!("blobs/{H}/x"),
            format!("blobs/{H}/-1"),
            format!("blobs/{H}/1/extra"),
            format!("blobs/blake3/{H}/1"),
            format!("../blobs/{H}/1"),
            format!("compressed-blobs/lz4/{H}/1"),
            "blobs/abc/1".to_string(),
        ] {
            assert!(ResourceName::parse_read(&n).is_err(), "{n}");
        }
        for n in [
            format!("uploads/blobs/{H}/1"),
            format!("uploads/a.b/blobs/{H}/1"),
            format!("uploads/id/{H}/1"),
            format!("blobs/{H}/1"),
        ] {
            assert!(ResourceName::parse_write(&n).is_err(), "{n}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "[a-z0-9/._-]{0,120}") {
            let _ = ResourceName::parse_read(&s);
            let _ = ResourceName::parse_write(&s);
        }
    }
}
