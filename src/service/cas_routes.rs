//! FindMissingBlobs decoded below prost, so a call with thousands of digests allocates nothing
//! per digest.
//!
//! prost decodes each `Digest` of a FindMissingBlobsRequest into its own `String`, which the
//! service then parses and drops: at a million stored blobs that was about a tenth of the
//! call's CPU (BENCHMARKS.md). Here the request's bytes are read in place: each digest's hash
//! is parsed straight from the message, and the reply hands back the client's own encoded
//! digest messages for the missing ones. Only the encoding clients send is read this way (each
//! digest a 64-character hash, then its size unless zero; no unknown fields); anything else,
//! every error, and any request with a `grpc-encoding`, goes to tonic's generated server with
//! the same bytes, so what a call is answered does not depend on which decoder read it. (A body
//! above `limits.max_message_size` is the exception: RESOURCE_EXHAUSTED, as tonic's answer becomes
//! in `layers.rs`, with a message of its own.) The checks and the lookup stay in
//! [`CasService`]; every other CAS method goes to the generated server untouched.
//!
//! Must not: decide anything about a call itself (the service does).

use std::convert::Infallible;
use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::Status;

use super::cas::{missing_in_order, CasService};
use super::unary;
use crate::auth::Caller;
use crate::digest::{decode_hex, Digest, HASH_LEN};
use crate::error::Error;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;

/// The path of the method served here.
const FIND_MISSING_PATH: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

/// Protobuf keys (field number and wire type) of the fields read here.
const INSTANCE_NAME: u64 = (1 << 3) | 2; // FindMissingBlobsRequest.instance_name, string
const BLOB_DIGESTS: u64 = (2 << 3) | 2; // FindMissingBlobsRequest.blob_digests, message
const DIGEST_FUNCTION: u64 = 3 << 3; // FindMissingBlobsRequest.digest_function, varint
const MISSING_BLOB_DIGESTS: u8 = (2 << 3) | 2; // FindMissingBlobsResponse.missing_blob_digests
const HASH: u8 = (1 << 3) | 2; // Digest.hash, string
const SIZE_BYTES: u8 = 2 << 3; // Digest.size_bytes, varint

/// The CAS service: FindMissingBlobs served here, every other method by tonic's generated server.
#[derive(Clone)]
pub struct CasRoutes {
    service: Arc<CasService>,
    generated: ContentAddressableStorageServer<CasService>,
    /// Largest request message accepted (`limits.max_message_size`, as for the other methods).
    max_message: usize,
}

impl CasRoutes {
    /// `generated` must be built over `service` (with its message size limits set).
    pub fn new(
        service: Arc<CasService>,
        generated: ContentAddressableStorageServer<CasService>,
        max_message: usize,
    ) -> Self {
        CasRoutes {
            service,
            generated,
            max_message,
        }
    }
}

impl NamedService for CasRoutes {
    const NAME: &'static str = <ContentAddressableStorageServer<CasService> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for CasRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !unary::takes(&request, FIND_MISSING_PATH) {
            return self.generated.call(request);
        }
        let service = self.service.clone();
        let mut generated = self.generated.clone();
        let max_message = self.max_message;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = match unary::read_body(body, max_message, "FindMissingBlobsRequest").await {
                Ok(body) => body,
                Err(e) => return Ok(Status::from(e).into_http()),
            };
            let lean = unary::one_message(&body, "FindMissingBlobsRequest")
                .ok()
                .and_then(Lean::decode);
            let Some(lean) = lean else {
                // Not the usual encoding, or not valid: tonic's decoder and the service's own
                // checks say what is wrong with it.
                let request = http::Request::from_parts(parts, Body::new(FullBody::new(body)));
                return generated.call(request).await;
            };
            let request = tonic::Request::from_parts(
                MetadataMap::from_headers(parts.headers),
                parts.extensions,
                (),
            );
            Ok(
                match find_missing(&service, Caller::of(&request), lean).await {
                    Ok(reply) => unary::reply_one(reply),
                    Err(e) => Status::from(e).into_http(),
                },
            )
        })
    }
}

type FullBody = http_body_util::Full<Bytes>;

