//! Configuration: one TOML file, every field optional with a documented default.
//!
//! Precedence, lowest first: built-in defaults, the file, environment variables, command-line
//! flags (the last two are applied by `main.rs`). Unknown fields are rejected so that a typo is an
//! error rather than a silently ignored setting. `deploy/hoard.toml` documents every field.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC port. Default `127.0.0.1:9092`.
    pub listen: SocketAddr,
    /// Where sled and blob files live. Default `./hoard-data`.
    pub data_dir: PathBuf,
    /// On shutdown, how long to keep serving after health turns NOT_SERVING, so load balancers
    /// stop routing here before new calls are refused. Default 0s (no balancer in front).
    pub drain_delay: HumanDuration,
    /// Address of the plaintext operations port: `grpc.health.v1` (for Kubernetes gRPC
    /// probes, which cannot speak TLS), `GET /healthz`, `GET /readyz` and `GET /metrics`. It
    /// serves no cache data. Default: off.
    pub ops_listen: Option<SocketAddr>,
    /// `text` (default) or `json`: how log lines on stderr look. Each line logged while a call
    /// runs carries the call's `request_id`.
    pub log_format: LogFormat,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub namespaces: NamespacesConfig,
    pub watch: WatchConfig,
    /// The Remote Asset API (`[asset]`).
    pub asset: AssetConfig,
    pub telemetry: TelemetryConfig,
    /// TLS on the gRPC port (`[tls]`); without it the port speaks plaintext HTTP/2.
    pub tls: Option<TlsConfig>,
    /// Access control (`[auth]`: tokens, client certificates, grants); see `auth.rs`.
    /// Without it every caller may do everything, as on a trusted network.
    pub auth: Option<crate::auth::AuthConfig>,
    /// A central cache (hoard or any REAPI server) this one is a regional replica of
    /// (`[upstream]`, `src/upstream/`): misses and writes go there, hits are served here, and
    /// its watch events are relayed to this server's watchers.
    pub upstream: Option<UpstreamConfig>,
    /// VCS webhooks (`[hooks]`, `src/hooks/`): pushes and ref deletions from GitHub, GitLab or
    /// `hoard hook git`, mapped by `[[hooks.rule]]` to invalidations and prunes.
    pub hooks: crate::hooks::HooksConfig,
    /// Address of the OCI Distribution API front (`src/oci/`): container build caches,
    /// skopeo and oras push and pull there, blobs in the CAS. Default: off.
    pub oci_listen: Option<SocketAddr>,
    /// `[oci]`: how repositories map to namespaces.
    pub oci: crate::oci::OciConfig,
}

/// `[upstream]`: the cache this server is a replica of. The local store (`storage.backend`
/// `"sled"` or `"memory"`) holds what was read or written through here.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS).
    pub endpoint: String,
    /// Prepended (with a `/`) to the instance name of every call forwarded upstream, so a
    /// region's instances can live under their own names there. CAS calls go upstream under
    /// the prefix itself (content is the same under every name). Default: none.
    #[serde(default)]
    pub instance_prefix: String,
    /// A file holding the bearer token this server presents upstream (its own identity; a
    /// client's token is never forwarded). Read at start. Default: none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// For `grpcs://`: PEM CA certificates to trust instead of the system's roots.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// For an upstream that requires client certificates: PEM certificate and key.
    #[serde(default)]
    pub tls_client_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_client_key: Option<PathBuf>,
    /// Acknowledge a blob once the local store holds it durably, and upload it upstream from
    /// a queue that survives restarts (its depth is `hoard_write_behind_queue`). Needs
    /// `storage.backend = "sled"`. Default false: a write is acknowledged once the upstream
    /// holds it.
    #[serde(default)]
    pub write_behind: bool,
    /// While the upstream's watch stream is down, local copies of action results are served
    /// for at most this long after it was last known current; then lookups go upstream (and
    /// fail with UNAVAILABLE if it cannot answer). Default 30s.
    #[serde(default = "default_ac_max_staleness")]
    pub ac_max_staleness: HumanDuration,
    /// Deadline of each unary call to the upstream; a streamed transfer may take longer but
    /// must make progress within it. Default 10s.
    #[serde(default = "default_upstream_timeout")]
    pub timeout: HumanDuration,
}

fn default_ac_max_staleness() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_upstream_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl UpstreamConfig {
    fn check(&self, backend: Backend) -> Result<(), String> {
        crate::client::endpoint_uri(&self.endpoint)
            .map_err(|e| format!("upstream.endpoint: {e}"))?;
        if !matches!(backend, Backend::Sled | Backend::Memory) {
            return Err(
                "[upstream] needs storage.backend = \"sled\" or \"memory\" (the local copy); a \
                 bucket backend is already shared by every node"
                    .into(),
            );
        }
        if self.write_behind && backend != Backend::Sled {
            return Err(
                "upstream.write_behind needs storage.backend = \"sled\": the queue of \
                        blobs not yet upstream must survive a restart"
                    .into(),
            );
        }
        let prefix = self.instance_prefix.trim_matches('/');
        if !prefix.is_empty() {
            crate::instance_name::validate(prefix)
                .map_err(|e| format!("upstream.instance_prefix: {e}"))?;
        }
        if self.ac_max_staleness.0 < Duration::from_secs(1) {
            return Err("upstream.ac_max_staleness must be at least 1s".into());
        }
        if self.timeout.0 < Duration::from_secs(1) {
            return Err("upstream.timeout must be at least 1s".into());
        }
        Ok(())
    }
}

/// TLS on the gRPC port. The ops port stays plaintext (Kubernetes probes cannot do TLS).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain the server presents, leaf first.
    pub cert: PathBuf,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates. When set, every client must present
    /// a certificate they sign (mTLS), and its subject's common name can be given grants.
    pub client_ca: Option<PathBuf>,
}

