"""Fills in flight: at most one per digest, each fetching one blob into the store.

A fill runs in its own task, under its own timeout, so it completes even when
the client that started it goes away. It takes the cross-replica fill lease,
streams the upstream's body into a ``BlobWriter`` (a small blob: gathers it in
a ``BlobBuffer``), lets readers have the last byte once the digest is
verified, commits, and records the row. Everything it
needs is given here; it calls nothing above it. ``PullThrough`` decides when
a fill starts; readers see a fill through ``proxy.pull.answers``.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.errors import UpstreamDigestMismatch, UpstreamNotFound
from proxy.metrics.events import BLOB_MEDIA_TYPE, Content, Events
from proxy.pull.fill import Fill
from proxy.pull.links import Links
from proxy.pull.routing import Route
from proxy.tracing import span
from proxy.upstream.client import UpstreamClient
from storage.backends.base import FillLease
from storage.blobs import BlobBuffer, BlobStore, BlobWriter
from storage.errors import BlobUnknown, DigestMismatch, SizeMismatch, StoreFull
from storage.index.metadata import Metadata
from storage.oci.digest import Digest

log = logging.getLogger("regcache.fill")

# A blob of at most this size is gathered in memory and stored in one step once
# verified (``storage.blobs.BlobBuffer``): no spool file, and its readers get it in
# one write. Larger ones are spooled as they arrive, so that followers stream.
SMALL_FILL = 64 * 1024
# What the small fills in flight may hold in memory together; one that would go
# past it is spooled instead.
HELD_BYTES = 16 * 1024 * 1024


class Fills:
    def __init__(self, store: BlobStore, metadata: Metadata, events: Events, links: Links, timeout: float) -> None:
        self.store = store
        self.metadata = metadata
        self.events = events
        self.links = links
        self.timeout = timeout
        self._fills: dict[str, Fill] = {}
        self._tasks: dict[asyncio.Task[None], Fill] = {}
        self._held = 0  # bytes small fills hold in memory (SMALL_FILL)

    def __len__(self) -> int:
        return len(self._fills)

    @property
    def held_bytes(self) -> int:
        """Bytes the small fills in flight hold in memory (at most ``HELD_BYTES``)."""
        return self._held

    def get(self, digest: Digest) -> Fill | None:
        return self._fills.get(str(digest))

    def start(self, digest: Digest, route: Route, client: UpstreamClient, descriptor_size: int | None = None) -> Fill:
        """A new fill of ``digest`` from ``client``; the caller has made sure none is running.
        ``descriptor_size``: the size the repository's manifests gave the blob, when the caller
        knows it (otherwise the fill asks the index)."""
        fill = Fill(digest, route.upstream_name, route.repository, self.store)
        self._fills[str(digest)] = fill
        task = asyncio.create_task(self._run(fill, route, client, descriptor_size))
        self._tasks[task] = fill
        task.add_done_callback(lambda done: self._tasks.pop(done, None))
        return fill

    async def _run(self, fill: Fill, route: Route, client: UpstreamClient, descriptor_size: int | None) -> None:
        attributes = {"regcache.upstream": route.upstream_name, "regcache.repository": route.repository,
                      "regcache.digest": str(fill.digest)}
        try:
            async with asyncio.timeout(self.timeout):
                with span("fill", attributes):
                    lease = await self._lease(route, fill)
                    if lease is not None:
                        try:
                            await self._fetch(fill, route, client, descriptor_size)
                        finally:
                            await lease.release()
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                log.warning("fill of %s timed out after %ss", fill.digest, self.timeout)
            fill.fail(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._fills.pop(str(fill.digest), None)

    async def _lease(self, route: Route, fill: Fill) -> FillLease | None:
        """Cross-replica single flight (replicas sharing one object store).

        Only the holder of the digest's fill lease fetches from the upstream.
        A replica that loses the race waits for the holder's commit and then
        serves the blob from the store (None here); if the holder gives up or
        dies, its lease is released or expires and this replica takes over.
        A store nobody else writes to grants the lease at once, and asks no
        second look: only this process commits there, one fill per digest at a
        time (a load committing the same digest meanwhile writes the same bytes).
        """
        backend = self.store.backend
        if backend.shared is None:
            return FillLease()
        while True:
            lease = await backend.acquire_fill_lease(fill.digest)
            # Committed by another replica between our first look and now?
            size = await (backend.stat(fill.digest) if lease is not None else backend.wait_for(fill.digest))
            if size is not None:
                if lease is not None:
                    await lease.release()
                await self.metadata.record_blob(route.repository_name, str(fill.digest), size)
                fill.stored_elsewhere(size)
                return None
            if lease is not None:
                return lease

    async def _fetch(self, fill: Fill, route: Route, client: UpstreamClient, expected: int | None) -> None:
        # The repository's row is made when the blob is recorded, not before: the
        # upstream may not have it, and a request for a made-up name leaves nothing.
        if expected is None:
            expected = await self.metadata.descriptor_size(route.repository_name, str(fill.digest))
        self.events.fill_started(route.upstream_name)
        writer: BlobWriter | BlobBuffer | None = None
        held = 0
        try:
            try:
                async with client.open_blob(route.repository, str(fill.digest), expected) as stream:
                    size = stream.size if stream.size is not None else expected
                    if expected is not None and stream.size is not None and stream.size != expected:
                        log.warning("upstream size %s for %s differs from its descriptor (%s)",
                                    stream.size, fill.digest, expected)
                    if size is not None and size <= SMALL_FILL and self._held + size <= HELD_BYTES:
                        held, self._held = size, self._held + size
                        writer = self.store.buffer(fill.digest, size)
                        async for chunk in stream.chunks:
                            writer.write(chunk)
                        fill.hold(writer.verify())
                        written = size
                    else:
                        writer = await self.store.writer(fill.digest, size)
                        fill.attach(writer, size)
                        body = stream.body
                        if body is None:
                            async for chunk in stream.chunks:
                                await writer.write(chunk)
                        else:  # read on threads, not through the loop
                            await writer.pump(body)
                        written = await writer.verify()
                    # Readers may take the last byte from here on, but only once this
                    # task next waits: the count below comes first, so what a client
                    # saw is already in the metrics.
                    self.events.fetched(route.upstream_name, "blob", written)
                # The upstream's connection is back in its pool before the commit, which on an
                # object store may still be sending parts.
                with span("commit", {"regcache.digest": str(fill.digest)}):
                    await writer.commit()
            except BaseException as exc:
                if writer is None:  # no answer, or no room for the blob (the store said so itself)
                    raise
                await writer.abort()
                if isinstance(exc, StoreFull):
                    self.events.store_full()
                if isinstance(exc, DigestMismatch | SizeMismatch):
                    self.events.digest_mismatch("blob", self._content(route, fill, None))
                    log.error("upstream blob %s of %s/%s failed verification: %s",
                              fill.digest, route.upstream_name, route.repository, exc)
                    # The upstream's fault: a reader that has had no byte yet (a small blob's
                    # come all at once) answers 502, as for a manifest, not the client's 400.
                    raise UpstreamDigestMismatch(f"upstream sent a wrong body for {fill.digest}: {exc}",
                                                 route.upstream_name) from exc
                raise
            finally:
                self._held -= held
        except UpstreamNotFound:
            raise BlobUnknown(f"blob {fill.digest} unknown to the upstream") from None
        finally:
            self.events.fill_finished(route.upstream_name)
        repo_id = await self.metadata.record_blob(route.repository_name, str(fill.digest), written)
        self.links.add(repo_id, str(fill.digest), written, stored=True)
        fill.succeed(written)
        self.events.committed("blob", self._content(route, fill, written))

    @staticmethod
    def _content(route: Route, fill: Fill, size: int | None) -> Content:
        return Content(route.upstream_name, route.repository, str(fill.digest), BLOB_MEDIA_TYPE, size)

    async def settle(self) -> None:
        """Wait until every fill in flight has ended, well or not."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, commit_grace: float = 30.0) -> None:
        """Stop: fills still fetching are cancelled; verified ones may finish their commit.

        A verified fill has sent every byte to its clients; cancelling its commit
        would leave a client holding a blob the restarted cache does not have.
        """
        committing = [task for task, fill in self._tasks.items() if fill.verified]
        if committing:
            await asyncio.wait(committing, timeout=commit_grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
