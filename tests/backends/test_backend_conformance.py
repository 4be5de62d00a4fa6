"""One conformance suite for every blob backend (the contract in storage/backends/base.py).

In the manner of distribution's ``registry/storage/driver/testsuites``: the same test functions
run against each backend the ``backend`` fixture yields, started on an empty store and closed
afterwards: the filesystem backend on ``tmp_path`` and the S3 backend on a fresh bucket of the
session's real Ceph RGW. The last section runs ``storage.blobs.BlobStore`` (hash, verify, commit)
over both, so the store layer is proven on each backend too.

Where a backend may leave something behind (a spool file, an incomplete multipart upload) the
fixture's ``leftovers()`` lists it, so "abort forgets everything" is checked on the store itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.settings import S3Settings
from storage import paths
from storage.backends.base import BlobBackend, Upload
from storage.backends.filesystem import FilesystemBackend
from storage.backends.s3 import S3Backend
from storage.blobs import BlobStore
from storage.errors import BlobUnknown, DigestMismatch, RegcacheError, SizeMismatch, StoreUnavailable
from storage.oci.digest import Digest

PART = 5 * 1024 * 1024  # the smallest part S3 allows: BIG takes three parts on the S3 backend
SMALL = os.urandom(70_000)
BIG = os.urandom(2 * PART + 12345)
EMPTY = b""


@dataclass
class Subject:
    """A started backend plus a look at its store from outside (what an abort may leave behind)."""

    backend: BlobBackend
    leftovers: Callable[[], list[str]]
    vanish: Callable[[], None]  # take the store itself away (the directory tree, the bucket)
    opens_bodies: bool = False  # open_body gives a blocking body (else always None)


def _files(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.iterdir()) if directory.exists() else []


def _filesystem(tmp_path: Path) -> Subject:
    root = tmp_path / "store"
    return Subject(
        FilesystemBackend(root),
        leftovers=lambda: _files(paths.tmp_dir(root)),
        vanish=lambda: shutil.rmtree(root),
    )


def _s3(rgw: Any, tmp_path: Path, direct: bool, part_uploads: str) -> Subject:
    bucket = rgw.make_bucket()
    settings = S3Settings(**rgw.s3_settings(bucket, part_size=PART, part_uploads=part_uploads))
    backend = S3Backend(settings, tmp_path / "data", direct=direct)

    def leftovers() -> list[str]:
        uploads = rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return [f"multipart {u['Key']}" for u in uploads] + _files(backend.spool_dir)

    def vanish() -> None:
        client = rgw.client()
        for key in rgw.keys(bucket):
            client.delete_object(Bucket=bucket, Key=key)
        client.delete_bucket(Bucket=bucket)

    return Subject(backend, leftovers=leftovers, vanish=vanish, opens_bodies=direct)


# "s3": blob bodies on threads past aiobotocore (storage.backends.s3.transfer), parts sent while
# the fill runs, as to a store on another host; "s3-after-fill": parts sent at commit, as to a store
# on this host; "s3-botocore": every request through aiobotocore, as when a proxy applies.
@pytest.fixture(params=["filesystem", "s3", "s3-after-fill", "s3-botocore"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    if request.param == "filesystem":
        made = _filesystem(tmp_path)
    else:
        rgw = request.getfixturevalue("rgw")
        after = request.param == "s3-after-fill"
        made = _s3(rgw, tmp_path, request.param != "s3-botocore", "after_fill" if after else "during_fill")
    await made.backend.start()
    try:
        yield made
    finally:
        await made.backend.close()


@pytest.fixture
def backend(subject: Subject) -> BlobBackend:
    return subject.backend


# --------------------------------------------------------------------------- helpers


def digest_of(data: bytes) -> Digest:
    return Digest.of(data)


async def write(upload: Upload, data: bytes) -> None:
    """Bytes in 1 MiB writes from a worker thread, as BlobWriter hands them over."""
    step = 1024 * 1024
    for start in range(0, len(data), step):
        await asyncio.to_thread(upload.write_sync, data[start : start + step])


async def committed(backend: BlobBackend, data: bytes) -> Digest:
    digest = digest_of(data)
    upload = await backend.begin(digest)
    await write(upload, data)
    await upload.commit()
    return digest


async def read_all(backend: BlobBackend, digest: Digest, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in backend.read(digest, offset, length)])


async def listed(backend: BlobBackend) -> dict[Digest, int]:
    out: dict[Digest, int] = {}
    async for digest, size in backend.list():
        assert digest not in out, f"{digest} listed twice"
        out[digest] = size
    return out


async def assert_absent(backend: BlobBackend, digest: Digest) -> None:
    assert await backend.stat(digest) is None
    with pytest.raises(BlobUnknown):
        await read_all(backend, digest)
    with pytest.raises(BlobUnknown):
        await backend.read_small(digest)
    assert digest not in await listed(backend)


# --------------------------------------------------------------------------- stat and read


async def test_stat_of_a_missing_digest_is_none(backend):
    assert await backend.stat(digest_of(b"never written")) is None


async def test_reading_a_missing_digest_raises_blob_unknown(backend):
    digest = digest_of(b"never written")
    with pytest.raises(BlobUnknown):
        await read_all(backend, digest)
    with pytest.raises(BlobUnknown):
        await backend.read_small(digest)


async def test_an_empty_store_lists_nothing(backend):
    assert await listed(backend) == {}


async def read_body(backend: BlobBackend, digest: Digest, stop_after: int | None = None) -> bytes | None:
    """The blob through ``open_body``, read as a sending thread reads it; None when it opens none."""
    body = await backend.open_body(digest)
    if body is None:
        return None
    out = bytearray()
    try:
        buffer = memoryview(bytearray(1024 * 1024))
        while stop_after is None or len(out) < stop_after:
            got = await asyncio.to_thread(body.readinto, buffer)
            if not got:
                break
            out += buffer[:got]
    finally:
        body.close()
    if stop_after is None:
        assert body.size == len(out)
    return bytes(out)


async def test_an_opened_body_is_the_whole_blob(subject):
    digest = await committed(subject.backend, BIG)
    found = await read_body(subject.backend, digest)
    assert (found is not None) == subject.opens_bodies
    assert found in (None, BIG)


async def test_a_body_left_half_read_does_not_spoil_the_next_one(subject):
    # Its connection must not go back to the pool with the rest of the body still unread.
    if not subject.opens_bodies:
        pytest.skip("this backend opens no bodies")
    digest = await committed(subject.backend, BIG)
    assert await read_body(subject.backend, digest, stop_after=1) is not None
    assert await read_body(subject.backend, digest) == BIG
    assert await read_body(subject.backend, await committed(subject.backend, SMALL)) == SMALL


async def test_opening_the_body_of_a_missing_blob_raises_blob_unknown(subject):
    if not subject.opens_bodies:
        pytest.skip("this backend opens no bodies")
    with pytest.raises(BlobUnknown):
        await subject.backend.open_body(digest_of(b"never written"))


# --------------------------------------------------------------------------- upload and commit


@pytest.mark.parametrize("data", [SMALL, BIG, EMPTY], ids=["small", "multipart", "empty"])
async def test_nothing_is_readable_before_commit_and_exactly_the_bytes_are_after(backend, data):
    digest = digest_of(data)
    upload = await backend.begin(digest)
    await write(upload, data)
    await assert_absent(backend, digest)
    await upload.commit()
    assert await backend.stat(digest) == len(data)
    assert await read_all(backend, digest) == data
    assert await backend.read_small(digest) == data
    assert (await listed(backend))[digest] == len(data)


async def test_read_with_offset_and_length_returns_that_slice(backend):
    digest = await committed(backend, SMALL)
    assert await read_all(backend, digest, 1000, 5000) == SMALL[1000:6000]
    assert await read_all(backend, digest, 1000) == SMALL[1000:]
    assert await read_all(backend, digest, 0, 1) == SMALL[:1]
    assert await read_all(backend, digest, len(SMALL) - 1) == SMALL[-1:]
    assert await read_all(backend, digest, 5, 0) == b""


async def test_a_range_across_multipart_parts_returns_that_slice(backend):
    digest = await committed(backend, BIG)
    assert await read_all(backend, digest, PART - 10, PART + 20) == BIG[PART - 10 : 2 * PART + 10]


async def test_read_from_the_end_of_a_blob_yields_nothing(backend, request):
    if backend.name == "s3":  # every S3 variant
        # Known difference: the S3 backend sends "Range: bytes=<size>-", RGW answers 416 InvalidRange
        # and that becomes StoreUnavailable although the store is fine. No caller reads at the end today.
        request.applymarker(pytest.mark.xfail(raises=StoreUnavailable, strict=True, reason="416 at offset == size"))
    digest = await committed(backend, SMALL)
    assert await read_all(backend, digest, len(SMALL)) == b""


async def test_a_second_upload_of_a_committed_digest_leaves_one_blob_with_the_right_bytes(backend):
    digest = await committed(backend, SMALL)
    assert await committed(backend, SMALL) == digest
    assert await backend.stat(digest) == len(SMALL)
    assert await read_all(backend, digest) == SMALL
    assert await listed(backend) == {digest: len(SMALL)}


async def test_two_uploads_of_one_digest_in_flight_both_commit_to_one_blob(backend):
    digest = digest_of(SMALL)
    first, second = await backend.begin(digest), await backend.begin(digest)
    assert first.spool_path != second.spool_path
    await write(first, SMALL)
    await write(second, SMALL)
    await first.commit()
    await second.commit()
    assert await listed(backend) == {digest: len(SMALL)}
    assert await read_all(backend, digest) == SMALL


async def test_commit_leaves_no_spool_file_or_pending_upload_behind(subject):
    await committed(subject.backend, SMALL)
    await committed(subject.backend, BIG)
    assert subject.leftovers() == []


@pytest.mark.parametrize("data", [SMALL, EMPTY], ids=["small", "empty"])
async def test_a_whole_blob_put_at_once_is_exactly_the_bytes_and_leaves_nothing_behind(subject, data):
    digest = digest_of(data)
    await subject.backend.put(digest, data)
    assert await subject.backend.stat(digest) == len(data)
    assert await read_all(subject.backend, digest) == data
    await subject.backend.put(digest, data)  # again: still one blob
    assert await listed(subject.backend) == {digest: len(data)}
    assert subject.leftovers() == []


# --------------------------------------------------------------------------- abort


@pytest.mark.parametrize("data", [SMALL, BIG], ids=["small", "multipart"])
async def test_abort_forgets_everything_written(subject, data):
    digest = digest_of(data)
    upload = await subject.backend.begin(digest)
    await write(upload, data)
    await upload.abort()
    await assert_absent(subject.backend, digest)
    assert not upload.spool_path.exists()
    assert subject.leftovers() == []


async def test_abort_is_idempotent(subject):
    upload = await subject.backend.begin(digest_of(SMALL))
    await write(upload, SMALL)
    await upload.abort()
    await upload.abort()
    assert subject.leftovers() == []


async def test_abort_of_an_upload_with_no_bytes_leaves_nothing(subject):
    upload = await subject.backend.begin(digest_of(SMALL))
    await upload.abort()
    assert subject.leftovers() == []


async def test_an_aborted_upload_does_not_disturb_the_committed_blob_of_its_digest(backend):
    digest = await committed(backend, SMALL)
    upload = await backend.begin(digest)
    await write(upload, SMALL[:100])
    await upload.abort()
    assert await read_all(backend, digest) == SMALL


# --------------------------------------------------------------------------- delete and list


async def test_delete_returns_true_then_false(backend):
    digest = await committed(backend, SMALL)
    assert await backend.delete(digest) is True
    assert await backend.delete(digest) is False
    await assert_absent(backend, digest)


async def test_delete_of_a_never_written_digest_is_false(backend):
    assert await backend.delete(digest_of(b"never written")) is False


async def test_a_deleted_digest_can_be_committed_again(backend):
    digest = await committed(backend, SMALL)
    await backend.delete(digest)
    await committed(backend, SMALL)
    assert await read_all(backend, digest) == SMALL


async def test_list_yields_every_committed_blob_with_its_size_and_nothing_uncommitted(backend):
    blobs = [os.urandom(n) for n in (1, 10, 1000, 100_000)]
    for data in blobs:
        await committed(backend, data)
    pending = await backend.begin(digest_of(b"in flight"))
    await write(pending, b"in flight")
    aborted = await backend.begin(digest_of(b"aborted"))
    await write(aborted, b"aborted")
    await aborted.abort()
    try:
        assert await listed(backend) == {digest_of(data): len(data) for data in blobs}
    finally:
        await pending.abort()


# --------------------------------------------------------------------------- spool file


async def test_the_spool_file_holds_the_bytes_written_so_far(backend):
    upload = await backend.begin(digest_of(SMALL))
    try:
        upload.write_sync(SMALL[:1000])
        assert upload.spool_path.read_bytes() == SMALL[:1000]
        upload.write_sync(SMALL[1000:])
        assert upload.spool_path.read_bytes() == SMALL
    finally:
        await upload.abort()


async def test_a_follower_that_opened_the_spool_file_reads_every_byte_across_the_commit(backend):
    digest = digest_of(BIG)
    upload = await backend.begin(digest)
    await write(upload, BIG[:PART])
    with open(upload.spool_path, "rb") as follower:
        assert follower.read() == BIG[:PART]
        await write(upload, BIG[PART:])
        await upload.commit()
        assert follower.read() == BIG[PART:]


async def test_a_follower_keeps_the_bytes_read_so_far_when_the_upload_is_aborted(backend):
    upload = await backend.begin(digest_of(SMALL))
    upload.write_sync(SMALL)
    with open(upload.spool_path, "rb") as follower:
        await upload.abort()
        assert follower.read() == SMALL


async def test_every_upload_gets_its_own_spool_file(backend):
    uploads = [await backend.begin(digest_of(SMALL)) for _ in range(3)]
    try:
        assert len({u.spool_path for u in uploads}) == 3
    finally:
        for upload in uploads:
            await upload.abort()


# --------------------------------------------------------------------------- commit times


async def stat_with_time(backend: BlobBackend, digest: Digest) -> tuple[int, float] | None:
    try:
        return await backend.stat_with_time(digest)
    except NotImplementedError:
        pytest.skip(f"{backend.name}: stat_with_time is optional (base.py raises NotImplementedError)")


async def list_with_times(backend: BlobBackend) -> dict[Digest, tuple[int, float]]:
    try:
        return {digest: (size, when) async for digest, size, when in backend.list_with_times()}
    except NotImplementedError:
        pytest.skip(f"{backend.name}: list_with_times is optional (base.py raises NotImplementedError)")


async def test_stat_with_time_of_a_missing_digest_is_none(backend):
    assert await stat_with_time(backend, digest_of(b"never written")) is None


async def test_commit_time_is_on_the_stores_clock_between_before_and_after_the_commit(backend):
    before = await backend.now()
    digest = await committed(backend, SMALL)
    after = await backend.now()
    found = await stat_with_time(backend, digest)
    assert found is not None
    size, when = found
    assert size == len(SMALL)
    # The store's clock may come in whole seconds (an HTTP Date header): one second either side.
    assert before - 1 <= when <= after + 1


async def test_list_with_times_agrees_with_list_and_stat_with_time(backend):
    small, big = await committed(backend, SMALL), await committed(backend, BIG)
    pending = await backend.begin(digest_of(b"in flight"))
    pending.write_sync(b"in flight")
    try:
        with_times = await list_with_times(backend)
    finally:
        await pending.abort()
    assert {digest: size for digest, (size, _) in with_times.items()} == await listed(backend)
    assert set(with_times) == {small, big}
    for digest in (small, big):
        found = await stat_with_time(backend, digest)
        assert found is not None
        size, when = with_times[digest]
        # The same commit time; a listing may carry milliseconds where a HEAD's Last-Modified has none.
        assert (size, int(when)) == (found[0], int(found[1]))


# --------------------------------------------------------------------------- leases


async def test_a_fill_lease_is_granted_on_a_store_nobody_else_uses_and_release_is_idempotent(backend):
    digest = digest_of(SMALL)
    lease = await backend.acquire_fill_lease(digest)
    assert lease is not None
    await lease.release()
    await lease.release()
    again = await backend.acquire_fill_lease(digest)
    assert again is not None
    await again.release()


async def test_a_sweep_lease_is_granted_on_a_store_nobody_else_uses_and_release_is_idempotent(backend):
    lease = await backend.acquire_sweep_lease()
    assert lease is not None
    await lease.release()
    await lease.release()
    again = await backend.acquire_sweep_lease()
    assert again is not None
    await again.release()


async def test_wait_for_a_committed_blob_returns_its_size(backend):
    digest = await committed(backend, SMALL)
    assert await backend.wait_for(digest) == len(SMALL)


async def test_wait_for_a_blob_nobody_fills_returns_none(backend):
    assert await backend.wait_for(digest_of(b"never written")) is None


# --------------------------------------------------------------------------- errors


async def test_a_store_that_vanished_fails_with_regcache_errors_only(subject):
    """Whatever each call does on a store taken away under it, it raises no library's exception."""
    backend = subject.backend
    digest = await committed(backend, SMALL)
    subject.vanish()

    async def upload_and_commit() -> None:
        upload = await backend.begin(digest_of(b"after"))
        try:
            upload.write_sync(b"after")
            await upload.commit()
        finally:
            await upload.abort()

    calls: dict[str, Callable[[], Any]] = {
        "stat": lambda: backend.stat(digest),
        "read": lambda: read_all(backend, digest),
        "read_small": lambda: backend.read_small(digest),
        "list": lambda: listed(backend),
        "delete": lambda: backend.delete(digest),
        "begin/commit": upload_and_commit,
    }
    foreign = {}
    for name, call in calls.items():
        try:
            await call()
        except RegcacheError:
            pass
        except Exception as exc:  # the finding is which type leaked
            foreign[name] = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    assert foreign == {}
    assert await backend.writable() is False


