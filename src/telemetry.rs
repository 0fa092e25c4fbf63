//! Logs and traces: the `tracing` subscriber (`log_format` text or JSON on stderr), the span
//! every call runs in (`rpc_span`), and the OTLP exporters behind `telemetry.otlp_endpoint`
//! (spans here, metrics in `metrics.rs`). Services add what only they know, the namespace and
//! the digest, to the current span with [`record_namespace`] and [`record_digest`].

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogFormat, TelemetryConfig};

/// The target of the per-call spans; the OTLP layer listens to this target only, whatever
/// `RUST_LOG` says, so quieting the logs never drops traces.
pub const RPC_TARGET: &str = "hoard::rpc";

/// Whether spans are exported (an OpenTelemetry layer is installed): set once at start.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// How long an export to the collector may take before it is abandoned (the SDK then drops that
/// batch and tries the next one: a slow collector never holds up calls).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// What identifies hoard to a collector.
pub fn resource() -> Resource {
    Resource::builder()
        .with_service_name("hoard")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

/// The tracing set-up of a running server; [`Tracing::shutdown`] exports the spans still queued.
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    /// Exports what is queued and stops the exporter's thread. Blocking: call it off the async
    /// runtime's workers (or after the runtime is gone).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("hoard: exporting the last spans failed: {e}");
            }
        }
    }
}

/// Logging for commands other than `serve`: text on stderr at `RUST_LOG` (default info).
pub fn init_cli_logging() {
    let _ = tracing_subscriber::registry()
        .with(fmt_layer(LogFormat::Text).with_filter(env_filter()))
        .try_init();
}

/// The server's subscriber: log lines in `format` at `RUST_LOG` (default info), and with an
/// `otlp_endpoint` the per-call spans exported over OTLP/gRPC. Must run inside the tokio
/// runtime: the exporter's channel is bound to it.
pub fn init_server(format: LogFormat, telemetry: &TelemetryConfig) -> Result<Tracing, String> {
    let provider = match &telemetry.otlp_endpoint {
        Some(endpoint) => Some(tracer_provider(endpoint, telemetry.trace_sample_ratio)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("hoard"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(RPC_TARGET, tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(fmt_layer(format).with_filter(env_filter()))
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Tracing { provider })
}

fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Log lines on stderr, colored only on a terminal.
fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            Box::new(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
        }
        // The current span's fields (request_id, method, namespace) sit under "span", every
        // enclosing one under "spans".
        LogFormat::Json => Box::new(layer.json().with_ansi(false)),
    }
}

fn tracer_provider(endpoint: &str, ratio: f64) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot set up span export to {endpoint}: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        // A client's sampling decision (traceparent) is followed; otherwise `ratio` of the calls.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource())
        .build())
}

/// The OTLP metric exporter for `telemetry.otlp_endpoint`, pushing every `otlp_interval`.
pub fn metric_reader(
    telemetry: &TelemetryConfig,
) -> Result<
    Option<opentelemetry_sdk::metrics::PeriodicReader<opentelemetry_otlp::MetricExporter>>,
    String,
> {
    let Some(endpoint) = &telemetry.otlp_endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot set up metric export to {endpoint}: {e}"))?;
    Ok(Some(
        opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
            .with_interval(telemetry.otlp_interval.0)
            .build(),
    ))
}

/// A fresh id for one call: unique within the process (a counter), and unlikely to repeat
/// across restarts (it starts at a random point). 16 hex digits, cheap enough for every call.
pub fn request_id() -> String {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let mut seed = [0u8; 8];
        // Without the OS's generator ids still differ within the process, which is what
        // matters most; a start at 0 only makes them repeat across restarts.
        let _ = getrandom::fill(&mut seed);
        AtomicU64::new(u64::from_le_bytes(seed))
    });
    format!("{:016x}", next.fetch_add(1, Ordering::Relaxed))
}

/// The span a call runs in, from arrival until its reply ends. Its name is `service/method`
/// (OpenTelemetry's RPC conventions); the status and byte counts are filled in at the end by
/// the metrics layer, the namespace and digest by the service. A W3C `traceparent` (and
/// `tracestate`) in `headers` makes it a child of the client's span.
pub fn rpc_span(service: &str, method: &str, headers: &http::HeaderMap) -> tracing::Span {
    if !exporting() {
        // Only the log lines see this span: the fields they need, and nothing recorded at the
        // end, since every field the fmt layer keeps is formatted on each call (a few µs on a
        // call that takes 15).
        return tracing::info_span!(
            target: RPC_TARGET,
            "rpc",
            request_id = %request_id(),
            method = method,
            namespace = Empty,
        );
    }
    let span = tracing::info_span!(
        target: RPC_TARGET,
        "rpc",
        otel.name = format_args!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        request_id = %request_id(),
        namespace = Empty,
        digest = Empty,
        bytes_received = Empty,
        bytes_sent = Empty,
    );
    if headers.contains_key("traceparent") && !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        // Fails only when no OpenTelemetry layer is installed: then there is nothing to join.
        let _ = span.set_parent(parent);
    }
    span
}

/// Ends a call's span: its gRPC code and the bytes of the request and reply bodies (for the
/// exported span only; log lines get them from the `call finished` event).
pub fn finish_rpc_span(span: &tracing::Span, code: tonic::Code, received: u64, sent: u64) {
    if !exporting() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i32);
    // As i64: OpenTelemetry has no unsigned integers (a u64 would become a string).
    span.record("bytes_received", received.min(i64::MAX as u64) as i64);
    span.record("bytes_sent", sent.min(i64::MAX as u64) as i64);
    if server_error(code) {
        span.record("otel.status_code", "ERROR");
    }
}

/// The codes OpenTelemetry's RPC conventions count as a server's error (a client's mistake,
/// such as NOT_FOUND or INVALID_ARGUMENT, is not).
fn server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// The instance name a call is about, on the current call's span.
pub fn record_namespace(instance: &str) {
    tracing::Span::current().record("namespace", instance);
}

/// The digest a call is about (where there is one), on the current call's span (exported spans
/// only).
pub fn record_digest(digest: &impl Display) {
    if !exporting() {
        return;
    }
    tracing::Span::current().record("digest", tracing::field::display(digest));
}

/// Request headers as the W3C propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_differ_and_are_sixteen_hex_digits() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[test]
    fn client_errors_are_not_server_errors() {
        assert!(!server_error(tonic::Code::NotFound));
        assert!(!server_error(tonic::Code::InvalidArgument));
        assert!(!server_error(tonic::Code::Ok));
        assert!(server_error(tonic::Code::Internal));
        assert!(server_error(tonic::Code::Unavailable));
    }
}
