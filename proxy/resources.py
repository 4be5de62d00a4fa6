"""The server's long-lived resources, each with the ``web.AppKey`` that handlers read it by."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from config.settings import Settings
    from proxy.metrics.events import Events
    from proxy.pull.routing import Router
    from proxy.pull.service import PullThrough
    from proxy.upstream.client import UpstreamClient
    from storage.blobs import BlobStore
    from storage.index.metadata import Metadata
    from storage.lifecycle.service import Lifecycle

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
STORE: web.AppKey[BlobStore] = web.AppKey("store")
METADATA: web.AppKey[Metadata] = web.AppKey("metadata")
PULLTHROUGH: web.AppKey[PullThrough] = web.AppKey("pullthrough")
ROUTER: web.AppKey[Router] = web.AppKey("router")
UPSTREAMS: web.AppKey[dict[str, UpstreamClient]] = web.AppKey("upstreams")
EVENTS: web.AppKey[Events] = web.AppKey("events")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
