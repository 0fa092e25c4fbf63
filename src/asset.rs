//! Remote Assets (`build.bazel.remote.asset.v1`): URIs plus qualifiers → a blob or a
//! Directory tree in the CAS, kept per namespace like action results.
//!
//! A pushed asset becomes one record per URI, kept through [`ActionResults`] under a key no
//! action digest can take ([`key`]: a hash of kind, URI and sorted qualifiers, with a size
//! above any an `int64` can carry). So read chains, write targets, epochs (invalidation), the
//! TTL since last use and pruning apply to assets exactly as to action results. The record
//! (`hoard.store.v1.StoredAsset`) lists everything the asset needs in the CAS, flattened: the
//! content, every Directory and file of its trees, and the references. A push is refused while
//! any of that is missing; a fetch checks it all again (never a dangling digest) and keeps it
//! from eviction for as long as the asset lives ([`Cas::retain`]).

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::digest::{Digest, HASH_LEN};
use crate::error::{Error, Result};
use crate::namespace::ActionResults;
use crate::origin::{Failure, Origin, Sri};
use crate::proto::reapi;
use crate::proto::records::{StoredAsset, StoredQualifier};
use crate::store::Cas;

/// At most this many URIs per request.
pub const MAX_URIS: usize = 1000;
/// At most this many qualifiers per request.
pub const MAX_QUALIFIERS: usize = 100;
/// Longest URI, qualifier name or qualifier value, in bytes.
pub const MAX_STRING: usize = 8 << 10;
/// At most this many digests an asset may need in the CAS (its content, every blob and
/// Directory of its trees, and its references, together).
pub const MAX_CONTENT: usize = 1 << 20;
/// At most this many bytes of records one push writes (its URIs × its content list).
const MAX_PUSH_BYTES: u64 = 256 << 20;

/// What an asset names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A blob (PushBlob, FetchBlob).
    Blob,
    /// The root Directory of a tree (PushDirectory, FetchDirectory).
    Directory,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::Blob => b'b',
            Kind::Directory => b'd',
        }
    }
}

/// A request's qualifiers, checked (names unique and non-empty, sizes bounded) and sorted by
/// name: order never matters, the whole set does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qualifiers(Vec<(String, String)>);

impl Qualifiers {
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut pairs: Vec<(String, String)> = pairs.into_iter().collect();
        if pairs.len() > MAX_QUALIFIERS {
            return Err(Error::InvalidArgument(format!(
                "{} qualifiers; this server accepts at most {MAX_QUALIFIERS}",
                pairs.len()
            )));
        }
        for (name, value) in &pairs {
            if name.is_empty() {
                return Err(Error::InvalidArgument(
                    "a qualifier has an empty name".into(),
                ));
            }
            if name.len() > MAX_STRING || value.len() > MAX_STRING {
                return Err(Error::InvalidArgument(format!(
                    "qualifier {:?}: names and values may be at most {MAX_STRING} bytes",
                    truncated(name)
                )));
            }
        }
        pairs.sort();
        if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::InvalidArgument(format!(
                "qualifier {:?} is given twice; qualifier names must be unique",
                w[0].0
            )));
        }
        Ok(Qualifiers(pairs))
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// The qualifiers that say *what* the asset is: all but `http_header:*` and
    /// `http_header_url:*`, which say how to download it (credentials, often): those are
    /// neither part of the key nor stored, so a rotated token still hits and no secret is kept.
    pub fn identity(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter().filter(|(name, _)| {
            !name.starts_with("http_header:") && !name.starts_with("http_header_url:")
        })
    }

    /// The value of the qualifier called `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Checks a request's URIs: at least one, each non-empty and bounded.
