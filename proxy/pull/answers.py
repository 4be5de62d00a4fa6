"""What the pull-through answers: manifests, and blobs in their three states.

A blob answer is all a consumer (the /v2 handlers, admin pull, save) gets:
a file to send by path, a stored body to stream or redirect to, or a body
that yields verified bytes (or spool slices) as they land. ``stored()`` on
any of them waits until the blob is in the store. Consumers never see a
fill, a writer or the store.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from proxy.errors import UpstreamError, UpstreamNotFound
from proxy.pull.fill import Fill
from proxy.tracing import span
from proxy.upstream.responses import BlobPart
from storage.backends.base import BlockingBody
from storage.errors import BlobUnknown
from storage.lifecycle.gc import Lease
from storage.progress import SpoolFollower


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
    # The whole blob for a thread to copy to the client, if the backend can (BlobBackend.open_body).
    opener: Callable[[], Awaitable[BlockingBody | None]] | None = field(default=None, compare=False)

    @property
    def result(self) -> str:
        return "hit"

    def chunks(self) -> AsyncGenerator[bytes, None]:
        return self.reader(0, None)

    def read(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        return self.reader(offset, length)

    async def open_body(self) -> BlockingBody | None:
        return None if self.opener is None else await self.opener()

    async def stored(self) -> int:
        return self.size


# A range spec (``a-b``, ``a-``, ``-n``) -> the upstream's own answer to it, or None when the
# upstream ignores Range (``UpstreamClient.open_blob_range`` for one repository).
RangeFetcher = Callable[[str], AbstractAsyncContextManager[BlobPart | None]]

log = logging.getLogger("regcache.pullthrough")


class Span(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...


class AskedRange(Protocol):
    """One range as a client asked for it (``proxy.http.ranges.RangeSpec``): ``str()`` is
    its spec (``a-b``, ``a-``, ``-n``)."""

    def resolve(self, size: int) -> Span | None: ...


class FillingBlob:
    """A blob on its way from the upstream, as one of its readers sees it.

    Which bytes are verified when: a whole blob is read from the spool and its last
    byte waits for the digest check, so a client never sees the clean end of a wrong
    blob. A range cannot be checked against the digest (only the whole blob can): its
    bytes come from the spool if they have landed, else from the upstream's own 206,
    exactly as trustworthy as the same range asked of the upstream directly. Range
    bytes are never stored; the store only ever gets the fill's verified whole blob.

    A range of a blob whose fill has not heard from the upstream yet does not wait for
    it: ``sized`` sends the client's first range to the upstream as asked (a suffix
    needs no size) alongside the fill's GET, and takes the size from the answer.
    """

    __slots__ = ("_early", "_fetch_range", "_fill", "_size", "digest", "result")

    def __init__(self, fill: Fill, result: str, fetch_range: RangeFetcher) -> None:
        self._fill = fill
        self._fetch_range = fetch_range
        self._early: tuple[BlobPart, contextlib.AsyncExitStack] | None = None
        self._size: int | None = None  # as the upstream's answer to ``sized`` said
        self.digest = str(fill.digest)
        self.result = result  # miss or coalesced

    async def opened(self) -> int | None:
        """Waits until headers may go out; the size when known. Raises if the fetch failed."""
        with span("fill wait", {"regcache.digest": self.digest}):
            return await self._fill.opened()

    async def sized(self, first: AskedRange) -> int | None:
        """For a range request: the size to resolve its ranges against, as soon as it is known.

        When the fill has not opened yet, ``first`` (the request's first range) goes to the
        upstream at once and its answer says the size; its bytes are kept for ``read``
        (``release`` lets go of them if unused). Falls back to waiting for the fill when
        the upstream ignores Range or that request fails otherwise than with a 404."""
        if self._fill.started:
            return await self.opened()
        stack = contextlib.AsyncExitStack()
        try:
            part = await stack.enter_async_context(self._fetch_range(str(first)))
        except UpstreamNotFound:
            await stack.aclose()
            raise BlobUnknown(f"blob {self.digest} unknown to the upstream") from None
        except Exception as exc:  # the fill's own GET says whether the blob can be had
            await stack.aclose()
            log.debug("range of %s from the upstream failed (%s); waiting for the fill", self.digest, exc)
            return await self.opened()
        if part is None:
            await stack.aclose()
            return await self.opened()
        expected = first.resolve(part.size)
        if (expected is None and part.length) or (
                expected is not None and (expected.start, expected.length) != (part.start, part.length)):
            await stack.aclose()
            log.warning("upstream answered %s-%s/%s to a request for bytes=%s of %s; waiting for the fill",
                        part.start, part.start + part.length - 1, part.size, first, self.digest)
            return await self.opened()
        if part.length:
            self._early = part, stack
        else:
            await stack.aclose()
        self._size = part.size
        return part.size

    async def release(self) -> None:
        """Lets go of an upstream answer ``sized`` kept that ``read`` did not take."""
        early, self._early = self._early, None
        if early is not None:
            await early[1].aclose()

    def follower(self) -> SpoolFollower | None:
        """After ``opened``: the spool, for a thread that sends its bytes as they land
        (``proxy.http.filesend``); None when the blob is to be read with ``chunks``."""
        return self._fill.follower()

    async def failure(self, cause: BaseException) -> BaseException:
        """Why a follower was told the fill failed (``cause``): the fill's own error."""
        return await self._fill.failure(cause)

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """Verified bytes as they land; the last one once the whole blob is verified.
        Raises (never ends cleanly) if the fetch fails."""
        return self._fill.chunks()

    async def read(self, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """After ``opened`` or ``sized`` gave a size: ``length`` bytes from ``offset``, as soon
        as they can be had (see the class). Raises (never ends cleanly) if they cannot."""
        early, self._early = self._early, None
        if early is not None:
            # Good for the first part only: an upstream answer is not held open behind others.
            async with early[1]:
                if (early[0].start, early[0].length) == (offset, length):
                    async for chunk in early[0].chunks:
                        yield chunk
                    return
        fill = self._fill
        if not fill.covers(offset, length):
            size = self._size if self._size is not None else await self.opened()
            async with self._fetch_range(f"{offset}-{offset + length - 1}") as part:
                if part is not None:
                    if (part.start, part.length, part.size) != (offset, length, size):
                        raise UpstreamError(f"upstream answered {part.start}-{part.start + part.length - 1}/"
                                            f"{part.size} to a request for {offset}-{offset + length - 1}/{size}")
                    async for chunk in part.chunks:
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
