"""The fill protocol: one upstream fetch into the store, read by every client as it grows.

A controllable upstream body (chunks pushed by the test) feeds ``Fills``; clients
read through the blob answer (``proxy.pull.answers.FillingBlob``), as the /v2
handlers and admin pull do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config.settings import UpstreamSettings
from proxy.errors import RangeNotSatisfiable, UpstreamDigestMismatch, UpstreamUnavailable
from proxy.http import ranges
from proxy.metrics.events import Events
from proxy.pull.answers import FillingBlob, RangeFetcher
from proxy.pull.fills import Fills
from proxy.pull.links import Links
from proxy.pull.routing import Route
from proxy.upstream.responses import BlobPart, BlobStream
from storage import directio, paths
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import FLUSH_BYTES, BlobStore
from storage.errors import DigestMismatch, SizeMismatch, StoreFull
from storage.index.rows import RepositoryName
from storage.oci.digest import Digest
from storage.progress import SpoolFollower
from tests.support.pagecache import cached_fraction

ROUTE = Route(UpstreamSettings(name="fake.test", url="http://fake.test", default=True), "team/app")
BLOB = os.urandom(2 * FLUSH_BYTES + 4321)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BLOB).hexdigest())
END = b""  # pushed to end the upstream body


class PushedUpstream:
    """An upstream whose blob body is what the test pushes, when it pushes it."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.body: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self.opened = 0
        self.ranges: list[str] = []  # the specs asked for, as sent
        self.ignores_range = False
        self.answering = asyncio.Event()  # cleared: the whole blob's GET gets no answer yet
        self.answering.set()

    @contextlib.asynccontextmanager
    async def open_blob(self, repository: str, digest: str, size: int | None = None) -> AsyncIterator[BlobStream]:
        self.opened += 1
        await self.answering.wait()
        yield BlobStream(self.size, self._chunks())

    @contextlib.asynccontextmanager
    async def open_blob_range(self, repository: str, digest: str, spec: str) -> AsyncIterator[BlobPart | None]:
        """The upstream's own 206: the range at once, whatever the fill's body is doing."""
        self.ranges.append(spec)
        if self.ignores_range:
            yield None
            return
        specs = ranges.parse(f"bytes={spec}")
        assert specs is not None and len(specs) == 1, spec
        found = specs[0].resolve(len(BLOB))
        if found is None:  # a 416
            yield BlobPart(len(BLOB), 0, len(BLOB), _once(b""))
        else:
            yield BlobPart(found.start, found.length, len(BLOB), _once(BLOB[found.start : found.stop]))

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (item := await self.body.get()) != END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def push(self, *items: bytes | BaseException) -> None:
        for item in items:
            self.body.put_nowait(item)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def ranged(upstream: PushedUpstream) -> RangeFetcher:
    return functools.partial(upstream.open_blob_range, ROUTE.repository, str(DIGEST))


async def _read(answer: FillingBlob, offset: int, length: int) -> bytes:
    return b"".join([chunk async for chunk in answer.read(offset, length)])


class Index:
    """The two index calls a fill makes."""

    def __init__(self, descriptor_size: int | None = None) -> None:
        self.recorded: list[tuple[RepositoryName, str, int]] = []
        self.descriptor_size_asked = 0
        self._descriptor_size = descriptor_size

    async def descriptor_size(self, repository: RepositoryName, digest: str) -> int | None:
        self.descriptor_size_asked += 1
        return self._descriptor_size

    async def record_blob(self, repository: RepositoryName, digest: str, size: int) -> int:
        self.recorded.append((repository, digest, size))
        return 7


class Reader:
    """A client reading a fill's bytes, counting them as they come."""

    def __init__(self, answer: FillingBlob) -> None:
        self.received = bytearray()
        self._grew = asyncio.Event()
        self.task = asyncio.create_task(self._read(answer))

    async def _read(self, answer: FillingBlob) -> bytes:
        await answer.opened()
        async for chunk in answer.chunks():
            self.received += chunk
            self._grew.set()
        return bytes(self.received)

    async def has(self, count: int) -> None:
        async with asyncio.timeout(10):  # a guard against a hang, not a pace
            while len(self.received) < count:
                self._grew.clear()
                await self._grew.wait()


