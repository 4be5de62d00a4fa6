"""BlobStore and BlobWriter on the filesystem backend: only verified bytes are ever committed."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from storage import paths
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import FLUSH_BYTES, INLINE_BYTES, BlobStore
from storage.errors import DigestMismatch, SizeMismatch, StoreFull
from storage.oci.digest import Digest
from tests.support.spool import digest_of, spool_files

BIG = os.urandom(3 * FLUSH_BYTES + 12345)  # several batches, through the worker thread


async def read_all(store: BlobStore, digest: Digest) -> bytes:
    return b"".join([chunk async for chunk in store.read(digest)])


async def test_a_verified_blob_is_committed_under_its_digest(store, tmp_path):
    digest = digest_of(BIG)
    writer = await store.writer(digest, len(BIG))
    for start in range(0, len(BIG), 100_000):
        await writer.write(BIG[start:start + 100_000])
    assert await writer.finish() == len(BIG)
    assert await store.stat(digest) == len(BIG)
    assert await read_all(store, digest) == BIG
    assert spool_files(tmp_path) == []


async def test_a_blob_of_unknown_size_is_committed_once_its_digest_matches(store):
    small = b"config"
    assert await store.put_stream(digest_of(small), _chunks([b"con", b"fig"])) == len(small)
    assert await store.read_small(digest_of(small)) == small


async def test_a_digest_mismatch_is_never_committed(store, tmp_path):
    digest = digest_of(BIG)
    wrong = BIG[:-1] + bytes([BIG[-1] ^ 0xFF])
    writer = await store.writer(digest, len(wrong))
    await writer.write(wrong)
    with pytest.raises(DigestMismatch):
        await writer.verify()
    assert writer.aborted and not writer.verified
    assert await store.stat(digest) is None
    assert spool_files(tmp_path) == []


async def test_more_bytes_than_expected_are_refused_at_once(store, tmp_path):
    writer = await store.writer(digest_of(b"abc"), 2)
    with pytest.raises(SizeMismatch):
        await writer.write(b"abc")
    await writer.abort()
    assert spool_files(tmp_path) == []


async def test_fewer_bytes_than_expected_fail_verification(store, tmp_path):
    digest = digest_of(b"abc")
    writer = await store.writer(digest, 4)
    await writer.write(b"abc")
    with pytest.raises(SizeMismatch):
        await writer.verify()
    assert await store.stat(digest) is None
    assert spool_files(tmp_path) == []


async def test_commit_before_verify_is_refused(store):
    writer = await store.writer(digest_of(b"abc"), 3)
    await writer.write(b"abc")
    with pytest.raises(RuntimeError):
        await writer.commit()
    await writer.abort()


async def test_abort_leaves_nothing_behind(store, tmp_path):
    digest = digest_of(BIG)
    writer = await store.writer(digest, len(BIG))
    await writer.write(BIG[: 2 * FLUSH_BYTES])  # a batch may still be in the thread
    await writer.abort()
    assert writer.aborted
    assert await store.stat(digest) is None
    assert spool_files(tmp_path) == []


async def test_verified_bytes_are_readable_from_the_spool_before_the_commit(store):
    digest = digest_of(BIG)
    writer = await store.writer(digest, len(BIG))
    await writer.write(BIG)
    await writer.verify()
    assert writer.flushed == len(BIG)
    assert writer.spool_path.read_bytes() == BIG
    assert await store.stat(digest) is None  # not visible before the commit
    await writer.commit()
    assert await store.stat(digest) == len(BIG)


async def test_a_spool_reader_wakes_when_bytes_land_and_when_the_blob_is_verified(store):
    digest = digest_of(BIG)
    writer = await store.writer(digest, len(BIG))
    seen: list[tuple[int, bool]] = []

    async def reader() -> None:
        while not writer.verified:
            await writer.moved()
            seen.append((writer.flushed, writer.verified))

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)  # the reader is waiting before any byte lands
    await writer.write(BIG)
    await writer.finish()
    await asyncio.wait_for(task, 10)
    assert seen[0][0] > 0, "woken by landed bytes"
    assert seen[-1] == (len(BIG), True)
    assert [flushed for flushed, _ in seen] == sorted(flushed for flushed, _ in seen)


async def test_a_batch_the_thread_finished_before_the_writer_looked_counts_as_landed_at_verify(store, monkeypatch):
    """A big first read goes to the thread; the next, small, one comes after the thread is
    done but before the loop ran the batch's done callback. Verified, the spool must say it
    holds every byte: a follower sent the blob's size would otherwise find it short."""
    blob = BIG[:INLINE_BYTES * 3] + b"tail"
    head, tail = blob[:-4], blob[-4:]
    digest = digest_of(blob)
    writer = await store.writer(digest, len(blob))
    handed: list[asyncio.Future[None]] = []
    run_in_executor = asyncio.get_running_loop().run_in_executor

    def watched(*args):  # type: ignore[no-untyped-def]
        future = run_in_executor(*args)
        handed.append(future)
        return future

    monkeypatch.setattr(asyncio.get_running_loop(), "run_in_executor", watched)
    await writer.write(head)  # the first batch goes out at once, to the thread (bigger than INLINE_BYTES)
    assert len(handed) == 1
    while not handed[0].done():  # the task sees it done; its done callbacks are still queued
        await asyncio.sleep(0)
    await writer.write(tail)
    assert await writer.verify() == len(blob)
    assert writer.progress.available() == (len(blob), True)
    assert writer.flushed == len(blob)
    await writer.commit()
    assert await read_all(store, digest) == blob


