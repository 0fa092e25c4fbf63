//! Limits and damage: oversized blobs, bit rot on disk, abandoned uploads, restarts mid-upload.

use std::time::{Duration, SystemTime};

use hoard::config::{ByteSize, Config};
use hoard::proto::bytestream::QueryWriteStatusRequest;
use hoard::proto::reapi::{
    batch_update_blobs_request, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    GetCapabilitiesRequest,
};
use hoard::store::Housekeeping;

use crate::common::{
    batch_put, blob, blob_file, digest_of, download, missing, poll_until, read_name, temp_config,
    upload, wait_writes_health, write_blob, write_name, write_requests, TestServer,
};

#[tokio::test]
async fn blobs_above_the_max_size_are_refused() {
    let server = TestServer::start_with(|c| c.limits.max_blob_size = ByteSize(100_000)).await;
    let caps = server
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.cache_capabilities.unwrap().max_cas_blob_size_bytes,
        100_000
    );

    let big = blob(100_001, 1);
    let d = digest_of(&big);
    let err = write_blob(&server, &write_name("", "big", &d), &big, 0, 50_000)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("max_cas_blob_size_bytes"),
        "{}",
        err.message()
    );

    let resp = server
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.clone()),
                data: big.clone().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.responses[0].status.as_ref().unwrap().code,
        tonic::Code::InvalidArgument as i32
    );
    upload(&server, "", &blob(100_000, 2)).await; // at the limit is fine
}

async fn is_missing(server: &TestServer, d: &hoard::proto::reapi::Digest) -> bool {
    !missing(server, std::slice::from_ref(d)).await.is_empty()
}

#[tokio::test]
async fn a_blob_damaged_on_disk_is_never_served_and_is_removed() {
    let server = TestServer::start().await;

    // Bit rot in a large blob, read through ByteStream.
    let data = blob(3_000_000, 3);
    let d = upload(&server, "", &data).await;
    let path = blob_file(&server, &d);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1_234_567] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = download(&server, &read_name("", &d), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("damaged"), "{}", err.message());
    assert!(
        is_missing(&server, &d).await,
        "the damaged blob was dropped"
    );
    assert!(!path.exists());
    // The client can upload it again.
    upload(&server, "", &data).await;
    assert!(download(&server, &read_name("", &d), 0, 0).await.unwrap() == data);

    // A truncated file, read through BatchReadBlobs.
    let data = blob(500_000, 4);
    batch_put(&server, "", &[&data]).await;
    let d = digest_of(&data);
    let path = blob_file(&server, &d);
    std::fs::write(&path, &data[..1000]).unwrap();
    let resp = server
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![d.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.responses[0].status.as_ref().unwrap().code,
        tonic::Code::NotFound as i32
    );
    assert!(resp.responses[0].data.is_empty());
    assert!(is_missing(&server, &d).await);

    // A ranged read of a truncated file is refused too.
    let data = blob(400_000, 5);
    let d = upload(&server, "", &data).await;
    std::fs::write(blob_file(&server, &d), &data[..399_999]).unwrap();
    let err = download(&server, &read_name("", &d), 10, 100)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn an_upload_resumes_after_a_server_restart() {
    let (_tmp, config) = temp_config();
    // Resumed at an unaligned offset with several O_DIRECT windows (2 MiB) after it.
    let data = blob(6_000_123, 6);
    let d = digest_of(&data);
    let name = write_name("ci/main", "across-restart", &d);

    let server = TestServer::start_config(config.clone()).await;
    let reqs = write_requests(&name, &data, 0, 100_000);
    let _ = server
        .bytestream()
        .write(futures::stream::iter(reqs[..3].to_vec()))
        .await
        .unwrap_err(); // ended without finish_write
    server.stop().await;

    let server = TestServer::start_config(config).await;
    let status = server
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .expect("upload known after restart")
        .into_inner();
    assert_eq!(status.committed_size, 300_000);
    assert!(!status.complete);
    let resp = write_blob(&server, &name, &data, 300_000, 100_000)
        .await
        .expect("resumed after restart")
        .into_inner();
    assert_eq!(resp.committed_size, data.len() as i64);
    assert!(download(&server, &read_name("", &d), 0, 0).await.unwrap() == data);
    server.stop().await;
}

