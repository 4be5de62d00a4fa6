"""Reference counting, and removing images and blobs without breaking a pull.

A blob is live while an image row reaches it: the image's manifest, that
manifest's config and layers, an index's child manifests and everything they
reference. ``subject`` links do not count: a signature must not keep the image
it signs in the cache, nor the other way round.

Removal happens in two steps. First one SQLite transaction deletes the image
rows and every row that nothing live reaches any more (so a manifest recorded
at the same moment either sees the blob as live, or records it afresh).
Then the files go. Between the two a crash leaves files no row knows; the
startup recovery in ``storage.fsck`` adopts or removes them.

The pull path leases a digest (``InUse``) from just before it looks at the
store until the file is open for sending, or while it records a manifest. A
leased digest is never unlinked: its row is put back instead and a later sweep
takes it once the lease is gone. On a local disk the last check and the unlink
happen without yielding to the event loop, so no lease can slip in between.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage.blobs import BlobStore
from storage.errors import DigestInvalid
from storage.index.metadata import Metadata
from storage.index.rows import BlobRow, ImageKey
from storage.oci.digest import Digest

if TYPE_CHECKING:
    from storage.replicas.gc import ReplicaCollector


class Lease:
    """One user of a digest; ``release`` is idempotent."""

    __slots__ = ("_in_use", "digest", "expires", "token")

    def __init__(self, in_use: InUse, digest: str, token: int, expires: float) -> None:
        self._in_use = in_use
        self.digest = digest
        self.token = token
        self.expires = expires

    def release(self) -> None:
        self._in_use._release(self)


class InUse:
    """Digests the pull path is using now. Leases expire on their own after
    ``ttl`` seconds, so a lease whose release was lost cannot pin a blob forever."""

    def __init__(self, ttl: float = 120.0) -> None:
        self.ttl = ttl
        self._leases: dict[str, dict[int, float]] = defaultdict(dict)
        self._tokens = itertools.count()

    def lease(self, digest: str) -> Lease:
        lease = Lease(self, digest, next(self._tokens), time.monotonic() + self.ttl)
        self._leases[digest][lease.token] = lease.expires
        return lease

    @contextlib.contextmanager
    def hold(self, digest: str) -> Iterator[Lease]:
        lease = self.lease(digest)
        try:
            yield lease
        finally:
            lease.release()

    def _release(self, lease: Lease) -> None:
        held = self._leases.get(lease.digest)
        if held is not None:
            held.pop(lease.token, None)
            if not held:
                del self._leases[lease.digest]

    def busy(self, digest: str) -> bool:
        held = self._leases.get(digest)
        if not held:
            return False
        now = time.monotonic()
        for token, expires in list(held.items()):
            if expires <= now:
                del held[token]
        if not held:
            del self._leases[digest]
            return False
        return True

    def __len__(self) -> int:
        return len(self._leases)


@dataclass(slots=True)
class Unit:
    """What eviction removes at once: an image and, for an index, its platform
    images in the same repository (clients pull the index by tag, then the
    children by digest, which records them as images too), with the referrers
    of any of them in that repository (signatures, SBOMs, attestations and the
    fallback tag's index): they live while their subject lives, a pin of the
    subject covers them, and they go with it."""

    keys: list[ImageKey]
    last_pulled: float
    pinned: bool


@dataclass(slots=True)
class Removal:
    """What one removal took away."""

    images: list[ImageKey] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    manifests: int = 0
    deferred: int = 0  # in use: row kept, swept later
    skipped: bool = False  # a shared store's sweep was left to the replica holding its lease

    def add(self, other: Removal) -> None:
        self.images += other.images
        self.blobs += other.blobs
        self.bytes += other.bytes
        self.manifests += other.manifests
        self.deferred += other.deferred
        self.skipped = self.skipped or other.skipped


async def load_units(metadata: Metadata) -> list[Unit]:
    rows = await metadata.collect.images()
    children: dict[str, list[str]] = defaultdict(list)
    for parent, child in await metadata.collect.index_children():
        children[parent].append(child)
    for subject, referrer in await metadata.referrers.edges():
        children[subject].append(referrer)
    by_key = {row.key: (row.last_pulled, row.pinned) for row in rows}
    is_child = {
        ImageKey(key.repository_id, child)
        for key in by_key
        for child in children.get(key.manifest, ())
        if ImageKey(key.repository_id, child) in by_key and child != key.manifest
    }
    assigned: set[ImageKey] = set()
    units = []
    for key in by_key:
        if key in is_child:
            continue
        keys = [key]
        assigned.add(key)
        stack = [key.manifest]
        while stack:
            for child in children.get(stack.pop(), ()):
                child_key = ImageKey(key.repository_id, child)
                if child_key in by_key and child_key not in assigned:
                    assigned.add(child_key)
                    keys.append(child_key)
                    stack.append(child)
        units.append(_unit(keys, by_key))
    # Rows only reachable through a cycle of indexes (never seen in practice) stay units of their own.
    units += [_unit([key], by_key) for key in by_key if key not in assigned]
    return units


def _unit(keys: list[ImageKey], by_key: dict[ImageKey, tuple[float, bool]]) -> Unit:
    return Unit(keys, max(by_key[k][0] for k in keys), any(by_key[k][1] for k in keys))


async def plan_eviction(metadata: Metadata, units: list[Unit], total: int, target: int) -> list[Unit]:
    """Unpinned units, least recently pulled first, until what stays fits ``target``.

    The bytes a unit frees are counted with reference counts over every image
    row, so a layer shared with an image that stays frees nothing.
    """
    edges: dict[str, list[str]] = defaultdict(list)
    for parent, child in await metadata.collect.references():
        edges[parent].append(child)
    sizes = await metadata.blob_sizes()
    memo: dict[str, frozenset[str]] = {}

    def closure(manifest: str) -> frozenset[str]:
        found = memo.get(manifest)
        if found is None:
            seen = {manifest}
            stack = [manifest]
            while stack:
                for child in edges.get(stack.pop(), ()):
                    if child not in seen:
                        seen.add(child)
                        stack.append(child)
            found = memo[manifest] = frozenset(seen)
        return found

    refs: Counter[str] = Counter()
    for unit in units:
        for key in unit.keys:
            refs.update(closure(key.manifest))
    chosen: list[Unit] = []
    freed = 0
    for unit in sorted(units, key=lambda u: u.last_pulled):
        if total - freed <= target:
            break
        if unit.pinned:
            continue
        chosen.append(unit)
        for key in unit.keys:
            for digest in closure(key.manifest):
                refs[digest] -= 1
                if refs[digest] == 0:
                    freed += sizes.get(digest, 0)
    return chosen


class Collector:
    """Removes image rows and whatever they alone kept alive; sweeps the rest.

    On a store shared by replicas (``shared``) the rows are this replica's
    index only: which bytes may leave the bucket is decided over every
    replica's image records by ``storage.shared_gc``.
    """

    def __init__(
        self, metadata: Metadata, store: BlobStore, in_use: InUse, shared: ReplicaCollector | None = None
    ) -> None:
        self.metadata = metadata
        self.store = store
        self.in_use = in_use
        self.shared = shared

    async def remove(self, keys: Iterable[ImageKey]) -> Removal:
        """Delete these image rows (and their tags) and every blob only they reached."""
        keys = list(keys)
        if not keys:
            return Removal()
        dropped = await self.metadata.collect.remove_images(keys)
        result = Removal(images=dropped.images, manifests=dropped.manifests)
        if self.shared is not None:
            return await self.shared.release(dropped.images, dropped.blobs, result)
        return await self._unlink(result, dropped.blobs)

    async def sweep(self, grace: float) -> Removal:
        """Remove blobs and manifests nothing live reaches, created more than ``grace`` seconds ago.

        The grace period covers content that is referenced only a moment
        after it lands: a blob fetched before its manifest is recorded, an
        archive being loaded blob by blob.
        """
        if self.shared is not None:
            return await self.shared.sweep(grace)
        dropped = await self.metadata.collect.drop_unreachable(time.time() - grace, self.in_use.busy)
        return await self._unlink(Removal(manifests=dropped.manifests), dropped.blobs)

    async def _unlink(self, result: Removal, doomed: list[BlobRow]) -> Removal:
        restore = []
        for row in doomed:
            if row.size is None:
                continue  # a row without bytes
            try:
                digest = Digest.parse(row.digest)
            except DigestInvalid:
                continue
            if self.in_use.busy(row.digest):
                restore.append(row)
                continue
            path = self.store.local_path(digest)
            if path is not None:
                # No await between the lease check and the unlink.
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
            elif not await self.store.delete(digest):
                continue
            result.blobs += 1
            result.bytes += row.size
        if restore:
            await self.metadata.restore_blobs(restore)
            result.deferred += len(restore)
        return result
