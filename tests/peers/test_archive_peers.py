"""save and load with real peers: dockerd loads and runs a regcache save, skopeo reads it both ways,
docker's and skopeo's own archives load into regcache and pull through it, and a save carried to a
second regcache answers the same digests. Everything goes through the ``regcache`` CLI."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli import main as cli
from tests.support import skopeo
from tests.support.archive import UPSTREAM, proxy_for
from tests.support.daemons import Dockerd, Netns, Podman
from tests.support.seed import ALPHA, BUSYBOX, OCI_INDEX

TOKEN = "archive-test-token"


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A private dockerd that never needs the network: it loads, saves and runs archives."""
    netns = Netns().create()
    daemon = Dockerd(tmp_path_factory.mktemp("dockerd"), netns, {})
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        netns.delete()


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    netns = Netns().create()
    client = Podman(tmp_path_factory.mktemp("podman"), netns, {})
    try:
        yield client
    finally:
        client.close()
        netns.delete()


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGCACHE_ADMIN_TOKEN", TOKEN)


@pytest.fixture
async def proxy(aiohttp_client, tmp_path, upstream, seeded):  # type: ignore[no-untyped-def]
    return await proxy_for(aiohttp_client, tmp_path / "one", upstream.url)


@pytest.fixture
async def offline(aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    return await proxy_for(aiohttp_client, tmp_path / "two", "http://127.0.0.1:9")


def host_of(client) -> str:  # type: ignore[no-untyped-def]
    return f"127.0.0.1:{client.server.port}"


async def regcache(client, *args: str, capsys: pytest.CaptureFixture[str] | None = None) -> int:  # type: ignore[no-untyped-def]
    """``regcache VERB ... --server <client's server>`` in a thread, beside the in-process server."""
    verb, *rest = args
    return await asyncio.to_thread(cli.main, [verb, "--server", f"http://{host_of(client)}", *rest])


async def blocking(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(fn, *args, **kwargs)


def ok(done, what: str) -> str:  # type: ignore[no-untyped-def]
    assert done.returncode == 0, f"{what}: {done.stderr}"
    return done.stdout


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def test_regcache_save_is_loaded_and_run_by_docker(proxy, dockerd, seeded, tmp_path):
    archive = tmp_path / "busybox.tar"
    assert await regcache(proxy, "save", BUSYBOX, "-o", str(archive)) == 0
    out = ok(await blocking(dockerd.docker, "load", "-i", str(archive)), "docker load")
    name = f"{UPSTREAM}/{BUSYBOX}"
    assert f"Loaded image: {name}" in out
    assert await blocking(dockerd.image_id, name) == seeded[BUSYBOX].item.config_digest
    out = ok(
        await blocking(dockerd.docker, "run", "--rm", "--network", "none", name, "echo", "saved by regcache"), "run"
    )
    assert out.strip() == "saved by regcache"


async def test_skopeo_reads_the_save_as_docker_archive_and_oci_archive_with_the_same_digests(proxy, seeded, tmp_path):
    image = seeded[ALPHA]
    archive = tmp_path / "alpha.tar"
    assert await regcache(proxy, "save", ALPHA, "-o", str(archive)) == 0
    # The OCI side carries the registry's manifest byte for byte.
    raw = await blocking(skopeo.inspect, f"oci-archive:{archive}", raw=True)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.digest
    configs = {}
    for transport in ("docker-archive", "oci-archive"):
        dest = tmp_path / f"copy-{transport}"
        await blocking(skopeo.copy, f"{transport}:{archive}", f"oci:{dest}:x", preserve_digests=False)
        configs[transport] = json.loads(
            await blocking(skopeo.inspect, f"oci:{dest}:x", raw=True)
        )["config"]["digest"]
        config = json.loads(await blocking(skopeo.inspect, f"{transport}:{archive}", config=True, raw=True))
        diff_ids = config["rootfs"]["diff_ids"]
        assert len(diff_ids) == len(image.item.layers)
    assert configs["docker-archive"] == configs["oci-archive"] == image.item.config_digest
    copied = json.loads(await blocking(skopeo.inspect, f"oci:{tmp_path / 'copy-oci-archive'}:x", raw=True))
    assert [layer["digest"] for layer in copied["layers"]] == list(image.item.layer_digests)


async def test_docker_save_loads_into_regcache_and_pulls_through_it(offline, dockerd, proxy, tmp_path, capsys):
    # A busybox image in dockerd first (from a regcache save), renamed, then saved by docker itself.
    source = tmp_path / "from-regcache.tar"
    assert await regcache(proxy, "save", BUSYBOX, "-o", str(source)) == 0
    ok(await blocking(dockerd.docker, "load", "-i", str(source)), "docker load")
    ok(await blocking(dockerd.docker, "tag", f"{UPSTREAM}/{BUSYBOX}", "example/dsave:1"), "docker tag")
    saved = tmp_path / "docker-save.tar"
    ok(await blocking(dockerd.docker, "save", "-o", str(saved), "example/dsave:1"), "docker save")
    with tarfile.open(saved) as tar:
        assert any(n.endswith("/layer.tar") for n in tar.getnames()), "expected docker's legacy layout"
    capsys.readouterr()
    assert await regcache(offline, "load", "-i", str(saved)) == 0
    assert capsys.readouterr().out.strip() == "Loaded image: example/dsave:1"
    image_id = await blocking(dockerd.image_id, "example/dsave:1")
    ref = f"docker://{host_of(offline)}/example/dsave:1"
    config = await blocking(skopeo.inspect, ref, config=True, raw=True)
    assert "sha256:" + hashlib.sha256(config).hexdigest() == image_id
    await blocking(skopeo.copy, ref, f"oci:{tmp_path / 'pulled'}:x")


async def test_skopeo_docker_archive_loads_into_regcache_and_pulls_through_it(
    offline, upstream, seeded, tmp_path, capsys
):
    image = seeded[ALPHA]
    archive = tmp_path / "skopeo.tar"
    await blocking(skopeo.copy, image.docker_ref(upstream.host), f"docker-archive:{archive}:example/skopeo:1",
                   preserve_digests=False, all_images=False)
    capsys.readouterr()
    assert await regcache(offline, "load", "-i", str(archive), "--repository-prefix", "air") == 0
    assert capsys.readouterr().out.strip() == "Loaded image: air/example/skopeo:1"
    ref = f"docker://{host_of(offline)}/air/example/skopeo:1"
    config = await blocking(skopeo.inspect, ref, config=True, raw=True)
    assert "sha256:" + hashlib.sha256(config).hexdigest() == image.item.config_digest
    await blocking(skopeo.copy, ref, f"oci:{tmp_path / 'pulled'}:x")


@pytest.mark.parametrize("compress", ["", "zstd"])
async def test_save_carried_to_a_second_regcache_answers_the_same_digests(proxy, offline, seeded, tmp_path, compress):
    archive = tmp_path / "carry.tar"
    flags = ["--compress", compress] if compress else []
    assert await regcache(proxy, "save", ALPHA, OCI_INDEX, "-o", str(archive), *flags) == 0
    assert await regcache(offline, "load", "-i", str(archive)) == 0
    for key in (ALPHA, OCI_INDEX):
        item = seeded[key]
        for digest in (item.digest, *item.child_digests):
            ref = skopeo.docker_ref(host_of(offline), item.repository, digest)
            raw = await blocking(skopeo.inspect, ref, raw=True, no_tags=True)
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
        await blocking(skopeo.copy, item.docker_ref(host_of(offline)), f"oci:{tmp_path / key.replace('/', '_')}:x")


async def test_load_from_stdin_and_a_refused_archive_through_the_cli(offline, proxy, tmp_path, capsys, monkeypatch):
    archive = tmp_path / "alpha.tar"
    assert await regcache(proxy, "save", ALPHA, "-o", str(archive)) == 0
    capsys.readouterr()
    with archive.open("rb") as f:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(f))
        assert await regcache(offline, "load") == 0
    assert capsys.readouterr().out.strip() == "Loaded image: library/alpha:1"
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "evil.tar").write_bytes(evil.getvalue())
    assert await regcache(offline, "load", "-i", str(tmp_path / "evil.tar")) == 1
    assert "path traversal" in capsys.readouterr().err