async def test_a_spool_reader_wakes_when_the_writer_aborts(store):
    writer = await store.writer(digest_of(b"abc"), 3)
    waiting = asyncio.create_task(writer.moved())
    await asyncio.sleep(0)
    await writer.abort()
    await asyncio.wait_for(waiting, 10)
    assert writer.aborted and writer.flushed == 0


async def _chunks(parts: list[bytes]):  # type: ignore[no-untyped-def]
    for part in parts:
        yield part


async def test_a_small_blob_is_reserved_and_written_on_the_loop_and_committed_in_one_thread_job(store, monkeypatch):
    jobs: list[str] = []
    to_thread = asyncio.to_thread

    async def counted(function, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        jobs.append(function.__name__)
        return await to_thread(function, *args, **kwargs)

    from storage.backends import filesystem

    run = filesystem._COMMITS.run

    async def committed(function):  # type: ignore[no-untyped-def]
        jobs.append(function.__name__)
        return await run(function)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    monkeypatch.setattr(filesystem._COMMITS, "run", committed)
    small = os.urandom(48 * 1024)
    writer = await store.writer(digest_of(small), len(small))
    await writer.write(small[:1000])
    await writer.write(small[1000:])
    assert await writer.finish() == len(small)
    assert jobs == ["_commit_sync"]
    assert await read_all(store, digest_of(small)) == small
    # A big one's reservation goes to a thread: posix_fallocate may write every block.
    jobs.clear()
    writer = await store.writer(digest_of(BIG), len(BIG))
    assert jobs == ["_reserve_sync"]
    await writer.abort()


async def test_a_small_reservation_the_filesystem_refuses_is_store_full(store, monkeypatch):
    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    full: list[bool] = []
    store.on_full = lambda: full.append(True)
    monkeypatch.setattr(os, "posix_fallocate", refuse)
    with pytest.raises(StoreFull):
        await store.writer(digest_of(b"x" * 100), 100)
    assert full == [True]


def _watch_dirs(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """The directories made, and those fsynced, from here on: (made, synced)."""
    from storage.backends import filesystem

    synced: list[str] = []
    made: list[str] = []
    fsync_dir, mkdir = filesystem._fsync_dir, os.mkdir
    monkeypatch.setattr(filesystem, "_fsync_dir", lambda path: (synced.append(path), fsync_dir(path))[1])
    monkeypatch.setattr(os, "mkdir", lambda path, *a: (made.append(str(path)), mkdir(path, *a))[1])
    return made, synced


async def test_a_new_store_has_every_prefix_directory_so_a_commit_syncs_only_its_own(store, tmp_path, monkeypatch):
    algorithm = tmp_path / paths.BLOBS / "sha256"
    assert sorted(p.name for p in algorithm.iterdir()) == [f"{i:02x}" for i in range(256)]
    made, synced = _watch_dirs(monkeypatch)
    first = os.urandom(1000)
    await store.put(digest_of(first), first)
    assert made == [] and synced == [os.path.dirname(paths.blob_path(tmp_path, digest_of(first)))]
    assert await read_all(store, digest_of(first)) == first
    synced.clear()
    await FilesystemBackend(tmp_path).start()  # a store that has them: nothing synced
    assert synced == []


async def test_a_missing_prefix_directory_is_made_durable_by_the_commit(store, tmp_path, monkeypatch):
    algorithm = tmp_path / paths.BLOBS / "sha256"
    shutil.rmtree(algorithm)  # removed behind the running store's back
    made, synced = _watch_dirs(monkeypatch)
    first = os.urandom(1000)
    await store.put(digest_of(first), first)
    prefix = os.path.dirname(paths.blob_path(tmp_path, digest_of(first)))
    assert made == [str(algorithm), prefix]
    assert synced == [str(tmp_path / paths.BLOBS), str(algorithm), prefix]
    assert await read_all(store, digest_of(first)) == first


# ------------------------------------------------------------ small blobs gathered in memory


async def test_a_buffered_blob_is_written_and_committed_in_one_thread_job(store, tmp_path, monkeypatch):
    from storage.backends import filesystem

    jobs: list[str] = []
    run = filesystem._COMMITS.run

    async def counted(function):  # type: ignore[no-untyped-def]
        jobs.append(getattr(function, "func", function).__name__)
        return await run(function)

    monkeypatch.setattr(filesystem._COMMITS, "run", counted)
    small = os.urandom(48 * 1024)
    blob = store.buffer(digest_of(small), len(small))
    blob.write(small[:1000])
    blob.write(small[1000:])
    assert spool_files(tmp_path) == [], "nothing is written before the commit"
    assert blob.verify() == small
    assert await blob.commit() == len(small)
    assert jobs == ["_put_sync"]
    assert await read_all(store, digest_of(small)) == small
    assert spool_files(tmp_path) == []


async def test_a_buffered_blob_with_wrong_bytes_or_size_is_refused_and_never_stored(store, tmp_path):
    small = os.urandom(1000)
    digest = digest_of(small)
    blob = store.buffer(digest, len(small))
    with pytest.raises(SizeMismatch):
        blob.write(small + b"x")
    with pytest.raises(RuntimeError):
        await blob.commit()  # before verify
    short = store.buffer(digest, len(small))
    short.write(small[:-1])
    with pytest.raises(SizeMismatch):
        short.verify()
    wrong = store.buffer(digest, len(small))
    wrong.write(small[:-1] + bytes([small[-1] ^ 0xFF]))
    with pytest.raises(DigestMismatch):
        wrong.verify()
    assert await store.stat(digest) is None
    assert spool_files(tmp_path) == []


async def test_a_buffered_blob_the_filesystem_has_no_room_for_is_store_full_and_leaves_nothing(
        store, tmp_path, monkeypatch):
    def refuse(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    full: list[bool] = []
    store.on_full = lambda: full.append(True)
    monkeypatch.setattr(os, "write", refuse)
    small = os.urandom(1000)
    with pytest.raises(StoreFull):
        await store.put(digest_of(small), small)
    monkeypatch.undo()
    assert full == [True]
    assert await store.stat(digest_of(small)) is None
    assert spool_files(tmp_path) == []
