"""The archive ``save`` writes: an OCI image layout that docker can load too.

One tar holds

- ``oci-layout`` and ``index.json``: the OCI image layout (skopeo ``oci-archive:``,
  containerd, podman). Each saved name is one ``index.json`` entry pointing at
  the manifest or index exactly as the upstream served it, with the names in
  ``io.containerd.image.name`` and ``org.opencontainers.image.ref.name``.
- ``manifest.json`` and ``repositories``: docker's own index (``docker load``,
  skopeo ``docker-archive:``), pointing at the same ``blobs/sha256/<hex>`` files,
  as docker 25 and later write it. Layers stay compressed: docker and skopeo
  decompress them on load, and the distribution digests survive.
- ``blobs/<algorithm>/<hex>``: every manifest, config and layer once, however
  many images share it.

The metadata files come first so that a streaming reader knows what to expect
before the blobs arrive. Every header is computed up front, so the archive's
exact size is known before the first byte goes out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from storage.archive.tar import END_OF_ARCHIVE, member_header, padding
from storage.oci.digest import Digest

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

BlobReader = Callable[[Digest], AsyncIterator[bytes]]


def blob_member(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


@dataclass(frozen=True, slots=True)
class DockerImage:
    """What docker's ``manifest.json`` needs of one image."""

    config: Digest
    layers: tuple[Digest, ...]


@dataclass(slots=True)
class SavedImage:
    """One name (or one untagged digest) in the archive."""

    descriptor: dict  # the index.json entry: mediaType, digest, size (annotations are added here)
    full_name: str | None  # as containerd names it: docker.io/library/busybox:latest
    docker_tag: str | None  # as docker's RepoTags name it: busybox:latest (tags only)
    docker: DockerImage | None  # the platform docker gets; None when there is nothing docker can load


@dataclass
class ArchivePlan:
    images: list[SavedImage] = field(default_factory=list)
    blobs: dict[Digest, int] = field(default_factory=dict)  # in first-use order, each once

    def add_blob(self, digest: Digest, size: int) -> None:
        self.blobs.setdefault(digest, size)

    # The metadata files ------------------------------------------------------------

    def index_json(self) -> bytes:
        manifests = []
        for image in self.images:
            entry = dict(image.descriptor)
            annotations = dict(entry.get("annotations") or {})
            if image.full_name:
                annotations[CONTAINERD_NAME] = image.full_name
                if "@" not in image.full_name:
                    annotations[REF_NAME] = image.full_name
            if annotations:
                entry["annotations"] = annotations
            manifests.append(entry)
        return _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})

    def manifest_json(self) -> bytes:
        # One entry per image, with all its tags, as docker writes it.
        entries: dict[DockerImage, list[str]] = {}
        for image in self.images:
            if image.docker is None:
                continue
            tags = entries.setdefault(image.docker, [])
            if image.docker_tag and image.docker_tag not in tags:
                tags.append(image.docker_tag)
        return _json(
            [
                {
                    "Config": blob_member(docker.config),
                    "RepoTags": tags or None,
                    "Layers": [blob_member(layer) for layer in docker.layers],
                }
                for docker, tags in entries.items()
            ]
        )

    def repositories_json(self) -> bytes:
        repositories: dict[str, dict[str, str]] = {}
        for image in self.images:
            if image.docker is None or not image.docker_tag or not image.docker.layers:
                continue
            name, _, tag = image.docker_tag.rpartition(":")
            repositories.setdefault(name, {})[tag] = image.docker.layers[-1].hex
        return _json(repositories)

    # The tar -----------------------------------------------------------------------

    def members(self) -> list[tuple[bytes, bytes | Digest | None, int]]:
        """(header, inline bytes or blob digest or None for a directory, data size) in archive order."""
        files = [
            ("oci-layout", OCI_LAYOUT),
            ("index.json", self.index_json()),
            ("manifest.json", self.manifest_json()),
            ("repositories", self.repositories_json()),
        ]
        out: list[tuple[bytes, bytes | Digest | None, int]] = [
            (member_header(name, len(data)), data, len(data)) for name, data in files
        ]
        out.append((member_header("blobs/", directory=True), None, 0))
        for algorithm in sorted({d.algorithm for d in self.blobs}):
            out.append((member_header(f"blobs/{algorithm}/", directory=True), None, 0))
        for digest, size in self.blobs.items():
            out.append((member_header(blob_member(digest), size), digest, size))
        return out

    def size(self) -> int:
        """The exact length of the uncompressed archive."""
        return sum(len(h) + size + len(padding(size)) for h, _, size in self.members()) + len(END_OF_ARCHIVE)


async def write_archive(plan: ArchivePlan, read_blob: BlobReader) -> AsyncIterator[bytes]:
    """The archive's bytes; blob bytes stream from the store, one chunk at a time."""
    for header, content, size in plan.members():
        yield header
        if isinstance(content, bytes):
            yield content
        elif isinstance(content, Digest):
            sent = 0
            async for chunk in read_blob(content):
                sent += len(chunk)
                if sent > size:
                    raise OSError(f"blob {content} grew beyond {size} bytes while being saved")
                yield chunk
            if sent != size:
                raise OSError(f"blob {content} ended after {sent} of {size} bytes while being saved")
        pad = padding(size)
        if pad:
            yield pad
    yield END_OF_ARCHIVE


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
