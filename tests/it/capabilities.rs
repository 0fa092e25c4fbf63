use hoard::proto::reapi::{self, GetCapabilitiesRequest};

use crate::common::TestServer;

#[tokio::test]
async fn announces_what_bazel_needs() {
    let server = TestServer::start().await;
    let caps = server
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "ci/main".into(),
        })
        .await
        .expect("capabilities")
        .into_inner();
    let cache = caps.cache_capabilities.expect("cache capabilities");
    assert_eq!(
        cache.digest_functions,
        vec![reapi::digest_function::Value::Sha256 as i32]
    );
    assert!(cache.max_batch_total_size_bytes > 0);
    assert!(cache.max_batch_total_size_bytes < 4 << 20);
    assert!(
        cache
            .action_cache_update_capabilities
            .expect("ac update caps")
            .update_enabled
    );
    assert_eq!(
        cache.symlink_absolute_path_strategy,
        reapi::symlink_absolute_path_strategy::Value::Allowed as i32
    );
    assert!(caps.execution_capabilities.is_none(), "we are a cache only");
    let low = caps.low_api_version.expect("low api version");
    let high = caps.high_api_version.expect("high api version");
    assert_eq!((low.major, low.minor), (2, 0));
    assert_eq!(high.major, 2);
    assert!(high.minor >= low.minor);
}

#[tokio::test]
async fn the_batch_limit_follows_the_config() {
    let server = TestServer::start_with(|c| {
        c.limits.max_batch_total_size = hoard::config::ByteSize(1 << 20);
    })
    .await;
    let caps = server
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("capabilities")
        .into_inner();
    assert_eq!(
        caps.cache_capabilities.unwrap().max_batch_total_size_bytes,
        1 << 20
    );
}

#[tokio::test]
async fn malformed_instance_name_is_invalid_argument() {
    let server = TestServer::start().await;
    for name in ["../etc", "a//b", "x/blobs/y"] {
        let err = server
            .capabilities()
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: name.into(),
            })
            .await
            .expect_err(name);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(err.message().contains("instance name"), "{}", err.message());
    }
}
