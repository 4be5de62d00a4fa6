"""A manifest goes to a client only in a media type it accepts, however the Accept header is
spelled: several lines (docker), one comma list with parameters (containerd), or none at all."""

from __future__ import annotations

from multidict import CIMultiDict

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from tests.support.fake_upstream import OCI_INDEX, OCI_MANIFEST

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


async def test_accept_lines_lists_and_refusals_cached_or_not(fake, aiohttp_client, tmp_path):
    digest = fake.add_image("team/app", "1", [b"layer bytes"])
    settings = Settings(data_dir=tmp_path / "d",
                        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, prefetch=0)])
    proxy = await aiohttp_client(create_app(settings))
    lines = CIMultiDict([("Accept", DOCKER_V2), ("Accept", DOCKER_LIST), ("Accept", OCI_MANIFEST)])
    one_list = {"Accept": f"{DOCKER_V2};q=0.9, {OCI_INDEX}, {OCI_MANIFEST};q=0.5"}
    refused = CIMultiDict([("Accept", DOCKER_V2), ("Accept", f"{DOCKER_LIST}, {OCI_INDEX}")])
    for _ in range(2):  # the first round fetches and caches, the second is served from the cache
        for reference in ("1", digest):
            path = f"/v2/team/app/manifests/{reference}"
            for headers in (lines, one_list, {}):
                r = await proxy.get(path, headers=headers)
                assert (r.status, r.headers["Docker-Content-Digest"]) == (200, digest)
                assert r.headers["Content-Type"] == OCI_MANIFEST
            r = await proxy.get(path, headers=refused)
            assert r.status == 404 and (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
