//! Connecting to a server named on a command line: `--server` of the operator subcommands
//! (`src/cli/`) and `--target` of the load generator (`bench/`, the `hoard-bench` binary).
//!
//! It owns the address forms we accept and how a channel is opened (timeout, error text). It must
//! not know any service: callers wrap the channel in the client they need and say what a failed
//! call means.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// How long a connection attempt may take before the command gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `grpc://host:port`, `http://host:port` or `host:port`, as a URI for tonic. Plaintext only:
/// hoard is built without TLS.
pub fn endpoint_uri(target: &str) -> Result<String, String> {
    if let Some(rest) = target.strip_prefix("grpc://") {
        return Ok(format!("http://{rest}"));
    }
    if target.starts_with("http://") {
        return Ok(target.to_string());
    }
    if target.starts_with("grpcs://") || target.starts_with("https://") {
        return Err(format!(
            "{target}: TLS targets are not supported (hoard is built without TLS)"
        ));
    }
    if target.contains("://") || !target.contains(':') {
        return Err(format!("{target}: expected grpc://HOST:PORT"));
    }
    Ok(format!("http://{target}"))
}

/// A server address from a command line, checked and ready to dial.
#[derive(Clone, Debug)]
pub struct Server {
    /// The URI as [`endpoint_uri`] made it, for messages (`Endpoint::uri` adds a `/`).
    uri: String,
    /// What each connection is opened from: [`CONNECT_TIMEOUT`], TCP_NODELAY.
    endpoint: Endpoint,
}

impl Server {
    /// Parses an address in any form [`endpoint_uri`] accepts. An error means the address itself
    /// is unusable (a usage error, not an unreachable server).
    pub fn parse(address: &str) -> Result<Server, String> {
        let uri = endpoint_uri(address.trim())?;
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("{uri}: not a server address: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            // Small calls must not wait for Nagle (tonic's default too; said here on purpose).
            .tcp_nodelay(true);
        Ok(Server { uri, endpoint })
    }

    /// The URI connections go to, e.g. `http://127.0.0.1:9092`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Opens one connection (call again for more). The error reads "cannot connect to URI:
    /// cause: cause"; callers add their hint (e.g. "is hoard serving there?").
    pub async fn connect(&self) -> Result<Channel, String> {
        self.endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {}", self.uri, error_chain(&e)))
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
        assert!(endpoint_uri("grpcs://cache:443").is_err());
        assert!(endpoint_uri("unix:///tmp/sock").is_err());
        assert!(endpoint_uri("cache").is_err());
    }

    #[test]
    fn an_unusable_address_is_refused_before_connecting() {
        let e = Server::parse("http://no such host:1").unwrap_err();
        assert!(e.contains("not a server address"), "{e}");
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
