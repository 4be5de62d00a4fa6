"""GC of a store that several replicas share (the S3 backend).

On a shared bucket no replica's SQLite knows every image, so the rule "a blob
nothing live reaches may go" is evaluated over the bucket's image records
(``ReplicaIndex.images``), the shared truth: the live set is every recorded
manifest and the closure of what it references (config, layers, an index's
child manifests; never ``subject``), with manifests read from the bucket where
this replica has no rows for them (manifests are immutable, so local rows and
an in-memory memo answer for the bucket's bytes).

What keeps a sweep from deleting what another replica needs:

- one replica sweeps at a time: the ``leases/gc`` lease (``storage.backends.s3.leases``), renewed
  while the sweep runs and taken over only after its holder stops renewing;
- an object younger than ``gc_grace`` (by its LastModified, on the store's
  clock) is never deleted: it may be a fill whose manifest is about to be
  recorded, or part of an archive being loaded;
- a replica records (and publishes) a manifest before its clients ask for the
  blobs it references, and the image records are listed a second time after
  the candidates are chosen, so an image recorded while the sweep runs keeps
  its blobs;
- this replica's in-process ``InUse`` leases (a fill recording, a stat about
  to answer) are honoured as on a local disk.

A GET already streaming from the store is not cut by a delete (RGW reclaims
the data of a deleted object only after its own gc delay; S3 completes
in-flight reads), so a blob served at the moment an image is removed
elsewhere still reaches its client.

``rmi`` and eviction remove the image records at once (every replica's next
listing drops the image) and delete the blobs they alone reached under the
same rules; what the rules keep waits for a later sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from storage.backends.base import ReplicaIndex
from storage.blobs import BlobStore
from storage.errors import BlobUnknown, DigestInvalid, RegcacheError
from storage.index.metadata import Metadata
from storage.index.rows import BlobRow, ImageKey
from storage.lifecycle.gc import InUse, Removal
from storage.oci.digest import Digest
from storage.oci.manifests import parse_manifest

log = logging.getLogger("regcache.shared_gc")

# A manifest larger than this is not read to find its references (distribution caps them at 4 MiB).
MAX_MANIFEST = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Candidate:
    digest: str
    size: int


class ReplicaCollector:
    def __init__(self, metadata: Metadata, store: BlobStore, in_use: InUse, index: ReplicaIndex, grace: float) -> None:
        self.metadata = metadata
        self.grace = grace  # for rmi and eviction; a sweep is given its own
        self.store = store
        self.in_use = in_use
        self.index = index
        self._references: dict[str, tuple[tuple[str, bool], ...]] = {}  # manifest -> (child, is manifest)

    # The live set -----------------------------------------------------------------

    async def live(self) -> set[str]:
        """Every digest an image record in the bucket reaches."""
        roots = {digest async for _, _, digest in self.index.images()}
        return await self._closure(roots)

    async def _closure(self, manifests: Iterable[str]) -> set[str]:
        live: set[str] = set()
        stack = [(digest, True) for digest in manifests]
        while stack:
            digest, is_manifest = stack.pop()
            if digest in live:
                continue
            live.add(digest)
            if is_manifest:
                stack += [ref for ref in await self._children(digest) if ref[0] not in live]
        return live

    async def _children(self, manifest: str) -> tuple[tuple[str, bool], ...]:
        known = self._references.get(manifest)
        if known is not None:
            return known
        found = await self.metadata.replicas.references(manifest)
        if found is None:
            found = await self._children_from_store(manifest)
            if found is None:
                return ()  # not readable now: nothing to memo
        self._references[manifest] = found
        return found

    async def _children_from_store(self, manifest: str) -> tuple[tuple[str, bool], ...] | None:
        try:
            digest = Digest.parse(manifest)
            size = await self.store.stat(digest)
            if size is None or size > MAX_MANIFEST:
                return None
            data = await self.store.read_small(digest)
        except (BlobUnknown, DigestInvalid):
            return None
        if str(Digest.of(data)) != manifest:
            log.error("stored manifest %s does not hash to its digest; its references are not counted", manifest)
            return None
        try:
            parsed = parse_manifest(data, "")
        except (RegcacheError, ValueError) as exc:
            log.warning("image record %s is not a manifest (%s); it keeps only itself alive", manifest, exc)
            return ()
        return tuple((str(r.digest), r.kind == "manifest") for r in parsed.references if r.kind != "subject")

    # Deleting -------------------------------------------------------------------------

    async def sweep(self, grace: float) -> Removal:
        """Delete every blob no image record reaches that is older than ``grace``; one replica at a time."""
        lease = await self.store.backend.acquire_sweep_lease()
        if lease is None:
            log.info("another replica is sweeping the shared store; this pass leaves it alone")
            return Removal(skipped=True)
        try:
            cutoff = await self.store.backend.now() - grace
            old = [
                Candidate(str(digest), size)
                async for digest, size, modified in self.store.backend.list_with_times()
                if modified < cutoff
            ]
            return await self._delete_unreachable(old)
        finally:
            await lease.release()

    async def release(self, removed: list[ImageKey], doomed: list[BlobRow], result: Removal) -> Removal:
        """After ``Collector.remove`` dropped local rows: forget the image records, then delete
        the blobs no other replica's image reaches (older than ``grace``; the rest waits for a sweep)."""
        names = await self.metadata.repository_names() if removed else {}
        for key in removed:
            upstream, repository = names.get(key.repository_id, (None, None))
            if upstream is None or repository is None:
                continue
            await self.index.delete_image(upstream, repository, key.manifest)
        # Rows without a size too: an adopted image has rows for its manifest only.
        sized = sorted({row.digest for row in doomed})
        if not sized:
            return result
        lease = await self.store.backend.acquire_sweep_lease()
        if lease is None:
            result.deferred += len(sized)  # the replica sweeping now, or the next sweep, takes them
            return result
        try:
            cutoff = await self.store.backend.now() - self.grace
            old: list[Candidate] = []
            for digest in sized:
                try:
                    found = await self.store.backend.stat_with_time(Digest.parse(digest))
                except DigestInvalid:
                    continue
                if found is None:
                    continue
                if found[1] < cutoff:
                    old.append(Candidate(digest, found[0]))
                else:
                    result.deferred += 1
            result.add(await self._delete_unreachable(old))
            return result
        finally:
            await lease.release()

    async def _delete_unreachable(self, candidates: list[Candidate]) -> Removal:
        removal = Removal()
        if not candidates:
            return removal
        live = await self.live()
        doomed = [c for c in candidates if c.digest not in live]
        if doomed:
            # A second look: an image recorded by another replica while the first listing ran.
            live |= await self.live()
        deleted: list[str] = []
        for candidate in doomed:
            if candidate.digest in live:
                continue
            if self.in_use.busy(candidate.digest):
                removal.deferred += 1
                continue
            if await self.store.delete(Digest.parse(candidate.digest)):
                deleted.append(candidate.digest)
                removal.blobs += 1
                removal.bytes += candidate.size
        if deleted:
            removal.manifests += await self.metadata.replicas.forget_blobs(deleted)
            for digest in deleted:
                self._references.pop(digest, None)
        return removal
