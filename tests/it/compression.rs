use hoard::proto::reapi::{compressor, GetCapabilitiesRequest};
use hoard::resource_name::{Compression, ResourceName};

use crate::common::{blob, digest, digest_of, download, read_name, upload, write_blob, TestServer};

/// A compressed upload's name; its write offsets count the compressed bytes, the ones sent.
fn zstd_write_name(upload: &str, d: &hoard::proto::reapi::Digest) -> String {
    ResourceName::write("", upload, digest(d))
        .compressed(Compression::Zstd)
        .to_string()
}

fn zstd_read_name(d: &hoard::proto::reapi::Digest) -> String {
    ResourceName::read("", digest(d))
        .compressed(Compression::Zstd)
        .to_string()
}

/// Data that compresses well, so the compressed and plain sizes differ.
fn compressible(len: usize) -> Vec<u8> {
    let words = b"hoard caches build outputs; ";
    words.iter().cycle().take(len).copied().collect()
}

#[tokio::test]
async fn zstd_is_announced() {
    let server = TestServer::start().await;
    let caps = server
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cache_capabilities
        .unwrap();
    assert_eq!(
        caps.supported_compressors,
        vec![compressor::Value::Zstd as i32]
    );
}

#[tokio::test]
async fn compressed_writes_and_reads_round_trip_both_ways() {
    let server = TestServer::start().await;
    for len in [1000usize, 3_000_000] {
        // Compressed upload, read back plain and compressed.
        let data = compressible(len);
        let d = digest_of(&data);
        let packed = zstd::bulk::compress(&data, 3).unwrap();
        let resp = write_blob(&server, &zstd_write_name("z1", &d), &packed, 0, 64 << 10)
            .await
            .expect("compressed write")
            .into_inner();
        assert_eq!(resp.committed_size, packed.len() as i64);
        assert!(download(&server, &read_name("", &d), 0, 0).await.unwrap() == data);
        let z = download(&server, &zstd_read_name(&d), 0, 0).await.unwrap();
        assert!(z.len() < data.len(), "served compressed");
        assert!(zstd::decode_all(&z[..]).unwrap() == data);

        // A read offset counts uncompressed bytes.
        let z = download(&server, &zstd_read_name(&d), 100, 0)
            .await
            .unwrap();
        assert!(zstd::decode_all(&z[..]).unwrap() == data[100..]);

        // Uploading it again, compressed, is acknowledged with -1.
        let again = write_blob(&server, &zstd_write_name("z2", &d), &packed, 0, 64 << 10)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.committed_size, -1);
    }

    // Plain upload, compressed read.
    let data = blob(200_000, 3);
    let d = upload(&server, "", &data).await;
    let z = download(&server, &zstd_read_name(&d), 0, 0).await.unwrap();
    assert!(zstd::decode_all(&z[..]).unwrap() == data);

    let err = download(&server, &zstd_read_name(&d), 0, 10)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "no read_limit on compressed reads"
    );
}

#[tokio::test]
async fn compressed_uploads_whose_size_fills_the_decoder_buffer_exactly() {
    // Sizes that are multiples of the decoder's 128 KiB output buffer once failed.
    let server = TestServer::start().await;
    for (len, seed) in [(128usize << 10, 1u64), (1 << 20, 2), (3 << 17, 3)] {
        for data in [blob(len, seed), compressible(len)] {
            let d = digest_of(&data);
            let packed = zstd::bulk::compress(&data, 3).unwrap();
            for (i, chunk) in [packed.len(), 16 << 10].into_iter().enumerate() {
                let name = zstd_write_name(&format!("exact-{len}-{seed}-{i}"), &d);
                let resp = write_blob(&server, &name, &packed, 0, chunk).await;
                // The first upload stores it; the second is acknowledged as already stored.
                let committed = resp.expect("compressed upload").into_inner().committed_size;
                assert!(committed == packed.len() as i64 || committed == -1);
            }
            assert!(download(&server, &read_name("", &d), 0, 0).await.unwrap() == data);
        }
    }
}

#[tokio::test]
async fn a_zstd_bomb_is_refused_and_nothing_is_stored() {
    let server = TestServer::start().await;
    // 200 MiB of zeros claims to be a 1 MiB blob: decompression must stop at the declared size.
    let claimed = digest_of(&vec![0u8; 1 << 20]);
    let bomb = zstd::bulk::compress(&vec![0u8; 200 << 20], 19).unwrap();
    assert!(bomb.len() < 100 << 10);
    let err = write_blob(
        &server,
        &zstd_write_name("bomb", &claimed),
        &bomb,
        0,
        16 << 10,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("more than its declared size"),
        "{}",
        err.message()
    );
    let err = download(&server, &read_name("", &claimed), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn corrupt_or_truncated_zstd_is_invalid_argument() {
    let server = TestServer::start().await;
    let data = compressible(100_000);
    let d = digest_of(&data);
    let packed = zstd::bulk::compress(&data, 3).unwrap();

    let garbage = blob(5000, 1);
    let err = write_blob(&server, &zstd_write_name("g", &d), &garbage, 0, 1000)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let truncated = &packed[..packed.len() - 10];
    let err = write_blob(&server, &zstd_write_name("t", &d), truncated, 0, 1000)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = download(&server, &read_name("", &d), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