pub fn check_uris(uris: &[String]) -> Result<()> {
    if uris.is_empty() {
        return Err(Error::InvalidArgument(
            "uris is empty; at least one URI is required".into(),
        ));
    }
    if uris.len() > MAX_URIS {
        return Err(Error::InvalidArgument(format!(
            "{} URIs; this server accepts at most {MAX_URIS}",
            uris.len()
        )));
    }
    for uri in uris {
        if uri.is_empty() {
            return Err(Error::InvalidArgument("a URI is empty".into()));
        }
        if uri.len() > MAX_STRING {
            return Err(Error::InvalidArgument(format!(
                "URI {:?} is {} bytes; at most {MAX_STRING} are accepted",
                truncated(uri),
                uri.len()
            )));
        }
    }
    Ok(())
}

/// The first 64 characters of a client's string, for messages.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The record key of one URI of an asset: SHA-256 over the kind, the URI and the sorted
/// qualifiers, each length-prefixed (so no two inputs share an encoding), with size `u64::MAX`.
/// Action digests come from clients as `int64` sizes, so none can ever equal an asset key.
pub fn key(kind: Kind, uri: &str, qualifiers: &Qualifiers) -> Digest {
    let mut h = Sha256::new();
    h.update(b"hoard.asset.v1");
    h.update([kind.tag()]);
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(uri.as_bytes());
    for (name, value) in qualifiers.identity() {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    Digest {
        hash: h.finalize().into(),
        size: u64::MAX,
    }
}

/// One push, checked by the service.
pub struct Push<'a> {
    pub kind: Kind,
    /// The blob, or the root Directory.
    pub digest: Digest,
    pub uris: &'a [String],
    pub qualifiers: Qualifiers,
    /// Unix seconds; `None`: until the namespace's TTL since last use ends it.
    pub expire_at: Option<u64>,
    pub references_blobs: Vec<Digest>,
    pub references_directories: Vec<Digest>,
    /// Who pushes, through which instance name.
    pub writer: &'a str,
    pub instance: &'a str,
}

/// An asset found by a fetch.
#[derive(Debug)]
pub struct Found {
    pub uri: String,
    pub namespace: String,
    pub digest: Digest,
    pub qualifiers: Vec<(String, String)>,
    /// Unix seconds until which the content is kept (and the asset served, unless invalidated).
    pub expires_at: u64,
}

/// Pushes and fetches over the CAS and the namespace policy.
pub struct Assets {
    cas: Arc<dyn Cas>,
    results: Arc<ActionResults>,
    /// Largest Directory blob read while walking a tree (the message size limit).
    max_directory: u64,
    /// `asset.max_hold` in seconds.
    max_hold: u64,
    /// Downloads on a FetchBlob miss, if `[asset.fetch]` is enabled.
    origin: Option<Origin>,
}

/// The qualifiers a fetch from origin understands (Bazel's remote downloader sends these).
const ORIGIN_QUALIFIERS: &str = "checksum.sri, bazel.canonical_id, http_header:NAME, \
                                 http_header_url:INDEX:NAME";

/// A fetch from origin, checked: its SRI and per-URI request headers.
pub struct OriginRequest {
    sri: Option<Sri>,
    /// `http_header:NAME` (every URI) and `http_header_url:INDEX:NAME` (one URI).
    headers: Vec<(Option<usize>, String, String)>,
}

impl OriginRequest {
    /// Refuses qualifiers a download could not honour, naming them (INVALID_ARGUMENT).
    pub fn new(qualifiers: &Qualifiers) -> Result<Self> {
        let mut headers = Vec::new();
        let mut unsupported = Vec::new();
        for (name, value) in qualifiers.pairs() {
            if name == "checksum.sri" || name == "bazel.canonical_id" {
                continue;
            }
            if let Some(header) = name.strip_prefix("http_header:") {
                check_header(name, header, value)?;
                headers.push((None, header.to_string(), value.clone()));
            } else if let Some((index, header)) = name
                .strip_prefix("http_header_url:")
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(i, h)| Some((i.parse::<usize>().ok()?, h)))
            {
                check_header(name, header, value)?;
                headers.push((Some(index), header.to_string(), value.clone()));
            } else {
                unsupported.push(format!("\"{name}\" not supported"));
            }
        }
        if !unsupported.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "qualifiers.name: {} for fetching from origin (supported: {ORIGIN_QUALIFIERS})",
                unsupported.join(", ")
            )));
        }
        let sri = qualifiers.get("checksum.sri").map(Sri::parse).transpose()?;
        Ok(OriginRequest { sri, headers })
    }

    fn headers_for(&self, index: usize) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(i, _, _)| i.is_none_or(|i| i == index))
            .map(|(_, n, v)| (n.clone(), v.clone()))
            .collect()
    }
}