/// Metrics and traces (`[telemetry]`). Metrics are always served as Prometheus text at the ops
/// port's `GET /metrics`; with `otlp_endpoint` they are also pushed over OTLP/gRPC, with a span
/// per call.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Whether metrics are recorded and `/metrics` serves them. Default true; false records
    /// nothing (`/metrics` then answers 404 saying so), for measuring what metrics cost.
    pub metrics: bool,
    /// How many distinct instance names get their own `namespace` label value on the AC and
    /// CAS lookup metrics; later ones are counted as `other`, so a client inventing names
    /// cannot grow the series without bound. Default 50.
    pub max_namespace_labels: usize,
    /// An OpenTelemetry collector's OTLP/gRPC address (`http://collector:4317`, or `https://`
    /// for TLS with the system's roots). When set, metrics are pushed there every
    /// `otlp_interval` and a span per call is exported. Default: off.
    pub otlp_endpoint: Option<String>,
    /// How often metrics are pushed to `otlp_endpoint`. Default 10s.
    pub otlp_interval: HumanDuration,
    /// The share of calls traced when the client did not decide (a W3C `traceparent` from the
    /// client is followed: sampled there, sampled here). 0 to 1; default 1 (every call). At tens
    /// of thousands of calls a second, a lower ratio keeps the collector's load down.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            metrics: true,
            max_namespace_labels: 50,
            otlp_endpoint: None,
            otlp_interval: HumanDuration(Duration::from_secs(10)),
            trace_sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    fn check(&self) -> Result<(), String> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|e| format!("telemetry.otlp_endpoint {endpoint:?} is not a URL: {e}"))?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
            if !scheme_ok || uri.host().is_none() {
                return Err(format!(
                    "telemetry.otlp_endpoint {endpoint:?} must be http://host:port or \
                     https://host:port (an OTLP/gRPC collector, usually port 4317)"
                ));
            }
        }
        if self.otlp_interval.0 < Duration::from_secs(1) {
            return Err("telemetry.otlp_interval must be at least 1s".into());
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(format!(
                "telemetry.trace_sample_ratio ({}) must be between 0 and 1",
                self.trace_sample_ratio
            ));
        }
        Ok(())
    }
}

/// How log lines are written to stderr (`log_format`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?} is neither \"text\" nor \"json\"")),
        }
    }
}

/// The Remote Asset API (`[asset]`): pushed assets are always served; fetching from origin is
/// opt-in.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AssetConfig {
    /// The longest an asset's content is kept from eviction after its push or last fetch,
    /// whatever its `expire_at` and the namespace's `ac_ttl` (also with `ac_ttl = "0s"`): a
    /// pushed reference can never hold space for ever. Default 30d.
    pub max_hold: HumanDuration,
    pub fetch: AssetFetchConfig,
}

impl Default for AssetConfig {
    fn default() -> Self {
        AssetConfig {
            max_hold: HumanDuration(Duration::from_secs(30 * 86_400)),
            fetch: AssetFetchConfig::default(),
        }
    }
}

/// Fetching `http(s)` URIs from origin on a FetchBlob miss (`[asset.fetch]`), for Bazel's
/// `--experimental_remote_downloader`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AssetFetchConfig {
    /// Off by default: when on, this server downloads what clients name (within
    /// `allowed_hosts`).
    pub enabled: bool,
    /// Hosts downloads may come from: exact names or `*` globs (`"*.github.com"`), matched
    /// against the URI's host. Required when `enabled`.
    pub allowed_hosts: Vec<String>,
    /// Largest download; larger ones are abandoned (RESOURCE_EXHAUSTED). Default 1 GiB.
    pub max_size: ByteSize,
    /// Longest a download may take when the request sets no shorter `timeout`. Default 5m.
    pub timeout: HumanDuration,
}

impl Default for AssetFetchConfig {
    fn default() -> Self {
        AssetFetchConfig {
            enabled: false,
            allowed_hosts: Vec::new(),
            max_size: ByteSize(1 << 30),
            timeout: HumanDuration(Duration::from_secs(300)),
        }
    }
}

impl AssetFetchConfig {
    fn check(&self) -> Result<(), String> {
        if self.enabled && self.allowed_hosts.is_empty() {
            return Err(
                "asset.fetch.enabled needs asset.fetch.allowed_hosts: the hosts this \
                        server may download from (e.g. [\"github.com\", \"*.example.org\"])"
                    .into(),
            );
        }
        if self.allowed_hosts.iter().any(|h| h.is_empty()) {
            return Err("asset.fetch.allowed_hosts has an empty entry".into());
        }
        if self.timeout.0 < Duration::from_secs(1) {
            return Err("asset.fetch.timeout must be at least 1s".into());
        }
        Ok(())
    }
}

/// The watch stream's event log.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// Events kept for watchers that reconnect with `start_after`; older ones are deleted, and
    /// a watcher asking for them is told to resync. Default 100000.
    pub retained_events: u64,
    /// A watcher this many events behind the newest is cut off (it may resume from its last
    /// sequence), so a stalled reader never holds anything back. Default 10000.
    pub max_lag: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            retained_events: 100_000,
            max_lag: 10_000,
        }
    }
}

/// How blobs are laid out on disk.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where blobs and action results live: `"sled"` (the default: durable, in `data_dir`),
    /// `"memory"` (everything in RAM, bounded by `max_size` and gone at exit: for ephemeral CI
    /// runners and tests) or `"s3"` (an S3-compatible bucket, `[storage.s3]`, that any number
    /// of hoard nodes may share), or `"tiered"` (that bucket with a local fast tier in front,
    /// `[storage.tiered]`).
    pub backend: Backend,
    /// The bucket of `backend = "s3"` and `"tiered"`.
    pub s3: S3Config,
    /// The fast tier of `backend = "tiered"`.
    pub tiered: TieredConfig,
    /// Blobs up to this size are appended to segment files; larger ones are files of their
    /// own. Default 64 KiB.
    pub inline_threshold: ByteSize,
    /// Memory sled may use for its page cache. Default 32 MiB: sled holds index entries, last
    /// uses and action results only (small blobs are in segment files, and their reads find
    /// them through the in-memory index), and its use runs well above this figure.
    pub sled_cache_capacity: ByteSize,
    /// Small blobs are appended to segment files; one is sealed (and later compacted or
    /// deleted whole) at this size. Default 64 MiB.
    pub segment_size: ByteSize,
    /// Partial uploads untouched for this long are deleted. Default 24h: long enough for a
    /// client to come back and resume, short enough that abandoned bytes do not pile up.
    pub abandoned_upload_age: HumanDuration,
    /// Bound on stored bytes (blobs, files rounded up to 4 KiB blocks, plus action results).
    /// Default 0: 90% of what the data dir's filesystem can hold at start-up (free space plus
    /// what hoard already stores), so an unconfigured server never fills its disk; with the
    /// memory backend, 1 GiB.
    pub max_size: ByteSize,
    /// Eviction starts when stored bytes pass this percentage of `max_size`... Default 95.
    pub high_watermark: u8,
    /// ...and stops when they are back under this one. Default 90.
    pub low_watermark: u8,
    /// A blob used (written, read, found by FindMissingBlobs, or referenced by a served action
    /// result) within this period is never evicted. Default 3h, Bazel's
    /// `--experimental_remote_cache_ttl`: a build that skipped downloading an output can still
    /// fetch it that long afterwards. If the cache cannot keep the promise, writes are refused.
    pub min_retention: HumanDuration,
}

