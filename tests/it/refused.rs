//! Metrics of writes that do not go as asked: refused writes by reason
//! (`hoard_refused_writes_total{reason}`, on both backends), upload resumes accepted and refused,
//! and a server with `telemetry.metrics = false` (404 on `/metrics`, serving as ever).

use hoard::config::{Backend, ByteSize, Config};
use hoard::proto::bytestream::QueryWriteStatusRequest;
use hoard::proto::reapi::{self, batch_update_blobs_request, BatchUpdateBlobsRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    blob, digest_of, download, fill_disk, lookup_result, missing, read_name, stats, update_result,
    upload, wait_writes_health, write_blob, write_name, write_requests, SmallDisk, TestServer,
};
use crate::metrics::{scrape, Scrape};

const REASONS: [&str; 5] = [
    "cache_full",
    "too_large",
    "disk_full",
    "read_only",
    "database_failed",
];

/// `hoard_refused_writes_total{reason}` for every reason, in `REASONS` order; a missing series
/// fails the test (every reason is served from the start, at 0).
fn refused(m: &Scrape) -> Vec<f64> {
    REASONS
        .iter()
        .map(|r| {
            m.value("hoard_refused_writes_total", &[("reason", r)])
                .unwrap_or_else(|| panic!("no refused writes series for {r}:\n{}", m.text))
        })
        .collect()
}

/// One blob through BatchUpdateBlobs: Ok, or the per-blob status code.
async fn batch_write(server: &TestServer, data: &[u8]) -> Result<(), tonic::Code> {
    let response = server
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest_of(data)),
                data: data.to_vec().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    match response.responses[0].status.as_ref().map_or(0, |s| s.code) {
        0 => Ok(()),
        code => Err(code.into()),
    }
}

fn with_backend(backend: Backend, max_size: u64) -> impl FnOnce(&mut Config) {
    move |c| {
        c.storage.backend = backend;
        c.storage.max_size = ByteSize(max_size);
    }
}

/// A full cache (everything within the default 3 h min_retention) and a blob larger than
/// max_size are counted under their own reasons, exactly, on both backends; the Admin Stats
/// total is their sum.
#[tokio::test]
async fn refused_writes_are_counted_by_reason_on_both_backends() {
    for backend in [Backend::Sled, Backend::Memory] {
        let server = TestServer::start_with(with_backend(backend, 1 << 20)).await;
        // An answered call means the store is open (its figures are served from then on).
        assert!(missing(&server, &[]).await.is_empty());
        let before = scrape(&server).await;
        assert_eq!(refused(&before), [0.0; 5], "{backend:?}: {}", before.text);

        // Larger than max_size: refused at the Write's first message, as too large.
        let huge = blob(2 << 20, 1);
        let d = digest_of(&huge);
        let err = write_blob(&server, &write_name("", "huge", &d), &huge, 0, 64 << 10)
            .await
            .expect_err("a blob above max_size was accepted");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(err.message().contains("max_size"), "{err}");

        // Fill the cache until a write is refused, then two more refusals.
        let mut accepted = 0;
        let mut seed = 100;
        loop {
            seed += 1;
            match batch_write(&server, &blob(100_000, seed)).await {
                Ok(()) => accepted += 1,
                Err(code) => {
                    assert_eq!(code, tonic::Code::ResourceExhausted, "{backend:?}");
                    break;
                }
            }
            assert!(
                accepted < 20,
                "{backend:?}: 2 MB accepted under a 1 MiB max_size"
            );
        }
        for _ in 0..2 {
            seed += 1;
            assert_eq!(
                batch_write(&server, &blob(100_000, seed)).await,
                Err(tonic::Code::ResourceExhausted),
                "{backend:?}"
            );
        }
        let m = scrape(&server).await;
        assert_eq!(
            refused(&m),
            [3.0, 1.0, 0.0, 0.0, 0.0],
            "{backend:?}: {}",
            m.text
        );
        let s = stats(&server).await;
        assert_eq!(
            (s.refused_writes, s.refused_cache_full, s.refused_too_large),
            (4, 3, 1),
            "{backend:?}: {s:?}"
        );
        server.stop().await;
    }
}

