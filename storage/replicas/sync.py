"""Bringing one replica's SQLite index in line with the bucket's shared records.

Replicas record images and tags in their own SQLite and publish them to the
bucket (``ReplicaIndex``); the pull path adopts a record on a local miss. What
the pull path cannot see is a record that *appeared* for a name this replica
never asked for, or one that another replica *removed* (``rmi``, eviction).
``ReplicaSync.sync`` settles both before ``images``, ``rmi``, ``save`` and
every lifecycle pass, so these give the same answer on every replica:

- an image record this replica lacks is adopted: its manifest is read from the
  bucket, checked against its digest and recorded, with the tags pointing at it;
- a local image whose record is gone is dropped from the index (rows only: the
  bytes are the shared GC's business) when the record was once seen in the
  bucket by this process, or when the image is older than ``UNPUBLISHED_AGE``
  (a publish follows a record within its request; one that has not happened
  by then never will, e.g. across a restart). A younger image never seen in the
  bucket is one whose publish is still on its way, and stays;
- tags follow the same rule, and a tag moved by another replica follows the
  record confirmed upstream most recently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from storage.backends.base import ReplicaIndex
from storage.blobs import BlobStore
from storage.errors import BlobUnknown, DigestInvalid, NameInvalid, RegcacheError
from storage.index.metadata import Metadata
from storage.index.replicas import Reconciliation, TagUpdate
from storage.index.rows import RepositoryName
from storage.oci.digest import Digest
from storage.oci.manifests import parse_manifest
from storage.oci.reference import validate_name, validate_tag

log = logging.getLogger("regcache.shared_sync")

UNPUBLISHED_AGE = 600.0
MAX_MANIFEST = 4 * 1024 * 1024


@dataclass(slots=True)
class SyncResult:
    adopted: int = 0
    dropped: int = 0
    tags: int = 0  # tag rows added, moved or removed

    @property
    def changed(self) -> bool:
        return bool(self.adopted or self.dropped or self.tags)


class ReplicaSync:
    def __init__(self, metadata: Metadata, store: BlobStore, index: ReplicaIndex) -> None:
        self.metadata = metadata
        self.store = store
        self.index = index

    async def sync(self) -> SyncResult:
        result = SyncResult()
        # The local snapshot comes first: a row recorded after it is not judged by this listing.
        started = time.time()
        local = {(i.upstream, i.repository, i.key.manifest): i for i in await self.metadata.replicas.images()}
        local_tags = {(t.upstream, t.repository, t.tag): t for t in await self.metadata.replicas.tags()}
        shared = {key async for key in self.index.images()}
        shared_tags = {(u, r, t): (m, checked) async for u, r, t, m, checked in self.index.tags()}

        present = set(local)
        for key in sorted(shared - present):
            if await self._adopt(*key):
                result.adopted += 1
                present.add(key)
        changes = Reconciliation([], [], [])
        for (upstream, repository, manifest), image in local.items():
            if (upstream, repository, manifest) in shared:
                continue
            if self.index.seen(upstream, repository, manifest) or image.first_pulled < started - UNPUBLISHED_AGE:
                changes.drop_images.append(image.key)
                present.discard((upstream, repository, manifest))
                result.dropped += 1
        for (upstream, repository, tag), (manifest, checked) in shared_tags.items():
            if (upstream, repository, manifest) not in present or not _valid_tag(tag):
                continue
            mine = local_tags.get((upstream, repository, tag))
            if mine is not None and (mine.manifest == manifest or mine.checked_at > checked):
                continue
            repo_id = await self.metadata.repository_id(upstream, repository)
            assert repo_id is not None
            changes.set_tags.append(TagUpdate(repo_id, tag, manifest, checked, started))
            result.tags += 1
        for (upstream, repository, tag), local_tag in local_tags.items():
            if (upstream, repository, tag) in shared_tags:
                continue
            if self.index.seen(upstream, repository, tag) or local_tag.updated_at < started - UNPUBLISHED_AGE:
                changes.drop_tags.append((local_tag.repository_id, tag))
                result.tags += 1
        await self.metadata.replicas.reconcile(changes)
        if result.changed:
            log.info("shared records: adopted %d image(s), dropped %d removed elsewhere, %d tag change(s)",
                     result.adopted, result.dropped, result.tags)
        return result

    async def _adopt(self, upstream: str, repository: str, manifest: str) -> bool:
        """Record an image another replica published, from the manifest bytes in the bucket."""
        try:
            validate_name(repository)  # records are read from a bucket others may write to
            digest = Digest.parse(manifest)
            size = await self.store.stat(digest)
            if size is None or size > MAX_MANIFEST:
                return False  # the record outlived its bytes; the shared GC settles it
            data = await self.store.read_small(digest)
            if str(Digest.of(data)) != manifest:
                log.error("stored manifest %s does not hash to its digest; not adopted", manifest)
                return False
            media_type = await self.index.get_image(upstream, repository, manifest)
            parsed = parse_manifest(data, media_type or "")
        except (BlobUnknown, DigestInvalid, NameInvalid) as exc:
            log.warning("cannot adopt %s/%s@%s: %s", upstream, repository, manifest, exc)
            return False
        except (RegcacheError, ValueError) as exc:
            log.warning("image record %s/%s@%s is not a manifest: %s", upstream, repository, manifest, exc)
            return False
        await self.metadata.record_manifest(RepositoryName(upstream, repository), manifest, len(data), parsed)
        return True


def _valid_tag(tag: str) -> bool:
    try:
        validate_tag(tag)
    except RegcacheError:
        return False
    return True
