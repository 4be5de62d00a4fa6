"""What of a file is in the page cache, asked without bringing anything in."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path


def cached_fraction(path: Path) -> float:
    """How much of the file at ``path`` is in the page cache (``mincore`` on a mapping that is
    never touched, so asking does not bring anything in)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
        vector = (ctypes.c_ubyte * pages)()
        start = ctypes.c_char.from_buffer(mapping)  # the mapping cannot close while this lives
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start
        return sum(page & 1 for page in vector) / pages
