"""Limits: oversized manifests and headers, and clients or upstreams that stall."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from config.settings import LimitSettings, Settings, UpstreamSettings
from tests.support.fake_upstream import OCI_MANIFEST, FakeUpstream, Fault, digest_of
from tests.support.serving import sample, start_proxy

BIG = os.urandom(12 * 1024 * 1024)


def settings_for(fake: FakeUpstream, data_dir: Path, **limits: float) -> Settings:
    return Settings(
        data_dir=data_dir,
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=0, read_timeout=0.5)],
        limits=LimitSettings(**limits),
    )


def stored(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())


async def test_upstream_manifest_over_4_mib_is_refused_and_not_stored(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d"))
    padding = "x" * (4 * 1024 * 1024)
    huge = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": [],
                       "annotations": {"pad": padding}}).encode()
    fake.manifests[("team/app", "big")] = (OCI_MANIFEST, huge)
    r = await proxy.get("/v2/team/app/manifests/big")
    assert r.status == 413
    assert (await r.json())["errors"][0]["code"] == "SIZE_INVALID"
    assert digest_of(huge).split(":")[1] not in stored(tmp_path / "d")


async def test_oversized_request_header_is_a_400_and_the_server_keeps_serving(
    fake, aiohttp_server, aiohttp_client, tmp_path
):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d", max_header_size=4096))
    r = await proxy.get("/v2/", headers={"X-Padding": "a" * 8192})
    assert r.status in (400, 431)
    r = await proxy.get("/v2/" + "a" * 8192)
    assert r.status in (400, 414)
    assert (await proxy.get("/v2/")).status == 200


async def _raw_connection(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _read_until_closed(sock: socket.socket, limit: float = 15.0) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed (False: still open at ``limit``)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    try:
        async with asyncio.timeout(limit):
            while True:
                try:
                    chunk = await loop.sock_recv(sock, 1024 * 1024)
                except ConnectionResetError:
                    return bytes(data), True
                if not chunk:
                    return bytes(data), True
                data += chunk
    except TimeoutError:
        return bytes(data), False


async def test_a_client_that_never_finishes_its_request_is_disconnected(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d", keepalive_timeout=0.3))
    sock = await _raw_connection(proxy.server.port)
    await asyncio.get_running_loop().sock_sendall(sock, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    data, closed = await _read_until_closed(sock)
    sock.close()
    assert closed and data == b""


@pytest.mark.parametrize("cached", [True, False], ids=["hit-sendfile", "miss-stream"])
async def test_a_client_that_stops_reading_a_blob_is_cut(fake, aiohttp_server, aiohttp_client, tmp_path, cached):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d", client_timeout=0.3))
    fake.add_image("team/app", "1", [BIG])
    layer = digest_of(BIG)
    if cached:
        assert await (await proxy.get(f"/v2/team/app/blobs/{layer}")).read() == BIG
    sock = await _raw_connection(proxy.server.port, rcvbuf=4096)
    request = f"GET /v2/team/app/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await asyncio.get_running_loop().sock_sendall(sock, request)
    # Read nothing for a while: the server must give up on us rather than wait forever.
    await asyncio.sleep(1.5)
    data, closed = await _read_until_closed(sock)
    sock.close()
    assert closed
    assert len(data) < len(BIG)
    # The fill finished regardless, and the cache still serves complete blobs.
    for _ in range(100):
        if layer.split(":")[1] in stored(tmp_path / "d"):
            break
        await asyncio.sleep(0.05)
    assert await (await proxy.get(f"/v2/team/app/blobs/{layer}")).read() == BIG


async def test_a_stalled_upstream_fails_the_request_instead_of_hanging(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d"))
    fake.add_image("team/app", "1", [b"layer"])
    fake.faults["manifest"] = Fault("slow", delay=30)
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 503
    assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"
    text = await (await proxy.get("/metrics")).text()
    assert sample(text, "regcache_upstream_errors_total", kind="timeout") == 1
