//! Wires the store and the services into one gRPC server.
//!
//! `main` and the tests start hoard the same way: bind a listener, then call [`run`] with a
//! shutdown future. On shutdown, health goes NOT_SERVING first, in-flight calls finish, and the
//! store is flushed before `run` returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::invalidation::Invalidation;
use crate::metrics::Metrics;
use crate::namespace::{ActionResults, Policy};
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::health::health_server::HealthServer;
use crate::proto::reapi::{
    action_cache_server::ActionCacheServer, capabilities_server::CapabilitiesServer,
    content_addressable_storage_server::ContentAddressableStorageServer,
};
use crate::proto::watch::watch_server::WatchServer;
use crate::service::action_cache::ActionCacheService;
use crate::service::bytestream::ByteStreamService;
use crate::service::bytestream_read::ByteStreamRoutes;
use crate::service::capabilities::CapabilitiesService;
use crate::service::cas::CasService;
use crate::service::cas_routes::CasRoutes;
use crate::service::health::{HealthReporter, State};
use crate::service::watch::WatchService;
use crate::service::Limits;
use crate::store::{Housekeeping, Stores};
use crate::tls::Tls;
use crate::watch::EventLog;

/// HTTP/2 flow-control window of each stream.
const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window of each connection (shared by its streams).
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame a client may send us (SETTINGS_MAX_FRAME_SIZE; the protocol default is
/// 16 KiB). Upload data then arrives in frames of up to a WriteRequest each, so the transport
/// reads it in far fewer, larger socket reads; it is also what one frame may make a connection
/// buffer before it is decoded.
const MAX_FRAME_SIZE: u32 = 1 << 20;

/// How long the ops port's open connections may hold up the exit after the final flush.
const OPS_GRACE: Duration = Duration::from_secs(2);

/// How long in-flight calls may run on after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Opens the store named by `config` and serves on `listener` until `shutdown` completes. If
/// `config.ops_listen` is set, the ops port is bound first and answers while the store opens.
pub async fn run(
    listener: TcpListener,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let ops =
        match config.ops_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::Unavailable(format!("cannot listen on ops_listen {addr}: {e}"))
            })?),
            None => None,
        };
    run_with_ops(listener, ops, config, shutdown).await
}

/// [`run`] with the ops port on a listener the caller bound (tests bind 127.0.0.1:0).
pub async fn run_with_ops(
    listener: TcpListener,
    ops: Option<TcpListener>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    // Before the store opens: a bad certificate should not wait for a long start to be seen,
    // and a SIGHUP sent while a large store opens still reloads it.
    let tls = load_tls(config)?;
    let reloads = tokio::spawn(reload_on_sighup(tls.clone()));
    let health = HealthReporter::new();
    let metrics = Metrics::new(config)?;
    let metrics_at_exit = metrics.clone();
    // The ops port outlives the gRPC port: `/healthz` answers until the store is flushed.
    let (ops_stop, ops_stopped) = tokio::sync::oneshot::channel::<()>();
    let ops_task = ops.map(|ops| {
        tokio::spawn(crate::ops::serve(
            ops,
            health.clone(),
            metrics.clone(),
            config.limits.handshake_timeout.0,
            async move {
                let _ = ops_stopped.await;
            },
        ))
    });
    let served = async {
        let opening = config.clone();
        let opened = tokio::task::spawn_blocking(move || crate::store::open(&opening))
            .await
            .map_err(|e| Error::internal("opening the store", e))??;
        serve_all(
            listener,
            Served {
                stores: opened.stores,
                events: opened.events,
                replica: opened.replica,
            },
            config,
            tls,
            Reporting { health, metrics },
            shutdown,
        )
        .await
    }
    .await;
    reloads.abort();
    let _ = ops_stop.send(());
    if let Some(task) = ops_task {
        // A probe connection that stays open must not hold up the exit.
        match tokio::time::timeout(OPS_GRACE, task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "ops port failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "ops port task failed"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => tracing::debug!("ops port connections still open at exit"),
        }
    }
    // The figures up to the end reach an OTLP collector too.
    let _ = tokio::task::spawn_blocking(move || metrics_at_exit.shutdown()).await;
    served
}

