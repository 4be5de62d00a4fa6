"""``/healthz`` (the process answers) and ``/readyz`` (it can serve pulls now).

Readiness checks what a pull needs: the store accepts writes, SQLite answers,
and the process is not shutting down. During shutdown ``/readyz`` answers 503
first, so a load balancer stops sending new pulls while the ones in flight
finish (see ``proxy.server``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.resources import METADATA, STORE

log = logging.getLogger("regcache.health")

CHECK_TIMEOUT = 2.0


class Health:
    def __init__(self) -> None:
        self.shutting_down = False

    def begin_shutdown(self) -> None:
        self.shutting_down = True


HEALTH: web.AppKey[Health] = web.AppKey("health")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _check(name: str, probe: Callable[[], Awaitable[bool]]) -> tuple[str, str]:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            ok = await probe()
    except TimeoutError:
        return name, "timeout"
    except Exception as exc:
        # Only the type: an exception text may carry paths or endpoints.
        log.warning("readiness check %s failed: %s", name, type(exc).__name__)
        return name, "error"
    return name, "ok" if ok is not False else "failed"


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    checks: dict[str, str] = {}
    if app[HEALTH].shutting_down:
        checks["shutdown"] = "in progress"
    if STORE not in app or METADATA not in app:
        checks["startup"] = "in progress"
    else:
        metadata = app[METADATA]
        results = await asyncio.gather(
            _check("store", app[STORE].backend.writable),
            _check("metadata", metadata.ping),
        )
        checks.update(results)
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
    )


def add_routes(app: web.Application) -> None:
    app[HEALTH] = Health()
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
