"""A big blob's fill spooled around the page cache, as its clients see it.

The first client and a follower that joins while the fill is held both get
every byte, read from the spool with direct I/O (storage.directio); with
``storage.direct_io: false`` the same fill goes through the page cache. curl is
the client: a client on this host is sent copies, which is where direct reads
are made.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.http import filesend
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import Fault, digest_of

LAYER = os.urandom(6 * 1024 * 1024 + 123)
REPOSITORY = "team/app"


@pytest.fixture(params=[True, False], ids=["direct", "page-cache"])
def direct_io(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def proxy(fake: Any, aiohttp_client: Any, tmp_path: Path, direct_io: bool) -> Any:
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=1)],
        storage=StorageSettings(direct_io=direct_io),
    )
    return await aiohttp_client(create_app(settings))


async def curl(url: str, out: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--fail", "--max-time", "60", "--output", str(out), url,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_the_first_client_and_a_follower_get_every_byte(fake, proxy, tmp_path, monkeypatch, direct_io):
    read_directly: list[int] = []
    copy_direct = filesend._copy_direct_blocking

    def counted(sock: int, fd: int, offset: int, count: int, *rest: Any) -> None:
        read_directly.append(count)
        copy_direct(sock, fd, offset, count, *rest)

    monkeypatch.setattr(filesend, "_copy_direct_blocking", counted)
    layer = digest_of(LAYER)
    fake.blobs[(REPOSITORY, layer)] = LAYER
    gate = asyncio.Event()
    fake.faults[layer] = Fault("hold", gate=gate, times=1)
    pullthrough = proxy.server.app[PULLTHROUGH]
    url = str(proxy.make_url(f"/v2/{REPOSITORY}/blobs/{layer}"))

    first = await curl(url, tmp_path / "first")
    while not len(pullthrough.fills):
        await asyncio.sleep(0.01)
    follower = await curl(url, tmp_path / "follower")
    await asyncio.sleep(0.2)  # the follower's request reaches the fill before its bytes do
    gate.set()

    for process, out in ((first, "first"), (follower, "follower")):
        _, stderr = await process.communicate()
        assert (process.returncode, stderr) == (0, b"")
        assert (tmp_path / out).read_bytes() == LAYER
    await pullthrough.fills.settle()
    assert fake.count("GET", f"/blobs/{layer}") == 1
    if direct_io:
        # All but what goes out on the loop: the first slice (64 KiB) and the held-back last byte.
        assert sum(read_directly) >= len(LAYER) - 64 * 1024 - 1, "the bytes came around the page cache"
    else:
        assert read_directly == []
