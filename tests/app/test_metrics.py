"""Prometheus metrics: what an SRE's dashboard reads, checked against what really happened."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp import ClientPayloadError, ServerDisconnectedError

from config.settings import AdminSettings, MetricsSettings, Settings, UpstreamSettings
from proxy.app import create_app
from proxy.metrics.prometheus import metrics_app
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of
from tests.support.serving import sample, start_proxy

LAYER = os.urandom(512 * 1024 + 3)
SMALL = b"small layer" * 50
ROOT = Path(__file__).resolve().parents[2]


def settings_for(fake: FakeUpstream, data_dir: Path, metrics: MetricsSettings | None = None, **upstream) -> Settings:
    # Byte counts here follow the client's own requests: no prefetch (tests/app/test_prefetch.py).
    upstream.setdefault("prefetch", 0)
    return Settings(
        data_dir=data_dir,
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=0, **upstream)],
        metrics=metrics or MetricsSettings(),
    )


async def scrape(client) -> str:  # type: ignore[no-untyped-def]
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return await r.text()


async def test_distribution_counters_follow_hits_misses_and_bytes(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d"))
    manifest_digest = fake.add_image("team/app", "1", [LAYER])
    manifest_size = len(fake.manifests[("team/app", "1")][1])
    layer = digest_of(LAYER)
    for _ in range(2):
        assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
        r = await proxy.get(f"/v2/team/app/blobs/{layer}")
        assert await r.read() == LAYER
        # The body is complete once verified; the commit that makes the next GET a hit may still run.
        await proxy.server.app[PULLTHROUGH].fills.settle()
    text = await scrape(proxy)

    assert sample(text, "registry_proxy_requests_total", type="manifest") == 2
    assert sample(text, "registry_proxy_hits_total", type="manifest") == 1
    assert sample(text, "registry_proxy_misses_total", type="manifest") == 1
    assert sample(text, "registry_proxy_requests_total", type="blob") == 2
    assert sample(text, "registry_proxy_hits_total", type="blob") == 1
    assert sample(text, "registry_proxy_misses_total", type="blob") == 1
    assert sample(text, "registry_proxy_pulled_bytes_total", type="blob") == len(LAYER)
    assert sample(text, "registry_proxy_pulled_bytes_total", type="manifest") == manifest_size
    assert sample(text, "registry_proxy_pushed_bytes_total", type="blob") == 2 * len(LAYER)

    up = {"upstream": "fake.test"}
    assert sample(text, "regcache_requests_total", type="blob", result="hit", **up) == 1
    assert sample(text, "regcache_requests_total", type="blob", result="miss", **up) == 1
    assert sample(text, "regcache_served_bytes_total", type="blob", source="cache", **up) == len(LAYER)
    assert sample(text, "regcache_served_bytes_total", type="blob", source="upstream", **up) == len(LAYER)
    assert sample(text, "regcache_upstream_fetched_bytes_total", type="blob", **up) == len(LAYER)
    # Upstream latency: exactly the calls made (manifest GET by tag, one blob GET).
    assert sample(text, "regcache_upstream_request_duration_seconds_count", operation="manifest", status="200") == 1
    assert sample(text, "regcache_upstream_request_duration_seconds_count", operation="blob", status="200") == 1
    # HTTP durations by route and status, observed after the last byte.
    assert sample(text, "regcache_http_request_duration_seconds_count", route="blob", status="200") == 2
    assert sample(text, "regcache_http_request_duration_seconds_count", route="manifest", status="200") == 2
    # SQLite timings come from Metadata.observe.
    assert sample(text, "regcache_sqlite_operation_duration_seconds_count", operation="read") > 0
    assert sample(text, "regcache_sqlite_operation_duration_seconds_count", operation="write") > 0
    assert sample(text, "regcache_fills_in_flight", **up) == 0
    assert manifest_digest in str(fake.manifests)


async def test_followers_of_one_fill_are_counted_as_coalesced(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d"))
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    fake.faults[layer] = Fault("slow", delay=0.3)

    async def pull() -> bytes:
        r = await proxy.get(f"/v2/team/app/blobs/{layer}")
        return await r.read()

    bodies = await asyncio.gather(*(pull() for _ in range(5)))
    assert all(b == LAYER for b in bodies)
    text = await scrape(proxy)
    assert fake.count("GET", f"/blobs/{layer}") == 1
    assert sample(text, "regcache_requests_total", type="blob", result="miss") == 1
    assert sample(text, "regcache_requests_total", type="blob", result="coalesced") == 4
    assert sample(text, "registry_proxy_misses_total", type="blob") == 5
    assert sample(text, "regcache_upstream_fetched_bytes_total", type="blob") == len(LAYER)
    assert sample(text, "regcache_served_bytes_total", type="blob", source="upstream") == 5 * len(LAYER)


async def test_stale_serving_and_upstream_errors_are_counted_by_kind(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d", tag_ttl=0))
    fake.add_image("team/app", "1", [SMALL])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    fake.faults["manifest"] = Fault("status", status=503)
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    fake.faults["manifest"] = Fault("status", status=429)
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    text = await scrape(proxy)
    assert sample(text, "regcache_requests_total", type="manifest", result="stale") == 2
    assert sample(text, "registry_proxy_hits_total", type="manifest") == 2
    assert sample(text, "regcache_stale_served_total", reason="5xx") == 1
    assert sample(text, "regcache_stale_served_total", reason="429") == 1
    assert sample(text, "regcache_upstream_errors_total", upstream="fake.test", kind="5xx") == 1
    assert sample(text, "regcache_upstream_errors_total", upstream="fake.test", kind="429") == 1
    latency = "regcache_upstream_request_duration_seconds_count"
    assert sample(text, latency, operation="manifest_head", status="5xx") == 1


async def test_failed_requests_count_as_errors_not_hits(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d"))
    assert (await proxy.get("/v2/team/app/manifests/nope")).status == 404
    fake.faults["manifest"] = Fault("status", status=500)
    assert (await proxy.get("/v2/team/app/manifests/2")).status == 503
    text = await scrape(proxy)
    assert sample(text, "regcache_requests_total", type="manifest", result="not_found") == 1
    assert sample(text, "regcache_requests_total", type="manifest", result="error") == 1
    assert sample(text, "registry_proxy_hits_total", type="manifest") == 0
    assert sample(text, "regcache_http_request_duration_seconds_count", route="manifest", status="503") == 1


async def test_digest_mismatch_is_counted_and_fill_gauge_returns_to_zero(
    fake, aiohttp_server, aiohttp_client, tmp_path
):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d"))
    fake.add_image("team/app", "1", [LAYER])
    layer = digest_of(LAYER)
    fake.faults[layer] = Fault("corrupt", times=1)
    with pytest.raises((ClientPayloadError, ServerDisconnectedError, ConnectionError)):
        await (await proxy.get(f"/v2/team/app/blobs/{layer}")).read()
    text = await scrape(proxy)
    assert sample(text, "regcache_digest_mismatches_total", upstream="fake.test", type="blob") == 1
    assert sample(text, "regcache_fills_in_flight", upstream="fake.test") == 0
    assert sample(text, "registry_proxy_pulled_bytes_total", type="blob") == 0


async def test_store_gauges_come_from_a_periodic_snapshot(fake, aiohttp_server, aiohttp_client, tmp_path):
    settings = settings_for(fake, tmp_path / "d", metrics=MetricsSettings(store_interval=0.05))
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    fake.add_image("team/app", "1", [LAYER, SMALL])
    manifest = await (await proxy.get("/v2/team/app/manifests/1")).read()
    for data in (LAYER, SMALL):
        await (await proxy.get(f"/v2/team/app/blobs/{digest_of(data)}")).read()
    expected = len(manifest) + len(LAYER) + len(SMALL)
    for _ in range(200):
        text = await scrape(proxy)
        if sample(text, "regcache_store_bytes") == expected:
            break
        await asyncio.sleep(0.02)
    assert sample(text, "regcache_store_bytes") == expected
    assert sample(text, "regcache_store_blobs") == 3
    assert sample(text, "regcache_store_images") == 1
    assert sample(text, "regcache_store_repositories") == 1


async def test_metrics_on_a_separate_listener_are_not_on_the_main_one(fake, aiohttp_client, tmp_path):
    settings = settings_for(fake, tmp_path / "d", metrics=MetricsSettings(listen="127.0.0.1:0"))
    app = create_app(settings)
    main = await aiohttp_client(app)
    assert (await main.get("/v2/")).status == 200
    assert (await main.get("/metrics")).status == 404
    side = await aiohttp_client(metrics_app(app))
    text = await scrape(side)
    assert "registry_proxy_requests_total" in text or "registry_proxy_requests" in text


async def test_metrics_can_be_disabled(fake, aiohttp_client, tmp_path):
    proxy = await aiohttp_client(create_app(settings_for(fake, tmp_path / "d", metrics=MetricsSettings(enabled=False))))
    assert (await proxy.get("/metrics")).status == 404


WORKER = textwrap.dedent(
    """
    import sys
    from proxy.metrics.prometheus import Metrics
    m = Metrics()
    for _ in range(int(sys.argv[1])):
        m.manifest("docker.io", "hit")
    m.fill_started("docker.io")
    m.request_done("docker.io", "blob", "200", 0.2)
    sys.stdout.write(m.render().decode())
    """
)


def test_several_worker_processes_report_their_sum(tmp_path):
    """PROMETHEUS_MULTIPROC_DIR: any worker's /metrics covers every worker."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    outputs = [
        subprocess.run([sys.executable, "-c", WORKER, str(n)], env=env, capture_output=True, check=True, text=True)
        for n in (3, 4)
    ]
    last = outputs[-1].stdout
    assert sample(last, "registry_proxy_requests_total", type="manifest") == 7
    assert sample(last, "regcache_requests_total", upstream="docker.io", type="manifest", result="hit") == 7
    assert sample(last, "regcache_upstream_request_duration_seconds_count", operation="blob") == 2
    # In-flight fills are a live sum: the finished first worker's files still count until
    # its supervisor marks it dead, then they drop out.
    assert sample(last, "regcache_fills_in_flight", upstream="docker.io") == 2
    from prometheus_client import multiprocess

    first_pid = next(int(p.stem.rsplit("_", 1)[1]) for p in tmp_path.glob("gauge_livesum_*.db"))
    multiprocess.mark_process_dead(first_pid, str(tmp_path))
    again = subprocess.run([sys.executable, "-c", WORKER, "0"], env=env, capture_output=True, check=True, text=True)
    assert sample(again.stdout, "regcache_fills_in_flight", upstream="docker.io") == 2
    assert sample(again.stdout, "registry_proxy_requests_total", type="manifest") == 7


