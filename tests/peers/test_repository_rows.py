"""Repository rows: made only when something is recorded in a repository, pruned once it holds nothing.

Any client may ask for any name; a row per name asked for would grow without
bound, and an empty row made the cache answer ``tags/list`` for a repository it
knows nothing of. Against the real distribution registry.
"""

from __future__ import annotations

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import LIFECYCLE, METADATA, PULLTHROUGH
from tests.support.seed import ALPHA, BETA

UPSTREAM = "upstream.test"


@pytest.fixture
async def proxy(upstream, aiohttp_server, aiohttp_client, tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name=UPSTREAM, url=upstream.url, default=True, retries=0)],
    )
    server = await aiohttp_server(create_app(settings), host="127.0.0.1")
    return await aiohttp_client(server)


async def repository_rows(proxy) -> int:  # type: ignore[no-untyped-def]
    return (await proxy.server.app[METADATA].totals())[3]


async def pull_manifest(proxy, image) -> None:  # type: ignore[no-untyped-def]
    r = await proxy.get(f"/v2/{image.repository}/manifests/{image.tag}", headers={"Accept": image.media_type})
    assert r.status == 200, await r.text()


async def test_requests_for_what_the_upstream_does_not_have_leave_no_rows(proxy, seeded):
    for i in range(100):
        name, digest = f"made-up/n{i}", f"sha256:{i:064x}"
        assert (await proxy.get(f"/v2/{name}/blobs/{digest}")).status == 404
        assert (await proxy.head(f"/v2/{name}/blobs/{digest}")).status == 404
        assert (await proxy.get(f"/v2/{name}/manifests/latest")).status == 404
        assert (await proxy.get(f"/v2/{name}/tags/list")).status == 404
        # A real repository, a blob it does not have.
        assert (await proxy.get(f"/v2/{seeded[ALPHA].repository}/blobs/{digest}")).status == 404
    assert await repository_rows(proxy) == 0
    await pull_manifest(proxy, seeded[ALPHA])
    assert await repository_rows(proxy) == 1


async def test_gc_prunes_the_row_of_a_repository_left_without_images(proxy, seeded):
    alpha, beta = seeded[ALPHA], seeded[BETA]
    await pull_manifest(proxy, alpha)
    for blob in alpha.blob_digests:
        r = await proxy.get(f"/v2/{alpha.repository}/blobs/{blob}")
        assert r.status == 200
        await r.read()
    # The fills (and the manifest's prefetch) commit after their clients' last byte: the
    # removal below is of a settled image, not one whose blob rows are still landing.
    await proxy.server.app[PULLTHROUGH].settle()
    await pull_manifest(proxy, beta)
    assert await repository_rows(proxy) == 2
    lifecycle = proxy.server.app[LIFECYCLE]
    key = await lifecycle.resolve(UPSTREAM, alpha.repository, alpha.tag)
    assert key is not None

    report = await lifecycle.remove_image(key)

    assert report is not None and [i.repository for i in report.images] == [alpha.repository]
    assert await repository_rows(proxy) == 1
    assert await proxy.server.app[METADATA].repository_id(UPSTREAM, alpha.repository) is None
    # Pulled again, it is recorded afresh; beta was never disturbed.
    await pull_manifest(proxy, alpha)
    await pull_manifest(proxy, beta)
    assert await repository_rows(proxy) == 2
