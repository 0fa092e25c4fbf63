//! The webhooks' HTTP side: `POST /hooks/github`, `/hooks/gitlab` and `/hooks/git` on the
//! gRPC port, which also takes HTTP/1.1 for them (forges deliver over HTTP/1.1).
//!
//! They are on the gRPC port rather than the ops port because deliveries come from outside
//! (a forge on the internet) and carry secrets: that port has TLS (`[tls]`), the ops port is
//! plaintext by design (Kubernetes probes cannot speak TLS) and serves nothing that changes
//! state. Each endpoint checks its sender: GitHub's HMAC-SHA256 of the body
//! (`X-Hub-Signature-256`), GitLab's secret token (`X-Gitlab-Token`), or for `hoard hook git`
//! a bearer token of `[auth]` whose grants cover the rules' namespaces. A refused delivery
//! (401, 403, 400, 413, 415) changes nothing. Replies are JSON: what was applied, or
//! `{"error": ...}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};

use super::{payload, Hooks, Source};
use crate::auth::Caller;
use crate::connections::Peer;
use crate::error::Error;

/// GitHub caps a payload at 25 MB; nothing a rule reads is larger.
const MAX_BODY: usize = 25 << 20;
/// How long a body may take to arrive, so a sender trickling bytes cannot hold a turn.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Answers `/hooks/...` itself, in front of the gRPC stack (a forge sends no gRPC
/// credentials: each endpoint checks its own); answers other HTTP/1 requests with a hint.
#[derive(Clone)]
pub struct HooksLayer {
    hooks: Option<Arc<Hooks>>,
}

impl HooksLayer {
    /// `None`: no `[hooks]`; the endpoints say so.
    pub fn new(hooks: Option<Arc<Hooks>>) -> Self {
        HooksLayer { hooks }
    }
}

impl<S> tower::Layer<S> for HooksLayer {
    type Service = HooksService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HooksService {
            inner,
            hooks: self.hooks.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HooksService<S> {
    inner: S,
    hooks: Option<Arc<Hooks>>,
}

type Reply<E> = Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for HooksService<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Reply<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path == "/hooks" || path.starts_with("/hooks/") {
            let hooks = self.hooks.clone();
            return Box::pin(async move { Ok(answer(hooks, request).await) });
        }
        if request.version() < http::Version::HTTP_2 {
            let refused = refusal(
                StatusCode::NOT_FOUND,
                "this port speaks gRPC over HTTP/2; over HTTP/1.1 it serves only webhooks: \
                 POST /hooks/github, /hooks/gitlab or /hooks/git"
                    .into(),
            );
            return Box::pin(std::future::ready(Ok(refused)));
        }
        Box::pin(self.inner.call(request))
    }
}

/// A refused delivery: its status and why.
struct Refused(StatusCode, String);

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        let status = match e.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::FailedPrecondition | tonic::Code::Aborted => StatusCode::CONFLICT,
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refused(status, e.to_string())
    }
}

async fn answer<B>(hooks: Option<Arc<Hooks>>, request: Request<B>) -> Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer = Peer::of(&request).cloned();
    let peer_text = Peer::addr_text(peer.as_ref());
    match deliver(hooks, request, peer.as_ref(), &peer_text).await {
        Ok(summary) => json(StatusCode::OK, &summary),
        Err(Refused(status, why)) => {
            if status.is_success() {
                tracing::debug!(peer = %peer_text, "webhook delivery {why}");
            } else {
                tracing::warn!(peer = %peer_text, status = status.as_u16(), "webhook delivery refused: {why}");
            }
            refusal(status, why)
        }
    }
}

