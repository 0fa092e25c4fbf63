//! `GET /metrics` on the ops port: exact counts with the right labels after scripted traffic.

use std::collections::BTreeMap;

use hoard::config::NamespaceRule;
use hoard::proto::reapi::{self, FindMissingBlobsRequest, GetActionResultRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    batch_put, digest_of, download, lookup_result, read_name, update_result, TestServer,
};

const AC: &str = "build.bazel.remote.execution.v2.ActionCache";
const CAS: &str = "build.bazel.remote.execution.v2.ContentAddressableStorage";

/// One scrape: its content type and its samples, `name{labels}` → value.
pub struct Scrape {
    pub content_type: String,
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
    pub text: String,
}

impl Scrape {
    /// The value of the series `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// The series called `name`.
    pub fn series(&self, name: &str) -> Vec<&BTreeMap<String, String>> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, _)| l)
            .collect()
    }
}

/// `GET /metrics` on the server's ops port, parsed.
pub async fn scrape(server: &TestServer) -> Scrape {
    let mut conn = TcpStream::connect(server.ops_addr())
        .await
        .expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: hoard\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.expect("read");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .expect("a content type");
    // Chunked transfer encoding: drop the chunk-size lines (hex digits only).
    let text: String = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split("\r\n")
            .filter(|l| !l.chars().all(|c| c.is_ascii_hexdigit()))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        body.to_string()
    };
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(parse_sample)
        .collect();
    Scrape {
        content_type,
        samples,
        text,
    }
}

/// `name{a="x",b="y"} 3` (label values here never hold `"` or `,`).
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let (series, value) = line.rsplit_once(' ').expect("name and value");
    let value = value
        .parse()
        .unwrap_or_else(|_| panic!("value in {line:?}"));
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}')),
        None => (series, ""),
    };
    let labels = labels
        .split(',')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').expect("label=value");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    (name.to_string(), labels, value)
}

async fn find_missing(server: &TestServer, instance: &str, digests: &[reapi::Digest]) -> usize {
    server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: digests.to_vec(),
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner()
        .missing_blob_digests
        .len()
}

