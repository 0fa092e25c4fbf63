//! TLS and mTLS on the gRPC port, with certificates made here (rcgen): REAPI calls over TLS, a
//! plaintext client refused at once, client certificates under mTLS (none, another CA's, a good
//! one, and the subject every request then carries), handshake deadlines, certificate rotation
//! on SIGHUP with a connection that stays up, the CLI over grpcs://, and the ops port staying
//! plaintext.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use futures::StreamExt;
use hoard::config::{Config, HumanDuration, TlsConfig};
use hoard::proto::health::{health_client::HealthClient, HealthCheckRequest};
use hoard::proto::reapi::{
    self, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::server::Connected;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::{blob, digest_of, hoard_command, hoard_with, json, stdout, TestServer};

/// A certificate authority of the test's own.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A server certificate for 127.0.0.1 (and localhost).
    fn server(&self) -> Pair {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "hoard");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose subject's common name is `name`.
    fn client(&self, name: &str) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a server certificate from `ca` (and `client_ca`'s certificate) into `dir`; the
/// `[tls]` section naming them.
fn tls_files(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> TlsConfig {
    let pair = ca.server();
    TlsConfig {
        cert: write(dir, "server.pem", &pair.cert),
        key: write(dir, "server.key", &pair.key),
        client_ca: client_ca.map(|c| write(dir, "client-ca.pem", &c.pem)),
    }
}

/// A TLS server whose certificate `ca` signed; mTLS with `client_ca`.
async fn tls_server(
    ca: &Ca,
    client_ca: Option<&Ca>,
    edit: impl FnOnce(&mut Config),
) -> (TestServer, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let files = tls_files(certs.path(), ca, client_ca);
    let server = TestServer::start_with(|c| {
        c.tls = Some(files);
        edit(c);
    })
    .await;
    (server, certs)
}

/// A TLS connection to `addr` trusting only `trust`, presenting `identity` if given.
async fn connect(
    addr: std::net::SocketAddr,
    trust: &Ca,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&trust.pem));
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// BatchUpdateBlobs of a blob, then BatchReadBlobs of it: the bytes must come back.
async fn round_trip(channel: Channel, seed: u64) -> Result<(), tonic::Status> {
    let mut cas = ContentAddressableStorageClient::new(channel);
    let data = blob(1000, seed);
    let digest = digest_of(&data);
    let stored = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest.clone()),
                data: data.clone().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(stored.responses[0].status.as_ref().unwrap().code, 0);
    let read = cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![digest],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(read.responses[0].data, data);
    Ok(())
}

/// A connection to `ca`'s server that fails, at connect or (TLS 1.3 sends the client's
/// certificate after the client considers the handshake done) at the first call.
async fn refused(channel: Result<Channel, tonic::transport::Error>) -> String {
    match channel {
        Err(e) => hoard::client::error_chain(&e),
        Ok(channel) => match round_trip(channel, 1).await {
            Err(status) => status.to_string(),
            Ok(()) => panic!("the call succeeded"),
        },
    }
}

#[tokio::test]
async fn reapi_calls_work_over_tls() {
    let ca = Ca::new("test CA");
    let (server, _certs) = tls_server(&ca, None, |_| {}).await;
    let channel = connect(server.addr(), &ca, None)
        .await
        .expect("TLS connect");
    round_trip(channel.clone(), 1).await.expect("over TLS");
    round_trip(channel, 2)
        .await
        .expect("the same connection again");

    // A client that does not trust the server's CA is refused by its own side.
    let other = Ca::new("another CA");
    let e = refused(connect(server.addr(), &other, None).await).await;
    assert!(e.contains("certificate"), "{e}");
    server.stop().await;
}

/// rustls rejects the HTTP/2 preface as a TLS record at once: the plaintext client sees an
/// error, not a wait until the handshake deadline.
#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_fails_at_once() {
    let ca = Ca::new("test CA");
    let (server, _certs) = tls_server(&ca, None, |c| {
        c.limits.handshake_timeout = HumanDuration(Duration::from_secs(600));
    })
    .await;
    let plain = Channel::from_shared(format!("http://{}", server.addr())).unwrap();
    let plain = plain.connect();
    let connected = tokio::time::timeout(Duration::from_secs(20), plain)
        .await
        .expect("a plaintext client hung on the TLS port");
    match connected {
        Err(_) => {}
        Ok(channel) => {
            let call = round_trip(channel, 1);
            let result = tokio::time::timeout(Duration::from_secs(20), call)
                .await
                .expect("a plaintext call hung on the TLS port");
            assert!(
                result.is_err(),
                "a plaintext call succeeded on the TLS port"
            );
        }
    }
    server.stop().await;
}

