"""Fixtures of the tests that need no server; the shared ones are in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.backends.filesystem import FilesystemBackend
from storage.blobs import BlobStore
from tests.support.origins import Origin


@pytest.fixture
async def store(tmp_path: Path) -> BlobStore:
    """A blob store on the filesystem backend under ``tmp_path``."""
    blobs = BlobStore(FilesystemBackend(tmp_path))
    await blobs.start()
    return blobs


@pytest.fixture
async def origin(aiohttp_server) -> Origin:  # type: ignore[no-untyped-def]
    """A well-behaved HTTP origin on loopback (``tests.support.origins``), for the upstream transports."""
    origin = Origin()
    server = await aiohttp_server(origin.app())
    origin.url = server.make_url("")
    return origin
