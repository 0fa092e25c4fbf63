//! An OCI Distribution API front (`oci_listen`): container build caches (BuildKit's and
//! buildah's registry caches), skopeo and oras push and pull through it, and their blobs live
//! in the CAS with everything else.
//!
//! A repository `cache/app/main` is the namespace `<oci.namespace_prefix>/cache/app/main`: its
//! tags and manifests are one record there (`Repository`, kept through `ActionResults`, so
//! read and write grants, invalidation, TTL and pruning apply as to action results). Blobs and
//! manifests' bytes are CAS blobs; since an OCI digest has no size, the size of every blob
//! pushed through here is remembered by hash (namespace `hoard.oci-blobs`). Uploads are spooled
//! (`uploads.rs`) until their digest is known, then stored like any CAS write (verified).
//! The HTTP side is `http.rs`; manifests are read by `manifest.rs`.

mod http;
mod manifest;
mod uploads;

use std::collections::BTreeMap;
use std::sync::Arc;

use ::http::StatusCode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::Error;
use crate::namespace::ActionResults;
use crate::store::{ActionRecord, ActionStore, Cas};

pub use http::serve;

/// Where the sizes of blobs pushed through the registry are kept, by hash.
const BLOB_SIZES: &str = "hoard.oci-blobs";
/// Manifests larger than this are refused (the spec asks registries to take at least 4 MB).
pub const MAX_MANIFEST: usize = 4 << 20;
/// A repository name is at most this long (distribution's limit with the host).
const MAX_NAME: usize = 255;

/// `[oci]`: the registry front's settings (its address is `oci_listen`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OciConfig {
    /// Repository `R` is the namespace `<namespace_prefix>/R`. Default `"oci"`.
    pub namespace_prefix: String,
    /// A manifest no tag names (and no tagged index references) is dropped from its
    /// repository this long after it was last live, at the repository's next change. Default
    /// "1h"; at least "1m".
    pub untagged_grace: crate::config::HumanDuration,
}

impl Default for OciConfig {
    fn default() -> Self {
        OciConfig {
            namespace_prefix: "oci".into(),
            untagged_grace: crate::config::HumanDuration(std::time::Duration::from_secs(3600)),
        }
    }
}

impl OciConfig {
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.untagged_grace.0 < std::time::Duration::from_secs(60) {
            return Err("oci.untagged_grace must be at least 1m".into());
        }
        if self.namespace_prefix.contains('*') {
            return Err("oci.namespace_prefix must be a namespace name, not a pattern".into());
        }
        crate::instance_name::validate(&self.namespace_prefix)
            .map_err(|e| format!("oci.namespace_prefix: {e}"))
    }
}

/// A refusal in the registry's terms: an HTTP status, one of the spec's error codes, and
/// what was wrong.
#[derive(Debug)]
pub struct OciError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl OciError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        OciError {
            status,
            code,
            message: message.into(),
        }
    }

    fn name_unknown(name: &str) -> Self {
        OciError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("repository {name:?} has no tags or manifests"),
        )
    }
}

impl From<Error> for OciError {
    fn from(e: Error) -> Self {
        let (status, code) = match e.code() {
            tonic::Code::InvalidArgument => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            tonic::Code::NotFound => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            tonic::Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            tonic::Code::PermissionDenied => (StatusCode::FORBIDDEN, "DENIED"),
            tonic::Code::ResourceExhausted | tonic::Code::Unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        };
        OciError::new(status, code, e.to_string())
    }
}

pub type OciResult<T> = std::result::Result<T, OciError>;

/// Checks a repository name against the spec's grammar: lowercase components of letters and
/// digits joined by `.`, `_`, `__` or runs of `-`, separated by `/`. So no `..`, no empty
/// segment, nothing a path could be made of.
pub fn validate_name(name: &str) -> OciResult<()> {
    let invalid = |why: &str| {
        OciError::new(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            format!(
                "repository name {} is invalid: {why}",
                crate::error::echo(name)
            ),
        )
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid("it must be 1 to 255 characters"));
    }
    for component in name.split('/') {
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let bytes = component.as_bytes();
        if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(invalid(
                "each /-separated component starts and ends with a lowercase letter or digit",
            ));
        }
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if alnum(c) {
                i += 1;
                continue;
            }
            // A separator: ".", "_", "__" or a run of "-", between alphanumerics.
            let run = bytes[i..].iter().take_while(|&&b| b == c).count();
            let ok = match c {
                b'.' => run == 1,
                b'_' => run <= 2,
                b'-' => true,
                _ => false,
            };
            // After a separator, a letter or digit (not another separator: "a._b" is no name).
            if !ok || !bytes.get(i + run).is_some_and(|&b| alnum(b)) {
                return Err(invalid(
                    "components are lowercase letters and digits joined by ., _, __ or -",
                ));
            }
            i += run;
        }
    }
    Ok(())
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_tag(reference: &str) -> bool {
    let b = reference.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// `sha256:<64 lowercase hex>` → the hash; other algorithms are refused.
pub fn parse_digest(text: &str) -> OciResult<[u8; 32]> {
    let invalid = |why: &str| {
        OciError::new(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("digest {} is invalid: {why}", crate::error::echo(text)),
        )
    };
    let Some((algorithm, hex_part)) = text.split_once(':') else {
        return Err(invalid("expected sha256:<64 hex digits>"));
    };
    if algorithm != "sha256" {
        return Err(OciError::new(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            format!("digest algorithm {algorithm:?} is not supported here: only sha256"),
        ));
    }
    if hex_part.len() != 64
        || !hex_part
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(invalid("a sha256 digest is 64 lowercase hex digits"));
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut hash).map_err(|_| invalid("not hex"))?;
    Ok(hash)
}

