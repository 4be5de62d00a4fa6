"""Pull-through against a fake upstream: the faults a real registry cannot produce."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
from aiohttp import ClientPayloadError, ServerDisconnectedError

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of

LAYER = os.urandom(3 * 1024 * 1024 + 17)
SMALL = b"small layer bytes" * 100


def settings_for(fake: FakeUpstream, data_dir, **upstream) -> Settings:
    return Settings(
        data_dir=data_dir,
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=1, **upstream)],
    )


@pytest.fixture
async def proxy(fake, aiohttp_client, tmp_path):
    return await aiohttp_client(create_app(settings_for(fake, tmp_path / "data")))


async def cut_short(proxy, layer: str) -> None:
    """A GET of ``layer`` whose connection is cut before the body's clean end."""
    with pytest.raises((ClientPayloadError, ServerDisconnectedError, ConnectionError)):
        r = await proxy.get(f"/v2/team/app/blobs/{layer}")
        await r.read()


def stored_files(root) -> list[str]:
    return sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())


async def test_miss_then_hit_serves_same_bytes_and_fetches_once(fake, proxy, tmp_path):
    digest = fake.add_image("team/app", "1", [LAYER, SMALL])
    layer = digest_of(LAYER)
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == digest
    for _ in range(2):
        r = await proxy.get(f"/v2/team/app/blobs/{layer}")
        assert r.status == 200
        assert await r.read() == LAYER
        assert r.headers["Docker-Content-Digest"] == layer
    assert fake.count("GET", f"/blobs/{layer}") == 1
    await proxy.server.app[PULLTHROUGH].fills.settle()  # the commit follows the verified last byte
    assert layer.split(":")[1] in stored_files(tmp_path / "data")


async def test_corrupt_upstream_blob_is_never_committed(fake, proxy, tmp_path):
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    fake.faults[layer] = Fault("corrupt", times=1)
    await cut_short(proxy, layer)
    await asyncio.sleep(0.05)
    assert layer.split(":")[1] not in stored_files(tmp_path / "data")
    assert list((tmp_path / "data" / "tmp").iterdir()) == []
    # The next request fetches again and gets the right bytes.
    r = await proxy.get(f"/v2/team/app/blobs/{layer}")
    assert await r.read() == LAYER


async def test_a_client_cut_by_a_failed_fill_is_logged_with_the_fill_s_own_error(fake, proxy, caplog):
    caplog.set_level(logging.INFO, logger="regcache.access")
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    fake.faults[layer] = Fault("corrupt", times=1)
    await cut_short(proxy, layer)
    for _ in range(100):  # the line is written once the handler is done
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "regcache.access"]
        if lines:
            break
        await asyncio.sleep(0.01)
    (line,) = lines
    assert line["result"] == "aborted"
    assert layer in line["error"], "why the fill failed, not only that it did"


@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_upstream_manifest_that_does_not_hash_to_its_digest_is_a_bad_gateway(fake, proxy, by):
    digest = fake.add_image("team/app", "1", [SMALL])
    fake.faults["manifest"] = Fault("corrupt", times=1)
    reference = "1" if by == "tag" else digest
    r = await proxy.get(f"/v2/team/app/manifests/{reference}")
    assert r.status == 502, "the upstream's fault, not the client's"
    error = (await r.json())["errors"][0]
    assert error["code"] != "DIGEST_INVALID"
    assert digest in error["message"]
    # Nothing of it was kept: the next GET fetches again and gets the right manifest.
    r = await proxy.get(f"/v2/team/app/manifests/{reference}")
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == digest


@pytest.mark.parametrize("kind", ["truncate", "reset"])
async def test_broken_upstream_stream_aborts_client_and_stores_nothing(fake, proxy, tmp_path, kind):
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    fake.faults[layer] = Fault(kind, times=-1)
    await cut_short(proxy, layer)
    await asyncio.sleep(0.05)
    assert layer.split(":")[1] not in stored_files(tmp_path / "data")


async def test_concurrent_clients_share_one_upstream_fetch(fake, proxy):
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    fake.faults[layer] = Fault("slow", delay=0.2)

    async def pull() -> bytes:
        r = await proxy.get(f"/v2/team/app/blobs/{layer}")
        assert r.status == 200
        return await r.read()

    bodies = await asyncio.gather(*(pull() for _ in range(20)))
    assert all(b == LAYER for b in bodies)
    assert fake.count("GET", f"/blobs/{layer}") == 1


