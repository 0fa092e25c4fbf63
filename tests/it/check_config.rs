//! `hoard check-config FILE`: every sample config under deploy/ passes; a config a server would
//! refuse fails with exit status 1 and one line that says why.

use crate::common::{hoard, stdout};

/// Every `.toml` under `dir`, recursively.
fn tomls(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read deploy/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            tomls(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn every_sample_config_under_deploy_passes() {
    let mut files = Vec::new();
    tomls(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        &mut files,
    );
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let out = hoard(&["check-config", file.to_str().unwrap()]).await;
        assert!(out.status.success(), "{}: {out:?}", file.display());
        assert!(stdout(&out).contains("effective settings"), "{out:?}");
    }
}

/// The one-line error `check-config` gives for a config with `text`.
async fn refused(text: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, text.replace("TMP", tmp.path().to_str().unwrap())).unwrap();
    let out = hoard(&["check-config", file.to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[tokio::test]
async fn a_config_a_server_would_refuse_fails_and_says_why() {
    let e = refused("listen = \"127.0.0.1:9092\"\nops_listen = \"127.0.0.1:9092\"\n").await;
    assert!(e.contains("ops_listen"), "{e}");
    let e = refused("[storage]\nlow_watermark = 95\nhigh_watermark = 90\n").await;
    assert!(e.contains("watermark"), "{e}");
    let e = refused("[[namespaces.rule]]\npattern = \"ci/?\"\n").await;
    assert!(e.contains("pattern") || e.contains('?'), "{e}");
    let e = refused("[tls]\ncert = \"TMP/missing.pem\"\nkey = \"TMP/missing.key\"\n").await;
    assert!(e.contains("missing.pem"), "{e}");
    let e = refused("[upstream]\nendpoint = \"grpc://c:1\"\ntoken_file = \"TMP/nope\"\n").await;
    assert!(e.contains("token_file"), "{e}");
    let e = refused("data_dir = \"TMP/bad.toml\"\n").await;
    assert!(e.contains("not a directory"), "{e}");
    let e = refused("listen = \n").await;
    assert!(e.contains("line 1"), "{e}");
    let e =
        refused("oci_listen = \"127.0.0.1:5001\"\n[upstream]\nendpoint = \"grpc://c:1\"\n").await;
    assert!(e.contains("oci_listen cannot be used on a replica"), "{e}");
    let e = refused("[hooks]\ngithub_secret_file = \"TMP/no-secret\"\n").await;
    assert!(
        e.contains("hooks.github_secret_file") && e.contains("cannot read"),
        "{e}"
    );
    let e = refused("[[hooks.rule]]\non = \"delete\"\nprune = \"ci/{tag}\"\n").await;
    assert!(
        e.contains("hooks.rule 1") && e.contains("use {branch}"),
        "{e}"
    );
}

/// deploy/systemd/hoard.service passes `systemd-analyze verify` (with this build's binary in
/// place of /usr/local/bin/hoard), where systemd-analyze exists; under CI it must.
#[tokio::test]
async fn the_systemd_unit_verifies() {
    let Ok(found) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        assert!(std::env::var_os("CI").is_none(), "CI needs systemd-analyze");
        eprintln!("SKIPPED: no systemd-analyze");
        return;
    };
    assert!(found.status.success());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/hoard.service")).unwrap();
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("NoNewPrivileges=true"));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("hoard.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/hoard", env!("CARGO_BIN_EXE_hoard")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Only what concerns our unit (the host's own units may have complaints of their own).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("hoard.service"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}