fn digest_text(hash: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(hash))
}

/// One repository's tags and manifests, kept as one record in its namespace.
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
struct Repository {
    /// Tag → manifest digest (`sha256:...`).
    tags: BTreeMap<String, String>,
    /// Manifest digest → what it is.
    manifests: BTreeMap<String, StoredManifest>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct StoredManifest {
    media_type: String,
    size: u64,
    /// The digests and sizes it references (config, layers, or an index's entries).
    refs: Vec<(String, u64)>,
    /// When it was last pushed, tagged, or referenced by a tagged manifest (store clock).
    #[serde(default)]
    live_at: u64,
}

impl Repository {
    /// The manifests tagged, and everything they reference that is a manifest here, however
    /// deep (an index of indexes).
    fn live(&self) -> std::collections::HashSet<String> {
        let mut live: std::collections::HashSet<String> = self.tags.values().cloned().collect();
        let mut todo: Vec<String> = live.iter().cloned().collect();
        while let Some(digest) = todo.pop() {
            if let Some(m) = self.manifests.get(&digest) {
                for (r, _) in &m.refs {
                    if self.manifests.contains_key(r) && live.insert(r.clone()) {
                        todo.push(r.clone());
                    }
                }
            }
        }
        live
    }

    /// Stamps what is live now, before a change takes a tag away: a manifest untagged by this
    /// change gets its whole grace from now, not from the repository's previous change.
    fn mark_live(&mut self, now: u64) {
        for digest in self.live() {
            if let Some(m) = self.manifests.get_mut(&digest) {
                m.live_at = now;
            }
        }
    }

    /// `refs` and, for those that are manifests here, their references too, however deep.
    fn content_of(&self, refs: &[(String, u64)]) -> Vec<(String, u64)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut todo: Vec<(String, u64)> = refs.to_vec();
        while let Some((digest, size)) = todo.pop() {
            if !seen.insert(digest.clone()) {
                continue;
            }
            if let Some(m) = self.manifests.get(&digest) {
                todo.extend(m.refs.iter().cloned());
            }
            out.push((digest, size));
        }
        out
    }

    /// Drops the manifests that have not been live for `grace` seconds: neither tagged nor
    /// referenced by a tagged manifest (an index's entries). Their blobs are left to eviction:
    /// the CAS is shared, and an upload waiting for its manifest must not be lost.
    fn sweep(&mut self, now: u64, grace: u64) -> usize {
        let live = self.live();
        let before = self.manifests.len();
        self.manifests.retain(|digest, m| {
            if live.contains(digest) {
                m.live_at = now;
                true
            } else {
                now.saturating_sub(m.live_at) < grace
            }
        });
        before - self.manifests.len()
    }
}

