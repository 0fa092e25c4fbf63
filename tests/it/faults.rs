//! Faults that outside runs found (acknowledged writes lost on a full disk, one client refusing
//! everyone's writes, unbounded waits, unreadable replies, starving readers, health that
//! disagreed with writes, damaged ranges served): one test each, against a real server.

use std::time::{Duration, Instant};

use hoard::proto::admin::{admin_client::AdminClient, StatsRequest};
use hoard::proto::bytestream::byte_stream_client::ByteStreamClient;
use hoard::proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use hoard::proto::reapi::{
    self, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient, ActionResult,
    BatchUpdateBlobsRequest, FindMissingBlobsRequest, UpdateActionResultRequest,
};
use tonic::transport::Channel;

use crate::common::{
    blob, blob_file, digest_of, download, download_over, fill_disk, missing, poll_until, read_name,
    upload, wait_writes_health, write_blob, write_blob_over, write_name, write_requests,
    writes_health, SmallDisk, TestServer,
};
use crate::crash::Process;

async fn batch_write(channel: &Channel, data: &[u8]) -> Result<(), tonic::Status> {
    let response = ContentAddressableStorageClient::new(channel.clone())
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest_of(data)),
                data: data.to_vec().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    let status = response.responses[0].status.clone().unwrap_or_default();
    if status.code == 0 {
        Ok(())
    } else {
        Err(tonic::Status::new(status.code.into(), status.message))
    }
}

async fn stream_write(channel: &Channel, data: &[u8]) -> Result<(), tonic::Status> {
    let d = digest_of(data);
    let name = write_name("", &uuid::Uuid::new_v4().to_string(), &d);
    write_blob_over(channel.clone(), &name, data, 0, 256 << 10)
        .await
        .map(drop)
}

/// Tries small batch writes and large streamed writes on a full disk: each is refused with
/// RESOURCE_EXHAUSTED, or acknowledged (then it is recorded and must survive).
async fn write_while_full(channel: &Channel, seed: u64, acked: &mut Vec<Vec<u8>>) -> usize {
    let mut refused = 0;
    for i in 0..12u64 {
        let data = if i % 4 == 3 {
            blob(1_500_000, seed + i)
        } else {
            blob(8_000, seed + i)
        };
        let result = if data.len() > 100_000 {
            stream_write(channel, &data).await
        } else {
            batch_write(channel, &data).await
        };
        match result {
            Ok(()) => acked.push(data),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                refused += 1;
            }
        }
    }
    refused
}

async fn assert_all_present(channel: &Channel, acked: &[Vec<u8>]) {
    for data in acked {
        let d = digest_of(data);
        let got = download_over(channel.clone(), &read_name("", &d), 0, 0)
            .await
            .unwrap_or_else(|e| panic!("acknowledged blob {d:?} is lost: {e}"));
        assert!(got == *data, "acknowledged blob {d:?} has wrong bytes");
    }
}

