//! The OCI Distribution API front against a real server on 127.0.0.1: every endpoint with good
//! and bad input (wrong digests, bad Content-Range, missing blobs, malformed and oversize
//! manifests, invalid and traversing names), the spec's error format, credentials mapped to
//! grants, and repositories as namespaces that invalidation reaches.

use std::time::Duration;

use hoard::auth::{hash_token, Access, AuthConfig, TokenConfig};
use hoard::config::Config;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{hoard, succeeded, TestServer};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A server with the registry front on a port of its own; `url` is `http://127.0.0.1:PORT`.
pub async fn start(edit: impl FnOnce(&mut Config)) -> (TestServer, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = TestServer::start_with(|c| {
        c.oci_listen = Some(port);
        edit(c);
    })
    .await;
    // The registry binds once the store is open, after the gRPC listener.
    crate::common::poll_until(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(port).await
    })
    .await
    .expect("the OCI port listens");
    (server, format!("http://{port}"))
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn json_of(r: reqwest::Response) -> Value {
    let bytes = r.bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}"))
}

/// The spec's error body: the first error's code.
async fn error_code(r: reqwest::Response) -> String {
    let body: Value = json_of(r).await;
    body["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_string()
}

/// A monolithic upload (`POST ?digest=`): the blob is stored and its digest returned.
async fn push_blob(url: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    let r = client()
        .post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    d
}

fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(d, n)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}))
        .collect();
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers,
    })
    .to_string()
    .into_bytes()
}

