"""``regcache fsck``: finds and repairs what a disk, an operator or a crash did to the store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from storage.lifecycle.fsck import StoreLock
from storage.oci.digest import Digest
from storage.paths import blob_path
from tests.support.lifecycle import LifecycleImages, pull_verified, push_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lc(upstream, tmp_path_factory) -> LifecycleImages:
    return push_images(upstream, tmp_path_factory.mktemp("fsck-images"))


def settings(upstream, data: Path) -> Settings:
    return Settings(data_dir=data, upstreams=[UpstreamSettings(name="upstream.test", url=upstream.url, default=True)])


async def pull_all(upstream, data: Path, lc: LifecycleImages, names=("lc/a", "lc/b")) -> None:
    """Run a server on ``data`` just long enough to pull these images completely."""
    server = TestServer(create_app(settings(upstream, data)), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            for name in names:
                await pull_verified(session, f"http://127.0.0.1:{server.port}", name, lc.images[name])
    finally:
        await server.close()


def fsck(data: Path, *flags: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "fsck", "--data-dir", str(data), "--json", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"stderr": proc.stderr}
    return proc.returncode, report


def kinds(report: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for problem in report["problems"]:
        out.setdefault(problem["kind"], set()).add(problem["subject"])
    return out


def path_of(data: Path, digest: str) -> Path:
    return blob_path(data, Digest.parse(digest))


async def test_fsck_finds_and_repairs_altered_missing_orphan_and_dangling(lc, upstream, tmp_path):
    data = tmp_path / "data"
    await pull_all(upstream, data, lc)
    code, report = await asyncio.to_thread(fsck, data)
    assert (code, report["consistent"]) == (0, True), report

    a, b = lc.images["lc/a"], lc.images["lc/b"]
    altered = path_of(data, lc.own_layer("lc/a"))
    content = bytearray(altered.read_bytes())
    content[len(content) // 2] ^= 0xFF
    altered.write_bytes(bytes(content))  # same size: only hashing finds it
    path_of(data, b.config_digest).unlink()  # missing file, row stays
    orphan_bytes = os.urandom(1000)
    orphan = "sha256:" + hashlib.sha256(orphan_bytes).hexdigest()
    path_of(data, orphan).parent.mkdir(parents=True, exist_ok=True)
    path_of(data, orphan).write_bytes(orphan_bytes)  # a file no row knows, nothing references
    dangling = "sha256:" + "ab" * 32
    (data / "tmp" / "0123abcd").write_bytes(b"half a fill")
    (path_of(data, lc.base_digest).parent / "junk").write_bytes(b"not a blob")
    with sqlite3.connect(data / "metadata.db") as db:
        db.execute("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, 5, 0, 0)", (dangling,))
        # b's own layer loses its row: the file is an orphan that b's manifest references.
        db.execute("DELETE FROM blobs WHERE digest = ?", (lc.own_layer("lc/b"),))
        db.execute("INSERT INTO tags (repository_id, tag, manifest, checked_at, updated_at) "
                   "SELECT repository_id, 'ghost', ?, 0, 0 FROM images LIMIT 1", (dangling,))

    code, report = await asyncio.to_thread(fsck, data)
    assert code == 4 and not report["consistent"]
    found = kinds(report)
    assert found["corrupt"] == {lc.own_layer("lc/a")}
    assert found["missing"] == {b.config_digest, dangling}
    assert found["orphan"] == {orphan, lc.own_layer("lc/b")}
    assert set(found["temp"]) == {str(data / "tmp" / "0123abcd")}
    assert len(found["stray"]) == 1 and len(found["dangling_tag"]) == 1

    code, fast = await asyncio.to_thread(fsck, data, "--fast")
    assert code == 4 and "corrupt" not in kinds(fast) and kinds(fast)["missing"] == found["missing"]

    code, repaired = await asyncio.to_thread(fsck, data, "--repair")
    assert code == 1 and repaired["fixed"] == repaired["found"] == report["found"]
    actions = {p["subject"]: p["action"] for p in repaired["problems"]}
    assert actions[lc.own_layer("lc/b")].startswith("adopted")
    assert actions[orphan] == "removed"
    assert not altered.exists() and not path_of(data, orphan).exists()

    code, after = await asyncio.to_thread(fsck, data)
    assert (code, after["consistent"]) == (0, True), after
    # Nothing bad is served: the removed blobs come back from the upstream, verified.
    await pull_all(upstream, data, lc)
    code, after = await asyncio.to_thread(fsck, data)
    assert code == 0, after
    assert hashlib.sha256(altered.read_bytes()).hexdigest() == a.layer_digests[-1].split(":")[1]


async def test_manifest_whose_file_is_gone_takes_its_image_out_of_the_cache(lc, upstream, tmp_path):
    data = tmp_path / "data"
    await pull_all(upstream, data, lc, names=("lc/a",))
    path_of(data, lc.images["lc/a"].digest).unlink()
    code, report = await asyncio.to_thread(fsck, data, "--repair")
    assert code == 1
    assert report["problems"][0]["action"] == "row removed with 1 image(s)"
    with sqlite3.connect(data / "metadata.db") as db:
        assert db.execute("SELECT COUNT(*) FROM images").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM tags").fetchone() == (0,)
    assert (await asyncio.to_thread(fsck, data))[0] == 0


async def test_fsck_refuses_a_store_a_server_is_using(lc, upstream, tmp_path):
    data = tmp_path / "data"
    await pull_all(upstream, data, lc, names=("lc/a",))
    lock = StoreLock(data)
    lock.acquire(exclusive=False)  # what a running server holds
    try:
        code, report = await asyncio.to_thread(fsck, data, "--repair")
    finally:
        lock.release()
    assert code == 8 and "in use by a running regcache" in report["stderr"]


async def test_fsck_reports_a_damaged_database(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.db").write_bytes(b"this is not an SQLite database" * 200)
    code, report = await asyncio.to_thread(fsck, data)
    assert code == 4
    assert kinds(report)["database"] == {"metadata.db"}
