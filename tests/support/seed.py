"""Push the standard set of test images into a registry and say exactly what was pushed.

| key                       | what                                                                 |
|---------------------------|----------------------------------------------------------------------|
| library/alpha:1           | OCI manifest, 3 gzip layers (the first is the shared base layer)     |
| library/beta:1            | Docker schema2 manifest: alpha's base layer (same digest) + its own  |
| multi/oci-index:1         | OCI image index, linux/amd64 + linux/arm64/v8                        |
| multi/docker-list:1       | Docker manifest list, linux/amd64 + linux/arm64/v8                   |
| zstd/app:1                | OCI manifest: gzip base layer + a zstd layer                         |
| library/busybox:latest    | runnable busybox for this machine's platform (``docker run ... echo``) |

Every manifest digest is read back from the registry with ``skopeo inspect --raw`` and compared
with the locally computed one before this returns, so tests can trust the digests they are given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import skopeo
from .images import (
    Image,
    Index,
    MediaStyle,
    build_busybox_image,
    build_image,
    build_index,
    build_layer,
    sha256_digest,
    write_dir_layout,
    write_oci_layout,
)
from .registry import Registry

ALPHA = "library/alpha:1"
BETA = "library/beta:1"
OCI_INDEX = "multi/oci-index:1"
DOCKER_LIST = "multi/docker-list:1"
ZSTD = "zstd/app:1"
BUSYBOX = "library/busybox:latest"

AMD64 = ("linux", "amd64")
ARM64 = ("linux", "arm64", "v8")


class SeedError(RuntimeError):
    pass


@dataclass(frozen=True)
class SeededImage:
    repository: str
    tag: str
    digest: str  # manifest (or index) digest, as the registry reports it
    media_type: str
    blob_digests: tuple[str, ...]  # config + layers; for an index, every child's, deduplicated
    child_digests: tuple[str, ...]  # manifests an index points to; () for a single image
    item: Image | Index  # the built object: manifest bytes, layers, per-child details

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def manifest(self) -> bytes:
        return self.item.manifest

    @property
    def is_index(self) -> bool:
        return isinstance(self.item, Index)

    def docker_ref(self, host: str, *, by_digest: bool = False) -> str:
        """``docker://HOST/REPO:TAG`` (or ``@DIGEST``) for skopeo, against any registry or proxy."""
        return skopeo.docker_ref(host, self.repository, self.digest if by_digest else self.tag)


def standard_images() -> dict[str, Image | Index]:
    """The standard set, built fresh (deterministic: equal on every call)."""
    base = build_layer({"etc/regcache-base": b"shared base layer\n", "usr/share/base/README": b"base\n"})

    alpha = build_image(
        {"srv/alpha/app.txt": b"alpha application\n"},
        base_layers=[base],
        extra_layers=[build_layer({"srv/alpha/data.bin": bytes(range(256)) * 64})],
        platform=AMD64,
    )
    beta = build_image(
        {"srv/beta/app.txt": b"beta application\n"}, base_layers=[base], platform=AMD64, media_style="docker"
    )

    def per_arch(style: MediaStyle) -> list[Image]:
        return [
            build_image(
                {"etc/arch": f"{'/'.join(plat)} {style}\n".encode()},
                base_layers=[base],
                platform=plat,
                media_style=style,
            )
            for plat in (AMD64, ARM64)
        ]

    zstd_app = build_image(
        {"srv/zstd/app.txt": b"zstd compressed layer\n" * 100},
        base_layers=[base],
        layer_compression="zstd",
        platform=AMD64,
    )
    return {
        ALPHA: alpha,
        BETA: beta,
        OCI_INDEX: build_index(per_arch("oci")),
        DOCKER_LIST: build_index(per_arch("docker")),
        ZSTD: zstd_app,
        BUSYBOX: build_busybox_image(),
    }


def push_item(
    item: Image | Index,
    registry: Registry,
    repository: str,
    tag: str,
    workdir: str | os.PathLike[str],
) -> SeededImage:
    """Push one built image or index and verify the registry holds exactly our manifest bytes."""
    work = Path(workdir)
    safe = f"{repository}_{tag}".replace("/", "_").replace(":", "_")
    creds = registry.credentials
    if item.media_style == "docker":
        # skopeo cannot read Docker media types from an OCI layout; its dir: format is fine.
        skopeo.push_dir(write_dir_layout(work / f"dir-{safe}", item), registry.host, repository, tag, creds=creds)
    else:
        layout = write_oci_layout(work / f"oci-{safe}", {safe: item})
        skopeo.push_layout(layout, safe, registry.host, repository, tag, creds=creds)

    children = item.images if isinstance(item, Index) else ()
    for reference, expected in [(tag, item), *((child.digest, child) for child in children)]:
        raw = skopeo.inspect(skopeo.docker_ref(registry.host, repository, reference), raw=True, creds=creds)
        if sha256_digest(raw) != expected.digest or raw != expected.manifest:
            raise SeedError(
                f"{repository}:{reference}: registry has {sha256_digest(raw)}, built {expected.digest}; "
                "skopeo rewrote the manifest"
            )
    return SeededImage(
        repository=repository,
        tag=tag,
        digest=item.digest,
        media_type=item.media_type,
        blob_digests=item.blob_digests,
        child_digests=item.child_digests if isinstance(item, Index) else (),
        item=item,
    )


def seed_upstream(
    registry: Registry,
    workdir: str | os.PathLike[str],
    images: Mapping[str, Image | Index] | None = None,
) -> dict[str, SeededImage]:
    """Build and push the standard set (or ``images``: ``"repo:tag" -> item``) into ``registry``.

    Returns ``"repo:tag" -> SeededImage``. The registry's request log is reset afterwards, so
    a test that counts starts from the seeded state, not from the pushes.
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    seeded: dict[str, SeededImage] = {}
    for key, item in (images if images is not None else standard_images()).items():
        repository, _, tag = key.rpartition(":")
        seeded[key] = push_item(item, registry, repository, tag, work)
    if registry.count_requests:
        registry.reset_requests()
    return seeded