async def test_client_chosen_methods_do_not_create_new_series(fake, aiohttp_server, aiohttp_client, tmp_path):
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d"))
    # WebDAV and other methods the HTTP parser accepts: each would be a new series.
    methods = ["PROPFIND", "MKCOL", "LOCK", "SEARCH", "PURGE"]
    for method in methods:
        await proxy.request(method, "/v2/")
    text = await scrape(proxy)
    assert not any(f'method="{m}"' in text for m in methods)
    assert sample(text, "regcache_http_request_duration_seconds_count", method="other") == len(methods)


async def test_rmi_counts_the_blobs_it_frees_once(fake, aiohttp_server, aiohttp_client, tmp_path):
    settings = settings_for(fake, tmp_path / "d").model_copy(update={"admin": AdminSettings(token="admin-t0ken")})
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    fake.add_image("team/app", "1", [LAYER])
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    assert await (await proxy.get(f"/v2/team/app/blobs/{digest_of(LAYER)}")).read() == LAYER
    await proxy.server.app[PULLTHROUGH].fills.settle()
    blobs = tmp_path / "d" / "blobs"
    before = {p: p.stat().st_size for p in blobs.rglob("*") if p.is_file()}
    r = await proxy.post("/admin/rmi", json={"images": ["team/app:1"]}, headers={"Authorization": "Bearer admin-t0ken"})
    assert r.status == 200 and "lines" in (await r.json())["results"][0]
    assert len(before) == 2 and not [p for p in blobs.rglob("*") if p.is_file()]  # the manifest and the layer
    text = await scrape(proxy)
    assert sample(text, "regcache_evicted_blobs_total", reason="rmi") == 2
    assert sample(text, "regcache_evicted_bytes_total", reason="rmi") == sum(before.values())


def test_a_fills_series_add_up_through_their_remembered_children():
    from proxy.metrics.prometheus import Metrics

    m = Metrics()
    for upstream in ("a.test", "b.test", "a.test"):
        m.prefetched(upstream)
        m.fill_started(upstream)
        m.fetched(upstream, "blob", 100)
        m.request_done(upstream, "blob", "200", 0.01)
        m.sqlite("write", 0.001)
    m.fill_finished("a.test")
    text = m.render().decode()
    assert sample(text, "regcache_prefetched_blobs_total", upstream="a.test") == 2
    assert sample(text, "regcache_fills_in_flight", upstream="a.test") == 1
    assert sample(text, "regcache_fills_in_flight", upstream="b.test") == 1
    assert sample(text, "regcache_upstream_fetched_bytes_total", upstream="a.test", type="blob") == 200
    assert sample(text, "registry_proxy_pulled_bytes_total", type="blob") == 300
    assert sample(text, "regcache_upstream_request_duration_seconds_count", upstream="b.test", operation="blob") == 1
    assert sample(text, "regcache_sqlite_operation_duration_seconds_count", operation="write") == 3
