"""What eviction says when it is over budget and can remove nothing: the truth about why."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from config.settings import StorageSettings
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import BlobStore
from storage.index.metadata import Metadata
from storage.index.rows import RepositoryName
from storage.lifecycle.service import Lifecycle
from storage.oci.manifests import OCI_MANIFEST, parse_manifest


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def metadata(tmp_path):
    metadata = Metadata(tmp_path / "metadata.db")
    await metadata.open()
    yield metadata
    await metadata.close()


@pytest.fixture
def lifecycle(metadata, tmp_path) -> Lifecycle:
    store = BlobStore(FilesystemBackend(tmp_path / "store"))
    return Lifecycle(StorageSettings(max_size=100), metadata, store)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_over_budget_with_no_image_does_not_blame_pins(metadata, lifecycle, caplog):
    # Bytes no image references yet (a fill before its manifest, a load in progress).
    await metadata.record_blob(None, digest(b"layer"), 1000)
    report = await lifecycle.evict_to_budget()
    assert report.images == []
    [warning] = warnings(caplog)
    assert "pinned" not in warning
    assert "no image" in warning


async def test_over_budget_with_only_pinned_images_says_so(metadata, lifecycle, caplog):
    config = b"{}"
    document = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": 2},
    }
    data = json.dumps(document).encode()
    repository = RepositoryName("up.test", "team/app")
    await metadata.record_blob(repository, digest(config), 1000)
    await metadata.record_manifest(repository, digest(data), len(data), parse_manifest(data, OCI_MANIFEST),
                                   tag="1", pinned=True)
    report = await lifecycle.evict_to_budget()
    assert report.images == []
    [warning] = warnings(caplog)
    assert "1 image(s) left are pinned" in warning
