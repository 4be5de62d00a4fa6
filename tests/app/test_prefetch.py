"""Prefetch: a GET that brings an image manifest from the upstream fetches its blobs too."""

from __future__ import annotations

import asyncio
import os

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of

LAYERS = [os.urandom(200 * 1024 + i) for i in range(6)]


def _app(fake: FakeUpstream, tmp_path, **upstream):  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=0, **upstream)],
    )
    return create_app(settings)


async def _settled(client) -> None:  # type: ignore[no-untyped-def]
    pullthrough = client.server.app[PULLTHROUGH]
    await pullthrough.prefetcher.settle()
    await pullthrough.fills.settle()


def _blob_gets(fake: FakeUpstream) -> dict[str, int]:
    return {digest_of(layer): fake.count("GET", f"/blobs/{digest_of(layer)}") for layer in LAYERS}


def _stored(tmp_path) -> set[str]:  # type: ignore[no-untyped-def]
    return {f"sha256:{p.name}" for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()}


async def test_a_manifest_get_from_upstream_fetches_config_and_layers(fake, aiohttp_client, tmp_path):
    fake.add_image("team/app", "1", LAYERS, config=b'{"architecture":"amd64","os":"linux"}')
    client = await aiohttp_client(_app(fake, tmp_path))
    r = await client.get("/v2/team/app/manifests/1")
    assert r.status == 200
    await _settled(client)
    config = digest_of(b'{"architecture":"amd64","os":"linux"}')
    assert {digest_of(layer) for layer in LAYERS} | {config} <= _stored(tmp_path)
    assert set(_blob_gets(fake).values()) == {1}
    # The client's own GETs are hits: the upstream sees nothing more.
    for layer in LAYERS:
        r = await client.get(f"/v2/team/app/blobs/{digest_of(layer)}")
        assert await r.read() == layer
    assert set(_blob_gets(fake).values()) == {1}
    metrics = await (await client.get("/metrics")).text()
    assert 'regcache_prefetched_blobs_total{upstream="fake.test"} 7.0' in metrics


@pytest.mark.parametrize("how", ["head", "off", "cached"])
async def test_no_prefetch_without_a_manifest_get_from_upstream(fake, aiohttp_client, tmp_path, how):
    fake.add_image("team/app", "1", LAYERS)
    client = await aiohttp_client(_app(fake, tmp_path, prefetch=0 if how == "off" else 4))
    if how == "cached":  # fetched once with prefetch, blobs then dropped from the store
        r = await client.get("/v2/team/app/manifests/1")
        await _settled(client)
        for path in (tmp_path / "data" / "blobs").rglob("*"):
            if path.is_file() and f"sha256:{path.name}" in _blob_gets(fake):
                path.unlink()
        before = _blob_gets(fake)
    else:
        before = dict.fromkeys(_blob_gets(fake), 0)
    r = await (client.head if how == "head" else client.get)("/v2/team/app/manifests/1")
    assert r.status == 200
    await _settled(client)
    assert _blob_gets(fake) == before


async def test_a_client_joins_the_prefetch_of_its_blob(fake, aiohttp_client, tmp_path):
    fake.add_image("team/app", "1", LAYERS)
    slow = digest_of(LAYERS[0])
    fake.faults[slow] = Fault("slow", delay=0.5, times=1)
    client = await aiohttp_client(_app(fake, tmp_path))
    r = await client.get("/v2/team/app/manifests/1")
    assert r.status == 200
    await asyncio.sleep(0.1)  # the prefetch holds the first layer's fill now
    r = await client.get(f"/v2/team/app/blobs/{slow}")
    assert await r.read() == LAYERS[0]
    await _settled(client)
    assert fake.count("GET", f"/blobs/{slow}") == 1


async def test_a_failed_prefetch_leaves_the_client_s_get_to_fetch(fake, aiohttp_client, tmp_path):
    fake.add_image("team/app", "1", LAYERS)
    broken = digest_of(LAYERS[2])
    fake.faults[broken] = Fault("corrupt", times=1)
    client = await aiohttp_client(_app(fake, tmp_path))
    r = await client.get("/v2/team/app/manifests/1")
    assert r.status == 200
    await _settled(client)
    assert broken not in _stored(tmp_path)
    assert {digest_of(layer) for layer in LAYERS} - {broken} <= _stored(tmp_path)
    r = await client.get(f"/v2/team/app/blobs/{broken}")
    assert await r.read() == LAYERS[2]
    assert fake.count("GET", f"/blobs/{broken}") == 2


async def test_shutdown_cancels_prefetches_in_flight(fake, aiohttp_client, tmp_path):
    fake.add_image("team/app", "1", LAYERS)
    for layer in LAYERS:
        fake.faults[digest_of(layer)] = Fault("slow", delay=30, times=1)
    client = await aiohttp_client(_app(fake, tmp_path))
    r = await client.get("/v2/team/app/manifests/1")
    assert r.status == 200
    await asyncio.sleep(0.1)
    pullthrough = client.server.app[PULLTHROUGH]
    assert len(pullthrough.fills) == 4  # the per-image limit
    await asyncio.wait_for(pullthrough.close(), timeout=10)
    assert len(pullthrough.fills) == 0
    assert not (_stored(tmp_path) & set(_blob_gets(fake)))
