"""PullThrough without HTTP routes: hit, miss and coalesced answers over an in-process upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from config.settings import UpstreamSettings
from proxy.metrics.events import Events
from proxy.pull.answers import FillingBlob, LocalBlob
from proxy.pull.routing import Route
from proxy.pull.service import PullThrough, RecordedManifest
from proxy.upstream.client import UpstreamClient
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import BlobStore
from storage.errors import BlobUnknown
from storage.index.metadata import Metadata
from storage.oci.digest import Digest
from storage.oci.manifests import parse_manifest
from storage.oci.reference import ManifestReference
from tests.support.fake_upstream import OCI_MANIFEST, FakeUpstream, digest_of, make_image

LAYER = bytes(range(256)) * 4096  # 1 MiB


class GatedUpstream(FakeUpstream):
    """Holds every blob body until the test opens the gate, so a fill stays in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def _send_blob(self, request: web.Request, digest: str, data: bytes) -> web.StreamResponse:
        await self.gate.wait()
        return await super()._send_blob(request, digest, data)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> GatedUpstream:
    fake = GatedUpstream()
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def pull(upstream: GatedUpstream, tmp_path: Path) -> AsyncIterator[PullThrough]:
    client = UpstreamClient(UpstreamSettings(name="fake.test", url=upstream.base_url, default=True, retries=0))
    await client.start()
    store = BlobStore(FilesystemBackend(tmp_path))
    await store.start()
    metadata = Metadata(tmp_path / "metadata.db")
    await metadata.open()
    service = PullThrough(store, metadata, {"fake.test": client}, Events())
    yield service
    await service.close()
    await client.close()
    await metadata.close()
    await store.close()


def route_to(repository: str) -> Route:
    # The service reaches the upstream through its client, found by this name.
    return Route(UpstreamSettings(name="fake.test", url="http://unused", default=True), repository)


async def body(answer: FillingBlob) -> bytes:
    await answer.opened()
    return b"".join([chunk async for chunk in answer.chunks()])


async def test_a_cold_blob_is_a_miss_then_a_hit_from_disk(pull, upstream):
    upstream.add_image("team/app", "1", [LAYER])
    route, digest = route_to("team/app"), Digest.parse(digest_of(LAYER))
    miss = await pull.blob(route, digest)
    assert isinstance(miss, FillingBlob) and miss.result == "miss"
    assert await body(miss) == LAYER
    assert await miss.stored() == len(LAYER)
    hit = await pull.blob(route, digest)
    assert isinstance(hit, LocalBlob) and hit.result == "hit"
    assert hit.path.read_bytes() == LAYER
    assert await hit.stored() == len(LAYER)  # lets go of the file
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_concurrent_misses_of_one_blob_share_one_upstream_fetch(pull, upstream):
    upstream.add_image("team/app", "1", [LAYER])
    route, digest = route_to("team/app"), Digest.parse(digest_of(LAYER))
    upstream.gate.clear()
    first = await pull.blob(route, digest)
    second = await pull.blob(route, digest)
    assert isinstance(first, FillingBlob) and first.result == "miss"
    assert isinstance(second, FillingBlob) and second.result == "coalesced"
    upstream.gate.set()
    assert list(await asyncio.gather(body(first), body(second))) == [LAYER, LAYER]
    assert await second.stored() == len(LAYER)
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_a_stored_blob_is_served_to_another_repository_only_once_the_upstream_confirms_it(pull, upstream):
    upstream.add_image("team/app", "1", [LAYER])
    upstream.add_image("team/other", "1", [LAYER])
    digest = Digest.parse(digest_of(LAYER))
    await (await pull.blob(route_to("team/app"), digest)).stored()
    confirmed = await pull.blob(route_to("team/other"), digest)
    assert isinstance(confirmed, LocalBlob)
    await confirmed.stored()
    assert upstream.count("HEAD", f"/team/other/blobs/{digest}") == 1
    with pytest.raises(BlobUnknown):
        await pull.blob(route_to("team/private"), digest)
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_a_blob_of_an_image_just_fetched_is_filled_without_asking_the_index_its_size(pull, upstream):
    upstream.add_image("team/app", "1", [LAYER])
    route, digest = route_to("team/app"), Digest.parse(digest_of(LAYER))
    await pull.manifest(route, ManifestReference(tag="1"), [OCI_MANIFEST])
    asked: list[str] = []

    async def descriptor_size(repository: object, digest: str) -> int | None:
        asked.append(digest)
        return None

    pull.metadata.descriptor_size = descriptor_size  # type: ignore[method-assign]
    miss = await pull.blob(route, digest)
    assert isinstance(miss, FillingBlob)
    assert await body(miss) == LAYER
    assert await miss.stored() == len(LAYER)
    assert asked == [], "the manifest's descriptor said the size"
    assert pull.links.size(await pull.metadata.repository_id("fake.test", "team/app"), str(digest)) == len(LAYER)


async def test_a_manifest_is_a_miss_then_a_hit(pull, upstream):
    digest = upstream.add_image("team/app", "1", [LAYER])
    route = route_to("team/app")
    first = await pull.manifest(route, ManifestReference(tag="1"), [OCI_MANIFEST])
    second = await pull.manifest(route, ManifestReference(tag="1"), [OCI_MANIFEST])
    assert (first.result, second.result) == ("miss", "hit")
    assert first.digest == second.digest == digest
    assert upstream.count("GET", "/manifests/") == 1


async def test_a_store_change_outside_a_fill_is_recorded_and_served_without_the_upstream(pull, upstream):
    manifest, blobs = make_image([LAYER])
    for digest, data in [*blobs.items(), (digest_of(manifest), manifest)]:
        await pull.store.put(Digest.parse(digest), data)
    route = route_to("team/loaded")
    loaded = RecordedManifest(route, digest_of(manifest), len(manifest), parse_manifest(manifest, OCI_MANIFEST), "v1")
    await pull.store_changed({d: len(b) for d, b in blobs.items()}, [loaded])
    found = await pull.manifest(route, ManifestReference(tag="v1"), [OCI_MANIFEST])
    assert (found.digest, found.result) == (digest_of(manifest), "hit")
    layer = await pull.blob(route, Digest.parse(digest_of(LAYER)))
    assert isinstance(layer, LocalBlob)
    await layer.stored()
    assert upstream.requests == []
