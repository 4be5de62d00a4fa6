"""A 206 response: one range as it is, several as ``multipart/byteranges``.

The bytes of each range come from a ``PartSender`` given by the caller (a file
by sendfile, an object store, a fill's spool, the upstream's own 206); the
status, headers and framing are the same whatever the source.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from aiohttp import hdrs, web

from proxy.http import slowclient
from proxy.http.ranges import ByteRange, Multipart

# Sends ``length`` bytes of the blob from ``offset`` as the next bytes of the body.
PartSender = Callable[[int, int], Awaitable[None]]
# Yields ``length`` bytes of the blob from ``offset``.
PartReader = Callable[[int, int], AsyncGenerator[bytes, None]]


def frame(response: web.StreamResponse, ranges: list[ByteRange], size: int) -> Multipart | None:
    """Sets a 206's status and headers before it is prepared; the multipart framing if it has one."""
    response.set_status(206)
    if len(ranges) == 1:
        response.headers[hdrs.CONTENT_RANGE] = ranges[0].content_range(size)
        response.content_length = ranges[0].length
        return None
    multipart = Multipart(ranges, size, response.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream"))
    response.headers[hdrs.CONTENT_TYPE] = multipart.content_type
    response.content_length = multipart.content_length
    return multipart


async def send_parts(
    request: web.BaseRequest,
    response: web.StreamResponse,
    ranges: list[ByteRange],
    multipart: Multipart | None,
    send_part: PartSender,
    stall_timeout: float,
) -> None:
    """The body of a prepared 206, ``write_eof`` excluded."""
    for i, byte_range in enumerate(ranges):
        if multipart is not None:
            await slowclient.write(request, response, multipart.heads[i], stall_timeout)
        await send_part(byte_range.start, byte_range.length)
    if multipart is not None:
        await slowclient.write(request, response, multipart.tail, stall_timeout)


def streamed(
    request: web.BaseRequest, response: web.StreamResponse, read: PartReader, stall_timeout: float
) -> PartSender:
    """A ``PartSender`` over a source that yields bytes; a short source raises (never a
    clean end of a short part)."""

    async def send_part(offset: int, length: int) -> None:
        sent = 0
        # aclosing: a client that goes away must release the source (an upstream
        # connection, an object store read) at once.
        async with contextlib.aclosing(read(offset, length)) as chunks:
            async for chunk in chunks:
                if sent + len(chunk) > length:
                    raise OSError(f"source gave more than the {length} bytes asked for")
                await slowclient.write(request, response, chunk, stall_timeout)
                sent += len(chunk)
        if sent != length:
            raise OSError(f"source ended after {sent} of {length} bytes")

    return send_part