/// The storage backend (`storage.backend`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sled,
    Memory,
    S3,
    Tiered,
}

/// `[storage.tiered]`: the local fast tier in front of the bucket of `backend = "tiered"`.
/// The fast tier is bounded by `storage.max_size` (with its watermarks and `min_retention`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TieredConfig {
    /// `"sled"` (in `data_dir`, survives restarts; the default) or `"memory"`.
    pub fast: FastTier,
    /// Acknowledge a blob once the fast tier holds it, and upload it to the bucket in the
    /// background from a queue that survives restarts. Needs `fast = "sled"`. Default false:
    /// a write is acknowledged once the bucket holds it.
    pub write_behind: bool,
}

impl Default for TieredConfig {
    fn default() -> Self {
        TieredConfig {
            fast: FastTier::Sled,
            write_behind: false,
        }
    }
}

/// The fast tier's backend (`storage.tiered.fast`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FastTier {
    Sled,
    Memory,
}

/// Which object store `[storage.s3]` names (`storage.s3.provider`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// AWS S3 and S3-compatible servers (MinIO, Ceph, Garage...).
    #[default]
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage (`bucket` is the container).
    Azure,
}

/// `[storage.s3]`: the bucket of the object-store backend. With the S3 provider, credentials
/// come from `credentials_file` if set, otherwise from the standard AWS chain
/// (`AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, web identity, ECS or EC2 instance
/// metadata); GCS and Azure read theirs from their own variables or `options`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// `"s3"` (the default), `"gcs"` or `"azure"`.
    pub provider: Provider,
    /// The bucket (required with `backend = "s3"`; it must exist); Azure's container.
    pub bucket: String,
    /// Settings handed to the provider's client as they are, by the `object_store` crate's
    /// key names (`google_service_account`, `azure_storage_account_name`,
    /// `aws_server_side_encryption`...): what the fields here do not cover. Default none.
    pub options: std::collections::BTreeMap<String, String>,
    /// Keys are under this prefix, so several caches (or other data) can share a bucket.
    /// Default none.
    pub prefix: String,
    /// Where the provider's API is: a self-hosted S3-compatible server (MinIO, Ceph,
    /// Garage...), e.g. `"https://s3.internal:9000"`; Azure's account URL; an emulator's base
    /// URL for GCS. Default: the provider's (for AWS, from `region`).
    pub endpoint: Option<String>,
    /// Default `"us-east-1"` (or `AWS_REGION` / `AWS_DEFAULT_REGION` when set).
    pub region: Option<String>,
    /// Address the bucket as `endpoint/bucket/key` instead of `bucket.endpoint/key`; most
    /// self-hosted servers need it. Default true when `endpoint` is set, false for AWS.
    pub path_style: Option<bool>,
    /// Allow an `http://` endpoint (no TLS). Default false.
    pub allow_http: bool,
    /// An AWS shared-credentials file (`[default]` with `aws_access_key_id`,
    /// `aws_secret_access_key`, optionally `aws_session_token`). Default: the standard chain.
    pub credentials_file: Option<PathBuf>,
    /// The profile of `credentials_file` to read. Default `"default"`.
    pub profile: String,
    /// How long the bucket may keep a request waiting for its answer or for the next bytes of
    /// a body before the request is retried (then the call fails with UNAVAILABLE). A long
    /// download that keeps moving is never cut off. Default 30s.
    pub request_timeout: HumanDuration,
    /// Retries of a failed request (5xx, timeouts, connection errors), with exponential
    /// backoff from 100 ms, all within `retry_timeout`. Default 3.
    pub max_retries: usize,
    /// Longest time spent retrying one request. Default 10s.
    pub retry_timeout: HumanDuration,
    /// Blobs this node has seen in the bucket are remembered (positive answers only, never
    /// "missing"), so FindMissingBlobs asks the bucket only about the rest. At most this many
    /// are remembered. Default 1000000 (~150–250 MiB at that count); 0 turns the cache off.
    pub existence_cache_entries: usize,
    /// ...each for at most this long: a blob deleted from the bucket behind hoard's back (a
    /// lifecycle rule, by hand) is still claimed by a node that saw it within this period.
    /// Default 10m.
    pub existence_cache_age: HumanDuration,
    /// How often a node re-reads the namespace records, so an invalidation made through
    /// another node is honoured here within this time, and reads the watch events other nodes
    /// recorded. Default 2s (at least 100ms).
    pub epoch_refresh: HumanDuration,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            provider: Provider::S3,
            bucket: String::new(),
            options: Default::default(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: None,
            allow_http: false,
            credentials_file: None,
            profile: "default".into(),
            request_timeout: HumanDuration(Duration::from_secs(30)),
            max_retries: 3,
            retry_timeout: HumanDuration(Duration::from_secs(10)),
            existence_cache_entries: 1_000_000,
            existence_cache_age: HumanDuration(Duration::from_secs(600)),
            epoch_refresh: HumanDuration(Duration::from_secs(2)),
        }
    }
}

