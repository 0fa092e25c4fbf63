use hoard::proto::health::{health_check_response::ServingStatus, HealthCheckRequest};

use crate::common::{eventually, TestServer};

fn req(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn check_reports_serving_overall_and_per_service() {
    let server = TestServer::start().await;
    for service in [
        "",
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "build.bazel.remote.execution.v2.ActionCache",
        "build.bazel.remote.execution.v2.Capabilities",
        "google.bytestream.ByteStream",
    ] {
        let status = server
            .health()
            .check(req(service))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service}");
    }
    let err = server
        .health()
        .check(req("no.such.Service"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn watch_sees_not_serving_when_shutdown_starts() {
    let server = TestServer::start().await;
    let mut stream = server.health().watch(req("")).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let mut unknown = server
        .health()
        .watch(req("no.such.Service"))
        .await
        .unwrap()
        .into_inner();
    let u = unknown.message().await.unwrap().unwrap();
    assert_eq!(u.status, ServingStatus::ServiceUnknown as i32);

    let stopping = tokio::spawn(server.stop());
    let next = stream.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(stream);
    drop(unknown);
    stopping.await.unwrap();
}

#[tokio::test]
async fn during_the_drain_delay_health_is_not_serving_but_calls_still_work() {
    let server = TestServer::start_with(|c| {
        c.drain_delay = hoard::config::HumanDuration(std::time::Duration::from_secs(2));
    })
    .await;
    let health = server.health();
    let mut cas = server.cas();
    let stopping = tokio::spawn(server.stop());
    // Wait for NOT_SERVING, then check that a new call is still answered.
    let status = eventually(std::time::Duration::from_secs(1), || {
        let mut health = health.clone();
        async move {
            match health.check(req("")).await.unwrap().into_inner().status {
                s if s == ServingStatus::NotServing as i32 => Ok(s),
                s => Err(s),
            }
        }
    })
    .await;
    assert_eq!(status, ServingStatus::NotServing as i32);
    cas.find_missing_blobs(hoard::proto::reapi::FindMissingBlobsRequest::default())
        .await
        .expect("calls are still served while draining");
    stopping.await.unwrap();
}