/// Under mTLS a client without a certificate, or with one another CA signed, is refused; one
/// with a certificate from `client_ca` is served.
#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let (server, _certs) = tls_server(&server_ca, Some(&client_ca), |_| {}).await;

    // The client usually hears why as a TLS alert, but hyper may report only that the
    // connection closed under the call (a race on the client's side), so only the refusal
    // itself is asserted.
    let alert_or_closed = |e: &str, alert: &str| e.contains(alert) || e.contains("closed");
    let e = refused(connect(server.addr(), &server_ca, None).await).await;
    assert!(alert_or_closed(&e, "CertificateRequired"), "{e}");
    let stranger = Ca::new("stranger CA").client("ci-runner");
    let e = refused(connect(server.addr(), &server_ca, Some(&stranger)).await).await;
    assert!(alert_or_closed(&e, "UnknownCA"), "{e}");
    // A certificate signed by the server's CA is not a client certificate here either.
    let wrong = server_ca.client("ci-runner");
    let e = refused(connect(server.addr(), &server_ca, Some(&wrong)).await).await;
    assert!(alert_or_closed(&e, "UnknownCA"), "{e}");

    let good = client_ca.client("ci-runner");
    let channel = connect(server.addr(), &server_ca, Some(&good))
        .await
        .expect("mTLS connect");
    round_trip(channel, 1).await.expect("mTLS call");
    server.stop().await;
}

/// What the auth layer reads: every connection's `Peer` carries the verified client
/// certificate's common name under mTLS, and none otherwise.
#[tokio::test]
async fn the_verified_client_certificate_names_the_peer() {
    let certs = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let mutual = hoard::tls::Tls::load(&tls_files(certs.path(), &server_ca, Some(&client_ca)))
        .expect("load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Box::pin(hoard::connections::incoming(
        listener,
        Duration::from_secs(60),
        Some(std::sync::Arc::new(mutual)),
    ));
    let client = client_ca.client("ci-runner ü");
    let connecting = tokio::spawn(rustls_connect(addr, server_ca.pem.clone(), Some(client)));
    let conn = incoming.next().await.unwrap().unwrap();
    let (_tls, local) = connecting.await.unwrap();
    let peer = conn.connect_info();
    assert_eq!(peer.cert_subject.as_deref(), Some("ci-runner ü"));
    assert_eq!(peer.addr, Some(local));

    // TLS without client certificates, and plaintext: no subject, the address still.
    let server_only = hoard::tls::Tls::load(&tls_files(certs.path(), &server_ca, None)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Box::pin(hoard::connections::incoming(
        listener,
        Duration::from_secs(60),
        Some(std::sync::Arc::new(server_only)),
    ));
    let connecting = tokio::spawn(rustls_connect(addr, server_ca.pem.clone(), None));
    let peer = incoming.next().await.unwrap().unwrap().connect_info();
    let (_tls, local) = connecting.await.unwrap();
    assert_eq!(peer.cert_subject, None);
    assert_eq!(peer.addr, Some(local));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Box::pin(hoard::connections::incoming(
        listener,
        Duration::from_secs(60),
        None,
    ));
    let plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    let peer = incoming.next().await.unwrap().unwrap().connect_info();
    assert_eq!(peer.cert_subject, None);
    assert_eq!(peer.addr, Some(plain.local_addr().unwrap()));
}

