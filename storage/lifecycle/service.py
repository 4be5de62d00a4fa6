"""The cache's lifecycle: a size budget, expiry, pins, sweeps, and the task that runs them.

``Lifecycle`` is what the server runs in the background and what the admin
verbs call (``rmi``, ``pin``, ``unpin``, ``gc``, ``stats``). A pass:

1. flushes batched pull statistics, so "least recently pulled" is current;
2. expires images not pulled for ``expire_unused_after``;
3. when the store is past ``max_size * high_watermark`` (or a write just
   failed for lack of space), evicts whole images, least recently pulled
   first, until it is under ``max_size * low_watermark``; pinned images never;
4. sweeps blobs and manifests nothing references that are older than
   ``gc_grace``.

Every removal then prunes the rows of repositories left without an image.

A pass runs every ``gc_interval``, as soon as a commit takes the store past
the high watermark, and when a fill fails with ``StoreFull``. Only one pass or
admin removal runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from config.settings import StorageSettings
from storage.blobs import BlobStore
from storage.errors import ImagePinned, StoreUnavailable
from storage.index.metadata import Metadata
from storage.index.rows import ImageKey
from storage.lifecycle.gc import Collector, InUse, Removal, load_units, plan_eviction
from storage.replicas.gc import ReplicaCollector
from storage.replicas.sync import ReplicaSync

log = logging.getLogger("regcache.lifecycle")


@dataclass(slots=True)
class RemovedImage:
    upstream: str
    repository: str
    manifest: str


@dataclass(slots=True)
class GcReport:
    reason: str  # interval, budget, full, manual, rmi
    size_before: int = 0
    size_after: int = 0
    images: list[RemovedImage] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    manifests: int = 0
    deferred: int = 0
    repositories: int = 0  # rows of repositories left holding nothing
    sweep_skipped: bool = False  # a shared store: another replica held the sweep lease
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def changed(self) -> bool:
        return bool(self.images or self.blobs or self.manifests or self.deferred or self.repositories)


class Lifecycle:
    def __init__(
        self,
        settings: StorageSettings,
        metadata: Metadata,
        store: BlobStore,
        in_use: InUse | None = None,
        *,
        data_dir: Path | None = None,
        forget: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metadata = metadata
        self.store = store
        self.in_use = in_use if in_use is not None else InUse()
        # A store shared by replicas: GC over every replica's records, and this index kept in line with them.
        index = store.backend.shared
        self.shared: ReplicaSync | None = None
        shared_collector = None
        if index is not None:
            shared_collector = ReplicaCollector(metadata, store, self.in_use, index, settings.gc_grace)
            self.shared = ReplicaSync(metadata, store, index)
        self.collector = Collector(metadata, store, self.in_use, shared_collector)
        self.data_dir = data_dir
        self.forget = forget  # drop the pull path's in-memory caches after a removal
        self.on_report: Callable[[GcReport], None] | None = None  # metrics
        self.size = 0  # bytes of committed blobs: recounted each pass, added to on every commit
        self.passes = 0
        self.last_report: GcReport | None = None
        self.history: deque[GcReport] = deque(maxlen=32)  # recent passes that changed something
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._full = False
        self._passed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    # Running -------------------------------------------------------------------

    async def start(self) -> None:
        self.size = await self._stored_bytes()
        self.store.on_commit = self.committed
        self.store.on_full = self.store_full
        self._task = asyncio.create_task(self._run(), name="regcache-lifecycle")
        if self._over_high():
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def committed(self, size: int) -> None:
        """A blob was committed: wake the task once the store passes the high mark."""
        self.size += size
        if self._over_high():
            self._wake.set()

    def store_full(self) -> None:
        """A write failed for lack of space: evict now, whatever the budget says."""
        self._full = True
        self._wake.set()

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No pass runs while this is held; one running now finishes first. A pass deletes
        rows before it unlinks their files, so what reads the store and the index one after
        the other (a check of one against the other) sees them agree only between passes."""
        async with self._lock:
            yield

    async def wait_for_pass(self, after: int) -> None:
        """Until more than ``after`` passes have run (tests, and admin callers that want a result)."""
        async with self._passed:
            await self._passed.wait_for(lambda: self.passes > after)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.gc_interval):
                    await self._wake.wait()
            self._wake.clear()
            reason = "full" if self._full else ("budget" if self._over_high() else "interval")
            self._full = False
            try:
                await self.gc(reason)
            except Exception:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None  # stopping: whatever failed on the way out
                log.exception("lifecycle pass failed")

    # Passes ----------------------------------------------------------------------

    async def gc(self, reason: str = "manual") -> GcReport:
        """One whole pass: expire, evict to the budget, sweep."""
        async with self._lock:
            started = time.monotonic()
            await self.metadata.flush()
            await self._sync_shared()
            report = GcReport(reason, size_before=await self._stored_bytes())
            removal = Removal()
            removal.add(await self._expire())
            removal.add(await self._evict(reason == "full"))
            removal.add(await self.collector.sweep(self.settings.gc_grace))
            await self._finish(report, removal, started)
        async with self._passed:
            self.passes += 1
            self._passed.notify_all()
        return report

    async def evict_to_budget(self) -> GcReport:
        async with self._lock:
            started = time.monotonic()
            await self.metadata.flush()
            report = GcReport("budget", size_before=await self._stored_bytes())
            await self._finish(report, await self._evict(False), started)
            return report

    async def expire(self) -> GcReport:
        async with self._lock:
            started = time.monotonic()
            await self.metadata.flush()
            report = GcReport("expire", size_before=await self._stored_bytes())
            await self._finish(report, await self._expire(), started)
            return report

    async def sweep(self, grace: float | None = None) -> GcReport:
        async with self._lock:
            started = time.monotonic()
            report = GcReport("sweep", size_before=await self._stored_bytes())
            removal = await self.collector.sweep(self.settings.gc_grace if grace is None else grace)
            await self._finish(report, removal, started)
            return report

    async def sync_shared(self) -> None:
        """Adopt images other replicas recorded and drop those they removed (a shared store only);
        ``images``, ``rmi`` and ``save`` call this first so that every replica answers alike."""
        if self.shared is None:
            return
        async with self._lock:
            await self._sync_shared()

    async def _sync_shared(self) -> None:
        if self.shared is None:
            return
        try:
            changed = (await self.shared.sync()).changed
        except StoreUnavailable as exc:  # the bucket cannot answer: the local index answers meanwhile
            log.warning("could not read the shared records; answering from this replica's index: %s", exc)
            return
        if changed and self.forget is not None:
            self.forget()

    async def _expire(self) -> Removal:
        ttl = self.settings.expire_unused_after
        if ttl is None:
            return Removal()
        cutoff = time.time() - ttl
        units = [u for u in await load_units(self.metadata) if not u.pinned and u.last_pulled < cutoff]
        return await self.collector.remove(k for u in units for k in u.keys)

    async def _evict(self, full: bool) -> Removal:
        # The running total already counts a blob whose row its fill is still writing.
        total = max(await self._stored_bytes(), self.size)
        budget = self.settings.max_size
        target: int | None = None
        if budget is not None and total > budget * self.settings.high_watermark:
            target = int(budget * self.settings.low_watermark)
        if full:
            # The disk filled before the budget did: free what the watermarks would free.
            ratio = min(self.settings.low_watermark / self.settings.high_watermark, 0.95)
            target = min(target if target is not None else total, int(total * ratio))
        if target is None or total <= target:
            return Removal()
        units = await load_units(self.metadata)
        chosen = await plan_eviction(self.metadata, units, total, target)
        if not chosen:
            # Nothing unpinned is left: either every image is pinned, or no image holds the bytes
            # (blobs whose manifest is not recorded yet; the sweep takes them after the grace period).
            pinned = sum(1 for u in units if u.pinned)
            why = (f"all {pinned} image(s) left are pinned" if pinned else
                   "no image is left to evict: the bytes belong to no image yet, and the sweep takes them "
                   "once they are older than the grace period")
            log.warning("store at %d bytes is over its target of %d, and %s", total, target, why)
        return await self.collector.remove(k for u in chosen for k in u.keys)

    async def _finish(self, report: GcReport, removal: Removal, started: float) -> None:
        report.images = await self._names(removal.images)
        # After the names are read: a repository whose last image just went loses its row now.
        report.repositories = await self.metadata.prune_repositories()
        report.blobs, report.bytes = removal.blobs, removal.bytes
        report.manifests, report.deferred = removal.manifests, removal.deferred
        report.sweep_skipped = removal.skipped
        report.size_after = self.size = await self._stored_bytes()
        report.seconds = round(time.monotonic() - started, 3)
        self.last_report = report
        if self.on_report is not None:
            self.on_report(report)
        if report.changed:
            self.history.append(report)
            if self.forget is not None:
                self.forget()
            log.info(
                "gc (%s): removed %d image(s), %d blob(s) of %d bytes, %d manifest row(s), %d repository row(s), "
                "%d in use; store %d -> %d bytes",
                report.reason, len(report.images), report.blobs, report.bytes, report.manifests,
                report.repositories, report.deferred, report.size_before, report.size_after,
            )

    # Admin verbs -----------------------------------------------------------------

    async def resolve(self, upstream: str, repository: str, reference: str) -> ImageKey | None:
        """The image a ``repository:tag`` or ``repository@digest`` names in the cache."""
        repo_id = await self.metadata.repository_id(upstream, repository)
        if repo_id is None:
            return None
        manifest = reference
        if ":" not in reference:
            tag = await self.metadata.tag(repo_id, reference)
            if tag is None:
                return None
            manifest = tag.manifest
        if not await self.metadata.has_image(repo_id, manifest):
            return None
        return ImageKey(repo_id, manifest)

    async def remove_image(self, key: ImageKey, force: bool = False) -> GcReport | None:
        """``rmi``: the image (with an index's platform images) and what only it used.

        None when there is no such image; ``ImagePinned`` unless ``force``.
        """
        async with self._lock:
            started = time.monotonic()
            await self.metadata.flush()
            units = await load_units(self.metadata)
            unit = next((u for u in units if u.keys[0] == key), None)
            if unit is None:
                unit = next((u for u in units if key in u.keys), None)
                if unit is None:
                    return None
                keys = [key]  # a platform image of a cached index: only its own row
            else:
                keys = unit.keys
            if unit.pinned and not force:
                raise ImagePinned(f"{key.manifest} is pinned; unpin it first or force the removal")
            report = GcReport("rmi", size_before=await self._stored_bytes())
            await self._finish(report, await self.collector.remove(keys), started)
            return report

    async def pin(self, key: ImageKey) -> bool:
        return await self._set_pinned(key, True)

    async def unpin(self, key: ImageKey) -> bool:
        return await self._set_pinned(key, False)

    async def _set_pinned(self, key: ImageKey, pinned: bool) -> bool:
        return await self.metadata.set_pinned(key, pinned)

    async def stats(self) -> dict:
        summary = await self.metadata.summary()
        out: dict = {
            "size": summary.size,
            "blobs": summary.blobs,
            "images": summary.images,
            "pinned": summary.pinned,
            "repositories": summary.repositories,
            "max_size": self.settings.max_size,
            "high_watermark": self.settings.high_watermark,
            "low_watermark": self.settings.low_watermark,
            "expire_unused_after": self.settings.expire_unused_after,
            "gc_passes": self.passes,
            "last_gc": self.last_report.to_dict() if self.last_report else None,
        }
        if self.data_dir is not None:
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(self.data_dir)
                out["disk_total"], out["disk_free"] = usage.total, usage.free
        return out

    # Helpers -----------------------------------------------------------------------

    def _over_high(self) -> bool:
        budget = self.settings.max_size
        return budget is not None and self.size > budget * self.settings.high_watermark

    async def _stored_bytes(self) -> int:
        return await self.metadata.stored_bytes()

    async def _names(self, keys: list[ImageKey]) -> list[RemovedImage]:
        if not keys:
            return []
        names = await self.metadata.repository_names()
        return [RemovedImage(*names.get(k.repository_id, ("?", "?")), k.manifest) for k in keys]