impl S3Config {
    /// A key of `options`: one the provider's client knows, and not one a field here sets (or
    /// that would break what hoard relies on), which would override it unchecked.
    fn check_option(&self, key: &str) -> Result<(), String> {
        use object_store::aws::AmazonS3ConfigKey as S3;
        use object_store::azure::AzureConfigKey as Az;
        use object_store::gcp::GoogleConfigKey as Gcs;
        use object_store::ClientConfigKey as Client;
        let client = |c: &Client| match c {
            Client::AllowHttp => Some("storage.s3.allow_http"),
            Client::ConnectTimeout | Client::ReadTimeout | Client::Timeout => {
                Some("storage.s3.request_timeout")
            }
            _ => None,
        };
        let (known, field) = match self.provider {
            Provider::S3 => match S3::from_str(key) {
                Ok(S3::Bucket) => (true, Some("storage.s3.bucket")),
                Ok(S3::Endpoint | S3::S3Endpoint) => (true, Some("storage.s3.endpoint")),
                Ok(S3::Region | S3::DefaultRegion) => (true, Some("storage.s3.region")),
                Ok(S3::VirtualHostedStyleRequest) => (true, Some("storage.s3.path_style")),
                Ok(S3::ConditionalPut) => (true, Some("nothing: hoard needs conditional writes")),
                Ok(S3::Client(c)) => (true, client(&c)),
                Ok(_) => (true, None),
                Err(_) => (false, None),
            },
            Provider::Gcs => match Gcs::from_str(key) {
                Ok(Gcs::Bucket) => (true, Some("storage.s3.bucket")),
                Ok(Gcs::BaseUrl) => (true, Some("storage.s3.endpoint")),
                Ok(Gcs::Client(c)) => (true, client(&c)),
                Ok(_) => (true, None),
                Err(_) => (false, None),
            },
            Provider::Azure => match Az::from_str(key) {
                Ok(Az::ContainerName) => (true, Some("storage.s3.bucket")),
                Ok(Az::Endpoint) => (true, Some("storage.s3.endpoint")),
                // The emulator flag makes the client ignore the endpoint.
                Ok(Az::UseEmulator) if self.endpoint.is_some() => {
                    (true, Some("storage.s3.endpoint (leave one of the two out)"))
                }
                Ok(Az::Client(c)) => (true, client(&c)),
                Ok(_) => (true, None),
                Err(_) => (false, None),
            },
        };
        if !known {
            return Err(format!(
                "storage.s3.options: {key:?} is not a setting of the {:?} client (see the \
                 object_store crate's {} for the names)",
                self.provider,
                match self.provider {
                    Provider::S3 => "AmazonS3ConfigKey",
                    Provider::Gcs => "GoogleConfigKey",
                    Provider::Azure => "AzureConfigKey",
                }
            ));
        }
        match field {
            Some(field) => Err(format!(
                "storage.s3.options: {key:?} is set by {field}, not here (hoard checks and \
                 relies on that setting)"
            )),
            None => Ok(()),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.bucket.is_empty() {
            return Err("storage.backend = \"s3\" (and \"tiered\") needs storage.s3.bucket".into());
        }
        if self.prefix.starts_with('/') || self.prefix.contains("//") {
            return Err(format!(
                "storage.s3.prefix ({:?}) must not start with '/' or contain '//'",
                self.prefix
            ));
        }
        if self.provider != Provider::S3 {
            let s3_only = [
                ("region", self.region.is_some()),
                ("path_style", self.path_style.is_some()),
                ("credentials_file", self.credentials_file.is_some()),
            ];
            if let Some((name, _)) = s3_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "storage.s3.{name} is for provider = \"s3\" only; give {:?} its settings in \
                     storage.s3.options",
                    self.provider
                ));
            }
        }
        for key in self.options.keys() {
            self.check_option(key)?;
        }
        if let Some(endpoint) = &self.endpoint {
            let plain = endpoint.starts_with("http://");
            if !plain && !endpoint.starts_with("https://") {
                return Err(format!(
                    "storage.s3.endpoint ({endpoint}) must start with https:// or http://"
                ));
            }
            if plain && !self.allow_http {
                return Err(format!(
                    "storage.s3.endpoint ({endpoint}) is plain http: set storage.s3.allow_http = \
                     true to send credentials and data without TLS"
                ));
            }
        }
        if self.request_timeout.0 < Duration::from_secs(1) {
            return Err("storage.s3.request_timeout must be at least 1s".into());
        }
        if self.epoch_refresh.0 < Duration::from_millis(100) {
            return Err("storage.s3.epoch_refresh must be at least 100ms".into());
        }
        Ok(())
    }
}

/// Policy per instance name (namespace). The first rule whose pattern matches wins; names no
/// rule matches get `default`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NamespacesConfig {
    pub default: NamespacePolicy,
    #[serde(rename = "rule")]
    pub rules: Vec<NamespaceRule>,
    /// Namespaces unused this long are dropped with their action results, by a background
    /// task (the scheduled form of `hoard prune-namespaces`): stale branch caches go by
    /// themselves. Default "0s": never. At least "1m" when set.
    pub prune_idle_after: HumanDuration,
    /// Patterns (`*` as in rules) of namespaces `prune_idle_after` never drops, e.g.
    /// `["ci/main", "release/*"]`. Default none.
    pub protected: Vec<String>,
}

impl Default for HumanDuration {
    fn default() -> Self {
        HumanDuration(Duration::ZERO)
    }
}

/// Settings of the namespaces no rule matches.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NamespacePolicy {
    /// Action results unused for this long are dropped. Default 30d; "0s" keeps them until
    /// their outputs are evicted.
    pub ac_ttl: HumanDuration,
    /// Namespaces whose action results are also served, in this order, after the instance's
    /// own. Default none.
    pub read: Vec<String>,
    /// Where UpdateActionResult stores: `"self"` (the instance itself, the default), `"none"`
    /// (read-only: updates get PERMISSION_DENIED and Capabilities says so), or a namespace name.
    pub write: String,
}

impl Default for NamespacePolicy {
    fn default() -> Self {
        NamespacePolicy {
            ac_ttl: HumanDuration(Duration::from_secs(30 * 86_400)),
            read: Vec::new(),
            write: "self".into(),
        }
    }
}

/// A `[[namespaces.rule]]`: a pattern over instance names and its policy.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceRule {
    /// An instance name, where `*` matches any run of characters (including `/`):
    /// `"ci/branches/*"`, `"dev-*"`, `""` (the empty instance name).
    pub pattern: String,
    /// Defaults to `namespaces.default.ac_ttl`.
    pub ac_ttl: Option<HumanDuration>,
    /// Defaults to `namespaces.default.read`.
    pub read: Option<Vec<String>>,
    /// Defaults to `namespaces.default.write`.
    pub write: Option<String>,
}

