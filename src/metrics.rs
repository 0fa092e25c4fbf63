//! The server's metrics: OpenTelemetry instruments, read as Prometheus text at the ops port's
//! `GET /metrics`. One [`Metrics`] is built per server (`server.rs`) and handed to what
//! records: the request layer (`layers.rs`), the authentication and shedding layers, and the
//! AC and CAS services. Names follow Prometheus conventions (units in names, `_total` for
//! counters), so the exporter is told not to add suffixes of its own.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::metrics::Meter;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use parking_lot::{Mutex, RwLock};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::namespace::{ActionResults, Policy};
use crate::store::refused::Refusal;
use crate::store::{Housekeeping, StoreStats};

/// The label value of instance names past `telemetry.max_namespace_labels`.
pub const OTHER: &str = "other";

/// Latency buckets in seconds: a cache answers in well under a millisecond to many seconds
/// (large blobs), so they span 100 µs to 60 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The gRPC services and methods this server implements: only these become label values
/// (any other path is counted as `unknown`), so a client calling made-up methods cannot grow
/// the series. Health is not here: probes are not counted (see `layers::MetricsLayer`).
const METHODS: &[(&str, &[&str])] = &[
    (
        "build.bazel.remote.execution.v2.ActionCache",
        &["GetActionResult", "UpdateActionResult"],
    ),
    (
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        &[
            "FindMissingBlobs",
            "BatchUpdateBlobs",
            "BatchReadBlobs",
            "GetTree",
            "SplitBlob",
            "SpliceBlob",
        ],
    ),
    (
        "build.bazel.remote.execution.v2.Capabilities",
        &["GetCapabilities"],
    ),
    (
        "google.bytestream.ByteStream",
        &["Read", "Write", "QueryWriteStatus"],
    ),
    (
        "hoard.admin.v1.Admin",
        &[
            "Stats",
            "Gc",
            "Verify",
            "Invalidate",
            "ListNamespaces",
            "PruneNamespaces",
            "GetProvenance",
        ],
    ),
    ("hoard.watch.v1.Watch", &["Watch"]),
    (
        "build.bazel.remote.asset.v1.Fetch",
        &["FetchBlob", "FetchDirectory"],
    ),
    (
        "build.bazel.remote.asset.v1.Push",
        &["PushBlob", "PushDirectory"],
    ),
];

/// Why a call was answered UNAUTHENTICATED: the `reason` label of
/// `hoard_auth_failures_total`, a fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials, and anonymous callers get nothing.
    NoCredentials,
    /// A token no `[[auth.token]]` hash matches.
    UnknownToken,
    /// An `authorization` header that is not Bearer or Basic as expected.
    Malformed,
    /// A verified client certificate whose subject no `[[auth.client_cert]]` lists.
    UnlistedCertificate,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 4] = [
        AuthFailure::NoCredentials,
        AuthFailure::UnknownToken,
        AuthFailure::Malformed,
        AuthFailure::UnlistedCertificate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::NoCredentials => "no_credentials",
            AuthFailure::UnknownToken => "unknown_token",
            AuthFailure::Malformed => "malformed",
            AuthFailure::UnlistedCertificate => "unlisted_certificate",
        }
    }
}

/// What an invalidation changed: the `kind` label of `hoard_invalidations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidated {
    /// Listed action results of one namespace were removed.
    Actions,
    /// A namespace's epoch was bumped (by name or as one match of a pattern).
    Namespace,
    /// An idle namespace was dropped (PruneNamespaces).
    Dropped,
}

impl Invalidated {
    const ALL: [Invalidated; 3] = [
        Invalidated::Actions,
        Invalidated::Namespace,
        Invalidated::Dropped,
    ];

    fn label(self) -> &'static str {
        match self {
            Invalidated::Actions => "actions",
            Invalidated::Namespace => "namespace",
            Invalidated::Dropped => "dropped",
        }
    }
}

