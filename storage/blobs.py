"""The content-addressed blob store: hash while writing, verify, then commit.

``BlobWriter`` (a blob spooled as it arrives) and ``BlobBuffer`` (a small one
gathered in memory) are the only ways bytes enter the store. Each hashes every
byte it is given and has the backend commit only when size and digest match
what was asked for; otherwise nothing is visible.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

from storage.backends.base import BlobBackend, Upload
from storage.errors import DigestMismatch, SizeMismatch, StoreFull
from storage.oci.digest import Digest
from storage.progress import SpoolProgress
from storage.pump import BodySource, pump

# Bytes gathered before one hand-off to the worker thread: large enough that
# thread switches cost nothing next to hashing, small enough that followers
# reading the spool file stay close behind.
FLUSH_BYTES = 1024 * 1024
# A batch this small is hashed and written on the event loop (tens of
# microseconds): a hand-off to the thread and back costs more than the work, and
# a blob of a few such batches (most layers and configs) then fills without one.
INLINE_BYTES = 64 * 1024


class _Batch:
    """Bytes handed to the worker thread, and whether their landing was told."""

    __slots__ = ("future", "size", "told")

    def __init__(self, future: asyncio.Future[None], size: int) -> None:
        self.future = future
        self.size = size
        self.told = False


class BlobWriter:
    """Hashes and spools one blob; ``finish`` verifies and commits.

    Hashing and writing run on a worker thread while the caller gathers the
    next batch (hashlib and file writes release the GIL), so receiving and
    hashing overlap on two cores; batches of at most ``INLINE_BYTES`` are
    done on the loop. At most one batch is in the thread at a
    time: bytes are hashed and written in order, and memory stays bounded.
    """

    def __init__(
        self, digest: Digest, upload: Upload, expected_size: int | None = None, store: BlobStore | None = None
    ) -> None:
        self.digest = digest
        self._store = store
        self.expected_size = expected_size
        self._upload = upload
        self._hasher = digest.hasher()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._inflight: _Batch | None = None
        self.received = 0
        self.flushed = 0  # bytes readable in the spool file
        # Readers waiting for the spool to grow, be verified or be aborted; one
        # future each, so a reader that goes away cancels only its own wait.
        self._waiters: list[asyncio.Future[None]] = []
        self._done = False
        # Bytes written, verified, aborted: for readers on any thread, told by the thread
        # that writes (``flushed`` is what the loop has heard of so far).
        self.progress = SpoolProgress()

    @property
    def verified(self) -> bool:
        """Size and digest checked: the spool file is the blob."""
        return self.progress.verified

    @property
    def aborted(self) -> bool:
        return self.progress.aborted

    @property
    def spool_path(self) -> Path:
        return self._upload.spool_path

    @property
    def may_direct(self) -> bool:
        """The spool may be written around the page cache (known before the first byte)."""
        return self._upload.may_direct

    @property
    def direct(self) -> bool:
        """Some of the spool was written around the page cache: read it the same way."""
        return self._upload.direct

    def _write_sync(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hasher.update(chunk)
            self._upload.write_sync(chunk)

    async def write(self, chunk: bytes) -> None:
        """Buffer a chunk; a full batch goes to the thread (after the one before it has landed)."""
        if self.expected_size is not None and self.received + len(chunk) > self.expected_size:
            raise SizeMismatch(f"{self.digest}: more than the expected {self.expected_size} bytes")
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self.received += len(chunk)
        # The first bytes go out at once so that followers get their first byte early.
        if self._pending_bytes >= FLUSH_BYTES or (self.flushed == 0 and self._inflight is None):
            await self._hand_off()

    async def _hand_off(self) -> None:
        await self._wait_inflight()
        if not self._pending:
            return
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        size = sum(len(c) for c in chunks)
        if size <= INLINE_BYTES:
            try:
                self._write_sync(chunks)
            except StoreFull:
                if self._store is not None:
                    self._store.full()
                raise
            self._landed(size)
            return
        batch = _Batch(asyncio.get_running_loop().run_in_executor(None, self._write_sync, chunks), size)
        # Followers hear of the batch as soon as it is written, even while this task waits
        # for the upstream; and ``_wait_inflight`` makes sure of it before going on.
        batch.future.add_done_callback(lambda _: self._written(batch))
        self._inflight = batch

    def _written(self, batch: _Batch) -> None:
        """Once per batch, once it is written: a done callback can run after the task that
        awaited the future went on (it was done before the await, and the callback still
        queued), so both ask."""
        future = batch.future
        if batch.told or future.cancelled() or future.exception() is not None:
            return  # told already, or the error surfaces in _wait_inflight
        batch.told = True
        self._landed(batch.size)

    def _landed(self, size: int) -> None:
        self.flushed += size
        self.progress.reach(self.flushed)
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def moved(self) -> None:
        """Returns once the spool file grows, or the blob is verified or aborted.

        For readers of the spool file while it is written: look at ``flushed``,
        ``verified`` and ``aborted``, then wait here (no await in between, so
        no change is missed). Wakes when the bytes land, not when they are
        handed to the thread.
        """
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def pump(self, body: BodySource) -> None:
        """The rest of a body read on threads (``storage.pump``) after what ``write`` was given.

        For a big blob: the loop only hears when a batch has landed. Raises what reading
        or writing raised; the caller aborts.
        """
        await self.flush()
        limit = None if self.expected_size is None else self.expected_size - self.received
        written = self.flushed
        write, progress = self._upload.write_sync, self.progress

        def write_and_tell(data: memoryview) -> None:  # on the writing thread, before the loop hears
            nonlocal written
            write(data)
            written += len(data)
            progress.reach(written)

        try:
            self.received += await pump(body, self._hasher, write_and_tell, self._landed, limit, str(self.digest))
        except StoreFull:
            if self._store is not None:
                self._store.full()
            raise

    async def _wait_inflight(self) -> None:
        batch, self._inflight = self._inflight, None
        if batch is None:
            return
        try:
            await batch.future
            self._written(batch)
        except StoreFull:
            if self._store is not None:
                self._store.full()
            raise

    async def flush(self) -> None:
        """Everything written so far is in the spool file when this returns."""
        await self._hand_off()
        await self._wait_inflight()

    async def finish(self) -> int:
        """Verify size and digest, then commit. Raises (and aborts) on mismatch."""
        await self.verify()
        return await self.commit()

    async def verify(self) -> int:
        """Check size and digest of everything written; raises (and aborts) on a mismatch.

        After this the spool file holds exactly the blob: its bytes may go to
        clients while ``commit`` makes it durable and visible under its digest.
        """
        try:
            await self.flush()
            if self.expected_size is not None and self.received != self.expected_size:
                raise SizeMismatch(f"{self.digest}: got {self.received} bytes, expected {self.expected_size}")
            actual = self._hasher.hexdigest()
            if actual != self.digest.hex:
                raise DigestMismatch(f"content of {self.digest} hashes to {self.digest.algorithm}:{actual}")
        except BaseException:
            await self.abort()
            raise
        self.progress.verify()
        self._wake()
        return self.received

    async def commit(self) -> int:
        """Make a verified blob visible under its digest. Raises (and aborts) on failure."""
        if not self.verified:
            raise RuntimeError(f"{self.digest}: commit before verify")
        try:
            await self._upload.commit()
        except BaseException as exc:
            await self.abort()
            if isinstance(exc, StoreFull) and self._store is not None:
                self._store.full()
            raise
        self._done = True
        if self._store is not None and self._store.on_commit is not None:
            self._store.on_commit(self.received)
        return self.received

    async def abort(self) -> None:
        if not self._done:
            self._done = True
            self.progress.abort()
            self._wake()
            batch, self._inflight = self._inflight, None
            if batch is not None:
                # The thread must be out of the file before it is closed and removed.
                await asyncio.wait([batch.future])
                if not batch.future.cancelled():
                    batch.future.exception()  # retrieved: the caller is already failing
            await self._upload.abort()


class BlobBuffer:
    """A small blob gathered in memory, hashed as it arrives; stored in one step once verified.

    For a blob of a few tens of KiB (configs, most small layers), a spool file costs
    more than the bytes: a file made and written on the loop, then a second trip to
    commit it. Here the bytes stay in memory until ``verify`` and the backend writes
    and commits them in one go (``BlobBackend.put``). The caller bounds the size.
    """

    def __init__(self, digest: Digest, expected_size: int, store: BlobStore) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self._store = store
        self._hasher = digest.hasher()
        self._chunks: list[bytes] = []
        self.received = 0
        self._data: bytes | None = None

    def write(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.expected_size:
            raise SizeMismatch(f"{self.digest}: more than the expected {self.expected_size} bytes")
        self._hasher.update(chunk)
        self._chunks.append(chunk)
        self.received += len(chunk)

    def verify(self) -> bytes:
        """The whole blob, once size and digest are checked; raises on a mismatch."""
        if self.received != self.expected_size:
            raise SizeMismatch(f"{self.digest}: got {self.received} bytes, expected {self.expected_size}")
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(f"content of {self.digest} hashes to {self.digest.algorithm}:{actual}")
        chunks, self._chunks = self._chunks, []
        self._data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._data

    async def commit(self) -> int:
        """Make the verified blob visible under its digest."""
        if self._data is None:
            raise RuntimeError(f"{self.digest}: commit before verify")
        try:
            await self._store.backend.put(self.digest, self._data)
        except StoreFull:
            self._store.full()
            raise
        if self._store.on_commit is not None:
            self._store.on_commit(self.received)
        return self.received

    async def abort(self) -> None:
        """Nothing reached the store before ``commit``: the bytes are dropped."""
        self._chunks, self._data = [], None


class BlobStore:
    """Verified blobs on top of a backend."""

    def __init__(self, backend: BlobBackend) -> None:
        self.backend = backend
        self.on_full: Callable[[], None] | None = None  # eviction hook
        self.on_commit: Callable[[int], None] | None = None  # size accounting hook

    def full(self) -> None:
        if self.on_full is not None:
            self.on_full()

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        await self.backend.close()

    async def writer(self, digest: Digest, expected_size: int | None = None) -> BlobWriter:
        """A writer; with a known size the space is reserved first, so a full
        store fails here, before a client has seen a byte."""
        try:
            upload = await self.backend.begin(digest)
        except StoreFull:
            self.full()
            raise
        if expected_size:
            try:
                await upload.reserve(expected_size)
            except BaseException as exc:
                await upload.abort()
                if isinstance(exc, StoreFull):
                    self.full()
                raise
        return BlobWriter(digest, upload, expected_size, self)

    def buffer(self, digest: Digest, expected_size: int) -> BlobBuffer:
        """A small blob of a known size, gathered in memory (``BlobBuffer``)."""
        return BlobBuffer(digest, expected_size, self)

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store a small blob (manifests, configs) after verifying it."""
        blob = self.buffer(digest, len(data))
        blob.write(data)
        blob.verify()
        await blob.commit()

    async def put_stream(self, digest: Digest, chunks: AsyncIterator[bytes], expected_size: int | None = None) -> int:
        writer = await self.writer(digest, expected_size)
        try:
            async for chunk in chunks:
                await writer.write(chunk)
        except BaseException:
            await writer.abort()
            raise
        return await writer.finish()

    async def stat(self, digest: Digest) -> int | None:
        return await self.backend.stat(digest)

    async def read_small(self, digest: Digest) -> bytes:
        return await self.backend.read_small(digest)

    def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        return self.backend.read(digest, offset, length)

    async def delete(self, digest: Digest) -> bool:
        return await self.backend.delete(digest)

    def local_path(self, digest: Digest) -> Path | None:
        return self.backend.local_path(digest)
