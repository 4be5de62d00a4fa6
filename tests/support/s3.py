"""What the S3 tests share: bucket keys, lease objects, replica storage settings, a verified pull."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import paths
from storage.oci.digest import Digest
from tests.support import skopeo
from tests.support.fake_upstream import digest_of
from tests.support.seed import SeededImage

# The multipart part size the tests give the backend: small, so a few MiB make several parts.
PART = 5 * 1024 * 1024


def leases(rgw: Any, bucket: str) -> list[str]:
    return rgw.keys(bucket, "leases/")


def blob_key(digest: str) -> str:
    return paths.blob_key(Digest.parse(digest))


def s3_storage(rgw: Any, bucket: str, **extra: object) -> dict[str, object]:
    return {"storage": {"backend": "s3", "s3": rgw.s3_settings(bucket, part_size=PART, **extra)}}


def pull(image: SeededImage, host: str, dest: Path) -> None:
    """Copy every platform's image to a ``dir:`` (it keeps Docker and OCI manifests byte for byte)."""
    skopeo.copy(image.docker_ref(host), f"dir:{dest}")
    assert digest_of((dest / "manifest.json").read_bytes()) == image.digest
