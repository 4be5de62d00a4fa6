"""Raw pushes to a real registry over HTTP: small images, and OCI 1.1 artifacts with a ``subject``
recorded in the fallback tag ``sha256-<hex>`` as clients (oras, cosign, notation) do on a registry
without the referrers API."""

from __future__ import annotations

import hashlib
import json
from urllib.parse import urlsplit

from tests.support.registry import Registry, RegistryError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(registry: Registry, repository: str, data: bytes) -> str:
    digest = digest_of(data)
    started = registry.request("POST", f"/v2/{repository}/blobs/uploads/")
    if started.status != 202:
        raise RegistryError(f"upload start: {started.status} {started.body[:300]!r}")
    location = urlsplit(started.headers["Location"])
    target = f"{location.path}?{location.query}&digest={digest}" if location.query else \
        f"{location.path}?digest={digest}"
    done = registry.request("PUT", target, body=data, headers={"Content-Type": "application/octet-stream"})
    if done.status != 201:
        raise RegistryError(f"upload of {digest}: {done.status} {done.body[:300]!r}")
    return digest


def push_manifest(registry: Registry, repository: str, reference: str, media_type: str, data: bytes) -> str:
    resp = registry.request("PUT", f"/v2/{repository}/manifests/{reference}", body=data,
                            headers={"Content-Type": media_type})
    if resp.status != 201:
        raise RegistryError(f"manifest {repository}:{reference}: {resp.status} {resp.body[:300]!r}")
    return digest_of(data)


def push_image(registry: Registry, repository: str, tag: str, layer: bytes) -> tuple[str, bytes]:
    """A small OCI image (one layer); its digest and manifest bytes."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}},
                        sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": push_blob(registry, repository, config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": push_blob(registry, repository, layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    return push_manifest(registry, repository, tag, OCI_MANIFEST, manifest), manifest


def push_artifact(
    registry: Registry, repository: str, subject: tuple[str, bytes], artifact_type: str, payload: bytes,
    annotations: dict[str, str] | None = None, *, fallback_tag: bool = True,
) -> str:
    """An artifact whose ``subject`` is ``(digest, manifest bytes)``; with ``fallback_tag`` it is
    also added to the subject's fallback tag index."""
    subject_digest, subject_data = subject
    config = b"{}"
    doc: dict = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_CONFIG, "digest": push_blob(registry, repository, config), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": push_blob(registry, repository, payload),
                    "size": len(payload)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": len(subject_data)},
    }
    if annotations:
        doc["annotations"] = annotations
    data = json.dumps(doc, sort_keys=True).encode()
    digest = push_manifest(registry, repository, digest_of(data), OCI_MANIFEST, data)
    if fallback_tag:
        tag = subject_digest.replace(":", "-")
        current = registry.get_manifest(repository, tag)
        listed = json.loads(current.body)["manifests"] if current.status == 200 else []
        entry: dict = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data), "artifactType": artifact_type}
        if annotations:
            entry["annotations"] = annotations
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*listed, entry]}).encode()
        push_manifest(registry, repository, tag, OCI_INDEX, index)
    return digest