/// Every instrument of one server, and the registry `/metrics` renders.
pub struct Metrics {
    registry: prometheus::Registry,
    /// Owns the readers (Prometheus, and OTLP if configured); the instruments record into it.
    provider: SdkMeterProvider,
    requests: Counter<u64>,
    duration: Histogram<f64>,
    received_bytes: Counter<u64>,
    sent_bytes: Counter<u64>,
    ac_lookups: Counter<u64>,
    ac_hits: Counter<u64>,
    cas_lookups: Counter<u64>,
    cas_found: Counter<u64>,
    shed: Counter<u64>,
    auth_failures: Counter<u64>,
    invalidations: Counter<u64>,
    watchers: UpDownCounter<i64>,
    upload_resumes: Counter<u64>,
    upload_resumes_refused: Counter<u64>,
    oci_requests: Counter<u64>,
    oci_manifest_lookups: Counter<u64>,
    oci_manifest_hits: Counter<u64>,
    oci_bytes: Counter<u64>,
    /// `telemetry.metrics`: when false nothing is recorded (the hot paths return before
    /// building labels) and `/metrics` answers 404.
    enabled: bool,
    /// Which `[[namespaces.rule]]` matches an instance name.
    policy: Policy,
    namespaces: NamespaceLabels,
    /// The lookup labels of each instance name that kept its own `namespace` label (at most
    /// `max_namespace_labels`), built once: a lookup then clones two reference-counted strings
    /// instead of matching the rules and allocating both values (the metrics-cost benchmark).
    lookup_labels: RwLock<HashMap<String, [KeyValue; 2]>>,
    /// Where the store figures come from, once the store is open.
    store: OnceLock<(Arc<dyn Housekeeping>, Arc<ActionResults>)>,
    /// The store's figures as of this scrape, which the observable instruments report.
    stats: Arc<Mutex<Option<StoreStats>>>,
    /// The same counts again, readable in-process for the Admin `Stats` call (`hoard stats`,
    /// `hoard top`): the OTel SDK offers no cheap read-back of its sums.
    tallies: Tallies,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The instruments, with their own registry (so servers in one process, as in tests, never
    /// share counts).
    pub fn new(config: &Config) -> Result<Arc<Metrics>> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_units()
            .without_counter_suffixes()
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| Error::internal("setting up the metrics exporter", e))?;
        let enabled = config.telemetry.metrics;
        // Off: a provider without a reader, whose instruments are no-ops (the recording methods
        // return before that anyway, so the request path does not even build labels), and no
        // OTLP push either.
        let provider = if enabled {
            let mut provider = SdkMeterProvider::builder()
                .with_reader(exporter)
                .with_resource(crate::telemetry::resource());
            // `telemetry.otlp_endpoint`: the same instruments are also pushed to a collector.
            if let Some(reader) = crate::telemetry::metric_reader(&config.telemetry)
                .map_err(Error::InvalidArgument)?
            {
                provider = provider.with_reader(reader);
            }
            provider.build()
        } else {
            SdkMeterProvider::builder().build()
        };
        let meter = provider.meter("hoard");
        let counter = |name: &'static str, help: &'static str| {
            meter.u64_counter(name).with_description(help).build()
        };
        let metrics = Metrics {
            requests: counter(
                "hoard_requests_total",
                "gRPC calls answered, by service, method and gRPC code",
            ),
            duration: meter
                .f64_histogram("hoard_request_duration_seconds")
                .with_description(
                    "gRPC call duration from arrival until the reply's end (its trailers)",
                )
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            received_bytes: counter(
                "hoard_received_bytes_total",
                "request body bytes received (gRPC-framed messages, as sent), by service and method",
            ),
            sent_bytes: counter(
                "hoard_sent_bytes_total",
                "reply body bytes sent (gRPC-framed messages, as sent), by service and method",
            ),
            ac_lookups: counter(
                "hoard_ac_lookups_total",
                "GetActionResult calls that reached the action cache",
            ),
            ac_hits: counter(
                "hoard_ac_hits_total",
                "GetActionResult calls answered with a result",
            ),
            cas_lookups: counter(
                "hoard_cas_lookups_total",
                "digests asked about in FindMissingBlobs",
            ),
            cas_found: counter(
                "hoard_cas_found_total",
                "digests FindMissingBlobs found present",
            ),
            shed: counter(
                "hoard_shed_requests_total",
                "calls refused RESOURCE_EXHAUSTED by the concurrency limit",
            ),
            auth_failures: counter(
                "hoard_auth_failures_total",
                "calls answered UNAUTHENTICATED, by reason",
            ),
            invalidations: counter(
                "hoard_invalidations_total",
                "invalidation changes made, each announced on the watch stream, by kind",
            ),
            watchers: meter
                .i64_up_down_counter("hoard_watchers")
                .with_description("watch streams open")
                .build(),
            upload_resumes: counter(
                "hoard_upload_resumes_total",
                "ByteStream Writes that resumed an upload at a non-zero offset (accepted)",
            ),
            upload_resumes_refused: counter(
                "hoard_upload_resumes_refused_total",
                "ByteStream Writes at a non-zero offset that could not resume (offset does not \
                 match what is stored, nothing stored, compressed, another stream writing, or the store \
                 refusing writes)",
            ),
            oci_requests: counter(
                "hoard_oci_requests_total",
                "OCI registry requests answered, by operation and HTTP status",
            ),
            oci_manifest_lookups: counter(
                "hoard_oci_manifest_lookups_total",
                "OCI manifest GET/HEAD requests, by repository namespace",
            ),
            oci_manifest_hits: counter(
                "hoard_oci_manifest_hits_total",
                "OCI manifest GET/HEAD requests answered with a manifest, by repository namespace",
            ),
            oci_bytes: counter(
                "hoard_oci_bytes_total",
                "OCI blob and manifest bytes, by direction (received: uploads and manifest pushes; sent: blob and manifest bodies)",
            ),
            enabled,
            policy: Policy::new(&config.namespaces),
            namespaces: NamespaceLabels::new(config.telemetry.max_namespace_labels),
            lookup_labels: RwLock::new(HashMap::new()),
            store: OnceLock::new(),
            stats: Arc::new(Mutex::new(None)),
            tallies: Tallies::default(),
            registry,
            provider,
        };
        store_instruments(&meter, &metrics.stats);
        // Present from the start at 0, so alerts on their rate need no `absent()`.
        metrics.shed.add(0, &[]);
        for reason in AuthFailure::ALL {
            metrics.auth_failure_by(reason, 0);
        }
        for kind in Invalidated::ALL {
            metrics
                .invalidations
                .add(0, &[KeyValue::new("kind", kind.label())]);
        }
        metrics.watchers.add(0, &[]);
        metrics.upload_resumes.add(0, &[]);
        metrics.upload_resumes_refused.add(0, &[]);
        meter
            .u64_gauge("hoard_build_info")
            .with_description("always 1; the label names the version")
            .build()
            .record(1, &[KeyValue::new("version", env!("CARGO_PKG_VERSION"))]);
        Ok(Arc::new(metrics))
    }

    /// Reports the figures of `store` (sizes, evictions, refusals) and `results` (expiries)
    /// from now on, read at each scrape. The ops port serves before the store opens; until
    /// then these series are absent.
    pub fn watch_store(&self, store: Arc<dyn Housekeeping>, results: Arc<ActionResults>) {
        let _ = self.store.set((store, results));
    }

    /// Pushes the last figures to the OTLP collector, if one is configured, and stops its
    /// reader. Blocking (an export may take up to its timeout): call it on a blocking thread.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the final metrics export failed");
        }
    }

    /// Whether metrics are recorded and served (`telemetry.metrics`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Everything recorded, as Prometheus text format 0.0.4; the store's figures are read now.
    pub async fn render(&self) -> String {
        if let Some((store, results)) = self.store.get() {
            let stats = match store.stats().await {
                Ok(mut stats) => {
                    results.add_stats(&mut stats);
                    Some(stats)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the store's figures for /metrics failed");
                    None
                }
            };
            *self.stats.lock() = stats;
        }
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }

    /// One answered call: its service and method (from [`service_and_method`]), gRPC code,
    /// duration, and the bytes of its request and reply bodies.
    pub fn request(
        &self,
        service: &'static str,
        method: &'static str,
        code: tonic::Code,
        elapsed: Duration,
        received: u64,
        sent: u64,
    ) {
        if !self.enabled {
            return;
        }
        let labels = [
            KeyValue::new("service", service),
            KeyValue::new("method", method),
        ];
        self.duration.record(elapsed.as_secs_f64(), &labels);
        self.received_bytes.add(received, &labels);
        self.sent_bytes.add(sent, &labels);
        let [service, method] = labels;
        self.requests.add(
            1,
            &[service, method, KeyValue::new("code", code_label(code))],
        );
        self.tallies.request(code, elapsed);
        self.tallies
            .bytes_received
            .fetch_add(received, Ordering::Relaxed);
        self.tallies.bytes_sent.fetch_add(sent, Ordering::Relaxed);
    }

    /// A GetActionResult for `instance` that got as far as the cache, found or not.
    pub fn ac_lookup(&self, instance: &str, hit: bool) {
        if !self.enabled {
            return;
        }
        let labels = self.namespace_labels(instance);
        self.ac_lookups.add(1, &labels);
        if hit {
            self.ac_hits.add(1, &labels);
        }
        let tally = self.tallies.namespace(&labels[1].value.as_str());
        tally.ac_lookups.fetch_add(1, Ordering::Relaxed);
        tally.ac_hits.fetch_add(u64::from(hit), Ordering::Relaxed);
    }

    /// A FindMissingBlobs for `instance`: `asked` digests, `found` of them present.
    pub fn cas_lookup(&self, instance: &str, asked: usize, found: usize) {
        if !self.enabled {
            return;
        }
        let labels = self.namespace_labels(instance);
        self.cas_lookups.add(asked as u64, &labels);
        self.cas_found.add(found as u64, &labels);
        let tally = self.tallies.namespace(&labels[1].value.as_str());
        tally.cas_lookups.fetch_add(asked as u64, Ordering::Relaxed);
        tally.cas_found.fetch_add(found as u64, Ordering::Relaxed);
    }

    /// The lookup counts per `namespace` label value (so `other` too), sorted by name: the
    /// numbers `hoard_ac_*` and `hoard_cas_*` show, summed over `namespace_rule`.
    pub fn namespace_stats(&self) -> Vec<NamespaceCounts> {
        let mut out: Vec<NamespaceCounts> = self
            .tallies
            .namespaces
            .read()
            .iter()
            .map(|(name, t)| NamespaceCounts {
                namespace: name.clone(),
                ac_lookups: t.ac_lookups.load(Ordering::Relaxed),
                ac_hits: t.ac_hits.load(Ordering::Relaxed),
                cas_lookups: t.cas_lookups.load(Ordering::Relaxed),
                cas_found: t.cas_found.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        out
    }

    /// Calls answered since start (as `hoard_requests_total`), and how many failed.
    pub fn requests(&self) -> RequestCounts {
        RequestCounts {
            answered: self.tallies.requests.load(Ordering::Relaxed),
            errors: self.tallies.errors.load(Ordering::Relaxed),
            bytes_received: self.tallies.bytes_received.load(Ordering::Relaxed),
            bytes_sent: self.tallies.bytes_sent.load(Ordering::Relaxed),
        }
    }

    /// Every call's duration since start, in `hoard_request_duration_seconds`'s buckets.
    pub fn latency(&self) -> LatencyCounts {
        let mut total = 0;
        let cumulative = self
            .tallies
            .latency
            .iter()
            .map(|n| {
                total += n.load(Ordering::Relaxed);
                total
            })
            .collect();
        LatencyCounts {
            bounds_secs: DURATION_BUCKETS.to_vec(),
            cumulative,
        }
    }

    /// How long ago these metrics were set up: the server's start.
    pub fn uptime(&self) -> Duration {
        self.tallies.started.elapsed()
    }

    /// A call the concurrency limit refused.
    pub fn shed(&self) {
        self.shed.add(1, &[]);
    }

    /// A call answered UNAUTHENTICATED.
    pub fn auth_failure(&self, reason: AuthFailure) {
        self.auth_failure_by(reason, 1);
    }

    fn auth_failure_by(&self, reason: AuthFailure, n: u64) {
        self.auth_failures
            .add(n, &[KeyValue::new("reason", reason.label())]);
    }

    /// One invalidation change, made durable and announced.
    pub fn invalidation(&self, kind: Invalidated) {
        self.invalidations
            .add(1, &[KeyValue::new("kind", kind.label())]);
    }

    /// A ByteStream Write at a non-zero offset: the store took up the upload where it stood
    /// (`accepted`), or refused to.
    pub fn upload_resume(&self, accepted: bool) {
        if accepted {
            self.upload_resumes.add(1, &[]);
        } else {
            self.upload_resumes_refused.add(1, &[]);
        }
    }

    /// An OCI registry request answered with `status`; `operation` is a fixed label
    /// (`oci::http::operation`).
    pub fn oci_request(&self, operation: &'static str, status: u16) {
        if !self.enabled {
            return;
        }
        self.oci_requests.add(
            1,
            &[
                KeyValue::new("operation", operation),
                KeyValue::new("code", i64::from(status)),
            ],
        );
    }

    /// A manifest GET/HEAD in repository namespace `namespace`, found or not (its label capped
    /// as the action cache's are).
    pub fn oci_manifest_lookup(&self, namespace: &str, hit: bool) {
        if !self.enabled {
            return;
        }
        let labels = self.namespace_labels(namespace);
        self.oci_manifest_lookups.add(1, &labels);
        if hit {
            self.oci_manifest_hits.add(1, &labels);
        }
    }

    /// Blob and manifest bytes through the registry.
    pub fn oci_bytes(&self, received: u64, sent: u64) {
        if !self.enabled {
            return;
        }
        if received > 0 {
            self.oci_bytes
                .add(received, &[KeyValue::new("direction", "received")]);
        }
        if sent > 0 {
            self.oci_bytes
                .add(sent, &[KeyValue::new("direction", "sent")]);
        }
    }

    /// A watch stream opened; it counts as open until the returned guard is dropped.
    pub fn watcher(self: &Arc<Self>) -> WatcherGuard {
        self.watchers.add(1, &[]);
        WatcherGuard(self.clone())
    }

    /// `namespace_rule` (the matching rule's pattern, or `default`) and `namespace` (capped).
    fn namespace_labels(&self, instance: &str) -> [KeyValue; 2] {
        if let Some(labels) = self.lookup_labels.read().get(instance) {
            return labels.clone();
        }
        let rule: Arc<str> = match self.policy.rule(instance) {
            Some(rule) => rule.pattern.as_str().into(),
            None => "default".into(),
        };
        let namespace = self.namespaces.label(instance);
        let kept = namespace != OTHER;
        let labels = [
            KeyValue::new("namespace_rule", rule),
            KeyValue::new("namespace", Arc::<str>::from(namespace)),
        ];
        // Only names with a label of their own are kept, so the map is bounded by the cap.
        if kept {
            self.lookup_labels
                .write()
                .insert(instance.to_string(), labels.clone());
        }
        labels
    }
}

/// One `namespace` label value's lookups since start (see [`Metrics::namespace_stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceCounts {
    pub namespace: String,
    pub ac_lookups: u64,
    pub ac_hits: u64,
    pub cas_lookups: u64,
    pub cas_found: u64,
}

