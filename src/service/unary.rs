//! gRPC framing for the methods served below tonic's codec (ByteStream Read, FindMissingBlobs):
//! reading a unary request's one message, and the headers, message and trailers of a reply.
//!
//! Must not: decide anything about a call; the services do.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tonic::body::Body;
use tonic::Status;

use crate::error::Error;

/// gRPC's message prefix: compressed flag and length.
pub(crate) const PREFIX: usize = 5;

/// Whether a route below tonic serves `request` itself: it is for `path` and names no
/// `grpc-encoding` other than identity. The generated servers answer those themselves
/// (UNIMPLEMENTED: this server enables no message compression) before they read the body, so a
/// route hands them such requests untouched.
pub(crate) fn takes<B>(request: &http::Request<B>, path: &str) -> bool {
    request.uri().path() == path
        && request
            .headers()
            .get("grpc-encoding")
            .is_none_or(|value| value == "identity")
}

/// A request body read whole, prefixes included; `what` (the message type) names it in the
/// error when it is larger than `max_message` allows.
pub(crate) async fn read_body(
    mut body: Body,
    max_message: usize,
    what: &str,
) -> Result<Bytes, Error> {
    let mut buf = BytesMut::new();
    while let Some(frame) = futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(Error::Stream)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > PREFIX.saturating_add(max_message) {
                return Err(Error::ResourceExhausted(format!(
                    "{what} is larger than the {max_message} bytes a message may have"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// The one uncompressed message of a unary request body, without its prefix.
pub(crate) fn one_message(body: &Bytes, what: &str) -> Result<Bytes, Error> {
    if body.len() < PREFIX {
        return Err(Error::InvalidArgument(format!(
            "the request carried no {what} message"
        )));
    }
    if body[0] != 0 {
        return Err(Error::InvalidArgument(format!(
            "compressed {what} messages are not accepted (no grpc-encoding is)"
        )));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != PREFIX + len {
        return Err(Error::InvalidArgument(format!(
            "the request must carry exactly one {what} message"
        )));
    }
    Ok(body.slice(PREFIX..))
}

/// A reply's head: HTTP 200 with gRPC's content type, over `body`.
pub(crate) fn reply(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A successful unary reply carrying `message` (prefix included).
pub(crate) fn reply_one(message: Bytes) -> http::Response<Body> {
    reply(Body::new(OneMessage {
        message: Some(message),
        done: false,
    }))
}

/// A message with its gRPC prefix, built in place: `encode` appends the message's bytes.
pub(crate) fn framed(capacity: usize, encode: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX + capacity);
    out.put_u8(0);
    out.put_u32(0); // the length, set below
    encode(&mut out);
    let len = (out.len() - PREFIX) as u32;
    out[1..PREFIX].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// The trailers that end a reply with `status`.
pub(crate) fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    map
}

/// One message, then the OK trailers.
struct OneMessage {
    message: Option<Bytes>,
    done: bool,
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&Status::ok(""))))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