async def started_store(tmp_path: Path, direct_io: bool = False) -> BlobStore:
    blobs = BlobStore(FilesystemBackend(tmp_path, direct_io=direct_io))
    await blobs.start()
    return blobs


@pytest.fixture
async def store(tmp_path: Path) -> BlobStore:
    return await started_store(tmp_path)


@pytest.fixture
async def direct_store(tmp_path: Path) -> BlobStore:
    """A store whose big spools go around the page cache (``storage.direct_io``)."""
    return await started_store(tmp_path, direct_io=True)


def make_fills(store: BlobStore, index: Index | None = None) -> Fills:
    return Fills(store, index or Index(), Events(), Links(), timeout=60)  # type: ignore[arg-type]


async def test_readers_stream_the_fill_while_it_grows_and_get_the_last_byte_once_verified(store):
    upstream = PushedUpstream(len(BLOB))
    index = Index()
    fills = make_fills(store, index)
    fill = fills.start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    first = Reader(FillingBlob(fill, "miss", ranged(upstream)))
    follower = Reader(FillingBlob(fill, "coalesced", ranged(upstream)))
    upstream.push(BLOB[:FLUSH_BYTES])
    await first.has(FLUSH_BYTES - 1)
    await follower.has(FLUSH_BYTES - 1)
    upstream.push(BLOB[FLUSH_BYTES:])  # every byte is in, none verified yet
    await first.has(len(BLOB) - 1)
    await follower.has(len(BLOB) - 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(first.received) == len(follower.received) == len(BLOB) - 1, "the last byte waits for the digest"
    assert not first.task.done() and not follower.task.done()
    upstream.push(END)
    assert await first.task == BLOB
    assert await follower.task == BLOB
    assert await FillingBlob(fill, "miss", ranged(upstream)).stored() == len(BLOB)
    assert index.recorded == [(ROUTE.repository_name, str(DIGEST), len(BLOB))]
    assert await store.stat(DIGEST) == len(BLOB)
    assert upstream.opened == 1
    assert fills.get(DIGEST) is None and len(fills) == 0


def _followed(spool: SpoolFollower, size: int) -> bytes:
    """What a sending thread following the spool reads (``proxy.http.filesend``)."""
    got, position = bytearray(), 0
    buffer = directio.buffer(size + 2 * directio.ALIGN) if spool.direct() else None
    while position < size:
        ready = spool.progress.readable(position, 5)
        assert ready is not None, "nothing landed"
        end = ready[0]
        if buffer is not None:
            assert spool.direct_fd is not None
            got += directio.pread(spool.direct_fd, buffer, position, end - position)
        else:
            got += os.pread(spool.fd, end - position, position)
        position = end
    return bytes(got)


async def test_a_spool_s_follower_gets_the_last_byte_only_once_verified(store):
    upstream = PushedUpstream(len(BLOB))
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    upstream.push(BLOB)
    assert await answer.opened() == len(BLOB)
    spool = answer.follower()
    assert spool is not None
    for _ in range(200):
        if await asyncio.to_thread(spool.progress.readable, 0, 0) == (len(BLOB) - 1, False):
            break
        await asyncio.sleep(0.01)
    assert await asyncio.to_thread(spool.progress.readable, 0, 0) == (len(BLOB) - 1, False)
    upstream.push(END)
    assert await asyncio.to_thread(spool.progress.readable, len(BLOB) - 1, 5) == (len(BLOB), True)
    assert await asyncio.to_thread(_followed, spool, len(BLOB)) == BLOB


async def test_a_digest_mismatch_fails_every_reader_and_stores_nothing(store, tmp_path):
    wrong = BLOB[:-1] + bytes([BLOB[-1] ^ 0xFF])
    upstream = PushedUpstream(len(wrong))
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    readers = [Reader(FillingBlob(fill, "miss", ranged(upstream))) for _ in range(3)]
    upstream.push(wrong[:FLUSH_BYTES])
    await readers[0].has(FLUSH_BYTES - 1)
    upstream.push(wrong[FLUSH_BYTES:], END)
    for reader in readers:
        with pytest.raises(UpstreamDigestMismatch) as failed:
            await reader.task
        assert isinstance(failed.value.__cause__, DigestMismatch), "the upstream's fault, found by the check"
        assert len(reader.received) < len(wrong), "never the clean end of a wrong body"
    with pytest.raises(UpstreamDigestMismatch):
        await FillingBlob(fill, "miss", ranged(upstream)).stored()
    assert await store.stat(DIGEST) is None
    assert list(paths.tmp_dir(tmp_path).iterdir()) == []


async def test_an_upstream_failure_mid_body_fails_every_reader(store):
    upstream = PushedUpstream(len(BLOB))
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    readers = [Reader(FillingBlob(fill, "miss", ranged(upstream))) for _ in range(2)]
    upstream.push(BLOB[:FLUSH_BYTES])
    await readers[1].has(FLUSH_BYTES - 1)
    upstream.push(UpstreamUnavailable("connection reset"))
    for reader in readers:
        with pytest.raises(UpstreamUnavailable):
            await reader.task
    assert await store.stat(DIGEST) is None


async def test_a_reader_joining_after_the_end_gets_the_whole_blob(store):
    upstream = PushedUpstream(None)  # no Content-Length: the size is known only at the end
    fills = make_fills(store)
    fill = fills.start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    upstream.push(BLOB[:1000], BLOB[1000:], END)
    assert await FillingBlob(fill, "miss", ranged(upstream)).stored() == len(BLOB)
    assert fills.get(DIGEST) is None
    late = FillingBlob(fill, "coalesced", ranged(upstream))  # a request that found the fill just before it ended
    assert b"".join([chunk async for chunk in late.chunks()]) == BLOB
    spool = late.follower()
    assert spool is not None
    assert await asyncio.to_thread(_followed, spool, len(BLOB)) == BLOB


class ThreadBody:
    """An upstream body read on the pump's threads (``storage.pump.BodySource``)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def readinto(self, buffer: memoryview, /) -> int:
        count = min(len(buffer), len(self._data))
        buffer[:count], self._data = self._data[:count], self._data[count:]
        return count

    def interrupt(self) -> None:
        pass


class PumpedUpstream(PushedUpstream):
    """The whole blob at once, through the pump: a big blob's spool is written around the page cache."""

    def __init__(self, blob: bytes) -> None:
        super().__init__(len(blob))
        self.blob = blob

    @contextlib.asynccontextmanager
    async def open_blob(self, repository: str, digest: str, size: int | None = None) -> AsyncIterator[BlobStream]:
        yield BlobStream(len(self.blob), _once(self.blob), ThreadBody(self.blob))


async def test_a_reader_joining_after_the_commit_reads_a_spool_written_around_the_page_cache(direct_store):
    big = os.urandom(3 * 1024 * 1024 + 4321)  # past the pump's one-thread size
    digest = Digest.parse("sha256:" + hashlib.sha256(big).hexdigest())
    upstream = PumpedUpstream(big)
    fill = make_fills(direct_store).start(digest, ROUTE, upstream)  # type: ignore[arg-type]
    assert await FillingBlob(fill, "miss", ranged(upstream)).stored() == len(big)
    assert await direct_store.stat(digest) == len(big), "committed: the spool has its final name"
    # A request that found the fill just before the commit renamed its spool: the
    # range and the follower must not need the spool's old name.
    late = FillingBlob(fill, "coalesced", ranged(upstream))
    assert await _read(late, 1_000_000, 2_000_000) == big[1_000_000:3_000_000]
    spool = late.follower()
    assert spool is not None
    assert spool.direct() and spool.direct_fd is not None, "the spool went around the page cache"
    assert await asyncio.to_thread(_followed, spool, len(big)) == big


async def test_a_spool_written_around_the_page_cache_is_read_into_it_once_no_request_holds_the_fill(direct_store):
    # Not at the commit, while a slow client may still be reading the spool; not left to
    # the blob's next client either, who would then read the disk.
    big = os.urandom(8 * 1024 * 1024 + 4321)
    digest = Digest.parse("sha256:" + hashlib.sha256(big).hexdigest())
    upstream = PumpedUpstream(big)
    fill = make_fills(direct_store).start(digest, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    assert await answer.stored() == len(big)
    stored = Path(str(direct_store.local_path(digest)))
    await asyncio.sleep(0.2)
    assert cached_fraction(stored) < 0.5, "read ahead while a request still holds the fill"
    del fill, answer
    for _ in range(200):
        if cached_fraction(stored) == 1:
            break
        await asyncio.sleep(0.05)
    assert cached_fraction(stored) == 1


class SharedFilesystem(FilesystemBackend):
    """A filesystem store as if other replicas wrote to it too (as an S3 bucket is shared)."""

    stats = 0

    @property
    def shared(self):  # type: ignore[override]
        return object()

    async def stat(self, digest: Digest) -> int | None:
        self.stats += 1
        return await super().stat(digest)


async def test_a_blob_another_replica_stored_first_is_read_from_the_store(tmp_path):
    store = BlobStore(SharedFilesystem(tmp_path))
    await store.start()
    await store.put(DIGEST, BLOB)
    upstream = PushedUpstream(len(BLOB))
    index = Index()
    fill = make_fills(store, index).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    assert await answer.opened() == len(BLOB)
    assert answer.follower() is None, "no spool file to send from"
    assert b"".join([chunk async for chunk in answer.chunks()]) == BLOB
    assert await answer.stored() == len(BLOB)
    assert upstream.opened == 0
    assert index.recorded == [(ROUTE.repository_name, str(DIGEST), len(BLOB))]


async def test_a_fill_that_fails_before_any_byte_fails_its_readers_at_open(store):
    upstream = PushedUpstream(len(BLOB))

    @contextlib.asynccontextmanager
    async def refused(repository: str, digest: str, size: int | None = None) -> AsyncIterator[BlobStream]:
        raise UpstreamUnavailable("connection refused")
        yield  # pragma: no cover

    upstream.open_blob = refused  # type: ignore[method-assign]
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    with pytest.raises(UpstreamUnavailable):
        await FillingBlob(fill, "miss", ranged(upstream)).opened()


async def test_a_range_the_spool_holds_comes_from_it_and_others_from_the_upstreams_206(store):
    upstream = PushedUpstream(len(BLOB))
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    upstream.push(BLOB[:FLUSH_BYTES])
    assert await answer.opened() == len(BLOB)
    await Reader(FillingBlob(fill, "coalesced", ranged(upstream))).has(FLUSH_BYTES - 1)
    assert await _read(answer, 100, 1000) == BLOB[100:1100]
    assert upstream.ranges == [], "landed bytes need no upstream request"
    tail = len(BLOB) - 4096
    assert await _read(answer, tail, 4096) == BLOB[tail:]
    assert upstream.ranges == [f"{tail}-{len(BLOB) - 1}"]
    upstream.push(BLOB[FLUSH_BYTES:], END)
    assert await answer.stored() == len(BLOB)


async def test_when_the_upstream_ignores_range_the_range_comes_from_the_fill_as_it_lands(store):
    upstream = PushedUpstream(len(BLOB))
    upstream.ignores_range = True
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    assert await answer.opened() == len(BLOB)
    wanted = asyncio.create_task(_read(answer, FLUSH_BYTES + 10, 100))
    upstream.push(BLOB[: FLUSH_BYTES + 200])
    assert await wanted == BLOB[FLUSH_BYTES + 10 : FLUSH_BYTES + 110]
    assert upstream.opened == 1 and len(upstream.ranges) == 1
    upstream.push(BLOB[FLUSH_BYTES + 200 :], END)
    assert await answer.stored() == len(BLOB)


async def test_a_cold_range_is_asked_of_the_upstream_at_once_and_the_fill_runs_beside_it(store):
    upstream = PushedUpstream(len(BLOB))
    upstream.answering.clear()  # the fill's GET is still waiting for the upstream's answer
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    suffix = ranges.RangeSpec(None, 4096)
    assert await answer.sized(suffix) == len(BLOB), "the size comes from the upstream's 206"
    tail = len(BLOB) - 4096
    assert await _read(answer, tail, 4096) == BLOB[tail:]
    assert upstream.ranges == ["-4096"], "the suffix went as asked: it needs no size"
    assert not fill.started, "the fill has not heard from the upstream yet"
    upstream.answering.set()
    upstream.push(BLOB, END)
    assert await answer.stored() == len(BLOB)
    assert upstream.opened == 1, "one whole-blob GET"


async def test_a_cold_range_past_the_end_takes_the_size_from_the_upstreams_416(store):
    upstream = PushedUpstream(len(BLOB))
    upstream.answering.clear()
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    past = ranges.RangeSpec(len(BLOB) + 5, None)
    assert await answer.sized(past) == len(BLOB)
    with pytest.raises(RangeNotSatisfiable):
        ranges.resolve((past,), len(BLOB))
    await answer.release()
    upstream.answering.set()
    upstream.push(BLOB, END)
    assert await answer.stored() == len(BLOB)


async def test_a_cold_range_waits_for_the_fill_when_the_upstream_ignores_range(store):
    upstream = PushedUpstream(len(BLOB))
    upstream.ignores_range = True
    upstream.answering.clear()
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    sized = asyncio.create_task(answer.sized(ranges.RangeSpec(10, 109)))
    await asyncio.sleep(0)
    upstream.answering.set()
    assert await sized == len(BLOB), "the fill's answer said the size"
    wanted = asyncio.create_task(_read(answer, 10, 100))
    upstream.push(BLOB, END)
    assert await wanted == BLOB[10:110]
    assert await answer.stored() == len(BLOB)


async def test_a_range_asked_early_but_not_sent_first_is_let_go(store):
    upstream = PushedUpstream(len(BLOB))
    upstream.answering.clear()
    fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    # bytes=100-199,0-149: coalesced to 0-199, which the early answer (100-199) is not.
    assert await answer.sized(ranges.RangeSpec(100, 199)) == len(BLOB)
    assert await _read(answer, 0, 200) == BLOB[:200]
    assert upstream.ranges == ["100-199", "0-199"]
    upstream.answering.set()
    upstream.push(BLOB, END)
    assert await answer.stored() == len(BLOB)


async def test_a_size_the_caller_knows_from_a_descriptor_spares_the_index_query(store):
    # No Content-Length: the descriptor's size is the one the fill checks the body against.
    upstream = PushedUpstream(None)
    index = Index()
    fill = make_fills(store, index).start(DIGEST, ROUTE, upstream, len(BLOB))  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    upstream.push(BLOB, END)
    assert await answer.opened() == len(BLOB)
    assert await answer.stored() == len(BLOB)
    assert index.descriptor_size_asked == 0


async def test_without_a_size_from_the_caller_the_fill_asks_the_index(store):
    upstream = PushedUpstream(None)
    index = Index(descriptor_size=len(BLOB) - 1)
    fill = make_fills(store, index).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answer = FillingBlob(fill, "miss", ranged(upstream))
    upstream.push(BLOB, END)
    assert await answer.opened() == len(BLOB) - 1
    with pytest.raises(UpstreamDigestMismatch) as failed:
        await answer.stored()
    assert isinstance(failed.value.__cause__, SizeMismatch)
    assert index.descriptor_size_asked == 1


async def test_a_store_nobody_else_writes_to_takes_no_second_look_before_the_fetch(tmp_path):
    class Alone(SharedFilesystem):
        shared = None  # type: ignore[assignment]

    for backend, looks in ((Alone(tmp_path / "alone"), 0), (SharedFilesystem(tmp_path / "shared"), 1)):
        store = BlobStore(backend)
        await store.start()
        upstream = PushedUpstream(len(BLOB))
        fill = make_fills(store).start(DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
        upstream.push(BLOB, END)
        assert await FillingBlob(fill, "miss", ranged(upstream)).stored() == len(BLOB)
        assert backend.stats == looks


# ------------------------------------------------------------ small blobs, gathered in memory

SMALL = os.urandom(48 * 1024)
SMALL_DIGEST = Digest.parse("sha256:" + hashlib.sha256(SMALL).hexdigest())


async def test_a_small_blob_reaches_every_reader_whole_once_verified_with_no_spool_file(store, tmp_path):
    upstream = PushedUpstream(len(SMALL))
    index = Index()
    fills = make_fills(store, index)
    fill = fills.start(SMALL_DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    answers = [FillingBlob(fill, "miss", ranged(upstream)), FillingBlob(fill, "coalesced", ranged(upstream))]
    opened = [asyncio.ensure_future(answer.opened()) for answer in answers]
    upstream.push(SMALL[:1000])
    for _ in range(20):
        await asyncio.sleep(0)
    assert not any(task.done() for task in opened), "no header before the whole blob is verified"
    assert list(paths.tmp_dir(tmp_path).iterdir()) == [], "nothing spooled"
    upstream.push(SMALL[1000:], END)
    assert [await task for task in opened] == [len(SMALL), len(SMALL)]
    for answer in answers:
        assert answer.follower() is None
        assert b"".join([chunk async for chunk in answer.chunks()]) == SMALL
    assert await _read(answers[0], 100, 1000) == SMALL[100:1100]
    assert upstream.ranges == [], "a range of a blob in memory is not asked of the upstream"
    assert await answers[0].stored() == len(SMALL)
    assert await store.read_small(SMALL_DIGEST) == SMALL
    assert index.recorded == [(ROUTE.repository_name, str(SMALL_DIGEST), len(SMALL))]
    assert fills.held_bytes == 0


@pytest.mark.parametrize("wrong", [SMALL[:-1] + bytes([SMALL[-1] ^ 0xFF]), SMALL + b"x", SMALL[:-1]],
                         ids=["other bytes", "longer", "shorter"])
async def test_a_small_blob_the_upstream_gets_wrong_fails_its_readers_before_any_byte(store, tmp_path, wrong):
    upstream = PushedUpstream(len(SMALL))  # the size announced is right; the body is not
    fills = make_fills(store)
    fill = fills.start(SMALL_DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    upstream.push(wrong, END)
    with pytest.raises(UpstreamDigestMismatch) as failed:
        await FillingBlob(fill, "miss", ranged(upstream)).opened()
    assert isinstance(failed.value.__cause__, DigestMismatch | SizeMismatch)
    with pytest.raises(UpstreamDigestMismatch):
        await FillingBlob(fill, "miss", ranged(upstream)).stored()
    assert await store.stat(SMALL_DIGEST) is None
    assert list(paths.tmp_dir(tmp_path).iterdir()) == []
    assert fills.held_bytes == 0


async def test_small_blobs_past_what_fills_may_hold_in_memory_are_spooled(store, monkeypatch):
    from proxy.pull import fills as fills_module

    monkeypatch.setattr(fills_module, "HELD_BYTES", len(SMALL) + 100)
    other = os.urandom(len(SMALL))
    other_digest = Digest.parse("sha256:" + hashlib.sha256(other).hexdigest())
    first_upstream, second_upstream = PushedUpstream(len(SMALL)), PushedUpstream(len(other))
    fills = make_fills(store)
    first = fills.start(SMALL_DIGEST, ROUTE, first_upstream)  # type: ignore[arg-type]
    first_upstream.push(SMALL[:10])  # held in memory, not done
    for _ in range(20):
        await asyncio.sleep(0)
    assert fills.held_bytes == len(SMALL)
    second = fills.start(other_digest, ROUTE, second_upstream)  # type: ignore[arg-type]
    second_upstream.push(other, END)
    spooled = FillingBlob(second, "miss", ranged(second_upstream))
    assert await spooled.opened() == len(other)
    assert spooled.follower() is not None, "no room left in memory: this one is spooled"
    assert b"".join([chunk async for chunk in spooled.chunks()]) == other
    first_upstream.push(SMALL[10:], END)
    held = FillingBlob(first, "miss", ranged(first_upstream))
    assert await held.opened() == len(SMALL)
    assert held.follower() is None
    assert await held.stored() == len(SMALL) and await spooled.stored() == len(other)
    assert fills.held_bytes == 0


async def test_a_small_blob_whose_commit_fails_still_reaches_its_readers_and_is_not_kept(store, monkeypatch):
    async def full(digest: Digest, data: bytes) -> None:
        raise StoreFull("no space left on the store's filesystem")

    monkeypatch.setattr(store.backend, "put", full)
    upstream = PushedUpstream(len(SMALL))
    fills = make_fills(store)
    fill = fills.start(SMALL_DIGEST, ROUTE, upstream)  # type: ignore[arg-type]
    upstream.push(SMALL, END)
    answer = FillingBlob(fill, "miss", ranged(upstream))
    assert await answer.opened() == len(SMALL)
    assert b"".join([chunk async for chunk in answer.chunks()]) == SMALL, "verified bytes go out"
    with pytest.raises(StoreFull):
        await answer.stored()
    assert await store.stat(SMALL_DIGEST) is None
    assert fills.held_bytes == 0
