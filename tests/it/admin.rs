//! The Admin service and `hoard stats|gc|verify`, against a running server and a stopped data dir.
//!
//! Stats, gc and verify are computed by the store; these tests check what an operator relies on:
//! the numbers describe what was uploaded, gc frees space but never breaks min_retention, verify
//! finds damage on disk, and the CLI reports the same through both paths with clear exit codes.

use std::path::Path;
use std::time::Duration;

use hoard::config::HumanDuration;
use hoard::proto::admin::{GcRequest, GcResponse, VerifyRequest};
use hoard::proto::reapi::{self, ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use hoard::store::{GcReport, StoreStats, VerifyReport};

use crate::common::{
    batch_put, blob, blob_path, digest_of, hoard, hoard_with, json, missing, one_line_failure,
    stats, stdout, upload, TestServer,
};

/// Above the 64 KiB inline threshold: stored as a file under data_dir/cas/.
const LARGE: usize = 200_000;
const SMALL: usize = 1_000;

async fn gc(server: &TestServer, target: Option<u64>) -> GcResponse {
    server
        .admin()
        .gc(GcRequest {
            target_bytes: target,
        })
        .await
        .expect("Gc")
        .into_inner()
}

/// Flips one byte in the middle of a stored blob file, keeping its length (bit rot).
fn corrupt(data_dir: &Path, d: &reapi::Digest) {
    let path = blob_path(data_dir, d);
    let mut bytes = std::fs::read(&path).expect("read the blob file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, bytes).expect("write the blob file");
}

/// Stores one small blob, one large blob and an action result naming the small one.
async fn store_some(server: &TestServer) -> (reapi::Digest, reapi::Digest) {
    let small = blob(SMALL, 11);
    let large = blob(LARGE, 12);
    batch_put(server, "", &[&small]).await;
    upload(server, "", &large).await;
    (digest_of(&small), digest_of(&large))
}

#[tokio::test]
async fn stats_describe_what_is_stored_and_how_lookups_went() {
    let server = TestServer::start().await;
    let (small, large) = store_some(&server).await;
    let action = digest_of(b"stats action");
    server
        .ac()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(ActionResult {
                stdout_digest: Some(small.clone()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateActionResult");

    let s = stats(&server).await;
    assert_eq!(s.blobs, 2);
    assert_eq!(s.blob_bytes, (SMALL + LARGE) as u64);
    assert_eq!(s.action_results, 1);
    assert!(s.action_result_bytes > 0);
    // The large blob counts in whole 4 KiB blocks.
    assert!(
        s.used_bytes >= s.blob_bytes + s.action_result_bytes,
        "{s:?}"
    );
    assert!(s.max_size > 0, "max_size defaults to a share of the disk");
    assert!(s.disk_bytes >= LARGE as u64, "{s:?}");
    assert_eq!(s.min_retention_secs, 3 * 3600);
    assert_eq!(s.write_refusal, None);

    // Three existence checks, two of them hits.
    let never_stored = digest_of(b"never stored");
    missing(&server, &[small.clone(), large.clone(), never_stored]).await;
    let after = stats(&server).await;
    assert_eq!(after.cas_lookups - s.cas_lookups, 3, "{after:?}");
    assert_eq!(after.cas_hits - s.cas_hits, 2, "{after:?}");

    // One action result found, one not.
    for digest in [action, digest_of(b"unknown action")] {
        let _ = server
            .ac()
            .get_action_result(GetActionResultRequest {
                action_digest: Some(digest),
                ..Default::default()
            })
            .await;
    }
    let last = stats(&server).await;
    assert_eq!(last.ac_lookups - after.ac_lookups, 2, "{last:?}");
    assert_eq!(last.ac_hits - after.ac_hits, 1, "{last:?}");
    server.stop().await;
}

#[tokio::test]
async fn gc_evicts_blobs_past_min_retention_down_to_the_target() {
    let server = TestServer::start_with(|c| {
        c.storage.min_retention = HumanDuration(Duration::from_millis(1));
    })
    .await;
    let (small, large) = store_some(&server).await;
    // Past the retention period even if use times are kept in whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let report = gc(&server, Some(0)).await;
    assert_eq!(report.evicted_blobs, 2, "{report:?}");
    // Counted as they count in used_bytes (whole blocks for files), so at least their sizes.
    assert!(report.evicted_bytes >= (SMALL + LARGE) as u64, "{report:?}");
    assert_eq!(report.used_bytes, 0, "{report:?}");
    assert!(report.reached_target, "{report:?}");

    let digests = [small, large.clone()];
    assert_eq!(missing(&server, &digests).await, digests);
    assert!(!blob_path(server.data_dir(), &large).exists());
    let s = stats(&server).await;
    assert_eq!((s.blobs, s.blob_bytes), (0, 0), "{s:?}");
    assert_eq!(s.evicted_blobs, 2, "{s:?}");
    assert_eq!(s.evicted_bytes, report.evicted_bytes, "{s:?}");
    assert!(s.youngest_evicted_age_secs.is_some(), "{s:?}");
    server.stop().await;
}

#[tokio::test]
async fn gc_never_evicts_blobs_used_within_min_retention() {
    let server = TestServer::start().await;
    let (small, large) = store_some(&server).await;

    let report = gc(&server, Some(0)).await;
    assert_eq!(report.evicted_blobs, 0, "{report:?}");
    assert!(!report.reached_target, "{report:?}");
    assert!(report.used_bytes >= (SMALL + LARGE) as u64, "{report:?}");

    // Far below the default max_size, the low watermark is already met.
    let report = gc(&server, None).await;
    assert_eq!(report.evicted_blobs, 0, "{report:?}");
    assert!(report.reached_target, "{report:?}");

    assert!(missing(&server, &[small, large]).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn verify_removes_corrupt_blobs_and_orphaned_files() {
    let server = TestServer::start().await;
    let (small, large) = store_some(&server).await;
    corrupt(server.data_dir(), &large);
    // A complete blob file no index entry names, as a crash between rename and index can leave.
    let orphan = blob(100_000, 13);
    let orphan_path = blob_path(server.data_dir(), &digest_of(&orphan));
    std::fs::create_dir_all(orphan_path.parent().unwrap()).unwrap();
    std::fs::write(&orphan_path, &orphan).unwrap();

    let report = server
        .admin()
        .verify(VerifyRequest {})
        .await
        .expect("Verify")
        .into_inner();
    assert_eq!(report.checked_blobs, 2, "{report:?}");
    assert_eq!(report.checked_bytes, (SMALL + LARGE) as u64, "{report:?}");
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert!(report.corrupt[0].starts_with(&large.hash), "{report:?}");
    assert_eq!(report.orphans_removed, 1, "{report:?}");
    assert_eq!(
        report.orphan_bytes_removed,
        orphan.len() as u64,
        "{report:?}"
    );
    assert!(!orphan_path.exists());

    // The damaged blob is gone, so clients upload it again; the intact one stays.
    assert_eq!(missing(&server, &[small, large.clone()]).await, [large]);
    let again = server
        .admin()
        .verify(VerifyRequest {})
        .await
        .expect("Verify")
        .into_inner();
    assert_eq!(again.checked_blobs, 1, "{again:?}");
    assert!(again.corrupt.is_empty(), "{again:?}");
    assert_eq!(again.orphans_removed, 0, "{again:?}");
    server.stop().await;
}

#[tokio::test]
async fn cli_stats_from_a_server_and_from_a_stopped_data_dir() {
    let server = TestServer::start().await;
    store_some(&server).await;
    let url = server.url();
    let dir = server.data_dir().to_str().unwrap().to_string();

    let out = hoard(&["stats", "--server", &url, "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json::<StoreStats>(&out).blobs, 2);

    // HOARD_SERVER is the default server; the human report names the count.
    let out = hoard_with(&["stats"], &[("HOARD_SERVER", &url)]).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("blobs") && l.contains(" 2 (")),
        "{text}"
    );

    // The running server holds the data dir: the error says to ask it instead.
    let err = one_line_failure(&hoard(&["stats", "--data-dir", &dir]).await);
    assert!(err.contains("in use") && err.contains("--server"), "{err}");

    let _tmp = server.stop().await;
    // An explicit --data-dir wins over an exported HOARD_SERVER.
    let out = hoard_with(
        &["stats", "--data-dir", &dir, "--json"],
        &[("HOARD_SERVER", "http://127.0.0.1:9")],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json::<StoreStats>(&out).blobs, 2);
}

#[tokio::test]
async fn cli_gc_and_verify_report_and_exit_by_outcome() {
    // Long enough that a loaded machine cannot outrun it before the first gc.
    let server = TestServer::start_with(|c| {
        c.storage.min_retention = "1h".parse().unwrap();
    })
    .await;
    let damaged = digest_of(&blob(LARGE, 21));
    let intact = digest_of(&blob(LARGE, 22));
    upload(&server, "", &blob(LARGE, 21)).await;
    upload(&server, "", &blob(LARGE, 22)).await;

    // Both blobs are within min_retention: nothing to evict, and that is not an error.
    let out = hoard(&["gc", "--server", &server.url(), "--target", "0", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let report: GcReport = json(&out);
    assert_eq!(report.evicted_blobs, 0, "{report:?}");
    assert!(!report.reached_target, "{report:?}");

    let dir = server.data_dir().to_path_buf();
    let _tmp = server.stop().await;
    corrupt(&dir, &damaged);
    let dir_arg = dir.to_str().unwrap();

    // Damage found: exit 1, with the report.
    let out = hoard(&["verify", "--data-dir", dir_arg, "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: VerifyReport = json(&out);
    assert_eq!(report.checked_blobs, 2, "{report:?}");
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert!(report.corrupt[0].starts_with(&damaged.hash), "{report:?}");

    // Clean now: exit 0.
    let out = hoard(&["verify", "--data-dir", dir_arg]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("corrupt: none"), "{}", stdout(&out));

    // With a config file (the server's data_dir, a 1s min_retention), past the retention period.
    let retention = "1s";
    let config = dir.parent().unwrap().join("hoard.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {dir:?}\n[storage]\nmin_retention = \"{retention}\"\n",
            dir = dir_arg
        ),
    )
    .unwrap();
    // Use times may be whole seconds: a blob used at second T is past a 1s retention from T+2.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = hoard(&[
        "gc",
        "--config",
        config.to_str().unwrap(),
        "--target",
        "0",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let report: GcReport = json(&out);
    assert_eq!(report.evicted_blobs, 1, "{report:?}");
    assert!(report.evicted_bytes >= LARGE as u64, "{report:?}");
    assert!(report.reached_target, "{report:?}");
    assert!(!blob_path(&dir, &intact).exists());
}

#[tokio::test]
async fn cli_errors_are_one_line_with_exit_status_2() {
    // Usage errors are clap's (several lines, status 2).
    let out = hoard(&["gc", "--target", "3parsecs"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3parsecs"),
        "{out:?}"
    );
    let out = hoard(&["stats", "--server", "127.0.0.1:1", "--data-dir", "x"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // TLS options for a plaintext server are a mistake, not something to ignore.
    let err = one_line_failure(
        &hoard(&[
            "stats",
            "--server",
            "http://127.0.0.1:1",
            "--tls-ca",
            "ca.pem",
        ])
        .await,
    );
    assert!(err.contains("use grpcs://"), "{err}");

    // Nothing listens on a port we bound and released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = one_line_failure(&hoard(&["verify", "--server", &closed.to_string()]).await);
    assert!(
        err.contains("cannot connect") && err.contains("--data-dir"),
        "{err}"
    );

    // A mistyped data dir is refused, not created.
    let tmp = tempfile::tempdir().unwrap();
    let typo = tmp.path().join("hoard-dta");
    let err = one_line_failure(&hoard(&["stats", "--data-dir", typo.to_str().unwrap()]).await);
    assert!(err.contains("not a hoard data dir"), "{err}");
    assert!(!typo.exists());
}