/// The registry: the CAS for bytes, the action store (through the namespace policy) for
/// repositories.
pub struct Registry {
    cas: Arc<dyn Cas>,
    results: Arc<ActionResults>,
    /// For the blob-size records, which belong to no namespace a client can name.
    store: Arc<dyn ActionStore>,
    auth: Arc<crate::auth::Authenticator>,
    metrics: Arc<crate::metrics::Metrics>,
    prefix: String,
    untagged_grace: u64,
    uploads: uploads::Uploads,
    /// Read-modify-write of a repository record, one at a time per stripe.
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl Registry {
    pub fn new(
        config: &OciConfig,
        cas: Arc<dyn Cas>,
        results: Arc<ActionResults>,
        store: Arc<dyn ActionStore>,
        auth: Arc<crate::auth::Authenticator>,
        metrics: Arc<crate::metrics::Metrics>,
        spool: Option<std::path::PathBuf>,
    ) -> crate::error::Result<Self> {
        Ok(Registry {
            cas,
            results,
            store,
            auth,
            metrics,
            prefix: config.namespace_prefix.clone(),
            untagged_grace: config.untagged_grace.0.as_secs(),
            uploads: uploads::Uploads::new(spool)?,
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    /// Checks that repository `name`'s namespace is one a client could name (not a reserved
    /// segment like `blobs`, not too long, not under `hoard.`), so grants, invalidation and
    /// pruning can reach it.
    pub fn check_namespace(&self, name: &str) -> OciResult<()> {
        crate::instance_name::validate(&self.namespace(name)).map_err(|e| {
            OciError::new(
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                format!("repository {name:?} cannot be a namespace: {e}"),
            )
        })
    }

    /// Where writes to repository `name` may go: `write = "none"` refuses them, and a rule
    /// redirecting writes elsewhere is refused too (push to that repository instead).
    pub fn check_writable(&self, name: &str) -> OciResult<()> {
        let namespace = self.namespace(name);
        match self.results.policy().write_target(&namespace) {
            Some(target) if target == namespace => Ok(()),
            Some(target) => Err(OciError::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!(
                    "namespace {namespace:?} writes to {target:?} ([[namespaces.rule]] write): push to that repository"
                ),
            )),
            None => Err(OciError::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("namespace {namespace:?} is read-only (write = \"none\")"),
            )),
        }
    }

    /// The namespace of repository `name`.
    pub fn namespace(&self, name: &str) -> String {
        match self.prefix.as_str() {
            "" => name.to_string(),
            prefix => format!("{prefix}/{name}"),
        }
    }

    /// The repository whose namespace `namespace` is; `None` outside the prefix.
    fn repository_of<'a>(&self, namespace: &'a str) -> Option<&'a str> {
        match self.prefix.as_str() {
            "" => Some(namespace),
            prefix => namespace.strip_prefix(prefix)?.strip_prefix('/'),
        }
    }

    fn repository_key() -> Digest {
        Digest {
            hash: Sha256::digest(b"hoard.oci.repository").into(),
            size: 0,
        }
    }

    fn lock(&self, name: &str) -> &tokio::sync::Mutex<()> {
        let h = Sha256::digest(name.as_bytes());
        &self.locks[h[0] as usize % self.locks.len()]
    }

    async fn repository(&self, name: &str) -> OciResult<Option<Repository>> {
        let Some(record) = self
            .results
            .get_record(&self.namespace(name), &Self::repository_key())
            .await?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&record.result)
            .map(Some)
            .map_err(|e| {
                OciError::from(Error::internal(
                    format!("the record of repository {name:?}"),
                    e,
                ))
            })
    }

    /// Saves a repository's record after sweeping its untagged manifests.
    async fn save(&self, name: &str, repository: &mut Repository) -> OciResult<()> {
        let swept = repository.sweep(self.results.clock(), self.untagged_grace);
        if swept > 0 {
            tracing::info!(
                repository = name,
                swept,
                "untagged manifests dropped after oci.untagged_grace"
            );
        }
        let bytes = serde_json::to_vec(repository)
            .map_err(|e| Error::internal("encoding a repository record", e))?;
        self.results
            .put_record(&self.namespace(name), &Self::repository_key(), bytes.into())
            .await?;
        Ok(())
    }

    fn size_key(hash: &[u8; 32]) -> Digest {
        Digest {
            hash: *hash,
            size: 0,
        }
    }

    /// The size of a blob pushed through here, if it is still in the CAS.
    async fn blob(&self, hash: &[u8; 32]) -> OciResult<Option<Digest>> {
        if *hash == Digest::empty().hash {
            return Ok(Some(Digest::empty()));
        }
        let Some(record) = self.store.get(BLOB_SIZES, &Self::size_key(hash)).await? else {
            return Ok(None);
        };
        let size = std::str::from_utf8(&record.result)
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        let Some(size) = size else {
            return Ok(None);
        };
        let digest = Digest { hash: *hash, size };
        // FindMissingBlobs semantics: a hit counts as a use, for eviction.
        if !self.cas.find_missing(&[digest]).await?.is_empty() {
            return Ok(None);
        }
        // The record is swept ac_ttl after its last renewal: renewed on use (once a day at
        // most), it lasts as long as the blob is used.
        let now = self.results.clock();
        if now.saturating_sub(u64::from(record.last_used)) > 86_400 {
            self.remember_size(&digest).await?;
        }
        Ok(Some(digest))
    }

    async fn remember_size(&self, digest: &Digest) -> OciResult<()> {
        let record = ActionRecord {
            last_used: self.results.clock() as u32,
            epoch: 0,
            result: Bytes::from(digest.size.to_string()),
        };
        self.store
            .put(BLOB_SIZES, &Self::size_key(&digest.hash), record)
            .await?;
        Ok(())
    }
}
