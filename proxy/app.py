"""Wiring: ``create_app(settings)`` builds the application and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from config.settings import Settings
from proxy.admin.guard import admin_token
from proxy.http import health
from proxy.http.accesslog import request_context
from proxy.http.clientauth import AUTH
from proxy.http.errors import API_HEADERS, error_middleware
from proxy.metrics.events import Events
from proxy.metrics.prometheus import Metrics, StoreTotals, metrics_handler, refresh_store_totals
from proxy.pull.routing import Router
from proxy.pull.service import PullThrough
from proxy.registry import routes as registry
from proxy.resources import EVENTS, LIFECYCLE, METADATA, PULLTHROUGH, ROUTER, SETTINGS, STORE, UPSTREAMS
from proxy.upstream.client import UpstreamClient
from storage import paths
from storage.backends import make_backend
from storage.blobs import BlobStore
from storage.index.metadata import Metadata
from storage.lifecycle.fsck import StoreLock, recover
from storage.lifecycle.service import GcReport, Lifecycle

log = logging.getLogger("regcache.app")


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2"):
        response.headers.update(API_HEADERS)


def create_app(settings: Settings, events: Events | None = None) -> web.Application:
    middlewares = [request_context, error_middleware]
    client_auth = None
    if settings.auth is not None:
        from proxy.http.clientauth import ClientAuth, auth_middleware

        client_auth = ClientAuth(settings.auth)
        middlewares.append(auth_middleware(client_auth))
    app = web.Application(
        middlewares=middlewares,
        client_max_size=settings.limits.max_admin_body,
    )
    app[SETTINGS] = settings
    if events is None:
        events = Metrics() if settings.metrics.enabled else Events()
    app[EVENTS] = events
    if client_auth is not None:
        app[AUTH] = client_auth
        app.on_cleanup.append(lambda _: asyncio.to_thread(client_auth.close))
    health.add_routes(app)
    if settings.metrics.enabled and settings.metrics.listen is None:
        app.router.add_get("/metrics", metrics_handler, name="metrics")
    app[ROUTER] = Router(settings.upstreams, settings.default_upstream)
    app.on_response_prepare.append(_on_prepare)
    app.cleanup_ctx.append(_lifecycle)
    registry.add_routes(app)
    # Admin exists only with a token: no token, no /admin/ routes at all.
    token = admin_token(settings)
    if token is not None:
        from proxy.admin.mount import add_admin_routes

        add_admin_routes(app, token)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    events = app[EVENTS]
    lock = StoreLock(settings.data_dir)
    lock.acquire(exclusive=False)  # refuses to start while fsck runs
    store = BlobStore(make_backend(settings))
    await store.start()
    metadata = Metadata(paths.metadata_path(settings.data_dir))
    metrics = events if isinstance(events, Metrics) else None
    if metrics is not None:
        metadata.observe = metrics.sqlite
    await metadata.open()
    upstreams = {u.name: UpstreamClient(u, metrics) for u in settings.upstreams}
    for client in upstreams.values():
        await client.start()
    pullthrough = PullThrough(
        store,
        metadata,
        upstreams,
        events,
        fill_timeout=settings.storage.fill_timeout,
        max_manifest_size=settings.limits.max_manifest_size,
    )
    app[STORE], app[METADATA], app[UPSTREAMS], app[PULLTHROUGH] = store, metadata, upstreams, pullthrough
    if lock.try_exclusive():
        # Alone on this store: reconcile what a crash may have left before serving.
        recovered = await recover(settings.data_dir, metadata, store.backend)
        if recovered.problems:
            log.warning("startup recovery: %s", recovered.render().replace("\n", "; "))
        lock.share()
    lifecycle = Lifecycle(settings.storage, metadata, store, pullthrough.in_use,
                          data_dir=settings.data_dir, forget=pullthrough.forget)  # fmt: skip
    lifecycle.on_report = lambda report: _report_gc(events, report)
    await lifecycle.start()
    app[LIFECYCLE] = lifecycle
    background = [asyncio.create_task(_flush_periodically(metadata, settings.storage.flush_interval))]
    if metrics is not None:

        async def totals() -> StoreTotals:
            return StoreTotals(*await metadata.totals())

        background.append(asyncio.create_task(refresh_store_totals(metrics, totals, settings.metrics.store_interval)))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await lifecycle.close()
        await pullthrough.close()
        for client in upstreams.values():
            await client.close()
        await metadata.close()
        await store.close()
        lock.release()


def _report_gc(events: Events, report: GcReport) -> None:
    events.gc_run(report.reason, report.seconds)
    if report.blobs:
        events.evicted(report.reason, report.blobs, report.bytes)


async def _flush_periodically(metadata: Metadata, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await metadata.flush()
        except Exception:
            log.exception("flushing access statistics failed")
