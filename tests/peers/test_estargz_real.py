"""An eStargz layer read through regcache as a lazy puller (stargz-snapshotter) reads it.

The layer is built here (``tests.support.estargz``: a gzip member per file chunk, the
TOC entry, the 51-byte footer) and pushed to the real distribution registry. The
puller's reads: a suffix range for the footer, the TOC range the footer names, then
the range of one chunk of one file the TOC names, each decompressed on its own and
checked against the file and the TOC's chunk digest. Asked first of a blob regcache
has never seen (its one whole-blob fill held back by a relay, so every byte comes from
the upstream's own 206s) and then of the cached blob, on both backends.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from typing import Any

import pytest
from aiohttp import web

from config.settings import S3Settings, Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import PULLTHROUGH
from storage.oci.digest import Digest
from tests.support import byteranges, estargz
from tests.support.gatedrelay import GatedRelay
from tests.support.registry import Registry

REPOSITORY = "lazy/estargz"
FILES = {
    "etc/os-release": b"NAME=lazy\n",
    "usr/lib/libbig.so": os.urandom(700_000),
    "usr/bin/tool": os.urandom(90_000),
}
LAYER = estargz.build(FILES, chunk_size=256 * 1024)
PATH = f"/v2/{REPOSITORY}/blobs/{LAYER.digest}"
WANTED = ("usr/lib/libbig.so", 256 * 1024)  # the second chunk of the big file


def _push(registry: Registry, blob: bytes, digest: str) -> None:
    start = urllib.request.Request(f"{registry.url}/v2/{REPOSITORY}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start) as r:
        location = r.headers["Location"]
    target = location if location.startswith("http") else registry.url + location
    target += ("&" if "?" in target else "?") + f"digest={digest}"
    put = urllib.request.Request(target, data=blob, method="PUT", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(put) as r:
        assert r.status == 201


@pytest.fixture(params=["filesystem", "s3"])
def storage(request: pytest.FixtureRequest) -> StorageSettings:
    if request.param == "filesystem":
        return StorageSettings()
    rgw = request.getfixturevalue("rgw")
    return StorageSettings(backend="s3", s3=S3Settings(**rgw.s3_settings(rgw.make_bucket())))


async def _range(client: Any, spec: str) -> tuple[int, bytes]:
    """A single-range GET as a lazy puller sends it: the blob's size (from Content-Range) and the bytes."""
    async with client.get(PATH, headers={"Range": f"bytes={spec}"}) as r:
        body = await r.read()
        (part,) = byteranges.parts(r.status, r.headers, body)
    byteranges.check_against(LAYER.blob, [part])
    return part.size, part.data


async def _lazy_read(client: Any) -> bytes:
    """Footer, TOC, one chunk: what the puller gets for the chunk, checked against the TOC."""
    size, footer = await _range(client, f"-{estargz.FOOTER_SIZE}")
    toc_at = estargz.toc_offset(footer)
    _, member = await _range(client, f"{toc_at}-{size - estargz.FOOTER_SIZE - 1}")
    toc = estargz.read_toc(member)
    start, stop, length = estargz.chunk_spans(toc, toc_at)[WANTED]
    _, compressed = await _range(client, f"{start}-{stop - 1}")
    chunk = estargz.chunk_content(compressed, length)
    entry = next(e for e in toc["entries"] if e["name"] == WANTED[0] and e.get("chunkOffset", 0) == WANTED[1])  # type: ignore[attr-defined]
    assert entry["chunkDigest"] == "sha256:" + hashlib.sha256(chunk).hexdigest()
    return chunk


async def test_estargz_footer_toc_and_chunk_reads_on_a_cold_then_cached_blob(
        upstream: Registry, storage: StorageSettings, aiohttp_server, aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _push(upstream, LAYER.blob, LAYER.digest)
    relay = GatedRelay(upstream.url, hold_at=0)
    relay.hold_answer = True  # the fill's whole-blob GET waits: the cold reads are the upstream's 206s
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay.handle)
    relay_server = await aiohttp_server(app)
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name="upstream.test", url=str(relay_server.make_url("")).rstrip("/"),
                                    default=True, prefetch=0)],
        storage=storage,
    )
    client = await aiohttp_client(create_app(settings))
    pullthrough = client.app[PULLTHROUGH]
    want = FILES[WANTED[0]][WANTED[1] : WANTED[1] + 256 * 1024]
    try:
        assert await _lazy_read(client) == want
        assert len(relay.range_gets) == 3 and relay.range_gets[0] == f"bytes=-{estargz.FOOTER_SIZE}"
        assert relay.whole_gets == 1 and relay.heads == 0, "one whole-blob fill, no HEAD"
        relay.gate.set()
        await pullthrough.fills.settle()
        stored = b"".join([chunk async for chunk in pullthrough.store.read(Digest.parse(LAYER.digest))])
        assert stored == LAYER.blob, "the store has the verified whole blob"

        relay.range_gets.clear()
        assert await _lazy_read(client) == want
        assert relay.range_gets == [] and relay.whole_gets == 1, "cached: nothing more from the upstream"
    finally:
        await relay.close()
