//! Start, stop, restart: persistence and the command line's behaviour on bad set-ups.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hoard::proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};

use crate::common::{
    blob, digest_of, download, hoard_command, read_name, temp_config, upload, TestServer,
};

#[tokio::test]
async fn blobs_and_action_results_survive_a_restart() {
    let (_tmp, config) = temp_config();
    let small = blob(1000, 1);
    let large = blob(1_500_000, 2);
    let action = digest_of(b"an action");
    let result = ActionResult {
        exit_code: 0,
        stdout_digest: Some(digest_of(&small)),
        ..Default::default()
    };

    let server = TestServer::start_config(config.clone()).await;
    upload(&server, "", &small).await;
    upload(&server, "", &large).await;
    server
        .ac()
        .update_action_result(UpdateActionResultRequest {
            instance_name: "ci/main".into(),
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    server.stop().await;

    let server = TestServer::start_config(config).await;
    for data in [&small, &large] {
        let got = download(&server, &read_name("", &digest_of(data)), 0, 0)
            .await
            .expect("blob after restart");
        assert!(&got == data);
    }
    let got = server
        .ac()
        .get_action_result(GetActionResultRequest {
            instance_name: "ci/main".into(),
            action_digest: Some(action),
            ..Default::default()
        })
        .await
        .expect("action result after restart")
        .into_inner();
    assert_eq!(got, result);
    server.stop().await;
}

/// Runs `hoard serve` expecting it to fail at once; returns its stderr.
fn serve_fails(args: &[&str]) -> String {
    let out = hoard_command()
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .expect("run hoard");
    assert!(!out.status.success(), "hoard serve {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one-line error, got: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn a_port_in_use_is_a_one_line_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let err = serve_fails(&[
        "--listen",
        &addr,
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(err.contains(&addr), "{err}");
}

#[test]
fn an_unusable_data_dir_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = serve_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        file.to_str().unwrap(),
    ]);
    assert!(err.contains("data dir"), "{err}");
}

#[test]
fn a_bad_config_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nno_such_field = 1\n").unwrap();
    let err = serve_fails(&["--config", config.to_str().unwrap()]);
    assert!(err.contains("no_such_field"), "{err}");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = hoard_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hoard");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut serving = false;
    while Instant::now() < deadline {
        match lines.next() {
            Some(Ok(line)) if line.contains("hoard is serving") => {
                serving = true;
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(serving, "server did not start");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}; log: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("store flushed")), "{rest:?}");
}

#[tokio::test]
async fn a_data_dir_in_use_is_a_one_line_error() {
    let server = TestServer::start().await;
    // A call the store answers: it holds the data dir by then.
    crate::common::stats(&server).await;
    let dir = server.data_dir().to_str().unwrap().to_string();
    let err = serve_fails(&["--listen", "127.0.0.1:0", "--data-dir", &dir]);
    assert!(err.contains("in use by another hoard"), "{err}");
    server.stop().await;
}
