//! Crash safety: SIGKILL a real server process during a write storm, restart it, and check that
//! it opens and serves only complete, correct blobs and consistent action results.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoard::proto::admin::{admin_client::AdminClient, StatsRequest};
use hoard::proto::bytestream::byte_stream_client::ByteStreamClient;
use hoard::proto::reapi::{
    self, action_cache_client::ActionCacheClient, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient, ActionResult,
    BatchUpdateBlobsRequest, FindMissingBlobsRequest, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest,
};
use tonic::transport::Channel;

use crate::common::{
    blob, digest_of, eventually, hoard_command, poll_until, read_name, write_name, write_requests,
};

/// A `hoard serve` child process on 127.0.0.1 with the given data dir (also used by watch.rs).
pub(crate) struct Process {
    child: Child,
    pub(crate) channel: Channel,
}

impl Process {
    pub(crate) async fn start(data_dir: &std::path::Path) -> Self {
        Self::start_command(Self::command(data_dir)).await
    }

    /// The command [`Process::start`] runs, for tests that add to it.
    pub(crate) fn command(data_dir: &std::path::Path) -> Command {
        let mut command = hoard_command();
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    pub(crate) async fn start_command(mut command: Command) -> Self {
        let mut child = command.spawn().expect("spawn hoard");
        let stderr = child.stderr.take().expect("stderr");
        // The log line "hoard is serving ... listen=127.0.0.1:PORT" names the bound port.
        let addr = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let line = lines.next()?.ok()?;
                if let Some(at) = line.find("listen=") {
                    let addr: String = line[at + 7..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    // Keep draining stderr so the child never blocks on a full pipe.
                    std::thread::spawn(move || for _ in lines {});
                    return Some(addr);
                }
            }
            None
        })
        .await
        .unwrap()
        .expect("server did not report its address");
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        Process { child, channel }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the graceful shutdown to finish; it must exit 0. Waits without
    /// blocking the test's runtime: the client connection must keep running to see the server's
    /// GOAWAY, or the server waits out its whole shutdown grace period for it.
    pub(crate) async fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        // Beyond the server's 30 s shutdown grace period.
        let status = eventually(Duration::from_secs(60), || {
            let exited = self.child.try_wait().expect("wait for hoard");
            async move { exited.ok_or("still running") }
        })
        .await;
        assert!(status.success(), "hoard exited with {status} after SIGTERM");
    }

    pub(crate) fn kill9(mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    /// A test that fails must not leave its server running (holding ports, pipes, a tmpfs).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the storm tried to store: every digest it attempted, and actions it updated; and what
/// the server acknowledged, which must survive every crash.
#[derive(Default)]
struct Attempts {
    blobs: Vec<(reapi::Digest, u64)>, // digest, seed to regenerate its bytes
    actions: Vec<reapi::Digest>,
    acked_blobs: std::collections::HashSet<String>,
    acked_actions: Vec<reapi::Digest>,
}

/// Writes blobs (ByteStream and batches, small and large) and action results until killed.
async fn storm(channel: Channel, attempts: Arc<Mutex<Attempts>>, task: u64) {
    let mut bs = ByteStreamClient::new(channel.clone());
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut ac = ActionCacheClient::new(channel);
    for i in 0u64.. {
        let seed = task * 1_000_000 + i + rand_seed();
        let size = [1_000usize, 70_000, 900_000, 2_500_000][(seed % 4) as usize];
        let data = blob(size, seed);
        let d = digest_of(&data);
        attempts.lock().unwrap().blobs.push((d.clone(), seed));
        let ok = if seed.is_multiple_of(3) && size <= 900_000 {
            cas.batch_update_blobs(BatchUpdateBlobsRequest {
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: data.into(),
                    compressor: 0,
                }],
                ..Default::default()
            })
            .await
            .is_ok()
        } else {
            let reqs = write_requests(&write_name("", &format!("s{seed}"), &d), &data, 0, 64 << 10);
            bs.write(futures::stream::iter(reqs)).await.is_ok()
        };
        if !ok {
            return; // the server is gone
        }
        attempts.lock().unwrap().acked_blobs.insert(d.hash.clone());
        let action = digest_of(format!("action {seed}").as_bytes());
        attempts.lock().unwrap().actions.push(action.clone());
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(d),
                ..Default::default()
            }],
            ..Default::default()
        };
        let updated = ac
            .update_action_result(UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(result),
                ..Default::default()
            })
            .await;
        if updated.is_err() {
            return;
        }
        attempts.lock().unwrap().acked_actions.push(action);
    }
}