impl NamespacesConfig {
    /// Checks the names and patterns of the rules against `instance_name.rs`, so a look-alike
    /// (`ci/ma\u{456}n`) is refused at start-up rather than silently matching nothing.
    fn check(&self) -> Result<(), String> {
        for r in &self.rules {
            crate::instance_name::validate_pattern(&r.pattern)
                .map_err(|e| format!("namespaces.rule: {e}"))?;
        }
        for p in &self.protected {
            crate::instance_name::validate_pattern(p)
                .map_err(|e| format!("namespaces.protected {p:?}: {e}"))?;
        }
        let idle = self.prune_idle_after.0;
        if !idle.is_zero() && idle < Duration::from_secs(60) {
            return Err("namespaces.prune_idle_after must be 0s (off) or at least 1m".into());
        }
        let policies = std::iter::once((
            "namespaces.default".to_string(),
            Some(&self.default.read),
            Some(&self.default.write),
        ))
        .chain(self.rules.iter().map(|r| {
            (
                format!("namespaces.rule {:?}", r.pattern),
                r.read.as_ref(),
                r.write.as_ref(),
            )
        }));
        for (what, read, write) in policies {
            for name in read.into_iter().flatten() {
                crate::instance_name::validate(name)
                    .map_err(|e| format!("{what}: read entry {name:?}: {e}"))?;
            }
            if let Some(w) = write {
                if w != "self" && w != "none" {
                    crate::instance_name::validate(w)
                        .map_err(|e| format!("{what}: write {w:?}: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

/// Limits announced to clients and enforced on them.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest total blob size of one BatchUpdateBlobs / BatchReadBlobs, announced in
    /// Capabilities. Default 3 MiB: comfortably below the 4 MiB gRPC message limit that clients use.
    pub max_batch_total_size: ByteSize,
    /// Largest gRPC message the server decodes or encodes. Default 16 MiB, above the batch limit
    /// so an oversized batch gets our clear INVALID_ARGUMENT rather than a transport error.
    pub max_message_size: ByteSize,
    /// Size of the chunks a ByteStream Read sends. Default 1 MiB: fewer, larger messages cost
    /// less CPU per byte, and stay well below the 4 MiB message limit of clients.
    pub read_chunk_size: ByteSize,
    /// Largest blob accepted, announced in Capabilities as `max_cas_blob_size_bytes`.
    /// Default 0: no limit.
    pub max_blob_size: ByteSize,
    /// A ByteStream Write that receives nothing for this long (from its first message on) is
    /// ended with ABORTED (its bytes stay resumable). Also the window over which
    /// `min_transfer_rate` is judged, and how long a Read may wait for its client. Default 60s.
    pub write_idle_timeout: HumanDuration,
    /// A transfer (ByteStream Write or Read) slower than this many bytes per second over a
    /// whole `write_idle_timeout` window is ended with ABORTED, so a client trickling a byte at
    /// a time cannot hold a transfer slot for ever. Default 1KiB (per second).
    pub min_transfer_rate: ByteSize,
    /// HTTP/2 streams (concurrent calls) one connection may have open; announced to clients
    /// in SETTINGS_MAX_CONCURRENT_STREAMS. Default 256, above the 100 calls per connection
    /// Bazel multiplexes.
    pub max_concurrent_streams: u32,
    /// A connection that has not sent the HTTP/2 preface this long after connecting is
    /// closed. Default 10s.
    pub handshake_timeout: HumanDuration,
    /// Calls the whole server works on at once, over every connection; beyond it a call is
    /// answered RESOURCE_EXHAUSTED "server overloaded" at once (clients back off and retry)
    /// instead of queueing without bound. Health checks are never refused. Default 256 per
    /// core, at least 1024.
    pub max_concurrent_requests: u32,
    /// Largest request metadata (the headers: names, values and 32 bytes each, as HTTP/2
    /// counts them) a call may carry; a larger one is refused with RESOURCE_EXHAUSTED before
    /// anything else is looked at. Default 16KiB.
    pub max_metadata_size: ByteSize,
}

/// The default for `limits.max_concurrent_requests`: sized for the machine.
fn default_max_concurrent_requests() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    cores.saturating_mul(256).max(1024)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            data_dir: PathBuf::from("./hoard-data"),
            drain_delay: HumanDuration(Duration::ZERO),
            ops_listen: None,
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            namespaces: NamespacesConfig::default(),
            watch: WatchConfig::default(),
            asset: AssetConfig::default(),
            telemetry: TelemetryConfig::default(),
            log_format: LogFormat::default(),
            tls: None,
            auth: None,
            upstream: None,
            hooks: Default::default(),
            oci_listen: None,
            oci: Default::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Sled,
            s3: S3Config::default(),
            tiered: TieredConfig::default(),
            inline_threshold: ByteSize(64 << 10),
            sled_cache_capacity: ByteSize(32 << 20),
            segment_size: ByteSize(crate::store::segments::DEFAULT_SEGMENT_SIZE),
            abandoned_upload_age: HumanDuration(Duration::from_secs(24 * 3600)),
            max_size: ByteSize(0),
            high_watermark: 95,
            low_watermark: 90,
            min_retention: HumanDuration(Duration::from_secs(3 * 3600)),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_batch_total_size: ByteSize(3 << 20),
            max_message_size: ByteSize(16 << 20),
            read_chunk_size: ByteSize(1 << 20),
            max_blob_size: ByteSize(0),
            write_idle_timeout: HumanDuration(Duration::from_secs(60)),
            min_transfer_rate: ByteSize(1 << 10),
            max_concurrent_streams: 256,
            handshake_timeout: HumanDuration(Duration::from_secs(10)),
            max_concurrent_requests: default_max_concurrent_requests(),
            max_metadata_size: ByteSize(16 << 10),
        }
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses config text and checks that its values make sense together.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's own rendering spans several lines; a one-line message suits logs and CLIs.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            // toml's message may span lines itself ("invalid string\nexpected ..."): one line.
            let message = e
                .message()
                .trim()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(", ");
            match line {
                Some(n) => format!("line {n}: {message}"),
                None => message,
            }
        })?;
        config.check()?;
        Ok(config)
    }

    /// Rejects combinations that would break clients.
    pub fn check(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.max_batch_total_size.0 == 0 {
            return Err("limits.max_batch_total_size must be above 0".into());
        }
        if l.max_message_size.0 <= l.max_batch_total_size.0 {
            return Err(format!(
                "limits.max_message_size ({}) must be larger than limits.max_batch_total_size ({})",
                l.max_message_size, l.max_batch_total_size
            ));
        }
        if l.max_concurrent_requests == 0 {
            return Err("limits.max_concurrent_requests must be above 0".into());
        }
        if self.ops_listen.is_some() && self.ops_listen == Some(self.listen) {
            return Err(format!(
                "ops_listen ({}) must differ from listen: the ops port serves no cache data",
                self.listen
            ));
        }
        if l.read_chunk_size.0 == 0 || l.read_chunk_size.0 > 2 << 20 {
            return Err("limits.read_chunk_size must be between 1 byte and 2 MiB".into());
        }
        if self.storage.inline_threshold > l.max_batch_total_size {
            return Err(format!(
                "storage.inline_threshold ({}) must not exceed limits.max_batch_total_size ({}): \
                 small uploads are buffered in memory whole",
                self.storage.inline_threshold, l.max_batch_total_size
            ));
        }
        let seg = self.storage.segment_size.0;
        if !(1 << 20..=1 << 30).contains(&seg) || seg < 4 * self.storage.inline_threshold.0 {
            return Err(format!(
                "storage.segment_size ({}) must be between 1 MiB and 1 GiB and at least 4× \
                 storage.inline_threshold",
                self.storage.segment_size
            ));
        }
        if l.write_idle_timeout.0 < Duration::from_secs(1) {
            return Err("limits.write_idle_timeout must be at least 1s".into());
        }
        if l.max_concurrent_streams == 0 {
            return Err("limits.max_concurrent_streams must be above 0".into());
        }
        if l.handshake_timeout.0 < Duration::from_secs(1) {
            return Err("limits.handshake_timeout must be at least 1s".into());
        }
        if self.storage.abandoned_upload_age.0 < Duration::from_secs(60) {
            return Err("storage.abandoned_upload_age must be at least 1m".into());
        }
        self.asset.fetch.check()?;
        if matches!(self.storage.backend, Backend::S3 | Backend::Tiered) {
            self.storage.s3.check()?;
        }
        let tiered = &self.storage.tiered;
        if self.storage.backend == Backend::Tiered
            && tiered.write_behind
            && tiered.fast != FastTier::Sled
        {
            return Err(
                "storage.tiered.write_behind needs fast = \"sled\": the queue of blobs not yet \
                 in the bucket must survive a restart"
                    .into(),
            );
        }
        if self.asset.max_hold.0 < Duration::from_secs(60) {
            return Err("asset.max_hold must be at least 1m".into());
        }
        if self.watch.retained_events == 0 || self.watch.max_lag == 0 {
            return Err("watch.retained_events and watch.max_lag must be above 0".into());
        }
        self.namespaces.check()?;
        self.telemetry.check()?;
        if let Some(upstream) = &self.upstream {
            upstream.check(self.storage.backend)?;
        }
        if let Some(auth) = &self.auth {
            auth.check()?;
        }
        self.hooks.check()?;
        self.oci.check()?;
        if self.oci_listen.is_some() && self.upstream.is_some() {
            return Err(
                "oci_listen cannot be used on a replica ([upstream]): its repositories would be \
                 this server's own, not the upstream's; run the registry front at the upstream"
                    .into(),
            );
        }
        if let Some(oci) = self.oci_listen {
            if oci == self.listen || Some(oci) == self.ops_listen {
                return Err(format!(
                    "oci_listen ({oci}) must differ from listen and ops_listen"
                ));
            }
        }
        if l.max_metadata_size.0 < 1024 {
            return Err("limits.max_metadata_size must be at least 1KiB".into());
        }
        let st = &self.storage;
        if !(st.low_watermark < st.high_watermark && st.high_watermark <= 100) {
            return Err(format!(
                "storage.low_watermark ({}) must be below storage.high_watermark ({}), which \
                 must be at most 100 (percentages of storage.max_size)",
                st.low_watermark, st.high_watermark
            ));
        }
        Ok(())
    }
}

/// A byte count written as an integer or a human size: `"64KiB"`, `"3MiB"`, `"200GB"`,
/// `"1.5 GiB"`: powers of 1000 (KB, MB, GB, TB, PB, EB) or of 1024 (KiB ... EiB), in any case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    /// The `bytesize` crate parses. Around it, what hoard's own parser did before stays so:
    /// blanks around the size are ignored (bytesize refuses them), a size past `u64` is an error
    /// (bytesize saturates it to 16 EiB), and so is a one-letter unit such as `64K` (bytesize
    /// reads it as KB, where many mean KiB), with bytesize's message replaced by one that lists
    /// the units.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let unit = t.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        let unit = unit.trim();
        let bad = || {
            format!(
                "{s:?} is not a size such as \"64KiB\" or \"3MiB\"; units are B, KB, MB, GB, \
                 TB, PB, EB (powers of 1000) and KiB, MiB, GiB, TiB, PiB, EiB (powers of 1024)"
            )
        };
        if unit.len() == 1 && !unit.eq_ignore_ascii_case("b") {
            return Err(bad());
        }
        match t.parse::<bytesize::ByteSize>().map_err(|_| bad())?.as_u64() {
            // bytesize saturates; only a count of bytes written out can be u64::MAX itself.
            u64::MAX if !bytes_written_out(t) => Err(format!("{s:?} is too large")),
            n => Ok(ByteSize(n)),
        }
    }
}

