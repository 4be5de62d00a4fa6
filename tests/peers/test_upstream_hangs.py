"""The real distribution registry behind a relay that accepts connections and answers nothing.

That is how a registry behind a broken load balancer or a black-holed route fails, connections
already open included (``Registry.hang()``). regcache must keep serving what it has without
waiting on the upstream each time, remember that the upstream is gone, and notice when it is back.
What reached the upstream is counted at the relay, which still reads every request it never answers.
"""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request

from tests.conftest import upstream_entry
from tests.support import skopeo
from tests.support.seed import ALPHA, BETA, seed_upstream, standard_images
from tests.support.serving import sample

REVALIDATE_TIMEOUT = 1.0
MARGIN = 10.0  # on top of the bound the issue sets: the machine is shared
MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))


def get(url: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Accept": MANIFEST_TYPES})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, dict(error.headers)


def served_results(server, url: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Results of the requests for ``url`` in the access log, which is written after the last byte."""
    path = url.removeprefix(server.url)
    for _ in range(100):
        results = [e.get("result") for e in server.access_log() if e.get("path") == path]
        if len(results) >= 12:
            break
        time.sleep(0.05)
    return results


def breaker_state(server) -> float:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        return sample(response.read().decode(), "regcache_upstream_state", upstream="upstream.test")


def test_cached_content_is_served_and_the_dead_upstream_remembered_while_it_hangs(
    registry_factory, regcache_factory, tmp_path
):
    upstream = registry_factory()
    images = standard_images()
    seeded = seed_upstream(upstream, tmp_path / "seed", {k: images[k] for k in (ALPHA, BETA)})
    alpha, beta = seeded[ALPHA], seeded[BETA]
    server = regcache_factory([upstream_entry(
        upstream, tag_ttl="0s", revalidate_timeout=f"{REVALIDATE_TIMEOUT}s", retries=0,
        connect_timeout="3s", read_timeout="3s", breaker_failures=2,
    )])
    tag_url = f"{server.url}/v2/{alpha.repository}/manifests/{alpha.tag}"
    skopeo.copy(alpha.docker_ref(server.host), f"dir:{tmp_path / 'warm'}")  # the whole image, cached

    upstream.hang()
    upstream.reset_requests()
    began = time.monotonic()
    status, headers = get(tag_url)
    assert time.monotonic() - began < REVALIDATE_TIMEOUT + MARGIN
    assert status == 200 and headers["Docker-Content-Digest"] == alpha.digest
    for _ in range(10):
        began = time.monotonic()
        status, headers = get(tag_url)
        assert time.monotonic() - began < REVALIDATE_TIMEOUT + MARGIN
        assert status == 200 and headers["Docker-Content-Digest"] == alpha.digest
    assert served_results(server, tag_url) == ["miss"] + ["stale"] * 11
    # Eleven clients, one revalidation at a time, and no more than the two it takes to open the breaker.
    assert 1 <= upstream.manifest_requests(alpha.tag, alpha.repository, method="HEAD") <= 2

    # skopeo pulls the whole cached image while the upstream hangs.
    dest = tmp_path / "while-hung"
    skopeo.copy(alpha.docker_ref(server.host), f"dir:{dest}")
    assert hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest() == alpha.digest.split(":")[1]
    for blob in alpha.blob_digests:
        assert (dest / blob.split(":")[1]).is_file()

    # Uncached content: 503 at once once the breaker is open, and only its probe asks the upstream.
    for _ in range(3):
        get(f"{server.url}/v2/{beta.repository}/manifests/{beta.tag}")
        if breaker_state(server) == 1:
            break
    assert breaker_state(server) == 1
    before, connections = len(upstream.requests()), upstream.connections()
    uncached = [
        f"/v2/{beta.repository}/manifests/{beta.tag}",
        f"/v2/{beta.repository}/manifests/{beta.digest}",
        f"/v2/{beta.repository}/blobs/{beta.item.config_digest}",
    ]
    for path in uncached * 5:
        began = time.monotonic()
        status, headers = get(server.url + path)
        assert status == 503 and int(headers["Retry-After"]) >= 1, path
        assert time.monotonic() - began < MARGIN, "fast: nobody waited on the upstream"
    asked = upstream.requests()[before:]
    assert set(asked) <= {("GET", "/v2/")}, asked
    assert upstream.connections() - connections <= len(asked) + 1  # the probe's, one in flight at most
    assert get(f"{server.url}/readyz")[0] == 200

    # The upstream answers again: new tags are served within a few seconds (the probe's backoff).
    upstream.answer_again()
    deadline = time.monotonic() + 30
    while (status := get(server.url + uncached[0])[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200
    assert breaker_state(server) == 0
