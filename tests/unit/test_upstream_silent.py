"""A blob request to an upstream that accepts and never answers holds a thread only while
someone waits for it: cancelling the request or closing the client frees it at once."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from config.settings import UpstreamSettings
from proxy.errors import UpstreamError
from proxy.upstream.client import UpstreamClient

DIGEST = "sha256:" + "ab" * 32


@contextlib.asynccontextmanager
async def silent_upstream():
    """Accepts connections, reads the request, never answers; yields (url, connections seen,
    connections the client cut)."""
    seen: list[asyncio.StreamWriter] = []
    cut: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        cut.append(writer)  # end of stream: the client shut its side

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen, cut
    finally:
        for writer in seen:
            writer.close()
        server.close()


async def until(condition, what: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def settings(url: str) -> UpstreamSettings:
    # A read timeout far longer than the test: only cutting the connection can end the wait.
    return UpstreamSettings(name="silent.test", url=url, read_timeout=3600, retries=0)


async def test_a_cancelled_blob_request_cuts_its_connection():
    async with silent_upstream() as (url, seen, cut), UpstreamClient(settings(url)) as client:
        opening = asyncio.create_task(client.open_blob("team/app", DIGEST).__aenter__())
        await until(lambda: len(seen) == 1, "the request reached the upstream")
        assert not cut
        opening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await opening
        # The connection is cut at once: the thread that waited on it is free.
        await until(lambda: len(cut) == 1, "connection cut")


async def test_closing_the_client_cuts_a_request_in_flight():
    async with silent_upstream() as (url, seen, cut):
        client = UpstreamClient(settings(url))
        await client.start()
        opening = asyncio.create_task(client.open_blob("team/app", DIGEST).__aenter__())
        await until(lambda: len(seen) == 1, "the request reached the upstream")
        await client.close()
        # The request fails at once (its connection was cut), not after the read timeout.
        with pytest.raises(UpstreamError):
            async with asyncio.timeout(20):
                await opening
        await until(lambda: len(cut) == 1, "connection cut")
