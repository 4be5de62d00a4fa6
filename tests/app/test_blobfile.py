"""A blob file answers conditional and range requests as HTTP says, with the digest as its entity tag.

The response is served by a bare aiohttp app, so each case is deterministic; the
whole hit path is covered by the pull-through tests.
"""

from __future__ import annotations

import hashlib
import os
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.http import filesend
from proxy.http.blobfile import BlobFileResponse

BLOB = os.urandom(3 * 1024 * 1024 + 7)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
ETAG = f'"{DIGEST}"'
LATER = formatdate(time.time() + 3600, usegmt=True)  # after the file was written


@pytest.fixture(params=["thread", "through-aiohttp"])
async def client(request: pytest.FixtureRequest, aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Plain TCP sends from a pool thread; under TLS the body goes through aiohttp's writer."""
    if request.param == "through-aiohttp":
        monkeypatch.setattr(filesend, "possible", lambda transport: False)
    path = tmp_path / "blob"
    path.write_bytes(BLOB)

    async def handler(request: web.Request) -> web.StreamResponse:
        return BlobFileResponse(path, etag=DIGEST, headers={"Content-Type": "application/octet-stream"},
                                stall_timeout=5.0)

    app = web.Application()
    app.router.add_get("/blob", handler)
    return await aiohttp_client(app)


async def test_whole_blob_with_digest_etag_and_length(client) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob")
    assert r.status == 200
    assert await r.read() == BLOB
    assert r.headers["ETag"] == ETAG
    assert r.headers["Content-Length"] == str(len(BLOB))
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert "Last-Modified" in r.headers


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


@pytest.mark.parametrize("value", [f"bytes={len(BLOB)}-", "bytes=20-10", "items=0-5", "bytes=0-1,4-5", "bytes=-"])
async def test_unsatisfiable_range_is_a_416_naming_the_size(client, value: str) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob", headers={"Range": value})
    assert r.status == 416
    assert r.headers["Content-Range"] == f"bytes */{len(BLOB)}"
    assert await r.read() == b""


@pytest.mark.parametrize("if_none_match", [ETAG, f"W/{ETAG}", f'"other", {ETAG}', "*"])
async def test_if_none_match_with_the_digest_is_a_304(client, if_none_match: str) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob", headers={"If-None-Match": if_none_match})
    assert r.status == 304
    assert r.headers["ETag"] == ETAG
    assert await r.read() == b""


async def test_if_modified_since_after_the_file_is_a_304_and_before_the_file_is_a_200(client) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob", headers={"If-Modified-Since": LATER})
    assert r.status == 304
    r = await client.get("/blob", headers={"If-Modified-Since": formatdate(0, usegmt=True)})
    assert r.status == 200
    assert await r.read() == BLOB


async def test_if_none_match_of_another_tag_sends_the_blob(client) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob", headers={"If-None-Match": '"sha256:other"'})
    assert r.status == 200
    assert await r.read() == BLOB


@pytest.mark.parametrize(
    "headers",
    [{"If-Match": '"sha256:other"'}, {"If-Match": f"W/{ETAG}"}, {"If-Unmodified-Since": formatdate(0, usegmt=True)}],
)
async def test_failed_precondition_is_a_412(client, headers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob", headers=headers)
    assert r.status == 412
    assert await r.read() == b""


@pytest.mark.parametrize(
    ("if_range", "status"),
    [(ETAG, 206), (LATER, 206), (f"W/{ETAG}", 200), ('"sha256:other"', 200),
     (formatdate(0, usegmt=True), 200), ("not a validator", 200)],
)
async def test_if_range_applies_the_range_only_for_this_blob(client, if_range: str, status: int) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/blob", headers={"Range": "bytes=10-19", "If-Range": if_range})
    assert r.status == status
    assert await r.read() == (BLOB[10:20] if status == 206 else BLOB)


async def test_a_missing_file_is_a_404(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "blob").unlink()
    r = await client.get("/blob")
    assert r.status == 404
