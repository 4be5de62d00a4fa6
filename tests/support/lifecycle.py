"""Images and helpers shared by the lifecycle, fsck and crash tests.

Three small images share one base layer, so eviction can be watched freeing a
layer of its own while the shared one stays; an index with two platforms shows
that an index keeps its children.
"""

from __future__ import annotations

import hashlib
import http.client
import random
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from storage.oci.digest import Digest
from storage.paths import blob_path
from tests.support import skopeo
from tests.support.images import (
    File,
    Image,
    Index,
    build_big_layer,
    build_image,
    build_index,
    build_layer,
    write_oci_layout,
)
from tests.support.registry import Registry

KIB = 1024


def _random(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass(frozen=True)
class LifecycleImages:
    base_digest: str
    images: dict[str, Image]  # "lc/a" -> image, tagged "1"
    index: Index  # "lc/multi:1"

    def blobs(self, name: str) -> list[str]:
        image = self.images[name]
        return [image.digest, image.config_digest, *image.layer_digests]

    def own_layer(self, name: str) -> str:
        return self.images[name].layer_digests[-1]

    def stored_size(self, *names: str) -> int:
        """Bytes the store holds once these images are pulled completely (shared blobs once)."""
        sizes: dict[str, int] = {}
        for name in names:
            image = self.images[name]
            sizes[image.digest] = len(image.manifest)
            sizes[image.config_digest] = len(image.config)
            for layer in image.layers:
                sizes[layer.digest] = layer.size
        return sum(sizes.values())


def build_images() -> LifecycleImages:
    base = build_layer({"base/data.bin": File(_random(1, 192 * KIB))})
    images = {
        f"lc/{name}": build_image({f"{name}/data.bin": File(_random(seed, 256 * KIB))}, base_layers=[base])
        for seed, name in ((2, "a"), (3, "b"), (4, "c"))
    }
    amd = build_image({"amd.bin": File(_random(5, 64 * KIB))}, platform=("linux", "amd64"))
    arm = build_image({"arm.bin": File(_random(6, 64 * KIB))}, platform=("linux", "arm64"))
    return LifecycleImages(base.digest, images, build_index([amd, arm]))


_pushed: dict[str, LifecycleImages] = {}


def push_images(upstream: Registry, workdir: Path) -> LifecycleImages:
    """Push the lifecycle images into ``upstream`` once per registry."""
    if upstream.url in _pushed:
        return _pushed[upstream.url]
    built = build_images()
    items: dict[str, Image | Index] = {**built.images, "lc/multi": built.index}
    for ref, item in items.items():
        layout = write_oci_layout(workdir / ref.replace("/", "-"), {"1": item})
        skopeo.push_layout(layout, "1", upstream.host, ref, "1")
    _pushed[upstream.url] = built
    return built


def skopeo_pull(host: str, repository: str, dest: Path, reference: str = "1") -> None:
    """A whole image (every platform) through regcache; skopeo verifies every digest."""
    skopeo.copy(skopeo.docker_ref(host, repository, reference), f"dir:{dest}")


def on_disk(data_dir: Path, digest: str) -> bool:
    return blob_path(data_dir, Digest.parse(digest)).exists()


async def pull_verified(session: aiohttp.ClientSession, base: str, repository: str, image: Image) -> None:
    """Manifest by tag, then config and layers; every body checked against its digest."""
    accept = {"Accept": image.media_type}
    async with session.get(f"{base}/v2/{repository}/manifests/1", headers=accept) as r:
        assert r.status == 200, await r.text()
        assert hashlib.sha256(await r.read()).hexdigest() == image.digest.split(":")[1]
    for digest in (image.config_digest, *image.layer_digests):
        async with session.get(f"{base}/v2/{repository}/blobs/{digest}") as r:
            assert r.status == 200, await r.text()
            assert hashlib.sha256(await r.read()).hexdigest() == digest.split(":")[1]


_big: dict[str, dict[str, Image]] = {}


def push_big_images(upstream: Registry, workdir: Path, count: int = 3, size_mib: int = 6) -> dict[str, Image]:
    """Images with one layer of a few MiB each, so a kill can land while fills are writing."""
    if upstream.url in _big:
        return _big[upstream.url]
    images = {}
    for seed in range(count):
        layer = build_big_layer(workdir / f"big-{seed}.tar.gz", size_mib, seed=100 + seed)
        image = build_image(base_layers=[layer], container_config={"Env": [f"N={seed}"]})
        ref = f"crash/big{seed}"
        skopeo.push_layout(write_oci_layout(workdir / f"layout-{seed}", {"1": image}), "1", upstream.host, ref, "1")
        images[ref] = image
    _big[upstream.url] = images
    return images


def fetch(host: str, path: str, accept: str | None = None) -> tuple[int, bytes | None]:
    """A GET: (status, body) for a complete response, (-1, None) when the connection broke."""
    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        return response.status, response.read()
    except (http.client.HTTPException, OSError):
        return -1, None
    finally:
        conn.close()


def pull_checked(host: str, repository: str, image: Image) -> bool:
    """Pull every blob of an image; True when all arrived. A complete 200 body that does not
    match its digest fails the test at once: that is the one thing that must never happen."""
    complete = True
    status, body = fetch(host, f"/v2/{repository}/manifests/1", image.media_type)
    if status != 200 or body is None:
        return False
    assert hashlib.sha256(body).hexdigest() == image.digest.split(":")[1]
    for digest in (image.config_digest, *image.layer_digests):
        status, body = fetch(host, f"/v2/{repository}/blobs/{digest}")
        if status != 200 or body is None:
            complete = False
            continue
        assert hashlib.sha256(body).hexdigest() == digest.split(":")[1], f"{digest} served with wrong bytes"
    return complete


def blob_files_verify(data_dir: Path) -> list[str]:
    """Blob files whose content is not their name: must always be empty, crash or not."""
    bad = []
    for path in (data_dir / "blobs").rglob("*"):
        if path.is_file() and len(path.name) == 64:
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != path.name:
                bad.append(str(path))
    return bad
