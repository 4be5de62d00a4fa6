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

    def running(self, key: Hashable) -> bool:
        return key in self._calls

    async def do(self, key: Hashable, make: Any) -> tuple[T, bool]:
        """``make()`` returns the coroutine to run; gives (result, shared)."""
        task = self._calls.get(key)
        shared = task is not None
        if task is None:
            coro: Coroutine[Any, Any, T] = make()
            task = asyncio.create_task(coro)
            self._calls[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(task), shared

    def _done(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter already got it