/// A raw rustls client (no HTTP/2): the TLS stream once the handshake is done, and its local
/// address.
async fn rustls_connect(
    addr: std::net::SocketAddr,
    ca_pem: String,
    identity: Option<Pair>,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    std::net::SocketAddr,
) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(pair) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pair.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    // Under TLS 1.3 the server reads the client's certificate after the client is done:
    // a flush lets it through.
    tls.flush().await.unwrap();
    (tls, local)
}

/// A peer that never starts the TLS handshake, or finishes it and never sends the HTTP/2
/// preface, is dropped at handshake_timeout.
#[tokio::test]
async fn tls_handshakes_have_a_deadline() {
    let ca = Ca::new("test CA");
    let (server, _certs) = tls_server(&ca, None, |c| {
        c.limits.handshake_timeout = HumanDuration(Duration::from_secs(1));
    })
    .await;
    let silent = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_to_end(silent))
        .await
        .expect("a silent connection stayed open");
    // The server may send its SETTINGS first; then the connection must close.
    let (tls, _) = rustls_connect(server.addr(), ca.pem.clone(), None).await;
    tokio::time::timeout(Duration::from_secs(10), read_to_end(tls))
        .await
        .expect("a TLS connection without the HTTP/2 preface stayed open");
    server.stop().await;
}

/// Reads until the peer closes (or the connection fails).
async fn read_to_end(mut stream: impl tokio::io::AsyncRead + Unpin) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Handshakes run side by side: a peer that never sends its ClientHello holds up nobody.
#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_others() {
    let ca = Ca::new("test CA");
    let (server, _certs) = tls_server(&ca, None, |c| {
        c.limits.handshake_timeout = HumanDuration(Duration::from_secs(600));
    })
    .await;
    let _stalled: Vec<_> =
        futures::future::join_all((0..3).map(|_| tokio::net::TcpStream::connect(server.addr())))
            .await;
    let call = async {
        let channel = connect(server.addr(), &ca, None).await.expect("connect");
        round_trip(channel, 1).await.expect("call");
    };
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("a stalled handshake held up another connection");
    server.stop().await;
}

#[tokio::test]
async fn the_ops_port_stays_plaintext() {
    let ca = Ca::new("test CA");
    let (server, _certs) = tls_server(&ca, None, |_| {}).await;
    // The gRPC port must be up first (the store opens before it serves).
    let channel = connect(server.addr(), &ca, None).await.unwrap();
    round_trip(channel, 1).await.unwrap();

    let mut conn = tokio::net::TcpStream::connect(server.ops_addr())
        .await
        .unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: hoard\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    let ops = Channel::from_shared(format!("http://{}", server.ops_addr()))
        .unwrap()
        .connect()
        .await
        .expect("plaintext gRPC on the ops port");
    let health = HealthClient::new(ops)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health over plaintext");
    assert_eq!(health.into_inner().status, 1);
    server.stop().await;
}

