"""What the pull-through answers: manifests, and blobs in their three states.

Plain data, so handlers can turn each into a response without knowing how it
was obtained.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from proxy.pull.fill import Fill
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


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A committed blob in a remote store: streamed, or redirected to."""

    digest: str
    size: int
    redirect: str | None


@dataclass(frozen=True, slots=True)
class FillingBlob:
    """A blob on its way from the upstream; ``fill.tail()`` gives its bytes."""

    digest: str
    fill: Fill
    result: str  # miss or coalesced


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
