"""The server's long-lived resources: the ``web.AppKey`` handlers read each by, and the
cleanup context that takes it at startup and gives it back at shutdown.

``proxy.app`` appends the contexts to ``app.cleanup_ctx`` in the order of ``RESOURCES``,
each depending only on those before it. aiohttp enters them in that order and, on
``runner.cleanup()``, exits in reverse the ones whose startup finished; each context
gives back what its own startup took even when that startup fails half way. So a
start that fails at any step leaves nothing held, the store lock included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from config.settings import Settings
from proxy.metrics.events import Content, Events, find_sink
from proxy.metrics.prometheus import Metrics, StoreTotals, metrics_of, refresh_store_totals
from proxy.pull.referrers import Referrers
from proxy.pull.routing import Router
from proxy.pull.service import PullThrough
from proxy.upstream.client import UpstreamClient
from storage import paths
from storage.backends import make_backend
from storage.blobs import BlobStore
from storage.index.metadata import Metadata
from storage.lifecycle.fsck import StoreLock, recover
from storage.lifecycle.service import GcReport, Lifecycle

log = logging.getLogger("regcache.app")  # the name log filters know these lines by

# At shutdown, how long queued notification events may take to go out before they count as dropped.
NOTIFY_GRACE = 5.0

# Set by create_app before startup.
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
EVENTS: web.AppKey[Events] = web.AppKey("events")
ROUTER: web.AppKey[Router] = web.AppKey("router")
# Set by the cleanup contexts below, each once its resource is ready.
STORE_LOCK: web.AppKey[StoreLock] = web.AppKey("store_lock")
STORE: web.AppKey[BlobStore] = web.AppKey("store")
METADATA: web.AppKey[Metadata] = web.AppKey("metadata")
UPSTREAMS: web.AppKey[dict[str, UpstreamClient]] = web.AppKey("upstreams")
PULLTHROUGH: web.AppKey[PullThrough] = web.AppKey("pullthrough")
REFERRERS: web.AppKey[Referrers] = web.AppKey("referrers")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")


def _metrics(app: web.Application) -> Metrics | None:
    return metrics_of(app[EVENTS])


async def notifications(app: web.Application) -> AsyncIterator[None]:
    """Delivery of notification events; first in, last out, so the other resources' last events go too."""
    from proxy.notify.notifier import Notifier  # only with endpoints configured is there one

    notifier = find_sink(app[EVENTS], Notifier)
    if notifier is None:
        yield
        return
    await notifier.start()
    try:
        yield
    finally:
        await notifier.close(NOTIFY_GRACE)


async def store_lock(app: web.Application) -> AsyncIterator[None]:
    lock = StoreLock(app[SETTINGS].data_dir)
    lock.acquire(exclusive=False)  # refuses to start while fsck runs
    try:
        app[STORE_LOCK] = lock
        yield
    finally:
        lock.release()


async def blob_store(app: web.Application) -> AsyncIterator[None]:
    store = BlobStore(make_backend(app[SETTINGS]))
    try:
        await store.start()
        app[STORE] = store
        yield
    finally:
        await store.close()


async def metadata(app: web.Application) -> AsyncIterator[None]:
    index = Metadata(paths.metadata_path(app[SETTINGS].data_dir))
    metrics = _metrics(app)
    if metrics is not None:
        index.observe = metrics.sqlite
    try:
        await index.open()
        app[METADATA] = index
        yield
    finally:
        await index.close()


async def upstreams(app: web.Application) -> AsyncIterator[None]:
    metrics = _metrics(app)
    clients = {u.name: UpstreamClient(u, metrics) for u in app[SETTINGS].upstreams}
    if metrics is not None:
        for name in clients:
            metrics.upstream_added(name)
    try:
        for client in clients.values():
            await client.start()
        app[UPSTREAMS] = clients
        yield
    finally:
        for client in clients.values():
            await client.close()  # a client never started closes nothing


async def pull_service(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pullthrough = PullThrough(
        app[STORE],
        app[METADATA],
        app[UPSTREAMS],
        app[EVENTS],
        fill_timeout=settings.storage.fill_timeout,
        max_manifest_size=settings.limits.max_manifest_size,
    )
    try:
        app[PULLTHROUGH] = pullthrough
        app[REFERRERS] = Referrers(pullthrough)
        yield
    finally:
        await pullthrough.close()


async def recovery(app: web.Application) -> AsyncIterator[None]:
    """Reconciles what a crash may have left, before serving; only a process alone on the store may."""
    lock = app[STORE_LOCK]
    if lock.try_exclusive():
        recovered = await recover(app[SETTINGS].data_dir, app[METADATA], app[STORE].backend)
        if recovered.problems:
            log.warning("startup recovery: %s", recovered.render().replace("\n", "; "))
        lock.share()
    yield


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, events, pullthrough = app[SETTINGS], app[EVENTS], app[PULLTHROUGH]
    service = Lifecycle(settings.storage, app[METADATA], app[STORE], pullthrough.in_use,
                        data_dir=settings.data_dir, forget=pullthrough.forget)
    service.on_report = lambda report: _report_gc(events, report)
    try:
        await service.start()
        app[LIFECYCLE] = service
        yield
    finally:
        await service.close()


async def background(app: web.Application) -> AsyncIterator[None]:
    """Periodic work: access statistics to SQLite, and the store gauges."""
    index, settings = app[METADATA], app[SETTINGS]
    tasks = [asyncio.create_task(_flush_periodically(index, settings.storage.flush_interval))]
    try:
        metrics = _metrics(app)
        if metrics is not None:

            async def totals() -> StoreTotals:
                return StoreTotals(*await index.totals())

            tasks.append(asyncio.create_task(refresh_store_totals(metrics, totals, settings.metrics.store_interval)))
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# Startup order; shutdown runs it backwards.
RESOURCES: tuple[Callable[[web.Application], AsyncIterator[None]], ...] = (
    notifications,
    store_lock,
    blob_store,
    metadata,
    upstreams,
    pull_service,
    recovery,
    lifecycle,
    background,
)


def _report_gc(events: Events, report: GcReport) -> None:
    events.gc_run(report.reason, report.seconds)
    if report.blobs:
        events.evicted(report.reason, report.blobs, report.bytes)
    if report.images:
        events.images_removed(report.reason, [Content(i.upstream, i.repository, i.manifest) for i in report.images])


async def _flush_periodically(index: Metadata, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await index.flush()
        except Exception:
            log.exception("flushing access statistics failed")
