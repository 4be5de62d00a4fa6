"""The referrers API (OCI 1.1) through the cache: local or upstream, for referrers.

The answer is always the cache's own: the manifests held in the repository whose
``subject`` is the digest (fetched, pulled or loaded). Within the upstream's tag
TTL nothing else is asked; past it the upstream is asked once (single flight) what
it lists — through its referrers API, or where it has none through the fallback
tag ``<alg>-<hex>`` (a tag like any other: TTL, revalidation and stale copies are
``PullThrough``'s) — and every listed manifest the cache lacks is fetched by
digest, with its blobs prefetched, so the answer also holds when the upstream is
down. What the upstream no longer lists stays in the cache until its subject goes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from proxy.errors import ManifestTooLarge, UpstreamError, UpstreamNotFound
from proxy.pull.routing import Route
from proxy.pull.service import STALE_OK, PullThrough, failure_kind
from proxy.pull.singleflight import SingleFlight
from storage.errors import BlobUnknown, DigestMismatch, ManifestInvalid, ManifestUnknown
from storage.oci.digest import Digest
from storage.oci.reference import ManifestReference
from storage.oci.referrers import Referrer, fallback_tag, referrer_of, referrers_in_index

log = logging.getLogger("regcache.referrers")

# What a listed referrer the cache cannot fetch raises: it is left out, the others are served.
_SKIPPED = (ManifestUnknown, ManifestInvalid, ManifestTooLarge, DigestMismatch, UpstreamError, BlobUnknown)


@dataclass(frozen=True, slots=True)
class ReferrersAnswer:
    referrers: list[Referrer]  # in digest order
    result: str  # hit (within the TTL), miss (first asked), revalidated, stale


class Referrers:
    def __init__(self, pull: PullThrough) -> None:
        self.pull = pull
        self._flight: SingleFlight[str] = SingleFlight()
        # Upstreams that answered the API with 404: asked through the fallback tag only,
        # until a restart (a registry may be upgraded).
        self._without_api: set[str] = set()

    async def answer(self, route: Route, subject: Digest) -> ReferrersAnswer:
        metadata = self.pull.metadata
        key = str(subject)
        # No row yet: nothing of this repository was ever recorded, so nothing was checked either.
        repo_id = await metadata.repository_id(route.upstream_name, route.repository)
        checked = None if repo_id is None else await metadata.referrers.checked_at(repo_id, key)
        result = "hit"
        if checked is None or time.time() - checked >= route.upstream.tag_ttl:
            result, _ = await self._flight.do(
                (route.upstream_name, route.repository, key), lambda: self._refresh(route, subject, checked)
            )
            # The refresh may have recorded the repository's first content.
            repo_id = await metadata.repository_id(route.upstream_name, route.repository)
        referrers = []
        for row in [] if repo_id is None else await metadata.referrers.referrers(repo_id, key):
            stored = await self.pull.stored_manifest(row.digest)
            if stored is not None:
                referrers.append(referrer_of(row.digest, row.media_type, stored[1]))
        return ReferrersAnswer(referrers, result)

    async def _refresh(self, route: Route, subject: Digest, checked: float | None) -> str:
        metadata = self.pull.metadata
        key = str(subject)
        repo_id = await metadata.repository_id(route.upstream_name, route.repository)
        try:
            listed = await self._upstream_list(route, subject)
        except (*STALE_OK, UpstreamError) as exc:
            # Nothing known here about this subject: there is no cached answer to serve.
            known = repo_id is not None and (
                await metadata.has_image(repo_id, key) or bool(await metadata.referrers.referrers(repo_id, key))
            )
            if checked is None and not known:
                raise
            self.pull.events.stale(route.upstream_name, failure_kind(exc))
            log.warning("serving cached referrers of %s/%s@%s: upstream %s",
                        route.upstream_name, route.repository, key, failure_kind(exc))
            return "stale"
        for referrer in listed:
            if repo_id is not None and await metadata.has_image(repo_id, referrer.digest):
                continue
            reference = ManifestReference(digest=Digest.parse(referrer.digest))
            try:
                await self.pull.manifest(route, reference, [], count=False, prefetch=True)
            except _SKIPPED as exc:
                log.warning("referrer %s of %s/%s@%s left out: %s", referrer.digest, route.upstream_name,
                            route.repository, key, exc)
        # A repository that holds nothing gets no row for a check (any client may ask for any
        # name): its next request asks the upstream again.
        repo_id = await metadata.repository_id(route.upstream_name, route.repository)
        if repo_id is not None:
            await metadata.referrers.confirm(repo_id, key)
        return "miss" if checked is None else "revalidated"

    async def _upstream_list(self, route: Route, subject: Digest) -> list[Referrer]:
        if route.upstream_name not in self._without_api:
            try:
                return await self.pull.upstreams[route.upstream_name].referrers(route.repository, str(subject))
            except UpstreamNotFound:
                self._without_api.add(route.upstream_name)
        try:
            found = await self.pull.manifest(route, ManifestReference(tag=fallback_tag(subject)), [], count=False)
        except ManifestUnknown:
            return []  # no fallback tag: nothing refers to the subject there
        try:
            return referrers_in_index(found.data)
        except ManifestInvalid as exc:
            log.warning("fallback tag %s of %s/%s is not a referrers index: %s", fallback_tag(subject),
                        route.upstream_name, route.repository, exc)
            return []
