use std::time::Duration;

use hoard::proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use hoard::resource_name::{Compression, ResourceName};

use crate::common::{
    blob, digest, digest_of, download, eventually, read_name, upload, write_blob, write_name,
    write_requests, TestServer,
};

#[tokio::test]
async fn small_and_large_blobs_round_trip() {
    let server = TestServer::start().await;
    for (len, instance) in [
        (0usize, ""),
        (10, "ci/main"),
        (70_000, ""),
        (3_000_123, "a/b/c"),
    ] {
        let data = blob(len, len as u64);
        let d = upload(&server, instance, &data).await;
        let got = download(&server, &read_name(instance, &d), 0, 0)
            .await
            .expect("read back");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "content of {len}-byte blob differs");
    }
}

#[tokio::test]
async fn reads_honour_offset_and_limit_and_reject_bad_ranges() {
    let server = TestServer::start().await;
    for len in [1000usize, 600_000] {
        let data = blob(len, 7);
        let d = upload(&server, "", &data).await;
        let name = read_name("", &d);
        let part = download(&server, &name, 100, 250).await.unwrap();
        assert_eq!(part, &data[100..350]);
        let tail = download(&server, &name, len as i64 - 10, 0).await.unwrap();
        assert_eq!(tail, &data[len - 10..]);
        let at_end = download(&server, &name, len as i64, 0).await.unwrap();
        assert!(at_end.is_empty());
        let over = download(&server, &name, 5, len as i64 * 2).await.unwrap();
        assert_eq!(over, &data[5..]);

        let err = download(&server, &name, -1, 0).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        let err = download(&server, &name, len as i64 + 1, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(err.message().contains("read_offset"));
        let err = download(&server, &name, 0, -3).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}

#[tokio::test]
async fn missing_blobs_and_malformed_names_get_clear_errors() {
    let server = TestServer::start().await;
    let d = digest_of(b"never uploaded");
    let err = download(&server, &read_name("", &d), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains(&d.hash));

    for name in [
        "blobs/abc/12".to_string(),
        format!("blobs/{}", d.hash),
        format!("blobs/{}/notanumber", d.hash),
        format!("../{}", read_name("", &d)),
        write_name("", "x", &d),
        format!("compressed-blobs/lz4/{}/{}", d.hash, d.size_bytes),
        ResourceName::read("", digest(&d))
            .compressed(Compression::Deflate)
            .to_string(),
    ] {
        let err = download(&server, &name, 0, 0).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(err.message().contains("resource name"), "{}", err.message());
    }

    // A grpc-encoding this server does not enable: UNIMPLEMENTED, as tonic answers it.
    let d = upload(&server, "", b"hello").await;
    let mut request = tonic::Request::new(hoard::proto::bytestream::ReadRequest {
        resource_name: read_name("", &d),
        read_offset: 0,
        read_limit: 0,
    });
    request
        .metadata_mut()
        .insert("grpc-encoding", "gzip".parse().unwrap());
    let err = server
        .bytestream()
        .read(request)
        .await
        .expect_err("gzip named");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");

    let data = b"hello".to_vec();
    let d = digest_of(&data);
    for name in [read_name("", &d), write_name("", "bad.id", &d)] {
        let err = write_blob(&server, &name, &data, 0, 100).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}");
    }
}

#[tokio::test]
async fn wrong_content_never_becomes_visible() {
    let server = TestServer::start().await;
    for len in [100usize, 200_000] {
        let data = blob(len, 1);
        let d = digest_of(&data);
        let name = write_name("", "u1", &d);
        let mut corrupted = data.clone();
        corrupted[len / 2] ^= 1;
        let err = write_blob(&server, &name, &corrupted, 0, 32 << 10)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("does not match"),
            "{}",
            err.message()
        );

        // Too many bytes for the declared size.
        let mut longer = data.clone();
        longer.push(0);
        let err = write_blob(&server, &write_name("", "u2", &d), &longer, 0, 32 << 10)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // Too few.
        let err = write_blob(
            &server,
            &write_name("", "u3", &d),
            &data[..len - 1],
            0,
            32 << 10,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        let err = download(&server, &read_name("", &d), 0, 0)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "nothing was stored");
    }
}

#[tokio::test]
async fn gaps_in_write_offsets_are_rejected() {
    let server = TestServer::start().await;
    let data = blob(200_000, 3);
    let d = digest_of(&data);
    let name = write_name("", "gap", &d);
    let mut reqs = write_requests(&name, &data, 0, 50_000);
    reqs[2].write_offset += 1;
    let err = server
        .bytestream()
        .write(futures::stream::iter(reqs))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("write_offset"), "{}", err.message());

    // A first message that starts mid-blob with nothing stored says where to start.
    let err = write_blob(&server, &write_name("", "fresh", &d), &data, 1000, 50_000)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("offset 0"), "{}", err.message());
}

/// QueryWriteStatus's committed size, or the error.
async fn committed(server: &TestServer, name: &str) -> Result<i64, tonic::Status> {
    server
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.to_string(),
        })
        .await
        .map(|s| s.into_inner().committed_size)
}

/// Asks QueryWriteStatus until it reports `want` (the server persists in the background).
async fn wait_for_committed(server: &TestServer, name: &str, want: i64) -> i64 {
    eventually(Duration::from_secs(5), || async {
        match committed(server, name).await {
            Ok(c) if c == want => Ok(c),
            other => Err(other),
        }
    })
    .await
}