/// A header a download may send: a valid name and value, and not one that would change where
/// or how the request goes (`Host` could pick another site behind an allowed address).
fn check_header(qualifier: &str, name: &str, value: &str) -> Result<()> {
    let parsed = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        Error::InvalidArgument(format!(
            "qualifier {qualifier:?}: {name:?} is not a header name"
        ))
    })?;
    http::HeaderValue::from_str(value).map_err(|_| {
        Error::InvalidArgument(format!(
            "qualifier {qualifier:?}: the value is not a header value"
        ))
    })?;
    const REFUSED: [&str; 6] = [
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "upgrade",
    ];
    if REFUSED.contains(&parsed.as_str()) {
        return Err(Error::InvalidArgument(format!(
            "qualifier {qualifier:?}: the {name} header is set by the server, not by clients"
        )));
    }
    Ok(())
}

impl Assets {
    pub fn new(
        cas: Arc<dyn Cas>,
        results: Arc<ActionResults>,
        max_directory: u64,
        max_hold: std::time::Duration,
        origin: Option<Origin>,
    ) -> Self {
        Assets {
            cas,
            results,
            max_directory,
            max_hold: max_hold.as_secs(),
            origin,
        }
    }

    /// Whether FetchBlob misses are fetched from origin.
    pub fn fetches_from_origin(&self) -> bool {
        self.origin.is_some()
    }

    /// Whether `uri` would be fetched from origin (http(s), an allowed host).
    pub fn may_fetch(&self, uri: &str) -> bool {
        self.origin
            .as_ref()
            .is_some_and(|o| o.check_uri(uri).is_ok())
    }

