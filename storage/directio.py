"""Spool bytes written and read around the page cache (``O_DIRECT``).

Why: a cold fill of a big blob writes every byte into a new file, and a new
file's pages are fresh memory. Where that memory is slow to hand out (a VM that
reports free pages to its host takes a fault into the host for each one) the
page-cache copy became the slowest step of a cold fill, and it sits on the
client's path: a new 1 GiB file here wrote at 410-520 MiB/s through the page
cache and at 1.3-1.8 GiB/s with ``O_DIRECT``, which also spares the copy itself.
Readers of a spool written this way read it the same way, into aligned buffers
of their own, so a fill touches no new page-cache memory at all. Once the
fill's last client is done, the blob's pages are brought into the cache on a
thread of their own (``read_ahead_later``), off every client's path, so the
blob's next client reads memory as it would after a buffered fill. All of it
only with ``storage.direct_io: true``: a first client slower than the fill
(skopeo, docker, containerd writing what they read) then reads the spool from
the disk, and its pull takes longer than through the page cache.

``O_DIRECT`` wants the buffer's address, the file offset and the length to be
multiples of the device's logical block size; ``ALIGN`` covers every size in
use (512 and 4096). A write that is not aligned (the blob's last bytes, a batch
gathered on the loop) goes through the page cache instead: both are coherent,
the kernel drops cached pages a direct write covers and writes dirty ones back
before a direct read of them. A filesystem without ``O_DIRECT`` (tmpfs on older
kernels, some FUSE ones) refuses the open or the first write with ``EINVAL``:
everything then goes through the page cache as before.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading

ALIGN = 4096
# Bytes asked for per POSIX_FADV_WILLNEED (``read_ahead``).
READ_AHEAD_WINDOW = 8 * 1024 * 1024
AVAILABLE = hasattr(os, "O_DIRECT")
# Blobs waiting for the read-ahead thread, each an open descriptor. Bounded: a burst of big
# fills must not hold a descriptor per blob, and a blob past the bound is brought in by its
# first reader instead.
READ_AHEAD_QUEUE = 32
_pending: queue.Queue[int] = queue.Queue(maxsize=READ_AHEAD_QUEUE)
_reader_lock = threading.Lock()
_reader: threading.Thread | None = None


def buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes whose address is ``ALIGN``-aligned (an anonymous
    mapping starts on a page)."""
    return memoryview(mmap.mmap(-1, size))


def aligned(data: bytes | memoryview, offset: int) -> bool:
    """Whether ``data`` may be written at ``offset`` with ``O_DIRECT``."""
    if offset % ALIGN or not data or len(data) % ALIGN:
        return False
    if not isinstance(data, memoryview) or data.readonly:
        return False  # an immutable object: its address is not worth finding out
    return ctypes.addressof(ctypes.c_char.from_buffer(data)) % ALIGN == 0


def open_direct(path: str, flags: int) -> int | None:
    """``path`` opened with ``O_DIRECT`` added to ``flags``, or None where the filesystem
    has no direct I/O."""
    if not AVAILABLE:
        return None
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def read_ahead(fd: int) -> None:
    """The file behind ``fd`` (open for reading) brought into the page cache, then ``fd``
    closed. ``POSIX_FADV_WILLNEED`` queues the disk reads a window at a time (over the whole
    file at once it reads only the first window); reading the file through then waits for
    them and touches every page once. Untouched, pages read ahead still cost their first
    reader a fault each on a VM (1.3-2.1 GB/s against 6.4 GB/s once touched, here), and
    reading without asking ahead costs four times the CPU (2 s per GiB against 0.2-0.6)."""
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, READ_AHEAD_WINDOW):
            os.posix_fadvise(fd, offset, READ_AHEAD_WINDOW, os.POSIX_FADV_WILLNEED)
        into = bytearray(1024 * 1024)
        while os.readv(fd, [into]):
            pass
    except OSError:
        pass  # only a head start: the blob's first reader brings the pages in instead
    finally:
        os.close(fd)


def read_ahead_later(fd: int) -> None:
    """``read_ahead(fd)`` on the read-ahead thread, one blob at a time, never more than a
    core's work; ``fd`` is closed either way. The thread is a daemon: exiting does not wait
    for blobs still queued, which are only a head start."""
    global _reader
    with _reader_lock:
        if _reader is None:
            _reader = threading.Thread(target=_read_ahead_forever, name="regcache-readahead", daemon=True)
            _reader.start()
    try:
        _pending.put_nowait(fd)
    except queue.Full:
        os.close(fd)


def _read_ahead_forever() -> None:
    while True:
        read_ahead(_pending.get())


def refused(exc: OSError) -> bool:
    """Whether a direct read or write failed for want of direct I/O, not for the data's sake."""
    return exc.errno == errno.EINVAL


def pread(fd: int, into: memoryview, position: int, count: int) -> memoryview:
    """Up to ``count`` bytes of ``fd`` (opened with ``O_DIRECT``) from ``position``, read
    into the aligned ``into`` (at least ``count + 2 * ALIGN`` bytes) by whole blocks; a
    view of ``into`` that is empty at the end of the file."""
    start = position - position % ALIGN
    skip = position - start
    length = -(-(skip + count) // ALIGN) * ALIGN
    got = os.preadv(fd, [into[:length]], start)
    return into[skip:max(skip, min(got, skip + count))]
