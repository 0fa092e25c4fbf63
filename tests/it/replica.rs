//! Regional replicas (`[upstream]`): a hoard in front of a central hoard, both real servers on
//! loopback. Read-through and backfill, write-through and the durable write-behind queue,
//! ByteStream resume through the replica, action-result coherence after invalidations at the
//! centre, the watch relay across restarts of either side, OUT_OF_RANGE, outages and chains.

use std::time::{Duration, Instant};

use hoard::config::Config;
use hoard::proto::admin::InvalidateRequest;
use hoard::proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use hoard::proto::reapi::{self, ActionResult, OutputFile};
use hoard::proto::watch::{watch_client::WatchClient, Event, EventKind, WatchRequest};
use tonic::transport::Channel;
use tonic::Code;

use crate::common::{
    batch_put, blob, digest_of, download, eventually, lookup_result, missing, read_name, stats,
    take, temp_config, update_result, upload, write_name, TestServer,
};
use crate::ops::http_get;

/// A config whose `[upstream]` is `centre`, on a fresh data dir.
fn replica_config(centre: &str, extra: &str) -> (tempfile::TempDir, Config) {
    let (tmp, base) = temp_config();
    let mut config = Config::parse(&format!("[upstream]\nendpoint = \"{centre}\"\n{extra}"))
        .expect("replica config");
    config.data_dir = base.data_dir;
    (tmp, config)
}

async fn replica_of(centre: &TestServer, extra: &str) -> (tempfile::TempDir, TestServer) {
    let (tmp, config) = replica_config(&centre.url(), extra);
    (tmp, TestServer::start_config(config).await)
}

/// A result whose one output file is `output` (stored in the CAS by the caller).
fn result_with(output: &reapi::Digest, exit_code: i32) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(output.clone()),
            ..Default::default()
        }],
        exit_code,
        ..Default::default()
    }
}

/// A whole blob read through ByteStream.
async fn read_all(server: &TestServer, d: &reapi::Digest) -> Vec<u8> {
    download(server, &read_name("", d), 0, 0)
        .await
        .expect("read")
}

/// Waits until a lookup of `action` in `instance` through `replica` is a hit from its local
/// copy: the centre sees no lookup for it.
async fn served_locally(
    centre: &TestServer,
    replica: &TestServer,
    instance: &str,
    action: &reapi::Digest,
) {
    eventually(Duration::from_secs(5), || async {
        let before = stats(centre).await.ac_lookups;
        let hit = lookup_result(replica, instance, action).await.is_some();
        let after = stats(centre).await.ac_lookups;
        match hit && after == before {
            true => Ok(()),
            false => Err(format!("hit {hit}, centre lookups {before} -> {after}")),
        }
    })
    .await;
}

/// Waits until `replica` vouches for its copies (its relay is open and caught up), as its
/// GetCapabilities answers say.
async fn relay_current(replica: &TestServer) {
    relay_current_over(replica.channel()).await
}

