"""OpenTelemetry traces of a cold skopeo pull, collected with the SDK's in-memory exporter; and
nothing of OpenTelemetry loaded while tracing is off."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from config.observability import TracingSettings
from config.settings import Settings, UpstreamSettings
from proxy.resources import PULLTHROUGH
from tests.support import skopeo
from tests.support.fake_upstream import digest_of
from tests.support.serving import start_proxy

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [os.urandom(200 * 1024), b"second layer" * 100]


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    # One tracer provider per process (the API allows one); this module's spans go to memory.
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    return next(s for s in spans if s.context.span_id == span.parent.span_id)


async def test_a_cold_skopeo_pull_has_a_span_per_request_with_its_steps_as_children(
    fake, aiohttp_server, aiohttp_client, tmp_path, exporter
):
    exporter.clear()
    fake.token = "upstream-token"  # a Bearer challenge: the pull needs a token exchange
    manifest = fake.add_image("team/app", "1", LAYERS)
    settings = Settings(
        data_dir=tmp_path / "data",
        # No prefetch: each blob GET starts its own fill, so every blob request waits on one.
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, prefetch=0)],
        tracing=TracingSettings(enabled=True),
    )
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    host = f"{proxy.server.host}:{proxy.server.port}"
    await asyncio.to_thread(skopeo.copy, skopeo.docker_ref(host, "team/app", "1"), f"oci:{tmp_path / 'out'}:x")
    await proxy.server.app[PULLTHROUGH].settle()
    spans = list(exporter.get_finished_spans())

    server = [s for s in spans if s.kind == SpanKind.SERVER]
    by_route = {(s.attributes or {}).get("regcache.route") for s in server}
    assert {"base", "manifest", "blob"} <= by_route
    [manifest_span] = [s for s in server if s.attributes["regcache.route"] == "manifest"]
    expected = {"regcache.repository": "team/app", "regcache.reference": "1", "regcache.digest": manifest,
                "regcache.result": "miss", "regcache.upstream": "fake.test"}
    assert {k: manifest_span.attributes.get(k) for k in expected} == expected
    # The token exchange happened for the manifest request, its HTTP GET inside it.
    [token] = [s for s in spans if s.name == "upstream token"]
    assert parent_of(token, spans) is manifest_span
    token_get = [s for s in spans if s.kind == SpanKind.CLIENT and parent_of(s, spans) is token]
    assert len(token_get) == 1
    manifest_gets = [s for s in spans if s.kind == SpanKind.CLIENT and parent_of(s, spans) is manifest_span]
    assert manifest_gets  # the challenged GET and the one with the token

    blob_spans = [s for s in server if s.attributes["regcache.route"] == "blob"]
    config = {digest_of(layer) for layer in LAYERS} ^ {s.attributes["regcache.digest"] for s in blob_spans}
    assert len(config) == 1  # every layer, and the config blob
    for request in blob_spans:
        digest = request.attributes["regcache.digest"]
        assert request.attributes["regcache.result"] == "miss"
        children = [s for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id]
        assert sorted(s.name for s in children) == ["fill", "fill wait"]
        [fill] = [s for s in children if s.name == "fill"]
        assert fill.attributes["regcache.digest"] == digest
        steps = [s for s in spans if s.parent is not None and s.parent.span_id == fill.context.span_id]
        assert sorted(s.name for s in steps if s.kind != SpanKind.CLIENT) == ["commit"]
        assert len([s for s in steps if s.kind == SpanKind.CLIENT]) == 1  # the upstream GET
    # W3C trace context reached the upstream: each GET carries its own trace's traceparent.
    upstream_gets = [(path, headers) for method, path, headers in fake.requests
                     if method == "GET" and "/blobs/" in path]
    assert len(upstream_gets) == len(blob_spans)
    traces = {format(s.context.trace_id, "032x") for s in blob_spans}
    assert {h["traceparent"].split("-")[1] for _, h in upstream_gets} == traces


def test_with_tracing_off_opentelemetry_is_never_imported():
    # A fresh interpreter: this test process has imported OpenTelemetry for the test above.
    script = textwrap.dedent("""
        import sys
        from config.settings import Settings
        from proxy.app import create_app
        from proxy.server import serve
        create_app(Settings())
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "[]"
