"""The size budget, pins, expiry and GC, against the real distribution registry and skopeo."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from config.settings import Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import LIFECYCLE, METADATA, PULLTHROUGH, STORE
from storage.lifecycle.fsck import Checker
from storage.lifecycle.service import Lifecycle
from tests.support.lifecycle import LifecycleImages, on_disk, pull_verified, push_images, skopeo_pull


@pytest.fixture(scope="module")
def lc(upstream, tmp_path_factory) -> LifecycleImages:
    return push_images(upstream, tmp_path_factory.mktemp("lifecycle-images"))


@pytest.fixture
def make_proxy(aiohttp_server, tmp_path, upstream):
    async def make(data_dir: Path | None = None, **storage):
        settings = Settings(
            data_dir=data_dir or tmp_path / "data",
            upstreams=[UpstreamSettings(name="upstream.test", url=upstream.url, default=True)],
            storage=StorageSettings(**storage),
        )
        return await aiohttp_server(create_app(settings), host="127.0.0.1")

    return make


async def pull(server, repository: str, dest: Path) -> None:
    await asyncio.to_thread(skopeo_pull, f"127.0.0.1:{server.port}", repository, dest)
    # skopeo has every blob once it is verified; the fills commit after that, and what the
    # tests check next (files, rows, the budget) is the committed store.
    await server.app[PULLTHROUGH].fills.settle()


async def evicted_after(lifecycle: Lifecycle, passes: int) -> list[str]:
    """Repositories of the images removed by the passes after ``passes``, once one removed any."""
    async with asyncio.timeout(60):  # a guard against hanging, not a timing assertion
        while True:
            await lifecycle.wait_for_pass(passes)
            removed = [i.repository for r in list(lifecycle.history)[-(lifecycle.passes - passes) :] for i in r.images]
            if removed:
                return removed
            passes = lifecycle.passes


async def image_rows(server) -> list[str]:
    """The repository of every image row, sorted."""
    metadata = server.app[METADATA]
    names = await metadata.repository_names()
    return sorted(names[row.key.repository_id][1] for row in await metadata.collect.images())


def budget_for_two(lc: LifecycleImages) -> dict:
    """A budget that holds two of the three images: the third one's commit passes the high mark."""
    two = lc.stored_size("lc/a", "lc/b")
    three = lc.stored_size("lc/a", "lc/b", "lc/c")
    max_size = int((two + three) / 2 / 0.95)
    assert two <= max_size * 0.85 and max_size * 0.95 < three
    return {"max_size": max_size, "high_watermark": 0.95, "low_watermark": 0.85}


async def test_budget_evicts_least_recently_pulled_image_and_every_listed_image_still_pulls(
    lc, make_proxy, upstream, tmp_path
):
    server = await make_proxy(**budget_for_two(lc))
    lifecycle = server.app[LIFECYCLE]
    data = tmp_path / "data"
    await pull(server, "lc/a", tmp_path / "a")
    await pull(server, "lc/b", tmp_path / "b")
    assert not lifecycle.history, "two images fit the budget"
    passes = lifecycle.passes
    await pull(server, "lc/c", tmp_path / "c")

    assert await evicted_after(lifecycle, passes) == ["lc/a"]
    assert await image_rows(server) == ["lc/b", "lc/c"]
    assert not on_disk(data, lc.own_layer("lc/a"))
    assert on_disk(data, lc.base_digest), "the base layer is still used by lc/b and lc/c"
    assert lifecycle.size <= budget_for_two(lc)["max_size"] * 0.85

    # Every image still listed is complete in the cache: skopeo gets it all without one blob from upstream.
    upstream.reset_requests()
    await pull(server, "lc/b", tmp_path / "b2")
    await pull(server, "lc/c", tmp_path / "c2")
    assert sum(upstream.blob_gets(d) for name in ("lc/b", "lc/c") for d in lc.blobs(name)[1:]) == 0
    async with lifecycle.paused():
        report = await Checker(data, server.app[METADATA], server.app[STORE].backend, repair=False, verify=True).run()
    assert report.problems == []


async def test_pinned_image_survives_eviction(lc, make_proxy, tmp_path):
    server = await make_proxy(**budget_for_two(lc))
    lifecycle = server.app[LIFECYCLE]
    await pull(server, "lc/a", tmp_path / "a")
    key = await lifecycle.resolve("upstream.test", "lc/a", "1")
    assert key is not None and await lifecycle.pin(key)
    await pull(server, "lc/b", tmp_path / "b")
    passes = lifecycle.passes
    await pull(server, "lc/c", tmp_path / "c")

    assert await evicted_after(lifecycle, passes) == ["lc/b"]
    assert await image_rows(server) == ["lc/a", "lc/c"]
    assert on_disk(tmp_path / "data", lc.own_layer("lc/a"))
    assert not on_disk(tmp_path / "data", lc.own_layer("lc/b"))


async def test_shared_layer_survives_while_one_user_remains(lc, make_proxy, tmp_path):
    server = await make_proxy()
    lifecycle = server.app[LIFECYCLE]
    data = tmp_path / "data"
    await pull(server, "lc/a", tmp_path / "a")
    await pull(server, "lc/b", tmp_path / "b")

    report = await lifecycle.remove_image(await lifecycle.resolve("upstream.test", "lc/a", "1"))
    assert report is not None and [i.repository for i in report.images] == ["lc/a"]
    assert not on_disk(data, lc.own_layer("lc/a"))
    assert on_disk(data, lc.base_digest)

    await lifecycle.remove_image(await lifecycle.resolve("upstream.test", "lc/b", "1"))
    assert not on_disk(data, lc.base_digest), "the last user is gone, so is the shared layer"
    assert await image_rows(server) == []
    assert list((data / "blobs").rglob("*.*")) == []