/// Serves `stores` on `listener` until `shutdown` completes, then flushes them. Watch events
/// are kept in a temporary log that does not outlive the call (for stores built by hand, as in
/// tests); [`run`] persists them.
pub async fn serve(
    listener: TcpListener,
    stores: impl Into<Stores>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let tls = load_tls(config)?;
    let reloads = tokio::spawn(reload_on_sighup(tls.clone()));
    let events = Arc::new(EventLog::temporary(&config.watch)?);
    let health = HealthReporter::new();
    let metrics = Metrics::new(config)?;
    let served = serve_all(
        listener,
        Served {
            stores: stores.into(),
            events,
            replica: None,
        },
        config,
        tls,
        Reporting { health, metrics },
        shutdown,
    )
    .await;
    reloads.abort();
    served
}

/// The `[tls]` certificate, key and client CA, loaded; `None` without `[tls]`.
fn load_tls(config: &Config) -> Result<Option<Arc<Tls>>> {
    match &config.tls {
        Some(files) => Ok(Some(Arc::new(
            Tls::load(files).map_err(Error::FailedPrecondition)?,
        ))),
        None => Ok(None),
    }
}

/// On every SIGHUP, reloads the TLS certificate, key and client CA (new connections get them;
/// open ones keep theirs), or keeps the current ones if the files do not load.
async fn reload_on_sighup(tls: Option<Arc<Tls>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; no TLS reloads");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let Some(tls) = tls.clone() else {
            tracing::info!("SIGHUP: no [tls] section, nothing to reload");
            continue;
        };
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(summary)) => tracing::info!(summary = %summary, "SIGHUP: TLS reloaded"),
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "SIGHUP: TLS not reloaded; still serving the previous certificate"
            ),
            Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed"),
        }
    }
}

fn listener_is_loopback(listener: &TcpListener) -> bool {
    listener.local_addr().is_ok_and(|a| a.ip().is_loopback())
}

/// What the server reports through: its health state and its metrics (both also served on
/// the ops port, which exists before the server does).
struct Reporting {
    health: HealthReporter,
    metrics: Arc<Metrics>,
}

/// What the server serves: the store tree, its watch log, and on a replica the upstream's
/// action results.
struct Served {
    stores: Stores,
    events: Arc<EventLog>,
    replica: Option<Arc<crate::upstream::ActionCopies>>,
}