# --------------------------------------------------------------------------- BlobStore on the backend


@pytest.fixture
def store(backend: BlobBackend) -> BlobStore:
    return BlobStore(backend)  # the backend is started and closed by its own fixture


async def chunks(data: bytes, step: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), step):
        yield data[start : start + step]


async def test_store_put_commits_a_verified_blob(store):
    digest = digest_of(SMALL)
    await store.put(digest, SMALL)
    assert await store.stat(digest) == len(SMALL)
    assert await store.read_small(digest) == SMALL


async def test_store_put_stream_commits_a_multipart_blob(store):
    digest = digest_of(BIG)
    assert await store.put_stream(digest, chunks(BIG), len(BIG)) == len(BIG)
    assert b"".join([c async for c in store.read(digest)]) == BIG


async def test_store_writer_verifies_then_commits_and_nothing_is_visible_in_between(store):
    digest = digest_of(BIG)
    writer = await store.writer(digest, len(BIG))
    async for chunk in chunks(BIG):
        await writer.write(chunk)
    assert await writer.verify() == len(BIG)
    assert writer.spool_path.read_bytes() == BIG  # verified: followers may send it now
    assert await store.stat(digest) is None
    assert await writer.commit() == len(BIG)
    assert await store.stat(digest) == len(BIG)


