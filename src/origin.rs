//! Downloads from `http(s)` origins for FetchBlob (`[asset.fetch]`, off by default): only from
//! allowed hosts (redirects included), within a size and a time limit, spooled to a file while
//! SHA-256 (and any SRI hash asked for) is computed, checked against the `checksum.sri`
//! qualifier, then stored in the CAS (whose upload verifies the digest once more).

use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::Digest as _;

use crate::client::error_chain;
use crate::config::AssetFetchConfig;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::namespace::glob_match;
use crate::store::Cas;

/// Bytes per CAS append when the spooled file is stored.
const STORE_CHUNK: usize = 1 << 20;

/// Why a download failed: the fetch error FetchBlob carries in its `status`.
#[derive(Debug)]
pub struct Failure {
    pub code: tonic::Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// One `checksum.sri` hash: `sha256-…`, `sha384-…` or `sha512-…` (base64 of the raw hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sri {
    algorithm: &'static str,
    /// Every hash given for that algorithm: the content may match any of them.
    hashes: Vec<Vec<u8>>,
}

impl Sri {
    /// The strongest supported hash of an SRI value (several may be listed, space-separated);
    /// an error if none is usable.
    pub fn parse(value: &str) -> Result<Sri> {
        let mut best: Option<Sri> = None;
        for token in value.split_whitespace() {
            // Options after '?' are allowed by the SRI grammar and carry nothing for us.
            let token = token.split('?').next().unwrap_or(token);
            let Some((algorithm, b64)) = token.split_once('-') else {
                continue;
            };
            let (algorithm, len, rank) = match algorithm {
                "sha256" => ("sha256", 32, 1),
                "sha384" => ("sha384", 48, 2),
                "sha512" => ("sha512", 64, 3),
                _ => continue,
            };
            let Ok(hash) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                continue;
            };
            if hash.len() != len {
                continue;
            }
            match &mut best {
                Some(b) if b.rank() == rank => b.hashes.push(hash),
                Some(b) if b.rank() > rank => {}
                _ => {
                    best = Some(Sri {
                        algorithm,
                        hashes: vec![hash],
                    })
                }
            }
        }
        best.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "checksum.sri {:?} has no sha256, sha384 or sha512 hash this server can check",
                value.chars().take(100).collect::<String>()
            ))
        })
    }

    fn rank(&self) -> u8 {
        match self.algorithm {
            "sha256" => 1,
            "sha384" => 2,
            _ => 3,
        }
    }

    /// The blob's SHA-256 if this is a sha256 SRI with one hash.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        match self.hashes.as_slice() {
            [only] if self.algorithm == "sha256" => only.as_slice().try_into().ok(),
            _ => None,
        }
    }
}

/// Hashes a download as it arrives: SHA-256 for the CAS, and the SRI's own algorithm.
struct Hashes {
    sha256: sha2::Sha256,
    sri: Option<Box<dyn sha2::digest::DynDigest + Send>>,
}

impl Hashes {
    fn new(sri: Option<&Sri>) -> Self {
        let sri: Option<Box<dyn sha2::digest::DynDigest + Send>> = match sri.map(|s| s.algorithm) {
            Some("sha384") => Some(Box::new(sha2::Sha384::new())),
            Some("sha512") => Some(Box::new(sha2::Sha512::new())),
            _ => None,
        };
        Hashes {
            sha256: sha2::Sha256::new(),
            sri,
        }
    }

    fn update(&mut self, data: &[u8]) {
        self.sha256.update(data);
        if let Some(h) = &mut self.sri {
            h.update(data);
        }
    }
}

/// The downloader: an HTTP client, the allow-list and the limits.
pub struct Origin {
    client: reqwest::Client,
    allowed: Vec<String>,
    max_size: u64,
    timeout: Duration,
    /// Where downloads are spooled.
    spool: PathBuf,
}

/// Whether `host` is one of `allowed` (exact names or `*` globs, case-insensitive).
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    allowed
        .iter()
        .any(|pattern| glob_match(&pattern.to_ascii_lowercase(), &host))
}

