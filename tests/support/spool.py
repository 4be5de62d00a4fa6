"""What a blob store on the filesystem backend holds, for tests of writers and fills."""

from __future__ import annotations

import hashlib
from pathlib import Path

from storage import paths
from storage.oci.digest import Digest


def digest_of(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


def spool_files(root: Path) -> list[Path]:
    """Spool files left under a store's root: none once every writer has committed or aborted."""
    return list(paths.tmp_dir(root).iterdir())