/// The server itself, reporting its state through `reporting`.
async fn serve_all(
    listener: TcpListener,
    served: Served,
    config: &Config,
    tls: Option<Arc<Tls>>,
    reporting: Reporting,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let Reporting { health, metrics } = reporting;
    let Served {
        stores,
        events,
        replica,
    } = served;
    let limits = Limits::from(&config.limits);
    let policy = Arc::new(Policy::new(&config.namespaces));
    let results = Arc::new(ActionResults::open(stores.actions.clone(), policy.clone()).await?);
    let assets = Arc::new(crate::asset::Assets::new(
        stores.cas.clone(),
        results.clone(),
        config.limits.max_message_size.0,
        config.asset.max_hold.0,
        crate::origin::Origin::new(&config.asset.fetch, spool_dir(config))?,
    ));
    let mut invalidation = Invalidation::new(results.clone(), events.clone(), metrics.clone());
    if let Some(copies) = &replica {
        invalidation = invalidation.on_replica_of(copies.upstream().uri());
    }
    let invalidation = Arc::new(invalidation);
    let housekeeping = stores.housekeeping.clone();
    metrics.watch_store(housekeeping.clone(), results.clone());
    let max_message = config.limits.max_message_size.0 as usize;
    let auth = Arc::new(crate::auth::Authenticator::new(config.auth.as_ref())?);
    if let Some(a) = &config.auth {
        let exposed = !listener_is_loopback(&listener);
        if exposed && a.anonymous >= crate::auth::Access::Write {
            tracing::warn!(
                anonymous = %a.anonymous,
                "callers without credentials may write on a non-loopback address"
            );
        }
        if exposed && config.tls.is_none() && !a.tokens.is_empty() {
            tracing::warn!(
                "bearer tokens travel in plaintext on a non-loopback address: add [tls] (see \
                 README, Security)"
            );
        }
        let mutual = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if !a.client_certs.is_empty() && !mutual {
            tracing::warn!(
                "[[auth.client_cert]] entries can never apply: [tls] client_ca is not set, so \
                 no client presents a certificate"
            );
        }
    }
    let forges =
        config.hooks.github_secret_file.is_some() || config.hooks.gitlab_token_file.is_some();
    if forges && config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
        tracing::warn!(
            "[hooks] GitHub/GitLab webhooks cannot reach this port: [tls] client_ca requires a \
             client certificate, which forges do not present; put a proxy without mTLS in front \
             of /hooks/ (README, VCS webhooks)"
        );
    }
    if !auth.enabled() && !listener_is_loopback(&listener) {
        tracing::warn!(
            "listening on a non-loopback address without an [auth] section: anyone who can \
             reach this port may write, invalidate and gc (see README, Security)"
        );
    }

    macro_rules! sized {
        ($server:expr) => {
            $server
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message)
        };
    }
    let hooks = match config.hooks.enabled() {
        true => Some(Arc::new(crate::hooks::Hooks::new(
            &config.hooks,
            config.namespaces.protected.clone(),
            invalidation.clone(),
            stores.actions.clone(),
            auth.clone(),
        )?)),
        false => None,
    };
    let oci = match config.oci_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                Error::Unavailable(format!("cannot listen on oci_listen {addr}: {e}"))
            })?;
            let registry = Arc::new(crate::oci::Registry::new(
                &config.oci,
                stores.cas.clone(),
                results.clone(),
                stores.actions.clone(),
                auth.clone(),
                metrics.clone(),
                oci_spool(config),
            )?);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(crate::oci::serve(
                listener,
                registry,
                config.limits.handshake_timeout.0,
                tls.clone(),
                config.limits.max_blob_size.0,
                async move {
                    let _ = stopped.await;
                },
            ));
            Some((stop, task))
        }
        None => None,
    };
    let router = tonic::transport::Server::builder()
        // HTTP/1.1 only for webhooks (forges deliver over it); HooksLayer answers every other
        // HTTP/1 request, so gRPC still goes over HTTP/2 alone.
        .accept_http1(true)
        // Large windows let a client stream big blobs without waiting for WINDOW_UPDATEs on
        // every few dozen KiB; they also bound what one stream or connection can buffer here.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        // Notice clients that vanished without closing (crashed CI runners, dropped NAT state),
        // so their streams and what those hold are released.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Bounds what one connection can open; refused streams get REFUSED_STREAM, which
        // clients retry.
        .max_concurrent_streams(config.limits.max_concurrent_streams)
        // A hard cap on what one header block may make the transport buffer; below it the
        // AuthLayer answers oversize metadata with a clear RESOURCE_EXHAUSTED.
        .http2_max_header_list_size(
            (config.limits.max_metadata_size.0.saturating_mul(4)).clamp(64 << 10, u32::MAX as u64)
                as u32,
        )
        // The serving stack, outermost first.
        .layer(
            tower::ServiceBuilder::new()
                .layer(crate::hooks::HooksLayer::new(hooks))
                .layer(crate::layers::MetricsLayer::new(metrics.clone()))
                .layer(tower::util::MapResponseLayer::new(
                    crate::layers::oversize_is_resource_exhausted,
                ))
                .layer(crate::layers::AuthLayer::new(
                    auth,
                    config.limits.max_metadata_size.0,
                    metrics.clone(),
                ))
                .layer(crate::layers::ShedLayer::new(
                    config.limits.max_concurrent_requests,
                    metrics.clone(),
                )),
        )
        .add_service(sized!(CapabilitiesServer::new({
            let service = CapabilitiesService::new(limits.clone()).with_policy(policy.clone());
            match &replica {
                Some(copies) => service.with_upstream(copies.upstream().clone()),
                None => service,
            }
        })))
        .add_service({
            // FindMissingBlobs is decoded by CasRoutes itself (no String per digest), the rest
            // by tonic.
            let cas = Arc::new(CasService::new(
                stores.cas.clone(),
                limits.clone(),
                policy.clone(),
                metrics.clone(),
            ));
            CasRoutes::new(
                cas.clone(),
                sized!(ContentAddressableStorageServer::from_arc(cas)),
                max_message,
            )
        })
        .add_service(sized!(ActionCacheServer::new({
            let service = ActionCacheService::new(
                stores.cas.clone(),
                results.clone(),
                limits.clone(),
                metrics.clone(),
            );
            match &replica {
                // The upstream announces what is stored; the relay brings its events here.
                Some(copies) => service.with_replica(copies.clone()),
                None => service.with_events(events.clone()),
            }
        })))
        .add_service({
            // Read is served by ByteStreamRoutes itself (no encode copy), the rest by tonic.
            let bytestream = Arc::new(
                ByteStreamService::new(stores.cas.clone(), limits.clone(), policy.clone())
                    .with_metrics(metrics.clone()),
            );
            ByteStreamRoutes::new(
                bytestream.clone(),
                sized!(ByteStreamServer::from_arc(bytestream)),
                max_message,
            )
        })
        .add_service(sized!(crate::proto::admin::admin_server::AdminServer::new(
            crate::service::admin::AdminService::new(
                housekeeping.clone(),
                results.clone(),
                invalidation.clone()
            )
            .with_metrics(metrics.clone())
        )))
        .add_service(sized!(crate::proto::asset::fetch_server::FetchServer::new(
            crate::service::asset::FetchService::new(assets.clone())
        )))
        .add_service(sized!(crate::proto::asset::push_server::PushServer::new(
            crate::service::asset::PushService::new(assets)
        )))
        .add_service(WatchServer::new(WatchService::new(
            events.clone(),
            metrics.clone(),
        )))
        .add_service(HealthServer::new(health.service()));

    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("reading the bound address", e))?;
    let tls_mode = match &tls {
        Some(tls) if tls.mutual() => "mTLS",
        Some(_) => "TLS",
        None => "plaintext",
    };
    let incoming = crate::connections::incoming(listener, config.limits.handshake_timeout.0, tls);
    health.set(State::Serving);
    let sweeper = tokio::spawn(sweep_abandoned_uploads(
        housekeeping.clone(),
        config.storage.abandoned_upload_age.0,
    ));
    let upkeep = tokio::spawn({
        let housekeeping = housekeeping.clone();
        async move { housekeeping.maintain().await }
    });
    let (stop_namespace_upkeep, namespace_upkeep_stopped) = tokio::sync::oneshot::channel::<()>();
    let namespace_upkeep = tokio::spawn({
        let results = results.clone();
        async move {
            results
                .upkeep(async move {
                    let _ = namespace_upkeep_stopped.await;
                })
                .await
        }
    });
    let readiness = tokio::spawn(report_writability(housekeeping.clone(), health.clone()));
    let relay = replica
        .clone()
        .map(|copies| tokio::spawn(crate::upstream::relay(copies, events.clone())));
    // A replica's namespaces are pruned at its upstream (and the drops relayed).
    let idle = config.namespaces.prune_idle_after.0;
    let pruning = (!idle.is_zero() && replica.is_none()).then(|| {
        tokio::spawn(prune_idle_namespaces(
            invalidation.clone(),
            idle,
            config.namespaces.protected.clone(),
        ))
    });
    tracing::info!(
        listen = %addr,
        data_dir = %config.data_dir.display(),
        transport = tls_mode,
        upstream = replica.as_ref().map(|c| c.upstream().uri()),
        "hoard is serving"
    );
    let (began_tx, began_rx) = tokio::sync::oneshot::channel();
    let draining = health.clone();
    let closing = events.clone();
    let drain_delay = config.drain_delay.0;
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown.await;
        tracing::info!("shutting down: health is NOT_SERVING, finishing in-flight calls");
        draining.set(State::Draining);
        // Watch streams never end on their own; they would hold the drain open.
        closing.close();
        if !drain_delay.is_zero() {
            // Keep serving while balancers notice NOT_SERVING and stop routing to us.
            tracing::info!(?drain_delay, "waiting before refusing new calls");
            tokio::time::sleep(drain_delay).await;
        }
        let _ = began_tx.send(());
    });
    // In-flight calls get a grace period; a stuck client must not keep us from flushing.
    let grace_expired = async {
        if began_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = server => r.map_err(|e| Error::internal("gRPC server", e)),
        _ = grace_expired => {
            tracing::warn!(?SHUTDOWN_GRACE, "calls still running after the grace period; dropping them");
            Ok(())
        }
    };
    if let Some((stop, task)) = oci {
        let _ = stop.send(());
        let _ = tokio::time::timeout(OPS_GRACE, task).await;
    }
    sweeper.abort();
    upkeep.abort();
    // Not aborted: a sweep's batch on a blocking thread would outlive the store's flush.
    let _ = stop_namespace_upkeep.send(());
    let _ = namespace_upkeep.await;
    readiness.abort();
    if let Some(relay) = relay {
        relay.abort();
    }
    if let Some(pruning) = pruning {
        pruning.abort();
    }
    // The log's syncer holds the database: wait for it to end, so a restart can reopen it.
    events.shutdown().await;
    if let Err(e) = results.persist().await {
        tracing::warn!(error = %e, "saving last uses of namespaces failed");
    }
    housekeeping.flush().await?;
    tracing::info!("store flushed");
    result
}

