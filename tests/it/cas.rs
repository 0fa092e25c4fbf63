use hoard::proto::reapi::{
    self, batch_update_blobs_request, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory,
    DirectoryNode, FileNode, FindMissingBlobsRequest, GetTreeRequest,
};
use prost::Message;

use crate::common::{batch_put, blob, digest_of, missing, TestServer};

const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[tokio::test]
async fn find_missing_reports_only_absent_blobs() {
    let server = TestServer::start().await;
    let a = blob(100, 1);
    let big = blob(200_000, 2); // stored as a file, not inline
    batch_put(&server, "", &[&a, &big]).await;
    let absent = digest_of(&blob(100, 3));
    let empty = reapi::Digest {
        hash: EMPTY.into(),
        size_bytes: 0,
    };
    // Same hash with another size is a different blob.
    let wrong_size = reapi::Digest {
        size_bytes: 101,
        ..digest_of(&a)
    };
    let missing = missing(
        &server,
        &[
            digest_of(&a),
            absent.clone(),
            digest_of(&big),
            empty,
            wrong_size.clone(),
        ],
    )
    .await;
    assert_eq!(missing, vec![absent, wrong_size]);
}

#[tokio::test]
async fn find_missing_handles_thousands_of_digests() {
    let server = TestServer::start().await;
    let stored: Vec<Vec<u8>> = (0..500).map(|i| blob(64, i)).collect();
    let refs: Vec<&[u8]> = stored.iter().map(|b| b.as_slice()).collect();
    batch_put(&server, "", &refs).await;
    let mut asked: Vec<reapi::Digest> = stored.iter().map(|b| digest_of(b)).collect();
    let absent: Vec<reapi::Digest> = (1000..5500).map(|i| digest_of(&blob(64, i))).collect();
    asked.extend(absent.iter().cloned());
    let missing = missing(&server, &asked).await;
    assert_eq!(missing, absent);
}

/// A request message sent as exactly these bytes (to send encodings prost would not write).
#[derive(Clone, Debug, Default, PartialEq)]
struct Raw(Vec<u8>);

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

async fn raw_find_missing(
    server: &TestServer,
    message: Vec<u8>,
) -> Result<reapi::FindMissingBlobsResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel());
    grpc.ready().await.expect("channel ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
    );
    let codec = tonic_prost::ProstCodec::<Raw, reapi::FindMissingBlobsResponse>::default();
    grpc.unary(tonic::Request::new(Raw(message)), path, codec)
        .await
        .map(|r| r.into_inner())
}