@pytest.mark.parametrize("data", [SMALL, BIG], ids=["small", "multipart"])
async def test_store_refuses_bytes_that_do_not_match_the_digest_and_leaves_nothing(subject, data):
    store = BlobStore(subject.backend)
    digest = digest_of(data + b"x")
    with pytest.raises(DigestMismatch):
        await store.put_stream(digest, chunks(data))
    await assert_absent(subject.backend, digest)
    assert subject.leftovers() == []


async def test_store_refuses_fewer_bytes_than_the_expected_size_and_leaves_nothing(subject):
    store = BlobStore(subject.backend)
    digest = digest_of(SMALL)
    with pytest.raises(SizeMismatch):
        await store.put_stream(digest, chunks(SMALL[:-1]), len(SMALL))
    await assert_absent(subject.backend, digest)
    assert subject.leftovers() == []


async def test_store_refuses_more_bytes_than_the_expected_size_and_leaves_nothing(subject):
    store = BlobStore(subject.backend)
    digest = digest_of(SMALL)
    with pytest.raises(SizeMismatch):
        await store.put_stream(digest, chunks(SMALL + b"x"), len(SMALL))
    await assert_absent(subject.backend, digest)
    assert subject.leftovers() == []


async def test_store_refusal_keeps_an_earlier_committed_copy_intact(store):
    digest = digest_of(SMALL)
    await store.put(digest, SMALL)
    with pytest.raises(DigestMismatch):
        await store.put(digest, SMALL[:-1] + b"x")
    assert await store.read_small(digest) == SMALL
