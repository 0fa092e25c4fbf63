//! Accepting connections: the stream of sockets the gRPC server serves.
//!
//! tonic's own accept loop retries a failed `accept()` at once, so a process out of file
//! descriptors (EMFILE) spins a core while it waits for one to free up. Here such errors back
//! off and are logged once per period. Each accepted socket also gets a handshake deadline: a
//! peer that connects and never completes the TLS handshake (with `[tls]`) and the HTTP/2
//! preface is dropped, instead of holding a descriptor for as long as it likes.
//!
//! The TLS handshake happens here rather than in tonic, so each connection takes the
//! certificate current when it arrives (`tls.rs` swaps it on SIGHUP) and the verified client
//! certificate's common name becomes the connection's [`Peer`].
//!
//! On the way out, a connection gathers the HTTP/2 layer's writes into fewer socket writes
//! (see `Outgoing`): streamed replies are otherwise one syscall per 16 KiB DATA frame.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::tls::Tls;

/// The HTTP/2 client preface (24 bytes) plus the header of the SETTINGS frame that must follow
/// it: once that much has arrived, the peer speaks HTTP/2 and the deadline is lifted.
const HANDSHAKE_BYTES: usize = 24 + 9;
/// How long accepting pauses after running out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this period about accept failures.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a connection whose TLS handshake failed is drained before it is dropped.
const LINGER: Duration = Duration::from_secs(1);
/// Connections handshaken but not yet taken by the server; past it, accepting waits.
const ACCEPTED_QUEUE: usize = 64;

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
/// deadline of `handshake_timeout`: the TLS handshake (with `tls`) and the HTTP/2 preface must
/// both be done by then. TLS handshakes run in a task each, so a slow peer holds up only itself.
/// The listener closes when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    handshake_timeout: Duration,
    tls: Option<Arc<Tls>>,
) -> impl Stream<Item = io::Result<Connection>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(accept(listener, handshake_timeout, tls, tx));
    futures::stream::unfold(rx, |mut rx| async move {
        let conn = rx.recv().await?;
        Some((Ok(conn), rx))
    })
}

/// TLS handshakes in progress at once (each holds a socket and a task until its deadline).
const MAX_HANDSHAKES: usize = 1024;

/// Failed TLS handshakes (plaintext clients, refused certificates, scanners) log at most a line
/// a second.
static HANDSHAKE_FAILED: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// The accept loop behind [`incoming`]; ends when the stream is dropped.
async fn accept(
    listener: TcpListener,
    handshake_timeout: Duration,
    tls: Option<Arc<Tls>>,
    tx: mpsc::Sender<Connection>,
) {
    let mut logged = None::<std::time::Instant>;
    let mut failed = 0u64;
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        // With TLS, a handshake slot first: past MAX_HANDSHAKES nothing more is accepted, so
        // new peers wait in the kernel's backlog and their deadline has not started.
        let permit = match &tls {
            None => None,
            Some(_) => {
                let permit = tokio::select! {
                    permit = handshakes.clone().acquire_owned() => permit,
                    () = tx.closed() => return,
                };
                match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => return,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        match accepted {
            Ok((stream, addr)) => {
                configure(&stream);
                let deadline = Instant::now() + handshake_timeout;
                match &tls {
                    None => {
                        let peer = Peer {
                            addr: Some(addr),
                            cert_subject: None,
                        };
                        let conn = Connection {
                            io: Io::Plain(Handshaking::new(stream, deadline)),
                            peer,
                            out: Outgoing::default(),
                        };
                        if tx.send(conn).await.is_err() {
                            return;
                        }
                    }
                    Some(tls) => {
                        let handshake = handshake(tls.acceptor(), stream, addr, deadline);
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            // The slot is held until the connection is handed on, so the bound
                            // covers connections waiting for the server too.
                            let _permit = permit;
                            if let Some(conn) = handshake.await {
                                let _ = tx.send(conn).await;
                            }
                        });
                    }
                }
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
                    logged = Some(std::time::Instant::now());
                    failed = 0;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            // The peer gave up before we accepted (ECONNABORTED and the like).
            Err(_) => continue,
        }
    }
}

/// The TLS handshake of one connection, by `deadline`; `None` if it failed (logged).
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
    deadline: Instant,
) -> Option<Connection> {
    let accepting = acceptor.accept(stream).into_fallible();
    let tls = match tokio::time::timeout_at(deadline, accepting).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, stream))) => {
            // A refused client certificate, a plaintext client, a client that does not trust
            // us: worth a line. A peer that only opened TCP (a port check) is not.
            match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                Some(cause) => {
                    if let Some(suppressed) = HANDSHAKE_FAILED.allow() {
                        tracing::info!(peer = %addr, error = %cause, suppressed, "TLS handshake failed");
                    }
                }
                None => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
            }
            linger(stream).await;
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = %addr, "no TLS handshake within the handshake timeout");
            return None;
        }
    };
    let cert_subject = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::common_name(leaf));
    Some(Connection {
        io: Io::Tls(Box::new(Handshaking::new(tls, deadline))),
        out: Outgoing::default(),
        peer: Peer {
            addr: Some(addr),
            cert_subject,
        },
    })
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

