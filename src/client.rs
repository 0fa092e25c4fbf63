//! Connecting to a server named on a command line: `--server` of the operator subcommands
//! (`src/cli/`) and `--target` of the load generator (`bench/`, the `hoard-bench` binary).
//!
//! It owns the address forms we accept, the connection options every such command shares
//! ([`ConnectOptions`]: TLS trust and client certificate) and how a channel is opened (timeout,
//! error text). It must not know any service: callers wrap the channel in the client they need
//! and say what a failed call means.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;

/// How long a connection attempt may take before the command gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `grpc://host:port`, `http://host:port` or `host:port` (plaintext), `grpcs://host:port` or
/// `https://host:port` (TLS), as a URI for tonic.
pub fn endpoint_uri(target: &str) -> Result<String, String> {
    if let Some(rest) = target.strip_prefix("grpc://") {
        return Ok(format!("http://{rest}"));
    }
    if let Some(rest) = target.strip_prefix("grpcs://") {
        return Ok(format!("https://{rest}"));
    }
    if target.starts_with("http://") || target.starts_with("https://") {
        return Ok(target.to_string());
    }
    if target.contains("://") || !target.contains(':') {
        return Err(format!(
            "{target}: expected grpc://HOST:PORT or grpcs://HOST:PORT"
        ));
    }
    Ok(format!("http://{target}"))
}

/// How to connect, beyond the address: what every command with `--server` (or `--target`)
/// flattens into its flags, so a new option (a bearer token, say) is added here once.
#[derive(clap::Args, Clone, Default)]
pub struct ConnectOptions {
    /// For a grpcs:// server: PEM CA certificate(s) to trust instead of the system's roots.
    #[arg(long, value_name = "FILE", env = "HOARD_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mTLS); with --tls-client-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "HOARD_TLS_CLIENT_CERT",
        global = true
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, value_name = "FILE", env = "HOARD_TLS_CLIENT_KEY", global = true)]
    pub tls_client_key: Option<PathBuf>,
    /// Bearer token for a server with [auth], sent as `authorization: Bearer TOKEN` on every
    /// call. Prefer the variable: other users can read a process's command line.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HOARD_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
}

// Never the token in debug output.
impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("tls_ca", &self.tls_ca)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl ConnectOptions {
    /// The TLS client config these options describe, for a TLS URI.
    fn tls(&self) -> Result<ClientTlsConfig, String> {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.tls_ca {
            Some(path) => {
                let pem = read("--tls-ca", path)?;
                let certs = CertificateDer::pem_slice_iter(&pem).count();
                if certs == 0 {
                    return Err(format!(
                        "--tls-ca {}: no PEM certificate in it",
                        path.display()
                    ));
                }
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read("--tls-client-cert", cert)?;
                if CertificateDer::pem_slice_iter(&cert_pem).next().is_none() {
                    return Err(format!(
                        "--tls-client-cert {}: no PEM certificate in it",
                        cert.display()
                    ));
                }
                let key_pem = read("--tls-client-key", key)?;
                if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
                    return Err(format!(
                        "--tls-client-key {}: no PEM private key in it",
                        key.display()
                    ));
                }
                tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
            }
            (None, None) => {}
            (Some(_), None) => return Err("--tls-client-cert needs --tls-client-key".into()),
            (None, Some(_)) => return Err("--tls-client-key needs --tls-client-cert".into()),
        }
        Ok(tls)
    }

    fn any_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_client_cert.is_some() || self.tls_client_key.is_some()
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: cannot read: {e}", path.display()))
}

/// A connection to a server, with the caller's credentials on every call: what every client
/// of the CLI and the load generator wraps.
pub type Connection = InterceptedService<Channel, Credentials>;

/// The `authorization` header every call carries (none without `--token`).
#[derive(Clone, Default)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl Credentials {
    /// `Bearer <token>`; refused if the token cannot be a header value.
    pub fn bearer(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err("--token (HOARD_TOKEN) is empty or contains whitespace".into());
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            "--token (HOARD_TOKEN) has characters a header cannot carry".to_string()
        })?;
        // Never put into HPACK's table, where a later header could probe it.
        value.set_sensitive(true);
        Ok(Credentials(Some(value)))
    }
}

// Never the token in debug output.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Credentials(bearer)"
        } else {
            "Credentials(none)"
        })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A server address from a command line, checked and ready to dial.
#[derive(Clone, Debug)]
pub struct Server {
    /// The URI as [`endpoint_uri`] made it, for messages (`Endpoint::uri` adds a `/`).
    uri: String,
    /// What each connection is opened from: [`CONNECT_TIMEOUT`], TCP_NODELAY, TLS.
    endpoint: Endpoint,
    credentials: Credentials,
}

impl Server {
    /// [`Server::parse_with`] with no options (plaintext, or TLS trusting the system's roots).
    pub fn parse(address: &str) -> Result<Server, String> {
        Self::parse_with(address, &ConnectOptions::default())
    }

    /// Parses an address in any form [`endpoint_uri`] accepts and reads the files `options`
    /// name. An error means the address or options are unusable (a usage error, not an
    /// unreachable server).
    pub fn parse_with(address: &str, options: &ConnectOptions) -> Result<Server, String> {
        let uri = endpoint_uri(address.trim())?;
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("{uri}: not a server address: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            // Small calls must not wait for Nagle (tonic's default too; said here on purpose).
            .tcp_nodelay(true);
        if uri.starts_with("https://") {
            endpoint = endpoint
                .tls_config(options.tls()?)
                .map_err(|e| format!("{uri}: {}", error_chain(&e)))?;
        } else if options.any_tls() {
            return Err(format!(
                "{uri} is plaintext, but TLS options are given (--tls-ca, --tls-client-cert, \
                 HOARD_TLS_*): use grpcs://"
            ));
        }
        let credentials = match &options.token {
            Some(token) => Credentials::bearer(token)?,
            None => Credentials::default(),
        };
        Ok(Server {
            uri,
            endpoint,
            credentials,
        })
    }

    /// Gives up a connection attempt after `timeout` instead of [`CONNECT_TIMEOUT`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.endpoint = self.endpoint.connect_timeout(timeout);
        self
    }

