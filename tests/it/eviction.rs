//! The size bound, LRU eviction, the retention promise and action-result TTLs, through gRPC to
//! a real server whose store clock the test moves forward (instead of waiting hours).

use std::sync::Arc;
use std::time::Duration;

use hoard::config::{ByteSize, HumanDuration, NamespaceRule};
use hoard::proto::reapi::{self, ActionResult, OutputFile};
use hoard::store::sled::{Options, SledStore};
use hoard::store::{Cas, Housekeeping};

use crate::common::{
    blob, blob_file, digest_of, eventually, lookup_result, missing, poll_until, start_with_clock,
    temp_config, update_result, write_blob, write_name, TestServer,
};

const HOUR: Duration = Duration::from_secs(3600);

/// Uploads through ByteStream; the error if the server refused it.
async fn try_upload(server: &TestServer, data: &[u8]) -> Result<reapi::Digest, tonic::Status> {
    let d = digest_of(data);
    write_blob(server, &write_name("", "u", &d), data, 0, 64 << 10)
        .await
        .map(|_| d)
}

/// The `hoard.Writes` health status.
async fn writes_health(server: &TestServer) -> i32 {
    crate::common::writes_health(&server.channel()).await
}

/// Polls until `done` holds for the store's stats (the upkeep loop ticks every second).
async fn wait_for(store: &SledStore, what: &str, done: impl Fn(&hoard::store::StoreStats) -> bool) {
    eventually(Duration::from_secs(10), || async {
        let stats = store.stats().await.unwrap();
        if done(&stats) {
            Ok(())
        } else {
            Err(format!("{what}: {stats:?}"))
        }
    })
    .await
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[tokio::test]
async fn eviction_keeps_the_size_bound_and_the_recently_used_blobs() {
    let (server, store, _tmp) = start_with_clock(|c| {
        c.storage.max_size = ByteSize(4 << 20);
        c.storage.min_retention = HumanDuration(HOUR);
    })
    .await;
    let size = 300 << 10; // file blobs: charged exactly their size
    let old: Vec<Vec<u8>> = (0..6).map(|i| blob(size, i)).collect();
    let mut old_d = Vec::new();
    for b in &old {
        old_d.push(try_upload(&server, b).await.unwrap());
    }
    store.advance_clock(2 * HOUR);
    // Two of the old blobs are used again (a FindMissingBlobs hit counts as use).
    assert!(missing(&server, &old_d[..2]).await.is_empty());
    store.advance_clock(2 * HOUR);
    let mut new_d = Vec::new();
    for i in 0..8 {
        let data = blob(size, 100 + i);
        // Eviction runs in the background; a write that finds no room is refused, and a client
        // retries it (as Bazel does on its next upload).
        let d = eventually(Duration::from_secs(5), || async {
            match try_upload(&server, &data).await {
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    assert!(e.message().contains("retry shortly"), "{}", e.message());
                    Err(e)
                }
                Err(e) => panic!("upload {i}: {e}"),
                ok => ok,
            }
        })
        .await;
        new_d.push(d);
    }
    let high = (4u64 << 20) * 95 / 100;
    wait_for(&store, "usage under the high watermark", |s| {
        s.used_bytes <= high && s.evicted_blobs >= 2
    })
    .await;
    let stats = store.stats().await.unwrap();
    assert!(stats.used_bytes <= 4 << 20, "{stats:?}");
    assert!(stats.evicted_blobs >= 2, "{stats:?}");
    // The least recently used went first: never a new blob, never the two used at 2h.
    assert!(missing(&server, &new_d).await.is_empty());
    assert!(missing(&server, &old_d[..2]).await.is_empty());
    let gone = missing(&server, &old_d[2..]).await;
    assert_eq!(gone.len() as u64, stats.evicted_blobs, "{stats:?}");
    // The youngest evicted blob had been unused for 4h.
    assert_eq!(stats.youngest_evicted_age_secs.map(|s| s / 3600), Some(4));
    // Evicted blobs are gone from disk too.
    for d in &gone {
        let path = blob_file(&server, d);
        assert!(!path.exists(), "{} still on disk", path.display());
    }
    server.stop().await;
}

#[tokio::test]
async fn blobs_within_min_retention_are_never_evicted_and_writes_say_why() {
    let (server, store, _tmp) = start_with_clock(|c| {
        c.storage.max_size = ByteSize(2 << 20);
        c.storage.min_retention = HumanDuration(3 * HOUR);
    })
    .await;
    let mut stored = Vec::new();
    let mut refusal = None;
    for i in 0..20 {
        match try_upload(&server, &blob(200 << 10, i)).await {
            Ok(d) => stored.push(d),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let first = refusal.expect("writes past max_size were accepted");
    assert_eq!(first.code(), tonic::Code::ResourceExhausted, "{first}");
    // Once the evictor has looked, the refusal names the promise that stops it.
    wait_for(&store, "eviction to give up", |s| s.write_refusal.is_some()).await;
    let err = try_upload(&server, &blob(200 << 10, 99)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("min_retention"), "{}", err.message());
    // Nothing was evicted to make room, and readiness for writes says so.
    assert!(missing(&server, &stored).await.is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.evicted_blobs, 0, "{stats:?}");
    assert!(stats.refused_writes >= 2, "{stats:?}");
    let _ = poll_until(Duration::from_secs(3), || async {
        match writes_health(&server).await {
            NOT_SERVING => Ok(()),
            status => Err(status),
        }
    })
    .await;
    assert_eq!(writes_health(&server).await, NOT_SERVING);

    // Past the retention period the old blobs may go, and writes succeed again.
    store.advance_clock(4 * HOUR);
    let again = blob(200 << 10, 99);
    let accepted = poll_until(Duration::from_secs(5), || try_upload(&server, &again))
        .await
        .ok();
    assert!(
        accepted.is_some(),
        "writes stayed refused after retention passed"
    );
    let serving = poll_until(Duration::from_secs(3), || async {
        match writes_health(&server).await {
            SERVING => Ok(()),
            status => Err(status),
        }
    })
    .await
    .is_ok();
    assert!(serving, "hoard.Writes did not return to SERVING");
    assert!(store.stats().await.unwrap().evicted_blobs > 0);
    server.stop().await;
}

fn result_with_output(out: &reapi::Digest) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(out.clone()),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    }
}