/// After a failed TLS handshake (its alert sent): closes our side, then reads what the client
/// still sends for a moment. Closing at once with its data unread would make the kernel answer
/// with a reset, which can discard the alert before the client reads it, leaving it with
/// "connection reset" instead of, say, "certificate required".
async fn linger(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let drain = async { while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// A stream that must show the HTTP/2 preface by a deadline; after that, the stream itself.
struct Handshaking<S> {
    stream: S,
    /// Pending until the preface is in; `None` after.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read: usize,
}

impl<S> Handshaking<S> {
    fn new(stream: S, deadline: Instant) -> Self {
        Handshaking {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            read: 0,
        }
    }
}

/// One accepted connection, plaintext or TLS, and who is on the other end.
pub struct Connection {
    io: Io,
    /// Fixed once the handshake is done: what every request on this connection carries.
    peer: Peer,
    /// Bytes written by the HTTP/2 layer and not yet handed to the socket.
    out: Outgoing,
}

/// Bytes gathered before one socket write. The HTTP/2 layer writes each DATA frame on its own
/// (at most the client's SETTINGS_MAX_FRAME_SIZE, 16 KiB for gRPC clients) and flushes after
/// each; a 1 GiB download was ~65,000 `writev` calls, each a trip through the TCP stack.
/// Gathering costs one copy of the bytes, which is cheaper than the calls it saves.
const COALESCE_BYTES: usize = 256 << 10;
/// Writes smaller than this, with nothing gathered, go to the socket directly, and a flush with
/// fewer bytes gathered writes them at once: small replies (unary calls, control frames) go
/// out as before, without a copy or waiting for another poll.
const COALESCE_MIN: usize = 16 << 10;

/// The write side of a [`Connection`]: small writes gathered into one buffer, written to the
/// socket when it is full or when a flush finds it worth writing.
///
/// A flush of a buffer holding at least [`COALESCE_MIN`] bytes, with writes since the last
/// flush, is put off: it wakes the connection's task and reports done, so the HTTP/2 layer can
/// frame more of what its streams have queued. That layer ends every poll of the connection
/// with a flush, so the flush on the next poll (the one the wake-up causes) finds no new writes
/// and writes the buffer out: no byte waits longer than one more poll of its connection.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    /// Bytes of `buf` already written to the socket.
    sent: usize,
    /// Writes arrived since the last flush.
    fresh: bool,
}

enum Io {
    Plain(Handshaking<TcpStream>),
    Tls(Box<Handshaking<TlsStream<TcpStream>>>),
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

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Calls `$method` on whichever stream the connection is.
macro_rules! on_io {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match &mut $self.get_mut().io {
            Io::Plain(s) => Pin::new(s).$method($($arg),*),
            Io::Tls(s) => Pin::new(&mut **s).$method($($arg),*),
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_io!(self, poll_read(cx, buf))
    }
}

impl Io {
    fn poll_write_raw(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(s) => Pin::new(s).poll_write(cx, data),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, data),
        }
    }

    fn poll_write_vectored_raw(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}

impl Connection {
    /// Writes everything gathered to the socket. `release`: give the buffer's memory back
    /// too (the connection went quiet), rather than keep it for the next batch.
    fn poll_drain(&mut self, cx: &mut Context<'_>, release: bool) -> Poll<io::Result<()>> {
        let out = &mut self.out;
        while out.sent < out.buf.len() {
            match self.io.poll_write_raw(cx, &out.buf[out.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => out.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        out.sent = 0;
        if release {
            out.buf = Vec::new();
        } else {
            out.buf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs` (of `len` bytes in all) into the buffer, or past it when they would fill
    /// it on their own.
    fn poll_gather(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        len: usize,
    ) -> Poll<io::Result<usize>> {
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.out.buf.is_empty() && len < COALESCE_MIN {
            // Control frames and small replies go out as they always did.
            return self.io.poll_write_vectored_raw(cx, bufs);
        }
        if self.out.buf.len() + len > COALESCE_BYTES {
            std::task::ready!(self.poll_drain(cx, false))?;
            if len >= COALESCE_BYTES {
                return self.io.poll_write_vectored_raw(cx, bufs);
            }
        }
        if self.out.buf.capacity() == 0 {
            self.out.buf.reserve_exact(COALESCE_BYTES);
        }
        for b in bufs {
            self.out.buf.extend_from_slice(b);
        }
        self.out.fresh = true;
        Poll::Ready(Ok(len))
    }
}

impl Drop for Connection {
    /// What was gathered goes to the socket if it takes it now, as written bytes would have
    /// without gathering (the HTTP/2 layer may drop a connection right after its last frame,
    /// a GOAWAY, without a flush).
    fn drop(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = self.poll_drain(&mut cx, true);
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_gather(cx, &[io::IoSlice::new(data)], data.len())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let gathered = this.out.buf.len() - this.out.sent;
        if gathered >= COALESCE_MIN && this.out.fresh {
            // Put off (see `Outgoing`): the next poll's flush writes it.
            this.out.fresh = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        // A full buffer is drained in `poll_gather` while data streams; here the stream has
        // paused or ended, so the memory goes back.
        std::task::ready!(this.poll_drain(cx, true))?;
        this.out.fresh = false;
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx, true))?;
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.get_mut().poll_gather(cx, bufs, len)
    }

    fn is_write_vectored(&self) -> bool {
        // Gathering takes any number of slices at the cost of one.
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Handshaking<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Handshaking<S> {
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