#[tokio::test]
async fn the_cli_talks_grpcs_with_a_ca_and_a_client_certificate() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let (server, certs) = tls_server(&server_ca, Some(&client_ca), |_| {}).await;
    let dir = certs.path();
    let ca = write(dir, "ca.pem", &server_ca.pem);
    let client = client_ca.client("operator");
    let cert = write(dir, "client.pem", &client.cert);
    let key = write(dir, "client.key", &client.key);
    let url = format!("grpcs://{}", server.addr());
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );

    let out = hoard_with(
        &[
            "stats",
            "--server",
            &url,
            "--tls-ca",
            ca,
            "--tls-client-cert",
            cert,
            "--tls-client-key",
            key,
            "--json",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = json(&out);
    assert!(stats.is_object(), "{}", stdout(&out));

    // The same from the environment.
    let out = hoard_with(
        &["stats", "--server", &url],
        &[
            ("HOARD_TLS_CA", ca),
            ("HOARD_TLS_CLIENT_CERT", cert),
            ("HOARD_TLS_CLIENT_KEY", key),
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");

    // Without a client certificate: refused, exit 2, one line.
    let out = hoard_with(&["stats", "--server", &url, "--tls-ca", ca], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&server.addr().to_string()), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn tls_files_that_do_not_load_stop_the_start_with_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let mut files = tls_files(dir.path(), &ca, None);
    files.key = dir.path().join("missing.key");
    let config = write(
        dir.path(),
        "hoard.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\n",
            dir.path().join("data"),
            files.cert,
            files.key
        ),
    );
    let out = tokio::task::spawn_blocking(move || {
        hoard_command()
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "off")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("missing.key: cannot read"), "{err}");
}

/// A `hoard serve` process whose log lines the test can wait for.
struct Serve {
    child: Child,
    lines: std_mpsc::Receiver<String>,
    addr: std::net::SocketAddr,
}

impl Serve {
    fn start(config: &Path) -> Serve {
        let mut child = hoard_command()
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hoard");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut serve = Serve {
            child,
            lines,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let line = serve.wait_for("hoard is serving");
        let at = line.find("listen=").expect("listen= in the log") + 7;
        serve.addr = line[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        serve
    }

    /// The next log line containing `text` (panics after 60 s or at exit).
    fn wait_for(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => continue,
                Err(e) => panic!("no log line with {text:?}: {e}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    fn stop(mut self) {
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exit status {status}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_file(dir: &Path, tls: Option<&TlsConfig>) -> PathBuf {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n",
        dir.join("data")
    );
    if let Some(tls) = tls {
        text += &format!("[tls]\ncert = {:?}\nkey = {:?}\n", tls.cert, tls.key);
    }
    write(dir, "hoard.toml", &text)
}

/// Rotation without a restart: after the files are replaced and SIGHUP sent, new connections
/// get the new certificate, and a connection opened before keeps working (a reconnect would
/// fail: it trusts only the old CA). Files that do not load keep the current certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (Ca::new("CA A"), Ca::new("CA B"));
    let files = tls_files(dir.path(), &ca_a, None);
    let config = config_file(dir.path(), Some(&files));
    let serve = tokio::task::block_in_place(|| Serve::start(&config));
    let addr = serve.addr;

    let before = connect(addr, &ca_a, None).await.expect("connect with CA A");
    round_trip(before.clone(), 1)
        .await
        .expect("call before rotation");

    let pair = ca_b.server();
    std::fs::write(&files.cert, &pair.cert).unwrap();
    std::fs::write(&files.key, &pair.key).unwrap();
    serve.signal("HUP");
    let line = tokio::task::block_in_place(|| serve.wait_for("SIGHUP"));
    assert!(line.contains("TLS reloaded"), "{line}");

    round_trip(before.clone(), 2)
        .await
        .expect("the connection opened before the rotation is still up");
    let after = connect(addr, &ca_b, None).await.expect("connect with CA B");
    round_trip(after, 3).await.expect("call after rotation");
    let e = refused(connect(addr, &ca_a, None).await).await;
    assert!(e.contains("certificate"), "{e}");

    // A half-written rotation (key missing) is refused; CA B's certificate stays.
    std::fs::write(&files.key, "").unwrap();
    serve.signal("HUP");
    let line = tokio::task::block_in_place(|| serve.wait_for("SIGHUP"));
    assert!(line.contains("not reloaded"), "{line}");
    assert!(line.contains("server.key"), "{line}");
    let still = connect(addr, &ca_b, None).await.expect("CA B still served");
    round_trip(still, 4).await.unwrap();
    round_trip(before, 5).await.unwrap();

    tokio::task::block_in_place(|| serve.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_is_logged_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), None);
    let serve = tokio::task::block_in_place(|| Serve::start(&config));
    serve.signal("HUP");
    let line = tokio::task::block_in_place(|| serve.wait_for("SIGHUP"));
    assert!(line.contains("nothing to reload"), "{line}");
    let channel = Channel::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .connect()
        .await
        .expect("still serving after SIGHUP");
    round_trip(channel, 1).await.unwrap();
    tokio::task::block_in_place(|| serve.stop());
}

/// mTLS and `[[auth.client_cert]]`: the verified certificate's subject is the caller, with its
/// grants; an unlisted subject gets the anonymous grants under its own name; a bearer token,
/// when sent, decides instead.
#[tokio::test]
async fn client_certificate_subjects_carry_grants() {
    use hoard::auth::{hash_token, Access, AuthConfig, ClientCertConfig, TokenConfig};
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let (server, _certs) = tls_server(&server_ca, Some(&client_ca), |c| {
        c.auth = Some(AuthConfig {
            anonymous: Access::Read,
            tokens: vec![TokenConfig {
                name: "reader".into(),
                hash: hash_token("reader-secret"),
                grants: vec!["read:**".parse().unwrap()],
            }],
            client_certs: vec![ClientCertConfig {
                subject: "ci-runner".into(),
                grants: vec!["write:**".parse().unwrap()],
            }],
        });
    })
    .await;
    let runner = client_ca.client("ci-runner");
    let channel = connect(server.addr(), &server_ca, Some(&runner))
        .await
        .expect("mTLS connect");
    round_trip(channel.clone(), 7)
        .await
        .expect("ci-runner may write");

    // The same certificate with a read-only token: the token decides.
    let mut cas =
        ContentAddressableStorageClient::with_interceptor(channel, |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", "Bearer reader-secret".parse().unwrap());
            Ok(r)
        });
    let data = blob(1000, 8);
    let refused = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest_of(&data)),
                data: data.into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .expect_err("the reader token may not write");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("\"reader\""), "{refused:?}");

    // A subject nobody listed: anonymous grants (read), under its own name.
    let visitor = client_ca.client("visitor");
    let channel = connect(server.addr(), &server_ca, Some(&visitor))
        .await
        .expect("mTLS connect");
    let e = round_trip(channel, 9)
        .await
        .expect_err("visitor may not write");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("\"cert:visitor\""), "{e:?}");
    server.stop().await;
}

