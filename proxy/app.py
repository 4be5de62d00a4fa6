"""Wiring: ``create_app(settings)`` composes the resources, middlewares and routes.

What each resource is and how it starts and stops lives in ``proxy.resources``.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Middleware

from config.settings import Settings
from proxy.admin.guard import admin_token
from proxy.http import health
from proxy.http.accesslog import request_context
from proxy.http.clientauth import AUTH
from proxy.http.errors import API_HEADERS, error_middleware
from proxy.metrics.events import Events
from proxy.metrics.prometheus import Metrics, metrics_handler
from proxy.pull.routing import Router
from proxy.registry import routes as registry
from proxy.resources import EVENTS, RESOURCES, ROUTER, SETTINGS


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2"):
        response.headers.update(API_HEADERS)


def create_app(settings: Settings, events: Events | None = None) -> web.Application:
    middlewares: list[Middleware] = [request_context, error_middleware]
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
    app.cleanup_ctx.extend(RESOURCES)
    registry.add_routes(app)
    # Admin exists only with a token: no token, no /admin/ routes at all.
    token = admin_token(settings)
    if token is not None:
        from proxy.admin.mount import add_admin_routes

        add_admin_routes(app, token)
    return app