/// Varies the blobs between test runs and cycles (they must not collide with earlier ones).
fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_000)
        .unwrap_or(0)
        * 1_000_000_000
}

/// The invariants after a restart: every acknowledged blob and action result is there, every
/// blob the server reports present reads back (the ones it was not yet checked for byte-exact,
/// the ones it was at least as long as they are), no blob present at an earlier check went
/// missing, and every action result served names stored blobs. `checked` carries what earlier
/// checks found present. Returns (present, served).
async fn check_invariants(
    server: &Process,
    attempts: &Mutex<Attempts>,
    checked: &mut std::collections::HashSet<String>,
) -> (usize, usize) {
    let (blobs, actions, acked_blobs, acked_actions) = {
        let a = attempts.lock().unwrap();
        (
            a.blobs.clone(),
            a.actions.clone(),
            a.acked_blobs.clone(),
            a.acked_actions.clone(),
        )
    };
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: blobs.iter().map(|(d, _)| d.clone()).collect(),
            ..Default::default()
        })
        .await
        .expect("find missing after a crash")
        .into_inner()
        .missing_blob_digests;
    let mut present = 0;
    let mut bs = ByteStreamClient::new(server.channel.clone());
    for (d, seed) in &blobs {
        if missing.contains(d) {
            assert!(
                !acked_blobs.contains(&d.hash),
                "blob {d:?} was acknowledged, now it is lost"
            );
            assert!(
                !checked.contains(&d.hash),
                "blob {d:?} was present, now it is lost"
            );
            continue;
        }
        present += 1;
        // Re-reading every old blob in full after every crash would dominate the test's time;
        // their length is checked on every read, their bytes were checked before.
        let seen = !checked.insert(d.hash.clone());
        let mut stream = bs
            .read(hoard::proto::bytestream::ReadRequest {
                resource_name: read_name("", d),
                read_offset: if seen { d.size_bytes - 1 } else { 0 },
                read_limit: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("blob {d:?} is reported present but unreadable: {e}"))
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = stream
            .message()
            .await
            .unwrap_or_else(|e| panic!("blob {d:?} is reported present but unreadable: {e}"))
        {
            got.extend_from_slice(&m.data);
        }
        if seen {
            assert_eq!(got.len(), 1, "blob {d:?} has the wrong length");
            continue;
        }
        assert!(
            got == blob(d.size_bytes as usize, *seed),
            "blob {d:?} has wrong bytes"
        );
    }
    let mut ac = ActionCacheClient::new(server.channel.clone());
    let mut served = 0;
    for a in &actions {
        match ac
            .get_action_result(GetActionResultRequest {
                action_digest: Some(a.clone()),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                served += 1;
                // A served result's outputs are stored (the completeness check).
                let out = r.into_inner().output_files[0].digest.clone().unwrap();
                assert!(!missing.contains(&out), "result {a:?} names a missing blob");
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
                assert!(
                    !acked_actions.contains(a),
                    "action result {a:?} was acknowledged, now it is lost"
                );
            }
        }
    }
    (present, served)
}

/// SIGKILLs of one run of the harness.
const KILLS: u64 = 20;

#[tokio::test]
async fn sigkill_during_writes_never_loses_an_acknowledged_write_or_leaves_a_wrong_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let attempts = Arc::new(Mutex::new(Attempts::default()));
    let mut checked = std::collections::HashSet::new();
    for cycle in 0..KILLS {
        let server = Process::start(&data_dir).await;
        if cycle > 0 {
            // After every crash: the store opens and everything it says it has is right.
            check_invariants(&server, &attempts, &mut checked).await;
        }
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                tokio::spawn(storm(
                    server.channel.clone(),
                    attempts.clone(),
                    cycle * 10 + t,
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300 + 100 * (cycle % 6))).await;
        server.kill9();
        for t in tasks {
            let _ = t.await;
        }
    }

    let server = Process::start(&data_dir).await;
    let attempted = attempts.lock().unwrap().blobs.len();
    assert!(
        attempted > 20,
        "the storm stored too little to test: {attempted}"
    );
    let (present, served) = check_invariants(&server, &attempts, &mut checked).await;
    assert!(present > 0, "no blob survived the crashes");
    let (acked, acked_results) = {
        let a = attempts.lock().unwrap();
        (a.acked_blobs.len(), a.acked_actions.len())
    };
    // The start after a crash runs a cleanup pass in the background; once it is done, nothing
    // is left that no index entry names.
    cleaned_up(&server, Duration::from_secs(10)).await;
    server.terminate().await;
    let store = hoard::store::sled::SledStore::open(&data_dir, 64 << 10, 16 << 20).unwrap();
    let report = hoard::store::Housekeeping::verify(&store).await.unwrap();
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(
        report.orphans_removed, 0,
        "space leaked past the cleanup pass: {report:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(data_dir.join("uploads"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    eprintln!(
        "crash harness: {KILLS} SIGKILLs; {attempted} blobs attempted, {acked} acknowledged, \
         {present} present and verified; {served} results served ({acked_results} \
         acknowledged); verify after cleanup: {} blobs checked, 0 corrupt, 0 orphans",
        report.checked_blobs
    );
}

