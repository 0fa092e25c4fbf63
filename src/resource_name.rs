//! ByteStream resource names, as REAPI defines them:
//!
//! - read:  `{instance}/blobs/{hash}/{size}` or `{instance}/compressed-blobs/{compressor}/{hash}/{size}`
//! - write: `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/{metadata}...]` (or `compressed-blobs`)
//!
//! An optional digest-function segment may follow `blobs/` (`blobs/sha256/{hash}/{size}`). The
//! instance may contain slashes; it ends at the first reserved segment, which the instance itself
//! may not contain (see [`crate::namespace`]).
//!
//! [`ResourceName`] is both directions: `parse_read`/`parse_write` read a client's name, and its
//! `Display` writes one back, so tests and tools build names from the same rules the server
//! checks instead of formatting them by hand.

use std::fmt;

use crate::digest::Digest;
use crate::error::{echo, Error, Result};
use crate::instance_name;

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

    /// The compressor's segment in a `compressed-blobs/{compressor}/...` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Identity => "identity",
            Compression::Zstd => "zstd",
            Compression::Deflate => "deflate",
            Compression::Brotli => "brotli",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed ByteStream resource name. Its `Display` gives the name back as a client spells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceName {
    pub instance: String,
    pub digest: Digest,
    /// `Identity` for a `blobs/` name; otherwise the compressor of a `compressed-blobs/` name
    /// (`compressed-blobs/identity/` is therefore formatted as `blobs/`).
    pub compression: Compression,
    /// The client's upload id; present for writes only.
    pub upload_id: Option<String>,
    /// Whether the name spelled out its digest function (`blobs/sha256/{hash}/{size}`). Only
    /// sha256 is accepted, so a flag is all there is to keep; it only matters for formatting.
    pub digest_function_segment: bool,
    /// What a write's name carries after the size (segments joined by `/`), which the server
    /// ignores; kept so the name formats back as it came.
    pub metadata: Option<String>,
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
    /// The name `ByteStream.Read` takes: `{instance}/blobs/{hash}/{size}`.
    pub fn read(instance: impl Into<String>, digest: Digest) -> Self {
        ResourceName {
            instance: instance.into(),
            digest,
            compression: Compression::Identity,
            upload_id: None,
            digest_function_segment: false,
            metadata: None,
        }
    }

    /// The name `ByteStream.Write` takes: `{instance}/uploads/{upload_id}/blobs/{hash}/{size}`.
    pub fn write(
        instance: impl Into<String>,
        upload_id: impl Into<String>,
        digest: Digest,
    ) -> Self {
        ResourceName {
            upload_id: Some(upload_id.into()),
            ..Self::read(instance, digest)
        }
    }

    /// The same name for bytes sent with `compression`: `.../compressed-blobs/zstd/{hash}/{size}`.
    pub fn compressed(self, compression: Compression) -> Self {
        ResourceName {
            compression,
            ..self
        }
    }

    /// Parses a name given to `ByteStream.Read`.
    pub fn parse_read(name: &str) -> Result<Self> {
        let segments: Vec<&str> = name.split('/').collect();
        let at = segments
            .iter()
            .position(|s| *s == "blobs" || *s == "compressed-blobs")
            .ok_or_else(|| malformed(name, "it has no 'blobs' or 'compressed-blobs' segment"))?;
        let instance = instance_of(&segments[..at], name)?;
        let blob = parse_blob_part(&segments[at..], name)?;
        if !blob.tail.is_empty() {
            return Err(malformed(name, "it has extra segments after the size"));
        }
        Ok(ResourceName {
            instance,
            digest: blob.digest,
            compression: blob.compression,
            upload_id: None,
            digest_function_segment: blob.digest_function_segment,
            metadata: None,
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
        // Anything after the size is optional client metadata, which the server ignores.
        let blob = parse_blob_part(blob, name)?;
        Ok(ResourceName {
            instance,
            digest: blob.digest,
            compression: blob.compression,
            upload_id: Some(upload_id),
            digest_function_segment: blob.digest_function_segment,
            metadata: (!blob.tail.is_empty()).then(|| blob.tail.join("/")),
        })
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.instance.is_empty() {
            write!(f, "{}/", self.instance)?;
        }
        if let Some(id) = &self.upload_id {
            write!(f, "uploads/{id}/")?;
        }
        match self.compression {
            Compression::Identity => f.write_str("blobs/")?,
            c => write!(f, "compressed-blobs/{c}/")?,
        }
        if self.digest_function_segment {
            f.write_str("sha256/")?;
        }
        write!(f, "{}", self.digest)?;
        if let Some(metadata) = &self.metadata {
            write!(f, "/{metadata}")?;
        }
        Ok(())
    }
}

fn malformed(name: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("malformed resource name {}: {why}", echo(name)))
}

fn instance_of(segments: &[&str], name: &str) -> Result<String> {
    let instance = segments.join("/");
    instance_name::validate(&instance)
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

/// What [`parse_blob_part`] found.
struct BlobPart<'a> {
    digest: Digest,
    compression: Compression,
    digest_function_segment: bool,
    /// The segments after the size.
    tail: &'a [&'a str],
}

