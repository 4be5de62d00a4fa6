"""What a load keeps while it streams an archive is bounded, and the bounds act early.

A refused archive of 100,000 small members used to leave every member's
record behind until the end of the stream. These tests look at the structure:
the stream is refused at the limit, not read to its end, and nothing beyond the
limit was kept.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.archive.load import MAX_MEMBER_NAME, ArchiveLoader
from storage.archive.tar import BLOCK
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import BlobStore
from storage.errors import ArchiveInvalid


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class Source:
    """The archive in tar-block-sized chunks, counting how much of it was pulled."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pulled = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), BLOCK):
            self.pulled += BLOCK
            yield self.data[start : start + BLOCK]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[BlobStore]:
    store = BlobStore(FilesystemBackend(tmp_path / "data"))
    await store.start()
    yield store
    await store.close()


async def _refused(loader: ArchiveLoader, source: Source) -> tuple[str, int]:
    """The refusal's message, and how many spooled members the loader held when it refused."""
    try:
        with pytest.raises(ArchiveInvalid) as refused:
            await loader.read(source.chunks())
        return refused.value.message, len(list(loader.spool_dir.iterdir()))
    finally:
        await loader.close()


async def test_member_limit_refuses_while_streaming_and_keeps_nothing_beyond_it(store, tmp_path):
    source = Source(_tar({f"junk/{i}": b"x" for i in range(50)}))
    loader = ArchiveLoader(store, tmp_path / "tmp", max_members=10)
    message, spooled = await _refused(loader, source)
    assert "more than 10 members" in message
    assert spooled == 10
    assert source.pulled < len(source.data) // 2  # refused at the 11th header, not at the end


async def test_metadata_held_in_memory_is_bounded_in_total(store, tmp_path):
    source = Source(_tar({f"meta/{i}.json": b"{}" * 100 for i in range(50)}))
    loader = ArchiveLoader(store, tmp_path / "tmp", max_buffered=1000)
    message, _ = await _refused(loader, source)
    assert "add up to more than 1000 bytes" in message
    assert source.pulled < len(source.data) // 2


async def test_overlong_member_names_are_refused(store, tmp_path):
    source = Source(_tar({"a" * (MAX_MEMBER_NAME + 1): b"x", "index.json": b"{}"}))
    message, spooled = await _refused(ArchiveLoader(store, tmp_path / "tmp"), source)
    assert f"longer than {MAX_MEMBER_NAME}" in message
    assert spooled == 0