async def test_pinned_image_is_not_removed_without_force(lc, make_proxy, tmp_path):
    from storage.errors import ImagePinned

    server = await make_proxy()
    lifecycle = server.app[LIFECYCLE]
    await pull(server, "lc/a", tmp_path / "a")
    key = await lifecycle.resolve("upstream.test", "lc/a", lc.images["lc/a"].digest)
    await lifecycle.pin(key)
    with pytest.raises(ImagePinned):
        await lifecycle.remove_image(key)
    assert await lifecycle.unpin(key)
    assert await lifecycle.remove_image(key) is not None
    assert await lifecycle.resolve("upstream.test", "lc/a", "1") is None


async def test_index_keeps_its_children_until_it_goes(lc, make_proxy, tmp_path):
    server = await make_proxy()
    lifecycle = server.app[LIFECYCLE]
    data = tmp_path / "data"
    await pull(server, "lc/multi", tmp_path / "multi")
    children = lc.index.images
    for child in children:
        assert on_disk(data, child.digest) and on_disk(data, child.layer_digests[0])

    swept = await lifecycle.sweep(grace=0)
    assert swept.blobs == 0
    assert on_disk(data, children[1].layer_digests[0])

    report = await lifecycle.remove_image(await lifecycle.resolve("upstream.test", "lc/multi", "1"))
    assert report is not None and len(report.images) == 3, "the index and its two platform images"
    for child in children:
        assert not on_disk(data, child.digest) and not on_disk(data, child.layer_digests[0])


async def test_images_not_pulled_for_expire_unused_after_are_evicted(lc, make_proxy, tmp_path):
    server = await make_proxy(expire_unused_after="1d")
    lifecycle = server.app[LIFECYCLE]
    await pull(server, "lc/a", tmp_path / "a")
    await pull(server, "lc/b", tmp_path / "b")
    metadata = server.app[METADATA]
    await metadata.flush()
    await metadata._db.transaction(
        [("UPDATE images SET last_pulled = last_pulled - 2 * 86400 WHERE manifest = ?", (lc.images["lc/a"].digest,))]
    )
    report = await lifecycle.gc()
    assert [i.repository for i in report.images] == ["lc/a"]
    assert await image_rows(server) == ["lc/b"]


async def test_sweep_waits_for_grace_and_never_takes_a_blob_in_use(lc, make_proxy, tmp_path):
    server = await make_proxy()
    lifecycle = server.app[LIFECYCLE]
    data = tmp_path / "data"
    layer = lc.own_layer("lc/c")
    # A blob fetched without its manifest: nothing references it.
    url = f"http://127.0.0.1:{server.port}/v2/lc/c/blobs/{layer}"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert r.status == 200
        await r.read()
    # The client has the last byte once the digest matches; the commit (fsync, rename, row)
    # follows. Without waiting for it, a slow commit made the checks below look at no blob.
    await server.app[PULLTHROUGH].fills.settle()
    assert on_disk(data, layer)
    assert (await lifecycle.sweep(grace=3600)).blobs == 0
    lease = server.app[PULLTHROUGH].in_use.lease(layer)
    assert (await lifecycle.sweep(grace=0)).blobs == 0
    assert on_disk(data, layer)
    lease.release()
    report = await lifecycle.sweep(grace=0)
    assert report.blobs == 1 and report.bytes == lc.images["lc/c"].layers[-1].size
    assert not on_disk(data, layer)


async def test_gc_running_during_pulls_never_breaks_one(lc, make_proxy, tmp_path):
    """Eviction and sweeps run back to back while clients pull: every pull gets verified bytes."""
    server = await make_proxy(max_size=lc.stored_size("lc/a"), gc_grace=0)
    lifecycle = server.app[LIFECYCLE]
    base = f"http://127.0.0.1:{server.port}"
    stop = asyncio.Event()

    async def collect() -> int:
        passes = 0
        while not stop.is_set():
            await lifecycle.gc()
            passes += 1
            await asyncio.sleep(0)
        return passes

    async def client(order: list[str]) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(4):
                for name in order:
                    await pull_verified(session, base, name, lc.images[name])

    collector = asyncio.create_task(collect())
    try:
        await asyncio.gather(client(["lc/a", "lc/b", "lc/c"]), client(["lc/c", "lc/a", "lc/b"]),
                             client(["lc/b", "lc/c", "lc/a"]))
    finally:
        stop.set()
        passes = await collector
    assert passes > 1
    assert any(r.images for r in lifecycle.history), "eviction ran while the clients pulled"
    # A client has its last byte before the fill commits and records it: the store is checked
    # once the fills still in flight have ended (a file committed and not yet recorded is
    # what a crash there leaves, and what startup recovery adopts).
    # The store is still over its budget, so the lifecycle's own task may start a pass at
    # any moment: the check runs between passes.
    await server.app[PULLTHROUGH].fills.settle()
    async with lifecycle.paused():
        report = await Checker(tmp_path / "data", server.app[METADATA], server.app[STORE].backend,
                               repair=False, verify=True).run()
    assert report.problems == []