/// Parses `blobs/[fn/]{hash}/{size}` or `compressed-blobs/{compressor}/[fn/]{hash}/{size}`.
fn parse_blob_part<'a>(segments: &'a [&'a str], name: &str) -> Result<BlobPart<'a>> {
    let (compression, mut rest) = match segments {
        ["blobs", rest @ ..] => (Compression::Identity, rest),
        ["compressed-blobs", compressor, rest @ ..] => {
            (Compression::parse(compressor, name)?, rest)
        }
        _ => return Err(malformed(name, "it does not name a blob")),
    };
    let mut digest_function_segment = false;
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
            digest_function_segment = true;
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
    Ok(BlobPart {
        digest,
        compression,
        digest_function_segment,
        tail,
    })
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

    #[test]
    fn constructors_format_as_clients_spell_names() {
        let d = Digest::parse(H, 5).unwrap();
        assert_eq!(
            ResourceName::read("", d).to_string(),
            format!("blobs/{H}/5")
        );
        assert_eq!(
            ResourceName::write("ci/main", "u-1", d)
                .compressed(Compression::Zstd)
                .to_string(),
            format!("ci/main/uploads/u-1/compressed-blobs/zstd/{H}/5")
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "[a-z0-9/._-]{0,120}") {
            let _ = ResourceName::parse_read(&s);
            let _ = ResourceName::parse_write(&s);
        }

        /// Every name the constructors can describe parses back to itself.
        #[test]
        fn parse_of_format_is_identity(name in resource_name()) {
            let text = name.to_string();
            let parsed = match name.upload_id {
                Some(_) => ResourceName::parse_write(&text),
                None => ResourceName::parse_read(&text),
            };
            proptest::prop_assert_eq!(parsed.ok(), Some(name), "{}", text);
        }

        /// A name spelled the canonical way (built here from strings, not by the formatter)
        /// formats back to the same text.
        #[test]
        fn format_of_parse_is_identity(
            instance in instance(),
            upload in proptest::option::of(upload_id()),
            compressor in proptest::sample::select(vec!["", "zstd", "deflate", "brotli"]),
            sha256 in proptest::bool::ANY,
            hash in "[0-9a-f]{64}",
            size in 0..=i64::MAX,
            metadata in proptest::option::of("[a-z0-9/._-]{0,30}"),
        ) {
            let mut text = String::new();
            if !instance.is_empty() {
                text += &format!("{instance}/");
            }
            if let Some(id) = &upload {
                text += &format!("uploads/{id}/");
            }
            text += &match compressor {
                "" => "blobs/".to_string(),
                c => format!("compressed-blobs/{c}/"),
            };
            if sha256 {
                text += "sha256/";
            }
            text += &format!("{hash}/{size}");
            let parsed = if upload.is_some() {
                if let Some(m) = &metadata {
                    text += &format!("/{m}");
                }
                ResourceName::parse_write(&text)
            } else {
                ResourceName::parse_read(&text)
            };
            proptest::prop_assert_eq!(parsed.map(|n| n.to_string()).ok(), Some(text.clone()));
        }
    }

    /// Empty, or one to three segments that `instance_name::validate` accepts.
    fn instance() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy;
        proptest::collection::vec("[a-z0-9_.-]{1,8}", 0..4)
            .prop_map(|segments| segments.join("/"))
            .prop_filter("a valid instance name", |i| {
                instance_name::validate(i).is_ok()
            })
    }

    fn upload_id() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex("[A-Za-z0-9_-]{1,128}").unwrap()
    }

    fn resource_name() -> impl proptest::strategy::Strategy<Value = ResourceName> {
        use proptest::strategy::Strategy;
        (
            instance(),
            proptest::option::of(upload_id()),
            proptest::sample::select(vec![
                Compression::Identity,
                Compression::Zstd,
                Compression::Deflate,
                Compression::Brotli,
            ]),
            proptest::bool::ANY,
            proptest::array::uniform32(proptest::num::u8::ANY),
            0..=i64::MAX as u64,
            proptest::option::of("[a-z0-9/._-]{0,30}"),
        )
            .prop_map(
                |(instance, upload, compression, sha256, hash, size, metadata)| {
                    let digest = Digest { hash, size };
                    let name = match upload {
                        // Only a write carries metadata.
                        Some(id) => ResourceName {
                            metadata,
                            ..ResourceName::write(instance, id, digest)
                        },
                        None => ResourceName::read(instance, digest),
                    };
                    ResourceName {
                        digest_function_segment: sha256,
                        ..name.compressed(compression)
                    }
                },
            )
    }
}