impl Origin {
    /// `None` when fetching is off.
    pub fn new(config: &AssetFetchConfig, spool: PathBuf) -> Result<Option<Origin>> {
        if !config.enabled {
            return Ok(None);
        }
        // reqwest is built without a crypto provider of its own: ring, as for the server.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let allowed = config.allowed_hosts.clone();
        let for_redirects = allowed.clone();
        let client = reqwest::Client::builder()
            .user_agent(concat!("hoard/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // A redirect may only lead to another allowed host.
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let downgrade = attempt.url().scheme() == "http"
                    && attempt.previous().iter().any(|u| u.scheme() == "https");
                let ok = !downgrade
                    && matches!(attempt.url().scheme(), "http" | "https")
                    && attempt
                        .url()
                        .host_str()
                        .is_some_and(|h| host_allowed(&for_redirects, h));
                if ok && attempt.previous().len() < 10 {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }))
            .build()
            .map_err(|e| Error::internal("building the HTTP client for [asset.fetch]", e))?;
        Ok(Some(Origin {
            client,
            allowed,
            max_size: config.max_size.0,
            timeout: config.timeout.0,
            spool,
        }))
    }

    /// Whether `uri` is one this server would download: http(s) on an allowed host.
    pub fn check_uri(&self, uri: &str) -> std::result::Result<(), Failure> {
        let url = reqwest::Url::parse(uri).map_err(|e| {
            Failure::new(
                tonic::Code::InvalidArgument,
                format!("{uri:?} is not a URL: {e}"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Failure::new(
                tonic::Code::NotFound,
                format!("{uri:?} is not an http(s) URL; only those are fetched from origin"),
            ));
        }
        match url.host_str() {
            Some(h) if host_allowed(&self.allowed, h) => Ok(()),
            Some(h) => Err(Failure::new(
                tonic::Code::PermissionDenied,
                format!("host {h:?} is not in asset.fetch.allowed_hosts"),
            )),
            None => Err(Failure::new(
                tonic::Code::InvalidArgument,
                format!("{uri:?} has no host"),
            )),
        }
    }

    /// When a fetch that starts now must end: the request's `timeout` if shorter than the
    /// configured one.
    pub fn deadline(&self, timeout: Option<Duration>) -> Instant {
        let timeout = timeout.map_or(self.timeout, |t| t.min(self.timeout));
        let now = Instant::now();
        // A timeout too large for the clock means none worth counting: a day.
        now.checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(86_400))
    }

    /// Downloads `uri` (with `headers`) into `cas` before `deadline`, checking `sri` if given;
    /// the blob's digest.
    pub async fn download(
        &self,
        cas: &dyn Cas,
        uri: &str,
        headers: &[(String, String)],
        sri: Option<&Sri>,
        deadline: Instant,
    ) -> std::result::Result<Digest, Failure> {
        self.check_uri(uri)?;
        let within = |what: &str| {
            let what = what.to_string();
            move |_| {
                Failure::new(
                    tonic::Code::DeadlineExceeded,
                    format!("{what} {uri:?} did not finish within the fetch's timeout"),
                )
            }
        };
        let mut request = self.client.get(uri);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let mut response = tokio::time::timeout_at(deadline.into(), request.send())
            .await
            .map_err(within("fetching"))?
            .map_err(|e| {
                Failure::new(
                    tonic::Code::Unavailable,
                    format!("fetching {uri:?}: {}", error_chain(&e)),
                )
            })?;
        let status = response.status();
        if !status.is_success() {
            let code = match status.as_u16() {
                404 | 410 => tonic::Code::NotFound,
                401 | 403 => tonic::Code::PermissionDenied,
                300..=399 => tonic::Code::PermissionDenied,
                429 => tonic::Code::ResourceExhausted,
                _ => tonic::Code::Unavailable,
            };
            let why = if status.is_redirection() {
                " (a redirect to a host not in asset.fetch.allowed_hosts, or too many)"
            } else {
                ""
            };
            return Err(Failure::new(
                code,
                format!("{uri:?} answered HTTP {status}{why}"),
            ));
        }
        if response.content_length().is_some_and(|n| n > self.max_size) {
            return Err(self.too_large(uri));
        }
        let mut file = tempfile::tempfile_in(&self.spool).map_err(|e| {
            Failure::new(
                tonic::Code::Internal,
                format!("spooling a download in {}: {e}", self.spool.display()),
            )
        })?;
        let mut hashes = Hashes::new(sri);
        let mut size = 0u64;
        loop {
            let chunk = tokio::time::timeout_at(deadline.into(), response.chunk())
                .await
                .map_err(within("downloading"))?
                .map_err(|e| {
                    Failure::new(
                        tonic::Code::Unavailable,
                        format!("downloading {uri:?}: {}", error_chain(&e)),
                    )
                })?;
            let Some(chunk) = chunk else { break };
            size += chunk.len() as u64;
            if size > self.max_size {
                return Err(self.too_large(uri));
            }
            hashes.update(&chunk);
            file.write_all(&chunk).map_err(|e| {
                Failure::new(tonic::Code::Internal, format!("spooling {uri:?}: {e}"))
            })?;
        }
        let digest = Digest {
            hash: hashes.sha256.finalize().into(),
            size,
        };
        if let Some(sri) = sri {
            let got: Vec<u8> = match hashes.sri {
                Some(h) => h.finalize().to_vec(),
                None => digest.hash.to_vec(),
            };
            if !sri.hashes.contains(&got) {
                let b64 = base64::engine::general_purpose::STANDARD;
                let wanted: Vec<String> = sri
                    .hashes
                    .iter()
                    .map(|h| format!("{}-{}", sri.algorithm, b64.encode(h)))
                    .collect();
                return Err(Failure::new(
                    tonic::Code::Aborted,
                    format!(
                        "checksum mismatch for {uri:?}: checksum.sri wants {}, the download is {}-{}",
                        wanted.join(" or "),
                        sri.algorithm,
                        b64.encode(&got)
                    ),
                ));
            }
        }
        store(cas, &digest, file)
            .await
            .map_err(|e| Failure::new(e.code(), format!("storing {uri:?}: {e}")))?;
        Ok(digest)
    }

    fn too_large(&self, uri: &str) -> Failure {
        Failure::new(
            tonic::Code::ResourceExhausted,
            format!(
                "{uri:?} is larger than asset.fetch.max_size ({} bytes)",
                self.max_size
            ),
        )
    }
}

/// Stores the spooled `file` in the CAS as `digest`.
async fn store(cas: &dyn Cas, digest: &Digest, mut file: std::fs::File) -> Result<()> {
    if digest.is_empty_blob() || cas.find_missing(&[*digest]).await?.is_empty() {
        return Ok(());
    }
    file.rewind()
        .map_err(|e| Error::internal("rewinding a spooled download", e))?;
    let id = format!("origin-{}", uuid::Uuid::new_v4());
    let mut upload = cas.begin_upload(&id, digest, 0).await?;
    loop {
        let (f, chunk) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; STORE_CHUNK];
            let n = file.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((file, buf))
        })
        .await
        .map_err(|e| Error::internal("reading a spooled download", e))?
        .map_err(|e| Error::internal("reading a spooled download", e))?;
        file = f;
        if chunk.is_empty() {
            break;
        }
        upload.append(bytes::Bytes::from(chunk)).await?;
    }
    upload.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sri_takes_the_strongest_usable_hash() {
        let sha256 = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let sha512 = base64::engine::general_purpose::STANDARD.encode([2u8; 64]);
        let s = Sri::parse(&format!("sha256-{sha256}")).unwrap();
        assert_eq!(s.sha256(), Some([1u8; 32]));
        let s = Sri::parse(&format!("md5-abc sha256-{sha256} sha512-{sha512}")).unwrap();
        assert_eq!(s.algorithm, "sha512");
        assert!(Sri::parse("md5-abc").is_err());
        assert!(Sri::parse("sha256-tooshort").is_err());
    }

    #[test]
    fn hosts_match_exactly_or_by_glob() {
        let allowed = vec!["github.com".to_string(), "*.example.org".to_string()];
        assert!(host_allowed(&allowed, "GitHub.com"));
        assert!(host_allowed(&allowed, "mirror.example.org"));
        assert!(!host_allowed(&allowed, "example.org.evil.com"));
        assert!(!host_allowed(&allowed, "gitlab.com"));
    }
}