#[tokio::test]
async fn exact_ac_and_cas_counts_per_namespace_and_requests_by_code() {
    let server = TestServer::start_with(|c| {
        c.namespaces.rules.push(NamespaceRule {
            pattern: "team/*".into(),
            ac_ttl: None,
            read: None,
            write: None,
        })
    })
    .await;
    let result = reapi::ActionResult {
        exit_code: 0,
        ..Default::default()
    };
    let (a1, a2, a3) = (
        digest_of(b"action 1"),
        digest_of(b"action 2"),
        digest_of(b"action 3"),
    );
    // team/a (rule team/*): 3 lookups, 2 hits. solo (default): 2 lookups, 1 hit.
    update_result(&server, "team/a", &a1, &result)
        .await
        .unwrap();
    update_result(&server, "solo", &a3, &result).await.unwrap();
    assert!(lookup_result(&server, "team/a", &a1).await.is_some());
    assert!(lookup_result(&server, "team/a", &a1).await.is_some());
    assert!(lookup_result(&server, "team/a", &a2).await.is_none());
    assert!(lookup_result(&server, "solo", &a1).await.is_none());
    assert!(lookup_result(&server, "solo", &a3).await.is_some());
    // An invalid request never reaches the cache: not a lookup, but a call with its code.
    let bad = server
        .ac()
        .get_action_result(GetActionResultRequest {
            instance_name: "team/a".into(),
            action_digest: None,
            ..Default::default()
        })
        .await
        .expect_err("no action digest");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // CAS: one blob stored; team/a asks about 3 (1 found), solo about 2 (both found: one is
    // the empty blob, which always exists).
    let stored: &[u8] = b"stored blob";
    batch_put(&server, "", &[stored]).await;
    let (b1, b2, b3) = (
        digest_of(stored),
        digest_of(b"missing 2"),
        digest_of(b"missing 3"),
    );
    let b2_again = b2.clone();
    assert_eq!(
        find_missing(&server, "team/a", &[b1.clone(), b2, b3]).await,
        2
    );
    assert_eq!(
        find_missing(&server, "solo", &[b1.clone(), digest_of(b"")]).await,
        0
    );
    // A streamed reply's code comes in its trailers: one whole Read, one of a missing blob.
    let read = download(&server, &read_name("", &b1), 0, 0).await.unwrap();
    assert_eq!(read, stored);
    let gone = download(&server, &read_name("", &b2_again), 0, 0).await;
    assert_eq!(gone.unwrap_err().code(), tonic::Code::NotFound);

    let m = scrape(&server).await;
    assert!(
        m.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        m.content_type
    );
    let team = [("namespace", "team/a"), ("namespace_rule", "team/*")];
    let solo = [("namespace", "solo"), ("namespace_rule", "default")];
    assert_eq!(
        m.value("hoard_ac_lookups_total", &team),
        Some(3.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_ac_hits_total", &team),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_ac_lookups_total", &solo),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_ac_hits_total", &solo),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_cas_lookups_total", &team),
        Some(3.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_cas_found_total", &team),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_cas_lookups_total", &solo),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_cas_found_total", &solo),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(m.series("hoard_ac_lookups_total").len(), 2, "{}", m.text);

    let calls = |service: &str, method: &str, code: &str| {
        m.value(
            "hoard_requests_total",
            &[("service", service), ("method", method), ("code", code)],
        )
    };
    assert_eq!(calls(AC, "GetActionResult", "Ok"), Some(3.0), "{}", m.text);
    assert_eq!(
        calls(AC, "GetActionResult", "NotFound"),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        calls(AC, "GetActionResult", "InvalidArgument"),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        calls(AC, "UpdateActionResult", "Ok"),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        calls(CAS, "FindMissingBlobs", "Ok"),
        Some(2.0),
        "{}",
        m.text
    );
    assert_eq!(
        calls(CAS, "BatchUpdateBlobs", "Ok"),
        Some(1.0),
        "{}",
        m.text
    );
    let bytestream = "google.bytestream.ByteStream";
    assert_eq!(calls(bytestream, "Read", "Ok"), Some(1.0), "{}", m.text);
    assert_eq!(
        calls(bytestream, "Read", "NotFound"),
        Some(1.0),
        "{}",
        m.text
    );
    let timed = [("service", AC), ("method", "GetActionResult")];
    assert_eq!(
        m.value("hoard_request_duration_seconds_count", &timed),
        Some(6.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "hoard_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{}",
        m.text
    );
    // Health checks (probes) are not counted.
    assert!(m.text.contains("hoard_requests_total"));
    assert!(!m.text.contains("grpc.health.v1"), "{}", m.text);
}

#[tokio::test]
async fn namespaces_past_the_cap_are_counted_as_other() {
    let server = TestServer::start_with(|c| c.telemetry.max_namespace_labels = 50).await;
    let asked = [digest_of(b"not stored")];
    for i in 0..60 {
        find_missing(&server, &format!("ns-{i:02}"), &asked).await;
    }
    let m = scrape(&server).await;
    let series = m.series("hoard_cas_lookups_total");
    assert_eq!(series.len(), 51, "{}", m.text);
    for i in 0..50 {
        let name = format!("ns-{i:02}");
        let labels = [("namespace", name.as_str()), ("namespace_rule", "default")];
        assert_eq!(
            m.value("hoard_cas_lookups_total", &labels),
            Some(1.0),
            "{name}"
        );
    }
    let other = [("namespace", "other"), ("namespace_rule", "default")];
    assert_eq!(
        m.value("hoard_cas_lookups_total", &other),
        Some(10.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_cas_found_total", &other),
        Some(0.0),
        "{}",
        m.text
    );
}

#[tokio::test]
async fn authentication_failures_are_counted_by_reason() {
    let server = TestServer::start_with(|c| {
        c.auth = Some(hoard::auth::AuthConfig {
            anonymous: hoard::auth::Access::None,
            tokens: Vec::new(),
            client_certs: Vec::new(),
        })
    })
    .await;
    let ask = |authorization: Option<&'static str>| {
        let mut cas = server.cas();
        async move {
            let mut request = tonic::Request::new(FindMissingBlobsRequest::default());
            if let Some(a) = authorization {
                request
                    .metadata_mut()
                    .insert("authorization", a.parse().unwrap());
            }
            let e = cas.find_missing_blobs(request).await.expect_err("refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        }
    };
    ask(None).await;
    ask(Some("Bearer not-a-known-token")).await;
    ask(Some("Bearer not-a-known-token")).await;
    ask(Some("Bearer")).await;
    let m = scrape(&server).await;
    let reason = |r: &str| m.value("hoard_auth_failures_total", &[("reason", r)]);
    assert_eq!(reason("no_credentials"), Some(1.0), "{}", m.text);
    assert_eq!(reason("unknown_token"), Some(2.0), "{}", m.text);
    assert_eq!(reason("malformed"), Some(1.0), "{}", m.text);
    let refused = [
        ("service", CAS),
        ("method", "FindMissingBlobs"),
        ("code", "Unauthenticated"),
    ];
    assert_eq!(
        m.value("hoard_requests_total", &refused),
        Some(4.0),
        "{}",
        m.text
    );
}

#[tokio::test]
async fn store_figures_are_read_at_scrape_time() {
    let server =
        TestServer::start_with(|c| c.storage.max_size = hoard::config::ByteSize(64 << 20)).await;
    // Answered calls mean the store is open (the ops port serves before it is).
    assert_eq!(find_missing(&server, "", &[]).await, 0);
    let before = scrape(&server).await;
    assert_eq!(
        before.value("hoard_stored_blobs", &[]),
        Some(0.0),
        "{}",
        before.text
    );
    let (one, two): (&[u8], &[u8]) = (b"first blob", b"second, longer blob");
    batch_put(&server, "", &[one, two]).await;
    let m = scrape(&server).await;
    assert_eq!(m.value("hoard_stored_blobs", &[]), Some(2.0), "{}", m.text);
    let bytes = (one.len() + two.len()) as f64;
    assert_eq!(
        m.value("hoard_stored_blob_bytes", &[]),
        Some(bytes),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_max_size_bytes", &[]),
        Some((64 << 20) as f64),
        "{}",
        m.text
    );
    assert!(
        m.value("hoard_used_bytes", &[]).unwrap_or(0.0) >= bytes,
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_evicted_blobs_total", &[]),
        Some(0.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value("hoard_refused_writes_total", &[("reason", "cache_full")]),
        Some(0.0),
        "{}",
        m.text
    );
    assert!(
        m.text.contains("# TYPE hoard_evicted_blobs_total counter"),
        "{}",
        m.text
    );
    assert!(
        m.text.contains("# TYPE hoard_used_bytes gauge"),
        "{}",
        m.text
    );
    // Nothing evicted yet: no youngest evicted age.
    assert!(
        m.series("hoard_youngest_evicted_age_seconds").is_empty(),
        "{}",
        m.text
    );
}

#[tokio::test]
async fn invalidations_by_kind_and_open_watchers() {
    use hoard::proto::admin::InvalidateRequest;
    use hoard::proto::watch::{watch_client::WatchClient, WatchRequest};
    let server = TestServer::start().await;
    let result = reapi::ActionResult::default();
    let action = digest_of(b"action");
    update_result(&server, "ci/a", &action, &result)
        .await
        .unwrap();
    update_result(&server, "ci/b", &action, &result)
        .await
        .unwrap();
    let watch = WatchClient::new(server.channel())
        .watch(WatchRequest {
            from_now: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let requests = [
        InvalidateRequest {
            namespace: Some("ci/a".into()),
            action_digests: vec![action.clone()],
            reason: "one action".into(),
            ..Default::default()
        },
        InvalidateRequest {
            namespace: Some("ci/a".into()),
            reason: "one namespace".into(),
            ..Default::default()
        },
        InvalidateRequest {
            namespace_pattern: "ci/*".into(),
            reason: "two namespaces".into(),
            ..Default::default()
        },
    ];
    for request in requests {
        server
            .admin()
            .invalidate(request)
            .await
            .expect("invalidate");
    }
    let m = scrape(&server).await;
    let kind = |k: &str| m.value("hoard_invalidations_total", &[("kind", k)]);
    assert_eq!(kind("actions"), Some(1.0), "{}", m.text);
    assert_eq!(kind("namespace"), Some(3.0), "{}", m.text);
    assert_eq!(kind("dropped"), Some(0.0), "{}", m.text);
    assert_eq!(m.value("hoard_watchers", &[]), Some(1.0), "{}", m.text);
    assert!(m.text.contains("# TYPE hoard_watchers gauge"), "{}", m.text);
    // A stream the client drops is no longer counted (once the server notices).
    drop(watch);
    crate::common::eventually(std::time::Duration::from_secs(10), || async {
        let now = scrape(&server).await.value("hoard_watchers", &[]);
        if now == Some(0.0) {
            Ok(())
        } else {
            Err(now)
        }
    })
    .await;
}

#[tokio::test]
async fn bytes_received_and_sent_by_method() {
    let server = TestServer::start().await;
    let data = crate::common::blob(300 << 10, 7);
    let d = crate::common::upload(&server, "bytes", &data).await;
    let read = download(&server, &read_name("bytes", &d), 0, 0)
        .await
        .expect("read");
    assert_eq!(read.len(), data.len());
    let m = scrape(&server).await;
    let bytes = |name: &str, method: &str| {
        m.value(
            name,
            &[
                ("service", "google.bytestream.ByteStream"),
                ("method", method),
            ],
        )
        .unwrap_or_else(|| panic!("no {name} for {method}:\n{}", m.text))
    };
    let n = data.len() as f64;
    // The blob, plus per message a 5-byte gRPC frame header and the resource name or offsets.
    let received = bytes("hoard_received_bytes_total", "Write");
    assert!(
        received > n && received < n + 1024.0,
        "Write received {received}"
    );
    let sent = bytes("hoard_sent_bytes_total", "Read");
    assert!(sent > n && sent < n + 1024.0, "Read sent {sent}");
    // Small replies and requests are counted too, not just the blob's direction.
    assert!(bytes("hoard_sent_bytes_total", "Write") > 0.0);
    assert!(bytes("hoard_received_bytes_total", "Read") > 0.0);
}
