"""What keeps password checks from being used against the server.

bcrypt costs a quarter of a second of CPU per check on purpose. Run on the
default thread pool, a handful of connections spraying wrong passwords would
take every thread that file opens, commits and small reads need, and stall
everybody's pulls. So:

- ``HashingPool``: bcrypt runs on its own one- or two-thread executor, with a
  bounded line of checks waiting for it. A check that finds the line full is
  refused at once with 429 TOOMANYREQUESTS (``LoginThrottled``), not 401: its
  credentials were never judged, and a 401 would tell ``docker login`` that a
  right password is wrong.
- ``FailureLimiter``: after ``max_failures`` failed checks from one client
  address within ``failure_window``, that address is refused (429, with
  Retry-After) without hashing until the window it started has passed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from proxy.errors import LoginThrottled

THREAD_PREFIX = "regcache-password"
# Addresses remembered at once; the oldest windows are forgotten first, so a
# spray from many addresses costs bounded memory.
MAX_TRACKED_ADDRESSES = 10_000


class HashingPool:
    """A small executor for password hashing, with a bounded number of checks in it."""

    def __init__(self, threads: int, queue: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_PREFIX)
        self._capacity = threads + queue
        # A check counts from submission until it is done, or cancelled before it
        # started; it is released from the worker thread, hence the lock.
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Checks hashing or waiting for a thread."""
        return self._pending

    async def run(self, check: Callable[[], bool]) -> bool:
        with self._lock:
            if self._pending >= self._capacity:
                raise LoginThrottled("too many logins are being checked; try again shortly", retry_after=1)
            self._pending += 1
        try:
            future = self._executor.submit(check)
        except BaseException:
            self._release()
            raise
        # A client that goes away cancels its queued check (wrap_future passes the
        # cancellation on), so abandoned checks do not hold the line.
        future.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class FailureLimiter:
    """Failed logins per client address, in a window that starts at the first failure."""

    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()  # address -> (start, failures)

    def _current(self, address: str) -> tuple[float, int] | None:
        entry = self._windows.get(address)
        if entry is not None and self._clock() - entry[0] >= self.window:
            del self._windows[address]
            return None
        return entry

    def check(self, address: str) -> None:
        """Raise LoginThrottled when this address has used up its failures."""
        entry = self._current(address)
        if entry is not None and entry[1] >= self.max_failures:
            wait = entry[0] + self.window - self._clock()
            raise LoginThrottled("too many failed logins from this address; try again later", retry_after=wait)

    def failed(self, address: str) -> None:
        entry = self._current(address)
        start, failures = entry if entry is not None else (self._clock(), 0)
        self._windows[address] = (start, failures + 1)
        self._windows.move_to_end(address)
        while len(self._windows) > MAX_TRACKED_ADDRESSES:
            self._windows.popitem(last=False)
