"""storage.pump with fake bodies: bytes in order, hashed, landed on the loop; failures stop both threads.

A ``Pieces`` body hands out a bytes object in pieces of random sizes and never
blocks; a ``Fed`` body blocks in ``readinto`` until the test feeds it, as a
silent connection does, so each test can hold a thread where it wants it.
Waits carry generous timeouts only so a broken pump fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import random
import threading

import pytest

from storage.errors import DigestMismatch, SizeMismatch, StoreFull
from storage.pump import BUFFER_BYTES, FIRST_BYTES, SMALL_BYTES, pump
from tests.support.spool import digest_of, spool_files

GUARD = 20.0  # seconds: only ever reached when something hangs
MIB = 1024 * 1024


def body_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Pieces:
    """A whole body, read in pieces of random sizes up to ``largest`` (the pump must not
    rely on full reads); with ``largest=None`` each read fills the buffer, as ``Answer``'s do."""

    def __init__(self, body: bytes, seed: int = 0, largest: int | None = 300_000) -> None:
        self._body = memoryview(body)
        self._at = 0
        self._random = random.Random(seed)
        self._largest = largest
        self.interrupted = False

    def readinto(self, buffer: memoryview) -> int:
        if self.interrupted:
            raise ConnectionError("interrupted")
        count = min(len(buffer), len(self._body) - self._at)
        if self._largest is not None:
            count = min(count, self._random.randint(1, self._largest))
        buffer[:count] = self._body[self._at:self._at + count]
        self._at += count
        return count

    def interrupt(self) -> None:
        self.interrupted = True


_INTERRUPTED = object()


class Fed:
    """A body the test feeds: ``readinto`` blocks while nothing is there, until more
    bytes, the end, an error or ``interrupt`` come. With ``hold`` cleared an interrupted
    ``readinto`` stays in until it is set again (a slow way out of the network)."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._rest = memoryview(b"")
        self._over = False
        self._lock = threading.Lock()
        self.waiting = threading.Event()  # a readinto is blocked for more, now
        self.raised = threading.Event()  # a readinto raised a fed error
        self.interrupted = threading.Event()
        self.interrupted_while_waiting = False
        self.hold = threading.Event()
        self.hold.set()
        self.active = 0  # readinto calls in progress
        self.readers: list[threading.Thread] = []

    def feed(self, data: bytes) -> None:
        self._items.put(bytes(data))

    def end(self) -> None:
        self._items.put(None)

    def fail(self, error: BaseException) -> None:
        self._items.put(error)

    def interrupt(self) -> None:
        with self._lock:
            self.interrupted_while_waiting |= self.waiting.is_set()
        self.interrupted.set()
        self._items.put(_INTERRUPTED)

    def readinto(self, buffer: memoryview) -> int:
        with self._lock:
            self.active += 1
        self.readers.append(threading.current_thread())
        try:
            while not self._rest:
                if self._over:
                    return 0
                try:
                    item = self._items.get_nowait()
                except queue.Empty:
                    self.waiting.set()
                    try:
                        item = self._items.get(timeout=GUARD)  # a broken pump fails, its thread ends
                    except queue.Empty:
                        raise TimeoutError("nothing fed, no interrupt") from None
                    finally:
                        self.waiting.clear()
                if item is _INTERRUPTED:
                    self.hold.wait(GUARD)
                    raise ConnectionError("interrupted")
                if item is None:
                    self._over = True
                elif isinstance(item, BaseException):
                    self.raised.set()
                    raise item
                else:
                    assert isinstance(item, bytes)
                    self._rest = memoryview(item)
            count = min(len(buffer), len(self._rest))
            buffer[:count] = self._rest[:count]
            self._rest = self._rest[count:]
            return count
        finally:
            with self._lock:
                self.active -= 1


class Sink:
    """``write``: keeps a copy of each piece (the pump reuses its buffers) and the thread it came on."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.threads: set[threading.Thread] = set()

    def __call__(self, data: memoryview) -> None:
        self.threads.add(threading.current_thread())
        self.pieces.append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    @property
    def thread_names(self) -> set[str]:
        return {thread.name.rstrip("_0123456789") for thread in self.threads}


