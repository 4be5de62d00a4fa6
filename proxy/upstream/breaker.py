"""The circuit breaker of one upstream: remembers that it is unreachable.

An upstream that hangs (accepts, then answers nothing) costs every request a
full read timeout; one that refuses costs every request its retries. After
``breaker_failures`` connection failures or timeouts in a row the breaker
opens: the client then refuses at once (``UpstreamCircuitOpen``, a 503 with
``Retry-After`` for clients), the pull service serves what it has without
asking, and a single probe task asks the upstream's ``/v2/`` on a backoff
schedule. Any answer (the probe's, or a request that was already in flight)
closes the breaker. A status the upstream sends, 5xx included, is an answer:
only the absence of one counts as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from proxy.errors import UpstreamCircuitOpen, UpstreamError, UpstreamServerError, UpstreamUnavailable
from proxy.upstream.responses import UpstreamObserver

log = logging.getLogger("regcache.upstream")

State = Literal["closed", "open"]
FIRST_PROBE_AFTER = 1.0
PROBE_BACKOFF_CAP = 10.0  # a recovered upstream is noticed within this (plus one probe)


def is_connection_failure(error: UpstreamError) -> bool:
    """No answer at all: refused, reset, DNS, TLS, or a timeout."""
    return isinstance(error, UpstreamUnavailable) and not isinstance(error, UpstreamServerError | UpstreamCircuitOpen)


class Breaker:
    def __init__(
        self,
        upstream: str,
        failures_to_open: int,
        probe: Callable[[], Awaitable[None]],
        observer: UpstreamObserver,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.upstream = upstream
        self._failures_to_open = failures_to_open
        self._probe = probe
        self._observer = observer
        self._clock = clock
        self._sleep = sleep
        self.state: State = "closed"
        self.failures = 0  # in a row
        self.opened_at: float | None = None  # wall clock, for stats
        self.last_error = ""
        self._next_probe = 0.0  # on self._clock
        self._prober: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    def check(self) -> None:
        """Raises ``UpstreamCircuitOpen`` while the upstream is known to be unreachable."""
        if self.state == "open":
            wait = max(1.0, self._next_probe - self._clock())
            raise UpstreamCircuitOpen(
                f"upstream {self.upstream} is unreachable ({self.last_error}); not asked, retry later",
                upstream=self.upstream,
                retry_after=wait,
            )

    def answered(self) -> None:
        self.failures = 0
        if self.state == "open":
            self._close()

    def failed(self, error: UpstreamError) -> None:
        if not is_connection_failure(error):
            self.answered()
            return
        self.failures += 1
        self.last_error = error.kind
        if self.state == "closed" and self.failures >= self._failures_to_open:
            self._open()

    def stats(self) -> dict[str, object]:
        return {"state": self.state, "failures": self.failures, "open_since": self.opened_at,
                "last_error": self.last_error or None}

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None

    def _open(self) -> None:
        self.state = "open"
        self.opened_at = time.time()
        self._next_probe = self._clock() + FIRST_PROBE_AFTER
        log.warning("upstream %s: circuit open after %d connection failures in a row (last: %s); "
                    "requests that need it fail at once, cached content is served", self.upstream,
                    self.failures, self.last_error)
        self._observer.breaker(self.upstream, "open")
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probing())

    def _close(self) -> None:
        down = time.time() - (self.opened_at or time.time())
        self.state = "closed"
        self.opened_at = None
        log.warning("upstream %s: circuit closed, the upstream answers again (unreachable for %.1fs)",
                    self.upstream, down)
        self._observer.breaker(self.upstream, "closed")

    async def _probing(self) -> None:
        """One probe at a time, backing off, until one is answered."""
        backoff = FIRST_PROBE_AFTER
        while True:
            await self._sleep(max(0.0, self._next_probe - self._clock()))
            if not self.is_open:
                return  # a request in flight got an answer meanwhile
            try:
                await self._probe()
            except UpstreamError as exc:
                self.last_error = exc.kind
                backoff = min(backoff * 2, PROBE_BACKOFF_CAP)
                self._next_probe = self._clock() + backoff
                continue
            self.answered()
            return