/// An acknowledged invalidation survives a SIGKILL right after it (sled alone would lose up to
/// its last ~0.5 s of writes; invalidation is fsynced before it is acknowledged).
#[tokio::test]
async fn an_acknowledged_invalidation_survives_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let server = Process::start(&data_dir).await;
    let out = blob(1000, 5);
    let out_d = digest_of(&out);
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    cas.batch_update_blobs(BatchUpdateBlobsRequest {
        requests: vec![batch_update_blobs_request::Request {
            digest: Some(out_d.clone()),
            data: out.into(),
            compressor: 0,
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let action = digest_of(b"old action");
    let mut ac = ActionCacheClient::new(server.channel.clone());
    ac.update_action_result(UpdateActionResultRequest {
        instance_name: "ci/main".into(),
        action_digest: Some(action.clone()),
        action_result: Some(ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(out_d),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    AdminClient::new(server.channel.clone())
        .invalidate(hoard::proto::admin::InvalidateRequest {
            namespace: Some("ci/main".into()),
            reason: "crash test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    server.kill9();

    let server = Process::start(&data_dir).await;
    let err = ActionCacheClient::new(server.channel.clone())
        .get_action_result(GetActionResultRequest {
            instance_name: "ci/main".into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "invalidated result served: {err}"
    );
    server.kill9();
}

/// Waits until the cleanup pass of an unclean start has finished (only then does a clean
/// shutdown leave the mark that makes the next start clean).
async fn cleaned_up(server: &Process, within: Duration) {
    let admin = AdminClient::new(server.channel.clone());
    let done = poll_until(within, || {
        let mut admin = admin.clone();
        async move {
            let stats = admin.stats(StatsRequest {}).await.unwrap().into_inner();
            if stats.cleanup_pending {
                Err(stats)
            } else {
                Ok(())
            }
        }
    })
    .await;
    assert!(done.is_ok(), "the cleanup pass did not finish");
}

/// Reads `digests` back with BatchReadBlobs; `None` for each one that is not found.
async fn batch_read(channel: &Channel, digests: &[reapi::Digest]) -> Vec<Option<Vec<u8>>> {
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let mut out = Vec::new();
    for chunk in digests.chunks(300) {
        let resp = cas
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                digests: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .expect("batch read")
            .into_inner();
        for r in resp.responses {
            let code = r.status.map(|s| s.code).unwrap_or(-1);
            assert!(code == 0 || code == 5, "read {:?}: code {code}", r.digest);
            out.push((code == 0).then(|| r.data.to_vec()));
        }
    }
    out
}

/// Segment compaction cut off by SIGKILL at random points: each cycle stores small blobs
/// interleaved with ones it keeps in use, evicts the others (gc), which rewrites the
/// segments, and is killed during that. After each restart every kept blob is there byte for
/// byte, and every blob reported present reads back exact; at the end an offline verify finds
/// no damage and no orphan.
#[tokio::test]
async fn sigkill_during_compaction_never_loses_a_live_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let config = tmp.path().join("hoard.toml");
    std::fs::write(
        &config,
        "[storage]\nsegment_size = \"1MiB\"\nmin_retention = \"3s\"\n",
    )
    .unwrap();
    let start = || {
        let mut command = Process::command(&data_dir);
        command.arg("--config").arg(&config);
        Process::start_command(command)
    };
    let mut written: Vec<(reapi::Digest, u64)> = Vec::new();
    let mut kept: Vec<(reapi::Digest, u64)> = Vec::new();
    let base = rand_seed();
    let mut cut_off = 0;
    for cycle in 0..6u64 {
        let server = start().await;
        if cycle > 0 {
            let got = batch_read(
                &server.channel,
                &kept.iter().map(|k| k.0.clone()).collect::<Vec<_>>(),
            )
            .await;
            for ((d, seed), data) in kept.iter().zip(got) {
                let data = data.unwrap_or_else(|| panic!("kept blob {d:?} was lost"));
                assert!(
                    data == blob(d.size_bytes as usize, *seed),
                    "kept blob {d:?} has wrong bytes"
                );
            }
            let got = batch_read(
                &server.channel,
                &written.iter().map(|k| k.0.clone()).collect::<Vec<_>>(),
            )
            .await;
            for ((d, seed), data) in written.iter().zip(got) {
                if let Some(data) = data {
                    assert!(
                        data == blob(d.size_bytes as usize, *seed),
                        "blob {d:?} has wrong bytes"
                    );
                }
            }
        }
        // 1500 blobs of 1.5-4 KiB, every third one kept in use.
        let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
        let batch: Vec<(reapi::Digest, u64)> = (0..1500)
            .map(|i| {
                let seed = base + cycle * 100_000 + i;
                let data = blob(1500 + (seed % 2500) as usize, seed);
                (digest_of(&data), seed)
            })
            .collect();
        for chunk in batch.chunks(100) {
            let requests = chunk
                .iter()
                .map(|(d, seed)| batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: blob(d.size_bytes as usize, *seed).into(),
                    compressor: 0,
                })
                .collect();
            let resp = cas
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    requests,
                    ..Default::default()
                })
                .await
                .expect("batch update")
                .into_inner();
            assert!(resp
                .responses
                .iter()
                .all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)));
        }
        written.extend(batch.iter().cloned());
        kept = batch.iter().step_by(3).cloned().collect();
        // A clean restart: after a crash nothing is evicted until retention has passed since
        // the last persist of last uses (a minute away), which would leave gc nothing to do.
        cleaned_up(&server, Duration::from_secs(20)).await;
        server.terminate().await;
        let server = start().await;
        let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
        // Past retention for the others; a FindMissingBlobs use keeps the kept ones.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let missing = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: kept.iter().map(|k| k.0.clone()).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests;
        assert!(missing.is_empty(), "{missing:?}");
        let mut admin = AdminClient::new(server.channel.clone());
        let gc = tokio::spawn(async move {
            admin
                .gc(hoard::proto::admin::GcRequest {
                    target_bytes: Some(0),
                })
                .await
        });
        // gc of these takes a few ms: kill at points spread over it.
        tokio::time::sleep(Duration::from_millis(1 + cycle % 4)).await;
        server.kill9();
        if !matches!(gc.await, Ok(Ok(_))) {
            cut_off += 1;
        }
    }
    // Kills must land inside the gc call (eviction, then compaction), not only after it.
    eprintln!("{cut_off} of 6 kills landed during gc");
    assert!(cut_off >= 2, "only {cut_off} of 6 kills landed during gc");
    let server = start().await;
    cleaned_up(&server, Duration::from_secs(20)).await;
    server.terminate().await;
    let server = start().await;
    let got = batch_read(
        &server.channel,
        &kept.iter().map(|k| k.0.clone()).collect::<Vec<_>>(),
    )
    .await;
    assert!(got.iter().all(|g| g.is_some()), "a kept blob was lost");
    // Let it compact what the kills left, then stop cleanly.
    let mut admin = AdminClient::new(server.channel.clone());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut cas = ContentAddressableStorageClient::new(server.channel.clone());
    cas.find_missing_blobs(FindMissingBlobsRequest {
        blob_digests: kept.iter().map(|k| k.0.clone()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let gc = admin
        .gc(hoard::proto::admin::GcRequest {
            target_bytes: Some(0),
        })
        .await
        .expect("gc");
    assert!(gc.get_ref().evicted_blobs > 0, "{:?}", gc.get_ref());
    // Compaction is due from the start (dead bytes are what segments hold beyond the indexed
    // records) and runs in the background.
    let payload: u64 = written.iter().map(|w| w.0.size_bytes as u64).sum();
    let segment_bytes = || crate::segments::segment_bytes(&data_dir);
    let _ = poll_until(Duration::from_secs(20), || async {
        if segment_bytes() * 4 < payload {
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    server.terminate().await;
    let segments = segment_bytes();
    assert!(
        segments * 4 < payload,
        "compaction gave back too little: {segments} bytes of segments for {payload} written"
    );
    let store = hoard::store::sled::SledStore::open(&data_dir, 64 << 10, 16 << 20).unwrap();
    let report = hoard::store::Housekeeping::verify(&store).await.unwrap();
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(report.orphans_removed, 0, "{report:?}");
    assert!(report.checked_blobs >= kept.len() as u64, "{report:?}");
}
