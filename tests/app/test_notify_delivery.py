"""Notification delivery never slows or fails a pull: a hung endpoint, a failing one, filters."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from config.observability import EndpointSettings, IgnoreSettings, NotificationSettings
from config.settings import Settings, UpstreamSettings
from proxy.metrics.events import find_sink
from proxy.notify.notifier import Notifier
from proxy.resources import EVENTS, PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.serving import sample, start_proxy
from tests.support.webhook import start_webhook

LAYERS = [os.urandom(64 * 1024 + i) for i in range(3)]


def settings_for(fake: FakeUpstream, data_dir: Path, **endpoint) -> Settings:  # type: ignore[no-untyped-def]
    # No prefetch: every fill here is one a client asked for, so the events are counted exactly.
    return Settings(
        data_dir=data_dir,
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=0, prefetch=0)],
        notifications=NotificationSettings(endpoints=[EndpointSettings(name="hook", **endpoint)]),
    )


async def pull_all(proxy, blobs: list[str]) -> None:  # type: ignore[no-untyped-def]
    for digest in blobs:
        r = await proxy.get(f"/v2/team/app/blobs/{digest}")
        assert r.status == 200 and digest_of(await r.read()) == digest
    await proxy.server.app[PULLTHROUGH].settle()


async def test_pulls_complete_while_the_endpoint_holds_every_post_and_the_full_queue_drops_and_counts(
    fake, aiohttp_server, aiohttp_client, tmp_path
):
    hook = await start_webhook(aiohttp_server)
    hook.hold = True
    proxy = await start_proxy(aiohttp_server, aiohttp_client,
                              settings_for(fake, tmp_path / "d", url=hook.url, timeout="1h", queue_size=2))
    fake.add_image("team/app", "1", LAYERS)
    blobs = [digest_of(layer) for layer in LAYERS]
    try:
        r = await proxy.get("/v2/team/app/manifests/1")
        assert r.status == 200
        await hook.held.wait()  # the endpoint now holds a POST, and answers none from here on
        await pull_all(proxy, blobs)
        assert hook.envelopes == []  # every pull above completed with no POST answered
        endpoint = find_sink(proxy.server.app[EVENTS], Notifier).endpoints[0]  # type: ignore[union-attr]
        # Offered: a fill and a pull for the manifest and for each blob. The delivery in
        # progress holds some, the queue its 2, and every other one was dropped and counted.
        offered = 2 * (1 + len(blobs))
        assert endpoint._queue.full()
        dropped = offered - 2 - len(endpoint.pending)
        assert dropped > 0
        text = await (await proxy.get("/metrics")).text()
        assert sample(text, "regcache_notification_events_total", endpoint="hook", outcome="dropped") == dropped
        assert sample(text, "regcache_notification_events_total", endpoint="hook", outcome="sent") == 0
    finally:
        hook.release()


async def test_a_failing_endpoint_gets_every_event_in_order_once_it_recovers_with_one_log_line_each_way(
    fake, aiohttp_server, aiohttp_client, tmp_path, caplog
):
    caplog.set_level(logging.INFO, "regcache.notify")
    hook = await start_webhook(aiohttp_server)
    hook.fail_first = 3
    secret = tmp_path / "token"
    secret.write_text("Bearer from-a-file-1234")
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(
        fake, tmp_path / "d", url=hook.url + "?key=url-secret-5678", threshold=2, backoff="10ms",
        header_files={"Authorization": secret}))
    fake.add_image("team/app", "1", LAYERS)
    blobs = [digest_of(layer) for layer in LAYERS]
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    await pull_all(proxy, blobs)
    notifier = find_sink(proxy.server.app[EVENTS], Notifier)
    assert notifier is not None
    await notifier.drain()

    # Delivered in the order offered: the client's pulls in the order it made them.
    assert [(e["action"], e["target"]["digest"]) for e in hook.events if e["action"] == "pull"] == [
        ("pull", fake_manifest_digest(fake))] + [("pull", d) for d in blobs]
    assert len(hook.events) == 2 * (1 + len(blobs))
    assert len(hook.attempts) == len(hook.envelopes) + 3
    lines = [r.getMessage() for r in caplog.records if r.name == "regcache.notify"]
    assert len([line for line in lines if "failed" in line]) == 1
    assert len([line for line in lines if "delivering again" in line]) == 1
    assert "from-a-file-1234" not in caplog.text and "url-secret-5678" not in caplog.text
    text = await (await proxy.get("/metrics")).text()
    assert sample(text, "regcache_notification_events_total", endpoint="hook", outcome="sent") == len(hook.events)


def fake_manifest_digest(fake: FakeUpstream) -> str:
    return digest_of(fake.manifests[("team/app", "1")][1])


async def test_ignored_actions_and_media_types_are_never_sent(fake, aiohttp_server, aiohttp_client, tmp_path):
    hook = await start_webhook(aiohttp_server)
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(
        fake, tmp_path / "d", url=hook.url, ignoredmediatypes=["application/octet-stream"],
        ignore=IgnoreSettings(actions=["fill"])))
    fake.add_image("team/app", "1", LAYERS)
    assert (await proxy.get("/v2/team/app/manifests/1")).status == 200
    await pull_all(proxy, [digest_of(layer) for layer in LAYERS])
    await find_sink(proxy.server.app[EVENTS], Notifier).drain()  # type: ignore[union-attr]
    assert [(e["action"], e["target"]["digest"]) for e in hook.events] == [("pull", fake_manifest_digest(fake))]


async def test_events_name_the_client_request_that_caused_them(fake, aiohttp_server, aiohttp_client, tmp_path):
    """The fill a client's GET started and the pull it made both carry that request's id, method
    and user agent, as the distribution registry's events do."""
    hook = await start_webhook(aiohttp_server)
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings_for(fake, tmp_path / "d", url=hook.url))
    fake.add_image("team/app", "1", LAYERS)
    headers = {"X-Request-Id": "req-42", "User-Agent": "containerd/2.0"}
    assert (await proxy.get("/v2/team/app/manifests/1", headers=headers)).status == 200
    await proxy.server.app[PULLTHROUGH].settle()
    await find_sink(proxy.server.app[EVENTS], Notifier).drain()  # type: ignore[union-attr]
    named = {e["action"]: e["request"] for e in hook.events}
    assert set(named) == {"fill", "pull"}
    for request in named.values():
        assert (request["id"], request["method"], request["useragent"]) == ("req-42", "GET", "containerd/2.0")
        assert request["addr"] == "127.0.0.1" and request["host"]
