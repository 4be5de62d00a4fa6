"""One JSON access-log line per request, with what an operator greps for.

Also for requests whose client disconnects: aiohttp cancels their task
(``handler_cancellation``) before its access logger runs. The tests below put
the disconnect exactly where it hurts, every time: while the handler waits on
the upstream, mid-body, and after the last byte while the task has not ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import pytest
from aiohttp import web

from config.settings import Settings, UpstreamSettings
from proxy.http.accesslog import AccessLogger, request_context, response_started
from proxy.metrics.events import Events
from proxy.resources import EVENTS, PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of
from tests.support.serving import sample, start_proxy

LAYER = b"access log layer" * 100


async def test_each_request_logs_one_line_with_the_fields_operators_need(
    aiohttp_server, aiohttp_client, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="regcache.access")
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    manifest_digest = fake.add_image("team/app", "7", [LAYER])
    # No prefetch: the blob GET below must be the request that misses.
    upstream = UpstreamSettings(name="fake.test", url=fake.base_url, default=True, prefetch=0)
    settings = Settings(data_dir=tmp_path, upstreams=[upstream])
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    layer = digest_of(LAYER)
    r = await proxy.get("/v2/team/app/manifests/7", headers={"X-Request-Id": "req-123"})
    assert r.headers["X-Request-Id"] == "req-123"
    await (await proxy.get(f"/v2/team/app/blobs/{layer}")).read()
    # The client has every byte once the digest is verified; the commit may still run.
    await proxy.server.app[PULLTHROUGH].fills.settle()
    await (await proxy.get(f"/v2/team/app/blobs/{layer}")).read()
    assert (await proxy.get("/v2/team/app/manifests/nope")).status == 404

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "regcache.access"]
    assert len(lines) == 4
    manifest, miss, hit, missing = lines
    common = {"method", "route", "status", "bytes", "duration_ms", "request_id", "upstream", "repository"}
    for line in lines:
        assert common <= line.keys(), line
        assert line["upstream"] == "fake.test" and line["repository"] == "team/app"
    assert manifest["request_id"] == "req-123"
    assert manifest["route"] == "manifest" and manifest["reference"] == "7" and manifest["digest"] == manifest_digest
    assert manifest["result"] == "miss" and manifest["status"] == 200
    assert (miss["route"], miss["digest"], miss["result"], miss["bytes"]) == ("blob", layer, "miss", len(LAYER))
    assert (hit["result"], hit["bytes"]) == ("hit", len(LAYER))
    assert missing["status"] == 404 and missing["result"] == "error" and "error" in missing
    assert len({line["request_id"] for line in lines}) == 4



async def _get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent ``GET path`` (hang up by closing the writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def _access_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, Any]]:
    """The access-log lines once ``count`` were written (the server notices the hang-up on its own time)."""
    for _ in range(500):
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "regcache.access"]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.01)
    return lines


async def _fake_proxy(fake, aiohttp_server, aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    upstream = UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=0, prefetch=0)
    return await start_proxy(aiohttp_server, aiohttp_client, Settings(data_dir=tmp_path, upstreams=[upstream]))


async def test_client_gone_while_the_upstream_is_awaited_is_logged_and_counted(
    fake, aiohttp_server, aiohttp_client, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="regcache.access")
    fake.add_image("team/app", "1", [LAYER])
    fake.faults["manifest"] = Fault("slow", delay=30, times=1)
    proxy = await _fake_proxy(fake, aiohttp_server, aiohttp_client, tmp_path)
    _, client = await _get(proxy.server.port, "/v2/team/app/manifests/1")
    while fake.count("GET", "/manifests/1") == 0:  # from here on the handler waits on the upstream
        await asyncio.sleep(0.01)
    await _hang_up(client)
    (line,) = await _access_lines(caplog, 1)
    assert (line["route"], line["status"], line["disconnected"], line["bytes"]) == ("manifest", 499, True, 0)
    assert line["upstream"] == "fake.test" and line["repository"] == "team/app"
    metrics = await (await proxy.get("/metrics")).text()
    assert sample(metrics, "regcache_requests_total", type="manifest", result="disconnected") == 1
    assert sample(metrics, "regcache_http_request_duration_seconds_count", route="manifest", status="499") == 1


async def test_client_gone_mid_blob_is_logged_and_counted(fake, aiohttp_server, aiohttp_client, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="regcache.access")
    layer = os.urandom(256 * 1024)
    fake.add_image("team/app", "1", [layer])
    digest = digest_of(layer)
    fake.faults[digest] = Fault("slow", delay=30, times=1)  # half the body, then nothing
    proxy = await _fake_proxy(fake, aiohttp_server, aiohttp_client, tmp_path)
    # Headers and a first slice of the body, then the client goes while the fill waits on the upstream.
    reader, client = await _get(proxy.server.port, f"/v2/team/app/blobs/{digest}")
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1024)
    await _hang_up(client)
    (line,) = await _access_lines(caplog, 1)
    assert (line["route"], line["status"], line["result"], line["disconnected"]) == ("blob", 200, "miss", True)
    metrics = await (await proxy.get("/metrics")).text()
    assert sample(metrics, "regcache_http_request_duration_seconds_count", route="blob", status="200") == 1


class _Recorded(Events):
    def __init__(self) -> None:
        self.requests: list[tuple[str, int, int]] = []

    def http_request(self, route, method, status, seconds, sent, upstream, result):  # type: ignore[no-untyped-def]
        self.requests.append((route, status, sent))


class _SentInPrepare(web.StreamResponse):
    """Sends its whole body while aiohttp prepares it, as ``BlobFileResponse`` does, then lingers."""

    def __init__(self, body: bytes, linger: asyncio.Event) -> None:
        super().__init__()
        self.content_length = len(body)
        self._body_bytes, self._linger = body, linger

    async def prepare(self, request):  # type: ignore[no-untyped-def]
        writer = await super().prepare(request)
        await self.write(self._body_bytes)
        await self._linger.wait()
        await self.write_eof()
        return writer


@pytest.mark.parametrize("where", ["handler", "response"])
async def test_client_gone_right_after_its_last_byte_is_logged_and_counted(where, aiohttp_server, caplog):
    """The last byte is out but the request's task has not ended (in the handler, or while aiohttp
    sends the response it returned) when the client hangs up: the task is cancelled, not finished."""
    caplog.set_level(logging.INFO, logger="regcache.access")
    body, linger = b"x" * 1000, asyncio.Event()  # never set: the hang-up ends the task

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body)
        await linger.wait()
        return response

    async def returned(request: web.Request) -> web.StreamResponse:
        return _SentInPrepare(body, linger)

    app = web.Application(middlewares=[request_context])
    app.on_response_prepare.append(response_started)
    app[EVENTS] = events = _Recorded()
    app.router.add_get("/x", streamed if where == "handler" else returned, name="x")
    server = await aiohttp_server(app, access_log_class=AccessLogger, access_log=logging.getLogger("regcache.access"))
    reader, client = await _get(server.port, "/x")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
    assert await reader.readexactly(len(body)) == body
    await _hang_up(client)
    (line,) = await _access_lines(caplog, 1)
    assert (line["route"], line["status"], line["disconnected"]) == ("x", 200, True)
    assert events.requests == [("x", 200, line["bytes"])]
