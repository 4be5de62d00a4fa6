"""A committed blob file as a response: the whole file, or the ranges asked for.

The caller has answered conditional requests and resolved ``Range`` against the
blob's size (``proxy.http.validators``, ``proxy.http.ranges``); a 206 is framed
by ``proxy.http.partial``. The body leaves through ``slowclient.send_file``: on
plain TCP from a pool thread (``proxy.http.filesend``), each slice within the
client timeout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.http import partial, slowclient
from proxy.http.ranges import ByteRange

log = logging.getLogger("regcache.blobfile")


class BlobFileResponse(web.StreamResponse):
    """Returned unprepared by a GET handler; aiohttp prepares it, which sends it all."""

    def __init__(
        self, path: Path, *, ranges: list[ByteRange] | None, headers: Mapping[str, str], stall_timeout: float
    ) -> None:
        super().__init__(headers=headers)
        self._path = path
        self._ranges = ranges
        self._stall_timeout = stall_timeout

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        try:
            # On the loop: opening a blob whose directory was just looked up costs
            # microseconds, less than a hand-off to a thread and back.
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("blob file %s cannot be opened: %s", self._path.name, type(exc).__name__)
            self.set_status(404)
            self.content_length = 0
            return await super().prepare(request)
        try:
            size = os.fstat(fd).st_size
            if self._ranges is not None:
                multipart = partial.frame(self, self._ranges, size)
                writer = await super().prepare(request)

                async def send_part(offset: int, count: int) -> None:
                    await slowclient.send_file(request, self, fd, offset, count, self._stall_timeout)

                await partial.send_parts(request, self, self._ranges, multipart, send_part, self._stall_timeout)
            else:
                self.content_length = size
                writer = await super().prepare(request)
                if size:
                    await slowclient.send_file(request, self, fd, 0, size, self._stall_timeout)
            await self.write_eof()
            return writer
        finally:
            os.close(fd)  # the sending thread works on its own duplicate
