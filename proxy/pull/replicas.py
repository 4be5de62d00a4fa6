"""Tag and image records of the replicas on one object store, seen from the pull path.

``PullThrough`` publishes every manifest it records (and every tag it
confirms) here, and on a local SQLite miss looks here before it asks the
upstream. What it finds is adopted into the local index as if this replica had
fetched it, because another replica did: the manifest bytes are in the shared
store under their digest and are checked against it again on the way in.

Records are an agreement, not the bytes: a store that cannot read or write one
(``StoreUnavailable``) is logged and the request goes on as a single replica
would (ask the upstream). Any other error is a bug and propagates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from proxy.pull.routing import Route
from storage.backends.base import ReplicaIndex
from storage.blobs import BlobStore
from storage.errors import BlobUnknown, DigestInvalid, StoreUnavailable
from storage.oci.digest import Digest

log = logging.getLogger("regcache.replicas")


@dataclass(frozen=True, slots=True)
class ReplicaManifest:
    digest: str
    media_type: str
    data: bytes
    checked_at: float | None  # for a tag: when a replica last confirmed it upstream


class SharedNames:
    def __init__(self, index: ReplicaIndex, store: BlobStore) -> None:
        self.index = index
        self.store = store

    async def publish(self, route: Route, digest: str, media_type: str, tag: str | None, checked_at: float) -> None:
        try:
            await self.index.put_image(route.upstream_name, route.repository, digest, media_type)
            if tag is not None:
                await self.index.put_tag(route.upstream_name, route.repository, tag, digest, checked_at)
        except StoreUnavailable as exc:
            log.warning("could not publish %s/%s@%s to the replica records: %s",
                        route.upstream_name, route.repository, digest, exc)

    async def confirm_tag(self, route: Route, tag: str, digest: str, checked_at: float) -> None:
        try:
            await self.index.put_tag(route.upstream_name, route.repository, tag, digest, checked_at)
        except StoreUnavailable as exc:
            log.warning("could not publish tag %s/%s:%s: %s", route.upstream_name, route.repository, tag, exc)

    async def image(self, route: Route, digest: str) -> ReplicaManifest | None:
        """A manifest another replica recorded for this repository, with its verified bytes."""
        try:
            media_type = await self.index.get_image(route.upstream_name, route.repository, digest)
            if media_type is None:
                return None
            parsed = Digest.parse(digest)
            data = await self.store.read_small(parsed)
        except BlobUnknown:
            return None  # the record outlived its bytes (GC on another replica)
        except DigestInvalid as exc:  # a tag record names the digest, and others write the bucket
            log.warning("replica record for %s/%s names %r: %s", route.upstream_name, route.repository, digest, exc)
            return None
        except StoreUnavailable as exc:
            log.warning("replica records unreadable for %s/%s@%s: %s",
                        route.upstream_name, route.repository, digest, exc)
            return None
        if str(Digest.of(data)) != digest:
            log.error("stored manifest %s does not hash to its digest; ignoring it", digest)
            return None
        return ReplicaManifest(digest, media_type, data, None)

    async def tag(self, route: Route, tag: str) -> ReplicaManifest | None:
        try:
            found = await self.index.get_tag(route.upstream_name, route.repository, tag)
        except StoreUnavailable as exc:
            log.warning("replica records unreadable for %s/%s:%s: %s", route.upstream_name, route.repository, tag, exc)
            return None
        if found is None:
            return None
        digest, checked_at = found
        image = await self.image(route, digest)
        if image is None:
            return None
        return ReplicaManifest(image.digest, image.media_type, image.data, checked_at)