class Landed:
    """``landed``: the counts, whether each came on the loop's thread, and an event at the first."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.off_loop = 0
        self.first = asyncio.Event()
        self._loop_thread = threading.get_ident()

    def __call__(self, count: int) -> None:
        if threading.get_ident() != self._loop_thread:
            self.off_loop += 1
        self.counts.append(count)
        self.first.set()


async def waited(event: threading.Event) -> bool:
    return await asyncio.wait_for(asyncio.to_thread(event.wait, GUARD), GUARD)


async def joined(threads) -> None:
    """The pump's own threads end (the small bodies' pooled thread stays)."""
    for thread in threads:
        if thread.name.startswith("regcache-pump"):
            continue
        await asyncio.wait_for(asyncio.to_thread(thread.join, GUARD), GUARD)
        assert not thread.is_alive()


async def loop_turns(count: int = 20) -> None:
    """Lets whatever the loop has been handed (a thread's call_soon_threadsafe) run."""
    for _ in range(count):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- whole bodies


@pytest.mark.parametrize("largest", [300_000, None], ids=["random-reads", "full-reads"])
@pytest.mark.parametrize("known", [False, True], ids=["unknown-size", "known-size"])
async def test_a_big_body_is_written_in_order_hashed_and_landed(known, largest):
    body = body_of(5 * MIB + 777, seed=1)
    source, sink, landed, hasher = Pieces(body, seed=2, largest=largest), Sink(), Landed(), hashlib.sha256()

    count = await asyncio.wait_for(
        pump(source, hasher, sink, landed, len(body) if known else None, "big"), GUARD)

    assert count == len(body)
    assert sink.data == body
    assert hasher.hexdigest() == sha256(body)
    assert sum(landed.counts) == len(body)
    assert landed.counts == [len(piece) for piece in sink.pieces]  # one landing per written batch
    assert 0 < landed.counts[0] <= FIRST_BYTES
    assert max(landed.counts) <= BUFFER_BYTES
    assert landed.off_loop == 0
    assert sink.thread_names == {"regcache-write"}
    assert not source.interrupted


@pytest.mark.parametrize("largest", [300_000, None], ids=["random-reads", "full-reads"])
@pytest.mark.parametrize("size", [1, FIRST_BYTES, 70_000, SMALL_BYTES])
async def test_a_small_body_is_written_hashed_and_landed_on_one_thread(size, largest):
    body = body_of(size, seed=size)
    source, sink, landed, hasher = Pieces(body, seed=3, largest=largest), Sink(), Landed(), hashlib.sha256()

    count = await asyncio.wait_for(pump(source, hasher, sink, landed, len(body), "small"), GUARD)

    assert count == len(body)
    assert sink.data == body
    assert hasher.hexdigest() == sha256(body)
    assert sum(landed.counts) == len(body)
    assert landed.counts == [len(piece) for piece in sink.pieces]
    assert landed.counts[0] <= FIRST_BYTES
    assert landed.off_loop == 0
    assert sink.thread_names == {"regcache-pump"}


async def test_an_empty_body_lands_nothing():
    for limit in (None, 0, 10):
        sink, landed, hasher = Sink(), Landed(), hashlib.sha256()
        assert await asyncio.wait_for(pump(Pieces(b""), hasher, sink, landed, limit, "empty"), GUARD) == 0
        assert sink.data == b""
        assert sum(landed.counts) == 0
        assert hasher.hexdigest() == sha256(b"")


@pytest.mark.parametrize("limit", [500_000, None], ids=["small", "big"])
async def test_the_first_bytes_land_before_the_rest_of_the_body_arrives(limit):
    body = body_of(500_000, seed=4)
    source, sink, landed, hasher = Fed(), Sink(), Landed(), hashlib.sha256()
    source.feed(body[:FIRST_BYTES])
    task = asyncio.create_task(pump(source, hasher, sink, landed, limit, "early"))

    await asyncio.wait_for(landed.first.wait(), GUARD)
    assert landed.counts == [FIRST_BYTES]
    assert sink.data == body[:FIRST_BYTES]
    assert not task.done()

    source.feed(body[FIRST_BYTES:300_000])
    source.feed(body[300_000:])
    source.end()
    assert await asyncio.wait_for(task, GUARD) == len(body)
    assert sink.data == body
    assert hasher.hexdigest() == sha256(body)
    assert sum(landed.counts) == len(body)
    assert landed.off_loop == 0


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("limit", [1000, FIRST_BYTES, SMALL_BYTES, 3 * MIB])
@pytest.mark.parametrize("extra", [1, 100_000])
async def test_more_bytes_than_the_limit_are_a_size_mismatch(limit, extra):
    body = body_of(limit + extra, seed=5)
    sink, landed = Sink(), Landed()
    with pytest.raises(SizeMismatch):
        await asyncio.wait_for(pump(Pieces(body, seed=6), hashlib.sha256(), sink, landed, limit, "long"), GUARD)
    assert len(sink.data) <= limit
    assert body.startswith(sink.data)


@pytest.mark.parametrize("limit", [800_000, None], ids=["small", "big"])
async def test_a_read_failing_mid_body_is_raised_once_the_writer_is_done(limit):
    body = body_of(2 * MIB, seed=7)
    source, sink, landed = Fed(), Sink(), Landed()
    source.feed(body[:700_000] if limit else body)
    writing, gate, returned = threading.Event(), threading.Event(), threading.Event()
    if limit is not None:
        gate.set()  # one thread reads and writes: a held write would hold the read too
    late: list[int] = []

    def write(data):
        if returned.is_set():
            late.append(len(data))
        writing.set()
        gate.wait(GUARD)  # the first write is held until the read has failed
        sink(data)

    task = asyncio.create_task(pump(source, hashlib.sha256(), write, landed, limit, "reset"))
    assert await waited(writing)
    source.fail(ConnectionError("reset by peer"))
    assert await waited(source.raised)
    if limit is None:  # the receiver is out; the writer is still in its first write
        await joined([source.readers[-1]])
        await loop_turns()
        assert not task.done()
    gate.set()
    with pytest.raises(ConnectionError, match="reset by peer"):
        await asyncio.wait_for(task, GUARD)
    returned.set()

    await joined(sink.threads)
    assert late == []
    if limit is None:  # the batches read after the held one are not written: the failure stopped both
        assert sink.data == body[:FIRST_BYTES]
    assert body.startswith(sink.data)
    assert sum(landed.counts) == len(sink.data)


async def test_a_failing_write_interrupts_the_blocked_read_and_is_raised():
    source = Fed()
    source.feed(body_of(100_000, seed=8))

    def write(data):
        assert source.waiting.wait(GUARD)  # the receiver has read all there is and waits for more
        raise StoreFull("no space left")

    with pytest.raises(StoreFull):
        await asyncio.wait_for(pump(source, hashlib.sha256(), write, Landed(), None, "full"), GUARD)
    assert source.interrupted.is_set()
    assert source.interrupted_while_waiting
    assert source.active == 0


async def test_a_failing_write_of_a_small_body_is_raised():
    source = Fed()
    source.feed(body_of(FIRST_BYTES, seed=9))

    def write(data):
        raise StoreFull("no space left")

    with pytest.raises(StoreFull):
        await asyncio.wait_for(pump(source, hashlib.sha256(), write, Landed(), 500_000, "full"), GUARD)
    assert source.active == 0


@pytest.mark.parametrize("limit", [500_000, None], ids=["small", "big"])
async def test_cancelling_interrupts_the_read_and_waits_for_the_threads(limit):
    body = body_of(10_000, seed=10)
    source, sink, landed = Fed(), Sink(), Landed()
    source.feed(body)
    source.hold.clear()  # once interrupted, the read stays in until the test lets it out
    task = asyncio.create_task(pump(source, hashlib.sha256(), sink, landed, limit, "cancelled"))
    assert await waited(source.waiting)  # the first bytes are in; the reader waits for more

    task.cancel()
    assert await waited(source.interrupted)
    assert source.interrupted_while_waiting
    await loop_turns()
    assert not task.done()  # a reader is still in readinto: the cancellation waits for it

    at_the_end: list[int] = []
    task.add_done_callback(lambda _: at_the_end.append(source.active))
    source.hold.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, GUARD)
    assert at_the_end == [0]
    await joined(set(source.readers) | sink.threads)
    # Written or not (a batch not yet taken by the writer when it stopped is dropped), nothing else.
    assert body.startswith(sink.data)
    assert sum(landed.counts) == len(sink.data)