async fn relay_current_over(channel: Channel) {
    eventually(Duration::from_secs(10), || {
        let channel = channel.clone();
        async move {
            let reply = reapi::capabilities_client::CapabilitiesClient::new(channel)
                .get_capabilities(reapi::GetCapabilitiesRequest::default())
                .await
                .map_err(|e| e.to_string())?;
            match reply.metadata().get("hoard-upstream-current") {
                Some(v) if v == "1" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
}

/// Waits (up to 3 s) until `action` in `instance` is a miss at `server`; `why` describes a hit.
async fn no_longer_served(server: &TestServer, instance: &str, action: &reapi::Digest, why: &str) {
    eventually(Duration::from_secs(3), || async {
        match lookup_result(server, instance, action).await {
            None => Ok(()),
            Some(_) => Err(why.to_string()),
        }
    })
    .await;
}

/// The status a GetActionResult at `server` fails with (a hit fails the test).
async fn lookup_error(
    server: &TestServer,
    instance: &str,
    action: &reapi::Digest,
) -> tonic::Status {
    server
        .ac()
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err()
}

/// Invalidates the whole of `namespace` at `server`.
async fn invalidate_namespace(server: &TestServer, namespace: &str, reason: &str) {
    invalidate(
        server,
        InvalidateRequest {
            namespace: Some(namespace.into()),
            reason: reason.into(),
            ..Default::default()
        },
    )
    .await;
}

async fn invalidate(server: &TestServer, request: InvalidateRequest) {
    server
        .admin()
        .invalidate(request)
        .await
        .expect("invalidate at the centre");
}

fn action(n: u32) -> reapi::Digest {
    digest_of(format!("action {n}").as_bytes())
}

async fn watch(channel: Channel, start_after: u64) -> tonic::Streaming<Event> {
    WatchClient::new(channel)
        .watch(WatchRequest {
            start_after,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

#[tokio::test]
async fn reads_go_through_the_replica_and_are_backfilled() {
    let centre = TestServer::start().await;
    let small = blob(10_000, 1);
    let large = blob(5 << 20, 2);
    let small_d = upload(&centre, "", &small).await;
    let large_d = upload(&centre, "", &large).await;
    let (_tmp, replica) = replica_of(&centre, "").await;

    assert!(missing(&replica, &[small_d.clone(), large_d.clone()])
        .await
        .is_empty());
    let absent = digest_of(b"nowhere");
    assert_eq!(
        missing(&replica, std::slice::from_ref(&absent)).await,
        vec![absent]
    );
    assert_eq!(read_all(&replica, &small_d).await, small);
    assert_eq!(read_all(&replica, &large_d).await, large);

    // Backfilled: with the centre gone, the replica still serves both.
    centre.stop().await;
    assert_eq!(read_all(&replica, &small_d).await, small);
    assert_eq!(read_all(&replica, &large_d).await, large);
    assert!(missing(&replica, &[small_d, large_d]).await.is_empty());
}

#[tokio::test]
async fn writes_go_through_to_the_upstream_before_they_are_acknowledged() {
    let centre = TestServer::start().await;
    let (_tmp, replica) = replica_of(&centre, "").await;
    let a = blob(3000, 3);
    let b = blob(4000, 4);
    batch_put(&replica, "", &[&a, &b]).await;
    let large = blob(3 << 20, 5);
    let large_d = upload(&replica, "", &large).await;
    let wanted = [digest_of(&a), digest_of(&b), large_d.clone()];
    assert!(
        missing(&centre, &wanted).await.is_empty(),
        "the centre holds every blob"
    );
    assert_eq!(read_all(&centre, &large_d).await, large);

    // An action result stored through the replica is the centre's.
    let result = result_with(&digest_of(&a), 0);
    update_result(&replica, "ci/main", &action(1), &result)
        .await
        .unwrap();
    assert_eq!(
        lookup_result(&centre, "ci/main", &action(1)).await,
        Some(result.clone())
    );
    assert_eq!(
        lookup_result(&replica, "ci/main", &action(1)).await,
        Some(result)
    );

    // A blob that does not match its digest is refused and stored nowhere.
    let bad = reapi::Digest {
        hash: digest_of(b"something else").hash,
        size_bytes: a.len() as i64,
    };
    let refused = replica
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(bad.clone()),
                data: a.clone().into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = refused.responses[0].status.clone().unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32, "{status:?}");
    assert_eq!(
        missing(&centre, std::slice::from_ref(&bad)).await,
        vec![bad.clone()]
    );
    assert_eq!(
        missing(&replica, std::slice::from_ref(&bad)).await,
        vec![bad]
    );
}

#[tokio::test]
async fn an_upload_interrupted_at_the_replica_resumes_through_it() {
    let centre = TestServer::start().await;
    let (_tmp, replica) = replica_of(&centre, "").await;
    let data = blob(6 << 20, 6);
    let d = digest_of(&data);
    let name = write_name("", "4f7a2c1e-resume", &d);
    let half = 3 << 20;
    let first: Vec<WriteRequest> = data[..half]
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, chunk)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: false,
            data: chunk.to_vec().into(),
        })
        .collect();
    // The stream ends without finish_write: the upload stays open upstream.
    let _ = replica
        .bytestream()
        .write(futures::stream::iter(first))
        .await;
    let committed = eventually(Duration::from_secs(10), || {
        let mut bs = replica.bytestream();
        let name = name.clone();
        async move {
            let status = bs
                .query_write_status(QueryWriteStatusRequest {
                    resource_name: name,
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            match status.committed_size as usize {
                n if n == half => Ok(n),
                n => Err(format!("committed {n}")),
            }
        }
    })
    .await;
    let rest: Vec<WriteRequest> = vec![WriteRequest {
        resource_name: name.clone(),
        write_offset: committed as i64,
        finish_write: true,
        data: data[committed..].to_vec().into(),
    }];
    let reply = replica
        .bytestream()
        .write(futures::stream::iter(rest))
        .await
        .expect("resumed write")
        .into_inner();
    assert_eq!(reply.committed_size as usize, data.len());
    assert_eq!(read_all(&centre, &d).await, data);
    assert_eq!(read_all(&replica, &d).await, data);
}

#[tokio::test]
async fn a_replica_hit_stops_within_the_bound_after_an_invalidation_at_the_centre() {
    let centre = TestServer::start().await;
    let (_tmp, replica) = replica_of(&centre, "").await;
    let output = blob(100, 7);
    let out_d = upload(&centre, "", &output).await;
    for n in 1..=3 {
        update_result(&centre, "ci/main", &action(n), &result_with(&out_d, 0))
            .await
            .unwrap();
    }
    // Copies made at the replica (the relay must be open for them to be served locally).
    for n in 1..=3 {
        assert!(lookup_result(&replica, "ci/main", &action(n))
            .await
            .is_some());
    }

    // One action invalidated at the centre.
    let at = Instant::now();
    invalidate(
        &centre,
        InvalidateRequest {
            namespace: Some("ci/main".into()),
            action_digests: vec![action(1)],
            reason: "test".into(),
            ..Default::default()
        },
    )
    .await;
    no_longer_served(&replica, "ci/main", &action(1), "still a hit").await;
    let action_bound = at.elapsed();
    assert!(lookup_result(&replica, "ci/main", &action(2))
        .await
        .is_some());

    // A newer result stored at the centre replaces the replica's copy.
    update_result(&centre, "ci/main", &action(2), &result_with(&out_d, 7))
        .await
        .unwrap();
    eventually(Duration::from_secs(3), || async {
        match lookup_result(&replica, "ci/main", &action(2)).await {
            Some(r) if r.exit_code == 7 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The whole namespace invalidated at the centre.
    invalidate_namespace(&centre, "ci/main", "toolchain").await;
    no_longer_served(&replica, "ci/main", &action(3), "still a hit").await;
    eprintln!("action invalidation reached the replica's lookups in {action_bound:?}");
}

#[tokio::test]
async fn a_copy_found_through_a_read_chain_follows_the_namespace_it_came_from() {
    let chained = "[[namespaces.rule]]\npattern = \"ci/branches/*\"\nread = [\"ci/main\"]\n";
    let centre = TestServer::start_with(|c| {
        c.namespaces = Config::parse(chained).unwrap().namespaces;
    })
    .await;
    let (_tmp, replica) = replica_of(&centre, "").await;
    let out_d = upload(&centre, "", &blob(10, 8)).await;
    update_result(&centre, "ci/main", &action(9), &result_with(&out_d, 0))
        .await
        .unwrap();
    // Found through the branch's chain, in ci/main: the centre says so.
    let reply = centre
        .ac()
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: "ci/branches/x".into(),
            action_digest: Some(action(9)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reply.metadata().get("hoard-namespace").unwrap(), "ci/main");
    assert!(lookup_result(&replica, "ci/branches/x", &action(9))
        .await
        .is_some());
    invalidate_namespace(&centre, "ci/main", "test").await;
    no_longer_served(
        &replica,
        "ci/branches/x",
        &action(9),
        "the branch's copy from ci/main is still served",
    )
    .await;
}

/// Invalidates action `n` of `ci/main` at the centre: one event.
async fn one_event(centre: &TestServer, n: u32) {
    invalidate(
        centre,
        InvalidateRequest {
            namespace: Some("ci/main".into()),
            action_digests: vec![action(n)],
            reason: format!("event {n}"),
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test]
async fn the_watch_relay_loses_and_repeats_nothing_across_restarts_of_either_side() {
    let (centre_tmp, centre_config) = temp_config();
    let centre = TestServer::start_config(centre_config.clone()).await;
    let centre_addr = centre.addr();
    let (replica_tmp, replica_config) = replica_config(&centre.url(), "");
    let replica = TestServer::start_config(replica_config.clone()).await;
    let mut stream = watch(replica.channel(), 0).await;
    relay_current(&replica).await;
    for n in 1..=5 {
        one_event(&centre, n).await;
    }
    let mut seen = take(&mut stream, 5).await;
    drop(stream);

    // The replica restarts; events happen at the centre meanwhile.
    replica.stop().await;
    for n in 6..=8 {
        one_event(&centre, n).await;
    }
    let replica = TestServer::start_config(replica_config.clone()).await;
    let last = seen.last().unwrap().sequence;
    let mut stream = watch(replica.channel(), last).await;
    seen.extend(take(&mut stream, 3).await);

    // The centre restarts (same data dir and address); the replica resumes after it.
    centre.stop().await;
    let centre = TestServer::start_config_at(centre_config, centre_addr).await;
    // The replica's relay may be reconnecting: it must not lose these.
    for n in 9..=11 {
        one_event(&centre, n).await;
    }
    seen.extend(take(&mut stream, 3).await);

    let reasons: Vec<String> = seen.iter().map(|e| e.reason.clone()).collect();
    let expected: Vec<String> = (1..=11).map(|n| format!("event {n}")).collect();
    assert_eq!(reasons, expected, "every centre event once, in order");
    let upstream: Vec<u64> = seen.iter().map(|e| e.upstream_sequence).collect();
    assert!(upstream.windows(2).all(|w| w[0] < w[1]), "{upstream:?}");
    let local: Vec<u64> = seen.iter().map(|e| e.sequence).collect();
    assert!(local.windows(2).all(|w| w[0] < w[1]), "{local:?}");
    // Nothing more: no event repeated after the restarts.
    let more = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
    assert!(more.is_err(), "an extra event: {more:?}");
    drop((centre_tmp, replica_tmp));
}

#[tokio::test]
async fn when_the_upstream_log_moved_on_the_replica_drops_its_copies_and_tells_watchers_to_resync()
{
    let (_ctmp, mut centre_config) = temp_config();
    centre_config.watch.retained_events = 5;
    let centre = TestServer::start_config(centre_config).await;
    let out_d = upload(&centre, "", &blob(10, 9)).await;
    update_result(&centre, "ci/main", &action(1), &result_with(&out_d, 0))
        .await
        .unwrap();
    let (_rtmp, replica_config) = replica_config(&centre.url(), "");
    let replica = TestServer::start_config(replica_config.clone()).await;
    relay_current(&replica).await;
    one_event(&centre, 100).await;
    let mut stream = watch(replica.channel(), 0).await;
    let first = take(&mut stream, 1).await;
    drop(stream);
    assert!(lookup_result(&replica, "ci/main", &action(1))
        .await
        .is_some());
    replica.stop().await;

    // While the replica is down, more invalidations than the centre keeps; one of them hits
    // the replica's copy.
    one_event(&centre, 1).await;
    for n in 2..=12 {
        one_event(&centre, n + 100).await;
    }
    let replica = TestServer::start_config(replica_config).await;
    // A watcher resuming from before the gap is told to resync.
    let refused = eventually(Duration::from_secs(5), || {
        let channel = replica.channel();
        let after = first[0].sequence;
        async move {
            let mut s = watch(channel, after).await;
            match s.message().await {
                Err(status) if status.code() == Code::OutOfRange => Ok(status),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(
        refused.message().contains("resync"),
        "{}",
        refused.message()
    );
    // The stale copy is gone: the invalidation it missed is honoured.
    assert_eq!(lookup_result(&replica, "ci/main", &action(1)).await, None);
    // Events after the resync are relayed again.
    let oldest: u64 = refused
        .metadata()
        .get("hoard-oldest-available")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("oldest available");
    let mut stream = watch(replica.channel(), oldest - 1).await;
    one_event(&centre, 200).await;
    let next = take(&mut stream, 1).await;
    assert_eq!(next[0].reason, "event 200");
}

#[tokio::test]
async fn during_an_upstream_outage_local_hits_are_served_and_misses_fail_fast() {
    let (_ctmp, centre_config) = temp_config();
    let centre = TestServer::start_config(centre_config.clone()).await;
    let centre_addr = centre.addr();
    let out = blob(500, 10);
    let out_d = upload(&centre, "", &out).await;
    update_result(&centre, "ci/main", &action(1), &result_with(&out_d, 0))
        .await
        .unwrap();
    let never_read = upload(&centre, "", &blob(600, 11)).await;
    let (_rtmp, replica) = replica_of(&centre, "ac_max_staleness = \"3s\"\n").await;
    let ops = replica.ops_addr();
    eventually(Duration::from_secs(5), || async {
        match http_get(ops, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(lookup_result(&replica, "ci/main", &action(1))
        .await
        .is_some());
    assert_eq!(read_all(&replica, &out_d).await, out);

    centre.stop().await;
    let degraded = eventually(Duration::from_secs(5), || async {
        match http_get(ops, "/readyz").await {
            (503, body) if body.contains("upstream") => Ok(body),
            other => Err(other),
        }
    })
    .await;
    assert!(degraded.contains("degraded"), "{degraded}");
    // Local hits: the blob, and the result within the staleness bound.
    assert_eq!(read_all(&replica, &out_d).await, out);
    assert!(lookup_result(&replica, "ci/main", &action(1))
        .await
        .is_some());
    // Misses and writes: UNAVAILABLE, at once.
    let started = Instant::now();
    let miss = replica
        .cas()
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![never_read.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(miss.code(), Code::Unavailable, "{miss:?}");
    let lookup = lookup_error(&replica, "ci/main", &action(2)).await;
    assert_eq!(lookup.code(), Code::Unavailable, "{lookup:?}");
    let write = update_result(&replica, "ci/main", &action(3), &result_with(&out_d, 0))
        .await
        .unwrap_err();
    assert_eq!(write.code(), Code::Unavailable, "{write:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Past the staleness bound, the local copy is no longer served.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stale = lookup_error(&replica, "ci/main", &action(1)).await;
    assert_eq!(stale.code(), Code::Unavailable, "{stale:?}");

    // The centre comes back: everything resumes without a restart of the replica.
    let centre = TestServer::start_config_at(centre_config, centre_addr).await;
    eventually(Duration::from_secs(10), || async {
        match http_get(ops, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(missing(&replica, &[never_read]).await.is_empty());
    assert!(lookup_result(&replica, "ci/main", &action(1))
        .await
        .is_some());
    update_result(&replica, "ci/main", &action(3), &result_with(&out_d, 0))
        .await
        .unwrap();
    assert!(lookup_result(&centre, "ci/main", &action(3))
        .await
        .is_some());
}

#[tokio::test]
async fn a_replica_of_a_replica_reads_writes_relays_and_keeps_the_staleness_bound() {
    let (_ctmp, centre_config) = temp_config();
    let centre = TestServer::start_config(centre_config).await;
    // The continent files its clients' instances under "eu" at the centre.
    let (_t1, continent) = replica_of(
        &centre,
        "instance_prefix = \"eu\"\nac_max_staleness = \"2s\"\n",
    )
    .await;
    let (_t2, region) = replica_of(&continent, "ac_max_staleness = \"2s\"\n").await;
    let mut stream = watch(region.channel(), 0).await;
    relay_current(&region).await;
    let data = blob(2 << 20, 12);
    let d = upload(&region, "", &data).await;
    assert_eq!(read_all(&centre, &d).await, data);
    update_result(&region, "ci/main", &action(1), &result_with(&d, 0))
        .await
        .unwrap();
    assert!(lookup_result(&centre, "eu/ci/main", &action(1))
        .await
        .is_some());
    served_locally(&centre, &region, "ci/main", &action(1)).await;

    // A namespace invalidation at the centre reaches the region two hops away, named as the
    // region's clients name it.
    invalidate_namespace(&centre, "eu/ci/main", "toolchain").await;
    let events = take(&mut stream, 1).await;
    assert_eq!(events[0].kind(), EventKind::NamespaceInvalidated);
    assert_eq!(events[0].namespace, "ci/main");
    no_longer_served(&region, "ci/main", &action(1), "still a hit two hops away").await;

    // With the centre gone, the continent cannot vouch for its copies, and so neither can the
    // region: past the bound a lookup is UNAVAILABLE, not a stale hit.
    update_result(&region, "ci/main", &action(2), &result_with(&d, 0))
        .await
        .unwrap();
    served_locally(&centre, &region, "ci/main", &action(2)).await;
    centre.stop().await;
    assert!(lookup_result(&region, "ci/main", &action(2))
        .await
        .is_some());
    let refused = eventually(Duration::from_secs(10), || async {
        match region
            .ac()
            .get_action_result(reapi::GetActionResultRequest {
                instance_name: "ci/main".into(),
                action_digest: Some(action(2)),
                ..Default::default()
            })
            .await
        {
            Err(status) => Ok(status),
            Ok(_) => Err("still served"),
        }
    })
    .await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
}

#[tokio::test]
async fn admin_invalidation_at_a_replica_is_refused_and_names_the_upstream() {
    let centre = TestServer::start().await;
    let (_tmp, replica) = replica_of(&centre, "").await;
    let refused = replica
        .admin()
        .invalidate(InvalidateRequest {
            namespace: Some("ci/main".into()),
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains(&centre.addr().to_string()),
        "{}",
        refused.message()
    );
}

#[test]
fn upstream_config_is_checked() {
    let e = Config::parse("[upstream]\nendpoint = \"central\"\n").unwrap_err();
    assert!(e.contains("upstream.endpoint"), "{e}");
    let e = Config::parse(
        "[storage]\nbackend = \"memory\"\n[upstream]\nendpoint = \"grpc://c:1\"\nwrite_behind = true\n",
    )
    .unwrap_err();
    assert!(e.contains("write_behind"), "{e}");
    let e = Config::parse(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\n[upstream]\nendpoint = \"grpc://c:1\"\n",
    )
    .unwrap_err();
    assert!(e.contains("[upstream]"), "{e}");
    assert!(
        Config::parse("[upstream]\nendpoint = \"grpcs://c:1\"\ninstance_prefix = \"eu\"\n").is_ok()
    );
}

#[tokio::test]
async fn queued_writes_survive_a_sigkill_and_reach_the_upstream_once_it_is_back() {
    // The centre's address is chosen now and stays unbound until after the crash.
    let centre_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("replica.toml");
    std::fs::write(
        &config,
        format!("[upstream]\nendpoint = \"grpc://{centre_addr}\"\nwrite_behind = true\n"),
    )
    .unwrap();
    let data = tmp.path().join("replica-data");
    let start = || {
        let mut command = crate::crash::Process::command(&data);
        command.arg("--config").arg(&config);
        crate::crash::Process::start_command(command)
    };
    let replica = start().await;
    let small: Vec<Vec<u8>> = (0..20).map(|i| blob(1000 + i, 100 + i as u64)).collect();
    let mut cas = reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
        replica.channel.clone(),
    );
    let reply = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: small
                .iter()
                .map(|b| reapi::batch_update_blobs_request::Request {
                    digest: Some(digest_of(b)),
                    data: b.clone().into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .expect("acknowledged while the centre is away")
        .into_inner();
    assert!(reply
        .responses
        .iter()
        .all(|r| r.status.as_ref().unwrap().code == 0));
    let large = blob(3 << 20, 200);
    let large_d = digest_of(&large);
    let name = write_name("", &uuid::Uuid::new_v4().to_string(), &large_d);
    crate::common::write_blob_over(replica.channel.clone(), &name, &large, 0, 1 << 20)
        .await
        .expect("large blob acknowledged while the centre is away");
    replica.kill9();

    let (_ctmp, centre_config) = temp_config();
    let centre = TestServer::start_config_at(centre_config, centre_addr).await;
    let mut wanted: Vec<reapi::Digest> = small.iter().map(|b| digest_of(b)).collect();
    wanted.push(large_d.clone());
    assert_eq!(missing(&centre, &wanted).await.len(), wanted.len());
    let replica = start().await;
    eventually(Duration::from_secs(30), || async {
        match missing(&centre, &wanted).await.len() {
            0 => Ok(()),
            n => Err(format!("{n} blobs not yet at the centre")),
        }
    })
    .await;
    assert_eq!(read_all(&centre, &large_d).await, large);
    let admin = hoard::proto::admin::admin_client::AdminClient::new(replica.channel.clone());
    let queue = eventually(Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            let stats = admin
                .stats(hoard::proto::admin::StatsRequest::default())
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            match stats.write_behind_queue {
                Some(0) => Ok(0),
                other => Err(format!("queue {other:?}")),
            }
        }
    })
    .await;
    assert_eq!(queue, 0);
    replica.terminate().await;
}

/// A centre that admits only the token `replica-eu` (read everything, write everything).
async fn centre_with_auth() -> TestServer {
    TestServer::start_with(|c| {
        c.auth = Some(hoard::auth::AuthConfig {
            anonymous: hoard::auth::Access::None,
            tokens: vec![hoard::auth::TokenConfig {
                name: "replica-eu".into(),
                hash: hoard::auth::hash_token("replica-eu-secret-0123456789"),
                grants: vec!["read:**".parse().unwrap(), "write:**".parse().unwrap()],
            }],
            client_certs: Vec::new(),
        });
    })
    .await
}

#[tokio::test]
async fn the_replica_calls_the_upstream_as_itself_and_never_with_its_clients_token() {
    let centre = centre_with_auth().await;
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("upstream.token");
    std::fs::write(&token, "replica-eu-secret-0123456789\n").unwrap();
    let (_rtmp, replica) =
        replica_of(&centre, &format!("token_file = \"{}\"\n", token.display())).await;
    // The relay starts from the centre's newest event: let it connect first.
    relay_current(&replica).await;
    let out_d = upload(&replica, "", &blob(100, 20)).await;
    // The client presents a token of its own; the replica (no [auth]) lets it in, and the
    // centre must see the replica's identity only.
    let mut request = tonic::Request::new(reapi::UpdateActionResultRequest {
        instance_name: "ci/main".into(),
        action_digest: Some(action(1)),
        action_result: Some(result_with(&out_d, 0)),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer some-client-token".parse().unwrap());
    replica
        .ac()
        .update_action_result(request)
        .await
        .expect("update through the replica");
    let events = WatchClient::new(replica.channel())
        .watch(WatchRequest {
            kinds: vec![EventKind::ActionResultStored as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = events;
    let stored = take(&mut events, 1).await;
    assert_eq!(stored[0].caller, "replica-eu", "{:?}", stored[0]);
    assert!(lookup_result(&replica, "ci/main", &action(1))
        .await
        .is_some());
}

#[tokio::test]
async fn a_replica_whose_token_the_upstream_refuses_says_so_in_readyz_and_answers_unavailable() {
    let centre = centre_with_auth().await;
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("upstream.token");
    std::fs::write(&token, "not-the-right-token").unwrap();
    let (_rtmp, replica) =
        replica_of(&centre, &format!("token_file = \"{}\"\n", token.display())).await;
    let body = eventually(Duration::from_secs(5), || async {
        match http_get(replica.ops_addr(), "/readyz").await {
            (503, body) if body.contains("refuses") => Ok(body),
            other => Err(other),
        }
    })
    .await;
    assert!(
        body.contains("refuses") && body.contains("Unauthenticated"),
        "{body}"
    );
    let refused = replica
        .cas()
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![digest_of(b"x")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("refuses"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn the_watch_relay_resumes_exactly_after_a_sigkill_of_the_replica() {
    let centre = TestServer::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("replica.toml");
    std::fs::write(
        &config,
        format!("[upstream]\nendpoint = \"{}\"\n", centre.url()),
    )
    .unwrap();
    let data = tmp.path().join("replica-data");
    let start = || {
        let mut command = crate::crash::Process::command(&data);
        command.arg("--config").arg(&config);
        crate::crash::Process::start_command(command)
    };
    let replica = start().await;
    relay_current_over(replica.channel.clone()).await;
    let mut stream = watch(replica.channel.clone(), 0).await;
    for n in 1..=5 {
        one_event(&centre, n).await;
    }
    let mut seen = take(&mut stream, 5).await;
    drop(stream);
    replica.kill9();
    for n in 6..=9 {
        one_event(&centre, n).await;
    }
    let replica = start().await;
    let mut stream = watch(replica.channel.clone(), seen.last().unwrap().sequence).await;
    seen.extend(take(&mut stream, 4).await);
    let reasons: Vec<String> = seen.iter().map(|e| e.reason.clone()).collect();
    let expected: Vec<String> = (1..=9).map(|n| format!("event {n}")).collect();
    assert_eq!(
        reasons, expected,
        "every centre event once, in order, across the SIGKILL"
    );
    let more = tokio::time::timeout(Duration::from_millis(800), stream.message()).await;
    assert!(more.is_err(), "an extra event: {more:?}");
    replica.terminate().await;
}
