#!/usr/bin/env python3
"""One scripted sequence of OCI Distribution requests against two registries (hoard, and
Debian's docker-registry as the reference): the status codes, the error codes and the headers
clients rely on (Location, Docker-Content-Digest, Range, Content-Range, Docker-Upload-UUID,
Content-Type, Content-Length) must match. Locations are compared by presence (distribution
answers absolute URLs, hoard relative ones; clients take both) and followed.

Left out, because docker-registry 2.8.2 departs from the spec there (hoard follows the spec;
tests/it/oci.rs covers them): an out-of-order PATCH (2.8.2 takes it; the spec says 416), a
monolithic POST ?digest= (2.8.2 answers 202 and drops the body), tags/list ?n= pagination
(2.8.2 ignores n), DELETE of a manifest by tag (2.8.2 answers 400), and GET of an OCI manifest
without an Accept header (2.8.2 answers 404).

Usage: oci-differential.py HOARD_URL REFERENCE_URL
"""
import hashlib
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
HEADERS = ["location", "docker-content-digest", "range", "content-range", "docker-upload-uuid",
           "content-type", "content-length"]
# Compared by presence only: their values differ legitimately between implementations.
PRESENCE_ONLY = {"location", "docker-upload-uuid"}


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None, headers=None):
        url = path if path.startswith("http") else self.base + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def absolute(self, location):
        return urllib.parse.urljoin(self.base + "/", location)


def error_code(body):
    try:
        return json.loads(body)["errors"][0]["code"]
    except Exception:
        return None


def main():
    hoard, reference = Registry(sys.argv[1]), Registry(sys.argv[2])
    layer = bytes(range(256)) * 400
    config = b'{"architecture":"amd64","os":"linux"}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer), "size": len(layer)}],
    }).encode()
    missing = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(b"nowhere"), "size": 7},
        "layers": [],
    }).encode()
    octet = {"content-type": "application/octet-stream"}
    accept = {"accept": OCI_MANIFEST}
    # Each step: (what, method, path or a function of the registry's state, body, headers,
    # headers to compare). A path may name {upload} (the last Location) or {manifest}.
    steps = [
        ("base", "GET", "/v2/", None, {}, []),
        ("unknown blob (HEAD)", "HEAD", f"/v2/diff/a/blobs/{digest(layer)}", None, {}, []),
        ("unknown blob (GET)", "GET", f"/v2/diff/a/blobs/{digest(layer)}", None, {}, []),
        ("start an upload", "POST", "/v2/diff/a/blobs/uploads/", None, {}, ["location", "docker-upload-uuid", "range"]),
        ("a chunk", "PATCH", "{upload}", layer[:1000], octet, ["location", "range"]),
        ("upload status", "GET", "{upload}", None, {}, ["location", "range"]),
        ("the rest and the digest", "PUT", "{upload}?digest=" + digest(layer), layer[1000:], octet,
         ["location", "docker-content-digest"]),
        ("stored blob (HEAD)", "HEAD", f"/v2/diff/a/blobs/{digest(layer)}", None, {}, ["docker-content-digest", "content-length"]),
        ("a range of it", "GET", f"/v2/diff/a/blobs/{digest(layer)}", None, {"range": "bytes=0-99"},
         ["content-range", "content-length"]),
        ("start another", "POST", "/v2/diff/a/blobs/uploads/", None, {}, ["location"]),
        ("close with a wrong digest", "PUT", "{upload}?digest=" + digest(b"other"), config, octet, []),
        ("start a third", "POST", "/v2/diff/a/blobs/uploads/", None, {}, ["location"]),
        ("the config in one PUT", "PUT", "{upload}?digest=" + digest(config), config, octet, ["location", "docker-content-digest"]),
        ("mount into another repository", "POST", f"/v2/diff/b/blobs/uploads/?mount={digest(layer)}&from=diff/a", None, {},
         ["location", "docker-content-digest"]),
        ("mount of an unknown blob", "POST", f"/v2/diff/b/blobs/uploads/?mount={digest(b'nowhere')}&from=diff/a", None, {},
         ["location"]),
        ("cancel that upload", "DELETE", "{upload}", None, {}, []),
        ("manifest with a missing blob", "PUT", "/v2/diff/a/manifests/v1", missing, {"content-type": OCI_MANIFEST}, []),
        ("malformed manifest", "PUT", "/v2/diff/a/manifests/v1", b"{nope", {"content-type": OCI_MANIFEST}, []),
        ("manifest by tag", "PUT", "/v2/diff/a/manifests/v1", manifest, {"content-type": OCI_MANIFEST},
         ["location", "docker-content-digest"]),
        ("manifest by tag (GET)", "GET", "/v2/diff/a/manifests/v1", None, accept,
         ["docker-content-digest", "content-type", "content-length"]),
        ("manifest by digest (HEAD)", "HEAD", f"/v2/diff/a/manifests/{digest(manifest)}", None, accept,
         ["docker-content-digest", "content-type", "content-length"]),
        ("unknown tag", "GET", "/v2/diff/a/manifests/v9", None, accept, []),
        ("tags", "GET", "/v2/diff/a/tags/list", None, {}, []),
        ("delete by digest", "DELETE", f"/v2/diff/a/manifests/{digest(manifest)}", None, {}, []),
        ("deleted manifest", "GET", f"/v2/diff/a/manifests/{digest(manifest)}", None, accept, []),
    ]
    state = {hoard: {}, reference: {}}
    mismatches = []
    for what, method, path, body, headers, compare in steps:
        answers = []
        for registry in (hoard, reference):
            target = path.replace("{upload}", state[registry].get("upload", "/v2/none"))
            sep_fixed = target.replace("?digest", "&digest") if "?" in target.split("?digest")[0] else target
            status, got, payload = registry.call(method, sep_fixed, body, headers)
            if "location" in got and "/blobs/uploads/" in got["location"]:
                state[registry]["upload"] = registry.absolute(got["location"])
            answers.append((status, got, payload))
        (s1, h1, b1), (s2, h2, b2) = answers
        if s1 != s2:
            mismatches.append(f"{what}: status {s1} (hoard) vs {s2} (reference)")
            continue
        if s1 >= 400 and method != "HEAD" and error_code(b1) != error_code(b2):
            mismatches.append(f"{what}: error {error_code(b1)} vs {error_code(b2)}")
        for name in compare:
            if (name in h1) != (name in h2):
                mismatches.append(f"{what}: header {name} {'present' if name in h1 else 'absent'} on hoard, "
                                  f"{'present' if name in h2 else 'absent'} on the reference")
            elif name not in PRESENCE_ONLY and h1.get(name) != h2.get(name):
                mismatches.append(f"{what}: {name} {h1.get(name)!r} vs {h2.get(name)!r}")
        if what == "tags" and json.loads(b1) != json.loads(b2):
            mismatches.append(f"tags: {b1!r} vs {b2!r}")
        if method == "GET" and s1 == 200 and what.startswith("manifest") and b1 != b2:
            mismatches.append(f"{what}: the manifest's bytes differ")
        print(f"{what}: {s1}")
    for m in mismatches:
        print("MISMATCH:", m)
    if mismatches:
        sys.exit(1)
    print(f"{len(steps)} requests answered alike (status, error code, headers)")


if __name__ == "__main__":
    main()
