//! Accepting connections: the stream of sockets the gRPC server serves.
//!
//! tonic's own accept loop retries a failed `accept()` at once, so a process out of file
//! descriptors (EMFILE) spins a core while it waits for one to free up. Here such errors back
//! off and are logged once per period. Each accepted socket also gets a handshake deadline: a
//! peer that connects and never completes the HTTP/2 preface is dropped, instead of holding a
//! descriptor for as long as it likes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

/// The HTTP/2 client preface (24 bytes) plus the header of the SETTINGS frame that must follow
/// it: once that much has arrived, the peer speaks HTTP/2 and the deadline is lifted.
const HANDSHAKE_BYTES: usize = 24 + 9;
/// How long accepting pauses after running out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this period about accept failures.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Raises the soft limit on open files to the hard limit: every connection, upload and read
/// of a large blob holds a descriptor, and distributions' soft default (1024) is low for a
/// cache that serves many CI runners.
pub fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), max) = (limit.current, limit.maximum) else {
        return; // unlimited already
    };
    if max.is_some_and(|max| current >= max) {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: max,
        maximum: max,
    };
    if setrlimit(Resource::Nofile, raised).is_ok() {
        tracing::debug!(from = current, to = ?max, "raised the open-file limit");
    }
}

/// Accepted connections from `listener`, each with TCP_NODELAY, keepalive and a handshake
/// deadline of `handshake_timeout`.
pub fn incoming(
    listener: TcpListener,
    handshake_timeout: Duration,
) -> impl Stream<Item = io::Result<Handshaking>> + Send {
    let state = (listener, None::<Instant>, 0u64);
    futures::stream::unfold(
        state,
        move |(listener, mut logged, mut failed)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        configure(&stream);
                        let conn = Handshaking::new(stream, handshake_timeout);
                        return Some((Ok(conn), (listener, logged, failed)));
                    }
                    Err(e) if out_of_resources(&e) => {
                        failed += 1;
                        if logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                            tracing::error!(
                                error = %e,
                                failed,
                                "cannot accept connections (out of file descriptors or memory); \
                                 backing off"
                            );
                            logged = Some(Instant::now());
                            failed = 0;
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    // The peer gave up before we accepted (ECONNABORTED and the like).
                    Err(_) => continue,
                }
            }
        },
    )
}

fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn configure(stream: &TcpStream) {
    // Small replies must not wait for a delayed ACK.
    let _ = stream.set_nodelay(true);
    // Notice peers that vanished without closing (crashed runners, dropped NAT state).
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// A connection that must show the HTTP/2 preface within a deadline; after that, a plain
/// TCP stream.
pub struct Handshaking {
    stream: TcpStream,
    /// Pending until the preface is in; `None` after.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read: usize,
}

impl Handshaking {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
        Handshaking {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            read: 0,
        }
    }
}

/// Who is on the other end of a connection, as the transport knows it. tonic copies a
/// connection's `ConnectInfo` into the extensions of every request on it, so the
/// authentication layer and the services read the caller's address (and, over mTLS, its
/// certificate's subject) from there.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The common name of the client certificate the TLS handshake verified, if any.
    pub cert_subject: Option<String>,
}

impl Peer {
    /// The peer of a request, if it came through [`incoming`].
    pub fn of<B>(request: &http::Request<B>) -> Option<&Peer> {
        request.extensions().get::<Peer>()
    }

    /// The address for log lines: `unknown` when the transport did not say.
    pub fn addr_text(peer: Option<&Peer>) -> String {
        peer.and_then(|p| p.addr)
            .map_or_else(|| "unknown".to_string(), |a| a.to_string())
    }
}

impl Connected for Handshaking {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer {
            addr: self.stream.peer_addr().ok(),
            cert_subject: None,
        }
    }
}

impl AsyncRead for Handshaking {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            if let Poll::Ready(Ok(())) = polled {
                this.read += buf.filled().len() - before;
                if this.read >= HANDSHAKE_BYTES {
                    this.deadline = None;
                    return polled;
                }
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the handshake timeout",
                )));
            }
        }
        polled
    }
}

impl AsyncWrite for Handshaking {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
