//! ByteStream Read served below tonic's codec, so a chunk's bytes reach HTTP/2 without a copy.
//!
//! tonic encodes every reply message into its own buffer: for a Read, a copy of every byte
//! served (a tonic `Encoder` only ever sees that buffer, so no codec can avoid it). Here a
//! Read's reply body is built directly: each chunk from the store becomes two body frames, the
//! gRPC message prefix together with the protobuf key and length of `ReadResponse.data` (a few
//! bytes), then the chunk itself, shared, not copied. Trailers carry the status as tonic would
//! send it. Checking the request, the caller's access and the read itself stay in
//! [`ByteStreamService::open_read`], which the tonic handler uses too; every other ByteStream
//! method goes to the generated server untouched.
//!
//! Must not: decide anything about a Read itself (the service does), or map errors to codes
//! other than through `error.rs`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::Frame;
use prost::Message as _;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::Status;

use super::bytestream::ByteStreamService;
use super::unary::{self, trailers, PREFIX};
use crate::auth::Caller;
use crate::error::Error;
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::bytestream::ReadRequest;
use crate::store::BlobStream;

/// The path of the method served here.
const READ_PATH: &str = "/google.bytestream.ByteStream/Read";
/// Field number of `ReadResponse.data`.
const DATA_FIELD: u32 = 10;

/// The ByteStream service: Read served here, every other method by tonic's generated server.
#[derive(Clone)]
pub struct ByteStreamRoutes {
    service: Arc<ByteStreamService>,
    generated: ByteStreamServer<ByteStreamService>,
    /// Largest request message accepted (`limits.max_message_size`, as for the other methods).
    max_message: usize,
}

impl ByteStreamRoutes {
    /// `generated` must be built over `service` (with its message size limits set).
    pub fn new(
        service: Arc<ByteStreamService>,
        generated: ByteStreamServer<ByteStreamService>,
        max_message: usize,
    ) -> Self {
        ByteStreamRoutes {
            service,
            generated,
            max_message,
        }
    }
}

impl NamedService for ByteStreamRoutes {
    const NAME: &'static str = <ByteStreamServer<ByteStreamService> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for ByteStreamRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !unary::takes(&request, READ_PATH) {
            return self.generated.call(request);
        }
        let service = self.service.clone();
        let max_message = self.max_message;
        Box::pin(async move {
            Ok(match read(&service, request, max_message).await {
                Ok(chunks) => reply(chunks),
                Err(e) => Status::from(e).into_http(),
            })
        })
    }
}

/// Decodes the request and opens the read.
async fn read(
    service: &ByteStreamService,
    request: http::Request<Body>,
    max_message: usize,
) -> Result<BlobStream, Error> {
    let (parts, body) = request.into_parts();
    let message = unary::one_message(
        &unary::read_body(body, max_message, "ReadRequest").await?,
        "ReadRequest",
    )?;
    let read = ReadRequest::decode(message)
        .map_err(|e| Error::InvalidArgument(format!("undecodable ReadRequest: {e}")))?;
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        (),
    );
    service.open_read(Caller::of(&request), read).await
}

/// A reply carrying `chunks` as ReadResponse messages.
fn reply(chunks: BlobStream) -> http::Response<Body> {
    unary::reply(Body::new(ReadBody {
        chunks,
        held: None,
        done: false,
    }))
}

/// The reply body: per chunk, its message head then its bytes; then the status trailers.
struct ReadBody {
    chunks: BlobStream,
    /// The chunk whose head was just sent.
    held: Option<Bytes>,
    done: bool,
}

/// gRPC prefix plus the protobuf key and length of a `ReadResponse` whose `data` has `len`
/// bytes: what precedes those bytes on the wire.
fn message_head(len: usize) -> Bytes {
    let mut head = BytesMut::with_capacity(PREFIX + 11);
    head.put_u8(0);
    head.put_u32(0); // the message length, set below
    if len > 0 {
        // proto3 leaves an empty `bytes` field out.
        prost::encoding::encode_key(
            DATA_FIELD,
            prost::encoding::WireType::LengthDelimited,
            &mut head,
        );
        prost::encoding::encode_varint(len as u64, &mut head);
    }
    let message_len = (head.len() - PREFIX + len) as u32;
    head[1..PREFIX].copy_from_slice(&message_len.to_be_bytes());
    head.freeze()
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.held.take() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.chunks.as_mut().poll_next(cx)) {
            Some(Ok(chunk)) => {
                let head = message_head(chunk.len());
                if !chunk.is_empty() {
                    self.held = Some(chunk);
                }
                return Poll::Ready(Some(Ok(Frame::data(head))));
            }
            Some(Err(e)) => Status::from(e),
            None => Status::ok(""),
        };
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.held.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::bytestream::ReadResponse;

    #[test]
    fn message_heads_match_prost_encoding() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20, (1 << 21) + 3] {
            let data = Bytes::from(vec![7u8; len]);
            let encoded = ReadResponse { data: data.clone() }.encode_to_vec();
            let mut expected = vec![0u8];
            expected.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            expected.extend_from_slice(&encoded);
            let mut ours = message_head(len).to_vec();
            ours.extend_from_slice(&data);
            assert_eq!(ours, expected, "data of {len} bytes");
        }
    }
}
