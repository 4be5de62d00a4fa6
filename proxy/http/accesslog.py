"""One structured line per request, written after the response is fully sent.

Handlers put what they know (upstream, repository, digest or tag, cache
result) into ``request[LOG]``; this logger adds method, route, status,
bytes, duration and the request id. Never headers, never credentials.

aiohttp calls the access logger only when a request's task ends normally. A
client that disconnects while the handler runs, or while aiohttp still writes
the response (even right after the last byte reached it), cancels that task
first (``handler_cancellation``). So ``request_context`` also hooks the task's
end, and writes the line and the metrics of any request the access logger did
not: status 499 (nginx's "client closed request") if no response had started,
and ``"disconnected": true`` either way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import sys
import time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from proxy.http.context import ERROR, LOG, LOGGED, REQUEST_ID, RESPONSE
from proxy.http.pulls import report_pull
from proxy.metrics.events import CLIENT_REQUEST, ClientRequest
from proxy.resources import EVENTS

log = logging.getLogger("regcache.access")

CLIENT_CLOSED = 499
# One encoder for every line: json.dumps(default=...) builds a new JSONEncoder on each call.
_to_json = json.JSONEncoder(default=str).encode


def request_context_for(name_requests: bool) -> Middleware:
    """The first middleware: the access log's fields, the request id and the hook on the task's end.

    ``name_requests``: also set ``CLIENT_REQUEST``, for an app whose events read it
    (notifications); elsewhere building it would be work on every request for nobody.
    """

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[LOG] = {}
        # 16 random hex digits as before, without uuid4()'s UUID object and system call: an id
        # needs to be unique, not unpredictable (random reseeds itself in a forked worker).
        request_id = request.headers.get("X-Request-Id", "")[:64] or f"{random.getrandbits(64):016x}"
        request[REQUEST_ID] = request_id
        if name_requests:
            # Each request runs in its own task: the value lives as long as the request and what it starts.
            CLIENT_REQUEST.set(ClientRequest(request_id, request.remote or "", request.host, request.method,
                                             request.headers.get("User-Agent", "")[:512]))
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(functools.partial(_log_if_cut, request, time.monotonic()))
        return await handler(request)

    return request_context


# For an application put together by hand: every request named, whoever reads it.
request_context = request_context_for(name_requests=True)


async def response_started(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: headers are about to go, whoever prepares them (a handler
    streaming a body, or aiohttp sending what a handler returned or raised)."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id
    request[RESPONSE] = response


def _log_if_cut(request: web.Request, started: float, task: asyncio.Task[object]) -> None:
    """The request's task ended: log it if the access logger did not (a cancelled task)."""
    if not request.get(LOGGED):
        record(log, request, request.get(RESPONSE), time.monotonic() - started, disconnected=True)


def _routed(request: web.BaseRequest, attribute: str) -> object:
    """``request.match_info`` or ``request.app``, or None for a request that never reached routing.

    aiohttp answers a request it could not parse (a TLS probe on the plain port, as podman sends
    to an insecure mirror) with a 400 whose request has no match info: both attributes then
    assert instead of returning None.
    """
    try:
        return getattr(request, attribute, None)
    except AssertionError:
        return None


def route_name(request: web.BaseRequest) -> str:
    match = _routed(request, "match_info")
    route = getattr(match, "route", None)
    name: str | None = getattr(route, "name", None)
    if name:
        return name
    return "other" if match is None or route is None or route.resource is None else route.resource.canonical


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Body bytes sent: aiohttp's ``body_length`` counts headers and misses sendfile."""
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    finished = response.body_length > 0
    if response.content_length is not None:
        # An aborted stream never wrote its end, so body_length stays 0 and so does this.
        return response.content_length if finished else 0
    return response.body_length


def record(
    logger: logging.Logger,
    request: web.BaseRequest,
    response: web.StreamResponse | None,
    duration: float,
    *,
    disconnected: bool = False,
) -> None:
    """The request's access-log line and request metrics; ``response`` None: none was started."""
    request[LOGGED] = True
    fields = request.get(LOG, {})
    route = route_name(request)
    status = response.status if response is not None else CLIENT_CLOSED
    sent = _body_bytes(request, response) if response is not None else 0
    if logger.isEnabledFor(logging.INFO):
        entry = {
            "ts": round(time.time(), 3),
            "request_id": request.get(REQUEST_ID, ""),
            "method": request.method,
            "route": route,
            "path": request.path[:512],
            "status": status,
            "bytes": sent,
            "duration_ms": round(duration * 1000, 2),
            "remote": request.remote,
        }
        entry.update(fields)
        if disconnected:
            entry["disconnected"] = True
        error = request.get(ERROR)
        if error is not None:
            entry.setdefault("result", "error")
            entry["error"] = getattr(error, "message", None) or type(error).__name__
        logger.info(_to_json(entry))
    app = _routed(request, "app")
    events = app.get(EVENTS) if isinstance(app, web.Application) else None
    if events is not None:
        events.http_request(route, request.method, status, duration, sent, fields.get("upstream"), fields.get("result"))
        if response is not None:
            report_pull(events, request, response, route, fields)


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration: float) -> None:
        record(self.logger, request, response, duration)

    @property
    def enabled(self) -> bool:
        # Always called: request metrics come from here even when the log level hides the line.
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "regcache.access":
            return record.getMessage()
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _to_json(entry)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
