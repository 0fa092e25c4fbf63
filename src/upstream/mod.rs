//! A regional replica (`[upstream]`): this server in front of a central cache (hoard, or any
//! REAPI server), serving local hits at local latency and sending misses and writes there.
//!
//! - `cas.rs`: [`UpstreamCas`], the upstream as the slow tier of a `TieredStore` (read-through
//!   with backfill, write-through or the durable write-behind queue, FindMissingBlobs from local
//!   plus upstream with a positive-only memory).
//! - `actions.rs`: [`ActionCopies`], action results: misses forwarded, local copies kept and
//!   dropped when the upstream's watch events say they may be stale.
//! - `relay.rs`: the upstream's watch stream, applied to the copies and relayed to this server's
//!   watchers in upstream order, resuming from a durably recorded position.
//!
//! This file owns the connection: the channel with this server's own credentials (a client's
//! token is never forwarded), the instance-name rewrite, and the upstream's reachability (a
//! probe every second; while it fails, calls that need the upstream fail at once with
//! UNAVAILABLE, and `/readyz` says "degraded").

mod actions;
mod cas;
mod relay;

pub use actions::{ActionCopies, NAMESPACE_HEADER};
pub use cas::UpstreamCas;
pub use relay::relay;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::{Code, Request, Status};

use crate::client::{ConnectOptions, Connection, Server};
use crate::config::UpstreamConfig;
use crate::error::{Error, Result};
use crate::proto::reapi::capabilities_client::CapabilitiesClient;
use crate::proto::reapi::GetCapabilitiesRequest;

/// How often reachability is probed (so recovery is noticed within about this).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Largest total blob size of one BatchUpdateBlobs call upstream when its capabilities do not
/// say (gRPC's default message limit is 4 MiB; room is left for the framing).
const DEFAULT_BATCH: u64 = 3 << 20;

/// The connection to the upstream and what is known about it.
pub struct Upstream {
    uri: String,
    conn: Connection,
    prefix: String,
    timeout: Duration,
    ac_max_staleness: Duration,
    /// Why the upstream cannot be used right now, and since when; `None` while it answers.
    down: Mutex<Option<(Instant, String)>>,
    /// Largest total blob size of one BatchUpdateBlobs call, from its capabilities.
    batch_limit: std::sync::atomic::AtomicU64,
    /// Whether local copies of action results can be vouched for, and since when not.
    freshness: Mutex<Freshness>,
}

/// What vouching for local copies takes: the relay open and caught up, the upstream reachable,
/// and (in a chain) the upstream's own relay current.
struct Freshness {
    relay_open: bool,
    reachable: bool,
    chain_current: bool,
    /// The last moment all three held (`None` before they ever did).
    current_at: Option<Instant>,
}

impl Freshness {
    fn current(&self) -> bool {
        self.relay_open && self.reachable && self.chain_current
    }
}

/// On a replica's GetCapabilities answers: "0" while its own copies cannot be vouched for (its
/// relay is down), so a replica in front of it stops vouching for its own within the bound.
pub const CURRENT_HEADER: &str = "hoard-upstream-current";

