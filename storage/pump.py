"""A body read into the store on two threads: one receives and hashes, one writes.

For a big blob the costs of a fill are receiving (a kernel copy), hashing and
writing the spool file (a page-cache copy, the dearest on a VM whose fresh pages
come from the host). Done on the loop, or in batches handed from the loop to one
worker, they run one after the other and the loop pays per socket read. Here the
receiving thread reads straight into a few reused buffers and hashes each one
while the writing thread writes the one before: hashing overlaps writing, the
loop hears only "a batch landed", and memory is ``BUFFERS * BUFFER_BYTES`` per
fill however fast or slow the disk and the clients are.

Nothing here knows HTTP: the body is anything with a blocking ``readinto`` and a
thread-safe ``interrupt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from storage import directio
from storage.errors import SizeMismatch

BUFFER_BYTES = 1024 * 1024
BUFFERS = 4
# The first batch is small: readers get their first bytes without waiting for a whole buffer.
FIRST_BYTES = 64 * 1024
# A body known to be at most this big is read, hashed and written in one go on one
# pooled thread: two new threads and a hand-off per batch would cost more than the work.
SMALL_BYTES = 1024 * 1024
_SMALL_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="regcache-pump")


class BodySource(Protocol):
    def readinto(self, buffer: memoryview, /) -> int:
        """Blocking: fill ``buffer`` (fewer bytes only at the end), 0 once the body is over."""

    def interrupt(self) -> None:
        """Any thread: a blocked ``readinto`` returns or raises now."""


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...


async def pump(source: BodySource, hasher: Hasher, write: Callable[[memoryview], None],
               landed: Callable[[int], None], limit: int | None, label: str) -> int:
    """Read ``source`` to its end: each batch hashed, then written with ``write``, then
    ``landed(count)`` called on the loop. Returns the bytes read. Raises what a thread
    raised (the first failure stops both), or ``SizeMismatch`` past ``limit`` bytes.
    Returns or raises only once both threads are done with the buffers and the file."""
    if limit is not None and limit <= SMALL_BYTES:
        return await _pump_small(source, hasher, write, landed, limit, label)
    run = _Run(source, hasher, write, landed, limit, label, asyncio.get_running_loop())
    for target, name in ((run.receive, "regcache-receive"), (run.write, "regcache-write")):
        threading.Thread(target=target, name=name, daemon=True).start()
    try:
        await asyncio.shield(run.done)
    except asyncio.CancelledError:
        run.halt()
        while not run.done.done():  # the threads must be out of the file before it is closed
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(run.done)
        raise
    if run.error is not None:
        raise run.error
    return run.received


async def _pump_small(source: BodySource, hasher: Hasher, write: Callable[[memoryview], None],
                      landed: Callable[[int], None], limit: int, label: str) -> int:
    loop = asyncio.get_running_loop()

    def run() -> tuple[int, int]:
        """(bytes read, bytes written and not yet landed)"""
        buffer = memoryview(bytearray(limit + 1))  # one byte more than expected: a longer body shows
        count = source.readinto(buffer[:min(FIRST_BYTES, limit + 1)])
        done = 0
        if 0 < count < limit:  # more to come: readers get these now, as from a big body
            hasher.update(buffer[:count])
            write(buffer[:count])
            loop.call_soon_threadsafe(landed, count)
            done = count
        while count <= limit and (got := source.readinto(buffer[count:])):
            count += got
        if count > limit:
            raise SizeMismatch(f"{label}: more than the expected bytes")
        hasher.update(buffer[done:count])
        write(buffer[done:count])
        return count, count - done

    future = loop.run_in_executor(_SMALL_THREADS, run)
    try:
        count, rest = await asyncio.shield(future)
    except asyncio.CancelledError:
        source.interrupt()
        while not future.done():  # the thread must be out of the file before it is closed
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # the interrupted read's error: retrieved, the cancellation wins
        raise
    landed(rest)
    return count


class _Run:
    def __init__(self, source: BodySource, hasher: Hasher, write: Callable[[memoryview], None],
                 landed: Callable[[int], None], limit: int | None, label: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._hasher = hasher
        self._write = write
        self._landed = landed
        self._limit = limit
        self._label = label
        self._loop = loop
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            # Aligned, and every batch but the last fills its buffer (or FIRST_BYTES of it):
            # a store may write them around the page cache (storage.directio).
            self._free.put(directio.buffer(BUFFER_BYTES))
        self._full: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = 2
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.received = 0
        self.done: asyncio.Future[None] = loop.create_future()

    def receive(self) -> None:
        first = True
        try:
            while not self._stop.is_set():
                buffer = self._free.get()
                if self._stop.is_set():
                    break
                count = self._source.readinto(buffer[:FIRST_BYTES] if first else buffer)
                first = False
                if count == 0:
                    break
                self.received += count
                if self._limit is not None and self.received > self._limit:
                    raise SizeMismatch(f"{self._label}: more than the expected bytes")
                self._hasher.update(buffer[:count])
                self._full.put((buffer, count))
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._full.put(None)
            self._exit()

    def write(self) -> None:
        try:
            while (batch := self._full.get()) is not None:
                if self._stop.is_set():
                    continue  # drain to the end marker; nothing more is written
                buffer, count = batch
                self._write(buffer[:count])
                self._loop.call_soon_threadsafe(self._landed, count)
                self._free.put(buffer)
        except BaseException as exc:
            self._fail(exc)
            while self._full.get() is not None:  # let the receiver finish its last put
                pass
        finally:
            self._exit()

    def halt(self) -> None:
        """Any thread: stop both threads soon (the receiver may be waiting on the network)."""
        self._stop.set()
        self._source.interrupt()
        self._free.put(memoryview(bytearray(0)))  # wakes a receiver waiting for a free buffer

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.halt()

    def _exit(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
