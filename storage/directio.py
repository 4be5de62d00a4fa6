"""Spool bytes written and read around the page cache (``O_DIRECT``).

Why: a cold fill of a big blob writes every byte into a new file, and a new
file's pages are fresh memory. Where that memory is slow to hand out (a VM that
reports free pages to its host takes a fault into the host for each one) the
page-cache copy became the slowest step of a cold fill, and it sits on the
client's path: a new 1 GiB file here wrote at 410-520 MiB/s through the page
cache and at 1.3-1.8 GiB/s with ``O_DIRECT``, which also spares the copy itself.
Readers of a spool written this way read it the same way, into aligned buffers
of their own, so a fill touches no new page-cache memory at all. The blob's
pages come into the cache when it is first read after the fill, off the fill's
path.

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

ALIGN = 4096
AVAILABLE = hasattr(os, "O_DIRECT")


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
