//! The serving stack's load shedding and the plaintext ops port, against a real server.

use std::time::Duration;

use hoard::proto::bytestream::WriteRequest;
use hoard::proto::health::health_check_response::ServingStatus;
use hoard::proto::health::health_client::HealthClient;
use hoard::proto::health::HealthCheckRequest;
use hoard::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use hoard::proto::reapi::FindMissingBlobsRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::common::{blob, digest_of, write_name, TestServer};

/// A channel to the server's ops port.
async fn ops_channel(server: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.ops_addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connect to the ops port")
}

/// `GET path` over HTTP/1.1 on `addr`: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: hoard\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.expect("read");
    let code = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// The server's overall gRPC health over `channel`, answered within a second.
async fn health(channel: Channel) -> ServingStatus {
    let mut client = HealthClient::new(channel);
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    let reply = tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .expect("health answers at once")
        .expect("health check");
    reply.into_inner().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_port_answers_probes_and_readyz_turns_503_during_drain() {
    let mut server = TestServer::start_with(|c| {
        c.drain_delay = hoard::config::HumanDuration(Duration::from_secs(3))
    })
    .await;
    let ops = server.ops_addr();
    assert_eq!(http_get(ops, "/healthz").await.0, 200);
    // The ops port answers from the start; ready only once the store is open.
    let mut ready = http_get(ops, "/readyz").await;
    for _ in 0..100 {
        if ready.0 == 200 {
            break;
        }
        assert_eq!(
            ready,
            (503, "starting\n".into()),
            "not ready only while starting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = http_get(ops, "/readyz").await;
    }
    assert_eq!(ready, (200, "ready\n".into()));
    assert_eq!(
        health(ops_channel(&server).await).await,
        ServingStatus::Serving
    );
    assert_eq!(http_get(ops, "/metrics-not-yet").await.0, 404);
    // No cache service is reachable on the ops port.
    let mut cas = ContentAddressableStorageClient::new(ops_channel(&server).await);
    let refused = cas
        .find_missing_blobs(FindMissingBlobsRequest::default())
        .await
        .expect_err("the ops port serves no cache data");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    // Drain: for `drain_delay` the gRPC port still serves, but readiness is withdrawn.
    server.begin_stop();
    let mut drained = false;
    for _ in 0..100 {
        if http_get(ops, "/readyz").await == (503, "draining\n".into()) {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(drained, "/readyz must turn 503 once draining begins");
    assert_eq!(
        http_get(ops, "/healthz").await.0,
        200,
        "the process still runs"
    );
    assert_eq!(
        health(ops_channel(&server).await).await,
        ServingStatus::NotServing
    );
    assert_eq!(health(server.channel()).await, ServingStatus::NotServing);
    server.stop().await;
    assert!(
        TcpStream::connect(ops).await.is_err(),
        "the ops port closes at exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_limit_is_shed_while_health_answers_on_both_ports() {
    const LIMIT: usize = 4;
    let server = TestServer::start_with(|c| c.limits.max_concurrent_requests = LIMIT as u32).await;
    let ops = server.ops_addr();
    // Uploads that stay open hold their permits: each is a call in progress.
    let data = blob(64 << 10, 7);
    let digest = digest_of(&data);
    let open_upload = |i: usize| {
        let (tx, rx) = mpsc::channel::<WriteRequest>(4);
        let first = WriteRequest {
            resource_name: write_name(
                "",
                &format!("00000000-0000-4000-8000-00000000000{i}"),
                &digest,
            ),
            write_offset: 0,
            finish_write: false,
            data: data[..1024].to_vec().into(),
        };
        tx.try_send(first).expect("queue the first chunk");
        let mut bytestream = server.bytestream();
        let call = tokio::spawn(async move {
            bytestream
                .write(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        (tx, call)
    };
    let (mut holds, mut calls): (Vec<_>, Vec<_>) = (0..LIMIT).map(open_upload).unzip();
    // Every further call is refused at once, saying why.
    let mut cas = server.cas();
    let mut shed = None;
    // An upload that arrived while a probe below held a permit is shed itself: it is opened
    // again (and its refusal counted below).
    let mut uploads_shed = 0;
    for _ in 0..250 {
        for i in 0..LIMIT {
            if !calls[i].is_finished() {
                continue;
            }
            let (tx, call) = open_upload(i);
            let ended = std::mem::replace(&mut calls[i], call).await.expect("task");
            holds[i] = tx;
            match ended {
                Err(status) if status.message() == "server overloaded" => uploads_shed += 1,
                // Any other ending holds no permit either: say how it ended.
                ended => panic!("upload {i} ended before it was finished: {ended:?}"),
            }
        }
        match cas
            .find_missing_blobs(FindMissingBlobsRequest::default())
            .await
        {
            Err(status) => {
                shed = Some(status);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let shed = shed.expect("calls beyond max_concurrent_requests are shed");
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert_eq!(shed.message(), "server overloaded");
    for _ in 0..20 {
        let status = cas
            .find_missing_blobs(FindMissingBlobsRequest::default())
            .await
            .expect_err("still overloaded");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }
    // Each refusal is counted, once.
    let metrics = crate::metrics::scrape(&server).await;
    assert_eq!(
        metrics.value("hoard_shed_requests_total", &[]),
        Some(21.0 + uploads_shed as f64),
        "{}",
        metrics.text
    );
    // Health is never shed, on either port.
    assert_eq!(health(server.channel()).await, ServingStatus::Serving);
    assert_eq!(
        health(ops_channel(&server).await).await,
        ServingStatus::Serving
    );
    assert_eq!(http_get(ops, "/readyz").await.0, 200);

    // Finishing the uploads frees the permits; calls are served again.
    for tx in holds {
        tx.send(WriteRequest {
            resource_name: String::new(),
            write_offset: 1024,
            finish_write: true,
            data: data[1024..].to_vec().into(),
        })
        .await
        .expect("queue the rest");
    }
    for call in calls {
        let written = call.await.expect("task").expect("upload completes");
        assert_eq!(written.into_inner().committed_size, data.len() as i64);
    }
    cas.find_missing_blobs(FindMissingBlobsRequest::default())
        .await
        .expect("served again once the flood is over");
}
