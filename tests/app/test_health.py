"""``/healthz``, ``/readyz`` and graceful shutdown of a real ``regcache serve`` process."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from proxy.http.health import HEALTH
from proxy.resources import METADATA, STORE
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of
from tests.support.serving import ServedRegcache

LAYER = os.urandom(2 * 1024 * 1024)


async def test_healthz_and_readyz_when_all_is_well(aiohttp_client, tmp_path):
    settings = Settings(data_dir=tmp_path, upstreams=[UpstreamSettings(name="x.test", url="http://127.0.0.1:9")])
    client = await aiohttp_client(create_app(settings))
    r = await client.get("/healthz")
    assert r.status == 200 and (await r.json())["status"] == "ok"
    r = await client.get("/readyz")
    assert r.status == 200
    assert await r.json() == {"status": "ready", "checks": {"store": "ok", "metadata": "ok"}}


async def test_readyz_fails_when_store_or_metadata_fail_or_shutting_down(aiohttp_client, tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path, upstreams=[UpstreamSettings(name="x.test", url="http://127.0.0.1:9")])
    app = create_app(settings)
    client = await aiohttp_client(app)

    async def not_writable() -> bool:
        return False

    async def broken() -> bool:
        raise OSError("database is locked")

    monkeypatch.setattr(app[STORE].backend, "writable", not_writable)
    r = await client.get("/readyz")
    assert r.status == 503 and (await r.json())["checks"]["store"] == "failed"
    monkeypatch.undo()
    monkeypatch.setattr(app[METADATA], "ping", broken)
    r = await client.get("/readyz")
    assert r.status == 503 and (await r.json())["checks"]["metadata"] == "error"
    monkeypatch.undo()
    assert (await client.get("/readyz")).status == 200
    app[HEALTH].begin_shutdown()
    r = await client.get("/readyz")
    assert r.status == 503 and (await r.json())["checks"]["shutdown"] == "in progress"
    assert (await client.get("/healthz")).status == 200


class ThreadedFake:
    """The fake upstream on its own loop in a thread, for tests that drive a server process."""

    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.fake.app, shutdown_timeout=0.5)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.fake.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def threaded_fake() -> Iterator[FakeUpstream]:
    fake = ThreadedFake()
    fake.fake.add_image("team/app", "1", [LAYER])
    yield fake.fake
    fake.close()


def _download(url: str) -> bytes | Exception:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except Exception as exc:
        return exc


def _wait(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _serve(tmp_path, fake: FakeUpstream, **limits: float) -> ServedRegcache:  # type: ignore[no-untyped-def]
    upstream = {"name": "fake.test", "url": fake.base_url, "default": True, "retries": 0}
    return ServedRegcache(tmp_path / "proxy", [upstream], settings={"limits": limits}).start()


def test_sigterm_turns_readyz_503_and_finishes_the_response_in_flight(tmp_path, threaded_fake):
    layer = digest_of(LAYER)
    threaded_fake.faults[layer] = Fault("slow", delay=1.5)
    server = _serve(tmp_path, threaded_fake, drain_delay=1.0, shutdown_timeout=20)
    try:
        assert server.get("/readyz")[0] == 200
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_download, f"{server.url}/v2/team/app/blobs/{layer}")
            _wait(lambda: threaded_fake.count("GET", f"/blobs/{layer}") == 1)
            server.process.send_signal(signal.SIGTERM)
            # Still listening during the drain delay, but no longer ready.
            _wait(lambda: server.get("/readyz")[0] == 503)
            body = pending.result(60)
        assert body == LAYER
        assert server.process.wait(30) == 0
        assert "shutting down" in server.log_text()
    finally:
        server.kill()


def test_shutdown_timeout_cuts_responses_that_take_too_long(tmp_path, threaded_fake):
    layer = digest_of(LAYER)
    threaded_fake.faults[layer] = Fault("slow", delay=60)
    server = _serve(tmp_path, threaded_fake, shutdown_timeout=0.5)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_download, f"{server.url}/v2/team/app/blobs/{layer}")
            _wait(lambda: threaded_fake.count("GET", f"/blobs/{layer}") == 1)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(20) == 0
            result = pending.result(30)
        assert isinstance(result, Exception), "a cut response must not look complete"
        # Nothing half-written was committed.
        blobs = [p.name for p in (server.data_dir / "blobs").rglob("*") if p.is_file()]
        assert layer.split(":")[1] not in blobs
    finally:
        server.kill()
