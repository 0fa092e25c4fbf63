//! The watch stream: every event once and in order, across disconnects, restarts and SIGKILL;
//! bounded retention; slow watchers cut off without slowing writers; `hoard watch` output.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoard::proto::reapi::{
    self, action_cache_client::ActionCacheClient, ActionResult, UpdateActionResultRequest,
};
use hoard::proto::watch::{watch_client::WatchClient, Event, EventKind, WatchRequest};
use hoard::service::watch::{OLDEST_AVAILABLE_TRAILER, RESUME_AFTER_TRAILER, START_AFTER_HEADER};
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use crate::common::{digest_of, eventually, hoard_command, take, temp_config, TestServer};
use crate::crash::Process;

async fn connect(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

fn action(tag: &str, i: u64) -> reapi::Digest {
    digest_of(format!("action {tag} {i}").as_bytes())
}

/// Stores an (empty) action result; each call is one ACTION_RESULT_STORED event.
async fn store_result(ac: &mut ActionCacheClient<Channel>, instance: &str, action: reapi::Digest) {
    ac.update_action_result(UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action),
        action_result: Some(ActionResult::default()),
        ..Default::default()
    })
    .await
    .expect("update action result");
}

fn stored_after(start_after: u64) -> WatchRequest {
    WatchRequest {
        start_after,
        kinds: vec![EventKind::ActionResultStored as i32],
        ..Default::default()
    }
}

async fn watch(channel: Channel, request: WatchRequest) -> Result<Streaming<Event>, tonic::Status> {
    Ok(WatchClient::new(channel).watch(request).await?.into_inner())
}

/// Every event until the stream ends; returns them and the status that ended it.
async fn drain(stream: &mut Streaming<Event>) -> (Vec<Event>, tonic::Status) {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream should end")
        {
            Ok(Some(event)) => out.push(event),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => return (out, status),
        }
    }
}

fn trailer(status: &tonic::Status, key: &str) -> Option<u64> {
    status.metadata().get(key)?.to_str().ok()?.parse().ok()
}

fn sequences(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

#[tokio::test]
async fn a_watcher_sees_every_stored_result_in_order() {
    let server = TestServer::start().await;
    let channel = connect(&server.url()).await;
    let mut all = watch(channel.clone(), stored_after(0)).await.unwrap();
    let mut main_only = watch(
        channel.clone(),
        WatchRequest {
            namespace_pattern: "ci/main".into(),
            ..stored_after(0)
        },
    )
    .await
    .unwrap();
    // Not asked for: stored results are sent only on request.
    let mut invalidations = watch(channel.clone(), WatchRequest::default())
        .await
        .unwrap();

    let mut ac = server.ac();
    let mut expected = Vec::new();
    for i in 0..100 {
        let instance = if i % 3 == 0 {
            "ci/main"
        } else {
            "ci/branches/x"
        };
        store_result(&mut ac, instance, action("a", i)).await;
        expected.push((instance.to_string(), action("a", i)));
    }
    let got = take(&mut all, 100).await;
    assert_eq!(sequences(&got), (1..=100).collect::<Vec<_>>());
    for (event, (instance, digest)) in got.iter().zip(&expected) {
        assert_eq!(event.kind(), EventKind::ActionResultStored);
        assert_eq!(&event.namespace, instance);
        assert_eq!(event.action_digest.as_ref(), Some(digest));
    }
    let main = take(&mut main_only, 34).await;
    assert!(main.iter().all(|e| e.namespace == "ci/main"));
    assert_eq!(sequences(&main), (1..=100).step_by(3).collect::<Vec<_>>());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), invalidations.message())
            .await
            .is_err(),
        "a watcher of invalidations was sent a stored result"
    );
    drop((all, main_only, invalidations));
    server.stop().await;
}

