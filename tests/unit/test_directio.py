"""A big blob's spool written and read around the page cache (storage.directio).

The store's tests run on the test machine's filesystem under ``tmp_path`` (ext4
in CI), which has direct I/O: a test here that finds none fails rather than
passing on the buffered path.
"""

from __future__ import annotations

import os
import queue
import random
from pathlib import Path

import pytest

from storage import directio
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import BlobStore
from tests.support.pagecache import cached_fraction
from tests.support.spool import digest_of, spool_files

MIB = 1024 * 1024


def body_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


class Full:
    """A body whose every read fills the buffer, as an upstream answer's do."""

    def __init__(self, body: bytes, largest: int | None = None) -> None:
        self._body = memoryview(body)
        self._at = 0
        self._largest = largest

    def readinto(self, buffer: memoryview) -> int:
        count = min(len(buffer), len(self._body) - self._at, self._largest or len(buffer))
        buffer[:count] = self._body[self._at:self._at + count]
        self._at += count
        return count

    def interrupt(self) -> None:
        pass


def aligned_copy(data: bytes) -> memoryview:
    view = directio.buffer(len(data))
    view[:] = data
    return view


def test_only_a_writable_aligned_buffer_at_an_aligned_offset_qualifies() -> None:
    view = aligned_copy(b"x" * 8192)
    assert directio.aligned(view, 0)
    assert directio.aligned(view[4096:], 4096)
    assert not directio.aligned(view, 512)  # the offset
    assert not directio.aligned(view[1:4097], 0)  # the address
    assert not directio.aligned(view[:4000], 0)  # the length
    assert not directio.aligned(bytes(view), 0)  # immutable
    assert not directio.aligned(view[:0], 0)


@pytest.mark.parametrize(("position", "count"), [(0, 10), (1, MIB), (4095, 2), (4096, 4096), (MIB - 1, MIB + 7),
                                                 (3 * MIB, 10_000), (3 * MIB + 4, 1)])
def test_a_direct_read_gives_exactly_the_bytes_asked_for_at_any_offset(tmp_path: Path, position: int,
                                                                      count: int) -> None:
    body = body_of(3 * MIB + 5)
    (tmp_path / "blob").write_bytes(body)
    fd = directio.open_direct(str(tmp_path / "blob"), os.O_RDONLY)
    assert fd is not None, "the test filesystem has no direct I/O"
    try:
        into = directio.buffer(2 * MIB + 2 * directio.ALIGN)
        assert bytes(directio.pread(fd, into, position, count)) == body[position:position + count]
        assert bytes(directio.pread(fd, into, len(body), 100)) == b""
    finally:
        os.close(fd)


async def test_aligned_batches_go_around_the_page_cache_and_the_rest_through_it(tmp_path: Path) -> None:
    backend = FilesystemBackend(tmp_path, direct_io=True)
    await backend.start()
    body = body_of(MIB + 64 * 1024 + 3000)
    digest = digest_of(body)
    upload = await backend.begin(digest)
    upload.write_sync(aligned_copy(body[:64 * 1024]))
    assert upload.direct
    upload.write_sync(aligned_copy(body[64 * 1024:MIB + 64 * 1024]))
    upload.write_sync(body[MIB + 64 * 1024:MIB + 64 * 1024 + 1000])  # bytes: through the page cache
    upload.write_sync(aligned_copy(body[MIB + 64 * 1024 + 1000:]))  # an unaligned offset: the same
    assert upload.spool_path.read_bytes() == body
    await upload.commit()
    assert (await backend.read_small(digest)) == body


@pytest.mark.parametrize("why", ["turned-off", "filesystem-refuses"])
async def test_without_direct_io_every_byte_goes_through_the_page_cache(tmp_path: Path, monkeypatch, why: str):
    if why == "filesystem-refuses":
        monkeypatch.setattr(directio, "open_direct", lambda path, flags: None)
    backend = FilesystemBackend(tmp_path, direct_io=why != "turned-off")
    await backend.start()
    body = body_of(2 * MIB)
    upload = await backend.begin(digest_of(body))
    upload.write_sync(aligned_copy(body[:MIB]))
    upload.write_sync(aligned_copy(body[MIB:]))
    assert not upload.direct
    assert upload.spool_path.read_bytes() == body
    await upload.abort()


@pytest.mark.parametrize("largest", [None, 50_000], ids=["full-reads", "short-reads"])
async def test_a_pumped_blob_is_spooled_around_the_page_cache_and_committed_whole(tmp_path: Path,
                                                                                  largest: int | None) -> None:
    store = BlobStore(FilesystemBackend(tmp_path, direct_io=True))
    await store.start()
    body = body_of(5 * MIB + 77)
    digest = digest_of(body)
    writer = await store.writer(digest, len(body))
    await writer.pump(Full(body, largest))
    # Full reads fill aligned buffers, so every batch but the last is written directly;
    # short ones leave every batch at an unaligned offset, all through the page cache.
    assert writer.direct == (largest is None)
    await writer.finish()
    assert spool_files(tmp_path) == []
    assert Path(str(store.local_path(digest))).read_bytes() == body


def test_a_file_written_around_the_page_cache_is_read_into_it_ahead(tmp_path: Path) -> None:
    body = body_of(16 * MIB)
    path = tmp_path / "blob"
    fd = directio.open_direct(str(path), os.O_WRONLY | os.O_CREAT)
    assert fd is not None, "the test filesystem has no direct I/O"
    try:
        for start in range(0, len(body), MIB):
            os.pwrite(fd, aligned_copy(body[start:start + MIB]), start)
    finally:
        os.close(fd)
    assert cached_fraction(path) == 0  # direct writes left nothing in the cache
    reader = os.open(path, os.O_RDONLY)
    directio.read_ahead(reader)
    assert cached_fraction(path) == 1
    with pytest.raises(OSError):
        os.fstat(reader)  # closed once done
    assert path.read_bytes() == body


def test_a_blob_past_the_read_ahead_queue_is_left_to_its_first_reader(tmp_path: Path, monkeypatch) -> None:
    # The queue holds an open descriptor per blob: a burst of fills must not pile them up.
    waiting: queue.Queue[int] = queue.Queue(maxsize=1)
    waiting.put_nowait(os.open(tmp_path, os.O_RDONLY))
    monkeypatch.setattr(directio, "_pending", waiting)
    monkeypatch.setattr(directio, "_reader", object())  # a reader thread, busy with another blob
    (tmp_path / "blob").write_bytes(b"x" * 4096)
    fd = os.open(tmp_path / "blob", os.O_RDONLY)
    directio.read_ahead_later(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed, not queued
    assert waiting.qsize() == 1
    os.close(waiting.get_nowait())
