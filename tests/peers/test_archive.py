"""save and load in-process, against the real registry as upstream: layout, dedup, round trips, hostile archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sqlite3
import tarfile
from pathlib import Path

import pytest
import zstandard

from proxy.admin.archive import add_archive_routes
from proxy.app import create_app
from proxy.resources import SETTINGS
from tests.support.archive import UPSTREAM, proxy_for, settings_for
from tests.support.images import build_layer, sha256_digest, tar_bytes
from tests.support.seed import ALPHA, BETA, BUSYBOX, OCI_INDEX, ZSTD


@pytest.fixture
async def proxy(aiohttp_client, tmp_path, upstream, seeded):  # type: ignore[no-untyped-def]
    return await proxy_for(aiohttp_client, tmp_path / "one", upstream.url)


@pytest.fixture
async def offline(aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    """A second regcache whose upstream does not answer: everything it serves came from a load."""
    return await proxy_for(aiohttp_client, tmp_path / "two", "http://127.0.0.1:9")


async def save(client, *images: str, **options) -> bytes:  # type: ignore[no-untyped-def]
    r = await client.post("/admin/save", json={"images": list(images), **options})
    assert r.status == 200, await r.text()
    return await r.read()


async def load(client, archive: bytes, **query):  # type: ignore[no-untyped-def]
    return await client.post("/admin/load", data=archive, params=query)


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def state(data_dir: Path) -> tuple[set[str], list[tuple]]:
    """Blob files and every tag and image row: what a refused load must leave exactly as it was."""
    blobs = {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}
    with sqlite3.connect(data_dir / "metadata.db") as db:
        rows = db.execute("SELECT * FROM tags").fetchall() + db.execute("SELECT * FROM images").fetchall()
        rows += db.execute("SELECT digest, size FROM blobs").fetchall()
    return blobs, sorted(rows, key=repr)


async def test_save_writes_an_oci_layout_and_docker_manifest_with_shared_blobs_once(proxy, seeded):
    alpha, beta = seeded[ALPHA], seeded[BETA]
    files = members(await save(proxy, ALPHA, BETA))
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert [m["digest"] for m in index["manifests"]] == [alpha.digest, beta.digest]
    names = [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]]
    assert names == [f"{UPSTREAM}/library/alpha:1", f"{UPSTREAM}/library/beta:1"]
    # Manifests are stored byte for byte: the upstream's digests survive.
    assert files[f"blobs/sha256/{alpha.digest[7:]}"] == alpha.manifest
    assert files[f"blobs/sha256/{beta.digest[7:]}"] == beta.manifest
    docker = json.loads(files["manifest.json"])
    assert docker[0]["RepoTags"] == [f"{UPSTREAM}/library/alpha:1"]
    assert docker[0]["Config"] == f"blobs/sha256/{alpha.item.config_digest[7:]}"
    assert docker[0]["Layers"] == [f"blobs/sha256/{d[7:]}" for d in alpha.item.layer_digests]
    blob_names = [n for n in files if n.startswith("blobs/")]
    # alpha and beta share their base layer: it is in the archive once.
    expected = {alpha.digest, beta.digest, *alpha.blob_digests, *beta.blob_digests}
    assert sorted(blob_names) == sorted(f"blobs/sha256/{d[7:]}" for d in expected)
    for name in blob_names:
        assert "sha256:" + hashlib.sha256(files[name]).hexdigest() == "sha256:" + name.rsplit("/", 1)[1]


async def test_compressed_saves_hold_the_same_tar(proxy):
    plain = await save(proxy, ALPHA)
    assert gzip.decompress(await save(proxy, ALPHA, compress="gzip")) == plain
    zstd = await save(proxy, ALPHA, compress="zstd")
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(zstd)).read() == plain


async def test_index_saves_all_platforms_and_gives_docker_the_asked_one(proxy, seeded):
    index = seeded[OCI_INDEX]
    arm = index.item.for_platform(("linux", "arm64", "v8"))
    files = members(await save(proxy, OCI_INDEX, docker_platform="linux/arm64"))
    assert json.loads(files["index.json"])["manifests"][0]["digest"] == index.digest
    for child in index.child_digests:
        assert f"blobs/sha256/{child[7:]}" in files
    assert json.loads(files["manifest.json"])[0]["Config"] == f"blobs/sha256/{arm.config_digest[7:]}"
    # --platform: only that image, under the upstream's own child digest.
    files = members(await save(proxy, OCI_INDEX, platform="linux/arm64"))
    assert json.loads(files["index.json"])["manifests"][0]["digest"] == arm.digest
    assert f"blobs/sha256/{index.digest[7:]}" not in files


async def test_save_of_an_unknown_image_is_a_clean_error(proxy):
    r = await proxy.post("/admin/save", json={"images": ["library/nothing:here"]})
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
async def test_save_then_load_into_another_cache_serves_the_same_digests(proxy, offline, seeded, compress):
    archive = await save(proxy, ALPHA, OCI_INDEX, ZSTD, compress=compress)
    r = await load(offline, archive)
    assert r.status == 200, await r.text()
    loaded = (await r.json())["loaded"]
    assert [i["name"] for i in loaded] == ["library/alpha:1", "multi/oci-index:1", "zstd/app:1"]
    for key in (ALPHA, OCI_INDEX, ZSTD):
        item = seeded[key]
        for reference in (item.tag, item.digest):
            r = await offline.get(f"/v2/{item.repository}/manifests/{reference}", headers={"Accept": item.media_type})
            assert r.status == 200, (key, reference)
            assert r.headers["Docker-Content-Digest"] == item.digest
            assert await r.read() == item.manifest
        for blob in item.blob_digests:
            r = await offline.get(f"/v2/{item.repository}/blobs/{blob}")
            assert r.status == 200
            assert sha256_digest(await r.read()) == blob
    with sqlite3.connect(offline.server.app[SETTINGS].data_dir / "metadata.db") as db:
        assert db.execute("SELECT COUNT(*) FROM images WHERE pinned = 0").fetchone() == (0,)


async def test_loading_twice_skips_every_blob(proxy, offline):
    archive = await save(proxy, ALPHA)
    first = await (await load(offline, archive)).json()
    second = await (await load(offline, archive)).json()
    assert first["blobs_written"] == 5 and first["blobs_skipped"] == 0
    assert second["blobs_written"] == 0 and second["blobs_skipped"] == 5


async def test_load_under_a_chosen_prefix(proxy, offline, seeded):
    archive = await save(proxy, BUSYBOX)
    r = await load(offline, archive, repository_prefix="mirror/team")
    # The upstream is not Docker Hub: library/ is part of the name there.
    assert (await r.json())["loaded"][0]["name"] == "mirror/team/library/busybox:latest"
    r = await offline.get(
        "/v2/mirror/team/library/busybox/manifests/latest", headers={"Accept": seeded[BUSYBOX].media_type}
    )
    assert r.headers["Docker-Content-Digest"] == seeded[BUSYBOX].digest


# --------------------------------------------------------------------------- docker's legacy layout


def legacy_archive(layer_files: list[bytes], repo_tags: list[str], *, symlink_layers: bool = False) -> bytes:
    """A ``docker save`` archive: uncompressed layer.tar files, <config>.json, manifest.json."""
    diff_ids = [sha256_digest(layer) for layer in layer_files]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "config": {"Cmd": ["/bin/sh"]}}).encode()
    files: dict[str, bytes] = {f"{sha256_digest(config)[7:]}.json": config}
    layers, links = [], {}
    for i, layer in enumerate(layer_files):
        if symlink_layers:  # what containers/image (skopeo, podman) writes
            files[f"{diff_ids[i][7:]}.tar"] = layer
            links[f"layer{i}/layer.tar"] = f"../{diff_ids[i][7:]}.tar"
        else:
            files[f"layer{i}/layer.tar"] = layer
        files[f"layer{i}/VERSION"] = b"1.0"
        layers.append(f"layer{i}/layer.tar")
    files["manifest.json"] = json.dumps([{"Config": f"{sha256_digest(config)[7:]}.json", "RepoTags": repo_tags,
                                          "Layers": layers}]).encode()
    return build_tar(files, links)


def build_tar(files: dict[str, bytes], links: dict[str, str] | None = None, **special: tarfile.TarInfo) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for info in special.values():
            tar.addfile(info)
    return out.getvalue()


@pytest.mark.parametrize("symlink_layers", [False, True])
async def test_legacy_docker_archive_loads_with_a_stable_synthesized_manifest(offline, tmp_path, symlink_layers):
    layers = [tar_bytes({"etc/one": b"1\n"}), tar_bytes({"etc/two": b"2\n"})]
    archive = legacy_archive(layers, ["example/app:1"], symlink_layers=symlink_layers)
    first = (await (await load(offline, archive)).json())["loaded"][0]
    assert first["name"] == "example/app:1"
    r = await offline.get("/v2/example/app/manifests/1")
    manifest = json.loads(await r.read())
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert [layer["digest"] for layer in manifest["layers"]] == [sha256_digest(layer) for layer in layers]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.docker.image.rootfs.diff.tar"}
    # The same archive (or the same image saved again) gives the same manifest digest.
    again = await proxy_for_fresh(offline, tmp_path, archive)
    assert again == first["digest"] == r.headers["Docker-Content-Digest"]


async def proxy_for_fresh(offline, tmp_path, archive: bytes) -> str:  # type: ignore[no-untyped-def]
    from aiohttp.test_utils import TestClient, TestServer

    app = create_app(settings_for(tmp_path / "fresh", "http://127.0.0.1:9"))
    add_archive_routes(app)
    async with TestClient(TestServer(app)) as client:
        return (await (await load(client, archive)).json())["loaded"][0]["digest"]


async def test_legacy_layer_that_does_not_match_its_diff_id_is_refused(offline):
    archive = legacy_archive([tar_bytes({"a": b"a"})], ["example/app:1"])
    files = members(archive)
    files["layer0/layer.tar"] = tar_bytes({"a": b"b"})
    r = await load(offline, build_tar(files))
    assert r.status == 400
    assert "diff_id" in (await r.json())["errors"][0]["message"]


# --------------------------------------------------------------------------- hostile archives


def _info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


async def hostile_cases(proxy, seeded) -> dict[str, tuple[bytes, str]]:  # type: ignore[no-untyped-def]
    good = members(await save(proxy, ALPHA))
    index = json.loads(good["index.json"])
    # alpha's own last layer: the store does not have it yet, so the load writes it first.
    layer_name = f"blobs/sha256/{seeded[ALPHA].item.layer_digests[-1][7:]}"
    wrong = dict(good)
    wrong[layer_name] = good[layer_name][:-1] + bytes([good[layer_name][-1] ^ 1])
    oversize = dict(good)
    index["manifests"][0]["size"] += 1
    oversize["index.json"] = json.dumps(index).encode()
    plain = build_tar(good)
    bomb = build_tar({"index.json": b"{" + b" " * (5 * 1024 * 1024) + b"}"})
    return {
        "traversal": (build_tar({**good, "../../escape": b"x"}), "path traversal"),
        "absolute": (build_tar({**good, "/etc/cron.d/x": b"x"}), "absolute path"),
        "symlink": (build_tar(good, {"blobs/sha256/evil": "../../../etc/passwd"}), "points outside the archive"),
        "absolute symlink": (build_tar(good, {"x": "/etc/passwd"}), "points outside the archive"),
        "hardlink": (build_tar(good, hard=_info("x", tarfile.LNKTYPE, "../outside")), "points outside the archive"),
        "device": (build_tar(good, dev=_info("dev/sda", tarfile.BLKTYPE)), "block device"),
        "fifo": (build_tar(good, fifo=_info("pipe", tarfile.FIFOTYPE)), "fifo"),
        "wrong digest": (build_tar(wrong), "does not match its digest"),
        "oversize": (build_tar(oversize), "declares"),
        "huge metadata": (bomb, "too large"),
        "truncated": (plain[: len(plain) // 2], "truncated"),
        "truncated gzip": (gzip.compress(plain)[:-4000], "truncated"),
        "not a tar": (b"hello, this is not an archive" * 100, "not a tar archive"),
        "no index": (build_tar({"hello": b"x"}), "not an image archive"),
    }


async def test_hostile_archives_are_refused_and_change_nothing(proxy, offline, seeded):
    data_dir = offline.server.app[SETTINGS].data_dir
    # Something already loaded, so "nothing changed" covers existing tags too.
    await load(offline, await save(proxy, BETA))
    before = state(data_dir)
    for case, (archive, message) in (await hostile_cases(proxy, seeded)).items():
        r = await load(offline, archive)
        assert r.status == 400, case
        error = (await r.json())["errors"][0]
        assert error["code"] == "ARCHIVE_INVALID", case
        assert message in error["message"], (case, error["message"])
        assert state(data_dir) == before, case
        assert list((data_dir / "tmp").iterdir()) == [], case
    r = await offline.get(f"/v2/{seeded[ALPHA].repository}/manifests/{seeded[ALPHA].digest}")
    assert r.status != 200


async def test_junk_blobs_in_an_archive_do_not_stay(proxy, offline):
    files = members(await save(proxy, ALPHA))
    junk = build_layer({"junk": b"unreferenced"}).read_bytes()
    files[f"blobs/sha256/{sha256_digest(junk)[7:]}"] = junk
    r = await load(offline, build_tar(files))
    assert r.status == 200
    stored, _ = state(offline.server.app[SETTINGS].data_dir)
    assert sha256_digest(junk)[7:] not in stored


# --------------------------------------------------------------------------- memory stays flat

BIG_MIB = 48


@pytest.fixture(scope="module")
def big_image(upstream, tmp_path_factory):  # type: ignore[no-untyped-def]
    from tests.support.images import build_big_layer, build_image
    from tests.support.seed import push_item

    work = tmp_path_factory.mktemp("big")
    layer = build_big_layer(work / "big.tar.gz", BIG_MIB, seed=7)
    return push_item(build_image({"etc/big": b"big\n"}, extra_layers=[layer]), upstream, "big/archive", "1", work)


async def test_save_and_load_of_a_big_image_keep_memory_flat(proxy, offline, big_image, tmp_path):
    import tracemalloc

    reference = f"{big_image.repository}:{big_image.tag}"
    await save(proxy, reference)  # warm: the store holds the image, the save below only reads it
    archive = tmp_path / "big.tar"
    tracemalloc.start()
    try:
        r = await proxy.post("/admin/save", json={"images": [reference]})
        assert r.status == 200
        with archive.open("wb") as out:
            async for chunk in r.content.iter_chunked(256 * 1024):
                out.write(chunk)
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with archive.open("rb") as body:
            r = await offline.post("/admin/load", data=body)
        assert r.status == 200, await r.text()
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert archive.stat().st_size > BIG_MIB * 2**20
    # The archive passed through whole; Python never held more than a few chunks of it.
    assert save_peak < 16 * 2**20, save_peak
    assert load_peak < 16 * 2**20, load_peak
    r = await offline.get(f"/v2/{big_image.repository}/manifests/{big_image.tag}")
    assert r.headers["Docker-Content-Digest"] == big_image.digest


async def test_corrupted_archives_are_refused_cleanly_never_with_a_server_error(proxy, offline):
    import random

    plain = await save(proxy, ALPHA)
    data_dir = offline.server.app[SETTINGS].data_dir
    before = state(data_dir)
    rng = random.Random(4)
    for round_ in range(40):
        damaged = bytearray(plain if round_ % 2 else gzip.compress(plain, mtime=0))
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(min(len(damaged), 3000) if round_ % 3 else len(damaged))] ^= 1 << rng.randrange(8)
        r = await load(offline, bytes(damaged))
        # A flip in padding or in a name-only field may be harmless; anything else is a clean refusal.
        assert r.status in (200, 400), (round_, r.status, await r.text())
        if r.status == 400:
            assert (await r.json())["errors"][0]["code"] in ("ARCHIVE_INVALID", "MANIFEST_INVALID"), round_
            assert state(data_dir) == before, round_
        else:
            before = state(data_dir)


@pytest.mark.parametrize(
    "files",
    [
        {"index.json": b"[]"},
        {"index.json": b'{"manifests": "x"}'},
        {"index.json": b'{"manifests": [1]}'},
        {"index.json": b'{"manifests": [{"digest": "sha256:00", "size": 1}]}'},
        {"index.json": b'{"manifests": [{"digest": "sha256:' + b"0" * 64 + b'", "size": "1"}]}'},
        {"index.json": b"\xff\xfe"},
        {"manifest.json": b'{"Config": "x"}'},
        {"manifest.json": b"[1]"},
        {"manifest.json": b'[{"Config": "c.json", "Layers": [1]}]', "c.json": b"{}"},
        {"manifest.json": b'[{"Config": "c.json", "Layers": []}]', "c.json": b'{"rootfs": {"diff_ids": 5}}'},
        {"manifest.json": b'[{"Config": "c.json", "Layers": ["l"]}]', "c.json": b'{"rootfs": {"diff_ids": [1]}}'},
        {"manifest.json": b'[{"Config": "missing.json"}]'},
        {"manifest.json": b'[{"Config": "c.json", "RepoTags": ["Bad!"]}]', "c.json": b'{"rootfs":{"diff_ids":[]}}'},
        {"manifest.json": b"[]"},
    ],
)
async def test_malformed_indexes_are_refused_cleanly(offline, files):
    r = await load(offline, build_tar(files))
    assert r.status == 400, await r.text()
    assert (await r.json())["errors"][0]["code"] == "ARCHIVE_INVALID"
