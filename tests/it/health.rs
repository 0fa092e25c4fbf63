use hoard::proto::health::{health_check_response::ServingStatus, HealthCheckRequest};

use crate::common::TestServer;

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
