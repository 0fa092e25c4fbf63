//! TLS on the gRPC port (`[tls]`): the server's certificate chain and key, and with `client_ca`
//! the CA that every client certificate must chain to (mTLS), loaded from PEM files into a
//! rustls config.
//!
//! [`Tls`] holds the current config. Each connection takes the config current when it arrives
//! and keeps it for its life, so [`Tls::reload`] (on SIGHUP) never drops a connection, and a
//! reload whose files do not load leaves the old config serving. The handshake itself runs in
//! `connections.rs`, under the handshake deadline. This module must not know gRPC.

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// The gRPC port's TLS config, swapped whole on reload.
pub struct Tls {
    /// Where cert, key and client CA are read from, at start and on every reload.
    files: TlsConfig,
    /// What new connections are handshaken with. An `Arc`, so a reload replaces it while
    /// handshakes in progress keep the one they started with.
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads the files `files` names; the error names the file and what is wrong with it.
    pub fn load(files: &TlsConfig) -> Result<Tls, String> {
        let (config, summary) = load(files)?;
        tracing::info!(summary = %summary, "TLS on the gRPC port");
        Ok(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The acceptor for one new connection, with the config current now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }

    /// Reads the files again and serves new connections with them, if they all load;
    /// otherwise keeps the current config and says why. Returns what is now served, for the
    /// log. Blocking (file reads): call it off the async threads.
    pub fn reload(&self) -> Result<String, String> {
        let (config, summary) = load(&self.files)?;
        *self.current.write() = Arc::new(config);
        Ok(summary)
    }

    /// Whether clients must present a certificate (`client_ca` is set).
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// The rustls server config `files` describe: HTTP/2 by ALPN and, with `client_ca`, a verifier
/// that refuses any client without a certificate that CA signed.
pub fn server_config(files: &TlsConfig) -> Result<ServerConfig, String> {
    load(files).map(|(config, _)| config)
}

/// [`server_config`], and the line [`summary`] says about it.
fn load(files: &TlsConfig) -> Result<(ServerConfig, String), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("cert", &files.cert)?;
    let summary = summary(files, &certs[0]);
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("[tls]: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("client_ca", path)? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "[tls] client_ca {}: not a usable CA certificate: {e}",
                        path.display()
                    )
                })?;
            }
            // Without `allow_unauthenticated`: a client with no certificate is refused.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("[tls] client_ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "[tls] key {} does not belong to the first certificate in cert {} (the \
                 server's own certificate must come first, then its intermediates)",
            files.key.display(),
            files.cert.display()
        ),
        e => format!(
            "[tls] cert {} with key {}: {e}",
            files.cert.display(),
            files.key.display()
        ),
    })?;
    // gRPC is HTTP/2 only; clients that offer ALPN (Bazel, grpc-java, tonic) ask for h2.
    // HTTP/1.1 is for webhooks (forges deliver over it; `hooks/http.rs`).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, summary))
}

/// The common name (CN) of a DER certificate's subject, if it has exactly one: what grants
/// name a client by. More than one CN is ambiguous, so it counts as none.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let name = names.next()?.as_str().ok()?;
    if names.next().is_some() {
        return None;
    }
    Some(name.to_string())
}

/// One line on what is served: the certificate's subject and expiry, and whether mTLS is on.
fn summary(files: &TlsConfig, leaf: &CertificateDer<'_>) -> String {
    let described = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let not_after = &cert.validity().not_after;
            format!(
                "certificate {} (subject {}, expires {}{})",
                files.cert.display(),
                cert.subject(),
                not_after,
                if not_after.timestamp() < now {
                    ": EXPIRED"
                } else {
                    ""
                },
            )
        }
        // rustls judges the certificate; this is only the log line.
        Err(_) => format!("certificate {}", files.cert.display()),
    };
    match &files.client_ca {
        Some(ca) => format!(
            "{described}; client certificates required, signed by {}",
            ca.display()
        ),
        None => format!("{described}; no client certificates"),
    }
}

/// Every certificate in the PEM file at `path`; at least one. `key` names the config field.
fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("[tls] {key} {}: {}", path.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "[tls] {key} {}: no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key in the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let text = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "[tls] key {}: no private key in it (expected PEM \"PRIVATE KEY\", \"RSA PRIVATE \
             KEY\" or \"EC PRIVATE KEY\")",
            path.display()
        ),
        e => format!("[tls] key {}: {}", path.display(), pem_error(&e)),
    })
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("[tls] {key} {}: cannot read: {e}", path.display()))
}

fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a PEM section's BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".into(),
        e => format!("not valid PEM: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(names: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "hoard tests");
        for name in names {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *name);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_names_the_client() {
        assert_eq!(
            common_name(&cert_with(&["ci-runner"])).as_deref(),
            Some("ci-runner")
        );
        assert_eq!(
            common_name(&cert_with(&["dev laptop ünïcode"])).as_deref(),
            Some("dev laptop ünïcode")
        );
    }

    /// A subject with two CNs (rcgen makes at most one): an OU turned into a CN by its OID.
    fn cert_with_two_common_names() -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alpha");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "beta");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut der = params.self_signed(&key).unwrap().der().to_vec();
        let (ou, cn) = ([6, 3, 0x55, 4, 11], [6, 3, 0x55, 4, 3]);
        let mut patched = 0;
        for i in 0..der.len() - ou.len() {
            if der[i..i + ou.len()] == ou {
                der[i..i + ou.len()].copy_from_slice(&cn);
                patched += 1;
            }
        }
        assert!(patched > 0);
        der
    }

    #[test]
    fn no_or_several_common_names_name_nobody() {
        assert_eq!(common_name(&cert_with(&[])), None);
        assert_eq!(common_name(&cert_with_two_common_names()), None);
        assert_eq!(common_name(b"not a certificate"), None);
        assert_eq!(common_name(&[]), None);
    }

    fn files(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        }
    }

    fn write_pair(dir: &Path) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), signing_key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_good_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path());
        let tls = Tls::load(&files(dir.path())).unwrap();
        assert!(!tls.mutual());
        assert_eq!(
            tls.acceptor().config().alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        let e = server_config(&f).unwrap_err();
        assert!(e.contains("cert.pem: cannot read"), "{e}");

        write_pair(dir.path());
        std::fs::write(&f.key, "").unwrap();
        let e = server_config(&f).unwrap_err();
        assert!(e.contains("key.pem: no private key"), "{e}");

        // Cert and key swapped: the most common slip.
        write_pair(dir.path());
        let cert = std::fs::read(&f.cert).unwrap();
        std::fs::write(&f.cert, std::fs::read(&f.key).unwrap()).unwrap();
        let e = server_config(&f).unwrap_err();
        assert!(e.contains("cert.pem: no certificate"), "{e}");

        // A key from another pair.
        std::fs::write(&f.cert, cert).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&f.key, other.serialize_pem()).unwrap();
        let e = server_config(&f).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");

        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        write_pair(dir.path());
        let e = server_config(&TlsConfig {
            client_ca: Some(ca),
            ..f
        })
        .unwrap_err();
        assert!(e.contains("client_ca") && e.contains("ca.pem"), "{e}");
    }

    #[test]
    fn a_failed_reload_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path());
        let tls = Tls::load(&files(dir.path())).unwrap();
        let before = tls.acceptor().config().clone();
        std::fs::write(dir.path().join("cert.pem"), "garbage").unwrap();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, tls.acceptor().config()));
        write_pair(dir.path());
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, tls.acceptor().config()));
    }
}