# --------------------------------------------------------------------------- through BlobWriter.pump


async def test_a_pumped_blob_is_verified_and_committed(store, tmp_path):
    body = body_of(3 * MIB, seed=11)
    digest = digest_of(body)
    writer = await store.writer(digest, len(body))
    # What came before the body was handed to threads: one batch gone to the worker, one still gathered.
    await writer.write(body[:100_000])
    await writer.write(body[100_000:200_000])
    await writer.pump(Pieces(body[200_000:], seed=12))
    assert writer.received == writer.flushed == len(body)

    assert await writer.verify() == len(body)
    assert await writer.commit() == len(body)
    assert await store.stat(digest) == len(body)
    path = store.local_path(digest)
    assert path is not None and path.read_bytes() == body
    assert spool_files(tmp_path) == []


async def test_a_pumped_blob_with_the_wrong_digest_is_aborted(store, tmp_path):
    body = body_of(3 * MIB, seed=13)
    digest = digest_of(body)
    wrong = body[:-1] + bytes([body[-1] ^ 0xFF])
    writer = await store.writer(digest, len(body))
    await writer.pump(Pieces(wrong, seed=14))
    assert spool_files(tmp_path) != []

    with pytest.raises(DigestMismatch):
        await writer.verify()
    assert writer.aborted and not writer.verified
    assert await store.stat(digest) is None
    assert spool_files(tmp_path) == []


async def test_a_pumped_body_longer_than_expected_is_refused(store, tmp_path):
    body = body_of(3 * MIB, seed=15)
    writer = await store.writer(digest_of(body), len(body))
    await writer.write(body[:100_000])
    with pytest.raises(SizeMismatch):  # what ``write`` took counts against the expected size
        await writer.pump(Pieces(body[100_000:] + b"more", seed=16))
    await writer.abort()
    assert spool_files(tmp_path) == []
