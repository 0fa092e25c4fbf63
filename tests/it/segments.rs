//! Small blobs in segment files: eviction gives their disk space back (compaction), every live
//! blob survives the moves byte for byte, and a data dir of the previous format (small blobs
//! inline in sled) is read and then moved into segments.

use std::path::Path;
use std::time::Duration;

use hoard::config::{ByteSize, HumanDuration};
use hoard::proto::admin::{GcRequest, VerifyRequest};
use hoard::proto::reapi;

use crate::common::{batch_put, blob, digest_of, eventually, missing, temp_config, TestServer};

const HOUR: Duration = Duration::from_secs(3600);

/// Bytes of the segment files in a data dir.
pub(crate) fn segment_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("segments"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Unpacks `tests/fixtures/NAME` (a data dir an older hoard wrote) into `data_dir`.
fn unpack_fixture(name: &str, data_dir: &Path) {
    std::fs::create_dir_all(data_dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(data_dir)
        .status()
        .expect("tar");
    assert!(status.success(), "unpacking {}", fixture.display());
}

async fn verified(server: &TestServer) -> hoard::proto::admin::VerifyResponse {
    server
        .admin()
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner()
}

async fn read_back(server: &TestServer, digests: &[reapi::Digest]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for chunk in digests.chunks(200) {
        let resp = server
            .cas()
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                digests: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .expect("batch read")
            .into_inner();
        for r in resp.responses {
            assert_eq!(r.status.map(|s| s.code), Some(0), "{:?}", r.digest);
            out.push(r.data.to_vec());
        }
    }
    out
}

#[tokio::test]
async fn evicting_half_the_small_blobs_gives_their_disk_space_back_and_keeps_the_rest_intact() {
    let (server, store, _tmp) = crate::common::start_with_clock(|c| {
        c.storage.segment_size = ByteSize(1 << 20);
        c.storage.min_retention = HumanDuration(HOUR);
    })
    .await;
    let blobs: Vec<Vec<u8>> = (0..2400)
        .map(|i| blob(3000 + (i % 7) * 100, i as u64))
        .collect();
    let digests: Vec<reapi::Digest> = blobs.iter().map(|b| digest_of(b)).collect();
    for chunk in blobs.chunks(100) {
        let refs: Vec<&[u8]> = chunk.iter().map(|b| b.as_slice()).collect();
        batch_put(&server, "", &refs).await;
    }
    let payload: u64 = blobs.iter().map(|b| b.len() as u64).sum();
    let before = segment_bytes(server.data_dir());
    assert!(
        before >= payload && before < payload + payload / 20,
        "segments hold the payload plus headers: {before} for {payload}"
    );
    // Every third blob is used again later, so eviction leaves holes in every segment.
    store.advance_clock(2 * HOUR);
    let kept: Vec<reapi::Digest> = digests.iter().step_by(3).cloned().collect();
    assert!(missing(&server, &kept).await.is_empty());
    let report = server
        .admin()
        .gc(GcRequest {
            target_bytes: Some(0),
        })
        .await
        .expect("gc")
        .into_inner();
    assert!(report.evicted_blobs >= 1500, "{report:?}");
    let after = segment_bytes(server.data_dir());
    assert!(
        after * 100 <= before * 45,
        "evicting 2/3 of the blobs must free most of their space: {before} -> {after}"
    );
    // The blobs used within retention are all there, byte for byte, after their moves.
    assert!(missing(&server, &kept).await.is_empty());
    let data = read_back(&server, &kept).await;
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d, &blobs[i * 3], "blob {i}");
    }
    let verify = verified(&server).await;
    assert!(verify.corrupt.is_empty(), "{verify:?}");
    assert_eq!(verify.checked_blobs, kept.len() as u64, "{verify:?}");
    assert_eq!(verify.orphans_removed, 0, "{verify:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_data_dir_of_format_4_is_read_then_its_small_blobs_move_into_segments() {
    // Written by hoard at commit e38b7a5 (format 4): 13 small blobs inline in sled (10 of
    // 2 KiB from `hoard-bench batch-update`, 3 outputs of `hoard-bench ac`) and 2 action
    // results, shut down cleanly.
    let (_tmp, mut config) = temp_config();
    unpack_fixture("format4-data-dir.tar.gz", &config.data_dir);
    config.storage.min_retention = HumanDuration(HOUR);
    let data_dir = config.data_dir.clone();
    let server = TestServer::start_config(config).await;
    let stats = crate::common::stats(&server).await;
    assert_eq!((stats.blobs, stats.action_results), (13, 2), "{stats:?}");
    // The upgrade moves them in the background; then sled's `blobs` tree is empty.
    eventually(Duration::from_secs(20), || async {
        if segment_bytes(&data_dir) >= 13 * 1024 {
            Ok(())
        } else {
            Err("not moved yet")
        }
    })
    .await;
    // verify re-hashes every blob where the index says it is: all 13 read back intact.
    let verify = verified(&server).await;
    assert_eq!(verify.checked_blobs, 13, "{verify:?}");
    assert!(verify.corrupt.is_empty(), "{verify:?}");
    assert_eq!(verify.orphans_removed, 0, "{verify:?}");
    server.stop().await;
    let db = sled::open(data_dir.join("sled")).unwrap();
    assert!(
        db.open_tree("blobs").unwrap().is_empty(),
        "inline data left"
    );
    let format = db.get("format").unwrap().map(|v| v.to_vec());
    assert_eq!(format, Some(6u32.to_be_bytes().to_vec()));
    drop(db);
    // And the moved blobs still serve after a restart.
    let (_tmp2, mut config) = temp_config();
    config.data_dir = data_dir.clone();
    let server = TestServer::start_config(config).await;
    let stats = crate::common::stats(&server).await;
    assert_eq!((stats.blobs, stats.action_results), (13, 2), "{stats:?}");
    let verify = verified(&server).await;
    assert_eq!((verify.checked_blobs, verify.corrupt.len()), (13, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_data_dir_of_format_5_is_upgraded_its_small_blobs_indexed_by_the_checkpoint_not_sled() {
    // Written by hoard at commit 8eca2b1 (format 5) with `storage.inline_threshold = "64KiB"`:
    // 13 small blobs in a segment, each with an entry in sled's `cas` tree and last uses in
    // `atime` (10 of 2 KiB from `hoard-bench batch-update`, 3 outputs of `hoard-bench ac`), one
    // 100 KiB file blob (`write-large`) and 2 action results; shut down cleanly.
    let (_tmp, mut config) = temp_config();
    unpack_fixture("format5-data-dir.tar.gz", &config.data_dir);
    config.storage.inline_threshold = ByteSize(64 << 10);
    let data_dir = config.data_dir.clone();
    let server = TestServer::start_config(config.clone()).await;
    let stats = crate::common::stats(&server).await;
    assert_eq!((stats.blobs, stats.action_results), (14, 2), "{stats:?}");
    let verify = verified(&server).await;
    assert_eq!(verify.checked_blobs, 14, "{verify:?}");
    assert!(verify.corrupt.is_empty(), "{verify:?}");
    assert_eq!(verify.orphans_removed, 0, "{verify:?}");
    server.stop().await;
    // sled keeps the file blob's entry only, and no last uses.
    let db = sled::open(data_dir.join("sled")).unwrap();
    let format = db.get("format").unwrap().map(|v| v.to_vec());
    assert_eq!(format, Some(6u32.to_be_bytes().to_vec()));
    assert_eq!(db.open_tree("cas").unwrap().len(), 1);
    assert!(!db.tree_names().iter().any(|n| &n[..] == b"atime"));
    drop(db);
    assert!(data_dir.join("index.checkpoint").exists());
    assert!(!data_dir.join("index.snapshot").exists());
    // After a clean restart, then after a SIGKILL (no checkpoint since the start), every blob
    // is still there and intact.
    let config_file = data_dir.with_file_name("hoard.toml");
    std::fs::write(&config_file, "[storage]\ninline_threshold = \"64KiB\"\n").unwrap();
    for crash in [false, true, false] {
        let mut command = crate::crash::Process::command(&data_dir);
        command.arg("--config").arg(&config_file);
        let process = crate::crash::Process::start_command(command).await;
        let mut admin =
            hoard::proto::admin::admin_client::AdminClient::new(process.channel.clone());
        let stats = admin
            .stats(hoard::proto::admin::StatsRequest {})
            .await
            .expect("stats")
            .into_inner();
        assert_eq!((stats.blobs, stats.action_results), (14, 2), "{stats:?}");
        let verify = admin
            .verify(VerifyRequest {})
            .await
            .expect("verify")
            .into_inner();
        assert_eq!(
            (verify.checked_blobs, verify.corrupt.len()),
            (14, 0),
            "{verify:?}"
        );
        if crash {
            process.kill9();
        } else {
            process.terminate().await;
        }
    }
}

#[tokio::test]
async fn one_batch_across_several_segments_is_stored_whole_and_survives_a_restart() {
    // 1 MiB segments and a 2.6 MB batch: its records are appended in one write per segment
    // they land in, so the batch spans at least three segments.
    let (_tmp, mut config) = temp_config();
    config.storage.segment_size = ByteSize(1 << 20);
    let data_dir = config.data_dir.clone();
    let server = TestServer::start_config(config).await;
    let blobs: Vec<Vec<u8>> = (0..40)
        .map(|i| blob(60_000 + i * 97, 500 + i as u64))
        .collect();
    let mut refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    // The same blob twice in one batch, and the empty blob: each answered OK, stored once.
    refs.push(&blobs[3]);
    refs.push(&[]);
    batch_put(&server, "", &refs).await;
    let digests: Vec<reapi::Digest> = blobs.iter().map(|b| digest_of(b)).collect();
    assert!(missing(&server, &digests).await.is_empty());
    let segments = std::fs::read_dir(data_dir.join("segments"))
        .unwrap()
        .count();
    assert!(segments >= 3, "{segments} segment files");
    let stats = crate::common::stats(&server).await;
    assert_eq!(stats.blobs, 40, "{stats:?}");
    let (_tmp2, mut config) = temp_config();
    config.data_dir = data_dir.clone();
    server.stop().await;
    let server = TestServer::start_config(config).await;
    let data = read_back(&server, &digests).await;
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d, &blobs[i], "blob {i}");
    }
    let verify = verified(&server).await;
    assert_eq!(
        (verify.checked_blobs, verify.corrupt.len()),
        (40, 0),
        "{verify:?}"
    );
    server.stop().await;
}
