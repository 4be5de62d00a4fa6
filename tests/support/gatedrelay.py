"""A relay in front of a registry that holds whole-blob GETs where a test says, and counts
what passes: ranged GETs (by their Range header), whole-blob GETs and HEADs."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web


class GatedRelay:
    """In front of a registry: a whole-blob GET stops after ``hold_at`` bytes until ``gate``
    is set (with ``hold_answer``, before the registry is even asked); ranged GETs pass at
    once (and are counted), as do HEADs (counted too)."""

    def __init__(self, target: str, hold_at: int) -> None:
        self.target = target
        self.hold_at = hold_at
        self.gate = asyncio.Event()
        self.hold_answer = False
        self.range_gets: list[str] = []
        self.whole_gets = 0
        self.heads = 0
        self._session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        wanted = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "authorization", "range")}
        ranged = "Range" in request.headers
        if ranged:
            self.range_gets.append(request.headers["Range"])
        elif "/blobs/" in request.path:
            if request.method == "HEAD":
                self.heads += 1
            else:
                self.whole_gets += 1
                if self.hold_answer:
                    await self.gate.wait()
        async with self._session.request(request.method, self.target + request.path_qs, headers=wanted,
                                         allow_redirects=False) as upstream:
            kept = {k: v for k, v in upstream.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive")}
            response = web.StreamResponse(status=upstream.status, headers=kept)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            sent = 0
            hold = request.method == "GET" and "/blobs/" in request.path and not ranged
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if hold and not self.gate.is_set() and sent + len(chunk) > self.hold_at:
                    await response.write(chunk[: self.hold_at - sent])
                    chunk, sent = chunk[self.hold_at - sent :], self.hold_at
                    await self.gate.wait()
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            return response

    async def close(self) -> None:
        self.gate.set()
        if self._session is not None:
            await self._session.close()