#[tokio::test]
async fn disconnects_and_restarts_lose_and_repeat_nothing() {
    let (_tmp, config) = temp_config();
    let mut expected = Vec::new();
    let mut seen: Vec<Event> = Vec::new();

    let server = TestServer::start_config(config.clone()).await;
    let channel = connect(&server.url()).await;
    let mut ac = server.ac();
    let mut stream = watch(channel.clone(), stored_after(0)).await.unwrap();
    for i in 0..30 {
        store_result(&mut ac, "ns", action("b", i)).await;
        expected.push(action("b", i));
    }
    // The watcher goes away after 17 events, mid-stream.
    seen.extend(take(&mut stream, 17).await);
    drop(stream);
    for i in 30..50 {
        store_result(&mut ac, "ns", action("b", i)).await;
        expected.push(action("b", i));
    }
    // It comes back, reads a little, and the server shuts down under it.
    let last = seen.last().unwrap().sequence;
    let mut stream = watch(channel.clone(), stored_after(last)).await.unwrap();
    seen.extend(take(&mut stream, 5).await);
    let stopping = tokio::spawn(server.stop());
    let (rest, status) = drain(&mut stream).await;
    seen.extend(rest);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        trailer(&status, RESUME_AFTER_TRAILER),
        Some(seen.last().unwrap().sequence),
        "the shutdown status names the last event sent"
    );
    stopping.await.unwrap();

    // Same data dir, new process state: resume where the last event left off.
    let server = TestServer::start_config(config).await;
    let mut ac = server.ac();
    for i in 50..75 {
        store_result(&mut ac, "ns", action("b", i)).await;
        expected.push(action("b", i));
    }
    let last = seen.last().unwrap().sequence;
    let mut stream = watch(connect(&server.url()).await, stored_after(last))
        .await
        .unwrap();
    seen.extend(take(&mut stream, 75 - seen.len()).await);
    assert_eq!(sequences(&seen), (1..=75).collect::<Vec<_>>());
    let digests: Vec<_> = seen
        .iter()
        .map(|e| e.action_digest.clone().unwrap())
        .collect();
    assert_eq!(digests, expected);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "an event was repeated or invented"
    );
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn a_start_point_older_than_the_log_is_out_of_range_and_names_the_oldest() {
    let (_tmp, mut config) = temp_config();
    config.watch.retained_events = 10;
    let server = TestServer::start_config(config.clone()).await;
    let mut ac = server.ac();
    for i in 0..25 {
        store_result(&mut ac, "", action("c", i)).await;
    }
    let check = |status: tonic::Status| {
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert_eq!(trailer(&status, OLDEST_AVAILABLE_TRAILER), Some(16));
        assert!(
            status.message().contains("oldest still available is 16"),
            "{}",
            status.message()
        );
    };
    check(
        watch(connect(&server.url()).await, stored_after(3))
            .await
            .unwrap_err(),
    );
    // `hoard watch` exits 3 (resync) and says where to start afterwards.
    let mut cli = hoard_command();
    cli.args(["watch", "--server", &server.url(), "--start-after", "3"])
        .args(["--kinds", "action-result-stored"])
        .stdin(Stdio::null());
    // The server runs on this test's thread: wait for the child elsewhere.
    let out = tokio::task::spawn_blocking(move || cli.output())
        .await
        .unwrap()
        .expect("run hoard watch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("--start-after 15"), "{stderr}");
    server.stop().await;

    // Retention is part of the persisted log.
    let server = TestServer::start_config(config).await;
    let channel = connect(&server.url()).await;
    check(watch(channel.clone(), stored_after(14)).await.unwrap_err());
    let mut stream = watch(channel.clone(), stored_after(15)).await.unwrap();
    assert_eq!(
        sequences(&take(&mut stream, 10).await),
        (16..=25).collect::<Vec<_>>()
    );
    // start_after 0: from the oldest retained, announced in the response header.
    let response = WatchClient::new(channel)
        .watch(stored_after(0))
        .await
        .unwrap();
    assert_eq!(response.metadata().get(START_AFTER_HEADER).unwrap(), "15");
    drop((stream, response));
    server.stop().await;
}

/// Runs `writers` tasks storing `each` results; returns how long they took.
async fn write_storm(url: &str, writers: u64, each: u64, tag: &str) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let url = url.to_string();
            let tag = format!("{tag} {w}");
            tokio::spawn(async move {
                let mut ac = ActionCacheClient::new(connect(&url).await);
                for i in 0..each {
                    store_result(&mut ac, "ns", action(&tag, i)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer finished");
    }
    started.elapsed()
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_cut_off_and_writers_keep_going() {
    let server = TestServer::start_with(|c| c.watch.max_lag = 100).await;
    let url = server.url();
    let baseline = write_storm(&url, 4, 250, "warm-up").await;

    // Small flow-control windows, so the stalled watcher's backlog stays in the server's log
    // rather than in HTTP/2 buffers.
    let slow = Endpoint::from_shared(url.clone())
        .unwrap()
        .initial_stream_window_size(Some(16 << 10))
        .initial_connection_window_size(Some(64 << 10))
        .connect()
        .await
        .unwrap();
    let mut stalled = watch(slow, stored_after(1000)).await.unwrap();
    let with_stalled_watcher = write_storm(&url, 4, 250, "storm").await;
    eprintln!(
        "1000 UpdateActionResult calls: {baseline:?} without a watcher, \
         {with_stalled_watcher:?} with a stalled one"
    );
    // Writers never wait on watchers: a loose bound (a loaded 2-core machine is noisy), far
    // below what blocking on a stalled reader would cost (the storm would never finish).
    assert!(
        with_stalled_watcher < baseline * 3 + Duration::from_secs(1),
        "writers slowed down by a stalled watcher: {baseline:?} -> {with_stalled_watcher:?}"
    );
    // Still not reading, for longer than the server lets a watcher stay behind.
    tokio::time::sleep(hoard::watch::LAG_GRACE + Duration::from_millis(500)).await;

    // The watcher reads again: what was in flight, then the cut-off.
    let (got, status) = drain(&mut stalled).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("behind"), "{}", status.message());
    let resume = trailer(&status, RESUME_AFTER_TRAILER).expect("resume trailer");
    assert!(got.len() < 1000, "the watcher was never cut off");
    eprintln!(
        "the stalled watcher got {} events, then: {}",
        got.len(),
        status.message()
    );
    assert_eq!(sequences(&got), (1001..=resume).collect::<Vec<_>>());

    // Resuming from the named sequence delivers the rest, once.
    let mut stream = watch(connect(&url).await, stored_after(resume))
        .await
        .unwrap();
    let rest = take(&mut stream, (2000 - resume) as usize).await;
    assert_eq!(sequences(&rest), (resume + 1..=2000).collect::<Vec<_>>());
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn hoard_watch_prints_json_lines_and_says_where_to_resume() {
    let server = TestServer::start().await;
    let mut child = hoard_command()
        .args(["watch", "--server", &server.url(), "--kinds"])
        .arg("action-result-stored")
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hoard watch");
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                lines.lock().unwrap().push(line.unwrap());
            }
        })
    };
    let mut ac = server.ac();
    for i in 0..3 {
        store_result(&mut ac, "ci/main", action("d", i)).await;
    }
    eventually(Duration::from_secs(20), || async {
        match lines.lock().unwrap().len() {
            n if n >= 3 => Ok(()),
            n => Err(format!("hoard watch printed too little: {n} lines")),
        }
    })
    .await;
    // Shutting the server down ends the watch; the CLI names the resume point.
    server.stop().await;
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    reader.join().unwrap();
    assert_eq!(status.status.code(), Some(1), "exit status 1: resume");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(stderr.contains("--start-after 3"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let lines = lines.lock().unwrap();
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON object per line");
        assert_eq!(v["sequence"], i as u64 + 1);
        assert_eq!(v["kind"], "ACTION_RESULT_STORED");
        assert_eq!(v["namespace"], "ci/main");
        assert_eq!(v["action_digest"]["hash"], action("d", i as u64).hash);
    }
}

#[tokio::test]
async fn events_a_watcher_saw_survive_sigkill_with_their_sequences() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let server = Process::start(&data_dir).await;
    let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
    let watcher = {
        let seen = seen.clone();
        let channel = server.channel.clone();
        tokio::spawn(async move {
            let mut stream = watch(channel, stored_after(0)).await.unwrap();
            while let Ok(Some(event)) = stream.message().await {
                seen.lock().unwrap().push(event);
            }
        })
    };
    let writer = {
        let channel = server.channel.clone();
        tokio::spawn(async move {
            let mut ac = ActionCacheClient::new(channel);
            for i in 0.. {
                let request = UpdateActionResultRequest {
                    instance_name: "ns".into(),
                    action_digest: Some(action("e", i)),
                    action_result: Some(ActionResult::default()),
                    ..Default::default()
                };
                if ac.update_action_result(request).await.is_err() {
                    return; // killed
                }
            }
        })
    };
    eventually(Duration::from_secs(30), || async {
        match seen.lock().unwrap().len() {
            n if n >= 300 => Ok(()),
            n => Err(format!("the watcher saw too little: {n} events")),
        }
    })
    .await;
    // Mid-stream: writes and the watch are both running.
    server.kill9();
    watcher.await.unwrap();
    writer.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(
        sequences(&seen),
        (1..=seen.len() as u64).collect::<Vec<_>>()
    );

    let server = Process::start(&data_dir).await;
    let mut stream = watch(server.channel.clone(), stored_after(0))
        .await
        .unwrap();
    let after = take(&mut stream, seen.len()).await;
    assert_eq!(after, seen, "an event the watcher saw changed or vanished");
    // New events never reuse a sequence a watcher was sent.
    let mut stream = watch(server.channel.clone(), stored_after(seen.len() as u64))
        .await
        .unwrap();
    let mut ac = ActionCacheClient::new(server.channel.clone());
    store_result(&mut ac, "ns", action("after the crash", 0)).await;
    loop {
        let event = take(&mut stream, 1).await.remove(0);
        assert!(event.sequence > seen.len() as u64);
        if event.action_digest == Some(action("after the crash", 0)) {
            break;
        }
    }
    server.kill9();
}