/// The server reads the encoding clients send in place; other valid encodings of the same
/// request (an unknown field, a digest's fields in the other order, a zero size written out)
/// get the same answer.
#[tokio::test]
async fn find_missing_answers_every_encoding_alike() {
    let server = TestServer::start().await;
    let stored = blob(100, 41);
    batch_put(&server, "", &[&stored]).await;
    let absent = digest_of(&blob(100, 42));
    let asked = FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![digest_of(&stored), absent.clone()],
        digest_function: 1,
    };
    let usual = asked.encode_to_vec();
    let mut unknown_field = usual.clone();
    unknown_field.extend_from_slice(&[0x38, 0x01]); // field 7, varint 1
                                                    // The absent digest with size_bytes before hash.
    let mut reordered = FindMissingBlobsRequest {
        blob_digests: vec![digest_of(&stored)],
        ..asked.clone()
    }
    .encode_to_vec();
    let mut inner = Vec::new();
    prost::encoding::int64::encode(2, &absent.size_bytes, &mut inner);
    prost::encoding::string::encode(1, &absent.hash, &mut inner);
    prost::encoding::encode_key(
        2,
        prost::encoding::WireType::LengthDelimited,
        &mut reordered,
    );
    prost::encoding::encode_varint(inner.len() as u64, &mut reordered);
    reordered.extend_from_slice(&inner);
    for (what, message) in [
        ("the usual encoding", usual),
        ("an unknown field", unknown_field),
        ("a digest's fields reordered", reordered),
    ] {
        let reply = raw_find_missing(&server, message)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(reply.missing_blob_digests, vec![absent.clone()], "{what}");
    }
    // The empty blob with its zero size written out is present, as always.
    let mut empty = Vec::new();
    prost::encoding::string::encode(1, &EMPTY.to_string(), &mut empty);
    empty.extend_from_slice(&[0x10, 0x00]);
    let mut message = Vec::new();
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut message);
    prost::encoding::encode_varint(empty.len() as u64, &mut message);
    message.extend_from_slice(&empty);
    let reply = raw_find_missing(&server, message)
        .await
        .expect("empty blob");
    assert!(reply.missing_blob_digests.is_empty());
    // A grpc-encoding this server does not enable: UNIMPLEMENTED, as tonic answers it.
    let mut request = tonic::Request::new(asked.clone());
    request
        .metadata_mut()
        .insert("grpc-encoding", "gzip".parse().unwrap());
    let err = server
        .cas()
        .find_missing_blobs(request)
        .await
        .expect_err("gzip named");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    // Bytes that are no FindMissingBlobsRequest at all: INVALID_ARGUMENT or INTERNAL from the
    // decoder, as tonic answers any undecodable message.
    let err = raw_find_missing(&server, vec![0x12, 0x50, 0x0a])
        .await
        .expect_err("truncated message");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Internal | tonic::Code::InvalidArgument
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn find_missing_rejects_malformed_digests_and_digest_functions() {
    let server = TestServer::start().await;
    let err = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![
                digest_of(b"ok"),
                reapi::Digest {
                    hash: "not-hex".into(),
                    size_bytes: 1,
                },
            ],
            digest_function: 0,
        })
        .await
        .expect_err("malformed digest");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("blob_digests[1]"),
        "{}",
        err.message()
    );

    let err = server
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![reapi::Digest {
                hash: EMPTY.into(),
                size_bytes: -5,
            }],
            digest_function: 0,
        })
        .await
        .expect_err("negative size");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    for f in [reapi::digest_function::Value::Blake3 as i32, 999] {
        let err = server
            .cas()
            .find_missing_blobs(FindMissingBlobsRequest {
                instance_name: String::new(),
                blob_digests: vec![digest_of(b"x")],
                digest_function: f,
            })
            .await
            .expect_err("unsupported digest function");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("SHA256"), "{}", err.message());
    }
}

#[tokio::test]
async fn batch_update_fails_bad_blobs_and_stores_the_rest() {
    let server = TestServer::start().await;
    let good = blob(1000, 10);
    let good_big = blob(300_000, 11);
    let wrong_hash = blob(1000, 12);
    let wrong_size = blob(1000, 13);
    let req = |digest: reapi::Digest, data: &[u8]| batch_update_blobs_request::Request {
        digest: Some(digest),
        data: data.to_vec().into(),
        compressor: 0,
    };
    let resp = server
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: "ci/main".into(),
            requests: vec![
                req(digest_of(&good), &good),
                req(digest_of(&good), &wrong_hash),
                req(
                    reapi::Digest {
                        size_bytes: 999,
                        ..digest_of(&wrong_size)
                    },
                    &wrong_size,
                ),
                req(digest_of(&good_big), &good_big),
                batch_update_blobs_request::Request {
                    compressor: reapi::compressor::Value::Zstd as i32,
                    ..req(digest_of(&wrong_hash), &wrong_hash)
                },
            ],
            digest_function: 0,
        })
        .await
        .expect("batch update")
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let invalid = tonic::Code::InvalidArgument as i32;
    assert_eq!(codes, vec![0, invalid, invalid, 0, invalid]);
    assert!(resp.responses[1]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains("does not match"));
    // Only the good blobs became visible.
    let missing = missing(
        &server,
        &[
            digest_of(&good),
            digest_of(&good_big),
            digest_of(&wrong_hash),
            digest_of(&wrong_size),
        ],
    )
    .await;
    assert_eq!(
        missing,
        vec![digest_of(&wrong_hash), digest_of(&wrong_size)]
    );
}