fn upload_leftovers(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("uploads"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A disk filled by another process: nothing acknowledged is lost (across a SIGKILL while
/// full, and a SIGTERM while full, which exits 0), refusals are RESOURCE_EXHAUSTED and leave no
/// files behind, health and stats say so, and writes work again within 5 s of space coming back.
#[tokio::test]
async fn a_full_disk_never_loses_an_acknowledged_write_and_recovers_within_seconds() {
    let Some(disk) = SmallDisk::mount_or_skip("64m") else {
        return;
    };
    let data_dir = disk.path.join("data");
    let server = Process::start(&data_dir).await;
    let mut acked = Vec::new();
    for i in 0..6u64 {
        let data = blob(if i % 2 == 0 { 5_000 } else { 2_000_000 }, 100 + i);
        stream_write(&server.channel, &data).await.unwrap();
        acked.push(data);
    }

    let filler = fill_disk(&disk.path, "filler");
    let refused = write_while_full(&server.channel, 1_000, &mut acked).await;
    assert!(refused > 0, "writes on a full disk were all acknowledged");
    assert!(
        wait_writes_health(&server.channel, 2).await,
        "hoard.Writes stayed SERVING on a full disk"
    );
    let stats = AdminClient::new(server.channel.clone())
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats
            .write_refusal
            .as_deref()
            .is_some_and(|r| r.contains("full")),
        "stats.write_refusal: {:?}",
        stats.write_refusal
    );
    let left = upload_leftovers(&data_dir);
    assert!(left.is_empty(), "refused writes left files: {left:?}");
    // Reads go on.
    assert_all_present(&server.channel, &acked).await;

    // Killed while the disk is full, restarted on it: everything acknowledged is there.
    server.kill9();
    let server = Process::start(&data_dir).await;
    assert_all_present(&server.channel, &acked).await;

    // Space comes back: writes are accepted again within 5 s.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let data = blob(8_000, 2_000);
    let accepted = poll_until(Duration::from_secs(5), || async {
        let result = batch_write(&server.channel, &data).await;
        if let Err(e) = &result {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        }
        result
    })
    .await;
    assert!(
        accepted.is_ok(),
        "writes still refused 5 s after space was freed"
    );
    eprintln!(
        "writes accepted {:?} after space was freed",
        freed.elapsed()
    );
    acked.push(data);
    let large = blob(3_000_000, 2_001);
    stream_write(&server.channel, &large).await.unwrap();
    acked.push(large);
    assert!(wait_writes_health(&server.channel, 1).await);

    // Full again, then a graceful shutdown: it exits 0 and loses nothing acknowledged.
    let filler = fill_disk(&disk.path, "filler");
    write_while_full(&server.channel, 3_000, &mut acked).await;
    server.terminate().await;
    std::fs::remove_file(&filler).unwrap();
    let server = Process::start(&data_dir).await;
    assert_all_present(&server.channel, &acked).await;
    eprintln!("full disk: {} acknowledged blobs all survived", acked.len());
    server.terminate().await;
}

/// A Write that declares a huge blob and stalls holds room for what it sent plus a step, not
/// for the whole declared size: other uploads still fit.
#[tokio::test]
async fn a_stalled_huge_upload_does_not_refuse_everyone_else() {
    let server = TestServer::start_with(|c| {
        c.storage.max_size = hoard::config::ByteSize(512 << 20);
    })
    .await;
    let huge = reapi::Digest {
        hash: "ab".repeat(32),
        size_bytes: 500 << 20,
    };
    let first = WriteRequest {
        resource_name: write_name("", "huge", &huge),
        write_offset: 0,
        finish_write: false,
        data: vec![7u8; 1 << 20].into(),
    };
    // Sends 1 MiB, then nothing, with the stream kept open.
    let stalled =
        futures::StreamExt::chain(futures::stream::iter([first]), futures::stream::pending());
    let mut bs = server.bytestream();
    let hog = tokio::spawn(async move { bs.write(stalled).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = blob(100 << 20, 42);
    let d = digest_of(&other);
    write_blob(&server, &write_name("", "other", &d), &other, 0, 1 << 20)
        .await
        .expect("another upload is refused while a stalled one holds its declared size");
    hog.abort();
}

/// Out of file descriptors, the server backs off instead of spinning on accept(), and serves
/// again once descriptors are free. It also raises its soft limit to the hard one at start.
#[tokio::test]
async fn out_of_descriptors_the_accept_loop_backs_off() {
    let tmp = tempfile::tempdir().unwrap();
    let mut command = Process::command(&tmp.path().join("data"));
    limit_open_files(&mut command, 256, 256);
    let server = Process::start_command(command).await;
    let pid = server.pid();
    let addr = server_addr(pid);
    let mut held = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = std::net::TcpStream::connect(addr) {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = used as f64 / ticks / 2.0;
    eprintln!(
        "CPU while out of descriptors: {:.1}% of a core",
        share * 100.0
    );
    assert!(
        share < 0.2,
        "the accept loop spins: {:.0}% of a core",
        share * 100.0
    );
    drop(held);
    // Descriptors free again: it serves.
    let served = wait_writes_health(&server.channel, 1).await;
    assert!(
        served,
        "the server did not recover after descriptors were freed"
    );
    server.kill9();

    let mut command = Process::command(&tmp.path().join("data2"));
    limit_open_files(&mut command, 256, 4096);
    let server = Process::start_command(command).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(soft, 4096, "{line}");
    server.kill9();
}

fn limit_open_files(command: &mut std::process::Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The listening address of a server process, from /proc (its one listening TCP socket).
fn server_addr(pid: u32) -> std::net::SocketAddr {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(String::from)
        })
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // state 0A is LISTEN
        if f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
            let port = u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap();
            return std::net::SocketAddr::from(([127, 0, 0, 1], port));
        }
    }
    panic!("no listening socket for pid {pid}");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// A Write that never sends its first message ends after write_idle_timeout.
#[tokio::test]
async fn a_write_that_never_sends_its_first_message_times_out() {
    let server = TestServer::start_with(|c| {
        c.limits.write_idle_timeout = hoard::config::HumanDuration(Duration::from_secs(1));
    })
    .await;
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        server
            .bytestream()
            .write(futures::stream::pending::<WriteRequest>()),
    )
    .await
    .expect("the Write stayed open past write_idle_timeout");
    let err = result.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err}");
    assert!(err.message().contains("first message"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A connection that never completes the HTTP/2 handshake is closed after handshake_timeout;
/// one that does gets the stream limit in the server's SETTINGS. (Multi-threaded: the test
/// reads its sockets blocking, and the server must run meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_have_a_deadline_and_settings_announce_the_stream_limit() {
    use std::io::{Read, Write};
    let server = TestServer::start_with(|c| {
        c.limits.handshake_timeout = hoard::config::HumanDuration(Duration::from_secs(1));
        c.limits.max_concurrent_streams = 77;
    })
    .await;
    let addr = server.url().trim_start_matches("http://").to_string();
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    // The server may send its own SETTINGS first; the connection must then be closed.
    loop {
        match silent.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "a silent connection stayed open {waited:?}"
    );

    let mut talker = std::net::TcpStream::connect(&addr).unwrap();
    talker
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    talker
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    talker.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // empty SETTINGS
    let mut header = [0u8; 9];
    talker.read_exact(&mut header).unwrap();
    assert_eq!(header[3], 4, "the server's first frame is not SETTINGS");
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    talker.read_exact(&mut payload).unwrap();
    let streams = payload.chunks_exact(6).find_map(|s| {
        (u16::from_be_bytes([s[0], s[1]]) == 3)
            .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
    });
    assert_eq!(
        streams,
        Some(77),
        "SETTINGS_MAX_CONCURRENT_STREAMS not announced"
    );
}

/// Error messages quote a huge name only in part, so a client with gRPC's default metadata
/// limit reads the real error.
#[tokio::test]
async fn errors_about_huge_names_stay_small() {
    let server = TestServer::start().await;
    let long = "x".repeat(100 << 10);
    let err = server
        .bytestream()
        .read(ReadRequest {
            resource_name: format!("{long}/blobs/zz/1"),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(err.message().len() <= 2100, "{} bytes", err.message().len());
    let err = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: format!("{}/ \n", "a".repeat(60 << 10)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(err.message().len() <= 2100, "{} bytes", err.message().len());
}

/// An action result that a client with the default 4 MiB limit could not fetch is refused,
/// and nothing is stored.
#[tokio::test]
async fn an_action_result_above_the_batch_limit_is_refused() {
    let server = TestServer::start().await;
    let action = digest_of(b"big stdout");
    let err = server
        .ac()
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(ActionResult {
                stdout_raw: vec![b'o'; 15 << 20].into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("max_batch_total_size"),
        "{}",
        err.message()
    );
    assert!(crate::common::lookup_result(&server, "", &action)
        .await
        .is_none());
}

/// A request above limits.max_message_size is RESOURCE_EXHAUSTED, as gRPC's code table says.
#[tokio::test]
async fn an_oversize_message_is_resource_exhausted() {
    let server = TestServer::start().await;
    let data = vec![1u8; 17 << 20];
    let err = server
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest_of(&data)),
                data: data.into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
    // FindMissingBlobs (decoded by the server's own reader): 250k digests, 17 MiB.
    let digests: Vec<_> = (0..250_000u32)
        .map(|i| digest_of(&i.to_le_bytes()))
        .collect();
    let err = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("FindMissingBlobsRequest"),
        "{}",
        err.message()
    );
    // Streamed: a Write message above the limit.
    let big = vec![2u8; 17 << 20];
    let d = digest_of(&big);
    let err = write_blob(&server, &write_name("", "big", &d), &big, 0, 17 << 20)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
}

/// Hundreds of reads that take one chunk and stop hold bounded memory, and health answers
/// meanwhile.
#[tokio::test]
async fn stalled_readers_hold_bounded_memory_and_health_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Process::start(&tmp.path().join("data")).await;
    let data = blob(16 << 20, 9);
    stream_write(&server.channel, &data).await.unwrap();
    let d = digest_of(&data);
    let idle = rss_bytes(server.pid());
    let addr = format!("http://{}", server_addr(server.pid()));
    let mut streams = Vec::new();
    for _ in 0..20 {
        // Windows large enough that one stalled stream does not block the connection's others.
        let channel = Channel::from_shared(addr.clone())
            .unwrap()
            .initial_connection_window_size(64 << 20)
            .initial_stream_window_size(2 << 20)
            .connect()
            .await
            .unwrap();
        for _ in 0..20 {
            let mut s = ByteStreamClient::new(channel.clone())
                .read(ReadRequest {
                    resource_name: read_name("", &d),
                    read_offset: 0,
                    read_limit: 0,
                })
                .await
                .unwrap()
                .into_inner();
            s.message().await.unwrap();
            streams.push(s);
        }
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(writes_health(&server.channel).await, 1);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = rss_bytes(server.pid()).saturating_sub(idle);
    eprintln!(
        "400 stalled reads of a 16 MiB blob: RSS grew {} MiB; slowest health check {slowest:?}",
        grown >> 20
    );
    // The read budget is 128 MiB, plus about a chunk per stalled read beyond it and one the
    // HTTP/2 layer holds (about 3.8 MiB each measured); before, each stalled read held about
    // 9 MiB (3.5 GiB here).
    assert!(grown < 2 << 30, "RSS grew {} MiB", grown >> 20);
    assert!(slowest < Duration::from_secs(1), "health took {slowest:?}");
    drop(streams);
    server.kill9();
}

/// A Write that trickles a byte per interval is ended once a window passes below
/// min_transfer_rate, though it never trips the idle timeout.
#[tokio::test]
async fn a_trickling_upload_is_ended() {
    let server = TestServer::start_with(|c| {
        c.limits.write_idle_timeout = hoard::config::HumanDuration(Duration::from_secs(2));
    })
    .await;
    let data = blob(1 << 20, 77);
    let d = digest_of(&data);
    let name = write_name("", "trickle", &d);
    let trickle = futures::stream::unfold(0usize, move |at| {
        let name = name.clone();
        async move {
            if at > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some((
                WriteRequest {
                    resource_name: name,
                    write_offset: at as i64,
                    finish_write: false,
                    data: vec![0u8; 1].into(),
                },
                at + 1,
            ))
        }
    });
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), server.bytestream().write(trickle))
        .await
        .expect("a trickling upload was never ended")
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err}");
    assert!(
        err.message().contains("min_transfer_rate"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// With the blob dirs read-only, writes are refused and `hoard.Writes` says NOT_SERVING; once
/// they are writable again, both recover.
#[tokio::test]
async fn a_read_only_data_dir_is_reported_by_health() {
    let server = TestServer::start().await;
    let dirs = [
        server.data_dir().join("cas"),
        server.data_dir().join("uploads"),
    ];
    let mounted = dirs.iter().all(|d| {
        let bind = std::process::Command::new("mount")
            .args(["--bind"])
            .arg(d)
            .arg(d)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        bind && std::process::Command::new("mount")
            .args(["-o", "remount,ro,bind"])
            .arg(d)
            .status()
            .is_ok_and(|s| s.success())
    });
    if !mounted {
        for d in &dirs {
            let _ = std::process::Command::new("umount").arg(d).status();
        }
        assert!(
            std::env::var_os("HOARD_REQUIRE_DISK_FULL_TEST").is_none(),
            "cannot bind-mount read-only, and HOARD_REQUIRE_DISK_FULL_TEST is set"
        );
        eprintln!("SKIPPED: cannot bind-mount (needs root)");
        return;
    }
    let data = blob(500_000, 3);
    let d = digest_of(&data);
    let err = write_blob(&server, &write_name("", "ro", &d), &data, 0, 64 << 10)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    let ro = wait_writes_health(&server.channel(), 2).await;
    for d in &dirs {
        let _ = std::process::Command::new("umount").arg(d).status();
    }
    assert!(ro, "hoard.Writes stayed SERVING with read-only blob dirs");
    assert!(
        wait_writes_health(&server.channel(), 1).await,
        "hoard.Writes stayed NOT_SERVING"
    );
    upload(&server, "", &data).await;
}

/// Right after a Write fails mid-upload, QueryWriteStatus reports every byte it persisted.
#[tokio::test]
async fn query_write_status_after_a_failed_write_reports_what_was_persisted() {
    let server = TestServer::start().await;
    for i in 0..20u64 {
        let data = blob(4 << 20, 500 + i);
        let d = digest_of(&data);
        let name = write_name("", &format!("part{i}"), &d);
        // 2 MiB, then the stream ends without finish_write.
        let reqs = write_requests(&name, &data[..2 << 20], 0, 256 << 10)
            .into_iter()
            .map(|mut r| {
                r.finish_write = false;
                r
            })
            .collect::<Vec<_>>();
        let err = server
            .bytestream()
            .write(futures::stream::iter(reqs))
            .await
            .unwrap_err();
        assert!(err.message().contains("2097152 bytes"), "{}", err.message());
        let status = server
            .bytestream()
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.committed_size, 2 << 20, "try {i}");
    }
}

/// A ranged read that covers a damaged byte fails instead of serving it, and the blob is
/// removed; ranges elsewhere in a sound blob are served.
#[tokio::test]
async fn a_ranged_read_across_a_damaged_chunk_fails_and_removes_the_blob() {
    let server = TestServer::start().await;
    let data = blob(5 << 20, 11);
    let d = upload(&server, "", &data).await;
    let sound = blob(5 << 20, 12);
    let sound_d = upload(&server, "", &sound).await;
    let path = blob_file(&server, &d);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (2 << 20) + 12_345;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let err = download(&server, &read_name("", &d), (2 << 20) + 10_000, 100_000)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let missing = missing(&server, std::slice::from_ref(&d)).await;
    assert_eq!(missing, vec![d], "the damaged blob is still offered");

    let start = (3 << 20) - 7;
    let got = download(&server, &read_name("", &sound_d), start as i64, 1 << 20)
        .await
        .unwrap();
    assert!(got == sound[start..start + (1 << 20)]);
}