/// Under `anonymous = "none"` a certificate nobody listed is not enough.
#[tokio::test]
async fn an_unlisted_certificate_is_unauthenticated_when_anonymous_gets_nothing() {
    use hoard::auth::{Access, AuthConfig};
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let (server, _certs) = tls_server(&server_ca, Some(&client_ca), |c| {
        c.auth = Some(AuthConfig {
            anonymous: Access::None,
            tokens: vec![],
            client_certs: vec![],
        });
    })
    .await;
    let visitor = client_ca.client("visitor");
    let channel = connect(server.addr(), &server_ca, Some(&visitor))
        .await
        .expect("mTLS connect");
    let e = round_trip(channel, 10).await.expect_err("unlisted");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("not listed"), "{e:?}");
    server.stop().await;
}

/// A replica (`[upstream]`) reaches an mTLS upstream with the CA and client certificate of its
/// config, and its clients speak plaintext to it.
#[tokio::test]
async fn a_replica_reaches_an_mtls_upstream_with_its_own_certificate() {
    let ca = Ca::new("test CA");
    let clients = Ca::new("client CA");
    let (centre, certs) = tls_server(&ca, Some(&clients), |_| {}).await;
    let pair = clients.client("replica-eu");
    let dir = certs.path();
    let upstream = format!(
        "[upstream]\nendpoint = \"grpcs://{}\"\ntls_ca = \"{}\"\ntls_client_cert = \"{}\"\n\
         tls_client_key = \"{}\"\n",
        centre.addr(),
        write(dir, "ca.pem", &ca.pem).display(),
        write(dir, "replica.pem", &pair.cert).display(),
        write(dir, "replica.key", &pair.key).display(),
    );
    let parsed = Config::parse(&upstream).expect("replica config");
    let replica = TestServer::start_with(|c| c.upstream = parsed.upstream).await;
    round_trip(replica.channel(), 3)
        .await
        .expect("through the replica");
    // The blob is at the centre.
    let data = blob(1000, 3);
    let channel = connect(centre.addr(), &ca, Some(&clients.client("checker")))
        .await
        .expect("mTLS connect");
    let read = ContentAddressableStorageClient::new(channel)
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![digest_of(&data)],
            ..Default::default()
        })
        .await
        .expect("read at the centre")
        .into_inner();
    assert_eq!(read.responses[0].data, data);
}

