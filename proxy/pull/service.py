"""The cache logic: the one place that decides "local or upstream".

Handlers ask for a manifest or a blob of a routed repository; this module
answers from the store when it can, from the upstream when it must, and
records what it learned. It never builds an HTTP response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

from proxy.errors import (
    UpstreamDigestMismatch,
    UpstreamError,
    UpstreamNotFound,
    UpstreamTooManyRequests,
    UpstreamUnavailable,
)
from proxy.metrics.events import Content, Events
from proxy.pull.answers import (
    BlobAnswer,
    BlobInfo,
    FillingBlob,
    LocalBlob,
    Manifest,
    ManifestCache,
    RangeFetcher,
    StoredBlob,
    page,
)
from proxy.pull.fill import Fill
from proxy.pull.fills import Fills
from proxy.pull.links import Links
from proxy.pull.negative import MissingTags
from proxy.pull.prefetch import Prefetcher
from proxy.pull.replicas import SharedNames
from proxy.pull.routing import Route
from proxy.pull.singleflight import SingleFlight
from proxy.upstream.client import UpstreamClient
from storage.blobs import BlobStore
from storage.errors import BlobUnknown, ManifestUnknown, NameUnknown
from storage.index.metadata import Metadata, TagRow
from storage.lifecycle.gc import InUse
from storage.oci.digest import Digest
from storage.oci.manifests import UPSTREAM_ACCEPT, ParsedManifest, accepts, parse_manifest
from storage.oci.reference import ManifestReference

log = logging.getLogger("regcache.pullthrough")

# Upstream failures after which a stale tag is still served.
STALE_OK = (UpstreamUnavailable, UpstreamTooManyRequests, TimeoutError)
# Tag rows kept in memory (a few dozen bytes each); past this the cache starts over.
MAX_CACHED_TAGS = 100_000


@dataclass(frozen=True, slots=True)
class RecordedManifest:
    """A manifest put in the store outside a fill (a load), and where it lands."""

    route: Route
    digest: str
    size: int
    parsed: ParsedManifest
    tag: str | None


class PullThrough:
    def __init__(
        self,
        store: BlobStore,
        metadata: Metadata,
        upstreams: dict[str, UpstreamClient],
        events: Events,
        *,
        fill_timeout: float = 3600.0,
        max_manifest_size: int = 4 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.upstreams = upstreams
        self.events = events
        self.links = Links()
        self.fills = Fills(store, metadata, events, self.links, fill_timeout)
        self.prefetcher = Prefetcher(self._prefetch_blob)
        self.max_manifest_size = max_manifest_size
        self.manifests = ManifestCache()
        self._manifest_flight: SingleFlight[Manifest] = SingleFlight()
        self.missing_tags = MissingTags()  # upstream 404s for tags, for negative_ttl
        # Tag rows as last read from SQLite, so a cached tag costs no query; any
        # write of a tag here drops its entry, forget() drops them all.
        self._tags: dict[tuple[int, str], TagRow] = {}
        self._tags_generation = 0
        self.in_use = InUse()  # digests GC must leave alone (storage.gc)
        # Tag and image records shared with other replicas on the same object store.
        self.shared = SharedNames(store.backend.shared, store) if store.backend.shared is not None else None

    def forget(self) -> None:
        """Drop in-memory knowledge after rmi, eviction or load changed the store."""
        self.manifests.clear()
        self.links.clear()
        self._tags.clear()
        self.missing_tags.clear()
        self._tags_generation += 1

    async def store_changed(self, blobs: dict[str, int] | None = None,
                            manifests: Sequence[RecordedManifest] = ()) -> None:
        """The store changed outside a fill (load, rmi): record what was added (``blobs``
        by digest with their sizes, and pinned ``manifests``, in one transaction), tell
        the other replicas on this store, and drop what this process remembers."""
        if blobs or manifests:
            rows = [(m.route.repository_name, m.digest, m.size, m.parsed, m.tag) for m in manifests]
            await self.metadata.record_images(blobs or {}, rows)
        for m in manifests:
            self.events.loaded(Content(m.route.upstream_name, m.route.repository, m.digest, m.parsed.media_type,
                                       m.size, m.tag))
            # Replicas on the same bucket see loaded images, and the shared GC keeps their blobs.
            await self._publish(m.route, m.digest, m.parsed.media_type, m.tag)
        self.forget()

    async def settle(self) -> None:
        """Wait until what runs in the background (manifest fetches and revalidations a
        client stopped waiting for, prefetches, fills) has ended."""
        await self._manifest_flight.settle()
        await self.prefetcher.settle()
        await self.fills.settle()

    async def close(self) -> None:
        await self.prefetcher.close()
        await self.fills.close()

    def _client(self, route: Route) -> UpstreamClient:
        return self.upstreams[route.upstream_name]

    def _repository(self, route: Route) -> Awaitable[int | None]:
        """The repository's id; None while nothing is recorded in it (a request makes no row).
        Metadata's own coroutine, not one more around it: every manifest asks twice."""
        return self.metadata.repository_id(route.upstream_name, route.repository)

    # Manifests ---------------------------------------------------------------

    async def manifest(
        self, route: Route, reference: ManifestReference, accept: Sequence[str], count: bool = True,
        prefetch: bool = False, puller: str | None = None,
    ) -> Manifest:
        """A manifest for a client; ``prefetch`` (a client's GET): when it came from the
        upstream, its blobs are fetched before the client asks (proxy.prefetch). ``puller``:
        the client's identity as the access log names it, kept as the image's last puller."""
        if reference.digest is not None:
            found = await self._manifest_by_digest(route, str(reference.digest))
        else:
            assert reference.tag is not None
            found = await self._manifest_by_tag(route, reference.tag)
        if not accepts(accept, found.media_type):
            # Never convert: the digest a client sees is always the upstream's.
            raise ManifestUnknown(f"manifest is {found.media_type}, which the client does not accept")
        repo_id = await self._repository(route)
        if repo_id is not None:  # None only if GC pruned the row since
            self.metadata.note_pull(repo_id, found.digest, count=count, by=puller)
        self.events.manifest(route.upstream_name, found.result)
        if prefetch and found.result == "miss":
            self.prefetcher.image(route, found.data, found.media_type)
        return found

    async def stored_manifest(self, digest: str) -> tuple[str, bytes] | None:
        cached = self.manifests.get(digest)
        if cached is not None:
            return cached
        row = await self.metadata.manifest(digest)
        if row is None:
            return None
        try:
            data = await self.store.read_small(Digest.parse(digest))
        except BlobUnknown:
            return None
        self.manifests.put(digest, row.media_type, data)
        return row.media_type, data

    async def _linked(self, repo_id: int | None, digest: str) -> bool:
        if repo_id is None:
            return False
        if (repo_id, digest) in self.links:
            return True
        linked, size = await self.metadata.link(repo_id, digest)
        if linked:
            self.links.add(repo_id, digest, size)
        return linked

    async def _manifest_by_digest(self, route: Route, digest: str) -> Manifest:
        repo_id = await self._repository(route)
        stored = await self.stored_manifest(digest)
        if stored is None and self.shared is not None:
            # Another replica on this store recorded it for this repository: adopt it.
            image = await self.shared.image(route, digest)
            if image is not None:
                repo_id, _ = await self._record_manifest(route, digest, image.media_type, image.data, tag=None)
                stored = image.media_type, image.data
        if stored is not None:
            media_type, data = stored
            if await self._linked(repo_id, digest):
                return Manifest(digest, media_type, data, "hit")
            # Stored for another repository: the upstream must vouch for this one.
            await self._confirm(route, lambda c: c.head_manifest(route.repository, digest, UPSTREAM_ACCEPT))
            await self._record_manifest(route, digest, media_type, data, tag=None)
            await self._publish(route, digest, media_type, None)
            return Manifest(digest, media_type, data, "hit")
        found, shared = await self._manifest_flight.do(
            (route.upstream_name, route.repository, digest), lambda: self._fetch_manifest(route, digest, None)
        )
        return _coalesced(found) if shared else found

    async def _tag_row(self, repo_id: int | None, tag: str) -> TagRow | None:
        if repo_id is None:
            return None
        key = (repo_id, tag)
        row = self._tags.get(key)
        if row is not None:
            return row
        generation = self._tags_generation
        row = await self.metadata.tag(repo_id, tag)
        # A write during the query makes what it read stale: do not keep it.
        if row is not None and generation == self._tags_generation:
            if len(self._tags) >= MAX_CACHED_TAGS:
                self._tags.clear()
            self._tags[key] = row
        return row

    def _tag_changed(self, repo_id: int, tag: str) -> None:
        self._tags.pop((repo_id, tag), None)
        self._tags_generation += 1

    async def _manifest_by_tag(self, route: Route, tag: str) -> Manifest:
        repo_id = await self._repository(route)
        row = await self._tag_row(repo_id, tag)
        if row is None and self.shared is not None:
            # Another replica on this store knows the tag: adopt its record, with
            # the time it was last confirmed upstream (the tag TTL runs from there).
            adopted = await self.shared.tag(route, tag)
            if adopted is not None and adopted.checked_at is not None:
                repo_id, _ = await self._record_manifest(
                    route, adopted.digest, adopted.media_type, adopted.data, tag=tag)
                await self.metadata.confirm_tag(repo_id, tag, when=adopted.checked_at)
                self._tag_changed(repo_id, tag)
                row = await self._tag_row(repo_id, tag)
        if row is not None:
            assert repo_id is not None  # the tag row was found under it
            stored = await self.stored_manifest(row.manifest)
            if stored is not None:
                media_type, data = stored
                age = time.time() - row.checked_at
                if age < route.upstream.tag_ttl:
                    return Manifest(row.manifest, media_type, data, "hit")
                return await self._past_ttl(route, repo_id, tag, Manifest(row.manifest, media_type, data, "stale"), age)
        self._known_missing(route, tag)
        found, shared = await self._manifest_flight.do(
            (route.upstream_name, route.repository, "tag", tag), lambda: self._fetch_manifest(route, tag, tag)
        )
        return _coalesced(found) if shared else found

    def _known_missing(self, route: Route, tag: str) -> None:
        if self.missing_tags.missing((route.upstream_name, route.repository, tag)):
            raise ManifestUnknown(f"manifest {route.repository}:{tag} unknown to the upstream (asked moments ago)")

    async def _past_ttl(self, route: Route, repo_id: int, tag: str, cached: Manifest, age: float) -> Manifest:
        """A cached tag past its TTL: stale-while-revalidate.

        One revalidation per tag runs at a time, in its own task. A client waits for
        it at most until ``revalidate_timeout`` after it began, then gets the cached
        copy while it goes on (and updates the tag when it ends). With the upstream's
        breaker open nobody asks it. Past ``max_stale`` nothing stale is served: the
        client waits for the upstream's answer, as for a tag never cached.
        """
        upstream = route.upstream
        self._known_missing(route, tag)
        servable = upstream.max_stale is None or age < upstream.tag_ttl + upstream.max_stale
        if servable and self._client(route).breaker.is_open:
            return self._stale(route, cached, "circuit_open")
        task, began, shared = self._manifest_flight.start(
            (route.upstream_name, route.repository, "tag", tag),
            lambda: self._revalidate(route, repo_id, tag, cached),
        )
        if servable:
            deadline = began + upstream.revalidate_timeout - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline))
            if not done:
                return self._stale(route, cached, "revalidating")
        try:
            found = await asyncio.shield(task)
        except STALE_OK as exc:
            if not servable:
                raise
            return self._stale(route, cached, failure_kind(exc))
        return _coalesced(found) if shared else found

    def _stale(self, route: Route, cached: Manifest, reason: str) -> Manifest:
        self.events.stale(route.upstream_name, reason)
        return cached

    async def _revalidate(self, route: Route, repo_id: int, tag: str, cached: Manifest) -> Manifest:
        """Asks the upstream whether the tag moved; raises what ``STALE_OK`` lists when it cannot say."""
        client = self._client(route)
        digest, media_type, data = cached.digest, cached.media_type, cached.data
        try:
            head = await client.head_manifest(route.repository, tag, UPSTREAM_ACCEPT)
        except STALE_OK as exc:
            # Once per revalidation, however many clients got the stale copy meanwhile.
            log.warning("revalidating %s/%s:%s failed: upstream %s; the cached manifest is served",
                        route.upstream_name, route.repository, tag, failure_kind(exc))
            raise
        except UpstreamNotFound:
            # A loaded (pinned) image may exist only here: the cache is its source.
            if await self.metadata.is_pinned(repo_id, digest):
                return Manifest(digest, media_type, data, "hit")
            self.missing_tags.remember((route.upstream_name, route.repository, tag), route.upstream.negative_ttl)
            raise ManifestUnknown(f"{route.repository}:{tag} is gone from the upstream") from None
        if head.digest == digest:
            await self.metadata.confirm_tag(repo_id, tag)
            self._tag_changed(repo_id, tag)
            if self.shared is not None:
                await self.shared.confirm_tag(route, tag, digest, time.time())
            return Manifest(digest, media_type, data, "revalidated")
        if head.digest is not None:
            stored = await self.stored_manifest(head.digest)
            if stored is not None and await self._linked(repo_id, head.digest):
                await self._record_manifest(route, head.digest, stored[0], stored[1], tag=tag)
                await self._publish(route, head.digest, stored[0], tag)
                return Manifest(head.digest, stored[0], stored[1], "revalidated")
        # The tag moved: fetch the new manifest by digest where we know it (a GET
        # by digest is what Docker Hub does not count twice), else by tag.
        found = await self._fetch_manifest(route, head.digest or tag, tag)
        return found

    async def _fetch_manifest(self, route: Route, reference: str, tag: str | None) -> Manifest:
        client = self._client(route)
        try:
            fetched = await client.get_manifest(route.repository, reference, UPSTREAM_ACCEPT, self.max_manifest_size)
        except UpstreamNotFound:
            if tag is not None and reference == tag:
                self.missing_tags.remember((route.upstream_name, route.repository, tag), route.upstream.negative_ttl)
            raise ManifestUnknown(f"manifest {route.repository}:{reference} unknown to the upstream") from None
        digest = Digest.of(fetched.data)
        expected = reference if ":" in reference else fetched.digest
        if expected is not None and expected != str(digest):
            self.events.digest_mismatch(
                "manifest", Content(route.upstream_name, route.repository, expected, fetched.media_type, tag=tag))
            raise UpstreamDigestMismatch(
                f"the upstream sent a manifest for {route.repository}:{reference} that hashes to {digest}, "
                f"not {expected}", route.upstream_name)
        _, media_type = await self._record_manifest(route, str(digest), fetched.media_type, fetched.data, tag=tag)
        await self._publish(route, str(digest), media_type, tag)
        self.events.fetched(route.upstream_name, "manifest", len(fetched.data))
        self.events.committed(
            "manifest", Content(route.upstream_name, route.repository, str(digest), media_type, len(fetched.data), tag))
        return Manifest(str(digest), media_type, fetched.data, "miss")

    async def _record_manifest(
        self, route: Route, digest: str, media_type: str, data: bytes, tag: str | None, pinned: bool = False
    ) -> tuple[int, str]:
        """Store and record a manifest in the route's repository: the repository's id and the media type."""
        parsed = parse_manifest(data, media_type)
        parsed_digest = Digest.parse(digest)
        with self.in_use.hold(digest):
            if await self.store.stat(parsed_digest) is None:
                await self.store.put(parsed_digest, data)
            repo_id = await self.metadata.record_manifest(
                route.repository_name, digest, len(data), parsed, tag=tag, pinned=pinned)
        if tag is not None:
            self._tag_changed(repo_id, tag)
        self.manifests.put(digest, parsed.media_type, data)
        # The rows just written link what the manifest references: the client's
        # GETs of its config and layers, next, need no query (which would wait
        # behind the fills' commits on the one connection).
        self.links.add(repo_id, digest, len(data))
        for ref in parsed.references:
            if ref.kind in ("config", "layer", "manifest"):
                self.links.add(repo_id, str(ref.digest), ref.size if ref.size >= 0 else None)
        return repo_id, parsed.media_type

    async def _publish(self, route: Route, digest: str, media_type: str, tag: str | None) -> None:
        """Tell the other replicas on this store (if any) what was just recorded."""
        if self.shared is not None:
            await self.shared.publish(route, digest, media_type, tag, time.time())

    async def _confirm(self, route: Route, call: Callable[[UpstreamClient], Awaitable[object]]) -> None:
        try:
            await call(self._client(route))
        except UpstreamNotFound:
            raise ManifestUnknown(f"{route.repository} has no such content upstream") from None

    # Blobs -------------------------------------------------------------------

    async def blob(self, route: Route, digest: Digest) -> BlobAnswer:
        repo_id = await self._repository(route)
        key = str(digest)
        linked = await self._linked(repo_id, key)
        lease = self.in_use.lease(key)  # taken before looking, so GC cannot unlink what we find
        size = await self.store.stat(digest)
        if size is not None:
            if not linked:
                try:
                    await self._confirm_blob(route, digest, size)
                except BaseException:
                    lease.release()
                    raise
            self.metadata.note_blob_access(key)
            self.events.blob(route.upstream_name, "hit", size)
            path = self.store.local_path(digest)
            if path is not None:
                return LocalBlob(key, size, path, lease)
            lease.release()
            redirect = await self.store.backend.redirect_url(digest)
            return StoredBlob(
                key, size, redirect, partial(self.store.read, digest), partial(self.store.backend.open_body, digest)
            )
        lease.release()
        fill = self.fills.get(digest)
        if fill is not None:
            # A fill for this very repository needs no HEAD: its own GET asks the upstream,
            # no spool byte is readable before that GET succeeds, and a range not landed
            # yet is asked of the upstream for this repository too.
            if not linked and (fill.upstream, fill.repository) != (route.upstream_name, route.repository):
                await self._confirm_blob(route, digest, None)
            self.events.blob(route.upstream_name, "coalesced", None)
            return FillingBlob(fill, "coalesced", self._range_fetcher(route, key))
        # No await between looking for a fill and starting one: that is what
        # makes concurrent misses share a single upstream fetch.
        client = self._client(route)
        client.breaker.check()  # an unreachable upstream: 503 at once, no fill
        fill = self.fills.start(digest, route, client, self._descriptor_size(repo_id, key))
        self.events.blob(route.upstream_name, "miss", None)
        return FillingBlob(fill, "miss", self._range_fetcher(route, key))

    def _range_fetcher(self, route: Route, digest: str) -> RangeFetcher:
        """Ranges of a blob not stored yet come from the upstream's own 206 while one
        fill brings the whole blob (proxy.pull.answers.FillingBlob)."""
        return partial(self._client(route).open_blob_range, route.repository, digest)

    def _descriptor_size(self, repo_id: int | None, digest: str) -> int | None:
        """The size the repository's manifests gave the blob, when remembered (None: the fill asks the index)."""
        return None if repo_id is None else self.links.size(repo_id, digest)

    async def _prefetch_blob(self, route: Route, digest: Digest) -> Fill | None:
        """Start a fill nobody asked for yet; None when the blob is stored or filling."""
        if await self.store.stat(digest) is not None:
            return None
        repo_id = await self._repository(route)  # remembered: the manifest was just recorded
        # No await from here to the start: a fill begun meanwhile is found (single flight).
        # Prefetch pauses while the upstream is unreachable: clients' own GETs will ask.
        if self.fills.get(digest) is not None or self._client(route).breaker.is_open:
            return None
        fill = self.fills.start(digest, route, self._client(route), self._descriptor_size(repo_id, str(digest)))
        self.events.prefetched(route.upstream_name)
        return fill

    async def blob_info(self, route: Route, digest: Digest) -> BlobInfo:
        """For HEAD: what a GET would send, without fetching bytes."""
        repo_id = await self._repository(route)
        key = str(digest)
        linked, descriptor_size = (False, None) if repo_id is None else await self.metadata.link(repo_id, key)
        size = await self.store.stat(digest)
        if size is not None:
            if not linked:
                await self._confirm_blob(route, digest, size)
            return BlobInfo(key, size)
        if linked and descriptor_size is not None:
            return BlobInfo(key, descriptor_size)
        try:
            upstream_size = await self._client(route).head_blob(route.repository, key)
        except UpstreamNotFound:
            raise BlobUnknown(f"blob {key} unknown to the upstream") from None
        return BlobInfo(key, upstream_size)

    async def _confirm_blob(self, route: Route, digest: Digest, size: int | None) -> None:
        try:
            await self._client(route).head_blob(route.repository, str(digest))
        except UpstreamNotFound:
            raise BlobUnknown(f"blob {digest} unknown to {route.repository}") from None
        repo_id = await self.metadata.link_blob(route.repository_name, str(digest), size)
        self.links.add(repo_id, str(digest))

    # Tags and catalog ----------------------------------------------------------

    async def tags(self, route: Route, n: int | None, last: str | None) -> tuple[list[str], bool]:
        """Tags (a page) and whether there are more. When the upstream fails, the cache's own
        tags, if it holds any for the repository: an empty list would say the repository has
        none, which is not known (image-update automation acts on such answers)."""
        try:
            tags, next_link = await self._client(route).list_tags(route.repository, n, last)
            if n is not None and len(tags) > n:
                # The upstream ignored n (distribution 2.8 does for tags): the page is cut here.
                found, more = page(tags, n, last)
                return found, more or next_link is not None
            return tags, next_link is not None
        except UpstreamNotFound:
            raise NameUnknown(f"repository {route.repository} unknown to the upstream") from None
        except (*STALE_OK, UpstreamError) as exc:
            repo_id = await self._repository(route)
            known = [] if repo_id is None else await self.metadata.tags(repo_id)
            if not known:
                raise
            self.events.stale(route.upstream_name, failure_kind(exc))
            return page(known, n, last)


def _coalesced(found: Manifest) -> Manifest:
    return Manifest(found.digest, found.media_type, found.data, "coalesced")


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return getattr(exc, "kind", "error")
