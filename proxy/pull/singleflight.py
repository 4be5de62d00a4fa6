"""One in-flight call per key; later callers share the first one's result.

The call runs in its own task, so a client that goes away does not cancel the
work the others are waiting for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Task[T]] = {}
        self._started: dict[Hashable, float] = {}

    def running(self, key: Hashable) -> bool:
        return key in self._calls

    async def do(self, key: Hashable, make: Any) -> tuple[T, bool]:
        """``make()`` returns the coroutine to run; gives (result, shared)."""
        task, _, shared = self.start(key, make)
        return await asyncio.shield(task), shared

    def start(self, key: Hashable, make: Any) -> tuple[asyncio.Task[T], float, bool]:
        """The key's call, begun with ``make()`` unless one runs: (task, when it began on the
        loop's clock, whether it was running already). The caller may stop waiting for it."""
        task = self._calls.get(key)
        shared = task is not None
        if task is None:
            coro: Coroutine[Any, Any, T] = make()
            task = asyncio.create_task(coro)
            self._calls[key] = task
            self._started[key] = asyncio.get_running_loop().time()
            task.add_done_callback(lambda done: self._done(key, done))
        return task, self._started[key], shared

    async def settle(self) -> None:
        """Wait until every call running now has ended, well or not."""
        await asyncio.gather(*list(self._calls.values()), return_exceptions=True)

    def _done(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
            del self._started[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter already got it