    /// HTTP/2 pings every `interval` (also while idle), the connection dropped when one is not
    /// answered within `timeout`: for a long-lived stream that must notice a peer that vanished.
    pub fn with_keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.endpoint = self
            .endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
        self
    }

    /// A channel that connects on first use and reconnects after a failure, for a server
    /// that must start and keep running while this one is away (a replica's upstream).
    pub fn connect_lazy(&self) -> Connection {
        InterceptedService::new(self.endpoint.connect_lazy(), self.credentials.clone())
    }

    /// The URI connections go to, e.g. `http://127.0.0.1:9092` or `https://cache:9092`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Opens one connection (call again for more). The error reads "cannot connect to URI:
    /// cause: cause"; callers add their hint (e.g. "is hoard serving there?").
    pub async fn connect(&self) -> Result<Connection, String> {
        let channel = self.endpoint.connect().await.map_err(|e| {
            let cause = error_chain(&e);
            format!(
                "cannot connect to {}: {cause}{}",
                self.uri,
                tls_hint(&cause)
            )
        })?;
        Ok(InterceptedService::new(channel, self.credentials.clone()))
    }
}

/// A failed call's message, with the transport's cause when there is one: a refused client
/// certificate shows up as a call failing with "transport error" (TLS 1.3 reports it after
/// the handshake), and the cause is what tells the user what to fix.
pub fn status_text(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        let cause = error_chain(source);
        if cause.starts_with(&text) {
            text = cause;
        } else if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    let hint = tls_hint(&text);
    text + hint
}

/// What to do about a TLS failure, from rustls' words for it.
fn tls_hint(cause: &str) -> &'static str {
    if cause.contains("CertificateRequired") {
        " (the server requires a client certificate: --tls-client-cert and --tls-client-key)"
    } else if [
        "UnknownCA",
        "BadCertificate",
        "UnsupportedCertificate",
        "CertificateExpired",
    ]
    .iter()
    .any(|alert| cause.contains(&format!("alert: {alert}")))
    {
        " (the server does not accept this client certificate)"
    } else if cause.contains("invalid peer certificate") {
        " (give the CA that signed the server's certificate to --tls-ca)"
    } else {
        ""
    }
}

/// An error and its sources on one line ("transport error: tcp connect error: refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            endpoint_uri("grpc://127.0.0.1:9092").unwrap(),
            "http://127.0.0.1:9092"
        );
        assert_eq!(
            endpoint_uri("http://localhost:1").unwrap(),
            "http://localhost:1"
        );
        assert_eq!(endpoint_uri("127.0.0.1:5").unwrap(), "http://127.0.0.1:5");
        assert_eq!(
            endpoint_uri("grpcs://cache:443").unwrap(),
            "https://cache:443"
        );
        assert_eq!(
            endpoint_uri("https://cache:443").unwrap(),
            "https://cache:443"
        );
        assert!(endpoint_uri("unix:///tmp/sock").is_err());
        assert!(endpoint_uri("cache").is_err());
    }

    #[test]
    fn an_unusable_address_is_refused_before_connecting() {
        let e = Server::parse("http://no such host:1").unwrap_err();
        assert!(e.contains("not a server address"), "{e}");
    }

    #[test]
    fn tls_options_are_checked_before_connecting() {
        let ca = |path: &str| ConnectOptions {
            tls_ca: Some(path.into()),
            ..ConnectOptions::default()
        };
        let e = Server::parse_with("grpc://cache:1", &ca("/etc/hosts")).unwrap_err();
        assert!(e.contains("use grpcs://"), "{e}");
        let e = Server::parse_with("grpcs://cache:1", &ca("/no/such/ca.pem")).unwrap_err();
        assert!(e.contains("--tls-ca /no/such/ca.pem: cannot read"), "{e}");
        let e = Server::parse_with("grpcs://cache:1", &ca("/etc/hosts")).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let cert_only = ConnectOptions {
            tls_client_cert: Some("/etc/hosts".into()),
            ..ConnectOptions::default()
        };
        let e = Server::parse_with("grpcs://cache:1", &cert_only).unwrap_err();
        assert!(e.contains("needs --tls-client-key"), "{e}");
    }

    #[test]
    fn tls_failures_say_what_to_fix() {
        let plain = tonic::Status::unavailable("server overloaded");
        assert_eq!(status_text(&plain), "server overloaded");
        let refused = tonic::Status::unknown("received fatal alert: CertificateRequired");
        assert!(status_text(&refused).contains("--tls-client-cert"));
        assert!(tls_hint("invalid peer certificate: UnknownIssuer").contains("--tls-ca"));
        assert!(tls_hint("received fatal alert: UnknownCA").contains("does not accept"));
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_server_and_the_cause() {
        // A port that was free a moment ago: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let uri = format!("http://127.0.0.1:{port}");
        let server = Server::parse(&format!("grpc://127.0.0.1:{port}")).unwrap();
        assert_eq!(server.uri(), uri);
        let e = server.connect().await.unwrap_err();
        assert!(e.starts_with(&format!("cannot connect to {uri}: ")), "{e}");
        assert!(e.to_lowercase().contains("refused"), "{e}");
    }
}
