"""Several upstreams on one endpoint: routing, per-upstream settings, Docker Hub behaviour.

In-process fake upstreams where a fault or a header must be produced on purpose (429, RateLimit-*,
TLS with a private CA, slow bodies); the real distribution registry for HEAD revalidation.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import UPSTREAMS
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of
from tests.support.registry import make_tls_files

LAYER = b"layer shared by two registries\n" * 200
OWN = b"only on the second registry\n" * 50
OCI = "application/vnd.oci.image.manifest.v1+json"


class PeakCounting(FakeUpstream):
    """Remembers how many blob requests it was serving at once."""

    def __init__(self) -> None:
        super().__init__()
        self.active = self.peak = 0

    async def _blob(self, request):  # type: ignore[no-untyped-def]
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await super()._blob(request)
        finally:
            self.active -= 1


@pytest.fixture
def start_fake(aiohttp_server):  # type: ignore[no-untyped-def]
    async def start(fake: FakeUpstream | None = None, **server_kwargs) -> FakeUpstream:  # type: ignore[no-untyped-def]
        fake = fake or FakeUpstream()
        server = await aiohttp_server(fake.app, host="127.0.0.1", **server_kwargs)
        fake.base_url = str(server.make_url("")).rstrip("/")
        return fake

    return start


@pytest.fixture
def proxy_for(aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    async def make(*upstreams: UpstreamSettings):  # type: ignore[no-untyped-def]
        return await aiohttp_client(create_app(Settings(data_dir=tmp_path / "data", upstreams=list(upstreams))))

    return make


def configured(name: str, fake: FakeUpstream, **kwargs) -> UpstreamSettings:  # type: ignore[no-untyped-def]
    # These tests look at exactly which requests reach an upstream: only the client's (no prefetch).
    kwargs.setdefault("prefetch", 0)
    return UpstreamSettings(name=name, url=fake.base_url, retries=0, **kwargs)


async def _error(response) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return (await response.json())["errors"][0]


# --------------------------------------------------------------------------- routing


async def test_ns_parameter_path_prefix_and_default_each_reach_their_upstream(start_fake, proxy_for):
    hub, ghcr = await start_fake(), await start_fake()
    hub_digest = hub.add_image("library/busybox", "1", [LAYER])
    ghcr_digest = ghcr.add_image("org/app", "1", [LAYER, OWN])
    proxy = await proxy_for(configured("docker.io", hub, default=True), configured("ghcr.io", ghcr))

    for path in (
        "/v2/busybox/manifests/1",
        "/v2/library/busybox/manifests/1",
        "/v2/library/busybox/manifests/1?ns=docker.io",
    ):
        r = await proxy.get(path, headers={"Accept": OCI})
        assert r.status == 200, path
        assert r.headers["Docker-Content-Digest"] == hub_digest
    for path in ("/v2/org/app/manifests/1?ns=ghcr.io", "/v2/ghcr.io/org/app/manifests/1"):
        r = await proxy.get(path, headers={"Accept": OCI})
        assert r.status == 200, path
        assert r.headers["Docker-Content-Digest"] == ghcr_digest
    assert {p for _, p, _ in hub.requests} == {"/v2/library/busybox/manifests/1"}
    assert {p for _, p, _ in ghcr.requests} == {"/v2/org/app/manifests/1"}


async def test_unconfigured_registry_gets_a_clear_oci_error(start_fake, proxy_for):
    hub = await start_fake()
    proxy = await proxy_for(configured("docker.io", hub, default=True))
    for path in ("/v2/team/app/manifests/1?ns=quay.io", "/v2/quay.io/team/app/manifests/1"):
        r = await proxy.get(path)
        assert r.status == 404, path
        error = await _error(r)
        assert error["code"] == "NAME_UNKNOWN"
        assert "quay.io" in error["message"] and "not configured" in error["message"]
    assert hub.requests == []


async def test_base_endpoint_answers_without_upstream_traffic(start_fake, proxy_for):
    hub = await start_fake()
    hub.token = "secret-token"  # an upstream /v2/ would answer 401
    proxy = await proxy_for(configured("docker.io", hub, default=True))
    r = await proxy.get("/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert hub.requests == [] and hub.token_requests == []


async def test_same_blob_from_two_upstreams_is_fetched_and_stored_once(start_fake, proxy_for, tmp_path):
    hub, ghcr = await start_fake(), await start_fake()
    hub.add_image("library/base", "1", [LAYER])
    ghcr.add_image("org/app", "1", [LAYER, OWN])
    proxy = await proxy_for(configured("docker.io", hub, default=True), configured("ghcr.io", ghcr))
    layer = digest_of(LAYER)
    for path in ("/v2/library/base", "/v2/ghcr.io/org/app"):
        assert (await proxy.get(f"{path}/manifests/1", headers={"Accept": OCI})).status == 200
        r = await proxy.get(f"{path}/blobs/{layer}")
        assert r.status == 200 and await r.read() == LAYER
    assert hub.count("GET", f"/blobs/{layer}") == 1
    assert ghcr.count("GET", f"/blobs/{layer}") == 0
    stored = [p for p in (tmp_path / "data" / "blobs").rglob(layer.split(":")[1]) if p.is_file()]
    assert len(stored) == 1


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("source", ["inline", "file", "env"])
async def test_each_upstream_gets_only_its_own_credentials(source, start_fake, proxy_for, tmp_path, monkeypatch):
    private, public = await start_fake(), await start_fake()
    private.token, private.basic = "private-token", ("alice", "s3cret-pw")
    private.add_image("team/app", "1", [LAYER])
    public.add_image("library/base", "1", [LAYER])
    password: dict[str, object] = {}
    if source == "inline":
        password["password"] = "s3cret-pw"
    elif source == "file":
        (tmp_path / "pw").write_text("s3cret-pw\n")
        password["password_file"] = tmp_path / "pw"
    else:
        monkeypatch.setenv("PRIVATE_REGISTRY_PASSWORD", "s3cret-pw")
        password["password_env"] = "PRIVATE_REGISTRY_PASSWORD"
    proxy = await proxy_for(
        configured("docker.io", public, default=True),
        configured("private.example", private, username="alice", **password),
    )
    r = await proxy.get("/v2/private.example/team/app/manifests/1", headers={"Accept": OCI})
    assert r.status == 200
    assert (await proxy.get("/v2/library/base/manifests/1", headers={"Accept": OCI})).status == 200
    assert private.token_requests and all(t["authorization"].startswith("Basic ") for t in private.token_requests)
    assert all("Authorization" not in headers for _, _, headers in public.requests)


# --------------------------------------------------------------------------- TLS


@pytest.fixture
async def tls_fake(start_fake, tmp_path):  # type: ignore[no-untyped-def]
    files = make_tls_files(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.certificate, files.key)
    fake = await start_fake(ssl=context)
    fake.add_image("team/app", "1", [LAYER])
    return fake, files


@pytest.mark.parametrize("trust", ["ca_bundle", "insecure", "nothing"])
async def test_tls_upstream_trust_is_per_upstream(trust, tls_fake, proxy_for):
    fake, files = tls_fake
    assert fake.base_url.startswith("https://")
    options = {"ca_bundle": {"ca_bundle": files.ca_certificate}, "insecure": {"insecure": True}, "nothing": {}}
    proxy = await proxy_for(configured("secure.example", fake, default=True, **options[trust]))
    r = await proxy.get("/v2/team/app/manifests/1", headers={"Accept": OCI})
    if trust == "nothing":
        assert r.status == 503
        assert (await _error(r))["code"] == "UNAVAILABLE"
        assert fake.requests == []  # the handshake failed: nothing was sent
    else:
        assert r.status == 200


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("limit", [None, 1])
async def test_max_concurrency_bounds_parallel_upstream_requests(limit, start_fake, proxy_for):
    fake = await start_fake(PeakCounting())
    blobs = [LAYER, OWN]
    fake.add_image("team/app", "1", blobs)
    for blob in blobs:
        fake.faults[digest_of(blob)] = Fault("slow", delay=0.5)
    proxy = await proxy_for(configured("docker.io", fake, default=True, max_concurrency=limit))

    async def fetch(blob: bytes) -> bytes:
        r = await proxy.get(f"/v2/team/app/blobs/{digest_of(blob)}")
        assert r.status == 200
        return await r.read()

    assert await asyncio.gather(*(fetch(b) for b in blobs)) == blobs
    assert fake.peak == (limit or len(blobs))


# --------------------------------------------------------------------------- Docker Hub behaviour


async def test_stale_tag_is_served_when_the_upstream_answers_429_and_ratelimit_is_recorded(start_fake, proxy_for):
    hub = await start_fake()
    digest = hub.add_image("library/app", "1", [LAYER])
    proxy = await proxy_for(configured("docker.io", hub, default=True, tag_ttl=0))
    assert (await proxy.get("/v2/library/app/manifests/1", headers={"Accept": OCI})).status == 200

    limited = {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "0;w=21600", "Retry-After": "3600"}
    hub.faults["manifest"] = Fault("status", status=429, headers=limited)
    hub.requests.clear()
    r = await proxy.get("/v2/library/app/manifests/1", headers={"Accept": OCI})
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == digest
    # One HEAD (revalidation), no GET: Docker Hub counts GETs against the limit.
    assert [m for m, _, _ in hub.requests] == ["HEAD"]
    recorded = proxy.server.app[UPSTREAMS]["docker.io"].rate_limit
    assert (recorded.limit, recorded.remaining, recorded.window) == (100, 0, 21600)


async def test_429_without_a_cached_copy_is_passed_on_with_retry_after(start_fake, proxy_for):
    hub = await start_fake()
    hub.add_image("library/app", "1", [LAYER])
    hub.faults["manifest"] = Fault("status", status=429, headers={"Retry-After": "3600"})
    proxy = await proxy_for(configured("docker.io", hub, default=True))
    r = await proxy.get("/v2/library/app/manifests/1", headers={"Accept": OCI})
    assert r.status == 429
    assert r.headers["Retry-After"] == "3600"
    assert (await _error(r))["code"] == "TOOMANYREQUESTS"


async def test_known_tag_is_revalidated_with_head_against_the_real_registry(upstream, seeded, aiohttp_client, tmp_path):
    image = seeded["library/alpha:1"]
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name="docker.io", url=upstream.url, default=True, tag_ttl=0, prefetch=0)],
    )
    proxy = await aiohttp_client(create_app(settings))
    accept = {"Accept": image.media_type}
    upstream.reset_requests()
    first = await proxy.get("/v2/alpha/manifests/1", headers=accept)
    assert first.status == 200 and await first.read() == image.manifest
    second = await proxy.get("/v2/alpha/manifests/1", headers=accept)
    assert second.status == 200 and await second.read() == image.manifest
    assert upstream.requests() == [
        ("GET", "/v2/library/alpha/manifests/1"),
        ("HEAD", "/v2/library/alpha/manifests/1"),
    ]
    assert json.loads(image.manifest)["mediaType"] == image.media_type
