"""Clients that stop reading must not hold a connection (and a file) forever.

A blob response is sent in slices; each slice must leave within
``limits.client_timeout`` or the connection is cut. Slowloris-style clients
that never finish their request head are aiohttp's ``keepalive_timeout``
business (see ``proxy.server.runner_kwargs``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import IO, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.http import filesend

log = logging.getLogger("regcache.slowclient")

# Small enough that a client reading a few KiB/s still makes each deadline.
SENDFILE_SLICE = 1024 * 1024


class StalledClient(ConnectionResetError):
    """The client took nothing for too long; the connection was cut."""


def cut(request: web.BaseRequest, timeout: float) -> StalledClient:
    log.info("client %s took no bytes for %ss; closing the connection", request.remote, timeout)
    if request.transport is not None:
        request.transport.abort()
    return StalledClient(f"client took no bytes for {timeout}s")


async def write(request: web.BaseRequest, response: web.StreamResponse, chunk: bytes, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await response.write(chunk)
    except TimeoutError:
        raise cut(request, timeout) from None


class GuardedFileResponse(web.FileResponse):
    """``FileResponse`` (sendfile, Range, conditionals) with a deadline per slice."""

    def __init__(self, *args: Any, stall_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stall_timeout = stall_timeout

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int) -> AbstractStreamWriter:
        # Overrides aiohttp's own loop: headers, then the body from a pool
        # thread (proxy.filesend); under TLS one loop.sendfile call (which falls
        # back to read/write) per slice.
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        if filesend.possible(request.transport):
            sender = filesend.FileSender(request.transport)  # type: ignore[arg-type]
            try:
                await sender.send(fobj.fileno(), offset, count, self._stall_timeout)
            except filesend.Stalled:
                raise cut(request, self._stall_timeout) from None
            finally:
                sender.close()
            await web.StreamResponse.write_eof(self)
            return writer
        loop = asyncio.get_running_loop()
        while count > 0:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("connection lost")
            size = min(count, SENDFILE_SLICE)
            try:
                async with asyncio.timeout(self._stall_timeout):
                    try:
                        await loop.sendfile(transport, fobj, offset, size)
                    except NotImplementedError:  # uvloop has no loop.sendfile
                        await self._sendfile_fallback(writer, fobj, offset, size)
            except TimeoutError:
                raise cut(request, self._stall_timeout) from None
            offset += size
            count -= size
        await web.StreamResponse.write_eof(self)
        return writer
