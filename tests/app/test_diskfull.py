"""A full disk during a fill: a clear error, nothing half-written, hits go on, eviction makes room.

The store lives on a tmpfs of a few MiB where the machine lets us mount one
(root); otherwise the OS error is injected where the space is reserved.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import LIFECYCLE, METADATA
from storage.backends import filesystem
from tests.support.lifecycle import LifecycleImages, on_disk, pull_verified, push_images

KIB = 1024


@pytest.fixture(scope="module")
def lc(upstream, tmp_path_factory) -> LifecycleImages:
    return push_images(upstream, tmp_path_factory.mktemp("diskfull-images"))


@pytest.fixture
def small_fs(tmp_path):
    """(directory, True) on a 4 MiB tmpfs, or (directory, False) when mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    yield mount, done.returncode == 0
    if done.returncode == 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def start(upstream, data: Path) -> TestServer:
    # No prefetch: the fill that meets the full disk must be the client's own, and no
    # other fill may hold a temp file when the test looks.
    upstream_settings = UpstreamSettings(name="upstream.test", url=upstream.url, default=True, prefetch=0)
    settings = Settings(data_dir=data, upstreams=[upstream_settings])
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return server


async def test_disk_full_fill_fails_cleanly_hits_continue_and_eviction_makes_room(lc, upstream, small_fs, monkeypatch):
    data, real = small_fs
    server = await start(upstream, data / "data")
    base = f"http://127.0.0.1:{server.port}"
    lifecycle = server.app[LIFECYCLE]
    layer = lc.own_layer("lc/c")
    layer_size = lc.images["lc/c"].layers[-1].size
    try:
        async with aiohttp.ClientSession() as session:
            await pull_verified(session, base, "lc/a", lc.images["lc/a"])
            await pull_verified(session, base, "lc/b", lc.images["lc/b"])
            await server.app[METADATA].flush()
            if real:
                # Fill the filesystem so that lc/c's own layer no longer fits, with room left for SQLite.
                free = os.statvfs(data).f_bavail * os.statvfs(data).f_frsize
                (data / "ballast").write_bytes(b"\0" * max(0, free - layer_size + 64 * KIB))
            else:
                real_fallocate = os.posix_fallocate

                def no_space(fd: int, offset: int, length: int) -> None:
                    if length >= layer_size:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    real_fallocate(fd, offset, length)

                monkeypatch.setattr(filesystem.os, "posix_fallocate", no_space)
            passes = lifecycle.passes

            async with session.get(
                f"{base}/v2/lc/c/manifests/1", headers={"Accept": lc.images["lc/c"].media_type}
            ) as r:
                assert r.status == 200
            async with session.get(f"{base}/v2/lc/c/blobs/{layer}") as r:
                assert r.status == 507, "the client hears the store is full before any byte"
                assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"
            assert list((data / "data" / "tmp").iterdir()) == [], "the temp file is gone"
            assert not on_disk(data / "data", layer)

            await pull_verified(session, base, "lc/b", lc.images["lc/b"])  # hits go on

            await lifecycle.wait_for_pass(passes)
            full = [r for r in lifecycle.history if r.reason == "full"]
            assert full and [i.repository for i in full[0].images] == ["lc/a"], "the least recently pulled"
            if not real:
                monkeypatch.undo()
            await pull_verified(session, base, "lc/c", lc.images["lc/c"])
            await pull_verified(session, base, "lc/b", lc.images["lc/b"])
    finally:
        await server.close()
        (data / "ballast").unlink(missing_ok=True)


async def test_disk_full_in_the_middle_of_a_write_aborts_the_client_and_leaves_nothing(lc, upstream, tmp_path,
                                                                                       monkeypatch):
    """Without a size known up front (no reservation) the error can only come mid-stream."""
    server = await start(upstream, tmp_path / "data")
    base = f"http://127.0.0.1:{server.port}"
    lifecycle = server.app[LIFECYCLE]
    layer = lc.own_layer("lc/a")

    async def no_reservation(self, size: int) -> None:
        return None

    def full_disk(self, data: bytes) -> None:
        raise filesystem.StoreFull("no space left on the store's filesystem")

    monkeypatch.setattr(filesystem.FileUpload, "reserve", no_reservation)
    monkeypatch.setattr(filesystem.FileUpload, "write_sync", full_disk)
    passes = lifecycle.passes
    try:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"{base}/v2/lc/a/blobs/{layer}") as r:
                    body = await r.read()
                    assert r.status != 200 or len(body) < lc.images["lc/a"].layers[-1].size
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError):
                pass  # the connection was cut: never a clean end of a short body
            await lifecycle.wait_for_pass(passes)
            assert lifecycle.last_report is not None and lifecycle.last_report.reason == "full", "eviction was woken"
            assert list((tmp_path / "data" / "tmp").iterdir()) == []
            assert not on_disk(tmp_path / "data", layer)
            monkeypatch.undo()
            await pull_verified(session, base, "lc/a", lc.images["lc/a"])
    finally:
        await server.close()


def test_reserving_space_maps_enospc_to_store_full(tmp_path, monkeypatch):
    from storage.errors import StoreFull
    from storage.oci.digest import Digest

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem.os, "posix_fallocate", no_space)
    backend = filesystem.FilesystemBackend(tmp_path)
    asyncio.run(backend.start())
    upload = asyncio.run(backend.begin(Digest.of(b"x")))
    with pytest.raises(StoreFull):
        upload._reserve_sync(10)