/// Calls answered since start, and those that failed: any code but `Ok`, `NotFound` (a miss)
/// and `Cancelled` (the client left first), as the error-ratio alert counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub answered: u64,
    pub errors: u64,
    /// Request and reply body bytes, as `hoard_received_bytes_total`/`hoard_sent_bytes_total`.
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// Call durations since start: `cumulative[i]` calls took at most `bounds_secs[i]`; the one
/// extra last entry counts every call (+Inf).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencyCounts {
    pub bounds_secs: Vec<f64>,
    pub cumulative: Vec<u64>,
}

/// Plain atomic counts beside the instruments, for [`Metrics::namespace_stats`] and friends.
/// The namespace map is keyed by label value, so it is bounded by the same cap.
struct Tallies {
    started: Instant,
    requests: AtomicU64,
    errors: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    /// Per bucket (not cumulative), one more than `DURATION_BUCKETS` for +Inf.
    latency: [AtomicU64; DURATION_BUCKETS.len() + 1],
    namespaces: RwLock<HashMap<String, Arc<NamespaceTally>>>,
}

#[derive(Default)]
struct NamespaceTally {
    ac_lookups: AtomicU64,
    ac_hits: AtomicU64,
    cas_lookups: AtomicU64,
    cas_found: AtomicU64,
}

