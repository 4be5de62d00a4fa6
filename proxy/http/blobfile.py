"""A committed blob file as a response: conditional requests, one byte range, a guarded body.

What aiohttp's ``FileResponse`` gave the hit path, on its public API only:
``If-Match``/``If-Unmodified-Since`` (412), ``If-None-Match``/``If-Modified-Since``
(304), ``Range`` with ``If-Range`` (206 with ``Content-Range``, or 416 with
``Content-Range: bytes */size``). The body leaves through ``slowclient.send_file``:
on plain TCP from a pool thread (``proxy.http.filesend``), each slice within the
client timeout.

The entity tag is the digest, not the file's mtime and size: the same on every
replica and after a blob is fetched again, and the one HEAD and a miss answer with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from proxy.http import slowclient

log = logging.getLogger("regcache.blobfile")


class BlobFileResponse(web.StreamResponse):
    """Returned unprepared by a GET handler; aiohttp prepares it, which sends it all."""

    def __init__(self, path: Path, *, etag: str, headers: Mapping[str, str], stall_timeout: float) -> None:
        super().__init__(headers=headers)
        self._path = path
        self._etag = etag
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
            offset, count = self._answer(request, os.fstat(fd))
            writer = await super().prepare(request)
            if count:
                await slowclient.send_file(request, self, fd, offset, count, self._stall_timeout)
                await self.write_eof()
            return writer
        finally:
            os.close(fd)  # the sending thread works on its own duplicate

    def _answer(self, request: web.BaseRequest, stat: os.stat_result) -> tuple[int, int]:
        """Sets status and headers; returns the file offset and byte count of the body."""
        size, mtime = stat.st_size, stat.st_mtime
        self.etag = self._etag
        self.last_modified = mtime
        self.headers[hdrs.ACCEPT_RANGES] = "bytes"
        if not _preconditions_hold(request, self._etag, mtime):
            self.set_status(412)
            self.content_length = 0
            return 0, 0
        if _not_modified(request, self._etag, mtime):
            self.set_status(304)
            return 0, 0
        if hdrs.RANGE in request.headers and _if_range_holds(request, self._etag, mtime):
            try:
                offset, count = _byte_range(request.http_range, size)
            except ValueError:
                self.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
                self.set_status(416)
                self.content_length = 0
                return 0, 0
            self.set_status(206)
            self.headers[hdrs.CONTENT_RANGE] = f"bytes {offset}-{offset + count - 1}/{size}"
            self.content_length = count
            return offset, count
        self.content_length = size
        return 0, size


def _preconditions_hold(request: web.BaseRequest, etag: str, mtime: float) -> bool:
    """If-Match (strong comparison), else If-Unmodified-Since (RFC 9110 13.2.2)."""
    if_match = request.if_match
    if if_match is not None:
        return any(tag.value == "*" or (tag.value == etag and not tag.is_weak) for tag in if_match)
    unmodified_since = request.if_unmodified_since
    return unmodified_since is None or mtime <= unmodified_since.timestamp()


def _not_modified(request: web.BaseRequest, etag: str, mtime: float) -> bool:
    """If-None-Match (weak comparison), else If-Modified-Since."""
    if_none_match = request.if_none_match
    if if_none_match is not None:
        return any(tag.value in ("*", etag) for tag in if_none_match)
    modified_since = request.if_modified_since
    return modified_since is not None and mtime <= modified_since.timestamp()


def _if_range_holds(request: web.BaseRequest, etag: str, mtime: float) -> bool:
    """Whether Range applies: no If-Range, or one that names this blob (RFC 9110 13.1.5).

    An entity tag must match strongly; a date must not be older than the file. Anything
    else does not match, and the whole blob is sent."""
    if_range = request.headers.get(hdrs.IF_RANGE)
    if if_range is None:
        return True
    if if_range.startswith(('"', "W/")):
        return if_range == f'"{etag}"'
    since = request.if_range
    return since is not None and mtime <= since.timestamp()


def _byte_range(requested: slice, size: int) -> tuple[int, int]:
    """Offset and length of aiohttp's parsed ``Range``; ValueError when unsatisfiable."""
    start, stop = requested.start, requested.stop
    if start is None:
        raise ValueError("no range")
    if start < 0:  # a suffix: the last -start bytes, or all of a shorter blob
        start = max(size + start, 0)
        count = size - start
    else:
        count = min(size if stop is None else stop, size) - start
    if start >= size:
        raise ValueError("range starts past the end")
    return start, count
