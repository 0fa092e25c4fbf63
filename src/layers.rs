//! Tower layers around every gRPC service.

use http::{HeaderValue, Response};

/// tonic answers a request message above `limits.max_message_size` with OUT_OF_RANGE, where
/// gRPC's status-code table (and clients' retry logic) says RESOURCE_EXHAUSTED. The refusal
/// happens while decoding, before any handler runs, so it is mapped on the way out.
pub fn oversize_is_resource_exhausted<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let oversize = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(is_oversize_message);
    if oversize {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}

/// Whether a (percent-encoded) `grpc-message` is tonic's "decoded message length too large".
pub fn is_oversize_message(message: &str) -> bool {
    message.contains("decoded message length too large")
        || message.contains("decoded%20message%20length%20too%20large")
}