async fn deliver<B>(
    hooks: Option<Arc<Hooks>>,
    request: Request<B>,
    peer: Option<&Peer>,
    peer_text: &str,
) -> Result<serde_json::Value, Refused>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let source = match request.uri().path() {
        "/hooks/github" => Source::Github,
        "/hooks/gitlab" => Source::Gitlab,
        "/hooks/git" => Source::Git,
        other => {
            return Err(Refused(
                StatusCode::NOT_FOUND,
                format!(
                    "no webhook at {}: POST to /hooks/github, /hooks/gitlab or /hooks/git",
                    crate::error::echo(other)
                ),
            ))
        }
    };
    if request.method() != Method::POST {
        return Err(Refused(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} takes POST", request.uri().path()),
        ));
    }
    let Some(hooks) = hooks else {
        return Err(Refused(
            StatusCode::NOT_FOUND,
            "webhooks are not configured on this server ([hooks] in the config)".into(),
        ));
    };
    let headers = request.headers().clone();
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim() == "application/json");
    if !is_json {
        return Err(Refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON (Content-Type: application/json; on GitHub, set the \
             webhook's content type to application/json)"
                .into(),
        ));
    }
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // Who is sending is checked before the body is read, wherever the headers tell (all but
    // GitHub's signature, which covers the body).
    let caller = match source {
        Source::Github => {
            if hooks.github_secret.is_none() {
                return Err(not_set("GitHub", "hooks.github_secret_file"));
            }
            Caller::unrestricted()
        }
        Source::Gitlab => {
            let Some(token) = &hooks.gitlab_token else {
                return Err(not_set("GitLab", "hooks.gitlab_token_file"));
            };
            let sent = headers.get("x-gitlab-token").ok_or_else(|| {
                Refused(
                    StatusCode::UNAUTHORIZED,
                    "no X-Gitlab-Token: set the webhook's secret token".into(),
                )
            })?;
            let sent: [u8; 32] = Sha256::digest(sent.as_bytes()).into();
            if !crate::auth::constant_time_eq(token, &sent) {
                return Err(Refused(
                    StatusCode::UNAUTHORIZED,
                    "X-Gitlab-Token does not match hooks.gitlab_token_file".into(),
                ));
            }
            Caller::unrestricted()
        }
        Source::Git => {
            let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            let caller = hooks
                .auth()
                .authenticate(authorization, peer)
                .map_err(Refused::from)?
                .from_peer(peer.and_then(|p| p.addr));
            if hooks.auth().enabled() && caller.name() == crate::auth::ANONYMOUS {
                return Err(Refused(
                    StatusCode::UNAUTHORIZED,
                    "hoard hook git needs a token (HOARD_TOKEN) whose grants cover the rules' \
                     namespaces; anonymous callers may not send deliveries"
                        .into(),
                ));
            }
            caller
        }
    };
    let github_event = match source {
        Source::Github => {
            let event = text("x-github-event").ok_or_else(|| missing("X-GitHub-Event"))?;
            if text("x-github-delivery").is_none() {
                return Err(missing("X-GitHub-Delivery"));
            }
            Some(event)
        }
        _ => None,
    };
    let body = {
        let _turn = hooks.body_turn().await;
        let read = http_body_util::Limited::new(request.into_body(), MAX_BODY).collect();
        match tokio::time::timeout(BODY_TIMEOUT, read).await {
            Err(_) => {
                return Err(Refused(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {}s", BODY_TIMEOUT.as_secs()),
                ))
            }
            Ok(read) => {
                read.map_err(
                    |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                        Some(_) => Refused(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("the body is larger than {} MiB", MAX_BODY >> 20),
                        ),
                        None => Refused(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
                    },
                )?
            }
        }
        .to_bytes()
    };
    let delivery = match source {
        Source::Github => {
            if let Some(secret) = &hooks.github_secret {
                check_github_signature(secret, &headers, &body)?;
            }
            let event = github_event.unwrap_or_default();
            if event == "ping" {
                return Ok(serde_json::json!({"pong": true}));
            }
            let delivery = payload::github(&event, text("x-github-delivery"), &body)?;
            ignored(delivery, &event)?
        }
        Source::Gitlab => {
            let event = text("x-gitlab-event").ok_or_else(|| missing("X-Gitlab-Event"))?;
            // Idempotency-Key stays the same when GitLab retries a delivery. (Not
            // X-Gitlab-Event-UUID: deliveries one request caused share it.) Without it the
            // body's hash still catches a resend.
            let delivery = payload::gitlab(&event, text("idempotency-key"), &body)?;
            ignored(delivery, &event)?
        }
        Source::Git => payload::git(&body)?,
    };
    Ok(hooks.apply(delivery, &body, &caller, peer_text).await?)
}

/// An event no rule is about is answered 200, so the forge does not retry it.
fn ignored(delivery: Option<super::Delivery>, event: &str) -> Result<super::Delivery, Refused> {
    delivery.ok_or_else(|| {
        Refused(
            StatusCode::OK,
            format!("ignored: no rule acts on {event:?} events"),
        )
    })
}

fn not_set(forge: &str, key: &str) -> Refused {
    Refused(
        StatusCode::NOT_FOUND,
        format!("{forge} webhooks are off on this server: set {key}"),
    )
}

fn missing(header: &str) -> Refused {
    Refused(StatusCode::BAD_REQUEST, format!("no {header} header"))
}

/// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body under the secret>`.
fn check_github_signature(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<(), Refused> {
    let unauthorized = |why: &str| Refused(StatusCode::UNAUTHORIZED, why.to_string());
    let sent = headers
        .get("x-hub-signature-256")
        .ok_or_else(|| unauthorized("no X-Hub-Signature-256: set the webhook's secret"))?;
    let hex_part = sent
        .to_str()
        .ok()
        .and_then(|s| s.strip_prefix("sha256="))
        .ok_or_else(|| unauthorized("X-Hub-Signature-256 is not sha256=<hex>"))?;
    let tag = hex::decode(hex_part)
        .map_err(|_| unauthorized("X-Hub-Signature-256 is not sha256=<hex>"))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).map_err(|_| {
        unauthorized("X-Hub-Signature-256 does not match the body under hooks.github_secret_file")
    })
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<tonic::body::Body> {
    let mut text = value.to_string();
    text.push('\n');
    let mut response = Response::new(tonic::body::Body::new(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn refusal(status: StatusCode, why: String) -> Response<tonic::body::Body> {
    let key = if status.is_success() {
        "ignored"
    } else {
        "error"
    };
    json(status, &serde_json::json!({ key: why }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_github_signature_is_the_hmac_of_the_body() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
        let tag = hex::encode(ring::hmac::sign(&key, b"{}").as_ref());
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-hub-signature-256",
            format!("sha256={tag}").parse().unwrap(),
        );
        assert!(check_github_signature(b"s3cret", &headers, b"{}").is_ok());
        assert!(check_github_signature(b"other", &headers, b"{}").is_err());
        assert!(check_github_signature(b"s3cret", &headers, b"{ }").is_err());
        headers.insert("x-hub-signature-256", tag.parse().unwrap());
        assert!(check_github_signature(b"s3cret", &headers, b"{}").is_err());
    }
}
