"""A blob fill as its readers see it: one upstream fetch, read by every client.

Every client, the first one included, reads the spool file as it grows. The
last byte is held back until the digest is verified: a client never sees the
clean end of a wrong body, only an aborted connection. It is not held back for
the commit (fsync, rename, the metadata row): a client that has the blob has
correct bytes, and if the commit then fails the cache simply does not keep
them. Code that needs the blob in the store awaits ``committed()``.

A small blob is not spooled: the fill gathers it in memory and hands it over
whole once verified (``hold``), so its readers start when every byte can go
out at once. Only ``proxy.pull.fills`` changes a fill's state (``attach``,
``hold``, ``stored_elsewhere``, ``succeed``, ``fail``); readers wait on the
spool writer (bytes landed, verified, aborted) and on the fill's own two
events (started, ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import AsyncGenerator

from storage import directio
from storage.blobs import BlobStore, BlobWriter
from storage.oci.digest import Digest
from storage.progress import SpoolFollower

READ_CHUNK = 1024 * 1024
LOOP_READ = 64 * 1024


class Fill:
    def __init__(self, digest: Digest, upstream: str, repository: str, store: BlobStore) -> None:
        self.digest = digest
        self.upstream = upstream
        self.repository = repository
        self.size: int | None = None
        self.error: BaseException | None = None
        self._store = store
        self._writer: BlobWriter | None = None
        self._fd: int | None = None
        self._direct_fd: int | None = None  # the spool again, for reads around the page cache
        self._data: bytes | None = None  # a small blob, verified, gathered in memory
        # Set when another replica sharing the store committed the blob first:
        # every client of this fill then reads the store instead of a spool file.
        self._elsewhere = False
        self._started = asyncio.Event()  # size known (or failed): headers may go out
        self._ended = asyncio.Event()  # committed and recorded, or failed

    # The writing side (proxy.pull.fills) -------------------------------------

    def attach(self, writer: BlobWriter, size: int | None) -> None:
        self._writer = writer
        self.size = size
        self._fd = os.open(writer.spool_path, os.O_RDONLY)
        # Closed when the last request holding this fill lets go of it: a client
        # that joined just before the end may start reading after the fill is done.
        weakref.finalize(self, _let_go, self._fd, writer)
        # Opened now, not when the first direct write is seen: by then the commit may
        # have renamed the spool, and a reader must never open it by name.
        if writer.may_direct:
            self._direct_fd = directio.open_direct(str(writer.spool_path), os.O_RDONLY)
            if self._direct_fd is not None:
                weakref.finalize(self, os.close, self._direct_fd)
        self._started.set()

    def hold(self, data: bytes) -> None:
        """The whole verified blob, gathered in memory: readers take it from here."""
        self._data = data
        self.size = len(data)
        self._started.set()

    def stored_elsewhere(self, size: int) -> None:
        self.size = size
        self._elsewhere = True
        self._started.set()
        self._ended.set()

    def succeed(self, size: int) -> None:
        self.size = size
        self._ended.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._started.set()
        self._ended.set()

    @property
    def started(self) -> bool:
        """The upstream answered (``size`` is what it said) or the fill failed."""
        return self._started.is_set()

    @property
    def verified(self) -> bool:
        """Every byte may go to clients (the commit may still be running)."""
        return self._elsewhere or self._data is not None or (self._writer is not None and self._writer.verified)

    # The reading side (proxy.pull.answers) -----------------------------------

    async def opened(self) -> int | None:
        """The blob's size once known (None: the upstream did not say); raises if the fill
        failed before it had anything to read."""
        await self._started.wait()
        if self._writer is None and self._data is None and not self._elsewhere:
            assert self.error is not None
            raise self.error
        return self.size

    async def committed(self) -> int:
        """The blob's size once it is in the store and its row recorded; raises if the fill failed.

        Reading a fill to its end does not mean this: the last byte goes out
        when the digest is verified, before the commit.
        """
        await self._ended.wait()
        if self.error is not None:
            raise self.error
        assert self.size is not None
        return self.size

    def follower(self) -> SpoolFollower | None:
        """After ``opened``: the spool, for a thread that sends its bytes as they land; None
        when the blob is read from the store or from memory (``chunks``)."""
        if self._elsewhere or self._data is not None:
            return None
        writer, fd = self._writer, self._fd
        assert writer is not None and fd is not None
        return SpoolFollower(fd, writer.progress, self._direct_fd, lambda: writer.direct)

    async def failure(self, cause: BaseException) -> BaseException:
        """Why a follower of the spool was told it failed: the fill's own error, once recorded."""
        await self._ended.wait()
        return self.error or cause

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The blob's bytes as they land; raises if the fill fails."""
        async for chunk in self.read(0, None):
            yield chunk

    def covers(self, offset: int, length: int) -> bool:
        """Whether the bytes from ``offset`` may be read now, without waiting for the upstream."""
        if self._elsewhere or self._data is not None:
            return True
        writer = self._writer
        if writer is None:
            return False
        return offset + length <= writer.progress.available()[0]

    async def read(self, offset: int, length: int | None) -> AsyncGenerator[bytes, None]:
        """``length`` bytes from ``offset`` (all that follow: None) as they land; raises if
        the fill fails before they do."""
        await self.opened()
        if self._data is not None:
            whole = offset == 0 and (length is None or length == len(self._data))
            yield self._data if whole else self._data[offset:None if length is None else offset + length]
            return
        if self._elsewhere:
            async for chunk in self._store.read(self.digest, offset, length):
                yield chunk
            return
        stop = None if length is None else offset + length
        fd = self._fd
        assert fd is not None
        async with contextlib.aclosing(self._landed()) as landed:
            async for start, count in landed:
                position, end = max(start, offset), start + count if stop is None else min(start + count, stop)
                while position < end:
                    want = min(READ_CHUNK, end - position)
                    # A small read of fresh page cache costs less here than a hand-off to a thread.
                    chunk = (os.pread(fd, want, position) if want <= LOOP_READ
                             else await asyncio.to_thread(os.pread, fd, want, position))
                    if not chunk:
                        raise OSError("spool file shorter than written")
                    position += len(chunk)
                    yield chunk
                if stop is not None and start + count >= stop:
                    return

    async def _landed(self) -> AsyncGenerator[tuple[int, int], None]:
        """(offset, length) of spool bytes as they land. The last byte comes only once the
        blob is verified (not committed: see ``committed``); once verified, a failed commit
        does not cut readers. The spool's descriptor stays open while anything holds this fill."""
        await self.opened()
        writer = self._writer
        assert writer is not None
        offset = 0
        while True:
            available, verified = writer.progress.available()  # the last byte waits for the digest
            if offset < available:
                yield offset, available - offset
                offset = available
                continue
            if verified:
                return  # every verified byte is out, whatever the commit does
            if writer.aborted:
                await self._ended.wait()  # the fill records why
                assert self.error is not None
                raise self.error
            await writer.moved()


def _let_go(fd: int, writer: BlobWriter) -> None:
    """The spool's descriptor once no request holds the fill. A verified blob written
    around the page cache is read into it now, through this descriptor (the spool may be
    renamed or evicted by now): not at its commit, while a slow client of the fill may
    still be reading the spool from the disk, and not left to the blob's next client, who
    would read the disk too."""
    if writer.direct and writer.verified:
        directio.read_ahead_later(fd)
    else:
        os.close(fd)
