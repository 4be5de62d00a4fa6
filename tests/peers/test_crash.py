"""Crash safety: a regcache process killed with SIGKILL mid-fill or mid-GC, restarted.

Whenever the kill lands, three things must hold: no blob file under a digest
name ever holds other bytes (nothing half-written is visible), after a restart
``regcache fsck`` finds a consistent store, and every image pulls completely.
The kill points follow the upstream's request log (a fill has just begun) and
the server's log (a GC pass has just run while pulls go on); where exactly the
kill lands varies from run to run, the assertions do not depend on it.

The in-process tests below stop at the two windows a crash can hit in GC and
in a fill, deterministically, and check what startup recovery does with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from config.settings import Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import LIFECYCLE, METADATA, PULLTHROUGH
from storage.lifecycle.gc import Collector
from tests.support.images import Image
from tests.support.lifecycle import (
    LifecycleImages,
    blob_files_verify,
    on_disk,
    pull_checked,
    push_big_images,
    push_images,
    skopeo_pull,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def big(upstream, tmp_path_factory) -> dict[str, Image]:
    return push_big_images(upstream, tmp_path_factory.mktemp("crash-images"))


@pytest.fixture(scope="module")
def lc(upstream, tmp_path_factory) -> LifecycleImages:
    return push_images(upstream, tmp_path_factory.mktemp("crash-lc-images"))


def upstreams(upstream) -> list[dict]:
    return [{"name": "upstream.test", "url": upstream.url, "default": True}]


def fsck(data: Path) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "fsck", "--data-dir", str(data), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.startswith("{") else {"stderr": proc.stderr}


def wait_until(condition, what: str, timeout: float = 60) -> None:
    """A guard against hanging, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.002)


def spooling(tmp: Path) -> bool:
    """A fill has its temp file: bytes are being written."""
    for path in tmp.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size:
                return True
    return False


def after_restart_everything_pulls(server, images: dict[str, Image], tmp_path: Path) -> None:
    server.start()
    for repository, image in images.items():
        assert pull_checked(server.host, repository, image), f"{repository} did not pull completely"
    skopeo_pull(server.host, next(iter(images)), tmp_path / "skopeo-after-restart")
    assert server.stop() == 0
    code, report = fsck(server.data_dir)
    assert (code, report.get("consistent")) == (0, True), report


@pytest.mark.parametrize("kill_at", ["first upstream fetch", "spool file written"])
def test_sigkill_during_concurrent_fills(big, upstream, regcache_factory, tmp_path, kill_at):
    server = regcache_factory(upstreams(upstream))
    layers = [image.layer_digests[0] for image in big.values()]
    started = sum(upstream.blob_gets(d) for d in layers)
    # Four clients, two on the same image, so the kill also hits a fill with a follower.
    pulls = [*big.items(), next(iter(big.items()))]
    with ThreadPoolExecutor(len(pulls)) as pool:
        results = [pool.submit(pull_checked, server.host, repo, image) for repo, image in pulls]
        if kill_at == "first upstream fetch":
            wait_until(lambda: sum(upstream.blob_gets(d) for d in layers) > started, kill_at)
        else:
            wait_until(lambda: spooling(server.data_dir / "tmp"), kill_at)
        server.kill()
        for result in results:
            result.result()  # re-raises a wrong body served before the kill
    assert blob_files_verify(server.data_dir) == [], "a blob file holds bytes that are not its digest's"
    after_restart_everything_pulls(server, big, tmp_path)