async fn put_result(server: &TestServer, instance: &str, action: &reapi::Digest, r: &ActionResult) {
    update_result(server, instance, action, r).await.unwrap();
}

async fn hit(server: &TestServer, instance: &str, action: &reapi::Digest) -> bool {
    lookup_result(server, instance, action).await.is_some()
}

#[tokio::test]
async fn action_results_expire_after_their_namespace_ttl_since_last_use() {
    let (server, store, _tmp) = start_with_clock(|c| {
        c.namespaces.default.ac_ttl = HumanDuration(30 * 24 * HOUR);
        c.namespaces.rules.push(NamespaceRule {
            pattern: "ci/branches/*".into(),
            ac_ttl: Some(HumanDuration(HOUR)),
            read: None,
            write: None,
        });
    })
    .await;
    let out = try_upload(&server, &blob(1000, 1)).await.unwrap();
    let action = digest_of(b"action");
    let r = result_with_output(&out);
    put_result(&server, "ci/branches/x", &action, &r).await;
    put_result(&server, "ci/main", &action, &r).await;

    store.advance_clock(Duration::from_secs(40 * 60));
    assert!(
        hit(&server, "ci/branches/x", &action).await,
        "used within its TTL"
    );
    // 80 minutes after it was stored, but 40 after its last use: still there.
    store.advance_clock(Duration::from_secs(40 * 60));
    assert!(
        hit(&server, "ci/branches/x", &action).await,
        "TTL counts from last use"
    );
    store.advance_clock(2 * HOUR);
    assert!(
        !hit(&server, "ci/branches/x", &action).await,
        "unused past its TTL"
    );
    assert!(
        hit(&server, "ci/main", &action).await,
        "main's TTL is 30 days"
    );
    // Expiry is counted by the namespace policy above the store: ask the server.
    let stats = crate::common::stats(&server).await;
    assert_eq!(stats.expired_action_results, 1, "{stats:?}");
    assert_eq!(stats.action_results, 1, "{stats:?}");
    server.stop().await;
}

#[tokio::test]
async fn action_results_whose_outputs_were_evicted_are_not_served() {
    let (server, store, _tmp) = start_with_clock(|c| {
        c.storage.min_retention = HumanDuration(HOUR);
    })
    .await;
    let out = try_upload(&server, &blob(100 << 10, 7)).await.unwrap();
    let action = digest_of(b"compile");
    put_result(&server, "", &action, &result_with_output(&out)).await;
    assert!(hit(&server, "", &action).await);
    store.advance_clock(2 * HOUR);
    let report = store.gc(Some(0)).await.unwrap();
    assert_eq!(report.evicted_blobs, 1, "{report:?}");
    assert!(
        !report.reached_target,
        "the action result itself still counts"
    );
    assert_eq!(missing(&server, std::slice::from_ref(&out)).await.len(), 1);
    assert!(
        !hit(&server, "", &action).await,
        "served a result whose output is gone"
    );
    server.stop().await;
}

#[tokio::test]
async fn last_use_survives_a_restart() {
    let (_tmp, config) = temp_config();
    let options = Options::from_config(&config);
    let (a, b) = (blob(100 << 10, 1), blob(100 << 10, 2));
    {
        let store = SledStore::open_with(&config.data_dir, options.clone()).unwrap();
        let server = TestServer::start_store(Arc::new(store.clone()), config.clone()).await;
        let da = try_upload(&server, &a).await.unwrap();
        try_upload(&server, &b).await.unwrap();
        store.advance_clock(5 * HOUR);
        assert!(missing(&server, &[da]).await.is_empty()); // a is used 5h later than b
        server.stop().await;
    }
    // After the restart (with the clock as far on), b is the older: a gc that can evict only
    // one blob below the retention cutoff evicts b.
    let store = SledStore::open_with(&config.data_dir, options).unwrap();
    store.advance_clock(5 * HOUR + 4 * HOUR);
    let stats = store.stats().await.unwrap();
    let report = store.gc(Some(stats.used_bytes - 1)).await.unwrap();
    assert_eq!(report.evicted_blobs, 1, "{report:?}");
    let left = store
        .find_missing(&[hoard::digest::Digest::of(&a), hoard::digest::Digest::of(&b)])
        .await
        .unwrap();
    assert_eq!(left, vec![hoard::digest::Digest::of(&b)]);
    store.flush().await.unwrap();
}
