//! Manifests as a PUT brings them: the media types taken (OCI image manifest and index, Docker
//! v2 schema 2 manifest and list), and the descriptors whose blobs must already be stored.
//! An index's entries are only required to be stored content, not manifests: older BuildKit
//! writes its cache as an index whose entries are layers and its cache config.

use ::http::StatusCode;
use serde::Deserialize;

use super::{OciError, OciResult};
use crate::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct Body {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
}

#[derive(Deserialize)]
struct Entries {
    #[serde(default)]
    manifests: Vec<Entry>,
}

/// Whether `media_type` is an index (its entries may be manifests).
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// The entries of an index that are manifests or indexes themselves (by their media type):
/// those must be in the same repository, to be pulled through it. Other entries (older
/// BuildKit's layers and cache config) are blobs.
pub fn child_manifests(bytes: &[u8]) -> Vec<String> {
    let Ok(entries) = serde_json::from_slice::<Entries>(bytes) else {
        return Vec::new();
    };
    entries
        .manifests
        .into_iter()
        .filter(|e| {
            matches!(
                e.media_type.as_str(),
                OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST
            )
        })
        .map(|e| e.digest)
        .collect()
}

/// The `mediaType` a manifest's body declares, if any.
pub fn declared_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Declared {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Declared>(bytes).ok()?.media_type
}

fn invalid(why: impl Into<String>) -> OciError {
    OciError::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", why)
}

/// The content a manifest of `media_type` references (config and layers, or an index's
/// entries), each of which must be stored before the manifest is taken.
pub fn references(media_type: &str, bytes: &[u8]) -> OciResult<Vec<Digest>> {
    let is_index = match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        OCI_INDEX | DOCKER_LIST => true,
        other => {
            return Err(invalid(format!(
                "manifest media type {} is not one this registry takes ({OCI_MANIFEST}, \
                 {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}); send it as Content-Type",
                crate::error::echo(other)
            )))
        }
    };
    let body: Body = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("the manifest is not valid JSON of its type: {e}")))?;
    if let Some(declared) = &body.media_type {
        if declared != media_type {
            return Err(invalid(format!(
                "the manifest's mediaType {declared:?} differs from its Content-Type {media_type:?}"
            )));
        }
    }
    let descriptors: Vec<&Descriptor> = if is_index {
        body.manifests.iter().collect()
    } else {
        let config = body
            .config
            .as_ref()
            .ok_or_else(|| invalid("an image manifest needs a config descriptor"))?;
        std::iter::once(config).chain(&body.layers).collect()
    };
    descriptors
        .into_iter()
        .map(|d| {
            let hash = super::parse_digest(&d.digest).map_err(|e| invalid(e.message))?;
            Ok(Digest { hash, size: d.size })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYER: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn image_manifests_reference_their_config_and_layers_and_indexes_their_entries() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{LAYER}","size":0}},"layers":[{{"mediaType":"y","digest":"{LAYER}","size":0}}]}}"#
        );
        assert_eq!(references(OCI_MANIFEST, m.as_bytes()).unwrap().len(), 2);
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"{LAYER}","size":0}}]}}"#
        );
        assert_eq!(references(OCI_INDEX, i.as_bytes()).unwrap().len(), 1);
        assert_eq!(
            references(OCI_MANIFEST, i.as_bytes()).unwrap_err().code,
            "MANIFEST_INVALID"
        );
        assert_eq!(
            references(DOCKER_LIST, m.as_bytes()).unwrap_err().code,
            "MANIFEST_INVALID"
        );
        assert_eq!(
            references("text/plain", b"{}").unwrap_err().code,
            "MANIFEST_INVALID"
        );
        assert_eq!(
            references(OCI_INDEX, b"{").unwrap_err().code,
            "MANIFEST_INVALID"
        );
        let bad = r#"{"manifests":[{"digest":"md5:00","size":1}]}"#;
        assert_eq!(
            references(OCI_INDEX, bad.as_bytes()).unwrap_err().code,
            "MANIFEST_INVALID"
        );
    }
}