/// Whether `t` is an integer count of bytes, such as `"4096"` or `"4096 B"`.
fn bytes_written_out(t: &str) -> bool {
    let number = t.strip_suffix(['b', 'B']).unwrap_or(t).trim_end();
    number.parse::<u64>().is_ok()
}

/// Exact, in the largest binary unit that divides the count (`64KiB`, `3MiB`, `1000000B`), so
/// the text parses back to the same count: for config messages and echoed parameters.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl ByteSize {
    /// Rounded for people, in binary units: `512 B`, `1.5 KiB`, `1.2 GiB`, `16.0 EiB`. One
    /// decimal, or as many as the format's precision asks (`{:.2}`: `1.50 KiB`). The one
    /// formatter for sizes shown to people (the CLI's reports, the load generator's).
    pub fn human(self) -> HumanBytes {
        HumanBytes(self.0)
    }
}

/// A byte count shown rounded; see [`ByteSize::human`].
///
/// Written here rather than taken from `bytesize`'s Display, which prints one byte short of a
/// MiB as `1024.0 KiB`: this moves up a unit before rounding could reach 1024.
#[derive(Clone, Copy, Debug)]
pub struct HumanBytes(u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let bytes = self.0;
        if bytes < 1024 {
            return write!(f, "{bytes} B");
        }
        let decimals = f.precision().unwrap_or(1);
        // The smallest value that rounds to 1024 at this many decimals.
        let rounds_up = 1024.0 - 0.5 / 10f64.powi(decimals.min(20) as i32);
        let mut value = bytes as f64 / 1024.0;
        let mut unit = 0;
        while value >= rounds_up && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.decimals$} {}", UNITS[unit])
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as `"30s"`, `"15m"`, `"24h"`, `"14d"`, `"500ms"` or `"1.5h"`.
///
/// Parsed here rather than by `humantime` (2.4): humantime refuses values this parser has always
/// accepted and configs may hold: a fraction of an hour or day that is not a whole second
/// (`"0.333h"`, `"0.001d"`), any fraction of a nanosecond (`"1.5ns"`), and more than 584 years
/// written in ms, us or ns. Its extras (`"1h 30m"`, weeks, long unit names) would not make up for
/// a config that stops loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (num, unit) = split_number_unit(s);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration such as \"30s\" or \"24h\""))?;
        let secs_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "" => return Err(format!("{s:?} needs a unit: ms, s, m, h or d")),
            u => {
                return Err(format!(
                    "{s:?} has unknown unit {u:?}; use ns, us, ms, s, m, h or d"
                ))
            }
        };
        Duration::try_from_secs_f64(n * secs_per_unit)
            .map(HumanDuration)
            .map_err(|_| format!("{s:?} is out of range"))
    }
}