def test_sigkill_during_gc_while_pulling(big, upstream, regcache_factory, tmp_path):
    one = max(sum(layer.size for layer in image.layers) for image in big.values())
    # A budget of about one image: every pull evicts another one.
    server = regcache_factory(upstreams(upstream), settings={"storage": {"max_size": int(one * 1.3), "gc_grace": 0}})
    stop = threading.Event()

    def keep_pulling(order: list[str]) -> None:
        while not stop.is_set():
            for repo in order:
                pull_checked(server.host, repo, big[repo])

    names = list(big)
    with ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(keep_pulling, names), pool.submit(keep_pulling, names[::-1])]
        for passes in (2, 5):
            wait_until(lambda n=passes: server.log_text().count("gc (") >= n, f"{passes} GC passes")
            server.kill()
            assert blob_files_verify(server.data_dir) == []
            server.start()
        stop.set()
        server.kill()
        for worker in workers:
            worker.result()
    assert blob_files_verify(server.data_dir) == []
    after_restart_everything_pulls(server, big, tmp_path)


# Deterministic crash windows, in process ------------------------------------------------


def settings_for(upstream, data: Path, **storage) -> Settings:
    return Settings(
        data_dir=data,
        upstreams=[UpstreamSettings(name="upstream.test", url=upstream.url, default=True)],
        storage=StorageSettings(**storage),
    )


async def run_server(settings: Settings) -> TestServer:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return server


async def test_crash_between_gc_rows_and_unlink_is_recovered_at_startup(lc, upstream, tmp_path, monkeypatch):
    data = tmp_path / "data"
    server = await run_server(settings_for(upstream, data))
    await asyncio.to_thread(skopeo_pull, f"127.0.0.1:{server.port}", "lc/a", tmp_path / "a")
    lifecycle = server.app[LIFECYCLE]
    key = await lifecycle.resolve("upstream.test", "lc/a", "1")

    async def crash_before_unlink(self, result, doomed):  # the process dies here
        return result

    monkeypatch.setattr(Collector, "_unlink", crash_before_unlink)
    await lifecycle.remove_image(key)
    monkeypatch.undo()
    await server.close()
    assert on_disk(data, lc.own_layer("lc/a")), "rows are gone, files are still there"
    assert fsck(data)[1]["problems"], "before recovery the files are orphans"

    server = await run_server(settings_for(upstream, data))  # startup recovery runs here
    await server.close()
    assert not on_disk(data, lc.own_layer("lc/a"))
    code, report = fsck(data)
    assert code == 0, report


async def test_crash_between_fill_commit_and_its_row_is_recovered_at_startup(lc, upstream, tmp_path, monkeypatch):
    data = tmp_path / "data"
    server = await run_server(settings_for(upstream, data))
    metadata = server.app[METADATA]

    async def crash_before_row(*args, **kwargs):  # the process dies after the rename
        raise asyncio.CancelledError

    monkeypatch.setattr(metadata, "record_blob", crash_before_row)
    await asyncio.to_thread(_pull_ignoring_errors, server.port, lc)
    # Clients get a blob's last byte once it is verified; its fill commits after that.
    fills = server.app[PULLTHROUGH].fills
    for _ in range(600):
        if not len(fills):
            break
        await asyncio.sleep(0.05)
    assert not len(fills), "fills still running 30 s after the pull"
    monkeypatch.undo()
    await server.close()
    layer = lc.own_layer("lc/b")
    assert on_disk(data, layer)
    async with _db(data) as db:
        assert await db.execute_fetchall("SELECT 1 FROM blobs WHERE digest = ?", (layer,)) == []

    server = await run_server(settings_for(upstream, data))  # startup recovery adopts it
    upstream.reset_requests()
    assert await asyncio.to_thread(pull_checked, f"127.0.0.1:{server.port}", "lc/b", lc.images["lc/b"])
    assert upstream.blob_gets(layer) == 0, "the adopted blob is served from the store"
    await server.close()
    assert fsck(data)[0] == 0


def _pull_ignoring_errors(port: int, lc: LifecycleImages) -> None:
    pull_checked(f"127.0.0.1:{port}", "lc/b", lc.images["lc/b"])


def _db(data: Path):
    import aiosqlite

    return aiosqlite.connect(data / "metadata.db")