#[tokio::test]
async fn oversized_batches_are_rejected_whole() {
    let server = TestServer::start().await;
    let max = 3 << 20;
    let parts: Vec<Vec<u8>> = (0..4).map(|i| blob(max / 3, 20 + i)).collect();
    let requests = parts
        .iter()
        .map(|b| batch_update_blobs_request::Request {
            digest: Some(digest_of(b)),
            data: b.clone().into(),
            compressor: 0,
        })
        .collect();
    let err = server
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests,
            digest_function: 0,
        })
        .await
        .expect_err("oversized update");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("max_batch_total_size_bytes"));
    assert_eq!(
        missing(
            &server,
            &parts.iter().map(|b| digest_of(b)).collect::<Vec<_>>()
        )
        .await
        .len(),
        4,
        "nothing of a rejected batch is stored"
    );

    let err = server
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: parts.iter().map(|b| digest_of(b)).collect(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .expect_err("oversized read");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn batch_read_returns_data_and_not_found_per_blob() {
    let server = TestServer::start().await;
    let small = blob(10, 30);
    let big = blob(500_000, 31);
    batch_put(&server, "", &[&small, &big]).await;
    let absent = digest_of(b"never stored");
    let resp = server
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "any/instance".into(),
            digests: vec![
                digest_of(&small),
                absent.clone(),
                digest_of(&big),
                reapi::Digest {
                    hash: EMPTY.into(),
                    size_bytes: 0,
                },
            ],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .expect("batch read")
        .into_inner();
    let r = &resp.responses;
    assert_eq!(r.len(), 4);
    assert_eq!(r[0].status.as_ref().unwrap().code, 0);
    assert_eq!(r[0].data.as_ref(), small.as_slice());
    assert_eq!(r[1].digest.as_ref(), Some(&absent));
    assert_eq!(
        r[1].status.as_ref().unwrap().code,
        tonic::Code::NotFound as i32
    );
    assert_eq!(r[2].data.as_ref(), big.as_slice());
    assert_eq!(
        r[3].status.as_ref().unwrap().code,
        0,
        "the empty blob exists"
    );
    assert!(r[3].data.is_empty());
}

fn dir(files: &[&[u8]], dirs: &[(&str, &Directory)]) -> Directory {
    Directory {
        files: files
            .iter()
            .enumerate()
            .map(|(i, f)| FileNode {
                name: format!("f{i}"),
                digest: Some(digest_of(f)),
                ..Default::default()
            })
            .collect(),
        directories: dirs
            .iter()
            .map(|(name, d)| DirectoryNode {
                name: name.to_string(),
                digest: Some(digest_of(&d.encode_to_vec())),
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn get_tree_streams_pages_of_the_whole_tree() {
    let server = TestServer::start().await;
    let leaves: Vec<Directory> = (0..5u8).map(|i| dir(&[&[i]], &[])).collect();
    let mid = dir(
        &[],
        &[("a", &leaves[0]), ("b", &leaves[1]), ("c", &leaves[2])],
    );
    // leaves[0] appears twice in the tree but is returned once.
    let root = dir(
        &[b"root file"],
        &[
            ("m", &mid),
            ("d", &leaves[3]),
            ("e", &leaves[4]),
            ("again", &leaves[0]),
        ],
    );
    let encoded: Vec<Vec<u8>> = leaves
        .iter()
        .chain([&mid, &root])
        .map(|d| d.encode_to_vec())
        .collect();
    let refs: Vec<&[u8]> = encoded.iter().map(|b| b.as_slice()).collect();
    batch_put(&server, "", &refs).await;

    let root_digest = digest_of(&root.encode_to_vec());
    let mut stream = server
        .cas()
        .get_tree(GetTreeRequest {
            instance_name: String::new(),
            root_digest: Some(root_digest.clone()),
            page_size: 2,
            page_token: String::new(),
            digest_function: 0,
        })
        .await
        .expect("get tree")
        .into_inner();
    let mut all = Vec::new();
    let mut tokens = Vec::new();
    while let Some(page) = stream.message().await.expect("page") {
        assert!(page.directories.len() <= 2);
        all.extend(page.directories);
        tokens.push(page.next_page_token);
    }
    assert_eq!(all.len(), 7, "root, mid and 5 distinct leaves");
    assert_eq!(all[0], root);
    assert!(all.contains(&mid));
    for l in &leaves {
        assert!(all.contains(l));
    }
    assert_eq!(tokens.last().map(String::as_str), Some(""));

    // Resuming from a page token continues where that page ended.
    let resumed: Vec<Directory> = server
        .cas()
        .get_tree(GetTreeRequest {
            instance_name: String::new(),
            root_digest: Some(root_digest.clone()),
            page_size: 100,
            page_token: tokens[0].clone(),
            digest_function: 0,
        })
        .await
        .expect("get tree from token")
        .into_inner()
        .message()
        .await
        .expect("page")
        .expect("one page")
        .directories;
    assert_eq!(resumed, all[2..].to_vec());

    let err = server
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(digest_of(b"no such dir")),
            ..Default::default()
        })
        .await
        .expect_err("missing root");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let err = server
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(root_digest),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
