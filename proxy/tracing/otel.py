"""OpenTelemetry wiring (``pip install '.[tracing]'``); imported only with ``tracing.enabled``.

The SDK's tracer provider exports over OTLP/HTTP as the standard ``OTEL_*``
variables say (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``...). A provider the process already
has (``opentelemetry-instrument``, a test's in-memory exporter) is used as it is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor, create_aiohttp_middleware
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from config.observability import TracingSettings
from proxy import tracing
from proxy.http.accesslog import route_name
from proxy.http.context import LOG

# What the access log knows of a request, as attributes of its span.
FIELDS = ("upstream", "repository", "reference", "digest", "result")


def install(settings: TracingSettings) -> list[Middleware]:
    """Turns the spans of ``proxy.tracing`` on; the middlewares that make a server span per request."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the API's no-op proxy: nobody configured one
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": settings.service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    tracer = provider.get_tracer("regcache")

    @contextlib.contextmanager
    def client_span(method: str, url: Any) -> Iterator[dict[str, str]]:
        # The URL without its query: a CDN's signed URL carries credentials there.
        attributes = {"http.request.method": method, "url.full": str(url.with_query(None))}
        with tracer.start_as_current_span(method, kind=trace.SpanKind.CLIENT, attributes=attributes):
            headers: dict[str, str] = {}
            propagate.inject(headers)
            yield headers

    tracing.enable(tracer.start_as_current_span, [create_trace_config(tracer_provider=provider)], client_span)
    # instrument() sets what the server middleware reads (excluded URLs, semantic conventions,
    # its meters) and swaps web.Application for a subclass that adds the middleware to every
    # application, sub-applications too (a second, nested server span per admin request).
    # The swap is undone at once: the middleware goes on this server's application only.
    instrumentor = AioHttpServerInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    instrumentor.uninstrument()
    return [create_aiohttp_middleware(tracer_provider=provider), _annotate]


@web.middleware
async def _annotate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route, repository, digest and cache result on the request's span, once the handler knows them."""
    try:
        return await handler(request)
    finally:
        fields = request.get(LOG, {})
        span = trace.get_current_span()
        span.set_attribute("regcache.route", route_name(request))
        span.set_attributes({f"regcache.{k}": str(fields[k]) for k in FIELDS if k in fields})