/// Keeps the `hoard.Writes` health status, and `/readyz`'s view of the store, in step with it.
async fn report_writability(store: Arc<dyn Housekeeping>, health: HealthReporter) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        health.set_writable(store.write_refusal().is_none());
        health.set_degraded(store.unavailable());
    }
}

/// Drops namespaces idle for `idle` (but not `protected` ones), checking every sixteenth of
/// `idle` (at most hourly), so one is dropped at most that much later than its time.
async fn prune_idle_namespaces(
    invalidation: Arc<Invalidation>,
    idle: Duration,
    protected: Vec<String>,
) {
    let period = (idle / 16).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        ticks.tick().await;
        match invalidation.prune_idle(idle.as_secs(), &protected).await {
            Ok(pruned) if pruned.is_empty() => {}
            Ok(pruned) => tracing::info!(dropped = pruned.len(), ?idle, "pruned idle namespaces"),
            Err(e) => tracing::warn!(error = %e, "pruning idle namespaces failed"),
        }
    }
}

/// Periodically deletes partial uploads older than `max_age`.
async fn sweep_abandoned_uploads(store: Arc<dyn Housekeeping>, max_age: Duration) {
    let period = (max_age / 4).min(Duration::from_secs(600));
    // Not at start: the sweep claims each upload id while it looks at it, and clients
    // resuming right after a restart must not find their id held (ABORTED).
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        ticks.tick().await;
        match store.remove_abandoned_uploads(max_age).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, ?max_age, "removed abandoned partial uploads"),
            Err(e) => tracing::warn!(error = %e, "sweeping abandoned uploads failed"),
        }
    }
}

/// Where OCI uploads are spooled: `data_dir/oci-uploads` for a durable store (emptied at
/// start: the data dir has one owner), else a temporary directory of this process's own.
fn oci_spool(config: &Config) -> Option<std::path::PathBuf> {
    let dir = spool_dir(config);
    (dir == config.data_dir).then(|| dir.join("oci-uploads"))
}

/// Where downloads from origin are spooled (as unnamed files): beside the data for a durable
/// store (or fast tier), the system's temporary directory otherwise.
fn spool_dir(config: &Config) -> std::path::PathBuf {
    use crate::config::{Backend, FastTier};
    match (config.storage.backend, config.storage.tiered.fast) {
        (Backend::Sled, _) | (Backend::Tiered, FastTier::Sled) => config.data_dir.clone(),
        _ => std::env::temp_dir(),
    }
}
