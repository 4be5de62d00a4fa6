"""Notifications end to end: skopeo pulls through an in-process regcache in front of the real
registry, an admin removes and loads, and an HTTP endpoint in the test process receives the
distribution registry's envelopes for each step, in order."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from config.observability import EndpointSettings, NotificationSettings
from config.settings import AdminSettings, Settings, UpstreamSettings
from proxy.metrics.events import find_sink
from proxy.notify.notifier import Notifier
from proxy.resources import EVENTS, PULLTHROUGH
from tests.support import skopeo
from tests.support.seed import ALPHA
from tests.support.serving import start_proxy
from tests.support.webhook import check_event, start_webhook

TOKEN = "admin-token-for-notifications"
SECRET = "Bearer webhook-secret-4711"
OCTET = "application/octet-stream"


async def test_a_cold_pull_a_warm_pull_an_rmi_and_a_load_arrive_in_order_in_the_registrys_format(
    aiohttp_server, aiohttp_client, tmp_path: Path, upstream, seeded, caplog
):
    hook = await start_webhook(aiohttp_server)
    secret_file = tmp_path / "webhook-auth"
    secret_file.write_text(SECRET + "\n")
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name="upstream.test", url=upstream.url, default=True, retries=0)],
        admin=AdminSettings(token=TOKEN),
        notifications=NotificationSettings(endpoints=[EndpointSettings(
            name="audit", url=hook.url, headers={"X-Source": ["regcache-test"]},
            header_files={"Authorization": secret_file})]),
    )
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    app = proxy.server.app
    notifier = find_sink(app[EVENTS], Notifier)
    assert notifier is not None
    host = f"{proxy.server.host}:{proxy.server.port}"
    admin = {"Authorization": f"Bearer {TOKEN}"}
    image = seeded[ALPHA]
    manifest, blobs = image.digest, set(image.blob_digests)

    async def phase(step) -> list[dict]:  # type: ignore[no-untyped-def]
        """The events one step caused, once everything it started has ended and been delivered."""
        before = len(hook.events)
        await step()
        await app[PULLTHROUGH].settle()
        await notifier.drain()
        return hook.events[before:]

    async def pull(into: str) -> None:
        await asyncio.to_thread(skopeo.copy, skopeo.docker_ref(host, "library/alpha", "1"), f"oci:{tmp_path / into}:x")

    archive: list[bytes] = []

    async def save() -> None:
        r = await proxy.post("/admin/save", json={"images": [ALPHA]}, headers=admin)
        assert r.status == 200
        archive.append(await r.read())

    async def rmi() -> None:
        r = await proxy.post("/admin/rmi", json={"images": [ALPHA], "force": True}, headers=admin)
        assert r.status == 200 and "error" not in (await r.json())["results"][0]

    async def load() -> None:
        r = await proxy.post("/admin/load", data=archive[0], headers=admin)
        assert r.status == 200, await r.text()

    cold = await phase(lambda: pull("cold"))
    warm = await phase(lambda: pull("warm"))
    saved = await phase(save)
    removed = await phase(rmi)
    loaded = await phase(load)

    for event in hook.events:
        check_event(event)
    # Cold: the manifest fetched (then pulled), every blob fetched and pulled; nothing else.
    assert Counter((e["action"], e["target"]["digest"]) for e in cold) == Counter(
        [("fill", manifest), ("pull", manifest)] + [(a, b) for b in blobs for a in ("fill", "pull")])
    actions = [(e["action"], e["target"]["digest"]) for e in cold]
    assert actions.index(("fill", manifest)) < actions.index(("pull", manifest))
    manifest_pull = next(e for e in cold if e["action"] == "pull" and e["target"]["digest"] == manifest)
    assert manifest_pull["regcache"] == {"upstream": "upstream.test", "result": "miss"}
    assert manifest_pull["target"] == {
        "mediaType": image.media_type, "size": len(image.manifest), "digest": manifest,
        "length": len(image.manifest), "repository": "library/alpha", "tag": "1",
        "url": f"http://{host}/v2/library/alpha/manifests/{manifest}",
    }
    assert manifest_pull["request"]["method"] == "GET" and "skopeo" in manifest_pull["request"]["useragent"]
    blob_pulls = [e for e in cold if e["action"] == "pull" and e["target"]["digest"] != manifest]
    # Prefetch began every blob with the manifest: the client joined those fills or found them stored.
    assert {e["regcache"]["result"] for e in blob_pulls} <= {"coalesced", "hit"}
    assert all(e["target"]["mediaType"] == OCTET and e["target"]["size"] > 0 for e in blob_pulls)
    # Warm: one pull per manifest and blob, all hits, no fill.
    assert sorted((e["action"], e["target"]["digest"], e["regcache"]["result"]) for e in warm) == sorted(
        [("pull", manifest, "hit")] + [("pull", b, "hit") for b in blobs])
    assert saved == []  # save reads the cache: no client pulled anything
    assert [(e["action"], e["target"], e["regcache"]) for e in removed] == [
        ("delete", {"digest": manifest, "repository": "library/alpha"}, {"upstream": "upstream.test",
                                                                          "reason": "rmi"})]
    assert [(e["action"], e["target"]) for e in loaded] == [
        ("push", {"mediaType": image.media_type, "size": len(image.manifest), "digest": manifest,
                  "length": len(image.manifest), "repository": "library/alpha", "tag": "1"})]
    assert removed[0]["request"]["method"] == loaded[0]["request"]["method"] == "POST"
    # One source for every event; the header from a file reached the endpoint and no log line.
    assert len({e["source"]["instanceID"] for e in hook.events}) == 1
    assert all(a["Authorization"] == SECRET and a["X-Source"] == "regcache-test" for a in hook.attempts)
    assert SECRET not in caplog.text