impl Default for Tallies {
    fn default() -> Self {
        Tallies {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            latency: [const { AtomicU64::new(0) }; DURATION_BUCKETS.len() + 1],
            namespaces: RwLock::new(HashMap::new()),
        }
    }
}

impl Tallies {
    fn request(&self, code: tonic::Code, elapsed: Duration) {
        use tonic::Code::{Cancelled, NotFound, Ok};
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !matches!(code, Ok | NotFound | Cancelled) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        // Upper bounds are inclusive, as in Prometheus (`le`) and the OTel SDK.
        let secs = elapsed.as_secs_f64();
        let bucket = DURATION_BUCKETS.partition_point(|bound| *bound < secs);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The tally of label value `label` (already capped by `NamespaceLabels`).
    fn namespace(&self, label: &str) -> Arc<NamespaceTally> {
        if let Some(t) = self.namespaces.read().get(label) {
            return t.clone();
        }
        self.namespaces
            .write()
            .entry(label.to_string())
            .or_default()
            .clone()
    }
}

/// Held by an open watch stream (`hoard_watchers`).
pub struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.add(-1, &[]);
    }
}

/// The store's figures as observable instruments over `stats` (refreshed before each scrape;
/// absent while it is `None`). Counters since the server started are counters here too.
fn store_instruments(meter: &Meter, stats: &Arc<Mutex<Option<StoreStats>>>) {
    type Read = fn(&StoreStats) -> Option<u64>;
    let gauges: [(&'static str, &'static str, Read); 8] = [
        (
            "hoard_stored_blobs",
            "CAS blobs stored (the empty blob not counted)",
            |s| Some(s.blobs),
        ),
        (
            "hoard_stored_blob_bytes",
            "total size of the stored CAS blobs",
            |s| Some(s.blob_bytes),
        ),
        (
            "hoard_action_results",
            "action results stored, over all instance names",
            |s| Some(s.action_results),
        ),
        (
            "hoard_used_bytes",
            "what storage.max_size bounds: blobs (files in whole 4 KiB blocks) and action results",
            |s| Some(s.used_bytes),
        ),
        (
            "hoard_max_size_bytes",
            "the bound on hoard_used_bytes (storage.max_size)",
            |s| Some(s.max_size),
        ),
        (
            "hoard_disk_bytes",
            "what the data dir takes on disk, database overhead included",
            |s| Some(s.disk_bytes),
        ),
        (
            "hoard_youngest_evicted_age_seconds",
            "how long the most recently used evicted blob had been idle (absent until one is)",
            |s| s.youngest_evicted_age_secs,
        ),
        (
            "hoard_write_behind_queue",
            "blobs acknowledged and not yet uploaded to the bucket (tiered, write-behind only)",
            |s| s.write_behind_queue,
        ),
    ];
    for (name, help, read) in gauges {
        let stats = stats.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |observer| {
                if let Some(v) = stats.lock().as_ref().and_then(read) {
                    observer.observe(v, &[]);
                }
            })
            .build();
    }
    let counters: [(&'static str, &'static str, Read); 3] = [
        (
            "hoard_evicted_blobs_total",
            "blobs evicted since start",
            |s| Some(s.evicted_blobs),
        ),
        (
            "hoard_evicted_bytes_total",
            "bytes evicted since start",
            |s| Some(s.evicted_bytes),
        ),
        (
            "hoard_expired_action_results_total",
            "action results dropped since start because their TTL since last use passed",
            |s| Some(s.expired_action_results),
        ),
    ];
    for (name, help, read) in counters {
        let stats = stats.clone();
        meter
            .u64_observable_counter(name)
            .with_description(help)
            .with_callback(move |observer| {
                if let Some(v) = stats.lock().as_ref().and_then(read) {
                    observer.observe(v, &[]);
                }
            })
            .build();
    }
    // Every reason observed, 0 included, so alert rules need no `absent()`.
    let stats = stats.clone();
    meter
        .u64_observable_counter("hoard_refused_writes_total")
        .with_description(
            "writes refused up front since start, by reason (cache_full, too_large, disk_full, \
             read_only, database_failed)",
        )
        .with_callback(move |observer| {
            if let Some(s) = stats.lock().as_ref() {
                for reason in Refusal::ALL {
                    observer.observe(
                        reason.count_in(s),
                        &[KeyValue::new("reason", reason.label())],
                    );
                }
            }
        })
        .build();
}

