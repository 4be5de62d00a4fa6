"""Typed keys for what the application and each request carry (``web.AppKey``, ``web.RequestKey``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from config.settings import Settings
    from proxy.auth import ClientAuth
    from proxy.events import Events
    from proxy.health import Health
    from proxy.pullthrough import PullThrough
    from proxy.routing import Router
    from proxy.upstream import UpstreamClient
    from storage.blobs import BlobStore
    from storage.gc import Lease
    from storage.lifecycle import Lifecycle
    from storage.metadata import Metadata

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
STORE: web.AppKey[BlobStore] = web.AppKey("store")
METADATA: web.AppKey[Metadata] = web.AppKey("metadata")
PULLTHROUGH: web.AppKey[PullThrough] = web.AppKey("pullthrough")
ROUTER: web.AppKey[Router] = web.AppKey("router")
UPSTREAMS: web.AppKey[dict[str, UpstreamClient]] = web.AppKey("upstreams")
EVENTS: web.AppKey[Events] = web.AppKey("events")
HEALTH: web.AppKey[Health] = web.AppKey("health")
AUTH: web.AppKey[ClientAuth] = web.AppKey("client_auth")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")

# Per request: the access log's fields, the request id, the error answered, and
# the GC lease a blob hit holds until its file is open.
LOG: web.RequestKey[dict[str, object]] = web.RequestKey("log")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
ERROR: web.RequestKey[BaseException] = web.RequestKey("error")
BLOB_LEASE: web.RequestKey[Lease | None] = web.RequestKey("blob_lease")
