"""The pull-through core against the real distribution registry, pulled by skopeo."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import upstream_entry
from tests.support import skopeo
from tests.support.seed import ALPHA, BETA, BUSYBOX, seed_upstream


def stored_blobs(server) -> set[str]:
    return {f"sha256:{p.name}" for p in (server.data_dir / "blobs" / "sha256").rglob("*") if p.is_file()}


def eventually(check, attempts: int = 300) -> bool:  # type: ignore[no-untyped-def]
    """A blob's commit follows the client's verified last byte: poll for it, bounded."""
    for _ in range(attempts):
        if check():
            return True
        time.sleep(0.05)
    return check()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def test_skopeo_through_regcache_sees_upstream_digests(upstream, seeded, regcache_factory, tmp_path):
    server = regcache_factory([upstream_entry(upstream)])
    for key, image in seeded.items():
        direct = skopeo.inspect(image.docker_ref(upstream.host), raw=True)
        proxied = skopeo.inspect(image.docker_ref(server.host), raw=True)
        assert proxied == direct, key
        assert hashlib.sha256(proxied).hexdigest() == image.digest.split(":")[1]
        info = skopeo.inspect(image.docker_ref(server.host, by_digest=True), no_tags=True)
        assert info["Digest"] == image.digest
        dest = tmp_path / key.replace("/", "_").replace(":", "_")
        # dir: keeps every manifest type byte for byte (oci: cannot hold a docker list).
        skopeo.copy(image.docker_ref(server.host), f"dir:{dest}", all_images=True)
        assert hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest() == image.digest.split(":")[1]
        for blob in image.blob_digests:
            assert (dest / blob.split(":")[1]).is_file(), (key, blob)
    # Every blob the clients fetched is on disk once, whatever image asked.
    every = {b for image in seeded.values() for b in image.blob_digests}
    assert eventually(lambda: every <= stored_blobs(server)), every - stored_blobs(server)


def test_shared_layer_is_fetched_and_stored_once(upstream, seeded, regcache_factory, tmp_path):
    server = regcache_factory([upstream_entry(upstream)])
    alpha, beta = seeded[ALPHA], seeded[BETA]
    shared = set(alpha.blob_digests) & set(beta.blob_digests)
    assert shared, "the standard set shares a base layer"
    upstream.reset_requests()
    skopeo.copy(alpha.docker_ref(server.host), f"oci:{tmp_path / 'a'}:x")
    skopeo.copy(beta.docker_ref(server.host), f"oci:{tmp_path / 'b'}:x")
    for blob in set(alpha.blob_digests) | set(beta.blob_digests):
        assert upstream.blob_gets(blob) == 1, blob
    assert eventually(lambda: shared <= stored_blobs(server))
    files = [p for p in (server.data_dir / "blobs").rglob("*") if p.is_file() and f"sha256:{p.name}" in shared]
    assert len(files) == len(shared)


def test_twenty_concurrent_clients_one_upstream_get(upstream, seeded, regcache_factory):
    server = regcache_factory([upstream_entry(upstream)])
    image = seeded[BUSYBOX]
    layer = image.item.layers[-1]
    upstream.reset_requests()
    url = f"{server.url}/v2/{image.repository}/blobs/{layer.digest}"
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: get(url), range(20)))
    for status, body, _ in results:
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    assert upstream.blob_gets(layer.digest) == 1


def test_upstream_stopped_cached_pulls_work_uncached_fail_fast(registry_factory, regcache_factory, tmp_path):
    origin = registry_factory()
    images = seed_upstream(origin, tmp_path / "seed")
    server = regcache_factory([upstream_entry(origin, tag_ttl="0s", connect_timeout="2s", retries=1)])
    alpha = images[ALPHA]
    skopeo.copy(alpha.docker_ref(server.host), f"oci:{tmp_path / 'warm'}:x")
    # beta is only asked about, never held.
    assert get(f"{server.url}/v2/{images[BETA].repository}/blobs/sha256:{'0' * 64}")[0] == 404
    origin.stop()
    # By tag (revalidation fails, the stale copy is served) and by digest.
    skopeo.copy(alpha.docker_ref(server.host), f"oci:{tmp_path / 'tag'}:x")
    skopeo.copy(alpha.docker_ref(server.host, by_digest=True), f"oci:{tmp_path / 'digest'}:x")
    started = time.monotonic()
    status, body, _ = get(f"{server.url}/v2/{images[BETA].repository}/manifests/{images[BETA].tag}")
    assert status == 503
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 15  # bounded by connect timeout and retries, not a hang
    # Tags of a cached repository come from the cache while the upstream is down.
    status, body, _ = get(f"{server.url}/v2/{alpha.repository}/tags/list")
    assert status == 200
    assert json.loads(body)["tags"] == [alpha.tag]
    # Of a repository the cache holds no tag of, it cannot say: the upstream's error, not "no tags".
    status, body, _ = get(f"{server.url}/v2/{images[BETA].repository}/tags/list")
    assert status == 503, body


def test_catalog_lists_cached_repositories_paged(upstream, seeded, regcache_factory):
    server = regcache_factory([upstream_entry(upstream)])
    for key in (ALPHA, BETA):
        status, _, _ = get(
            f"{server.url}/v2/{seeded[key].repository}/manifests/{seeded[key].tag}",
            {"Accept": seeded[key].media_type},
        )
        assert status == 200
    status, body, headers = get(f"{server.url}/v2/_catalog?n=1")
    assert json.loads(body) == {"repositories": ["library/alpha"]}
    assert "last=library%2Falpha" in headers["Link"]
    status, body, _ = get(f"{server.url}/v2/_catalog?n=1&last=library/alpha")
    assert json.loads(body) == {"repositories": ["library/beta"]}


@pytest.mark.parametrize("accept_style", ["lines", "comma"])
def test_accept_headers_merged(upstream, seeded, regcache_factory, accept_style):
    server = regcache_factory([upstream_entry(upstream)])
    image = seeded[ALPHA]
    types = ["application/vnd.docker.distribution.manifest.v2+json", image.media_type]
    request = urllib.request.Request(f"{server.url}/v2/{image.repository}/manifests/{image.tag}")
    if accept_style == "comma":
        request.add_header("Accept", ", ".join([*types, "*/*"]))
    else:
        # urllib folds repeated headers; send the two lines through http.client instead.
        import http.client

        conn = http.client.HTTPConnection(server.host, timeout=30)
        conn.putrequest("GET", f"/v2/{image.repository}/manifests/{image.tag}")
        for media_type in types:
            conn.putheader("Accept", media_type)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Docker-Content-Digest") == image.digest
        assert response.getheader("Content-Type") == image.media_type
        return
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Length"] == str(len(image.manifest))


def test_tag_list_pages_follow_to_the_end_against_distribution(upstream, seeded, regcache_factory):
    """distribution 2.8 answers every tag whatever ``n`` says: regcache pages them itself."""
    alpha = seeded[ALPHA]
    repository = "paging/tags"
    skopeo.copy(alpha.docker_ref(upstream.host), skopeo.docker_ref(upstream.host, repository, "t0"))
    manifest = upstream.get_manifest(repository, "t0")
    tags = [f"t{i}" for i in range(5)]
    for tag in tags[1:]:
        put = upstream.request("PUT", f"/v2/{repository}/manifests/{tag}",
                               headers={"Content-Type": manifest.headers["Content-Type"]}, body=manifest.body)
        assert put.status == 201, put.body
    server = regcache_factory([upstream_entry(upstream)])
    pages, path = [], f"/v2/{repository}/tags/list?n=2"
    while path is not None and len(pages) <= len(tags):
        status, body, headers = get(server.url + path)
        assert status == 200, body
        pages.append(json.loads(body)["tags"])
        link = headers.get("Link")
        path = link[1:link.index(">")] if link else None
    assert pages == [["t0", "t1"], ["t2", "t3"], ["t4"]]
