"""A blob file is sent whole, as one range or as several (multipart/byteranges), from a
pool thread on plain TCP and through aiohttp under TLS.

The response is served by a bare aiohttp app, so each case is deterministic;
conditional requests and Range parsing are the /v2 route's (tests/app/test_blob_ranges.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.http import filesend, ranges
from proxy.http.blobfile import BlobFileResponse
from tests.support import byteranges

BLOB = os.urandom(3 * 1024 * 1024 + 7)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture(params=["thread", "through-aiohttp"])
async def client(request: pytest.FixtureRequest, aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Plain TCP sends from a pool thread; under TLS the body goes through aiohttp's writer."""
    if request.param == "through-aiohttp":
        monkeypatch.setattr(filesend, "possible", lambda transport: False)
    path = tmp_path / "blob"
    path.write_bytes(BLOB)

    async def handler(request: web.Request) -> web.StreamResponse:
        wanted = ranges.parse(request.headers.get("Range"))
        selected = None if wanted is None else ranges.resolve(wanted, len(BLOB))
        return BlobFileResponse(path, ranges=selected, headers={"Content-Type": "application/octet-stream"},
                                stall_timeout=5.0)

    app = web.Application()
    app.router.add_get("/blob", handler)
    return await aiohttp_client(app)


async def test_whole_blob_with_its_length(client) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob")
    assert r.status == 200
    assert await r.read() == BLOB
    assert r.headers["Content-Length"] == str(len(BLOB))
    assert r.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("value", "start", "end"),
    [("bytes=10-19", 10, 20), ("bytes=0-", 0, len(BLOB)), ("bytes=-5", len(BLOB) - 5, len(BLOB)),
     ("bytes=-99999999", 0, len(BLOB)), (f"bytes=5-{len(BLOB) * 2}", 5, len(BLOB))],
)
async def test_one_range_is_a_206_with_its_content_range(client, value: str, start: int, end: int) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob", headers={"Range": value})
    assert r.status == 206
    assert await r.read() == BLOB[start:end]
    assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(BLOB)}"
    assert r.headers["Content-Length"] == str(end - start)


async def test_several_ranges_are_a_multipart_body_with_each_part_in_order(client) -> None:  # type: ignore[no-untyped-def]
    wanted = [(2 * 1024 * 1024, 3 * 1024 * 1024 + 6), (0, 9), (1000, 1999)]
    r = await client.get("/blob", headers={"Range": "bytes=" + ",".join(f"{a}-{b}" for a, b in wanted)})
    assert r.status == 206
    body = await r.read()
    assert r.headers["Content-Length"] == str(len(body))
    assert "Content-Range" not in r.headers
    found = byteranges.parts(r.status, r.headers, body)
    assert [(p.start, p.data) for p in found] == [(a, BLOB[a : b + 1]) for a, b in wanted]


async def test_a_missing_file_is_a_404(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "blob").unlink()
    r = await client.get("/blob")
    assert r.status == 404