    /// Downloads the first of `uris` that works into the CAS and records it as an asset of
    /// `namespace` (under that URI and `qualifiers`); on failure, the last URI's failure.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_from_origin(
        &self,
        namespace: &str,
        instance: &str,
        writer: &str,
        uris: &[String],
        qualifiers: &Qualifiers,
        request: &OriginRequest,
        timeout: Option<std::time::Duration>,
    ) -> Result<std::result::Result<Found, (String, Failure)>> {
        let Some(origin) = &self.origin else {
            return Err(Error::internal(
                "fetching from origin",
                "[asset.fetch] is off",
            ));
        };
        let mut failure = None;
        // One deadline for the whole call, however many URIs it tries.
        let deadline = origin.deadline(timeout);
        for (i, uri) in uris.iter().enumerate() {
            let headers = request.headers_for(i);
            match origin
                .download(
                    self.cas.as_ref(),
                    uri,
                    &headers,
                    request.sri.as_ref(),
                    deadline,
                )
                .await
            {
                Ok(digest) => {
                    self.push(
                        namespace,
                        Push {
                            kind: Kind::Blob,
                            digest,
                            uris: std::slice::from_ref(uri),
                            qualifiers: qualifiers.clone(),
                            expire_at: None,
                            references_blobs: Vec::new(),
                            references_directories: Vec::new(),
                            writer,
                            instance,
                        },
                    )
                    .await?;
                    return Ok(Ok(Found {
                        uri: uri.clone(),
                        namespace: namespace.to_string(),
                        digest,
                        qualifiers: qualifiers.identity().cloned().collect(),
                        expires_at: self.retain_until(namespace, 0),
                    }));
                }
                Err(f) => {
                    tracing::info!(uri = %uri, code = ?f.code, message = %f.message, "fetch from origin failed");
                    failure = Some((uri.clone(), f));
                }
            }
        }
        Ok(Err(failure.unwrap_or_else(|| {
            (
                String::new(),
                Failure {
                    code: tonic::Code::NotFound,
                    message: "no URI".into(),
                },
            )
        })))
    }

    pub fn results(&self) -> &ActionResults {
        &self.results
    }

    /// Until when an asset of `namespace` stored or used now keeps its content: its
    /// `expire_at`, but no later than the namespace's TTL since last use from now, nor than
    /// `asset.max_hold` from now.
    fn retain_until(&self, namespace: &str, expire_at: u64) -> u64 {
        let now = self.results.clock();
        let ttl = self.results.policy().ac_ttl(namespace).as_secs();
        let hold = match ttl {
            0 => self.max_hold,
            ttl => ttl.min(self.max_hold),
        };
        let by_ttl = now.saturating_add(hold);
        match expire_at {
            0 => by_ttl,
            at => at.min(by_ttl),
        }
    }

    /// Records `push` under every URI in `namespace` (the write target, checked by the
    /// caller). FAILED_PRECONDITION, naming them, if content or references are not all in the
    /// CAS; nothing is recorded then.
    pub async fn push(&self, namespace: &str, push: Push<'_>) -> Result<()> {
        let mut content = Content::default();
        content.add(push.digest)?;
        let mut missing = Vec::new();
        if push.kind == Kind::Directory {
            self.walk(push.digest, &mut content, &mut missing).await?;
        }
        for d in &push.references_blobs {
            content.add(*d)?;
        }
        for d in &push.references_directories {
            content.add(*d)?;
            self.walk(*d, &mut content, &mut missing).await?;
        }
        // Checked before anything is held, so a refused push holds nothing (a use "now" is
        // what any lookup records).
        let now = self.results.clock();
        missing.extend(self.cas.retain(&content.digests, now).await?);
        if !missing.is_empty() {
            missing.sort_unstable();
            missing.dedup();
            return Err(Error::FailedPrecondition(missing_message(&missing)));
        }
        // Every URI's record carries the whole content list: bound what one push can write.
        let record_bytes = content.digests.len() as u64 * (HASH_LEN as u64 + 5);
        if record_bytes.saturating_mul(push.uris.len() as u64) > MAX_PUSH_BYTES {
            return Err(Error::InvalidArgument(format!(
                "{} URIs × {} blobs and directories is more than this server records per push; \
                 push large trees under fewer URIs",
                push.uris.len(),
                content.digests.len()
            )));
        }
        let until = self.retain_until(namespace, push.expire_at.unwrap_or(0));
        let gone = self.cas.retain(&content.digests, until).await?;
        if !gone.is_empty() {
            // Evicted between the check and the hold (both are lookups): say so, as above.
            return Err(Error::FailedPrecondition(missing_message(&gone)));
        }
        let stored = StoredAsset {
            directory: push.kind == Kind::Directory,
            hash: Bytes::copy_from_slice(&push.digest.hash),
            size: push.digest.size,
            qualifiers: push
                .qualifiers
                .identity()
                .map(|(name, value)| StoredQualifier {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            expire_at_unix_secs: push.expire_at.unwrap_or(0),
            stored_at_unix_secs: self.results.clock(),
            writer: push.writer.to_string(),
            instance_name: push.instance.to_string(),
            content: encode_content(&content.digests),
        };
        let bytes = Bytes::from(stored.encode_to_vec());
        for uri in push.uris {
            let key = key(push.kind, uri, &push.qualifiers);
            self.results
                .put_record(namespace, &key, bytes.clone())
                .await?;
        }
        Ok(())
    }

    /// Adds every Directory and file below `root` (which `content` holds already) to
    /// `content`; Directories that are not stored go to `missing` (their subtrees cannot be
    /// known).
    async fn walk(
        &self,
        root: Digest,
        content: &mut Content,
        missing: &mut Vec<Digest>,
    ) -> Result<()> {
        // Directories walked, apart from `content`: a Directory also listed as a file or a
        // reference must still be walked.
        let mut walked = HashSet::from([root]);
        let mut queue = vec![root];
        while let Some(d) = queue.pop() {
            if d.size > self.max_directory {
                return Err(Error::InvalidArgument(format!(
                    "directory {d} is larger than the {} bytes a message may carry",
                    self.max_directory
                )));
            }
            let Some(bytes) = self.cas.get(&d).await? else {
                missing.push(d);
                continue;
            };
            let dir = reapi::Directory::decode(bytes.as_ref()).map_err(|e| {
                Error::FailedPrecondition(format!("blob {d} in the tree is not a Directory: {e}"))
            })?;
            for f in &dir.files {
                content.add(Digest::from_proto(f.digest.as_ref(), "file node digest")?)?;
            }
            for child in &dir.directories {
                let c = Digest::from_proto(child.digest.as_ref(), "directory node digest")?;
                content.add(c)?;
                if walked.insert(c) {
                    queue.push(c);
                }
            }
        }
        Ok(())
    }

    /// The asset under any of `uris` with exactly `qualifiers`, in the first namespace of
    /// `instance`'s read chain that `readable` accepts and that has a live one: not expired,
    /// stored no earlier than `oldest` (Unix seconds), all of its content still in the CAS
    /// (which is then kept for as long as the asset lives). A record found dead is removed.
    pub async fn fetch(
        &self,
        kind: Kind,
        instance: &str,
        uris: &[String],
        qualifiers: &Qualifiers,
        oldest: Option<u64>,
        readable: impl Fn(&str) -> bool,
    ) -> Result<Option<Found>> {
        let keys: Vec<(&String, Digest)> = uris
            .iter()
            .map(|uri| (uri, key(kind, uri, qualifiers)))
            .collect();
        for namespace in self.results.policy().read_chain(instance) {
            if !readable(namespace) {
                continue;
            }
            for (uri, key) in &keys {
                let Some(record) = self.results.get_record(namespace, key).await? else {
                    continue;
                };
                let stored = match StoredAsset::decode(record.result.clone()) {
                    Ok(s) if s.directory == (kind == Kind::Directory) => s,
                    _ => {
                        tracing::warn!(namespace, uri = %uri, "an asset record does not decode; removed");
                        self.results.drop_record(namespace, key, &record).await?;
                        continue;
                    }
                };
                let now = self.results.clock();
                if stored.expire_at_unix_secs != 0 && stored.expire_at_unix_secs <= now {
                    self.results.drop_record(namespace, key, &record).await?;
                    continue;
                }
                if oldest.is_some_and(|oldest| stored.stored_at_unix_secs < oldest) {
                    continue;
                }
                let Some(content) = decode_content(&stored.content) else {
                    self.results.drop_record(namespace, key, &record).await?;
                    continue;
                };
                let until = self.retain_until(namespace, stored.expire_at_unix_secs);
                let missing = self.cas.retain(&content, until).await?;
                if !missing.is_empty() {
                    // Evicted content: never answer with a dangling digest. The asset cannot
                    // come back without a new push, which writes a new record.
                    tracing::info!(namespace, uri = %uri, missing = missing.len(), "asset content was evicted; the asset is dropped");
                    self.results.drop_record(namespace, key, &record).await?;
                    continue;
                }
                let Ok(hash) = <[u8; HASH_LEN]>::try_from(stored.hash.as_ref()) else {
                    self.results.drop_record(namespace, key, &record).await?;
                    continue;
                };
                return Ok(Some(Found {
                    uri: uri.to_string(),
                    namespace: namespace.to_string(),
                    digest: Digest {
                        hash,
                        size: stored.size,
                    },
                    qualifiers: stored
                        .qualifiers
                        .into_iter()
                        .map(|q| (q.name, q.value))
                        .collect(),
                    expires_at: until,
                }));
            }
        }
        Ok(None)
    }
}

/// The digests an asset needs, each once, bounded by [`MAX_CONTENT`].
#[derive(Default)]
struct Content {
    digests: Vec<Digest>,
    seen: HashSet<Digest>,
}

impl Content {
    /// Adds `d`; false if it was there already.
    fn add(&mut self, d: Digest) -> Result<bool> {
        if !self.seen.insert(d) {
            return Ok(false);
        }
        if self.digests.len() >= MAX_CONTENT {
            return Err(Error::InvalidArgument(format!(
                "the asset needs more than {MAX_CONTENT} blobs and directories in the CAS; this \
                 server records assets of at most that many"
            )));
        }
        self.digests.push(d);
        Ok(true)
    }
}

/// "N blobs are missing from the CAS: a/1, b/2, ..." (at most 20 named).
fn missing_message(missing: &[Digest]) -> String {
    let named: Vec<String> = missing.iter().take(20).map(|d| d.to_string()).collect();
    let more = if missing.len() > named.len() {
        format!(" and {} more", missing.len() - named.len())
    } else {
        String::new()
    };
    format!(
        "{} of the asset's blobs and directories are not in the CAS: {}{more}; upload them \
         before pushing the asset",
        missing.len(),
        named.join(", ")
    )
}

/// Digests as hash ‖ varint size, one after another.
fn encode_content(digests: &[Digest]) -> Bytes {
    let mut out = Vec::with_capacity(digests.len() * (HASH_LEN + 3));
    for d in digests {
        out.extend_from_slice(&d.hash);
        prost::encoding::encode_varint(d.size, &mut out);
    }
    Bytes::from(out)
}

/// The inverse of [`encode_content`]; `None` if the bytes are damaged.
fn decode_content(mut bytes: &[u8]) -> Option<Vec<Digest>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let hash: [u8; HASH_LEN] = bytes.get(..HASH_LEN)?.try_into().ok()?;
        bytes = &bytes[HASH_LEN..];
        let size = prost::encoding::decode_varint(&mut bytes).ok()?;
        out.push(Digest { hash, size });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Qualifiers {
        Qualifiers::new(pairs.iter().map(|(n, v)| (n.to_string(), v.to_string()))).unwrap()
    }

    #[test]
    fn keys_ignore_qualifier_order_and_separate_everything_else() {
        let a = key(Kind::Blob, "u", &q(&[("x", "1"), ("y", "2")]));
        assert_eq!(a, key(Kind::Blob, "u", &q(&[("y", "2"), ("x", "1")])));
        assert_ne!(a, key(Kind::Directory, "u", &q(&[("x", "1"), ("y", "2")])));
        assert_ne!(a, key(Kind::Blob, "u", &q(&[("x", "1")])));
        assert_ne!(a, key(Kind::Blob, "v", &q(&[("x", "1"), ("y", "2")])));
        // Length prefixes: moving bytes between fields changes the key.
        assert_ne!(
            key(Kind::Blob, "ab", &q(&[("c", "")])),
            key(Kind::Blob, "a", &q(&[("bc", "")]))
        );
        assert_eq!(a.size, u64::MAX);
    }

    #[test]
    fn qualifier_names_must_be_unique_and_present() {
        let dup = Qualifiers::new([("a".into(), "1".into()), ("a".into(), "2".into())]);
        assert!(dup.unwrap_err().to_string().contains("twice"));
        assert!(Qualifiers::new([(String::new(), "1".into())]).is_err());
        assert!(check_uris(&[]).is_err());
        assert!(check_uris(&[String::new()]).is_err());
        assert!(check_uris(&["https://x".into()]).is_ok());
    }

    #[test]
    fn content_round_trips() {
        let digests = vec![Digest::of(b"a"), Digest::of(&[7u8; 300]), Digest::of(b"")];
        assert_eq!(decode_content(&encode_content(&digests)), Some(digests));
        assert_eq!(decode_content(&[1, 2, 3]), None);
    }
}