/// Webhooks come over HTTPS with HTTP/1.1 (ALPN `http/1.1` after `h2`): a forge's delivery and
/// `hoard hook git --tls-ca` both reach the TLS port, and gRPC on it still works.
#[tokio::test]
async fn webhooks_reach_the_tls_port_over_http1() {
    let ca = Ca::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "github-secret", "s3cret\n");
    let (server, certs) = tls_server(&ca, None, |c| {
        c.hooks.github_secret_file = Some(secret);
    })
    .await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .http1_only()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
    let signature = hex::encode(ring::hmac::sign(&key, b"{}").as_ref());
    let reply = client
        .post(format!(
            "https://localhost:{}/hooks/github",
            server.addr().port()
        ))
        .header("content-type", "application/json")
        .header("x-github-event", "ping")
        .header("x-github-delivery", "tls-1")
        .header("x-hub-signature-256", format!("sha256={signature}"))
        .body("{}")
        .send()
        .await
        .expect("POST over TLS");
    assert_eq!(reply.version(), reqwest::Version::HTTP_11);
    assert_eq!(reply.status().as_u16(), 200);
    assert_eq!(reply.text().await.unwrap().trim(), r#"{"pong":true}"#);

    // The CLI with --tls-ca: an empty push (no ref lines) is posted and matches no rule.
    let ca_file = write(certs.path(), "ca.pem", &ca.pem);
    let mut hook = hoard_command();
    hook.args(["hook", "git", "--server"])
        .arg(format!("grpcs://localhost:{}", server.addr().port()))
        .arg("--tls-ca")
        .arg(&ca_file)
        .env("RUST_LOG", "off")
        .env_remove("HOARD_SERVER")
        .env_remove("HOARD_TOKEN")
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || hook.output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no [[hooks.rule]] matched"),
        "{out:?}"
    );
    let channel = connect(server.addr(), &ca, None)
        .await
        .expect("TLS connect");
    round_trip(channel, 3).await.expect("gRPC over TLS");
    server.stop().await;
}

/// The registry front takes the same `[tls]` as the gRPC port: a container client trusting the
/// CA pushes and pulls over HTTPS.
#[tokio::test]
async fn the_registry_front_serves_over_tls() {
    let ca = Ca::new("test CA");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_server, _certs) = tls_server(&ca, None, |c| c.oci_listen = Some(port)).await;
    crate::common::poll_until(std::time::Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(port).await
    })
    .await
    .expect("the OCI port listens");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let url = format!("https://localhost:{}", port.port());
    let data = b"a layer over TLS".to_vec();
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
    );
    let r = client
        .post(format!("{url}/v2/cache/tls/blobs/uploads/?digest={digest}"))
        .body(data.clone())
        .send()
        .await
        .expect("POST over TLS");
    assert_eq!(r.status().as_u16(), 201);
    let r = client
        .get(format!("{url}/v2/cache/tls/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    // Plain HTTP on the TLS port gets nowhere.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/v2/", port.port()))
        .send()
        .await;
    assert!(plain.map(|r| r.status().as_u16() != 200).unwrap_or(true));
}
