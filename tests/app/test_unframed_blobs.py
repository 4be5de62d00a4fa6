"""Blobs the upstream sends without a length, to a client that learned no size from a manifest.

The upstream answers chunked or ends the body by closing the connection; regcache
then has no Content-Length to give its own clients and must frame the body
itself. Every client of that fill (the one that started it and those that join
while it runs) must get a well-formed HTTP body with the blob's bytes: curl as
a real client, aiohttp as another.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import Fault, digest_of

# Past a few sendfile slices, so raw bytes would follow the first framed chunk.
LAYER = os.urandom(3 * 1024 * 1024 + 17)
REPOSITORY = "team/app"


async def curl(url: str, out: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--fail", "--max-time", "60", "--output", str(out), url,
        stderr=asyncio.subprocess.PIPE,
    )


async def finished(process: asyncio.subprocess.Process) -> tuple[int, str]:
    _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def until(condition) -> None:  # type: ignore[no-untyped-def]
    """Polls a condition of the server's state; the test's own timeout bounds it."""
    while not condition():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_blob_without_length_reaches_first_client_and_followers_intact(fake, proxy, tmp_path, framing):
    fake.framing = framing
    layer = digest_of(LAYER)
    # Only the blob: no manifest tells regcache its size.
    fake.blobs[(REPOSITORY, layer)] = LAYER
    gate = asyncio.Event()
    fake.faults[layer] = Fault("hold", gate=gate, times=1)
    pullthrough = proxy.server.app[PULLTHROUGH]
    joined: list[str] = []
    count_blob = pullthrough.events.blob

    def record(upstream: str, result: str, size: int | None) -> None:
        joined.append(result)
        count_blob(upstream, result, size)

    pullthrough.events.blob = record
    url = str(proxy.make_url(f"/v2/{REPOSITORY}/blobs/{layer}"))

    first = await curl(url, tmp_path / "first")
    await until(lambda: joined == ["miss"])
    follower = await curl(url, tmp_path / "follower")
    await until(lambda: joined == ["miss", "coalesced"])
    response = await proxy.get(f"/v2/{REPOSITORY}/blobs/{layer}")
    assert joined == ["miss", "coalesced", "coalesced"], "every client joined the one fill in flight"
    assert "Content-Length" not in response.headers
    gate.set()

    assert await finished(first) == (0, "")
    assert (tmp_path / "first").read_bytes() == LAYER
    assert await finished(follower) == (0, "")
    assert (tmp_path / "follower").read_bytes() == LAYER
    assert await response.read() == LAYER
    assert fake.count("GET", f"/blobs/{layer}") == 1
    # Once stored, the blob has a length again.
    await pullthrough.fills.settle()
    stored = await proxy.get(f"/v2/{REPOSITORY}/blobs/{layer}")
    assert stored.headers["Content-Length"] == str(len(LAYER))
    assert await stored.read() == LAYER
