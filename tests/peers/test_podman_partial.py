"""podman's zstd:chunked partial pull through regcache: a real lazy client.

Debian's podman (4.3, containers/image 5.23) builds and pushes a zstd:chunked image
(``push --compression-format zstd:chunked``) to the distribution registry; a second
podman, on the overlay driver with partial pulls enabled in its storage.conf, pulls
it through regcache as its docker.io mirror. It reads the layer's table of contents
with one range (its position is in the layer's annotations) and the files' chunks with
a multi-range request, and assembles the layer from them (``Retrieved partial blob``).
Both podmans run in a loopback-only network namespace (a failing mirror would send
podman to the real Docker Hub). regcache has prefetch off, so the layer is cold when
podman first asks for part of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import Netns, NetnsForwarder, Podman, RegcacheServer
from tests.support.registry import Registry

IMAGE = "lazy/zc:1"
DATA = random.Random(15).randbytes(400_000)  # several zstd:chunked chunks
MTIME = 1_700_000_000


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("podman-partial")


@pytest.fixture(scope="module")
def hub(work: Path) -> Iterator[Registry]:
    with Registry(work / "hub", count_requests=False) as registry:
        yield registry


@pytest.fixture(scope="module")
def regcache(work: Path, hub: Registry) -> Iterator[RegcacheServer]:
    server = RegcacheServer(work / "regcache", [{"name": "docker.io", "url": hub.url, "default": True,
                                                 "prefetch": 0, "retries": 1}]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def netns(regcache: RegcacheServer, hub: Registry) -> Iterator[Netns]:
    ns = Netns().create()
    forwarder = NetnsForwarder(ns)
    try:
        forwarder.forward(regcache.port)
        forwarder.forward(hub.port)  # for the builder's push
        yield ns
    finally:
        forwarder.close()
        ns.delete()


def _rootfs(path: Path) -> None:
    """Debian's static busybox and a data file.

    Nothing else: with directory entries or several symlinks to busybox in the layer,
    Debian's podman 4.3 failed to push it as zstd:chunked ("writing blob: Patch ...:
    happened during read: short write"), the same with or without regcache."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add("/bin/busybox", "bin/busybox")
        info = tarfile.TarInfo("data.bin")
        info.size, info.mode, info.mtime = len(DATA), 0o644, MTIME
        tar.addfile(info, io.BytesIO(DATA))


@pytest.fixture(scope="module")
def pushed(work: Path, netns: Netns, hub: Registry) -> str:
    """The zstd:chunked image on the registry; its layer's digest."""
    builder = Podman(work / "builder", netns, {}, partial_pulls=True)
    try:
        _rootfs(work / "rootfs.tar")
        _ok(builder.podman("import", str(work / "rootfs.tar"), "localhost/lazy/zc:1"), "podman import")
        _ok(builder.podman("push", "--tls-verify=false", "--compression-format", "zstd:chunked",
                           "localhost/lazy/zc:1", f"docker://{hub.host}/{IMAGE}"), "podman push zstd:chunked")
    finally:
        builder.close()
    request = urllib.request.Request(f"{hub.url}/v2/lazy/zc/manifests/1",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request) as r:
        manifest = json.loads(r.read())
    (layer,) = manifest["layers"]
    # What makes podman's pull partial: the TOC's position, in the layer's annotations.
    assert "io.containers.zstd-chunked.manifest-position" in layer["annotations"], layer
    return str(layer["digest"])


def _ok(done, what: str) -> str:  # type: ignore[no-untyped-def]
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return str(done.stdout)


def test_podman_partial_pull_of_a_zstd_chunked_image_gets_206s_and_the_image_runs(
        work: Path, netns: Netns, regcache: RegcacheServer, pushed: str) -> None:
    puller = Podman(work / "puller", netns, {"docker.io": regcache.host}, partial_pulls=True)
    try:
        done = puller.podman("--log-level=debug", "pull", f"docker.io/{IMAGE}")
        _ok(done, "podman pull (partial)")
        assert f"Retrieved partial blob {pushed}" in done.stderr, "podman took the partial pull path"
        layer_gets = [e for e in regcache.access_log() if e["method"] == "GET" and pushed in e.get("path", "")]
        assert layer_gets and all(e["status"] == 206 for e in layer_gets), layer_gets
        assert any(e.get("ranges", 0) > 1 for e in layer_gets), "the chunks came in a multi-range request"
        # This sandbox refuses crun's raising of rlimits and its hybrid-cgroup setup: runc, low limits.
        run = ["run", "--rm", "--network", "none", "--runtime", "runc",
               "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
        out = _ok(puller.podman(*run, f"docker.io/{IMAGE}", "/bin/busybox", "sha256sum", "/data.bin"), "podman run")
        assert out.split()[0] == hashlib.sha256(DATA).hexdigest()
    finally:
        puller.close()
