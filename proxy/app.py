"""Wiring: ``create_app(settings)`` composes the resources, middlewares and routes.

What each resource is and how it starts and stops lives in ``proxy.resources``.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Middleware

from config.settings import Settings
from proxy.access.clientcheck import ClientCheck
from proxy.access.gate import ACCESS, Access, access_middleware
from proxy.access.policy import Policy
from proxy.admin.guard import admin_tokens
from proxy.http import health
from proxy.http.accesslog import request_context_for, response_started
from proxy.http.clientauth import AUTH
from proxy.http.errors import API_HEADERS, error_middleware
from proxy.metrics.events import Events, Fanout
from proxy.metrics.prometheus import Metrics, metrics_handler
from proxy.pull.routing import Router
from proxy.registry import routes as registry
from proxy.resources import EVENTS, RESOURCES, ROUTER, SETTINGS


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2"):
        response.headers.update(API_HEADERS)


def create_app(settings: Settings, events: Events | None = None) -> web.Application:
    client_auth = None
    if settings.auth is not None:
        from proxy.http.clientauth import ClientAuth

        client_auth = ClientAuth(settings.auth)
    if events is None:
        events = Metrics() if settings.metrics.enabled else Events()
    if settings.notifications.endpoints:
        from proxy.notify.notifier import Notifier

        events = Fanout(events, Notifier(settings.notifications, settings.host_port[1], observer=events))
    router = Router(settings.upstreams, settings.default_upstream)
    access = Access(router, Policy(settings), client_auth, ClientCheck())
    middlewares: list[Middleware] = [
        request_context_for(events.reads_client_request), error_middleware, access_middleware(access)]
    if settings.tracing.enabled:
        from proxy.tracing.otel import install  # OpenTelemetry is imported only here

        middlewares[:0] = install(settings.tracing)
    app = web.Application(
        middlewares=middlewares,
        client_max_size=settings.limits.max_admin_body,
    )
    app[SETTINGS] = settings
    app[ACCESS] = access
    app[EVENTS] = events
    if client_auth is not None:
        app[AUTH] = client_auth
        app.on_cleanup.append(lambda _: asyncio.to_thread(client_auth.close))
    health.add_routes(app)
    if settings.metrics.enabled and settings.metrics.listen is None:
        app.router.add_get("/metrics", metrics_handler, name="metrics")
    app[ROUTER] = router
    app.on_response_prepare.append(_on_prepare)
    app.on_response_prepare.append(response_started)
    app.cleanup_ctx.extend(RESOURCES)
    registry.add_routes(app)
    # Admin exists only with a token: no token, no /admin/ routes at all.
    tokens = admin_tokens(settings)
    if tokens:
        from proxy.admin.mount import add_admin_routes

        add_admin_routes(app, tokens)
    return app