async fn put_manifest(
    url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> reqwest::Response {
    client()
        .put(format!("{url}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn blobs_go_up_whole_in_chunks_or_by_mount_and_come_back_with_ranges() {
    let (_server, url) = start(|_| {}).await;
    let c = client();
    let r = c.get(format!("{url}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0"
    );

    // Monolithic.
    let data = b"hello, registry".to_vec();
    let d = push_blob(&url, "cache/app", &data).await;
    let r = c
        .head(format!("{url}/v2/cache/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), data.len().to_string());
    assert_eq!(header(&r, "docker-content-digest"), d);
    let r = c
        .get(format!("{url}/v2/cache/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    let r = c
        .get(format!("{url}/v2/cache/app/blobs/{d}"))
        .header("range", "bytes=7-14")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 7-14/{}", data.len())
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"registry");
    let r = c
        .get(format!("{url}/v2/cache/app/blobs/{d}"))
        .header("range", "bytes=99-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes */{}", data.len())
    );

    // Chunked: POST, PATCH with Content-Range, status, PUT ?digest=.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let bd = digest(&big);
    let r = c
        .post(format!("{url}/v2/cache/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = header(&r, "location");
    assert!(
        location.starts_with("/v2/cache/app/blobs/uploads/"),
        "{location}"
    );
    assert_eq!(header(&r, "range"), "0-0");
    let at = |l: &str| format!("{url}{l}");
    let r = c
        .patch(at(&location))
        .header("content-range", "0-99999")
        .header("content-type", "application/octet-stream")
        .body(big[..100_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-99999");
    // Out of order: 416, and the upload says where it stands.
    let r = c
        .patch(at(&location))
        .header("content-range", "200000-299999")
        .body(big[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "range"), "0-99999");
    let r = c
        .patch(at(&location))
        .header("content-range", "bytes=soon")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = c.get(at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-99999");
    let r = c
        .patch(at(&location))
        .header("content-range", "100000-199999")
        .body(big[100_000..200_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The last chunk in the closing PUT.
    let r = c
        .put(format!("{}?digest={bd}", at(&location)))
        .body(big[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    assert_eq!(header(&r, "location"), format!("/v2/cache/app/blobs/{bd}"));
    let r = c
        .get(format!("{url}/v2/cache/app/blobs/{bd}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &big[..]);
    // The session is gone once closed.
    let r = c.get(at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");

    // A wrong digest: 400, nothing stored, the session gone.
    let r = c
        .post(format!("{url}/v2/cache/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = header(&r, "location");
    let other = digest(b"something else");
    let r = c
        .put(format!("{}?digest={other}", at(&location)))
        .body(b"these bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    for d in [&other, &digest(b"these bytes")] {
        let r = c
            .head(format!("{url}/v2/cache/app/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{d} stored after a refused upload");
    }
    let r = c.get(at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{url}/v2/cache/app/blobs/uploads/?digest={other}"))
        .body(b"these bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .post(format!("{url}/v2/cache/app/blobs/uploads/?digest=md5:0000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Mounts: a stored blob from another repository is there at once (201); an unknown one
    // starts an upload (202), which DELETE cancels.
    let r = c
        .post(format!(
            "{url}/v2/cache/other/blobs/uploads/?mount={d}&from=cache/app"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), d);
    let r = c
        .post(format!(
            "{url}/v2/cache/other/blobs/uploads/?mount={other}&from=cache/app"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = header(&r, "location");
    let r = c.delete(at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .patch(at(&location))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // Another repository's session is not this one's.
    let r = c
        .post(format!("{url}/v2/cache/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let id = header(&r, "location")
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let r = c
        .get(format!("{url}/v2/cache/other/blobs/uploads/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let r = c
        .head(format!("{url}/v2/cache/app/blobs/{other}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .get(format!("{url}/v2/cache/app/blobs/{other}"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = c
        .delete(format!("{url}/v2/cache/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
}

/// The value of the `/metrics` series named `name` whose labels include every one of `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn manifests_need_their_blobs_and_tags_list_in_pages() {
    let (server, url) = start(|_| {}).await;
    let c = client();
    let config = b"{\"architecture\":\"amd64\"}".to_vec();
    let layer = b"a layer's bytes".to_vec();
    let manifest = image_manifest(
        (&digest(&config), config.len()),
        &[(&digest(&layer), layer.len())],
    );

    // The blobs are not there yet: refused, naming the first one.
    let r = put_manifest(&url, "cache/app/main", "latest", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 400);
    let body: Value = json_of(r).await;
    assert_eq!(body["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains(&digest(&config)),
        "{body}"
    );
    push_blob(&url, "cache/app/main", &config).await;
    push_blob(&url, "cache/app/main", &layer).await;

    // Malformed, mistyped, oversize.
    for (media_type, body, status, code) in [
        (OCI_MANIFEST, b"{not json".to_vec(), 400, "MANIFEST_INVALID"),
        ("text/plain", manifest.clone(), 400, "MANIFEST_INVALID"),
        (OCI_INDEX, manifest.clone(), 400, "MANIFEST_INVALID"),
        (OCI_MANIFEST, vec![b' '; 5 << 20], 413, "MANIFEST_INVALID"),
    ] {
        let r = put_manifest(&url, "cache/app/main", "latest", media_type, &body).await;
        assert_eq!(r.status(), status, "{media_type}");
        assert_eq!(error_code(r).await, code);
    }
    let r = put_manifest(
        &url,
        "cache/app/main",
        &digest(b"not it"),
        OCI_MANIFEST,
        &manifest,
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    let r = put_manifest(&url, "cache/app/main", "latest", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    let md = digest(&manifest);
    assert_eq!(header(&r, "docker-content-digest"), md);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/cache/app/main/manifests/{md}")
    );
    for reference in ["latest", md.as_str()] {
        let r = c
            .get(format!("{url}/v2/cache/app/main/manifests/{reference}"))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), md);
        assert_eq!(r.bytes().await.unwrap().as_ref(), &manifest[..]);
        let r = c
            .head(format!("{url}/v2/cache/app/main/manifests/{reference}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-length"), manifest.len().to_string());
    }

    // Older BuildKit: an index whose entries are blobs (layers, its cache config).
    let cache_config = b"{\"layers\":[]}".to_vec();
    let cd = push_blob(&url, "cache/app/main", &cache_config).await;
    let index = json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&layer), "size": layer.len()},
            {"mediaType": "application/vnd.buildkit.cacheconfig.v0", "digest": cd, "size": cache_config.len()},
        ],
    })
    .to_string();
    let r = put_manifest(
        &url,
        "cache/app/main",
        "buildcache",
        OCI_INDEX,
        index.as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);

    // Tags in pages.
    for tag in ["a", "b", "c"] {
        let r = put_manifest(&url, "cache/app/main", tag, OCI_MANIFEST, &manifest).await;
        assert_eq!(r.status(), 201);
    }
    let r = c
        .get(format!("{url}/v2/cache/app/main/tags/list"))
        .send()
        .await
        .unwrap();
    let all: Value = json_of(r).await;
    assert_eq!(
        all,
        json!({"name": "cache/app/main", "tags": ["a", "b", "buildcache", "c", "latest"]})
    );
    let r = c
        .get(format!("{url}/v2/cache/app/main/tags/list?n=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "link"),
        "</v2/cache/app/main/tags/list?last=b&n=2>; rel=\"next\""
    );
    assert_eq!(json_of(r).await["tags"], json!(["a", "b"]));
    let r = c
        .get(format!(
            "{url}/v2/cache/app/main/tags/list?n=2&last=buildcache"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "link"), "");
    assert_eq!(json_of(r).await["tags"], json!(["c", "latest"]));
    let r = c
        .get(format!("{url}/v2/cache/app/main/tags/list?n=many"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .get(format!("{url}/v2/cache/nothing/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    // DELETE by tag, then by digest (which takes its other tags with it).
    let r = c
        .delete(format!("{url}/v2/cache/app/main/manifests/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .get(format!("{url}/v2/cache/app/main/manifests/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = c
        .delete(format!("{url}/v2/cache/app/main/manifests/{md}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .get(format!("{url}/v2/cache/app/main/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await["tags"], json!(["buildcache"]));
    let r = c
        .delete(format!("{url}/v2/cache/app/main/manifests/{md}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Requests by operation and status, manifest hits per repository namespace, bytes.
    let (_, metrics) = crate::ops::http_get(server.ops_addr(), "/metrics").await;
    let count = |labels: &[&str]| series(&metrics, "hoard_oci_requests_total", labels);
    assert_eq!(
        count(&["operation=\"manifest_put\"", "code=\"201\""]),
        Some(5.0),
        "{metrics}"
    );
    assert_eq!(
        count(&["operation=\"manifest_put\"", "code=\"400\""]),
        Some(5.0)
    );
    let ns = "namespace=\"oci/cache/app/main\"";
    let lookups = series(&metrics, "hoard_oci_manifest_lookups_total", &[ns]);
    let hits = series(&metrics, "hoard_oci_manifest_hits_total", &[ns]);
    assert_eq!((lookups, hits), (Some(5.0), Some(4.0)), "{metrics}");
    let received = series(
        &metrics,
        "hoard_oci_bytes_total",
        &["direction=\"received\""],
    )
    .unwrap();
    assert!(
        received >= (config.len() + layer.len()) as f64,
        "{received}"
    );
}

/// A request line sent as is (HTTP clients tidy `..` away).
async fn raw_status(url: &str, line: &str) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{line} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    (status, out)
}

#[tokio::test]
async fn repository_names_outside_the_grammar_are_refused() {
    let (_server, url) = start(|_| {}).await;
    let d = digest(b"x");
    for name in [
        "Cache/App",
        "a//b",
        "a/../b",
        "..",
        "-a",
        "a_",
        "a..b",
        "a/./b",
        "a%2F..%2Fb",
    ] {
        let (status, text) = raw_status(&url, &format!("GET /v2/{name}/blobs/{d}")).await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(text.contains("NAME_INVALID"), "{name}: {text}");
    }
    let (status, text) = raw_status(&url, "GET /v2/a/unknown/path").await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("\"errors\""), "{text}");
    let (status, _) = raw_status(&url, &format!("GET /v2/a/blobs/{}", "sha256:XYZ")).await;
    assert_eq!(status, 400);
    let (status, _) = raw_status(&url, "GET /v2/a/manifests/bad%20tag").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn credentials_map_to_grants_on_the_repository_namespace() {
    let (_server, url) = start(|c| {
        c.auth = Some(AuthConfig {
            anonymous: Access::None,
            tokens: vec![TokenConfig {
                name: "builder".into(),
                hash: hash_token("builder-token"),
                grants: vec![
                    "write:oci/cache/**".parse().unwrap(),
                    "read:**".parse().unwrap(),
                ],
            }],
            client_certs: vec![],
        });
    })
    .await;
    let c = client();
    let r = c.get(format!("{url}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Basic realm=\"hoard\"");
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    let r = c
        .get(format!("{url}/v2/"))
        .basic_auth("ci", Some("builder-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{url}/v2/"))
        .basic_auth("ci", Some("guessed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{url}/v2/"))
        .bearer_auth("builder-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let data = b"a layer".to_vec();
    let d = digest(&data);
    let post = |repo: &str| {
        c.post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}"))
            .body(data.clone())
    };
    let r = post("cache/app").send().await.unwrap();
    assert_eq!(r.status(), 401, "anonymous callers are asked to log in");
    let r = post("cache/app")
        .basic_auth("ci", Some("builder-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = post("release/app")
        .basic_auth("ci", Some("builder-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let r = c
        .get(format!("{url}/v2/release/app/blobs/{d}"))
        .basic_auth("ci", Some("builder-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "read:** reads everywhere");
}

#[tokio::test]
async fn a_repository_is_a_namespace_that_invalidation_and_pruning_reach() {
    let (server, url) = start(|_| {}).await;
    let c = client();
    let config = b"{}".to_vec();
    push_blob(&url, "cache/app/feature", &config).await;
    let manifest = image_manifest((&digest(&config), config.len()), &[]);
    let r = put_manifest(
        &url,
        "cache/app/feature",
        "buildcache",
        OCI_MANIFEST,
        &manifest,
    )
    .await;
    assert_eq!(r.status(), 201);
    let server_url = server.url();
    let out = hoard(&["namespaces", "--server", &server_url, "--json"]).await;
    let listed = String::from_utf8_lossy(&succeeded(&out).stdout).into_owned();
    assert!(listed.contains("oci/cache/app/feature"), "{listed}");

    let out = hoard(&[
        "invalidate",
        "--server",
        &server_url,
        "--namespace",
        "oci/cache/app/feature",
        "--reason",
        "test",
    ])
    .await;
    succeeded(&out);
    let r = c
        .get(format!("{url}/v2/cache/app/feature/manifests/buildcache"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "an invalidated repository's tags are gone");

    let r = put_manifest(
        &url,
        "cache/app/feature",
        "buildcache",
        OCI_MANIFEST,
        &manifest,
    )
    .await;
    assert_eq!(r.status(), 201);
    // Idle for a second at least (the shortest --idle).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = hoard(&[
        "prune-namespaces",
        "--server",
        &server_url,
        "--idle",
        "1s",
        "--pattern",
        "oci/cache/app/*",
    ])
    .await;
    succeeded(&out);
    let r = c
        .get(format!("{url}/v2/cache/app/feature/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a pruned repository is gone");
}

#[tokio::test]
async fn a_branch_repository_reads_mains_manifests_through_its_read_chain() {
    let (_server, url) = start(|c| {
        c.namespaces.rules = vec![hoard::config::NamespaceRule {
            pattern: "oci/cache/app/*".into(),
            ac_ttl: None,
            read: Some(vec!["oci/cache/app/main".into()]),
            write: None,
        }];
    })
    .await;
    let c = client();
    let config = b"{\"main\":1}".to_vec();
    push_blob(&url, "cache/app/main", &config).await;
    let manifest = image_manifest((&digest(&config), config.len()), &[]);
    let r = put_manifest(&url, "cache/app/main", "key1", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    // A branch build asking its own repository for main's cache key gets main's manifest.
    let r = c
        .get(format!("{url}/v2/cache/app/feature/manifests/key1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), digest(&manifest));
    // Its own tags are its own: nothing exported to the branch yet.
    let r = c
        .get(format!("{url}/v2/cache/app/feature/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A repository outside the rule does not see main's.
    let r = c
        .get(format!("{url}/v2/cache/other/manifests/key1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // What the branch exports stays in the branch.
    let r = put_manifest(&url, "cache/app/feature", "key2", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    let r = c
        .get(format!("{url}/v2/cache/app/main/manifests/key2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn an_untagged_manifest_goes_after_the_grace_and_a_tagged_index_keeps_its_entries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_server, store, _tmp) = crate::common::start_with_clock(|c| {
        c.oci_listen = Some(port);
        c.oci.untagged_grace = hoard::config::HumanDuration(Duration::from_secs(600));
    })
    .await;
    crate::common::poll_until(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(port).await
    })
    .await
    .expect("the OCI port listens");
    let url = format!("http://{port}");
    let c = client();
    let manifest = |n: u8| {
        let config = vec![b'0' + n; 3];
        (
            config.clone(),
            image_manifest((&digest(&config), config.len()), &[]),
        )
    };
    let mut digests = Vec::new();
    for n in 1..=3 {
        let (config, m) = manifest(n);
        push_blob(&url, "cache/app", &config).await;
        digests.push(digest(&m));
        // 1 and 2 under the same tag, one after the other: 1 becomes untagged. 3 by digest
        // only, then referenced by a tagged index.
        let reference = if n == 3 {
            digest(&m)
        } else {
            "buildcache".to_string()
        };
        let r = put_manifest(&url, "cache/app", &reference, OCI_MANIFEST, &m).await;
        assert_eq!(r.status(), 201);
    }
    let (_, m3) = manifest(3);
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digests[2], "size": m3.len()}]})
    .to_string();
    let r = put_manifest(&url, "cache/app", "multi", OCI_INDEX, index.as_bytes()).await;
    assert_eq!(r.status(), 201);
    let get = |d: String| {
        let c = c.clone();
        let url = url.clone();
        async move {
            c.get(format!("{url}/v2/cache/app/manifests/{d}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        get(digests[0].clone()).await,
        200,
        "within the grace, untagged stays"
    );
    store.advance_clock(Duration::from_secs(700));
    // The sweep runs at the repository's next change.
    let (config, m) = manifest(4);
    push_blob(&url, "cache/app", &config).await;
    let r = put_manifest(&url, "cache/app", "other", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        get(digests[0].clone()).await,
        404,
        "untagged past the grace: gone"
    );
    assert_eq!(get(digests[1].clone()).await, 200, "tagged");
    assert_eq!(
        get(digests[2].clone()).await,
        200,
        "an entry of a tagged index"
    );
    assert_eq!(get("buildcache".into()).await, 200);
    // A repository idle for longer than the grace: the manifest a push untags gets its whole
    // grace from that push (a reader may have just resolved the tag to it).
    store.advance_clock(Duration::from_secs(700));
    let (config, m5) = manifest(5);
    push_blob(&url, "cache/app", &config).await;
    let r = put_manifest(&url, "cache/app", "other", OCI_MANIFEST, &m5).await;
    assert_eq!(r.status(), 201);
    let (_, m4) = manifest(4);
    assert_eq!(
        get(digest(&m4)).await,
        200,
        "untagged just now: within its grace"
    );
}

#[tokio::test]
async fn a_manifest_whose_layer_was_evicted_is_a_miss() {
    let (_server, url) = start(|c| {
        c.storage.backend = hoard::config::Backend::Memory;
        c.storage.max_size = hoard::config::ByteSize(400 << 10);
        c.storage.min_retention = hoard::config::HumanDuration(Duration::ZERO);
    })
    .await;
    let c = client();
    let config = b"{}".to_vec();
    let layer: Vec<u8> = (0..250_000u32).map(|i| (i * 7 % 256) as u8).collect();
    push_blob(&url, "cache/app", &config).await;
    push_blob(&url, "cache/app", &layer).await;
    let manifest = image_manifest(
        (&digest(&config), config.len()),
        &[(&digest(&layer), layer.len())],
    );
    let r = put_manifest(&url, "cache/app", "t", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    let r = c
        .get(format!("{url}/v2/cache/app/manifests/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Last uses are kept to the second: make the next blob clearly newer, then push enough to
    // evict the layer (the least recently used).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let other: Vec<u8> = (0..250_000u32).map(|i| (i * 13 % 251) as u8).collect();
    push_blob(&url, "cache/other", &other).await;
    let r = c
        .head(format!("{url}/v2/cache/app/blobs/{}", digest(&layer)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the layer was evicted");
    let r = c
        .get(format!("{url}/v2/cache/app/manifests/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = json_of(r).await;
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("evicted"),
        "{body}"
    );
}

#[tokio::test]
async fn read_only_namespaces_refuse_pushes_and_repository_names_must_be_namespaces() {
    let (_server, url) = start(|c| {
        c.namespaces.rules = vec![hoard::config::NamespaceRule {
            pattern: "oci/mirror/*".into(),
            ac_ttl: None,
            read: None,
            write: Some("none".into()),
        }];
    })
    .await;
    let c = client();
    let data = b"layer".to_vec();
    let r = c
        .post(format!(
            "{url}/v2/mirror/app/blobs/uploads/?digest={}",
            digest(&data)
        ))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = json_of(r).await;
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("read-only"),
        "{body}"
    );
    let config = b"{}".to_vec();
    push_blob(&url, "cache/app", &config).await;
    let manifest = image_manifest((&digest(&config), config.len()), &[]);
    let r = put_manifest(&url, "mirror/app", "t", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 403);
    // A name whose namespace has a segment REAPI reserves.
    let r = c
        .get(format!("{url}/v2/cache/uploads/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "NAME_INVALID");
    // An index's manifests must be this repository's.
    let r = put_manifest(&url, "cache/app", "t", OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201);
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest(&manifest), "size": manifest.len()}]})
    .to_string();
    let r = put_manifest(&url, "cache/other", "multi", OCI_INDEX, index.as_bytes()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let r = put_manifest(&url, "cache/app", "multi", OCI_INDEX, index.as_bytes()).await;
    assert_eq!(r.status(), 201);
    // No Content-Type: the body's mediaType says.
    let r = c
        .put(format!("{url}/v2/cache/app/manifests/plain"))
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .get(format!("{url}/v2/cache/app/manifests/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
}

#[tokio::test]
async fn the_registry_speaks_h2_as_well_as_http1() {
    let (_server, url) = start(|_| {}).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let data = b"over h2".to_vec();
    let d = digest(&data);
    let r = h2
        .post(format!("{url}/v2/cache/h2/blobs/uploads/?digest={d}"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 201);
    let r = h2
        .get(format!("{url}/v2/cache/h2/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
}
