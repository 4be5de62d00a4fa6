"""The admin token guard: every request under ``/admin/`` proves it holds a token.

The admin API is enabled only when a token is configured, and that is the
invariant the rest of the code leans on: ``admin_tokens`` is the single place
that decides whether admin is on, ``admin_app`` refuses to build the admin
application without a token, and the guard is created with the tokens it
checks. So no path exists that serves ``/admin/`` unguarded, on any address.

Tokens have a name (``admin.token`` is "admin"; ``admin.tokens`` name theirs) that
the access log records as the identity that acted, and a role: ``full`` may use
every verb, ``read`` only those that change nothing (``images``, ``search``,
``stats``: the GET routes). Tokens are compared in constant time, each of them
every time. A missing or wrong token gets 401 with an error body before any
handler runs, a read token on a verb that changes things 403; neither changes
anything.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from config.settings import ConfigError, Settings
from proxy.access.policy import Identity
from proxy.errors import Denied
from proxy.http.context import IDENTITY, LOG
from proxy.http.errors import error_body

log = logging.getLogger("regcache.admin")

ADMIN_PREFIX = "/admin/"
CHALLENGE = 'Bearer realm="regcache-admin"'
# A token shorter than this is a typo or a placeholder, not a secret.
MIN_TOKEN_LENGTH = 8
# What a read-only token may do: look, never change.
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class AdminKey:
    name: str
    role: Literal["read", "full"]
    secret: bytes

    def __repr__(self) -> str:
        return f"AdminKey({self.name!r}, {self.role!r})"  # never the secret


def _checked(token: str, key: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{key}: must be at least {MIN_TOKEN_LENGTH} characters")
    return token


def admin_token(settings: Settings) -> str | None:
    """The configured ``admin.token``, or None; a blank token is an error."""
    token = settings.admin.resolve_token()
    return None if token is None else _checked(token, "admin.token")


def admin_tokens(settings: Settings) -> list[AdminKey]:
    """Every admin token: ``admin.token`` (named "admin", full) and the named ones; empty: admin is off."""
    keys = []
    token = admin_token(settings)
    if token is not None:
        keys.append(AdminKey("admin", "full", token.encode()))
    for named in settings.admin.tokens:
        key = f"admin.tokens.{named.name}"
        keys.append(AdminKey(named.name, named.role, _checked(named.resolve(key), key).encode()))
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_admin_exposure(settings: Settings, token: object, admin_wanted: bool = True) -> None:
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


def _match(presented: bytes, keys: Sequence[AdminKey]) -> AdminKey | None:
    # Every token compared every time: the time taken says nothing about which matched.
    found = None
    for key in keys:
        if hmac.compare_digest(presented, key.secret):
            found = key
    return found


def token_guard(keys: Sequence[AdminKey]) -> Middleware:
    """A middleware for the admin application that lets only holders of ``keys`` through."""
    if not keys or any(not key.secret for key in keys):
        raise ConfigError("admin.token: the admin guard needs a non-empty token")

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = _presented_token(request)
        if presented is None:
            request[LOG]["result"] = "unauthorized"
            return _unauthorized("admin token required")
        key = _match(presented.encode(), keys)
        if key is None:
            request[LOG]["result"] = "unauthorized"
            log.warning("admin request with a wrong token from %s", request.remote)
            return _unauthorized("admin token is wrong")
        identity = Identity("admin", key.name)
        request[IDENTITY] = identity
        if key.role == "read" and request.method not in READ_METHODS:
            request[LOG].update(identity=str(identity), decision="denied", rule="admin_role")
            raise Denied(f"admin token {key.name!r} may only read (images, search, stats)")
        request[LOG].update(identity=str(identity), decision="allowed", rule="admin_role")
        return await handler(request)

    return guard


def admin_app(keys: Sequence[AdminKey]) -> web.Application:
    """The ``/admin/`` sub-application, guarded; verbs add their routes to it."""
    return web.Application(middlewares=[token_guard(keys)])