/// The first `cap` distinct instance names seen keep their name as label value; later ones
/// become [`OTHER`]. First come, first kept: a name once labelled stays labelled while the
/// process runs, so its series never jumps to `other`.
struct NamespaceLabels {
    cap: usize,
    seen: RwLock<HashSet<String>>,
}

impl NamespaceLabels {
    fn new(cap: usize) -> Self {
        NamespaceLabels {
            cap,
            seen: RwLock::new(HashSet::new()),
        }
    }

    fn label(&self, instance: &str) -> String {
        if self.seen.read().contains(instance) {
            return instance.to_string();
        }
        let mut seen = self.seen.write();
        if seen.contains(instance) || seen.len() < self.cap {
            seen.insert(instance.to_string());
            instance.to_string()
        } else {
            OTHER.to_string()
        }
    }
}

/// `/pkg.Service/Method` → (service, method) if this server implements it, else `unknown`.
pub fn service_and_method(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return ("unknown", "unknown");
    };
    for (known, methods) in METHODS {
        if *known == service {
            let method = methods
                .iter()
                .find(|m| **m == method)
                .copied()
                .unwrap_or("unknown");
            return (known, method);
        }
    }
    ("unknown", "unknown")
}

/// The code's name as tonic spells it (`Ok`, `NotFound`, ...).
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_become_labels() {
        assert_eq!(
            service_and_method("/build.bazel.remote.execution.v2.ActionCache/GetActionResult"),
            (
                "build.bazel.remote.execution.v2.ActionCache",
                "GetActionResult"
            )
        );
        assert_eq!(
            service_and_method("/google.bytestream.ByteStream/Made-Up"),
            ("google.bytestream.ByteStream", "unknown")
        );
        assert_eq!(service_and_method("/x.Y/Z"), ("unknown", "unknown"));
        assert_eq!(service_and_method("/"), ("unknown", "unknown"));
    }

    #[test]
    fn namespace_labels_stop_at_the_cap() {
        let labels = NamespaceLabels::new(2);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), OTHER);
        assert_eq!(labels.label("a"), "a");
    }

    #[test]
    fn tallies_count_per_label_value_and_by_bucket() {
        let mut config = Config::default();
        config.telemetry.max_namespace_labels = 1;
        let metrics = Metrics::new(&config).unwrap();
        metrics.ac_lookup("a", true);
        metrics.ac_lookup("a", false);
        metrics.ac_lookup("b", true);
        metrics.cas_lookup("c", 5, 2);
        let ns = metrics.namespace_stats();
        assert_eq!(ns.len(), 2, "{ns:?}");
        assert_eq!(
            (ns[0].namespace.as_str(), ns[0].ac_lookups, ns[0].ac_hits),
            ("a", 2, 1)
        );
        assert_eq!(
            (
                ns[1].namespace.as_str(),
                ns[1].ac_hits,
                ns[1].cas_lookups,
                ns[1].cas_found
            ),
            (OTHER, 1, 5, 2)
        );
        let (service, method) = service_and_method("/hoard.admin.v1.Admin/Stats");
        let call = |code, elapsed| metrics.request(service, method, code, elapsed, 10, 100);
        call(tonic::Code::Ok, Duration::from_micros(100));
        call(tonic::Code::NotFound, Duration::from_millis(3));
        call(tonic::Code::Internal, Duration::from_secs(100));
        assert_eq!(
            metrics.requests(),
            RequestCounts {
                answered: 3,
                errors: 1,
                bytes_received: 30,
                bytes_sent: 300,
            }
        );
        let latency = metrics.latency();
        assert_eq!(latency.cumulative.len(), latency.bounds_secs.len() + 1);
        // 100 µs is in the first bucket (bounds are inclusive), 3 ms in the 5 ms one.
        assert_eq!(latency.cumulative[0], 1);
        assert_eq!(latency.cumulative[4], 1);
        assert_eq!(latency.cumulative[5], 2);
        assert_eq!(latency.cumulative[DURATION_BUCKETS.len() - 1], 2);
        assert_eq!(latency.cumulative.last(), Some(&3));
    }

    #[tokio::test]
    async fn rendered_text_has_prometheus_names_and_labels() {
        let metrics = Metrics::new(&Config::default()).unwrap();
        metrics.ac_lookup("ci/main", true);
        let (service, method) =
            service_and_method("/build.bazel.remote.execution.v2.ActionCache/GetActionResult");
        metrics.request(
            service,
            method,
            tonic::Code::NotFound,
            Duration::from_millis(3),
            10,
            5,
        );
        let text = metrics.render().await;
        assert!(
            text.contains(
                "hoard_ac_hits_total{namespace=\"ci/main\",namespace_rule=\"default\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("code=\"NotFound\""), "{text}");
        assert!(
            text.contains("hoard_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("hoard_build_info{version="), "{text}");
    }
}
