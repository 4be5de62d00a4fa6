"""One notification endpoint: a bounded queue and the task that delivers it.

Nothing here ever waits inside a pull: ``offer`` puts an event in the queue or,
when the queue is full, drops it and counts it. The delivery task posts what is
queued in envelopes of up to ``BATCH`` events, in order. A failed delivery is
retried (the same envelope, so order holds): at once while fewer than
``threshold`` attempts in a row have failed, then every ``backoff``. Entering and
leaving that backoff is one log line each; the log names the endpoint, never its
URL or headers (either may carry a secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from config.observability import EndpointSettings
from proxy.metrics.events import Events
from proxy.notify.envelope import MEDIA_TYPE, envelope

log = logging.getLogger("regcache.notify")

BATCH = 64  # events per envelope: a burst (a cold pull's layers) goes out in few POSTs


class DeliveryFailed(Exception):
    """A delivery attempt failed; the message says how without naming the URL or headers."""


class Endpoint:
    def __init__(self, settings: EndpointSettings, observer: Events) -> None:
        self.settings = settings
        self.name = settings.name
        self._observer = observer
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=settings.queue_size)
        self.pending: list[dict[str, Any]] = []  # taken from the queue for the delivery in progress
        self.backing_off = False

    def offer(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._observer.notification(self.name, "dropped", 1)

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            self.pending = [await self._queue.get()]
            while len(self.pending) < BATCH and not self._queue.empty():
                self.pending.append(self._queue.get_nowait())
            await self._deliver(session)
            for _ in self.pending:
                self._queue.task_done()
            self.pending = []

    async def drain(self) -> None:
        """Returns once everything queued so far has been delivered."""
        await self._queue.join()

    def dropped(self) -> int:
        """At shutdown: count what was never delivered."""
        lost = len(self.pending) + self._queue.qsize()
        if lost:
            self._observer.notification(self.name, "dropped", lost)
            log.warning("notification endpoint %s: %d event(s) not delivered at shutdown", self.name, lost)
        return lost

    async def _deliver(self, session: aiohttp.ClientSession) -> None:
        failures = 0
        body = envelope(self.pending)
        while True:
            try:
                await self._post(session, body)
            except DeliveryFailed as exc:
                failures += 1
                self._observer.notification(self.name, "retried", len(self.pending))
                if failures >= self.settings.threshold:
                    if not self.backing_off:
                        self.backing_off = True
                        log.warning("notification endpoint %s: %d deliveries in a row failed (last: %s); retrying "
                                    "every %ss, events beyond %d queued are dropped", self.name, failures, exc,
                                    self.settings.backoff, self.settings.queue_size)
                    await asyncio.sleep(self.settings.backoff)
                continue
            self._observer.notification(self.name, "sent", len(self.pending))
            if self.backing_off:
                self.backing_off = False
                log.warning("notification endpoint %s: delivering again", self.name)
            return

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> None:
        headers = {"Content-Type": MEDIA_TYPE}
        try:
            for name, path in self.settings.header_files.items():
                # Read at each delivery, so a rotated secret is used without a restart.
                headers[name] = (await asyncio.to_thread(path.read_text)).strip()
        except OSError as exc:
            raise DeliveryFailed(f"cannot read a header file: {exc.strerror}") from None
        pairs = [(name, value) for name, values in self.settings.headers.items() for value in values]
        try:
            async with session.post(self.settings.url, data=body, headers=[*headers.items(), *pairs],
                                    timeout=aiohttp.ClientTimeout(total=self.settings.timeout)) as response:
                with contextlib.suppress(aiohttp.ClientError):
                    await response.read()
                # The registry's rule: any 2xx or 3xx is a delivery.
                if not 200 <= response.status < 400:
                    raise DeliveryFailed(f"answered {response.status}")
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self.settings.timeout}s") from None
        except aiohttp.ClientError as exc:
            raise DeliveryFailed(type(exc).__name__) from None
