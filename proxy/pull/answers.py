"""What the pull-through answers: manifests, and blobs in their three states.

A blob answer is all a consumer (the /v2 handlers, admin pull, save) gets:
a file to send by path, a stored body to stream or redirect to, or a body
that yields verified bytes (or spool slices) as they land. ``stored()`` on
any of them waits until the blob is in the store. Consumers never see a
fill, a writer or the store.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

from proxy.pull.fill import Fill, SpoolSlice
from proxy.tracing import span
from proxy.upstream.responses import BlobStream
from storage.lifecycle.gc import Lease


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    data: bytes
    result: str  # hit, miss, stale, revalidated, coalesced


@dataclass(frozen=True, slots=True)
class LocalBlob:
    """A committed blob on a local disk: served by sendfile."""

    digest: str
    size: int
    path: Path
    # Held until the file is open for sending: GC never unlinks it before.
    lease: Lease | None = field(default=None, compare=False)

    @property
    def result(self) -> str:
        return "hit"

    async def stored(self) -> int:
        """For a consumer that sends nothing: lets go of the file."""
        if self.lease is not None:
            self.lease.release()
        return self.size


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A committed blob in a remote store: streamed, or redirected to."""

    digest: str
    size: int
    redirect: str | None
    # (offset, length or None for the rest) -> the stored bytes
    reader: Callable[[int, int | None], AsyncGenerator[bytes, None]] = field(compare=False)

    @property
    def result(self) -> str:
        return "hit"

    def chunks(self) -> AsyncGenerator[bytes, None]:
        return self.reader(0, None)

    def read(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        return self.reader(offset, length)

    async def stored(self) -> int:
        return self.size


# (start, length, size of the blob) -> the upstream's own 206 of those bytes, or None
# when the upstream ignores Range (``UpstreamClient.open_blob_range`` for one repository).
RangeFetcher = Callable[[int, int, int], AbstractAsyncContextManager[BlobStream | None]]


class FillingBlob:
    """A blob on its way from the upstream, as one of its readers sees it.

    Which bytes are verified when: a whole blob is read from the spool and its last
    byte waits for the digest check, so a client never sees the clean end of a wrong
    blob. A range cannot be checked against the digest (only the whole blob can): its
    bytes come from the spool if they have landed, else from the upstream's own 206,
    exactly as trustworthy as the same range asked of the upstream directly. Range
    bytes are never stored; the store only ever gets the fill's verified whole blob.
    """

    __slots__ = ("_fetch_range", "_fill", "digest", "result")

    def __init__(self, fill: Fill, result: str, fetch_range: RangeFetcher) -> None:
        self._fill = fill
        self._fetch_range = fetch_range
        self.digest = str(fill.digest)
        self.result = result  # miss or coalesced

    async def opened(self) -> int | None:
        """Waits until headers may go out; the size when known. Raises if the fetch failed."""
        with span("fill wait", {"regcache.digest": self.digest}):
            return await self._fill.opened()

    def slices(self) -> AsyncGenerator[SpoolSlice, None] | None:
        """After ``opened``: spool slices as they land (for sendfile), or None when the
        blob is to be read with ``chunks`` (another replica stored it first)."""
        return self._fill.slices()

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """Verified bytes as they land; the last one once the whole blob is verified.
        Raises (never ends cleanly) if the fetch fails."""
        return self._fill.chunks()

    async def read(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """After ``opened`` gave a size: ``length`` bytes from ``offset``, as soon as they can
        be had (see the class). Raises (never ends cleanly) if they cannot."""
        fill = self._fill
        if not fill.covers(offset, length):
            assert fill.size is not None
            async with self._fetch_range(offset, length, fill.size) as stream:
                if stream is not None:
                    async for chunk in stream.chunks:
                        yield chunk
                    return
        # Landed already, or the upstream ignores Range: its bytes arrive with the fill.
        async for chunk in fill.read(offset, length):
            yield chunk

    async def stored(self) -> int:
        """The size once the blob is in the store and recorded; raises if the fill failed.
        Reading every byte does not mean this: the commit follows the last byte."""
        return await self._fill.committed()


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: str
    size: int | None


BlobAnswer = LocalBlob | StoredBlob | FillingBlob


class ManifestCache:
    """Recently served manifests by digest, bounded by bytes."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, digest: str) -> tuple[str, bytes] | None:
        item = self._items.get(digest)
        if item is not None:
            self._items.move_to_end(digest)
        return item

    def put(self, digest: str, media_type: str, data: bytes) -> None:
        if digest in self._items:
            return
        self._items[digest] = (media_type, data)
        self._bytes += len(data)
        while self._bytes > self.max_bytes and self._items:
            _, (_, old) = self._items.popitem(last=False)
            self._bytes -= len(old)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


def page(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The ``n``/``last`` paging of the distribution spec over a sorted list."""
    items = sorted(items)
    if last is not None:
        items = [i for i in items if i > last]
    if n is None:
        return items, False
    return items[:n], len(items) > n
