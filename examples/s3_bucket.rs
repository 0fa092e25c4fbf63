//! A local S3-compatible bucket server for `scripts/bench-s3.sh`: s3s-fs (S3 over a directory,
//! the server the integration tests embed), SigV4 checked with one key pair.
//!
//! Usage: `cargo run --release --example s3_bucket -- ROOT PORT KEY_ID SECRET`; every
//! directory under ROOT is a bucket.
//!
//! Unlike the `s3s-fs` binary, it sets TCP_NODELAY on every connection: without it, a GET
//! whose headers and body go out in two writes waits for the client's delayed ACK (about 40 ms
//! on Linux), which would be measured as the backend's latency.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, port, key_id, secret] = args.as_slice() else {
        return Err("usage: s3_bucket ROOT PORT KEY_ID SECRET".into());
    };
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("s3s-fs over {root}: {e:?}"))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(
        key_id.as_str(),
        secret.as_str(),
    ));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>()?)).await?;
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