/// The call once decoded: the service's checks and lookup, then the reply message.
async fn find_missing(service: &CasService, caller: Caller, lean: Lean) -> Result<Bytes, Error> {
    service.check_find_missing(&caller, &lean.instance_name, lean.digest_function)?;
    let missing = service
        .find_missing(&lean.instance_name, &lean.digests)
        .await?;
    let spans = missing_in_order(lean.spans, &lean.digests, missing);
    Ok(reply(&lean.message, spans))
}

/// A FindMissingBlobsResponse (prefixed) whose digests are the `spans` of `message`, each a
/// digest's encoding as the client sent it. Never larger than the request.
fn reply(message: &[u8], spans: impl Iterator<Item = Range<usize>>) -> Bytes {
    unary::framed(message.len(), |out| {
        for span in spans {
            let encoded = &message[span];
            out.put_u8(MISSING_BLOB_DIGESTS);
            prost::encoding::encode_varint(encoded.len() as u64, out);
            out.extend_from_slice(encoded);
        }
    })
}

/// A FindMissingBlobsRequest read in place.
struct Lean {
    message: Bytes,
    instance_name: String,
    digest_function: i32,
    digests: Vec<Digest>,
    /// Where each digest's encoded message lies in `message`.
    spans: Vec<Range<usize>>,
}

impl Lean {
    /// `None` unless every field is one this decoder reads, each digest is in the usual
    /// encoding, and the whole is valid (the hashes lower-case hex, sizes not negative).
    fn decode(message: Bytes) -> Option<Lean> {
        // A digest takes 69-80 bytes with its key and length.
        let estimate = message.len() / 70 + 1;
        let mut lean = Lean {
            message,
            instance_name: String::new(),
            digest_function: 0,
            digests: Vec::with_capacity(estimate),
            spans: Vec::with_capacity(estimate),
        };
        let m = &lean.message[..];
        // The last instance_name wins, as in protobuf; each must be UTF-8 (prost checks every
        // one), only the last is made a String.
        let mut name = "";
        let mut pos = 0;
        while pos < m.len() {
            match varint(m, &mut pos)? {
                INSTANCE_NAME => {
                    name = std::str::from_utf8(length_delimited(m, &mut pos)?).ok()?;
                }
                BLOB_DIGESTS => {
                    let encoded = length_delimited(m, &mut pos)?;
                    lean.digests.push(digest(encoded)?);
                    lean.spans.push(pos - encoded.len()..pos);
                }
                // prost reads an int32 from a varint by truncating it, as here.
                DIGEST_FUNCTION => lean.digest_function = varint(m, &mut pos)? as i32,
                _ => return None,
            }
        }
        lean.instance_name = name.to_owned();
        Some(lean)
    }
}

/// A `Digest` message in the usual encoding: the hash, then the size unless it is zero.
fn digest(m: &[u8]) -> Option<Digest> {
    const HEX: usize = HASH_LEN * 2;
    if m.len() < 2 + HEX || m[0] != HASH || m[1] != HEX as u8 {
        return None;
    }
    let hash = decode_hex(&m[2..2 + HEX])?;
    let rest = &m[2 + HEX..];
    let size = match rest.split_first() {
        None => 0,
        Some((&SIZE_BYTES, value)) => {
            let mut pos = 0;
            let size = varint(value, &mut pos)?;
            if pos != value.len() {
                return None;
            }
            // int64: a negative size is sent as a 10-byte varint, with the top bit set.
            i64::try_from(size).ok()? as u64
        }
        Some(_) => return None,
    };
    Some(Digest { hash, size })
}

/// The bytes of a length-delimited field whose length is at `pos`.
fn length_delimited<'a>(m: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = usize::try_from(varint(m, pos)?).ok()?;
    let end = pos.checked_add(len)?;
    let value = m.get(*pos..end)?;
    *pos = end;
    Some(value)
}