impl Upstream {
    /// Reads the credentials and prepares the channel; connects on first use, so a replica
    /// starts (and serves local hits) while its upstream is away.
    pub fn new(config: &UpstreamConfig) -> Result<Arc<Upstream>> {
        let token = match &config.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "upstream.token_file {}: cannot read: {e}",
                            path.display()
                        ))
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let options = ConnectOptions {
            tls_ca: config.tls_ca.clone(),
            tls_client_cert: config.tls_client_cert.clone(),
            tls_client_key: config.tls_client_key.clone(),
            token,
        };
        let server = Server::parse_with(&config.endpoint, &options)
            .map_err(|e| Error::FailedPrecondition(format!("upstream: {e}")))?
            .with_connect_timeout(config.timeout.0)
            .with_keepalive(Duration::from_secs(10), Duration::from_secs(5));
        Ok(Arc::new(Upstream {
            uri: server.uri().to_string(),
            conn: server.connect_lazy(),
            prefix: config.instance_prefix.trim_matches('/').to_string(),
            timeout: config.timeout.0,
            ac_max_staleness: config.ac_max_staleness.0,
            down: Mutex::new(None),
            batch_limit: std::sync::atomic::AtomicU64::new(DEFAULT_BATCH),
            freshness: Mutex::new(Freshness {
                relay_open: false,
                reachable: true,
                chain_current: true,
                current_at: None,
            }),
        }))
    }

    /// The upstream's address, for messages.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The instance name a client's `instance` becomes upstream.
    pub fn instance(&self, instance: &str) -> String {
        match (self.prefix.is_empty(), instance.is_empty()) {
            (true, _) => instance.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{instance}", self.prefix),
        }
    }

    /// An upstream namespace as this replica's clients name it: without `instance_prefix`
    /// (a namespace outside the prefix keeps its name).
    pub fn local_namespace(&self, namespace: &str) -> String {
        if self.prefix.is_empty() {
            return namespace.to_string();
        }
        if namespace == self.prefix {
            return String::new();
        }
        match namespace
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
        {
            Some(rest) => rest.to_string(),
            None => namespace.to_string(),
        }
    }

    /// The instance name CAS calls use upstream: content is the same under every name.
    fn cas_instance(&self) -> &str {
        &self.prefix
    }

    fn channel(&self) -> Connection {
        self.conn.clone()
    }

    /// `message` with the unary deadline.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Fails at once while the upstream is known to be unreachable, so a miss is answered
    /// quickly and the client (Bazel) falls back to running the action itself.
    fn check(&self) -> Result<()> {
        match &*self.down.lock() {
            None => Ok(()),
            Some((since, why)) => Err(Error::Unavailable(format!(
                "upstream {} is unreachable (for {}s: {why}); this replica serves only what it \
                 holds until it is back",
                self.uri,
                since.elapsed().as_secs()
            ))),
        }
    }

    /// The error a failed upstream call becomes; a transport failure or a timeout also marks
    /// the upstream unreachable until the next probe gets through.
    fn failed(&self, what: &str, status: Status) -> Error {
        let text = crate::client::status_text(&status);
        if unreachable(&status) {
            self.mark_down(&text);
            return Error::Unavailable(format!("upstream {} {what}: {text}", self.uri));
        }
        if status.code() == Code::Unauthenticated {
            // The replica's own credentials, not the client's: the client can do nothing.
            return Error::Unavailable(format!(
                "upstream {} refuses this replica's credentials ({what}): {text}; see \
                 upstream.token_file",
                self.uri
            ));
        }
        Error::Stream(Status::new(
            status.code(),
            format!("upstream {} {what}: {text}", self.uri),
        ))
    }

    fn mark_down(&self, why: &str) {
        self.fresh(|f| f.reachable = false);
        let mut down = self.down.lock();
        if down.is_none() {
            tracing::warn!(upstream = %self.uri, why, "upstream unreachable");
            *down = Some((Instant::now(), why.to_string()));
        }
    }

    fn mark_up(&self) {
        self.fresh(|f| f.reachable = true);
        let mut down = self.down.lock();
        if let Some((since, _)) = down.take() {
            tracing::info!(
                upstream = %self.uri,
                after_secs = since.elapsed().as_secs(),
                "upstream reachable again"
            );
        }
    }

    /// Why the replica is degraded (upstream unreachable), for `/readyz` and health.
    pub fn unavailable(&self) -> Option<String> {
        self.down.lock().as_ref().map(|(since, why)| {
            format!(
                "upstream {} unreachable for {}s ({why}): serving local hits only",
                self.uri,
                since.elapsed().as_secs()
            )
        })
    }

    /// Largest total blob size of one BatchUpdateBlobs call upstream.
    fn batch_limit(&self) -> u64 {
        self.batch_limit.load(Ordering::Relaxed)
    }

    /// Probes the upstream every [`PROBE_EVERY`] with GetCapabilities (every REAPI server has
    /// it), for as long as the server runs; learns its batch limit on the way.
    pub async fn probe(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let mut client = CapabilitiesClient::new(self.channel());
            let mut request = Request::new(GetCapabilitiesRequest {
                instance_name: self.cas_instance().to_string(),
            });
            request.set_timeout(self.timeout.min(Duration::from_secs(2)));
            match client.get_capabilities(request).await {
                Ok(reply) => {
                    let chain_current = reply
                        .metadata()
                        .get(CURRENT_HEADER)
                        .is_none_or(|v| v.as_bytes() != b"0");
                    self.fresh(|f| f.chain_current = chain_current);
                    let limit = reply
                        .into_inner()
                        .cache_capabilities
                        .map(|c| c.max_batch_total_size_bytes)
                        .filter(|&n| n > 0)
                        .map_or(DEFAULT_BATCH, |n| (n as u64).min(DEFAULT_BATCH));
                    self.batch_limit.store(limit, Ordering::Relaxed);
                    self.mark_up();
                }
                Err(status) if unreachable(&status) => {
                    self.mark_down(&crate::client::status_text(&status))
                }
                Err(status) => {
                    // It answers, but refuses us: everything else would fail the same way.
                    self.mark_down(&format!(
                        "it refuses this replica's calls: {:?}: {}",
                        status.code(),
                        crate::client::status_text(&status)
                    ))
                }
            }
        }
    }

    /// Whether local copies of action results may be served without asking the upstream:
    /// while they can be vouched for, or within `ac_max_staleness` of the last moment they
    /// could (the relay's stream dropped, the upstream unreachable, or its own upstream).
    fn copies_fresh(&self) -> bool {
        let f = self.freshness.lock();
        f.current()
            || f.current_at
                .is_some_and(|at| at.elapsed() < self.ac_max_staleness)
    }

    /// Whether this replica's copies can be vouched for right now (for [`CURRENT_HEADER`]).
    pub fn current(&self) -> bool {
        self.freshness.lock().current()
    }

    /// The relay is open and caught up (`true`), or no longer is.
    fn set_relay_open(&self, open: bool) {
        self.fresh(|f| f.relay_open = open);
    }

    /// Changes what freshness depends on; the moment it stops being current is remembered.
    fn fresh(&self, change: impl FnOnce(&mut Freshness)) {
        let mut f = self.freshness.lock();
        let was = f.current();
        change(&mut f);
        if was || f.current() {
            f.current_at = Some(Instant::now());
        }
    }
}

/// A failure that says the upstream could not be reached (rather than an answer from it).
fn unreachable(status: &Status) -> bool {
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => true,
        Code::Unavailable | Code::Unknown | Code::Internal => {
            std::error::Error::source(status).is_some()
        }
        _ => false,
    }
}
