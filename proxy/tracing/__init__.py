"""Spans around the steps a slow pull is made of, at no cost when tracing is off.

The request path calls ``span(...)`` and ``client_trace_configs()`` from here, and
this module imports nothing of OpenTelemetry: until ``proxy.tracing.otel.install``
(``tracing.enabled``) hands it a tracer, a span is a shared null context and the
upstream sessions get no trace hooks. Spans wrap steps (a token exchange, a fill,
a commit), never chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

_NULL: AbstractContextManager[None] = contextlib.nullcontext()
_start: Callable[..., AbstractContextManager[Any]] | None = None
_client_configs: list[Any] = []
_client_span: Callable[[str, Any], AbstractContextManager[dict[str, str]]] | None = None
_NO_HEADERS: AbstractContextManager[dict[str, str]] = contextlib.nullcontext({})


def span(name: str, attributes: dict[str, str] | None = None) -> AbstractContextManager[Any]:
    """A child of the current span, for ``with``; nothing when tracing is off."""
    if _start is None:
        return _NULL
    return _start(name, attributes=attributes)


def client_trace_configs() -> list[Any]:
    """``aiohttp.TraceConfig``s for the upstream sessions: a client span per request, W3C ``traceparent`` sent."""
    return list(_client_configs)


def client_span(method: str, url: Any) -> AbstractContextManager[dict[str, str]]:
    """For a request made outside aiohttp (blob bodies read on a thread): a client span
    around it, giving the headers that carry the trace upstream; ``{}`` when tracing is off."""
    if _client_span is None:
        return _NO_HEADERS
    return _client_span(method, url)


def enable(start: Callable[..., AbstractContextManager[Any]], client_configs: list[Any],
           client: Callable[[str, Any], AbstractContextManager[dict[str, str]]]) -> None:
    global _start, _client_configs, _client_span
    _start, _client_configs, _client_span = start, client_configs, client
