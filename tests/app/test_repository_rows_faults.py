"""Repository rows around fills, removals and a failing upstream: the faults a real registry cannot produce."""

from __future__ import annotations

import asyncio

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import LIFECYCLE, METADATA, PULLTHROUGH
from storage.oci.digest import Digest
from tests.support.fake_upstream import Fault, digest_of

UPSTREAM = "fake.test"
LAYER = b"layer bytes" * 1000


@pytest.fixture
async def proxy(fake, aiohttp_client, tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name=UPSTREAM, url=fake.base_url, default=True, retries=0)],
    )
    return await aiohttp_client(create_app(settings))


async def test_tags_of_a_repository_holding_none_are_the_upstreams_error_when_it_fails(fake, proxy):
    fake.add_image("team/other", "1", [b"other"])
    fake.add_image("team/app", "1", [LAYER])
    for name in ("team/other", "team/app"):
        assert (await proxy.get(f"/v2/{name}/manifests/1")).status == 200
    lifecycle = proxy.server.app[LIFECYCLE]
    key = await lifecycle.resolve(UPSTREAM, "team/app", "1")
    assert key is not None and await lifecycle.remove_image(key) is not None
    fake.faults["tags"] = Fault("status", status=503)

    r = await proxy.get("/v2/team/app/tags/list")
    assert r.status == 503, await r.text()
    r = await proxy.get("/v2/team/other/tags/list")
    assert r.status == 200
    assert (await r.json())["tags"] == ["1"]


async def test_a_fill_in_a_repository_without_a_row_survives_a_gc_pass_and_records_it(fake, proxy):
    fake.add_image("team/older", "1", [b"older"])
    assert (await proxy.get("/v2/team/older/manifests/1")).status == 200
    layer = digest_of(LAYER)
    fake.blobs[("team/app", layer)] = LAYER  # asked for before any manifest
    gate = asyncio.Event()
    fake.faults[layer] = Fault("hold", gate=gate, times=1)
    metadata = proxy.server.app[METADATA]

    fills = proxy.server.app[PULLTHROUGH].fills
    # A blob this small reaches its client once whole: the response comes after the gate.
    request = asyncio.ensure_future(proxy.get(f"/v2/team/app/blobs/{layer}"))
    while fake.count("GET", f"/blobs/{layer}") == 0:  # the fill is in the upstream's body
        await asyncio.sleep(0.01)
    assert fills.get(Digest.parse(layer)) is not None
    assert await metadata.repository_id(UPSTREAM, "team/app") is None, "no row before anything is recorded"
    await proxy.server.app[LIFECYCLE].gc()
    gate.set()
    response = await request
    assert await response.read() == LAYER
    await proxy.server.app[PULLTHROUGH].fills.settle()

    repo_id = await metadata.repository_id(UPSTREAM, "team/app")
    assert repo_id is not None
    assert await metadata.link(repo_id, layer) == (True, len(LAYER))
