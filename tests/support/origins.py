"""HTTP origins run in the test process on loopback, for the upstream transports' tests.

``Origin`` is a well-behaved aiohttp application that records which TCP connection
each request came on; ``RawServer`` hands each connection to a handler that
misbehaves on purpose (a body cut short, a silent body, a connection closed
behind the pool's back).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from aiohttp import web
from yarl import URL

T = TypeVar("T")
BODY = os.urandom(3 * 1024 * 1024 + 1234)
GUARD = 20.0  # seconds: only ever reached when something hangs


async def guarded(awaitable: Awaitable[T]) -> T:
    """``awaitable``'s outcome; a hang fails the test (not as a ``TimeoutError``, which some tests expect)."""
    try:
        async with asyncio.timeout(GUARD) as guard:
            return await awaitable
    except TimeoutError:
        if guard.expired():
            pytest.fail(f"still waiting after {GUARD} s")
        raise



class Origin:
    """An aiohttp application that records the TCP connection (client address) of each request."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.url = URL()

    @property
    def connections(self) -> int:
        return len(set(self.peers))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/blob/{size}", self.blob)
        app.router.add_get("/pieces", self.pieces)
        app.router.add_get("/chunked", self.chunked)
        return app

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername")[:2])

    async def blob(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=BODY[:int(request.match_info["size"])])

    async def _stream(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        await response.prepare(request)
        for start in range(0, len(BODY), 100_003):  # pieces that fit no buffer size
            await response.write(BODY[start:start + 100_003])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def pieces(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        response = web.StreamResponse()
        response.content_length = len(BODY)
        return await self._stream(request, response)

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        return await self._stream(request, response)


Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server whose connections are handed to ``handle``; counts connections and requests."""

    def __init__(self, handle: Handler) -> None:
        self._handle = handle
        self.connections = 0
        self.requests: list[bytes] = []
        self.peer_closed = asyncio.Event()  # a connection saw the client go away
        self.closed = asyncio.Event()  # the server closed a connection
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = URL(f"http://127.0.0.1:{port}/v2/blob")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._handle(self, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def request(self, reader: asyncio.StreamReader) -> bool:
        """Read one request head; False at the end of the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        self.requests.append(head)
        return True

    async def wait_for_eof(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        self.peer_closed.set()


def head(length: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode()


# Handlers for ``RawServer``, one misbehaviour each, shared by the transports' tests.


async def answer_once(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request answered ("hello", keep-alive as far as the client knows), then the connection closed."""
    if await server.request(reader):
        writer.write(head(5) + b"hello")
        await writer.drain()
    writer.close()
    await writer.wait_closed()
    server.closed.set()


async def hang_up(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The request read, the connection closed without an answer."""
    await server.request(reader)


async def cut_short(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """300 bytes of a body whose Content-Length says 1000, then the connection closed."""
    await server.request(reader)
    writer.write(head(1000) + b"x" * 300)
    await writer.drain()


async def chunk_cut_short(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """300 bytes of a chunk announced as 1024, then the connection closed."""
    await server.request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 300)
    await writer.drain()


async def silent_body(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """100 bytes of a body whose Content-Length says 1000, then nothing until the client leaves."""
    await server.request(reader)
    writer.write(head(1000) + b"x" * 100)
    await writer.drain()
    await server.wait_for_eof(reader)
