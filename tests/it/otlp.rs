//! OTLP export: a real `hoard serve` process pushes its metrics and a span per call to an
//! OTLP/gRPC receiver started here (tonic services generated from the official OTLP protos),
//! follows the client's W3C `traceparent`, and logs each call's request id in JSON lines.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hoard::proto::reapi::{action_cache_client::ActionCacheClient, GetActionResultRequest};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use tonic::transport::Channel;

use crate::common::{digest_of, eventually, hoard_command};

/// What the receiver was sent.
#[derive(Clone, Default)]
struct Received {
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on 127.0.0.1; returns its `http://` address.
async fn start_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(received.clone()))
            .add_service(TraceServiceServer::new(received))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    format!("http://{addr}")
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// The sum of the data points of counter `name` whose attributes include all of `labels`, over
/// the latest export that has the counter at all (they are cumulative).
fn counter_value(
    exports: &[ExportMetricsServiceRequest],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<i64> {
    for export in exports.iter().rev() {
        let mut found = None;
        for resource in &export.resource_metrics {
            for scope in &resource.scope_metrics {
                for m in scope.metrics.iter().filter(|m| m.name == name) {
                    let Some(metric::Data::Sum(sum)) = &m.data else {
                        continue;
                    };
                    let mut total = 0;
                    for point in &sum.data_points {
                        let matches = labels.iter().all(|(k, v)| {
                            string_attribute(&point.attributes, k).as_deref() == Some(*v)
                        });
                        if matches {
                            total += match point.value {
                                Some(number_data_point::Value::AsInt(i)) => i,
                                Some(number_data_point::Value::AsDouble(d)) => d as i64,
                                None => 0,
                            };
                        }
                    }
                    found = Some(total);
                }
            }
        }
        if found.is_some() {
            return found;
        }
    }
    None
}

/// A `hoard serve` child whose stderr lines are kept.
struct Server {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    addr: String,
}

impl Server {
    async fn start(config: &str, dir: &std::path::Path) -> Server {
        let path = dir.join("hoard.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = hoard_command()
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--config")
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("RUST_LOG", "info,hoard::layers=debug")
            // The SDK's batch delay (default 5 s), so the test does not wait on it.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hoard");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        let seen = lines.clone();
        let addr = eventually(Duration::from_secs(60), || {
            let seen = seen.clone();
            async move {
                let lines = seen.lock().unwrap();
                lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find_map(|v| v["fields"]["listen"].as_str().map(str::to_string))
                    .ok_or_else(|| format!("no \"hoard is serving\" line yet: {lines:?}"))
            }
        })
        .await;
        Server { child, lines, addr }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GetActionResult miss with `traceparent` (no error on NOT_FOUND: that is the point).
async fn lookup(channel: &Channel, instance: &str, action: &[u8], traceparent: &str) {
    let mut request = tonic::Request::new(GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(digest_of(action)),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let status = ActionCacheClient::new(channel.clone())
        .get_action_result(request)
        .await
        .expect_err("a miss");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn metrics_and_a_span_per_call_reach_an_otlp_receiver() {
    let received = Received::default();
    let endpoint = start_receiver(received.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\notlp_interval = \"1s\"\n"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;

    // The client decided not to sample this one: no span may be exported for it.
    let trace_off = "0af7651916cd43dd8448eb211c80319c";
    lookup(
        &channel,
        "otlp/unsampled",
        b"action 0",
        &format!("00-{trace_off}-b7ad6b7169203331-00"),
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    lookup(
        &channel,
        "otlp/main",
        b"action 1",
        &format!("00-{trace_id}-{parent}-01"),
    )
    .await;
    let digest = digest_of(b"action 1");

    let spans = received.spans.clone();
    let span = eventually(Duration::from_secs(30), || {
        let spans = spans.clone();
        async move {
            let spans = spans.lock().unwrap();
            spans
                .iter()
                .find(|s| {
                    s.name == "build.bazel.remote.execution.v2.ActionCache/GetActionResult"
                        && hex::encode(&s.trace_id) == trace_id
                })
                .cloned()
                .ok_or_else(|| format!("no GetActionResult span yet among {}", spans.len()))
        }
    })
    .await;
    assert_eq!(
        hex::encode(&span.parent_span_id),
        parent,
        "the client's span is the parent"
    );
    assert_eq!(span.kind, SpanKind::Server as i32);
    let a = &span.attributes;
    assert_eq!(string_attribute(a, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        string_attribute(a, "rpc.service").as_deref(),
        Some("build.bazel.remote.execution.v2.ActionCache")
    );
    assert_eq!(
        string_attribute(a, "rpc.method").as_deref(),
        Some("GetActionResult")
    );
    assert_eq!(
        int_attribute(a, "rpc.grpc.status_code"),
        Some(5),
        "NOT_FOUND"
    );
    assert_eq!(
        string_attribute(a, "namespace").as_deref(),
        Some("otlp/main")
    );
    assert_eq!(
        string_attribute(a, "digest"),
        Some(format!("{}/{}", digest.hash, digest.size_bytes))
    );
    assert!(
        int_attribute(a, "bytes_received").is_some_and(|n| n > 0),
        "{a:?}"
    );
    let request_id = string_attribute(a, "request_id").expect("a request_id attribute");
    assert!(
        !received
            .spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| hex::encode(&s.trace_id) == trace_off),
        "a span the client did not sample was exported"
    );

    // The same id is on the call's log line.
    let lines = server.lines.lock().unwrap().clone();
    let logged = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["span"]["request_id"] == request_id.as_str());
    let logged = logged.unwrap_or_else(|| panic!("no log line names {request_id}: {lines:?}"));
    assert_eq!(logged["span"]["namespace"], "otlp/main", "{logged}");

    // The metrics: the two misses, by method and code, and by namespace.
    let exports = received.metrics.clone();
    eventually(Duration::from_secs(30), || {
        let exports = exports.clone();
        async move {
            let exports = exports.lock().unwrap();
            let calls = counter_value(
                &exports,
                "hoard_requests_total",
                &[("method", "GetActionResult"), ("code", "NotFound")],
            );
            let lookups = counter_value(
                &exports,
                "hoard_ac_lookups_total",
                &[("namespace", "otlp/main"), ("namespace_rule", "default")],
            );
            if calls == Some(2) && lookups == Some(1) {
                Ok(())
            } else {
                Err(format!(
                    "requests {calls:?}, lookups {lookups:?} after {} exports",
                    exports.len()
                ))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_bad_otlp_endpoint_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hoard.toml");
    std::fs::write(&path, "[telemetry]\notlp_endpoint = \"collector:4317\"\n").unwrap();
    let out = hoard_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
}
