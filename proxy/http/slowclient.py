"""Clients that stop reading must not hold a connection (and a file) forever.

A blob response is sent in slices; each slice must leave within
``limits.client_timeout`` or the connection is cut. Slowloris-style clients
that never finish their request head are aiohttp's ``keepalive_timeout``
business (see ``proxy.server.runner_kwargs``).
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from proxy.http import filesend

log = logging.getLogger("regcache.slowclient")

# Bytes per read when the body goes through aiohttp (TLS): small enough that a
# client reading a few KiB/s still makes each deadline.
READ_SLICE = 1024 * 1024


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


async def send_file(
    request: web.BaseRequest, response: web.StreamResponse, fd: int, offset: int, count: int, timeout: float
) -> None:
    """``count`` bytes of the open file ``fd`` from ``offset`` as the body of the prepared ``response``."""
    if filesend.possible(request.transport):
        # Plain TCP: sendfile or pread/write on a pool thread, straight to the socket.
        sender = filesend.FileSender(request.transport)
        try:
            await sender.send(fd, offset, count, timeout)
        except filesend.Stalled:
            raise cut(request, timeout) from None
        finally:
            sender.close()
        return
    # TLS: the bytes must pass through the transport to be encrypted; the file is
    # read on a pool thread, as asyncio's own sendfile fallback does.
    loop = asyncio.get_running_loop()
    while count > 0:
        chunk = await loop.run_in_executor(None, os.pread, fd, min(count, READ_SLICE), offset)
        if not chunk:
            raise OSError("file shorter than its announced size")
        await write(request, response, chunk, timeout)
        offset += len(chunk)
        count -= len(chunk)