#[tokio::test]
async fn abandoned_partial_uploads_are_removed_after_their_age() {
    let server = TestServer::start().await;
    let data = blob(300_000, 7);
    let d = digest_of(&data);
    for id in ["old", "fresh"] {
        let reqs = write_requests(&write_name("", id, &d), &data, 0, 100_000);
        let _ = server
            .bytestream()
            .write(futures::stream::iter(reqs[..1].to_vec()))
            .await;
    }
    let dir = server.data_dir().to_path_buf();
    let _keep = server.stop().await; // the temp dir lives until the end of the test

    let uploads = dir.join("uploads");
    let old = uploads.join(format!("old-{}-{}", d.hash, d.size_bytes));
    let fresh = uploads.join(format!("fresh-{}-{}", d.hash, d.size_bytes));
    // The writers finish in the background: wait until both files hold their first chunk.
    let _ = poll_until(Duration::from_secs(2), || async {
        let lengths = [&old, &fresh].map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
        match lengths {
            [100_000, 100_000] => Ok(()),
            _ => Err(lengths),
        }
    })
    .await;
    assert!(old.exists() && fresh.exists());
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();

    let store = hoard::store::sled::SledStore::open(&dir, 64 << 10, 16 << 20).unwrap();
    let removed = store
        .remove_abandoned_uploads(Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert!(!old.exists());
    assert!(fresh.exists());
}

/// Needs root (to mount a tmpfs). Where that is not possible it says SKIPPED and returns,
/// unless HOARD_REQUIRE_DISK_FULL_TEST is set (CI sets it), in which case it fails.
#[tokio::test]
async fn a_full_disk_refuses_writes_clearly_and_keeps_serving_reads() {
    let Some(disk) = crate::common::SmallDisk::mount_or_skip("48m") else {
        return;
    };
    // Space held back so that freeing it later proves writes recover.
    let filler = disk.path.join("filler");
    std::fs::write(&filler, vec![0u8; 12 << 20]).unwrap();
    // max_size well above the disk, so the disk fills first. The test holds the store to move
    // its clock past the retention period later.
    let config = Config {
        data_dir: disk.path.join("data"),
        storage: hoard::config::StorageConfig {
            max_size: hoard::config::ByteSize(1 << 30),
            ..Default::default()
        },
        ..Config::default()
    };
    let store = hoard::store::sled::SledStore::from_config(&config).unwrap();
    let server = TestServer::start_store(std::sync::Arc::new(store.clone()), config).await;
    let small = blob(10_000, 1);
    let large = blob(2_000_000, 2);
    let small_d = upload(&server, "", &small).await;
    let large_d = upload(&server, "", &large).await;

    // Fills the disk with large uploads until one is refused.
    let fill = |round: u64| {
        let server = &server;
        async move {
            for i in 0..40u64 {
                let data = blob(4 << 20, round * 1000 + i);
                let d = digest_of(&data);
                if let Err(e) = write_blob(
                    server,
                    &write_name("", &format!("fill{round}-{i}"), &d),
                    &data,
                    0,
                    256 << 10,
                )
                .await
                {
                    return e;
                }
            }
            panic!("the disk never filled up");
        }
    };
    let err = fill(1).await;
    eprintln!("full disk: {}", err.message());
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("storage is full"),
        "{}",
        err.message()
    );
    // Another process takes what is left.
    let rest = crate::common::fill_disk(&disk.path, "rest");

    // What was stored before is still served, and the server still answers.
    assert!(
        download(&server, &read_name("", &small_d), 0, 0)
            .await
            .unwrap()
            == small
    );
    assert!(
        download(&server, &read_name("", &large_d), 0, 0)
            .await
            .unwrap()
            == large
    );
    // Readiness for writes reports the full disk (nothing is old enough to evict yet).
    assert!(
        wait_writes_health(&server.channel(), 2).await,
        "hoard.Writes stayed SERVING"
    );

    // Once space is free again, uploads succeed again, and readiness recovers.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&rest).unwrap();
    let after = blob(3_000_000, 999);
    let d = upload(&server, "", &after).await;
    assert!(download(&server, &read_name("", &d), 0, 0).await.unwrap() == after);
    assert!(
        wait_writes_health(&server.channel(), 1).await,
        "hoard.Writes stayed NOT_SERVING"
    );

    // Full again; this time blobs past their retention exist, and eviction makes the room.
    let err = fill(2).await;
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    let _rest = crate::common::fill_disk(&disk.path, "rest2");
    store.advance_clock(std::time::Duration::from_secs(4 * 3600));
    let again = blob(3_000_000, 998);
    let stored = poll_until(Duration::from_secs(5), || async {
        let d = digest_of(&again);
        write_blob(&server, &write_name("", "again", &d), &again, 0, 256 << 10).await
    })
    .await
    .is_ok();
    assert!(stored, "eviction did not make room on the full disk");
    let stats = hoard::store::Housekeeping::stats(&store).await.unwrap();
    assert!(stats.evicted_blobs > 0, "{stats:?}");
    server.stop().await;
}
