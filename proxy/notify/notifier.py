"""``Notifier``: the ``Events`` consumer that turns what the cache did into registry events.

The registry's actions where it has one (pull, push for a ``load``, delete for an
``rmi``); regcache's own for what it has no word for: ``fill`` (content fetched
from the upstream, verified and committed), ``digest_mismatch`` (upstream content
refused) and ``evict`` (an image removed by GC: budget, expiry, a full disk).
Each event is built once and offered to every endpoint that does not ignore it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Sequence

import aiohttp

from config.observability import NotificationSettings
from proxy.metrics.events import CLIENT_REQUEST, Content, Events
from proxy.notify.endpoint import Endpoint
from proxy.notify.envelope import event


class Notifier(Events):
    reads_client_request = True  # every event names the client request that caused it

    def __init__(self, settings: NotificationSettings, port: int, observer: Events) -> None:
        self.endpoints = [Endpoint(e, observer) for e in settings.endpoints]
        # The registry's source: this instance, as other hosts reach it.
        self.source = {"addr": f"{socket.gethostname()}:{port}", "instanceID": str(uuid.uuid4())}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # Events ----------------------------------------------------------------------

    def pulled(self, kind: str, content: Content, result: str) -> None:
        self._emit("pull", content, result=result)

    def committed(self, kind: str, content: Content) -> None:
        self._emit("fill", content)

    def digest_mismatch(self, kind: str, content: Content) -> None:
        self._emit("digest_mismatch", content)

    def loaded(self, content: Content) -> None:
        self._emit("push", content)

    def images_removed(self, reason: str, images: Sequence[Content]) -> None:
        for image in images:
            self._emit("delete" if reason == "rmi" else "evict", image, reason=reason)

    def _emit(self, action: str, content: Content, **regcache: str) -> None:
        built = None
        for endpoint in self.endpoints:
            if endpoint.settings.ignores(action, content.media_type):
                continue
            if built is None:
                built = event(action, content, CLIENT_REQUEST.get(), self.source, **regcache)
            endpoint.offer(built)

    # Running ---------------------------------------------------------------------

    async def start(self) -> None:
        # Its own session: no proxy variables, and none of the upstreams' tracing or limits.
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(e.run(self._session)) for e in self.endpoints]

    async def drain(self) -> None:
        """Wait until every event offered so far is delivered (tests, shutdown)."""
        await asyncio.gather(*(e.drain() for e in self.endpoints))

    async def close(self, grace: float) -> None:
        """Deliver what is queued for at most ``grace`` seconds, then count the rest as dropped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for endpoint in self.endpoints:
            endpoint.dropped()
        if self._session is not None:
            await self._session.close()