async def test_stale_manifest_served_when_upstream_fails(fake, aiohttp_client, tmp_path):
    proxy = await aiohttp_client(create_app(settings_for(fake, tmp_path / "d", tag_ttl=0)))
    digest = fake.add_image("team/app", "1", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    fake.faults["manifest"] = Fault("status", status=503)
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == digest
    fake.faults["manifest"] = Fault("status", status=429, headers={"Retry-After": "60"})
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 200


async def test_revalidation_uses_head_not_get(fake, aiohttp_client, tmp_path):
    proxy = await aiohttp_client(create_app(settings_for(fake, tmp_path / "d", tag_ttl=0)))
    fake.add_image("team/app", "1", [SMALL])
    await proxy.get("/v2/team/app/manifests/1")
    gets = fake.count("GET", "/manifests/")
    for _ in range(3):
        assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    assert fake.count("GET", "/manifests/") == gets
    assert fake.count("HEAD", "/manifests/") == 3


async def test_token_challenge_and_redirect_without_credentials(fake, aiohttp_server, aiohttp_client, tmp_path):
    cdn = FakeUpstream()
    cdn.blobs = fake.blobs
    cdn_server = await aiohttp_server(cdn.app, host="127.0.0.2")
    fake.redirect_to = str(cdn_server.make_url("")).rstrip("/")
    fake.token = "t0ken-value"
    fake.basic = ("user", "s3cret-password")
    settings = settings_for(fake, tmp_path / "d", username="user", password="s3cret-password")
    proxy = await aiohttp_client(create_app(settings))
    fake.add_image("team/app", "1", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    r = await proxy.get(f"/v2/team/app/blobs/{digest_of(SMALL)}")
    assert await r.read() == SMALL
    assert fake.token_requests and fake.token_requests[0]["scope"] == "repository:team/app:pull"
    assert cdn.requests, "the blob came from the redirect target"
    for _, _, headers in cdn.requests:
        assert "Authorization" not in headers


async def test_upstream_down_fails_fast_with_unavailable(aiohttp_client, tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        upstreams=[UpstreamSettings(name="down.test", url="http://127.0.0.1:9", default=True, retries=1)],
    )
    proxy = await aiohttp_client(create_app(settings))
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 503
    assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_unknown_manifest_and_blob_are_oci_404(fake, proxy):
    r = await proxy.get("/v2/team/app/manifests/nope")
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    r = await proxy.get("/v2/team/app/blobs/sha256:" + "0" * 64)
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Team/app/manifests/1", "NAME_INVALID"),
        ("/v2/team/../etc/manifests/1", None),
        ("/v2/team/app/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/team/app/blobs/md5:" + "0" * 32, "DIGEST_INVALID"),
        ("/v2/team/app/manifests/-bad", "MANIFEST_INVALID"),
        ("/v2/team%2Fapp/manifests/1", "NAME_INVALID"),
        ("/v2/team/app/tags/list?n=x", "PAGINATION_NUMBER_INVALID"),
    ],
)
async def test_bad_input_gets_oci_errors(proxy, path, code):
    r = await proxy.get(path)
    assert 400 <= r.status < 500
    body = await r.json()
    if code is not None:
        assert body["errors"][0]["code"] == code


async def test_push_is_unsupported(proxy):
    attempts = [
        ("POST", "/v2/team/app/blobs/uploads/"),
        ("PUT", "/v2/team/app/manifests/1"),
        ("DELETE", "/v2/team/app/manifests/1"),
        ("PATCH", "/v2/team/app/blobs/uploads/x"),
    ]
    for method, path in attempts:
        r = await proxy.request(method, path)
        assert r.status == 405, path
        assert (await r.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_base_answers_without_upstream(fake, proxy):
    r = await proxy.get("/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert fake.requests == []


async def test_range_on_cached_blob(fake, proxy):
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    await (await proxy.get(f"/v2/team/app/blobs/{layer}")).read()
    await proxy.server.app[PULLTHROUGH].fills.settle()  # cached: the commit follows the last byte
    r = await proxy.get(f"/v2/team/app/blobs/{layer}", headers={"Range": "bytes=10-19"})
    assert r.status == 206
    assert await r.read() == LAYER[10:20]
    r = await proxy.get(f"/v2/team/app/blobs/{layer}", headers={"Range": f"bytes={len(LAYER) + 5}-"})
    assert r.status == 416


async def test_pinned_tag_survives_upstream_forgetting_it(fake, aiohttp_client, tmp_path):
    from proxy.resources import METADATA
    from storage.index.rows import ImageKey

    app = create_app(settings_for(fake, tmp_path / "d", tag_ttl=0, negative_ttl=0))
    proxy = await aiohttp_client(app)
    digest = fake.add_image("team/app", "1", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    del fake.manifests[("team/app", "1")]
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 404, "an unpinned tag the upstream lost is gone"
    fake.manifests[("team/app", "1")] = fake.manifests[("team/app", digest)]
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    metadata = app[METADATA]
    repo = await metadata.repository_id("fake.test", "team/app")
    assert await metadata.set_pinned(ImageKey(repo, digest), True)
    del fake.manifests[("team/app", "1")]
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == digest
