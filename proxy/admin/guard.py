"""The admin token guard: every request under ``/admin/`` proves it holds the token.

The admin API is enabled only when a token is configured, and that is the
invariant the rest of the code leans on: ``admin_token`` is the single place
that decides whether admin is on, ``admin_app`` refuses to build the admin
application without a token, and the guard is created with the token it
checks. So no path exists that serves ``/admin/`` unguarded, on any address.

Tokens are compared in constant time (``hmac.compare_digest``). A missing or
wrong token gets 401 with an error body before any handler runs, so it
changes nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from config.settings import ConfigError, Settings
from proxy.http.context import LOG
from proxy.http.errors import error_body

log = logging.getLogger("regcache.admin")

ADMIN_PREFIX = "/admin/"
CHALLENGE = 'Bearer realm="regcache-admin"'
# A token shorter than this is a typo or a placeholder, not a secret.
MIN_TOKEN_LENGTH = 8


def admin_token(settings: Settings) -> str | None:
    """The configured admin token, or None when admin is off; a blank token is an error."""
    token = settings.admin.resolve_token()
    if token is None:
        return None
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"admin.token: must be at least {MIN_TOKEN_LENGTH} characters")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_admin_exposure(settings: Settings, token: str | None, admin_wanted: bool = True) -> None:
    """Refuse to run admin on a non-loopback address without a token.

    ``admin_wanted`` is True whenever admin routes are about to be registered;
    since they only are when a token exists, this is the explicit check of that
    invariant rather than a setting someone could flip.
    """
    host, _ = settings.host_port
    if admin_wanted and not token and not is_loopback(host):
        raise ConfigError(f"admin: refusing to serve the admin API on {host} without admin.token")


def _presented_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _unauthorized(message: str) -> web.Response:
    return web.Response(
        status=401,
        body=error_body("UNAUTHORIZED", message),
        headers={"Content-Type": "application/json", "WWW-Authenticate": CHALLENGE},
    )


def token_guard(token: str) -> Middleware:
    """A middleware for the admin application that lets only ``token`` through."""
    if not token:
        raise ConfigError("admin.token: the admin guard needs a non-empty token")
    expected = token.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = _presented_token(request)
        if presented is None:
            request[LOG]["result"] = "unauthorized"
            return _unauthorized("admin token required")
        if not hmac.compare_digest(presented.encode(), expected):
            request[LOG]["result"] = "unauthorized"
            log.warning("admin request with a wrong token from %s", request.remote)
            return _unauthorized("admin token is wrong")
        return await handler(request)

    return guard


def admin_app(token: str) -> web.Application:
    """The ``/admin/`` sub-application, guarded; verbs add their routes to it."""
    return web.Application(middlewares=[token_guard(token)])