/// Splits `" 1.5 GiB "` into `("1.5", "GiB")`: the leading number and the trimmed unit.
fn split_number_unit(s: &str) -> (&str, &str) {
    let t = s.trim();
    let at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(at);
    (num, unit.trim())
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!("3MiB".parse::<ByteSize>().unwrap(), ByteSize(3 << 20));
        assert_eq!("10".parse::<ByteSize>().unwrap(), ByteSize(10));
        assert_eq!("2 GB".parse::<ByteSize>().unwrap(), ByteSize(2_000_000_000));
        assert!("3 parsecs".parse::<ByteSize>().is_err());
        assert!("".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn the_tiered_backend_needs_a_bucket_and_a_durable_fast_tier_for_write_behind() {
        let e = Config::parse("[storage]\nbackend = \"tiered\"\n").unwrap_err();
        assert!(e.contains("needs storage.s3.bucket"), "{e}");
        let e = Config::parse(
            "[storage]\nbackend = \"tiered\"\n[storage.s3]\nbucket = \"b\"\n\
             [storage.tiered]\nfast = \"memory\"\nwrite_behind = true\n",
        )
        .unwrap_err();
        assert!(e.contains("write_behind needs fast = \"sled\""), "{e}");
        let c = Config::parse(
            "[storage]\nbackend = \"tiered\"\n[storage.s3]\nbucket = \"b\"\n\
             [storage.tiered]\nwrite_behind = true\n",
        )
        .unwrap();
        assert_eq!(c.storage.backend, Backend::Tiered);
        assert_eq!(c.storage.tiered.fast, FastTier::Sled);
        assert!(c.storage.tiered.write_behind);
        assert!(Config::parse("[storage.tiered]\nfast = \"disk\"\n").is_err());
    }

    #[test]
    fn the_s3_backend_needs_a_bucket_and_says_so_of_plain_http() {
        let e = Config::parse("[storage]\nbackend = \"s3\"\n").unwrap_err();
        assert!(e.contains("needs storage.s3.bucket"), "{e}");
        let e = Config::parse(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://minio:9000\"\n",
        )
        .unwrap_err();
        assert!(e.contains("allow_http"), "{e}");
        let c = Config::parse(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\nprefix = \"team/cache\"\n\
             endpoint = \"http://minio:9000\"\nallow_http = true\nexistence_cache_age = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(c.storage.backend, Backend::S3);
        assert_eq!(c.storage.s3.prefix, "team/cache");
        assert_eq!(c.storage.s3.existence_cache_age.0, Duration::from_secs(60));
        assert!(
            Config::parse("[storage.s3]\nbukket = \"b\"\n").is_err(),
            "unknown keys"
        );
        // The bucket is only asked for when it is the backend.
        assert!(Config::parse("[storage]\nbackend = \"sled\"\n").is_ok());
    }

    #[test]
    fn gcs_and_azure_take_their_settings_through_options_and_refuse_s3_ones() {
        let gcs = Config::parse(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nprovider = \"gcs\"\nbucket = \"b\"\n\
             [storage.s3.options]\ngoogle_service_account = \"/etc/hoard/sa.json\"\n",
        )
        .unwrap();
        assert_eq!(gcs.storage.s3.provider, Provider::Gcs);
        assert_eq!(
            gcs.storage
                .s3
                .options
                .get("google_service_account")
                .map(String::as_str),
            Some("/etc/hoard/sa.json")
        );
        let azure = "[storage]\nbackend = \"s3\"\n[storage.s3]\nprovider = \"azure\"\n\
                     bucket = \"cache\"\n";
        let ok = format!("{azure}[storage.s3.options]\nazure_storage_account_name = \"acct\"\n");
        assert!(Config::parse(&ok).is_ok());
        let e = Config::parse(&format!("{azure}region = \"eu-west-1\"\n")).unwrap_err();
        assert!(
            e.contains("storage.s3.region is for provider = \"s3\" only"),
            "{e}"
        );
        let e = Config::parse(&format!(
            "{azure}[storage.s3.options]\ngoogle_bucket = \"x\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("\"google_bucket\" is not a setting of the Azure client"),
            "{e}"
        );
        let e = Config::parse(
            "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\n\
             [storage.s3.options]\naws_no_such_thing = \"1\"\n",
        )
        .unwrap_err();
        assert!(e.contains("AmazonS3ConfigKey"), "{e}");
        assert!(Config::parse("[storage.s3]\nprovider = \"ftp\"\n").is_err());
    }

    #[test]
    fn options_may_not_override_what_the_fields_set_and_hoard_checks() {
        let with = |provider: &str, extra: &str, option: &str| {
            Config::parse(&format!(
                "[storage]\nbackend = \"s3\"\n[storage.s3]\nprovider = \"{provider}\"\n\
                 bucket = \"b\"\n{extra}[storage.s3.options]\n{option} = \"x\"\n"
            ))
        };
        for (provider, option, field) in [
            ("s3", "aws_endpoint", "storage.s3.endpoint"),
            ("s3", "aws_bucket", "storage.s3.bucket"),
            ("s3", "aws_conditional_put", "conditional writes"),
            ("s3", "timeout", "storage.s3.request_timeout"),
            ("gcs", "google_base_url", "storage.s3.endpoint"),
            ("azure", "azure_container_name", "storage.s3.bucket"),
            ("azure", "allow_http", "storage.s3.allow_http"),
        ] {
            let e = with(provider, "", option).unwrap_err();
            assert!(e.contains(field), "{provider} {option}: {e}");
        }
        let emulator =
            "endpoint = \"http://127.0.0.1:10000/devstoreaccount1\"\nallow_http = true\n";
        let e = with("azure", emulator, "azure_storage_use_emulator").unwrap_err();
        assert!(e.contains("storage.s3.endpoint"), "{e}");
        assert!(with("azure", "", "azure_storage_use_emulator").is_ok());
        assert!(with("s3", "", "aws_unsigned_payload").is_ok());
    }

    #[test]
    fn durations_parse() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(d("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(d("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(d("14d").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(d("250ms").unwrap(), Duration::from_millis(250));
        assert!(d("3 fortnights").is_err());
        assert!(d("h").is_err());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_fields_and_bad_limits_are_rejected() {
        assert!(Config::parse("lisen = \"127.0.0.1:1\"").is_err());
        assert!(Config::parse("[limits]\nmax_batch_total_size = \"32MiB\"").is_err());
    }

    /// Look-alike names and patterns in `[namespaces]` stop the server at start-up, naming the
    /// field and the character; ordinary ones and the keywords `self`/`none` load.
    #[test]
    fn namespace_names_and_patterns_keep_to_the_safe_set() {
        let rule = |pattern: &str, read: &str, write: &str| {
            Config::parse(&format!(
                "[[namespaces.rule]]\npattern = \"{pattern}\"\nread = [\"{read}\"]\n\
                 write = \"{write}\"\n"
            ))
        };
        assert!(rule("ci/branches/*", "ci/main", "self").is_ok());
        assert!(rule("", "ci/main", "none").is_ok());
        assert!(rule("dev-*", "ci/main", "dev/shared").is_ok());
        for (pattern, read, write, field, code) in [
            (
                "ci/ma\u{0456}n",
                "ci/main",
                "self",
                "namespaces.rule: namespace pattern",
                "U+0456",
            ),
            (
                "ci/*?",
                "ci/main",
                "self",
                "namespaces.rule: namespace pattern",
                "U+003F",
            ),
            ("ci/*", "ci/main\\u200b", "self", "read entry", "U+200B"),
            ("ci/*", "ci/main", "ci/m\u{202e}niam", "write", "U+202E"),
            ("ci/*", "ci/*", "self", "read entry", "U+002A"),
        ] {
            let e = rule(pattern, read, write).expect_err(pattern);
            assert!(e.contains(field) && e.contains(code), "{e}");
        }
        let e = Config::parse("[namespaces.default]\nread = [\"\u{ff4d}ain\"]\n").unwrap_err();
        assert!(
            e.contains("namespaces.default") && e.contains("U+FF4D"),
            "{e}"
        );
    }

    #[test]
    fn sizes_mean_what_they_meant_before_bytesize() {
        let size = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        for (text, bytes) in [
            ("64KiB", 64 << 10),
            ("64 KiB", 64 << 10),
            (" 64KiB ", 64 << 10),
            ("1 GiB", 1 << 30),
            ("3MiB", 3 << 20),
            ("1TiB", 1 << 40),
            ("1KB", 1000),
            ("200GB", 200_000_000_000),
            ("5TB", 5_000_000_000_000),
            ("7B", 7),
            ("0", 0),
            ("18446744073709551615", u64::MAX),
            ("18446744073709551615 B", u64::MAX),
            // New with bytesize: fractions and any case.
            ("1.5GiB", 3 << 29),
            ("64kib", 64 << 10),
        ] {
            assert_eq!(size(text), Ok(bytes), "{text:?}");
        }
        for text in [
            "64K",
            "3 m",
            "1.5",
            "-1",
            "16EiB",
            "99999999999TiB",
            "18446744073709551616",
        ] {
            assert!(size(text).is_err(), "{text:?}");
        }
        assert!(size("3 parsecs").unwrap_err().contains("KiB, MiB"));
    }

    #[test]
    fn durations_humantime_would_refuse_still_parse() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(d("0.333h").unwrap(), Duration::from_millis(1_198_800));
        assert_eq!(d("0.001d").unwrap(), Duration::from_millis(86_400));
        assert_eq!(d("1000000d").unwrap(), Duration::from_secs(86_400_000_000));
        assert_eq!(d("30 s").unwrap(), Duration::from_secs(30));
        assert_eq!(d(".5s").unwrap(), Duration::from_millis(500));
    }

    #[test]
    fn human_sizes_round_without_reaching_1024() {
        let human = |n: u64| ByteSize(n).human().to_string();
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human((1 << 20) - 52), "1023.9 KiB");
        assert_eq!(human(u64::MAX), "16.0 EiB");
        let two = |n: u64| format!("{:.2}", ByteSize(n).human());
        assert_eq!(two(512), "512 B");
        assert_eq!(two(1536), "1.50 KiB");
        assert_eq!(two(1 << 30), "1.00 GiB");
        assert_eq!(two((1 << 20) - 6), "1023.99 KiB");
        assert_eq!(two((1 << 20) - 5), "1.00 MiB");
    }

    #[test]
    fn the_example_config_spells_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/hoard.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
    }

    #[test]
    fn every_example_config_in_deploy_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap();
                seen += 1;
            }
        }
        assert!(seen > 0, "no example config in {}", dir.display());
    }

    #[test]
    fn the_commented_auth_example_parses_once_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/hoard.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let auth: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [auth]"))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .collect::<Vec<_>>()
            .join("\n");
        let config = Config::parse(&auth).unwrap();
        let auth = config.auth.unwrap();
        assert_eq!(auth.anonymous, crate::auth::Access::Read);
        assert_eq!(auth.tokens[0].grants.len(), 2);
        assert_eq!(auth.client_certs[0].subject, "ci-runner");
    }

    #[test]
    fn bad_grants_and_auth_fields_are_errors_with_a_line() {
        let bad =
            "[auth]\n[[auth.token]]\nname = \"ci\"\nhash = \"sha256:00\"\ngrants = [\"write\"]\n";
        let e = Config::parse(bad).unwrap_err();
        assert!(e.contains("line 5") && e.contains("access:pattern"), "{e}");
        let e = Config::parse("[auth]\nanonymous = \"sometimes\"\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let short = "[auth]\n[[auth.token]]\nname = \"ci\"\nhash = \"sha256:00\"\ngrants = []\n";
        let e = Config::parse(short).unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
    }
}
