"""Wiring: ``create_app(settings)`` builds the application and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from config.settings import Settings
from proxy import registry
from proxy.accesslog import request_context
from proxy.errors import API_HEADERS, error_middleware
from proxy.events import Events
from proxy.keys import EVENTS, METADATA, PULLTHROUGH, ROUTER, SETTINGS, STORE, UPSTREAMS
from proxy.pullthrough import PullThrough
from proxy.routing import Router
from proxy.upstream import UpstreamClient
from storage import paths
from storage.backends.base import BlobBackend
from storage.blobs import BlobStore
from storage.metadata import Metadata

log = logging.getLogger("regcache.app")


def make_backend(settings: Settings) -> BlobBackend:
    if settings.storage.backend == "s3":
        from storage.backends.s3 import S3Backend  # optional dependency

        assert settings.storage.s3 is not None
        return S3Backend(settings.storage.s3, settings.data_dir)
    from storage.backends.filesystem import FilesystemBackend

    return FilesystemBackend(settings.data_dir)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2"):
        response.headers.update(API_HEADERS)


def create_app(settings: Settings, events: Events | None = None) -> web.Application:
    app = web.Application(
        middlewares=[request_context, error_middleware],
        client_max_size=settings.limits.max_admin_body,
    )
    app[SETTINGS] = settings
    app[EVENTS] = events or Events()
    app[ROUTER] = Router(settings.upstreams, settings.default_upstream)
    app.on_response_prepare.append(_on_prepare)
    app.cleanup_ctx.append(_lifecycle)
    registry.add_routes(app)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    events = app[EVENTS]
    store = BlobStore(make_backend(settings))
    await store.start()
    metadata = Metadata(paths.metadata_path(settings.data_dir))
    await metadata.open()
    upstreams = {u.name: UpstreamClient(u) for u in settings.upstreams}
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
    flusher = asyncio.create_task(_flush_periodically(metadata, settings.storage.flush_interval))
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await pullthrough.close()
        for client in upstreams.values():
            await client.close()
        await metadata.close()
        await store.close()


async def _flush_periodically(metadata: Metadata, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await metadata.flush()
        except Exception:
            log.exception("flushing access statistics failed")
