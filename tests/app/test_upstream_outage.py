"""An upstream that hangs, stalls mid-body or lacks a tag, against the fake upstream.

``fake.silence`` makes the fake accept every request and answer none (until
released): how a registry behind a broken load balancer fails. What these tests
prove is counted, not timed: how many requests reached the upstream, and that a
client had its answer while the upstream still had not answered.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiohttp import ClientPayloadError, ServerDisconnectedError

from config.settings import AdminSettings, Settings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import METADATA, PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of

SMALL = b"small layer bytes" * 100
LAYER = os.urandom(2 * 1024 * 1024 + 5)
ADMIN_TOKEN = "outage-admin-token"
MARGIN = 10.0  # seconds on top of a bound the issue sets: the machine is shared


def settings_for(fake: FakeUpstream, data_dir, **upstream) -> Settings:
    options = {"retries": 0, "read_timeout": 0.5, "connect_timeout": 0.5, **upstream}
    return Settings(
        data_dir=data_dir,
        admin=AdminSettings(token=ADMIN_TOKEN),
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, **options)],
    )


async def start(aiohttp_client, fake: FakeUpstream, tmp_path, **upstream):
    return await aiohttp_client(create_app(settings_for(fake, tmp_path / "data", **upstream)))


async def test_stale_tag_is_served_within_revalidate_timeout_while_the_upstream_hangs(fake, aiohttp_client, tmp_path):
    proxy = await start(aiohttp_client, fake, tmp_path, tag_ttl=0, revalidate_timeout=0.3, read_timeout=60)
    old = fake.add_image("team/app", "1", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    await proxy.server.app[PULLTHROUGH].settle()  # its prefetch is done
    fake.silence = asyncio.Event()

    began = time.monotonic()
    first = await proxy.get("/v2/team/app/manifests/1")
    assert time.monotonic() - began < 0.3 + MARGIN
    assert first.status == 200 and first.headers["Docker-Content-Digest"] == old
    assert fake.count("HEAD", "/manifests/1") == 1, "the revalidation is out, and unanswered"

    # The revalidation outlived its window: later clients get the cached copy at once,
    # concurrent or not, and nobody asks the upstream again.
    answers = await asyncio.gather(*(proxy.get("/v2/team/app/manifests/1") for _ in range(20)))
    for _ in range(10):
        answers.append(await proxy.get("/v2/team/app/manifests/1"))
    assert {(r.status, r.headers["Docker-Content-Digest"]) for r in answers} == {(200, old)}
    assert fake.count("HEAD", "/manifests/1") == 1

    # The tag moves upstream; when the upstream answers, the background revalidation records it.
    new = fake.add_image("team/app", "1", [SMALL, b"another layer"])
    fake.silence.set()
    await proxy.server.app[PULLTHROUGH].settle()
    metadata = proxy.server.app[METADATA]
    repo = await metadata.repository_id("fake.test", "team/app")
    row = await metadata.tag(repo, "1")
    assert row is not None and row.manifest == new


async def test_max_stale_bounds_how_long_a_stale_tag_is_served(fake, aiohttp_client, tmp_path):
    proxy = await start(aiohttp_client, fake, tmp_path, tag_ttl=0, max_stale=0.001)
    fake.add_image("team/app", "1", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    fake.faults["manifest"] = Fault("status", status=503)
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 503
    assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_open_breaker_fails_uncached_requests_at_once_and_only_the_probe_asks(fake, aiohttp_client, tmp_path):
    proxy = await start(aiohttp_client, fake, tmp_path, breaker_failures=2, tag_ttl=0)
    cached = fake.add_image("team/app", "1", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    await proxy.server.app[PULLTHROUGH].settle()  # its prefetch is done
    fake.add_image("team/app", "2", [LAYER])
    fake.silence = asyncio.Event()

    for tag in ("2", "3"):  # two timeouts in a row open the breaker
        r = await proxy.get(f"/v2/team/app/manifests/{tag}")
        assert r.status == 503
    asked = [p for _, p, _ in fake.requests if p != "/v2/"]
    assert len(asked) >= 2

    for path in ("/v2/team/app/manifests/2", f"/v2/team/app/blobs/{digest_of(LAYER)}", "/v2/other/app/manifests/x"):
        r = await proxy.get(path)
        assert r.status == 503, path
        error = (await r.json())["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "fake.test" in error["message"]
        assert int(r.headers["Retry-After"]) >= 1
    # The cached tag (past its TTL) is served without asking.
    r = await proxy.get("/v2/team/app/manifests/1")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == cached
    assert [p for _, p, _ in fake.requests if p != "/v2/"] == asked, "only the probe may ask the upstream"

    assert (await proxy.get("/readyz")).status == 200, "a cache with a dead upstream still serves"
    metrics = await (await proxy.get("/metrics")).text()
    assert 'regcache_upstream_state{upstream="fake.test"} 1.0' in metrics
    assert 'regcache_upstream_state_transitions_total{state="open",upstream="fake.test"} 1.0' in metrics
    stats = await (await proxy.get("/admin/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).json()
    assert stats["upstreams"]["fake.test"]["state"] == "open"

    # The upstream answers again: the probe closes the breaker and new tags are served.
    fake.silence.set()
    fake.silence = None
    for _ in range(200):
        if (r := await proxy.get("/v2/team/app/manifests/2")).status == 200:
            break
        await asyncio.sleep(0.1)
    assert r.status == 200
    metrics = await (await proxy.get("/metrics")).text()
    assert 'regcache_upstream_state{upstream="fake.test"} 0.0' in metrics
    assert fake.count("GET", "/v2/") >= 1, "the breaker closed on its probe's answer"


async def test_breaker_logs_one_line_per_transition(fake, aiohttp_client, tmp_path, caplog):
    proxy = await start(aiohttp_client, fake, tmp_path, breaker_failures=1)
    fake.silence = asyncio.Event()
    with caplog.at_level("WARNING", logger="regcache.upstream"):
        for tag in range(5):
            assert (await proxy.get(f"/v2/team/app/manifests/{tag}")).status == 503
    transitions = [r for r in caplog.records if "circuit" in r.getMessage()]
    assert len(transitions) == 1 and "circuit open" in transitions[0].getMessage()


async def test_missing_tag_is_remembered_for_negative_ttl(fake, aiohttp_client, tmp_path):
    proxy = await start(aiohttp_client, fake, tmp_path, negative_ttl=3600)
    for _ in range(5):
        r = await proxy.get("/v2/team/app/manifests/missing")
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake.count("GET", "/manifests/missing") == 1
    # Other tags and digests are asked for as usual.
    fake.add_image("team/app", "present", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/present")).status == 200


async def test_without_negative_ttl_every_miss_asks(fake, aiohttp_client, tmp_path):
    proxy = await start(aiohttp_client, fake, tmp_path, negative_ttl=0)
    for _ in range(3):
        assert (await proxy.get("/v2/team/app/manifests/missing")).status == 404
    assert fake.count("GET", "/manifests/missing") == 3


async def test_body_that_stalls_aborts_every_client_and_the_next_request_fills_again(fake, aiohttp_client, tmp_path):
    proxy = await start(aiohttp_client, fake, tmp_path, read_timeout=0.5)
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    fake.faults[layer] = Fault("stall", times=1)

    async def pull() -> bytes:
        r = await proxy.get(f"/v2/team/app/blobs/{layer}")
        assert r.status == 200
        return await r.read()

    results = await asyncio.gather(*(pull() for _ in range(3)), return_exceptions=True)
    for result in results:
        assert isinstance(result, ClientPayloadError | ServerDisconnectedError | ConnectionError), result
    assert fake.count("GET", f"/blobs/{layer}") == 1, "one fill, every client of it aborted"
    await proxy.server.app[PULLTHROUGH].settle()
    assert list((tmp_path / "data" / "tmp").iterdir()) == []

    assert await pull() == LAYER
    assert fake.count("GET", f"/blobs/{layer}") == 2


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_do_not_open_the_breaker(fake, aiohttp_client, tmp_path, status):
    proxy = await start(aiohttp_client, fake, tmp_path, breaker_failures=1)
    fake.faults["manifest"] = Fault("status", status=status)
    for tag in range(3):
        assert (await proxy.get(f"/v2/team/app/manifests/{tag}")).status == 503
    assert fake.count("GET", "/manifests/") == 3, "an upstream that answers is asked"