/// Writes from `offset`, retrying while the server still winds down the interrupted stream
/// (ABORTED), as a real client would.
async fn resume(server: &TestServer, name: &str, data: &[u8], offset: usize) -> i64 {
    eventually(Duration::from_secs(5), || async {
        match write_blob(server, name, data, offset, 100_000).await {
            Ok(r) => Ok(r.into_inner().committed_size),
            Err(e) if e.code() == tonic::Code::Aborted => Err(e),
            Err(e) => panic!("resume at {offset} failed: {e}"),
        }
    })
    .await
}

#[tokio::test]
async fn interrupted_uploads_resume_at_the_committed_size() {
    let server = TestServer::start().await;
    let data = blob(1_000_000, 9);
    let d = digest_of(&data);
    let name = write_name("ci/main", "resume-me", &d);
    let reqs = write_requests(&name, &data, 0, 100_000);

    // The client sends four chunks, then its stream ends without finish_write.
    let err = server
        .bytestream()
        .write(futures::stream::iter(reqs[..4].to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("finish_write"), "{}", err.message());
    assert_eq!(wait_for_committed(&server, &name, 400_000).await, 400_000);

    // Wrong offsets are refused with the expected one in the message (once the interrupted
    // stream has wound down: until then the upload is busy, ABORTED)...
    let err = eventually(Duration::from_secs(5), || async {
        let e = write_blob(&server, &name, &data, 300_000, 100_000)
            .await
            .unwrap_err();
        match e.code() {
            tonic::Code::Aborted => Err(e),
            _ => Ok(e),
        }
    })
    .await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("400000"), "{}", err.message());

    // ...and the right one finishes the upload.
    assert_eq!(
        resume(&server, &name, &data, 400_000).await,
        data.len() as i64
    );
    let status = server
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.complete);
    assert_eq!(status.committed_size, data.len() as i64);
    let got = download(&server, &read_name("", &d), 0, 0).await.unwrap();
    assert!(got == data);
}

#[tokio::test]
async fn a_dropped_connection_keeps_what_arrived_for_resuming() {
    let server = TestServer::start().await;
    let data = blob(2_000_000, 10);
    let d = digest_of(&data);
    let name = write_name("", "dropped", &d);
    let reqs = write_requests(&name, &data, 0, 100_000);

    let (tx, rx) = mpsc::channel::<WriteRequest>(4);
    let mut client = server.bytestream();
    let call = tokio::spawn(async move { client.write(ReceiverStream::new(rx)).await });
    for r in &reqs[..8] {
        tx.send(r.clone()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort(); // the client vanishes mid-stream
    let _ = call.await;

    // Whatever the server got is kept; the client resumes from there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let committed = server
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .expect("the partial upload is known")
        .into_inner();
    assert!(!committed.complete);
    let at = committed.committed_size as usize;
    assert!(at > 0 && at <= 800_000, "committed {at}");
    assert_eq!(resume(&server, &name, &data, at).await, data.len() as i64);
    let got = download(&server, &read_name("", &d), 0, 0).await.unwrap();
    assert!(got == data);
}

#[tokio::test]
async fn a_stalled_write_is_ended_and_stays_resumable() {
    let server = TestServer::start_with(|c| {
        c.limits.write_idle_timeout = hoard::config::HumanDuration(Duration::from_secs(1));
    })
    .await;
    let data = blob(500_000, 11);
    let d = digest_of(&data);
    let name = write_name("", "stalled", &d);
    let reqs = write_requests(&name, &data, 0, 100_000);
    // One chunk, then silence with the stream left open.
    let (tx, rx) = mpsc::channel::<WriteRequest>(1);
    tx.send(reqs[0].clone()).await.unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        server.bytestream().write(ReceiverStream::new(rx)),
    )
    .await
    .expect("the server ends a stalled write")
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert!(err.message().contains("no data"), "{}", err.message());
    drop(tx);
    assert_eq!(wait_for_committed(&server, &name, 100_000).await, 100_000);
    assert_eq!(
        resume(&server, &name, &data, 100_000).await,
        data.len() as i64
    );
}

#[tokio::test]
async fn query_write_status_of_unknown_upload_is_not_found() {
    let server = TestServer::start().await;
    let d = digest_of(&blob(500_000, 4));
    let err = server
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: write_name("", "nobody", &d),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn writing_a_stored_blob_is_acknowledged_at_once() {
    let server = TestServer::start().await;
    let data = blob(400_000, 5);
    let d = upload(&server, "", &data).await;
    // Only the first chunk is sent and the stream stays open: the server answers anyway.
    let (tx, rx) = mpsc::channel::<WriteRequest>(1);
    let first = write_requests(&write_name("", "again", &d), &data, 0, 1000).remove(0);
    tx.send(first).await.unwrap();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        server.bytestream().write(ReceiverStream::new(rx)),
    )
    .await
    .expect("answered without the rest of the stream")
    .expect("write")
    .into_inner();
    assert_eq!(resp.committed_size, data.len() as i64);
    drop(tx);
}

#[tokio::test]
async fn concurrent_writers_of_one_blob_all_succeed() {
    let server = TestServer::start().await;
    for len in [30_000usize, 2_000_000] {
        let data = blob(len, 6);
        let d = digest_of(&data);
        let mut tasks = Vec::new();
        for i in 0..16 {
            let mut client = server.bytestream();
            let reqs = write_requests(&write_name("", &format!("w{i}"), &d), &data, 0, 64 << 10);
            tasks.push(tokio::spawn(async move {
                client.write(futures::stream::iter(reqs)).await
            }));
        }
        for t in tasks {
            let resp = t.await.unwrap().expect("concurrent write").into_inner();
            assert_eq!(resp.committed_size, len as i64);
        }
        let got = download(&server, &read_name("", &d), 0, 0).await.unwrap();
        assert!(got == data, "stored blob of {len} bytes is intact");
    }
}
