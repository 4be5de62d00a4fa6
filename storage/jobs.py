"""Blocking jobs on threads of their own, for steps every fill takes (its commit).

``asyncio.to_thread`` goes through the loop's default executor: a context copy,
a ``concurrent.futures.Future`` (with a ``threading.Condition`` of its own)
chained to an asyncio future by callbacks on both sides, and the executor's
locks and idle-thread check on each call. That is about twice the CPU of the
hand-off itself, which here is a queue put on the loop's side and one
``call_soon_threadsafe`` back from the thread. A small fill's commit is such a
hand-off: it is paid per blob.

A job whose waiter is cancelled still runs to its end (as with ``to_thread``);
only its result is dropped. Threads are started as jobs find none idle, up to
``max_threads``, and are daemons: at exit a job cut short is what a crash
leaves, which the store recovers from anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("function", "future", "loop")

    def __init__(self, function: Callable[[], T], future: asyncio.Future[T], loop: asyncio.AbstractEventLoop) -> None:
        self.function = function
        self.future = future
        self.loop = loop


class Jobs:
    def __init__(self, name: str, max_threads: int) -> None:
        self._name = name
        self._max_threads = max_threads
        self._queue: SimpleQueue[_Job[Any]] = SimpleQueue()
        self._idle = threading.Semaphore(0)  # one release per thread waiting for a job
        self._threads = 0
        self._lock = threading.Lock()

    async def run(self, function: Callable[[], T]) -> T:
        """``function()`` on one of the threads; what it returned, or raises what it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(function, future, loop))
        if not self._idle.acquire(blocking=False):
            self._grow()
        return await future

    def _grow(self) -> None:
        with self._lock:
            if self._threads >= self._max_threads:
                return  # the job waits for a thread to be done with another
            self._threads += 1
            number = self._threads
        threading.Thread(target=self._work, name=f"{self._name}_{number}", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                outcome = functools.partial(_succeed, job.future, job.function())
            except BaseException as exc:
                outcome = functools.partial(_fail, job.future, exc)
            # A loop closed meanwhile has nobody waiting: the thread carries on, for other loops.
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(outcome)
            del job, outcome  # not held while waiting for the next one
            self._idle.release()


def _succeed(future: asyncio.Future[T], result: T) -> None:
    if not future.done():  # the waiter was cancelled
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
