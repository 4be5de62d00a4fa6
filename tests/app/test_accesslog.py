"""One JSON access-log line per request, with what an operator greps for."""

from __future__ import annotations

import json
import logging

from config.settings import Settings, UpstreamSettings
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.serving import start_proxy

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