async def test_failed_save_leaves_no_file(proxy, tmp_path, capsys):
    target = tmp_path / "out" / "nothing.tar"
    target.parent.mkdir()
    assert await regcache(proxy, "save", "library/nothing:here", "-o", str(target)) == 1
    assert "manifest" in capsys.readouterr().err.lower()
    assert list(target.parent.iterdir()) == []


def test_save_and_load_through_the_guarded_admin_api_of_regcache_serve(
    regcache_factory, upstream, seeded, tmp_path, capsys, monkeypatch
):
    from tests.conftest import upstream_entry

    token = "archive-serve-token-0123456789"
    source = regcache_factory([upstream_entry(upstream, name=UPSTREAM)], settings={"admin": {"token": token}})
    # The target's upstream does not answer: what it serves came from the load.
    dead = {"name": UPSTREAM, "url": "http://127.0.0.1:9", "default": True, "retries": 0}
    target = regcache_factory([dead], settings={"admin": {"token": token}})
    archive = tmp_path / "alpha.tar.gz"
    monkeypatch.setenv("REGCACHE_ADMIN_TOKEN", "wrong-token-0123456789")
    assert cli.main(["save", ALPHA, "-o", str(archive), "--server", source.url]) == 1
    assert "unauthorized" in capsys.readouterr().err
    assert not archive.exists()
    monkeypatch.setenv("REGCACHE_ADMIN_TOKEN", token)
    assert cli.main(["save", ALPHA, "-o", str(archive), "--compress", "gzip", "--server", source.url]) == 0
    assert archive.read_bytes()[:2] == b"\x1f\x8b"
    capsys.readouterr()
    assert cli.main(["load", "-i", str(archive), "--server", target.url]) == 0
    assert capsys.readouterr().out.strip() == "Loaded image: library/alpha:1"
    raw = skopeo.inspect(skopeo.docker_ref(target.host, "library/alpha", seeded[ALPHA].digest), raw=True)
    assert raw == seeded[ALPHA].manifest


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
async def test_podman_save_loads_into_regcache(proxy, offline, podman, seeded, tmp_path, capsys, fmt):
    image = seeded[ALPHA]
    source = tmp_path / "from-regcache.tar"
    assert await regcache(proxy, "save", ALPHA, "-o", str(source)) == 0
    ok(await blocking(podman.podman, "load", "-i", str(source)), "podman load")
    saved = tmp_path / f"podman-{fmt}.tar"
    name = f"{UPSTREAM}/{ALPHA}"
    ok(await blocking(podman.podman, "save", "--format", fmt, "-o", str(saved), name), "podman save")
    capsys.readouterr()
    assert await regcache(offline, "load", "-i", str(saved)) == 0
    assert capsys.readouterr().out.strip() == "Loaded image: library/alpha:1"
    ref = f"docker://{host_of(offline)}/library/alpha:1"
    config = await blocking(skopeo.inspect, ref, config=True, raw=True)
    assert "sha256:" + hashlib.sha256(config).hexdigest() == image.item.config_digest
    await blocking(skopeo.copy, ref, f"oci:{tmp_path / 'pulled'}:x")
