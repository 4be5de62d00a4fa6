"""Where things live under the data directory (filesystem backend).

::

    <root>/
      blobs/<algorithm>/<first two hex>/<hex>   immutable blob files: layers,
                                                configs and manifests alike,
                                                written once under their digest
      tmp/<uuid>                                fills in progress; never read
                                                under a digest name, removed at
                                                startup
      metadata.db (+ -wal, -shm)                SQLite: names, links, times

A blob path is derived only from a parsed ``Digest`` (fixed alphabet, fixed
length), so no request can name a path outside the tree.
"""

from __future__ import annotations

from pathlib import Path

from storage.errors import DigestInvalid
from storage.oci.digest import Digest

BLOBS = "blobs"
TMP = "tmp"
METADATA = "metadata.db"


def blob_path(root: Path, digest: Digest) -> Path:
    return root / BLOBS / digest.algorithm / digest.hex[:2] / digest.hex


def blob_key(digest: Digest) -> str:
    """The same layout as an object-store key."""
    return f"{BLOBS}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def digest_from_path(relative: str) -> Digest | None:
    """Inverse of ``blob_key`` for listing; None for anything that is not a blob."""
    parts = relative.split("/")
    if len(parts) != 4 or parts[0] != BLOBS or parts[3][:2] != parts[2]:
        return None
    try:
        return Digest.parse(f"{parts[1]}:{parts[3]}")
    except DigestInvalid:
        return None


def tmp_dir(root: Path) -> Path:
    return root / TMP


def metadata_path(root: Path) -> Path:
    return root / METADATA
