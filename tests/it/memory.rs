//! The memory backend (`storage.backend = "memory"`) behind a real server: what it stores,
//! and that it stays within `max_size` by LRU eviction while keeping the `min_retention`
//! promise (refusing writes instead), and how its uploads resume and give way.

use std::sync::Arc;
use std::time::Duration;

use hoard::config::{Backend, ByteSize, Config, HumanDuration};
use hoard::proto::bytestream::QueryWriteStatusRequest;
use hoard::proto::reapi;
use hoard::store::memory::MemoryStore;

use crate::common::{
    blob, digest_of, download, lookup_result, missing, read_name, stats, update_result, upload,
    wait_writes_health, write_name, write_requests, TestServer,
};

const HOUR: Duration = Duration::from_secs(3600);

/// A server over a memory store the test keeps a handle on (to move its clock).
async fn start(max_size: u64) -> (TestServer, MemoryStore, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut config = Config {
        data_dir: tmp.path().join("unused"),
        ..Config::default()
    };
    config.storage.backend = Backend::Memory;
    config.storage.max_size = ByteSize(max_size);
    config.storage.min_retention = HumanDuration(HOUR);
    let store = MemoryStore::from_config(&config).expect("memory store");
    let server = TestServer::start_store(Arc::new(store.clone()), config).await;
    (server, store, tmp)
}

#[tokio::test]
async fn the_memory_backend_serves_blobs_and_results_and_keeps_nothing_on_disk() {
    let server = TestServer::start_with(|c| c.storage.backend = Backend::Memory).await;
    let large = blob(3 << 20, 1);
    let d = upload(&server, "ci/main", &large).await;
    assert_eq!(
        download(&server, &read_name("ci/main", &d), 1 << 20, 1000)
            .await
            .expect("ranged read"),
        large[1 << 20..(1 << 20) + 1000]
    );
    let action = digest_of(b"action");
    let result = reapi::ActionResult {
        stdout_digest: Some(d.clone()),
        ..Default::default()
    };
    update_result(&server, "ci/main", &action, &result)
        .await
        .expect("UpdateActionResult");
    assert_eq!(
        lookup_result(&server, "ci/main", &action).await,
        Some(result)
    );
    assert_eq!(lookup_result(&server, "dev", &action).await, None);
    let s = stats(&server).await;
    assert_eq!((s.blobs, s.blob_bytes), (1, large.len() as u64), "{s:?}");
    assert_eq!(s.max_size, 1 << 30, "max_size 0 means 1 GiB in memory");
    assert!(
        !server.data_dir().exists(),
        "the memory backend creates no data dir"
    );
    server.stop().await;
}

#[tokio::test]
async fn least_recently_used_blobs_are_evicted_to_stay_within_max_size() {
    const BLOB: usize = 100_000;
    let (server, store, _tmp) = start(1_000_000).await;
    let first = upload(&server, "", &blob(BLOB, 0)).await;
    let second = upload(&server, "", &blob(BLOB, 1)).await;
    for seed in 2..9 {
        upload(&server, "", &blob(BLOB, seed)).await;
    }
    // Later, the first blob is used again; then more arrive than fit.
    store.advance_clock(2 * HOUR);
    assert!(missing(&server, std::slice::from_ref(&first))
        .await
        .is_empty());
    store.advance_clock(Duration::from_secs(60));
    for seed in 9..14 {
        upload(&server, "", &blob(BLOB, seed)).await;
    }
    let s = stats(&server).await;
    assert!(s.used_bytes <= 1_000_000, "{s:?}");
    assert!(s.evicted_blobs >= 4, "{s:?}");
    assert_eq!(
        missing(&server, &[first.clone(), second.clone()]).await,
        vec![second],
        "the least recently used blob goes first; the one used again stays"
    );
    server.stop().await;
}

#[tokio::test]
async fn blobs_used_within_min_retention_are_never_evicted_writes_are_refused_instead() {
    const BLOB: usize = 100_000;
    let (server, store, _tmp) = start(1_000_000).await;
    let kept: Vec<_> = futures::future::join_all((0..10).map(|seed| {
        let server = &server;
        async move { upload(server, "", &blob(BLOB, seed)).await }
    }))
    .await;
    let extra = blob(BLOB, 99);
    let refused = server
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(digest_of(&extra)),
                data: extra.clone().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    let status = refused.responses[0].status.clone().expect("status");
    assert_eq!(
        status.code,
        tonic::Code::ResourceExhausted as i32,
        "{status:?}"
    );
    assert!(status.message.contains("min_retention"), "{status:?}");
    assert!(
        missing(&server, &kept).await.is_empty(),
        "nothing was evicted"
    );
    assert!(
        wait_writes_health(&server.channel(), 2).await,
        "hoard.Writes is NOT_SERVING while writes are refused"
    );
    // Once they are older than min_retention, they make room.
    store.advance_clock(2 * HOUR);
    upload(&server, "", &extra).await;
    assert!(missing(&server, &[digest_of(&extra)]).await.is_empty());
    server.stop().await;
}

/// The first `len` bytes of an upload, sent and then broken off (the stream ends unfinished).
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

async fn write_status(server: &TestServer, name: &str) -> Result<i64, tonic::Code> {
    server
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.to_string(),
        })
        .await
        .map(|r| r.into_inner().committed_size)
        .map_err(|s| s.code())
}

#[tokio::test]
async fn uploads_resume_and_abandoned_ones_give_their_room_to_new_writes() {
    let (server, _store, _tmp) = start(1_000_000).await;
    let data = blob(600_000, 5);
    let d = digest_of(&data);
    let name = write_name("", "00000000-0000-4000-8000-000000000001", &d);
    break_off(&server, &name, &data, 400_000).await;
    assert_eq!(write_status(&server, &name).await, Ok(400_000));
    // A second blob needs room the abandoned upload holds: it gets it.
    let other = blob(700_000, 6);
    upload(&server, "", &other).await;
    assert_eq!(
        write_status(&server, &name).await,
        Err(tonic::Code::NotFound),
        "the abandoned upload gave up its room"
    );
    assert!(stats(&server).await.used_bytes <= 1_000_000);
    server.stop().await;
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_match_is_not_kept_for_resuming() {
    let (server, _store, _tmp) = start(1_000_000).await;
    let data = blob(300_000, 7);
    let d = digest_of(&data);
    let name = write_name("", "00000000-0000-4000-8000-000000000002", &d);
    let mut wrong = data.clone();
    wrong[1000] ^= 1;
    let refused = server
        .bytestream()
        .write(futures::stream::iter(write_requests(
            &name,
            &wrong,
            0,
            64 << 10,
        )))
        .await
        .expect_err("bytes that do not match the digest");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(
        write_status(&server, &name).await,
        Err(tonic::Code::NotFound)
    );
    assert_eq!(missing(&server, std::slice::from_ref(&d)).await, vec![d]);
    server.stop().await;
}
