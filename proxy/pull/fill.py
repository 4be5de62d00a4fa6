"""A blob fill: one upstream fetch written to the store, read by every client.

The fill runs in its own task, under its own timeout, so it completes even
when the client that started it goes away. Every client, the first one
included, reads the spool file as it grows. The last byte is held back until
the digest is verified: a client never sees the clean end of a wrong body,
only an aborted connection. It is not held back for the commit (fsync, rename,
the metadata row): a client that has the blob has correct bytes, and if the
commit then fails the cache simply does not keep them. Code that needs the
blob in the store awaits ``committed()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from storage.blobs import BlobWriter
from storage.oci.digest import Digest

log = logging.getLogger("regcache.fill")

READ_CHUNK = 1024 * 1024


class Fill:
    def __init__(self, digest: Digest, upstream: str, repository: str) -> None:
        self.digest = digest
        self.upstream = upstream
        self.repository = repository
        self.size: int | None = None
        self.error: BaseException | None = None
        self.verified = False  # size and digest checked: every byte may go to clients
        self.finished = False  # verified and committed
        self.writer: BlobWriter | None = None
        self._fd: int | None = None
        self._progress = asyncio.Event()
        self.started = asyncio.Event()  # size known (or failed): headers may go out
        self.followers = 0
        # Set when another replica sharing the store committed the blob first:
        # every client of this fill then reads the store instead of a spool file.
        self.stored: Callable[[], AsyncIterator[bytes]] | None = None

    # The writing side -------------------------------------------------------

    def attach(self, writer: BlobWriter, size: int | None) -> None:
        self.writer = writer
        self.size = size
        self._fd = os.open(writer.spool_path, os.O_RDONLY)
        # Closed when the last request holding this fill lets go of it: a client
        # that joined just before the end may start reading after the fill is done.
        weakref.finalize(self, os.close, self._fd)
        writer.on_flush = self.progressed  # readers wake when bytes land, not when they are handed off
        self.started.set()

    def committed_elsewhere(self, size: int, read: Callable[[], AsyncIterator[bytes]]) -> None:
        self.size = size
        self.stored = read
        self.verified = True
        self.finished = True
        self.started.set()
        self.progressed()

    def progressed(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def verify(self) -> None:
        """The spool file is the verified blob: clients get their last byte now."""
        self.verified = True
        self.progressed()

    def succeed(self) -> None:
        self.verified = True
        self.finished = True
        self.progressed()
        self._release_writer()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.started.set()
        self.progressed()
        self._release_writer()

    @property
    def done(self) -> bool:
        return self.finished or self.error is not None

    # The reading side ------------------------------------------------------

    async def committed(self) -> None:
        """Returns once the blob is in the store (and its row recorded); raises if the fill failed.

        Reading a fill to its end does not mean this: the last byte goes out
        when the digest is verified, before the commit.
        """
        while not self.done:
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def wait_started(self) -> None:
        await self.started.wait()
        if self.error is not None and self.writer is None and self.stored is None:
            raise self.error

    async def tail(self) -> AsyncIterator[bytes]:
        """The blob's bytes as they land; raises if the fill fails."""
        await self.wait_started()
        if self.stored is not None:
            async for chunk in self.stored():
                yield chunk
            return
        async with contextlib.aclosing(self.ranges()) as ranges:
            async for fd, offset, length in ranges:
                end = offset + length
                while offset < end:
                    chunk = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, end - offset), offset)
                    if not chunk:
                        raise OSError("spool file shorter than written")
                    offset += len(chunk)
                    yield chunk

    async def ranges(self) -> AsyncIterator[tuple[int, int, int]]:
        """``(fd, offset, length)`` of spool bytes as they land, for sendfile; raises if the fill fails.

        The last byte comes only once the blob is verified (not committed: see
        ``committed``); once verified, a failed commit does not cut readers.
        ``fd`` stays open while anything holds this fill; not for a fill
        committed elsewhere (``stored``).
        """
        await self.wait_started()
        assert self.stored is None and self.writer is not None and self._fd is not None
        fd = self._fd
        offset = 0
        while True:
            verified = self.verified
            available = self.writer.flushed
            if not verified:
                available -= 1  # hold back the last byte until verified
            if offset < available:
                yield fd, offset, available - offset
                offset = available
                continue
            if verified:
                return  # every verified byte is out, whatever the commit does
            if self.error is not None:
                raise self.error
            await self._progress.wait()

    def _release_writer(self) -> None:
        # The writer's callback points back here: without this cycle the fill
        # (and its descriptor) goes as soon as no request holds it.
        if self.writer is not None:
            self.writer.on_flush = None


FillBody = Callable[[Fill], Awaitable[None]]


class Fills:
    """At most one fill per digest in this process."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._fills: dict[str, Fill] = {}
        self._tasks: dict[asyncio.Task[None], Fill] = {}

    def __len__(self) -> int:
        return len(self._fills)

    def get(self, digest: Digest) -> Fill | None:
        return self._fills.get(str(digest))

    def start(self, fill: Fill, body: FillBody) -> Fill:
        key = str(fill.digest)
        self._fills[key] = fill
        task = asyncio.create_task(self._run(fill, body))
        self._tasks[task] = fill
        task.add_done_callback(lambda done: self._tasks.pop(done, None))
        return fill

    async def _run(self, fill: Fill, body: FillBody) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await body(fill)
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                log.warning("fill of %s timed out after %ss", fill.digest, self.timeout)
            fill.fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._fills.pop(str(fill.digest), None)

    async def settle(self) -> None:
        """Wait until every fill in flight has ended, well or not."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, commit_grace: float = 30.0) -> None:
        """Stop: fills still fetching are cancelled; verified ones may finish their commit.

        A verified fill has sent every byte to its clients; cancelling its commit
        would leave a client holding a blob the restarted cache does not have.
        """
        committing = [task for task, fill in self._tasks.items() if fill.verified]
        if committing:
            await asyncio.wait(committing, timeout=commit_grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
