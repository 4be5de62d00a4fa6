"""Prefetch: an image's blobs fetched as soon as its manifest is, before clients ask.

A client that GETs an image manifest from a cold cache asks for its config and
layers next, mostly one after another (skopeo, containerd and docker fetch a
few at a time). Each of those is then a miss that waits for the upstream's
answer. When a GET brings an image manifest from the upstream, its config and
layers are fetched right away, a few at a time, in the manifest's order (the
order clients ask in), through the same single-flight fills as client misses:
a client asking for a blob being prefetched joins that fill, a blob already
stored or filling is skipped, and a client asking for one not reached yet
starts its own fill as usual.

Only a GET that fetched the manifest from the upstream triggers it: a manifest
served from the cache was prefetched already, and a HEAD (update checkers,
``docker manifest inspect`` style tools) fetches no bytes. A failed prefetch
costs nothing but the chance: the client's own GET fetches again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from proxy.pull.fill import Fill
from proxy.pull.routing import Route
from storage.errors import ManifestInvalid
from storage.oci.digest import Digest
from storage.oci.manifests import parse_manifest

log = logging.getLogger("regcache.prefetch")

# What starts one blob's fill (None when it is stored or already filling).
StartFill = Callable[[Route, Digest], Awaitable[Fill | None]]


class Prefetcher:
    def __init__(self, start_fill: StartFill) -> None:
        self._start_fill = start_fill
        self._tasks: set[asyncio.Task[None]] = set()

    def image(self, route: Route, data: bytes, media_type: str) -> None:
        """Fetch the config and layers of this image manifest (an index has neither)."""
        parallel = route.upstream.prefetch
        if parallel <= 0:
            return
        try:
            parsed = parse_manifest(data, media_type)
        except ManifestInvalid:
            return
        blobs = list(dict.fromkeys(d.digest for d in parsed.references if d.kind in ("config", "layer")))
        if not blobs:
            return
        task = asyncio.create_task(self._run(route, blobs, parallel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, route: Route, blobs: list[Digest], parallel: int) -> None:
        queue = iter(blobs)  # shared by the workers: each blob is taken once, in order

        async def worker() -> None:
            for digest in queue:
                try:
                    fill = await self._start_fill(route, digest)
                    if fill is not None:
                        await fill.committed()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the client's own GET will try again
                    log.info("prefetch of %s from %s/%s failed: %s",
                             digest, route.upstream_name, route.repository, exc)

        await asyncio.gather(*(worker() for _ in range(min(parallel, len(blobs)))))

    async def settle(self) -> None:
        """Wait until every prefetch started so far has ended."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