/// Another process fills the data dir's disk: once the store has noticed (hoard.Writes
/// NOT_SERVING), each write is refused up front and counted as disk_full, not as a full cache.
#[tokio::test]
async fn writes_refused_on_a_full_disk_are_counted_as_disk_full() {
    let Some(disk) = SmallDisk::mount_or_skip("64m") else {
        return;
    };
    let data_dir = disk.path.join("data");
    let server = TestServer::start_config(Config {
        data_dir,
        ..Config::default()
    })
    .await;
    upload(&server, "", &blob(5_000, 1)).await;
    let filler = fill_disk(&disk.path, "filler");
    assert!(
        wait_writes_health(&server.channel(), 2).await,
        "hoard.Writes stayed SERVING on a full disk"
    );
    let before = refused(&scrape(&server).await);
    for seed in 0..3 {
        assert_eq!(
            batch_write(&server, &blob(8_000, 10 + seed)).await,
            Err(tonic::Code::ResourceExhausted)
        );
    }
    let m = scrape(&server).await;
    let after = refused(&m);
    assert_eq!(after[2] - before[2], 3.0, "disk_full: {}", m.text);
    assert_eq!(after[0], 0.0, "cache_full: {}", m.text);
    server.stop().await;
    std::fs::remove_file(&filler).expect("remove the filler");
}

/// The first `len` bytes of an upload, then the stream ends unfinished.
async fn break_off(server: &TestServer, name: &str, data: &[u8], len: usize) {
    let mut requests = write_requests(name, &data[..len], 0, 64 << 10);
    if let Some(last) = requests.last_mut() {
        last.finish_write = false;
    }
    let ended = server
        .bytestream()
        .write(futures::stream::iter(requests))
        .await;
    assert!(ended.is_err(), "an unfinished upload is not acknowledged");
}

fn resumes(m: &Scrape) -> (Option<f64>, Option<f64>) {
    (
        m.value("hoard_upload_resumes_total", &[]),
        m.value("hoard_upload_resumes_refused_total", &[]),
    )
}

/// A Write that continues a broken-off upload at its committed size counts one resume; a Write
/// at an offset nothing was stored for counts one refused resume; fresh uploads count neither.
#[tokio::test]
async fn a_resumed_upload_counts_exactly_one_resume() {
    for backend in [Backend::Sled, Backend::Memory] {
        let server = TestServer::start_with(with_backend(backend, 64 << 20)).await;
        let m = scrape(&server).await;
        assert_eq!(resumes(&m), (Some(0.0), Some(0.0)), "{}", m.text);

        let data = blob(300_000, 7);
        let d = digest_of(&data);
        let name = write_name("", "00000000-0000-4000-8000-000000000007", &d);
        break_off(&server, &name, &data, 128 << 10).await;
        let committed = server
            .bytestream()
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await
            .expect("QueryWriteStatus")
            .into_inner()
            .committed_size;
        assert!(committed > 0, "{backend:?}: nothing persisted");
        let m = scrape(&server).await;
        assert_eq!(resumes(&m), (Some(0.0), Some(0.0)), "{}", m.text);

        write_blob(&server, &name, &data, committed as usize, 64 << 10)
            .await
            .expect("the resumed upload");
        let read = download(&server, &read_name("", &d), 0, 0).await;
        assert_eq!(read.expect("read back"), data, "{backend:?}");
        let m = scrape(&server).await;
        assert_eq!(resumes(&m), (Some(1.0), Some(0.0)), "{}", m.text);

        // An offset for an upload that was never started: refused, and counted as such.
        let other = blob(300_000, 8);
        let od = digest_of(&other);
        let err = write_blob(
            &server,
            &write_name("", "never", &od),
            &other,
            1000,
            64 << 10,
        )
        .await
        .expect_err("a resume of nothing was accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let m = scrape(&server).await;
        assert_eq!(resumes(&m), (Some(1.0), Some(1.0)), "{}", m.text);
        server.stop().await;
    }
}

/// `GET path` on the ops port: the status line and the body.
async fn get(server: &TestServer, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect(server.ops_addr())
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: hoard\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.expect("read");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

/// With `telemetry.metrics = false`, `/metrics` answers 404 saying why, and the server serves
/// as ever (the request layer records nothing, health still answers).
#[tokio::test]
async fn metrics_off_answers_404_and_the_server_still_serves() {
    let server = TestServer::start_with(|c| c.telemetry.metrics = false).await;
    let data = blob(200_000, 3);
    let d = upload(&server, "ci", &data).await;
    assert!(missing(&server, std::slice::from_ref(&d)).await.is_empty());
    let read = download(&server, &read_name("ci", &d), 0, 0).await;
    assert_eq!(read.expect("read back"), data);
    let action = digest_of(b"an action");
    let result = reapi::ActionResult {
        exit_code: 0,
        ..Default::default()
    };
    update_result(&server, "ci", &action, &result)
        .await
        .expect("UpdateActionResult");
    assert!(lookup_result(&server, "ci", &action).await.is_some());

    let (status, body) = get(&server, "/metrics").await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert!(
        body.contains("metrics are off (telemetry.metrics = false)"),
        "{body}"
    );
    let (status, _) = get(&server, "/healthz").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    server.stop().await;
}