/// A base-128 varint of at most 10 bytes that fits 64 bits (what prost accepts).
fn varint(m: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *m.get(*pos)?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reapi::{self, FindMissingBlobsRequest, FindMissingBlobsResponse};
    use prost::Message as _;

    fn request(digests: &[reapi::Digest]) -> FindMissingBlobsRequest {
        FindMissingBlobsRequest {
            instance_name: "ci/main".into(),
            blob_digests: digests.to_vec(),
            digest_function: 1,
        }
    }

    fn digests(n: usize) -> Vec<reapi::Digest> {
        (0..n)
            .map(|i| {
                let size = [0i64, 1, 127, 128, 1 << 20, u32::MAX as i64 + 7, i64::MAX][i % 7];
                reapi::Digest {
                    hash: Digest::of(&i.to_le_bytes()).hex(),
                    size_bytes: size,
                }
            })
            .collect()
    }

    #[test]
    fn reads_what_prost_writes_as_prost_reads_it() {
        let asked = digests(200);
        let message = Bytes::from(request(&asked).encode_to_vec());
        let lean = Lean::decode(message.clone()).expect("the usual encoding");
        assert_eq!(lean.instance_name, "ci/main");
        assert_eq!(lean.digest_function, 1);
        let parsed = super::super::parse_digests(&asked, "blob_digests").unwrap();
        assert_eq!(lean.digests, parsed);
        // Each span is that digest's own encoding.
        for (d, span) in asked.iter().zip(&lean.spans) {
            assert_eq!(&message[span.clone()], &d.encode_to_vec()[..]);
        }
    }

    #[test]
    fn the_reply_is_what_prost_would_encode() {
        let asked = digests(50);
        let message = Bytes::from(request(&asked).encode_to_vec());
        let lean = Lean::decode(message.clone()).unwrap();
        let missing: Vec<reapi::Digest> = asked.iter().step_by(3).cloned().collect();
        let reply = reply(&message, lean.spans.iter().step_by(3).cloned());
        let expected = FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }
        .encode_to_vec();
        assert_eq!(&reply[unary::PREFIX..], &expected[..]);
        assert_eq!(
            u32::from_be_bytes(reply[1..5].try_into().unwrap()) as usize,
            expected.len()
        );
    }

    #[test]
    fn anything_else_is_left_to_prost() {
        let good = digests(3);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("upper-case hex", {
                let mut d = good.clone();
                d[1].hash = d[1].hash.to_uppercase();
                request(&d).encode_to_vec()
            }),
            ("a short hash", {
                let mut d = good.clone();
                d[2].hash.truncate(10);
                request(&d).encode_to_vec()
            }),
            ("a negative size", {
                let mut d = good.clone();
                d[0].size_bytes = -1;
                request(&d).encode_to_vec()
            }),
            ("an unknown field", {
                let mut m = request(&good).encode_to_vec();
                m.extend_from_slice(&[0x20, 0x01]); // field 4, varint
                m
            }),
            ("size before hash", {
                let mut m = request(&[]).encode_to_vec();
                let d = &good[0];
                let mut inner = vec![SIZE_BYTES, 5, HASH, 64];
                inner.extend_from_slice(d.hash.as_bytes());
                m.push(BLOB_DIGESTS as u8);
                m.push(inner.len() as u8);
                m.extend_from_slice(&inner);
                m
            }),
            ("a truncated message", {
                let m = request(&good).encode_to_vec();
                m[..m.len() - 3].to_vec()
            }),
            ("an instance name that is not UTF-8", {
                let mut m = vec![INSTANCE_NAME as u8, 2, 0xff, 0xfe];
                m.extend_from_slice(&request(&good).encode_to_vec()[9..]);
                m
            }),
            ("an earlier instance name that is not UTF-8", {
                let mut m = vec![INSTANCE_NAME as u8, 2, 0xff, 0xfe];
                m.extend_from_slice(&request(&good).encode_to_vec());
                m
            }),
        ];
        for (what, message) in cases {
            assert!(
                Lean::decode(Bytes::from(message)).is_none(),
                "{what} was read in place"
            );
        }
        // And an empty request is read in place: no digests, no name.
        let lean = Lean::decode(Bytes::new()).unwrap();
        assert!(lean.digests.is_empty() && lean.instance_name.is_empty());
    }

    #[test]
    fn varints_of_any_length_and_no_more() {
        for value in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            prost::encoding::encode_varint(value, &mut buf);
            let mut pos = 0;
            assert_eq!(varint(&buf, &mut pos), Some(value));
            assert_eq!(pos, buf.len());
        }
        let mut pos = 0;
        assert_eq!(varint(&[0x80; 11], &mut pos), None);
        let mut pos = 0;
        assert_eq!(varint(&[0x80, 0x80], &mut pos), None);
        // Ten bytes whose last carries more than the 64th bit.
        let mut pos = 0;
        assert_eq!(
            varint(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                &mut pos
            ),
            None
        );
    }
}
