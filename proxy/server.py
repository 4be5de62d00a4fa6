"""Running the application: listeners, TLS, limits, signals and graceful shutdown.

SIGTERM/SIGINT: ``/readyz`` turns 503 at once, the listener stays open for
``limits.drain_delay`` so load balancers notice, then it closes; responses in
flight get up to ``limits.shutdown_timeout`` to finish before the remaining
connections are cut and the store is closed. SIGHUP reloads the TLS
certificate, the htpasswd and token files, and the access rules (``access`` and
each upstream's ``allow``/``deny``) from the config file; other settings need a
restart.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from config.settings import ConfigError, Settings, _split_listen
from proxy.access.gate import ACCESS
from proxy.http.accesslog import AccessLogger
from proxy.http.clientauth import AUTH
from proxy.http.health import HEALTH
from proxy.http.tls import ServerTLS

log = logging.getLogger("regcache")


def runner_kwargs(settings: Settings) -> dict[str, Any]:
    """What ``web.AppRunner`` (and the test server) need: access log, limits, shutdown."""
    limits = settings.limits
    return {
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger("regcache.access"),
        "shutdown_timeout": limits.shutdown_timeout,
        "handler_cancellation": True,
        # Request line and each header; larger ones get 400 before any handler runs.
        "max_line_size": limits.max_header_size,
        "max_field_size": limits.max_header_size,
        # An idle or never-finished connection (slowloris) is closed after this.
        "keepalive_timeout": limits.keepalive_timeout,
    }


# Loads the settings again, as at startup (file, environment, flags): for SIGHUP.
Reloader = Callable[[], Settings]


async def serve(settings: Settings, *, reuse_port: bool = False, reload: Reloader | None = None) -> None:
    from proxy.app import create_app

    app = create_app(settings)
    tls = ServerTLS(settings.tls) if settings.tls is not None else None
    runner = web.AppRunner(app, **runner_kwargs(settings))
    metrics_runner = None
    try:
        # Starts the resources in order (proxy.resources); the cleanup below gives
        # back what a startup that fails part way had taken, the store lock included.
        await runner.setup()
        host, port = settings.host_port
        ssl_context = tls.context if tls is not None else None
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port,
                           ssl_context=ssl_context)
        await site.start()
        metrics_runner = await _start_metrics(app, settings, reuse_port)
        scheme = "https" if tls is not None else "http"
        log.info("regcache listening on %s://%s:%s, data in %s", scheme, host, port, settings.data_dir)
        await _until_stopped(app, settings, tls, reload)
    finally:
        # Closes the listener, waits up to shutdown_timeout for responses in flight, then cleans up.
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    log.info("stopped")


async def _until_stopped(
    app: web.Application, settings: Settings, tls: ServerTLS | None, reload: Reloader | None
) -> None:
    """Serves until SIGTERM/SIGINT, then reports not ready and drains; SIGHUP reloads meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app, tls, reload)
    try:
        await stop.wait()
        log.info("shutting down: not ready, draining for %ss", settings.limits.drain_delay)
        app[HEALTH].begin_shutdown()
        if settings.limits.drain_delay > 0:
            await asyncio.sleep(settings.limits.drain_delay)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _start_metrics(app: web.Application, settings: Settings, reuse_port: bool) -> web.AppRunner | None:
    if not settings.metrics.enabled or settings.metrics.listen is None:
        return None
    from proxy.metrics.prometheus import metrics_app

    try:
        host, port = _split_listen(settings.metrics.listen)
    except ValueError as exc:
        raise ConfigError(f"metrics.listen: {exc}") from None
    runner = web.AppRunner(metrics_app(app), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port).start()
    log.info("metrics on http://%s:%s/metrics", host, port)
    return runner


def _reload(app: web.Application, tls: ServerTLS | None, reload: Reloader | None) -> None:
    log.info("SIGHUP: reloading certificate, credentials and access rules")
    if tls is not None:
        tls.reload()
    auth = app.get(AUTH)
    if auth is not None:
        try:
            auth.reload()
        except ConfigError as exc:
            log.error("htpasswd or token reload failed, keeping the old ones: %s", exc)
    if reload is not None:
        try:
            fresh = reload()
        except ConfigError as exc:
            log.error("config reload failed, keeping the old access rules: %s", exc)
            return
        access = app[ACCESS]
        access.policy.reload(fresh)
        # Answers the upstream gave under the old rules are not evidence under the new ones.
        access.check.forget_all()
        log.info("access rules reloaded")
